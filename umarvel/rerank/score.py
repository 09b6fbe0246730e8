"""Batched reranker scoring: pairs -> P(yes), and the top-k of retrieval runs -> ``{qid: [p_yes, ...]}``.

Scoring is length-aware like the encoder (``umarvel.data.collate.plan_batches``: sorted by length,
cut by a token budget, order restored), one forward per batch (D10), tqdm on rank 0 only. Texts are
not truncated (official scoring); queries get ``format_string(f"{instruction} {query_txt}")``.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from umarvel.data.collate import plan_batches
from umarvel.data.images import ImageBudget, load_image
from umarvel.errors import DataError
from umarvel.data.records import Candidate, Query
from umarvel.log import progress_disabled
from umarvel.model.positions import Positions
from umarvel.data.visual import PatchSpec
from umarvel.rerank.collate import RerankScoreCollator, RerankTokenizer
from umarvel.rerank.model import LoadedReranker
from umarvel.rerank.prompts import RerankPair, RerankSide, make_side, rerank_candidate_text, rerank_query_text
from umarvel.utils.io import iter_columns

logger = logging.getLogger(__name__)

DEFAULT_TOP_K = 50
PathLike = str | os.PathLike


def pair_from_records(tokenizer, query: Query, cand: Candidate, label: bool | None = None,
                      max_text_tokens: int | None = None) -> RerankPair:
    """A pair from eval records (image paths kept as references; see :func:`load_pair_images`).

    ``max_text_tokens``: truncate each text side (training: 256; scoring: ``None``).
    """
    q = make_side(tokenizer, rerank_query_text(query.instruction, query.text), query.image, max_text_tokens)
    c = make_side(tokenizer, rerank_candidate_text(cand.text), cand.image, max_text_tokens)
    return RerankPair(q, c, label, id=f"{query.qid}/{cand.did}")


def load_pair_images(pair: RerankPair, budget: ImageBudget) -> RerankPair:
    """A copy of ``pair`` whose image references are loaded and resized (official smart resize)."""
    def side(s: RerankSide, role: str) -> RerankSide:
        if s.image is None:
            return s
        return replace(s, image=load_image(s.image, budget, what=f"rerank pair {pair.id} {role}"))
    return replace(pair, query=side(pair.query, "query"), candidate=side(pair.candidate, "candidate"))


def score_pairs(reranker: LoadedReranker, pairs: Sequence[RerankPair], batch_size: int = 8,
                max_tokens: int | None = None, positions: Positions | None = None,
                budget: ImageBudget | None = None, show_progress: bool | None = None,
                load_workers: int = 8) -> np.ndarray:
    """P(yes) of every pair, in input order: float32 (N,).

    Args:
        reranker: from :func:`umarvel.rerank.model.load_reranker`.
        pairs: scoring pairs (``label`` ignored); images may be paths or loaded PIL images.
        batch_size: max pairs per forward; ``max_tokens`` caps ``pairs * longest`` (default 2048 * batch).
        positions: ``"1d"`` (training convention, default of the model) or ``"mrope"`` (= official generate).
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    out = np.zeros(len(pairs), dtype=np.float32)
    if not pairs:
        return out
    budget = budget or reranker.budget
    rt = RerankTokenizer(reranker.tokenizer, training=False, spec=PatchSpec.from_processor(reranker.image_processor))
    collate = RerankScoreCollator(reranker.tokenizer, reranker.image_processor)
    max_tokens = max_tokens or batch_size * 2048
    show = (len(pairs) >= 64 and not progress_disabled()) if show_progress is None else show_progress
    from tqdm.auto import tqdm

    bar = tqdm(total=len(pairs), desc="rerank", unit="pair", disable=not show)
    chunk = max(batch_size * 16, 256)
    model = reranker.model
    with ThreadPoolExecutor(max_workers=load_workers) as pool, torch.no_grad():
        for start in range(0, len(pairs), chunk):
            loaded = list(pool.map(lambda p: load_pair_images(p, budget), pairs[start:start + chunk]))
            tokenized = rt.tokenize(loaded)
            for idx in plan_batches([len(t) for t in tokenized], batch_size, max_tokens):
                batch = {k: v.to(reranker.device) for k, v in collate([tokenized[i] for i in idx]).items()}
                out[[start + i for i in idx]] = model.p_yes(batch, positions=positions).cpu().numpy()
                bar.update(len(idx))
    bar.close()
    return out


def read_trec_run(path: PathLike) -> dict[str, list[tuple[str, float]]]:
    """A TREC run file (``qid Q0 did rank score run_id``, optional 7th column) -> ``{qid: [(did, score)]}``.

    Candidates are returned in rank order; queries in first-appearance order.

    Raises:
        DataError: naming ``file:line`` for a malformed line, a repeated (qid, rank) or a non-numeric field.
    """
    rows: dict[str, dict[int, tuple[str, float]]] = {}
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
        ranks[r] = (did, s)
    return {qid: [ranks[r] for r in sorted(ranks)] for qid, ranks in rows.items()}


def score_run(reranker: LoadedReranker, run: Mapping[str, Sequence[tuple[str, float]]],
              queries: Mapping[str, Query], pool: Mapping[str, Candidate], top_k: int = DEFAULT_TOP_K,
              **score_kwargs: Any) -> dict[str, list[float]]:
    """P(yes) for the top-``top_k`` candidates of every query of a run: ``{qid: [p_yes, ...]}`` in run order.

    Raises:
        DataError: a run qid missing from ``queries`` or a did missing from ``pool``.
    """
    pairs, spans = [], {}
    for qid, ranked in run.items():
        if qid not in queries:
            raise DataError(f"run query {qid} is not in the query file")
        start = len(pairs)
        for did, _ in ranked[:top_k]:
            if did not in pool:
                raise DataError(f"run query {qid}: candidate {did} is not in the candidate pool")
            pairs.append(pair_from_records(reranker.tokenizer, queries[qid], pool[did]))
        spans[qid] = (start, len(pairs))
    p = score_pairs(reranker, pairs, **score_kwargs)
    logger.info("scored %d pairs for %d queries (top %d)", len(pairs), len(spans), top_k)
    return {qid: [float(x) for x in p[a:b]] for qid, (a, b) in spans.items()}
