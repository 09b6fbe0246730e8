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
stage-3 embedding within any budget tried (the run measures it before it teaches, ``DemoResult.reranker_check``:
P(yes) alone orders the stage-3 val top 10 at Recall@5 51-56 against the embedding's 84-85), so the teacher lists
and U-MARVEL+ have little to add. Tried on this benchmark, up to 750 optimiser steps (three times the default
budget): random initialisations (std 0.02 and 0.3), the stage-3 weights with a scaled answer head, Yes/No-only
loss, LoRA r16 and r64, learning rates 1e-3 to 3e-2, four layers: its pairwise accuracy (positive above the mined
negative) stayed at 0.5-0.6; on the text-only WebQA pairs alone it starts to learn after about 150 steps, on the
seven tasks mixed not within 750. Longer runs from the stage-3 weights (Yes/No rows of the tied head scaled 16x so
the answer can be expressed; every language-model weight trained, or LoRA r64; learning rates 5e-4 to 3e-3;
negatives from the whole mined list or only its first 5; 1,000-1,500 steps, 185-280 s of CPU, about the whole
default run again) brought P(yes) alone to val top-10 Recall@5 48-60 against the embedding's 67.9 on the same
lists; fused with the cosine (weights 0.1-1) it moved that by -1 to +3.9 points, differently at every checkpoint.
The reranker starts to learn (its held-out pairwise accuracy against the nearest mined negative rises from 0.46 to
0.58-0.66, above the embedding's own 0.52 on those pairs) but not enough to teach within the budget.

Also tried (seed 0, default benchmark, one torch thread; the same held-out pairs and val top-10 lists):

- A stand-in for the pretrained Qwen2-VL-Instruct the published reranker starts from: the random tiny model first
  taught to caption the 350 demo pictures (300 steps of next-token loss on the caption, 6.9 -> 0.9; about 300 s,
  most of it the 151,936-word softmax), then trained as the reranker (800 steps, learning rates 3e-4 and 1e-3,
  Yes/No rows scaled 8x after captioning; a 4-layer model for 200 steps). Pairwise accuracy stayed at 0.5-0.58,
  P(yes) alone at val top-10 Recall@5 52-61 against the embedding's 83.9.
- Easy negatives (the positive of another query of the same task, instead of the mined lists): the training loss
  stays at or above ln 2 for 800 steps, from both initialisation scales (0.3, and 0.02 with the Yes/No rows scaled
  20x), and with a 4x wider model (hidden 256, 8 heads, 500 steps, easy or mined negatives: pairwise accuracy
  0.42-0.65, P(yes) alone 50-54). Yet 16 fixed queries are memorised within 150 steps (loss 0): the training code
  works, the tiny causal model just does not find a comparison of query and candidate that generalises, even between
  unrelated objects.
- Stage 4 from a shorter stage 3 (300 steps, the quick preset's, then 400 stage-4 steps at 5e-4 or 1e-3): local /
  global 83.6 / 61.1-62.5 against stage 3's 83.6 / 61.4, where 300 more stage-3 steps reach 84.3 / 69.3. The quick
  preset's stage-4 gain (60 steps) does not hold over seeds either: +1.0 / +3.6 (seed 0), +2.9 / -0.4 (seed 1),
  +0.4 / -1.1 (seed 2).
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
