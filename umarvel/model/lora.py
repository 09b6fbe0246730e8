"""LoRA attach / load / merge through peft (all linear layers of the language model only)."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from umarvel.errors import CheckpointError
from umarvel.model.embedder import UMarvelEmbedder

logger = logging.getLogger(__name__)


def make_lora_config(embedder: UMarvelEmbedder, r: int, alpha: int, dropout: float = 0.05):
    """A peft ``LoraConfig`` on q/k/v/o/gate/up/down of every language-model layer (vision frozen)."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                      target_modules=embedder.spec.lora_target_regex)


def attach_lora(embedder: UMarvelEmbedder, r: int, alpha: int, dropout: float = 0.05) -> UMarvelEmbedder:
    """Wrap the backbone with a fresh LoRA; every non-LoRA backbone weight is frozen."""
    from peft import get_peft_model

    if is_lora(embedder):
        raise CheckpointError("the model already has a LoRA attached; merge it first (D1: one LoRA per stage)")
    embedder.backbone = get_peft_model(embedder.backbone, make_lora_config(embedder, r, alpha, dropout))
    n = sum(p.numel() for p in embedder.backbone.parameters() if p.requires_grad)
    logger.info("attached LoRA r=%d alpha=%d dropout=%.3g: %d trainable parameters", r, alpha, dropout, n)
    return embedder


def set_lora_compute(embedder: UMarvelEmbedder, mode: str = "float32") -> None:
    """How the adapter matmuls run: ``float32`` (peft's default: the input is upcast to the fp32 adapter
    weights) or ``model`` (the input stays in the model dtype; run the forward under ``torch.autocast`` so the
    fp32 adapter weights are cast down per call and their gradients stay fp32)."""
    if mode not in ("float32", "model"):
        raise ValueError(f"lora compute must be 'float32' or 'model', got {mode!r}")
    for m in embedder.backbone.modules():
        if hasattr(m, "cast_input_dtype_enabled"):
            m.cast_input_dtype_enabled = mode == "float32"


def is_lora(embedder: UMarvelEmbedder) -> bool:
    """Whether the backbone is peft-wrapped."""
    return hasattr(embedder.backbone, "peft_config")


def load_lora(embedder: UMarvelEmbedder, adapter_dir: str | Path) -> UMarvelEmbedder:
    """Load a saved LoRA adapter onto the backbone."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise CheckpointError(f"{adapter_dir}: not a LoRA adapter folder (no adapter_config.json)")
    embedder.backbone = PeftModel.from_pretrained(embedder.backbone, str(adapter_dir))
    return embedder


def save_lora(embedder: UMarvelEmbedder, out_dir: str | Path) -> None:
    """Save only the adapter weights and config (``adapter_model.safetensors``)."""
    if not is_lora(embedder):
        raise CheckpointError("no LoRA attached: nothing to save as an adapter")
    embedder.backbone.save_pretrained(str(out_dir))


def merge_lora(embedder: UMarvelEmbedder, dtype: torch.dtype | None = None) -> UMarvelEmbedder:
    """Merge the LoRA into the backbone weights (in ``dtype``, e.g. the training bf16; D13).

    The temperature and the added-token rows are untouched (they live outside the adapter).
    """
    if not is_lora(embedder):
        return embedder
    if dtype is not None:
        embedder.backbone.to(dtype)
    embedder.backbone = embedder.backbone.merge_and_unload()
    embedder.set_attention(embedder.attention)
    return embedder
