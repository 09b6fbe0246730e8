"""``umarvel encode``: embed a JSONL file of queries or candidates into a ``.npy`` matrix."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from umarvel.errors import DataError
from umarvel.utils.io import atomic_path, atomic_write_json, iter_jsonl

logger = logging.getLogger(__name__)


def add_subparser(sub) -> None:
    """Register ``umarvel encode``."""
    p = sub.add_parser("encode", help="embed a JSONL file of items with a checkpoint",
                       description="Embed items (one JSON object per line: text, image, instruction, id) "
                                   "into an (N, D) float32 .npy file, L2-normalised, in input order; "
                                   "<output>.meta.json records the model, compat mode and settings.")
    p.add_argument("--model", required=True, help="checkpoint folder")
    p.add_argument("--input", required=True, help="items JSONL")
    p.add_argument("--output", required=True, help="output .npy (ids, if any, go to <output>.ids.json)")
    p.add_argument("--queries", action="store_true", help="encode as queries (instruction wrapped in markers)")
    p.add_argument("--image-root", default=None, help="folder relative image paths are resolved against "
                                                       "(default: the input file's folder)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--compat", choices=("default", "official"), default="default",
                   help="official: the official numerics (a batch without padding is causal, batches of --batch-size "
                        "in input order; docs/decisions.md 'Compatibility mode'); recorded in <output>.meta.json")
    p.set_defaults(func=run)


def read_items(path: str | Path, image_root: str | Path | None, queries: bool) -> tuple[list[dict], list[str] | None]:
    """Read encode items from JSONL; relative image paths are resolved against ``image_root``."""
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    items, ids = [], []
    allowed = {"text", "image", "instruction", "id"} if queries else {"text", "image", "id"}
    for lineno, rec in iter_jsonl(path):
        unknown = set(rec) - allowed
        if unknown:
            raise DataError(f"{path}:{lineno}: unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
        if rec.get("image") and not Path(rec["image"]).is_absolute():
            rec["image"] = str(root / rec["image"])
        if "id" in rec:
            ids.append(str(rec.pop("id")))
        items.append(rec)
    if ids and len(ids) != len(items):
        raise DataError(f"{path}: either every line or no line must have an 'id'")
    return items, (ids or None)


def run(args: argparse.Namespace) -> int:
    """Encode the input file and write the matrix (and ids, and ``<output>.meta.json``) atomically."""
    from umarvel.api import UMarvel  # lazy: keeps the CLI start-up free of torch

    items, ids = read_items(args.input, args.image_root, args.queries)
    model = UMarvel.from_pretrained(args.model, device=args.device, dtype=args.dtype, compat=args.compat)
    fn = model.encode_queries if args.queries else model.encode_candidates
    emb = fn(items, batch_size=args.batch_size)
    with atomic_path(args.output) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, emb)
    if ids is not None:
        atomic_write_json(f"{args.output}.ids.json", ids)
    atomic_write_json(f"{args.output}.meta.json", {
        "model": str(args.model), "role": "query" if args.queries else "candidate", "compat": args.compat,
        "n": int(emb.shape[0]), "dim": int(emb.shape[1]), "batch_size": args.batch_size,
        "fingerprint": model.fingerprint(), "settings": model.settings.as_dict()})
    logger.info("wrote %s: %d x %d (compat %s)", args.output, *emb.shape, args.compat)
    return 0
