"""Zero-shot metrics on score matrices (pure numpy; torch tensors are accepted and converted).

Tie policy (the official scripts'): **equal scores rank by position, the earlier candidate first**, i.e. the
order of a stable descending sort (``torch.sort(..., descending=True, stable=True)``; the official GeneCIS
script's ``score.sort(descending=True)`` orders its small galleries this way):

- hit@k (recall): the rank of a positive ``p`` is ``#{j: s_j > s_p} + #{j < p: s_j == s_p}``; a query hits iff
  its best-ranked positive has rank < k (so a positive tied with a later candidate ranks first): the
  :func:`ranked_topk` order, scored by the one Recall@k, :func:`umarvel.eval.metrics.recall_at_k`;
- CIRCO ranking: candidates ordered by (score desc, index asc), ground truth or not;
- GeneCIS: the target (position 0 of its gallery) ranks before every distractor with an equal score, e.g. a
  gallery that holds its own target again (one GeneCIS ``change_object`` sample does) is a hit at 1;
- CC-Neg / Sugar-Crepe accuracy: a sample counts only if cos(img, pos) > cos(img, neg) strictly (the
  official ``>``).

The official Flickr / COCO / ShareGPT4V / Urban1K / VisDial / MSVD / MSR-VTT / CIRCO scripts use ``torch.topk``,
which leaves the order of equal scores unspecified (it differs between devices and sizes); the position rule
is the deterministic version of it. Real embeddings almost never tie; the rule matters for duplicated items.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from umarvel.errors import DataError
from umarvel.eval.metrics import recall_at_k

RECALL_KS = (1, 5, 10)
CIRCO_KS = (5, 10, 25, 50)
GENECIS_KS = (1, 2, 3)


def _np(x) -> np.ndarray:
    """Float64 numpy view of a numpy array or torch tensor."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _check_scores(scores: np.ndarray, n_rows: int, what: str) -> None:
    if scores.ndim != 2 or scores.shape[0] != n_rows:
        raise DataError(f"{what}: expected scores of shape ({n_rows}, C), got {scores.shape}")


def recall_from_scores(scores, positives: Sequence[Sequence[int]], ks: Sequence[int] = RECALL_KS,
                       exclude: Sequence[Sequence[int]] | None = None) -> dict[str, float]:
    """Hit-rate recall ``{"R@k": %}`` (CLIP-benchmark / M-BEIR definition) from a score matrix.

    The candidates are ranked by :func:`ranked_topk` (equal scores: the earlier candidate first), then scored
    by the one Recall@k, :func:`umarvel.eval.metrics.recall_at_k`.

    Args:
        scores: (Q, C) similarities. positives: per query, candidate indices (non-empty).
        exclude: per query, candidate indices removed from the ranking (e.g. VIST context images).
    """
    s = _np(scores)
    _check_scores(s, len(positives), "recall")
    for r, p in enumerate(positives):
        if len(p) == 0:
            raise DataError(f"recall: query {r} has no positive")
    top = ranked_topk(s, max(ks), exclude)  # (Q, min(max k, C))
    return {f"R@{k}": 100.0 * v for k, v in recall_at_k(top, [set(map(int, p)) for p in positives], ks).items()}


def bidirectional_recall(text_image_scores, text_to_image: Sequence[int],
                         ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
    """Text->image and image->text recall from one (T, I) score matrix.

    t2i: a text hits if its own image is in the top k of the I images. i2t: an image hits if ANY of its
    captions is in the top k of the T texts (an image without captions is an error).

    Returns:
        ``{"t2i_R@k": %, "i2t_R@k": %}``.
    """
    s = _np(text_image_scores)
    t2i = np.asarray(text_to_image, dtype=np.int64)
    _check_scores(s, len(t2i), "bidirectional_recall")
    n_img = s.shape[1]
    captions = [[] for _ in range(n_img)]
    for t, i in enumerate(t2i):
        captions[int(i)].append(t)
    for i, caps in enumerate(captions):
        if not caps:
            raise DataError(f"bidirectional_recall: image {i} has no caption")
    out = {f"t2i_{k}": v for k, v in recall_from_scores(s, [[int(i)] for i in t2i], ks).items()}
    out.update({f"i2t_{k}": v for k, v in recall_from_scores(s.T, captions, ks).items()})
    return out


def ranked_topk(scores, k: int, exclude: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """Top-k candidate indices per query, ordered by (score desc, index asc) (the tie policy).

    Args:
        scores: (Q, C). exclude: per query, candidate indices removed from the ranking.

    Returns:
        (Q, min(k, C)) int64.
    """
    s = _np(scores)
    q, c = s.shape
    k = min(k, c)
    out = np.empty((q, k), dtype=np.int64)
    for r in range(q):
        row = s[r].copy()
        if exclude is not None and len(exclude[r]):
            row[list(exclude[r])] = -np.inf
        kth = np.partition(row, c - k)[c - k]
        cand = np.flatnonzero(row >= kth)
        order = np.lexsort((cand, -row[cand]))
        out[r] = cand[order][:k]
    return out


def circo_map_at_k(scores, positives: Sequence[Sequence[int]], ks: Sequence[int] = CIRCO_KS,
                   exclude: Sequence[Sequence[int]] | None = None) -> dict[str, float]:
    """CIRCO mAP@k (official definition, several ground truths), in percent.

    ``AP@k = (1 / min(k, n_gt)) * sum_{i<=k} P@i * rel_i`` with ``P@i`` the precision of the first i results
    and ``rel_i`` 1 if the i-th result is a ground truth; mAP@k is the mean over queries.

    Args:
        scores: (Q, C). positives: per query, the ground-truth candidate indices (non-empty).

    Returns:
        ``{"mAP@k": %}``.
    """
    s = _np(scores)
    _check_scores(s, len(positives), "circo_map_at_k")
    top = ranked_topk(s, max(ks), exclude)
    aps = {k: np.zeros(len(positives)) for k in ks}
    for r, gts in enumerate(positives):
        if len(gts) == 0:
            raise DataError(f"circo_map_at_k: query {r} has no ground truth")
        rel = np.isin(top[r], list(gts)).astype(np.float64)
        prec = np.cumsum(rel) / np.arange(1, len(rel) + 1)
        for k in ks:
            aps[k][r] = float((prec[:k] * rel[:k]).sum() / min(k, len(set(gts))))
    return {f"mAP@{k}": 100.0 * float(v.mean()) for k, v in aps.items()}


def genecis_recall(gallery_scores: Sequence, ks: Sequence[int] = GENECIS_KS) -> dict[str, float]:
    """GeneCIS R@k within each query's own gallery, target at position 0, in percent.

    Args:
        gallery_scores: per query a (G_q,) array of scores of ``[target, distractor_1, ...]``.

    Returns:
        ``{"R@k": %}``; a query hits when fewer than k distractors score strictly above the target (the target,
        first in its gallery, wins ties).
    """
    if len(gallery_scores) == 0:
        raise DataError("genecis_recall: no queries")
    n_before = np.empty(len(gallery_scores), dtype=np.int64)
    for r, g in enumerate(gallery_scores):
        g = _np(g).reshape(-1)
        if g.size < 1:
            raise DataError(f"genecis_recall: query {r} has an empty gallery")
        n_before[r] = int((g[1:] > g[0]).sum())
    return {f"R@{k}": 100.0 * float((n_before < k).mean()) for k in ks}


def gallery_scores(query_emb, cand_emb, galleries: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """Scores of each query against its gallery: query_emb (Q, D), cand_emb (C, D) -> Q arrays (G_q,)."""
    qe, ce = _np(query_emb), _np(cand_emb)
    return [ce[list(g)] @ qe[r] for r, g in enumerate(galleries)]


def pair_accuracy(image_emb, pos_emb, neg_emb) -> float:
    """CC-Neg / Sugar-Crepe accuracy in percent: mean of cos(img, pos) > cos(img, neg) (ties fail).

    Args:
        image_emb, pos_emb, neg_emb: (N, D) embeddings (normalised inside, so cosine = dot product).
    """
    im, po, ne = (_np(x) for x in (image_emb, pos_emb, neg_emb))
    if not (im.shape == po.shape == ne.shape) or im.ndim != 2 or im.shape[0] == 0:
        raise DataError(f"pair_accuracy: shapes differ or empty: {im.shape}, {po.shape}, {ne.shape}")

    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    im, po, ne = unit(im), unit(po), unit(ne)
    return 100.0 * float(((im * po).sum(1) > (im * ne).sum(1)).mean())
