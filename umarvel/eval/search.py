"""Exact (and approximate) inner-product top-k search that never materialises the full score matrix.

One entry point, :func:`make_searcher` (build once, then ``.search(queries, k)`` any number of times), with
interchangeable backends:

- ``"torch"`` (default): tiled ``queries @ candidates.T`` plus a per-tile ``topk`` and an exact merge.
  On CUDA the matmul runs in fp16/bf16 with fp32 accumulation and fp32 scores (``torch.mm(...,
  out_dtype=float32)`` where available, else half-precision scores cast to fp32); on CPU in fp32.
  Candidates may be float16 numpy memmaps (from :mod:`umarvel.eval.cache`): they are streamed in
  chunks of ``chunk_bytes`` and converted to the compute dtype one chunk at a time. With several
  devices (``devices=[...]`` or ``device="cuda"`` with several visible GPUs) the candidates are split
  into contiguous shards, each device computes a local top-k, and the results are merged exactly.
- ``"faiss"``: ``faiss.IndexFlatIP`` (exact, CPU; holds an fp32 copy of the candidates).
- ``"faiss-ivf"`` / ``"faiss-hnsw"``: approximate faiss indexes; :func:`ann_recall` reports their recall@k
  against the exact result.

Result contract (every backend): ``(scores, indices)`` numpy arrays of shape ``(Q, k)``, ``float32`` and
``int64``, each row sorted by score descending, **ties broken by lower candidate index first**. For the
exact backends this also decides *which* tied candidates are kept when a tie straddles the k-th place
(cost: one ``topk(k + 1)`` per tile and a vectorised fix-up of the rare rows whose k-th and (k+1)-th
scores are equal; for faiss, a ``range_search`` on those rows). Scores of different tilings may differ in
the last bits (BLAS blocking), so "equal" means bit-equal scores as computed. When ``k`` exceeds the
number of candidates, rows are padded with index ``-1`` and score ``-inf``. NaN inputs are not checked.

``normalize=True`` (what the evaluation passes for its float16 cache vectors) re-normalises every candidate
and query to unit length in fp32 before scoring, so the scores are cosines of the stored directions: an fp16
round trip changes a unit vector's norm by up to ~1e-3 relative, enough to reorder near-ties of a plain inner
product. The torch backend scales each fp32 score tile by the fp32 inverse norms (the vectors themselves
stay in their storage / compute dtype); faiss normalises its fp32 copy.
"""
from __future__ import annotations

import logging
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import numpy as np
import torch

from umarvel.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

BACKENDS = ("torch", "faiss", "faiss-ivf", "faiss-hnsw")
PAD_INDEX = -1
PAD_SCORE = float("-inf")

# CPU defaults: a 1024 x 1024 fp32 score tile (4 MiB) stays in the L2 caches of the 2-core dev machine,
# so the per-tile ``amax`` of the pruned merge is nearly free and the matmul runs at full speed.
_CPU_TILE_BYTES = 4 << 20
_CPU_Q_TILE = 1024
_CPU_CHUNK_BYTES = 256 << 20
# CUDA defaults: large tiles keep tensor cores busy; 4 GiB of fp32 scores per tile.
_CUDA_TILE_BYTES = 4 << 30
_CUDA_Q_TILE = 16384
_CUDA_CHUNK_BYTES = 2 << 30


# ----------------------------------------------------------------------------------------------
# Candidate row sources
# ----------------------------------------------------------------------------------------------
class RowBlocks:
    """Read-only view of a candidate matrix stored as consecutive blocks (no copy is made).

    Accepts a numpy array / memmap, a torch tensor, a list of those (concatenated row-wise), or any
    object with a ``vector_blocks()`` method returning such a list (e.g. ``CachedEmbeddings``).
    """

    def __init__(self, candidates: Any):
        if hasattr(candidates, "vector_blocks"):
            blocks = list(candidates.vector_blocks())
        elif isinstance(candidates, (list, tuple)):
            blocks = list(candidates)
        elif torch.is_tensor(candidates):
            blocks = [candidates]
        else:
            blocks = [np.asarray(candidates)]
        blocks = [b if torch.is_tensor(b) else np.asarray(b) for b in blocks]
        for b in blocks:
            if b.ndim != 2:
                raise DataError(f"candidates must be 2-D (N, D), got a block of shape {tuple(b.shape)}")
        dims = {int(b.shape[1]) for b in blocks if b.shape[0] > 0}
        if len(dims) > 1:
            raise DataError(f"candidate blocks disagree on the embedding dimension: {sorted(dims)}")
        self.blocks = [b for b in blocks if b.shape[0] > 0]
        self.dim = dims.pop() if dims else (int(blocks[0].shape[1]) if blocks else 0)
        self.offsets = np.cumsum([0] + [int(b.shape[0]) for b in self.blocks]).tolist()

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def chunks(self, max_rows: int, start: int = 0, stop: int | None = None):
        """Yield ``(global_row_offset, block_slice)`` pieces of at most ``max_rows`` rows, each inside one block.

        Restricted to global rows ``[start, stop)``; a slice is ``(rows, D)`` numpy or torch, not copied.
        """
        stop = len(self) if stop is None else stop
        for b, off in zip(self.blocks, self.offsets):
            lo, hi = max(start, off), min(stop, off + int(b.shape[0]))
            for a in range(lo, hi, max_rows):
                yield a, b[a - off: min(hi, a + max_rows) - off]

    def rows(self, lo: int, hi: int) -> "RowBlocks":
        """A view of global rows ``[lo, hi)`` (no copy)."""
        return RowBlocks([p for _, p in self.chunks(hi - lo, lo, hi)])


def shard_bounds(n: int, world: int) -> list[int]:
    """Row boundaries of ``world`` contiguous shards of ``n`` rows (``world + 1`` values); the split of both
    :class:`ShardedTorchSearcher` (devices) and :class:`umarvel.eval.dist_search.RankShardedSearcher` (ranks)."""
    return np.linspace(0, n, world + 1).astype(int).tolist()


def _to_device(x: Any, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Numpy / torch ``(n, D)`` -> contiguous torch ``(n, D)`` of ``dtype`` on ``device`` (copy only as needed)."""
    if torch.is_tensor(x):
        t = x
    else:
        with warnings.catch_warnings():  # read-only memmaps: the tensor is only ever read
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(np.ascontiguousarray(x))
    if device.type == "cuda" and t.device.type == "cpu":
        t = t.pin_memory() if t.numel() * t.element_size() <= (1 << 30) else t
        t = t.to(device, non_blocking=True)
    return t.to(device=device, dtype=dtype).contiguous()


def _f32(x: Any) -> np.ndarray:
    """``(n, D)`` numpy/torch -> C-contiguous float32 numpy."""
    if torch.is_tensor(x):
        x = x.detach().float().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def gather_rows(source: RowBlocks, rows: np.ndarray) -> np.ndarray:
    """Rows ``(m,)`` (sorted global indices) of a block concatenation -> ``(m, D)`` float32."""
    out = []
    for b, off in zip(source.blocks, source.offsets):
        sel = rows[(rows >= off) & (rows < off + b.shape[0])] - off
        if len(sel):
            out.append(_f32(b[torch.as_tensor(sel)] if torch.is_tensor(b) else b[sel]))
    return np.concatenate(out)


def _as_queries(queries: Any) -> Any:
    """Validate queries ``(Q, D)`` (numpy or torch) and return them unchanged."""
    q = queries if torch.is_tensor(queries) else np.asarray(queries)
    if q.ndim != 2:
        raise DataError(f"queries must be 2-D (Q, D), got shape {tuple(q.shape)}")
    return q


# ----------------------------------------------------------------------------------------------
# Top-k kernels (exact, with deterministic tie-breaking)
# ----------------------------------------------------------------------------------------------
def tile_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row of a score tile, ties at the k-th place resolved to the lowest column.

    Args:
        scores: ``(q, T)`` float32.
        k: number wanted (``min(k, T)`` are returned).
    Returns:
        ``(values, columns)``: ``(q, min(k, T))`` float32 and int64, the lexicographically best
        (score desc, column asc) set; the order inside a row is by score only (ties unordered).
    """
    q, t = scores.shape
    if t <= k:
        cols = torch.arange(t, device=scores.device).expand(q, t)
        return scores, cols
    vals, cols = torch.topk(scores, k + 1, dim=1, largest=True, sorted=True)
    tied = vals[:, k - 1] == vals[:, k]
    vals, cols = vals[:, :k], cols[:, :k]
    if bool(tied.any()):
        vals, cols = vals.clone(), cols.clone()
        rows = tied.nonzero().squeeze(1)
        sub = scores[rows]                                  # (r, T)
        thr = vals[rows, k - 1:k]                           # (r, 1): the k-th score
        gt = sub > thr
        eq = sub == thr
        need = k - gt.sum(dim=1, keepdim=True)
        keep = gt | (eq & (eq.cumsum(dim=1) <= need))       # exactly k per row, lowest tied columns
        sel = keep.nonzero()[:, 1].view(len(rows), k)
        vals[rows] = sub.gather(1, sel)
        cols[rows] = sel
    return vals, cols


def block_topk(scores: torch.Tensor, k: int, block: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Unsorted top-k of each row via block maxima: one ``amax`` pass instead of a full-width ``topk``.

    Exact: the k-th largest score is >= the k-th largest block maximum ``t`` (k blocks each hold an element
    >= t), so every top-k element lies in a block whose maximum is >= t, i.e. among the k best blocks; the
    final ``topk`` runs over those ``k * block`` gathered scores only. Falls back to ``torch.topk`` when the
    row does not split into at least ``2k`` whole blocks.

    Args:
        scores: (q, T) tile; k: results per row; block: block width.
    Returns:
        (q, k) values and column indices (int64), unsorted.
    """
    q, t = scores.shape
    nb = t // block if block > 1 else 0
    if nb < 2 * k or t % block:
        return torch.topk(scores, k, dim=1, sorted=False)
    bmax = scores.view(q, nb, block).amax(dim=2)                              # (q, nb)
    _, bidx = torch.topk(bmax, k, dim=1, sorted=False)                          # (q, k) best blocks
    cols = (bidx.unsqueeze(2) * block + torch.arange(block, device=scores.device)).reshape(q, k * block)
    v, pos = torch.topk(scores.gather(1, cols), k, dim=1, sorted=False)
    return v, cols.gather(1, pos)


def merge_topk(values: torch.Tensor, indices: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact lexicographic (score desc, index asc) top-k of candidate lists.

    Args:
        values: ``(q, m)`` float32; indices: ``(q, m)`` int64, distinct within a row (no padding).
    Returns:
        ``(q, min(k, m))`` values and indices, sorted by score desc then index asc.
    """
    order = indices.argsort(dim=1)
    values, indices = values.gather(1, order), indices.gather(1, order)
    values, order = values.sort(dim=1, descending=True, stable=True)
    return values[:, :k].contiguous(), indices.gather(1, order[:, :k])


def _update_pruned(best_v: torch.Tensor, best_i: torch.Tensor, scores: torch.Tensor, offset: int, k: int) -> None:
    """Merge one score tile into the running top-k, touching only rows whose max beats their k-th best.

    Args:
        best_v, best_i: ``(q, k)`` running state (lexicographic order; views updated in place).
        scores: ``(q, T)`` float32 tile whose column 0 is candidate ``offset``.
    A later candidate with a score *equal* to the k-th best loses the tie (higher index), so the strict
    ``>`` test is exact. Costs one ``amax`` pass per tile; ``topk`` runs only on the rows that change
    (a shrinking fraction as the scan proceeds), which is what makes the CPU path as fast as faiss.
    """
    rows = (scores.amax(dim=1) > best_v[:, k - 1]).nonzero().squeeze(1)
    if rows.numel() == 0:
        return
    full = rows.numel() == scores.shape[0]
    sub = scores if full else scores.index_select(0, rows)
    v, i = tile_topk(sub, k)
    old_v = best_v if full else best_v.index_select(0, rows)
    old_i = best_i if full else best_i.index_select(0, rows)
    nv, ni = merge_topk(torch.cat([old_v, v], 1), torch.cat([old_i, i + offset], 1), k)
    if full:
        best_v.copy_(nv)
        best_i.copy_(ni)
    else:
        best_v.index_copy_(0, rows, nv)
        best_i.index_copy_(0, rows, ni)


def _pad(values: np.ndarray, indices: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad ``(Q, m)`` results to ``(Q, k)`` with score ``-inf`` / index ``-1``."""
    q, m = values.shape
    if m >= k:
        return values, indices
    pv = np.full((q, k), PAD_SCORE, dtype=np.float32)
    pi = np.full((q, k), PAD_INDEX, dtype=np.int64)
    pv[:, :m], pi[:, :m] = values, indices
    return pv, pi


_MM_OUT_DTYPE_OK: dict[str, bool] = {}
_NORM_ROWS = 1 << 16


def inverse_norms(x: torch.Tensor) -> torch.Tensor:
    """``1 / ||row||`` of ``(n, D)`` rows computed in fp32 (blockwise, no full fp32 copy): ``(n,)`` float32.

    A zero row gets 0 (its scores stay 0)."""
    out = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    for a in range(0, x.shape[0], _NORM_ROWS):
        n = torch.linalg.vector_norm(x[a:a + _NORM_ROWS].float(), dim=1)
        out[a:a + _NORM_ROWS] = torch.where(n > 0, 1.0 / n, torch.zeros_like(n))
    return out


def unit_rows_fp32(x: Any) -> np.ndarray:
    """``(n, D)`` numpy / torch (any float dtype, e.g. float16 cache vectors) -> float32 rows of unit length."""
    a = _f32(x)
    n = np.linalg.norm(a, axis=1, keepdims=True)
    return a / np.where(n > 0, n, 1.0)


def tile_scores(q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Inner products ``(q, D) x (T, D) -> (q, T)`` float32.

    Half-precision inputs use ``torch.mm(..., out_dtype=float32)`` (fp32 accumulate and fp32 output)
    when the installed torch supports it, else an fp32 product of the upcast tiles (same values).
    """
    if q.dtype == torch.float32:
        return q @ c.T
    key = f"{q.device.type}:{q.dtype}"
    if _MM_OUT_DTYPE_OK.get(key, True):
        try:
            return torch.mm(q, c.T, out_dtype=torch.float32)
        except (RuntimeError, TypeError, NotImplementedError):
            _MM_OUT_DTYPE_OK[key] = False
            logger.info("torch.mm(out_dtype=float32) unavailable for %s; using %s scores", key, q.dtype)
    return q.float() @ c.float().T  # exact fp32 scores of the half-precision vectors


# ----------------------------------------------------------------------------------------------
# Torch backend
# ----------------------------------------------------------------------------------------------
def _default_dtype(device: torch.device, source: RowBlocks) -> torch.dtype:
    """fp32 on CPU; on CUDA fp16 when the candidates are fp16 (exact upload), else bf16."""
    if device.type != "cuda":
        return torch.float32
    first = source.blocks[0] if source.blocks else None
    if first is not None and first.dtype in (np.float16, torch.float16):
        return torch.float16
    return torch.bfloat16


class TorchSearcher:
    """Exact tiled search of one candidate set on one device.

    Candidates are kept where they are (host memmap / array) and streamed in chunks, unless
    ``resident=True`` (or they already live on ``device``), in which case they are uploaded once
    in the compute dtype and reused across :meth:`search` calls.
    """

    def __init__(self, candidates: Any, device: str | torch.device | None = None,
                 dtype: torch.dtype | str | None = None, q_tile: int | None = None,
                 c_tile: int | None = None, chunk_bytes: int | None = None,
                 tile_bytes: int | None = None, resident: bool | None = None,
                 prune: bool | None = None, select: str | None = None, margin: int = 64,
                 block: int = 1, normalize: bool = False):
        self.source = candidates if isinstance(candidates, RowBlocks) else RowBlocks(candidates)
        self.normalize = bool(normalize)
        self._resident_inv: dict[int, torch.Tensor] = {}
        if len(self.source) == 0:
            raise DataError("candidate pool is empty: nothing to search")
        self.device = torch.device(device if device is not None else
                                   ("cuda" if torch.cuda.is_available() else "cpu"))
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        self.dtype = dtype or _default_dtype(self.device, self.source)
        cuda = self.device.type == "cuda"
        self.prune = (not cuda) if prune is None else prune
        self.q_tile = q_tile or (_CUDA_Q_TILE if cuda else _CPU_Q_TILE)
        tb = tile_bytes or (_CUDA_TILE_BYTES if cuda else _CPU_TILE_BYTES)
        self.c_tile = c_tile or max(256, (tb // (4 * self.q_tile)) // 256 * 256)
        cb = chunk_bytes or (_CUDA_CHUNK_BYTES if cuda else _CPU_CHUNK_BYTES)
        elem = torch.empty((), dtype=self.dtype).element_size()
        self.chunk_rows = max(self.c_tile, (cb // (elem * max(1, self.source.dim))) // self.c_tile * self.c_tile)
        on_device = all(torch.is_tensor(b) and b.device == self.device and b.dtype == self.dtype
                        for b in self.source.blocks)
        self._resident: list[tuple[int, torch.Tensor]] | None = None
        if select not in (None, "exact", "certified"):
            raise ConfigError(f"select must be 'exact' or 'certified', got {select!r}")
        if select is None:
            # Measured on an H200 (bench/RESULTS.md): certified fp16 selection 23.8 s (27.3 s with block
            # pruning) vs 24.4 s for fp32 scores on the full M-BEIR global search: not worth being the default.
            select = "exact"
        if select == "certified" and self.dtype != torch.float16:
            raise ConfigError("select='certified' needs float16 candidates (dtype=torch.float16)")
        self.select, self.margin, self.block = select, int(margin), int(block)
        if on_device:
            self._resident = [(off, b) for b, off in zip(self.source.blocks, self.source.offsets)]
        elif resident:
            self._resident = [(off, _to_device(piece, self.device, self.dtype))
                              for off, piece in self.source.chunks(self.chunk_rows)]

    def __len__(self) -> int:
        return len(self.source)

    def _chunks(self):
        """Yield ``(row_offset, (rows, D) tensor on device in the compute dtype)``."""
        if self._resident is not None:
            yield from self._resident
            return
        for off, piece in self.source.chunks(self.chunk_rows):
            yield off, _to_device(piece, self.device, self.dtype)

    def _chunk_inv(self, off: int, chunk: torch.Tensor) -> torch.Tensor | None:
        """fp32 inverse norms of a chunk's rows (``normalize``), cached for resident chunks; else None."""
        if not self.normalize:
            return None
        if self._resident is None:
            return inverse_norms(chunk)
        if off not in self._resident_inv:
            self._resident_inv[off] = inverse_norms(chunk)
        return self._resident_inv[off]

    def _query_tensor(self, queries: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Queries on the device in the compute dtype, and (``normalize``) their fp32 inverse norms there:
        the rows are normalised in fp32 first, the inverse norms correct the compute-dtype rounding."""
        if not self.normalize:
            return _to_device(queries, self.device, self.dtype), None
        q32 = _to_device(queries, self.device, torch.float32)
        q32 = q32 * inverse_norms(q32).unsqueeze(1)
        qd = q32.to(self.dtype)
        return qd, inverse_norms(qd)

    @staticmethod
    def _scaled(scores: torch.Tensor, q_inv: torch.Tensor | None, c_inv: torch.Tensor | None) -> torch.Tensor:
        """``(q, T)`` fp32 scores times the row / column inverse norms (cosines); unchanged without them."""
        if q_inv is None:
            return scores
        return scores * q_inv.unsqueeze(1) * c_inv.unsqueeze(0)

    def search_tensors(self, queries: Any, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k on this device.

        Args:
            queries: ``(Q, D)`` numpy / torch.
        Returns:
            ``(Q, min(k, N))`` float32 scores and int64 indices (device tensors), lexicographic order.
        """
        queries = _as_queries(queries)
        if queries.shape[1] != self.source.dim:
            raise DataError(f"query dim {queries.shape[1]} != candidate dim {self.source.dim}")
        nq = int(queries.shape[0])
        qd, q_inv = self._query_tensor(queries)
        if self.select == "certified" and nq > 0:
            return self._search_certified(qd, k, q_inv)
        return self._search_exact(qd, k, q_inv)

    def _search_exact(self, qd: torch.Tensor, k: int,
                      q_inv: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32-score tiled search with the running lexicographic merge. ``qd``: (Q, D) on device;
        ``q_inv``: (Q,) fp32 inverse norms (``normalize``) or None."""
        nq = int(qd.shape[0])
        best_v = torch.full((nq, k), PAD_SCORE, dtype=torch.float32, device=self.device)
        best_i = (torch.iinfo(torch.int64).max - torch.arange(k, device=self.device)).expand(nq, k).clone()
        for off, chunk in self._chunks():
            c_inv = self._chunk_inv(off, chunk)
            for q0 in range(0, nq, self.q_tile):
                qt, sv, si = qd[q0:q0 + self.q_tile], best_v[q0:q0 + self.q_tile], best_i[q0:q0 + self.q_tile]
                qi = None if q_inv is None else q_inv[q0:q0 + self.q_tile]

                def tile(t0: int) -> torch.Tensor:
                    ci = None if c_inv is None else c_inv[t0:t0 + self.c_tile]
                    return self._scaled(tile_scores(qt, chunk[t0:t0 + self.c_tile]), qi, ci)

                if self.prune:
                    for t0 in range(0, chunk.shape[0], self.c_tile):
                        _update_pruned(sv, si, tile(t0), off + t0, k)
                    continue
                vals, idxs = [sv], [si]
                for t0 in range(0, chunk.shape[0], self.c_tile):
                    v, i = tile_topk(tile(t0), k)
                    vals.append(v)
                    idxs.append(i + (off + t0))
                nv, ni = merge_topk(torch.cat(vals, 1), torch.cat(idxs, 1), k)
                sv.copy_(nv)
                si.copy_(ni)
        m = min(k, len(self))
        return best_v[:, :m], best_i[:, :m]

    def _search_certified(self, qd: torch.Tensor, k: int,
                          q_inv: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Half-precision selection, fp32 rescoring, and a proof of exactness per query row.

        1. Scores are computed as float16 tiles (fp32 accumulation inside the GEMM, one correctly rounded
           fp16 output, half the memory traffic of fp32 scores) and the top ``k2 = k + margin`` of each
           row are kept with unsorted ``topk`` and a running merge.
        2. The ``k2`` survivors are rescored exactly in fp32 from the same fp16 vectors and ordered
           lexicographically (score desc, index asc).
        3. Certificate: every candidate not kept has an fp16 score <= ``t`` (the row's k2-th fp16 score),
           hence an exact score <= ``t + eps`` with ``eps`` = twice the fp16 rounding bound. A row whose
           exact k-th score exceeds ``t + eps`` is provably the exact top-k; the (rare) other rows are
           recomputed with the fp32-score path. The result therefore equals :meth:`_search_exact`.
           With ``normalize`` the selection runs on the raw fp16 scores, the rescoring on cosines, and the
           bound ``t + eps`` is scaled by the extreme inverse norms of the queries and candidates.
        """
        nq, n = int(qd.shape[0]), len(self)
        k2 = min(k + self.margin, n)
        sel_v = torch.full((nq, k2), float("-inf"), dtype=torch.float16, device=self.device)
        sel_i = torch.full((nq, k2), -1, dtype=torch.int64, device=self.device)
        chunks = list(self._chunks()) if self._resident is not None else None
        reduced = torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False  # fp32 accumulation
        inv_lo, inv_hi = float("inf"), 0.0  # extreme candidate inverse norms (normalize)
        try:
            for off, chunk in (chunks if chunks is not None else self._chunks()):
                c_inv = self._chunk_inv(off, chunk)
                if c_inv is not None:
                    inv_lo, inv_hi = min(inv_lo, float(c_inv.min())), max(inv_hi, float(c_inv.max()))
                for q0 in range(0, nq, self.q_tile):
                    qt = qd[q0:q0 + self.q_tile]
                    vals, idxs = [sel_v[q0:q0 + self.q_tile]], [sel_i[q0:q0 + self.q_tile]]
                    for t0 in range(0, chunk.shape[0], self.c_tile):
                        tile = qt @ chunk[t0:t0 + self.c_tile].T                   # (q, T) fp16
                        v, i = block_topk(tile, min(k2, tile.shape[1]), self.block)
                        vals.append(v)
                        idxs.append(i + (off + t0))
                    v, pos = torch.topk(torch.cat(vals, 1), k2, dim=1, sorted=False)
                    sel_v[q0:q0 + self.q_tile] = v
                    sel_i[q0:q0 + self.q_tile] = torch.cat(idxs, 1).gather(1, pos)
        finally:
            torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = reduced
        exact = self._rescore(qd, sel_i, chunks, q_inv)
        best_v, best_i = merge_topk(exact, sel_i, k)
        if k2 == n:
            return best_v, best_i
        thr = sel_v.float().amin(dim=1)
        eps = 2.0 ** -10 * thr.abs().clamp(min=1.0) + 1e-6
        bound = thr + eps
        if q_inv is not None:  # a dropped candidate's cosine is at most its raw bound times its inverse norms
            bound = torch.where(bound >= 0, bound * inv_hi, bound * inv_lo) * q_inv
        failed = (best_v[:, min(k, n) - 1] <= bound).nonzero().squeeze(1)
        if failed.numel():
            logger.info("certified search: %d of %d query rows recomputed with fp32 scores", failed.numel(), nq)
            fv, fi = self._search_exact(qd.index_select(0, failed), k,
                                        None if q_inv is None else q_inv.index_select(0, failed))
            best_v[failed], best_i[failed] = fv, fi
        return best_v, best_i

    def _rescore(self, qd: torch.Tensor, sel_i: torch.Tensor, chunks,
                 q_inv: torch.Tensor | None = None) -> torch.Tensor:
        """Exact fp32 inner products (cosines with ``normalize``) of each query with its selected candidates:
        (Q, k2) float32."""
        out = torch.full(sel_i.shape, float("-inf"), dtype=torch.float32, device=self.device)
        block = max(1, (256 << 20) // (4 * max(1, self.source.dim) * sel_i.shape[1]))
        for off, chunk in (chunks if chunks is not None else self._chunks()):
            inside = (sel_i >= off) & (sel_i < off + chunk.shape[0])
            if not bool(inside.any()):
                continue
            for q0 in range(0, sel_i.shape[0], block):
                m = inside[q0:q0 + block]
                rows, cols = m.nonzero(as_tuple=True)
                if rows.numel() == 0:
                    continue
                cand = chunk.index_select(0, sel_i[q0:q0 + block][rows, cols] - off).float()
                dots = (qd[q0 + rows].float() * cand).sum(dim=1)
                if q_inv is not None:
                    dots = dots * q_inv[q0 + rows] * inverse_norms(cand)
                out[q0 + rows, cols] = dots
        return out

    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(Q, D)`` queries -> ``(Q, k)`` float32 scores and int64 indices (numpy, padded)."""
        _check_k(k)
        v, i = self.search_tensors(queries, k)
        return _pad(v.float().cpu().numpy(), i.cpu().numpy(), k)


class ShardedTorchSearcher:
    """Candidates split into contiguous shards, one :class:`TorchSearcher` per device; exact merge.

    Each device searches its shard in its own thread (CUDA kernels release the GIL), the local
    ``(Q, k)`` results are moved to the CPU, offset to global indices and merged with
    :func:`merge_topk`. Works with any devices, including ``["cpu", "cpu"]`` (tests).
    """

    def __init__(self, candidates: Any, devices: Sequence[str | torch.device], **kwargs: Any):
        source = candidates if isinstance(candidates, RowBlocks) else RowBlocks(candidates)
        n = len(source)
        if n == 0:
            raise DataError("candidate pool is empty: nothing to search")
        if not devices:
            raise ConfigError("devices must name at least one device")
        bounds = shard_bounds(n, len(devices))
        self.shards: list[tuple[int, TorchSearcher]] = [
            (lo, TorchSearcher(source.rows(lo, hi), device=dev, **kwargs))
            for dev, lo, hi in zip(devices, bounds[:-1], bounds[1:]) if hi > lo]
        self.n = n

    def __len__(self) -> int:
        return self.n

    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(Q, D)`` queries -> ``(Q, k)`` float32 scores and int64 indices (numpy, padded)."""
        _check_k(k)
        queries = _as_queries(queries)

        def one(shard: tuple[int, TorchSearcher]) -> tuple[torch.Tensor, torch.Tensor]:
            off, s = shard
            v, i = s.search_tensors(queries, k)
            return v.float().cpu(), i.cpu() + off

        with ThreadPoolExecutor(max_workers=len(self.shards)) as pool:
            parts = list(pool.map(one, self.shards))
        v, i = merge_topk(torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1), k)
        return _pad(v.numpy(), i.numpy(), k)


# ----------------------------------------------------------------------------------------------
# faiss backends
# ----------------------------------------------------------------------------------------------
def _lex_sort_rows(scores: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row of ``(Q, m)`` results by (score desc, index asc); faiss padding -> (-inf, -1)."""
    scores = scores.astype(np.float32, copy=True)
    indices = indices.astype(np.int64, copy=True)
    missing = indices < 0
    scores[missing], indices[missing] = PAD_SCORE, PAD_INDEX
    big = np.where(missing, np.iinfo(np.int64).max, indices)
    order = np.lexsort((big, -scores), axis=-1)
    return np.take_along_axis(scores, order, 1), np.take_along_axis(indices, order, 1)


class FaissSearcher:
    """faiss index over the candidates (built once; fp32 copy of the vectors is held by faiss).

    kind: ``"flat"`` (IndexFlatIP, exact, same tie rule as the torch backend), ``"ivf"`` (IndexIVFFlat,
    ``nlist`` lists trained on ``train_size`` sampled rows, ``nprobe`` probed) or ``"hnsw"``
    (IndexHNSWFlat with ``hnsw_m`` links, ``ef_construction``, ``ef_search``). Approximate kinds only sort
    their own results.
    """

    def __init__(self, candidates: Any, kind: str = "flat", nlist: int | None = None, nprobe: int = 16,
                 train_size: int | None = None, hnsw_m: int = 32, ef_construction: int = 128,
                 ef_search: int = 128, seed: int = 0, add_rows: int = 1 << 16, normalize: bool = False):
        import faiss  # local: optional at import time

        self.normalize = bool(normalize)
        source = candidates if isinstance(candidates, RowBlocks) else RowBlocks(candidates)
        n, d = len(source), source.dim
        if n == 0:
            raise DataError("candidate pool is empty: nothing to search")
        self.kind, self.n = kind, n
        t0 = time.perf_counter()
        if kind == "flat":
            index = faiss.IndexFlatIP(d)
        elif kind == "ivf":
            nlist = nlist or max(1, min(n // 39, int(4 * np.sqrt(n))))
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(seed)
            m = min(n, train_size or max(64 * nlist, 10_000))
            rows = np.sort(rng.choice(n, size=m, replace=False))
            index.train(self._vecs(gather_rows(source, rows)))
            index.nprobe = min(nprobe, nlist)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = ef_construction
            index.hnsw.efSearch = ef_search
        else:
            raise ConfigError(f"unknown faiss index kind {kind!r} (flat, ivf, hnsw)")
        for _, piece in source.chunks(add_rows):
            index.add(self._vecs(piece))
        self.index = index
        logger.info("built faiss %s index over %d x %d in %.2fs", kind, n, d, time.perf_counter() - t0)

    def __len__(self) -> int:
        return self.n

    @classmethod
    def from_index(cls, index: Any, kind: str) -> "FaissSearcher":
        """Wrap an existing faiss index (e.g. ``faiss.read_index`` of a saved one) of ``kind`` without rebuilding
        (queries are searched as given, ``normalize=False``)."""
        if kind not in ("flat", "ivf", "hnsw"):
            raise ConfigError(f"unknown faiss index kind {kind!r} (flat, ivf, hnsw)")
        self = cls.__new__(cls)
        self.kind, self.n, self.index, self.normalize = kind, int(index.ntotal), index, False
        return self

    def _vecs(self, x: Any) -> np.ndarray:
        """float32 rows for the index, of unit length in fp32 with ``normalize``."""
        return unit_rows_fp32(x) if self.normalize else _f32(x)

    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(Q, D)`` queries -> ``(Q, k)`` float32 scores and int64 indices (numpy, padded)."""
        _check_k(k)
        xq = self._vecs(_as_queries(queries))
        if xq.shape[1] != self.index.d:
            raise DataError(f"query dim {xq.shape[1]} != candidate dim {self.index.d}")
        exact = self.kind == "flat"
        kk = min(k + 1, self.n) if exact else min(k, self.n)
        scores, idx = self.index.search(xq, kk)
        scores, idx = _lex_sort_rows(scores, idx)
        if exact and kk > k:
            tied = np.nonzero(scores[:, k - 1] == scores[:, k])[0]
            if len(tied):
                self._fix_ties(xq, scores, idx, tied, k)
        return _pad(scores[:, :k], idx[:, :k], k)

    def _fix_ties(self, xq: np.ndarray, scores: np.ndarray, idx: np.ndarray, rows: np.ndarray, k: int) -> None:
        """Rows whose k-th and (k+1)-th scores tie: keep the lowest-index tied candidates (in place)."""
        radius = np.nextafter(scores[rows, k - 1], np.float32(-np.inf)).astype(np.float32)
        for r, rad in zip(rows, radius):
            lims, d, i = self.index.range_search(xq[r:r + 1], float(rad))
            d, i = d[lims[0]:lims[1]].astype(np.float32), i[lims[0]:lims[1]].astype(np.int64)
            order = np.lexsort((i, -d))[:k]
            scores[r, :k], idx[r, :k] = d[order], i[order]


# ----------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------
def _check_k(k: int) -> None:
    """``k`` must be a positive int."""
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"k must be a positive integer, got {k!r}")


def _resolve_devices(device: Any, devices: Sequence[Any] | None) -> list[torch.device]:
    """One device, or all visible GPUs when ``device == "cuda"`` and several are visible."""
    if devices:
        return [torch.device(d) for d in devices]
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and torch.cuda.device_count() > 1:
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return [dev]


def make_searcher(candidates: Any, backend: str = "torch", device: Any = None,
                  devices: Sequence[Any] | None = None, **kwargs: Any):
    """Build a reusable searcher over ``candidates`` ``(N, D)`` (array, memmap, tensor, block list, cache).

    ``kwargs`` go to :class:`TorchSearcher` (``dtype, q_tile, c_tile, chunk_bytes, tile_bytes, resident``)
    or :class:`FaissSearcher` (``nlist, nprobe, train_size, hnsw_m, ef_construction, ef_search``);
    ``normalize=True`` (both) scores fp32-re-normalised vectors (cosines; see the module doc).
    """
    if backend == "torch":
        devs = _resolve_devices(device, devices)
        if len(devs) == 1:
            return TorchSearcher(candidates, device=devs[0], **kwargs)
        return ShardedTorchSearcher(candidates, devs, **kwargs)
    if backend in ("faiss", "faiss-ivf", "faiss-hnsw"):
        kind = {"faiss": "flat", "faiss-ivf": "ivf", "faiss-hnsw": "hnsw"}[backend]
        return FaissSearcher(candidates, kind=kind, **kwargs)
    raise ConfigError(f"unknown search backend {backend!r}; choose one of {BACKENDS}")


def ann_recall(approx_indices: np.ndarray, exact_indices: np.ndarray, k: int | None = None) -> float:
    """Mean recall@k of an approximate result against the exact one.

    Args:
        approx_indices, exact_indices: ``(Q, >=k)`` int64 (padding ``-1`` ignored).
    Returns:
        mean over queries of ``|approx[:k] & exact[:k]| / |exact[:k]|``.
    """
    k = k or exact_indices.shape[1]
    hits, total = 0, 0
    for a, e in zip(approx_indices[:, :k], exact_indices[:, :k]):
        e = e[e >= 0]
        hits += len(np.intersect1d(a[a >= 0], e))
        total += len(e)
    return hits / total if total else 1.0
