"""The ``umarvel`` subcommands: one module per command, listed once in :data:`umarvel.cli.COMMANDS`.

Each command module exposes ``add_subparser(subparsers)`` (adds its parser with ``set_defaults(func=...)``)
and keeps torch out of its module top, so ``umarvel --help`` stays fast (heavy imports happen inside the
command function). What every command shares lives here: :func:`dispatch` (logging, user errors as one line
and exit code 2) and :func:`run_standalone` (``python -m umarvel.commands.X``, what the shell launchers run).
Commands never import :mod:`umarvel.cli` (it imports them).
"""
from __future__ import annotations

import argparse
import logging
from typing import Callable, Sequence

from umarvel.errors import UMarvelError
from umarvel.log import setup_logging

logger = logging.getLogger(__name__)

CommandFn = Callable[[argparse.Namespace], "int | None"]


def add_log_level(parser: argparse.ArgumentParser) -> None:
    """The ``--log-level`` option every entry point has."""
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")


def dispatch(func: CommandFn, args: argparse.Namespace) -> int:
    """Set up logging and run ``func``; a ``UMarvelError`` becomes one clear log line and exit code 2."""
    setup_logging(args.log_level.upper())
    try:
        return int(func(args) or 0)
    except UMarvelError as exc:
        logger.error("%s", exc)
        return 2


def run_standalone(prog: str, description: str | None, configure: Callable[[argparse.ArgumentParser], None],
                   func: CommandFn, argv: Sequence[str] | None = None) -> int:
    """Entry point of one subcommand run as ``python -m umarvel.commands.X`` or from a script."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_log_level(parser)
    configure(parser)
    return dispatch(func, parser.parse_args(argv))
