"""Stages 1-3 against the official training code (golden ``umarvel_train_tiny`` cases c1-c3).

The fixture's data files are written to a temp folder and read by our datasets; the batch is built by our
collator in the official layout (``reference=True``: one padded length, category-major) and compared
exactly (strings, ids, masks, image grid; pixels to 1e-6); the loss of the first training step of our
trainer (length-sorted chunks, LoRA attached with B = 0) must match to 1e-5 relative. D12 masking is turned
off (``loss.mask_duplicates=false``): the official behaviour.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import GOLDEN_TINY, GOLDEN_TRAIN, requires_golden

from umarvel.train.batching import PairCollator
from umarvel.train.config import load_stage_config
from umarvel.train.stage import stage_trainer
from umarvel.train.trainer import Trainer

pytestmark = pytest.mark.golden

REPO = Path(__file__).resolve().parents[2]
CASES = {"c1_nli": "01_nli.yaml", "c2_cc3m": "02_cc3m.yaml", "c3_mbeir": "03_mbeir.yaml"}


def _write_inputs(case: str, root: Path) -> list[str]:
    """Write the case's official files under ``root``; return the data overrides."""
    inp = json.loads((GOLDEN_TRAIN / "inputs" / f"{case}.json").read_text())
    for name, rel in inp.get("image_files", {}).items():
        shutil.copy(GOLDEN_TRAIN / rel, root / name)
    files = inp["official_files"]
    if case == "c1_nli":
        (root / "nli.csv").write_text(files["nli_for_simcse.csv"], encoding="utf-8")
        return [f"data.path={root / 'nli.csv'}"]
    if case == "c2_cc3m":
        (root / "train_anno.json").write_text(json.dumps(files["train_anno.json"]))
        return [f"data.path={root / 'train_anno.json'}", f"data.root={root}"]
    for name in ("query.jsonl", "cand_pool.jsonl"):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in files[name]))
    (root / "instructions.tsv").write_text(files["instructions.tsv"])
    return [f"data.path={root / 'query.jsonl'}", f"data.pool={root / 'cand_pool.jsonl'}",
            f"data.instructions={root / 'instructions.tsv'}", f"data.root={root}"]


def _golden_model():
    from umarvel.api import UMarvel

    model = UMarvel.from_pretrained(GOLDEN_TINY / "checkpoint", device="cpu", dtype="float32")
    rows = np.load(GOLDEN_TRAIN / "expected" / "added_token_embeddings.npy")
    ids = [model.tokenizer.convert_tokens_to_ids(t) for t in ("<instruction_start>", "<instruction_end>")]
    with torch.no_grad():
        model.embedder.hf_model.get_input_embeddings().weight[ids] = torch.from_numpy(rows[1:3])
    return model


def _trainer(case: str, tmp_path: Path) -> Trainer:
    overrides = _write_inputs(case, tmp_path) + [
        "init_from=unused", "model.dtype=float32", "train.deepspeed=null", "train.per_device_batch_size=3",
        "train.max_steps=1", "train.learning_rate=1e-6", "data.num_workers=0", "loss.mask_duplicates=false",
        "lora.r=4", "lora.alpha=8", "train.merge_at_end=false", f"train.output_dir={tmp_path / 'run'}",
        "train.chunk_size=4"]
    cfg = load_stage_config(REPO / "configs" / "stages" / CASES[case], overrides)
    return stage_trainer(cfg, model=_golden_model())


@requires_golden
@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_batch_and_first_step_loss(case, tmp_path):
    meta = json.loads((GOLDEN_TRAIN / "expected" / case / "meta.json").read_text())
    arrays = np.load(GOLDEN_TRAIN / "expected" / case / "arrays.npz")
    trainer = _trainer(case, tmp_path)
    task = trainer.task
    examples = [task.dataset.example(i, random.Random(0)) for i in range(3)]

    ref = PairCollator(task.model.tokenizer, task.model.image_processor, task.collator.tok.style,
                       task.collator.budget, mask_instruction=task.cfg.data.mask_instruction,
                       chunk_size=32, reference=True)
    rendered = [ref.tok.render(x) for x in ref.inputs(examples)]
    assert rendered == meta["rendered"]
    batch = ref(examples)
    assert len(batch.chunks) == 1
    got = batch.chunks[0]
    for key in ("input_ids", "attention_mask", "pool_mask"):
        np.testing.assert_array_equal(got[key].numpy(), arrays[key], err_msg=key)
    if "instruction_mask" in arrays.files:
        np.testing.assert_array_equal(got["instruction_mask"].numpy(), arrays["instruction_mask"])
    if "pixel_values" in arrays.files:
        np.testing.assert_array_equal(got["image_grid_thw"].numpy(), arrays["image_grid_thw"])
        np.testing.assert_allclose(got["pixel_values"].numpy(), arrays["pixel_values"], atol=1e-6, rtol=0)

    # our packed chunks (train.packing, on by default) give the same loss as the official single padded batch
    with torch.no_grad():
        ours = task.collator(examples)
        assert len(ours.chunks) > 1 and all("cu_seqlens" in c for c in ours.chunks)
        loss = task.compute_loss(torch.cat([task.embed(trainer.model, c) for c in ours.chunks]), ours, {})
    assert abs(loss.item() - meta["loss"]) / meta["loss"] <= 1e-5

    # and so does the first step of the training loop (random batch order, LoRA attached with B = 0)
    state = trainer.train()
    assert abs(state.history[0]["loss"] - meta["loss"]) / meta["loss"] <= 1e-5
