"""Shared test fixtures: the sibling ``shared/`` folder (golden fixtures) and tiny checkpoints."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

os.environ.setdefault("UMARVEL_NO_PROGRESS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny random Qwen2-VL checkpoint folder in the released layout (seed 0)."""
    from umarvel.model.tiny import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    """``UMarvel`` loaded from :func:`tiny_checkpoint` (fp32, CPU). Do not mutate it in tests."""
    from umarvel import UMarvel

    return UMarvel.from_pretrained(tiny_checkpoint, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def sample_images(tmp_path_factory) -> dict[str, Path]:
    """A few generated images of different sizes (PNG/JPEG, one RGBA)."""
    from PIL import Image, ImageDraw

    root = tmp_path_factory.mktemp("images")
    out = {}
    for name, size, color in [("red", (64, 48), (220, 30, 30)), ("blue", (120, 90), (30, 30, 220)),
                              ("green_tall", (40, 160), (30, 200, 30)), ("big", (900, 700), (200, 200, 30))]:
        im = Image.new("RGB", size, (245, 245, 245))
        d = ImageDraw.Draw(im)
        d.ellipse([size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4], fill=color)
        path = root / f"{name}.{'jpg' if name == 'big' else 'png'}"
        im.save(path)
        out[name] = path
    rgba = Image.new("RGBA", (56, 56), (10, 200, 10, 128))
    rgba.save(root / "alpha.png")
    out["alpha"] = root / "alpha.png"
    return out


def pytest_collection_modifyitems(config, items):
    """Skip tests marked ``gpu`` where no CUDA device is present (markers are declared in pytest.ini)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def fresh_logging():
    """Log handlers bound to this test's captured stderr (setup_logging configures once per process)."""
    lg = logging.getLogger("umarvel")
    saved = lg.handlers[:], getattr(lg, "_umarvel_configured", False)
    lg.handlers.clear()
    lg._umarvel_configured = False
    yield
    lg.handlers[:] = saved[0]
    lg._umarvel_configured = saved[1]
