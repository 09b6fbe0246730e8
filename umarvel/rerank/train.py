"""Reranker training: config dataclasses and a compact training loop (LoRA, grad-accum, cosine, resume).

Published recipe (method spec section 4; ``configs/rerank/reranker.yaml``): init from raw
Qwen2-VL-7B-Instruct, LoRA r128/alpha256 (dropout 0.05) on all LLM linears, lr 2e-5, 2 queries per
device (= 4 sequences), grad-accum 4, 1 epoch over ``mbeir_union_up_train.jsonl``, cosine schedule with
3% warmup, bf16, max length 2048. Loss: HF causal-LM loss (mean CE over the supervised tokens of each
micro-batch, divided by the accumulation steps, as the HF Trainer of the official run did).

This is an own loop rather than the HF Trainer because the embedding trainer (``umarvel.train``) was
not available when it was written; it runs single-process or under ``torchrun`` (DDP over the LoRA
parameters; ZeRO-1 optimizer sharding is not replicated: the LoRA optimizer state is small).

Output folder: ``checkpoint-<step>/`` (adapter, optimizer, scheduler, ``state.json``; written
atomically, the newest ``save_total_limit`` kept), then ``adapter/`` (final LoRA + tokenizer) and,
with ``save_merged``, ``merged/`` (LoRA merged in the training dtype, D13), plus ``resolved_config.yaml``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch

from umarvel import dist
from umarvel.config import save_resolved
from umarvel.data.images import MAX_PIXELS, MIN_PIXELS
from umarvel.errors import CheckpointError, ConfigError
from umarvel.utils.io import current_umask
from umarvel.data.registry import MBEIR_INSTRUCTIONS, MBEIR_UNION_POOLS, MBEIR_UNION_TRAIN_QUERIES

logger = logging.getLogger(__name__)

_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "state.json"


@dataclass(frozen=True)
class RerankModelConfig:
    """Backbone: ``init_from`` (raw Qwen2-VL-Instruct), weight dtype, attention kernel, position convention."""

    init_from: str
    dtype: str = "bfloat16"
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = True
    positions: Literal["1d", "mrope"] = "1d"


@dataclass(frozen=True)
class RerankDataConfig:
    """M-BEIR files (relative to ``mbeir_root`` unless absolute) and preprocessing budgets."""

    mbeir_root: str
    mined: str
    queries: str = MBEIR_UNION_TRAIN_QUERIES
    pool: str = MBEIR_UNION_POOLS["train"]
    instructions: str = MBEIR_INSTRUCTIONS
    max_text_tokens: int = 256
    max_length: int = 2048
    min_pixels: int = MIN_PIXELS
    max_pixels: int = MAX_PIXELS
    num_workers: int = 4


@dataclass(frozen=True)
class RerankLoraConfig:
    """LoRA on every language-model linear (``task_type=CAUSAL_LM``)."""

    r: int = 128
    alpha: int = 256
    dropout: float = 0.05


@dataclass(frozen=True)
class RerankOptimConfig:
    """Optimisation and checkpointing.

    ``answer_only_loss``: supervise only the Yes/No token (default False = official: the 6 tokens of
    the assistant turn). ``max_steps`` > 0 overrides the epoch count. ``resume``: ``"auto"`` (latest
    complete checkpoint in ``output_dir``), ``"never"``, or a checkpoint folder.
    """

    output_dir: str
    learning_rate: float = 2e-5
    per_device_queries: int = 2
    gradient_accumulation_steps: int = 4
    num_train_epochs: int = 1
    max_steps: int = -1
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    bf16: bool = True
    seed: int = 42
    logging_steps: int = 10
    save_steps: int = 2000
    save_total_limit: int = 2
    resume: str = "auto"
    answer_only_loss: bool = False
    save_merged: bool = True
    device: str = "auto"


@dataclass(frozen=True)
class RerankTrainConfig:
    """``configs/rerank/reranker.yaml``."""

    model: RerankModelConfig
    data: RerankDataConfig
    train: RerankOptimConfig
    lora: RerankLoraConfig = field(default_factory=RerankLoraConfig)

    def __post_init__(self) -> None:
        t = self.train
        if t.per_device_queries < 1 or t.gradient_accumulation_steps < 1:
            raise ValueError("train.per_device_queries and train.gradient_accumulation_steps must be >= 1")
        if not 0 <= t.warmup_ratio < 1:
            raise ValueError(f"train.warmup_ratio must be in [0, 1), got {t.warmup_ratio}")


# ----------------------------------------------------------------------------------- checkpoints
def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_training_checkpoint(out_dir: Path, step: int, reranker, optimizer, scheduler, state: dict,
                             keep: int) -> Path:
    """Write ``checkpoint-<step>`` atomically (temp folder + rename); prune to the newest ``keep``."""
    final = out_dir / f"checkpoint-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".checkpoint-{step}.", dir=out_dir))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700: follow the umask like mkdir
    try:
        reranker.backbone.save_pretrained(str(tmp / "adapter"))
        torch.save(_trainable_state(reranker), tmp / "trainable.pt")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(out_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("saved %s", final)
    return final


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete ``checkpoint-<step>`` folders (with ``state.json``), oldest first."""
    if not out_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out_dir.iterdir()
             if (m := _CKPT_RE.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def resolve_resume(out_dir: Path, resume: str) -> Path | None:
    """The checkpoint to resume from (``auto``: newest in ``out_dir``; ``never``: none; else a path)."""
    if resume == "never":
        return None
    if resume == "auto":
        ckpts = list_checkpoints(out_dir)
        return ckpts[-1] if ckpts else None
    p = Path(resume)
    if not (p / STATE_FILE).is_file():
        raise CheckpointError(f"train.resume={resume}: not a training checkpoint (no {STATE_FILE})")
    return p


def load_training_checkpoint(ckpt: Path, reranker, optimizer, scheduler) -> dict:
    """Restore trainable weights, optimizer and scheduler from ``ckpt``; returns its ``state.json``."""
    weights = torch.load(ckpt / "trainable.pt", map_location="cpu", weights_only=True)
    params = dict(reranker.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise CheckpointError(f"{ckpt}: parameters {missing[:3]} do not exist in the model (different LoRA config?)")
    with torch.no_grad():
        for n, w in weights.items():
            params[n].copy_(w.to(params[n]))
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", map_location="cpu", weights_only=True))
    return json.loads((ckpt / STATE_FILE).read_text())


# ------------------------------------------------------------------------------------------ loop
def _device(cfg: RerankOptimConfig) -> torch.device:
    if cfg.device != "auto":
        return torch.device(cfg.device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def make_scheduler(optimizer, kind: str, total_steps: int, warmup_ratio: float):
    """HF-style schedule: linear warmup over ``ceil(warmup_ratio * total)`` steps, then cosine/linear/constant."""
    from transformers import (get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup,
                              get_linear_schedule_with_warmup)

    warmup = math.ceil(warmup_ratio * total_steps)
    if kind == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)
    if kind == "linear":
        return get_linear_schedule_with_warmup(optimizer, warmup, total_steps)
    return get_constant_schedule_with_warmup(optimizer, warmup)


def epoch_batches(n: int, per_device: int, seed: int, epoch: int, rank: int, world: int) -> list[list[int]]:
    """This rank's micro-batches of query rows for one epoch (seeded shuffle, equal count on every rank;
    the last incomplete global batch is dropped)."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    per_global = per_device * world
    usable = (n // per_global) * per_global
    if usable == 0:
        raise ConfigError(f"{n} training queries are fewer than one global batch ({per_global})")
    mine = perm[:usable][rank::world]
    return [mine[i:i + per_device] for i in range(0, len(mine), per_device)]


def train_reranker(cfg: RerankTrainConfig, dataset=None) -> Path:
    """Train a reranker LoRA as configured; returns the output folder.

    ``dataset``: an already built :class:`umarvel.rerank.data.RerankTrainDataset` (tests); by default it
    is read from ``cfg.data``.
    """
    from umarvel.rerank.data import RerankBatchCollator, build_train_dataset
    from umarvel.rerank.model import attach_reranker_lora, load_reranker

    t = cfg.train
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_dist():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = _device(t)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(t.seed)
    out_dir = Path(t.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        save_resolved(cfg, out_dir / "resolved_config.yaml")

    loaded = load_reranker(cfg.model.init_from, device=device, dtype=cfg.model.dtype,
                           positions=cfg.model.positions, min_pixels=cfg.data.min_pixels,
                           max_pixels=cfg.data.max_pixels, attn_implementation=cfg.model.attn_implementation)
    reranker = attach_reranker_lora(loaded.model, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout)
    if cfg.model.gradient_checkpointing:
        reranker.hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        reranker.hf_model.enable_input_require_grads()
    reranker.train()
    if dataset is None:
        d = cfg.data
        dataset = build_train_dataset(d.mbeir_root, d.queries, d.pool, d.instructions, d.mined, loaded.tokenizer,
                                      loaded.budget, seed=t.seed, max_text_tokens=d.max_text_tokens)
    collate = RerankBatchCollator(loaded.tokenizer, loaded.image_processor, cfg.data.max_length, t.answer_only_loss)

    micro_per_epoch = len(epoch_batches(len(dataset), t.per_device_queries, t.seed, 0, rank, world))
    steps_per_epoch = math.ceil(micro_per_epoch / t.gradient_accumulation_steps)  # a partial window steps too
    total = t.max_steps if t.max_steps > 0 else steps_per_epoch * t.num_train_epochs
    params = [p for p in reranker.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    scheduler = make_scheduler(optimizer, t.lr_scheduler, total, t.warmup_ratio)
    step, epoch, skip = 0, 0, 0
    ckpt = resolve_resume(out_dir, t.resume)
    if ckpt is not None:
        state = load_training_checkpoint(ckpt, reranker, optimizer, scheduler)
        step, epoch, skip = state["step"], state["epoch"], state["micro_in_epoch"]
        logger.info("resumed from %s at step %d (epoch %d, micro-batch %d)", ckpt, step, epoch, skip)
    model = reranker
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(reranker, device_ids=[device.index] if device.type == "cuda"
                                                          else None)
    logger.info("training: %d query rows, %d ranks, %d optimizer steps (%d per epoch)", len(dataset), world, total,
                steps_per_epoch)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if t.bf16 and device.type == "cuda" \
        else contextlib.nullcontext()
    history: list[float] = []
    window, t0 = [], time.time()
    while step < total:
        dataset.epoch = epoch
        batches = epoch_batches(len(dataset), t.per_device_queries, t.seed, epoch, rank, world)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches[skip:], collate_fn=collate,
                                             num_workers=cfg.data.num_workers)
        accum = 0
        for micro, batch in enumerate(loader, start=skip + 1):
            batch = {k: v.to(device) for k, v in batch.items()}
            # an optimizer step after every full accumulation window and at the epoch end (the partial last
            # window keeps the 1/accum loss scale, as the HF Trainer did)
            last = (accum + 1) == t.gradient_accumulation_steps or micro == len(batches)
            sync = model.no_sync() if (world > 1 and not last) else contextlib.nullcontext()
            with sync, amp:
                loss = model(**batch)
            with sync:
                (loss / t.gradient_accumulation_steps).backward()
            window.append(float(loss.detach()))
            accum += 1
            if not last:
                continue
            torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            accum, step = 0, step + 1
            history.append(sum(window) / len(window))
            if step % t.logging_steps == 0 or step == total:
                logger.info("step %d/%d loss %.4f lr %.3g (%.2fs/step)", step, total, history[-1],
                            scheduler.get_last_lr()[0], time.time() - t0)
            window, t0 = [], time.time()
            if t.save_steps > 0 and step % t.save_steps == 0 and step < total:
                if rank == 0:
                    save_training_checkpoint(out_dir, step, reranker, optimizer, scheduler,
                                             {"step": step, "epoch": epoch, "micro_in_epoch": micro,
                                              "loss": history[-1]}, t.save_total_limit)
                dist.barrier()
            if step >= total:
                break
        epoch, skip = epoch + 1, 0
    if rank == 0:
        _save_final(out_dir, cfg, loaded, reranker, history)
    dist.barrier()
    return out_dir


def _save_final(out_dir: Path, cfg: RerankTrainConfig, loaded, reranker, history: list[float]) -> None:
    """Write ``adapter/`` and (``save_merged``) ``merged/`` atomically, plus ``train_history.json``."""
    from umarvel.model.loading import save_checkpoint
    from umarvel.utils.io import atomic_write_json

    tmp = Path(tempfile.mkdtemp(prefix=".adapter.", dir=out_dir))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700: follow the umask like mkdir
    try:
        reranker.backbone.save_pretrained(str(tmp))
        loaded.tokenizer.save_pretrained(str(tmp))
        final = out_dir / "adapter"
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    atomic_write_json(out_dir / "train_history.json", {"loss_per_step": history})
    if cfg.train.save_merged:
        merged = reranker.backbone.merge_and_unload()
        merged.to(loaded.dtype)
        meta = {"format_version": 1, "kind": "reranker", "init_from": cfg.model.init_from,
                "positions": cfg.model.positions, "lora": asdict(cfg.lora)}
        save_checkpoint(out_dir / "merged", merged, loaded.tokenizer, loaded.image_processor, meta)
        reranker.backbone = merged
    logger.info("reranker saved to %s", out_dir)
