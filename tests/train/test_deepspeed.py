"""DeepSpeed ZeRO through the stage trainer: two gloo processes on CPU, ZeRO-2 and ZeRO-3, resume.

The first DeepSpeed start on a machine JIT-compiles a communication op (~40 s, cached afterwards).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    subprocess.run([sys.executable, "-m", "umarvel.train.toy_data", str(root / "toy")], check=True,
                   capture_output=True)
    return root


def _train(tiny_checkpoint, toy, out, zero, *extra, steps=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "umarvel.commands.train", str(REPO / "configs/stages/01_nli.yaml"),
           f"init_from={tiny_checkpoint}", f"data.path={toy / 'toy' / 'nli.csv'}", f"train.output_dir={out}",
           "model.dtype=float32", f"train.deepspeed={REPO / 'configs/deepspeed' / f'zero{zero}.json'}",
           f"train.max_steps={steps}", "train.save_steps=1", "train.per_device_batch_size=4", "lora.r=8",
           "lora.alpha=16", "data.num_workers=0", "model.gradient_checkpointing=false", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", UMARVEL_NO_PROGRESS="1")
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=REPO)


def test_zero2_learnable_temperature_trains_and_resumes(tiny_checkpoint, toy, tmp_path):
    out = tmp_path / "z2"
    first = _train(tiny_checkpoint, toy, out, 2, "temperature.learnable=true")
    assert first.returncode == 0, first.stderr[-3000:]
    assert (out / "merged" / "umarvel.json").is_file()
    again = _train(tiny_checkpoint, toy, out, 2, "temperature.learnable=true", steps=3)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr and "step-000002" in again.stderr
    meta = json.loads((out / "merged" / "umarvel.json").read_text())
    assert meta["temperature"] != pytest.approx(0.05, abs=1e-9)  # tau was trained


def test_zero3_fixed_temperature_and_learnable_refused(tiny_checkpoint, toy, tmp_path):
    ok = _train(tiny_checkpoint, toy, tmp_path / "z3", 3)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert (tmp_path / "z3" / "adapter").is_dir()
    bad = _train(tiny_checkpoint, toy, tmp_path / "z3b", 3, "temperature.learnable=true")
    assert bad.returncode != 0 and "ZeRO-3 partitions the temperature" in bad.stderr
