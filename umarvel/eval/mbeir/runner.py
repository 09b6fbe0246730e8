"""M-BEIR evaluation, local and global, on the shared embedding cache and exact search.

Three layers, so that hard-negative mining (train pools) reuses the same cache + search path:

1. :func:`encode_records` / :func:`search_embeddings`: encoder-agnostic building blocks. An *encoder* is
   anything with ``fingerprint()``, ``encode_queries(items, batch_size=)`` and
   ``encode_candidates(items, batch_size=)`` (:class:`umarvel.api.UMarvel`, or a wrapper of it).
   Every query file / pool goes through :class:`~umarvel.eval.cache.EmbeddingCache`, so it is encoded
   once per checkpoint + settings, resumably, sharded by rank under torchrun.
2. :func:`evaluate_mbeir`: given an encoder and a :class:`MBeirEvalConfig`, load the tasks (instructions
   per D7, seed recorded), encode, search the top ``max(cutoffs)`` candidates (local pool, or the global
   pool = the 16 local pools' cached vectors concatenated in registry order, no modality filter, no
   dedup: D8), score with the official hit-rate Recall@k and write the outputs (rank 0 only).
3. :func:`run_mbeir_eval`: load the model from the config (one per rank under torchrun), run 2, tear
   down the process group.

Outputs in ``cfg.output``::

    results.json   results.md   config.yaml (resolved settings)   run.json (provenance, encode counts)
    runs/<task>_<split>.trec   (qid Q0 did rank score run_id)

The cache defaults to ``<output>/../cache``, so ``.../local`` and ``.../global`` output folders share it
(and their ``results.md`` show both protocols side by side).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections import ChainMap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from umarvel import dist
from umarvel.api import UMarvel
from umarvel.config import save_resolved
from umarvel.errors import ConfigError, DataError, ImageLoadError
from umarvel.eval.cache import DEFAULT_SHARD_SIZE, CachedEmbeddings, EmbeddingCache, concat_cached, encoder_settings
from umarvel.data.mbeir import (
    TaskData, check_known_ids, load_mbeir_task, read_instructions, read_pool, read_pool_modalities, read_qrels,
    read_queries,
)
from umarvel.eval.mbeir.config import MBeirEvalConfig
from umarvel.eval.metrics import TaskResult, score_task
from umarvel.eval.outputs import RESULTS_JSON, build_results, write_results
from umarvel.data.records import Candidate, Query
from umarvel.data.runfiles import write_trec_run
from umarvel.data.registry import (
    GLOBAL_PROTOCOL, LOCAL_PROTOCOL, MBEIR_INSTRUCTIONS, MBEIR_TASK_ORDER, MBEIR_UNION_POOLS,
    Task, get_task, resolve_tasks,
)
from umarvel.eval.search import make_searcher
from umarvel.utils.checks import scan_images
from umarvel.utils.compat import DEFAULT, is_official
from umarvel.utils.io import atomic_write_json

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
RUN_INFO_FILE = "run.json"
RUNS_DIR = "runs"
#: ``compat="official"``: the batch size of the official local eval (``eval/eval_mbeir_local_finetune_fast.py``:
#: ``DataLoader(batch_size=16)`` over the query file and the pool file in file order); the global eval reuses
#: the local pools' vectors.
OFFICIAL_BATCH_SIZE = 16


# ---------------------------------------------------------------------------- encoder-level helpers
def _role(records: Sequence[Query | Candidate]) -> str:
    """``"query"`` or ``"candidate"``; DataError for a mixed or empty list."""
    kinds = {type(r) for r in records}
    if kinds == {Query}:
        return "query"
    if kinds == {Candidate}:
        return "candidate"
    raise DataError(f"expected a non-empty list of only Query or only Candidate records, got {sorted(k.__name__ for k in kinds)}")


def _record_id(record: Query | Candidate) -> str:
    return record.qid if isinstance(record, Query) else record.did


class _ShardEncoder:
    """The cache's ``encode_fn``: checks image files first (naming file, record and path), then encodes
    one shard with the encoder; items carry their record id under ``"id"`` (stripped before encoding)."""

    def __init__(self, encoder: Any, role: str, batch_size: int, where: str, fill: list[dict] | None = None):
        self.encoder, self.role, self.batch_size, self.where = encoder, role, batch_size, where
        self.fill = fill  # compat="official": the list's first items complete its last partial batch

    def __call__(self, items: list[dict]) -> np.ndarray:
        for it in items:
            img = it.get("image")
            if isinstance(img, (str, os.PathLike)) and not os.path.isfile(img):
                raise ImageLoadError(f"{self.where}: {self.role} {it['id']}: image file not found: {img}")
        plain = [{k: v for k, v in it.items() if k != "id"} for it in items]
        fn = self.encoder.encode_queries if self.role == "query" else self.encoder.encode_candidates
        extra = {} if self.fill is None else {"fill": [{k: v for k, v in it.items() if k != "id"} for it in self.fill]}
        try:
            return fn(plain, batch_size=self.batch_size, **extra)
        except ImageLoadError as exc:
            raise ImageLoadError(f"{self.where}: {self.role}s {items[0]['id']} .. {items[-1]['id']}: {exc}") from exc


def encode_records(encoder: Any, records: Sequence[Query | Candidate], cache: EmbeddingCache, name: str, *,
                   fingerprint: str | None = None, batch_size: int = 32, shard_size: int = DEFAULT_SHARD_SIZE,
                   source: str | os.PathLike | None = None, where: str | None = None,
                   compat: str = DEFAULT) -> CachedEmbeddings:
    """Embeddings of queries or candidates through the cache (encoded only if not cached yet).

    Args:
        encoder: an *encoder* (see the module doc).
        records: N ``Query`` (instructions already assigned) or N ``Candidate`` objects, unique ids.
        cache: the embedding cache; the entry key covers ``name``, the encoder fingerprint and settings,
            the role and ``source``.
        name: cache entry name (e.g. ``"mbeir_webqa_task2_cand_pool"``); reuse requires the same name.
        fingerprint: ``encoder.fingerprint()`` precomputed (optional).
        source: the file the records came from (cheap identity: path, size, mtime); ``None`` hashes the
            items instead (use it when the items are built in memory, e.g. queries with instructions).
        where: context for error messages (default: ``source`` or ``name``).
        compat: ``"official"``: batches of ``batch_size`` in record order across shards (the shard size is
            rounded down to a multiple of it), the last one completed with the first records (the encoder
            must have been loaded with ``compat="official"``).
    Returns:
        :class:`CachedEmbeddings`: ``ids`` (N,) and float16 ``vectors`` (N, D), record order.
    Raises:
        DataError: no records; ImageLoadError naming the file, record id and image path.
    """
    if not records:
        raise DataError(f"{where or source or name}: nothing to encode (0 records)")
    role = _role(records)
    items = [dict(r.to_encode_item(), id=_record_id(r)) for r in records]
    ids = [it["id"] for it in items]
    settings = {"role": role, "encode": encoder_settings(encoder)}
    fill = None
    if is_official(compat):
        settings["official_batch_size"] = batch_size  # official batches change the vectors (D5)
        shard_size = max(batch_size, shard_size // batch_size * batch_size)
        fill = items[:batch_size]
    fn = _ShardEncoder(encoder, role, batch_size, str(where or source or name), fill)
    return cache.get_or_encode(name, items, ids, fn, fingerprint=fingerprint or encoder.fingerprint(),
                               settings=settings, shard_size=shard_size, source=source)


@dataclass
class Retrieval:
    """Top-k of each query over one pool.

    Attributes:
        qids: (Q,) query ids.
        pool_ids: (N,) candidate ids of the searched pool (indices point into it).
        scores: (Q, k) float32, best first; ``-inf`` for padding.
        indices: (Q, k) int64 rows of the pool; ``-1`` for padding (k > N).
    """

    qids: list[str]
    pool_ids: Sequence[str]
    scores: np.ndarray
    indices: np.ndarray

    @property
    def dids(self) -> np.ndarray:
        """(Q, k) object array of retrieved candidate ids, ``""`` for padding."""
        ids = np.asarray(list(self.pool_ids) + [""], dtype=object)
        return ids[np.where(self.indices >= 0, self.indices, len(self.pool_ids))]


def search_embeddings(queries: CachedEmbeddings, pool: CachedEmbeddings, k: int, *, backend: str = "torch",
                      device: Any = None, searcher: Any = None) -> Retrieval:
    """Exact (or approximate, per ``backend``) cosine top-``k`` of cached queries over a cached pool.

    The pool's float16 blocks are streamed (never concatenated) and re-normalised in fp32 on the fly
    (``normalize=True``), as are the queries, so the ranking is that of the fp32 unit vectors up to the fp16
    rounding of their directions; pass a prebuilt ``searcher`` (:func:`umarvel.eval.search.make_searcher` over
    ``pool`` with ``normalize=True``) to search many query sets in one index.
    """
    searcher = searcher or make_searcher(pool, backend=backend, device=device, normalize=True)
    scores, indices = searcher.search(queries.vectors, k)
    return Retrieval(qids=list(queries.ids), pool_ids=pool.ids, scores=scores, indices=indices)


# ----------------------------------------------------------------------------------- task loading
def _missing_files(root: Path, task: Task, split: str) -> list[str]:
    files = task.files(split)
    return [str(root / f) for f in (files.queries, files.pool, files.qrels) if not (root / f).is_file()]


def select_tasks(root: str | os.PathLike, names: Sequence[str] | None, split: str) -> tuple[list[Task], list[str]]:
    """The tasks to evaluate and the names of those skipped.

    With ``names=None`` (all 16) a task whose query, pool or qrels file is absent is skipped with one
    warning line; named tasks must all be present (DataError listing every missing file).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: M-BEIR root not found")
    if names is not None and not names:
        raise ConfigError("no task named (give task names, or null / 'all' for all 16)")
    tasks = resolve_tasks(list(names) if names is not None else None, "mbeir")
    missing = {t.name: _missing_files(root, t, split) for t in tasks}
    if names is not None:
        bad = {n: m for n, m in missing.items() if m}
        if bad:
            raise DataError(f"{root}: requested task file(s) missing for split {split!r}: "
                            + "; ".join(f"{n}: {', '.join(m)}" for n, m in bad.items()))
        return tasks, []
    skipped = [t.name for t in tasks if missing[t.name]]
    for n in skipped:
        logger.warning("skipping %s (%s): missing %s", n, split, ", ".join(missing[n]))
    kept = [t for t in tasks if not missing[t.name]]
    if not kept:
        raise DataError(f"{root}: no M-BEIR task of split {split!r} is present (expected e.g. "
                        f"{get_task(MBEIR_TASK_ORDER[0]).files(split).queries})")
    return kept, skipped


def _check_pool_file(path: Path) -> None:
    """DataError when a pool file has no candidate line (an empty pool cannot be searched)."""
    with path.open("r", encoding="utf-8") as fh:
        if any(line.strip() for line in fh):
            return
    raise DataError(f"{path}: candidate pool is empty (0 candidates); nothing can be retrieved from it")


def _load_pool(root: Path, rel: str) -> list[Candidate]:
    """A local pool file, checked to be non-empty."""
    path = root / rel
    _check_pool_file(path)
    return read_pool(path, root)


def _wanted_ids(root: Path, tasks: Sequence[Task], split: str) -> set[str]:
    """Every positive named by the tasks' query files and qrels (ids whose modality may be needed)."""
    out: set[str] = set()
    for t in tasks:
        files = t.files(split)
        for q in read_queries(root / files.queries, root):
            out.update(q.positives)
        for dids in read_qrels(root / files.qrels).values():
            out.update(dids)
    return out


def _union_modalities(root: Path, tasks: Sequence[Task], split: str) -> dict[str, str]:
    """``{did: modality}`` of the tasks' positives from the union pool file (the official instruction
    lookup); empty, with an info line, when the file is absent."""
    path = root / MBEIR_UNION_POOLS[split]
    if not path.is_file():
        logger.info("%s not found: positive modalities come from the local pools only", path)
        return {}
    wanted = _wanted_ids(root, tasks, split)
    t0 = time.perf_counter()
    out = read_pool_modalities(path, wanted)
    logger.info("modalities of %d / %d positives read from %s in %.1fs", len(out), len(wanted), path,
                time.perf_counter() - t0)
    return out


# -------------------------------------------------------------------------------------- evaluation
@dataclass
class MBeirEvalResult:
    """What one evaluation produced.

    Attributes:
        results: the ``results.json`` object (``None`` on ranks other than 0).
        output: the output folder.
        tasks: per-task scores (rank 0), paper order.
        retrievals: ``{task name: Retrieval}`` (rank 0).
        query_embeddings: ``{task name: CachedEmbeddings}``.
        pools: ``{task name: CachedEmbeddings}`` of the local pools encoded / reused.
        global_pool: the concatenated pool (global protocol), else ``None``.
        skipped: tasks skipped because their files are absent.
        encode_stats: the cache's ``{"encoded", "reused", "encode_calls"}`` counters for this run.
    """

    results: dict | None
    output: Path
    tasks: list[TaskResult] = field(default_factory=list)
    retrievals: dict[str, Retrieval] = field(default_factory=dict)
    query_embeddings: dict[str, CachedEmbeddings] = field(default_factory=dict)
    pools: dict[str, CachedEmbeddings] = field(default_factory=dict)
    global_pool: CachedEmbeddings | None = None
    skipped: list[str] = field(default_factory=list)
    encode_stats: dict = field(default_factory=dict)


def _pool_name(rel: str) -> str:
    """Cache entry name of a pool file (``mbeir_mscoco_task0_test_cand_pool``); shared by both protocols."""
    return Path(rel).name.removesuffix(".jsonl")


def _query_name(task: Task, split: str) -> str:
    return f"mbeir_{task.name}_{split}_queries"


def _default_search_device(encoder: Any) -> Any:
    dev = getattr(encoder, "device", None)
    return str(dev) if dev is not None else None


def evaluate_mbeir(encoder: Any, cfg: MBeirEvalConfig, *, check_images: bool = True) -> MBeirEvalResult:
    """Evaluate ``encoder`` on M-BEIR (``cfg.protocol``) and write the outputs into ``cfg.output``.

    Every rank reads the data and encodes its share of each cache entry (torchrun); rank 0 then
    searches, scores and writes; all ranks meet at a final barrier.

    Args:
        encoder: an *encoder* (see the module doc; its ``device`` attribute, if any, is the default search device).
        cfg: the run settings.
        check_images: check every referenced image (exists, readable header) before encoding anything.
    Raises:
        DataError: missing files of requested tasks, malformed records, unknown positive ids (unless
            ``allow_missing``), an empty pool or query file, a missing image file.
    """
    t_start = time.perf_counter()
    enc_compat = encoder_settings(encoder).get("compat", DEFAULT)
    if enc_compat != cfg.compat:
        raise ConfigError(f"the config says compat {cfg.compat!r} but the encoder was loaded with compat "
                          f"{enc_compat!r} (UMarvel.from_pretrained(..., compat={cfg.compat!r}))")
    root = Path(cfg.mbeir_root)
    out_dir = Path(cfg.output)
    cache = EmbeddingCache(cfg.resolved_cache_dir())
    stats0 = dict(cache.stats)
    tasks, skipped = select_tasks(root, cfg.tasks, cfg.split)
    table = read_instructions(root / MBEIR_INSTRUCTIONS)
    logger.info("M-BEIR %s (%s): %d task(s): %s", cfg.protocol, cfg.split, len(tasks), ", ".join(t.name for t in tasks))

    # Pools: each task's own, plus (global) every other local pool of the split present in the tree.
    pool_files = {t.name: t.files(cfg.split).pool for t in tasks}
    pools: dict[str, list[Candidate]] = {}  # local protocol: the readers load each task's pool
    modalities: Mapping[str, str] = _union_modalities(root, tasks, cfg.split)
    if cfg.protocol == "global":
        pool_files = {}
        for name in MBEIR_TASK_ORDER:
            rel = get_task(name).files(cfg.split).pool
            if (root / rel).is_file():
                pool_files[name] = rel
            elif name not in skipped:  # skipped tasks were already reported once
                logger.warning("global pool: %s missing; the union is incomplete (not the official "
                               "16-pool M-BEIR global pool)", rel)
        if len(pool_files) < len(MBEIR_TASK_ORDER):
            logger.warning("global pool = %d of the 16 local pools", len(pool_files))
        # every pool is read here once: any of them may hold a positive (OVEN <-> InfoSeek) or be searched
        pools = {n: _load_pool(root, rel) for n, rel in pool_files.items()}
        concat_map = {c.did: c.modality for n in pool_files for c in pools[n]}
        modalities = ChainMap(dict(modalities), concat_map)  # type: ignore[assignment]

    data: dict[str, TaskData] = {}
    for t in tasks:
        _check_pool_file(root / t.files(cfg.split).pool)
        d = load_mbeir_task(root, t, cfg.split, instructions=table, instruction_mode=cfg.instruction,
                            seed=cfg.seed, global_modalities=modalities, allow_missing=cfg.allow_missing)
        if not d.queries:
            raise DataError(f"{root / t.files(cfg.split).queries}: no queries")
        if cfg.protocol == "global":
            check_known_ids(d.queries, d.qrels, concat_map, allow_missing=cfg.allow_missing,
                            where=f"{t.name} ({cfg.split}) against the global pool")
        data[t.name] = d

    if check_images:  # before anything is encoded (each rank checks its share)
        scan_images(_image_refs(root, cfg.split, tasks, data, pools, pool_files), what="M-BEIR queries and pools",
                    shard=(dist.get_rank(), dist.get_world_size()))
    # Encode (every rank takes its share of each entry; cache entries are shared across protocols).
    fp = encoder.fingerprint()
    batch_size = OFFICIAL_BATCH_SIZE if is_official(cfg.compat) else cfg.batch_size
    if is_official(cfg.compat) and cfg.batch_size != OFFICIAL_BATCH_SIZE:
        logger.info("compat official: encoding in the official batches of %d in file order (batch_size %d unused)",
                    OFFICIAL_BATCH_SIZE, cfg.batch_size)
    enc = dict(fingerprint=fp, batch_size=batch_size, shard_size=cfg.shard_size, compat=cfg.compat)
    q_emb = {t.name: encode_records(encoder, data[t.name].queries, cache, _query_name(t, cfg.split),
                                    where=str(root / t.files(cfg.split).queries), **enc) for t in tasks}
    p_emb = {}
    for n, rel in pool_files.items():
        recs = data[n].pool if n in data else pools[n]
        p_emb[n] = encode_records(encoder, recs, cache, _pool_name(rel), source=root / rel, **enc)
    glob = concat_cached([p_emb[n] for n in pool_files]) if cfg.protocol == "global" else None
    stats = {k: cache.stats[k] - stats0.get(k, 0) for k in cache.stats}
    result = MBeirEvalResult(results=None, output=out_dir, query_embeddings=q_emb, pools=p_emb, global_pool=glob,
                             skipped=skipped, encode_stats=stats)
    dist.barrier()
    if dist.get_rank() != 0:
        dist.barrier()
        return result

    # Search, score, write (rank 0).
    device = cfg.search_device or _default_search_device(encoder)
    searcher = make_searcher(glob, backend=cfg.backend, device=device, normalize=True) if glob is not None else None
    run_dir = out_dir / RUNS_DIR
    for t in tasks:
        pool = glob if glob is not None else p_emb[t.name]
        ret = search_embeddings(q_emb[t.name], pool, t.search_depth, backend=cfg.backend, device=device,
                                searcher=searcher)
        dids = ret.dids
        res = score_task(t, dids, data[t.name].positives(), pool_size=len(pool))
        write_trec_run(run_dir / f"{t.name}_{cfg.split}.trec", ret.qids, dids, ret.scores,
                       run_id=f"umarvel_{cfg.protocol}_{t.name}_{cfg.split}_k{t.search_depth}")
        result.retrievals[t.name] = ret
        result.tasks.append(res)
        logger.info("%s: %s = %.2f (%d queries, pool %d)", t.name, t.metric, res.value, res.num_queries, res.pool_size)
    results = build_results(protocol=cfg.protocol, model=str(Path(cfg.model).resolve()),
                            split=cfg.split, instruction_mode=cfg.instruction, instruction_seed=cfg.seed,
                            tasks=result.tasks, compat=cfg.compat)
    write_results(out_dir, results)
    save_resolved(cfg, out_dir / CONFIG_FILE)
    atomic_write_json(out_dir / RUN_INFO_FILE, {
        "protocol": cfg.protocol, "description": GLOBAL_PROTOCOL if cfg.protocol == "global" else LOCAL_PROTOCOL,
        "split": cfg.split, "compat": cfg.compat, "model": results["model"], "fingerprint": fp, "encode_settings": encoder_settings(encoder),
        "evaluated_tasks": [t.name for t in tasks], "skipped_tasks": skipped,
        "average_over": f"{len(tasks)} task(s)" + ("" if len(tasks) == len(MBEIR_TASK_ORDER) else
                                                   " (not the 16-task M-BEIR average)"),
        "cache_dir": str(cache.root.resolve()), "encode_stats": stats,
        "pools": [{"task": n, "file": pool_files[n], "size": len(p_emb[n]), "cache_entry": str(p_emb[n].path)}
                  for n in pool_files],
        "global_pool_size": len(glob) if glob is not None else None,
        "world_size": dist.get_world_size(), "backend": cfg.backend, "search_device": str(device),
        "seconds": round(time.perf_counter() - t_start, 3),
    })
    result.results = results
    logger.info("M-BEIR %s average over %d task(s): %.2f -> %s", cfg.protocol, len(tasks), results["average"],
                out_dir / RESULTS_JSON)
    dist.barrier()
    return result


def _image_refs(root: Path, split: str, tasks: Sequence[Task], data: Mapping[str, TaskData],
                pools: Mapping[str, list[Candidate]], pool_files: Mapping[str, str]) -> Iterator[tuple[str, str]]:
    """``(image, "file: query|candidate id")`` of every record about to be encoded."""
    for t in tasks:
        where = root / t.files(split).queries
        yield from ((q.image, f"{where}: query {q.qid}") for q in data[t.name].queries if q.image)
    for n, rel in pool_files.items():
        recs = data[n].pool if n in data else pools[n]
        yield from ((c.image, f"{root / rel}: candidate {c.did}") for c in recs if c.image)


# ---------------------------------------------------------------------------------- model + torchrun
def run_mbeir_eval(cfg: MBeirEvalConfig, *, check_images: bool = True) -> MBeirEvalResult:
    """Load the model and evaluate (the commands' entry point); torchrun-aware.

    The resolved config written next to the results records the device and dtype actually used.
    """
    device = dist.device_for_rank(cfg.device)
    with dist.process_group(device):
        encoder = UMarvel.from_pretrained(cfg.model, device=device, dtype=cfg.dtype, compat=cfg.compat)
        resolved = dataclasses.replace(cfg, device=str(device), dtype=str(encoder.settings.dtype),
                                       cache_dir=str(cfg.resolved_cache_dir().resolve()),
                                       search_device=cfg.search_device or str(device))
        return evaluate_mbeir(encoder, resolved, check_images=check_images)
