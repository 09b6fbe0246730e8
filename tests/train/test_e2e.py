"""Every stage end to end on the tiny model: finite, decreasing loss on a learnable toy; outputs load;
resume equals an uninterrupted run; a NaN stops the run and keeps the last good checkpoint."""
from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import Killed, StopAfter, make_data, tiny_config

from umarvel.train import checkpoint as ckpt
from umarvel.train.stage import stage_trainer
from umarvel.train.trainer import TrainingDiverged

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("toy"))


@pytest.mark.parametrize("kind", ["nli", "cc3m", "mbeir"])
def test_stage_learns_and_exports(kind, tiny_checkpoint, data, tmp_path):
    # 8 examples, one batch of 8 per step: a memorisable toy, so the loss must go down
    cfg = tiny_config(kind, tiny_checkpoint, data, tmp_path / "run", "data.max_examples=8",
                      "train.per_device_batch_size=8", "train.max_steps=8", "train.learning_rate=3e-3",
                      "train.warmup_ratio=0", "lora.dropout=0", "train.chunk_size=5", "train.save_steps=4")
    state = stage_trainer(cfg).train()
    losses = [h["loss"] for h in state.history]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert json.loads((tmp_path / "run" / "train_history.json").read_text())["loss_per_step"] == losses
    assert losses[-1] < 0.85 * losses[0] and losses[-1] < min(losses[:3]), losses
    out = tmp_path / "run"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert ckpt.latest_checkpoint(out).name == "step-000008"
    assert (out / "checkpoints" / "step-000004" / "resolved_config.yaml").is_file()
    assert list((out / "tb").iterdir())
    meta = json.loads((out / "merged" / "umarvel.json").read_text())
    tau = state.history[-1]["temperature"]
    assert meta["temperature"] == pytest.approx(tau)
    if kind == "mbeir":  # learnable from stage 3 (D2)
        assert tau != pytest.approx(0.05, abs=1e-7)
    else:
        assert tau == pytest.approx(0.05, abs=1e-9)
    from umarvel.api import UMarvel

    merged = UMarvel.from_pretrained(out / "merged")
    assert merged.temperature == pytest.approx(tau)
    assert merged.encode_queries([{"text": "a red circle", "instruction": "find it"}]).shape == (1, 64)


def test_resume_reaches_the_same_losses(tiny_checkpoint, data, tmp_path):
    common = ["data.max_examples=16", "train.per_device_batch_size=4", "train.max_steps=6",
              "train.save_steps=3", "train.learning_rate=2e-3", "lora.dropout=0.1", "train.grad_cache=true",
              "train.chunk_size=3", "train.merge_at_end=false"]
    full = stage_trainer(tiny_config("mbeir", tiny_checkpoint, data, tmp_path / "a", *common)).train()
    cfg = tiny_config("mbeir", tiny_checkpoint, data, tmp_path / "b", *common)
    with pytest.raises(Killed):
        stage_trainer(cfg, callbacks=[StopAfter(3)]).train()
    resumed = stage_trainer(cfg)
    assert resumed.resumed_from.name == "step-000003"
    state = resumed.train()
    assert [h["step"] for h in state.history] == [4, 5, 6]  # the crossing of the epoch boundary included
    for a, b in zip(full.history[3:], state.history):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-7)
        assert b["temperature"] == pytest.approx(a["temperature"], rel=1e-6)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_checkpoint, data, tmp_path, monkeypatch):
    cfg = tiny_config("nli", tiny_checkpoint, data, tmp_path / "run", "train.max_steps=4", "train.save_steps=2")
    trainer = stage_trainer(cfg)
    real = trainer.task.compute_loss

    def poisoned(embs, batch, metrics):
        loss = real(embs, batch, metrics)
        return loss * float("nan") if trainer.state.global_step == 2 else loss

    monkeypatch.setattr(trainer.task, "compute_loss", poisoned)
    before = {n: p.detach().clone() for n, p in trainer.named_trainable}
    with pytest.raises(TrainingDiverged, match=r"non-finite loss .* step 3 .*step-000002"):
        trainer.train()
    assert ckpt.latest_checkpoint(tmp_path / "run").name == "step-000002"
    assert not (tmp_path / "run" / "checkpoints" / "step-000003").exists()
    saved = torch.load(tmp_path / "run" / "checkpoints" / "step-000002" / "trainable.pt")
    for n, p in trainer.named_trainable:  # the poisoned step did not touch the weights
        assert torch.equal(saved[n], p.detach())
    assert any(not torch.equal(before[n], p.detach()) for n, p in trainer.named_trainable)
