"""``umarvel encode``: embed a JSONL file of queries or candidates into a ``.npy`` matrix.

Everything that can be checked is checked before the model loads: the output can be written, every line is a
valid item (types, ids unique, at least one item), the device exists, and every referenced image is a
readable file (``--skip-image-check`` skips that scan for huge inputs).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from umarvel.commands import positive_int
from umarvel.errors import DataError
from umarvel.utils.checks import check_device, check_input_file, check_output_file, scan_images
from umarvel.utils.io import atomic_path, atomic_write_json, iter_jsonl

logger = logging.getLogger(__name__)

_STRING_KEYS = ("text", "image", "instruction")


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
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--compat", choices=("default", "official"), default="default",
                   help="official: the official numerics (a batch without padding is causal, batches of --batch-size "
                        "in input order; docs/decisions.md 'Compatibility mode'); recorded in <output>.meta.json")
    p.add_argument("--skip-image-check", action="store_true",
                   help="do not check the referenced images before encoding (huge inputs)")
    p.set_defaults(func=run)


def _read(path: Path, image_root: str | Path | None, queries: bool) -> tuple[list[dict], list[str], list[int]]:
    """Items, ids (possibly empty) and line numbers of an encode JSONL file."""
    root = Path(image_root) if image_root else path.parent
    items, ids, lines = [], [], []
    first_line: dict[str, int] = {}
    allowed = {"text", "image", "instruction", "id"} if queries else {"text", "image", "id"}
    for lineno, rec in iter_jsonl(path):
        where = f"{path}:{lineno}"
        unknown = set(rec) - allowed
        if unknown:
            raise DataError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
        for key in _STRING_KEYS:
            value = rec.get(key)
            if value is not None and not isinstance(value, str):
                raise DataError(f"{where}: '{key}' must be a string, got {type(value).__name__} {value!r}")
        if not (rec.get("text") or "").strip() and not rec.get("image"):
            raise DataError(f"{where}: neither 'text' nor 'image' (an empty text does not count)")
        if rec.get("image") and not Path(rec["image"]).is_absolute():
            rec["image"] = str(root / rec["image"])
        if "id" in rec:
            rid = rec.pop("id")
            if isinstance(rid, bool) or not isinstance(rid, (str, int)) or str(rid) == "":
                raise DataError(f"{where}: 'id' must be a non-empty string or integer, got {rid!r}")
            rid = str(rid)
            if rid in first_line:
                raise DataError(f"{where}: duplicate id {rid!r} (first on line {first_line[rid]}); ids must be unique")
            first_line[rid] = lineno
            ids.append(rid)
        items.append(rec)
        lines.append(lineno)
    if not items:
        raise DataError(f"{path}: no items (every line is blank); nothing to encode")
    if ids and len(ids) != len(items):
        raise DataError(f"{path}: either every line or no line must have an 'id'")
    return items, ids, lines


def run(args: argparse.Namespace) -> int:
    """Check everything, then encode the input file and write the matrix (and ids, and
    ``<output>.meta.json``) atomically."""
    path = check_input_file(args.input, "--input")
    check_output_file(args.output, "--output")
    items, ids, lines = _read(path, args.image_root, args.queries)
    if ids:
        check_output_file(f"{args.output}.ids.json", "--output")
    check_output_file(f"{args.output}.meta.json", "--output")
    if not args.skip_image_check:
        scan_images(((it["image"], f"{path}:{ln}") for it, ln in zip(items, lines) if it.get("image")),
                    what="input")
    check_device(args.device)
    from umarvel.api import UMarvel  # lazy: keeps the CLI start-up free of torch

    model = UMarvel.from_pretrained(args.model, device=args.device, dtype=args.dtype, compat=args.compat)
    fn = model.encode_queries if args.queries else model.encode_candidates
    emb = fn(items, batch_size=args.batch_size)
    with atomic_path(args.output) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, emb)
    if ids:
        atomic_write_json(f"{args.output}.ids.json", ids)
    atomic_write_json(f"{args.output}.meta.json", {
        "model": str(args.model), "role": "query" if args.queries else "candidate", "compat": args.compat,
        "n": int(emb.shape[0]), "dim": int(emb.shape[1]), "batch_size": args.batch_size,
        "fingerprint": model.fingerprint(), "settings": model.settings.as_dict()})
    logger.info("wrote %s: %d x %d (compat %s)", args.output, *emb.shape, args.compat)
    return 0
