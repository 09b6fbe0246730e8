"""Bad inputs at the command line: one line ``umarvel: error: ...``, exit code 2, found before any model loads;
``--debug`` shows the traceback."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess

import numpy as np
import pytest
import torch
from helpers import REPO

from umarvel.cli import main
from umarvel.commands import error_line
from umarvel.errors import ImageLoadError

NO_MODEL = "/nonexistent/model"  # the checks must fail before the model is looked at


@pytest.fixture(autouse=True)
def _fresh_logging(fresh_logging):
    """Every test here reads the CLI's one-line errors from its own captured stderr."""


def _items(tmp_path, *records, raw: bytes | None = None):
    path = tmp_path / "items.jsonl"
    if raw is not None:
        path.write_bytes(raw)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _encode(capsys, items, out, *extra, model=NO_MODEL):
    rc = main(["encode", "--model", str(model), "--input", str(items), "--output", str(out), *extra])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("umarvel: error: ")]
    return rc, lines, err


def _one_error(capsys, items, out, *extra) -> str:
    rc, lines, err = _encode(capsys, items, out, *extra)
    assert rc == 2 and len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0].removeprefix("umarvel: error: ")


def test_encode_input_errors_are_one_line(tmp_path, capsys):
    out = tmp_path / "emb.npy"
    bad = _items(tmp_path, raw=b'{"text": "fine"}\n{"text": "na\xefve"}\n')
    assert _one_error(capsys, bad, out).startswith(f"not UTF-8 at byte 13 of {bad}:2")
    assert _one_error(capsys, _items(tmp_path, {"image": 5}), out) == (
        f"{tmp_path / 'items.jsonl'}:1: 'image' must be a string, got int 5")
    assert _one_error(capsys, _items(tmp_path, raw=b"\n\n"), out) == f"{tmp_path / 'items.jsonl'}: no items (every " \
                                                                       "line is blank); nothing to encode"
    dup = _items(tmp_path, {"id": "q1", "text": "a"}, {"id": "q2", "text": "b"}, {"id": "q1", "text": "c"})
    assert _one_error(capsys, dup, out) == f"{dup}:3: duplicate id 'q1' (first on line 1); ids must be unique"
    assert _one_error(capsys, tmp_path, out) == f"--input {tmp_path}: is a folder, expected a file"
    assert not out.exists()


def test_encode_output_errors_before_any_work(tmp_path, capsys):
    items = _items(tmp_path, {"text": "a"})
    (tmp_path / "afile").write_text("x")
    msg = _one_error(capsys, items, tmp_path / "afile" / "emb.npy")
    assert "afile is a file, not a folder" in msg
    assert "is a folder; give a file path" in _one_error(capsys, items, tmp_path)


@contextlib.contextmanager
def _read_only(folder):
    """A folder nobody (root included) can create files in: ``chattr +i`` as root, else mode 0555."""
    folder.mkdir()
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
            pytest.skip("running as root and chattr +i is not available: no read-only folder possible")
        try:
            yield folder
        finally:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
    else:
        folder.chmod(0o555)
        try:
            yield folder
        finally:
            folder.chmod(0o755)


def test_read_only_output_folder(tmp_path, capsys):
    items = _items(tmp_path, {"text": "a"})
    with _read_only(tmp_path / "ro") as ro:
        msg = _one_error(capsys, items, ro / "emb.npy")
    assert msg.startswith(f"--output {ro / 'emb.npy'}: cannot write into {ro}") and "nothing was written" in msg


def test_missing_image_reported_before_the_model_loads(tmp_path, capsys):
    items = _items(tmp_path, {"id": "a", "text": "t"}, {"id": "b", "image": "imgs/nope.png"})
    msg = _one_error(capsys, items, tmp_path / "e.npy")
    assert f"{items}:2: image file not found: {tmp_path / 'imgs' / 'nope.png'}" in msg and "--skip-image-check" in msg


def test_batch_size_zero_and_missing_cuda(tmp_path, capsys):
    items = _items(tmp_path, {"text": "a"})
    with pytest.raises(SystemExit) as exc:
        main(["encode", "--model", NO_MODEL, "--input", str(items), "--output", str(tmp_path / "e.npy"),
              "--batch-size", "0"])
    assert exc.value.code == 2 and "argument --batch-size: must be a positive integer, got 0" in capsys.readouterr().err
    if not torch.cuda.is_available():
        msg = _one_error(capsys, items, tmp_path / "e.npy", "--device", "cuda")
        assert msg.startswith("--device cuda: CUDA is not available on this machine")


def test_disk_full_at_the_end_loses_nothing(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    items = _items(tmp_path, {"text": "a"})
    out = tmp_path / "emb.npy"
    np.save(out, np.zeros((1, 2), np.float32))

    def full(fh, arr):
        fh.write(b"\x93NUMPY partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr("umarvel.commands.encode.np.save", full)
    rc, lines, err = _encode(capsys, items, out, model=tiny_checkpoint)
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "No space left on device" in lines[0] and "nothing was lost" in lines[0] and str(out) in lines[0]
    assert np.load(out).shape == (1, 2)  # the previous file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb.npy", "items.jsonl"]


def test_debug_shows_the_traceback(tmp_path, capsys):
    items = _items(tmp_path, {"image": 5})
    assert main(["encode", "--model", NO_MODEL, "--input", str(items), "--output", str(tmp_path / "e.npy"),
                 "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "umarvel: error: " in err


def test_train_config_values_are_one_line(capsys, tmp_path):
    cfg = REPO / "configs" / "stages" / "01_nli.yaml"
    for override, expected in [("train.learning_rate=-1", "learning_rate must be a positive number, got -1.0"),
                               ("train.per_device_batch_size=0", "per_device_batch_size must be >= 1, got 0"),
                               ("train.warmup_ratio=2", "warmup_ratio must be in [0, 1]")]:
        assert main(["train", str(cfg), override, f"train.output_dir={tmp_path}"]) == 2
        err = capsys.readouterr().err
        assert f"umarvel: error: {cfg}: train: {expected}" in err and "Traceback" not in err


def test_eval_batch_size_zero(capsys, tmp_path):
    assert main(["eval", "mbeir", "--model", NO_MODEL, "--mbeir-root", str(tmp_path), "--output",
                 str(tmp_path / "o"), "--batch-size", "0"]) == 2
    assert "MBeirEvalConfig.batch_size must be a positive integer, got 0" in capsys.readouterr().err


def test_data_loader_worker_errors_keep_only_the_original_message():
    wrapped = ImageLoadError(
        "Caught ImageLoadError in DataLoader worker process 1.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 3, in f\n    raise ImageLoadError(msg)\n'
        "umarvel.errors.ImageLoadError: training row a.json: record '7' candidate image:/d/x.jpg: image file "
        "not found: /d/x.jpg\n")
    assert error_line(wrapped) == ("training row a.json: record '7' candidate image:/d/x.jpg: image file not "
                                   "found: /d/x.jpg (in a data loader worker)")
    assert error_line(PermissionError(errno.EACCES, "Permission denied", "/data/q.jsonl")) == (
        "/data/q.jsonl: Permission denied; nothing was lost (completed outputs are kept; "
        "rerun to continue)")
