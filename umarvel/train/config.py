"""Stage configuration: the dataclasses a ``configs/stages/*.yaml`` file maps onto.

``load_stage_config(path, overrides)`` reads a stage YAML through :func:`umarvel.config.load_config` (unknown
keys are errors, dotted ``key=value`` overrides, ``base:`` includes). The resolved config is saved with every
checkpoint (``resolved_config.yaml``).

Sections:
- ``model``: dtype / attention / positions / image budget / gradient checkpointing of the embedder.
- ``lora``: rank, alpha, dropout of the per-stage LoRA (all linear layers of the language model).
- ``temperature``: D2 policy (``init`` a number or ``"carry"``; ``learnable`` from stage 3).
- ``data``: ``kind`` picks the dataset (``umarvel.train.datasets.DATASETS``); stage 4/5 fields
  (``negatives``, ``num_hard_negatives``, ``scores``, ``num_candidates``) are already here.
- ``loss``: ``kind`` picks the objective (``umarvel.train.objectives.OBJECTIVES``).
- ``train``: optimisation, batching, checkpointing, logging, DeepSpeed.

Extending for a new stage: add a dataset to ``DATASETS`` and/or an objective to ``OBJECTIVES`` and, if it needs
new knobs, a field with a default here (old YAML files stay valid).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Literal

from umarvel.config import load_config
from umarvel.data.images import MAX_PIXELS, MIN_PIXELS
from umarvel.model.constants import DEFAULT_TEMPERATURE


@dataclass(frozen=True)
class ModelSection:
    """How the embedder is loaded and run.

    Attributes:
        dtype: training dtype (official: bf16). The LoRA weights stay float32 (peft upcasts them).
        attn_implementation: transformers attention implementation (``sdpa``, ``flash_attention_2``, ``eager``).
        gradient_checkpointing: non-reentrant activation checkpointing of the backbone layers.
        attention: ``bidirectional`` (U-MARVEL, D5) or ``causal`` (ablation).
        positions: ``1d`` (released checkpoint, D6) or ``mrope``.
        min_pixels / max_pixels: image budget (official 4*28*28 .. 300*28*28; stage 5 uses 224*224).
    """

    dtype: Literal["bfloat16", "float32", "float16"] = "bfloat16"
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = True
    attention: Literal["bidirectional", "causal"] = "bidirectional"
    positions: Literal["1d", "mrope"] = "1d"
    min_pixels: int = MIN_PIXELS
    max_pixels: int = MAX_PIXELS

    def __post_init__(self) -> None:
        if self.min_pixels < 1 or self.max_pixels < self.min_pixels:
            raise ValueError(f"need 1 <= min_pixels <= max_pixels, got {self.min_pixels} and {self.max_pixels}")


@dataclass(frozen=True)
class LoraSection:
    """LoRA of one stage (spec 1.6): r/alpha 64/128 for NLI, 128/256 afterwards; dropout 0.05."""

    r: int = 128
    alpha: int = 256
    dropout: float = 0.05

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha <= 0 or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"invalid LoRA settings r={self.r} alpha={self.alpha} dropout={self.dropout}")


@dataclass(frozen=True)
class TemperatureSection:
    """Temperature policy (D2): reset to ``init`` at the stage start (or ``carry`` the checkpoint's value);
    frozen in stages 1-2, learnable (LoRA LR, no weight decay) from stage 3; clamped to ``[min, max]``."""

    init: float | Literal["carry"] = DEFAULT_TEMPERATURE
    learnable: bool = False
    min: float = 1e-3
    max: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.min <= self.max:
            raise ValueError(f"need 0 < min <= max, got min={self.min} max={self.max}")
        if self.init != "carry" and not (math.isfinite(self.init) and self.init > 0.0):
            raise ValueError(f"init must be a positive number or 'carry', got {self.init}")


@dataclass(frozen=True)
class DataSection:
    """Training data of one stage.

    Attributes:
        kind: dataset kind: ``nli`` (SimCSE CSV), ``cc3m`` (image-caption JSON), ``mbeir`` (union train);
            stage 4/5 add ``mbeir_hardneg`` / ``mbeir_distill``.
        path: NLI CSV / CC3M JSON / M-BEIR query JSONL (``mbeir_union_up_train.jsonl``).
        root: base folder of relative image paths (CC3M ``h5v``; the M-BEIR root for ``mbeir``).
        pool: M-BEIR candidate pool JSONL (``cand_pool/global/mbeir_union_train_cand_pool.jsonl``).
        instructions: M-BEIR ``query_instructions.tsv``.
        negatives / num_hard_negatives: stage 4 mined list and K (not used by stages 1-3).
        hard_negative_skip_top: stage 4 option: ignore the first m ranks of the mined list (official 0).
        hard_negative_margin: stage 4 option: drop mined candidates whose cosine is above the query's best
            positive cosine minus this margin (likely false negatives); None (official) keeps them.
        scores / num_candidates: stage 5 fused teacher list and its K (not used by stages 1-3).
        max_text_tokens: training truncation of texts (480; NLI is never truncated, as official).
        suffix: compression suffix (D3: on in stages 1-3, off in 4-5).
        add_generation_prompt: D4 (False in training).
        mask_instruction: leave the instruction span out of the mean pool (stage 3 on).
        max_examples: use only the first N examples (debugging, tests).
        num_workers: DataLoader worker processes (image loading + tokenisation + collation).
        group_by_length: put examples of similar length in the same device batch (changes which
            negatives meet; off by default). Within a device batch sequences are always length-sorted.
    """

    kind: str = "mbeir"
    path: str | None = None
    root: str | None = None
    pool: str | None = None
    instructions: str | None = None
    negatives: str | None = None
    num_hard_negatives: int = 0
    hard_negative_skip_top: int = 0
    hard_negative_margin: float | None = None
    scores: str | None = None
    num_candidates: int = 0
    max_text_tokens: int | None = 480
    suffix: bool = True
    add_generation_prompt: bool = False
    mask_instruction: bool = True
    max_examples: int | None = None
    num_workers: int = 2
    group_by_length: bool = False

    def __post_init__(self) -> None:
        for key in ("num_hard_negatives", "hard_negative_skip_top", "num_candidates", "num_workers"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        for key in ("max_text_tokens", "max_examples"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1 or null, got {getattr(self, key)}")


@dataclass(frozen=True)
class LossSection:
    """Objective of one stage.

    Attributes:
        kind: ``info_nce`` (stages 1-3, and 4 with hard negatives); stage 5 adds ``distill_kl``.
        bidirectional: add the candidate->query term (stage 2 CC3M: the sum of both directions).
        mask_duplicates: D12 in-batch false-negative masking; False reproduces the official behaviour.
        gather: cross-device negatives through ``umarvel.dist.all_gather_with_grad``.
        distill_official / teacher_scale: stage 5 (D11 form of the KL; official halves the fused score).
    """

    kind: str = "info_nce"
    bidirectional: bool = False
    mask_duplicates: bool = True
    gather: bool = True
    distill_official: bool = False
    teacher_scale: float = 0.5


@dataclass(frozen=True)
class TrainSection:
    """Optimisation, batching, checkpoints and logging.

    Attributes:
        output_dir: run folder: ``checkpoints/step-N`` (resumable), ``adapter`` and ``merged`` at the end, ``tb``.
        per_device_batch_size: contrastive pairs (queries) per device and step.
        chunk_size / chunk_tokens: at most this many sequences / tokens per forward chunk. With ``packing`` a
            chunk is one packed row without padding (first-fit decreasing under ``chunk_tokens`` real tokens);
            without, sequences are length-sorted and chunks padded to their longest (``chunk_tokens`` padded).
        packing: padding-free packed chunks (needs ``model.positions: 1d``; the padded path otherwise).
        activation_checkpointing: ``full`` (every decoder layer recomputed in the backward pass), ``selective``
            (every ``checkpoint_every_k``-th layer: less recomputation, more memory) or ``none``;
            ``model.gradient_checkpointing: false`` means ``none``.
        checkpoint_every_k: k of ``selective``.
        fused_optimizer: fused AdamW kernels on CUDA (one kernel for all parameters; same update rule).
        lora_compute: ``float32`` (peft's default: the adapter matmuls upcast their input to the fp32 adapter
            weights) or ``model`` (adapter matmuls in the model dtype under autocast, fp32 master weights; the
            official bf16 DeepSpeed runs kept the adapters in bf16).
        grad_cache: two-pass GradCache step (memory of one chunk, same gradients).
        max_steps: stop after this many optimiser steps (overrides ``num_epochs`` for the schedule).
        lr_scheduler: a ``transformers.get_scheduler`` name (``cosine``, ``linear``, ``constant_with_warmup``, ...),
            with ``ceil(warmup_ratio * total steps)`` warmup steps.
        resume: ``auto`` (the run folder's latest checkpoint if any), ``never``, or a checkpoint path.
        deepspeed: a DeepSpeed JSON config (``configs/deepspeed/zero{1,2,3}.json``) or None (plain DDP-style
            gradient all-reduce).
        report_to: ``tensorboard`` and/or ``wandb`` (``auto``: tensorboard, plus wandb when installed and
            configured through ``WANDB_API_KEY`` / ``WANDB_MODE``).
        merge_at_end: write ``output_dir/merged`` (LoRA merged in the training dtype, D13): the next stage's
            ``init_from`` (D1).
        device: ``auto`` (cuda:LOCAL_RANK when available, else cpu), ``cpu`` or ``cuda``.
    """

    output_dir: str = "outputs/run"
    per_device_batch_size: int = 60
    learning_rate: float = 1e-4
    num_epochs: float = 1.0
    max_steps: int | None = None
    warmup_ratio: float = 0.03
    lr_scheduler: str = "cosine"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    chunk_size: int = 32
    chunk_tokens: int | None = 32768
    packing: bool = True
    activation_checkpointing: Literal["full", "selective", "none"] = "full"
    checkpoint_every_k: int = 2
    fused_optimizer: bool = True
    lora_compute: Literal["float32", "model"] = "float32"
    grad_cache: bool = False
    seed: int = 42
    save_steps: int = 500
    save_total_limit: int = 2
    logging_steps: int = 1
    resume: str = "auto"
    deepspeed: str | None = None
    report_to: list[str] = field(default_factory=lambda: ["auto"])
    merge_at_end: bool = True
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.per_device_batch_size < 1:
            raise ValueError(f"per_device_batch_size must be >= 1, got {self.per_device_batch_size}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or null, got {self.max_steps}")
        if self.checkpoint_every_k < 1:
            raise ValueError(f"checkpoint_every_k must be >= 1, got {self.checkpoint_every_k}")
        if self.save_steps < 1 or self.logging_steps < 1:
            raise ValueError("save_steps and logging_steps must be >= 1")
        _check_train_numbers(self)


def _check_train_numbers(t: "TrainSection") -> None:
    """Optimiser numbers: a clear ValueError (the config reports it with the key) instead of a later crash."""
    positive = {"learning_rate": t.learning_rate, "num_epochs": t.num_epochs, "adam_epsilon": t.adam_epsilon,
                "max_grad_norm": t.max_grad_norm}
    for key, value in positive.items():
        if not (math.isfinite(value) and value > 0.0):
            raise ValueError(f"{key} must be a positive number, got {value}")
    if not 0.0 <= t.warmup_ratio <= 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1], got {t.warmup_ratio}")
    if not (math.isfinite(t.weight_decay) and t.weight_decay >= 0.0):
        raise ValueError(f"weight_decay must be >= 0, got {t.weight_decay}")
    for key in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(t, key) < 1.0:
            raise ValueError(f"{key} must be in [0, 1), got {getattr(t, key)}")
    if t.save_total_limit < 0:
        raise ValueError(f"save_total_limit must be >= 0, got {t.save_total_limit}")
    if t.chunk_tokens is not None and t.chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1 or null, got {t.chunk_tokens}")


@dataclass(frozen=True)
class StageConfig:
    """One training stage (``configs/stages/0N_*.yaml``).

    Attributes:
        stage: a name (``01_nli``); written into checkpoint metadata.
        init_from: checkpoint folder to start from (D1: the previous stage's ``merged`` output).
    """

    stage: str
    init_from: str
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    temperature: TemperatureSection = field(default_factory=TemperatureSection)
    data: DataSection = field(default_factory=DataSection)
    loss: LossSection = field(default_factory=LossSection)
    train: TrainSection = field(default_factory=TrainSection)


def load_stage_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> StageConfig:
    """Read a stage YAML with dotted overrides (``train.learning_rate=1e-4``) into a :class:`StageConfig`.

    Raises:
        ConfigError: unknown key, wrong type, missing required key (naming the file/override and the key).
    """
    return load_config(path, StageConfig, list(overrides))
