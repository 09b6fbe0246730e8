"""Hit-rate Recall@k against hand-made rankings (official M-BEIR scorer semantics)."""
import numpy as np
import pytest

from umarvel.errors import DataError
from umarvel.eval.metrics import (
    TaskResult, average, hit_matrix, recall_at_k, score_task,
)
from umarvel.data.registry import get_task


def official_recall(relevant, retrieved, k):
    """The official compute_recall_at_k, per query."""
    if not relevant:
        return 0.0
    return 1.0 if set(relevant) & set(retrieved[:k]) else 0.0


RETRIEVED = [
    ["9:1", "9:2", "9:3", "9:4"],   # first positive at rank 1 (0-based 0)
    ["9:5", "9:6", "9:7", "9:8"],   # positive at rank 3 (index 2)
    ["9:1", "9:2", "9:3", "9:4"],   # no positive retrieved
    ["9:4", "9:3", "9:2", "9:1"],   # several positives, first at index 1
    ["9:1", "9:2", "9:3", "9:4"],   # no positives at all -> 0
]
POSITIVES = [{"9:1"}, {"9:7"}, {"9:99"}, {"9:3", "9:1", "9:2"}, set()]


def test_hit_matrix():
    hits = hit_matrix(RETRIEVED, POSITIVES)
    assert hits.shape == (5, 4)
    assert hits[3].tolist() == [False, True, True, True]


@pytest.mark.parametrize("k", [1, 2, 3, 4, 10, 50])
def test_recall_matches_official_including_k_beyond_list(k):
    got = recall_at_k(RETRIEVED, POSITIVES, [k])[k]
    want = np.mean([official_recall(p, r, k) for p, r in zip(POSITIVES, RETRIEVED)])
    assert got == pytest.approx(want)


def test_recall_values_by_hand():
    r = recall_at_k(RETRIEVED, POSITIVES, (1, 2, 3, 50))
    assert r == {1: pytest.approx(1 / 5), 2: pytest.approx(2 / 5), 3: pytest.approx(3 / 5),
                 50: pytest.approx(3 / 5)}


def test_hashed_int_ids_and_duplicates_in_ranking():
    retrieved = np.array([[90000001, 90000001, 90000002], [5, 6, 7]], dtype=np.int64)
    positives = [[90000002], [7, 7]]
    assert recall_at_k(retrieved, positives, (2, 3)) == {2: 0.0, 3: 1.0}


def test_mixed_id_kinds_rejected():
    with pytest.raises(DataError, match="mix integer"):
        recall_at_k(np.array([[1, 2]]), [{"9:1"}], (1,))


def test_bad_shapes_rejected():
    with pytest.raises(DataError, match="for 1 queries but rankings for 2"):
        recall_at_k([["a"], ["b"]], [{"a"}], (1,))
    with pytest.raises(DataError, match="zero queries"):
        recall_at_k(np.zeros((0, 3), dtype=np.int64), [], (1,))
    with pytest.raises(DataError, match=r"\(Q, K\)"):
        recall_at_k(["a", "b"], [{"a"}, {"b"}], (1,))


def test_recall_scores_the_ranking_as_given():
    ids = np.array(["0:1", "0:2", "0:3", "0:4"])
    idx = np.array([[1, 2, 0, 3], [0, 1, 2, 3]])  # ties already broken by pool index (umarvel.eval.search)
    assert recall_at_k(ids[idx], [{"0:3"}, {"0:2"}], (1, 2)) == {1: 0.0, 2: 1.0}


def test_score_task_uses_headline_metric_and_average():
    task = get_task("fashioniq_task7")
    retrieved = [[f"7:{i}" for i in range(1, 51)]] * 2
    res = score_task(task, retrieved, [{"7:8"}, {"7:30"}], pool_size=100)
    assert res.metric == "Recall@10" and res.value == pytest.approx(50.0)
    assert res.recall == {1: 0.0, 5: 0.0, 10: 50.0, 50: 100.0}
    assert res.to_json()["recall"] == {"1": 0.0, "5": 0.0, "10": 50.0, "50": 100.0}
    other = TaskResult(name="x", dataset="X", task_id=0, metric="Recall@5", value=10.0)
    assert average([res, other]) == pytest.approx(30.0)
    with pytest.raises(DataError):
        average([])
