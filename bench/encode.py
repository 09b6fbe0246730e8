"""Encode throughput: ``UMarvel.encode_*`` against a reference-style encoder on the same model.

Reference style (the official eval scripts): dataset order, batch 16, every batch padded to its longest
sequence, images loaded one by one in the main thread. Ours: ``encode_candidates`` with packed batches (no
padding: first-fit decreasing under ``--max-tokens``, block-diagonal attention), image decode / resize /
patches and tokenization in DataLoader worker processes (on CUDA), pinned memory and non-blocking copies;
``sorted-padded`` is the same pipeline with length-sorted padded batches (packing off). All use the same
embedding math, so the vectors must agree.

Each line: seconds, items/s, ``padded/real tokens`` and P/R (1.00 = no padding), the fraction of the wall time
the model was busy (CUDA stream time of the forward calls; wall time of the forwards on CPU), and the achieved
TFLOP/s (2 x LLM params x real tokens + 2 x vision params x patches) against the card's bf16 peak.

    python bench/encode.py --shape tiny --n 256              # CPU: compare ratios only
    python bench/encode.py --shape 7b --device cuda --n 2048  # GPU: target >= 2.5x reference
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (build_model, card_name, card_peak_tflops, make_mix, param_counts, peak_mem_gib,  # noqa: E402
                    profile_table, reset_peak, sync)

from umarvel.api import UMarvel, _BusyTimer  # noqa: E402
from umarvel.data.collate import EmbedInput  # noqa: E402
from umarvel.data.images import load_image  # noqa: E402


def reference_encode(model: UMarvel, items: list[dict], batch_size: int = 16) -> tuple[np.ndarray, dict]:
    """Reference-style encoding: dataset order, fixed batch, pad to longest, serial image loading."""
    out = []
    stats = {"items": len(items), "batches": 0, "real_tokens": 0, "padded_tokens": 0, "patches": 0}
    timer = _BusyTimer(model.device)
    t0 = time.perf_counter()
    for start in range(0, len(items), batch_size):
        part = items[start:start + batch_size]
        inputs = []
        for it in part:
            text, image = model.prepare_candidate(it)
            inputs.append(EmbedInput(text, (load_image(image, model.budget),) if image else ()))
        batch = model._collator(model._tok.tokenize(inputs))
        stats["batches"] += 1
        stats["real_tokens"] += int(batch["attention_mask"].sum())
        stats["padded_tokens"] += batch["input_ids"].numel()
        stats["patches"] += batch["pixel_values"].shape[0] if "pixel_values" in batch else 0
        with timer:
            emb = model.embed_batch(batch)
        out.append(emb.cpu().numpy())
    stats["busy_s"] = timer.total()
    stats["wall_s"] = time.perf_counter() - t0
    return np.concatenate(out), stats


def ours_encode(model: UMarvel, items: list[dict], args, packing: bool) -> tuple[np.ndarray, dict]:
    model.packing = packing
    out = model.encode_candidates(items, batch_size=args.batch_size, max_tokens=args.max_tokens)
    return out, dict(model.last_encode_stats)


def line(name: str, secs: float, st: dict, flops: float, peak: float | None, ref_rate: float | None) -> str:
    rate = st["items"] / secs
    tflops = flops / secs / 1e12
    pct = f" ({100 * tflops / peak:.0f}% of peak)" if peak else ""
    speed = f"  x{rate / ref_rate:.2f}" if ref_rate else ""
    return (f"{name:<16}{secs:>8.2f}s {rate:>9.1f} items/s  batches {st['batches']:>4}  padded/real tokens "
            f"{st['padded_tokens']}/{st['real_tokens']} P/R {st['padded_tokens'] / st['real_tokens']:.2f}  "
            f"busy {st['busy_s'] / st['wall_s']:.0%}  {tflops:.3g} TFLOP/s{pct}{speed}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["tiny", "7b"], default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n", type=int, default=256, help="number of items in the mix")
    ap.add_argument("--batch-size", type=int, default=512, help="our max items per batch")
    ap.add_argument("--max-tokens", type=int, default=32768, help="our token budget per batch")
    ap.add_argument("--workers", type=int, default=None, help="preprocessing worker processes (default: auto)")
    ap.add_argument("--variants", default="reference,sorted-padded,packed")
    ap.add_argument("--data", default=None, help="folder for the generated images (default: a temp folder)")
    ap.add_argument("--profile", action="store_true", help="profile one packed batch")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    root = Path(args.data) if args.data else Path(tempfile.mkdtemp(prefix="umarvel_bench_"))
    items = make_mix(args.n, root)
    model = UMarvel.from_backbone(build_model(args.shape, args.device), device=args.device)
    model.preprocess_workers = args.workers
    n_lm, n_vis = param_counts(model.embedder.hf_model)
    peak = card_peak_tflops(args.device)
    print(f"device: {card_name(args.device)}  shape: {args.shape}  items: {len(items)}  LLM params {n_lm / 1e9:.2f}B  "
          f"vision {n_vis / 1e9:.2f}B  bf16 peak {peak or '-'} TFLOP/s", flush=True)
    reference_encode(model, items[:16])  # warm-up (kernels, allocator), every path
    ours_encode(model, items[:64], args, True)
    ours_encode(model, items[:64], args, False)
    results, vectors, ref_rate = {}, {}, None
    for name in names:
        reset_peak(args.device)
        sync(args.device)
        t = time.perf_counter()
        try:
            if name == "reference":
                vec, st = reference_encode(model, items)
            else:
                vec, st = ours_encode(model, items, args, packing=name == "packed")
        except (RuntimeError, torch.OutOfMemoryError) as exc:  # noqa: BLE001 - keep the other lines
            print(f"{name:<16}failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}", flush=True)
            continue
        sync(args.device)
        secs = time.perf_counter() - t
        flops = 2 * n_lm * st["real_tokens"] + 2 * n_vis * st["patches"]
        ref_rate = ref_rate or (len(items) / secs if name == "reference" else None)
        print(line(name, secs, st, flops, peak, ref_rate if name != "reference" else None), flush=True)
        results[name] = {**st, "seconds": secs, "items_per_s": len(items) / secs, "p_over_r":
                         st["padded_tokens"] / st["real_tokens"], "busy_fraction": st["busy_s"] / st["wall_s"],
                         "tflops": flops / secs / 1e12, "peak_mem_gib": peak_mem_gib(args.device)}
        vectors[name] = vec
    ok = True
    if "reference" in vectors:
        for name, vec in vectors.items():
            if name != "reference":
                cos = float(np.min(np.sum(vectors["reference"] * vec, axis=1)))
                results[name]["min_cos_vs_reference"] = cos
                ok &= cos > 0.99
                print(f"min cosine(reference, {name}): {cos:.6f}", flush=True)
        if "packed" in results:
            print(f"speed-up packed / reference: {results['packed']['items_per_s'] / ref_rate:.2f}x", flush=True)
    if args.profile:
        model.packing = True
        loaders = [model._loader(*model.prepare_candidate(it), what="candidate") for it in items[:512]]
        idx, batch = next(iter(model._batches(loaders, model._tok, args.batch_size, args.max_tokens)))
        print(f"\n== profile: one packed encode batch ({len(idx)} items, {batch['input_ids'].shape[1]} tokens)")
        print(profile_table(lambda: model.embed_batch(batch), args.device), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "device_name": card_name(args.device),
                                               "shape": args.shape, "items": len(items)}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
