"""Score fusion of retrieval cosines and reranker P(yes) (method spec sections 2.4 and 4, decision D9).

U-MARVEL+ (eval): ``fused = cosine + w * P(yes)`` over the reranked top-k of each query, then re-sort.
Each candidate carries its OWN cosine: a :class:`ScoredCandidate` binds ``did``, ``cosine`` and
``p_yes`` together, so no list can be paired with another list in the wrong order. (The official
global fusion added ``raw[::-1][i]``, the squared-L2 distance of candidate ``k-1-i``, to the P(yes)
of candidate ``i``: a bug.) ``w`` defaults to 0.1 (the published value, which the official code tuned
on the test set); :func:`choose_weight` tunes it on VALIDATION results only and refuses anything else.

``compat="official"`` on the GLOBAL protocol reproduces the official global fusion instead
(:func:`official_global_fuse_query`, rule ``"official_global"``): candidate ``i`` gets
``d[K-1-i] + w * p_i`` with ``d`` the squared L2 distances ``2 - 2 cos`` of the K retrieved candidates in
retrieval order (what FAISS ``IndexFlatL2`` returned), then a stable descending sort. The local fusion is
already the official one.

Stage-5 teacher (distillation): ``fused = cosine + w_task * P(yes)`` with ``w = 1.0`` for every task
except ``mscoco_task0`` (0.5) and ``mscoco_task3`` (0.1), re-sorted descending (:func:`teacher_fuse`).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from umarvel.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

DEFAULT_FUSION_WEIGHT = 0.1
DEFAULT_TEACHER_WEIGHT = 1.0
#: Per-task teacher weights of the official stage-5 fused lists (all other tasks: 1.0).
TEACHER_TASK_WEIGHTS: Mapping[str, float] = {"mscoco_task0": 0.5, "mscoco_task3": 0.1}
#: Default grid of :func:`choose_weight` (the official commented grid was i * 1.0, i = 0..20).
DEFAULT_GRID: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0)
TUNING_SPLIT = "val"
#: Fusion rules: ``"cosine"`` (each candidate's own cosine, D9) and ``"official_global"`` (the official
#: global fusion, for ``compat="official"`` on the global protocol).
FUSION_RULES: tuple[str, ...] = ("cosine", "official_global")


@dataclass(frozen=True)
class ScoredCandidate:
    """One retrieved candidate with its own retrieval cosine and reranker P(yes)."""

    did: str
    cosine: float
    p_yes: float

    def fused(self, weight: float) -> float:
        """``cosine + weight * p_yes``."""
        return self.cosine + weight * self.p_yes


@dataclass(frozen=True)
class RerankedQuery:
    """A query's reranked candidates in retrieval order, plus its positives (for metrics).

    Attributes:
        tail: retrieved candidates beyond the reranked depth ``(did, cosine)``; kept after the fused
            head, in retrieval order.
    """

    qid: str
    candidates: tuple[ScoredCandidate, ...]
    positives: tuple[str, ...] = ()
    tail: tuple[tuple[str, float], ...] = ()

    @classmethod
    def from_lists(cls, qid: str, dids: Sequence[str], cosines: Sequence[float], p_yes: Sequence[float],
                   positives: Sequence[str] = ()) -> "RerankedQuery":
        """Bind parallel lists of one query: the first ``len(p_yes)`` candidates are reranked.

        ``dids`` and ``cosines`` are the retrieval list (same length, retrieval order); ``p_yes`` covers
        its first ``len(p_yes)`` entries. Raises DataError naming the qid on a length mismatch.
        """
        if len(dids) != len(cosines):
            raise DataError(f"query {qid}: {len(dids)} dids but {len(cosines)} cosines")
        if len(p_yes) > len(dids):
            raise DataError(f"query {qid}: {len(p_yes)} P(yes) scores for only {len(dids)} retrieved candidates")
        k = len(p_yes)
        head = tuple(ScoredCandidate(str(d), float(c), float(p)) for d, c, p in zip(dids[:k], cosines[:k], p_yes))
        tail = tuple((str(d), float(c)) for d, c in zip(dids[k:], cosines[k:]))
        return cls(qid, head, tuple(positives), tail)


def fuse_query(query: RerankedQuery, weight: float, rule: str = "cosine") -> list[tuple[str, float]]:
    """Re-sort one query by ``cosine + weight * p_yes``: ``[(did, fused)]`` best first.

    Ties keep retrieval order (stable sort). Candidates beyond the reranked depth follow, in retrieval
    order, with their cosine (they are never moved above a reranked one). ``rule="official_global"``
    fuses with :func:`official_global_fuse_query` instead.
    """
    if rule == "official_global":
        return official_global_fuse_query(query, weight)
    if rule != "cosine":
        raise ConfigError(f"fusion rule must be one of {list(FUSION_RULES)}, got {rule!r}")
    scored = [(c.did, c.fused(weight)) for c in query.candidates]
    order = sorted(range(len(scored)), key=lambda i: -scored[i][1])
    return [scored[i] for i in order] + list(query.tail)


def official_global_fuse_query(query: RerankedQuery, weight: float) -> list[tuple[str, float]]:
    """The official global U-MARVEL+ fusion (D9, ``compat="official"``), bug included.

    The official script adds ``raw[::-1][i]`` to the P(yes) of candidate ``i``, where ``raw`` are the FAISS
    ``IndexFlatL2`` squared distances of the K reranked candidates in retrieval order. On unit vectors that
    distance is ``2 - 2 cos``, so candidate ``i`` gets ``(2 - 2 cos_{K-1-i}) + weight * p_i``: the distance of
    another candidate, largest for the best retrieved one. Sorted descending, stable (Python ``sorted(...,
    reverse=True)``). The tail beyond the reranked depth follows with its cosine, as in :func:`fuse_query`.

    Returns:
        ``[(did, fused)]`` best first.
    """
    cands = query.candidates
    k = len(cands)
    dist = [2.0 - 2.0 * c.cosine for c in cands]
    scored = [(c.did, dist[k - 1 - i] + weight * c.p_yes) for i, c in enumerate(cands)]
    order = sorted(range(k), key=lambda i: scored[i][1], reverse=True)
    return [scored[i] for i in order] + list(query.tail)


@dataclass(frozen=True)
class RerankResults:
    """Reranked retrieval results of one task on one split.

    Attributes:
        split: the split the queries come from (``"val"`` or ``"test"``); :func:`choose_weight` accepts
            ``"val"`` only.
        task: task name (e.g. ``"mscoco_task0"``).
        queries: per-query candidates.
        metric_k: cutoff of the task's headline Recall@k (5; 10 for fashion200k tasks and fashioniq).
    """

    split: str
    task: str
    queries: tuple[RerankedQuery, ...]
    metric_k: int = 5
    meta: Mapping[str, object] = field(default_factory=dict)


def fuse_results(results: RerankResults, weight: float, rule: str = "cosine") -> dict[str, list[tuple[str, float]]]:
    """``{qid: [(did, fused score)] best first}`` for every query of ``results`` (``rule``: see :func:`fuse_query`)."""
    return {q.qid: fuse_query(q, weight, rule) for q in results.queries}


def fused_recall(results: RerankResults, weight: float, k: int | None = None, rule: str = "cosine") -> float:
    """Hit-rate Recall@k (fraction in [0, 1]) of the fused ranking (official: any positive in the top k)."""
    k = k or results.metric_k
    if not results.queries:
        raise DataError(f"{results.task} ({results.split}): no query to evaluate")
    hits = 0
    for q in results.queries:
        top = {did for did, _ in fuse_query(q, weight, rule)[:k]}
        hits += bool(top & set(q.positives))
    return hits / len(results.queries)


def choose_weight(val_results: Sequence[RerankResults], grid: Sequence[float] = DEFAULT_GRID,
                  rule: str = "cosine") -> tuple[float, dict[float, float]]:
    """Pick the fusion weight on VALIDATION results: the best unweighted mean of per-task Recall@k.

    Args:
        val_results: one :class:`RerankResults` per task, every one with ``split == "val"``.
        grid: candidate weights (ties go to the earliest in the grid).
        rule: the fusion rule (:func:`fuse_query`).
    Returns:
        ``(best weight, {weight: mean recall in [0, 1]})``.
    Raises:
        ConfigError: a result whose split is not ``"val"`` (tuning on test data is refused), an empty
            input or grid, or a negative / non-finite weight.
    """
    if not val_results:
        raise ConfigError("choose_weight needs at least one validation result")
    for r in val_results:
        if r.split != TUNING_SPLIT:
            raise ConfigError(f"choose_weight: results of task {r.task} are from split {r.split!r}; the fusion "
                              f"weight may only be tuned on split {TUNING_SPLIT!r} (D9)")
    if not grid or any(not math.isfinite(w) or w < 0 for w in grid):
        raise ConfigError(f"choose_weight: the grid must be non-empty, finite and >= 0, got {list(grid)}")
    table = {float(w): float(np.mean([fused_recall(r, w, rule=rule) for r in val_results])) for w in grid}
    best = max(table, key=lambda w: (table[w], -list(table).index(w)))
    logger.info("fusion weight chosen on %d validation task(s): w=%g (mean recall %.4f)", len(val_results),
                best, table[best])
    return best, table


# ------------------------------------------------------------------------------------ stage-5 teacher
def teacher_weight(task: str, weights: Mapping[str, float] | None = None,
                   default: float = DEFAULT_TEACHER_WEIGHT) -> float:
    """The teacher fusion weight of ``task`` (``weights`` defaults to :data:`TEACHER_TASK_WEIGHTS`)."""
    table = TEACHER_TASK_WEIGHTS if weights is None else weights
    return float(table.get(task, default))


def teacher_fuse(task: str, dids: Sequence[str], cosines: Sequence[float], p_yes: Sequence[float],
                 weights: Mapping[str, float] | None = None, default: float = DEFAULT_TEACHER_WEIGHT
                 ) -> tuple[list[str], np.ndarray]:
    """Stage-5 teacher list of one query: ``cos + w_task * p_yes`` re-sorted descending.

    Args:
        dids / cosines / p_yes: (K,) the query's retrieved candidates, each with its own cosine and P(yes).
    Returns:
        ``(dids best first, fused scores (K,) float64 in that order)``; ties keep retrieval order.
    """
    if not (len(dids) == len(cosines) == len(p_yes)):
        raise DataError(f"{task}: teacher lists differ in length ({len(dids)} dids, {len(cosines)} cosines, "
                        f"{len(p_yes)} P(yes))")
    w = teacher_weight(task, weights, default)
    fused = np.asarray(cosines, dtype=np.float64) + w * np.asarray(p_yes, dtype=np.float64)
    order = np.argsort(-fused, kind="stable")
    return [str(dids[i]) for i in order], fused[order]
