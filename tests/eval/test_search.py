"""Exact top-k search: backends agree, tiling-invariant, tie rule, padding, errors, ANN recall."""
import numpy as np
import pytest
import torch

from umarvel.errors import ConfigError, DataError
from helpers import search
from umarvel.eval.search import (ann_recall, make_searcher, merge_topk, tile_topk)


def unit(n, d, seed):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute(q, c, k):
    """Reference: full fp64 score matrix, lexicographic (score desc, index asc) order."""
    s = q.astype(np.float64) @ c.astype(np.float64).T
    order = np.lexsort((np.broadcast_to(np.arange(c.shape[0]), s.shape), -s), axis=-1)[:, :k]
    return np.take_along_axis(s, order, 1), order


@pytest.fixture(scope="module")
def data():
    return unit(37, 16, 0), unit(1000, 16, 1)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_matches_brute_force(data, backend):
    q, c = data
    sc, ids = search(q, c, 7, backend=backend, device="cpu")
    rs, ri = brute(q, c, 7)
    assert sc.dtype == np.float32 and ids.dtype == np.int64 and sc.shape == (37, 7)
    np.testing.assert_array_equal(ids, ri)
    np.testing.assert_allclose(sc, rs, atol=1e-5)
    assert np.all(np.diff(sc, axis=1) <= 0)


@pytest.mark.parametrize("q_tile,c_tile,chunk_bytes,prune", [
    (1, 1, None, True), (5, 64, 64 * 16 * 4, True), (37, 1000, None, False), (8, 48, 3000, False)])
def test_tiling_invariant(data, q_tile, c_tile, chunk_bytes, prune):
    q, c = data
    ref_s, ref_i = search(q, c, 10, device="cpu")
    s, i = search(q, c, 10, device="cpu", q_tile=q_tile, c_tile=c_tile, chunk_bytes=chunk_bytes, prune=prune)
    np.testing.assert_array_equal(i, ref_i)
    np.testing.assert_allclose(s, ref_s, atol=1e-6)


def tied_pool():
    """Candidates with many exact duplicates so ties straddle the k-th place.

    Small dyadic entries make every dot product exact in fp32, whatever the summation order of the
    kernel (gemm vs gemv, tile edges), so equal scores are bit-equal in every backend and tiling.
    """
    rng = np.random.default_rng(4)
    base = rng.integers(-4, 5, size=(6, 8)).astype(np.float32) / 8
    c = base[rng.integers(0, 6, size=300)]
    q = rng.integers(-4, 5, size=(9, 8)).astype(np.float32) / 8
    return q, c


@pytest.mark.parametrize("backend,kw", [("torch", {}), ("torch", {"c_tile": 7, "q_tile": 2}),
                                        ("torch", {"prune": False, "c_tile": 13}), ("faiss", {})])
def test_ties_lowest_index_first(backend, kw):
    q, c = tied_pool()
    sc, ids = search(q, c, 12, backend=backend, device="cpu", **kw)
    # duplicates have bit-identical scores in every backend, so the rule is exactly checkable
    exact = q @ c.T
    for row in range(len(q)):
        s = exact[row]
        # group candidates by duplicate vector: the chosen ones must be the lowest indices of each group
        order = np.lexsort((np.arange(len(c)), -np.round(s, 5)))[:12]
        np.testing.assert_array_equal(ids[row], order)


def test_sharded_equals_single(data):
    q, c = data
    ref = search(q, c, 9, device="cpu")
    got = search(q, c, 9, devices=["cpu", "cpu", "cpu"])
    np.testing.assert_array_equal(got[1], ref[1])
    np.testing.assert_allclose(got[0], ref[0], atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_k_larger_than_pool_is_padded(backend):
    q, c = unit(4, 8, 0), unit(3, 8, 1)
    sc, ids = search(q, c, 5, backend=backend, device="cpu")
    assert ids.shape == (4, 5)
    assert np.all(ids[:, 3:] == -1) and np.all(np.isneginf(sc[:, 3:]))
    np.testing.assert_array_equal(np.sort(ids[:, :3], axis=1), np.tile([0, 1, 2], (4, 1)))
    assert np.all(np.isfinite(sc[:, :3]))


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_empty_pool_and_bad_args(backend):
    q = unit(2, 8, 0)
    with pytest.raises(DataError, match="empty"):
        search(q, np.zeros((0, 8), np.float32), 3, backend=backend, device="cpu")
    with pytest.raises(DataError, match="dim"):
        search(q, unit(5, 4, 0), 3, backend=backend, device="cpu")
    with pytest.raises(ConfigError):
        search(q, unit(5, 8, 0), 0, backend=backend, device="cpu")
    with pytest.raises(ConfigError):
        search(q, unit(5, 8, 0), 2, backend="nope")


def test_float16_memmap_blocks(tmp_path, data):
    q, c = data
    c16 = c.astype(np.float16)
    np.save(tmp_path / "a.npy", c16[:400])
    np.save(tmp_path / "b.npy", c16[400:])
    blocks = [np.load(tmp_path / "a.npy", mmap_mode="r"), np.load(tmp_path / "b.npy", mmap_mode="r")]
    got_s, got_i = search(q, blocks, 10, device="cpu", c_tile=96, chunk_bytes=150 * 16 * 4)
    ref_s, ref_i = brute(q, c16.astype(np.float32), 10)
    np.testing.assert_array_equal(got_i, ref_i)
    np.testing.assert_allclose(got_s, ref_s, atol=1e-5)


def test_empty_queries(data):
    _, c = data
    sc, ids = search(np.zeros((0, 16), np.float32), c, 4, device="cpu")
    assert sc.shape == (0, 4) and ids.shape == (0, 4)


def test_searcher_reuse_and_tile_topk_ties():
    c = unit(50, 8, 0)
    s = make_searcher(c, device="cpu")
    a = s.search(unit(3, 8, 1), 4)
    b = s.search(unit(3, 8, 1), 4)
    np.testing.assert_array_equal(a[1], b[1])
    scores = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0, 2.0]])
    v, i = tile_topk(scores, 2)
    assert sorted(i[0].tolist()) == [1, 2]
    v, i = merge_topk(torch.tensor([[0.5, 0.9, 0.5]]), torch.tensor([[7, 3, 2]]), 2)
    assert i.tolist() == [[3, 2]] and v.tolist() == [[pytest.approx(0.9), 0.5]]


def test_ann_recall_reports():
    assert ann_recall(np.array([[1, 2, -1]]), np.array([[2, 3, 1]])) == pytest.approx(2 / 3)
    # clustered data (random Gaussian data has no structure and says nothing about IVF)
    rng = np.random.default_rng(0)
    centers = unit(20, 16, 9)
    c = centers[rng.integers(0, 20, 2000)] + 0.05 * rng.standard_normal((2000, 16)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    q = c[:50] + 0.01
    _, exact = search(q, c, 5, backend="torch", device="cpu")
    _, ivf = make_searcher(c, backend="faiss-ivf", nlist=20, nprobe=20, train_size=2000).search(q, 5)
    assert ann_recall(ivf, exact, 5) == pytest.approx(1.0)  # all lists probed -> exact
    _, hnsw = make_searcher(c, backend="faiss-hnsw").search(q, 5)
    assert 0.5 < ann_recall(hnsw, exact, 5) <= 1.0


def _half_unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


@pytest.mark.parametrize("margin,block", [(0, 64), (4, 8), (32, 1), (32, 8)])
def test_certified_half_selection_equals_exact_fp32_search(margin, block):
    """fp16 selection + fp32 rescoring + certificate (+ fallback rows) == exact search of the fp16 vectors."""
    from umarvel.eval.search import TorchSearcher

    rng = np.random.default_rng(3)
    cands, queries = _half_unit(rng, 6000, 32), _half_unit(rng, 97, 32)
    cands[4000:4010] = cands[17]  # exact ties straddling the top-k of some rows
    queries[:3] = cands[17]
    s = TorchSearcher(cands, device="cpu", dtype=torch.float16, select="certified", margin=margin,
                      q_tile=40, c_tile=1024, resident=True, block=block)
    got_v, got_i = s.search(queries, 10)
    exact = queries.astype(np.float64) @ cands.astype(np.float64).T
    order = np.lexsort((np.broadcast_to(np.arange(exact.shape[1]), exact.shape), -exact), axis=1)[:, :10]
    np.testing.assert_array_equal(got_i, order)
    np.testing.assert_allclose(got_v, np.take_along_axis(exact, order, 1), atol=1e-6)
    assert 17 in got_i[0] and set(got_i[0, :10]) <= {17, *range(4000, 4010)}


def test_certified_requires_half_candidates():
    from umarvel.errors import ConfigError
    from umarvel.eval.search import TorchSearcher

    with pytest.raises(ConfigError, match="float16"):
        TorchSearcher(np.ones((4, 3), np.float32), device="cpu", select="certified")


@pytest.mark.parametrize("block", [4, 16])
def test_block_topk_equals_topk(block):
    from umarvel.eval.search import block_topk

    g = torch.Generator().manual_seed(0)
    scores = torch.randn(33, 512, generator=g)
    scores[5, 100:140] = 7.0  # many equal maxima in one row
    v, i = block_topk(scores, 9, block)
    ref = torch.topk(scores, 9, dim=1).values
    torch.testing.assert_close(v.sort(dim=1, descending=True).values, ref)
    torch.testing.assert_close(scores.gather(1, i), v)
    assert all(len(set(row.tolist())) == 9 for row in i)


def near_tie_fp16(seed: int = 522, d: int = 16, rest: int = 30):
    """A query and fp32 unit candidates 0 and 1 ranked 0 > 1 in fp32 by ~1.4e-4, whose float16 copies rank
    1 > 0 as plain inner products (the fp16 rounding changes the norms more than the margin), plus ``rest``
    far candidates. Returns ``(q fp32 (1, d), fp32 candidates (2 + rest, d), their float16 copies)``."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=d)
    q /= np.linalg.norm(q)
    u1 = rng.normal(size=d)
    u1 /= np.linalg.norm(u1)
    w = rng.normal(size=d)
    for b in (u1, q):
        w -= w.dot(b / np.linalg.norm(b)) * b / np.linalg.norm(b)
    w -= w.dot(u1) * u1
    w /= np.linalg.norm(w)
    u2 = u1 * np.cos(0.01) + w * np.sin(0.01)
    far = unit(4 * rest, d, seed + 1)
    far = far[(far @ q) < 0.2][:rest]
    c32 = np.vstack([u1, u2, far]).astype(np.float32)
    return q[None].astype(np.float32), c32, c32.astype(np.float16)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_fp16_near_tie_is_ordered_as_fp32_after_renormalisation(backend):
    """The fp16 cache round trip reorders a near-tie of plain inner products; normalize=True (what the
    evaluation searches with) re-normalises in fp32 and restores the fp32 order."""
    q, c32, c16 = near_tie_fp16()
    fp32 = (c32 @ q[0]).astype(np.float64)
    raw16 = c16.astype(np.float32) @ q[0]
    assert fp32[0] > fp32[1] and raw16[1] > raw16[0]          # the construction: fp16 flips the raw order
    _, plain = search(q, c16, 2, backend=backend, device="cpu")
    assert plain[0].tolist() == [1, 0]
    scores, ids = search(q, c16, 2, backend=backend, device="cpu", normalize=True)
    assert ids[0].tolist() == [0, 1]
    # cosines of the stored (fp16-rounded) directions: within the fp16 direction error of the fp32 cosines
    np.testing.assert_allclose(scores[0], fp32[:2], atol=1e-4)
    np.testing.assert_allclose(scores[0], raw16[:2] / np.linalg.norm(c16[:2].astype(np.float32), axis=1), atol=1e-6)


def test_renormalised_search_paths_agree():
    """normalize=True: pruned / unpruned / resident / certified torch paths and faiss give one ranking."""
    q, c32, _ = near_tie_fp16()
    rng = np.random.default_rng(3)
    pool = np.vstack([c32, unit(200, 16, 9) * rng.uniform(0.5, 2.0, size=(200, 1))]).astype(np.float16)
    queries = np.vstack([q, unit(9, 16, 4)]).astype(np.float32) * 3.0
    ref = brute(queries / np.linalg.norm(queries, axis=1, keepdims=True),
                pool.astype(np.float32) / np.linalg.norm(pool.astype(np.float32), axis=1, keepdims=True), 5)[1]
    runs = [dict(prune=True), dict(prune=False, c_tile=64), dict(resident=True),
            dict(dtype=torch.float16, select="certified", margin=2)]
    for kw in runs:
        _, ids = make_searcher(pool, device="cpu", normalize=True, **kw).search(queries, 5)
        np.testing.assert_array_equal(ids, ref, err_msg=str(kw))
    _, ids = make_searcher(pool, backend="faiss", normalize=True).search(queries, 5)
    np.testing.assert_array_equal(ids, ref)
