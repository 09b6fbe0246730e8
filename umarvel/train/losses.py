"""Training losses of U-MARVEL as pure functions of tensors (method spec section 2).

What this module owns:
- :func:`info_nce`: InfoNCE of local queries against (gathered) candidates, optionally with hard negatives in
  the official slot-major column layout and an optional candidate->query term (stage 2 sums both).
- :func:`duplicate_mask` / :func:`duplicate_mask_c2q`: in-batch false-negative masks (decision D12).
- :func:`distill_kl`: the stage-5 reranker distillation KL (decision D11).
- :func:`initial_temperature`: the raw temperature tau at a stage start (section 1.5, decision D2).

Conventions (identical to the official code, checked against ``golden/umarvel_train_tiny`` cases c1-c5):
- Embeddings are L2-normalised *inside* these functions (normalising normalised ones is harmless); cosines are
  dot products of the normalised vectors and ``logits = cos / tau`` with the **raw** tau (not log-space).
- No ``torch.distributed`` collective is called here. Gathering is the caller's job through
  :func:`umarvel.dist.all_gather_with_grad`; only the *default* label offset reads the rank.

Extending: add a new pure function taking embeddings / scores / temperature and returning a scalar; the
objective in the trainer combines them.
"""
from __future__ import annotations

import logging
import math
from typing import Hashable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from umarvel import dist as udist
from umarvel.model.constants import DEFAULT_TEMPERATURE

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------- helpers
def _as_tau(temperature: float | Tensor, like: Tensor) -> Tensor | float:
    """Return tau as a 0-d tensor on ``like``'s device/dtype (keeps the autograd graph), or a float."""
    if isinstance(temperature, Tensor):
        if temperature.numel() != 1:
            raise ValueError(f"temperature must be a scalar, got shape {tuple(temperature.shape)}")
        return temperature.reshape(()).to(device=like.device, dtype=like.dtype)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return float(temperature)


def default_labels(batch_size: int, num_candidates: int, device: torch.device | None = None) -> Tensor:
    """Target column of each local query when candidates are ``[all positives of all ranks, ...]``.

    Args:
        batch_size: B, the number of local queries.
        num_candidates: N, the number of (gathered) positive candidates.

    Returns:
        (B,) int64 ``offset + arange(B)`` where ``offset = 0`` if ``N == B`` (nothing gathered) and
        ``rank * B`` if ``N == B * world_size`` (gathered with :func:`umarvel.dist.all_gather_with_grad`).

    Raises:
        ValueError: for any other N (pass explicit ``labels`` then).
    """
    if num_candidates == batch_size:
        offset = 0
    elif num_candidates == batch_size * udist.get_world_size():
        offset = udist.local_slice_offset(batch_size)
    else:
        raise ValueError(
            f"cannot infer labels: {num_candidates} candidates for {batch_size} queries at world size "
            f"{udist.get_world_size()}; pass labels explicitly"
        )
    return torch.arange(offset, offset + batch_size, device=device)


def flatten_hard_negatives(hard_negatives: Tensor, num_candidates: int) -> Tensor:
    """Bring hard negatives to the official slot-major 2-D layout.

    Args:
        hard_negatives: (K, N, D) with ``[k, j]`` = slot-k negative of query j, or already flat (K*N, D)
            ordered ``[N slot-1 negatives | N slot-2 negatives | ... ]``.
        num_candidates: N, the number of positive candidates (used to validate the flat form).

    Returns:
        (K*N, D), rows ordered slot-major.
    """
    if hard_negatives.dim() == 3:
        if hard_negatives.shape[1] != num_candidates:
            raise ValueError(
                f"hard_negatives (K, N, D) has N={hard_negatives.shape[1]}, expected {num_candidates}"
            )
        return hard_negatives.reshape(-1, hard_negatives.shape[-1])
    if hard_negatives.dim() != 2 or hard_negatives.shape[0] % num_candidates:
        raise ValueError(
            f"hard_negatives must be (K, N, D) or (K*N, D) with N={num_candidates}, "
            f"got {tuple(hard_negatives.shape)}"
        )
    return hard_negatives


def gather_ready_hard_negatives(hard_negatives: Tensor) -> Tensor:
    """Local slot-major negatives (K, B, D) -> (B, K, D), the layout to gather along dim 0.

    Gathering (B, K, D) over ranks and calling :func:`hard_negatives_from_gathered` gives the global
    slot-major (K, N, D) the official code builds by gathering each slot block separately.
    """
    return hard_negatives.transpose(0, 1).contiguous()


def hard_negatives_from_gathered(gathered: Tensor) -> Tensor:
    """Gathered (N, K, D) -> slot-major (K, N, D) (inverse of :func:`gather_ready_hard_negatives`)."""
    return gathered.transpose(0, 1)


# ----------------------------------------------------------------------------------------------- InfoNCE
def similarity_logits(q: Tensor, c: Tensor, temperature: float | Tensor) -> Tensor:
    """Cosine logits ``cos(q_i, c_j) / tau`` (both inputs L2-normalised first).

    Args:
        q: (B, D) queries. c: (C, D) candidates.
        temperature: raw tau (float or 0-d tensor, possibly learnable).

    Returns:
        (B, C) logits in the dtype of ``q``.
    """
    return (F.normalize(q, dim=-1) @ F.normalize(c, dim=-1).T) / _as_tau(temperature, q)


def _masked(logits: Tensor, mask: Tensor | None, labels: Tensor) -> Tensor:
    """Apply a false-negative mask (True = drop the column for that row); the target stays untouched."""
    if mask is None:
        return logits
    if mask.shape != logits.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != logits shape {tuple(logits.shape)}")
    mask = mask.to(device=logits.device, dtype=torch.bool)
    if mask.gather(1, labels[:, None]).any():
        raise ValueError("mask must not mask a row's own positive column")
    return logits.masked_fill(mask, float("-inf"))


def info_nce(
    q: Tensor,
    c: Tensor,
    temperature: float | Tensor,
    hard_negatives: Tensor | None = None,
    labels: Tensor | None = None,
    mask: Tensor | None = None,
    bidirectional: bool = False,
    all_queries: Tensor | None = None,
    mask_c2q: Tensor | None = None,
) -> Tensor:
    """InfoNCE of local queries against (gathered) candidates, stages 1-4 (spec 2.1, 2.2).

    Columns of the q->c logits: ``[N positives | N slot-1 negatives | ... | N slot-K negatives]`` (the official
    layout, golden c4), all divided by tau; the loss is the mean cross-entropy over the B local rows. Under
    DDP gradient averaging this equals the single-process loss on the concatenated batch.

    Args:
        q: (B, D) local query embeddings (raw or normalised: they are normalised inside, as official).
        c: (N, D) positive candidates, gathered over ranks in rank order (N = B when single-process).
        temperature: raw tau, float or 0-d tensor (learnable from stage 3).
        hard_negatives: None, (K, N, D) or slot-major (K*N, D); see :func:`flatten_hard_negatives`.
        labels: (B,) target column per query; default ``rank*B + arange(B)`` (:func:`default_labels`).
        mask: (B, N + K*N) bool, True drops a column for that row (false negatives, :func:`duplicate_mask`).
        bidirectional: add the candidate->query term (stage 2: ``CE(logits) + CE(logits_c2q)``, a sum).
            Rows are the local positives ``c[labels]``, columns all N queries, targets ``labels``.
            Hard negatives take no part in it (as official: it is the transposed N x N block).
        all_queries: (N, D) queries gathered like ``c``; needed for ``bidirectional`` when N > B.
        mask_c2q: (B, N) bool mask of the c->q logits (:func:`duplicate_mask_c2q`).

    Returns:
        0-d loss tensor.
    """
    if q.dim() != 2 or c.dim() != 2 or q.shape[1] != c.shape[1]:
        raise ValueError(f"q (B, D) and c (N, D) expected, got {tuple(q.shape)} and {tuple(c.shape)}")
    num_pos = c.shape[0]
    if labels is None:
        labels = default_labels(q.shape[0], num_pos, device=q.device)
    cols = c if hard_negatives is None else torch.cat([c, flatten_hard_negatives(hard_negatives, num_pos)], 0)
    logits = _masked(similarity_logits(q, cols, temperature), mask, labels)  # (B, N + K*N)
    loss = F.cross_entropy(logits, labels)
    if bidirectional:
        loss = loss + _c2q_loss(q, c, temperature, labels, all_queries, mask_c2q)
    return loss


def _c2q_loss(
    q: Tensor,
    c: Tensor,
    temperature: float | Tensor,
    labels: Tensor,
    all_queries: Tensor | None,
    mask_c2q: Tensor | None,
) -> Tensor:
    """Candidate->query CE: rows = local positives ``c[labels]`` (B, D), columns = all N queries."""
    if all_queries is None:
        if c.shape[0] != q.shape[0]:
            raise ValueError("bidirectional with gathered candidates needs all_queries (N, D) gathered too")
        all_queries = q
    if all_queries.shape[0] != c.shape[0]:
        raise ValueError(f"all_queries has {all_queries.shape[0]} rows, candidates {c.shape[0]}")
    logits = _masked(similarity_logits(c[labels], all_queries, temperature), mask_c2q, labels)
    return F.cross_entropy(logits, labels)


# ----------------------------------------------------------------------------------- false negatives (D12)
def _overlap_mask(row_keys: Sequence[Sequence[Hashable]], col_keys: Sequence[Sequence[Hashable]]) -> Tensor:
    """(R, C) bool: True where row i and column j share at least one id (ids compared by equality)."""
    codes: dict[Hashable, int] = {}

    def encode(keys: Sequence[Sequence[Hashable]], pad: int) -> Tensor:
        width = max((len(k) for k in keys), default=1) or 1
        rows = [[codes.setdefault(x, len(codes)) for x in k] + [pad] * (width - len(k)) for k in keys]
        return torch.tensor(rows, dtype=torch.long).reshape(len(keys), width)

    r = encode(row_keys, -1)  # (R, a)
    cc = encode(col_keys, -2)  # (C, b)
    return (r[:, None, :, None] == cc[None, :, None, :]).flatten(2).any(-1)


def _keep_targets(mask: Tensor, labels: Tensor) -> Tensor:
    """Never mask a row's own positive column."""
    labels = labels.to(mask.device)
    mask[torch.arange(mask.shape[0]), labels] = False
    return mask


def duplicate_mask(
    cand_ids: Sequence[Hashable],
    labels: Tensor,
    query_ids: Sequence[Hashable] | None = None,
) -> Tensor:
    """False-negative mask for the q->c logits of :func:`info_nce` (decision D12).

    Column j of row i is masked when the candidate in column j is the row's positive record under another
    column (``cand_ids[j] == cand_ids[labels[i]]``: the same did gathered twice, a shared positive, a hard
    negative equal to the positive) or is the query record itself (``cand_ids[j] == query_ids[i]``), except the row's
    own positive column ``labels[i]``. Duplicates among negatives are *not* masked (official padding repeats
    a negative; golden c4).

    Args:
        cand_ids: C ids, one per logits column in layout order (``[N positives | K*N slot-major negatives]``,
            gathered over ranks like the embeddings, e.g. via :func:`umarvel.dist.all_gather_object`).
        labels: (B,) target column of each local query.
        query_ids: B ids of the local query records, in the *same id space* as ``cand_ids`` (pass None to
            skip the self-match test, e.g. M-BEIR qids and dids are separate spaces).

    Returns:
        (B, C) bool, True = drop the column for that row.
    """
    labels = labels.reshape(-1).cpu()
    num_rows = labels.shape[0]
    positive_ids = [cand_ids[int(j)] for j in labels]
    if query_ids is not None and len(query_ids) != num_rows:
        raise ValueError(f"query_ids must have {num_rows} entries (one per query)")
    rows = [(p,) if query_ids is None else (p, query_ids[i]) for i, p in enumerate(positive_ids)]
    mask = _overlap_mask(rows, [(x,) for x in cand_ids])
    return _keep_targets(mask, labels)


def duplicate_mask_c2q(
    all_query_ids: Sequence[Hashable],
    all_positive_ids: Sequence[Hashable],
    labels: Tensor,
    same_id_space: bool = False,
) -> Tensor:
    """False-negative mask for the c->q logits of :func:`info_nce` (``bidirectional=True``).

    Row i is the local positive ``labels[i]`` (id ``p = all_positive_ids[labels[i]]``); column k is query k.
    Column k is masked when query k has the same positive (``all_positive_ids[k] == p``) or, with
    ``same_id_space``, when query k is the candidate record itself (``all_query_ids[k] == p``); never the
    target column ``labels[i]``.

    Args:
        all_query_ids: N ids of the gathered queries. all_positive_ids: N ids of their positives.
        labels: (B,) target columns. same_id_space: queries and candidates share one id space.

    Returns:
        (B, N) bool.
    """
    labels = labels.reshape(-1).cpu()
    if len(all_query_ids) != len(all_positive_ids):
        raise ValueError("all_query_ids and all_positive_ids must have the same length")
    rows = [(all_positive_ids[int(j)],) for j in labels]
    cols = [(p, qid) if same_id_space else (p,) for qid, p in zip(all_query_ids, all_positive_ids)]
    return _keep_targets(_overlap_mask(rows, cols), labels)


# ------------------------------------------------------------------------------------- distillation (D11)
def per_query_scores(q: Tensor, candidates: Tensor) -> Tensor:
    """Cosine of each query with its own candidates (stage 5: no in-batch negatives).

    Args:
        q: (B, D) queries. candidates: (B, K, D), ``[i, k]`` = candidate k of query i (a slot-major
            collator batch (K, B, D) becomes this with ``.transpose(0, 1)``).

    Returns:
        (B, K) cosines.
    """
    return torch.einsum("bd,bkd->bk", F.normalize(q, dim=-1), F.normalize(candidates, dim=-1))


def distill_kl(
    student_scores: Tensor,
    teacher_scores: Tensor,
    temperature: float | Tensor,
    official: bool = False,
    teacher_scale: float = 0.5,
) -> Tensor:
    """Reranker distillation KL of stage 5 (spec 2.4, decision D11).

    ``student = cos / tau``; ``teacher = (teacher_scale * fused) / tau.detach()`` (the official halves the fused
    score); loss = ``KL(softmax(teacher) || softmax(student))`` averaged over queries (``batchmean``).

    Args:
        student_scores: (B, K) cosines of each query with its K candidates (:func:`per_query_scores`).
        teacher_scores: (B, K) fused teacher scores (cast to the student dtype first, as the official does).
        temperature: raw tau; the teacher side uses it detached.
        official: False (D11 default) uses ``log_softmax(student)``; True reproduces the official
            ``log(softmax(student) + 1e-8)``.
        teacher_scale: factor applied to the fused score before dividing by tau (official 0.5).

    Returns:
        0-d loss tensor.
    """
    if student_scores.shape != teacher_scores.shape or student_scores.dim() != 2:
        raise ValueError(
            f"student and teacher scores must both be (B, K), got {tuple(student_scores.shape)} "
            f"and {tuple(teacher_scores.shape)}"
        )
    tau = _as_tau(temperature, student_scores)
    tau_t = tau.detach() if isinstance(tau, Tensor) else tau
    teacher = teacher_scores.to(device=student_scores.device, dtype=student_scores.dtype)
    student_logits = student_scores / tau  # (B, K)
    teacher_logits = (teacher * teacher_scale) / tau_t  # (B, K)
    if official:
        log_p = torch.log(F.softmax(student_logits, dim=-1) + 1e-8)
    else:
        log_p = F.log_softmax(student_logits, dim=-1)
    return F.kl_div(log_p, F.softmax(teacher_logits, dim=-1), reduction="batchmean")


# ------------------------------------------------------------------------------------- temperature (D2)
def initial_temperature(
    init: float | Literal["carry"] = DEFAULT_TEMPERATURE, carried: float | None = None
) -> float:
    """tau at a stage start (decision D2).

    Args:
        init: a number (default 0.05: reset at every stage, what the published chain does) or ``"carry"``
            to keep the value learned in the previous stage.
        carried: the previous stage's tau (from its checkpoint); required for ``"carry"``.

    Returns:
        The initial tau as a float.
    """
    if init == "carry":
        if carried is None or not math.isfinite(carried) or carried <= 0:
            raise ValueError(f"temperature init 'carry' needs a positive carried value, got {carried!r}")
        logger.info("temperature carried over from the previous stage: %.6g", carried)
        return float(carried)
    if isinstance(init, str):
        raise ValueError(f"temperature init must be a number or 'carry', got {init!r}")
    if not init > 0:
        raise ValueError(f"temperature init must be > 0, got {init}")
    return float(init)
