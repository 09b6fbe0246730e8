"""umarvel.index.Index: build, resume, add, exact and ANN search, bad inputs (tiny model, generated photos)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from umarvel import Index
from umarvel.index import read_items
from umarvel.errors import CheckpointError, ConfigError, DataError, ImageLoadError
from umarvel.index.core import INDEX_JSON, ITEMS_FILE
from umarvel.utils.io import write_jsonl


N_PHOTOS = 8  # tests/index/conftest.py: photos


def _brute_force(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """numpy reference: fp32 scores of the stored fp16 vectors, score desc then lower row."""
    scores = queries.astype(np.float32) @ vectors.astype(np.float32).T
    rows = np.arange(scores.shape[1])
    order = np.stack([np.lexsort((rows, -s))[:k] for s in scores])
    return np.take_along_axis(scores, order, 1), order


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _clustered(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Unit vectors around 20 centres (ANN recall means something on clustered data, not on pure noise)."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng, 20, d)
    x = centres[rng.integers(0, 20, n)] + 0.35 * rng.standard_normal((n, d)).astype(np.float32) / np.sqrt(d)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


# ------------------------------------------------------------------------------------------- build
def test_build_folder_describes_itself(photo_index, photos, tiny_model, n_photos):
    assert n_photos == N_PHOTOS
    idx = Index.load(photo_index.path)
    info = json.loads((idx.path / INDEX_JSON).read_text())
    assert info["count"] == N_PHOTOS == len(idx) and info["dim"] == tiny_model.embed_dim
    assert info["model"]["fingerprint"] == tiny_model.fingerprint() and info["backend"] == "flat"
    assert info["encode"]["settings"]["dtype"] == "float32" and info["created"]
    # ids are relative paths (hidden file and non-image skipped); captions add text; rows align
    rows = [json.loads(x) for x in (idx.path / ITEMS_FILE).read_text().splitlines()]
    assert [r["id"] for r in rows] == idx.ids and ".hidden.png" not in idx.ids
    assert "trips/2024/green.png" in idx.ids and idx.items[idx.row_of("trips/blue.jpg")]["text"] == "a blue circle"
    assert idx.vectors.dtype == np.float16 and idx.vectors.shape == (N_PHOTOS, tiny_model.embed_dim)
    # the stored vector of a row is the model's embedding of that row's item
    it = idx.items[idx.row_of("red.png")]
    ref = tiny_model.encode_candidates([{"text": it["text"], "image": it["image"]}])
    np.testing.assert_allclose(idx.vectors[idx.row_of("red.png")].astype(np.float32), ref[0], atol=2e-3)


def test_query_finds_an_item_by_its_own_content(photo_index, tiny_model):
    it = photo_index.items[photo_index.row_of("trips/blue.jpg")]
    hits = photo_index.query(tiny_model, {"text": it["text"], "image": it["image"]}, k=3)[0]
    assert len(hits) == 3 and [h.rank for h in hits] == [1, 2, 3]
    assert hits[0].score >= hits[1].score >= hits[2].score
    assert hits[0].to_dict()["id"] == hits[0].id and hits[0].image and Path(hits[0].image).is_file()


def _kill_after(monkeypatch, model, calls: int) -> list[int]:
    """Make ``model.encode_candidates`` raise KeyboardInterrupt after ``calls`` calls (a killed build); returns the
    sizes of the calls that ran."""
    original, seen = model.encode_candidates, []

    def killed(items, batch_size=32, **kw):
        if len(seen) == calls:
            raise KeyboardInterrupt("killed mid-encode")
        seen.append(len(items))
        return original(items, batch_size=batch_size, **kw)

    monkeypatch.setattr(model, "encode_candidates", killed)
    return seen


def test_killed_build_resumes_with_the_same_vectors(tiny_model, photos, tmp_path, monkeypatch):
    ref = Index.build(tiny_model, photos, tmp_path / "ref", shard_size=3)
    original = tiny_model.encode_candidates
    encoded = _kill_after(monkeypatch, tiny_model, 2)
    with pytest.raises(KeyboardInterrupt):
        Index.build(tiny_model, photos, tmp_path / "idx", shard_size=3)
    assert not (tmp_path / "idx" / INDEX_JSON).exists()
    shards = sorted((tmp_path / "idx").glob("vectors/part-*/shard_*.npy"))
    assert len(shards) == 2
    before = np.concatenate([np.load(s) for s in shards])
    with pytest.raises(DataError, match="not an index .*run the same `umarvel index build` again"):
        Index.load(tmp_path / "idx")

    monkeypatch.setattr(tiny_model, "encode_candidates", original)
    encoded = _counting(monkeypatch, tiny_model)
    idx = Index.build(tiny_model, photos, tmp_path / "idx", shard_size=3)
    assert sum(encoded) == N_PHOTOS - 6  # only the missing shard was encoded
    np.testing.assert_array_equal(idx.vectors[:6], before)
    np.testing.assert_array_equal(idx.vectors, ref.vectors)
    assert idx.ids == ref.ids and not list((tmp_path / "idx").glob("vectors/part-*/shard_*.npy"))


def test_add_encodes_only_new_items(tiny_model, photos, tmp_path, monkeypatch, draw_image):
    draw = draw_image
    idx = Index.build(tiny_model, photos, tmp_path / "idx")
    more = tmp_path / "more"
    draw(more / "pink.png", (250, 120, 180))
    draw(more / "teal.png", (20, 128, 128))
    (more / "items.jsonl").write_text(
        json.dumps({"id": "pink", "image": "pink.png", "meta": {"album": "x"}}) + "\n"
        + json.dumps({"id": "teal", "text": "a teal disc", "image": "teal.png"}) + "\n"
        + json.dumps({"id": "note", "text": "a text-only item about boats"}) + "\n")
    seen = _counting(monkeypatch, tiny_model)
    assert idx.add(tiny_model, more / "items.jsonl") == 3
    assert seen == [3] and len(idx) == N_PHOTOS + 3 and idx.ids[-3:] == ["pink", "teal", "note"]
    again = Index.load(idx.path)
    assert len(again) == N_PHOTOS + 3 and len(again.info["parts"]) == 2
    assert again.items[-3]["meta"] == {"album": "x"}
    np.testing.assert_array_equal(again.vectors[:N_PHOTOS], Index.load(idx.path).vector_blocks()[0])
    hit = again.search(again.vectors[again.row_of("note")].astype(np.float32), k=1)[0][0]
    assert hit.id == "note" and hit.text == "a text-only item about boats"
    # the same ids again: a clear error naming the id, nothing changed
    with pytest.raises(DataError, match="item id 'pink' is already in the index .* \\(row 8\\)"):
        again.add(tiny_model, more / "items.jsonl")
    assert len(Index.load(idx.path)) == N_PHOTOS + 3


def _sha1(path: Path) -> str:

    return hashlib.sha1(path.read_bytes()).hexdigest()


def _counting(monkeypatch, model) -> list[int]:
    """Record the size of every ``encode_candidates`` call of ``model``."""
    original, seen = model.encode_candidates, []
    monkeypatch.setattr(model, "encode_candidates",
                        lambda items, batch_size=32, **kw: seen.append(len(items)) or original(items, batch_size, **kw))
    return seen


def test_folder_add_skips_unchanged_pictures_and_refuses_a_changed_one(tiny_model, photos, tmp_path, monkeypatch,
                                                                        draw_image):
    folder = tmp_path / "photos"
    shutil.copytree(photos, folder)
    idx = Index.build(tiny_model, folder, tmp_path / "idx", shard_size=3)
    for it in idx.items:  # every picture's content fingerprint is recorded with its row
        f = Path(it["image"])
        assert it["file"] == {"size": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns, "sha1": _sha1(f)}
    seen = _counting(monkeypatch, tiny_model)
    info = (idx.path / INDEX_JSON).read_text()
    # the unchanged folder again: nothing encoded, the index untouched
    assert idx.add(tiny_model, folder) == 0 and seen == [] and (idx.path / INDEX_JSON).read_text() == info
    # a touched picture (same bytes, another mtime) is still unchanged; a new picture is added
    st = (folder / "red.png").stat()
    os.utime(folder / "red.png", ns=(st.st_atime_ns, st.st_mtime_ns - 10**9))
    draw_image(folder / "new" / "pink.png", (250, 120, 180))
    assert idx.add(tiny_model, folder) == 1 and seen == [1]
    assert idx.ids[-1] == "new/pink.png" and idx.items[-1]["file"]["sha1"] == _sha1(folder / "new" / "pink.png")
    # a changed caption or a picture replaced under the same name: an error naming it, nothing encoded or changed
    caps = (folder / "captions.jsonl").read_text()
    (folder / "captions.jsonl").write_text(caps.replace("a blue circle", "a navy circle"))
    with pytest.raises(DataError, match=r"1 item\(s\) already in the index .* changed since they were indexed: "
                                        r"'trips/blue.jpg' \(caption\)"):
        idx.add(tiny_model, folder)
    (folder / "captions.jsonl").write_text(caps)
    draw_image(folder / "red.png", (20, 200, 20), shape="ellipse")
    with pytest.raises(DataError, match=r"'red.png' \(image content: \d+ bytes sha1 \w+ -> \d+ bytes sha1 \w+\)\. An "
                                        r"index cannot replace .*umarvel index build .*--overwrite"):
        idx.add(tiny_model, folder)
    assert seen == [1] and len(Index.load(idx.path)) == N_PHOTOS + 1
    # the remedy named: a rebuild, which holds the new picture's vector
    stale = idx.vectors[idx.row_of("red.png")].astype(np.float32)
    rebuilt = Index.build(tiny_model, folder, idx.path, overwrite=True)
    ref = tiny_model.encode_candidates([{"text": "a red square", "image": str(folder / "red.png")}])[0]
    got = rebuilt.vectors[rebuilt.row_of("red.png")].astype(np.float32)
    np.testing.assert_allclose(got, ref, atol=2e-3)
    assert np.abs(got - stale).max() > 1e-2 and rebuilt.items[rebuilt.row_of("red.png")]["file"]["sha1"] == \
        _sha1(folder / "red.png")
    # an index's own rows are valid items again (their "file" is recomputed from the files, not trusted)
    again = Index.from_vectors(rebuilt.vectors, [{**it, "file": {"sha1": "forged"}} for it in rebuilt.items],
                               tmp_path / "again.idx")
    assert [it["file"] for it in again.items] == [it["file"] for it in rebuilt.items]


def test_resumed_build_does_not_reuse_the_vector_of_a_replaced_picture(tiny_model, photos, tmp_path, monkeypatch,
                                                                       draw_image, caplog):

    folder = tmp_path / "photos"
    shutil.copytree(photos, folder)
    original = tiny_model.encode_candidates
    _kill_after(monkeypatch, tiny_model, 2)
    with pytest.raises(KeyboardInterrupt):
        Index.build(tiny_model, folder, tmp_path / "idx", shard_size=3)
    first = read_items(folder)[0]  # encoded in the first shard before the kill
    draw_image(Path(first["image"]), (20, 200, 20), shape="ellipse")
    monkeypatch.setattr(tiny_model, "encode_candidates", original)
    encoded = _counting(monkeypatch, tiny_model)
    with caplog.at_level("WARNING", logger="umarvel.index.core"):
        idx = Index.build(tiny_model, folder, tmp_path / "idx", shard_size=3)
    assert sum(encoded) == N_PHOTOS  # all encoded again: the killed build's shards describe the old picture
    assert "unfinished build of other items" in caplog.text
    ref = original([{"text": first["text"], "image": first["image"]}])[0]
    np.testing.assert_allclose(idx.vectors[idx.row_of(first["id"])].astype(np.float32), ref, atol=2e-3)
    assert idx.items[idx.row_of(first["id"])]["file"]["sha1"] == _sha1(Path(first["image"]))
    assert len(list((idx.path / "vectors").iterdir())) == 1  # the stale entry is gone


def test_an_index_without_fingerprints_loads_and_grows_with_one_warning(photo_index, photos, tiny_model, tmp_path,
                                                                        monkeypatch, caplog):
    """An index folder written before the fingerprints were recorded: its pictures are not compared."""

    copy = tmp_path / "old.idx"
    shutil.copytree(photo_index.path, copy)
    write_jsonl(copy / ITEMS_FILE, [{k: v for k, v in it.items() if k != "file"} for it in photo_index.items])
    old = Index.load(copy)
    assert old.ids == photo_index.ids and not any("file" in it for it in old.items)
    seen = _counting(monkeypatch, tiny_model)
    with caplog.at_level("WARNING", logger="umarvel.index.core"):
        assert old.add(tiny_model, photos) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and f"{N_PHOTOS} picture(s) already in it" in warnings[0]
    assert "no content fingerprint" in warnings[0] and seen == []


def test_unfinished_add_rows_are_ignored(photo_index, tmp_path):
    copy = tmp_path / "copy.idx"
    shutil.copytree(photo_index.path, copy)
    with open(copy / ITEMS_FILE, "a") as fh:
        fh.write(json.dumps({"id": "half-written", "text": "x"}) + "\n")
    assert Index.load(copy).ids == photo_index.ids


# ------------------------------------------------------------------------------------------ search
@pytest.mark.parametrize("resident", [True, False])
def test_flat_search_equals_brute_force_numpy(tmp_path, resident):
    rng = np.random.default_rng(0)
    vecs = _unit(rng, 700, 48)
    items = [{"id": f"v{i}", "text": f"item {i}"} for i in range(700)]
    idx = Index.from_vectors(vecs, items, tmp_path / "idx")
    queries = _unit(rng, 9, 48)
    scores, rows = idx.search_arrays(queries, 25, device="cpu", resident=resident)
    ref_s, ref_r = _brute_force(idx.vectors, queries, 25)
    np.testing.assert_array_equal(rows, ref_r)
    np.testing.assert_allclose(scores, ref_s, rtol=1e-5, atol=1e-6)
    hits = idx.search(queries[0], 3)[0]  # a single (D,) vector
    assert [h.id for h in hits] == [f"v{r}" for r in ref_r[0, :3]]
    # k larger than the collection: all rows, then nothing
    small = Index.from_vectors(vecs[:4], items[:4], tmp_path / "small")
    s, r = small.search_arrays(queries[:2], 6)
    assert (r[:, 4:] == -1).all() and np.isneginf(s[:, 4:]).all() and len(small.search(queries[:1], 6)[0]) == 4
    with pytest.raises(DataError, match="has dim 48"):
        idx.search_arrays(np.zeros((1, 7), np.float32), 3)


@pytest.mark.parametrize("backend,params", [("ivf", {"nlist": 16, "nprobe": 4}),
                                            ("hnsw", {"hnsw_m": 16, "ef_search": 32})])
def test_ann_recall_is_reported_in_index_json(tmp_path, backend, params):
    from umarvel.eval.search import RowBlocks, TorchSearcher, ann_recall
    from umarvel.index.core import recall_queries

    vecs = _clustered(3000, 32)
    items = [{"id": f"c{i}", "text": "x"} for i in range(3000)]
    idx = Index.from_vectors(vecs, items, tmp_path / backend, backend=backend, backend_params=params,
                             recall_sample=200)
    info = json.loads((idx.path / INDEX_JSON).read_text())
    rec = info["recall"]
    assert rec["k"] == 10 and rec["queries"] == 200 and 0.0 < rec["recall"] <= 1.0
    assert info["faiss_file"] and (idx.path / info["faiss_file"]).is_file()
    for key, value in params.items():
        assert info["backend_params"][key] == value
    assert rec["queries_from"].startswith("held-out style")
    # the recorded number is the recall of this index on the held-out-style queries of that sample, each
    # scored without the row it was made from
    rows = np.sort(np.random.default_rng(0).choice(3000, 200, replace=False))
    q = recall_queries(TorchSearcher(RowBlocks(idx.vector_blocks()), device="cpu"), rows, 10, seed=0)
    assert q.shape == (200, 32) and np.allclose(np.linalg.norm(q, axis=1), 1, atol=1e-5)
    top, exact = idx.search_arrays(q, 11, exact=True)
    _, approx = idx.search_arrays(q, 11)
    assert top[:, 0].max() < 0.995  # no query is an indexed vector (a stored vector scores ~1 with itself)
    assert (exact[:, 0] != rows).mean() > 0.2  # and for many, another row is nearer than the one it came from

    def others(found):  # each list without the row its query was made from
        return np.array([[r for r in f if r != own][:10] for f, own in zip(found, rows)])

    assert abs(ann_recall(others(approx), others(exact), 10) - rec["recall"]) < 1e-6
    assert rec["recall"] > 0.5

    # add: the faiss index grows (new file), the recall is measured again, new items are found
    new = _clustered(50, 32, seed=1)
    more = [{"id": f"n{i}", "text": "y"} for i in range(50)]

    class Encoder:  # stands for the model: the fingerprint the index was built with, fixed vectors
        settings = None

        def fingerprint(self):
            return "external"

        def encode_candidates(self, batch, batch_size=32):
            assert len(batch) == len(new)  # one shard holds all 50
            return new

    assert idx.add(Encoder(), more, recall_sample=200) == 50
    info2 = json.loads((idx.path / INDEX_JSON).read_text())
    assert info2["count"] == 3050 and info2["faiss_file"] != info["faiss_file"]
    assert not (idx.path / info["faiss_file"]).exists() and info2["recall"]["measured"]
    top = idx.search(new[:5], 1)
    assert [h[0].id for h in top] == [f"n{i}" for i in range(5)]


def _draws(n: int, d: int, seed: int) -> np.ndarray:
    """Unit vectors around 20 fixed centres (as :func:`_clustered`, noise 0.6); ``seed`` picks the draws, so
    two seeds give a collection and fresh queries of the same distribution."""
    centres = _unit(np.random.default_rng(0), 20, d)
    rng = np.random.default_rng(seed)
    x = centres[rng.integers(0, 20, n)] + 0.6 * rng.standard_normal((n, d)).astype(np.float32) / np.sqrt(d)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("backend,params", [("ivf", {"nlist": 64, "nprobe": 1}),
                                            ("hnsw", {"hnsw_m": 8, "ef_construction": 40, "ef_search": 10})])
def test_recorded_recall_is_not_inflated_by_self_queries(tmp_path, backend, params):
    """An ANN index with few probes / a narrow beam: querying the indexed vectors themselves (the old estimate)
    overstates the recall that new queries of the same distribution get; the recorded estimate is close to it."""
    from umarvel.eval.search import ann_recall

    vecs = _draws(4000, 64, seed=1)
    idx = Index.from_vectors(vecs, [{"id": f"c{i}", "text": "x"} for i in range(4000)], tmp_path / backend,
                             backend=backend, backend_params=params, recall_sample=1000)

    def recall(queries: np.ndarray) -> float:
        _, exact = idx.search_arrays(queries, 10, exact=True)
        _, approx = idx.search_arrays(queries, 10)
        return ann_recall(approx, exact, 10)

    fresh = recall(_draws(2000, 64, seed=2))  # the truth: new queries from the collection's distribution
    rows = np.sort(np.random.default_rng(0).choice(4000, 1000, replace=False))
    self_query = recall(idx.vectors[rows].astype(np.float32))  # the old estimate
    recorded = idx.info["recall"]["recall"]
    assert abs(recorded - fresh) < 0.04 < self_query - fresh  # the old estimate was inflated, the new one is not


# ------------------------------------------------------------------------------------------ errors
def test_bad_inputs_name_the_item(tiny_model, photos, tmp_path, draw_image):
    draw = draw_image
    bad = tmp_path / "items.jsonl"
    bad.write_text('{"id": "a", "text": "fine"}\n{"id": "b", "image": "nope.jpg"}\n')
    with pytest.raises(ImageLoadError, match=f"{bad}:2: item 'b': image file not found: .*nope.jpg"):
        Index.build(tiny_model, bad, tmp_path / "i1")
    bad.write_text('{"id": "a", "text": "x"}\n{"id": "b", "text": "y"}\n{"id": "a", "text": "z"}\n')
    with pytest.raises(DataError, match=f"{bad}:3: duplicate id 'a' \\(first at {bad}:1\\)"):
        Index.build(tiny_model, bad, tmp_path / "i2")
    bad.write_text('{"id": "a", "txt": "typo"}\n')
    with pytest.raises(DataError, match=f"{bad}:1: unknown key\\(s\\) \\['txt'\\]"):
        Index.build(tiny_model, bad, tmp_path / "i3")
    bad.write_text('{"id": "a", "text": "  "}\n')
    with pytest.raises(DataError, match="item 'a' has neither text nor image"):
        Index.build(tiny_model, bad, tmp_path / "i4")
    bad.write_text("\n")
    with pytest.raises(DataError, match="no items"):
        Index.build(tiny_model, bad, tmp_path / "i5")
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=f"{empty}: no images found"):
        Index.build(tiny_model, empty, tmp_path / "i6")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    draw(corrupt / "good.png", (1, 2, 3))
    (corrupt / "broken.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(ImageLoadError, match="item 'broken.jpg': .*cannot read image .*broken.jpg"):
        Index.build(tiny_model, corrupt, tmp_path / "i7")
    photos_caps = tmp_path / "caps"
    draw(photos_caps / "x.png", (9, 9, 9))
    (photos_caps / "captions.jsonl").write_text('{"id": "y.png", "text": "no such image"}\n')
    with pytest.raises(DataError, match="captions.jsonl:1: caption for 'y.png', but no such image"):
        Index.build(tiny_model, photos_caps, tmp_path / "i8")
    with pytest.raises(ConfigError, match="unknown index backend 'annoy'"):
        Index.build(tiny_model, photos, tmp_path / "i9", backend="annoy")
    with pytest.raises(ConfigError, match="backend 'hnsw' takes no parameter\\(s\\) \\['nlist'\\]"):
        Index.build(tiny_model, photos, tmp_path / "i9", backend="hnsw", backend_params={"nlist": 4})


def test_existing_index_wrong_model_and_missing_files(photo_index, tiny_model, tmp_path):
    with pytest.raises(DataError, match="already holds an index; use `umarvel index add`"):
        Index.build(tiny_model, [{"id": "x", "text": "y"}], photo_index.path)

    class Other:
        source = "/models/other"
        settings = None

        def fingerprint(self):
            return "0123456789abcdef"

    with pytest.raises(CheckpointError, match="fingerprint 0123456789abcdef.*Use the index's model"):
        photo_index.add(Other(), [{"id": "new", "text": "z"}])
    with pytest.raises(CheckpointError, match=f"built with model .* \\(fingerprint {photo_index.fingerprint}\\)"):
        photo_index.query(Other(), {"text": "z"})
    with pytest.raises(DataError, match="not an index \\(no index.json\\)$"):
        Index.load(tmp_path)


def test_dtype_difference_is_named(photo_index, tiny_checkpoint):
    with pytest.raises(CheckpointError, match="settings differ: dtype: index 'float32' vs model 'bfloat16'"):
        photo_index.load_model(tiny_checkpoint, device="cpu", dtype="bfloat16")
    assert photo_index.load_model(device="cpu").fingerprint() == photo_index.fingerprint  # the recorded model


def test_task_instructions_match_the_instruction_table(tmp_path):
    from umarvel.data.synthetic import make_synthetic_mbeir
    from umarvel.data.registry import MBEIR_INSTRUCTIONS
    from umarvel.index.tasks import search_tasks, task_instruction

    table = make_synthetic_mbeir(tmp_path / "mbeir", n_queries_per_task=1, n_candidates_per_task=2) / MBEIR_INSTRUCTIONS
    assert [(t.name, t.instruction) for t in search_tasks(table)] == [(t.name, t.instruction) for t in search_tasks()]
    assert task_instruction("mscoco_task0") == "Find me an everyday image that matches the given caption."
    with pytest.raises(ConfigError, match="unknown task 'nope'"):
        task_instruction("nope")
