"""Composed image retrieval readers: CIRCO and the four GeneCIS subsets (layouts in docs/zeroshot_data.md)."""
from __future__ import annotations

import logging
from pathlib import Path

from umarvel.errors import DataError
from umarvel.eval.zeroshot import instructions as ins
from umarvel.eval.zeroshot._io import expect, official_order, require_dir, require_file
from umarvel.eval.zeroshot.types import GallerySet, MissingSetData, RetrievalSet, ZSItem
from umarvel.utils.io import read_json

logger = logging.getLogger(__name__)

GENECIS_SUBSETS = ("change_attribute", "change_object", "focus_attribute", "focus_object")


#: Where CIRCO's COCO unlabeled2017 image info and images may live under ``<root>/circo``: our layout, then the
#: one CIRCO's own README describes (``COCO2017_unlabeled/annotations/...``, ``COCO2017_unlabeled/unlabeled2017``).
CIRCO_GALLERY_LAYOUTS: tuple[tuple[str, str], ...] = (
    ("annotations/image_info_unlabeled2017.json", "images/unlabeled2017"),
    ("COCO2017_unlabeled/annotations/image_info_unlabeled2017.json", "COCO2017_unlabeled/unlabeled2017"),
)


def _circo_gallery_paths(name: str, base: Path) -> tuple[Path, Path]:
    """``(image info file, image folder)`` of the first layout of :data:`CIRCO_GALLERY_LAYOUTS` whose info file
    exists; neither -> :class:`MissingSetData` naming our layout's info file."""
    for info, images in CIRCO_GALLERY_LAYOUTS:
        if (base / info).is_file():
            return base / info, require_dir(name, base / images)
    raise MissingSetData(name, base / CIRCO_GALLERY_LAYOUTS[0][0])


def _circo_gallery(name: str, base: Path) -> tuple[list[ZSItem], dict[int, int]]:
    """Gallery items from the COCO-style ``image_info_unlabeled2017.json``; returns (items, image id -> index)."""
    info_path, img_dir = _circo_gallery_paths(name, base)
    info = read_json(info_path)
    expect(isinstance(info, dict) and isinstance(info.get("images"), list), info_path,
           "expected a COCO image-info object with an 'images' list")
    items, index = [], {}
    for k, rec in enumerate(info["images"]):
        try:
            iid, fname = int(rec["id"]), str(rec["file_name"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{info_path}: images[{k}] lacks an integer 'id' or a 'file_name'") from None
        if iid in index:
            raise DataError(f"{info_path}: images[{k}]: duplicate image id {iid}")
        index[iid] = len(items)
        items.append(ZSItem(id=str(iid), image=str(img_dir / fname)))
    return items, index


def read_circo(root: str | Path, split: str = "val", exclude_reference: bool = False) -> RetrievalSet:
    """CIRCO ``val`` (mAP@k against ``gt_img_ids``) or ``test`` (no ground truth; submission only).

    Query = reference image + ``"<instruction_start>{instruction}<instruction_end> {relative_caption}"`` with
    the caption raw (as ``dataset/datasets_circo.py`` builds it); gallery = all COCO unlabeled2017 images
    (123,403) in image-info order, image only. ``shared_concept`` is unused and the reference stays in the
    gallery (official protocol) unless ``exclude_reference``. The annotations are ``circo/annotations/{split}.json``;
    the image info and images are found in either layout of :data:`CIRCO_GALLERY_LAYOUTS`.

    Raises:
        MissingSetData: a needed file or folder is absent. DataError: malformed annotations.
    """
    if split not in ("val", "test"):
        raise DataError(f"CIRCO split must be 'val' or 'test', got {split!r}")
    name = "circo" if split == "val" else "circo_test"
    base = Path(root) / "circo"
    ann_path = require_file(name, base / "annotations" / f"{split}.json")
    candidates, index = _circo_gallery(name, base)
    ann = read_json(ann_path)
    expect(isinstance(ann, list), ann_path, "expected a JSON list of queries")

    def cand(iid, k: int, field: str) -> int:
        try:
            return index[int(iid)]
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{ann_path}: query {k}: {field} {iid!r} is not in image_info_unlabeled2017.json") from None

    queries, positives, targets, exclude = [], [], [], []
    for k, q in enumerate(ann):
        if not isinstance(q, dict) or "reference_img_id" not in q or "relative_caption" not in q:
            raise DataError(f"{ann_path}: query {k}: needs 'reference_img_id' and 'relative_caption'")
        ref = cand(q["reference_img_id"], k, "reference_img_id")
        queries.append(ZSItem(id=str(q.get("id", k)), text=str(q["relative_caption"]),
                              image=candidates[ref].image, instruction=ins.CIRCO))
        exclude.append((ref,) if exclude_reference else ())
        if split == "val":
            if "target_img_id" not in q or "gt_img_ids" not in q:
                raise DataError(f"{ann_path}: query {k}: val queries need 'target_img_id' and 'gt_img_ids'")
            tgt = cand(q["target_img_id"], k, "target_img_id")
            gts = [cand(g, k, "gt_img_ids") for g in q["gt_img_ids"]]
            gts = list(dict.fromkeys([tgt] + gts))  # target first, duplicates dropped
            positives.append(tuple(gts))
            targets.append(tgt)
        else:
            positives.append(())
    logger.info("CIRCO %s: %d queries, %d gallery images", split, len(queries), len(candidates))
    return RetrievalSet(name=name, queries=tuple(queries), candidates=tuple(candidates), positives=tuple(positives),
                        exclude=tuple(exclude) if exclude_reference else (), metric="map", targets=tuple(targets))


def genecis_image_path(base: Path, subset: str, entry: dict, sample_index: int, position: int) -> Path:
    """Image of one GeneCIS entry (position 0 = reference, 1 = target, 2+ = gallery).

    Object subsets: COCO ``genecis/val2017/{val_image_id:012d}.jpg``. Attribute subsets: the pre-cropped Visual
    Genome boxes ``genecis/vg/{subset}/{image_id}_{sample_index}_{position}.jpg``.
    """
    if subset.endswith("_object"):
        iid = entry.get("val_image_id", entry.get("image_id"))
        return base / "val2017" / f"{int(iid):012d}.jpg"
    return base / "vg" / subset / f"{entry['image_id']}_{sample_index}_{position}.jpg"


def read_genecis(root: str | Path, subset: str) -> GallerySet:
    """One GeneCIS subset: reference image + ``"{instruction} {condition}"`` against ``[target] + gallery``.

    Annotation file ``genecis/annotations/{subset}.json``: a list of ``{"reference": {...}, "target": {...},
    "gallery": [{...}, ...], "condition": str}`` (the public GeneCIS format; entries carry ``val_image_id`` for
    COCO subsets, ``image_id`` (+ ``instance_bbox``) for Visual Genome subsets). As ``dataset/datasets_genecis.py``
    builds them: query text ``"<instruction_start>{instruction}<instruction_end> " + format_string(condition)``,
    candidates image only, listed in the official order (the sorted id strings: ``str(val_image_id)`` for the
    object subsets, the crop file names for the attribute subsets).

    Raises:
        MissingSetData: annotation file or image folder absent. DataError: malformed sample.
    """
    if subset not in GENECIS_SUBSETS:
        raise DataError(f"unknown GeneCIS subset {subset!r} (one of {', '.join(GENECIS_SUBSETS)})")
    name = f"genecis_{subset}"
    base = Path(root) / "genecis"
    ann_path = require_file(name, base / "annotations" / f"{subset}.json")
    require_dir(name, base / ("val2017" if subset.endswith("_object") else f"vg/{subset}"))
    ann = read_json(ann_path)
    expect(isinstance(ann, list), ann_path, "expected a JSON list of samples")
    candidates: list[ZSItem] = []
    cand_index: dict[str, int] = {}
    queries, galleries = [], []

    def add(path: Path) -> int:
        key = str(path)
        if key not in cand_index:
            cand_index[key] = len(candidates)
            candidates.append(ZSItem(id=path.stem, image=key))
        return cand_index[key]

    def official_key(item: ZSItem) -> str:  # the official gallery_ids strings, sorted
        return str(int(item.id)) if subset.endswith("_object") else Path(item.image).name

    for i, s in enumerate(ann):
        try:
            ref, tgt, gal, cond = s["reference"], s["target"], s["gallery"], s["condition"]
            ref_path = genecis_image_path(base, subset, ref, i, 0)
            members = [add(genecis_image_path(base, subset, tgt, i, 1))]
            members += [add(genecis_image_path(base, subset, g, i, 2 + j)) for j, g in enumerate(gal)]
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{ann_path}: sample {i}: malformed ({type(exc).__name__}: {exc})") from None
        queries.append(ZSItem(id=str(i), text=str(cond), image=str(ref_path), instruction=ins.GENECIS[subset],
                              format_text=True))
        galleries.append(tuple(members))
    ordered, new_of_old = official_order(candidates, official_key)
    galleries = [tuple(new_of_old[j] for j in g) for g in galleries]
    logger.info("GeneCIS %s: %d queries, %d distinct gallery images", subset, len(queries), len(ordered))
    return GallerySet(name=name, queries=tuple(queries), candidates=ordered, galleries=tuple(galleries))
