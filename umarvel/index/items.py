"""What an index holds: items read from a JSONL file, a folder of images, or a list of dicts.

An *item* is a dict ``{"id": str, "text": str | None, "image": absolute path | None, "meta": dict}``
(``meta`` only when given). ``text`` / ``image`` are what gets encoded (as a candidate); ``id`` and ``meta``
are returned with every hit.

Inputs:

- a JSONL file, one candidate per line: ``{"id", "text", "image", "meta"}`` (``text`` and/or ``image``;
  relative image paths are resolved against the file's folder, or ``image_root``);
- a folder of images, searched recursively (hidden files and folders skipped), ``id`` = the path relative
  to the folder (``/`` separated); an optional ``captions.jsonl`` in the folder adds text:
  one ``{"id": "<relative path>", "text": "..."}`` per line (``"image"`` may stand for ``"id"``);
- a list of dicts with the same keys (Python API).

An index records, with each item that has an image, the image file's content fingerprint
``"file": {"size", "mtime_ns", "sha1"}`` (:func:`image_fingerprint`), so that a picture replaced under the
same name is noticed (``umarvel index add``, a resumed build); a ``"file"`` given in the input is ignored
(it is recomputed from the file).

Every problem is a :class:`~umarvel.errors.DataError` (or ``ImageLoadError``) naming the file:line or item id.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Iterable

from umarvel.errors import DataError, ImageLoadError
from umarvel.utils.io import iter_jsonl

ITEM_KEYS = frozenset({"id", "text", "image", "meta"})
#: The key of an item's image fingerprint (recorded by the index; recomputed, never read from the input).
FILE_KEY = "file"
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
CAPTIONS_FILE = "captions.jsonl"


def _check_item(rec: Mapping[str, Any], where: str) -> dict:
    """Validate one raw item; return the normalised dict (image as given, not resolved)."""
    if not isinstance(rec, Mapping):
        raise DataError(f"{where}: expected an object with 'id' and 'text' and/or 'image', got {type(rec).__name__}")
    unknown = set(rec) - ITEM_KEYS - {FILE_KEY}
    if unknown:
        raise DataError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(ITEM_KEYS)} "
                        "(put extra fields under 'meta')")
    if "id" not in rec or rec["id"] is None or str(rec["id"]) == "":
        raise DataError(f"{where}: missing 'id'")
    if not isinstance(rec["id"], (str, int)) or isinstance(rec["id"], bool):
        raise DataError(f"{where}: 'id' must be a string or an integer, got {type(rec['id']).__name__}")
    item_id = str(rec["id"])
    text, image, meta = rec.get("text"), rec.get("image"), rec.get("meta")
    if text is not None and not isinstance(text, str):
        raise DataError(f"{where}: item {item_id!r}: 'text' must be a string, got {type(text).__name__}")
    if image is not None and not isinstance(image, (str, os.PathLike)):
        raise DataError(f"{where}: item {item_id!r}: 'image' must be a path, got {type(image).__name__}")
    if meta is not None and not isinstance(meta, Mapping):
        raise DataError(f"{where}: item {item_id!r}: 'meta' must be an object, got {type(meta).__name__}")
    if (text is None or not text.strip()) and not image:
        raise DataError(f"{where}: item {item_id!r} has neither text nor image")
    out: dict[str, Any] = {"id": item_id, "text": text if text and text.strip() else None,
                           "image": str(image) if image else None}
    if meta:
        out["meta"] = dict(meta)
    return out


def _resolve_image(item: dict, root: Path, where: str) -> None:
    """Make ``item["image"]`` absolute (relative to ``root``) and check that the file exists (in place)."""
    if item["image"] is None:
        return
    p = Path(item["image"]).expanduser()
    p = p if p.is_absolute() else root / p
    if not p.is_file():
        raise ImageLoadError(f"{where}: item {item['id']!r}: image file not found: {p}")
    item["image"] = str(p.resolve())


def _checked(records: Iterable[tuple[str, Any]], root: Path, empty: str) -> list[dict]:
    """``(where, record)`` pairs -> the checked items, images resolved against ``root`` and checked to exist.

    Raises:
        DataError: naming ``where`` (a JSONL ``file:line`` or ``item n``): an unknown key, a missing id, an
            item without content, a duplicate id (and where it was first); ``empty`` when there is no item.
        ImageLoadError: ``where: item 'id': image file not found: path``.
    """
    items, first = [], {}
    for where, rec in records:
        it = _check_item(rec, where)
        _resolve_image(it, root, where)
        if it["id"] in first:
            raise DataError(f"{where}: duplicate id {it['id']!r} (first at {first[it['id']]})")
        first[it["id"]] = where
        items.append(it)
    if not items:
        raise DataError(empty)
    return items


def _image_files(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted, hidden entries and symlinked folders skipped)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                out.append(Path(dirpath) / name)
    return out


def _read_captions(path: Path, known: set[str]) -> dict[str, str]:
    """``{relative image path: text}`` from ``captions.jsonl``; DataError naming file:line on a problem."""
    out: dict[str, tuple[str, str]] = {}
    for lineno, rec in iter_jsonl(path):
        where = f"{path}:{lineno}"
        unknown = set(rec) - {"id", "image", "text"}
        if unknown:
            raise DataError(f"{where}: unknown key(s) {sorted(unknown)}; expected 'id' (or 'image') and 'text'")
        key = rec.get("id", rec.get("image"))
        if not isinstance(key, str) or not key:
            raise DataError(f"{where}: missing 'id' (the image path relative to {path.parent})")
        key = Path(key).as_posix()
        if key not in known:
            raise DataError(f"{where}: caption for {key!r}, but no such image under {path.parent}")
        if key in out:
            raise DataError(f"{where}: second caption for {key!r} (first at {out[key][1]})")
        text = rec.get("text")
        if not isinstance(text, str):
            raise DataError(f"{where}: 'text' of {key!r} must be a string")
        out[key] = (text, where)
    return {k: v[0] for k, v in out.items()}


def read_image_folder(folder: str | os.PathLike, exclude: Sequence[str | os.PathLike] = ()) -> list[dict]:
    """Items of a folder of images (id = relative path), with texts from ``captions.jsonl`` if present.

    Args:
        folder: searched recursively.
        exclude: folders to skip (e.g. the index being written inside ``folder``).
    Raises:
        DataError: ``folder: no images found`` (naming the extensions looked for), caption problems.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder")
    skip = [Path(e).resolve() for e in exclude]
    files = [f for f in _image_files(folder) if not any(s in f.resolve().parents for s in skip)]
    if not files:
        raise DataError(f"{folder}: no images found (looked recursively for "
                        f"{', '.join(sorted(IMAGE_EXTENSIONS))})")
    ids = [f.relative_to(folder).as_posix() for f in files]
    caps = _read_captions(folder / CAPTIONS_FILE, set(ids)) if (folder / CAPTIONS_FILE).is_file() else {}
    return [{"id": i, "text": caps.get(i) or None, "image": str(f.resolve())} for f, i in zip(files, ids)]


def read_items(source: Any, image_root: str | os.PathLike | None = None,
               exclude: Sequence[str | os.PathLike] = ()) -> list[dict]:
    """Items from a JSONL path, an image folder, or a sequence of dicts (validated, images checked).

    Relative image paths are resolved against ``image_root`` (default: the JSONL file's folder, or the current
    folder for a list).

    Raises:
        DataError / ImageLoadError: see :func:`_checked` and :func:`read_image_folder`; a JSONL line that is
            not a JSON object names its ``file:line``.
    """
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if p.is_dir():
            return read_image_folder(p, exclude=exclude)
        if not p.exists():
            raise DataError(f"{p}: not found (give a JSONL file of items or a folder of images)")
        return _checked(((f"{p}:{lineno}", rec) for lineno, rec in iter_jsonl(p)),
                        Path(image_root) if image_root else p.parent, f"{p}: no items (empty file)")
    if isinstance(source, Mapping) or not isinstance(source, Sequence):
        raise DataError(f"items must be a JSONL path, a folder or a list of dicts, got {type(source).__name__}")
    return _checked(((f"item {n}", rec) for n, rec in enumerate(source)),
                    Path(image_root) if image_root else Path.cwd(), "no items given (empty list)")


def image_fingerprint(path: str | os.PathLike, known: Mapping[str, Any] | None = None) -> dict:
    """Content fingerprint of an image file: ``{"size", "mtime_ns", "sha1"}`` (sha1 of its bytes).

    ``known``: the fingerprint recorded earlier; when size and mtime still match it is returned as is (a
    stat, no read), otherwise the bytes are hashed again. The sha1 is the truth (:func:`content_changed`);
    size and mtime only spare re-reading every unchanged picture of a folder on each ``add``, and a copied or
    touched file with the same bytes (new mtime) is recognised as unchanged by its hash.

    Raises:
        ImageLoadError: the file cannot be read (naming it).
    """
    try:
        st = os.stat(path)
        if known and known.get("sha1") and known.get("size") == st.st_size \
                and known.get("mtime_ns") == st.st_mtime_ns:
            return dict(known)
        digest = hashlib.sha1()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
            st = os.fstat(fh.fileno())  # the file that was read (the path may have been replaced since the stat)
    except OSError as exc:
        raise ImageLoadError(f"{path}: cannot read image file ({exc.strerror})") from None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha1": digest.hexdigest()}


def content_changed(indexed: Mapping[str, Any], item: Mapping[str, Any]) -> str | None:
    """What changed between an indexed item row and the same id read again (both with ``"file"`` where they
    have an image): ``"caption"``, ``"image content (...)"``, ``"image added"`` / ``"image removed"``, or
    None when the encoded content is the same. An indexed image without a fingerprint (an index written
    before they were recorded) is not compared (None; the caller warns)."""
    if (indexed.get("text") or None) != (item.get("text") or None):
        return "caption"
    if bool(indexed.get("image")) != bool(item.get("image")):
        return "image added" if item.get("image") else "image removed"
    old, new = indexed.get(FILE_KEY), item.get(FILE_KEY)
    if not item.get("image") or not old:
        return None
    if old.get("size") != new["size"] or old.get("sha1") != new["sha1"]:
        return (f"image content: {old.get('size')} bytes sha1 {str(old.get('sha1'))[:10]} -> "
                f"{new['size']} bytes sha1 {new['sha1'][:10]}")
    return None


def encode_item(item: Mapping[str, Any]) -> dict:
    """The candidate dict handed to ``UMarvel.encode_candidates``: ``{"text", "image"}`` (None dropped)."""
    return {k: item[k] for k in ("text", "image") if item.get(k) is not None}
