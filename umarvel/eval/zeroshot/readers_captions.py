"""Image-caption readers: Flickr30K 1K, MSCOCO 5K, ShareGPT4V 1K, Urban1K (both directions), CC-Neg and
Sugar-Crepe (positive vs negative caption). Layouts in docs/zeroshot_data.md."""
from __future__ import annotations

import logging
import re
from pathlib import Path

from umarvel.errors import DataError
from umarvel.eval.zeroshot import instructions as ins
from umarvel.eval.zeroshot._io import expect, load_torch_plain, read_text_first_line, require_dir, require_file
from umarvel.eval.zeroshot.types import BidirectionalSet, MissingSetData, PairSet, ZSItem
from umarvel.utils.io import read_json

logger = logging.getLogger(__name__)

CAPTIONS_PER_IMAGE = 5
SUGARCREPE_SUBSETS = ("add_att", "add_obj", "replace_att", "replace_obj", "replace_rel", "swap_att", "swap_obj")
CCNEG_EVAL_SIZE = 40_000
#: Prefix hard-coded in the image paths of ``ccneg_preprocessed.pt`` (rewritten to ``<root>/ccneg/``).
CCNEG_STORED_PREFIX = "/workspace/datasets/cc3m/"


def _bidirectional(name: str, captions: list[str], image_paths: list[Path], per_image: list[int],
                   text_instr: str | None = None, text_sep: str = " ", image_instr: str | None = None,
                   suffix: bool = False, format_text: bool = False, image_set_literal: bool = False
                   ) -> BidirectionalSet:
    """Build a :class:`BidirectionalSet`; ``per_image[t]`` is the image index of caption t (fields: ZSItem)."""
    images = tuple(ZSItem(id=p.stem, image=str(p), instruction=image_instr, set_literal=image_set_literal)
                   for p in image_paths)
    texts = tuple(ZSItem(id=str(t), text=c, instruction=text_instr, instruction_sep=text_sep, format_text=format_text)
                  for t, c in enumerate(captions))
    logger.info("%s: %d texts, %d images", name, len(texts), len(images))
    return BidirectionalSet(name=name, suffix=suffix, texts=texts, images=images, text_to_image=tuple(per_image))


def _lamra_caption_grid(name: str, text_path: Path, img_dir: Path, ext: str) -> tuple[list[str], list[Path], list[int]]:
    """LamRA_Eval layout: a JSON list of strings, caption t belongs to image ``{t // 5}.{ext}``."""
    caps = read_json(text_path)
    expect(isinstance(caps, list) and all(isinstance(c, str) for c in caps), text_path,
           "expected a JSON list of caption strings")
    expect(len(caps) > 0 and len(caps) % CAPTIONS_PER_IMAGE == 0, text_path,
           f"expected a multiple of {CAPTIONS_PER_IMAGE} captions, got {len(caps)}")
    n_img = len(caps) // CAPTIONS_PER_IMAGE
    return caps, [img_dir / f"{i}.{ext}" for i in range(n_img)], [t // CAPTIONS_PER_IMAGE for t in range(len(caps))]


def _karpathy_test(name: str, ann_path: Path, img_dir: Path) -> tuple[list[str], list[Path], list[int]]:
    """Karpathy split JSON (``dataset_flickr30k.json`` / ``dataset_coco.json``): the ``test`` images, first 5
    ``raw`` sentences each; image path ``img_dir / [filepath /] filename``."""
    data = read_json(ann_path)
    expect(isinstance(data, dict) and isinstance(data.get("images"), list), ann_path,
           "expected a Karpathy split object with an 'images' list")
    caps, paths, owner = [], [], []
    for k, im in enumerate(data["images"]):
        if not isinstance(im, dict) or im.get("split") != "test":
            continue
        sents = im.get("sentences") or []
        if len(sents) < CAPTIONS_PER_IMAGE or "filename" not in im:
            raise DataError(f"{ann_path}: images[{k}]: a test image needs a filename and {CAPTIONS_PER_IMAGE} sentences")
        sub = img_dir / im["filepath"] if im.get("filepath") else img_dir
        paths.append(sub / im["filename"])
        for s in sents[:CAPTIONS_PER_IMAGE]:
            caps.append(str(s["raw"] if isinstance(s, dict) else s))
            owner.append(len(paths) - 1)
    expect(len(paths) > 0, ann_path, "no images with split 'test'")
    return caps, paths, owner


def _caption_grid(name: str, base: Path, lamra_text: str, lamra_imgs: str, ext: str, karpathy: str,
                  karpathy_imgs: str) -> tuple[list[str], list[Path], list[int]]:
    """LamRA_Eval layout if its caption file exists, else the Karpathy split; neither -> :class:`MissingSetData`."""
    if (base / lamra_text).is_file():
        return _lamra_caption_grid(name, base / lamra_text, require_dir(name, base / lamra_imgs), ext)
    if (base / karpathy).is_file():
        return _karpathy_test(name, base / karpathy, require_dir(name, base / karpathy_imgs))
    raise MissingSetData(name, base / lamra_text)


def read_flickr30k(root: str | Path) -> BidirectionalSet:
    """Flickr30K 1K test: 1,000 images x 5 captions. As ``dataset/datasets_flickr.py`` builds them: texts
    ``"<instruction_start>Find me an everyday image that matches the given caption.<instruction_end>"`` +
    ``format_string(caption)`` (no space); images carry no text; compression suffix ON (prompt1, with the
    image-only suffix "image" for images)."""
    name = "flickr30k"
    caps, paths, owner = _caption_grid(name, Path(root) / "flickr", "flickr_text.json", "images", "png",
                                       "dataset_flickr30k.json", "flickr30k-images")
    return _bidirectional(name, caps, paths, owner, text_instr=ins.CAPTION_TO_IMAGE, text_sep="", suffix=True,
                          format_text=True)


def read_mscoco5k(root: str | Path) -> BidirectionalSet:
    """MSCOCO 5K test: 5,000 images x 5 captions, no instructions, no suffix, captions raw."""
    name = "mscoco5k"
    caps, paths, owner = _caption_grid(name, Path(root) / "coco", "coco_text.json", "coco_images", "png",
                                       "dataset_coco.json", "images")
    return _bidirectional(name, caps, paths, owner)


def read_sharegpt4v(root: str | Path) -> BidirectionalSet:
    """ShareGPT4V 1K: ``datas_for_validation.json`` = list of ``{"image_name", "caption"}`` (1:1), images in
    ``val_data/``. Texts: ``"<instruction_start>Find me an everyday image that matches the given
    caption.<instruction_end>"`` + the raw caption, no space (``dataset/datasets_sharegpt4v.py``)."""
    name = "sharegpt4v"
    base = Path(root) / "sharegpt4v"
    ann_path = require_file(name, base / "datas_for_validation.json")
    img_dir = require_dir(name, base / "val_data")
    ann = read_json(ann_path)
    expect(isinstance(ann, list), ann_path, "expected a JSON list of {image_name, caption}")
    caps, paths = [], []
    for k, rec in enumerate(ann):
        if not isinstance(rec, dict) or "image_name" not in rec or "caption" not in rec:
            raise DataError(f"{ann_path}: entry {k}: needs 'image_name' and 'caption'")
        caps.append(str(rec["caption"]))
        paths.append(img_dir / str(rec["image_name"]))
    return _bidirectional(name, caps, paths, list(range(len(caps))), text_instr=ins.CAPTION_TO_IMAGE, text_sep="")


def _numeric_stem(p: Path) -> tuple[int, str]:
    m = re.fullmatch(r"\d+", p.stem)
    return (int(p.stem), p.stem) if m else (1 << 62, p.stem)


def read_urban1k(root: str | Path) -> BidirectionalSet:
    """Urban1K: ``Urban1k/image/{i}.jpg`` with caption ``Urban1k/caption/{i}.txt`` (first line, stripped),
    sorted by number. Images carry ``"<instruction_start>Find an image caption describing the following everyday
    image.<instruction_end>"``; the official script passes it as a Python set, so its prompt reads ``{'...'}``:
    reproduced with ``compat="official"`` only (``ZSItem.set_literal``)."""
    name = "urban1k"
    base = Path(root) / "Urban1k"
    img_dir = require_dir(name, base / "image")
    cap_dir = require_dir(name, base / "caption")
    paths = sorted((p for p in img_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")), key=_numeric_stem)
    expect(len(paths) > 0, img_dir, "no images")
    caps = []
    for p in paths:
        cap_path = cap_dir / f"{p.stem}.txt"
        if not cap_path.is_file():
            raise DataError(f"{cap_path}: caption file of image {p.name} not found")
        caps.append(read_text_first_line(cap_path).strip())
    return _bidirectional(name, caps, paths, list(range(len(caps))), image_instr=ins.IMAGE_TO_CAPTION_EVERYDAY,
                          image_set_literal=True)


def ccneg_image_path(base: Path, stored: str) -> Path:
    """Map a stored CC-Neg image path: strip ``/workspace/datasets/cc3m/`` and resolve under ``<root>/ccneg/``
    (what the CoN-CLIP loader does); other relative paths are taken under ``<root>/ccneg/``, absolute ones as is."""
    if stored.startswith(CCNEG_STORED_PREFIX):
        return base / stored[len(CCNEG_STORED_PREFIX):]
    p = Path(stored)
    return p if p.is_absolute() else base / p


def read_ccneg(root: str | Path, n_eval: int = CCNEG_EVAL_SIZE) -> PairSet:
    """CC-Neg: the last ``n_eval`` (40,000) samples of ``ccneg/ccneg_preprocessed.pt``.

    The torch file holds ``{"image_paths": [str], "annotations": [{"json": {"caption"}, "sop_data":
    {"negative-prompt"}}]}`` (CoN-CLIP format); commas are removed from the negative prompt. No instructions;
    texts raw.
    """
    name = "ccneg"
    base = Path(root) / "ccneg"
    pt_path = require_file(name, base / "ccneg_preprocessed.pt")
    data = load_torch_plain(pt_path)
    expect(isinstance(data, dict) and "image_paths" in data and "annotations" in data, pt_path,
           "expected a dict with 'image_paths' and 'annotations'")
    paths, anns = list(data["image_paths"]), list(data["annotations"])
    expect(len(paths) == len(anns), pt_path, f"{len(paths)} image paths but {len(anns)} annotations")
    start = max(0, len(paths) - n_eval)
    images, pos, neg = [], [], []
    for i in range(start, len(paths)):
        try:
            cap = str(anns[i]["json"]["caption"])
            negp = str(anns[i]["sop_data"]["negative-prompt"]).replace(",", "")
        except (KeyError, TypeError):
            raise DataError(f"{pt_path}: annotations[{i}] lacks json.caption or sop_data.negative-prompt") from None
        images.append(ZSItem(id=str(i), image=str(ccneg_image_path(base, str(paths[i])))))
        pos.append(ZSItem(id=f"{i}_pos", text=cap))
        neg.append(ZSItem(id=f"{i}_neg", text=negp))
    logger.info("%s: %d samples (of %d)", name, len(images), len(paths))
    return PairSet(name=name, images=tuple(images), positives=tuple(pos), negatives=tuple(neg))


def read_sugarcrepe(root: str | Path, subset: str) -> PairSet:
    """One Sugar-Crepe subset: ``sugar-crepe/data/{subset}.json`` = ``{id: {"filename", "caption",
    "negative_caption"}}``, images in ``sugar-crepe/images/val2017/``. Images carry "Find an image caption
    describing the following image." (marker-wrapped, nothing after it) for add_* / replace_att / replace_obj
    only; texts raw."""
    if subset not in SUGARCREPE_SUBSETS:
        raise DataError(f"unknown Sugar-Crepe subset {subset!r} (one of {', '.join(SUGARCREPE_SUBSETS)})")
    name = f"sugarcrepe_{subset}"
    base = Path(root) / "sugar-crepe"
    ann_path = require_file(name, base / "data" / f"{subset}.json")
    img_dir = require_dir(name, base / "images" / "val2017")
    ann = read_json(ann_path)
    expect(isinstance(ann, dict), ann_path, "expected a JSON object id -> sample")
    instr = ins.IMAGE_TO_CAPTION if subset in ins.SUGARCREPE_WITH_INSTRUCTION else None
    images, pos, neg = [], [], []
    for sid, rec in ann.items():
        if not isinstance(rec, dict) or not {"filename", "caption", "negative_caption"} <= rec.keys():
            raise DataError(f"{ann_path}: sample {sid}: needs filename, caption, negative_caption")
        images.append(ZSItem(id=str(sid), image=str(img_dir / rec["filename"]), instruction=instr))
        pos.append(ZSItem(id=f"{sid}_pos", text=str(rec["caption"])))
        neg.append(ZSItem(id=f"{sid}_neg", text=str(rec["negative_caption"])))
    logger.info("%s: %d samples", name, len(images))
    return PairSet(name=name, images=tuple(images), positives=tuple(pos), negatives=tuple(neg))
