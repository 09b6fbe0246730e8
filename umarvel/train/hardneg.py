"""Stage 4: M-BEIR union train with K hard negatives per query from the GLOBAL mined list (method spec 2.2, 2.3).

Mined file (written by :mod:`umarvel.pipelines.mining`, official ``rerank_data_all_eval_train_global.jsonl``): one
JSON line per union-train row, in union-train order, ``{qid, gt_docs, top100_docs, score}`` (+ our
``gt_scores``: the cosine of each gt doc, ``null`` when it is not in the pool). Line i must carry row i's qid.

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
from typing import Iterator

from umarvel.data.formatting import format_string
from umarvel.errors import ConfigError, DataError
from umarvel.train.datasets import MbeirTrainDataset, Side, TrainExample, _build_mbeir
from umarvel.utils.io import iter_jsonl

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MinedRow:
    """One line of a mined file.

    Attributes:
        qid: the union-train row's query id.
        gt_docs: ground-truth dids (qrels positives).
        top_docs: retrieved dids, best first (up to 100).
        scores: cosine of each ``top_docs`` entry (same length), or None when the file has none.
        gt_scores: cosine of each ``gt_docs`` entry (None where unknown), or None when the file has none.
    """

    qid: str
    gt_docs: tuple[str, ...]
    top_docs: tuple[str, ...]
    scores: tuple[float, ...] | None = None
    gt_scores: tuple[float | None, ...] | None = None

    def positive_score(self) -> float | None:
        """The best known cosine of a ground-truth doc (``gt_scores``, else gt docs inside the list)."""
        known = [s for s in (self.gt_scores or ()) if s is not None]
        if not known and self.scores is not None:
            gt = set(self.gt_docs)
            known = [s for d, s in zip(self.top_docs, self.scores) if d in gt]
        return max(known) if known else None


def _id_list(rec: dict, key: str, where: str) -> tuple[str, ...]:
    value = rec.get(key)
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise DataError(f"{where}: field {key!r} must be a list of dids")
    return tuple(value)


def _score_list(rec: dict, key: str, n: int, where: str, allow_null: bool = False):
    value = rec.get(key)
    if value is None:
        return None
    ok = isinstance(value, list) and len(value) == n and all(
        (allow_null and x is None) or (isinstance(x, (int, float)) and not isinstance(x, bool)) for x in value)
    if not ok:
        raise DataError(f"{where}: field {key!r} must be a list of {n} numbers")
    return tuple(None if x is None else float(x) for x in value)


def parse_mined(rec: dict, where: str) -> MinedRow:
    """One mined JSON object -> :class:`MinedRow` (DataError naming ``where`` on a malformed field)."""
    if not isinstance(rec.get("qid"), str):
        raise DataError(f"{where}: missing or non-string 'qid' (expected {{qid, gt_docs, top100_docs, score}})")
    gt = _id_list(rec, "gt_docs", where)
    top = _id_list(rec, "top100_docs", where)
    return MinedRow(rec["qid"], gt, top, _score_list(rec, "score", len(top), where),
                    _score_list(rec, "gt_scores", len(gt), where, allow_null=True))


def iter_mined(path: str | Path) -> Iterator[tuple[int, MinedRow]]:
    """``(line number, MinedRow)`` for each line of a mined JSONL file."""
    for lineno, rec in iter_jsonl(path):
        yield lineno, parse_mined(rec, f"{path}:{lineno}")


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
        sides = []
        for did in dids:
            c = self.base.pool[did]
            sides.append(Side(self.base.truncate(format_string(c.text or "")), c.image))
        return TrainExample(ex.query, ex.candidates + tuple(sides), query_id=ex.query_id,
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
    for lineno, row in iter_mined(mined_path):
        i = len(negatives)
        if i >= len(base):
            break  # max_examples: only the first rows are used
        q = base.queries[i]
        if row.qid != q.qid:
            raise DataError(f"{mined_path}:{lineno}: qid {row.qid} but union-train row {i + 1} "
                            f"({base.path}:{base.lines[i]}) is {q.qid}; the mined file must follow the "
                            "union-train order")
        missing = [d for d in row.top_docs if d not in base.pool]
        if missing:
            raise DataError(f"{mined_path}:{lineno}: mined did(s) {missing[:3]} of query {q.qid} are not in the "
                            f"train pool")
        if margin is not None and row.positive_score() is None:
            filtered += 1
        sel = select_hard_negatives(row, k, frozenset(q.positives), skip_top, margin)
        fallback += not sel
        negatives.append(sel)
    if len(negatives) < len(base):
        raise DataError(f"{mined_path}: {len(negatives)} mined lines for {len(base)} union-train rows of {base.path}")
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
    if data.hard_negative_skip_top < 0:
        raise ConfigError(f"data.hard_negative_skip_top must be >= 0, got {data.hard_negative_skip_top}")
    base = _build_mbeir(data, tokenizer)
    ds = attach_negatives(base, data.negatives, data.num_hard_negatives, data.hard_negative_skip_top,
                          data.hard_negative_margin)
    logger.info("stage-4 hard negatives: K=%d from %s (skip top %d, margin %s)", ds.k, data.negatives,
                data.hard_negative_skip_top, data.hard_negative_margin)
    return ds


__all__ = ["MinedRow", "parse_mined", "iter_mined", "select_hard_negatives", "MbeirHardNegDataset",
           "attach_negatives", "build_hardneg_dataset"]
