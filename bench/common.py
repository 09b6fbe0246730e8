"""Shared helpers for the benchmarks: the synthetic M-BEIR-like encode mix and model shapes."""
from __future__ import annotations

import random
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

WORDS = ("red blue green small large round square photo of a the with near on under dog cat car "
         "building river mountain person people street city table chair book flower tree sky").split()


def make_mix(n: int, root: Path, seed: int = 0, short_side: int = 256) -> list[dict]:
    """The performance doc's mix: 20% short text, 20% long text, 40% image, 20% image+text.

    Images are written as JPEG with a ``short_side`` short side (M-BEIR stores 256-px images).
    """
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n):
        kind = rng.random()
        words = lambda a, b: " ".join(rng.choice(WORDS) for _ in range(rng.randint(a, b)))
        if kind < 0.2:
            items.append({"text": words(8, 30)})
        elif kind < 0.4:
            items.append({"text": words(70, 180)})
        else:
            long_side = rng.randint(short_side, int(short_side * 1.78))
            size = (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)
            path = root / f"img{i}.jpg"
            if not path.exists():
                im = Image.new("RGB", size, tuple(rng.randint(0, 255) for _ in range(3)))
                ImageDraw.Draw(im).ellipse([10, 10, size[0] // 2, size[1] // 2], fill=(200, 30, 30))
                im.save(path, quality=90)
            items.append({"image": str(path)} if kind < 0.8 else {"image": str(path), "text": words(8, 25)})
    return items


def qwen2vl_7b_config():
    """The real Qwen2-VL-7B shape (random weights)."""
    from transformers import Qwen2VLConfig

    return Qwen2VLConfig(
        text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                         rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6},
                         bos_token_id=151643, eos_token_id=151645),
        vision_config=dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
        tie_word_embeddings=False)


def build_model(shape: str, device: str):
    """A random model of ``shape`` ("tiny" or "7b") on ``device`` (bf16 on CUDA, fp32 on CPU)."""
    from transformers import Qwen2VLForConditionalGeneration

    from umarvel.model.tiny import build_tiny

    if shape == "tiny":
        return build_tiny("qwen2_vl", seed=0).to(device)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration._from_config(qwen2vl_7b_config(), dtype=dtype,
                                                             attn_implementation="sdpa")
    return model.eval()


def sync(device: str) -> None:
    """Wait for queued GPU work so wall-clock timings are honest."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> tuple[float, object]:
    """Run ``fn`` once; return (seconds, result)."""
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


#: Dense bf16 peak of common cards (TFLOP/s, no sparsity), for "achieved vs peak" lines.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def card_name(device: str) -> str:
    """The accelerator's name ("cpu" on CPU)."""
    return torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"


def card_peak_tflops(device: str) -> float | None:
    """Dense bf16 peak of the card, or None when unknown (CPU)."""
    name = card_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def param_counts(hf_model) -> tuple[int, int]:
    """(language-model parameters without the token embeddings and LoRA, vision-tower parameters)."""
    lm = hf_model.model.language_model
    n_lm = sum(p.numel() for n, p in lm.named_parameters() if "embed_tokens" not in n and "lora_" not in n)
    return n_lm, sum(p.numel() for p in hf_model.model.visual.parameters())


def peak_mem_gib(device: str) -> float | None:
    """Peak allocated accelerator memory since the last reset (GiB)."""
    return torch.cuda.max_memory_allocated() / 2 ** 30 if device.startswith("cuda") else None


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def profile_table(fn, device: str, rows: int = 15) -> str:
    """Run ``fn`` once under ``torch.profiler``; return the top-kernel table plus a host-sync summary."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    sync(device)
    t = time.perf_counter()
    with profile(activities=acts) as prof:
        fn()
        sync(device)
    wall = time.perf_counter() - t
    ka = prof.key_averages()
    dev_key = "self_device_time_total" if hasattr(ka[0], "self_device_time_total") else "self_cuda_time_total"
    sort = dev_key if device.startswith("cuda") else "self_cpu_time_total"
    table = ka.table(sort_by=sort, row_limit=rows, max_name_column_width=70)
    syncs = {e.key: e.count for e in ka if any(s in e.key for s in (
        "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy", "aten::item", "aten::_local_scalar_dense",
        "aten::nonzero"))}
    launches = sum(e.count for e in ka if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    self_cpu = sum(e.self_cpu_time_total for e in ka) / 1e6
    self_dev = sum(getattr(e, dev_key, 0.0) or 0.0 for e in ka) / 1e6
    summary = (f"wall {wall:.3f}s  self CPU {self_cpu:.3f}s  self device {self_dev:.3f}s  kernel launches {launches}\n"
               f"host syncs / copies / data-dependent ops: {syncs}")
    return summary + "\n" + table
