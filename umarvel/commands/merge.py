"""``umarvel merge-lora --base PATH --adapter PATH --output PATH``: merge a stage's LoRA (D13)."""
from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)


def add_subparser(sub) -> None:
    """Register ``umarvel merge-lora``."""
    p = sub.add_parser("merge-lora", help="merge a LoRA adapter into its base checkpoint",
                       description="Merge in the training dtype, keeping the learned temperature and the added "
                                   "tokens; the output loads with UMarvel.from_pretrained.")
    p.add_argument("--base", required=True, help="checkpoint the adapter was trained on (the stage's init_from)")
    p.add_argument("--adapter", required=True, help="LoRA adapter folder (output_dir/adapter)")
    p.add_argument("--output", required=True, help="merged checkpoint folder to write")
    p.add_argument("--dtype", default=None,
                   help="merge dtype (default: the adapter's training dtype, bfloat16 for the published stages)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from umarvel.train.merge import merge_adapter  # lazy: keeps the CLI start-up free of torch

    out = merge_adapter(args.base, args.adapter, args.output, dtype=args.dtype, device=args.device)
    print(out)
    return 0
