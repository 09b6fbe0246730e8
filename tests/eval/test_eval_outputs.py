"""results.json schema and results.md (local and global side by side)."""
import json

import pytest

from umarvel.errors import DataError
from umarvel.eval.metrics import score_task
from umarvel.eval.outputs import build_results, read_results_json, render_results_md, validate_results, write_results
from umarvel.data.registry import get_task


def _results(protocol, shift=0.0, reranked=None):
    tasks = []
    for name, hit in (("cirr_task7", [1, 0]), ("mscoco_task0", [1, 1]), ("fashioniq_task7", [0, 1])):
        t = get_task(name)
        ret = [[f"{t.dataset_id}:{i}" for i in range(1, 51)]] * 2
        pos = [{f"{t.dataset_id}:{3 if h else 99}"} for h in hit]
        tasks.append(score_task(t, ret, pos, pool_size=100))
    res = build_results(protocol=protocol, model="tiny", split="test", instruction_mode="random",
                        instruction_seed=2023, tasks=tasks, reranked=reranked)
    for t in res["tasks"]:
        t["value"] -= shift
    res["average"] -= shift
    return res


def test_build_results_schema_and_order():
    res = _results("local")
    assert list(res) == ["protocol", "model", "split", "instruction_mode", "instruction_seed", "compat", "tasks",
                         "average"]
    assert res["compat"] == "default"
    assert [t["name"] for t in res["tasks"]] == ["mscoco_task0", "fashioniq_task7", "cirr_task7"]  # paper order
    assert set(res["tasks"][0]) == {"name", "dataset", "task_id", "metric", "value", "recall", "num_queries",
                                    "pool_size"}
    assert res["tasks"][0]["recall"] == {"1": 0.0, "5": 100.0, "10": 100.0, "50": 100.0}
    assert res["average"] == pytest.approx((100 + 50 + 50) / 3)
    assert _results("global", reranked=True)["reranked"] is True


@pytest.mark.parametrize("mutate, match", [
    (lambda r: r.update(extra=1), "unexpected \\['extra'\\]"),
    (lambda r: r.update(protocol="union"), "protocol"),
    (lambda r: r.update(instruction_mode="fixed"), "instruction_mode"),
    (lambda r: r["tasks"][0].pop("pool_size"), "exactly the keys"),
    (lambda r: r["tasks"][0].update(recall={1: 3.0}), "recall"),
    (lambda r: r.update(average=float("nan")), "finite"),
    (lambda r: r.update(compat="paper"), "'compat' must be one of"),
])
def test_schema_violations_rejected(mutate, match):
    res = _results("local")
    mutate(res)
    with pytest.raises(DataError, match=match):
        validate_results(res, "r")


def test_results_md_pairs_sibling_folders(tmp_path):
    write_results(tmp_path / "local", _results("local"))
    md_alone = (tmp_path / "local" / "results.md").read_text()
    assert "| Local |" in md_alone and "Global" not in md_alone
    write_results(tmp_path / "global", _results("global", shift=10.0))
    for proto in ("local", "global"):
        md = (tmp_path / proto / "results.md").read_text()
        assert "| # | Task | Dataset | Metric | Local | Global |" in md
        assert "| 1 | mscoco_task0 | MSCOCO | R@5 | 100.00 | 90.00 |" in md
        assert md.index("mscoco_task0") < md.index("fashioniq_task7") < md.index("cirr_task7")
    assert read_results_json(tmp_path / "global" / "results.json")["protocol"] == "global"


def test_results_are_labelled_with_their_compat_mode_and_modes_never_pair(tmp_path):
    official = _results("global")
    official["compat"] = "official"
    write_results(tmp_path / "local", _results("local"))
    write_results(tmp_path / "global", official)
    md = (tmp_path / "global" / "results.md").read_text()
    assert "- compat: official (the official evaluation numerics" in md and "Local" not in md
    assert "- compat: default" in (tmp_path / "local" / "results.md").read_text()
    with pytest.raises(DataError, match="compat"):
        render_results_md([_results("local"), official])
    old = _results("local")
    del old["compat"]  # written before the mode existed: read as default
    assert validate_results(old, "r") is old


def test_results_md_refuses_mismatched_pair():
    other = _results("global")
    other["model"] = "another"
    with pytest.raises(DataError, match="differ in model"):
        render_results_md([_results("local"), other])
    md = render_results_md([_results("global"), _results("local")])
    assert md.index("| Local | Global |") > 0


def test_read_results_json_errors(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("{\n  bad")
    with pytest.raises(DataError, match=f"{path}:2: malformed JSON"):
        read_results_json(path)
    path.write_text(json.dumps({"protocol": "local"}))
    with pytest.raises(DataError, match="keys differ"):
        read_results_json(path)
