"""Training speed knobs: packing, activation checkpointing modes, fused optimizer, LoRA compute dtype."""
from __future__ import annotations

import random

import pytest
from helpers import make_data, tiny_config

from umarvel.errors import ConfigError


def test_knobs_parse_and_are_validated(tiny_checkpoint, tmp_path):
    data = make_data(tmp_path / "data")
    cfg = tiny_config("nli", tiny_checkpoint, data, tmp_path / "out", "train.activation_checkpointing=selective",
                      "train.checkpoint_every_k=3", "train.packing=false", "train.lora_compute=model")
    t = cfg.train
    assert (t.activation_checkpointing, t.checkpoint_every_k, t.packing, t.lora_compute) == ("selective", 3, False,
                                                                                            "model")
    for bad in ("train.activation_checkpointing=some", "train.lora_compute=fp8", "train.checkpoint_every_k=0"):
        with pytest.raises((ConfigError, ValueError)):
            tiny_config("nli", tiny_checkpoint, data, tmp_path / "out", bad)


def test_trainer_applies_packing_and_selective_checkpointing(tiny_checkpoint, tmp_path):
    from umarvel.train.stage import stage_trainer

    data = make_data(tmp_path / "data")
    cfg = tiny_config("nli", tiny_checkpoint, data, tmp_path / "out", "train.activation_checkpointing=selective",
                      "train.checkpoint_every_k=2", "train.max_steps=1")
    trainer = stage_trainer(cfg)
    task = trainer.task
    hf = task.embedder.hf_model
    layers = task.embedder.spec.language_model(hf).layers
    assert [bool(x.gradient_checkpointing) for x in layers] == [True, False]
    assert not any(getattr(m, "gradient_checkpointing", False) for m in task.embedder.spec.visual(hf).modules())
    assert task.collator.packing
    assert trainer.loop.fused_optimizer  # the knob reaches the one trainer ...
    assert not trainer.optimizer.defaults.get("fused")  # ... but fused AdamW runs on CUDA only
    batch = task.collator([task.dataset.example(i, random.Random(0)) for i in range(4)])
    assert all("cu_seqlens" in ch for ch in batch.chunks) and batch.padded_tokens == batch.num_tokens
    state = trainer.train()
    assert state.global_step == 1 and state.history[0]["padding_ratio"] == 1.0
