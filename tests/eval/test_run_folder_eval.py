"""Evaluation output folders: relaunch rules and one writer (``umarvel eval mbeir``), images checked before any
embedding is computed (M-BEIR) or before the model loads (zero-shot), qrels naming unknown queries warned."""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil

import pytest

from umarvel.cli import main
from umarvel.data.mbeir import load_mbeir_task, read_instructions
from umarvel.data.registry import MBEIR_INSTRUCTIONS, get_task
from umarvel.data.synthetic import make_synthetic_mbeir
from umarvel.eval.zeroshot.fixtures import write_zeroshot_fixture
from umarvel.eval.zeroshot.readers import read_set
from umarvel.utils.runs import IDENTITY_FILE, RunLock, read_identity

TASK = "nights_task4"


@pytest.fixture(autouse=True)
def _fresh_logging(fresh_logging):
    """Every test here reads the CLI's one-line errors from its own captured stderr."""


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_synthetic_mbeir(tmp_path_factory.mktemp("mbeir") / "M-BEIR", seed=0, tasks=[TASK])


def _eval(capsys, ckpt, root, out, *extra) -> tuple[int, list[str]]:
    rc = main(["eval", "mbeir", "--model", str(ckpt), "--mbeir-root", str(root), "--output", str(out),
               "--tasks", TASK, "--device", "cpu", "--shard-size", "4", *extra])
    err = capsys.readouterr().err
    return rc, [ln.removeprefix("umarvel: error: ") for ln in err.splitlines() if ln.startswith("umarvel: error: ")]


def test_mbeir_relaunch_rules_and_lock(tiny_checkpoint, tree, tmp_path, capsys):
    out = tmp_path / "eval" / "local"
    assert _eval(capsys, tiny_checkpoint, tree, out) == (0, [])
    first = read_identity(out)
    assert first["kind"] == "eval-mbeir" and first["config"]["tasks"] == [TASK] and first["inputs"]["model"].startswith("dir:")
    assert _eval(capsys, tiny_checkpoint, tree, out, "--batch-size", "3") == (0, [])  # same result: resumes
    rc, lines = _eval(capsys, tiny_checkpoint, tree, out, "--instruction", "first")
    assert rc == 2 and len(lines) == 1
    assert "instruction: random -> first" in lines[0] and "--overwrite" in lines[0] and "new output folder" in lines[0]
    with RunLock(out):
        rc, lines = _eval(capsys, tiny_checkpoint, tree, out)
    assert rc == 2 and "is in use by pid" in lines[0]
    assert _eval(capsys, tiny_checkpoint, tree, out, "--instruction", "first", "--overwrite") == (0, [])
    assert read_identity(out)["config"]["instruction"] == "first"


def test_mbeir_missing_image_found_before_any_embedding(tiny_checkpoint, tree, tmp_path, capsys):
    root = tmp_path / "M-BEIR"
    shutil.copytree(tree, root)
    pool_file = root / get_task(TASK).files("test").pool
    rec = json.loads(pool_file.read_text().splitlines()[3])
    (root / rec["img_path"]).unlink()
    out = tmp_path / "o" / "local"
    rc, lines = _eval(capsys, tiny_checkpoint, root, out)
    assert rc == 2 and len(lines) == 1
    assert f"{pool_file}: candidate {rec['did']}: image file not found: {root / rec['img_path']}" in lines[0]
    assert not (tmp_path / "o" / "cache").exists() or not any((tmp_path / "o" / "cache").rglob("*.npy"))


def test_qrels_naming_unknown_queries_are_counted(tree, tmp_path, caplog):
    root = tmp_path / "M-BEIR"
    shutil.copytree(tree, root)
    qrels = root / get_task(TASK).files("test").qrels
    qrels.write_text(qrels.read_text() + "9:999991 0 9:1 1 4\n9:999992 0 9:1 1 4\n")
    with caplog.at_level(logging.WARNING, logger="umarvel"):
        load_mbeir_task(root, get_task(TASK), "test", instructions=read_instructions(root / MBEIR_INSTRUCTIONS))
    assert f"2 qid(s) of {qrels} name no query" in caplog.text and "9:999991" in caplog.text


def test_zeroshot_missing_image_found_before_the_model_loads(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    root = write_zeroshot_fixture(tmp_path / "data", groups=["visdial"])
    zs = read_set("visdial", root)
    item = next(it for f in dataclasses.fields(zs) if isinstance(getattr(zs, f.name), tuple)
                for it in getattr(zs, f.name) if getattr(it, "image", None))
    from pathlib import Path

    Path(item.image).unlink()
    monkeypatch.setattr("umarvel.api.UMarvel.from_pretrained", lambda *a, **k: pytest.fail("model loaded"))
    rc = main(["eval", "zeroshot", "--model", str(tiny_checkpoint), "--data-root", str(root), "--output-dir",
               str(tmp_path / "zs"), "--tasks", "visdial", "--device", "cpu"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("umarvel: error: ")]
    assert rc == 2 and len(lines) == 1, err
    assert f"item {item.id}: image file not found: {item.image}" in lines[0] and "--skip-image-check" in lines[0]
    assert not (tmp_path / "zs" / IDENTITY_FILE).exists()
