"""Hard-negative mining on the M-BEIR train split and the 10% distillation subset (method spec 5.2-5.4).

:func:`mine` (the ``umarvel mine`` command):

1. Partition the union-train rows (``mbeir_union_up_train.jsonl``, up-sampled, qids repeat) into the 16 tasks by
   (dataset id of the qid, ``task_id``) (registry ``Task.train``); each task's queries are deduplicated by qid
   (first occurrence) and get an instruction per D7 (seeded, keyed by a random positive's modality).
2. Per-task train pools: the train-pool candidates whose dataset id is in the task's set and whose modality is
   the task's target modality. Tasks with the same (dataset set, modality) share one pool, encoded once
   (OVEN/InfoSeek tasks 6 and 8). The global train pool is the concatenation of the distinct pools in registry
   order, each did once (the official concatenation held the OVEN/InfoSeek pools twice).
3. Retrieve the top ``k`` (100) of each query through :func:`umarvel.eval.mbeir.runner.encode_records` and
   :func:`~umarvel.eval.mbeir.runner.search_embeddings` (embedding cache + exact search; INFERENCE style,
   suffix on, D3), in its local pool and/or the global pool; also the cosine of each ground-truth doc
   (``gt_scores``, for the stage-4 margin option).
4. Write, per scope, ``rerank_data_all_eval_train_{local,global}.jsonl`` (:mod:`umarvel.data.runfiles`): one line
   per union-train row, same order, ``{qid, gt_docs, top100_docs, score, gt_scores}`` (``top100_docs`` is the raw
   retrieved list, which may hold positives: consumers exclude ``gt_docs``). ``gt_docs`` are the task's train qrels
   (fallback: ``pos_cand_list``).
5. Draw the distillation subset (:func:`draw_distill_subset`): per task, ``random.sample`` of
   ``floor(fraction * n)`` of its union-train qid occurrences, one ``random.Random(seed)`` consumed in registry
   task order; the union rows whose qid was drawn, one per draw, in union-train order, are written verbatim to
   ``mbeir_union_up_train_10percent.jsonl``.

Resume: the cache resumes encoding shard by shard; each (scope, task) result is written atomically to
``parts/`` and reused when its settings match; ``mine_done.json`` marks a complete run.
"""
from __future__ import annotations

import json
import logging
import os
import random
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from umarvel.errors import ConfigError, DataError
from umarvel.data.mbeir import (DEFAULT_INSTRUCTION_SEED, assign_instructions, dataset_id_of, instruction_rng,
                                        parse_query, read_instructions, read_pool, read_qrels)
from umarvel.data.records import Candidate, Query
from umarvel.data.registry import (MBEIR_INSTRUCTIONS, MBEIR_UNION_POOLS, MBEIR_UNION_TRAIN_QUERIES, Task,
                                   list_tasks)
from umarvel.data.runfiles import MinedRow, mined_file_name, write_mined
from umarvel.pipelines.preflight import start_mine_run
from umarvel.utils.checks import scan_images
from umarvel.utils.io import atomic_path, atomic_write_json, iter_jsonl

logger = logging.getLogger(__name__)

SCOPES: tuple[str, ...] = ("local", "global")
DONE_FILE = "mine_done.json"
SUBSET_FILE = "mbeir_union_up_train_10percent.jsonl"
SUBSET_INFO = "distill_subset.json"
PathLike = str | os.PathLike


@dataclass(frozen=True)
class MineConfig:
    """Settings of one mining run.

    Attributes:
        model: embedding checkpoint (stage 3 merged for stage 4; stage 4 merged for the stage-5 teacher lists).
        mbeir_root: M-BEIR root. output: output folder.
        queries / pool / instructions: absolute, existing, or relative to the root (defaults: union train files).
        top_k: retrieved candidates per query (100).
        scope: ``local``, ``global`` or ``both``.
        subset: also draw the distillation subset; ``subset_fraction`` / ``subset_seed``: 0.1 / 42.
        instruction / seed: D7 instruction choice of the queries.
        batch_size / shard_size / device / dtype / cache_dir / backend: encoding and search.
    """

    model: str
    mbeir_root: str
    output: str
    queries: str = MBEIR_UNION_TRAIN_QUERIES
    pool: str = MBEIR_UNION_POOLS["train"]
    instructions: str = MBEIR_INSTRUCTIONS
    top_k: int = 100
    scope: str = "both"
    subset: bool = True
    subset_fraction: float = 0.1
    subset_seed: int = 42
    instruction: str = "random"
    seed: int = DEFAULT_INSTRUCTION_SEED
    batch_size: int = 32
    shard_size: int = 16384
    device: str | None = None
    dtype: str | None = None
    cache_dir: str | None = None
    backend: str = "torch"

    def __post_init__(self) -> None:
        if self.scope not in (*SCOPES, "both"):
            raise ConfigError(f"scope must be local, global or both, got {self.scope!r}")
        if self.top_k < 1:
            raise ConfigError(f"top_k must be >= 1, got {self.top_k}")
        if not 0.0 < self.subset_fraction <= 1.0:
            raise ConfigError(f"subset_fraction must be in (0, 1], got {self.subset_fraction}")
        if self.batch_size < 1 or self.shard_size < 1:
            raise ConfigError(f"batch_size and shard_size must be >= 1, got {self.batch_size}, {self.shard_size}")

    @property
    def scopes(self) -> tuple[str, ...]:
        return SCOPES if self.scope == "both" else (self.scope,)

    def path(self, rel: str) -> Path:
        """``rel`` if absolute or an existing path, else relative to the M-BEIR root."""
        p = Path(rel)
        return p if p.is_absolute() or p.exists() else Path(self.mbeir_root) / p


# ------------------------------------------------------------------------------------------ partition
@dataclass
class TrainRows:
    """The union-train rows and their task partition.

    Attributes:
        path: the query file. queries: one :class:`Query` per row (order kept, qids repeat).
        lines: line number of each row. records: the raw JSON of each row (for verbatim subset writing).
        task_of_row: registry task name of each row.
        task_queries: ``{task: unique queries in first-occurrence order}`` (tasks with rows only).
    """

    path: Path
    queries: list[Query] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    records: list[str] = field(default_factory=list)
    task_of_row: list[str] = field(default_factory=list)
    task_queries: dict[str, list[Query]] = field(default_factory=dict)


def task_of(query: Query, tasks: Sequence[Task]) -> Task | None:
    """The M-BEIR task a train query belongs to, by (dataset id of its qid, task_id)."""
    for t in tasks:
        if t.train is not None and t.train.selects_query(query.dataset_id, query.task_id):
            return t
    return None


def partition_train_queries(path: PathLike, root: PathLike, tasks: Sequence[Task] | None = None) -> TrainRows:
    """Read the union-train rows and group them into the 16 tasks (deduplicated by qid per task).

    Raises:
        DataError: naming ``file:line`` for a malformed row, or a row of no M-BEIR task.
    """
    tasks = list(tasks or list_tasks("mbeir"))
    out = TrainRows(Path(path))
    seen: dict[str, set[str]] = {}
    for lineno, rec in iter_jsonl(path):
        where = f"{path}:{lineno}"
        q = parse_query(rec, Path(root), where)
        t = task_of(q, tasks)
        if t is None:
            raise DataError(f"{where}: query {q.qid} (dataset {q.dataset_id}, task_id {q.task_id}) belongs to none "
                            f"of the M-BEIR tasks")
        out.queries.append(q)
        out.lines.append(lineno)
        out.records.append(json.dumps(rec, ensure_ascii=False))
        out.task_of_row.append(t.name)
        if q.qid not in seen.setdefault(t.name, set()):
            seen[t.name].add(q.qid)
            out.task_queries.setdefault(t.name, []).append(q)
    if not out.queries:
        raise DataError(f"{path}: no query rows")
    order = {t.name: i for i, t in enumerate(tasks)}
    out.task_queries = dict(sorted(out.task_queries.items(), key=lambda kv: order[kv[0]]))
    return out


def pool_key(task: Task) -> tuple[tuple[int, ...], str]:
    """Identity of a task's train pool: (sorted dataset ids, target modality)."""
    return tuple(sorted(task.train.pool_dataset_ids)), task.train.pool_modality


def pool_name(key: tuple[tuple[int, ...], str]) -> str:
    """Cache entry name of a train pool, e.g. ``mbeir_train_pool_d5-6_text``."""
    ids, modality = key
    return f"mbeir_train_pool_d{'-'.join(map(str, ids))}_{modality.replace(',', '-')}"


def build_train_pools(pool: Sequence[Candidate], tasks: Sequence[Task]) -> dict[tuple, list[Candidate]]:
    """``{pool_key: candidates in pool-file order}`` for the distinct pools of ``tasks`` (registry order)."""
    out: dict[tuple, list[Candidate]] = {}
    for t in tasks:
        out.setdefault(pool_key(t), [])
    for c in pool:
        d = dataset_id_of(c.did)
        for key, members in out.items():
            if d in key[0] and c.modality == key[1]:
                members.append(c)
    return out


# ---------------------------------------------------------------------------------------- gt docs
def load_gt_docs(cfg: MineConfig, rows: TrainRows, tasks: Sequence[Task]) -> dict[str, tuple[str, ...]]:
    """``{qid: gt dids}``: each task's train qrels (relevance > 0), else the row's ``pos_cand_list``."""
    by_name = {t.name: t for t in tasks}
    gt: dict[str, tuple[str, ...]] = {}
    disagree = 0
    for name, queries in rows.task_queries.items():
        path = cfg.path(by_name[name].train.qrels)
        qrels = read_qrels(path) if path.is_file() else {}
        if not qrels:
            logger.info("%s: no train qrels at %s; gt_docs = pos_cand_list", name, path)
        for q in queries:
            g = qrels.get(q.qid) or q.positives
            disagree += set(g) != set(q.positives)
            gt[q.qid] = tuple(g)
    if disagree:
        logger.warning("%d train queries: qrels positives differ from pos_cand_list (gt_docs follow the qrels; "
                       "stage 4 excludes both)", disagree)
    return gt


# -------------------------------------------------------------------------------------- 10% subset
def draw_distill_subset(rows: TrainRows, fraction: float = 0.1, seed: int = 42,
                        tasks: Sequence[Task] | None = None) -> list[int]:
    """Row indices of the distillation subset (method spec 5.4), in union-train order.

    Per task (registry order) ``rng.sample(qid occurrences, floor(fraction * n))`` with one
    ``random.Random(seed)``; each drawn occurrence takes the next union row of that qid.
    """
    tasks = list(tasks or list_tasks("mbeir"))
    rng = random.Random(seed)
    drawn: Counter[str] = Counter()
    for t in tasks:
        occ = [q.qid for q, name in zip(rows.queries, rows.task_of_row) if name == t.name]
        n = int(len(occ) * fraction)
        if occ and n == 0:
            logger.warning("distillation subset: %s has %d rows; floor(%g * %d) = 0 drawn", t.name, len(occ),
                           fraction, len(occ))
        drawn.update(rng.sample(occ, n))
    keep = []
    for i, q in enumerate(rows.queries):
        if drawn[q.qid] > 0:
            drawn[q.qid] -= 1
            keep.append(i)
    return keep


def write_distill_subset(cfg: MineConfig, rows: TrainRows, tasks: Sequence[Task]) -> Path:
    """Write ``mbeir_union_up_train_10percent.jsonl`` (rows verbatim) and ``distill_subset.json``; reused if
    the settings match."""
    out = Path(cfg.output)
    info = {"source": str(rows.path.resolve()), "fraction": cfg.subset_fraction, "seed": cfg.subset_seed,
            "rows_total": len(rows.queries)}
    info_path = out / SUBSET_INFO
    if (out / SUBSET_FILE).is_file() and info_path.is_file():
        old = json.loads(info_path.read_text())
        if {k: old.get(k) for k in info} == info:
            logger.info("distillation subset already drawn: %s", out / SUBSET_FILE)
            return out / SUBSET_FILE
    keep = draw_distill_subset(rows, cfg.subset_fraction, cfg.subset_seed, tasks)
    with atomic_path(out / SUBSET_FILE) as tmp, tmp.open("w", encoding="utf-8") as fh:
        for i in keep:
            fh.write(rows.records[i] + "\n")
    per_task = Counter(rows.task_of_row[i] for i in keep)
    atomic_write_json(info_path, {**info, "rows_drawn": len(keep), "per_task": dict(per_task)})
    logger.info("distillation subset: %d of %d rows -> %s", len(keep), len(rows.queries), out / SUBSET_FILE)
    return out / SUBSET_FILE


# ------------------------------------------------------------------------------------------- mining
def _gt_scores(q_vecs: np.ndarray, gt: Sequence[Sequence[str]], row_of: dict[str, int], blocks) -> list[list]:
    """Cosine of each query (Q, D) with each of its gt docs (None when the did is not in the pool)."""
    offsets = np.cumsum([0] + [len(b) for b in blocks])

    def vec(r: int) -> np.ndarray:
        j = int(np.searchsorted(offsets, r, side="right") - 1)
        return np.asarray(blocks[j][r - offsets[j]], dtype=np.float32)

    return [[None if d not in row_of else round(float(qv.astype(np.float32) @ vec(row_of[d])), 6) for d in dids]
            for qv, dids in zip(q_vecs, gt)]


def _part_path(out: Path, scope: str, task: str) -> Path:
    return out / "parts" / scope / f"{task}.json"


def _read_part(path: Path, settings: dict) -> dict | None:
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError:
        logger.warning("%s: unreadable part; mining the task again", path)
        return None
    if obj.get("settings") != settings:
        logger.warning("%s: mined with other settings; mining the task again", path)
        return None
    return obj["rows"]


def _mined_row(qid: str, part: dict) -> MinedRow:
    """A part entry ``{gt_docs, top100_docs, score, gt_scores}`` as the mined-list row of ``qid``."""
    return MinedRow(qid, tuple(part["gt_docs"]), tuple(part["top100_docs"]), tuple(part["score"]),
                    tuple(part["gt_scores"]))


def mine(cfg: MineConfig, encoder=None, *, overwrite: bool = False, check_images: bool = True) -> dict[str, Path]:
    """Run the mining of ``cfg`` (see the module doc); returns ``{scope: mined file}`` (+ ``"subset"``).

    Args:
        encoder: a loaded ``UMarvel`` (default: ``cfg.model`` loaded with INFERENCE style).
        overwrite: replace the files of another mining run in ``cfg.output`` (otherwise refused).
        check_images: check every referenced image before encoding anything.
    """
    with start_mine_run(cfg, overwrite=overwrite, encoder=encoder):  # checks + the output folder (lock, identity)
        return _mine(cfg, encoder, check_images)


def _mine(cfg: MineConfig, encoder, check_images: bool) -> dict[str, Path]:
    # lazy: commands.mine imports this module, and `umarvel --help` stays free of torch (tests/cli; measured:
    # `import umarvel.pipelines.mining` 0.4 s -> 3.9 s with these at the top)
    from umarvel.api import UMarvel  # lazy: the CLI imports this module for its config (no torch at start-up)
    from umarvel.dist import device_for_rank
    from umarvel.eval.cache import EmbeddingCache, concat_cached
    from umarvel.eval.mbeir.runner import encode_records, search_embeddings

    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(cfg.mbeir_root)
    tasks = list_tasks("mbeir")
    rows = partition_train_queries(cfg.path(cfg.queries), root, tasks)
    logger.info("%d union-train rows in %d task(s): %s", len(rows.queries), len(rows.task_queries),
                ", ".join(f"{n} {len(q)}" for n, q in rows.task_queries.items()))
    results: dict[str, Path] = {}
    if cfg.subset:
        results["subset"] = write_distill_subset(cfg, rows, tasks)
    if encoder is None:
        encoder = UMarvel.from_pretrained(cfg.model, device=device_for_rank(cfg.device), dtype=cfg.dtype)
    fp = encoder.fingerprint()
    cache = EmbeddingCache(cfg.cache_dir or out / "cache")
    by_name = {t.name: t for t in tasks}
    active = [by_name[n] for n in rows.task_queries]

    pool = read_pool(cfg.path(cfg.pool), root)
    pools = {k: v for k, v in build_train_pools(pool, tasks).items()
             if v or any(pool_key(t) == k for t in active)}  # all non-empty pools form the global one
    modality_of = {c.did: c.modality for c in pool}
    table = read_instructions(cfg.path(cfg.instructions))
    gt = load_gt_docs(cfg, rows, tasks)
    if check_images:  # before anything is encoded
        scan_images(_image_refs(cfg, rows, pools), what="train queries and pool")
    enc = dict(fingerprint=fp, batch_size=cfg.batch_size, shard_size=cfg.shard_size)
    device = cfg.device or (str(getattr(encoder, "device", "")) or None)
    settings = {"fingerprint": fp, "top_k": cfg.top_k, "instruction": cfg.instruction, "seed": cfg.seed,
                "queries": str(cfg.path(cfg.queries).resolve()), "pool": str(cfg.path(cfg.pool).resolve())}

    pool_emb = {}
    for key, members in pools.items():
        if not members:
            raise DataError(f"{cfg.path(cfg.pool)}: no train candidate of dataset(s) {list(key[0])} with modality "
                            f"{key[1]!r} (needed by task(s) "
                            f"{', '.join(t.name for t in active if pool_key(t) == key)})")
        # each distinct (dataset set, modality) pool is encoded once (OVEN/InfoSeek share theirs)
        pool_emb[key] = encode_records(encoder, members, cache, pool_name(key), where=str(cfg.path(cfg.pool)), **enc)
    glob = concat_cached([pool_emb[k] for k in pools]) if "global" in cfg.scopes else None
    if glob is not None and len(set(glob.ids)) != len(glob.ids):
        raise DataError("global train pool holds a did twice (overlapping task pools)")

    parts: dict[str, dict[str, dict]] = {s: {} for s in cfg.scopes}
    for t in active:
        todo = [s for s in cfg.scopes if _read_part(_part_path(out, s, t.name), settings) is None]
        for s in cfg.scopes:
            if s not in todo:
                parts[s][t.name] = _read_part(_part_path(out, s, t.name), settings)
        if not todo:
            logger.info("%s: mined lists reused (%s)", t.name, ", ".join(cfg.scopes))
            continue
        queries = assign_instructions(rows.task_queries[t.name], table, modality_of, cfg.instruction,
                                      instruction_rng(cfg.seed, f"train:{t.name}"))
        q_emb = encode_records(encoder, queries, cache, f"mbeir_train_{t.name}_queries",
                               where=str(cfg.path(cfg.queries)), **enc)
        q_vecs = np.asarray(q_emb.vectors, dtype=np.float32)
        for s in todo:
            space = pool_emb[pool_key(t)] if s == "local" else glob
            ret = search_embeddings(q_emb, space, cfg.top_k, backend=cfg.backend, device=device)
            dids, scores = ret.dids, ret.scores
            row_of = {d: i for i, d in enumerate(space.ids)}
            gts = [gt[q.qid] for q in queries]
            gsc = _gt_scores(q_vecs, gts, row_of, space.vector_blocks())
            part = {}
            for i, q in enumerate(queries):
                valid = [j for j in range(dids.shape[1]) if dids[i, j] != ""]
                part[q.qid] = {"gt_docs": list(gts[i]), "top100_docs": [str(dids[i, j]) for j in valid],
                               "score": [round(float(scores[i, j]), 6) for j in valid], "gt_scores": gsc[i]}
            atomic_write_json(_part_path(out, s, t.name), {"settings": settings, "task": t.name, "rows": part},
                              indent=None)
            parts[s][t.name] = part
            logger.info("%s (%s): mined top %d of %d candidates for %d queries", t.name, s, cfg.top_k,
                        len(space), len(queries))

    for s in cfg.scopes:
        path = out / mined_file_name(s)
        write_mined(path, (_mined_row(q.qid, parts[s][name][q.qid])
                           for q, name in zip(rows.queries, rows.task_of_row)))
        results[s] = path
        logger.info("wrote %s (%d rows)", path, len(rows.queries))
    atomic_write_json(out / DONE_FILE, {"config": asdict(cfg), "settings": settings,
                                        "files": {k: str(v) for k, v in results.items()},
                                        "global_pool_size": len(glob) if glob is not None else None,
                                        "pools": {pool_name(k): len(v) for k, v in pools.items()}})
    return results


def _image_refs(cfg: MineConfig, rows: TrainRows, pools: dict) -> Iterator[tuple[str, str]]:
    """``(image, where)`` of the queries and pool candidates about to be encoded."""
    yield from ((q.image, f"{rows.path}:{line} query {q.qid}") for q, line in zip(rows.queries, rows.lines) if q.image)
    for members in pools.values():
        yield from ((c.image, f"{cfg.path(cfg.pool)}: candidate {c.did}") for c in members if c.image)
