"""Stage-5 teacher lists: reranker P(yes) on each query's top-K retrieved candidates, fused with their cosines.

Inputs (method spec 2.4, 4a): the distillation query rows (the 10% union subset) and their LOCAL mined lists
from the stage-4 model (``umarvel mine --queries <subset> --scope local``), plus a trained reranker. For each
distinct qid: its first ``top_k`` (50) mined candidates, each with its own cosine, are scored by the reranker
(:func:`umarvel.rerank.score.score_pairs`, one forward, D10); the teacher score is
``cos + w_task * P(yes)`` (:func:`umarvel.rerank.fusion.teacher_fuse`; published w = 1.0, mscoco_task0 0.5,
mscoco_task3 0.1, from :class:`TeacherConfig`), re-sorted descending. The reranker sees the query with a
TSV instruction drawn per D7 (seeded) and no instruction markers, as in reranker training.

Output ``fusion_results.jsonl`` (:mod:`umarvel.data.runfiles`): one line per query row, same order, ``{qid, task,
did: [K], score: [K], cosine: [K], p_yes: [K]}`` (candidates best first by fused score; ``cosine`` / ``p_yes`` in
that order).
Resume: P(yes) are written in shards of ``shard_queries`` queries (``teacher_parts/``), each atomically; a
rerun scores only missing shards.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from umarvel.errors import ConfigError, DataError
from umarvel.data.mbeir import (DEFAULT_INSTRUCTION_SEED, assign_instructions, instruction_rng,
                                        read_instructions, read_pool)
from umarvel.data.images import MAX_PIXELS, MIN_PIXELS
from umarvel.data.registry import MBEIR_INSTRUCTIONS, MBEIR_UNION_POOLS, list_tasks
from umarvel.data.runfiles import TEACHER_FILE, TeacherRow, iter_mined, write_teacher
from umarvel.pipelines.mining import partition_train_queries
from umarvel.pipelines.preflight import start_teacher_run
from umarvel.rerank.fusion import teacher_fuse
from umarvel.utils.checks import scan_images
from umarvel.utils.io import atomic_write_json

logger = logging.getLogger(__name__)

PARTS_DIR = "teacher_parts"
PathLike = str | os.PathLike


@dataclass(frozen=True)
class TeacherConfig:
    """Settings of the teacher-score step (``configs/stages/05_teacher.yaml``).

    Attributes:
        reranker: reranker checkpoint (merged folder or LoRA adapter folder).
        mbeir_root: M-BEIR root. queries: the distillation query rows (a path as given, e.g. the subset written
            by ``umarvel mine``). mined: their LOCAL mined file (row-aligned). output: output folder.
        pool / instructions: train pool and instruction TSV (relative to the root unless absolute).
        top_k: candidates per query that are reranked and kept (published 50).
        weights: per-task teacher weight ``w_task``; ``default_weight`` for the other tasks.
        batch_size / positions / device / dtype / min_pixels / max_pixels: reranker scoring.
        instruction / seed: D7 instruction of the reranker query text.
        shard_queries: queries per resumable shard.
    """

    reranker: str
    mbeir_root: str
    queries: str
    mined: str
    output: str
    pool: str = MBEIR_UNION_POOLS["train"]
    instructions: str = MBEIR_INSTRUCTIONS
    top_k: int = 50
    weights: dict[str, float] = field(default_factory=lambda: {"mscoco_task0": 0.5, "mscoco_task3": 0.1})
    default_weight: float = 1.0
    batch_size: int = 8
    positions: str = "1d"
    device: str | None = None
    dtype: str | None = None
    min_pixels: int = MIN_PIXELS
    max_pixels: int = MAX_PIXELS
    instruction: str = "random"
    seed: int = DEFAULT_INSTRUCTION_SEED
    shard_queries: int = 2048

    def __post_init__(self) -> None:
        if self.top_k < 1 or self.batch_size < 1 or self.shard_queries < 1:
            raise ConfigError("teacher: top_k, batch_size and shard_queries must be >= 1")
        known = {t.name for t in list_tasks("mbeir")}
        unknown = sorted(set(self.weights) - known)
        if unknown:
            raise ConfigError(f"teacher.weights: unknown task(s) {unknown}; known: {sorted(known)}")
        if any(not np.isfinite(w) or w < 0 for w in [*self.weights.values(), self.default_weight]):
            raise ConfigError("teacher weights must be finite and >= 0")

    def path(self, rel: str) -> Path:
        p = Path(rel)
        return p if p.is_absolute() else Path(self.mbeir_root) / p


def _shard_path(out: Path, index: int) -> Path:
    return out / PARTS_DIR / f"shard_{index:05d}.json"


def build_teacher_file(cfg: TeacherConfig, reranker=None, *, overwrite: bool = False,
                       check_images: bool = True) -> Path:
    """Score and fuse (see the module doc); returns the teacher file path.

    Args:
        reranker: a :class:`~umarvel.rerank.model.LoadedReranker` (default: load ``cfg.reranker``).
        overwrite: replace the files of another teacher run in ``cfg.output`` (otherwise refused).
        check_images: check the images of the queries and mined candidates before scoring anything.
    Raises:
        DataError: a mined line not aligned with its query row, a query with fewer than ``top_k`` mined
            candidates, or a candidate missing from the pool.
    """
    with start_teacher_run(cfg, overwrite=overwrite, reranker=reranker):  # checks + the output folder (lock, identity)
        return _build_teacher_file(cfg, reranker, check_images)


def _build_teacher_file(cfg: TeacherConfig, reranker, check_images: bool) -> Path:
    # lazy: commands.teacher imports this module, and `umarvel --help` stays free of torch (tests/cli)
    from umarvel.dist import device_for_rank  # lazy: the CLI imports this module for its config (no torch at start-up)
    from umarvel.rerank.model import load_reranker
    from umarvel.rerank.score import pair_from_records, score_pairs

    out = Path(cfg.output)
    root = Path(cfg.mbeir_root)
    rows = partition_train_queries(Path(cfg.queries), root)
    mined: dict[str, tuple] = {}
    for row in iter_mined(cfg.mined, [q.qid for q in rows.queries], follows=cfg.queries):
        if row.scores is None:
            raise DataError(f"{row.where}: no 'score' (the retrieval cosines are needed)")
        if len(row.top_docs) < cfg.top_k:
            raise DataError(f"{row.where}: query {row.qid} has {len(row.top_docs)} mined candidates, fewer than "
                            f"top_k={cfg.top_k}")
        mined[row.qid] = (row.top_docs[:cfg.top_k], row.scores[:cfg.top_k])

    pool = {c.did: c for c in read_pool(cfg.path(cfg.pool), root)}
    table = read_instructions(cfg.path(cfg.instructions))
    modality = {d: c.modality for d, c in pool.items()}
    queries, task_of_qid = [], {}
    for name, qs in rows.task_queries.items():
        queries += assign_instructions(qs, table, modality, cfg.instruction, instruction_rng(cfg.seed, f"teacher:{name}"))
        task_of_qid.update({q.qid: name for q in qs})
    settings = {"reranker": str(Path(cfg.reranker).resolve()), "top_k": cfg.top_k, "positions": cfg.positions,
                "max_pixels": cfg.max_pixels, "seed": cfg.seed, "instruction": cfg.instruction,
                "mined": hashlib.sha256(Path(cfg.mined).read_bytes()).hexdigest()[:16]}

    if check_images:  # before anything is scored
        scan_images(((im, f"{cfg.queries}: query {q.qid}") for q in queries if (im := q.image)), what="queries")
        scan_images(((im, f"{cfg.mined}: candidate {d}") for dids, _ in mined.values() for d in dids
                     if d in pool and (im := pool[d].image)), what="mined candidates")
    p_yes: dict[str, list[float]] = {}
    shards = [queries[i:i + cfg.shard_queries] for i in range(0, len(queries), cfg.shard_queries)]
    for s, shard in enumerate(shards):
        path = _shard_path(out, s)
        if path.is_file():
            old = json.loads(path.read_text())
            if old.get("settings") == settings and set(old["p_yes"]) == {q.qid for q in shard}:
                p_yes.update(old["p_yes"])
                continue
            logger.warning("%s: other settings or queries; scoring the shard again", path)
        if reranker is None:
            reranker = load_reranker(cfg.reranker, device=device_for_rank(cfg.device), dtype=cfg.dtype,
                                     positions=cfg.positions, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
        pairs = []
        for q in shard:
            for did in mined[q.qid][0]:
                if did not in pool:
                    raise DataError(f"{Path(cfg.mined)}: candidate {did} of query {q.qid} is not in the pool")
                pairs.append(pair_from_records(reranker.tokenizer, q, pool[did]))
        scores = score_pairs(reranker, pairs, batch_size=cfg.batch_size)  # (len(shard) * top_k,)
        got = {q.qid: [float(x) for x in scores[i * cfg.top_k:(i + 1) * cfg.top_k]] for i, q in enumerate(shard)}
        atomic_write_json(path, {"settings": settings, "p_yes": got}, indent=None)
        p_yes.update(got)
        logger.info("teacher shard %d/%d: %d pairs scored", s + 1, len(shards), len(pairs))

    fused = {}
    for qid, (dids, cos) in mined.items():
        task = task_of_qid[qid]
        order_dids, f = teacher_fuse(task, dids, cos, p_yes[qid], cfg.weights, cfg.default_weight)
        idx = [dids.index(d) for d in order_dids]  # each candidate keeps its own cosine and P(yes)
        fused[qid] = TeacherRow(qid, tuple(order_dids), tuple(float(x) for x in f), task,
                                tuple(float(cos[i]) for i in idx), tuple(p_yes[qid][i] for i in idx))
    path = out / TEACHER_FILE
    write_teacher(path, (fused[q.qid] for q in rows.queries))
    atomic_write_json(out / "teacher_done.json", {"config": asdict(cfg), "settings": settings,
                                                  "rows": len(rows.queries), "queries": len(queries)})
    logger.info("teacher file: %d rows (%d queries x %d candidates) -> %s", len(rows.queries), len(queries),
                cfg.top_k, path)
    return path
