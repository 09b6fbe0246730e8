"""``umarvel eval plus``: U-MARVEL+ (rerank the top 50 of an M-BEIR run, fuse ``cos + w * P(yes)`` with each
candidate's own cosine, D9).

    # 1. choose w on the validation split (never on test)
    umarvel eval mbeir --model M --mbeir-root R --split val --output out/val/local
    umarvel eval plus --run out/val/local --reranker RR --output out/val/plus_local --choose-weight
    # 2. apply it to the test run
    umarvel eval mbeir --model M --mbeir-root R --split test --output out/test/local
    umarvel eval plus --run out/test/local --reranker RR --output out/test/plus_local \
        --weight-from out/val/plus_local/fusion_weight.json

Without --weight / --weight-from / --choose-weight the published w = 0.1 is used. Writes results.json /
results.md (marked reranked), fused TREC runs, P(yes) files (reused on a rerun). Also runnable as
``python -m umarvel.commands.eval_plus``. The flags are generated from
:class:`umarvel.pipelines.plus.PlusConfig` (one flag per field).
"""
from __future__ import annotations

import argparse
import logging
import sys

from umarvel.commands import run_standalone
from umarvel.commands.flags import add_config_flags, config_from_flags
from umarvel.pipelines.plus import PlusConfig, evaluate_plus

logger = logging.getLogger(__name__)


def configure(p: argparse.ArgumentParser) -> None:
    """Arguments of the U-MARVEL+ evaluation: one flag per :class:`PlusConfig` field."""
    add_config_flags(p, PlusConfig)
    p.set_defaults(func=run)


def add_plus_parser(eval_subparsers) -> None:
    """Register ``umarvel eval plus`` in the ``umarvel eval`` group."""
    configure(eval_subparsers.add_parser("plus", help="U-MARVEL+: rerank an M-BEIR run and fuse cos + w * P(yes)",
                                         description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))


def run(args: argparse.Namespace) -> int:
    """Build the :class:`PlusConfig` from the flags and evaluate."""
    evaluate_plus(config_from_flags(args, PlusConfig))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point (``python -m umarvel.commands.eval_plus``, used by the shell launchers)."""
    return run_standalone("umarvel eval plus", __doc__, configure, run, argv)


if __name__ == "__main__":
    sys.exit(main())
