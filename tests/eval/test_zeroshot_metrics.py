"""Zero-shot metrics against hand computations (umarvel.eval.zeroshot.metrics)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from umarvel.errors import DataError
from umarvel.eval.zeroshot.metrics import (bidirectional_recall, circo_map_at_k, gallery_scores, genecis_recall,
                                           pair_accuracy, ranked_topk, recall_from_scores)


def test_circo_map_with_several_ground_truths():
    # query 0: 3 GTs {1, 3, 6}; ranking by score: 1, 0, 3, 2, 4, 5, 6
    # query 1: 1 GT {2};        ranking: 0, 1, 2, ...
    s = np.array([[0.9, 1.0, 0.5, 0.8, 0.4, 0.3, 0.2],
                  [1.0, 0.9, 0.8, 0.1, 0.0, -0.1, -0.2]])
    gts = [[1, 3, 6], [2]]
    out = circo_map_at_k(s, gts, ks=(1, 3, 5, 7))
    # q0: rel = 1,0,1,0,0,0,1 ; P@i at hits: 1/1, 2/3, 3/7
    ap0 = {1: 1 / 1, 3: (1 + 2 / 3) / 3, 5: (1 + 2 / 3) / 3, 7: (1 + 2 / 3 + 3 / 7) / 3}
    # q1: hit at rank 3 with P@3 = 1/3 ; AP@1 = 0, AP@k>=3 = (1/3) / min(k, 1)
    ap1 = {1: 0.0, 3: 1 / 3, 5: 1 / 3, 7: 1 / 3}
    for k in (1, 3, 5, 7):
        assert out[f"mAP@{k}"] == pytest.approx(100 * (ap0[k] + ap1[k]) / 2)


def test_circo_normalises_by_min_k_ngt():
    s = np.array([[5.0, 4.0, 3.0, 2.0, 1.0]])
    out = circo_map_at_k(s, [[0, 1, 2, 3]], ks=(2, 5))
    assert out["mAP@2"] == pytest.approx(100.0)          # 2 hits / min(2, 4)
    assert out["mAP@5"] == pytest.approx(100.0)          # 4 hits / min(5, 4)


def test_ranking_ties_follow_position_like_a_stable_torch_sort():
    s = np.array([[1.0, 1.0, 1.0, 0.0]])
    assert ranked_topk(s, 3).tolist() == [[0, 1, 2]]
    ref = torch.sort(torch.tensor(s), dim=1, descending=True, stable=True).indices[:, :3]
    assert ranked_topk(s, 3).tolist() == ref.tolist()
    # the ground truth at position 0 ties the others and ranks first; at position 2 it ranks third
    assert circo_map_at_k(s, [[0]], ks=(1, 2, 3)) == pytest.approx({"mAP@1": 100.0, "mAP@2": 100.0, "mAP@3": 100.0})
    assert circo_map_at_k(s, [[2]], ks=(1, 2, 3)) == pytest.approx({"mAP@1": 0.0, "mAP@2": 0.0, "mAP@3": 100 / 3})
    assert ranked_topk(s, 2, exclude=[[0]]).tolist() == [[1, 2]]


def test_genecis_recall_within_gallery():
    galleries = [np.array([0.9, 0.1, 0.2, 0.3]),      # target first -> rank 1
                 np.array([0.5, 0.6, 0.1]),           # rank 2
                 np.array([0.2, 0.3, 0.4, 0.5, 0.6]),  # rank 5
                 np.array([0.7, 0.7, 0.1])]            # tie with a distractor: the target comes first -> rank 1
    out = genecis_recall(galleries)
    assert out == pytest.approx({"R@1": 50.0, "R@2": 75.0, "R@3": 75.0})


def test_genecis_gallery_holding_its_own_target_is_a_hit_as_in_the_official_sort():
    """One GeneCIS change_object gallery lists its own target again: identical vectors, an exact tie. The
    official ``score.sort(descending=True)`` puts position 0 (the target) first, so it is a hit at 1."""
    q = np.array([[0.6, 0.8]])
    c = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])   # candidate 2 is the target, also in its own gallery
    scores = gallery_scores(q, c, [(2, 0, 2, 1)])
    assert scores[0][0] == scores[0][2]
    official = torch.tensor(scores[0]).sort(descending=True).indices  # the official call, on a small gallery
    assert int(official[0]) == 0
    assert genecis_recall(scores, ks=(1,)) == {"R@1": 100.0}


def test_gallery_scores_picks_each_query_gallery():
    q = np.array([[1.0, 0.0], [0.0, 1.0]])
    c = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    out = gallery_scores(q, c, [(0, 2), (2, 1, 0)])
    np.testing.assert_allclose(out[0], [1.0, 0.6])
    np.testing.assert_allclose(out[1], [0.8, 1.0, 0.0])
    assert genecis_recall(out, ks=(1,)) == {"R@1": 50.0}


def test_pair_accuracy_ties_are_failures():
    img = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
    pos = np.array([[1.0, 0.1], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0]])
    neg = np.array([[0.0, 1.0], [0.0, 1.0], [0.0, 2.0], [5.0, 0.0]])  # row 2: equal cosines; row 3: same direction
    # row 0 correct, row 1 wrong, rows 2 and 3 ties -> 1/4
    assert pair_accuracy(img, pos, neg) == pytest.approx(25.0)
    assert pair_accuracy(torch.tensor(img), torch.tensor(pos), torch.tensor(neg)) == pytest.approx(25.0)
    with pytest.raises(DataError):
        pair_accuracy(img, pos[:3], neg)


def test_bidirectional_recall_hand_case():
    # 2 images, 4 texts (texts 0,1 -> image 0 ; texts 2,3 -> image 1)
    s = np.array([[0.9, 0.1],    # t0 -> img0 rank 1
                  [0.2, 0.8],    # t1 -> img0 rank 2
                  [0.3, 0.7],    # t2 -> img1 rank 1
                  [0.6, 0.5]])   # t3 -> img1 rank 2
    out = bidirectional_recall(s, [0, 0, 1, 1], ks=(1, 2))
    assert out["t2i_R@1"] == pytest.approx(50.0) and out["t2i_R@2"] == pytest.approx(100.0)
    # i2t: img0 column (0.9, 0.2, 0.3, 0.6): best own caption t0 is top-1 -> hit@1
    # img1 column (0.1, 0.8, 0.7, 0.5): ranks t1 (not its caption) first, t2 second -> hit@2 only
    assert out["i2t_R@1"] == pytest.approx(50.0) and out["i2t_R@2"] == pytest.approx(100.0)


def test_i2t_counts_any_caption():
    s = np.array([[0.0, 0.9], [0.1, 0.0], [0.2, 0.0], [0.3, 0.0], [0.35, 0.0], [0.4, 0.0]])  # 6 texts, 2 images
    out = bidirectional_recall(s, [0, 0, 0, 0, 0, 1], ks=(1,))
    # image 0: captions 0-4, best is t4 (0.35) but t5 (0.4, image 1) is higher -> miss; image 1: t0 (0.9) wins -> miss
    assert out["i2t_R@1"] == 0.0
    s[4, 0] = 0.5
    assert bidirectional_recall(s, [0, 0, 0, 0, 0, 1], ks=(1,))["i2t_R@1"] == 50.0


def test_recall_ties_and_exclusion():
    s = np.array([[0.5, 0.5, 0.1], [0.2, 0.9, 0.9]])
    # ties rank by position: positive 0 before candidate 1 (hit at 1), positive 2 after candidate 1 (rank 2)
    assert ranked_topk(s, 2).tolist() == [[0, 1], [1, 2]]
    assert recall_from_scores(s, [[0], [2]], ks=(1, 2)) == {"R@1": 50.0, "R@2": 100.0}
    assert recall_from_scores(s[:1], [[0]], ks=(1,)) == {"R@1": 100.0}
    assert recall_from_scores(s[1:], [[2]], ks=(1,)) == {"R@1": 0.0}
    stable = torch.sort(torch.tensor(s), dim=1, descending=True, stable=True).indices
    assert [int(stable[0, 0]) == 0, int(stable[1, 0]) == 2] == [True, False]
    # excluding the rival candidate makes both hits at 1
    assert recall_from_scores(s, [[0], [2]], ks=(1,), exclude=[[1], [1]]) == {"R@1": 100.0}
    # several positives: the best-ranked one counts
    assert recall_from_scores(s, [[0, 1], [0, 2]], ks=(1,)) == {"R@1": 50.0}
    assert recall_from_scores(s, [[1], [1, 2]], ks=(1,)) == {"R@1": 50.0}
    assert recall_from_scores(s, [[0], [2]], ks=(5,)) == {"R@5": 100.0}  # k beyond the candidates
    with pytest.raises(DataError):
        recall_from_scores(s, [[0]], ks=(1,))
    with pytest.raises(DataError):
        recall_from_scores(s, [[0], []], ks=(1,))


def test_recall_matches_brute_force_ranks():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(50, 30))
    pos = [[int(rng.integers(30))] for _ in range(50)]
    ranks = np.array([(s[i] > s[i, p[0]]).sum() for i, p in enumerate(pos)])
    got = recall_from_scores(torch.tensor(s), pos, ks=(1, 5, 10))
    assert got == pytest.approx({f"R@{k}": 100.0 * float((ranks < k).mean()) for k in (1, 5, 10)})


def test_recall_with_many_ties_matches_the_position_rank_formula():
    # rank(p) = #{j: s_j > s_p} + #{j < p: s_j == s_p}; a query hits iff its best-ranked positive has rank < k
    rng = np.random.default_rng(1)
    s = rng.integers(0, 4, size=(60, 12)).astype(np.float64)
    pos = [sorted({int(x) for x in rng.integers(12, size=int(rng.integers(1, 4)))}) for _ in range(60)]

    def rank(i: int, p: int) -> int:
        return int((s[i] > s[i, p]).sum() + (s[i, :p] == s[i, p]).sum())

    best = np.array([min(rank(i, p) for p in ps) for i, ps in enumerate(pos)])
    got = recall_from_scores(s, pos, ks=(1, 2, 5))
    assert got == pytest.approx({f"R@{k}": 100.0 * float((best < k).mean()) for k in (1, 2, 5)})
