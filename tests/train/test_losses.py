"""Losses: golden parity with the official training code (cases c1-c5) and hand-made masking checks."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import shared_dir
from umarvel.train import losses as L

TAU = float(np.float32(0.05))  # sim.temp of the official model: 0.05000000074505806


GOLDEN = shared_dir() / "golden" / "umarvel_train_tiny" / "expected"
needs_golden = pytest.mark.skipif(
    not GOLDEN.is_dir(), reason=f"golden fixture umarvel_train_tiny not found at {GOLDEN} (set UMARVEL_SHARED)"
)


def _case(name: str) -> tuple[dict[str, np.ndarray], dict]:
    arrays = np.load(GOLDEN / name / "arrays.npz")
    meta = json.loads((GOLDEN / name / "meta.json").read_text())
    return {k: arrays[k] for k in arrays.files}, meta


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.fixture(params=["embeddings_raw", "embeddings"])
def emb_key(request):
    return request.param


@pytest.mark.golden
@needs_golden
@pytest.mark.parametrize("case,expected", [("c1_nli", 1.527816891670227), ("c3_mbeir", 2.482076406478882)])
def test_golden_infonce_q2c(case, expected, emb_key):
    arrays, meta = _case(case)
    assert meta["loss"] == pytest.approx(expected, rel=0, abs=0)
    e = torch.from_numpy(arrays[emb_key])  # rows [3 queries | 3 positives]
    loss = L.info_nce(e[:3], e[3:], torch.tensor(TAU))
    assert _rel(loss.item(), expected) <= 1e-6
    # the logits fed to CE match the recorded ones
    logits = L.similarity_logits(e[:3], e[3:], TAU)
    np.testing.assert_allclose(logits.numpy(), arrays["logits"], atol=2e-5)


@pytest.mark.golden
@needs_golden
def test_golden_bidirectional_c2(emb_key):
    arrays, meta = _case("c2_cc3m")
    e = torch.from_numpy(arrays[emb_key])
    q, c = e[:3], e[3:]
    q2c = L.info_nce(q, c, TAU)
    both = L.info_nce(q, c, TAU, bidirectional=True)
    assert _rel(q2c.item(), 2.816398859024048) <= 1e-6
    assert _rel((both - q2c).item(), 4.294186592102051) <= 1e-6
    assert _rel(both.item(), 7.1105852127075195) <= 1e-6
    assert _rel(both.item(), meta["loss"]) <= 1e-6


@pytest.mark.golden
@needs_golden
def test_golden_hard_negatives_c4(emb_key):
    arrays, meta = _case("c4_hardneg")
    e = torch.from_numpy(arrays[emb_key])  # [3 q | 3 pos | 3 slot-1 | 3 slot-2]
    q, pos, negs = e[:3], e[3:6], e[6:]
    flat = L.info_nce(q, pos, TAU, hard_negatives=negs)  # (K*N, D) slot-major
    stacked = L.info_nce(q, pos, TAU, hard_negatives=negs.reshape(2, 3, -1))  # (K, N, D)
    assert _rel(flat.item(), 3.770878553390503) <= 1e-6
    assert flat.item() == stacked.item()
    # the padded query 8:21 has the same negative in both slots: its column appears twice in every row
    logits = L.similarity_logits(q, torch.cat([pos, negs]), TAU)
    assert torch.equal(logits[:, 4], logits[:, 7])
    np.testing.assert_allclose(logits.numpy(), arrays["logits"], atol=2e-5)
    # slot order does not change the loss (swap query 0's two slots)
    swapped = negs.clone()
    swapped[[0, 3]] = negs[[3, 0]]
    assert L.info_nce(q, pos, TAU, hard_negatives=swapped).item() == pytest.approx(flat.item(), rel=1e-6)
    # and the official (unmasked) default differs from the masked one, which drops the duplicated column
    ids = [m.split()[-1] for m in meta["row_roles"][3:]]
    labels = torch.arange(3)
    mask = L.duplicate_mask(ids, labels)
    assert not mask.any()  # duplicates among negatives are not false negatives of any positive


@pytest.mark.golden
@needs_golden
def test_golden_distill_c5():
    arrays, meta = _case("c5_distill")
    e = torch.from_numpy(arrays["embeddings_raw"])  # [2 queries | k=1 of each | ... | k=5 of each]
    q, cands = e[:2], e[2:].reshape(5, 2, -1).transpose(0, 1)  # (B, K, D)
    cos = L.per_query_scores(q, cands)
    np.testing.assert_allclose(cos.numpy(), arrays["cos_sim"], atol=1e-6)
    tau = torch.nn.Parameter(torch.tensor(TAU))
    fused = torch.from_numpy(arrays["fused_scores"])  # float64, cast to float32 inside
    official = L.distill_kl(cos, fused, tau, official=True)
    exact = L.distill_kl(cos, fused, tau)
    assert _rel(official.item(), 1.0490258932113647) <= 1e-6
    assert _rel(exact.item(), 1.0490252385923977) <= 1e-6
    assert _rel(exact.item(), meta["kl_loss_exact_log_softmax_form"]) <= 1e-6
    # tau gets a gradient only through the student (the teacher uses it detached)
    exact.backward()
    tau2 = torch.tensor(TAU, requires_grad=True)
    student_only = F.kl_div(
        F.log_softmax(cos / tau2, -1), F.softmax((fused.float() / 2) / TAU, -1), reduction="batchmean"
    )
    student_only.backward()
    assert tau.grad.item() == pytest.approx(tau2.grad.item(), rel=1e-6)


# ---------------------------------------------------------------------------- hand-made, no fixture needed
def _rand(b, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g)


def test_info_nce_matches_manual_formula():
    q, c, n = _rand(4), _rand(4, seed=1), _rand(8, seed=2)
    qn, cn, nn_ = (F.normalize(x, dim=-1) for x in (q, c, n))
    loss = L.info_nce(q, c, 0.1, hard_negatives=n)  # K=2
    manual = 0.0
    for i in range(4):
        logits = torch.cat([cn, nn_]) @ qn[i] / 0.1
        manual += -(logits[i] - torch.logsumexp(logits, 0))
    assert loss.item() == pytest.approx(manual.item() / 4, rel=1e-6)


def test_info_nce_explicit_labels_and_errors():
    q, c = _rand(2), _rand(6, seed=1)
    with pytest.raises(ValueError, match="pass labels"):
        L.info_nce(q, c, 0.05)
    loss = L.info_nce(q, c, 0.05, labels=torch.tensor([2, 3]))
    manual = F.cross_entropy(L.similarity_logits(q, c, 0.05), torch.tensor([2, 3]))
    assert loss.item() == pytest.approx(manual.item())
    with pytest.raises(ValueError):
        L.info_nce(q, c[:2], 0.05, hard_negatives=_rand(3))  # 3 rows is not a multiple of N=2
    with pytest.raises(ValueError):
        L.info_nce(q, c[:2], -1.0)


def test_duplicate_mask_same_did_and_self_record():
    # 3 queries; query 1's positive "d1" also appears as query 2's positive column and as a hard negative;
    # query 0 is record "s0", which also appears as a candidate (e.g. NLI-like symmetric data).
    cand_ids = ["d0", "d1", "d1", "x", "s0", "d1"]  # [3 positives | K=1 slot of 3 negatives]
    labels = torch.arange(3)
    mask = L.duplicate_mask(cand_ids, labels, query_ids=["s0", "s1", "s2"])
    expected = torch.zeros(3, 6, dtype=torch.bool)
    expected[0, 4] = True  # the query record itself
    expected[1, [2, 5]] = True  # its did under other columns
    expected[2, [1, 5]] = True  # row 2 shares the positive d1 (its own column 2 kept)
    assert torch.equal(mask, expected)
    without_self = L.duplicate_mask(cand_ids, labels)
    assert not without_self[0].any()


def test_masked_loss_drops_false_negative_columns():
    q, c = _rand(3), _rand(3, seed=1)
    c[2] = c[1]  # query 2's positive duplicates query 1's
    mask = L.duplicate_mask(["a", "b", "b"], torch.arange(3))
    masked = L.info_nce(q, c, 1.0, mask=mask)
    logits = L.similarity_logits(q, c, 1.0)
    manual = torch.stack([
        -(logits[0, 0] - torch.logsumexp(logits[0], 0)),
        -(logits[1, 1] - torch.logsumexp(logits[1, [0, 1]], 0)),
        -(logits[2, 2] - torch.logsumexp(logits[2, [0, 2]], 0)),
    ]).mean()
    assert masked.item() == pytest.approx(manual.item(), rel=1e-6)
    assert masked.item() < L.info_nce(q, c, 1.0).item()
    bad = torch.zeros(3, 3, dtype=torch.bool)
    bad[1, 1] = True
    with pytest.raises(ValueError, match="own positive"):
        L.info_nce(q, c, 0.05, mask=bad)


def test_masked_gradients_are_finite():
    q = _rand(3).requires_grad_()
    c = _rand(3, seed=1).requires_grad_()
    mask = L.duplicate_mask(["a", "a", "b"], torch.arange(3))
    L.info_nce(q, c, 0.05, mask=mask, bidirectional=True,
               mask_c2q=L.duplicate_mask_c2q(["q0", "q1", "q2"], ["a", "a", "b"], torch.arange(3))).backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(c.grad).all()


def test_duplicate_mask_c2q():
    mask = L.duplicate_mask_c2q(["q0", "q1", "q2"], ["a", "a", "q0"], torch.arange(3), same_id_space=True)
    expected = torch.tensor([[False, True, False], [True, False, False], [True, False, False]])
    assert torch.equal(mask, expected)
    plain = L.duplicate_mask_c2q(["q0", "q1", "q2"], ["a", "a", "q0"], torch.arange(3))
    assert torch.equal(plain, torch.tensor([[False, True, False], [True, False, False], [False] * 3]))


def test_bidirectional_with_gathered_shapes():
    q_all, c_all = _rand(4), _rand(4, seed=1)
    full = L.info_nce(q_all, c_all, 0.05, bidirectional=True)
    # two "ranks" of 2 queries each: local loss means average to the full loss
    parts = [
        L.info_nce(q_all[s], c_all, 0.05, labels=torch.arange(s.start, s.stop), bidirectional=True,
                   all_queries=q_all)
        for s in (slice(0, 2), slice(2, 4))
    ]
    assert (sum(parts) / 2).item() == pytest.approx(full.item(), rel=1e-6)
    with pytest.raises(ValueError, match="all_queries"):
        L.info_nce(q_all[:2], c_all, 0.05, labels=torch.arange(2), bidirectional=True)


def test_distill_kl_forms():
    s, t = _rand(3, 5) * 0.3, _rand(3, 5, seed=1)
    exact = L.distill_kl(s, t, 0.05)
    ref = F.kl_div(F.log_softmax(s / 0.05, -1), F.softmax(t * 0.5 / 0.05, -1), reduction="batchmean")
    assert exact.item() == pytest.approx(ref.item(), rel=1e-6)
    # with sharp scores the official +1e-8 form differs measurably
    sharp = torch.tensor([[1.0, -1.0, -1.0]])
    teacher = torch.tensor([[-1.0, 1.0, 1.0]])
    assert not math.isclose(L.distill_kl(sharp, teacher, 0.02, official=True).item(),
                            L.distill_kl(sharp, teacher, 0.02).item(), rel_tol=1e-3)


def test_temperature_policy():
    assert L.initial_temperature() == 0.05
    assert L.initial_temperature("carry", 0.031) == 0.031
    with pytest.raises(ValueError):
        L.initial_temperature("carry", None)
