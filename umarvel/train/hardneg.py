"""Stage 4: M-BEIR union train with K hard negatives per query from the GLOBAL mined list (method spec 2.2, 2.3).

Mined file (official ``rerank_data_all_eval_train_global.jsonl``, format and reader in
:mod:`umarvel.data.runfiles`): one JSON line per union-train row, in union-train order, ``{qid, gt_docs,
top100_docs, score}`` (+ our ``gt_scores``: the cosine of each gt doc, ``null`` when it is not in the pool). Line i
must carry row i's qid.

Selection (:func:`select_hard_negatives`), as the official "mixed hard neg sample" with all 16 tasks on
``topk``: walk down ``top100_docs`` and keep the first K distinct dids that are neither in ``gt_docs`` nor in
the row's ``pos_cand_list``; when fewer than K are found the list is padded by repeating its FIRST entry
(golden c4); when none is found, K distinct random non-positive dids of the train pool are drawn from the
example RNG (the official ``randomk`` fallback). Our slots follow rank order; the official collected them in a
``set`` (order depending on ``PYTHONHASHSEED``), which changes no loss: every query sees every negative.

Options (off by default = official): ``hard_negative_skip_top`` ignores the first m ranks;
``hard_negative_margin`` drops candidates whose cosine exceeds the query's best positive cosine minus the
margin (likely unlabelled positives). Rows are otherwise built exactly like stage 3 (random positive and
instruction from the example RNG); the collator renders them without the compression suffix (D3).
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

from umarvel.data.runfiles import MinedRow, iter_mined
from umarvel.errors import ConfigError, DataError
from umarvel.train.datasets import MbeirTrainDataset, TrainExample, _build_mbeir

logger = logging.getLogger(__name__)


def select_hard_negatives(row: MinedRow, k: int, excluded: set[str] | frozenset[str] = frozenset(),
                          skip_top: int = 0, margin: float | None = None) -> tuple[str, ...]:
    """The K hard negatives of one mined row (see the module doc).

    Args:
        row: the mined row. k: K >= 1.
        excluded: dids never taken (the row's ``pos_cand_list``; ``row.gt_docs`` are always excluded).
        skip_top: ignore ranks ``< skip_top``.
        margin: drop candidates with ``score > positive_score - margin`` (needs scores; rows without a known
            positive score are not filtered).
    Returns:
        K dids (the first found repeated when fewer were found), or ``()`` when none qualifies.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    banned = set(row.gt_docs) | set(excluded)
    ceiling = None
    if margin is not None:
        if row.scores is None:
            raise DataError(f"mined row {row.qid}: hard_negative_margin needs the 'score' field")
        pos = row.positive_score()
        ceiling = None if pos is None else pos - margin
    picked: list[str] = []
    for rank, did in enumerate(row.top_docs):
        if rank < skip_top or did in banned or did in picked:
            continue
        if ceiling is not None and row.scores[rank] > ceiling:
            continue
        picked.append(did)
        if len(picked) == k:
            break
    if picked and len(picked) < k:
        picked += [picked[0]] * (k - len(picked))
    return tuple(picked)


@dataclass
class MbeirHardNegDataset:
    """Stage-3 examples plus K hard negatives: ``candidates = (positive, neg slot 1, ..., neg slot K)``.

    Attributes:
        base: the union-train dataset (rows aligned with the mined file).
        negatives: per row, the K selected dids, or ``()`` for the random fallback.
        k: K.
    """

    base: MbeirTrainDataset
    negatives: list[tuple[str, ...]]
    k: int
    _pool_ids: list[str] = field(default_factory=list, repr=False)

    def __len__(self) -> int:
        return len(self.base)

    def _random_negatives(self, index: int, rng: random.Random) -> tuple[str, ...]:
        q = self.base.queries[index]
        if not self._pool_ids:
            self._pool_ids = list(self.base.pool)
        allowed = len(self._pool_ids) - len(set(q.positives) & set(self.base.pool))
        if allowed < 1:
            raise DataError(f"query {q.qid}: the train pool holds no candidate besides its positives")
        picked: list[str] = []
        for _ in range(100 * self.k + 1000):
            d = rng.choice(self._pool_ids)
            if d not in q.positives and d not in picked:
                picked.append(d)
                if len(picked) == min(self.k, allowed):
                    break
        picked += [picked[0]] * (self.k - len(picked))
        return tuple(picked)

    def example(self, index: int, rng: random.Random) -> TrainExample:
        """Row ``index``: the stage-3 example (same draws) followed by its K negatives."""
        ex = self.base.example(index, rng)
        dids = self.negatives[index] or self._random_negatives(index, rng)
        return TrainExample(ex.query, ex.candidates + self.base.candidate_sides(dids), query_id=ex.query_id,
                            candidate_ids=ex.candidate_ids + tuple(dids))

    def length_hint(self, index: int) -> int:
        return self.base.length_hint(index) * (1 + self.k) // 2


def attach_negatives(base: MbeirTrainDataset, mined_path: str | Path, k: int, skip_top: int = 0,
                     margin: float | None = None) -> MbeirHardNegDataset:
    """Read the mined file aligned with ``base``'s rows and select each row's K negatives.

    Raises:
        DataError: naming ``file:line`` for a malformed line, a qid not matching its union-train row, a
            mined did missing from the train pool, or fewer mined lines than rows.
    """
    negatives: list[tuple[str, ...]] = []
    fallback = filtered = 0
    qids = [q.qid for q in base.queries]  # max_examples: only the first rows are read
    for i, row in enumerate(iter_mined(mined_path, qids, rows="union-train row", follows=base.path, exact=False)):
        q = base.queries[i]
        missing = [d for d in row.top_docs if d not in base.pool]
        if missing:
            raise DataError(f"{row.where}: mined did(s) {missing[:3]} of query {q.qid} are not in the train pool")
        if margin is not None and row.positive_score() is None:
            filtered += 1
        sel = select_hard_negatives(row, k, frozenset(q.positives), skip_top, margin)
        fallback += not sel
        negatives.append(sel)
    if fallback:
        logger.warning("%d of %d rows have no usable mined negative; they draw %d random pool candidates",
                       fallback, len(base), k)
    if filtered:
        logger.warning("%d rows have no known positive score: the margin filter does not apply to them", filtered)
    return MbeirHardNegDataset(base, negatives, k)


def build_hardneg_dataset(data, tokenizer) -> MbeirHardNegDataset:
    """``data.kind = mbeir_hardneg``: the ``mbeir`` dataset plus ``data.negatives`` (global mined list) and
    ``data.num_hard_negatives`` K (published 5)."""
    if not data.negatives:
        raise ConfigError("data.negatives (the global mined list, rerank_data_all_eval_train_global.jsonl) is "
                          "required for data.kind=mbeir_hardneg")
    if data.num_hard_negatives < 1:
        raise ConfigError(f"data.num_hard_negatives must be >= 1 for mbeir_hardneg, got {data.num_hard_negatives}")
    base = _build_mbeir(data, tokenizer)
    ds = attach_negatives(base, data.negatives, data.num_hard_negatives, data.hard_negative_skip_top,
                          data.hard_negative_margin)
    logger.info("stage-4 hard negatives: K=%d from %s (skip top %d, margin %s)", ds.k, data.negatives,
                data.hard_negative_skip_top, data.hard_negative_margin)
    return ds
