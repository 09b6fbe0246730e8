"""GradCache in the trainer: the same loss and the same LoRA (and temperature) gradients as the plain step,
on the tiny Qwen2-VL with LoRA dropout on, mixed text/image chunks and a learnable temperature."""
from __future__ import annotations

import dataclasses
import random

import torch
from helpers import make_data, tiny_config

from umarvel.train.stage import stage_trainer


def _grads(trainer):
    return {n: p.grad.detach().clone() for n, p in trainer.named_trainable}


def test_grad_cache_step_equals_plain_step(tiny_checkpoint, tmp_path):
    data = make_data(tmp_path / "toy")
    cfg = tiny_config("mbeir", tiny_checkpoint, data, tmp_path / "run", "lora.dropout=0.2",
                      "train.chunk_size=3", "train.per_device_batch_size=6")
    trainer = stage_trainer(cfg)
    torch.manual_seed(1)
    with torch.no_grad():  # non-zero LoRA B so that every LoRA matrix gets a gradient
        for n, p in trainer.named_trainable:
            if "lora_B" in n:
                p.normal_(0, 0.05)
    batch = trainer.task.collator([trainer.task.dataset.example(i, random.Random(i)) for i in range(6)])
    assert len(batch.chunks) >= 4 and any("pixel_values" in c for c in batch.chunks)

    trainer.optimizer.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    plain_loss, _ = trainer.forward_backward([batch])
    plain = _grads(trainer)

    trainer.task.cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_cache=True))
    trainer.optimizer.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    cached_loss, _ = trainer.forward_backward([batch])
    cached = _grads(trainer)

    assert abs(cached_loss.item() - plain_loss.item()) <= 1e-6 * abs(plain_loss.item())
    assert any("temperature" in n for n in plain)
    for n, g in plain.items():
        assert g.abs().sum() > 0, n
        torch.testing.assert_close(cached[n], g, rtol=1e-4, atol=1e-6, msg=n)
