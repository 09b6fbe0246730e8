"""umarvel.utils.checks (fail before work) and the package-wide safe-loading rule."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from umarvel.errors import ConfigError, EnvError, FileAccessError, ImageLoadError
from umarvel.utils.checks import check_device, check_output_dir, check_output_file, scan_images

PKG = Path(__file__).resolve().parents[2] / "umarvel"


def test_scan_names_each_kind_of_bad_image_and_counts(tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (8, 8), "red").save(good)
    (tmp_path / "folder.jpg").mkdir()
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "junk.jpg").write_bytes(b"this is not a jpeg at all" * 10)
    refs = [(str(good), "q.jsonl:1 query a"), (str(good), "q.jsonl:9 query again"),
            (str(tmp_path / "missing.png"), "q.jsonl:2 query b"), (str(tmp_path / "folder.jpg"), "pool: candidate c"),
            (str(tmp_path / "empty.jpg"), "pool: candidate d"), (str(tmp_path / "junk.jpg"), "pool: candidate e")]
    assert scan_images(refs[:2]) == 1  # each distinct path once
    with pytest.raises(ImageLoadError) as err:
        scan_images(refs)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("4 of 5 referenced image(s) cannot be used")
    assert f"q.jsonl:2 query b: image file not found: {tmp_path / 'missing.png'}" in msg
    assert f"pool: candidate c: is a folder, not an image file: {tmp_path / 'folder.jpg'}" in msg
    assert "pool: candidate d: empty image file" in msg and "(and 1 more)" in msg
    assert "--skip-image-check" in msg and "nothing was computed" in msg
    # ranks share the scan: each checks every world-th distinct path
    with pytest.raises(ImageLoadError, match="2 of 3"):
        scan_images(refs, shard=(0, 2))
    with pytest.raises(ImageLoadError, match="corrupt header"):
        scan_images(refs[-1:])


def test_output_checks(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FileAccessError, match="afile is a file, not a folder, so nothing can be created under it"):
        check_output_dir(tmp_path / "afile" / "run", "--output")
    with pytest.raises(FileAccessError, match="--output .*afile: is a file, not a folder"):
        check_output_dir(tmp_path / "afile", "--output")
    with pytest.raises(FileAccessError, match="is a folder; give a file path"):
        check_output_file(tmp_path, "--output")
    with pytest.raises(FileAccessError, match="afile is a file, not a folder"):
        check_output_file(tmp_path / "afile" / "emb.npy", "--output")
    assert check_output_file(tmp_path / "new" / "emb.npy") == tmp_path / "new" / "emb.npy"
    assert (tmp_path / "new").is_dir() and list((tmp_path / "new").iterdir()) == []  # the probe is gone


def test_device_checks():
    check_device("cpu")
    check_device(None)
    with pytest.raises(ConfigError, match="--device 'gpu0': not a device"):
        check_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(EnvError, match="--device cuda: CUDA is not available on this machine.*use --device cpu"):
            check_device("cuda")
    else:
        with pytest.raises(EnvError, match="GPU\\(s\\) visible"):
            check_device(f"cuda:{torch.cuda.device_count()}")


def test_every_torch_load_is_weights_only():
    """A checkpoint or cache file must never be able to run code: no ``torch.load`` without weights_only=True."""
    bad = []
    for path in PKG.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for m in re.finditer(r"torch\.load\(", text):
            depth, i = 1, m.end()
            while depth and i < len(text):  # the call's argument list
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
            if not re.search(r"weights_only\s*=\s*True", text[m.end():i]):
                bad.append(f"{path.relative_to(PKG.parent)}:{text.count(chr(10), 0, m.start()) + 1}")
    assert not bad, f"torch.load without weights_only=True: {bad}"
