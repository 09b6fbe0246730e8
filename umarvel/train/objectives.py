"""Objectives: layout embeddings of one device batch -> scalar loss (+ metrics), cross-device gather included.

An objective gets the layout blocks ``groups = [q (B, D), column-1 (B, D), ..., column-G (B, D)]`` (raw mean
embeddings, float32), the :class:`~umarvel.train.batching.StepBatch` (ids, teacher scores) and tau, and
returns ``(loss, metrics)``. Losses themselves are the pure functions of :mod:`umarvel.train.losses`;
gathering goes only through :func:`umarvel.dist.all_gather_with_grad` (identity single-process).

Registered in :data:`OBJECTIVES` by ``loss.kind``. ``info_nce`` covers stages 1-3 (one column) and stage 4
(columns 2..G are the K hard negatives, gathered and laid out slot-major). Stage 5 adds ``distill_kl``.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from umarvel import dist as udist
from umarvel.errors import ConfigError
from umarvel.train import losses as L
from umarvel.train.distill import DistillObjective


class InfoNCEObjective:
    """InfoNCE q->c over gathered positives (+ gathered hard negatives), optional c->q term, D12 masks.

    Args:
        loss_cfg: :class:`umarvel.train.config.LossSection` (``bidirectional``, ``mask_duplicates``, ``gather``).
    """

    def __init__(self, loss_cfg):
        self.cfg = loss_cfg

    def _gather(self, t: Tensor) -> Tensor:
        return udist.all_gather_with_grad(t) if self.cfg.gather else t

    def _gather_ids(self, ids: list) -> list:
        if not self.cfg.gather or not udist.is_dist():
            return list(ids)
        return [x for part in udist.all_gather_object(list(ids)) for x in part]

    def __call__(self, groups: list[Tensor], batch, temperature: Tensor) -> tuple[Tensor, dict[str, float]]:
        q, c, negs = groups[0], groups[1], groups[2:]
        b = q.shape[0]
        c_all = self._gather(c)  # (N, D)
        labels = (torch.arange(b, device=q.device) + (udist.local_slice_offset(b) if c_all.shape[0] != b else 0))
        hard = None
        if negs:
            local = torch.stack(negs, 0)  # (K, B, D)
            hard = L.hard_negatives_from_gathered(self._gather(L.gather_ready_hard_negatives(local)))  # (K, N, D)
        mask = mask_c2q = None
        all_q = self._gather(q) if self.cfg.bidirectional and c_all.shape[0] != b else None
        if self.cfg.mask_duplicates:
            pos_ids = self._gather_ids(batch.candidate_ids[:b])
            cols = list(pos_ids)
            for k in range(len(negs)):
                blk = batch.candidate_ids[(k + 1) * b:(k + 2) * b]
                cols += self._gather_ids(blk)
            qids = batch.query_ids if _same_space(batch) else None
            mask = L.duplicate_mask(cols, labels, query_ids=qids).to(q.device)
            if self.cfg.bidirectional:
                all_qids = self._gather_ids(batch.query_ids)
                mask_c2q = L.duplicate_mask_c2q(all_qids, pos_ids, labels, same_id_space=_same_space(batch))
                mask_c2q = mask_c2q.to(q.device)
        loss = L.info_nce(q, c_all, temperature, hard_negatives=hard, labels=labels, mask=mask,
                          bidirectional=self.cfg.bidirectional, all_queries=all_q, mask_c2q=mask_c2q)
        with torch.no_grad():
            logits = L.similarity_logits(q, c_all, 1.0)
            acc = (logits.argmax(-1) == labels).float().mean().item()
        return loss, {"accuracy": acc}


def _same_space(batch) -> bool:
    """Query and candidate ids share one id space (NLI texts) when both carry the same prefix scheme."""
    return all(isinstance(x, str) and x.startswith("text:") for x in batch.query_ids if x is not None) and \
        any(x is not None for x in batch.query_ids)


def _distill_objective(loss_cfg):
    """Stage 5 (imported on first use)."""
    return DistillObjective(loss_cfg)


#: ``loss.kind`` -> objective class (constructed with the LossSection).
OBJECTIVES: dict[str, Callable] = {"info_nce": InfoNCEObjective, "distill_kl": _distill_objective}


def build_objective(loss_cfg):
    """The objective of ``loss_cfg.kind``."""
    try:
        return OBJECTIVES[loss_cfg.kind](loss_cfg)
    except KeyError:
        raise ConfigError(f"unknown loss.kind {loss_cfg.kind!r}; known: {sorted(OBJECTIVES)}") from None
