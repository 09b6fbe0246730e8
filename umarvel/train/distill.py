"""Stage 5: reranker distillation over the fused teacher lists (method spec 2.4, decision D11).

Teacher file (official local ``fusion_results.jsonl``, format and reader in :mod:`umarvel.data.runfiles`): one JSON line
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

from umarvel.data.runfiles import TeacherRow, iter_teacher
from umarvel.errors import ConfigError, DataError
from umarvel.train import losses as L
from umarvel.train.datasets import MbeirTrainDataset, TrainExample, _build_mbeir

logger = logging.getLogger(__name__)


@dataclass
class MbeirDistillDataset:
    """Distillation rows: a query and its K teacher candidates with fused scores."""

    base: MbeirTrainDataset
    rows: list[TeacherRow]
    k: int

    def __len__(self) -> int:
        return len(self.base)

    def example(self, index: int, rng: random.Random) -> TrainExample:
        """Row ``index``: query (stage-3 draws), the first K teacher candidates and their fused scores."""
        ex = self.base.example(index, rng)
        row = self.rows[index]
        dids = row.dids[:self.k]
        return TrainExample(ex.query, self.base.candidate_sides(dids), query_id=ex.query_id, candidate_ids=dids,
                            scores=row.scores[:self.k])

    def length_hint(self, index: int) -> int:
        return self.base.length_hint(index) * self.k


def attach_teacher(base: MbeirTrainDataset, path: str | Path, k: int) -> MbeirDistillDataset:
    """Read the teacher file aligned with ``base``'s rows, keeping the first ``k`` candidates of each.

    Raises:
        DataError: naming ``file:line`` for a malformed line, a misaligned qid, fewer than ``k`` candidates,
            a did missing from the train pool, or fewer lines than rows.
    """
    rows: list[TeacherRow] = []
    qids = [q.qid for q in base.queries]  # max_examples: only the first rows are read
    for row in iter_teacher(path, qids, follows=base.path, exact=False, provenance=False):
        if len(row.dids) < k:
            raise DataError(f"{row.where}: query {row.qid} has {len(row.dids)} teacher candidates, fewer than "
                            f"data.num_candidates={k}")
        missing = [d for d in row.dids[:k] if d not in base.pool]
        if missing:
            raise DataError(f"{row.where}: teacher did(s) {missing[:3]} of query {row.qid} are not in the train "
                            "pool")
        rows.append(row)
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
