"""Encode throughput: ``UMarvel.encode_*`` against a reference-style encoder on the same model.

Reference style (the official eval scripts): dataset order, batch 16, every batch padded to its
longest sequence, images loaded one by one in the main thread. Ours: length-sorted batches under a
token budget, images loaded in a thread pool and preprocessed in the background, vision tower once
per batch. Both use the same embedding math, so the vectors must agree.

    python bench/encode.py --shape tiny --n 256              # CPU: compare the ratio only
    python bench/encode.py --shape 7b --device cuda --n 4096  # GPU: items/s (target >= 2.5x reference)
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_model, make_mix, timed  # noqa: E402

from umarvel.api import UMarvel  # noqa: E402
from umarvel.data.collate import EmbedInput  # noqa: E402
from umarvel.data.images import load_image  # noqa: E402


def reference_encode(model: UMarvel, items: list[dict], batch_size: int = 16) -> np.ndarray:
    """Reference-style encoding: dataset order, fixed batch, pad to longest, serial image loading."""
    out = []
    for start in range(0, len(items), batch_size):
        part = items[start:start + batch_size]
        inputs = []
        for it in part:
            text, image = model.prepare_candidate(it)
            inputs.append(EmbedInput(text, (load_image(image, model.budget),) if image else ()))
        batch = model._collator(model._tok.tokenize(inputs))
        out.append(model.embed_batch(batch).cpu().numpy())
    return np.concatenate(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["tiny", "7b"], default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n", type=int, default=256, help="number of items in the mix")
    ap.add_argument("--batch-size", type=int, default=64, help="our max items per batch")
    ap.add_argument("--max-tokens", type=int, default=24576, help="our padded-token budget per batch")
    ap.add_argument("--data", default=None, help="folder for the generated images (default: a temp folder)")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False
    root = Path(args.data) if args.data else Path(tempfile.mkdtemp(prefix="umarvel_bench_"))
    items = make_mix(args.n, root)
    model = UMarvel.from_backbone(build_model(args.shape, args.device), device=args.device)
    sample = [model.prepare_candidate(it) for it in items[:64]]
    sample_inputs = [EmbedInput(t, (load_image(im, model.budget),) if im else ()) for t, im in sample]
    n_tokens = sum(len(t) for t in model._tok.tokenize(sample_inputs))
    # warm-up (kernels, allocator) on a few items, both paths
    reference_encode(model, items[:16])
    model.encode_candidates(items[:16], batch_size=args.batch_size, max_tokens=args.max_tokens)
    t_ref, ref = timed(lambda: reference_encode(model, items), args.device)
    t_ours, ours = timed(lambda: model.encode_candidates(items, batch_size=args.batch_size,
                                                         max_tokens=args.max_tokens), args.device)
    cos = float(np.min(np.sum(ref * ours, axis=1)))
    print(f"device: {torch.cuda.get_device_name() if args.device.startswith('cuda') else 'cpu'}  shape: {args.shape}"
          f"  items: {len(items)}  mean tokens/item (first 64): {n_tokens / 64:.0f}")
    print(f"{'encoder':<22}{'seconds':>10}{'items/s':>12}")
    print(f"{'reference style':<22}{t_ref:>10.2f}{len(items) / t_ref:>12.1f}")
    print(f"{'umarvel':<22}{t_ours:>10.2f}{len(items) / t_ours:>12.1f}")
    print(f"speed-up: {t_ref / t_ours:.2f}x   min cosine(reference, umarvel): {cos:.6f}")
    return 0 if cos > 0.99 else 1


if __name__ == "__main__":
    sys.exit(main())
