"""Device batches: which examples go together (sampler) and how they become forward chunks (collator).

Sampler (:class:`StepSampler`): one permutation per epoch from ``(seed, epoch)``; global step ``s`` takes the
slice ``[s*B*W, (s+1)*B*W)`` and rank ``r`` its ``r``-th block of ``B``. The data of a global step is therefore
the same for any world size (a 2-GPU step sees exactly the pairs of the 1-GPU step with a doubled batch), and
resuming at step ``s`` only needs ``s`` (no data is re-read). With ``group_by_length`` the permutation is
sorted by length inside mega-batches of 50 global batches (HF's ``group_by_length`` idea), then the global
batches are shuffled again.

Collator (:class:`PairCollator`): a device batch of B examples with G columns (1 positive [+ K negatives])
becomes ``S = B * (1 + G)`` sequences in the official category-major *layout* ``[B queries | B column-1 | ...]``.
Instead of padding all S to the single longest (official), ``packing=True`` packs the sequences into chunks of
at most ``chunk_tokens`` real tokens and ``chunk_size`` sequences by first-fit decreasing, each one packed row
without padding (``umarvel.data.packing``); ``packing=False`` sorts them by length and cuts chunks of at most
``chunk_size`` sequences and ``chunk_tokens`` padded tokens. Each chunk is collated on its own (vision tower
once per chunk). ``StepBatch.inverse`` maps the concatenated chunk outputs back to the
layout. ``reference=True`` reproduces the official batching (layout order, one padded length for all, chunks
of ``chunk_size``) for parity tests and the benchmark.
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from umarvel.data.collate import EmbedInput, EmbeddingCollator, EmbeddingTokenizer, TokenizedInput, plan_batches
from umarvel.data.formatting import PromptStyle
from umarvel.data.images import ImageBudget, load_image
from umarvel.data.packing import PackedCollator, plan_packs
from umarvel.data.visual import PatchSpec
from umarvel.train.datasets import TrainDataset, TrainExample, row_source


def example_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The RNG of one example draw: independent of worker count, order and resume point."""
    return random.Random(f"{int(seed)}:{int(epoch)}:{int(index)}")


class StepSampler:
    """Batch sampler of one epoch for one rank; yields lists of ``(epoch, index)``.

    Args:
        n: dataset size. batch_size: B per device. world / rank: data-parallel layout.
        seed / epoch: the permutation. start_step: first global step of the epoch to yield (resume).
        lengths: per-example length hints, only for ``group_by_length``.
    """

    def __init__(self, n: int, batch_size: int, world: int, rank: int, seed: int, epoch: int,
                 start_step: int = 0, lengths: Sequence[int] | None = None):
        self.n, self.batch_size, self.world, self.rank = n, batch_size, world, rank
        self.seed, self.epoch, self.start_step = seed, epoch, start_step
        self.lengths = lengths

    @staticmethod
    def steps_per_epoch(n: int, batch_size: int, world: int) -> int:
        """Full global batches per epoch (the last partial one is dropped: equal shapes on every rank)."""
        return n // (batch_size * world)

    def __len__(self) -> int:
        return max(0, self.steps_per_epoch(self.n, self.batch_size, self.world) - self.start_step)

    def _order(self) -> list[int]:
        g = torch.Generator().manual_seed(int(self.seed) * 1000003 + int(self.epoch))
        order = torch.randperm(self.n, generator=g).tolist()
        if self.lengths is None:
            return order
        gb = self.batch_size * self.world
        mega = gb * 50
        grouped: list[int] = []
        for s in range(0, len(order), mega):
            grouped.extend(sorted(order[s:s + mega], key=lambda i: -self.lengths[i]))
        batches = [grouped[s:s + gb] for s in range(0, len(grouped) - gb + 1, gb)]
        perm = torch.randperm(len(batches), generator=g).tolist()
        return [i for b in perm for i in batches[b]]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = self._order()
        gb = self.batch_size * self.world
        for step in range(self.start_step, self.steps_per_epoch(self.n, self.batch_size, self.world)):
            lo = step * gb + self.rank * self.batch_size
            yield [(self.epoch, i) for i in order[lo:lo + self.batch_size]]


class ExampleSource(torch.utils.data.Dataset):
    """Map-style view of a :class:`TrainDataset` indexed by ``(epoch, index)`` with the per-example RNG."""

    def __init__(self, dataset: TrainDataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> TrainExample:
        epoch, index = key
        ex = self.dataset.example(index, example_rng(self.seed, epoch, index))
        return dataclasses.replace(ex, source=row_source(self.dataset, index)) if not ex.source else ex


@dataclass
class StepBatch:
    """One device batch ready for the model.

    Attributes:
        chunks: collated forward chunks (``EmbeddingCollator`` dicts), length-homogeneous.
        inverse: (S,) int64; ``torch.cat(chunk outputs)[inverse]`` is the layout order.
        num_queries: B. num_columns: G candidates per query (1 positive + K negatives, or K distillation).
        query_ids: B ids. candidate_ids: G*B ids, column-major (``[B positives | B slot-1 negatives | ...]``).
        scores: (B, G) teacher scores or None.
        num_tokens: real tokens in the batch; padded_tokens: tokens after padding (efficiency stat).
    """

    chunks: list[dict[str, torch.Tensor]]
    inverse: torch.Tensor
    num_queries: int
    num_columns: int
    query_ids: list = field(default_factory=list)
    candidate_ids: list = field(default_factory=list)
    scores: torch.Tensor | None = None
    num_tokens: int = 0
    padded_tokens: int = 0

    @property
    def group_sizes(self) -> list[int]:
        """Rows per layout block: ``[B] * (1 + G)``."""
        return [self.num_queries] * (1 + self.num_columns)


def _side_label(ex: TrainExample, k: int) -> str:
    """``training row FILE:LINE query QID`` / ``... candidate DID of query QID`` (image error messages)."""
    row = f"training row {ex.source}" if ex.source else "training example"
    if k < 0:
        return f"{row} query {ex.query_id}" if ex.query_id else f"{row} query"
    cid = ex.candidate_ids[k] if k < len(ex.candidate_ids) else None
    return f"{row} candidate {cid}" if cid else f"{row} candidate {k}"


class PairCollator:
    """``list[TrainExample] -> StepBatch`` (runs in DataLoader workers: image loading, tokenisation, padding).

    Args:
        tokenizer / image_processor: of the checkpoint. style: suffix / generation-prompt policy.
        budget: image resize budget. mask_instruction: pool without the instruction span.
        chunk_size / chunk_tokens: chunk limits. reference: official layout-order batching (see module doc).
        patch_spec: the backbone's patch geometry and video layout (``UMarvel.patch_spec``; default: read
            from ``image_processor``, Qwen2-VL video layout).
        packing: packed chunks without padding (ignored with ``reference``).
    """

    def __init__(self, tokenizer, image_processor, style: PromptStyle, budget: ImageBudget = ImageBudget(),
                 mask_instruction: bool = True, chunk_size: int = 32, chunk_tokens: int | None = None,
                 reference: bool = False, patch_spec: PatchSpec | None = None, packing: bool = False):
        self.tok = EmbeddingTokenizer(tokenizer, style, patch_spec or PatchSpec.from_processor(image_processor))
        self.collator = EmbeddingCollator(tokenizer, image_processor, padding_side="left",
                                          mask_instruction=mask_instruction)
        self.packed = PackedCollator(tokenizer, image_processor, mask_instruction=mask_instruction)
        self.budget = budget
        self.chunk_size, self.chunk_tokens, self.reference = chunk_size, chunk_tokens, reference
        self.packing = packing and not reference

    def inputs(self, examples: Sequence[TrainExample]) -> list[EmbedInput]:
        """The S layout-ordered inputs with loaded images (each distinct path loaded once)."""
        columns = len(examples[0].candidates)
        if any(len(e.candidates) != columns for e in examples):
            raise ValueError("all examples of a batch need the same number of candidates")
        sides = [e.query for e in examples] + [e.candidates[k] for k in range(columns) for e in examples]
        owners = [(e, -1) for e in examples] + [(e, k) for k in range(columns) for e in examples]
        cache: dict[str, object] = {}
        out = []
        for s, (ex, k) in zip(sides, owners):
            if s.image is None:
                out.append(EmbedInput(s.text))
                continue
            if s.image not in cache:
                cache[s.image] = load_image(s.image, self.budget, what=_side_label(ex, k))
            out.append(EmbedInput(s.text, (cache[s.image],)))
        return out

    def plan(self, tokenized: Sequence[TokenizedInput]) -> list[list[int]]:
        """Chunks as lists of layout indices."""
        n = len(tokenized)
        if self.reference:
            return [list(range(s, min(s + self.chunk_size, n))) for s in range(0, n, self.chunk_size)]
        if self.packing:
            return plan_packs([len(t) for t in tokenized], self.chunk_tokens or sum(len(t) for t in tokenized),
                              self.chunk_size)
        return plan_batches([len(t) for t in tokenized], self.chunk_size, self.chunk_tokens)

    def __call__(self, examples: Sequence[TrainExample]) -> StepBatch:
        tokenized = self.tok.tokenize(self.inputs(examples))
        chunks_idx = self.plan(tokenized)
        longest = max(len(t) for t in tokenized)
        chunks, padded = [], 0
        for idx in chunks_idx:
            items = [tokenized[i] for i in idx]
            if self.reference:  # official: the whole device batch padded to its longest sequence
                pad = self.collator.pad_id
                items = [TokenizedInput([pad] * (longest - len(t)) + t.input_ids, t.images, t.video) for t in items]
                batch = self.collator(items)
                real = torch.tensor([len(tokenized[i]) for i in idx])
                ar = torch.arange(longest)
                real_mask = (ar[None, :] >= (longest - real)[:, None]).long()
                batch["attention_mask"] = real_mask
                batch["pool_mask"] = batch["pool_mask"] * real_mask
            elif self.packing:
                batch = self.packed(items)
            else:
                batch = self.collator(items)
            chunks.append(batch)
            padded += batch["input_ids"].numel()
        order = torch.tensor([i for idx in chunks_idx for i in idx], dtype=torch.long)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel())
        scores = None
        if examples[0].scores is not None:
            scores = torch.tensor([list(e.scores) for e in examples], dtype=torch.float64)
        columns = len(examples[0].candidates)
        return StepBatch(chunks=chunks, inverse=inverse, num_queries=len(examples), num_columns=columns,
                         query_ids=[e.query_id for e in examples],
                         candidate_ids=[e.candidate_ids[k] if k < len(e.candidate_ids) else None
                                        for k in range(columns) for e in examples],
                         scores=scores, num_tokens=sum(len(t) for t in tokenized), padded_tokens=padded)
