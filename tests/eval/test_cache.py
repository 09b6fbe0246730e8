"""Embedding cache: reuse, resume after interruption, key changes, concatenation, atomic shards."""
import json

import numpy as np
import pytest

from umarvel.errors import DataError
from umarvel.eval.cache import EmbeddingCache, concat_cached
from helpers import search

D = 6


def make_items(n, prefix="x"):
    ids = [f"{prefix}{i}" for i in range(n)]
    return [{"text": f"item {i}"} for i in ids], ids


class Encoder:
    """Deterministic fake encoder (vector depends only on the text); counts calls and items;
    raises after ``fail_after`` calls when set."""

    def __init__(self, fail_after=None):
        self.calls, self.items, self.fail_after = 0, 0, fail_after

    def __call__(self, batch):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("simulated crash")
        self.calls += 1
        self.items += len(batch)
        seeds = [sum(map(ord, b["text"])) * 7919 + len(b["text"]) for b in batch]
        return np.stack([np.random.default_rng(s).standard_normal(D) for s in seeds]).astype(np.float32)


def get(cache, items, ids, enc, fp="ckpt-A", settings=None, name="pool", **kw):
    return cache.get_or_encode(name, items, ids, enc, fingerprint=fp,
                               settings=settings or {"max_pixels": 100}, shard_size=4, **kw)


def test_second_run_encodes_nothing(tmp_path):
    items, ids = make_items(10)
    cache = EmbeddingCache(tmp_path)
    enc = Encoder()
    first = get(cache, items, ids, enc)
    assert enc.calls == 3 and enc.items == 10 and first.n_encoded == 10
    assert first.vectors.dtype == np.float16 and first.vectors.shape == (10, D)
    np.testing.assert_array_equal(first.vectors, Encoder()(items).astype(np.float16))
    enc2 = Encoder()
    second = get(EmbeddingCache(tmp_path), items, ids, enc2)
    assert enc2.calls == 0 and second.n_encoded == 0 and second.n_reused == 10
    assert second.ids == ids
    np.testing.assert_array_equal(second.vectors, first.vectors)
    man = json.loads((first.path / "manifest.json").read_text())
    assert man["status"] == "complete" and man["completed_shards"] == [0, 1, 2]
    assert man["fingerprint"] == "ckpt-A" and man["settings"] == {"max_pixels": 100} and man["n_items"] == 10
    assert cache.stats["encoded"] == 10


def test_interrupted_run_resumes(tmp_path):
    items, ids = make_items(10)
    cache = EmbeddingCache(tmp_path)
    with pytest.raises(RuntimeError, match="simulated"):
        get(cache, items, ids, Encoder(fail_after=2))
    d = next(tmp_path.iterdir())
    assert sorted(p.name for p in d.glob("shard_*.npy")) == ["shard_00000.npy", "shard_00001.npy"]
    assert not list(d.glob(".*tmp")) and not (d / "vectors.npy").exists()  # no partial file left behind
    assert json.loads((d / "manifest.json").read_text())["completed_shards"] == [0, 1]
    enc = Encoder()
    res = get(cache, items, ids, enc)
    assert enc.calls == 1 and enc.items == 2 and res.n_reused == 8 and res.n_encoded == 2
    clean = get(EmbeddingCache(tmp_path / "clean"), items, ids, Encoder())
    np.testing.assert_array_equal(res.vectors, clean.vectors)
    assert not list(d.glob("shard_*.npy"))  # consolidated into vectors.npy


def test_failed_shard_write_leaves_no_partial_file(tmp_path, monkeypatch):
    items, ids = make_items(6)
    real_save = np.save
    calls = {"n": 0}

    def flaky_save(fh, arr):
        calls["n"] += 1
        if calls["n"] == 2:  # second shard: write half the bytes, then die
            fh.write(b"\x93NUMPY partial")
            raise OSError("disk full")
        real_save(fh, arr)

    monkeypatch.setattr(np, "save", flaky_save)
    cache = EmbeddingCache(tmp_path)
    with pytest.raises(OSError, match="disk full"):
        get(cache, items, ids, Encoder())
    d = next(tmp_path.iterdir())
    assert [p.name for p in d.glob("shard_*")] == ["shard_00000.npy"]
    assert not [p for p in d.iterdir() if p.name.startswith(".")]  # temp file removed
    monkeypatch.setattr(np, "save", real_save)
    enc = Encoder()
    res = get(cache, items, ids, enc)
    assert enc.items == 2 and res.n_reused == 4


def test_wrong_encoder_output_is_rejected(tmp_path):
    items, ids = make_items(6)
    with pytest.raises(DataError, match="shape"):
        get(EmbeddingCache(tmp_path), items, ids, lambda b: np.ones((len(b) + 1, D), np.float32))


def test_changed_fingerprint_or_settings_reencodes(tmp_path):
    items, ids = make_items(5)
    cache = EmbeddingCache(tmp_path)
    a = get(cache, items, ids, Encoder())
    for kw in ({"fp": "ckpt-B"}, {"settings": {"max_pixels": 200}}):
        enc = Encoder()
        b = get(cache, items, ids, enc, **kw)
        assert enc.items == 5 and b.path != a.path
    assert len(list(tmp_path.iterdir())) == 3


def test_source_file_identity(tmp_path):
    src = tmp_path / "pool.jsonl"
    src.write_text("a\n")
    items, ids = make_items(3)
    cache = EmbeddingCache(tmp_path / "c")
    get(cache, items, ids, Encoder(), source=src)
    enc = Encoder()
    get(cache, items, ids, enc, source=src)
    assert enc.calls == 0
    src.write_text("changed\n")
    get(cache, items, ids, enc, source=src)
    assert enc.items == 3


def test_manifest_mismatch_is_an_error(tmp_path):
    items, ids = make_items(5)
    cache = EmbeddingCache(tmp_path)
    src = tmp_path / "pool.jsonl"
    src.write_text("x\n")
    a = get(cache, items, ids, Encoder(), source=src)
    # same source identity (path, size, mtime) but different ids -> refuse
    items2, ids2 = make_items(5, prefix="y")
    with pytest.raises(DataError, match="ids"):
        get(cache, items2, ids2, Encoder(), source=src)
    man = json.loads((a.path / "manifest.json").read_text())
    man["fingerprint"] = "tampered"
    (a.path / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(DataError, match="fingerprint"):
        get(cache, items, ids, Encoder(), source=src)


def test_bad_requests(tmp_path):
    cache = EmbeddingCache(tmp_path)
    with pytest.raises(DataError, match="0 items"):
        get(cache, [], [], Encoder())
    with pytest.raises(DataError, match="duplicate"):
        get(cache, [{"text": "a"}, {"text": "b"}], ["a", "a"], Encoder())
    with pytest.raises(DataError, match="ids"):
        get(cache, [{"text": "a"}], ["a", "b"], Encoder())


def test_concat_equals_encoding_the_concatenation(tmp_path):
    cache = EmbeddingCache(tmp_path)
    (i1, d1), (i2, d2) = make_items(7, "a"), make_items(5, "b")
    p1 = get(cache, i1, d1, Encoder(), name="p1")
    p2 = get(cache, i2, d2, Encoder(), name="p2")
    enc = Encoder()
    glob = concat_cached([p1, p2])
    assert enc.calls == 0 and len(glob) == 12 and glob.ids == d1 + d2
    assert [b.shape[0] for b in glob.vector_blocks()] == [7, 5]
    assert all(isinstance(b, np.memmap) for b in glob.vector_blocks())
    whole = get(cache, i1 + i2, d1 + d2, Encoder(), name="whole")
    np.testing.assert_array_equal(glob.vectors, whole.vectors)
    q = np.random.default_rng(0).standard_normal((3, D)).astype(np.float32)
    a, b = search(q, glob, 4, device="cpu"), search(q, whole, 4, device="cpu")
    np.testing.assert_array_equal(a[1], b[1])


def _dist_worker(rank, world, root, port, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        items, ids = make_items(10)
        enc = Encoder()
        res = get(EmbeddingCache(root), items, ids, enc)
        np.save(f"{out}/rank{rank}.npy", np.asarray(res.vectors, dtype=np.float32))
        with open(f"{out}/rank{rank}.json", "w") as fh:
            json.dump({"items": enc.items, "calls": enc.calls}, fh)
    finally:
        dist.destroy_process_group()


def test_distributed_round_robin(tmp_path):
    from helpers import free_port, spawn_and_wait

    spawn_and_wait(_dist_worker, (2, str(tmp_path / "c"), free_port(), str(tmp_path)), 2, 300,
                   "2-process cache test")
    counts = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [c["calls"] for c in counts] == [2, 1]  # shards 0, 2 on rank 0; shard 1 on rank 1
    assert [c["items"] for c in counts] == [6, 4]
    items, ids = make_items(10)
    ref = Encoder()(items).astype(np.float16).astype(np.float32)
    for r in range(2):
        np.testing.assert_array_equal(np.load(tmp_path / f"rank{r}.npy"), ref)
