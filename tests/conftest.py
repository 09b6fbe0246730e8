"""Shared test fixtures: the sibling ``shared/`` folder (golden fixtures) and tiny checkpoints."""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

os.environ.setdefault("UMARVEL_NO_PROGRESS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def shared_dir() -> Path:
    """``shared/`` beside the repository (overridable with UMARVEL_SHARED)."""
    env = os.environ.get("UMARVEL_SHARED")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared"


GOLDEN_TINY = shared_dir() / "golden" / "umarvel_tiny"
GOLDEN_TRAIN = shared_dir() / "golden" / "umarvel_train_tiny"

requires_golden = pytest.mark.skipif(
    not (GOLDEN_TINY / "checkpoint" / "config.json").is_file(),
    reason=f"golden fixture not found at {GOLDEN_TINY} (a user's clone has no ../shared; set UMARVEL_SHARED)")


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


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_and_wait(worker, args: tuple, nprocs: int, timeout_s: float, label: str) -> None:
    """Start ``nprocs`` spawned processes running ``worker(rank, *args)``; fail the test past ``timeout_s``."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(worker, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"{label} did not finish within {timeout_s}s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
