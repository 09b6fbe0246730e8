"""Helpers shared by the test files (import as ``from helpers import ...``; ``pytest.ini`` puts tests/ on the path)."""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import torch

from umarvel.eval.search import make_searcher
from umarvel.train.config import StageConfig, load_stage_config
from umarvel.train.trainer import TrainerCallback
from umarvel.utils.io import iter_jsonl

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    """``shared/`` beside the repository (overridable with UMARVEL_SHARED)."""
    env = os.environ.get("UMARVEL_SHARED")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared"


GOLDEN_TINY = shared_dir() / "golden" / "umarvel_tiny"
GOLDEN_TRAIN = shared_dir() / "golden" / "umarvel_train_tiny"

requires_golden = pytest.mark.skipif(
    not (GOLDEN_TINY / "checkpoint" / "config.json").is_file(),
    reason=f"golden fixture not found at {GOLDEN_TINY} (a user's clone has no ../shared; set UMARVEL_SHARED)")


class Tau(torch.nn.Module):
    """A raw temperature tau as the embedder holds it (a 0-d parameter, trained when ``learnable``); ``tau()``."""

    def __init__(self, init: float = 0.05, learnable: bool = False):
        super().__init__()
        self.temp = torch.nn.Parameter(torch.tensor(float(init)), requires_grad=learnable)

    def forward(self) -> torch.Tensor:
        return self.temp


def search(queries, candidates, k: int, **kwargs):
    """One-shot top-k: ``umarvel.eval.search.make_searcher(candidates, **kwargs).search(queries, k)``."""
    return make_searcher(candidates, **kwargs).search(queries, k)


def read_jsonl(path) -> list[dict]:
    """Every record of a JSONL file (``umarvel.utils.io.iter_jsonl``), as a list."""
    return [rec for _, rec in iter_jsonl(path)]



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


# ---- tiny training stages on generated data (the tests under tests/train and tests/pipelines) ----
STAGE_FILES = {"nli": "01_nli.yaml", "cc3m": "02_cc3m.yaml", "mbeir": "03_mbeir.yaml"}


def make_data(root: Path) -> dict[str, Path]:
    """Toy data of the three stages under ``root`` (created once per root)."""
    from umarvel.train.toy_data import make_toy_all

    if not (root / "nli.csv").is_file():
        make_toy_all(root, n=32)
    return {"nli": root / "nli.csv", "cc3m": root / "cc3m", "mbeir": root / "mbeir"}


def data_overrides(kind: str, data: dict[str, Path]) -> list[str]:
    if kind == "nli":
        return [f"data.path={data['nli']}"]
    if kind == "cc3m":
        return [f"data.path={data['cc3m'] / 'train_anno.json'}", f"data.root={data['cc3m']}"]
    return [f"data.root={data['mbeir']}", "data.path=null", "data.pool=null", "data.instructions=null"]


def tiny_config(kind: str, init_from: Path, data: dict[str, Path], out: Path, *extra: str) -> StageConfig:
    """The stage's real YAML with tiny-model overrides (fp32, no DeepSpeed, small LoRA, no workers)."""
    overrides = [f"init_from={init_from}", f"train.output_dir={out}", "model.dtype=float32",
                 "train.deepspeed=null", "data.num_workers=0", "lora.r=4", "lora.alpha=8",
                 "train.per_device_batch_size=4", "train.max_steps=2", "train.report_to=[tensorboard]",
                 *data_overrides(kind, data), *extra]
    return load_stage_config(REPO / "configs" / "stages" / STAGE_FILES[kind], overrides)


class Killed(Exception):
    """Raised by :class:`StopAfter`: the run was "killed"."""


class StopAfter(TrainerCallback):
    """Kill a training run after step ``n`` (and its checkpoint), like a killed job: raises :class:`Killed`."""

    def __init__(self, n: int):
        self.n = n

    def on_step(self, step: int, total: int, loss: float) -> None:
        if step == self.n:
            raise Killed
