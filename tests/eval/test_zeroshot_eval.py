"""Zero-shot suite end to end: the generated fixture (every set, real file formats, few-frame videos) through
``umarvel eval zeroshot`` / ``scripts/eval_zeroshot.sh`` with a tiny random model; cache reuse, skipped and
broken sets, and metrics recomputed by brute force from the API embeddings."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from umarvel.commands.eval_zeroshot import main as zeroshot_main
from umarvel.data.collate import EmbedInput
from umarvel.data.formatting import INFERENCE_STYLE, PromptStyle
from umarvel.data.images import load_image
from umarvel.data.video import MSVD_VIDEO, load_video
from umarvel.data.visual import VideoInput
from umarvel.errors import ConfigError
from umarvel.data.registry import Task, get_task, list_tasks
from umarvel.eval.zeroshot.fixtures import FIXTURE_SIZES, write_zeroshot_fixture
from umarvel.eval.zeroshot.readers import read_set
from umarvel.eval.zeroshot.runner import (EXTRA_COLUMNS, PAPER_COLUMNS, RESULTS_JSON, RESULTS_MD, SUBMISSION_FILE,
                                          SUFFIX_STYLE, table_values)
from umarvel.eval.zeroshot.tasks import resolve_zeroshot_names

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
ZS_TASKS = [t.name for t in resolve_zeroshot_names(None)]


@pytest.fixture(scope="module")
def zs_root(tmp_path_factory) -> Path:
    return write_zeroshot_fixture(tmp_path_factory.mktemp("zs") / "data")


@pytest.fixture(scope="module")
def first_run(tiny_checkpoint, zs_root, tmp_path_factory) -> tuple[Path, dict]:
    """The whole fixture through the command, in-process (fresh cache under <out>/cache)."""
    out = tmp_path_factory.mktemp("zs_out") / "run"
    rc = zeroshot_main(["--log-level", "WARNING", "--model", str(tiny_checkpoint), "--data-root", str(zs_root),
                        "--output-dir", str(out)])
    assert rc == 0
    return out, json.loads((out / RESULTS_JSON).read_text())


def test_every_set_produces_its_metrics(first_run):
    out, res = first_run
    entries = {e["name"]: e for e in res["tasks"]}
    assert list(entries) == ZS_TASKS and len(ZS_TASKS) == 22
    for name, e in entries.items():
        task = get_task(name)
        n_q = FIXTURE_SIZES[name][0]
        assert e["num_queries"] == n_q, name
        assert (out / "metrics" / f"{name}.json").is_file()
        if name == "circo_test":
            assert e["status"] == "submission" and e["metrics"] == {}
            continue
        assert e["status"] == "ok", (name, e)
        assert tuple(e["metrics"]) == task.options["metric_keys"], name
        assert all(0.0 <= v <= 100.0 for v in e["metrics"].values()), name
        assert e["value"] == e["metrics"][task.options["headline"][0]]
        assert json.loads((out / e["metrics_file"]).read_text())["metrics"] == e["metrics"]
    assert entries["msvd"]["num_candidates"] == 2 and entries["vist"]["num_candidates"] == 9
    # every column of the paper table (and of the other sets) is filled
    assert set(res["paper_table"]) == {c[0] for c in PAPER_COLUMNS}
    assert all(v is not None for v in res["paper_table"].values())
    assert all(v is not None for v in res["extra_table"].values())
    genecis = [entries[f"genecis_{s}"]["metrics"]["R@1"] for s in
               ("change_attribute", "change_object", "focus_attribute", "focus_object")]
    assert res["paper_table"]["GeneCIS R@1"] == pytest.approx(sum(genecis) / 4)
    md = (out / RESULTS_MD).read_text()
    assert "| Model | ShareGPT4V T2I | ShareGPT4V I2T |" in md and "| msrvtt | MSR-VTT | Recall@1 |" in md
    assert res["cache"]["encoded"] > 0 and res["video_specs"]["msvd"]["nframes"] == 12
    assert res["video_specs"]["msrvtt"]["min_pixels"] == 128 * 28 * 28  # published budget by default


def test_circo_test_submission_lists_coco_ids(first_run, zs_root):
    out, _ = first_run
    sub = json.loads((out / SUBMISSION_FILE).read_text())
    gallery = {int(c.id) for c in read_set("circo_test", zs_root).candidates}
    assert list(sub) == ["7"] and len(sub["7"]) == len(gallery) == 6  # top-50 of a 6-image gallery
    assert set(sub["7"]) == gallery and all(isinstance(i, int) for i in sub["7"])


def test_second_run_through_the_script_encodes_nothing(first_run, tiny_checkpoint, zs_root):
    out, first = first_run
    env = dict(os.environ, UMARVEL_PYTHON=sys.executable, OMP_NUM_THREADS="1", UMARVEL_NO_PROGRESS="1")
    proc = subprocess.run(["sh", str(REPO / "scripts" / "eval_zeroshot.sh"), str(tiny_checkpoint), str(zs_root),
                           str(out), "--log-level", "WARNING"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "## Paper table" in proc.stdout
    second = json.loads((out / RESULTS_JSON).read_text())
    assert second["cache"]["encoded"] == 0
    assert all(e["encoded"] == 0 for e in second["tasks"])
    assert [e["metrics"] for e in second["tasks"]] == [e["metrics"] for e in first["tasks"]]


def test_script_usage_error():
    proc = subprocess.run(["sh", str(REPO / "scripts" / "eval_zeroshot.sh"), "only-one"], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "usage:" in proc.stderr


# ------------------------------------------------------------------------------------------ brute force
def _fp16(x: np.ndarray) -> np.ndarray:
    """The cache stores float16 and the runner re-normalises in fp32: do the same to the API embeddings."""
    y = np.asarray(x, dtype=np.float16).astype(np.float32)
    return y / np.linalg.norm(y, axis=1, keepdims=True)


def _brute_hit_rate(scores: np.ndarray, positives: list[list[int]], k: int) -> float:
    """Share (percent) of rows whose best positive ranks in the top k of a stable descending sort."""
    hits = 0
    for r, pos in enumerate(positives):
        order = sorted(range(scores.shape[1]), key=lambda j: -scores[r, j])  # stable: ties by position
        hits += any(j in pos for j in order[:k])
    return 100.0 * hits / len(positives)


def _cached(out: Path, name: str) -> np.ndarray:
    """The vectors the run cached for one set side (``<out>/cache/zeroshot_<set>_<side>-<key>/vectors.npy``)."""
    (entry,) = (out / "cache").glob(f"zeroshot_{name}-*")
    return np.load(entry / "vectors.npy").astype(np.float32)


def test_metrics_equal_brute_force_from_api_embeddings(first_run, tiny_model, zs_root):
    out, res = first_run
    entries = {e["name"]: e for e in res["tasks"]}
    model = tiny_model
    bs = 32  # the command's default batch size: same batches, same numbers

    # Flickr30K: suffix style (prompt1, image-only suffix "image"), instruction on the texts, both directions
    fl = read_set("flickr30k", zs_root)
    texts = _fp16(model.encode_prepared([(lambda t=t: EmbedInput(t.final_text())) for t in fl.texts],
                                        batch_size=bs, style=SUFFIX_STYLE))
    images = _fp16(model.encode_prepared(
        [(lambda p=i.image: EmbedInput("", (load_image(p, model.budget),))) for i in fl.images],
        batch_size=bs, style=SUFFIX_STYLE))
    sentence = _fp16(model.encode_prepared(  # the M-BEIR "image and sentence" suffix is not what Flickr uses
        [(lambda p=i.image: EmbedInput("", (load_image(p, model.budget),))) for i in fl.images],
        batch_size=bs, style=INFERENCE_STYLE))
    assert not np.allclose(sentence, images, atol=1e-3)
    # the run encoded exactly these inputs (right text rule, suffix style, image budget)
    np.testing.assert_allclose(_cached(out, "flickr30k_texts"), texts, atol=1e-3, rtol=0)
    np.testing.assert_allclose(_cached(out, "flickr30k_images"), images, atol=1e-3, rtol=0)
    s = texts @ images.T
    t2i = [[i] for i in fl.text_to_image]
    i2t = [[t for t, i in enumerate(fl.text_to_image) if i == img] for img in range(len(fl.images))]
    for k in (1, 5, 10):
        assert entries["flickr30k"]["metrics"][f"t2i_R@{k}"] == pytest.approx(_brute_hit_rate(s, t2i, k))
        assert entries["flickr30k"]["metrics"][f"i2t_R@{k}"] == pytest.approx(_brute_hit_rate(s.T, i2t, k))
    # the suffix matters: without it the same texts embed differently (so the check above can fail)
    plain = model.encode_prepared([(lambda t=t: EmbedInput(t.final_text())) for t in fl.texts], batch_size=bs,
                                  style=PromptStyle(suffix=False, add_generation_prompt=True))
    assert not np.allclose(_fp16(plain), texts, atol=1e-3)

    # MSVD: captions (no suffix, instruction without a space) -> videos decoded at 12 frames, batch 1
    ms = read_set("msvd", zs_root)
    no_suffix = PromptStyle(suffix=False, add_generation_prompt=True)
    q = _fp16(model.encode_prepared([(lambda t=t: EmbedInput(t.final_text())) for t in ms.queries],
                                    batch_size=bs, style=no_suffix))

    def video_input(item):
        return EmbedInput("", video=VideoInput.from_frames(load_video(item.video, MSVD_VIDEO, item.id)))

    v = _fp16(model.encode_prepared([(lambda it=it: video_input(it)) for it in ms.candidates], batch_size=1,
                                    style=no_suffix))
    np.testing.assert_allclose(_cached(out, "msvd_queries"), q, atol=1e-3, rtol=0)
    np.testing.assert_allclose(_cached(out, "msvd_candidates"), v, atol=1e-3, rtol=0)
    s = q @ v.T
    for k in (1, 5, 10):
        assert entries["msvd"]["metrics"][f"R@{k}"] == pytest.approx(_brute_hit_rate(s, [list(p) for p in ms.positives], k))

    # GeneCIS change_object: each query against its own [target, distractors]
    gc = read_set("genecis_change_object", zs_root)
    gq = _fp16(model.encode_prepared(
        [(lambda it=it: EmbedInput(it.final_text(), (load_image(it.image, model.budget),))) for it in gc.queries],
        batch_size=bs, style=no_suffix))
    gcand = _fp16(model.encode_prepared(
        [(lambda it=it: EmbedInput("", (load_image(it.image, model.budget),))) for it in gc.candidates],
        batch_size=bs, style=no_suffix))
    np.testing.assert_allclose(_cached(out, "genecis_change_object_queries"), gq, atol=1e-3, rtol=0)
    for k in (1, 2, 3):
        hits = 0
        for r, gal in enumerate(gc.galleries):
            sc = [float(gq[r] @ gcand[j]) for j in gal]
            hits += sum(x > sc[0] for x in sc[1:]) < k  # the target (first) wins ties
        assert entries["genecis_change_object"]["metrics"][f"R@{k}"] == pytest.approx(100.0 * hits / len(gc.galleries))


# ------------------------------------------------------------------------------------- skipped / broken data
def test_missing_set_skipped_and_corrupt_video_named(tiny_checkpoint, tmp_path, capsys):
    root = write_zeroshot_fixture(tmp_path / "data", groups=["videos", "visdial", "sugarcrepe"])
    (root / "msrvtt" / "videos" / "video7002.mp4").write_bytes(b"\x00\x01 not a video at all" * 20)
    broken = root / "sugar-crepe" / "data" / "add_att.json"
    broken.write_text('{"1": {"filename": ', encoding="utf-8")
    out = tmp_path / "out"
    rc = zeroshot_main(["--log-level", "ERROR", "--model", str(tiny_checkpoint), "--data-root", str(root),
                        "--output-dir", str(out), "--tasks", "circo,visdial,msrvtt,msvd,sugarcrepe_add_att",
                        "--video-min-pixels", "3136", "--video-max-pixels", "3136"])
    assert rc == 1  # a task failed on broken data
    stdout = capsys.readouterr().out
    missing = root / "circo" / "annotations" / "val.json"
    assert f"skipped: circo (missing {missing})" in stdout
    res = json.loads((out / RESULTS_JSON).read_text())
    entries = {e["name"]: e for e in res["tasks"]}
    assert [e["name"] for e in res["tasks"]] == ["circo", "visdial", "sugarcrepe_add_att", "msvd", "msrvtt"]
    assert entries["sugarcrepe_add_att"]["status"] == "error" and str(broken) in entries["sugarcrepe_add_att"]["error"]
    assert entries["circo"]["status"] == "skipped" and entries["circo"]["missing"] == str(missing)
    assert entries["msrvtt"]["status"] == "error" and "video7002" in entries["msrvtt"]["error"]
    assert "error: msrvtt: video video7002" in stdout
    assert entries["visdial"]["status"] == entries["msvd"]["status"] == "ok"
    assert res["video_specs"]["msvd"]["max_pixels"] == 3136  # the override reached the runner
    assert res["paper_table"]["CIRCO mAP@5"] is None and res["paper_table"]["MSR-VTT R@1"] is None


# ------------------------------------------------------------------------------------------ registry bits
def test_registry_has_the_zeroshot_tasks_and_groups():
    tasks = {t.name: t for t in list_tasks("zeroshot")}
    assert set(ZS_TASKS) <= set(tasks)
    assert tasks["circo"].metric == "mAP@5" and tasks["circo"].cutoffs == (5, 10, 25, 50)
    assert tasks["genecis_focus_attribute"].cutoffs == (1, 2, 3)
    assert tasks["ccneg"].metric == "Accuracy" and tasks["ccneg"].cutoffs == ()
    assert tasks["msrvtt"].options["instruction"] == "Find an everyday video match with caption."
    assert tasks["genecis_focus_object"].options["instruction"] == tasks["genecis_change_object"].options["instruction"]
    assert [t.name for t in resolve_zeroshot_names("msrvtt, genecis ,circo")] == [
        "circo", "genecis_change_attribute", "genecis_change_object", "genecis_focus_attribute",
        "genecis_focus_object", "msrvtt"]
    with pytest.raises(ConfigError, match="unknown zero-shot task 'nope'"):
        resolve_zeroshot_names("circo,nope")
    with pytest.raises(ConfigError, match="not a zero-shot"):
        resolve_zeroshot_names("cirr_task7")
    with pytest.raises(ConfigError, match="metric must look like"):
        Task(name="x", kind="zeroshot", dataset="X", metric="F1", cutoffs=())
    with pytest.raises(ConfigError, match="cutoffs"):
        Task(name="x", kind="zeroshot", dataset="X", metric="mAP@5", cutoffs=())


def test_table_values_average_only_complete_groups():
    def ok(name, **m):
        return {"name": name, "status": "ok", "metrics": m}

    entries = [ok("sugarcrepe_swap_att", accuracy=40.0), ok("sugarcrepe_swap_obj", accuracy=70.0),
               ok("sugarcrepe_add_att", accuracy=90.0), ok("msvd", **{"R@1": 12.5}),
               {"name": "sugarcrepe_add_obj", "status": "error", "metrics": {}}]
    vals = table_values(entries, PAPER_COLUMNS)
    assert vals["Sugar-Crepe Swap"] == pytest.approx(55.0)
    assert vals["Sugar-Crepe Add"] is None  # add_obj failed: no partial mean
    assert vals["MSVD R@1"] == 12.5 and vals["CIRCO mAP@5"] is None
    assert set(table_values([], EXTRA_COLUMNS)) == {"COCO 5K T2I", "COCO 5K I2T", "VIST R@1"}


# ------------------------------------------------------------------------------------------ compat="official"
def test_official_compat_run_is_labelled_and_uses_the_official_batches(tiny_checkpoint, zs_root, tmp_path,
                                                                        first_run):
    """--compat official: official batch sizes and order (MSVD videos one at a time: unpadded, hence causal),
    the Urban1K Python-set prompt, results labelled; the default run's numbers stay labelled default."""
    from umarvel import UMarvel
    from umarvel.eval.zeroshot.runner import NO_SUFFIX_STYLE, ZeroShotOptions, item_record, make_loader, run_zeroshot

    _, default_res = first_run
    assert default_res["compat"] == "default"
    out = tmp_path / "official"
    rc = zeroshot_main(["--log-level", "WARNING", "--model", str(tiny_checkpoint), "--data-root", str(zs_root),
                        "--output-dir", str(out), "--tasks", "msvd,urban1k,ccneg", "--compat", "official"])
    assert rc == 0
    res = json.loads((out / RESULTS_JSON).read_text())
    assert res["compat"] == "official" and res["settings"]["compat"] == "official"
    assert "compat `official`" in (out / RESULTS_MD).read_text()
    assert json.loads((out / "metrics" / "msvd.json").read_text())["compat"] == "official"
    official = UMarvel.from_pretrained(tiny_checkpoint, device="cpu", dtype="float32", compat="official")
    # MSVD videos: batch 1 -> causal; the cached vectors are the official model's, not the default ones
    ms = read_set("msvd", zs_root, "official")
    loaders = [make_loader(item_record(it, "official"), official.budget, MSVD_VIDEO, "v") for it in ms.candidates]
    want = _fp16(official.encode_prepared(loaders, batch_size=1, style=NO_SUFFIX_STYLE))
    np.testing.assert_allclose(_cached(out, "msvd_candidates"), want, atol=1e-3, rtol=0)
    (default_entry,) = (first_run[0] / "cache").glob("zeroshot_msvd_candidates-*")
    default_vecs = np.load(default_entry / "vectors.npy").astype(np.float32)
    assert np.abs(default_vecs - _cached(out, "msvd_candidates")).max() > 1e-2  # causal vs bidirectional
    # Urban1K images: the official Python-set prompt; the official batches of 4 in file order
    ub = read_set("urban1k", zs_root, "official")
    assert item_record(ub.images[0], "official")["text"].startswith("{'<instruction_start>")
    loaders = [make_loader(item_record(it, "official"), official.budget, None, "u") for it in ub.images]
    want = _fp16(official.encode_prepared(loaders, batch_size=4, style=NO_SUFFIX_STYLE))
    np.testing.assert_allclose(_cached(out, "urban1k_images"), want, atol=1e-3, rtol=0)
    # the model and the options must agree on the mode
    with pytest.raises(ConfigError, match="compat"):
        run_zeroshot(official, zs_root, tmp_path / "bad", tasks="msvd", options=ZeroShotOptions())
