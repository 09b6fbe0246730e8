"""Dialog, story and video readers: VisDial v1.0 val, VIST (val SIS), MSVD test, MSR-VTT 1K-A.

Layouts in docs/zeroshot_data.md.
"""
from __future__ import annotations

import csv
import logging
from collections import OrderedDict
from pathlib import Path

from umarvel.errors import DataError
from umarvel.eval.zeroshot import instructions as ins
from umarvel.eval.zeroshot._io import expect, load_plain_pickle, official_order, require_dir, require_file
from umarvel.eval.zeroshot.types import RetrievalSet, ZSItem
from umarvel.utils.io import open_text, read_json

logger = logging.getLogger(__name__)

VIST_IMAGE_EXTS = (".jpg", ".png", ".gif", ".jpeg", ".JPG", ".PNG")
STORY_LEN = 5


def visdial_dialog_text(rounds: list[tuple[str, str]]) -> str:
    """``"Q: " + q + "?"`` and ``"A: " + a + "."`` per round, all joined with one space, the strings as stored
    (as ``dataset/datasets_visdial.py`` builds them: a stored ``?`` / ``.`` is doubled, nothing is stripped)."""
    parts = []
    for q, a in rounds:
        parts += [f"Q: {q}?", f"A: {a}."]
    return " ".join(parts)


def read_visdial(root: str | Path) -> RetrievalSet:
    """VisDial v1.0 val (2,064 dialogs): all rounds of a dialog -> its image, with "Find me an everyday image
    that matches the given dialog." (one space; the dialog text raw). The COCO-style caption of the dialog is
    not used.

    File ``visdial/visdial_1.0_val.json``: ``{"data": {"questions": [str], "answers": [str], "dialogs":
    [{"image_id", "caption", "dialog": [{"question": qi, "answer": ai, ...}]}]}}``; images
    ``visdial/VisualDialog_val2018/VisualDialog_val2018_{image_id:012d}.jpg``.
    """
    name = "visdial"
    base = Path(root) / "visdial"
    ann_path = require_file(name, base / "visdial_1.0_val.json")
    img_dir = require_dir(name, base / "VisualDialog_val2018")
    raw = read_json(ann_path)
    try:
        data = raw["data"]
        questions, answers, dialogs = data["questions"], data["answers"], data["dialogs"]
    except (KeyError, TypeError):
        raise DataError(f"{ann_path}: expected data.questions / data.answers / data.dialogs") from None
    cand_index: dict[int, int] = {}
    candidates, queries, positives = [], [], []
    for k, d in enumerate(dialogs):
        try:
            iid = int(d["image_id"])
            rounds = [(questions[r["question"]], answers[r["answer"]]) for r in d["dialog"]]
        except (KeyError, TypeError, IndexError, ValueError) as exc:
            raise DataError(f"{ann_path}: dialogs[{k}]: malformed ({type(exc).__name__}: {exc})") from None
        if iid not in cand_index:
            cand_index[iid] = len(candidates)
            path = img_dir / f"VisualDialog_val2018_{iid:012d}.jpg"
            candidates.append(ZSItem(id=str(iid), image=str(path)))
        queries.append(ZSItem(id=str(iid), text=visdial_dialog_text(rounds), instruction=ins.DIALOG_TO_IMAGE))
        positives.append((cand_index[iid],))
    logger.info("%s: %d dialogs, %d images", name, len(queries), len(candidates))
    return RetrievalSet(name=name, queries=tuple(queries), candidates=tuple(candidates), positives=tuple(positives))


def _vist_stories(ann_path: Path) -> "OrderedDict[str, list[dict]]":
    """story_id -> its 5 annotations sorted by ``worker_arranged_photo_order`` (file order of stories)."""
    raw = read_json(ann_path)
    expect(isinstance(raw, dict) and isinstance(raw.get("annotations"), list), ann_path,
           "expected a VIST SIS object with an 'annotations' list")
    stories: OrderedDict[str, list[dict]] = OrderedDict()
    for k, entry in enumerate(raw["annotations"]):
        rec = entry[0] if isinstance(entry, list) and entry else entry
        if not isinstance(rec, dict) or not {"story_id", "photo_flickr_id", "text"} <= rec.keys():
            raise DataError(f"{ann_path}: annotations[{k}]: needs story_id, photo_flickr_id, text")
        stories.setdefault(str(rec["story_id"]), []).append(rec)
    for sid, recs in stories.items():
        recs.sort(key=lambda r: int(r.get("worker_arranged_photo_order", 0)))
        if len(recs) != STORY_LEN:
            raise DataError(f"{ann_path}: story {sid} has {len(recs)} sentences, expected {STORY_LEN}")
    return stories


def read_vist(root: str | Path, drop_fourth: bool = False) -> RetrievalSet:
    """VIST val SIS: instruction, then (caption, image) x 4, then the 5th caption -> the 5th image.

    The instruction leads the story as plain text (not marker-wrapped, as in the spec); every caption is raw.
    The official loader's double slicing drops the 4th caption/image; ``drop_fourth=True`` reproduces that
    (``compat="official"``). Candidates are all images of the kept stories, sorted by photo id as the official
    loader lists them; the 4 context images of a story are excluded from its ranking. Stories with an image
    missing from ``vist/images/val/`` are dropped (logged).
    """
    name = "vist"
    base = Path(root) / "vist"
    ann_path = require_file(name, base / "sis" / "val.story-in-sequence.json")
    img_dir = require_dir(name, base / "images" / "val")
    on_disk = {}
    for p in img_dir.iterdir():
        if p.suffix in VIST_IMAGE_EXTS:
            on_disk.setdefault(p.stem, p)
    stories = _vist_stories(ann_path)
    cand_index: dict[str, int] = {}
    candidates, queries, positives, exclude = [], [], [], []
    dropped = 0
    for sid, recs in stories.items():
        photos = [str(r["photo_flickr_id"]) for r in recs]
        if any(p not in on_disk for p in photos):
            dropped += 1
            continue
        idx = []
        for p in photos:
            if p not in cand_index:
                cand_index[p] = len(candidates)
                candidates.append(ZSItem(id=p, image=str(on_disk[p])))
            idx.append(cand_index[p])
        segments: list[tuple[str, str]] = [("text", ins.VIST)]
        for j in range(STORY_LEN - 1):
            if drop_fourth and j == STORY_LEN - 2:
                continue
            segments += [("text", str(recs[j]["text"])), ("image", str(on_disk[photos[j]]))]
        segments.append(("text", str(recs[-1]["text"])))
        queries.append(ZSItem(id=sid, text=str(recs[-1]["text"]), segments=tuple(segments)))
        positives.append((idx[-1],))
        exclude.append(tuple(sorted({i for i in idx[:-1] if i != idx[-1]})))
    if dropped:
        logger.warning("%s: dropped %d of %d stories with images missing under %s", name, dropped, len(stories), img_dir)
    ordered, new = official_order(candidates, lambda it: it.id)  # sorted(set(photo ids)) as the official loader
    positives = [tuple(new[i] for i in p) for p in positives]
    exclude = [tuple(sorted(new[i] for i in e)) for e in exclude]
    logger.info("%s: %d stories, %d candidate images", name, len(queries), len(ordered))
    return RetrievalSet(name=name, queries=tuple(queries), candidates=ordered, positives=tuple(positives),
                        exclude=tuple(exclude))


def _video_retrieval(name: str, pairs: list[tuple[str, str]], video_path, spec: str) -> RetrievalSet:
    """Captions -> videos; ``pairs`` = (video_id, caption) in order; every caption is a query."""
    cand_index: dict[str, int] = {}
    candidates, queries, positives = [], [], []
    for t, (vid, cap) in enumerate(pairs):
        if vid not in cand_index:
            cand_index[vid] = len(candidates)
            candidates.append(ZSItem(id=vid, video=str(video_path(vid))))
        queries.append(ZSItem(id=str(t), text=cap, instruction=ins.CAPTION_TO_VIDEO, instruction_sep=""))
        positives.append((cand_index[vid],))
    logger.info("%s: %d captions, %d videos", name, len(queries), len(candidates))
    return RetrievalSet(name=name, video_spec=spec, queries=tuple(queries), candidates=tuple(candidates),
                        positives=tuple(positives))


def read_msvd(root: str | Path) -> RetrievalSet:
    """MSVD test (670 videos, all their captions): ``MSVD/test_list.txt`` (one video id per line),
    ``MSVD/raw-captions.pkl`` (dict video id -> list of token lists, joined with spaces),
    ``MSVD/YouTubeClips/{vid}.avi``. 12 frames per video."""
    name = "msvd"
    base = Path(root) / "MSVD"
    list_path = require_file(name, base / "test_list.txt")
    cap_path = require_file(name, base / "raw-captions.pkl")
    clip_dir = require_dir(name, base / "YouTubeClips")
    with open_text(list_path) as fh:
        vids = [v.strip() for v in fh.read().splitlines() if v.strip()]
    caps = load_plain_pickle(cap_path)
    expect(isinstance(caps, dict), cap_path, "expected a dict video id -> captions")
    pairs = []
    for vid in vids:
        if vid not in caps:
            raise DataError(f"{cap_path}: no captions for test video {vid}")
        for c in caps[vid]:
            pairs.append((vid, " ".join(str(w) for w in c) if isinstance(c, (list, tuple)) else str(c)))
    return _video_retrieval(name, pairs, lambda v: clip_dir / f"{v}.avi", "msvd")


def read_msrvtt(root: str | Path) -> RetrievalSet:
    """MSR-VTT 1K-A: ``msrvtt/annotations/MSRVTT_JSFUSION_test.csv`` (columns ``video_id``, ``sentence``),
    ``msrvtt/videos/{video_id}.mp4``. qwen_vl_utils default sampling (2 fps, 4..768 frames)."""
    name = "msrvtt"
    base = Path(root) / "msrvtt"
    csv_path = require_file(name, base / "annotations" / "MSRVTT_JSFUSION_test.csv")
    vid_dir = require_dir(name, base / "videos")
    pairs = []
    with open_text(csv_path, newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"video_id", "sentence"} <= set(reader.fieldnames):
            raise DataError(f"{csv_path}:1: header needs 'video_id' and 'sentence', got {reader.fieldnames}")
        for row in reader:
            if not row["video_id"]:
                raise DataError(f"{csv_path}:{reader.line_num}: empty video_id")
            pairs.append((row["video_id"].strip(), row["sentence"]))
    return _video_retrieval(name, pairs, lambda v: vid_dir / f"{v}.mp4", "msrvtt")
