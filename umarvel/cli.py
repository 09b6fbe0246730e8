"""The ``umarvel`` console script. Each feature module registers its own subcommand."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from umarvel.errors import UMarvelError
from umarvel.log import setup_logging

logger = logging.getLogger(__name__)

#: Modules exposing ``add_subparser(subparsers)``. Imported lazily so ``umarvel --help`` stays fast
#: and a broken optional feature never breaks the others.
SUBCOMMAND_MODULES = [
    "umarvel.commands.demo",
    "umarvel.commands.encode",
    "umarvel.commands.train",
    "umarvel.commands.merge",
    "umarvel.commands.eval",
    "umarvel.commands.mine",
    "umarvel.commands.teacher",
    "umarvel.commands.rerank",
]


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered subcommand."""
    parser = argparse.ArgumentParser(prog="umarvel", description="U-MARVEL universal multimodal retrieval")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # feature not present in this build
                continue
            raise
        module.add_subparser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, set up logging, run one subcommand; user errors exit 2 with one clear line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level.upper())
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UMarvelError as exc:
        logger.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
