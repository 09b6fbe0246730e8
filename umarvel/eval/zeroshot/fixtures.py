"""Tiny zero-shot data root in each set's real file format (tests, end-to-end command tests, demos).

``write_zeroshot_fixture(root)`` writes every set of ``umarvel.eval.zeroshot.readers.SET_NAMES`` (plus CIRCO
test) under ``root`` in the layout of docs/zeroshot_data.md: a few small images, a few-frame mpeg4 video per
MSVD / MSR-VTT clip (encoded with PyAV), and annotation files. :data:`FIXTURE_SIZES` gives what the readers
must return for it. Deterministic: the same call writes the same files.
"""
from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image

#: set -> (number of queries / texts / samples, number of candidates / images) the readers must return.
FIXTURE_SIZES = {
    "circo": (2, 6), "circo_test": (1, 6),
    "genecis_change_attribute": (2, 6), "genecis_change_object": (2, 4),
    "genecis_focus_attribute": (2, 6), "genecis_focus_object": (2, 4),
    "flickr30k": (10, 2), "mscoco5k": (10, 2), "sharegpt4v": (3, 3), "urban1k": (3, 3),
    "visdial": (2, 2), "vist": (2, 9), "ccneg": (4, 4),
    **{f"sugarcrepe_{s}": (2, 2) for s in ("add_att", "add_obj", "replace_att", "replace_obj", "replace_rel",
                                            "swap_att", "swap_obj")},
    "msvd": (3, 2), "msrvtt": (2, 2),
}
VIDEO_FRAMES = 16
VIDEO_FPS = 8
VIDEO_SIZE = (64, 48)  # (width, height), even for yuv420p


def _image(path: Path, seed: int, size: tuple[int, int] = (40, 30)) -> None:
    """Write a small deterministic RGB image (format from the suffix)."""
    rng = np.random.default_rng(seed)
    arr = np.empty((size[1], size[0], 3), dtype=np.uint8)
    arr[:] = rng.integers(0, 256, 3, dtype=np.uint8)
    arr[: size[1] // 2, : size[0] // 2] = rng.integers(0, 256, 3, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1), encoding="utf-8")


def write_video(path: Path, seed: int, n_frames: int = VIDEO_FRAMES, fps: int = VIDEO_FPS,
                size: tuple[int, int] = VIDEO_SIZE, codec: str = "mpeg4") -> None:
    """Encode a few-frame video (moving bright bar on a seeded colour) with PyAV; container from the suffix."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 200, 3, dtype=np.uint8)
    w, h = size
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for t in range(n_frames):
            arr = np.empty((h, w, 3), dtype=np.uint8)
            arr[:] = base
            x = (t * 4) % (w - 8)
            arr[:, x:x + 8] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _circo(root: Path) -> None:
    base = root / "circo"
    ids = [11, 12, 13, 14, 15, 16]
    _json(base / "annotations" / "image_info_unlabeled2017.json",
          {"info": {}, "images": [{"id": i, "file_name": f"{i:012d}.jpg", "width": 40, "height": 30} for i in ids]})
    for i in ids:
        _image(base / "images" / "unlabeled2017" / f"{i:012d}.jpg", i)
    _json(base / "annotations" / "val.json", [
        {"reference_img_id": 11, "target_img_id": 12, "relative_caption": "has a dog", "shared_concept": "a pet",
         "gt_img_ids": [12, 13, 14], "id": 0},
        {"reference_img_id": 15, "target_img_id": 16, "relative_caption": "is at night", "shared_concept": "a street",
         "gt_img_ids": [16], "id": 1},
    ])
    _json(base / "annotations" / "test.json", [
        {"reference_img_id": 13, "relative_caption": "is red", "shared_concept": "a car", "id": 7}])


def _genecis(root: Path) -> None:
    base = root / "genecis"
    for subset in ("change_object", "focus_object"):
        samples = [
            {"reference": {"val_image_id": 1}, "target": {"val_image_id": 2},
             "gallery": [{"val_image_id": 3}, {"val_image_id": 4}], "condition": "dog"},
            {"reference": {"val_image_id": 4}, "target": {"val_image_id": 5},
             "gallery": [{"val_image_id": 2}, {"val_image_id": 3}], "condition": "bus"},
        ]
        _json(base / "annotations" / f"{subset}.json", samples)
        for s in samples:
            for e in [s["reference"], s["target"], *s["gallery"]]:
                _image(base / "val2017" / f"{e['val_image_id']:012d}.jpg", 100 + e["val_image_id"])
    for subset in ("change_attribute", "focus_attribute"):
        samples = []
        for i in range(2):
            entries = [{"image_id": 2000 + 10 * i + k, "instance_bbox": [0, 0, 20, 15]} for k in range(4)]
            samples.append({"reference": entries[0], "target": entries[1], "gallery": entries[2:],
                            "condition": ["red", "wooden"][i]})
            for k, e in enumerate(entries):
                _image(base / "vg" / subset / f"{e['image_id']}_{i}_{k}.jpg", e["image_id"])
        _json(base / "annotations" / f"{subset}.json", samples)


def _caption_sets(root: Path) -> None:
    caps = [f"a photo number {i // 5} caption {i % 5}" for i in range(10)]
    _json(root / "flickr" / "flickr_text.json", caps)
    for i in range(2):
        _image(root / "flickr" / "images" / f"{i}.png", 300 + i)
    karpathy = {"dataset": "coco", "images": [
        {"filepath": "val2014", "filename": f"COCO_val2014_{i:012d}.jpg", "split": "test",
         "sentences": [{"raw": f"coco image {i} says {j}", "tokens": []} for j in range(6 if i == 0 else 5)]}
        for i in range(2)] + [{"filepath": "train2014", "filename": "COCO_train2014_000000000009.jpg",
                               "split": "train", "sentences": [{"raw": "not test"}]}]}
    _json(root / "coco" / "dataset_coco.json", karpathy)
    for i in range(2):
        _image(root / "coco" / "images" / "val2014" / f"COCO_val2014_{i:012d}.jpg", 400 + i)
    _json(root / "sharegpt4v" / "datas_for_validation.json",
          [{"image_name": f"sa_{i}.jpg", "caption": f"A long detailed caption {i}."} for i in range(3)])
    for i in range(3):
        _image(root / "sharegpt4v" / "val_data" / f"sa_{i}.jpg", 500 + i)
    for i in (1, 2, 10):  # numeric order 1, 2, 10 (not 1, 10, 2)
        _image(root / "Urban1k" / "image" / f"{i}.jpg", 600 + i)
        (root / "Urban1k" / "caption").mkdir(parents=True, exist_ok=True)
        (root / "Urban1k" / "caption" / f"{i}.txt").write_text(f"Urban scene {i}.\nsecond line\n", encoding="utf-8")


def _visdial(root: Path) -> None:
    base = root / "visdial"
    data = {"version": "1.0", "split": "val2018", "data": {
        "questions": ["is it sunny", "how many people", "what color is the car?"],
        "answers": ["yes", "2", "red"],
        "dialogs": [
            {"image_id": 185565, "caption": "a street", "dialog": [
                {"question": 0, "answer": 0, "answer_options": [0, 1, 2], "gt_index": 0},
                {"question": 1, "answer": 1, "answer_options": [0, 1, 2], "gt_index": 1}]},
            {"image_id": 284024, "caption": "a car", "dialog": [
                {"question": 2, "answer": 2, "answer_options": [0, 1, 2], "gt_index": 2}]},
        ]}}
    _json(base / "visdial_1.0_val.json", data)
    for iid in (185565, 284024):
        _image(base / "VisualDialog_val2018" / f"VisualDialog_val2018_{iid:012d}.jpg", iid % 1000)


def _vist(root: Path) -> None:
    base = root / "vist"
    stories = {"s1": ["101", "102", "103", "104", "105"], "s2": ["201", "202", "203", "104", "205"],
               "s3": ["301", "302", "303", "304", "399"]}  # 399 missing on disk -> s3 dropped
    anns = []
    for sid, photos in stories.items():
        for order in (4, 0, 1, 2, 3):  # out of order on purpose
            anns.append([{"story_id": sid, "photo_flickr_id": photos[order], "worker_arranged_photo_order": order,
                          "text": f"{sid} sentence {order}", "original_text": "", "album_id": "a",
                          "storylet_id": f"{sid}{order}"}])
    _json(base / "sis" / "val.story-in-sequence.json", {"images": [], "albums": [], "annotations": anns,
                                                        "type": "story_in_sequence"})
    for sid, photos in stories.items():
        for p in photos:
            if p != "399":
                _image(base / "images" / "val" / (f"{p}.png" if p == "102" else f"{p}.jpg"), int(p))


def _ccneg(root: Path) -> None:
    import torch

    base = root / "ccneg"
    paths, anns = [], []
    for i in range(4):  # read_ccneg(n_eval=3) keeps the last 3
        rel = f"ccneg_images/cc3m_subset_images_extracted_final/{i:09d}.jpg"
        paths.append("/workspace/datasets/cc3m/" + rel)
        anns.append({"json": {"caption": f"a dog on grass {i}"},
                     "sop_data": {"negative-prompt": f"a dog, but not on grass {i}"}})
        _image(base / rel, 700 + i)
    base.mkdir(parents=True, exist_ok=True)
    torch.save({"image_paths": paths, "annotations": anns}, base / "ccneg_preprocessed.pt")


def _sugarcrepe(root: Path) -> None:
    base = root / "sugar-crepe"
    for j, subset in enumerate(("add_att", "add_obj", "replace_att", "replace_obj", "replace_rel", "swap_att",
                                "swap_obj")):
        _json(base / "data" / f"{subset}.json", {
            str(k): {"filename": f"{k:012d}.jpg", "caption": f"{subset} true {k}", "negative_caption": f"{subset} false {k}"}
            for k in (1, 2)})
    for k in (1, 2):
        _image(base / "images" / "val2017" / f"{k:012d}.jpg", 800 + k)


def _videos(root: Path) -> None:
    msvd = root / "MSVD"
    msvd.mkdir(parents=True, exist_ok=True)
    (msvd / "test_list.txt").write_text("vidA_1_5\nvidB_2_9\n", encoding="utf-8")
    caps = {"vidA_1_5": [["a", "man", "runs"], ["someone", "is", "running"]], "vidB_2_9": [["a", "cat", "sleeps"]],
            "vidTrain": [["not", "in", "test"]]}
    with (msvd / "raw-captions.pkl").open("wb") as fh:
        pickle.dump(caps, fh)
    for k, vid in enumerate(("vidA_1_5", "vidB_2_9")):
        write_video(msvd / "YouTubeClips" / f"{vid}.avi", 900 + k)
    ms = root / "msrvtt"
    (ms / "annotations").mkdir(parents=True, exist_ok=True)
    with (ms / "annotations" / "MSRVTT_JSFUSION_test.csv").open("w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["", "key", "vid_key", "video_id", "sentence"])
        w.writerow([0, "ret0", "msr7001", "video7001", "a woman is cooking"])
        w.writerow([1, "ret1", "msr7002", "video7002", "cars race on a track"])
    for k, vid in enumerate(("video7001", "video7002")):
        write_video(ms / "videos" / f"{vid}.mp4", 950 + k)


_WRITERS = {"circo": _circo, "genecis": _genecis, "captions": _caption_sets, "visdial": _visdial, "vist": _vist,
            "ccneg": _ccneg, "sugarcrepe": _sugarcrepe, "videos": _videos}


def write_zeroshot_fixture(root: str | Path, groups: Iterable[str] | None = None) -> Path:
    """Write the tiny data root (all groups by default: circo, genecis, captions, visdial, vist, ccneg,
    sugarcrepe, videos) and return it."""
    root = Path(root)
    for g in (groups if groups is not None else _WRITERS):
        _WRITERS[g](root)
    return root
