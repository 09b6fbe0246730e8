"""Reranker training data: union-train queries + mined top-100 lists -> (positive, negative) pairs per query.

Per query and access (method spec section 4): one positive drawn from ``pos_cand_list`` -> ``Yes``,
and one negative drawn from the query's LOCAL mined top-100 minus its positives -> ``No``; the
instruction is drawn from the TSV (key: dataset id, query modality, modality of a random positive).
Every draw comes from ``random.Random(f"{seed}:{epoch}:{index}")``, so a run (and a resumed run) is
reproducible whatever the worker layout. A query whose mined list holds no usable negative gets a
random pool candidate that is not a positive (logged; the official code had no such case handled).

Mined file: JSONL ``{qid, gt_docs, top100_docs, score}``, one line per union-train row, in union-train
order (``rerank_data_all_eval_train_local.jsonl`` of method spec 5.3; format and reader in
:mod:`umarvel.data.runfiles`); line i must carry row i's qid.
"""
from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Mapping, Sequence

import torch

from umarvel.data.images import ImageBudget
from umarvel.errors import DataError
from umarvel.data.mbeir import (InstructionTable, choose_instruction, parse_query, read_instructions,
                                        read_pool)
from umarvel.data.records import Candidate, Query
from umarvel.data.runfiles import MinedRow, iter_mined
from umarvel.data.visual import PatchSpec
from umarvel.rerank.collate import RerankTokenizer, RerankTrainCollator
from umarvel.rerank.prompts import TRAIN_MAX_TEXT_TOKENS, RerankPair
from umarvel.rerank.score import load_pair_images, pair_from_records
from umarvel.utils.io import iter_jsonl

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike


def read_union_queries(path: PathLike, root: PathLike) -> list[Query]:
    """All rows of an (up-sampled) union-train query file, duplicates kept, in file order."""
    root = Path(root)
    return [parse_query(rec, root, f"{path}:{lineno}") for lineno, rec in iter_jsonl(path)]


class RerankTrainDataset(torch.utils.data.Dataset):
    """Item ``i``: the (positive -> Yes, negative -> No) pairs of query row ``i``, images loaded.

    Set :attr:`epoch` before iterating an epoch (draws depend on ``(seed, epoch, i)``).
    """

    def __init__(self, queries: Sequence[Query], mined: Sequence[MinedRow], pool: Mapping[str, Candidate],
                 instructions: InstructionTable, tokenizer, budget: ImageBudget, seed: int = 42,
                 max_text_tokens: int | None = TRAIN_MAX_TEXT_TOKENS):
        if len(queries) != len(mined):
            raise DataError(f"{len(queries)} queries but {len(mined)} mined lists")
        self.queries, self.mined, self.pool = list(queries), list(mined), pool
        self.instructions, self.tokenizer, self.budget = instructions, tokenizer, budget
        self.seed, self.max_text_tokens = seed, max_text_tokens
        self.modality_of = {did: c.modality for did, c in pool.items()}
        self.epoch = 0
        self._pool_ids: list[str] | None = None

    def __len__(self) -> int:
        return len(self.queries)

    def negative(self, i: int, rng: random.Random) -> str:
        """A mined negative of row ``i``: drawn from top-100 minus gt/positives (dedup, order kept)."""
        q, m = self.queries[i], self.mined[i]
        excluded = set(m.gt_docs) | set(q.positives)
        negs = [d for d in dict.fromkeys(m.top_docs) if d not in excluded and d in self.pool]
        if negs:
            return rng.choice(negs)
        logger.warning("query %s (row %d): no mined negative outside its positives; using a random pool candidate",
                       q.qid, i)
        if self._pool_ids is None:
            self._pool_ids = list(self.pool)
        for _ in range(1000):
            d = rng.choice(self._pool_ids)
            if d not in excluded:
                return d
        raise DataError(f"query {q.qid}: cannot find a negative candidate in the pool")

    def pairs(self, i: int) -> tuple[RerankPair, RerankPair]:
        """The two pairs of row ``i`` (image references not yet loaded)."""
        rng = random.Random(f"{self.seed}:{self.epoch}:{i}")
        q = self.queries[i]
        missing = [d for d in q.positives if d not in self.pool]
        if missing or not q.positives:
            raise DataError(f"query {q.qid}: positive(s) {missing or '[]'} not in the training pool")
        q = q.with_instruction(choose_instruction(q, self.instructions, self.modality_of, "random", rng))
        pos, neg = rng.choice(q.positives), self.negative(i, rng)
        return (pair_from_records(self.tokenizer, q, self.pool[pos], True, self.max_text_tokens),
                pair_from_records(self.tokenizer, q, self.pool[neg], False, self.max_text_tokens))

    def __getitem__(self, i: int) -> tuple[RerankPair, RerankPair]:
        pos, neg = self.pairs(i)
        return load_pair_images(pos, self.budget), load_pair_images(neg, self.budget)


class RerankBatchCollator:
    """Queries' pair tuples -> one training batch, rows ``[positives of all queries | negatives]``.

    Raises DataError when a sequence exceeds ``max_length`` (never truncated: it would cut the answer).
    """

    def __init__(self, tokenizer, image_processor, max_length: int = 2048, answer_only_loss: bool = False):
        self.tok = RerankTokenizer(tokenizer, training=True, spec=PatchSpec.from_processor(image_processor))
        self.collate = RerankTrainCollator(tokenizer, image_processor, answer_only_loss=answer_only_loss)
        self.max_length = max_length

    def __call__(self, items: Sequence[tuple[RerankPair, RerankPair]]) -> dict[str, torch.Tensor]:
        pairs = [p for p, _ in items] + [n for _, n in items]
        tokenized = self.tok.tokenize(pairs)
        for p, t in zip(pairs, tokenized):
            if len(t) > self.max_length:
                raise DataError(f"rerank pair {p.id}: {len(t)} tokens exceed max_length {self.max_length}")
        return self.collate(tokenized)


def build_train_dataset(root: PathLike, queries_file: PathLike, pool_file: PathLike, instructions_file: PathLike,
                        mined_file: PathLike, tokenizer, budget: ImageBudget, seed: int = 42,
                        max_text_tokens: int | None = TRAIN_MAX_TEXT_TOKENS) -> RerankTrainDataset:
    """Read the M-BEIR files (paths relative to ``root`` unless absolute) into a :class:`RerankTrainDataset`."""
    root = Path(root)
    resolve = lambda p: Path(p) if Path(p).is_absolute() else root / p  # noqa: E731
    queries = read_union_queries(resolve(queries_file), root)
    mined = list(iter_mined(resolve(mined_file), [q.qid for q in queries], follows=resolve(queries_file),
                            scores=False))
    pool = {c.did: c for c in read_pool(resolve(pool_file), root)}
    table = read_instructions(resolve(instructions_file))
    logger.info("reranker training data: %d query rows, pool of %d candidates", len(queries), len(pool))
    return RerankTrainDataset(queries, mined, pool, table, tokenizer, budget, seed, max_text_tokens)
