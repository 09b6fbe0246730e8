"""``umarvel demo``: the quick run learns stage by stage (the end-to-end test of the whole recipe), ``--model``
evaluates a checkpoint, and the pieces (chance level, progress estimate, tables) are right."""
from __future__ import annotations

import json
import math
import random

import pytest

from umarvel.cli import main

pytestmark = pytest.mark.slow


def _averages(results: dict, protocol: str) -> dict[str, float]:
    return {s["key"]: s[protocol]["average"] for s in results["stages"] if s.get(protocol)}


def test_quick_demo_recall_rises_through_stage3_and_every_stage_runs_slow(tmp_path, capsys):
    """The whole recipe (stages 1-5, mining, reranker and its check, teacher, U-MARVEL+) on the quick preset (~3 min
    on 2 CPUs): what the quick run guarantees is the rising order random < NLI < image-caption < M-BEIR, in the local
    and the global protocol (stages 4-5 and U-MARVEL+ are shown by the default run, see the README)."""
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Recall@5 (local pools" in printed and "Recall@5 (global pool" in printed
    assert "chance (random ranking)" in printed and "5 distillation" in printed
    for name in ("results.md", "results.json", "recall_per_stage.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "recall_per_stage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((out / "results.json").read_text())
    keys = [s["key"] for s in results["stages"]]
    assert keys == ["stage0", "stage1", "stage2", "stage3", "stage4", "stage5", "plus"]
    for s in results["stages"]:
        assert len(s["local"]["tasks"]) == 7 and len(s["global"]["tasks"]) == 7
    for protocol, margin in (("local", 5.0), ("global", 2.0)):
        avg = _averages(results, protocol)
        chance = results["chance"][protocol]["average"]
        # the order the quick run guarantees, each step by a margin
        assert avg["stage0"] + margin <= avg["stage1"] and avg["stage1"] + margin <= avg["stage2"], (protocol, avg)
        assert avg["stage2"] + margin <= avg["stage3"], (protocol, avg)
        assert avg["stage3"] >= chance + 35, (protocol, avg, chance)
        for key in ("stage4", "stage5", "plus"):  # the later stages run and keep most of it
            assert avg[key] >= avg["stage2"], (protocol, key, avg)
    check = results["reranker_check"]  # the reranker's own top-k accuracy, measured before it teaches
    assert check["split"] == "val" and 0.0 <= check["reranker_recall"] <= 100.0
    assert 0.0 < check["embedding_recall"] <= 100.0
    # Every embedding stage lowered its training loss; the timings and the machine are recorded.
    for key in ("stage1", "stage2", "stage3", "stage4"):
        info = results["training"][key]
        assert info["loss_last"] < info["loss_first"], (key, info)
    assert results["total_seconds"] > 0 and results["environment"]["torch_threads"] == 1
    md = (out / "results.md").read_text()
    assert "| **total** |" in md and "recall_per_stage.png" in md and "4 hard negatives" in md
    assert "## What each stage added" in md and "Reranker check" in md
    for label in ("1 NLI", "2 image-caption", "3 M-BEIR", "4 hard negatives", "5 distillation"):
        assert f"- **{label}**: local " in md, label


def test_demo_model_option_evaluates_a_checkpoint_without_training(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "eval_only"
    assert main(["demo", "--quick", "--model", str(tiny_checkpoint), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert tiny_checkpoint.name in printed and "chance (random ranking)" in printed
    results = json.loads((out / "results.json").read_text())
    assert [s["key"] for s in results["stages"]] == ["model"]
    assert results["stages"][0]["checkpoint"] == str(tiny_checkpoint)
    assert not (out / "runs").exists()  # nothing trained
    for protocol in ("local", "global"):
        res = results["stages"][0][protocol]
        assert res["protocol"] == protocol and len(res["tasks"]) == 7
        assert all(0.0 <= t["value"] <= 100.0 for t in res["tasks"])
    assert (out / "recall_per_stage.png").is_file()


def test_chance_recall_matches_a_simulated_random_ranking(tmp_path):
    from umarvel.demo.benchmark import _hit_chance, chance_recall
    from umarvel.data.synthetic import make_synthetic_mbeir

    rng = random.Random(0)
    for pool, pos, k in [(50, 1, 5), (40, 2, 5), (12, 3, 5), (5, 1, 5)]:
        hits = 0
        for _ in range(20000):
            ranking = rng.sample(range(pool), min(k, pool))
            hits += any(r < pos for r in ranking)
        assert abs(hits / 20000 - _hit_chance(pool, pos, k)) < 0.015, (pool, pos, k)
    assert _hit_chance(50, 1, 5) == pytest.approx(5 / 50)
    root = make_synthetic_mbeir(tmp_path / "m", n_queries_per_task=3, n_candidates_per_task=10, image_size=28,
                                tasks=("mscoco_task0", "mscoco_task3"))
    ch = chance_recall(root, ["mscoco_task0", "mscoco_task3"], {"mscoco_task0": 10, "mscoco_task3": 10})
    assert ch["mscoco_task0"] == pytest.approx(50.0)                      # 1 positive, 5 of 10
    assert ch["mscoco_task3"] == pytest.approx(100 * (1 - math.comb(8, 5) / math.comb(10, 5)))  # 2 captions
    assert ch["average"] == pytest.approx((ch["mscoco_task0"] + ch["mscoco_task3"]) / 2)


def test_progress_estimates_remaining_time_from_reference_units(monkeypatch):
    from umarvel.demo import progress as prog

    clock = [100.0]
    monkeypatch.setattr(prog.time, "perf_counter", lambda: clock[0])
    p = prog.Progress([prog.Job("a", "job a", 10.0), prog.Job("b", "job b", 30.0)], disable=True)
    assert p.remaining() is None
    p.begin("a")
    clock[0] += 20.0                    # this machine is 2x slower than the reference
    p.update(0.5, "step 5/10")
    assert p.units_done() == pytest.approx(5.0)
    assert p.remaining() == pytest.approx(35.0 * 20.0 / 5.0)
    p.end()
    p.begin("b")
    p.update(1.0)
    p.end()
    assert p.units_done() == pytest.approx(40.0) and p.remaining() == pytest.approx(0.0)
    p.close()
    assert prog.format_seconds(3725) == "1:02:05" and prog.format_seconds(65.4) == "1:05"


def test_benchmark_spec_rejects_impossible_sizes():
    from umarvel.demo.benchmark import BenchmarkSpec
    from umarvel.errors import ConfigError

    with pytest.raises(ConfigError, match="nli_pairs"):
        BenchmarkSpec(nli_pairs=351)
    with pytest.raises(ConfigError, match="tasks"):
        BenchmarkSpec(tasks=("visualnews_task0",))
