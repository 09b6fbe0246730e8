"""The ``umarvel`` console script (also ``python -m umarvel``): one static table of subcommands."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from umarvel.commands import add_log_level, dispatch, pop_debug
from umarvel.commands import (demo, encode, eval as eval_commands, index, merge, mine, rerank, search, serve, teacher,
                              train)

#: Every ``umarvel`` subcommand, in ``umarvel --help`` order. Each module's ``add_subparser(subparsers)``
#: adds its parser with ``set_defaults(func=...)`` and keeps torch out of its import (``umarvel --help``
#: stays fast). A new command: one module under ``umarvel/commands/`` and one entry here.
COMMANDS = (demo, encode, train, merge, eval_commands, mine, teacher, rerank, index, search, serve)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(prog="umarvel", description="U-MARVEL universal multimodal retrieval")
    add_log_level(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_subparser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse, set up logging, run one subcommand; user errors exit 2 with one clear line."""
    parser = build_parser()
    argv, debug = pop_debug(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return dispatch(args.func, args, debug=debug)


if __name__ == "__main__":
    sys.exit(main())
