"""Two gloo processes, each searching its shard of an index: the merged hits equal a single-process search."""
from __future__ import annotations

import os
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist

from helpers import free_port, spawn_and_wait
from umarvel.eval.dist_search import RankShardedSearcher
from umarvel.eval.search import shard_bounds

pytestmark = pytest.mark.slow

WORLD, TIMEOUT_S = 2, 180


def _data(n: int = 301, d: int = 24, q: int = 7, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors with exact duplicates across the shard boundary (tie order must survive the merge)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x[200] = x[10]  # rank 1's copy of a rank 0 row: same score, the lower row must win
    x[151] = x[149]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    queries = np.concatenate([x[[10, 149]], rng.standard_normal((q - 2, d)).astype(np.float32)])
    return x, queries


def _worker(rank: int, port: int, index_dir: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=TIMEOUT_S))
    try:
        from umarvel import Index

        idx = Index.load(index_dir)
        _, queries = _data()
        s = idx.searcher("cpu", distributed=True)
        assert isinstance(s, RankShardedSearcher) and (s.lo, s.hi) == tuple(shard_bounds(len(idx), WORLD)[rank:rank + 2])
        for k in (1, 5, 200, 400):  # 200 > a shard, 400 > the whole index
            scores, rows = idx.search_arrays(queries, k, device="cpu", distributed=True)
            np.save(os.path.join(out_dir, f"r{rank}_k{k}_scores.npy"), scores)
            np.save(os.path.join(out_dir, f"r{rank}_k{k}_rows.npy"), rows)
        hits = idx.search(queries[:1], 3, device="cpu", distributed=True)[0]
        np.save(os.path.join(out_dir, f"r{rank}_ids.npy"), np.array([h.id for h in hits]))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)  # see tests/utils/test_dist_gather.py: skip a gloo teardown abort after all work is done


def test_two_ranks_merge_to_the_single_process_result(tmp_path):
    from umarvel import Index

    vecs, queries = _data()
    items = [{"id": f"item{i}", "text": "t"} for i in range(len(vecs))]
    idx = Index.from_vectors(vecs, items, tmp_path / "idx")
    out = tmp_path / "out"
    out.mkdir()
    spawn_and_wait(_worker, (free_port(), str(idx.path), str(out)), WORLD, TIMEOUT_S, "2-process index search")
    for k in (1, 5, 200, 400):
        ref_s, ref_r = idx.search_arrays(queries, k, device="cpu")
        for rank in range(WORLD):
            np.testing.assert_array_equal(np.load(out / f"r{rank}_k{k}_rows.npy"), ref_r)
            # the same hits; scores equal up to the last float bit (the shard GEMMs block differently)
            np.testing.assert_allclose(np.load(out / f"r{rank}_k{k}_scores.npy"), ref_s, rtol=0, atol=1e-6)
    assert ref_r[0, 0] == 10 and ref_r[1, 0] == 149  # duplicates: the lower row first, on both paths
    assert (ref_r[:, len(vecs):] == -1).all()
    ids = [h.id for h in idx.search(queries[:1], 3, device="cpu")[0]]
    for rank in range(WORLD):
        assert list(np.load(out / f"r{rank}_ids.npy")) == ids


def test_without_a_process_group_it_is_a_plain_search():
    vecs, queries = _data()
    s = RankShardedSearcher(vecs, device="cpu")
    assert (s.lo, s.hi, s.world) == (0, len(vecs), 1)
    from helpers import search

    ref = search(queries, vecs, 9, device="cpu")
    got = s.search(queries, 9)
    np.testing.assert_array_equal(got[1], ref[1])
    np.testing.assert_array_equal(got[0], ref[0])


def _torchrun(args: list[str], cwd):
    """``python -m torch.distributed.run --nproc_per_node 2 -m umarvel.cli ARGS`` on CPU (gloo)."""
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", UMARVEL_NO_PROGRESS="1", TOKENIZERS_PARALLELISM="false")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_port",
           str(free_port()), "-m", "umarvel.cli", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S * 2)
    assert proc.returncode == 0, f"{cmd}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    return proc


def test_torchrun_build_and_search(tiny_checkpoint, photos, photo_index, tmp_path, capsys):
    """``torchrun -m umarvel.cli index build`` encodes the shards on both ranks; ``torchrun ... search`` has
    each rank search its half; both equal the single-process index and search."""
    import json

    from umarvel import Index
    from umarvel.cli import main

    out = tmp_path / "dist.idx"
    _torchrun(["index", "build", "--model", str(tiny_checkpoint), "--input", str(photos), "--output", str(out),
               "--shard-size", "2", "--device", "cpu"], tmp_path)
    idx = Index.load(out)
    assert idx.ids == photo_index.ids
    np.testing.assert_allclose(idx.vectors.astype(np.float32), photo_index.vectors.astype(np.float32), atol=2e-3)
    args = ["search", "--index", str(out), "--text", "a green square", "-k", "5", "--json", "--device", "cpu"]
    proc = _torchrun(args, tmp_path)
    assert "rank 0 of 2 searches rows 0..4 of 8" in proc.stderr  # each rank searched its half
    got = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    capsys.readouterr()
    assert main(args) == 0
    ref = json.loads(capsys.readouterr().out)
    assert len(got) == 1 and [h["id"] for h in got[0]["hits"]] == [h["id"] for h in ref["hits"]]
    assert [h["score"] for h in got[0]["hits"]] == pytest.approx([h["score"] for h in ref["hits"]], abs=1e-6)
