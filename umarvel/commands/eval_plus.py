"""``umarvel eval plus`` / ``umarvel eval-plus``: U-MARVEL+ (rerank the top 50 of an M-BEIR run, fuse
``cos + w * P(yes)`` with each candidate's own cosine, D9).

    # 1. choose w on the validation split (never on test)
    umarvel eval mbeir --model M --mbeir-root R --split val --output out/val/local
    umarvel eval-plus --run out/val/local --reranker RR --output out/val/plus_local --choose-weight
    # 2. apply it to the test run
    umarvel eval mbeir --model M --mbeir-root R --split test --output out/test/local
    umarvel eval-plus --run out/test/local --reranker RR --output out/test/plus_local \
        --weight-from out/val/plus_local/fusion_weight.json

Without --weight / --weight-from / --choose-weight the published w = 0.1 is used. Writes results.json /
results.md (marked reranked), fused TREC runs, P(yes) files (reused on a rerun). Also runnable as
``python -m umarvel.commands.eval_plus``.
"""
from __future__ import annotations

import argparse
import logging
import sys

from umarvel.errors import ConfigError

logger = logging.getLogger(__name__)


def configure(p: argparse.ArgumentParser) -> None:
    """Arguments of the U-MARVEL+ evaluation."""
    p.add_argument("--run", required=True, help="output folder of 'umarvel eval mbeir' (local or global)")
    p.add_argument("--reranker", required=True, help="reranker checkpoint (merged or LoRA adapter folder)")
    p.add_argument("--output", required=True, help="output folder")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--weight", type=float, default=None, help="fixed fusion weight w (default 0.1)")
    g.add_argument("--weight-from", default=None, help="fusion_weight.json of a validation U-MARVEL+ run")
    g.add_argument("--choose-weight", action="store_true", help="choose w on this run (split val only)")
    p.add_argument("--grid", default=None, help="comma-separated weights for --choose-weight")
    p.add_argument("--top-k", type=int, default=50, help="reranked depth (default 50)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--positions", choices=["1d", "mrope"], default="1d")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--compat", choices=("default", "official"), default="default",
                   help="official: P(yes) from the first step of generate with the checkpoint's generation config "
                        "in the official batches of 4, and on a global run the official global fusion "
                        "(docs/decisions.md 'Compatibility mode'); default: umarvel's (default)")
    p.set_defaults(func=run)


def add_plus_parser(eval_subparsers) -> None:
    """``umarvel eval plus`` (for ``umarvel.commands.eval.EVAL_SUBCOMMANDS``)."""
    configure(eval_subparsers.add_parser("plus", help="U-MARVEL+: rerank an M-BEIR run and fuse",
                                         description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))


def add_subparser(sub) -> None:
    """Register the top-level ``umarvel eval-plus``."""
    configure(sub.add_parser("eval-plus", help="U-MARVEL+: rerank an M-BEIR run and fuse cos + w * P(yes)",
                             description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))


def run(args: argparse.Namespace) -> int:
    """Build the :class:`PlusConfig` and evaluate."""
    from umarvel.pipelines.plus import PlusConfig, evaluate_plus
    from umarvel.rerank.fusion import DEFAULT_GRID

    try:
        grid = [float(x) for x in args.grid.split(",")] if args.grid else list(DEFAULT_GRID)
    except ValueError:
        raise ConfigError(f"--grid must be comma-separated numbers, got {args.grid!r}") from None
    cfg = PlusConfig(run_dir=args.run, reranker=args.reranker, output=args.output, weight=args.weight,
                     weight_from=args.weight_from, choose_weight=args.choose_weight, grid=grid, top_k=args.top_k,
                     batch_size=args.batch_size, positions=args.positions, device=args.device, dtype=args.dtype,
                     compat=args.compat)
    evaluate_plus(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point (``python -m umarvel.commands.eval_plus``, used by the shell launchers)."""
    from umarvel.cli import run_standalone

    return run_standalone("umarvel eval plus", __doc__, configure, run, argv)


if __name__ == "__main__":
    sys.exit(main())
