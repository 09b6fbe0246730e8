"""``umarvel teacher CONFIG [key=value ...]``: stage-5 teacher file (reranker P(yes) fused with the cosines).

    umarvel teacher configs/teacher/teacher.yaml reranker=outputs/rerank/reranker/merged \
        queries=$PWD/outputs/mined/stage3/mbeir_union_up_train_10percent.jsonl \
        mined=$PWD/outputs/mined/stage4_10pct/rerank_data_all_eval_train_local.jsonl output=outputs/teacher

Writes ``OUTPUT/fusion_results.jsonl`` (one line per query row: did / score / cosine / p_yes, best first), the
``data.scores`` of ``configs/stages/05_mbeir_distill.yaml``. Resumable (P(yes) shards). Also runnable as
``python -m umarvel.commands.teacher``.
"""
from __future__ import annotations

import argparse
import logging
import sys

from umarvel.commands import add_run_flags, run_standalone
from umarvel.config import load_config
from umarvel.pipelines.teacher import TeacherConfig, build_teacher_file

logger = logging.getLogger(__name__)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="teacher YAML (configs/teacher/teacher.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. top_k=50")
    add_run_flags(p, "replace the files of another teacher run in the output folder (otherwise refused)",
                  before="scoring")


def add_subparser(sub) -> None:
    """Register ``umarvel teacher``."""
    p = sub.add_parser("teacher", help="stage-5 teacher lists: reranker P(yes) fused with retrieval cosines",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load the config (strict) and build the teacher file."""
    cfg = load_config(args.config, TeacherConfig, args.overrides)
    path = build_teacher_file(cfg, overwrite=args.overwrite, check_images=not args.skip_image_check)
    logger.info("teacher file: %s", path)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point (``python -m umarvel.commands.teacher``, used by the shell launchers)."""
    return run_standalone("umarvel teacher", __doc__, _add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
