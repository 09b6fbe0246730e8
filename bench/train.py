"""Training-step throughput: our step against a reference-style step at the same contrastive batch.

Reference style (official ``Qwen2VLRetFinetune`` forward): the device batch (B queries + B positives) is padded
to its single longest sequence and run in layout order in chunks of 32 sequences (vision tower per chunk).
Ours: the same sequences length-sorted and cut into length-homogeneous chunks under a padded-token budget
(``umarvel.train.batching.PairCollator``). Everything else is shared: LoRA on all LLM linears, gradient
checkpointing, bidirectional attention, InfoNCE, AdamW step. Batches are collated before timing (in training
the DataLoader workers do that in parallel), so the numbers are model-step pairs/s.

    python bench/train.py --shape tiny --pairs 16                 # CPU: compare the ratio only
    python bench/train.py --shape 7b --device cuda --pairs 60     # H100: target >= 3x the reference style
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_model, make_mix, timed  # noqa: E402

from umarvel.api import UMarvel  # noqa: E402
from umarvel.data.formatting import TRAIN_STYLE, format_string  # noqa: E402
from umarvel.data.images import ImageBudget  # noqa: E402
from umarvel.model.lora import attach_lora  # noqa: E402
from umarvel.train import losses as L  # noqa: E402
from umarvel.train.batching import PairCollator  # noqa: E402
from umarvel.train.datasets import Side, TrainExample  # noqa: E402


def make_examples(n: int, root: Path, seed: int = 0) -> list[TrainExample]:
    """n query -> candidate pairs drawn from the M-BEIR-like mix (text, long text, image, image+text)."""
    qs, cs = make_mix(n, root / "q", seed=seed), make_mix(n, root / "c", seed=seed + 1)
    side = lambda it: Side(format_string(it.get("text", "")), it.get("image"))  # noqa: E731
    return [TrainExample(side(q), (side(c),), query_id=f"q{i}", candidate_ids=(f"c{i}",))
            for i, (q, c) in enumerate(zip(qs, cs))]


def train_step(embedder, optimizer, batch, device) -> float:
    """One optimiser step on a collated StepBatch; returns the loss."""
    embs = torch.cat([embedder(**{k: v.to(device) for k, v in ch.items()}, normalize=False) for ch in batch.chunks])
    layout = embs[batch.inverse.to(device)]
    q, c = layout.split(batch.group_sizes)
    loss = L.info_nce(q, c, embedder.temperature)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["tiny", "7b"], default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--pairs", type=int, default=None, help="contrastive pairs per device batch (7b: 60)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one warm-up)")
    ap.add_argument("--lora-r", type=int, default=None, help="LoRA rank (7b: 128, tiny: 8)")
    ap.add_argument("--chunk-size", type=int, default=32, help="our max sequences per chunk")
    ap.add_argument("--chunk-tokens", type=int, default=16384, help="our padded-token budget per chunk")
    ap.add_argument("--no-checkpointing", action="store_true", help="disable gradient checkpointing")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args(argv)
    pairs = args.pairs or (60 if args.shape == "7b" else 16)
    r = args.lora_r or (128 if args.shape == "7b" else 8)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False
    root = Path(tempfile.mkdtemp(prefix="umarvel_bench_train_"))
    model = UMarvel.from_backbone(build_model(args.shape, args.device), device=args.device)
    embedder = attach_lora(model.embedder, r, 2 * r, 0.05)
    if not args.no_checkpointing:
        hf = embedder.hf_model
        if hasattr(hf, "activation_checkpointing_enable"):  # transformers >= 5.2x
            hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    embedder.train()
    optimizer = torch.optim.AdamW([p for p in embedder.parameters() if p.requires_grad], lr=1e-5)
    budget = ImageBudget()
    ours = PairCollator(model.tokenizer, model.image_processor, TRAIN_STYLE, budget, chunk_size=args.chunk_size,
                        chunk_tokens=args.chunk_tokens)
    ref = PairCollator(model.tokenizer, model.image_processor, TRAIN_STYLE, budget, chunk_size=32, reference=True)
    batches = [make_examples(pairs, root / f"b{i}", seed=10 * i) for i in range(args.steps + 1)]
    results = {}
    for name, col in (("reference", ref), ("ours", ours)):
        collated = [col(b) for b in batches]
        train_step(embedder, optimizer, collated[0], args.device)  # warm-up
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        secs = 0.0
        for b in collated[1:]:
            s, _ = timed(lambda: train_step(embedder, optimizer, b, args.device), args.device)
            secs += s
        res = {"pairs_per_s": pairs * args.steps / secs, "step_s": secs / args.steps,
               "chunks": sum(len(b.chunks) for b in collated[1:]) / args.steps,
               "padded_tokens": sum(b.padded_tokens for b in collated[1:]) / args.steps,
               "real_tokens": sum(b.num_tokens for b in collated[1:]) / args.steps}
        if args.device.startswith("cuda"):
            res["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        results[name] = res
        print(f"{name:9s} {res['pairs_per_s']:8.2f} pairs/s  step {res['step_s']:.3f}s  chunks {res['chunks']:.1f}  "
              f"padded/real tokens {res['padded_tokens']:.0f}/{res['real_tokens']:.0f}"
              + (f"  peak {res['peak_mem_gib']:.1f} GiB" if "peak_mem_gib" in res else ""))
    speedup = results["ours"]["pairs_per_s"] / results["reference"]["pairs_per_s"]
    results.update(speedup=speedup, shape=args.shape, device=args.device, pairs=pairs, lora_r=r,
                   device_name=torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu")
    print(f"speedup ours/reference: {speedup:.2f}x ({args.shape}, {pairs} pairs, LoRA r={r}, {results['device_name']})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
