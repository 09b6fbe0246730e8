"""``umarvel eval zeroshot``: the zero-shot benchmark suite (method spec 6.3) with one checkpoint.

Registered under the ``umarvel eval`` group by :func:`add_zeroshot_parser`; also runnable on its own as
``python -m umarvel.commands.eval_zeroshot --model M --data-root D --output-dir O [--tasks circo,msrvtt]``
(what ``scripts/eval_zeroshot.sh`` runs).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from umarvel.commands import add_run_flags, run_standalone
from umarvel.commands.flags import add_config_flags, config_from_flags
from umarvel.eval.zeroshot.options import ZeroShotOptions

logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of the zero-shot command (the encoding knobs are generated from :class:`ZeroShotOptions`)."""
    p.add_argument("--model", required=True, help="checkpoint folder (or LoRA adapter folder)")
    p.add_argument("--data-root", required=True, help="folder with the zero-shot sets (docs/zeroshot_data.md)")
    p.add_argument("--output-dir", required=True, help="where metrics/, results.json, results.md go")
    p.add_argument("--tasks", default=None,
                   help="comma-separated task names or groups (genecis, sugarcrepe); default: all zero-shot tasks")
    p.add_argument("--cache-dir", default=None, help="embedding cache root (default: <output-dir>/cache)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bf16 on CUDA, fp32 on CPU)")
    add_config_flags(p, ZeroShotOptions)
    add_run_flags(p, "replace the results of another zero-shot run in --output-dir (otherwise refused)",
                  before="the model loads")


def add_zeroshot_parser(eval_subparsers) -> argparse.ArgumentParser:
    """Register ``zeroshot`` in the ``umarvel eval`` subcommand group and return its parser."""
    p = eval_subparsers.add_parser(
        "zeroshot", help="zero-shot benchmarks (CIRCO, GeneCIS, Flickr30K, ..., MSVD, MSR-VTT)",
        description="Evaluate a checkpoint on the zero-shot sets present under --data-root (absent sets are "
                    "skipped with a line saying so); writes per-task metrics, results.json and results.md.")
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Load the model once, run the suite, print the results table; exit 1 if a task failed on broken data."""
    from umarvel.api import UMarvel  # lazy: keeps the CLI start-up free of torch
    from umarvel.dist import device_for_rank
    from umarvel.eval.zeroshot.runner import RESULTS_MD, run_zeroshot  # lazy: keeps the CLI start-up free of torch
    from umarvel.eval.zeroshot.tasks import resolve_zeroshot_names  # lazy: keeps the CLI start-up fast (0.09 s)

    from umarvel.eval.preflight import start_zeroshot_run  # lazy: keeps the CLI start-up free of torch

    tasks = resolve_zeroshot_names(args.tasks)  # reject unknown task names before loading the model
    options = config_from_flags(args, ZeroShotOptions)
    with start_zeroshot_run(args.model, args.data_root, args.output_dir, tasks, options=options, device=args.device,
                            dtype=args.dtype, overwrite=args.overwrite, check_images=not args.skip_image_check):
        model = UMarvel.from_pretrained(args.model, device=device_for_rank(args.device), dtype=args.dtype,
                                        compat=options.compat)
        results = run_zeroshot(model, args.data_root, args.output_dir, tasks=args.tasks, cache_dir=args.cache_dir,
                               options=options, model_name=str(args.model))
    sys.stdout.write((Path(args.output_dir) / RESULTS_MD).read_text(encoding="utf-8"))
    failed = [e["name"] for e in results["tasks"] if e["status"] == "error"]
    if failed:
        logger.error("zero-shot tasks failed on broken data: %s (see results.json)", ", ".join(failed))
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point (``python -m umarvel.commands.eval_zeroshot``, used by the shell launchers)."""
    return run_standalone("umarvel eval zeroshot", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
