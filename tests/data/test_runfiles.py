"""The pipeline files (umarvel.data.runfiles): round trips, the exact byte format, alignment and file:line errors."""
import json

import numpy as np
import pytest

from umarvel.data.runfiles import (MinedRow, RunEntry, TeacherRow, iter_mined, iter_teacher, mined_file_name,
                                   read_trec_run, write_mined, write_teacher, write_trec_run)
from umarvel.errors import DataError

MINED = [MinedRow("9:1", ("9:2",), ("9:3", "9:2", "9:4"), (0.912345, 0.5, -0.25), (0.5,)),
         MinedRow("9:5", ("9:6", "9:7"), ("9:8",), (0.75,), (None, 0.125)),
         MinedRow("9:1", ("9:2",), (), (), (None,))]
TEACHER = [TeacherRow("9:1", ("9:3", "9:2"), (1.25, 0.5), "mscoco_task0", (0.75, 0.5), (0.5, 0.0)),
           TeacherRow("9:5", ("9:8",), (0.1,), "webqa_task1", (0.05,), (0.05,))]


def _lines(path, *objs) -> None:
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs))


# ----------------------------------------------------------------------------------------- mined lists
def test_mined_round_trip_and_official_bytes(tmp_path):
    path = tmp_path / mined_file_name("global")
    assert path.name == "rerank_data_all_eval_train_global.jsonl"
    assert write_mined(path, iter(MINED)) == 3
    # the bytes mining always wrote: json.dumps of {qid, gt_docs, top100_docs, score, gt_scores}
    expect = "".join(json.dumps({"qid": r.qid, "gt_docs": list(r.gt_docs), "top100_docs": list(r.top_docs),
                                 "score": list(r.scores), "gt_scores": list(r.gt_scores)}) + "\n" for r in MINED)
    assert path.read_text() == expect
    assert path.read_text().splitlines()[1] == ('{"qid": "9:5", "gt_docs": ["9:6", "9:7"], "top100_docs": ["9:8"], '
                                                '"score": [0.75], "gt_scores": [null, 0.125]}')
    got = list(iter_mined(path, [r.qid for r in MINED]))
    assert got == MINED
    assert [r.where for r in got] == [f"{path}:{i}" for i in (1, 2, 3)]
    assert got[0].positive_score() == 0.5 and got[2].positive_score() is None
    light = list(iter_mined(path, scores=False))
    assert [(r.qid, r.top_docs, r.scores, r.gt_scores) for r in light] == [(r.qid, r.top_docs, None, None)
                                                                          for r in MINED]
    accented = tmp_path / "accented.jsonl"  # json.dumps' default escaping, as the official files
    write_mined(accented, [MinedRow("9:é", ("9:ü",), ("9:ü",))])
    assert accented.read_text() == '{"qid": "9:\\u00e9", "gt_docs": ["9:\\u00fc"], "top100_docs": ["9:\\u00fc"]}\n'


def test_mined_without_scores_omits_them(tmp_path):
    path = tmp_path / "m.jsonl"
    write_mined(path, [MinedRow("1:1", ("1:2",), ("1:3",))])
    assert path.read_text() == '{"qid": "1:1", "gt_docs": ["1:2"], "top100_docs": ["1:3"]}\n'
    assert list(iter_mined(path)) == [MinedRow("1:1", ("1:2",), ("1:3",))]


def test_mined_alignment(tmp_path):
    path = tmp_path / "m.jsonl"
    write_mined(path, MINED)
    qids = [r.qid for r in MINED]
    with pytest.raises(DataError, match=r"m\.jsonl:2: qid 9:5 but union-train row 2 is 9:1 .*order of q\.jsonl"):
        list(iter_mined(path, ["9:1", "9:1", "9:1"], rows="union-train row", follows="q.jsonl"))
    with pytest.raises(DataError, match=r"m\.jsonl: 3 mined lines for 4 query rows"):
        list(iter_mined(path, qids + ["9:9"]))
    with pytest.raises(DataError, match=r"m\.jsonl:3: more mined lines than the 2 query rows"):
        list(iter_mined(path, qids[:2]))
    assert [r.qid for r in iter_mined(path, qids[:2], exact=False)] == qids[:2]  # max_examples


@pytest.mark.parametrize("line, match", [
    ('{"qid": "1:1", "gt_docs": []}', r"bad\.jsonl:2: missing field 'top100_docs'"),
    ('{"gt_docs": [], "top100_docs": []}', r"bad\.jsonl:2: missing or non-string 'qid'"),
    ('{"qid": "1:1", "gt_docs": [1], "top100_docs": []}', r"bad\.jsonl:2: 'gt_docs' must be a list of dids"),
    ('{"qid": "1:1", "gt_docs": [], "top100_docs": ["1:2"], "score": [0.1, 0.2]}',
     r"bad\.jsonl:2: 'score' must be a list of 1 numbers"),
    ('{"qid": "1:1", "gt_docs": ["1:2"], "top100_docs": [], "gt_scores": [true]}',
     r"bad\.jsonl:2: 'gt_scores' must be a list of 1 numbers"),
    ('{"qid": "1:1", "gt_docs": [], ', r"bad\.jsonl:2: malformed JSON"),
])
def test_mined_malformed_line_names_file_and_line(tmp_path, line, match):
    path = tmp_path / "bad.jsonl"
    _lines(path, {"qid": "1:0", "gt_docs": [], "top100_docs": []}, line)
    with pytest.raises(DataError, match=match):
        list(iter_mined(path))


# ---------------------------------------------------------------------------------------- teacher file
def test_teacher_round_trip_and_official_bytes(tmp_path):
    path = tmp_path / "fusion_results.jsonl"
    assert write_teacher(path, TEACHER) == 2
    expect = "".join(json.dumps({"qid": r.qid, "task": r.task, "did": list(r.dids), "score": list(r.scores),
                                 "cosine": list(r.cosine), "p_yes": list(r.p_yes)}) + "\n" for r in TEACHER)
    assert path.read_text() == expect
    assert list(iter_teacher(path, ["9:1", "9:5"])) == TEACHER
    light = list(iter_teacher(path, provenance=False))
    assert [(r.dids, r.scores, r.task, r.cosine) for r in light] == [(r.dids, r.scores, r.task, None) for r in TEACHER]
    bare = tmp_path / "bare.jsonl"
    write_teacher(bare, [TeacherRow("1:1", ("1:2",), (0.5,))])  # the official minimal form
    assert bare.read_text() == '{"qid": "1:1", "did": ["1:2"], "score": [0.5]}\n'
    assert list(iter_teacher(bare)) == [TeacherRow("1:1", ("1:2",), (0.5,))]


def test_teacher_errors_name_file_and_line(tmp_path):
    path = tmp_path / "teacher.jsonl"
    _lines(path, {"qid": "1:1", "did": ["1:2"], "score": [0.5]}, {"qid": "1:3", "did": ["1:2", "1:4"], "score": [0.5]})
    with pytest.raises(DataError, match=r"teacher\.jsonl:2: 'score' must be a list of 2 numbers"):
        list(iter_teacher(path))
    _lines(path, {"qid": "1:1", "did": ["1:2"]})
    with pytest.raises(DataError, match=r"teacher\.jsonl:1: missing field 'score'"):
        list(iter_teacher(path))
    _lines(path, {"qid": "1:1", "did": ["1:2"], "score": [0.5]})
    with pytest.raises(DataError, match=r"teacher\.jsonl:1: qid 1:1 but query row 1 is 1:9"):
        list(iter_teacher(path, ["1:9"]))
    with pytest.raises(DataError, match=r"teacher\.jsonl: 1 teacher lines for 2 query rows"):
        list(iter_teacher(path, ["1:1", "1:2"]))


# -------------------------------------------------------------------------------------------- TREC runs
def test_trec_run_write_read(tmp_path):
    path = tmp_path / "run.trec"
    ids = np.array([[90000003, 90000001, -1], [90000002, 90000003, 90000001]])  # hashed dids, -1 padding
    scores = np.array([[0.9, 0.5, 0.0], [0.8, 0.7, 0.1]])
    assert write_trec_run(path, ["9:1", "9:2"], ids, scores, "mbeir_mscoco_task0_local") == 5
    lines = path.read_text().splitlines()
    assert lines[0] == "9:1 Q0 9:3 1 0.900000 mbeir_mscoco_task0_local"
    assert lines[2] == "9:2 Q0 9:2 1 0.800000 mbeir_mscoco_task0_local"
    run = read_trec_run(path)
    assert run == {"9:1": [("9:3", 0.9), ("9:1", 0.5)], "9:2": [("9:2", 0.8), ("9:3", 0.7), ("9:1", 0.1)]}
    assert run["9:1"][0] == RunEntry(did="9:3", score=0.9) and run["9:1"][0].did == "9:3"
    write_trec_run(tmp_path / "again.trec", list(run), [[e.did for e in r] + [""] * (3 - len(r)) for r in run.values()],
                   [[e.score for e in r] + [0.0] * (3 - len(r)) for r in run.values()], "mbeir_mscoco_task0_local")
    assert (tmp_path / "again.trec").read_bytes() == path.read_bytes()
    with pytest.raises(DataError, match="run_id"):
        write_trec_run(path, ["9:1", "9:2"], ids, scores, "bad id")
    with pytest.raises(DataError, match="need \\(Q, K\\)"):
        write_trec_run(path, ["9:1"], ids, scores, "r")


@pytest.mark.parametrize("line, match", [
    ("9:1 Q0 9:4 3 0.1", r"run\.trec:3: expected 'qid Q0 did rank score run_id', got 5 columns"),
    ("9:1 Q0 9:4 x 0.1 r", r"run\.trec:3: rank 'x' / score '0.1' are not numbers"),
    ("9:1 Q0 9:4 2 0.1 r", r"run\.trec:3: query 9:1 has rank 2 twice"),
])
def test_trec_run_malformed_line_names_file_and_line(tmp_path, line, match):
    path = tmp_path / "run.trec"
    path.write_text(f"9:1 Q0 9:2 1 0.9 r\n9:1 Q0 9:3 2 0.5 r\n{line}\n")
    with pytest.raises(DataError, match=match):
        read_trec_run(path)
    with pytest.raises(DataError, match="run file not found"):
        read_trec_run(tmp_path / "missing.trec")
