"""Training-step throughput: reference-style step against our variants at the same contrastive batch.

Reference style (official ``Qwen2VLRetFinetune`` forward): the device batch (B queries + B positives) is padded
to its single longest sequence and run in layout order in chunks of 32 sequences (vision tower per chunk),
full activation checkpointing, LoRA in fp32 (peft's default), plain AdamW.
Our variants: the same sequences packed without padding (first-fit decreasing under ``--chunk-tokens``,
block-diagonal attention, ``umarvel.data.packing``), then one knob at a time: fused AdamW, LoRA matmuls in
the model dtype (``train.lora_compute: model``), selective / no activation checkpointing. Everything else is
shared: LoRA on all LLM linears, bidirectional attention, InfoNCE. Batches are collated before timing (in
training the DataLoader workers do that in parallel), so the numbers are model-step pairs/s.

Each line: pairs/s, step time, forward chunks, ``padded/real tokens`` and their ratio P/R (1.00 = no padding),
peak memory, and the achieved model TFLOP/s (3 x 2 x LLM params x real tokens + 2 x vision params x patches:
forward, recomputation and the activation backward over the real tokens) against the card's bf16 peak.

    python bench/train.py --shape tiny --pairs 16                 # CPU: compare ratios only
    python bench/train.py --shape 7b --device cuda --pairs 60     # GPU: target >= 3x the reference style
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (build_model, card_name, card_peak_tflops, make_mix, param_counts, peak_mem_gib,  # noqa: E402
                    profile_table, reset_peak, timed)

from umarvel.api import UMarvel  # noqa: E402
from umarvel.data.formatting import TRAIN_STYLE, format_string  # noqa: E402
from umarvel.data.images import ImageBudget  # noqa: E402
from umarvel.data.packing import to_device  # noqa: E402
from umarvel.model.checkpointing import set_activation_checkpointing  # noqa: E402
from umarvel.model.lora import attach_lora, set_lora_compute  # noqa: E402
from umarvel.train import losses as L  # noqa: E402
from umarvel.train.batching import PairCollator  # noqa: E402
from umarvel.train.datasets import Side, TrainExample  # noqa: E402

#: name -> (packing, activation checkpointing, fused AdamW, LoRA compute)
VARIANTS = {
    "reference": (False, "full", False, "float32"),
    "packed": (True, "full", False, "float32"),
    "packed+fused": (True, "full", True, "float32"),
    "packed+fused+lora_bf16": (True, "full", True, "model"),
    "packed+fused+lora_bf16+selective": (True, "selective", True, "model"),
    "packed+fused+lora_bf16+no_ckpt": (True, "none", True, "model"),
}


def make_examples(n: int, root: Path, seed: int = 0) -> list[TrainExample]:
    """n query -> candidate pairs drawn from the M-BEIR-like mix (text, long text, image, image+text)."""
    qs, cs = make_mix(n, root / "q", seed=seed), make_mix(n, root / "c", seed=seed + 1)
    side = lambda it: Side(format_string(it.get("text", "")), it.get("image"))  # noqa: E731
    return [TrainExample(side(q), (side(c),), query_id=f"q{i}", candidate_ids=(f"c{i}",))
            for i, (q, c) in enumerate(zip(qs, cs))]


def train_step(embedder, optimizer, batch, device, autocast_dtype=None) -> float:
    """One optimiser step on a collated StepBatch; returns the loss (one host sync, as in the trainer's log)."""
    with torch.autocast(torch.device(device).type, dtype=autocast_dtype or torch.float32,
                        enabled=autocast_dtype is not None):
        embs = torch.cat([embedder(**to_device(ch, device), normalize=False) for ch in batch.chunks])
    layout = embs[batch.inverse.to(device)]
    q, c = layout.split(batch.group_sizes)
    loss = L.info_nce(q, c, embedder.temperature.reshape(()))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def patches(batch) -> int:
    """Vision patches of a StepBatch."""
    return sum(int(ch["pixel_values"].shape[0]) for ch in batch.chunks if "pixel_values" in ch)


def configure(name, embedder, model, args):
    """Apply a variant's settings; returns (collator, optimizer, autocast dtype or None)."""
    packing, ckpt, fused, lora = VARIANTS[name]
    hf = embedder.hf_model
    set_activation_checkpointing(hf, embedder.spec.language_model(hf), embedder.spec.visual(hf), ckpt,
                                 args.checkpoint_every_k)
    set_lora_compute(embedder, lora)
    autocast = model.dtype if (lora == "model" and model.dtype != torch.float32) else None
    params = [p for p in embedder.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, **({"fused": True} if fused and args.device.startswith("cuda") else {}))
    budget = ImageBudget()
    if name == "reference":
        col = PairCollator(model.tokenizer, model.image_processor, TRAIN_STYLE, budget, chunk_size=32, reference=True)
    else:
        col = PairCollator(model.tokenizer, model.image_processor, TRAIN_STYLE, budget, chunk_size=args.chunk_size,
                           chunk_tokens=args.chunk_tokens, packing=packing)
    return col, opt, autocast


def run_variant(name, embedder, model, batches_raw, args, flops_fn, peak):
    """Time one variant; returns its result dict (``error`` set when it failed, e.g. out of memory)."""
    packing, ckpt, fused, lora = VARIANTS[name]
    col, opt, autocast = configure(name, embedder, model, args)
    collated = [col(b) for b in batches_raw]
    res = {"variant": name, "packing": packing, "checkpointing": ckpt, "fused_adamw": fused, "lora_compute": lora}
    try:
        reset_peak(args.device)
        train_step(embedder, opt, collated[0], args.device, autocast)  # warm-up
        secs = 0.0
        for b in collated[1:]:
            s, _ = timed(lambda: train_step(embedder, opt, b, args.device, autocast), args.device)
            secs += s
    except torch.OutOfMemoryError as exc:
        res["error"] = f"out of memory ({str(exc).splitlines()[0][:80]}; peak {peak_mem_gib(args.device):.1f} GiB)"
        opt.zero_grad(set_to_none=True)
        return res
    except RuntimeError as exc:  # noqa: BLE001 - one variant failing must not stop the table
        res["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        opt.zero_grad(set_to_none=True)
        return res
    steps = len(collated) - 1
    real = sum(b.num_tokens for b in collated[1:]) / steps
    padded = sum(b.padded_tokens for b in collated[1:]) / steps
    tflops = sum(flops_fn(b) for b in collated[1:]) / secs / 1e12
    res.update(pairs_per_s=args.pairs * steps / secs, step_s=secs / steps,
               chunks=sum(len(b.chunks) for b in collated[1:]) / steps, padded_tokens=padded, real_tokens=real,
               p_over_r=padded / real, peak_mem_gib=peak_mem_gib(args.device), tflops=tflops,
               pct_peak=(100 * tflops / peak) if peak else None)
    return res


def line(r: dict, ref: dict | None) -> str:
    if "error" in r:
        return f"{r['variant']:<34} {r['error']}"
    mem = f"{r['peak_mem_gib']:.1f} GiB" if r["peak_mem_gib"] is not None else "-"
    pct = f" ({r['pct_peak']:.0f}% of peak)" if r.get("pct_peak") else ""
    speed = f"  x{r['pairs_per_s'] / ref['pairs_per_s']:.2f}" if ref and "pairs_per_s" in ref else ""
    return (f"{r['variant']:<34} {r['pairs_per_s']:8.2f} pairs/s  step {r['step_s']:.3f}s  chunks {r['chunks']:.1f}  "
            f"padded/real tokens {r['padded_tokens']:.0f}/{r['real_tokens']:.0f} P/R {r['p_over_r']:.2f}  "
            f"peak {mem}  {r['tflops']:.3g} TFLOP/s{pct}{speed}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["tiny", "7b"], default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--pairs", type=int, default=None, help="contrastive pairs per device batch (7b: 60)")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per variant (after one warm-up)")
    ap.add_argument("--lora-r", type=int, default=None, help="LoRA rank (7b: 128, tiny: 8)")
    ap.add_argument("--chunk-size", type=int, default=256, help="our max sequences per packed chunk")
    ap.add_argument("--chunk-tokens", type=int, default=32768, help="our token budget per packed chunk")
    ap.add_argument("--checkpoint-every-k", type=int, default=2, help="k of the selective checkpointing variant")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {list(VARIANTS)}")
    ap.add_argument("--profile", action="store_true", help="profile one step of the reference and best variant")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args(argv)
    args.pairs = args.pairs or (60 if args.shape == "7b" else 16)
    r = args.lora_r or (128 if args.shape == "7b" else 8)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    root = Path(tempfile.mkdtemp(prefix="umarvel_bench_train_"))
    model = UMarvel.from_backbone(build_model(args.shape, args.device), device=args.device)
    embedder = attach_lora(model.embedder, r, 2 * r, 0.05)
    embedder.train()
    n_lm, n_vis = param_counts(embedder.hf_model)
    flops_fn = lambda b: 3 * 2 * n_lm * b.num_tokens + 2 * n_vis * patches(b)  # noqa: E731
    peak = card_peak_tflops(args.device)
    batches = [make_examples(args.pairs, root / f"b{i}", seed=10 * i) for i in range(args.steps + 1)]
    print(f"device: {card_name(args.device)}  shape: {args.shape}  pairs: {args.pairs}  LoRA r={r}  "
          f"LLM params {n_lm / 1e9:.2f}B  vision {n_vis / 1e9:.2f}B  bf16 peak {peak or '-'} TFLOP/s", flush=True)
    results, best, ref = {}, None, None
    for name in names:
        res = run_variant(name, embedder, model, batches, args, flops_fn, peak)
        results[name] = res
        if name == "reference":
            ref = res
        print(line(res, ref), flush=True)
        if "error" not in res and name != "reference" and (best is None or res["pairs_per_s"] > best[1]["pairs_per_s"]):
            best = (name, res)
        gc.collect()
        reset_peak(args.device)
    if ref and best and "pairs_per_s" in ref:
        print(f"speedup best ({best[0]}) / reference: {best[1]['pairs_per_s'] / ref['pairs_per_s']:.2f}x "
              f"({args.shape}, {args.pairs} pairs, LoRA r={r}, {card_name(args.device)})", flush=True)
    if args.profile:
        for name in [n for n in ("reference", best[0] if best else None) if n]:
            col, opt, autocast = configure(name, embedder, model, args)
            batch = col(batches[1])
            print(f"\n== profile: one training step, {name} ({len(batch.chunks)} chunks, "
                  f"{batch.padded_tokens} computed tokens)", flush=True)
            print(profile_table(lambda: train_step(embedder, opt, batch, args.device, autocast), args.device),
                  flush=True)
            del opt
            gc.collect()
    summary = {"results": results, "shape": args.shape, "device": args.device, "pairs": args.pairs, "lora_r": r,
               "device_name": card_name(args.device)}
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
