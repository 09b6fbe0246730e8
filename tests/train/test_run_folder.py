"""A training run folder knows its config: relaunch rules, one writer, checks before the model loads, missing
images named with their row, safe checkpoint loading. Tiny model, 2 steps."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from helpers import REPO, make_data, tiny_config

from umarvel.cli import main
from umarvel.errors import CheckpointError, ImageLoadError, RunConflictError
from umarvel.train import checkpoint as ckpt
from umarvel.train.stage import run_stage
from umarvel.train.trainer import TrainerCallback
from umarvel.utils.runs import IDENTITY_FILE, LOCK_FILE, RunLock, read_identity


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("toy"))


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a model is loaded (the refusal must come first)."""
    def boom(*a, **k):
        raise AssertionError("the model was loaded before the run was refused")
    monkeypatch.setattr("umarvel.api.UMarvel.from_pretrained", boom)


COMMON = ("data.max_examples=8", "train.merge_at_end=false", "train.save_steps=1")


def _cfg(kind, ckpt_dir, data, out, *extra):
    return tiny_config(kind, ckpt_dir, data, out, *COMMON, *extra)


def _refused(cfg, **kw) -> str:
    with pytest.raises(RunConflictError) as err:
        run_stage(cfg, **kw)
    return str(err.value)


def test_relaunch_rules(tiny_checkpoint, data, tmp_path, monkeypatch, caplog):
    out = tmp_path / "run"
    base = _cfg("nli", tiny_checkpoint, data, out)
    assert run_stage(base).global_step == 2
    rec = read_identity(out)
    assert rec["kind"] == "train" and rec["config"]["stage"] == "01_nli" and not (out / LOCK_FILE).exists()
    last = ckpt.latest_checkpoint(out)

    # same config (other batching / logging settings) -> resume as before
    same = _cfg("nli", tiny_checkpoint, data, out, "train.chunk_size=3", "train.logging_steps=5")
    assert run_stage(same).global_step == 2 and ckpt.latest_checkpoint(out) == last

    # a different config is refused before the model loads, naming the keys and the ways forward
    with monkeypatch.context() as m:
        m.setattr("umarvel.api.UMarvel.from_pretrained", lambda *a, **k: pytest.fail("model loaded"))
        msg = _refused(_cfg("nli", tiny_checkpoint, data, out, "train.learning_rate=5e-4"))
        assert "train.learning_rate: 0.0002 -> 0.0005" in msg and "--overwrite" in msg and "train.resume=" in msg
        assert "new output folder" in msg and "\n" not in msg
        assert "lora.r: 4 -> 8" in _refused(_cfg("nli", tiny_checkpoint, data, out, "lora.r=8"))
        stage2 = tiny_config("cc3m", tiny_checkpoint, data, out, *COMMON)
        msg = _refused(stage2)
        assert "stage: 01_nli -> 02_cc3m" in msg and "data.kind: nli -> cc3m" in msg
        # an older folder without run_identity.json is compared with its checkpoint's saved config
        (out / IDENTITY_FILE).rename(tmp_path / "identity.bak")
        assert "train.learning_rate" in _refused(_cfg("nli", tiny_checkpoint, data, out, "train.learning_rate=5e-4"))
        (tmp_path / "identity.bak").rename(out / IDENTITY_FILE)
    assert ckpt.latest_checkpoint(out) == last and read_identity(out)["fingerprint"] == rec["fingerprint"]

    # an explicit checkpoint resume continues with the new config (a warning names the change)
    with caplog.at_level(logging.WARNING, logger="umarvel"):
        run_stage(_cfg("nli", tiny_checkpoint, data, out, "train.learning_rate=5e-4", f"train.resume={last}"))
    assert "continuing the recorded train run with a changed config: train.learning_rate" in caplog.text
    assert read_identity(out)["config"]["train"]["learning_rate"] == 5e-4

    # --overwrite starts over: the old checkpoints go, training runs from step 0
    steps = []

    class Steps(TrainerCallback):
        def on_step(self, step, total, loss):
            steps.append(step)

    run_stage(_cfg("nli", tiny_checkpoint, data, out, "lora.r=8"), overwrite=True, callbacks=[Steps()])
    assert steps == [1, 2] and read_identity(out)["config"]["lora"]["r"] == 8
    assert [h["how"] for h in read_identity(out)["history"]] == ["changed", "replaced"]


def test_checkpoint_files_load_safely_and_shapes_are_checked(tiny_checkpoint, data, tmp_path):
    out = tmp_path / "run"
    run_stage(_cfg("nli", tiny_checkpoint, data, out))
    last = ckpt.latest_checkpoint(out)
    for f in ("rng_rank0.pt", "optimizer.pt", "trainable.pt"):  # all plain tensors / containers
        torch.load(last / f, weights_only=True)
    named = [(n, torch.nn.Parameter(t.new_zeros(t.shape[0] + 1, *t.shape[1:]) if t.dim() else t.clone()))
             for n, t in torch.load(last / "trainable.pt", weights_only=True).items()]
    with pytest.raises(CheckpointError, match="other tensor shapes than the model .* another LoRA rank"):
        ckpt.load_trainable(last, named)


def test_second_writer_refused_naming_the_holder(tiny_checkpoint, data, tmp_path, no_model_load):
    out = tmp_path / "run"
    out.mkdir()
    with RunLock(out):
        msg = _refused(_cfg("nli", tiny_checkpoint, data, out))
    assert "is in use by pid" in msg and "started" in msg
    assert not (out / IDENTITY_FILE).exists()


def _drop_first_cc3m_image(data, tmp_path) -> tuple[Path, str, Path]:
    """A copy of the toy CC3M set whose first record's image is missing: (annotation, key, image)."""
    import shutil

    root = tmp_path / "cc3m"
    shutil.copytree(data["cc3m"], root)
    anno = root / "train_anno.json"
    recs = json.loads(anno.read_text())
    key, rec = next(iter(recs.items())) if isinstance(recs, dict) else (0, recs[0])
    image = root / rec["h5v"]
    image.unlink()
    return anno, str(key), image


def test_missing_image_found_before_the_model_loads(tiny_checkpoint, data, tmp_path, no_model_load):
    anno, key, image = _drop_first_cc3m_image(data, tmp_path)
    cfg = tiny_config("cc3m", tiny_checkpoint, data, tmp_path / "run", *COMMON, f"data.path={anno}",
                      f"data.root={anno.parent}")
    with pytest.raises(ImageLoadError) as err:
        run_stage(cfg)
    msg = str(err.value)
    assert f"{anno}: record '{key}': image file not found: {image}" in msg and "--skip-image-check" in msg
    assert not (tmp_path / "run" / IDENTITY_FILE).exists()  # a failed start records nothing


def test_missing_image_during_training_names_image_and_row(tiny_checkpoint, data, tmp_path, capsys):
    anno, key, image = _drop_first_cc3m_image(data, tmp_path)
    cfg_file = REPO / "configs" / "stages" / "02_cc3m.yaml"
    overrides = [f"init_from={tiny_checkpoint}", f"train.output_dir={tmp_path / 'run'}", "model.dtype=float32",
                 "train.deepspeed=null", "data.num_workers=1", "lora.r=4", "lora.alpha=8", "train.max_steps=2",
                 "train.per_device_batch_size=8", "train.report_to=[tensorboard]", *COMMON, f"data.path={anno}",
                 f"data.root={anno.parent}"]
    assert main(["train", str(cfg_file), *overrides, "--skip-image-check"]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("umarvel: error: ")]
    assert len(lines) == 1, err
    assert f"training row {anno}: record '{key}'" in lines[0] and f"image file not found: {image}" in lines[0]
