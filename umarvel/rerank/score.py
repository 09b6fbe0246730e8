"""Batched reranker scoring: pairs -> P(yes), and the top-k of retrieval runs -> ``{qid: [p_yes, ...]}``.

Scoring is length-aware like the encoder: packed batches without padding (``umarvel.data.packing``,
first-fit decreasing under a token budget) with 1-D positions, else length-sorted padded batches
(``plan_batches``); order restored, one forward per batch (D10), tqdm on rank 0 only. Texts are
not truncated (official scoring); queries get ``format_string(f"{instruction} {query_txt}")``. A reranker
loaded with ``compat="official"`` scores the official way instead: padded consecutive batches in pair order
(the official batch is 4) and P(yes) from the first step of ``generate`` (D10).
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from umarvel.data.collate import plan_batches, sequential_batches
from umarvel.data.images import ImageBudget, load_image
from umarvel.data.packing import pack_padded, plan_packs, to_device
from umarvel.errors import DataError
from umarvel.data.records import Candidate, Query
from umarvel.log import progress_disabled
from umarvel.model.positions import Positions
from umarvel.data.visual import PatchSpec
from umarvel.rerank.collate import RerankScoreCollator, RerankTokenizer
from umarvel.rerank.model import LoadedReranker
from umarvel.rerank.prompts import RerankPair, RerankSide, make_side, rerank_candidate_text, rerank_query_text
from umarvel.utils.compat import is_official

logger = logging.getLogger(__name__)

DEFAULT_TOP_K = 50


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
            Unused with ``reranker.compat == "official"`` (generate's first step, batches in pair order).
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
    official = is_official(reranker.compat)
    if official:
        chunk = batch_size * -(-chunk // batch_size)  # whole batches per chunk: the official pair-order batching
    packed = not official and model.supports_packing and (positions or model.positions) == "1d"
    with ThreadPoolExecutor(max_workers=load_workers) as pool, torch.no_grad():
        for start in range(0, len(pairs), chunk):
            loaded = list(pool.map(lambda p: load_pair_images(p, budget), pairs[start:start + chunk]))
            tokenized = rt.tokenize(loaded)
            lengths = [len(t) for t in tokenized]
            if official:
                plan = sequential_batches(len(tokenized), batch_size)
            elif packed:
                plan = plan_packs(lengths, max_tokens, batch_size)
            else:
                plan = plan_batches(lengths, batch_size, max_tokens)
            for idx in plan:
                batch = collate([tokenized[i] for i in idx])
                batch = to_device(pack_padded(batch) if packed else batch, reranker.device)
                p = model.p_yes_generate(batch) if official else model.p_yes(batch, positions=positions)
                out[[start + i for i in idx]] = p.cpu().numpy()
                bar.update(len(idx))
    bar.close()
    return out


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
