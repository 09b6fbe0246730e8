"""The ``umarvel`` subcommands: one module per command, listed once in :data:`umarvel.cli.COMMANDS`.

Each command module exposes ``add_subparser(subparsers)`` (adds its parser with ``set_defaults(func=...)``)
and keeps torch out of its module top, so ``umarvel --help`` stays fast (heavy imports happen inside the
command function). What every command shares lives here: :func:`dispatch` (logging, errors as one line
and exit code 2) and :func:`run_standalone` (``python -m umarvel.commands.X``, what the shell launchers run).
Commands never import :mod:`umarvel.cli` (it imports them).

Errors at the command line: a :class:`~umarvel.errors.UMarvelError` (config, data, checkpoint, environment,
file access, run-folder conflict), an ``OSError`` (permission, not a folder, disk full) or running out of
memory is printed as ONE line ``umarvel: error: ...`` (exit code 2); ``--debug`` (anywhere on the command
line, or ``UMARVEL_DEBUG=1``) prints the traceback first. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import traceback
from typing import Callable, Sequence

from umarvel.errors import UMarvelError
from umarvel.log import setup_logging
from umarvel.utils.io import os_error_message
from umarvel.utils.runs import exit_with_parent, under_launcher

logger = logging.getLogger(__name__)

CommandFn = Callable[[argparse.Namespace], "int | None"]
DEBUG_FLAG = "--debug"
#: Exit code of a user-caused error (argparse uses 2 as well).
USER_ERROR = 2
INTERRUPTED = 130


def add_log_level(parser: argparse.ArgumentParser) -> None:
    """The ``--log-level`` and ``--debug`` options every entry point has."""
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    parser.add_argument(DEBUG_FLAG, action="store_true",
                        help="show the traceback of an error (accepted anywhere on the command line)")


def add_run_flags(p: argparse.ArgumentParser, overwrite_help: str, before: str = "encoding") -> None:
    """``--overwrite`` and ``--skip-image-check`` (run-folder and pre-work checks, not part of the config)."""
    p.add_argument("--overwrite", action="store_true", help=overwrite_help)
    p.add_argument("--skip-image-check", action="store_true",
                   help=f"do not check every referenced image before {before} (huge sets)")


def positive_int(text: str) -> int:
    """``argparse`` type of counts such as ``--batch-size``: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def pop_debug(argv: Sequence[str] | None) -> tuple[list[str], bool]:
    """``argv`` without ``--debug`` (accepted anywhere) and whether it was there (or ``UMARVEL_DEBUG=1``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    rest = [a for a in args if a != DEBUG_FLAG]
    return rest, len(rest) != len(args) or os.environ.get("UMARVEL_DEBUG") == "1"


_WORKER_TRACE = re.compile(r"Caught \w+ in DataLoader worker process \d+\.\s*Original Traceback", re.S)


def error_line(exc: BaseException) -> str:
    """The one-line message of an error shown at the command line.

    A ``DataLoader`` worker's error arrives with the worker's traceback inside its message; only the
    original message (the traceback's last line) is kept.
    """
    msg = str(exc)
    if _WORKER_TRACE.search(msg):
        last = [line for line in msg.strip().splitlines() if line.strip()][-1]
        name = type(exc).__name__
        msg = last.split(f"{name}: ", 1)[-1] + " (in a data loader worker)"
    if isinstance(exc, OSError) and not isinstance(exc, UMarvelError):
        msg = os_error_message(exc) + "; nothing was lost (completed outputs are kept; rerun to continue)"
    elif isinstance(exc, UnicodeDecodeError):  # a reader that does not name its file (they should)
        msg = (f"an input file is not UTF-8 (byte 0x{exc.object[exc.start]:02x} at offset {exc.start} of a read "
               "block); --debug shows which reader")
    elif isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        first = msg.strip().splitlines()[0] if msg.strip() else ""
        msg = (f"out of memory ({first[:200]}); lower the batch size (--batch-size, train.per_device_batch_size "
               "or train.chunk_tokens); completed outputs are kept")
    return " ".join(msg.split())


def _rank_prefix() -> str:
    return f"[rank{os.environ.get('RANK', '0')}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""


def dispatch(func: CommandFn, args: argparse.Namespace, debug: bool | None = None) -> int:
    """Set up logging and run ``func``; a user-caused error becomes one line and exit code 2.

    Under torchrun the worker is first bound to its launcher (:func:`umarvel.utils.runs.exit_with_parent`).
    """
    setup_logging(args.log_level.upper())
    debug = bool(getattr(args, "debug", False)) if debug is None else debug
    if under_launcher():
        exit_with_parent()
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        sys.stderr.write(f"umarvel: {_rank_prefix()}interrupted; completed outputs are kept (rerun to resume)\n")
        return INTERRUPTED
    except (UMarvelError, OSError, MemoryError, RuntimeError, UnicodeDecodeError) as exc:
        if isinstance(exc, RuntimeError) and not isinstance(exc, UMarvelError) \
                and type(exc).__name__ != "OutOfMemoryError":
            raise  # a bug: keep the traceback
        if debug:
            traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
        sys.stderr.write(f"umarvel: error: {_rank_prefix()}{error_line(exc)}\n")
        sys.stderr.flush()
        return USER_ERROR


def run_standalone(prog: str, description: str | None, configure: Callable[[argparse.ArgumentParser], None],
                   func: CommandFn, argv: Sequence[str] | None = None) -> int:
    """Entry point of one subcommand run as ``python -m umarvel.commands.X`` or from a script."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_log_level(parser)
    configure(parser)
    argv, debug = pop_debug(argv)
    return dispatch(func, parser.parse_args(argv), debug=debug)
