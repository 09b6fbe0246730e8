"""Stage 5: reranker distillation over the fused teacher lists (method spec 2.4, decision D11).

Teacher file (written by :mod:`umarvel.pipelines.teacher`, official local ``fusion_results.jsonl``): one JSON line
per row of the distillation query file (the 10% union subset), same order, ``{qid, did: [K], score: [K]}``
(+ ``cosine``, ``p_yes``, ``task`` for provenance), the fused ``cos + w_task * P(yes)`` list best first.

A row becomes ``TrainExample(query, candidates = the first K dids, scores = their fused scores)``. The query is
built as in stages 3-4 (random positive and instruction from the example RNG; the positive only keys the
instruction and is then dropped, as the official collator does). The list may hold the query's own positive:
it stays an ordinary candidate with its fused score (golden c5). Layout: ``[B queries | candidate 1 of each |
... | candidate K of each]``; no gather, no in-batch negatives.

:class:`DistillObjective` (``loss.kind = distill_kl``): ``KL(softmax(teacher_scale * fused / sg(tau)) ||
softmax(cos / tau))`` averaged over queries (:func:`umarvel.train.losses.distill_kl`; ``distill_official``
selects the official ``log(softmax + 1e-8)`` form, D11 default ``log_softmax``).
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from umarvel.data.formatting import format_string
from umarvel.errors import ConfigError, DataError
from umarvel.train import losses as L
from umarvel.train.datasets import MbeirTrainDataset, Side, TrainExample, _build_mbeir
from umarvel.utils.io import iter_jsonl

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FusedRow:
    """One teacher line: the query id and its candidates best first with their fused scores."""

    qid: str
    dids: tuple[str, ...]
    scores: tuple[float, ...]


def parse_fused(rec: dict, where: str) -> FusedRow:
    """One teacher JSON object -> :class:`FusedRow` (DataError naming ``where``)."""
    qid, dids, scores = rec.get("qid"), rec.get("did"), rec.get("score")
    if not isinstance(qid, str):
        raise DataError(f"{where}: missing or non-string 'qid' (expected {{qid, did: [...], score: [...]}})")
    if not isinstance(dids, list) or not all(isinstance(d, str) for d in dids):
        raise DataError(f"{where}: 'did' must be a list of dids")
    if not isinstance(scores, list) or len(scores) != len(dids) or not all(
            isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores):
        raise DataError(f"{where}: 'score' must be a list of {len(dids)} numbers (one per did)")
    return FusedRow(qid, tuple(dids), tuple(float(s) for s in scores))


@dataclass
class MbeirDistillDataset:
    """Distillation rows: a query and its K teacher candidates with fused scores."""

    base: MbeirTrainDataset
    rows: list[FusedRow]
    k: int

    def __len__(self) -> int:
        return len(self.base)

    def example(self, index: int, rng: random.Random) -> TrainExample:
        """Row ``index``: query (stage-3 draws), the first K teacher candidates and their fused scores."""
        ex = self.base.example(index, rng)
        row = self.rows[index]
        dids = row.dids[:self.k]
        sides = []
        for did in dids:
            c = self.base.pool[did]
            sides.append(Side(self.base.truncate(format_string(c.text or "")), c.image))
        return TrainExample(ex.query, tuple(sides), query_id=ex.query_id, candidate_ids=dids,
                            scores=row.scores[:self.k])

    def length_hint(self, index: int) -> int:
        return self.base.length_hint(index) * self.k


def attach_teacher(base: MbeirTrainDataset, path: str | Path, k: int) -> MbeirDistillDataset:
    """Read the teacher file aligned with ``base``'s rows, keeping the first ``k`` candidates of each.

    Raises:
        DataError: naming ``file:line`` for a malformed line, a misaligned qid, fewer than ``k`` candidates,
            a did missing from the train pool, or fewer lines than rows.
    """
    rows: list[FusedRow] = []
    for lineno, rec in iter_jsonl(path):
        i = len(rows)
        if i >= len(base):
            break
        where = f"{path}:{lineno}"
        row = parse_fused(rec, where)
        q = base.queries[i]
        if row.qid != q.qid:
            raise DataError(f"{where}: qid {row.qid} but query row {i + 1} ({base.path}:{base.lines[i]}) is "
                            f"{q.qid}; the teacher file must follow the distillation query file's order")
        if len(row.dids) < k:
            raise DataError(f"{where}: query {q.qid} has {len(row.dids)} teacher candidates, fewer than "
                            f"data.num_candidates={k}")
        missing = [d for d in row.dids[:k] if d not in base.pool]
        if missing:
            raise DataError(f"{where}: teacher did(s) {missing[:3]} of query {q.qid} are not in the train pool")
        rows.append(row)
    if len(rows) < len(base):
        raise DataError(f"{path}: {len(rows)} teacher lines for {len(base)} query rows of {base.path}")
    return MbeirDistillDataset(base, rows, k)


def build_distill_dataset(data, tokenizer) -> MbeirDistillDataset:
    """``data.kind = mbeir_distill``: ``data.path`` = the distillation query file (10% union subset),
    ``data.scores`` = its teacher file, ``data.num_candidates`` = K (published 50)."""
    if not data.scores:
        raise ConfigError("data.scores (the stage-5 teacher file written by 'umarvel teacher') is required for "
                          "data.kind=mbeir_distill")
    if data.num_candidates < 1:
        raise ConfigError(f"data.num_candidates must be >= 1 for mbeir_distill, got {data.num_candidates}")
    base = _build_mbeir(data, tokenizer)
    ds = attach_teacher(base, data.scores, data.num_candidates)
    logger.info("stage-5 distillation: %d rows x %d teacher candidates from %s", len(ds), ds.k, data.scores)
    return ds


class DistillObjective:
    """``loss.kind = distill_kl``: per-query KL between the teacher and student candidate distributions.

    Args:
        loss_cfg: :class:`umarvel.train.config.LossSection` (``distill_official``, ``teacher_scale``).
    """

    def __init__(self, loss_cfg):
        self.cfg = loss_cfg

    def __call__(self, groups: list[Tensor], batch, temperature: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Loss of one device batch.

        Args:
            groups: ``[q (B, D), candidate-1 block (B, D), ..., candidate-K block (B, D)]`` raw embeddings.
            batch: the :class:`~umarvel.train.batching.StepBatch`; ``batch.scores`` (B, K) fused teacher scores.
            temperature: 0-d tau (the teacher side uses it detached).
        Returns:
            ``(0-d loss, {"teacher_top1_agreement": fraction})``.
        """
        if batch.scores is None:
            raise DataError("loss.kind=distill_kl needs teacher scores (data.kind=mbeir_distill)")
        q = groups[0]
        cands = torch.stack(groups[1:], dim=1)  # (B, K, D)
        student = L.per_query_scores(q, cands)  # (B, K) cosines
        teacher = batch.scores.to(q.device)
        if teacher.shape != student.shape:
            raise DataError(f"teacher scores {tuple(teacher.shape)} do not match the batch {tuple(student.shape)}")
        loss = L.distill_kl(student, teacher, temperature, official=self.cfg.distill_official,
                            teacher_scale=self.cfg.teacher_scale)
        with torch.no_grad():
            agree = (student.argmax(-1) == teacher.argmax(-1)).float().mean().item()
        return loss, {"teacher_top1_agreement": agree}


__all__ = ["FusedRow", "parse_fused", "MbeirDistillDataset", "attach_teacher", "build_distill_dataset",
           "DistillObjective"]
