"""``umarvel mine``: top-k mining of the M-BEIR train queries in their local and/or the global train pool.

    umarvel mine --model outputs/03_mbeir/merged --mbeir-root data/M-BEIR --output outputs/mined/stage3
    umarvel mine --model outputs/04_hardneg/merged --mbeir-root data/M-BEIR --output outputs/mined/stage4_10pct \
        --queries outputs/mined/stage3/mbeir_union_up_train_10percent.jsonl --scope local --no-subset

Writes ``rerank_data_all_eval_train_{local,global}.jsonl`` (one line per query row, row order) and, unless
``--no-subset``, the 10% distillation subset ``mbeir_union_up_train_10percent.jsonl``. Resumable (embedding
cache shards, per-task parts). Also runnable as ``python -m umarvel.commands.mine``.
"""
from __future__ import annotations

import argparse
import logging
import sys

from umarvel.commands import add_run_flags, positive_int, run_standalone
from umarvel.pipelines.mining import MineConfig, mine

logger = logging.getLogger(__name__)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    d = MineConfig("", "", "")
    p.add_argument("--model", required=True, help="embedding checkpoint (stage-3 merged for stage 4)")
    p.add_argument("--mbeir-root", required=True, help="M-BEIR root folder")
    p.add_argument("--output", required=True, help="output folder (mined files, subset, parts, cache)")
    p.add_argument("--top-k", type=int, default=d.top_k, help="candidates kept per query (default 100)")
    p.add_argument("--scope", choices=["local", "global", "both"], default="both",
                   help="local: each task's train pool; global: their concatenation (stage 4 uses global)")
    p.add_argument("--queries", default=d.queries, help="query rows to mine (default: the union train file)")
    p.add_argument("--pool", default=d.pool, help="train candidate pool (default: the union train pool)")
    p.add_argument("--instructions", default=d.instructions)
    p.add_argument("--no-subset", dest="subset", action="store_false",
                   help="do not draw the 10%% distillation subset")
    p.add_argument("--subset-fraction", type=float, default=d.subset_fraction)
    p.add_argument("--subset-seed", type=int, default=d.subset_seed)
    p.add_argument("--instruction", choices=["random", "first"], default=d.instruction)
    p.add_argument("--seed", type=int, default=d.seed, help="instruction seed (D7)")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--cache-dir", default=None, help="embedding cache (default: OUTPUT/cache)")
    p.add_argument("--backend", default=d.backend, choices=["torch", "faiss", "faiss-ivf", "faiss-hnsw"])
    add_run_flags(p, "replace the files of another mining run in --output (otherwise refused)")


def add_subparser(sub) -> None:
    """Register ``umarvel mine``."""
    p = sub.add_parser("mine", help="mine top-k train candidates (hard negatives, reranker data, 10%% subset)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build the :class:`MineConfig` from the arguments and mine."""
    cfg = MineConfig(model=args.model, mbeir_root=args.mbeir_root, output=args.output, queries=args.queries,
                     pool=args.pool, instructions=args.instructions, top_k=args.top_k, scope=args.scope,
                     subset=args.subset, subset_fraction=args.subset_fraction, subset_seed=args.subset_seed,
                     instruction=args.instruction, seed=args.seed, batch_size=args.batch_size, device=args.device,
                     dtype=args.dtype, cache_dir=args.cache_dir, backend=args.backend)
    for name, path in mine(cfg, overwrite=args.overwrite, check_images=not args.skip_image_check).items():
        logger.info("%s: %s", name, path)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point (``python -m umarvel.commands.mine``, used by the shell launchers)."""
    return run_standalone("umarvel mine", __doc__, _add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
