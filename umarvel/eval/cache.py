"""On-disk embedding cache: every query file / candidate pool is encoded once per checkpoint and settings.

Layout of one entry, ``<root>/<name>-<key16>/``::

    manifest.json        fingerprint, settings, source identity, shard_size, n_items, dim, ids_sha256,
                         completed_shards, status ("encoding" | "complete")
    ids.json             the item ids, input order
    shard_00000.npy ...  float16 (<= shard_size, D) vectors while encoding (each written atomically)
    vectors.npy          float16 (N, D), the shards consolidated once all are present (shards then removed)

The vectors are stored in float16: a unit vector's norm then deviates by up to ~1e-3 relative, so consumers
re-normalise them in fp32 before scoring (``umarvel.eval.search`` ``normalize=True`` in the M-BEIR runner,
``umarvel.eval.search.unit_rows_fp32`` in the zero-shot runner) and near-ties rank as they would in fp32.

``key = sha256(fingerprint, settings, name, source identity)``: a different checkpoint fingerprint or
preprocessing setting therefore always lands in a different directory and is never reused. If a manifest
under the same key nevertheless disagrees (hand-edited / corrupted entry, or the ids changed while the
source identity did not), :class:`~umarvel.errors.DataError` is raised naming the manifest and the field:
the cache refuses to guess and never deletes data silently (remove the directory to re-encode).

Resume: a shard file exists only if it was completely written (temp file + rename), so an interrupted run
re-encodes only the missing shards. Distributed (``torch.distributed`` initialised, e.g. torchrun): rank
``r`` encodes the missing shards ``r, r + W, ...``, then a barrier; rank 0 consolidates and writes the final
manifest; a second barrier lets every rank open the result. ``encode_fn`` must therefore work on every rank.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from umarvel import dist
from umarvel.errors import DataError
from umarvel.eval import DEFAULT_SHARD_SIZE
from umarvel.log import progress_disabled
from umarvel.utils.io import atomic_path, atomic_write_json

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
IDS = "ids.json"
VECTORS = "vectors.npy"
FORMAT_VERSION = 1


def _sha256(obj: Any) -> str:
    """Stable sha256 of a JSON-serialisable object (sorted keys; unknown types by ``repr``)."""
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=repr)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def encoder_settings(encoder: Any) -> dict:
    """The encoder's JSON-able preprocessing settings (``settings.as_dict()``), ``{}`` if it has none."""
    settings = getattr(encoder, "settings", None)
    return dict(settings.as_dict()) if hasattr(settings, "as_dict") else {}


def source_identity(source: str | os.PathLike | None, ids: Sequence[str], items: Sequence[dict]) -> dict:
    """Identity of the encoded input: ``{path, size, mtime_ns}`` of ``source`` when given, else a content
    hash of the ids and items (images by path / ``repr``)."""
    if source is not None:
        p = Path(source).resolve()
        try:
            st = p.stat()
        except OSError as exc:
            raise DataError(f"{p}: cannot stat cache source ({exc.strerror})") from None
        return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return {"content_sha256": _sha256([list(ids), list(items)])}


@dataclass
class CachedEmbeddings:
    """Cached vectors of one entry, or a zero-copy concatenation of several (:func:`concat_cached`).

    Attributes:
        ids: item ids, in order (length N).
        paths: the entry directories (one per concatenated part).
        n_encoded / n_reused: items encoded by this call vs read from disk.
    """

    ids: list[str]
    paths: list[Path]
    block_files: list[Path]
    n_encoded: int = 0
    n_reused: int = 0
    _blocks: list[np.ndarray] | None = field(default=None, repr=False)

    @property
    def path(self) -> Path:
        """The entry directory (the first part's for a concatenation)."""
        return self.paths[0]

    def __len__(self) -> int:
        return len(self.ids)

    def vector_blocks(self) -> list[np.ndarray]:
        """Read-only float16 memmaps ``[(n_i, D), ...]`` whose row concatenation is ``vectors`` (lazy)."""
        if self._blocks is None:
            self._blocks = [np.load(f, mmap_mode="r") for f in self.block_files]
        return self._blocks

    @property
    def dim(self) -> int:
        """Embedding dimension D."""
        return int(self.vector_blocks()[0].shape[1])

    @property
    def vectors(self) -> np.ndarray:
        """``(N, D)`` float16: a memmap for a single entry (no copy); a concatenation copies into RAM —
        pass the object itself to :func:`umarvel.eval.search.make_searcher` to stream blocks instead."""
        blocks = self.vector_blocks()
        return blocks[0] if len(blocks) == 1 else np.concatenate(blocks)


def concat_cached(parts: Sequence[CachedEmbeddings]) -> CachedEmbeddings:
    """Concatenate cached entries (e.g. the local pools into the global pool) without re-encoding or copying.

    Ids are concatenated in order; the vectors are exposed as the parts' memmapped blocks.
    """
    if not parts:
        raise DataError("concat_cached needs at least one cached entry")
    dims = {p.dim for p in parts if len(p)}
    if len(dims) > 1:
        raise DataError(f"cannot concatenate caches of different dims {sorted(dims)}: "
                        + ", ".join(str(p.path) for p in parts))
    return CachedEmbeddings(
        ids=[i for p in parts for i in p.ids],
        paths=[q for p in parts for q in p.paths],
        block_files=[f for p in parts for f in p.block_files],
        n_encoded=sum(p.n_encoded for p in parts),
        n_reused=sum(p.n_reused for p in parts),
    )


class EmbeddingCache:
    """Embedding cache rooted at ``root``; :meth:`get_or_encode` is the one entry point.

    ``stats`` accumulates ``{"encoded": items, "reused": items, "encode_calls": calls}`` over this object's life.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.stats = {"encoded": 0, "reused": 0, "encode_calls": 0}

    # -- keys and manifests -------------------------------------------------------------------
    @staticmethod
    def key(name: str, fingerprint: str, settings: dict, source: dict) -> str:
        """sha256 hex of everything that determines the vectors."""
        return _sha256({"v": FORMAT_VERSION, "name": name, "fingerprint": fingerprint,
                        "settings": settings, "source": source})

    def entry_dir(self, name: str, key: str) -> Path:
        """``<root>/<name>-<key[:16]>`` (``name`` sanitised for the filesystem)."""
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "entry"
        return self.root / f"{safe}-{key[:16]}"

    @staticmethod
    def _check_manifest(man: dict, expect: dict, path: Path) -> None:
        """Raise DataError naming ``path`` and the field if an existing manifest disagrees with the request."""
        for field_ in ("format_version", "key", "name", "fingerprint", "settings", "source", "n_items"):
            if man.get(field_) != expect[field_]:
                raise DataError(
                    f"{path}: cache manifest field {field_!r} is {man.get(field_)!r}, expected "
                    f"{expect[field_]!r}; refusing to reuse or overwrite it (delete {path.parent} to re-encode)")
        if man.get("ids_sha256") != expect["ids_sha256"]:
            raise DataError(f"{path}: cached ids differ from the requested ids ({len(expect['ids'])} ids, "
                            f"sha256 {expect['ids_sha256'][:12]} vs {str(man.get('ids_sha256'))[:12]}); "
                            f"delete {path.parent} to re-encode")

    # -- main entry point ---------------------------------------------------------------------
    def get_or_encode(self, name: str, items: Sequence[dict], ids: Sequence[str],
                      encode_fn: Callable[[list[dict]], Any], fingerprint: str, settings: dict,
                      shard_size: int = DEFAULT_SHARD_SIZE, source: str | os.PathLike | None = None,
                      ) -> CachedEmbeddings:
        """Return the cached float16 vectors of ``items``, encoding only what is missing.

        Args:
            name: entry name (e.g. ``"mbeir_webqa_task2_cand_pool"``).
            items: N dicts handed to ``encode_fn`` shard by shard.
            ids: N unique ids (string), same order.
            encode_fn: ``list[dict] (n) -> (n, D)`` numpy/torch float (L2-normalised by the caller).
            fingerprint: checkpoint + preprocessing fingerprint (``UMarvel.fingerprint()``).
            settings: JSON-serialisable encode settings (batch size excluded; anything changing vectors).
            shard_size: items per shard (the entry keeps the shard size it was created with).
            source: the file the items came from (identity = path, size, mtime); default: content hash.
        Returns:
            :class:`CachedEmbeddings` with ``n_encoded`` / ``n_reused`` counts of this call.
        """
        ids = [str(i) for i in ids]
        if len(ids) != len(items):
            raise DataError(f"{name}: {len(items)} items but {len(ids)} ids")
        if not ids:
            raise DataError(f"{name}: nothing to encode (0 items)")
        if len(set(ids)) != len(ids):
            raise DataError(f"{name}: duplicate ids in the request")
        src = source_identity(source, ids, items)
        key = self.key(name, fingerprint, settings, src)
        d = self.entry_dir(name, key)
        expect = {"format_version": FORMAT_VERSION, "key": key, "name": name, "fingerprint": fingerprint,
                  "settings": json.loads(json.dumps(settings, default=repr)), "source": src,
                  "n_items": len(ids), "ids": ids, "ids_sha256": _sha256(ids)}
        rank, world = dist.get_rank(), dist.get_world_size()
        man = self._read_manifest(d)
        if man is not None:
            self._check_manifest(man, expect, d / MANIFEST)
            if man.get("status") == "complete" and (d / VECTORS).is_file():
                self.stats["reused"] += len(ids)
                logger.info("cache hit %s: %d items reused (%s)", name, len(ids), d)
                return CachedEmbeddings(ids, [d], [d / VECTORS], 0, len(ids))
            shard_size = int(man["shard_size"])
        dist.barrier()  # every rank has read the old manifest before rank 0 (re)writes it
        if rank == 0 and man is None:
            self._write_manifest(d, expect, shard_size, dim=None, done=[], status="encoding")
        dist.barrier()
        n_shards = (len(ids) + shard_size - 1) // shard_size
        done = self._done_shards(d, n_shards, shard_size, len(ids))
        todo = [s for s in range(n_shards) if s not in done and s % world == rank]
        n_reused = sum(self._shard_len(s, shard_size, len(ids)) for s in done)
        n_enc = self._encode_shards(d, name, items, todo, shard_size, encode_fn, expect, done)
        dist.barrier()
        if rank == 0:
            self._consolidate(d, expect, n_shards, shard_size)
        dist.barrier()
        total_enc = n_enc if world == 1 else len(ids) - n_reused
        self.stats["encoded"] += n_enc
        self.stats["reused"] += n_reused
        logger.info("cache %s: %d items encoded, %d reused (%s)", name, total_enc, n_reused, d)
        return CachedEmbeddings(ids, [d], [d / VECTORS], n_enc, n_reused)

    # -- helpers ------------------------------------------------------------------------------
    @staticmethod
    def _read_manifest(d: Path) -> dict | None:
        """The entry's manifest, or None when absent; DataError when unreadable."""
        p = d / MANIFEST
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{p}: unreadable cache manifest ({exc}); delete {d} to re-encode") from None

    @staticmethod
    def _write_manifest(d: Path, expect: dict, shard_size: int, dim: int | None, done: list[int],
                        status: str) -> None:
        """Write ``ids.json`` (first time) and ``manifest.json`` atomically."""
        if not (d / IDS).is_file():
            atomic_write_json(d / IDS, expect["ids"], indent=None)
        man = {k: v for k, v in expect.items() if k != "ids"}
        man.update(shard_size=shard_size, dim=dim, dtype="float16", completed_shards=sorted(done),
                   status=status, vectors=VECTORS if status == "complete" else None,
                   updated=time.strftime("%Y-%m-%dT%H:%M:%S"))
        atomic_write_json(d / MANIFEST, man)

    @staticmethod
    def _shard_len(s: int, shard_size: int, n: int) -> int:
        """Rows of shard ``s``."""
        return min(shard_size, n - s * shard_size)

    def _done_shards(self, d: Path, n_shards: int, shard_size: int, n: int) -> set[int]:
        """Shards whose file exists with the right row count (atomic writes: present means complete)."""
        done = set()
        for s in range(n_shards):
            f = d / f"shard_{s:05d}.npy"
            if f.is_file():
                arr = np.load(f, mmap_mode="r")
                if arr.ndim == 2 and arr.shape[0] == self._shard_len(s, shard_size, n) and arr.dtype == np.float16:
                    done.add(s)
                else:
                    logger.warning("%s: unexpected shape %s / dtype %s; re-encoding", f, arr.shape, arr.dtype)
        return done

    def _encode_shards(self, d: Path, name: str, items: Sequence[dict], todo: list[int], shard_size: int,
                       encode_fn: Callable[[list[dict]], Any], expect: dict, done: set[int]) -> int:
        """Encode the shards ``todo`` (each written atomically); returns the number of items encoded."""
        from tqdm import tqdm

        n, n_enc = len(items), 0
        single = dist.get_world_size() == 1
        for s in tqdm(todo, desc=f"encode {name}", unit="shard", disable=progress_disabled() or not todo):
            lo, hi = s * shard_size, min(n, (s + 1) * shard_size)
            vecs = encode_fn(list(items[lo:hi]))
            if hasattr(vecs, "detach"):
                vecs = vecs.detach().float().cpu().numpy()
            vecs = np.asarray(vecs)
            if vecs.ndim != 2 or vecs.shape[0] != hi - lo:
                raise DataError(f"{name}: encode_fn returned shape {vecs.shape} for shard {s} "
                                f"({hi - lo} items, ids {expect['ids'][lo]}..{expect['ids'][hi - 1]})")
            with atomic_path(d / f"shard_{s:05d}.npy") as tmp, open(tmp, "wb") as fh:
                np.save(fh, vecs.astype(np.float16))
            n_enc += hi - lo
            self.stats["encode_calls"] += 1
            done.add(s)
            if single:  # progress record for humans; the shard files are the truth on resume
                self._write_manifest(d, expect, shard_size, int(vecs.shape[1]), sorted(done), "encoding")
        return n_enc

    def _consolidate(self, d: Path, expect: dict, n_shards: int, shard_size: int) -> None:
        """Rank 0: copy the complete shards into ``vectors.npy`` (atomic), write the final manifest,
        then delete the shard files."""
        n = expect["n_items"]
        missing = sorted(set(range(n_shards)) - self._done_shards(d, n_shards, shard_size, n))
        if missing:
            raise DataError(f"{d}: shards {missing[:10]} missing after encoding (a rank failed?)")
        dim = int(np.load(d / "shard_00000.npy", mmap_mode="r").shape[1])
        with atomic_path(d / VECTORS) as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, dim))
            for s in range(n_shards):
                out[s * shard_size: s * shard_size + self._shard_len(s, shard_size, n)] = \
                    np.load(d / f"shard_{s:05d}.npy", mmap_mode="r")
            out.flush()
            del out
        self._write_manifest(d, expect, shard_size, dim, list(range(n_shards)), "complete")
        for s in range(n_shards):
            (d / f"shard_{s:05d}.npy").unlink(missing_ok=True)
