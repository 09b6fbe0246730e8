"""Retrieval metrics exactly as the official M-BEIR scorer computes them (mbeir_benchmark.md 2.1).

"Recall@k" is a hit rate: a query scores 1 when ANY of its positives is among its top ``k`` retrieved
ids, else 0 (also 0 when it has no positive); the task value is the mean over queries. A ``k`` larger
than the retrieved list simply looks at the whole list. The "Average" is the unweighted mean of the
per-task headline values. Ids may be strings (``"9:1"``) or hashed integers, as long as retrieved ids
and positives use the same kind. Pure numpy.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Collection, Iterable, Mapping, Sequence

import numpy as np

from umarvel.errors import DataError

if TYPE_CHECKING:
    from umarvel.data.registry import Task

logger = logging.getLogger(__name__)


def _as_2d(retrieved: np.ndarray | Sequence[Sequence]) -> np.ndarray:
    """``retrieved`` as a (Q, K) array; DataError for other shapes."""
    arr = np.asarray(retrieved)
    if arr.ndim == 1 and arr.size == 0:
        arr = arr.reshape(0, 0)
    if arr.ndim != 2:
        raise DataError(f"retrieved ids must be a (Q, K) array, got shape {arr.shape}")
    return arr


def _flatten_positives(positives: Sequence[Collection], n_queries: int) -> tuple[np.ndarray, list]:
    """(row index per positive, flat list of positives) over queries."""
    if len(positives) != n_queries:
        raise DataError(f"got positives for {len(positives)} queries but rankings for {n_queries}")
    lengths = np.fromiter((len(p) for p in positives), dtype=np.int64, count=n_queries)
    rows = np.repeat(np.arange(n_queries, dtype=np.int64), lengths)
    flat = [x for p in positives for x in p]
    return rows, flat


def _check_kinds(ret: np.ndarray, flat: list) -> None:
    """Retrieved ids and positives must both be strings or both integers (never silently unequal)."""
    ret_is_int = ret.dtype.kind in "iu"
    pos_kinds = {isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in flat}
    if ret.size and flat and pos_kinds != {ret_is_int}:
        raise DataError("retrieved ids and positives mix integer (hashed) and string ids; "
                        "hash both or neither (umarvel.data.mbeir.hash_did)")


def hit_matrix(retrieved: np.ndarray | Sequence[Sequence], positives: Sequence[Collection]) -> np.ndarray:
    """Boolean (Q, K): ``out[i, j]`` is whether ``retrieved[i, j]`` is a positive of query ``i``.

    Vectorised: ids are mapped to integer codes with ``np.unique``, then (row, code) pairs are tested
    with ``np.isin``.
    """
    ret = _as_2d(retrieved)
    n_q, k = ret.shape
    rows, flat = _flatten_positives(positives, n_q)
    if ret.size == 0 or not flat:
        return np.zeros((n_q, k), dtype=bool)
    _check_kinds(ret, flat)
    if ret.dtype.kind in "iu":
        values = np.concatenate([ret.ravel().astype(np.int64), np.asarray(flat, dtype=np.int64)])
    else:
        values = np.concatenate([ret.ravel().astype(str), np.asarray(flat, dtype=str)])
    _, codes = np.unique(values, return_inverse=True)
    codes = codes.reshape(-1).astype(np.int64)
    n_codes = int(codes.max()) + 1
    ret_keys = np.repeat(np.arange(n_q, dtype=np.int64), k) * n_codes + codes[: n_q * k]
    pos_keys = rows * n_codes + codes[n_q * k:]
    return np.isin(ret_keys, pos_keys).reshape(n_q, k)


def recall_at_k(retrieved: np.ndarray | Sequence[Sequence], positives: Sequence[Collection],
                ks: Iterable[int]) -> dict[int, float]:
    """Official hit-rate ``{k: fraction in [0, 1]}`` for each cutoff ``k`` (any positive in the top k).

    Raises:
        DataError: with no query, or a cutoff below 1.
    """
    ks = [int(k) for k in ks]
    if any(k < 1 for k in ks):
        raise DataError(f"cutoffs must be >= 1, got {ks}")
    hits = hit_matrix(retrieved, positives)
    if hits.shape[0] == 0:
        raise DataError("cannot compute recall over zero queries")
    return {k: float(np.mean(hits[:, :k].any(axis=1))) for k in ks}


@dataclass(frozen=True)
class TaskResult:
    """One row of the per-task table (values in percent, as the papers show them).

    Attributes:
        name / dataset / task_id / metric: from the registry task.
        value: the headline metric, percent.
        recall: ``{k: percent}`` for every cutoff.
        num_queries / pool_size: counts behind the number.
    """

    name: str
    dataset: str
    task_id: int | None
    metric: str
    value: float
    recall: Mapping[int, float] = field(default_factory=dict)
    num_queries: int = 0
    pool_size: int = 0

    def to_json(self) -> dict:
        """The ``results.json`` task entry (recall keys as strings)."""
        return {"name": self.name, "dataset": self.dataset, "task_id": self.task_id, "metric": self.metric,
                "value": self.value, "recall": {str(k): v for k, v in sorted(self.recall.items())},
                "num_queries": self.num_queries, "pool_size": self.pool_size}


def score_task(task: "Task", retrieved: np.ndarray | Sequence[Sequence], positives: Sequence[Collection],
               pool_size: int) -> TaskResult:
    """Score one task: hit-rate recall at every cutoff of ``task``, in percent.

    Args:
        task: the registry task (metric and cutoffs come from it).
        retrieved: (Q, K) ranked ids per query, ``K`` normally ``task.search_depth``.
        positives: per-query positive ids (from the qrels), same id kind as ``retrieved``.
        pool_size: number of candidates searched.
    """
    ret = _as_2d(retrieved)
    if ret.shape[1] < task.search_depth:
        logger.warning("%s: only %d ids retrieved per query; Recall@%d looks at those only",
                       task.name, ret.shape[1], task.search_depth)
    recall = {k: 100.0 * v for k, v in recall_at_k(ret, positives, task.cutoffs).items()}
    return TaskResult(name=task.name, dataset=task.dataset, task_id=task.task_id, metric=task.metric,
                      value=recall[task.metric_k], recall=recall, num_queries=int(ret.shape[0]),
                      pool_size=int(pool_size))


def average(results: Sequence[TaskResult]) -> float:
    """Unweighted mean of the headline values (not weighted by query count)."""
    if not results:
        raise DataError("cannot average zero task results")
    return float(np.mean([r.value for r in results]))
