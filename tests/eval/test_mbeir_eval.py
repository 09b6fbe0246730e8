"""M-BEIR evaluation end to end on the synthetic tree with the tiny checkpoint.

Covers: hit-rate scoring with padded rankings; local and global results against an independent
brute-force recomputation (API encode, full score matrix, argsort, set-based hit rate); global pool =
union of the local pools; cache reuse (second run encodes nothing), resume after a crash mid-encoding,
torch vs faiss, batch-size invariance; the three commands (script, POSIX sh script, ``umarvel eval
mbeir``); a 2-rank torchrun run on CPU; and the user errors (missing image, unknown ids, empty pool,
missing task files).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from umarvel.config import load_config
from umarvel.data.synthetic import SYNTHETIC_TASKS, make_synthetic_mbeir
from umarvel.errors import ConfigError, DataError, ImageLoadError
from umarvel.eval.cache import EmbeddingCache
from umarvel.data.mbeir import load_mbeir_task, read_instructions, read_pool_modalities
from umarvel.eval.mbeir.runner import (MBeirEvalConfig, Retrieval, encode_records, evaluate_mbeir, search_embeddings,
                                       select_tasks)
from umarvel.eval.metrics import score_task
from umarvel.eval.outputs import read_results_json
from umarvel.data.registry import MBEIR_INSTRUCTIONS, MBEIR_TASK_ORDER, MBEIR_UNION_POOLS, get_task

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
ORDERED = [n for n in MBEIR_TASK_ORDER if n in SYNTHETIC_TASKS]  # the 7 synthetic tasks, paper order
N_ITEMS = 7 * (6 + 12)  # queries + local pool per task (synthetic defaults)


class Wrapped:
    """Delegates to a UMarvel; counts encode calls, can crash after ``fail_after`` calls or forbid encoding."""

    def __init__(self, model, fail_after: int | None = None, forbid: bool = False):
        self.model, self.fail_after, self.forbid = model, fail_after, forbid
        self.calls, self.items = 0, 0
        self.settings, self.device = model.settings, model.device

    def fingerprint(self) -> str:
        return self.model.fingerprint()

    def _tick(self, items):
        if self.forbid:
            raise AssertionError("encoder called although everything is cached")
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("simulated kill mid-encoding")
        self.calls += 1
        self.items += len(items)

    def encode_queries(self, items, batch_size=32):
        self._tick(items)
        return self.model.encode_queries(items, batch_size=batch_size)

    def encode_candidates(self, items, batch_size=32):
        self._tick(items)
        return self.model.encode_candidates(items, batch_size=batch_size)


def _cfg(ckpt, tree, out, **kw) -> MBeirEvalConfig:
    kw.setdefault("shard_size", 4)
    return MBeirEvalConfig(model=str(ckpt), mbeir_root=str(tree), output=str(out), device="cpu", **kw)


def _task_values(results: dict) -> list[tuple]:
    return [(t["name"], t["recall"], t["num_queries"], t["pool_size"]) for t in results["tasks"]]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return make_synthetic_mbeir(tmp_path_factory.mktemp("mbeir") / "M-BEIR", seed=0)


@pytest.fixture(scope="module")
def base(tmp_path_factory, tree, tiny_checkpoint, tiny_model):
    """Local then global runs sharing one cache (global must reuse every local entry)."""
    root = tmp_path_factory.mktemp("runs")
    enc = Wrapped(tiny_model)
    local = evaluate_mbeir(enc, _cfg(tiny_checkpoint, tree, root / "local"))
    calls_after_local = enc.calls
    glob = evaluate_mbeir(enc, _cfg(tiny_checkpoint, tree, root / "global", protocol="global"))
    return {"root": root, "cache": root / "cache", "local": local, "global": glob,
            "global_encode_calls": enc.calls - calls_after_local, "local_items": enc.items}


# ------------------------------------------------------------------------------- metric, Retrieval
def test_hit_rate_on_hand_made_padded_rankings():
    task = get_task("fashioniq_task7")  # cutoffs 1/5/10/50, headline Recall@10
    ret = Retrieval(qids=["a", "b", "c"], pool_ids=["x", "y", "z"], scores=np.zeros((3, 50), np.float32),
                    indices=np.full((3, 50), -1, np.int64))
    ret.indices[0, :3] = [2, 0, 1]     # a: x at rank 2
    ret.indices[1, :3] = [0, 1, 2]     # b: y at rank 2, z at rank 3 (two positives)
    ret.indices[2, :3] = [1, 2, 0]     # c: no positive listed -> 0 (official scorer)
    dids = ret.dids
    assert dids[0, :4].tolist() == ["z", "x", "y", ""] and dids.shape == (3, 50)
    res = score_task(task, dids, [("x",), ("z", "y"), ()], pool_size=3)
    assert res.recall == {1: 0.0, 5: pytest.approx(200 / 3), 10: pytest.approx(200 / 3), 50: pytest.approx(200 / 3)}
    assert res.value == res.recall[10] and res.num_queries == 3
    ret.indices[1, :3] = [1, 0, 2]     # b: y first now
    assert score_task(task, ret.dids, [("x",), ("z", "y"), ()], 3).recall[1] == pytest.approx(100 / 3)


# --------------------------------------------------------------------------- independent recompute
def _brute_force(model, tree, names, pool_names):
    """API-encode everything, fp16 round trip (what the cache stores) re-normalised (what the search does),
    float64 score matrix, stable argsort, set-based hit rate as in the official scorer:
    {task: ({k: percent}, ranked dids, scores)}."""
    table = read_instructions(tree / MBEIR_INSTRUCTIONS)
    union = read_pool_modalities(tree / MBEIR_UNION_POOLS["test"])
    data = {n: load_mbeir_task(tree, get_task(n), "test", instructions=table, seed=2023, global_modalities=union)
            for n in sorted(set(names) | set(pool_names))}
    def f16(x):
        y = x.astype(np.float16).astype(np.float64)
        return y / np.linalg.norm(y, axis=1, keepdims=True)
    pool_ids = [c.did for n in pool_names for c in data[n].pool]
    pool = f16(np.concatenate([model.encode_candidates([c.to_encode_item() for c in data[n].pool])
                               for n in pool_names]))
    out = {}
    for n in names:
        d = data[n]
        q = f16(model.encode_queries([x.to_encode_item() for x in d.queries]))
        scores = q @ pool.T
        order = np.argsort(-scores, axis=1, kind="stable")[:, :50]
        ranked = [[pool_ids[j] for j in row] for row in order]
        recall = {}
        for k in (1, 5, 10, 50):
            hits = [1.0 if set(d.qrels.get(x.qid, ())) & set(r[:k]) else 0.0 for x, r in zip(d.queries, ranked)]
            recall[k] = 100.0 * sum(hits) / len(hits)
        out[n] = (recall, ranked, np.take_along_axis(scores, order, 1))
    return out


def _check_against(result, expected):
    assert [t.name for t in result.tasks] == list(expected)
    for t in result.tasks:
        recall, ranked, scores = expected[t.name]
        assert t.recall == pytest.approx(recall, abs=1e-9), t.name
        got = result.retrievals[t.name]
        n = len(ranked[0])
        np.testing.assert_allclose(got.scores[:, :n], scores, atol=1e-5)
        dids = got.dids[:, :n]
        for i, row in enumerate(ranked):  # same ranking wherever the scores are not (near-)tied
            gaps = np.abs(np.diff(scores[i])) > 1e-5
            clear = np.concatenate([[True], gaps]) & np.concatenate([gaps, [True]])
            assert [r for r, c in zip(row, clear) if c] == [x for x, c in zip(dids[i], clear) if c]


def test_local_matches_independent_recomputation(base, tree, tiny_model):
    local = base["local"]
    assert local.skipped == [n for n in MBEIR_TASK_ORDER if n not in SYNTHETIC_TASKS]
    expected = {}
    for n in ORDERED:
        expected.update(_brute_force(tiny_model, tree, [n], [n]))
    _check_against(local, expected)
    res = local.results
    assert res["protocol"] == "local" and res["instruction_seed"] == 2023 and res["instruction_mode"] == "random"
    assert res["average"] == pytest.approx(np.mean([expected[n][0][get_task(n).metric_k] for n in ORDERED]))
    assert all(t["pool_size"] == 12 and t["num_queries"] == 6 for t in res["tasks"])
    assert local.encode_stats["encoded"] == N_ITEMS and base["local_items"] == N_ITEMS


def test_global_is_the_union_of_local_pools_and_matches_recomputation(base, tree, tiny_model):
    glob, local = base["global"], base["local"]
    assert base["global_encode_calls"] == 0 and glob.encode_stats["encoded"] == 0  # reused the local cache
    assert glob.global_pool.ids == [i for n in ORDERED for i in local.pools[n].ids]
    assert len(glob.global_pool) == sum(len(local.pools[n]) for n in ORDERED) == 84
    union_file = {json.loads(line)["did"] for line in (tree / MBEIR_UNION_POOLS["test"]).open()}
    assert set(glob.global_pool.ids) == union_file
    np.testing.assert_array_equal(glob.global_pool.vectors,
                                  np.concatenate([local.pools[n].vectors for n in ORDERED]))
    _check_against(glob, _brute_force(tiny_model, tree, ORDERED, ORDERED))
    assert all(t["pool_size"] == 84 for t in glob.results["tasks"])


def test_output_files(base):
    out = base["root"] / "global"
    res = read_results_json(out / "results.json")
    assert res == base["global"].results
    cfg = load_config(out / "config.yaml", MBeirEvalConfig)
    assert cfg.protocol == "global" and cfg.shard_size == 4 and cfg.tasks is None
    md = (out / "results.md").read_text()
    assert "| Local | Global |" in md and "not the 16-task M-BEIR average" in md
    info = json.loads((out / "run.json").read_text())
    assert info["evaluated_tasks"] == ORDERED and info["global_pool_size"] == 84 and info["encode_stats"]["encoded"] == 0
    lines = (out / "runs" / "cirr_task7_test.trec").read_text().splitlines()
    assert len(lines) == 6 * 50
    first = lines[0].split()
    assert len(first) == 6 and first[1] == "Q0" and first[3] == "1" and first[5] == "umarvel_global_cirr_task7_test_k50"
    ret = base["global"].retrievals["cirr_task7"]
    assert first[0] == ret.qids[0] and first[2] == ret.dids[0, 0] and float(first[4]) == pytest.approx(ret.scores[0, 0], abs=1e-6)
    local_lines = (base["root"] / "local" / "runs" / "cirr_task7_test.trec").read_text().splitlines()
    assert len(local_lines) == 6 * 12  # pool of 12 < k=50: padding is not written
    assert [ln.split()[3] for ln in local_lines[:12]] == [str(r) for r in range(1, 13)]


# ------------------------------------------------------------------------------------ cache paths
def test_second_run_encodes_nothing(base, tree, tiny_checkpoint, tiny_model, tmp_path):
    enc = Wrapped(tiny_model, forbid=True)
    again = evaluate_mbeir(enc, _cfg(tiny_checkpoint, tree, tmp_path / "local", cache_dir=str(base["cache"])))
    assert enc.calls == 0 and again.encode_stats == {"encoded": 0, "reused": N_ITEMS, "encode_calls": 0}
    assert again.results == base["local"].results


def test_killed_run_resumes_with_identical_results(base, tree, tiny_checkpoint, tiny_model, tmp_path):
    cfg = _cfg(tiny_checkpoint, tree, tmp_path / "out" / "local")
    crashing = Wrapped(tiny_model, fail_after=5)
    with pytest.raises(RuntimeError, match="simulated kill"):
        evaluate_mbeir(crashing, cfg)
    done = crashing.items
    assert 0 < done < N_ITEMS and not (tmp_path / "out" / "local" / "results.json").exists()
    resumed = Wrapped(tiny_model)
    result = evaluate_mbeir(resumed, cfg)
    assert result.encode_stats["encoded"] == resumed.items == N_ITEMS - done
    assert result.results == base["local"].results
    for n in ORDERED:
        np.testing.assert_array_equal(result.query_embeddings[n].vectors, base["local"].query_embeddings[n].vectors)
        np.testing.assert_array_equal(result.retrievals[n].indices, base["local"].retrievals[n].indices)


def test_torch_and_faiss_backends_agree(base, tree, tiny_checkpoint, tiny_model, tmp_path):
    enc = Wrapped(tiny_model, forbid=True)
    res = evaluate_mbeir(enc, _cfg(tiny_checkpoint, tree, tmp_path / "global", protocol="global", backend="faiss",
                                   cache_dir=str(base["cache"])))
    assert res.results == base["global"].results
    for n in ORDERED:
        np.testing.assert_array_equal(res.retrievals[n].indices, base["global"].retrievals[n].indices)
        np.testing.assert_allclose(res.retrievals[n].scores, base["global"].retrievals[n].scores, atol=1e-6)


def test_results_identical_across_batch_sizes(base, tree, tiny_checkpoint, tiny_model, tmp_path):
    names = ["mscoco_task3", "nights_task4", "cirr_task7"]  # image queries and image candidates
    runs = [evaluate_mbeir(tiny_model, _cfg(tiny_checkpoint, tree, tmp_path / f"b{bs}" / "local", tasks=names,
                                            batch_size=bs)) for bs in (1, 5)]
    for r in runs:
        assert r.encode_stats["encoded"] == 3 * 18
        assert r.results["tasks"] == [t for t in base["local"].results["tasks"] if t["name"] in names]
        for n in names:
            np.testing.assert_array_equal(r.pools[n].vectors, base["local"].pools[n].vectors)
            np.testing.assert_array_equal(r.retrievals[n].indices, base["local"].retrievals[n].indices)


def test_records_path_is_reusable_for_mining(base, tree, tiny_model):
    """The mining path (encode_records + search_embeddings): cached vectors reused, same top-k as the evaluation."""
    local = base["local"]
    table = read_instructions(tree / MBEIR_INSTRUCTIONS)
    d = load_mbeir_task(tree, get_task("webqa_task1"), "test", instructions=table, seed=2023,
                        global_modalities=read_pool_modalities(tree / MBEIR_UNION_POOLS["test"]))
    cache = EmbeddingCache(base["cache"])
    q = encode_records(Wrapped(tiny_model, forbid=True), d.queries, cache, "mbeir_webqa_task1_test_queries")
    ret = search_embeddings(q, local.pools["webqa_task1"], 50, device="cpu")
    assert cache.stats["encoded"] == 0
    np.testing.assert_array_equal(ret.indices, local.retrievals["webqa_task1"].indices)
    mem = search_embeddings(encode_records(tiny_model, d.queries, cache, "mining_probe"),
                            encode_records(tiny_model, list(d.pool), cache, "mining_probe_pool"), 3)
    assert mem.indices.shape == (6, 3) and cache.stats["encoded"] == 18
    np.testing.assert_array_equal(mem.indices, local.retrievals["webqa_task1"].indices[:, :3])


# -------------------------------------------------------------------------------------- commands
def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", UMARVEL_NO_PROGRESS="1", TOKENIZERS_PARALLELISM="false",
               PYTHON=sys.executable)
    env.pop("WORLD_SIZE", None)
    return env


def _run(cmd, cwd) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{cmd}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    return proc


def test_three_commands(base, tree, tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """The local script and ``umarvel eval mbeir`` for real (reusing the shared cache); the global shell
    script's plain branch with a stand-in interpreter (its torchrun branch runs for real below)."""
    out = tmp_path / "cmd"
    common = ["--model", str(tiny_checkpoint), "--mbeir-root", str(tree), "--device", "cpu"]
    # 1. the local script (all tasks by default), reusing the shared cache
    proc = _run([sys.executable, str(REPO / "scripts/vtools_eval_mbeir_model.py"), *common, "--output",
                 str(out / "local"), "--cache-dir", str(base["cache"]), "--shard-size", "4"], cwd=tmp_path)
    assert "| Local |" in proc.stdout
    assert read_results_json(out / "local" / "results.json") == base["local"].results
    assert json.loads((out / "local" / "run.json").read_text())["encode_stats"]["encoded"] == 0
    # 2. umarvel eval mbeir --protocol global
    import umarvel.cli as cli
    import umarvel.commands
    monkeypatch.setattr(umarvel.commands, "setup_logging", lambda level: None)  # keep pytest's log capture intact
    rc = cli.main(["eval", "mbeir", "--protocol", "global", *common, "--output", str(out / "global"),
                   "--cache-dir", str(base["cache"]), "--shard-size", "4"])
    assert rc == 0 and "| Local | Global |" in capsys.readouterr().out  # paired with the sibling local run
    assert read_results_json(out / "global" / "results.json") == base["global"].results
    assert json.loads((out / "global" / "run.json").read_text())["encode_stats"]["encoded"] == 0
    assert cli.main(["eval", "mbeir", "--model", str(tiny_checkpoint), "--output", str(out / "x")]) == 2
    assert cli.main(["eval", "mbeir", *common, "--output", str(out / "y"), "--tasks", "no_such_task"]) == 2
    # 3. sh scripts/eval_mbeir_global.sh: POSIX sh, argument pass-through, usage errors
    fake = tmp_path / "fake_python"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
    fake.chmod(0o755)
    script = str(REPO / "scripts/eval_mbeir_global.sh")
    env = dict(_env(), PYTHON=str(fake))
    proc = subprocess.run(["sh", script, "M", "R", "O dir", "--tasks", "a,b"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.splitlines() == [
        str(REPO / "scripts/vtools_eval_mbeir_model.py"), "--protocol", "global", "--model", "M", "--mbeir-root",
        "R", "--output", "O dir", "--tasks", "a,b"]
    assert subprocess.run(["sh", script, "M", "R"], env=env, capture_output=True).returncode == 2
    bad = subprocess.run(["sh", script, "M", "R", "O"], env=dict(env, GPUS_PER_NODE="x"), capture_output=True, text=True)
    assert bad.returncode == 2 and "GPUS_PER_NODE" in bad.stderr


def test_config_file_and_flags(tmp_path):
    from umarvel.commands.eval import add_mbeir_arguments
    from umarvel.commands.flags import config_from_flags
    import argparse

    p = argparse.ArgumentParser()
    add_mbeir_arguments(p)
    args = p.parse_args(["--config", str(REPO / "configs/eval/mbeir_global.yaml"), "--set", "split=val", "--model", "m",
                         "--tasks", "cirr_task7,nights_task4"])
    cfg = config_from_flags(args, MBeirEvalConfig)
    assert (cfg.protocol, cfg.split, cfg.model, cfg.tasks) == ("global", "val", "m", ["cirr_task7", "nights_task4"])
    assert cfg.output == "outputs/mbeir/global" and cfg.seed == 2023
    local = load_config(REPO / "configs/eval/mbeir_local.yaml", MBeirEvalConfig)
    assert local == MBeirEvalConfig(model=local.model, mbeir_root=local.mbeir_root, output=local.output)
    with pytest.raises(ConfigError, match="--mbeir-root, --output required"):
        config_from_flags(p.parse_args(["--model", "m"]), MBeirEvalConfig)
    with pytest.raises(ConfigError, match="batch_size"):
        config_from_flags(p.parse_args(["--model", "m", "--mbeir-root", "r", "--output", "o", "--batch-size", "0"]),
                          MBeirEvalConfig)


def test_global_script_under_torchrun_two_ranks(base, tree, tiny_checkpoint, tmp_path):
    """``GPUS_PER_NODE=2 sh scripts/eval_mbeir_global.sh`` on CPU: torchrun, gloo group, encoding of a
    fresh cache split over the ranks, rank 0 searches and writes; same results as one process."""
    env_cmd = ["env", "GPUS_PER_NODE=2", "sh", str(REPO / "scripts/eval_mbeir_global.sh"), str(tiny_checkpoint),
               str(tree), str(tmp_path / "dist" / "global"), "--device", "cpu", "--shard-size", "4",
               "--tasks", "nights_task4,cirr_task7"]
    _run(env_cmd, cwd=tmp_path)
    res = read_results_json(tmp_path / "dist" / "global" / "results.json")
    assert res["tasks"] == [t for t in base["global"].results["tasks"] if t["name"] in ("nights_task4", "cirr_task7")]
    info = json.loads((tmp_path / "dist" / "global" / "run.json").read_text())
    total = 2 * 6 + 84  # two query files, the 7-pool union
    assert info["world_size"] == 2 and 0 < info["encode_stats"]["encoded"] < total  # rank 0 did only its share
    manifests = [json.loads(p.read_text()) for p in (tmp_path / "dist" / "cache").glob("*/manifest.json")]
    assert len(manifests) == 9 and all(m["status"] == "complete" for m in manifests)


# ------------------------------------------------------------------------------------- bad inputs
@pytest.fixture()
def copy_tree(tree, tmp_path) -> Path:
    dst = tmp_path / "M-BEIR"
    shutil.copytree(tree, dst)
    return dst


def _first(path: Path) -> dict:
    return json.loads(path.read_text().splitlines()[0])


def test_missing_image_names_path_and_record(copy_tree, tiny_checkpoint, tiny_model, tmp_path):
    pool_file = copy_tree / get_task("nights_task4").files("test").pool
    rec = _first(pool_file)
    (copy_tree / rec["img_path"]).unlink()
    with pytest.raises(ImageLoadError) as err:
        evaluate_mbeir(tiny_model, _cfg(tiny_checkpoint, copy_tree, tmp_path / "o" / "local", tasks=["nights_task4"]))
    msg = str(err.value)
    assert str(copy_tree / rec["img_path"]) in msg and f"candidate {rec['did']}" in msg and str(pool_file) in msg


def test_unknown_ids_error_unless_allowed(copy_tree, tiny_checkpoint, tiny_model, tmp_path):
    qrels = copy_tree / get_task("mscoco_task0").files("test").qrels
    qid = qrels.read_text().split()[0]
    with qrels.open("a") as fh:
        fh.write(f"{qid} 0 9:999999 1 0\n")
    cfg = _cfg(tiny_checkpoint, copy_tree, tmp_path / "o" / "local", tasks=["mscoco_task0"])
    with pytest.raises(DataError, match=rf"{qid} -> 9:999999"):
        evaluate_mbeir(tiny_model, cfg)
    res = evaluate_mbeir(tiny_model, _cfg(tiny_checkpoint, copy_tree, tmp_path / "o" / "local",
                                          tasks=["mscoco_task0"], allow_missing=True))
    assert res.results["tasks"][0]["num_queries"] == 6


def test_empty_pool_and_empty_queries_are_clear_errors(copy_tree, tiny_checkpoint, tiny_model, tmp_path):
    pool_file = copy_tree / get_task("cirr_task7").files("test").pool
    pool_file.write_text("")
    for kw in ({"tasks": ["cirr_task7"]}, {"protocol": "global"}):
        with pytest.raises(DataError, match=rf"{pool_file}: candidate pool is empty"):
            evaluate_mbeir(tiny_model, _cfg(tiny_checkpoint, copy_tree, tmp_path / "o" / "local", **kw))
    qfile = copy_tree / get_task("webqa_task1").files("test").queries
    qfile.write_text("\n")
    with pytest.raises(DataError, match=rf"{qfile}: no queries"):
        evaluate_mbeir(tiny_model, _cfg(tiny_checkpoint, copy_tree, tmp_path / "o" / "local", tasks=["webqa_task1"]))


def test_absent_tasks_skipped_by_default_error_when_named(tree, caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("umarvel"), "propagate", True)
    caplog.set_level(logging.WARNING, logger="umarvel.eval.mbeir.runner")
    kept, skipped = select_tasks(tree, None, "test")
    assert [t.name for t in kept] == ORDERED and len(skipped) == 9
    # a set: the record may reach caplog through more than one handler once the CLI configured logging
    lines = {r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping")}
    assert len(lines) == 9 and all("missing" in ln for ln in lines)
    with pytest.raises(DataError, match="visualnews_task0: .*mbeir_visualnews_task0_test.jsonl"):
        select_tasks(tree, ["cirr_task7", "visualnews_task0"], "test")
    with pytest.raises(ConfigError, match="unknown task"):
        select_tasks(tree, ["cirr_task9"], "test")


def test_official_compat_encodes_in_the_official_batches_and_labels_results(tree, tiny_checkpoint, tiny_model,
                                                                            tmp_path):
    """compat="official": file order, batches of 16 (the last completed with the first items), the official
    model (causal when unpadded); results.json / run.json / results.md say so; the modes never share a cache."""
    from umarvel import UMarvel
    from umarvel.eval.mbeir.runner import OFFICIAL_BATCH_SIZE

    official = UMarvel.from_pretrained(tiny_checkpoint, device="cpu", dtype="float32", compat="official")
    names = ["nights_task4", "cirr_task7"]
    cfg = _cfg(tiny_checkpoint, tree, tmp_path / "official" / "local", tasks=names, compat="official")
    res = evaluate_mbeir(official, cfg)
    assert res.results["compat"] == "official"
    assert json.loads((tmp_path / "official" / "local" / "run.json").read_text())["compat"] == "official"
    assert "- compat: official" in (tmp_path / "official" / "local" / "results.md").read_text()
    table = read_instructions(tree / MBEIR_INSTRUCTIONS)
    union = read_pool_modalities(tree / MBEIR_UNION_POOLS["test"])
    for n in names:
        d = load_mbeir_task(tree, get_task(n), "test", instructions=table, seed=2023, global_modalities=union)
        want_q = official.encode_queries([q.to_encode_item() for q in d.queries], batch_size=OFFICIAL_BATCH_SIZE)
        want_p = official.encode_candidates([c.to_encode_item() for c in d.pool], batch_size=OFFICIAL_BATCH_SIZE)
        np.testing.assert_allclose(res.query_embeddings[n].vectors.astype(np.float32), want_q, atol=1e-3)
        np.testing.assert_allclose(res.pools[n].vectors.astype(np.float32), want_p, atol=1e-3)
    default = evaluate_mbeir(tiny_model, _cfg(tiny_checkpoint, tree, tmp_path / "default" / "local", tasks=names,
                                              cache_dir=str(tmp_path / "official" / "cache")))
    assert default.encode_stats["reused"] == 0 and default.results["compat"] == "default"
    with pytest.raises(ConfigError, match="compat"):
        evaluate_mbeir(tiny_model, cfg)
