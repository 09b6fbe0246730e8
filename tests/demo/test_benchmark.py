"""The demo benchmark: negatives are true negatives (no candidate shows or describes a positive of its query under
another did, in the local pools, the global pools or the mined train lists), and the near-duplicates that make
hard negatives informative are there (same shape and size in other colours, the same object at other positions)."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest

from umarvel.data.registry import MBEIR_UNION_POOLS, MBEIR_UNION_TRAIN_QUERIES, get_task
from umarvel.demo.benchmark import OBJECTS_FILE, BenchmarkSpec, demo_pool_objects, make_demo_benchmark
from umarvel.errors import ConfigError

ATTRS = ("shape", "colour", "size", "position")
SMALL = dict(image_size=28, eval_queries_per_task=6, pool_size_per_task=10, train_queries_per_task=8, nli_pairs=8,
             cc3m_pairs=8)


def _split_pools(pools: dict, split: str) -> dict:
    """The pools searched by the queries of ``split`` (val and test share every task's pool but MSCOCO's)."""
    if split == "train":
        return {k: v for k, v in pools.items() if k[1] == "train"}
    out = {}
    for (task, s), objs in pools.items():
        shared = get_task(task).files("val").pool == get_task(task).files("test").pool
        if s == split or (shared and s == "val"):
            out[(task, s)] = objs
    return out


def test_pool_layout_is_disjoint_per_split_and_made_of_near_duplicate_clusters():
    pools = demo_pool_objects(BenchmarkSpec())
    assert pools == demo_pool_objects(BenchmarkSpec())  # deterministic
    for split in ("train", "val", "test"):
        chosen = _split_pools(pools, split)
        assert len(chosen) == 7, split
        everything = [o for objs in chosen.values() for o in objs]
        assert len(everything) == len(set(everything)), f"{split}: an object is in two pools"
    colour_neighbours = 0
    for key, objs in pools.items():
        assert len(objs) == len(set(objs)) == (25 if key[0] == "mscoco_task3" else 50), key
        inside = set(objs)
        for o in objs:
            others = [x for x in inside if x != o and (x.shape, x.colour, x.size) == (o.shape, o.colour, o.size)]
            assert len(others) == 4, (key, o)  # the same object at every other position
            colour_neighbours += any((x.shape, x.size, x.position) == (o.shape, o.size, o.position) and x != o
                                     for x in inside)
    assert colour_neighbours / sum(len(v) for v in pools.values()) > 0.8  # same shape and size, other colour


def test_spec_refuses_pools_the_universe_cannot_keep_disjoint():
    with pytest.raises(ConfigError, match="pool_size_per_task"):
        BenchmarkSpec(pool_size_per_task=60)
    with pytest.raises(ConfigError, match="query_jitter"):
        BenchmarkSpec(query_jitter=0.12)


@pytest.fixture(scope="module")
def small_bench(tmp_path_factory):
    return make_demo_benchmark(tmp_path_factory.mktemp("bench") / "b", BenchmarkSpec(**SMALL))


def _objects(bench) -> dict[str, tuple]:
    raw = json.loads((bench.mbeir / OBJECTS_FILE).read_text())
    return {did: tuple(o[a] for a in ATTRS) for did, o in raw.items()}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_no_candidate_of_any_pool_repeats_a_positive_under_another_did(small_bench):
    objects = _objects(small_bench)
    root = small_bench.mbeir
    for split in ("train", "val", "test"):
        pool = _jsonl(root / MBEIR_UNION_POOLS[split])
        dids_of = defaultdict(set)
        for c in pool:
            dids_of[objects[c["did"]]].add(c["did"])
        files = ([root / MBEIR_UNION_TRAIN_QUERIES] if split == "train" else
                 [root / get_task(t).files(split).queries for t in small_bench.spec.tasks])
        n = 0
        for f in files:
            for q in _jsonl(f):
                positives = set(q["pos_cand_list"])
                for did in positives:  # every candidate showing a positive's object is itself a positive
                    assert dids_of[objects[did]] <= positives, (split, q["qid"], did, dids_of[objects[did]])
                n += 1
        assert n > 0, split


def test_mining_never_returns_a_positive_under_another_did(small_bench, tiny_checkpoint, tmp_path):
    from umarvel.pipelines.mining import MineConfig, mine

    objects = _objects(small_bench)
    files = mine(MineConfig(model=str(tiny_checkpoint), mbeir_root=str(small_bench.mbeir), output=str(tmp_path / "m"),
                            top_k=1000, scope="both", subset=False, device="cpu", dtype="float32", batch_size=16))
    for scope in ("local", "global"):
        rows = _jsonl(files[scope])
        assert rows, scope
        for row in rows:
            positives = {objects[d] for d in row["gt_docs"]}
            for did in row["top100_docs"]:
                if did not in row["gt_docs"]:
                    assert objects[did] not in positives, (scope, row["qid"], did, objects[did])
        # the whole pool was returned, near-duplicates of the positives included
        assert max(len(r["top100_docs"]) for r in rows) >= 10
