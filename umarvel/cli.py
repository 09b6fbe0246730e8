"""The ``umarvel`` console script. Each feature module registers its own subcommand."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Callable

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
    "umarvel.commands.index",
    "umarvel.commands.search",
    "umarvel.commands.serve",
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


def _dispatch(func: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """Set up logging and run ``func``; a ``UMarvelError`` becomes one clear log line and exit code 2."""
    setup_logging(args.log_level.upper())
    try:
        return int(func(args) or 0)
    except UMarvelError as exc:
        logger.error("%s", exc)
        return 2


def run_standalone(prog: str, description: str | None, configure: Callable[[argparse.ArgumentParser], None],
                   func: Callable[[argparse.Namespace], int | None], argv: list[str] | None = None) -> int:
    """Entry point of one subcommand run as ``python -m umarvel.commands.X`` (used by the shell launchers)."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    configure(parser)
    return _dispatch(func, parser.parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, set up logging, run one subcommand; user errors exit 2 with one clear line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return _dispatch(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
