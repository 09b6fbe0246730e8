"""Resumable training checkpoints: atomic folders, a ``latest`` pointer, pruning.

One layout for every run of :class:`umarvel.train.trainer.Trainer` (embedding stages and the reranker).
``<output_dir>/checkpoints/step-000123/`` is written through :func:`umarvel.utils.io.atomic_dir` (a hidden
temp folder renamed when complete, so a crash never leaves a half-written checkpoint under a real name);
``latest`` is rewritten atomically after the rename, so it always names a complete checkpoint:

    adapter/              the task's LoRA adapter + tokenizer (embedding stages add umarvel.json: base_model,
                          temperature, train dtype; loadable with ``UMarvel.from_pretrained`` and
                          ``umarvel merge-lora``; the reranker's loads with ``load_reranker``)
    trainable.pt          every trainable tensor by name (LoRA weights, temperature)   [non-DeepSpeed]
    optimizer.pt          optimizer + scheduler state                                   [non-DeepSpeed]
    deepspeed/            ``engine.save_checkpoint`` (frozen weights excluded)           [DeepSpeed]
    trainer_state.json    global step, epoch, step in epoch, last loss, world size
    rng_rank{r}.pt        python / numpy / torch / cuda RNG of every rank
    resolved_config.yaml  the run's config
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from umarvel.errors import CheckpointError
from umarvel.utils.io import atomic_write_text

logger = logging.getLogger(__name__)

LATEST = "latest"


def checkpoints_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def point_latest(output_dir: str | os.PathLike, final: Path, keep: int) -> None:
    """Point ``latest`` at the complete checkpoint ``final`` and prune to the newest ``keep`` (rank 0)."""
    root = checkpoints_dir(output_dir)
    atomic_write_text(root / LATEST, final.name + "\n")
    existing = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in existing[:-keep] if keep > 0 else []:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint named by ``latest`` (None when there is none)."""
    root = checkpoints_dir(output_dir)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / "trainer_state.json").is_file():
        raise CheckpointError(f"{pointer} names {path}, which is not a complete checkpoint")
    return path


def resolve_resume(resume: str, output_dir: str | os.PathLike) -> Path | None:
    """``auto`` -> latest checkpoint or None; ``never`` -> None; anything else is a checkpoint path."""
    if resume == "never":
        return None
    if resume == "auto":
        return latest_checkpoint(output_dir)
    path = Path(resume)
    if (path / LATEST).is_file() or (path / "checkpoints" / LATEST).is_file():
        return latest_checkpoint(path if (path / "checkpoints").is_dir() else path.parent)
    if not (path / "trainer_state.json").is_file():
        raise CheckpointError(f"train.resume={resume}: not a training checkpoint (no trainer_state.json)")
    return path


def rng_state() -> dict:
    """Python, numpy, torch (and CUDA) RNG states, in types ``torch.load(weights_only=True)`` accepts
    (numpy's key array as an int64 tensor, its other fields as plain numbers)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                       "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]  # always the dict of rng_state (torch.load(weights_only=True) refuses anything else)
    np.random.set_state((n["name"], np.asarray(n["keys"], dtype=np.int64).astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rng(folder: Path, rank: int) -> None:
    torch.save(rng_state(), folder / f"rng_rank{rank}.pt")


def load_rng(folder: Path, rank: int) -> None:
    """Restore this rank's RNG states (``weights_only=True``: a checkpoint file cannot run code)."""
    f = folder / f"rng_rank{rank}.pt"
    if not f.is_file():
        logger.warning("%s missing (world size changed?); RNG not restored on rank %d", f, rank)
        return
    try:
        state = torch.load(f, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{f}: not loadable as plain tensors ({str(exc).splitlines()[0]}); written by an "
                              "older umarvel? delete it to resume without restoring the RNG") from None
    set_rng_state(state)


def write_state(folder: Path, state: dict) -> None:
    (folder / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")


def read_state(folder: Path) -> dict:
    try:
        return json.loads((folder / "trainer_state.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{folder}: unreadable trainer_state.json ({exc})") from None


def save_trainable(folder: Path, named_params: list[tuple[str, torch.nn.Parameter]]) -> None:
    torch.save({n: p.detach().cpu().clone() for n, p in named_params}, folder / "trainable.pt")


def load_trainable(folder: Path, named_params: list[tuple[str, torch.nn.Parameter]]) -> None:
    """Copy saved tensors into the trainable parameters; names must match exactly."""
    saved = torch.load(folder / "trainable.pt", map_location="cpu", weights_only=True)
    names = {n for n, _ in named_params}
    if set(saved) != names:
        missing, extra = sorted(names - set(saved))[:3], sorted(set(saved) - names)[:3]
        raise CheckpointError(f"{folder}/trainable.pt does not match the model (missing {missing}, extra {extra}); "
                              "was it written with another LoRA config?")
    wrong = [f"{n} {tuple(saved[n].shape)} vs {tuple(p.shape)}" for n, p in named_params if saved[n].shape != p.shape]
    if wrong:
        raise CheckpointError(f"{folder}/trainable.pt has other tensor shapes than the model ({'; '.join(wrong[:2])}"
                              f"{'; ...' if len(wrong) > 2 else ''}): written with another LoRA rank (lora.r)?")
    with torch.no_grad():
        for n, p in named_params:
            p.copy_(saved[n].to(p.device, p.dtype))
