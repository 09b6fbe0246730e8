"""The pipeline files: mined lists, the teacher file and TREC runs. One reader and one writer each.

Mined list (official ``rerank_data_all_eval_train_{local,global}.jsonl``): written by hard-negative mining
(:mod:`umarvel.pipelines.mining`); read by stage 4 (global list, :mod:`umarvel.train.hardneg`), the reranker's
training data (local list, :mod:`umarvel.rerank.data`) and the teacher step (:mod:`umarvel.pipelines.teacher`).
One JSON line per query row, in the query file's order::

    {"qid": str, "gt_docs": [did], "top100_docs": [did, best first], "score": [cosine per top doc],
     "gt_scores": [cosine per gt doc, null when the doc is not in the pool]}

``score`` and ``gt_scores`` (ours) are optional when reading. ``top100_docs`` is the raw retrieved list, which
may hold positives: consumers exclude ``gt_docs``.

Teacher file (official ``fusion_results.jsonl``): written by :mod:`umarvel.pipelines.teacher`, read by stage 5
(:mod:`umarvel.train.distill`). One JSON line per distillation query row, same order::

    {"qid": str, "task": str, "did": [did, best first], "score": [fused cos + w * P(yes)],
     "cosine": [...], "p_yes": [...]}

``task``, ``cosine`` and ``p_yes`` (provenance) are optional when reading.

TREC run (``runs/<task>_<split>.trec``): written by the M-BEIR evaluation, U-MARVEL+ and ``umarvel rerank fuse``;
read by U-MARVEL+ and ``umarvel rerank score/fuse``. One line ``qid Q0 did rank score run_id`` per retrieved
candidate (rank from 1, score ``%.6f``); a 7th column is tolerated when reading.

Row-aligned files: given the query rows' qids, the readers check that line i carries row i's qid and that
there are as many lines as rows. Every error is a :class:`~umarvel.errors.DataError` naming ``file:line``.
Writes are atomic; the JSON files are written with ``json.dumps`` defaults (the official byte format).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence, TypeVar

import numpy as np

from umarvel.data.mbeir import unhash_did
from umarvel.errors import DataError
from umarvel.utils.io import atomic_path, iter_columns, iter_jsonl, write_jsonl

PathLike = str | os.PathLike
TEACHER_FILE = "fusion_results.jsonl"
_MINED_KEYS = "{qid, gt_docs, top100_docs, score}"
_TEACHER_KEYS = "{qid, did: [...], score: [...]}"


def mined_file_name(scope: str) -> str:
    """``rerank_data_all_eval_train_{scope}.jsonl`` (the official merged file name; scope local / global)."""
    return f"rerank_data_all_eval_train_{scope}.jsonl"


# -------------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class MinedRow:
    """One line of a mined list.

    Attributes:
        qid: the query row's id.
        gt_docs: ground-truth dids (qrels positives).
        top_docs: retrieved dids, best first (up to 100).
        scores: cosine of each ``top_docs`` entry (same length), or None when absent / not read.
        gt_scores: cosine of each ``gt_docs`` entry (None where unknown), or None when absent / not read.
        where: ``file:line`` it was read from ("" when built in memory).
    """

    qid: str
    gt_docs: tuple[str, ...]
    top_docs: tuple[str, ...]
    scores: tuple[float, ...] | None = None
    gt_scores: tuple[float | None, ...] | None = None
    where: str = field(default="", compare=False, repr=False)

    def positive_score(self) -> float | None:
        """The best known cosine of a ground-truth doc (``gt_scores``, else gt docs inside the list)."""
        known = [s for s in (self.gt_scores or ()) if s is not None]
        if not known and self.scores is not None:
            gt = set(self.gt_docs)
            known = [s for d, s in zip(self.top_docs, self.scores) if d in gt]
        return max(known) if known else None


@dataclass(frozen=True)
class TeacherRow:
    """One line of the teacher file: a query's candidates best first with their fused scores.

    Attributes:
        qid: the query row's id. dids: candidates, best first. scores: fused score of each did.
        task: registry task name; cosine / p_yes: each did's retrieval cosine and reranker P(yes)
            (provenance; None when absent).
        where: ``file:line`` it was read from ("" when built in memory).
    """

    qid: str
    dids: tuple[str, ...]
    scores: tuple[float, ...]
    task: str | None = None
    cosine: tuple[float, ...] | None = None
    p_yes: tuple[float, ...] | None = None
    where: str = field(default="", compare=False, repr=False)


class RunEntry(NamedTuple):
    """One ranked candidate of a TREC run (unpacks as ``did, score``)."""

    did: str
    score: float


# ---------------------------------------------------------------------------------------- validation
def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _qid(rec: dict, where: str, expected: str) -> str:
    if not isinstance(rec.get("qid"), str):
        raise DataError(f"{where}: missing or non-string 'qid' (expected {expected})")
    return rec["qid"]


def _ids(rec: dict, key: str, where: str, expected: str) -> tuple[str, ...]:
    if key not in rec:
        raise DataError(f"{where}: missing field {key!r} (expected {expected})")
    value = rec[key]
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise DataError(f"{where}: {key!r} must be a list of dids")
    return tuple(value)


def _numbers(rec: dict, key: str, n: int, where: str, allow_null: bool = False) -> tuple | None:
    """``rec[key]`` as a tuple of ``n`` floats (None entries kept with ``allow_null``), None when absent."""
    value = rec.get(key)
    if value is None:
        return None
    if not (isinstance(value, list) and len(value) == n
            and all((allow_null and x is None) or _is_number(x) for x in value)):
        raise DataError(f"{where}: {key!r} must be a list of {n} numbers")
    return tuple(None if x is None else float(x) for x in value)


R = TypeVar("R", MinedRow, TeacherRow)


def _aligned(path: PathLike, parse: Callable[[dict, str], R], kind: str, qids: Sequence[str] | None,
             rows: str, follows: PathLike | None, exact: bool) -> Iterator[R]:
    """Parse each line of a row-aligned JSONL file, checking line i against ``qids[i]`` (see the readers)."""
    order = f"the order of {follows}" if follows else f"the {rows}s' order"
    n = 0
    for lineno, rec in iter_jsonl(path):
        where = f"{path}:{lineno}"
        if qids is not None and n == len(qids):
            if exact:
                raise DataError(f"{where}: more {kind} lines than the {len(qids)} {rows}s")
            return
        row = parse(rec, where)
        if qids is not None and row.qid != qids[n]:
            raise DataError(f"{where}: qid {row.qid} but {rows} {n + 1} is {qids[n]} (the {kind} file must "
                            f"follow {order})")
        n += 1
        yield row
    if qids is not None and n < len(qids):
        raise DataError(f"{path}: {n} {kind} lines for {len(qids)} {rows}s" + (f" of {follows}" if follows else ""))


# ------------------------------------------------------------------------------------------ mined list
def _parse_mined(rec: dict, where: str, scores: bool = True) -> MinedRow:
    qid = _qid(rec, where, _MINED_KEYS)
    gt = _ids(rec, "gt_docs", where, _MINED_KEYS)
    top = _ids(rec, "top100_docs", where, _MINED_KEYS)
    if not scores:
        return MinedRow(qid, gt, top, where=where)
    return MinedRow(qid, gt, top, _numbers(rec, "score", len(top), where),
                    _numbers(rec, "gt_scores", len(gt), where, allow_null=True), where=where)


def iter_mined(path: PathLike, qids: Sequence[str] | None = None, *, rows: str = "query row",
               follows: PathLike | None = None, exact: bool = True, scores: bool = True) -> Iterator[MinedRow]:
    """The rows of a mined list, streamed (a global list of the union train holds 1.1M x 100 dids).

    Args:
        qids: the query rows the file must follow (line i carries ``qids[i]``); None: no alignment check.
        rows / follows: how errors name the query rows and their file.
        exact: the file must hold exactly ``len(qids)`` lines; False: lines past ``len(qids)`` are not read
            (``max_examples``).
        scores: also parse ``score`` / ``gt_scores`` (False saves their memory).
    Raises:
        DataError: naming ``file:line`` for a malformed line or a misaligned qid; naming the file for fewer
            lines than ``qids``.
    """
    return _aligned(path, lambda rec, where: _parse_mined(rec, where, scores), "mined", qids, rows, follows, exact)


def write_mined(path: PathLike, rows: Iterable[MinedRow]) -> int:
    """Write a mined list atomically (``score`` / ``gt_scores`` only when set); returns the number of lines."""
    def record(r: MinedRow) -> dict[str, Any]:
        obj: dict[str, Any] = {"qid": r.qid, "gt_docs": list(r.gt_docs), "top100_docs": list(r.top_docs)}
        if r.scores is not None:
            obj["score"] = list(r.scores)
        if r.gt_scores is not None:
            obj["gt_scores"] = list(r.gt_scores)
        return obj
    return write_jsonl(path, map(record, rows), ensure_ascii=True)


# ---------------------------------------------------------------------------------------- teacher file
def _parse_teacher(rec: dict, where: str, provenance: bool = True) -> TeacherRow:
    qid = _qid(rec, where, _TEACHER_KEYS)
    dids = _ids(rec, "did", where, _TEACHER_KEYS)
    scores = _numbers(rec, "score", len(dids), where)
    if scores is None:
        raise DataError(f"{where}: missing field 'score' (expected {_TEACHER_KEYS})")
    task = rec.get("task")
    if task is not None and not isinstance(task, str):
        raise DataError(f"{where}: 'task' must be a task name")
    if not provenance:
        return TeacherRow(qid, dids, scores, task, where=where)
    return TeacherRow(qid, dids, scores, task, _numbers(rec, "cosine", len(dids), where),
                      _numbers(rec, "p_yes", len(dids), where), where=where)


def iter_teacher(path: PathLike, qids: Sequence[str] | None = None, *, rows: str = "query row",
                 follows: PathLike | None = None, exact: bool = True,
                 provenance: bool = True) -> Iterator[TeacherRow]:
    """The rows of a teacher file, streamed; ``qids`` / ``rows`` / ``follows`` / ``exact`` as :func:`iter_mined`.

    ``provenance``: also parse ``cosine`` / ``p_yes`` (False saves their memory).

    Raises:
        DataError: naming ``file:line`` for a malformed line or a misaligned qid; naming the file for fewer
            lines than ``qids``.
    """
    return _aligned(path, lambda rec, where: _parse_teacher(rec, where, provenance), "teacher", qids, rows, follows,
                    exact)


def write_teacher(path: PathLike, rows: Iterable[TeacherRow]) -> int:
    """Write a teacher file atomically (``task`` / ``cosine`` / ``p_yes`` only when set); returns the line count."""
    def record(r: TeacherRow) -> dict[str, Any]:
        obj: dict[str, Any] = {"qid": r.qid}
        if r.task is not None:
            obj["task"] = r.task
        obj["did"], obj["score"] = list(r.dids), list(r.scores)
        if r.cosine is not None:
            obj["cosine"] = list(r.cosine)
        if r.p_yes is not None:
            obj["p_yes"] = list(r.p_yes)
        return obj
    return write_jsonl(path, map(record, rows), ensure_ascii=True)


# -------------------------------------------------------------------------------------------- TREC run
def _did_str(did: Any) -> str | None:
    """A retrieved id as a did string (hashed ints unhashed); ``None`` for padding (-1, "", None)."""
    if did is None or (isinstance(did, str) and did == ""):
        return None
    if isinstance(did, (int, np.integer)) and not isinstance(did, bool):
        return None if did < 0 else unhash_did(int(did))
    return str(did)


def read_trec_run(path: PathLike) -> dict[str, list[RunEntry]]:
    """A TREC run file -> ``{qid: [RunEntry(did, score)]}``, candidates in rank order, queries in file order.

    Raises:
        DataError: naming ``file:line`` for a malformed line, a repeated (qid, rank) or a non-numeric field.
    """
    rows: dict[str, dict[int, RunEntry]] = {}
    for where, parts in iter_columns(path, missing="run file not found"):
        if len(parts) not in (6, 7):
            raise DataError(f"{where}: expected 'qid Q0 did rank score run_id', got {len(parts)} columns")
        qid, _, did, rank, score = parts[:5]
        try:
            r, s = int(rank), float(score)
        except ValueError:
            raise DataError(f"{where}: rank {rank!r} / score {score!r} are not numbers") from None
        ranks = rows.setdefault(qid, {})
        if r in ranks:
            raise DataError(f"{where}: query {qid} has rank {r} twice")
        ranks[r] = RunEntry(did, s)
    return {qid: [ranks[r] for r in sorted(ranks)] for qid, ranks in rows.items()}


def write_trec_run(path: PathLike, qids: Sequence[str], retrieved: np.ndarray | Sequence[Sequence],
                   scores: np.ndarray | Sequence[Sequence], run_id: str) -> int:
    """Write a TREC run file atomically, one line ``qid Q0 did rank score run_id`` per retrieved candidate.

    Args:
        qids: (Q,) query ids.
        retrieved: (Q, K) ranked dids (strings or hashed ints; -1 / "" entries are padding, skipped).
        scores: (Q, K) similarity scores aligned with ``retrieved``.
        run_id: run name, written in column 6 (no whitespace).
    Returns:
        The number of lines written.
    """
    ret = np.asarray(retrieved, dtype=object)
    sc = np.asarray(scores, dtype=np.float64)
    if ret.ndim != 2 or sc.shape != ret.shape or ret.shape[0] != len(qids):
        raise DataError(f"TREC run {path}: need (Q, K) ids and scores for {len(qids)} queries, "
                        f"got ids {ret.shape} and scores {sc.shape}")
    if not run_id or any(ch.isspace() for ch in run_id):
        raise DataError(f"TREC run {path}: run_id must be a non-empty word, got {run_id!r}")
    n = 0
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as fh:
        for qid, row, srow in zip(qids, ret, sc):
            rank = 0
            for did, score in zip(row, srow):
                did_s = _did_str(did)
                if did_s is None:
                    continue
                rank += 1
                fh.write(f"{qid} Q0 {did_s} {rank} {score:.6f} {run_id}\n")
                n += 1
    return n
