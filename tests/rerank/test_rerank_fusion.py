"""Fusion: each candidate keeps its own cosine (D9), weights tuned on validation only, teacher weights."""
from __future__ import annotations

import random

import numpy as np
import pytest

from umarvel.errors import ConfigError, DataError
from umarvel.rerank.fusion import (RerankedQuery, RerankResults, choose_weight, fuse_query, fused_recall,
                                   official_global_fuse_query, teacher_fuse, teacher_weight)


def _query(seed: int = 0, k: int = 8):
    rng = np.random.default_rng(seed)
    dids = [f"9:{100 + i}" for i in range(k)]
    cos = np.sort(rng.uniform(0.2, 0.9, k))[::-1]  # retrieval order: cosine descending
    p = rng.uniform(0, 1, k)
    return dids, cos, p


def test_each_candidate_keeps_its_own_cosine_under_reversal_and_shuffle():
    dids, cos, p = _query()
    w = 0.7
    expected = {d: c + w * pp for d, c, pp in zip(dids, cos, p)}
    ref = fuse_query(RerankedQuery.from_lists("q", dids, cos, p), w)
    assert dict(ref) == pytest.approx(expected, abs=1e-12)
    assert [s for _, s in ref] == sorted(expected.values(), reverse=True)
    # the same candidates listed in reverse (or shuffled) order, each with its own scores: same fused values
    rev = RerankedQuery.from_lists("q", dids[::-1], cos[::-1], p[::-1])
    assert dict(fuse_query(rev, w)) == pytest.approx(expected, abs=1e-12)
    perm = list(range(len(dids)))
    random.Random(3).shuffle(perm)
    shuf = RerankedQuery.from_lists("q", [dids[i] for i in perm], cos[perm], p[perm])
    assert [d for d, _ in fuse_query(shuf, w)] == [d for d, _ in ref]


def test_official_global_bug_is_detected():
    """Pairing P(yes) of candidate i with the score of candidate k-1-i (official global fusion) changes results."""
    dids, cos, p = _query(1)
    w = 0.5
    good = dict(fuse_query(RerankedQuery.from_lists("q", dids, cos, p), w))
    buggy = {d: c + w * pp for d, c, pp in zip(dids, cos[::-1], p)}
    assert any(abs(good[d] - buggy[d]) > 1e-6 for d in dids)


def test_official_global_fusion_reproduces_the_official_script():
    """compat="official" on the global protocol: the official script's arithmetic on FAISS L2 distances."""
    dids, cos, p = _query(4, k=50)
    w = 0.1
    # what the official script does with the IndexFlatL2 output (squared L2 of unit vectors, ascending)
    raw_scores = [2.0 - 2.0 * c for c in cos]
    raw_score = raw_scores[::-1]
    final = [1.0 * raw_score[i] + w * p[i] for i in range(len(raw_score))]
    order = [i for i, _ in sorted(enumerate(final), key=lambda x: x[1], reverse=True)]
    q = RerankedQuery.from_lists("q", dids, cos, p)
    got = official_global_fuse_query(q, w)
    assert [d for d, _ in got] == [dids[i] for i in order]
    assert [s for _, s in got] == pytest.approx([final[i] for i in order], abs=1e-12)
    assert fuse_query(q, w, rule="official_global") == got
    assert [d for d, _ in got] != [d for d, _ in fuse_query(q, w)]  # it is not the cosine fusion
    with pytest.raises(ConfigError, match="fusion rule"):
        fuse_query(q, w, rule="l2")


def test_weight_zero_keeps_retrieval_order_and_tail_stays_below():
    dids, cos, p = _query(2, k=6)
    q = RerankedQuery.from_lists("q", dids, cos, p[:4])  # only the top 4 reranked
    assert [d for d, _ in fuse_query(q, 0.0)] == dids
    fused = fuse_query(q, 5.0)
    assert [d for d, _ in fused[4:]] == dids[4:]
    assert sorted(d for d, _ in fused[:4]) == sorted(dids[:4])
    with pytest.raises(DataError, match="query q"):
        RerankedQuery.from_lists("q", dids, cos[:3], p[:3])
    with pytest.raises(DataError, match="query q"):
        RerankedQuery.from_lists("q", dids[:2], cos[:2], p[:3])


def _results(split: str) -> RerankResults:
    # query a: positive at retrieval rank 6 with a high P(yes): needs a large w to reach the top 5
    # query b: positive at rank 1, a negative at rank 2 with high P(yes) but far lower cosine
    qa = RerankedQuery.from_lists("a", [f"d{i}" for i in range(8)], [0.9 - 0.01 * i for i in range(8)],
                                  [0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.95, 0.1], positives=["d6"])
    qb = RerankedQuery.from_lists("b", [f"e{i}" for i in range(8)], [0.9, 0.5, 0.49, 0.48, 0.47, 0.46, 0.45, 0.44],
                                  [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0], positives=["e0"])
    return RerankResults(split=split, task="mscoco_task0", queries=(qa, qb), metric_k=5)


def test_choose_weight_on_val_only():
    best, table = choose_weight([_results("val")], grid=[0.0, 0.1, 0.5, 10.0])
    assert table[0.0] == 0.5 and table[0.1] == 1.0 and table[10.0] == 0.5
    assert best == 0.1
    assert fused_recall(_results("val"), 0.1) == 1.0
    for split in ("test", "train", "VAL"):
        with pytest.raises(ConfigError, match="split"):
            choose_weight([_results("val"), _results(split)], grid=[0.1])
    with pytest.raises(ConfigError):
        choose_weight([_results("val")], grid=[])
    with pytest.raises(ConfigError):
        choose_weight([], grid=[0.1])


def test_teacher_weights_and_resort():
    assert teacher_weight("mscoco_task0") == 0.5
    assert teacher_weight("mscoco_task3") == 0.1
    assert teacher_weight("cirr_task7") == 1.0
    assert teacher_weight("cirr_task7", {"cirr_task7": 0.3}) == 0.3
    dids, cos, p = _query(4, k=5)
    out_dids, fused = teacher_fuse("mscoco_task0", dids, cos, p)
    expect = {d: c + 0.5 * pp for d, c, pp in zip(dids, cos, p)}
    assert dict(zip(out_dids, fused)) == pytest.approx(expect, abs=1e-12)
    assert list(fused) == sorted(fused, reverse=True)
    rev_dids, rev_fused = teacher_fuse("mscoco_task0", dids[::-1], cos[::-1], p[::-1])
    assert dict(zip(rev_dids, rev_fused)) == pytest.approx(expect, abs=1e-12)
    with pytest.raises(DataError):
        teacher_fuse("x", dids, cos, p[:2])
