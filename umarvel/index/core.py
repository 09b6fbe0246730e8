"""A searchable index of one's own images and texts: build once, grow, search (exact or faiss ANN).

Folder layout (every file written atomically; ``index.json`` is written last and is the commit point)::

    index.json              format, model (path + fingerprint), encode settings, count, dim, backend,
                            backend parameters, ANN recall, parts, created / updated
    items.jsonl             {"id", "text", "image", "meta", "file"} per row, row-aligned with the vectors;
                            "file": the image's {"size", "mtime_ns", "sha1"} when it was encoded
    vectors/part-<key>/     one embedding-cache entry per build / add (umarvel.eval.cache): manifest.json,
                            ids.json, vectors.npy float16 (n, D); shard files while encoding
    faiss-<gen>.index       the faiss index of the ivf / hnsw backends (absent for flat)

Encoding goes through :class:`~umarvel.eval.cache.EmbeddingCache` rooted at ``vectors/``: one encode
pass, shards written atomically, so a killed ``build`` / ``add`` resumes where it stopped, and under
torchrun rank ``r`` encodes shards ``r, r + W, ...``. The cache's consolidated ``vectors.npy`` *is* the
index's vector storage (no second pass, no copy). ``flat`` search is the exact tiled search of
:mod:`umarvel.eval.search` (fp16 vectors streamed or kept resident; on CUDA the same tiles as the M-BEIR
search); under torchrun with ``distributed=True`` each rank searches its shard and the top-k are merged
exactly (:mod:`umarvel.eval.dist_search`). ``ivf`` / ``hnsw`` are faiss indexes whose recall@10 against
the exact search is recorded in ``index.json``, estimated with held-out-style queries: seeded samples of the
collection moved off their own rows into their neighbourhood (:func:`recall_queries`), never an indexed
row itself, whose own row would be its exact top-1 and flatter the number.

A row of ``items.jsonl`` past ``index.json``'s ``count`` belongs to an ``add`` that did not finish; it is
ignored (and rewritten by the next ``add``).

Changed pictures: every item with an image records its file's content fingerprint
(:func:`umarvel.index.items.image_fingerprint`, hashed before it is encoded). The fingerprints are part of
the items the cache key covers, so a killed build resumed after a picture was replaced encodes afresh
instead of reusing the stale shards. ``add`` of a folder skips the pictures already indexed with the same
caption and content and refuses one whose content changed, naming it (the parts and faiss index only grow:
a row's vector cannot be replaced; rebuild with ``overwrite``). Rows of an index written before the
fingerprints were recorded have none: their pictures are not compared (one warning per ``add``).
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from umarvel.api import UMarvel
from umarvel.data.images import open_image
from umarvel.dist import all_gather_object, barrier, broadcast_object, get_rank, get_world_size, is_dist
from umarvel.errors import CheckpointError, ConfigError, DataError, ImageLoadError
from umarvel.eval.cache import EmbeddingCache, encoder_settings
from umarvel.eval.dist_search import RankShardedSearcher
from umarvel.eval.search import (FaissSearcher, RowBlocks, TorchSearcher, ann_recall, gather_rows,
                                 unit_rows_fp32)
from umarvel.index.items import FILE_KEY, content_changed, encode_item, image_fingerprint, read_items
from umarvel.log import progress_disabled
from umarvel.utils.io import atomic_path, atomic_write_json, iter_jsonl, read_json, write_jsonl
from umarvel.utils.runs import RunClaim, RunIdentity, RunLock, claim_on_rank0, now_iso
from umarvel.version import __version__

logger = logging.getLogger(__name__)

INDEX_JSON = "index.json"
ITEMS_FILE = "items.jsonl"
VECTORS_DIR = "vectors"
PART_NAME = "part"
FORMAT_VERSION = 1
BACKENDS = ("flat", "ivf", "hnsw")
RECALL_K = 10
DEFAULT_RECALL_SAMPLE = 1000
#: faiss parameters accepted per backend (see :class:`umarvel.eval.search.FaissSearcher`).
ANN_PARAMS = {"ivf": ("nlist", "nprobe", "train_size", "seed"),
              "hnsw": ("hnsw_m", "ef_construction", "ef_search")}


@dataclass
class Hit:
    """One search result.

    Attributes:
        rank: 1-based rank; id: the item id; score: inner product (cosine, vectors are L2-normalised);
        row: the item's row in the index; text / image / meta: the item's stored fields.
    """

    rank: int
    id: str
    score: float
    row: int
    text: str | None = None
    image: str | None = None
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """``{"rank", "id", "score"}`` plus ``text`` / ``image`` / ``meta`` where present (JSON-ready)."""
        out: dict[str, Any] = {"rank": self.rank, "id": self.id, "score": round(float(self.score), 6)}
        for key in ("text", "image"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.meta:
            out["meta"] = self.meta
        return out


class _ItemEncoder:
    """The cache's ``encode_fn``: one shard of items -> ``(n, D)`` candidate embeddings, errors naming ids."""

    def __init__(self, model: Any, batch_size: int):
        self.model, self.batch_size = model, batch_size

    def __call__(self, items: list[dict]) -> np.ndarray:
        try:
            return self.model.encode_candidates([encode_item(it) for it in items], batch_size=self.batch_size)
        except ImageLoadError as exc:
            for it in items:  # name the item whose image failed
                if it.get("image"):
                    try:
                        open_image(it["image"])
                    except ImageLoadError as bad:
                        raise ImageLoadError(f"item {it['id']!r}: {bad}") from exc
            raise ImageLoadError(f"items {items[0]['id']!r} .. {items[-1]['id']!r}: {exc}") from exc


def _diff(a: Mapping, b: Mapping, prefix: str = "") -> list[str]:
    """Human-readable differences between two (nested) settings dicts."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: index {va!r} vs model {vb!r}")
    return out


def _auto_resident(n: int, dim: int, device: torch.device) -> bool:
    """Keep the vectors in the compute dtype on ``device`` when that takes under half its free memory
    (fp16 on CUDA, fp32 on CPU); otherwise they are streamed from the memory map at every search."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return 2 * n * dim < 0.5 * free
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return True
    return 4 * n * dim < 0.5 * free


class Index:
    """A built index folder: items, vectors, backend (see the module doc).

    ``Index.build(model, items, path)`` / ``Index.load(path)`` / ``index.add(model, items)`` /
    ``index.search(query_vectors, k)`` (hits) / ``index.query(model, queries, k)`` (encode + search).
    """

    def __init__(self, path: str | os.PathLike, info: dict, items: list[dict]):
        self.path = Path(path)
        self.info = info
        self.items = items
        self._blocks: list[np.ndarray] | None = None
        self._searchers: dict[tuple, Any] = {}
        self._rows: dict[str, int] | None = None

    # ------------------------------------------------------------------ properties
    def __len__(self) -> int:
        return int(self.info["count"])

    def __repr__(self) -> str:
        return f"Index({str(self.path)!r}, {len(self)} items, dim {self.dim}, {self.backend})"

    @property
    def dim(self) -> int:
        """Embedding dimension D."""
        return int(self.info["dim"])

    @property
    def backend(self) -> str:
        """``flat``, ``ivf`` or ``hnsw``."""
        return str(self.info["backend"])

    @property
    def fingerprint(self) -> str:
        """Fingerprint of the model the index was built with."""
        return str(self.info["model"]["fingerprint"])

    @property
    def model_path(self) -> str | None:
        """The checkpoint the index was built with (as recorded)."""
        return self.info["model"].get("path")

    @property
    def ids(self) -> list[str]:
        """Item ids, row order."""
        return [it["id"] for it in self.items]

    def row_of(self, item_id: str) -> int:
        """Row of ``item_id``; DataError if absent."""
        try:
            return self._row_map()[item_id]
        except KeyError:
            raise DataError(f"{self.path}: no item with id {item_id!r}") from None

    def vector_blocks(self) -> list[np.ndarray]:
        """Read-only float16 memmaps ``[(n_part, D), ...]`` whose row concatenation is the index's vectors."""
        if self._blocks is None:
            self._blocks = [np.load(self.path / p["vectors"], mmap_mode="r") for p in self.info["parts"]]
        return self._blocks

    @property
    def vectors(self) -> np.ndarray:
        """``(N, D)`` float16 (a memmap for a one-part index, else a copy in RAM)."""
        blocks = self.vector_blocks()
        return blocks[0] if len(blocks) == 1 else np.concatenate(blocks)

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | os.PathLike) -> "Index":
        """Open an index folder.

        Raises:
            DataError: no ``index.json`` (not an index, or a build that never finished), an unknown format,
                missing / inconsistent files (naming the file).
        """
        path = Path(path)
        meta_file = path / INDEX_JSON
        if not meta_file.is_file():
            hint = " (a build that did not finish? run the same `umarvel index build` again to resume)" \
                if (path / VECTORS_DIR).is_dir() else ""
            raise DataError(f"{path}: not an index (no {INDEX_JSON}){hint}")
        info = read_json(meta_file)
        if not isinstance(info, dict) or info.get("format_version") != FORMAT_VERSION:
            found = info.get("format_version") if isinstance(info, dict) else info
            raise DataError(f"{meta_file}: unsupported index format {found!r} (this umarvel reads version "
                            f"{FORMAT_VERSION})")
        for key in ("model", "count", "dim", "backend", "parts"):
            if key not in info:
                raise DataError(f"{meta_file}: missing field {key!r}")
        items = _read_rows(path / ITEMS_FILE, int(info["count"]))
        idx = cls(path, info, items)
        sizes = []
        for p in info["parts"]:
            f = path / p["vectors"]
            if not f.is_file():
                raise DataError(f"{meta_file}: vectors file {f} is missing")
            sizes.append(np.load(f, mmap_mode="r").shape)
        if sum(s[0] for s in sizes) != len(idx) or any(s[1] != idx.dim for s in sizes):
            raise DataError(f"{meta_file}: vectors {sizes} do not match count {len(idx)} x dim {idx.dim}")
        if info.get("faiss_file") and not (path / info["faiss_file"]).is_file():
            raise DataError(f"{meta_file}: faiss index {path / info['faiss_file']} is missing")
        return idx

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, model: Any, items: Any, path: str | os.PathLike, *, backend: str = "flat",
              batch_size: int = 32, shard_size: int = 1024, image_root: str | os.PathLike | None = None,
              overwrite: bool = False, backend_params: Mapping[str, Any] | None = None,
              recall_sample: int = DEFAULT_RECALL_SAMPLE, source: str | None = None) -> "Index":
        """Encode ``items`` with ``model`` and write the index folder ``path``.

        Args:
            model: a :class:`umarvel.UMarvel` (anything with ``fingerprint()``, ``encode_candidates``,
                ``settings``).
            items: a JSONL path, a folder of images, or a list of ``{"id", "text", "image", "meta"}`` dicts.
            path: the index folder (created; a previous unfinished build of the same items resumes).
            backend: ``flat`` (exact, default), ``ivf`` or ``hnsw`` (faiss, approximate).
            shard_size: items per cache shard (the resume granularity and the torchrun sharding unit).
            overwrite: replace an existing index at ``path`` (else an existing ``index.json`` is an error).
            backend_params: faiss settings (ivf: nlist, nprobe, train_size, seed; hnsw: hnsw_m,
                ef_construction, ef_search).
            recall_sample: queries of the ANN recall measurement.
        Raises:
            DataError / ImageLoadError: bad items (naming file:line / id); an existing index without
                ``overwrite``. ConfigError: unknown backend or parameter.
        """
        path = Path(path)
        check_new_index(path, backend, backend_params, overwrite)
        src = _source_name(items, source)
        rows = with_fingerprints(read_items(items, image_root=image_root, exclude=[path]))
        fp = model.fingerprint()
        unfinished = [] if (path / INDEX_JSON).is_file() else sorted((path / VECTORS_DIR).glob(f"{PART_NAME}-*"))
        emb = _encode_part(path, model, rows, fp, batch_size, shard_size)
        stale = [d.name for d in unfinished if d.name != Path(emb.path).name]
        if stale and get_rank() == 0:
            logger.warning("%s: the vectors of an unfinished build of other items (%s) were not reused: an id, "
                           "caption or picture changed since, so its items were encoded again (the old vectors "
                           "are removed now that this build has finished)", path, ", ".join(stale))
        if get_rank() == 0:
            cls._create(path, rows, emb, {"path": _model_path(model), "fingerprint": fp},
                        {"role": "candidate", "settings": encoder_settings(model)}, backend, backend_params,
                        recall_sample, src)
        barrier()
        return cls.load(path)

    @classmethod
    def from_vectors(cls, vectors: Any, items: Any, path: str | os.PathLike, *, fingerprint: str = "external",
                     model_path: str | None = None, backend: str = "flat", overwrite: bool = False,
                     backend_params: Mapping[str, Any] | None = None,
                     recall_sample: int = DEFAULT_RECALL_SAMPLE, image_root: str | os.PathLike | None = None,
                     ) -> "Index":
        """An index of vectors computed elsewhere: ``(N, D)`` (stored as float16, L2-normalise them first)
        and N items (as for :meth:`build`). ``fingerprint`` names the encoder (checked by :meth:`add` /
        :meth:`check_model`)."""
        path = Path(path)
        check_new_index(path, backend, backend_params, overwrite)
        rows = with_fingerprints(read_items(items, image_root=image_root, exclude=[path]))
        vecs = np.asarray(vectors)
        if vecs.ndim != 2 or vecs.shape[0] != len(rows):
            raise DataError(f"vectors of shape {vecs.shape} for {len(rows)} items (expected ({len(rows)}, D))")
        cache = EmbeddingCache(path / VECTORS_DIR)
        ids = [r["id"] for r in rows]
        digest = hashlib.sha256(memoryview(np.ascontiguousarray(vecs)).cast("B")).hexdigest()
        emb = cache.get_or_encode(PART_NAME, rows, ids, lambda part: vecs[_rows_of(part, ids)],
                                  fingerprint=fingerprint, settings={"role": "vectors", "sha256": digest},
                                  shard_size=max(1, len(rows)))
        cls._create(path, rows, emb, {"path": model_path, "fingerprint": fingerprint},
                    {"role": "vectors", "settings": {}}, backend, backend_params, recall_sample, "<vectors>")
        return cls.load(path)

    @classmethod
    def _create(cls, path: Path, rows: list[dict], emb: Any, model: dict, encode: dict, backend: str,
                backend_params: Mapping[str, Any] | None, recall_sample: int, source: str) -> None:
        """Rank 0: the first ``index.json`` of a new index over the cache entry ``emb`` of ``rows``, committed."""
        info = {"format_version": FORMAT_VERSION, "umarvel_version": __version__, "created": now_iso(),
                "updated": now_iso(), "model": model, "encode": encode, "count": len(rows), "dim": int(emb.dim),
                "dtype": "float16", "backend": backend, "backend_params": dict(backend_params or {}),
                "faiss_file": None, "recall": None, "parts": [_part_record(path, emb.path, len(rows), source)],
                "items_file": ITEMS_FILE}
        cls(path, info, rows)._commit(rows, recall_sample, new_rows=None)

    def add(self, model: Any, items: Any, *, batch_size: int = 32, shard_size: int = 1024,
            image_root: str | os.PathLike | None = None, recall_sample: int = DEFAULT_RECALL_SAMPLE,
            source: str | None = None) -> int:
        """Encode only the new items of ``items`` (:meth:`items_to_add`) and append them; returns the number
        added (0, with nothing encoded, when there is nothing new).

        Raises:
            CheckpointError: ``model`` is not the one the index was built with (fingerprint differs).
            DataError: an id already in the index (JSONL / list; naming it and its row), a picture of a folder
                that changed since it was indexed (naming it), bad items.
        """
        self.check_model(model)
        src = _source_name(items, source)
        new = self.items_to_add(items, image_root=image_root, source=src)
        if not new:
            logger.info("%s: nothing new to add to %s", src, self.path)
            return 0
        new = with_fingerprints(new)
        emb = _encode_part(self.path, model, new, self.fingerprint, batch_size, shard_size)
        if int(emb.dim) != self.dim:
            raise DataError(f"{self.path}: new vectors have dim {emb.dim}, the index {self.dim}")
        if get_rank() == 0:
            info = dict(self.info)
            info["parts"] = list(info["parts"]) + [_part_record(self.path, emb.path, len(new), src)]
            info["count"] = len(self) + len(new)
            info["updated"] = now_iso()
            self.info = info
            self._blocks, self._rows, self._searchers = None, None, {}
            rows = self.items + new
            self._commit(rows, recall_sample, new_rows=len(new))
            self.items = rows
        barrier()
        fresh = Index.load(self.path)
        self.info, self.items, self._blocks, self._rows, self._searchers = fresh.info, fresh.items, None, None, {}
        return len(new)

    def items_to_add(self, items: Any, *, image_root: str | os.PathLike | None = None,
                     source: str | None = None) -> list[dict]:
        """The items of ``items`` that :meth:`add` encodes (read and checked; no model needed).

        A folder of images is a collection that grows: its pictures already in the index (same id) are
        skipped when their caption and image content are the ones indexed (the recorded fingerprint; a
        stat when size and mtime match, else the bytes are hashed), and one whose caption or content
        changed is an error (a row's vector cannot be replaced: the parts and faiss index only grow). A
        JSONL file or a list holds new items: an id already in the index is an error.

        Raises:
            DataError: see :meth:`add`; the changed pictures are named with what changed and the remedy.
        """
        src = _source_name(items, source)
        new = read_items(items, image_root=image_root, exclude=[self.path])
        if not (isinstance(items, (str, os.PathLike)) and Path(items).is_dir()):
            for it in new:
                if it["id"] in self._row_map():
                    raise DataError(f"{src}: item id {it['id']!r} is already in the index {self.path} "
                                    f"(row {self._row_map()[it['id']]}); ids must be unique")
            return new
        # rank 0 compares (stats, hashes where they differ) and every rank acts on its answer
        keep, changed, unknown = broadcast_object(self._compare_folder(new) if get_rank() == 0 else None)
        if changed:
            shown = "; ".join(f"{i!r} ({why})" for i, why in changed[:5])
            more = f"; and {len(changed) - 5} more" if len(changed) > 5 else ""
            raise DataError(
                f"{src}: {len(changed)} item(s) already in the index {self.path} changed since they were indexed: "
                f"{shown}{more}. An index cannot replace an item's vector (its vectors and faiss index only "
                f"grow): rebuild it from the folder (`umarvel index build --model {self.model_path or 'CKPT'} "
                f"--input {src} --output {self.path} --overwrite`, or Index.build(..., overwrite=True)), or put "
                "the indexed versions back")
        if unknown:
            logger.warning("%s: %d picture(s) already in it (e.g. %r) have no content fingerprint (indexed by an "
                           "older umarvel): kept without checking whether they changed; rebuild the index "
                           "(--overwrite) to check them", self.path, len(unknown), unknown[0])
        if len(keep) < len(new):
            logger.info("%s: %d item(s) already in the index %s and unchanged: skipped", src, len(new) - len(keep),
                        self.path)
        return [new[n] for n in keep]

    def _row_map(self) -> dict[str, int]:
        """``{id: row}`` (cached)."""
        if self._rows is None:
            self._rows = {it["id"]: r for r, it in enumerate(self.items)}
        return self._rows

    def _compare_folder(self, new: list[dict]) -> tuple[list[int], list[tuple[str, str]], list[str]]:
        """Items of a folder vs the index: positions of the new ids, ``(id, what changed)`` of the changed
        ones, ids of indexed pictures without a fingerprint (not compared)."""
        keep, changed, unknown = [], [], []
        for n, it in enumerate(new):
            row = self._row_map().get(it["id"])
            if row is None:
                keep.append(n)
                continue
            old = self.items[row]
            if it.get("image") and old.get(FILE_KEY):
                it = {**it, FILE_KEY: _fingerprint_of(it, old[FILE_KEY])}
            why = content_changed(old, it)
            if why:
                changed.append((it["id"], why))
            elif it.get("image") and old.get("image") and not old.get(FILE_KEY):
                unknown.append(it["id"])
        return keep, changed, unknown

    def _commit(self, rows: list[dict], recall_sample: int, new_rows: int | None) -> None:
        """Rank 0: write items.jsonl, the faiss index (ivf / hnsw) and its recall, then index.json (the
        commit point); then remove cache entries and faiss files no longer referenced."""
        self.items = rows
        self._blocks = None
        write_jsonl(self.path / ITEMS_FILE, rows)
        if self.backend != "flat":
            self._write_ann(new_rows, recall_sample)
        atomic_write_json(self.path / INDEX_JSON, self.info)
        self._cleanup()
        logger.info("index %s: %d items, dim %d, backend %s%s", self.path, len(self), self.dim, self.backend,
                    f", recall@{RECALL_K} {self.info['recall']['recall']:.4f}" if self.info.get("recall") else "")

    def _write_ann(self, new_rows: int | None, recall_sample: int) -> None:
        """Build (or extend by the last ``new_rows`` rows) the faiss index, save it under a new name,
        measure its recall, and record both in ``self.info``."""
        import faiss  # local: only the ANN backends need it

        params = {k: v for k, v in self.info.get("backend_params", {}).items() if k in ANN_PARAMS[self.backend]}
        old = self.info.get("faiss_file")
        if new_rows is not None and old:
            searcher = FaissSearcher.from_index(faiss.read_index(str(self.path / old)), self.backend)
            for piece in self.vector_blocks()[-1:]:
                for a in range(0, len(piece), 1 << 16):
                    searcher.index.add(np.ascontiguousarray(piece[a:a + (1 << 16)], dtype=np.float32))
            searcher.n = int(searcher.index.ntotal)
        else:
            searcher = FaissSearcher(RowBlocks(self.vector_blocks()), kind=self.backend, **params)
        gen = 1 + max([int(p.stem.split("-")[1]) for p in self.path.glob("faiss-*.index")] or [0])
        name = f"faiss-{gen:05d}.index"
        with atomic_path(self.path / name) as tmp:
            faiss.write_index(searcher.index, str(tmp))
        self.info["faiss_file"] = name
        self.info["backend_params"] = _ann_params(searcher)
        self.info["recall"] = self._measure_recall(searcher, recall_sample)
        self._searchers = {}

    def _measure_recall(self, ann: FaissSearcher, sample: int, seed: int = 0) -> dict:
        """Recall@10 of ``ann`` against the exact search, held-out style (:func:`recall_queries`): the queries
        made from a seeded sample of rows, each scored without the row it was made from. Seeded: the same
        index gives the same number."""
        n = len(self)
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(n, size=min(max(1, sample), n), replace=False))
        k = min(RECALL_K, n)
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        exact = TorchSearcher(RowBlocks(self.vector_blocks()), device=dev)
        queries = recall_queries(exact, rows, k, seed)
        kk = min(k + 1, n)
        _, truth = exact.search(queries, kk)
        _, approx = ann.search(queries, kk)
        r = ann_recall(without_rows(approx, rows, k), without_rows(truth, rows, k), k)
        return {"k": k, "recall": round(float(r), 6), "queries": len(rows), "seed": seed,
                "queries_from": RECALL_QUERIES_FROM, "measured": now_iso()}

    def _cleanup(self) -> None:
        """Remove cache entries (``vectors/part-*``) and faiss files the committed ``index.json`` does not use."""
        used = {(self.path / p["vectors"]).parent.resolve() for p in self.info["parts"]}
        vec_root = self.path / VECTORS_DIR
        for d in vec_root.iterdir() if vec_root.is_dir() else ():
            if d.is_dir() and d.resolve() not in used and not d.name.startswith("."):
                shutil.rmtree(d, ignore_errors=True)
        for f in self.path.glob("faiss-*.index"):
            if f.name != self.info.get("faiss_file"):
                f.unlink(missing_ok=True)

    # ------------------------------------------------------------------ models and queries
    def check_model(self, model: Any) -> None:
        """CheckpointError unless ``model.fingerprint()`` equals the index's (naming both and the settings
        that differ)."""
        fp = model.fingerprint()
        if fp == self.fingerprint:
            return
        diff = _diff(self.info.get("encode", {}).get("settings", {}), encoder_settings(model))
        raise CheckpointError(
            f"{self.path}: built with model {self.model_path or '?'} (fingerprint {self.fingerprint}), but the "
            f"given model {getattr(model, 'source', None) or '?'} has fingerprint {fp}"
            + (f"; settings differ: {'; '.join(diff)}" if diff else " (different weights)")
            + ". Use the index's model and settings, or build a new index.")

    def load_model(self, model_path: str | os.PathLike | None = None, device: str | None = None,
                   dtype: str | None = None) -> Any:
        """``UMarvel.from_pretrained`` of the index's model (or ``model_path``) with the recorded encode
        settings (dtype, pixel budget, attention, positions), checked against the index's fingerprint."""
        path = model_path or self.model_path
        if not path:
            raise CheckpointError(f"{self.path}: no model recorded in {INDEX_JSON}; pass a model (--model)")
        s = self.info.get("encode", {}).get("settings", {})
        kwargs = {k: s[k] for k in ("min_pixels", "max_pixels", "attention", "positions") if k in s}
        model = UMarvel.from_pretrained(path, device=device or "cpu", dtype=dtype or s.get("dtype"), **kwargs)
        self.check_model(model)
        return model

    def encode_queries(self, model: Any, queries: Sequence[Mapping], batch_size: int = 32) -> np.ndarray:
        """Check the model and embed query dicts ``{"text", "image", "instruction"}``: float32 ``(Q, D)``."""
        self.check_model(model)
        return model.encode_queries(list(queries), batch_size=batch_size)

    def query(self, model: Any, queries: Sequence[Mapping] | Mapping, k: int = 10, **search_kwargs: Any
              ) -> list[list[Hit]]:
        """Encode ``queries`` (one dict or a list) with ``model`` and search: one hit list per query."""
        qs = [queries] if isinstance(queries, Mapping) else list(queries)
        return self.search(self.encode_queries(model, qs), k, **search_kwargs)

    # ------------------------------------------------------------------ search
    def searcher(self, device: str | None = None, distributed: bool = False, resident: bool | None = None,
                 exact: bool = False) -> Any:
        """The (cached) searcher: exact torch tiles for ``flat`` (or ``exact=True``), the saved faiss index
        for ivf / hnsw; ``distributed``: this rank's shard (:class:`RankShardedSearcher`)."""
        use_exact = exact or self.backend == "flat"
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        key = (use_exact, str(dev), distributed, resident)
        if key in self._searchers:
            return self._searchers[key]
        if not use_exact:
            import faiss  # local: only the ANN backends need it

            index = faiss.read_index(str(self.path / self.info["faiss_file"]))
            s: Any = FaissSearcher.from_index(index, self.backend)
        elif distributed and is_dist():
            local_rows = -(-len(self) // get_world_size())  # this rank's shard
            keep = _auto_resident(local_rows, self.dim, dev) if resident is None else resident
            s = RankShardedSearcher(RowBlocks(self.vector_blocks()), device=dev, resident=keep)
        else:
            s = TorchSearcher(RowBlocks(self.vector_blocks()), device=dev,
                              resident=_auto_resident(len(self), self.dim, dev) if resident is None else resident)
        self._searchers[key] = s
        return s

    def search_arrays(self, query_vectors: Any, k: int = 10, *, device: str | None = None,
                      distributed: bool = False, exact: bool = False, resident: bool | None = None,
                      nprobe: int | None = None, ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows: ``(Q, D)`` (or ``(D,)``) queries -> ``(Q, k)`` float32 scores and int64 rows (``-1``
        padding when ``k`` exceeds the count). ``nprobe`` / ``ef_search`` tune ivf / hnsw for this call."""
        q = query_vectors
        q = q.detach().float().cpu().numpy() if torch.is_tensor(q) else np.asarray(q)
        if q.ndim == 1:
            q = q[None]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise DataError(f"query vectors of shape {tuple(q.shape)}; the index {self.path} has dim {self.dim}")
        s = self.searcher(device, distributed, resident, exact)
        if isinstance(s, FaissSearcher):
            if nprobe is not None and hasattr(s.index, "nprobe"):
                s.index.nprobe = int(nprobe)
            if ef_search is not None and hasattr(s.index, "hnsw"):
                s.index.hnsw.efSearch = int(ef_search)
        return s.search(np.ascontiguousarray(q, dtype=np.float32), k)

    def search(self, query_vectors: Any, k: int = 10, **kwargs: Any) -> list[list[Hit]]:
        """Top-k hits of each query vector (see :meth:`search_arrays` for the options)."""
        scores, rows = self.search_arrays(query_vectors, k, **kwargs)
        return [self.hits(s, r) for s, r in zip(scores, rows)]

    def hits(self, scores: np.ndarray, rows: np.ndarray) -> list[Hit]:
        """``(k,)`` scores and rows of one query -> hits (padding dropped)."""
        out = []
        for s, r in zip(scores, rows):
            if r < 0:
                continue
            it = self.items[int(r)]
            out.append(Hit(rank=len(out) + 1, id=it["id"], score=float(s), row=int(r), text=it.get("text"),
                           image=it.get("image"), meta=dict(it.get("meta") or {})))
        return out


# ---------------------------------------------------------------------------------------------- helpers
def check_new_index(path: str | os.PathLike, backend: str, params: Mapping[str, Any] | None, overwrite: bool) -> None:
    """Fail fast (before a model is loaded): bad backend / parameters, or an index at ``path`` already."""
    _check_backend(backend, params)
    if (Path(path) / INDEX_JSON).is_file() and not overwrite:
        raise DataError(f"{path}: already holds an index; use `umarvel index add` to grow it, or overwrite=True "
                        "(--overwrite) to rebuild it")


#: ``index build`` settings that do not change the vectors (input and output paths: the content is compared).
BUILD_IGNORE = ("model", "input", "output", "batch_size", "shard_size", "device", "recall_sample")


def claim_build(path: str | os.PathLike, model: str | os.PathLike, items: str | os.PathLike, backend: str,
                params: Mapping[str, Any] | None, dtype: str | None, image_root: str | os.PathLike | None,
                overwrite: bool = False, **ignored: Any) -> RunClaim | contextlib.nullcontext:
    """Claim the folder of an ``umarvel index build`` before the model loads (:mod:`umarvel.utils.runs`):
    one writer (lock, rank 0, held until the returned claim is released), and an unfinished build of another
    model, input file, backend or dtype is refused unless ``overwrite``. ``ignored``: settings recorded but
    not compared (:data:`BUILD_IGNORE`). An input folder of images is compared by its items, the pictures'
    content fingerprints included (the cache key covers them), not here.
    """
    config = {"model": str(model), "input": str(items), "output": str(path), "backend": backend,
              "backend_params": dict(params or {}), "dtype": dtype,
              "image_root": str(image_root) if image_root else None, **ignored}
    inputs = {"model": model, **({"input": items} if Path(items).is_file() else {})}
    identity = RunIdentity.build("index", config, ignore=BUILD_IGNORE, inputs=inputs)
    return claim_on_rank0(path, identity, overwrite=overwrite, what="--output",
                          override_hint="rerun with --overwrite to rebuild it")


@contextlib.contextmanager
def lock_index(path: str | os.PathLike) -> Iterator[None]:
    """Hold the lock of an index folder for an ``umarvel index add`` (rank 0; nothing on other ranks): a
    second writer (another add, or a build into it) is refused naming the holder."""
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    with RunLock(path):
        yield


def _check_backend(backend: str, params: Mapping[str, Any] | None) -> None:
    """ConfigError for an unknown backend or a faiss parameter the backend does not take."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown index backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    allowed = ANN_PARAMS.get(backend, ())
    bad = sorted(set(params or {}) - set(allowed))
    if bad:
        raise ConfigError(f"backend {backend!r} takes no parameter(s) {bad}"
                          + (f"; allowed: {', '.join(allowed)}" if allowed else ""))


def _model_path(model: Any) -> str | None:
    """The model's checkpoint folder as an absolute path (``UMarvel.source``), None when unknown."""
    src = getattr(model, "source", None)
    if src and Path(src).exists():
        return str(Path(src).resolve())
    return src


def _ann_params(s: FaissSearcher) -> dict:
    """The effective faiss parameters of a built index (recorded in index.json)."""
    ix = s.index
    if s.kind == "ivf":
        return {"nlist": int(ix.nlist), "nprobe": int(ix.nprobe)}
    if s.kind == "hnsw":
        return {"hnsw_m": int(ix.hnsw.nb_neighbors(1)), "ef_construction": int(ix.hnsw.efConstruction),
                "ef_search": int(ix.hnsw.efSearch)}
    return {}


#: How the ANN recall queries are made (recorded with the recall in ``index.json``; see :func:`recall_queries`).
RECALL_QUERIES_FROM = ("held-out style: a seeded sample of indexed vectors, each moved along a seeded random "
                       "combination of the directions to its k exact nearest other rows by the distance to the "
                       "k-th of them and re-normalised (not an indexed row); the row a query was made from is "
                       "left out of both the exact and the ANN top-k")


def recall_queries(exact: TorchSearcher, rows: np.ndarray, k: int, seed: int = 0, chunk: int = 256) -> np.ndarray:
    """Queries of the held-out ANN recall estimate: sampled rows ``(m,)`` -> ``(m, D)`` float32 unit vectors.

    A stored vector used as its own query is its exact top-1 and sits exactly where the ANN structure put it
    (in its IVF list, on its HNSW node): it is always found and steers the search to its neighbours, which
    inflates the recall. A query should instead be a new point of the collection's own distribution. For a
    sampled row ``x`` with its ``k`` exact nearest other rows ``y_1..y_k``, ``t`` = a seeded Gaussian
    combination of the offsets ``y_j - x`` (a direction in which the data vary there), normalised, and the
    query is ``q = unit(x + |y_k - x| t)``: another point of ``x``'s neighbourhood, as far from ``x`` as its
    ``k``-th neighbour. ``x`` is ``q``'s parent, closer to it than a new point's nearest item would be, so
    :meth:`Index._measure_recall` leaves ``x`` out of both top-k lists (:func:`without_rows`). On clustered
    synthetic collections (ivf with 1 probe, hnsw with a narrow beam) this came within 0.04 of the recall of
    fresh draws from the same distribution, where the self-query estimate was 0.02-0.11 too high
    (``test_recorded_recall_is_not_inflated_by_self_queries``). Queries of another distribution
    (e.g. text queries of an image collection, far from every item) can still be harder: measure those with
    ``search_arrays(..., exact=True)`` against the ANN search.

    Args:
        exact: the exact searcher of the index's vectors (``exact.source``: its rows).
        rows: sorted sample rows ``(m,)``; k: neighbours (the recall's k); seed: of the directions.
    Returns:
        ``(m, D)`` float32 queries of unit length (``x`` itself only where its neighbours coincide with it,
        or when the index has one row).
    """
    source = exact.source
    x = unit_rows_fp32(gather_rows(source, rows))  # (m, D)
    kk = min(k, len(source) - 1)
    if kk < 1:
        return x
    _, nn = exact.search(x, kk + 1)  # (m, kk + 1): normally the row itself first
    nbrs = without_rows(nn, rows, kk)  # (m, kk): its nearest other rows
    weights = np.random.default_rng([seed, 1]).standard_normal((len(rows), kk, 1)).astype(np.float32)
    out = np.empty_like(x)
    for a in range(0, len(rows), chunk):
        uniq, inv = np.unique(nbrs[a:a + chunk], return_inverse=True)
        y = unit_rows_fp32(gather_rows(source, uniq))[inv.reshape(-1)].reshape(-1, kk, x.shape[1])  # (c, kk, D)
        xa = x[a:a + chunk]
        off = y - xa[:, None]  # (c, kk, D)
        t = (weights[a:a + chunk] * off).sum(1)  # (c, D)
        norm = np.linalg.norm(t, axis=1, keepdims=True)
        step = np.linalg.norm(off[:, -1], axis=1, keepdims=True)  # distance to the kk-th neighbour
        out[a:a + chunk] = xa + step * t / np.where(norm > 0, norm, 1.0)
    return unit_rows_fp32(out)


def without_rows(found: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """``(m, >k)`` result rows -> ``(m, k)``: each list without ``rows[i]`` (the row query ``i`` was made from;
    where it is absent, the list's last entry goes instead), order kept, ``-1`` padding kept."""
    out = np.full((len(found), k), -1, dtype=np.int64)
    for i, (r, own) in enumerate(zip(found, rows)):
        kept = r[r != own][:k]
        out[i, :len(kept)] = kept
    return out


def _source_name(items: Any, source: str | None) -> str:
    """How error messages and ``index.json`` name an input: ``source``, else the path, else ``<python list>``."""
    return source or (str(items) if isinstance(items, (str, os.PathLike)) else "<python list>")


def _fingerprint_of(item: Mapping[str, Any], known: Mapping[str, Any] | None = None) -> dict:
    """:func:`image_fingerprint` of an item's image, an error naming the item."""
    try:
        return image_fingerprint(item["image"], known)
    except ImageLoadError as exc:
        raise ImageLoadError(f"item {item['id']!r}: {exc}") from None


def with_fingerprints(rows: list[dict]) -> list[dict]:
    """``rows`` with ``"file"`` (:func:`image_fingerprint`) on each item that has an image (new dicts).

    The bytes are hashed before the items are encoded: a picture replaced in between makes the next ``add``
    report it as changed rather than leave a vector that does not match its record. Under torchrun rank
    ``r`` hashes the pictures ``r, r + W, ...`` and the ranks exchange the fingerprints.
    """
    todo = [n for n, r in enumerate(rows) if r.get("image")][get_rank()::get_world_size()]
    mine = {n: _fingerprint_of(rows[n]) for n in tqdm(todo, desc="fingerprint images", unit="image",
                                                      disable=progress_disabled() or not todo)}
    found: dict[int, dict] = {}
    for part in all_gather_object(mine):
        found.update(part)
    return [{**r, FILE_KEY: found[n]} if n in found else dict(r) for n, r in enumerate(rows)]


def _rows_of(part: list[dict], ids: list[str]) -> np.ndarray:
    """Positions of ``part``'s items in ``ids`` (for :meth:`Index.from_vectors`)."""
    pos = {i: n for n, i in enumerate(ids)}
    return np.asarray([pos[it["id"]] for it in part], dtype=np.int64)


def _encode_part(path: Path, model: Any, rows: list[dict], fingerprint: str, batch_size: int,
                 shard_size: int) -> Any:
    """Encode ``rows`` through the index's cache (``path/vectors``): resumable, sharded over ranks."""
    if batch_size < 1 or shard_size < 1:
        raise ConfigError(f"batch_size and shard_size must be >= 1, got {batch_size}, {shard_size}")
    cache = EmbeddingCache(path / VECTORS_DIR)
    return cache.get_or_encode(PART_NAME, rows, [r["id"] for r in rows], _ItemEncoder(model, batch_size),
                               fingerprint=fingerprint,
                               settings={"role": "candidate", "encode": encoder_settings(model)},
                               shard_size=shard_size)


def _part_record(path: Path, entry: Path, count: int, source: str) -> dict:
    """The ``parts`` entry of one cache entry (paths relative to the index folder)."""
    return {"vectors": (Path(entry) / "vectors.npy").resolve().relative_to(path.resolve()).as_posix(),
            "count": count, "source": source, "added": now_iso()}


def _read_rows(path: Path, count: int) -> list[dict]:
    """The first ``count`` rows of ``items.jsonl`` (later rows: an unfinished add, ignored with a warning)."""
    if not path.is_file():
        raise DataError(f"{path}: missing (the index's items)")
    rows = []
    for _, rec in iter_jsonl(path):
        if len(rows) == count:
            logger.warning("%s: rows past %d belong to an unfinished add; ignored", path, count)
            break
        rows.append(rec)
    if len(rows) != count:
        raise DataError(f"{path}: {len(rows)} rows, but {INDEX_JSON} says {count}")
    return rows
