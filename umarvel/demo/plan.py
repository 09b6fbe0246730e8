"""The demo presets: data sizes, the tiny model and the step counts of every stage.

The numbers were chosen by measurement on the shared 2-core reference machine (one torch thread, see ``umarvel
demo --threads``): ``quick`` takes about 200 s of CPU (user + sys) and ``default`` about 296 s; the wall clock is
about the same on an idle machine (both presets use the same generated benchmark; ``default`` trains longer).
Every stage runs its real YAML (``configs/stages/0N_*.yaml``) with the overrides listed here: tiny model in
float32, no DeepSpeed, no gradient checkpointing, LoRA r16, learning rates 3e-3 (stages 1-3) / 5e-4 / 3e-5 (stages
4 / 5) instead of the published 7B values, and a few hundred steps. Two further departures from the published
stages 4-5, both measured on this benchmark (seed 0, default preset):

- ``hard_negative_skip_top = 5``: stage 4 takes its K = 3 negatives from the GLOBAL stage-3 list (as
  published; the demo pools hold no copy of a positive), after its first 5 ranks. With the very nearest
  near-duplicates (skip 0) the tiny model lost 2-5 points (local 84.6 -> 80-83); with skip 5 it kept them
  (86.1 / global 68.9).
- ``suffix_stages45 = True``: stages 4-5 keep the compression suffix that stages 1-3, mining and evaluation
  use (D3: the published stages 4-5 drop it). The tiny model does not carry what it learns without the suffix
  over to the suffixed evaluation: stage 4 without it scored 81.8 / 66.1 instead of 85.7 / 68.6.

``stage2.steps = 400`` (both presets): on this benchmark the image-caption stage first pulls the text embeddings
towards the images, before it has learned image retrieval: at 200 steps the text tasks had fallen (quick, seed 0,
local: WebQA 85 -> 52, EDIS 82 -> 17) and the average with them (33.6 -> 33.2 local, 11.8 -> 5.4 global); at 400
steps both recover and the image tasks rise (59.3 local, 23.2 global). A lower learning rate (1e-3) only slows
this (26.8 and 21.8 local after 200 and 100 steps).

What the run shows (measured over seeds 0, 1, 2, see the README): the average Recall@5 rises from the random model
through stages 1, 2 and 3 (default, local about 19 -> 32 -> 62 -> 84, global 3 -> 11 -> 27 -> 68; chance 11 / 2).
Stages 4, 5 and U-MARVEL+ run the real code but do not add at this scale: per seed they move the average by -2.9
to +0.8 points, about the seed-to-seed spread of stage 3 itself (3.6 local, 5.0 global). Stage 5 and U-MARVEL+
rely on the reranker, and a point-wise cross-encoder of the demo's size does not become a better ranker than the
stage-3 embedding within the budget (the run measures it before it teaches, ``DemoResult.reranker_check``).
``docs/demo_experiments.md`` records every reranker and stage-4 experiment made to change that.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from umarvel.demo.benchmark import BenchmarkSpec


@dataclass(frozen=True)
class StagePlan:
    """One embedding stage: optimiser steps, queries per step, learning rate, LoRA rank (alpha = 2 * r)."""

    steps: int
    batch_size: int
    learning_rate: float
    lora_r: int = 16

    def overrides(self) -> list[str]:
        """Dotted overrides of the stage YAML."""
        return [f"train.max_steps={self.steps}", f"train.per_device_batch_size={self.batch_size}",
                f"train.learning_rate={self.learning_rate}", f"lora.r={self.lora_r}",
                f"lora.alpha={2 * self.lora_r}"]


@dataclass(frozen=True)
class RerankPlan:
    """The point-wise reranker: steps, queries per step (each gives a Yes and a No pair), learning rate, rank."""

    steps: int
    queries_per_step: int
    learning_rate: float
    lora_r: int = 16


@dataclass(frozen=True)
class DemoPlan:
    """Everything a demo run does.

    Attributes:
        name: preset name. benchmark: the generated data. model: ``umarvel.model.tiny`` config keywords.
        stage1 .. stage5: the embedding stages. rerank: the reranker (trained on the stage-3 local mined lists).
        mine_top_k: candidates kept per train query when mining. subset_fraction: the distillation subset.
        hard_negatives: stage-4 negatives per query. hard_negative_scope: the stage-3 mined list they come from
            (``global``, as published; the demo pools hold no copy of a positive). hard_negative_skip_top: ranks
            of that list skipped (official 0).
        suffix_stages45: keep the compression suffix in stages 4-5 (D3, official: off there).
        teacher_top_k: candidates per stage-5 teacher list. teacher_weight: ``w`` of every task in the teacher
            score ``cos + w * P(yes)`` (published 1.0; MSCOCO 0.5 / 0.1).
        plus_top_k: candidates reranked per val / test query by U-MARVEL+ (and by the reranker check).
        seed: seed of the tiny model and the training runs.
    """

    name: str
    benchmark: BenchmarkSpec
    stage1: StagePlan
    stage2: StagePlan
    stage3: StagePlan
    stage4: StagePlan
    stage5: StagePlan
    rerank: RerankPlan
    model: dict = field(default_factory=lambda: {"hidden": 64, "layers": 2})
    mine_top_k: int = 20
    subset_fraction: float = 0.25
    hard_negatives: int = 3
    hard_negative_scope: str = "global"
    hard_negative_skip_top: int = 5
    suffix_stages45: bool = True
    teacher_top_k: int = 8
    teacher_weight: float | None = None
    plus_top_k: int = 10
    seed: int = 0


QUICK = DemoPlan(
    name="quick",
    benchmark=BenchmarkSpec(),
    stage1=StagePlan(steps=60, batch_size=32, learning_rate=3e-3),
    stage2=StagePlan(steps=400, batch_size=32, learning_rate=3e-3),
    stage3=StagePlan(steps=300, batch_size=32, learning_rate=3e-3),
    stage4=StagePlan(steps=60, batch_size=16, learning_rate=5e-4),
    stage5=StagePlan(steps=20, batch_size=8, learning_rate=3e-5),
    rerank=RerankPlan(steps=20, queries_per_step=16, learning_rate=3e-3),
    plus_top_k=8,
)

DEFAULT = DemoPlan(
    name="default",
    benchmark=BenchmarkSpec(),
    stage1=StagePlan(steps=60, batch_size=32, learning_rate=3e-3),
    stage2=StagePlan(steps=400, batch_size=32, learning_rate=3e-3),
    stage3=StagePlan(steps=600, batch_size=32, learning_rate=3e-3),
    stage4=StagePlan(steps=200, batch_size=16, learning_rate=5e-4),
    stage5=StagePlan(steps=40, batch_size=8, learning_rate=3e-5),
    rerank=RerankPlan(steps=60, queries_per_step=16, learning_rate=3e-3),
)

PLANS: dict[str, DemoPlan] = {"quick": QUICK, "default": DEFAULT}

__all__ = ["StagePlan", "RerankPlan", "DemoPlan", "QUICK", "DEFAULT", "PLANS"]


# ------------------------------------------------------------------------------------------ run state
@dataclass
class StageResult:
    """One evaluated model: ``local`` / ``global`` are the evaluations' ``results.json`` objects."""

    key: str
    label: str
    checkpoint: str
    local: dict | None = None
    global_: dict | None = None

    def protocol(self, name: str) -> dict | None:
        """The results of ``"local"`` or ``"global"``."""
        return self.local if name == "local" else self.global_

    def to_json(self) -> dict:
        return {"key": self.key, "label": self.label, "checkpoint": self.checkpoint, "local": self.local,
                "global": self.global_}


@dataclass
class DemoResult:
    """What a demo run produced (the content of ``results.json``)."""

    mode: str
    plan: dict
    output: Path
    stages: list[StageResult] = field(default_factory=list)
    chance: dict[str, dict[str, float]] = field(default_factory=dict)
    reranker_check: dict | None = None
    plus: dict | None = None
    training: dict[str, dict] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    total_seconds: float = 0.0

    def to_json(self) -> dict:
        return {"mode": self.mode, "plan": self.plan, "output": str(self.output),
                "chance": self.chance, "stages": [s.to_json() for s in self.stages],
                "reranker_check": self.reranker_check, "plus": self.plus,
                "training": self.training, "timings": {k: round(v, 2) for k, v in self.timings.items()},
                "total_seconds": round(self.total_seconds, 2), "environment": self.environment}
