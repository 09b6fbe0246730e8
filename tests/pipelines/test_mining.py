"""Mining: task partition, shared pools, brute-force agreement of the mined lists, positives never taken as
negatives, row alignment, the 10% subset, resume."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers import read_jsonl
from umarvel.data.records import Candidate
from umarvel.data.registry import MBEIR_UNION_TRAIN_QUERIES, get_task
from umarvel.data.runfiles import iter_mined, mined_file_name
from umarvel.train.hardneg import select_hard_negatives
from umarvel.pipelines.mining import (MineConfig, build_train_pools, draw_distill_subset, mine,
                                  partition_train_queries, pool_key)

TASKS = ("mscoco_task0", "webqa_task1", "mscoco_task3", "cirr_task7")


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    from umarvel.data.synthetic import make_synthetic_mbeir

    return make_synthetic_mbeir(tmp_path_factory.mktemp("mine") / "mbeir", seed=1, n_queries_per_task=2,
                                n_candidates_per_task=6, image_size=32, n_train_queries_per_task=5, tasks=TASKS)


@pytest.fixture(scope="module")
def mined(tree, tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("mined")
    cfg = MineConfig(model="unused", mbeir_root=str(tree), output=str(out), top_k=8, scope="both",
                     subset_fraction=0.5, device="cpu", batch_size=4)
    files = mine(cfg, encoder=tiny_model)
    return cfg, files


def test_partition_dedups_per_task_and_keeps_rows(tree):
    rows = partition_train_queries(tree / MBEIR_UNION_TRAIN_QUERIES, tree)
    union = read_jsonl(tree / MBEIR_UNION_TRAIN_QUERIES)
    assert [q.qid for q in rows.queries] == [r["qid"] for r in union]
    assert set(rows.task_queries) == set(TASKS)
    cirr = [q.qid for q in rows.task_queries["cirr_task7"]]
    assert len(cirr) == len(set(cirr)) == 5  # up-sampled twice in the union file, deduplicated here
    assert sum(n == "cirr_task7" for n in rows.task_of_row) == 10
    for name, qs in rows.task_queries.items():
        t = get_task(name)
        assert all(q.dataset_id == t.dataset_id and q.task_id == t.task_id for q in qs)


def test_oven_infoseek_share_one_pool():
    tasks = [get_task(n) for n in ("oven_task6", "infoseek_task6", "oven_task8", "infoseek_task8", "webqa_task1")]
    pool = [Candidate("5:1", "a", None, "text"), Candidate("6:1", "b", None, "text"),
            Candidate("6:2", "c", "x.png", "image,text"), Candidate("2:1", "d", None, "text"),
            Candidate("5:3", None, "y.png", "image")]
    pools = build_train_pools(pool, tasks)
    assert pool_key(tasks[0]) == pool_key(tasks[1])
    assert [c.did for c in pools[pool_key(tasks[0])]] == ["5:1", "6:1"]
    assert [c.did for c in pools[pool_key(tasks[2])]] == ["6:2"]
    assert [c.did for c in pools[pool_key(tasks[4])]] == ["2:1"]
    assert len(pools) == 3


def _cached(cfg, tiny_model, name, records):
    from umarvel.eval.cache import EmbeddingCache
    from umarvel.eval.mbeir.runner import encode_records

    return encode_records(tiny_model, records, EmbeddingCache(Path(cfg.output) / "cache"), name)


def test_mined_lists_match_brute_force(tree, tiny_model, mined):
    from umarvel.data.mbeir import assign_instructions, instruction_rng, read_instructions, read_pool
    from umarvel.pipelines.mining import pool_name

    cfg, files = mined
    rows = partition_train_queries(tree / MBEIR_UNION_TRAIN_QUERIES, tree)
    pool = read_pool(tree / cfg.pool, tree)
    table = read_instructions(tree / cfg.instructions)
    modality = {c.did: c.modality for c in pool}
    local = {r.qid: r for r in iter_mined(files["local"])}
    glob = {r.qid: r for r in iter_mined(files["global"])}
    all_pools = build_train_pools(pool, [get_task(n) for n in TASKS])
    glob_cands = [c for members in all_pools.values() for c in members]
    g_vec = tiny_model.encode_candidates([c.to_encode_item() for c in glob_cands])  # fp32, fresh
    for name, qs in rows.task_queries.items():
        qs = assign_instructions(qs, table, modality, "random", instruction_rng(cfg.seed, f"train:{name}"))
        q_vec = tiny_model.encode_queries([q.to_encode_item() for q in qs])
        members = all_pools[pool_key(get_task(name))]
        in_pool = np.array([glob_cands.index(c) for c in members])
        for scope, mined_rows, cols in (("local", local, in_pool), ("global", glob, np.arange(len(glob_cands)))):
            sims = q_vec @ g_vec[cols].T  # (Q, N) brute force
            for i, q in enumerate(qs):
                row = mined_rows[q.qid]
                order = np.argsort(-sims[i], kind="stable")[:cfg.top_k]
                assert len(row.top_docs) == min(cfg.top_k, len(cols))
                np.testing.assert_allclose(row.scores, sims[i][order], atol=2e-3)  # fp16 cache vs fp32
                ids = [glob_cands[cols[j]].did for j in order]
                gaps = np.abs(np.diff(sims[i][order]))
                # identical ranking wherever neighbours are not within fp16 noise of each other
                for j, did in enumerate(ids):
                    if (j == 0 or gaps[j - 1] > 4e-3) and (j == len(ids) - 1 or gaps[j] > 4e-3):
                        assert row.top_docs[j] == did, (scope, q.qid, j)
                assert row.scores == tuple(sorted(row.scores, reverse=True))
                gt_ok = [s for s in row.gt_scores if s is not None]
                assert gt_ok and all(-1.0 <= s <= 1.0 for s in gt_ok)
    # pools were encoded once per distinct pool (names from pool_key)
    entries = {p.name.rsplit("-", 1)[0] for p in (Path(cfg.output) / "cache").iterdir()}
    assert {pool_name(k) for k in all_pools} <= entries


def test_mined_files_aligned_and_negatives_exclude_positives(tree, mined):
    cfg, files = mined
    union = read_jsonl(tree / MBEIR_UNION_TRAIN_QUERIES)
    for scope in ("local", "global"):
        assert files[scope].name == mined_file_name(scope)
        lines = list(iter_mined(files[scope], [u["qid"] for u in union]))
        for row, u in zip(lines, union):
            assert set(row.gt_docs) == set(u["pos_cand_list"])
            negs = select_hard_negatives(row, 5, frozenset(u["pos_cand_list"]))
            assert negs and not set(negs) & set(u["pos_cand_list"])
            assert set(negs) <= set(row.top_docs)
    # the global pool is larger than any local one, and a global list may leave the task's pool
    g = list(iter_mined(files["global"]))
    assert any(len({d.split(":")[0] for d in r.top_docs}) > 1 for r in g)


def test_subset_draw_is_seeded_per_task_and_keeps_order(tree, mined):
    cfg, files = mined
    rows = partition_train_queries(tree / MBEIR_UNION_TRAIN_QUERIES, tree)
    keep = draw_distill_subset(rows, 0.5, 42)
    assert keep == sorted(keep) and keep == draw_distill_subset(rows, 0.5, 42)
    assert keep != draw_distill_subset(rows, 0.5, 7)
    for name in TASKS:
        n = sum(t == name for t in rows.task_of_row)
        assert sum(rows.task_of_row[i] == name for i in keep) == int(n * 0.5)
    written = read_jsonl(files["subset"])
    union = read_jsonl(tree / MBEIR_UNION_TRAIN_QUERIES)
    assert written == [union[i] for i in keep]
    info = json.loads((Path(cfg.output) / "distill_subset.json").read_text())
    assert info["rows_drawn"] == len(keep) and info["seed"] == 42


class _NoEncode:
    """The tiny model's identity (fingerprint, settings) but no encoding allowed: everything must be cached."""

    def __init__(self, model):
        self.model, self.settings, self.device = model, model.settings, model.device

    def fingerprint(self):
        return self.model.fingerprint()

    def encode_queries(self, *a, **k):
        raise AssertionError("re-encoded queries on resume")

    encode_candidates = encode_queries


def test_mining_resumes_without_re_encoding(tree, tiny_model, mined, caplog):
    cfg, files = mined
    before = {s: files[s].read_text() for s in ("local", "global")}
    part = Path(cfg.output) / "parts" / "global" / "webqa_task1.json"
    part.unlink()  # interrupted before this task's global list was written
    with caplog.at_level("INFO", logger="umarvel"):
        again = mine(cfg, encoder=_NoEncode(tiny_model))
    assert {s: again[s].read_text() for s in ("local", "global")} == before
    assert part.is_file()
    assert "mscoco_task0: mined lists reused" in caplog.text
    assert "webqa_task1: mined lists reused" not in caplog.text
