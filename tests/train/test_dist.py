"""Two gloo processes running the real trainer step == one process on the doubled batch (loss and gradients).

Stage 2 (bidirectional InfoNCE with D12 masks from gathered ids, plain backward) and stage 3 (learnable
temperature, GradCache) on the tiny model; the sampler gives the two ranks exactly the two halves of the
single-process batch. LoRA dropout is 0 (dropout streams differ per rank by design).
"""
from __future__ import annotations

import pytest
import os

import torch
from helpers import free_port, spawn_and_wait
from helpers import make_data, tiny_config

pytestmark = pytest.mark.slow

B, WORLD, TIMEOUT_S = 3, 2, 240
CASES = {"cc3m": ["loss.mask_duplicates=true"], "mbeir": ["train.grad_cache=true", "train.chunk_size=2"]}


def _cfg(kind, ckpt, root, out, batch):
    return tiny_config(kind, ckpt, make_data(root), out, "lora.dropout=0", f"train.per_device_batch_size={batch}",
                       "data.max_examples=12", *CASES[kind])


def _one_step(kind, ckpt, root, out, batch):
    """Build the trainer, run forward/backward (+ the gradient all-reduce) on the first batch."""
    from umarvel import dist as udist
    from umarvel.train.stage import stage_trainer

    trainer = stage_trainer(_cfg(kind, ckpt, root, out, batch))
    torch.manual_seed(5)
    with torch.no_grad():
        for n, p in trainer.named_trainable:
            if "lora_B" in n:
                p.normal_(0, 0.05)
    loss, _ = trainer.forward_backward(next(trainer.steps(0, 0)))
    trainer._allreduce_grads()
    return float(udist.all_reduce_mean(loss)), {n: p.grad.detach().clone() for n, p in trainer.named_trainable}


def _worker(rank, port, ckpt, root, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), UMARVEL_NO_PROGRESS="1")
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        for kind in CASES:
            loss, grads = _one_step(kind, ckpt, root, out / f"{kind}_dist", B)
            if rank == 0:
                torch.save({"loss": loss, "grads": grads}, out / f"{kind}_dist.pt")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_two_processes_equal_one(tiny_checkpoint, tmp_path):
    root = tmp_path / "toy"
    make_data(root)
    spawn_and_wait(_worker, (free_port(), tiny_checkpoint, root, tmp_path), WORLD, TIMEOUT_S,
                   "2-process trainer test")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: the same reduction order, so only the distribution can differ
    try:
        refs = {kind: _one_step(kind, tiny_checkpoint, root, tmp_path / f"{kind}_single", WORLD * B) for kind in CASES}
    finally:
        torch.set_num_threads(threads)
    for kind in CASES:
        ref_loss, ref = refs[kind]
        got = torch.load(tmp_path / f"{kind}_dist.pt")
        assert abs(got["loss"] - ref_loss) <= 1e-5 * abs(ref_loss), (kind, got["loss"], ref_loss)
        assert set(got["grads"]) == set(ref)
        for n, g in ref.items():
            torch.testing.assert_close(got["grads"][n], g, rtol=1e-4, atol=1e-6, msg=lambda m: f"{kind} {n}: {m}")
