"""Mining and teacher output folders: a relaunch with another config is refused before any encoding;
``overwrite`` replaces; a missing image is found before anything is encoded."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from umarvel.errors import ImageLoadError, RunConflictError
from umarvel.pipelines.mining import MineConfig, mine
from umarvel.utils.runs import read_identity

TASKS = ("mscoco_task0", "cirr_task7")


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    from umarvel.data.synthetic import make_synthetic_mbeir

    return make_synthetic_mbeir(tmp_path_factory.mktemp("mine") / "mbeir", seed=1, n_queries_per_task=2,
                                n_candidates_per_task=6, image_size=32, n_train_queries_per_task=4, tasks=TASKS)


class _NoEncode:
    """The model, except that nothing may be encoded (reused, or refused / failed first)."""

    def __init__(self, model):
        self.model = model

    def __getattr__(self, name):
        if name.startswith("encode"):
            raise AssertionError(f"encoder.{name} called")
        return getattr(self.model, name)


def _cfg(tree, out, **kw) -> MineConfig:
    return MineConfig(model="unused", mbeir_root=str(tree), output=str(out), scope="local", device="cpu",
                      **{"top_k": 3, "batch_size": 4, **kw})


def test_mine_relaunch_rules(tree, tiny_model, tmp_path):
    out = tmp_path / "mined"
    mine(_cfg(tree, out), encoder=tiny_model)
    assert read_identity(out)["kind"] == "mine"
    mine(_cfg(tree, out, batch_size=2), encoder=_NoEncode(tiny_model))  # same result: everything reused
    with pytest.raises(RunConflictError, match=r"top_k: 3 -> 4.*--overwrite"):
        mine(_cfg(tree, out, top_k=4), encoder=_NoEncode(tiny_model))
    mine(_cfg(tree, out, top_k=4), encoder=tiny_model, overwrite=True)
    row = json.loads((out / "rerank_data_all_eval_train_local.jsonl").read_text().splitlines()[0])
    assert len(row["top100_docs"]) == 4 and read_identity(out)["config"]["top_k"] == 4


def test_mine_missing_image_found_before_encoding(tree, tiny_model, tmp_path):
    root = tmp_path / "mbeir"
    shutil.copytree(tree, root)
    pool = root / MineConfig("", "", "").pool
    rec = next(r for r in map(json.loads, pool.read_text().splitlines()) if r.get("img_path"))
    (root / rec["img_path"]).unlink()
    with pytest.raises(ImageLoadError, match=f"candidate {rec['did']}: image file not found"):
        mine(_cfg(root, tmp_path / "mined"), encoder=_NoEncode(tiny_model))
