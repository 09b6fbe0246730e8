"""Exact top-k over a candidate matrix split across ``torch.distributed`` ranks (torchrun).

Each rank holds (or memory-maps) only its contiguous shard of the candidates, searches it with the same
:class:`~umarvel.eval.search.TorchSearcher` as a single-process search, and the ranks' local top-k lists
are gathered and merged exactly with :func:`~umarvel.eval.search.merge_topk` -- the merge used by
:class:`~umarvel.eval.search.ShardedTorchSearcher` (several devices in one process, the M-BEIR global
search). Shard boundaries are the same ``linspace`` split as there, so the result (scores, indices, tie
order: score desc, lower global index first) equals a single-process search of the whole matrix.

Every rank must call :meth:`RankShardedSearcher.search` with the same queries (a collective); every rank
gets the merged result. Without an initialised process group it is a plain single-device search.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from umarvel.dist import get_rank, get_world_size, is_dist
from umarvel.errors import DataError
from umarvel.eval.search import (PAD_INDEX, PAD_SCORE, RowBlocks, TorchSearcher, _check_k, _pad, merge_topk,
                                 shard_bounds)

logger = logging.getLogger(__name__)

#: Index value of a padding slot while merging (larger than any row; distinct per slot of one rank).
_SENTINEL = torch.iinfo(torch.int64).max


class RankShardedSearcher:
    """This rank's shard of the candidates; :meth:`search` returns the exact global top-k on every rank.

    Args:
        candidates: the whole ``(N, D)`` matrix as anything :class:`RowBlocks` accepts (memmaps are only
            read in this rank's rows).
        device: this rank's search device (default cuda:<current> if available, else cpu).
        kwargs: passed to :class:`TorchSearcher` (``resident``, ``q_tile``, ``c_tile``...).
    """

    def __init__(self, candidates: Any, device: Any = None, **kwargs: Any):
        source = candidates if isinstance(candidates, RowBlocks) else RowBlocks(candidates)
        self.n = len(source)
        if self.n == 0:
            raise DataError("candidate pool is empty: nothing to search")
        self.rank, self.world = get_rank(), get_world_size()
        bounds = shard_bounds(self.n, self.world)
        self.lo, self.hi = bounds[self.rank], bounds[self.rank + 1]
        self.dim = source.dim
        self.local: TorchSearcher | None = None
        if self.hi > self.lo:
            self.local = TorchSearcher(source.rows(self.lo, self.hi), device=device, **kwargs)
        logger.info("rank %d of %d searches rows %d..%d of %d", self.rank, self.world, self.lo, self.hi, self.n)

    def __len__(self) -> int:
        return self.n

    def local_topk(self, queries: Any, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This shard's top-k with global row indices: ``(Q, k)`` float32 and int64 CPU tensors, padded
        with ``-inf`` / distinct sentinel indices."""
        q = queries if torch.is_tensor(queries) else np.asarray(queries)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise DataError(f"queries must be (Q, {self.dim}), got shape {tuple(q.shape)}")
        nq = int(q.shape[0])
        vals = torch.full((nq, k), PAD_SCORE, dtype=torch.float32)
        idx = (_SENTINEL - torch.arange(k, dtype=torch.int64)).expand(nq, k).clone()
        if self.local is not None and nq:
            v, i = self.local.search_tensors(q, k)
            m = v.shape[1]
            vals[:, :m], idx[:, :m] = v.float().cpu(), i.cpu() + self.lo
        return vals, idx

    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(Q, D)`` queries (the same on every rank) -> ``(Q, k)`` float32 scores, int64 indices (numpy,
        padded with ``-inf`` / ``-1`` when ``k > N``), identical on every rank."""
        _check_k(k)
        vals, idx = self.local_topk(queries, k)
        if is_dist() and self.world > 1:
            vals, idx = _all_gather_cat(vals, 1), _all_gather_cat(idx, 1)
        v, i = merge_topk(vals, idx, k)
        pad = i >= self.n
        v[pad], i[pad] = PAD_SCORE, PAD_INDEX
        return _pad(v.numpy(), i.numpy(), k)


def _all_gather_cat(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``all_gather`` of an equally shaped CPU tensor, concatenated along ``dim`` in rank order (on the
    backend's device: CUDA for nccl, CPU otherwise); returned on the CPU."""
    import torch.distributed as dist

    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = t.to(dev).contiguous()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return torch.cat(parts, dim=dim).cpu()
