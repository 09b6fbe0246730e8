"""``umarvel eval <benchmark>``: evaluation commands (``mbeir``, ``zeroshot``, ``plus``).

The benchmarks are listed once, in :func:`add_subparser`; a new one is a module with an
``add_<name>_parser(eval_subparsers)`` and one line there. The M-BEIR flags are generated from
:class:`~umarvel.eval.mbeir.config.MBeirEvalConfig` (one flag per field, :mod:`umarvel.commands.flags`) and
shared with ``scripts/vtools_eval_mbeir_model.py`` (:func:`mbeir_main`), so the script and
``umarvel eval mbeir`` accept exactly the same options.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from umarvel.commands import add_log_level, add_run_flags, dispatch, eval_plus, eval_zeroshot, pop_debug
from umarvel.commands.flags import add_config_flags, config_from_flags
from umarvel.eval.mbeir.config import MBeirEvalConfig

logger = logging.getLogger(__name__)

_MBEIR_DESCRIPTION = (
    "Evaluate a checkpoint on M-BEIR (hit-rate Recall@k, official protocol). Writes results.json, "
    "results.md, config.yaml, run.json and runs/<task>_<split>.trec into --output; embeddings are cached "
    "(default <output>/../cache) and reused by the other protocol and by later runs. Under torchrun the "
    "encoding is sharded over ranks and rank 0 searches. Precedence: flags > --set > --config > defaults.")


# ------------------------------------------------------------------------------------------ M-BEIR
def add_mbeir_arguments(p: argparse.ArgumentParser) -> None:
    """The M-BEIR evaluation options: one flag per :class:`MBeirEvalConfig` field, ``--config`` and ``--set``."""
    add_config_flags(p, MBeirEvalConfig, config_file=True,
                     config_help="YAML config (configs/eval/mbeir_local.yaml ...); flags win")
    p.add_argument("--html", default=None, metavar="PAGE",
                   help="also write a self-contained page of sample queries per task with their top 5 "
                        "(thumbnails embedded, positives marked)")
    p.add_argument("--html-queries", type=int, default=5, help="sample queries per task on the --html page")
    add_run_flags(p, "replace the results of another evaluation in --output (otherwise refused)")


def run_mbeir(args: argparse.Namespace) -> int:
    """Run one M-BEIR evaluation; rank 0 prints the results table (results.md) to stdout."""
    from umarvel.eval.mbeir.runner import run_mbeir_eval  # lazy: keeps the CLI start-up free of torch
    from umarvel.eval.outputs import RESULTS_MD
    from umarvel.eval.preflight import start_mbeir_run  # lazy: keeps the CLI start-up free of torch

    cfg = config_from_flags(args, MBeirEvalConfig)
    with start_mbeir_run(cfg, overwrite=args.overwrite):  # checks + the output folder, before the model loads
        result = run_mbeir_eval(cfg, check_images=not args.skip_image_check)
    if result.results is not None:
        sys.stdout.write((Path(result.output) / RESULTS_MD).read_text(encoding="utf-8"))
        sys.stdout.flush()
        if getattr(args, "html", None):
            from umarvel.index.html import write_mbeir_page  # lazy: only for --html

            write_mbeir_page(args.html, result, cfg.mbeir_root, cfg.split, cfg.protocol,
                             n_queries=args.html_queries, k=5, seed=cfg.seed)
    return 0


def mbeir_main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Entry point of ``scripts/vtools_eval_mbeir_model.py`` (same options as ``umarvel eval mbeir``)."""
    parser = argparse.ArgumentParser(prog=prog, description=_MBEIR_DESCRIPTION)
    add_log_level(parser)
    add_mbeir_arguments(parser)
    argv, debug = pop_debug(argv)
    return dispatch(run_mbeir, parser.parse_args(argv), debug=debug)


def add_mbeir_parser(eval_subparsers) -> None:
    """Register ``umarvel eval mbeir``."""
    p = eval_subparsers.add_parser("mbeir", help="M-BEIR local / global (hit-rate Recall@k)",
                                   description=_MBEIR_DESCRIPTION)
    add_mbeir_arguments(p)
    p.set_defaults(func=run_mbeir)


# ---------------------------------------------------------------------------------------- the group
def add_subparser(sub) -> None:
    """Register ``umarvel eval`` with its benchmarks."""
    p = sub.add_parser("eval", help="evaluate a checkpoint on a benchmark",
                       description="Evaluation commands: umarvel eval <benchmark> --help")
    esub = p.add_subparsers(dest="eval_command", metavar="BENCHMARK")
    add_mbeir_parser(esub)
    eval_zeroshot.add_zeroshot_parser(esub)
    eval_plus.add_plus_parser(esub)

    def _no_benchmark(args: argparse.Namespace) -> int:
        p.print_help(sys.stderr)
        return 2

    p.set_defaults(func=_no_benchmark)
