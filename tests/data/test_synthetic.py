"""The synthetic M-BEIR tree: real layout, consistency, determinism, speed, and texts that match images."""
import hashlib
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import read_jsonl
from umarvel.data.synthetic import COLOURS, SYNTHETIC_TASKS, make_synthetic_mbeir
from umarvel.data.mbeir import (
    dataset_id_of, load_mbeir_task, read_instructions, read_pool, read_pool_modalities,
    read_qrels, read_queries,
)
from umarvel.data.registry import (MBEIR_TASK_ORDER, MBEIR_UNION_POOLS, MBEIR_UNION_TRAIN_QUERIES, TASK_MODALITIES,
                                   get_task)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return make_synthetic_mbeir(tmp_path_factory.mktemp("syn"), seed=3)


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_per_seed_and_fast(tmp_path):
    t0 = time.perf_counter()
    a = make_synthetic_mbeir(tmp_path / "a", seed=1)
    assert time.perf_counter() - t0 < 5.0
    b = make_synthetic_mbeir(tmp_path / "b", seed=1)
    c = make_synthetic_mbeir(tmp_path / "c", seed=2)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_task_kinds_cover_the_required_modalities():
    kinds = {TASK_MODALITIES[get_task(n).task_id] for n in SYNTHETIC_TASKS}
    for need in [("text", "image"), ("image", "text"), ("text", "text"), ("image", "image"),
                 ("image,text", "image"), ("image,text", "text")]:
        assert need in kinds
    assert set(SYNTHETIC_TASKS) <= set(MBEIR_TASK_ORDER) and len(SYNTHETIC_TASKS) >= 6


@pytest.mark.parametrize("split", ["val", "test"])
def test_every_task_loads_through_the_real_readers(tree, split):
    table = read_instructions(tree / "instructions/query_instructions.tsv")
    union = read_pool_modalities(tree / MBEIR_UNION_POOLS[split])
    for name in SYNTHETIC_TASKS:
        task = get_task(name)
        data = load_mbeir_task(tree, task, split, instructions=table, global_modalities=union)
        assert len(data.queries) == 6 and len(data.pool) == 12
        assert all(c.modality == task.cand_modality for c in data.pool)
        assert all(q.modality == task.query_modality and q.instruction for q in data.queries)
        assert [data.qrels[q.qid] for q in data.queries] == [q.positives for q in data.queries]
        for item in [*data.queries, *data.pool]:
            assert item.image is None or Path(item.image).is_file()
        assert {c.did for c in data.pool} <= set(union)


def test_instruction_rows_for_all_16_task_keys(tree):
    table = read_instructions(tree / "instructions/query_instructions.tsv")
    for name in MBEIR_TASK_ORDER:
        t = get_task(name)
        assert (t.dataset_id, t.query_modality, t.cand_modality) in table.prompts


def test_global_pools_are_the_sorted_union_of_local_pools(tree):
    for split in ("val", "test"):
        local = [c.did for n in SYNTHETIC_TASKS for c in read_pool(tree / get_task(n).files(split).pool, tree)]
        union = [r["did"] for r in read_jsonl(tree / MBEIR_UNION_POOLS[split])]
        assert sorted(local, key=lambda d: tuple(map(int, d.split(":")))) == union
    # MSCOCO keeps one pool per split, the other datasets share one between val and test
    assert get_task("mscoco_task0").files("val").pool != get_task("mscoco_task0").files("test").pool
    assert (tree / get_task("webqa_task1").files("val").pool).is_file()


def test_ids_unique_per_dataset_across_pools(tree):
    dids = [r["did"] for split in ("train", "test") for r in read_jsonl(tree / MBEIR_UNION_POOLS[split])]
    val_only = [r["did"] for n in ("mscoco_task0", "mscoco_task3")
                for r in read_jsonl(tree / get_task(n).files("val").pool)]
    assert len(set(dids + val_only)) == len(dids + val_only)


def test_train_side_files(tree):
    union = read_jsonl(tree / MBEIR_UNION_TRAIN_QUERIES)
    counts = Counter(r["qid"] for r in union)
    assert any(v == 2 for v in counts.values())  # up-sampled datasets repeat rows
    pool = {r["did"]: r["modality"] for r in read_jsonl(tree / MBEIR_UNION_POOLS["train"])}
    for name in SYNTHETIC_TASKS:
        spec = get_task(name).train
        rows = [r for r in union if spec.selects_query(dataset_id_of(r["qid"]), r["task_id"])]
        assert rows, name
        task_pool = {d for d, m in pool.items() if dataset_id_of(d) in spec.pool_dataset_ids and m == spec.pool_modality}
        assert all(set(r["pos_cand_list"]) <= task_pool for r in rows)
        qrels = read_qrels(tree / spec.qrels)
        assert all(tuple(r["pos_cand_list"]) == qrels[r["qid"]] for r in rows)
        ds = get_task(name).options["dataset_key"]
        assert {q.qid for q in read_queries(tree / f"query/train/mbeir_{ds}_train.jsonl", tree)} >= {
            r["qid"] for r in rows}


def _dominant_colour(path: str) -> str:
    """Name of the palette colour closest to the most saturated/dark pixels of a drawing."""
    arr = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3).astype(float)
    fg = arr[(arr.max(axis=1) - arr.min(axis=1) > 60) | (arr.max(axis=1) < 120)]
    mean = fg.mean(axis=0)
    return min(COLOURS, key=lambda c: float(np.sum((np.array(COLOURS[c]) - mean) ** 2)))


def test_texts_describe_the_images(tree):
    table = read_instructions(tree / "instructions/query_instructions.tsv")
    data = load_mbeir_task(tree, get_task("mscoco_task0"), "test", instructions=table)
    pool = {c.did: c for c in data.pool}
    for q in data.queries:
        colour = _dominant_colour(pool[q.positives[0]].image)
        assert colour in q.text.lower(), (q.text, colour)
    cirr = load_mbeir_task(tree, get_task("cirr_task7"), "test", instructions=table)
    pool = {c.did: c for c in cirr.pool}
    for q in cirr.queries:
        target = _dominant_colour(pool[q.positives[0]].image)
        if "but" in q.text and q.text.rstrip(".").split()[-1] in COLOURS:
            assert q.text.rstrip(".").split()[-1] == target
            assert _dominant_colour(q.image) != target
        else:
            assert _dominant_colour(q.image) == target  # only shape, size or position changed


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="no synthetic generator"):
        make_synthetic_mbeir(tmp_path, tasks=["visualnews_task0"])
    with pytest.raises(ValueError, match="at most"):
        make_synthetic_mbeir(tmp_path, n_candidates_per_task=10_000)
