"""Packed (padding-free) batches: first-fit-decreasing planning and packed collation.

A *pack* is one forward call: the sequences it holds are concatenated into a single row ``(1, T)`` with no
padding at all. Attention stays inside each sequence (``umarvel.model.attention``), positions restart at 0
for every sequence (the released 1-D convention, D6), and pooling is per sequence. Packs are planned by
first-fit decreasing under a token budget (:func:`plan_packs`), so the number of forward calls is small and
no token is wasted.

Packed batch (:class:`PackedCollator`), N sequences, T = sum of their lengths:
    ``input_ids`` (1, T) int64; ``attention_mask`` (1, T) ones; ``position_ids`` (1, T) 0..n_i-1 per sequence;
    ``instruction_mask`` (1, T); ``pool_mask`` (1, T) = outside the instruction span;
    ``cu_seqlens`` (N+1,) int32 boundaries; ``seq_lens`` (N,) int64 (stays on the host: :data:`HOST_KEYS`);
    and, when present, ``pixel_values`` / ``image_grid_thw`` / ``pixel_values_videos`` / ``video_grid_thw``
    in sequence order, as in the padded batch.

:class:`EncodeChunks` is the encoder's input pipeline as a map-style dataset: chunk ``i`` loads its inputs
(image decode, resize, patches), tokenizes them and plans + collates its batches, so a
``torch.utils.data.DataLoader`` runs all of it in worker processes (pinned memory, non-blocking copies).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Mapping, Sequence

import torch

from umarvel.data.collate import EmbedInput, EmbeddingCollator, EmbeddingTokenizer, TokenizedInput

#: Batch keys that are host-side metadata (read as Python numbers): never moved to the accelerator.
HOST_KEYS = frozenset({"seq_lens"})


def is_packed(batch: Mapping[str, torch.Tensor]) -> bool:
    """Whether a collated batch is packed (has ``cu_seqlens``)."""
    return "cu_seqlens" in batch


def num_sequences(batch: Mapping[str, torch.Tensor]) -> int:
    """Sequences in a collated batch, packed (``cu_seqlens``) or padded (rows)."""
    return int(batch["cu_seqlens"].shape[0]) - 1 if is_packed(batch) else int(batch["input_ids"].shape[0])


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    """Move a batch to ``device`` (non-blocking: async from pinned memory); host keys stay where they are."""
    return {k: (v if k in HOST_KEYS else v.to(device, non_blocking=True)) for k, v in batch.items()}


def plan_packs(lengths: Sequence[int], max_tokens: int, max_items: int | None = None) -> list[list[int]]:
    """First-fit decreasing: indices grouped into packs of at most ``max_tokens`` tokens and ``max_items`` items.

    Items are taken longest first (ties by index) and placed into the first pack with room; an item longer
    than ``max_tokens`` gets a pack of its own. Every index appears exactly once; inside a pack items are
    in placement order (longest first).
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    cap = max_items or len(lengths) or 1
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    packs: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        for b, r in enumerate(room):
            if n <= r and len(packs[b]) < cap:
                packs[b].append(i)
                room[b] -= n
                break
        else:
            packs.append([i])
            room.append(max_tokens - n)
    return packs


def pack_padded(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A padded batch (left or right padding) as one packed row: every (B, L) tensor keeps its real tokens.

    ``input_ids``, ``attention_mask`` and any other (B, L) tensor (``labels``, masks) become (1, T) in row
    order; ``position_ids`` (0.. per sequence), ``cu_seqlens`` and ``seq_lens`` are added; other tensors
    (pixel values, grids: already in row order) are kept as they are.
    """
    attn = batch["attention_mask"]
    real = attn.bool()
    shape = attn.shape
    lens = real.sum(dim=1)
    out = {k: (v[real][None] if v.shape[:2] == shape and v.dim() == 2 else v) for k, v in batch.items()}
    cu = torch.zeros(shape[0] + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lens, 0)
    out["cu_seqlens"], out["seq_lens"] = cu, lens.to(torch.int64)
    out["position_ids"] = (torch.arange(int(cu[-1])) - torch.repeat_interleave(cu[:-1].long(), lens))[None]
    return out


class PackedCollator(EmbeddingCollator):
    """Tokenized inputs -> one packed batch (see the module docstring): the padded
    :class:`~umarvel.data.collate.EmbeddingCollator` batch (per-sequence masks, same visuals) through
    :func:`pack_padded`, so no padding is left."""

    def __call__(self, items: Sequence[TokenizedInput]) -> dict[str, torch.Tensor]:
        return pack_padded(super().__call__(items))


def chunk_bounds(n: int, chunk: int, first: int | None = None, workers: int = 0) -> list[int]:
    """Boundaries ``[0, b1, ..., n]`` of preprocessing chunks: a smaller ``first`` chunk (the accelerator
    starts early), then chunks of ``chunk`` inputs.

    ``workers`` > 1 (preprocessing processes, one chunk each at a time): the chunks after the first shrink, down
    to ``first`` inputs (64 without one), until every worker has one. Otherwise a job of a few thousand inputs
    would keep most workers idle (1,024 inputs in chunks of 512: 3 chunks for 8 workers, each 512-input chunk
    decoded by one process while the accelerator waits); jobs of ``workers * chunk`` inputs or more keep ``chunk``.
    """
    if workers > 1:
        floor = first or 64
        rest = max(0, n - (first or 0))
        chunk = min(chunk, max(floor, -(-rest // workers)))
    bounds = [0]
    if first and first < chunk and n > first:
        bounds.append(first)
    while bounds[-1] < n:
        bounds.append(min(n, bounds[-1] + chunk))
    return bounds


class EncodeChunks(torch.utils.data.Dataset):
    """The encoder's input pipeline, one chunk of inputs per item (runs in DataLoader workers).

    Item ``i`` -> list of ``(indices, batch)``: the chunk's inputs loaded (``loaders``), tokenized, planned
    (``plan(lengths) -> index lists``) and collated; indices are global input positions.

    Args:
        loaders: zero-argument callables returning :class:`EmbedInput` (image decode / resize / patches).
        tok: the tokenizer front-end. collate: tokenized inputs -> batch. plan: lengths -> index lists.
        bounds: chunk boundaries (:func:`chunk_bounds`). threads: load with a thread pool (in-process use;
            0/1 = serial).
    """

    def __init__(self, loaders: Sequence[Callable[[], EmbedInput]], tok: EmbeddingTokenizer,
                 collate: Callable[[Sequence[TokenizedInput]], dict], plan: Callable[[list[int]], list[list[int]]],
                 bounds: Sequence[int], threads: int = 0):
        self.loaders, self.tok, self.collate, self.plan = loaders, tok, collate, plan
        self.bounds, self.threads = list(bounds), threads

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def __getitem__(self, i: int) -> list[tuple[list[int], dict[str, torch.Tensor]]]:
        start, stop = self.bounds[i], self.bounds[i + 1]
        part = self.loaders[start:stop]
        if self.threads > 1:
            with ThreadPoolExecutor(max_workers=self.threads) as pool:
                inputs = list(pool.map(lambda f: f(), part))
        else:
            inputs = [f() for f in part]
        tokenized = self.tok.tokenize(inputs)
        return [([start + j for j in idx], self.collate([tokenized[j] for j in idx]))
                for idx in self.plan([len(t) for t in tokenized])]
