"""M-BEIR readers on the synthetic tree, error reporting, instruction choice, and the task registry."""
import json
import logging
import shutil
from pathlib import Path

import pytest

from umarvel.data.synthetic import make_synthetic_mbeir
from umarvel.errors import ConfigError, DataError
from umarvel.data.mbeir import (
    InstructionTable, assign_instructions, hash_did, instruction_rng, load_mbeir_task, read_instructions,
    read_pool, read_pool_modalities, read_qrels, read_queries, split_id, unhash_did,
)
from umarvel.data.records import Candidate, Query
from umarvel.data.registry import (
    GLOBAL_PROTOCOL, MBEIR_TASK_ORDER, Task, get_task, list_tasks, register_task,
)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return make_synthetic_mbeir(tmp_path_factory.mktemp("mbeir"), seed=0)


@pytest.fixture()
def copy_tree(tree, tmp_path) -> Path:
    """A private copy (without images) for tests that corrupt files."""
    dst = tmp_path / "mbeir"
    shutil.copytree(tree, dst, ignore=shutil.ignore_patterns("*.jpg", "*.png"))
    return dst


def _load(root, name, split="test", **kw):
    table = read_instructions(Path(root) / "instructions/query_instructions.tsv")
    return load_mbeir_task(root, get_task(name), split, instructions=table, **kw)


# ------------------------------------------------------------------------------------------- ids
def test_hashing_round_trip_and_errors():
    assert hash_did("9:6") == 9 * 10_000_000 + 6
    assert unhash_did(hash_did("0:888364")) == "0:888364"
    for bad in ("9-1", "x:1", "9:", 91):
        with pytest.raises(DataError, match="malformed M-BEIR id"):
            split_id(bad)
    with pytest.raises(DataError, match="hash base"):
        hash_did("1:10000000")


# --------------------------------------------------------------------------------------- readers
def test_readers_on_synthetic_tree(tree):
    queries = read_queries(tree / "query/test/mbeir_mscoco_task3_test.jsonl", tree)
    assert queries and all(isinstance(q, Query) for q in queries)
    q = queries[0]
    assert q.modality == "image" and q.text is None and q.task_id == 3 and q.dataset_id == 9
    assert Path(q.image).is_absolute() and Path(q.image).is_file()
    assert len(q.positives) == 2
    pool = read_pool(tree / get_task("mscoco_task3").files("test").pool, tree)
    assert all(isinstance(c, Candidate) and c.modality == "text" for c in pool)
    qrels = read_qrels(tree / "qrels/test/mbeir_mscoco_task3_test_qrels.txt")
    assert qrels[q.qid] == q.positives
    assert q.to_encode_item() == {"text": None, "image": q.image, "instruction": None}
    assert pool[0].to_encode_item() == {"text": pool[0].text, "image": None}


def test_load_task_assigns_instructions_from_the_right_row(tree):
    data = _load(tree, "cirr_task7", "val")
    table = read_instructions(tree / "instructions/query_instructions.tsv")
    prompts = table.prompts[(8, "image,text", "image")]
    assert len(data.queries) == 6 and len(data.pool) == 12
    assert all(q.instruction in prompts for q in data.queries)
    assert data.positives() == [data.qrels[q.qid] for q in data.queries]
    item = data.queries[0].to_encode_item()
    assert set(item) == {"text", "image", "instruction"} and item["instruction"] in prompts


def test_instruction_choice_is_seeded_and_first_mode(tree):
    a = [q.instruction for q in _load(tree, "mscoco_task0", seed=7).queries]
    b = [q.instruction for q in _load(tree, "mscoco_task0", seed=7).queries]
    assert a == b
    draws = {tuple(q.instruction for q in _load(tree, "mscoco_task0", seed=s).queries) for s in range(6)}
    assert len(draws) > 1  # the seed matters
    first = _load(tree, "mscoco_task0", instruction_mode="first").queries
    assert {q.instruction for q in first} == {"Find me an everyday image that matches the given caption."}


def test_instruction_key_uses_modality_of_a_random_positive():
    """Key = (dataset id of the qid, query modality, modality of a randomly chosen positive)."""
    tab = InstructionTable(path="t.tsv", prompts={(5, "image,text", "text"): ("T1", "T2"),
                                                  (5, "image,text", "image,text"): ("IT1",)})
    q = Query(qid="5:1", text="what?", image="/x.jpg", modality="image,text", positives=("6:1", "5:9"),
              task_id=6, dataset_id=5)
    modality_of = {"6:1": "text", "5:9": "image,text"}  # the key's dataset comes from the qid, not the did
    seen = {assign_instructions([q], tab, modality_of, "random", instruction_rng(0, f"s{i}"))[0].instruction
            for i in range(40)}
    assert seen == {"T1", "T2", "IT1"}
    assert assign_instructions([q], tab, modality_of, "first", instruction_rng(0, "x"))[0].instruction == "T1"
    missing = Query(qid="7:3", text="t", image="/x.jpg", modality="image,text", positives=("7:1",),
                    task_id=7, dataset_id=7)
    with pytest.raises(DataError, match=r"query 7:3: no instruction row .*\(7, 'image,text', 'image'\)"):
        assign_instructions([missing], tab, {"7:1": "image"}, "random", instruction_rng(0, "x"))


def test_global_pool_modalities_take_precedence(tree):
    g = read_pool_modalities(tree / "cand_pool/global/mbeir_union_test_cand_pool.jsonl")
    pool_dids = {c.did for c in read_pool(tree / get_task("oven_task6").files("test").pool, tree)}
    assert pool_dids <= set(g)
    only = read_pool_modalities(tree / "cand_pool/global/mbeir_union_test_cand_pool.jsonl", wanted={"5:1"})
    assert only == {"5:1": "text"}


# ------------------------------------------------------------------------------------ bad inputs
def test_malformed_jsonl_line_names_file_and_line(copy_tree):
    path = copy_tree / "query/test/mbeir_webqa_task1_test.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = lines[2][:-5]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"{path}:3: malformed JSON"):
        read_queries(path, copy_tree)


def test_bad_field_names_file_and_line(copy_tree):
    path = get_task("webqa_task1").files("test").pool
    path = copy_tree / path
    lines = path.read_text().splitlines()
    rec = json.loads(lines[1])
    rec["modality"] = "text,image"
    lines[1] = json.dumps(rec)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"{path}:2: unknown modality 'text,image'"):
        read_pool(path, copy_tree)


def test_malformed_tsv_row_names_file_and_line(copy_tree):
    path = copy_tree / "instructions/query_instructions.tsv"
    lines = path.read_text().splitlines()
    lines[4] = "text\timage\tmscoco"  # too few columns
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"{path}:5: expected at least 5"):
        read_instructions(path)
    lines[4] = "text\timage\tmscoco\tnine\tFind it."
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"{path}:5: dataset_id 'nine'"):
        read_instructions(path)


def test_tsv_empty_prompts_dropped(tmp_path):
    path = tmp_path / "i.tsv"
    path.write_text("query_modality\tcand_modality\tname\tdataset_id\tprompt_1\tprompt_2\tprompt_3\n"
                    "text\timage\tmscoco\t9\tFind A.\t\tFind B.\n")
    assert read_instructions(path).prompts == {(9, "text", "image"): ("Find A.", "Find B.")}


def test_malformed_qrels_line(copy_tree):
    path = copy_tree / "qrels/test/mbeir_nights_task4_test_qrels.txt"
    path.write_text(path.read_text() + "4:1 0 4:2 1\n")
    n = len(path.read_text().splitlines())
    with pytest.raises(DataError, match=rf"{path}:{n}: expected 5 columns"):
        read_qrels(path)


def test_qrels_keep_positive_relevance_only(tmp_path):
    path = tmp_path / "q.txt"
    path.write_text("9:1 0 9:1 1 0\n9:1 0 9:2 0 0\n\n9:2  0\t9:3 2 0\n")
    assert read_qrels(path) == {"9:1": ("9:1",), "9:2": ("9:3",)}


def test_unknown_positive_is_an_error_unless_allowed(copy_tree, caplog):
    files = get_task("edis_task2").files("test")
    qpath, rpath = copy_tree / files.queries, copy_tree / files.qrels
    lines = qpath.read_text().splitlines()
    rec = json.loads(lines[0])
    rec["pos_cand_list"].append("3:999999")
    lines[0] = json.dumps(rec)
    qpath.write_text("\n".join(lines) + "\n")
    rpath.write_text(rpath.read_text() + f"{rec['qid']} 0 3:999999 1 2\n")
    with pytest.raises(DataError, match=rf"1 of 6 queries name 1 positive id\(s\) unknown.*{rec['qid']} -> 3:999999"):
        _load(copy_tree, "edis_task2")
    reader_log = logging.getLogger("umarvel.data.mbeir")
    reader_log.addHandler(caplog.handler)  # robust to setup_logging() having turned propagation off
    try:
        with caplog.at_level(logging.WARNING, logger="umarvel.data.mbeir"):
            data = _load(copy_tree, "edis_task2", allow_missing=True)
    finally:
        reader_log.removeHandler(caplog.handler)
    assert data.unknown == {rec["qid"]: ["3:999999"]}
    assert "unknown to the candidate pool" in caplog.text
    # a positive present only in the global pool is known (cross-dataset positives, spec 1.5)
    data = _load(copy_tree, "edis_task2", global_modalities={"3:999999": "image,text"})
    assert data.unknown == {}


def test_query_of_another_task_is_rejected(copy_tree):
    files = get_task("nights_task4").files("test")
    path = copy_tree / files.queries
    lines = path.read_text().splitlines()
    rec = json.loads(lines[0])
    rec["task_id"] = 3
    lines[0] = json.dumps(rec)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="does not belong to nights_task4"):
        _load(copy_tree, "nights_task4")


# -------------------------------------------------------------------------------------- registry
def test_registry_has_the_16_tasks_in_paper_order():
    tasks = list_tasks(kind="mbeir")
    assert [t.name for t in tasks] == list(MBEIR_TASK_ORDER)
    assert len(tasks) == 16
    r10 = {t.name for t in tasks if t.metric == "Recall@10"}
    assert r10 == {"fashion200k_task0", "fashion200k_task3", "fashioniq_task7"}
    assert all(t.metric == "Recall@5" for t in tasks if t.name not in r10)
    assert all(t.cutoffs == (1, 5, 10, 50) for t in tasks)
    coco = get_task("mscoco_task0")
    assert coco.dataset == "MSCOCO" and coco.dataset_id == 9 and coco.task_id == 0
    assert coco.files("test").pool == "cand_pool/local/mbeir_mscoco_task0_test_cand_pool.jsonl"
    assert coco.files("val").pool == "cand_pool/local/mbeir_mscoco_task0_val_cand_pool.jsonl"
    vn = get_task("visualnews_task3").files("test")
    assert vn.queries == "query/test/mbeir_visualnews_task3_test.jsonl"
    assert vn.pool == "cand_pool/local/mbeir_visualnews_task3_cand_pool.jsonl"
    assert vn.qrels == "qrels/test/mbeir_visualnews_task3_test_qrels.txt"
    assert len({get_task(n).files("test").pool for n in MBEIR_TASK_ORDER}) == 16 and "no modality filter" in GLOBAL_PROTOCOL


def test_registry_train_side_definitions():
    for name in ("oven_task6", "infoseek_task6", "oven_task8", "infoseek_task8"):
        assert get_task(name).train.pool_dataset_ids == frozenset({5, 6})
    t = get_task("oven_task8").train
    assert t.pool_modality == "image,text" and t.selects_query(5, 8) and not t.selects_query(6, 8)
    w = get_task("webqa_task2").train
    assert w.pool_dataset_ids == frozenset({2}) and w.pool_modality == "image,text"
    assert w.qrels == "qrels/train/mbeir_webqa_train_qrels.txt"


def test_registry_generic_registration():
    with pytest.raises(ConfigError, match="already registered"):
        register_task(get_task("cirr_task7"))
    with pytest.raises(ConfigError, match="unknown task 'nope'"):
        get_task("nope")
    with pytest.raises(ConfigError, match="not among cutoffs"):
        Task(name="x", kind="zeroshot", dataset="X", metric="Recall@20", cutoffs=(1, 5))
    with pytest.raises(ConfigError, match="kind"):
        Task(name="x", kind="other", dataset="X", metric="Recall@1", cutoffs=(1,))
    with pytest.raises(ConfigError, match="no split 'train'"):
        get_task("cirr_task7").files("train")
    assert list_tasks(kind="zeroshot") == [t for t in list_tasks() if t.kind == "zeroshot"]
