"""``umarvel train CONFIG [key=value ...]``: train one stage (launch under torchrun for several GPUs/nodes).

Also runnable as ``python -m umarvel.commands.train CONFIG [key=value ...]`` (what ``scripts/train_stage*.sh``
call, so the scripts do not depend on the subcommand registry).
"""
from __future__ import annotations

import argparse
import logging
import sys

from umarvel.commands import add_run_flags, run_standalone
from umarvel.train.config import load_stage_config

logger = logging.getLogger(__name__)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="stage YAML (configs/stages/0N_*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. train.learning_rate=1e-4 data.path=/data/nli.csv")
    add_run_flags(p, "start over in train.output_dir even if it holds a run (its checkpoints, adapter and merged "
                     "model are removed); without it a run with another config is refused", before="training")


def add_subparser(sub) -> None:
    """Register ``umarvel train``."""
    p = sub.add_parser("train", help="train one stage from a YAML config",
                       description="Train one U-MARVEL stage. Resumes from the run folder's last checkpoint "
                                   "(train.resume=auto) when the folder holds a run of the same config "
                                   "(run_identity.json); another config is refused (--overwrite, "
                                   "train.resume=<checkpoint> or a new train.output_dir). Config, data and "
                                   "images are checked before the model loads; writes adapter/ and merged/ "
                                   "at the end.")
    _add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load the config (unknown keys are errors) and train."""
    from umarvel.train.stage import run_stage  # lazy: keeps the CLI start-up free of torch

    cfg = load_stage_config(args.config, args.overrides)
    state = run_stage(cfg, overwrite=args.overwrite, check_images=not args.skip_image_check)
    logger.info("stage %s finished at step %d; outputs in %s", cfg.stage, state.global_step, cfg.train.output_dir)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point (``python -m umarvel.commands.train``, used by the shell launchers)."""
    return run_standalone("umarvel train", __doc__, _add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
