"""Reranker training: its config dataclasses and :class:`RerankTask`, trained by the one trainer.

Published recipe (method spec section 4; ``configs/rerank/reranker.yaml``): init from raw
Qwen2-VL-7B-Instruct, LoRA r128/alpha256 (dropout 0.05) on all LLM linears, lr 2e-5, 2 queries per
device (= 4 sequences), grad-accum 4, 1 epoch over ``mbeir_union_up_train.jsonl``, cosine schedule with
3% warmup, bf16, max length 2048. Loss: HF causal-LM loss (mean CE over the supervised tokens of each
micro-batch, divided by the accumulation steps, as the HF Trainer of the official run did).

The loop, optimiser, scheduler, checkpoints, resume, NaN guard and logging are those of
:class:`umarvel.train.trainer.Trainer` (the embedding stages train through it too); it runs single-process or
under ``torchrun`` (LoRA gradients all-reduced once per optimizer step; ZeRO-1 optimizer sharding is not
replicated: the LoRA optimizer state is small).

Output folder (the trainer's layout): ``checkpoints/step-N`` + ``latest`` (resumable), then ``adapter/``
(final LoRA + tokenizer), with ``save_merged`` ``merged/`` (LoRA merged in the training dtype, D13),
``train_history.json`` (loss per optimizer step), ``resolved_config.yaml`` and ``tb/``; ``run_identity.json``
and the lock of :mod:`umarvel.utils.runs` (a folder holding another reranker run is refused unless
``--overwrite``).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal, Sequence

import torch

from umarvel import dist
from umarvel.data.images import MAX_PIXELS, MIN_PIXELS
from umarvel.data.packing import num_sequences, pack_padded, to_device
from umarvel.data.registry import MBEIR_INSTRUCTIONS, MBEIR_UNION_POOLS, MBEIR_UNION_TRAIN_QUERIES
from umarvel.errors import ConfigError
from umarvel.model.loading import save_checkpoint
from umarvel.rerank.data import RerankBatchCollator, RerankTrainDataset, build_train_dataset
from umarvel.rerank.model import attach_reranker_lora, load_reranker
from umarvel.train.trainer import LoopConfig, Trainer, TrainerCallback
from umarvel.utils.checks import check_device
from umarvel.utils.runs import RunClaim, RunIdentity, claim_on_rank0

logger = logging.getLogger(__name__)


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
    complete checkpoint in ``output_dir``), ``"never"``, or a checkpoint folder. ``save_steps``: 0 keeps
    only the final checkpoint. ``lr_scheduler``: a ``transformers.get_scheduler`` name. ``report_to``:
    ``tensorboard`` / ``wandb`` / ``auto`` (see :class:`umarvel.train.trainer.LoopConfig`). ``fused_optimizer``:
    fused AdamW kernels on CUDA, as the embedding stages (same update rule; ignored on CPU).
    """

    output_dir: str
    learning_rate: float = 2e-5
    per_device_queries: int = 2
    gradient_accumulation_steps: int = 4
    num_train_epochs: int = 1
    max_steps: int = -1
    lr_scheduler: str = "cosine"
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
    report_to: list[str] = field(default_factory=lambda: ["auto"])
    fused_optimizer: bool = True


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


# ------------------------------------------------------------------------------------------ task
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


class RerankTask:
    """Train a reranker LoRA with the HF causal-LM loss (see :class:`umarvel.train.trainer.TrainTask`).

    A micro-batch holds ``per_device_queries`` query rows, each giving a (positive -> Yes, negative -> No)
    pair; ``gradient_accumulation_steps`` micro-batches make one optimizer step.

    Args:
        cfg: the reranker config. device: this rank's device.
        dataset: an already built :class:`RerankTrainDataset` (tests); by default read from ``cfg.data``.
    """

    name = "reranker"

    def __init__(self, cfg: RerankTrainConfig, device: torch.device, dataset: RerankTrainDataset | None = None):
        m, d, t = cfg.model, cfg.data, cfg.train
        self.config, self.device = cfg, device
        torch.manual_seed(t.seed)
        self.loaded = load_reranker(m.init_from, device=device, dtype=m.dtype, positions=m.positions,
                                    min_pixels=d.min_pixels, max_pixels=d.max_pixels,
                                    attn_implementation=m.attn_implementation)
        self.module = attach_reranker_lora(self.loaded.model, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout)
        if m.gradient_checkpointing:
            self.module.hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.module.hf_model.enable_input_require_grads()
        self.module.train()
        if dataset is None:
            dataset = build_train_dataset(d.mbeir_root, d.queries, d.pool, d.instructions, d.mined,
                                          self.loaded.tokenizer, self.loaded.budget, seed=t.seed,
                                          max_text_tokens=d.max_text_tokens)
        self.data_source = dataset
        self.collate_fn = RerankBatchCollator(self.loaded.tokenizer, self.loaded.image_processor, d.max_length,
                                              t.answer_only_loss)
        self.num_workers = d.num_workers
        self.merge_at_end = t.save_merged
        self.autocast = t.bf16 and device.type == "cuda"

    def micro_batches_per_epoch(self, world: int) -> int:
        """Micro-batches of one rank per epoch (ConfigError when the rows cannot fill one global batch)."""
        t = self.config.train
        return len(epoch_batches(len(self.data_source), t.per_device_queries, t.seed, 0, 0, world))

    def batch_sampler(self, epoch: int, start: int, rank: int, world: int) -> list[list[int]]:
        """This rank's micro-batches (query rows) of ``epoch`` from micro-batch ``start`` on."""
        t = self.config.train
        # the pairs of an epoch are drawn from (seed, epoch, row); the DataLoader copies the dataset into its
        # workers when iteration starts, after this
        self.data_source.epoch = epoch
        if start == 0:
            # The reranker's earlier, separate loop let every epoch's DataLoader draw one number from the global
            # RNG; drawing it here keeps its LoRA-dropout stream, hence its runs and the demo's numbers,
            # bit-identical. Exact on resume too: an epoch resumed at start > 0 had drawn before its checkpoint.
            torch.empty((), dtype=torch.int64).random_()
        return epoch_batches(len(self.data_source), t.per_device_queries, t.seed, epoch, rank, world)[start:]

    def param_groups(self, params: list[torch.nn.Parameter], weight_decay: float) -> list[dict]:
        """One group: every LoRA weight."""
        return [{"params": params, "weight_decay": weight_decay}]

    def check_deepspeed(self, zero_stage: int, where: str) -> None:
        """The reranker config has no DeepSpeed setting (the LoRA optimizer state is small)."""
        raise ConfigError(f"{where}: the reranker trains without DeepSpeed")

    def forward_backward(self, batch: dict[str, torch.Tensor], model: torch.nn.Module,
                         backward: Callable[[torch.Tensor], None]) -> tuple[torch.Tensor, dict]:
        """Causal-LM loss of one micro-batch (rows ``[positives | negatives]``), bf16 autocast on CUDA; packed
        into one row without padding (``umarvel.data.packing.pack_padded``) where the reranker supports it."""
        pairs = num_sequences(batch) // 2
        batch = to_device(pack_padded(batch) if self.module.supports_packing else batch, self.device)
        amp = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()
        with amp:
            loss = model(**batch)
        backward(loss)
        return loss.detach(), {"samples": pairs}

    def after_optimizer_step(self) -> dict:
        """Nothing to clamp or log."""
        return {}

    def save_adapter(self, folder: Path, step: int) -> None:
        """The peft adapter and the stock tokenizer."""
        self.module.backbone.save_pretrained(str(folder))
        self.loaded.tokenizer.save_pretrained(str(folder))

    def export_merged(self, folder: Path, adapter: Path, step: int) -> None:
        """The LoRA merged into the backbone in the training dtype (D13), loadable with ``load_reranker``."""
        cfg = self.config
        merged = self.module.backbone.merge_and_unload()
        merged.to(self.loaded.dtype)
        meta = {"format_version": 1, "kind": "reranker", "init_from": cfg.model.init_from,
                "positions": cfg.model.positions, "lora": asdict(cfg.lora)}
        save_checkpoint(folder, merged, self.loaded.tokenizer, self.loaded.image_processor, meta)
        self.module.backbone = merged
        logger.info("reranker saved to %s", folder.parent)


def loop_config(cfg: RerankTrainConfig) -> LoopConfig:
    """The trainer's loop settings of a reranker config."""
    t = cfg.train
    return LoopConfig(output_dir=t.output_dir, learning_rate=t.learning_rate, num_epochs=t.num_train_epochs,
                      max_steps=t.max_steps if t.max_steps > 0 else None,
                      gradient_accumulation_steps=t.gradient_accumulation_steps, lr_scheduler=t.lr_scheduler,
                      warmup_ratio=t.warmup_ratio, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
                      seed=t.seed, save_steps=t.save_steps, save_total_limit=t.save_total_limit,
                      logging_steps=t.logging_steps, resume=t.resume, report_to=tuple(t.report_to),
                      micro_batch_size=t.per_device_queries * 2, dtype=cfg.model.dtype,
                      fused_optimizer=t.fused_optimizer)


#: What a reranker run writes into its folder (removed by ``overwrite``).
RERANK_OUTPUTS = ("checkpoints", "adapter", "merged", "tb", "train_history.json")
#: Keys that do not change the trained weights or only extend the run; the input paths are compared by content.
RERANK_IGNORE = ("train.output_dir", "train.resume", "train.max_steps", "train.num_train_epochs", "train.device",
                 "train.report_to", "train.logging_steps", "train.save_steps", "train.save_total_limit",
                 "train.save_merged", "model.attn_implementation", "model.gradient_checkpointing", "data.num_workers",
                 "model.init_from", "data.mbeir_root", "data.mined", "data.queries", "data.pool", "data.instructions")


def rerank_identity(cfg: RerankTrainConfig) -> RunIdentity:
    """The identity of a reranker run: its config (minus :data:`RERANK_IGNORE`) and the content of its inputs."""
    d = cfg.data
    root = Path(d.mbeir_root)
    files = {f"data.{k}": root / getattr(d, k) for k in ("mined", "queries", "pool", "instructions")}
    return RunIdentity.build("rerank-train", cfg, ignore=RERANK_IGNORE,
                             inputs={"model.init_from": cfg.model.init_from, **files})


def start_rerank_run(cfg: RerankTrainConfig, *, overwrite: bool = False) -> RunClaim | contextlib.nullcontext:
    """Before the reranker loads: the device exists, and rank 0 claims ``train.output_dir`` (lock + run
    identity, as :func:`umarvel.train.preflight.start_stage_run`): a folder holding another reranker run is
    refused unless ``overwrite`` (start over) or an explicit ``train.resume=<checkpoint>``."""
    check_device(cfg.train.device, "train.device")
    explicit = cfg.train.resume not in ("auto", "never")
    return claim_on_rank0(cfg.train.output_dir, rerank_identity(cfg), overwrite=overwrite, accept_changes=explicit,
                          outputs=RERANK_OUTPUTS, what="train.output_dir",
                          override_hint="rerun with --overwrite to discard it and start over, or with "
                                        "train.resume=<its checkpoint> to continue from its weights")


def train_reranker(cfg: RerankTrainConfig, dataset: RerankTrainDataset | None = None,
                   callbacks: Sequence[TrainerCallback] = (), *, overwrite: bool = False) -> Path:
    """Train a reranker LoRA as configured (``umarvel rerank train``); returns the output folder.

    ``dataset``: an already built :class:`umarvel.rerank.data.RerankTrainDataset` (tests); by default it
    is read from ``cfg.data``. The output folder is claimed first (:func:`start_rerank_run`) and released
    when the run ends.
    """
    with start_rerank_run(cfg, overwrite=overwrite):
        device = dist.device_for_rank(cfg.train.device)
        with dist.process_group(device):
            device = torch.device(device)
            Trainer(RerankTask(cfg, device, dataset), loop_config(cfg), device, callbacks).train()
    return Path(cfg.train.output_dir)
