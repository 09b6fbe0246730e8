"""The demo presets: data sizes, the tiny model and the step counts of every stage.

The numbers were chosen by measurement on the 2-core reference machine (one torch thread, see
``umarvel demo --threads``): ``quick`` runs in about 1:45 and ``default`` in about 2:40 at a load average
below 1 (both presets use the same generated benchmark; ``default`` trains longer). Every stage runs its real
YAML (``configs/stages/0N_*.yaml``) with the overrides listed here: tiny model in float32, no DeepSpeed, no
gradient checkpointing, LoRA r16, learning rates 3e-3 (stages 1-3) / 5e-4 / 1e-4 (stages 4 / 5) instead of the
published 7B values, and a few hundred steps.

What the run shows (measured, see the README): the average Recall@5 rises from the random model through
stages 1, 2 and 3 (local about 27 -> 33 -> 51 -> 84-88, global 4 -> 5-10 -> 11 -> 60-65, chance 11 / 2).
Stages 4, 5 and U-MARVEL+ run the real code but add little at this scale: the point-wise reranker starts
from a tiny random model with a larger initialisation scale (a random head at the default scale cannot
express yes/no at all), learns (its loss falls from ~14 to ~8 in the quick run) but only a few dozen steps
fit the budget, so the teacher lists carry little beyond the student's own cosines and U-MARVEL+ moves the
local average by under a point; stage 4's hard negatives (mined in each task's own pool here, where the
same drawing recurs across tasks) cost a few points.
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
        hard_negatives: stage-4 negatives per query. teacher_top_k: candidates per stage-5 teacher list.
        plus_top_k: candidates reranked per test query by U-MARVEL+.
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
    teacher_top_k: int = 8
    plus_top_k: int = 10
    seed: int = 0


QUICK = DemoPlan(
    name="quick",
    benchmark=BenchmarkSpec(),
    stage1=StagePlan(steps=40, batch_size=32, learning_rate=3e-3),
    stage2=StagePlan(steps=120, batch_size=32, learning_rate=3e-3),
    stage3=StagePlan(steps=240, batch_size=32, learning_rate=3e-3),
    stage4=StagePlan(steps=40, batch_size=16, learning_rate=5e-4),
    stage5=StagePlan(steps=20, batch_size=8, learning_rate=1e-4),
    rerank=RerankPlan(steps=20, queries_per_step=16, learning_rate=3e-3),
    plus_top_k=8,
)

DEFAULT = DemoPlan(
    name="default",
    benchmark=BenchmarkSpec(),
    stage1=StagePlan(steps=60, batch_size=32, learning_rate=3e-3),
    stage2=StagePlan(steps=120, batch_size=32, learning_rate=3e-3),
    stage3=StagePlan(steps=300, batch_size=32, learning_rate=3e-3),
    stage4=StagePlan(steps=150, batch_size=16, learning_rate=5e-4),
    stage5=StagePlan(steps=40, batch_size=8, learning_rate=1e-4),
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
    plus: dict | None = None
    training: dict[str, dict] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    total_seconds: float = 0.0

    def to_json(self) -> dict:
        return {"mode": self.mode, "plan": self.plan, "output": str(self.output),
                "chance": self.chance, "stages": [s.to_json() for s in self.stages], "plus": self.plus,
                "training": self.training, "timings": {k: round(v, 2) for k, v in self.timings.items()},
                "total_seconds": round(self.total_seconds, 2), "environment": self.environment}
