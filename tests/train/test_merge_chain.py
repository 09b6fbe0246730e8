"""merge-lora (D13) and the three stages chained through the shell launchers on the tiny model."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import free_port
from helpers import REPO, data_overrides, make_data, tiny_config

from umarvel.api import UMarvel

pytestmark = pytest.mark.slow

ITEMS_Q = [{"text": "a red circle on the left", "instruction": "find the picture"}, {"text": "blue square"}]


def test_merge_lora_equals_base_plus_adapter(tiny_checkpoint, tmp_path):
    from umarvel.cli import main
    from umarvel.train.stage import stage_trainer

    data = make_data(tmp_path / "toy")
    cfg = tiny_config("mbeir", tiny_checkpoint, data, tmp_path / "run", "train.merge_at_end=false",
                      "train.learning_rate=5e-3", "train.max_steps=3")
    stage_trainer(cfg).train()
    adapter = tmp_path / "run" / "adapter"
    tau = json.loads((adapter / "umarvel.json").read_text())["temperature"]
    assert tau != pytest.approx(0.05, abs=1e-7)
    out = tmp_path / "merged"
    assert main(["merge-lora", "--base", str(tiny_checkpoint), "--adapter", str(adapter), "--output", str(out),
                 "--dtype", "float32"]) == 0
    merged = UMarvel.from_pretrained(out)
    unmerged = UMarvel.from_pretrained(tiny_checkpoint, adapter=adapter)
    assert merged.temperature == pytest.approx(tau) == unmerged.temperature
    assert merged.tokenizer.convert_tokens_to_ids("<instruction_start>") == 151658
    emb = lambda m: m.embedder.hf_model.get_input_embeddings().weight[151657:151660]  # noqa: E731
    torch.testing.assert_close(emb(merged), emb(unmerged))
    np.testing.assert_allclose(merged.encode_queries(ITEMS_Q), unmerged.encode_queries(ITEMS_Q), atol=2e-5)
    base = UMarvel.from_pretrained(tiny_checkpoint)
    assert np.abs(base.encode_queries(ITEMS_Q) - merged.encode_queries(ITEMS_Q)).max() > 1e-4  # LoRA did act
    assert json.loads((out / "umarvel.json").read_text())["train_dtype"] == "float32"


def test_three_stages_chain_through_the_scripts(tiny_checkpoint, tmp_path):
    data = make_data(tmp_path / "toy")
    env = {**os.environ, "GPUS_PER_NODE": "1", "UMARVEL_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1",
           "PYTHON": sys.executable}
    common = ["model.dtype=float32", "train.deepspeed=null", "train.max_steps=2", "train.per_device_batch_size=4",
              "lora.r=4", "lora.alpha=8", "data.num_workers=0", "train.report_to=[tensorboard]"]
    prev = tiny_checkpoint
    for i, (script, kind) in enumerate([("train_stage1_nli.sh", "nli"), ("train_stage2_cc3m.sh", "cc3m"),
                                        ("train_stage3_mbeir.sh", "mbeir")], start=1):
        out = tmp_path / f"stage{i}"
        env["MASTER_PORT"] = str(free_port())
        args = [str(REPO / "scripts" / script), f"init_from={prev}", f"train.output_dir={out}",
                *data_overrides(kind, data), *common]
        res = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        meta = json.loads((out / "merged" / "umarvel.json").read_text())
        assert meta["init_from"] == str(prev.resolve()) and meta["step"] == 2
        prev = out / "merged"
    final = UMarvel.from_pretrained(prev)
    assert final.temperature != pytest.approx(0.05, abs=1e-7)  # learnable in stage 3 only
    assert np.isfinite(final.encode_queries(ITEMS_Q)).all()
    # a bad override fails fast with one clear line and exit code 2
    env["MASTER_PORT"] = str(free_port())
    res = subprocess.run([str(REPO / "scripts" / "train_stage1_nli.sh"), "train.bogus=1"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "unknown key 'train.bogus'" in res.stderr
