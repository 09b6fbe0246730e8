"""Readers for the released M-BEIR layout (docs: mbeir_benchmark.md sections 1-2, method spec 5.1).

Layout (relative to the M-BEIR root)::

    query/{train,union_train,val,test}/*.jsonl   cand_pool/{local,global}/*.jsonl
    qrels/{train,val,test}/*_qrels.txt          instructions/query_instructions.tsv

Image paths inside the JSONL files are relative to the root and are made absolute here. Every
malformed line names ``file:line``. Instructions are drawn per query as in the official code (D7):
random from the TSV row keyed by (dataset id of the qid, query modality, modality of a randomly chosen
positive), but from a seeded ``random.Random`` so that a run is reproducible; ``mode="first"`` always
takes ``prompt_1``.
"""
from __future__ import annotations

import logging
import os
import random
from collections import ChainMap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Container, Mapping, Sequence

from umarvel.data.records import Candidate, Query, check_modality
from umarvel.data.registry import TASK_MODALITIES, Task
from umarvel.errors import DataError
from umarvel.utils.io import iter_columns, iter_jsonl, open_text


logger = logging.getLogger(__name__)

DID_HASH_BASE = 10_000_000
INSTRUCTION_MODES: tuple[str, ...] = ("random", "first")
DEFAULT_INSTRUCTION_SEED = 2023
_MAX_LISTED = 5

PathLike = str | os.PathLike


# ----------------------------------------------------------------------------------------------- ids
def split_id(id_: str, where: str = "id") -> tuple[int, int]:
    """``"d:n"`` -> ``(d, n)``; DataError naming ``where`` if it is not two non-negative integers."""
    if isinstance(id_, str):
        head, sep, tail = id_.partition(":")
        if sep and head.isdigit() and tail.isdigit():
            return int(head), int(tail)
    raise DataError(f"{where}: malformed M-BEIR id {id_!r} (expected '<dataset_id>:<n>')")


def hash_did(did: str) -> int:
    """Integer id of a candidate: ``dataset_id * 10000000 + n`` (an ``n`` that does not fit is an error)."""
    d, n = split_id(did)
    if n >= DID_HASH_BASE:
        raise DataError(f"id {did!r}: number {n} does not fit the hash base {DID_HASH_BASE}")
    return d * DID_HASH_BASE + n


def unhash_did(h: int) -> str:
    """Inverse of :func:`hash_did`."""
    return f"{int(h) // DID_HASH_BASE}:{int(h) % DID_HASH_BASE}"


def dataset_id_of(id_: str) -> int:
    """The dataset id (part before ``:``) of a qid or did."""
    return split_id(id_)[0]


# ------------------------------------------------------------------------------------------- records
def _opt_str(rec: Mapping[str, Any], key: str, where: str) -> str | None:
    """``rec[key]`` as a string, ``None`` when absent, null or empty; DataError for other types."""
    value = rec.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string or null, got {type(value).__name__}")
    return value


def _req(rec: Mapping[str, Any], key: str, where: str) -> Any:
    """``rec[key]``; DataError naming the missing field."""
    if key not in rec:
        raise DataError(f"{where}: missing field {key!r}")
    return rec[key]


def _image(root: Path, rel: str | None) -> str | None:
    """Absolute image path: ``rel`` resolved against the M-BEIR root (absolute paths kept)."""
    return None if rel is None else str(root / rel)


def _check_parts(modality: str, text: str | None, image: str | None, where: str) -> None:
    """The text / image a modality promises must be there."""
    if "image" in modality and image is None:
        raise DataError(f"{where}: modality {modality!r} but no image path")
    if "text" in modality and text is None:
        raise DataError(f"{where}: modality {modality!r} but no text")


def parse_query(rec: Mapping[str, Any], root: Path, where: str) -> Query:
    """One M-BEIR query record -> :class:`Query` (instruction not yet chosen)."""
    qid = _req(rec, "qid", where)
    dataset_id, _ = split_id(qid, f"{where}: qid")
    modality = check_modality(_req(rec, "query_modality", where), where)
    text = _opt_str(rec, "query_txt", where)
    image = _image(root, _opt_str(rec, "query_img_path", where))
    _check_parts(modality, text, image, where)
    positives = _req(rec, "pos_cand_list", where)
    if not isinstance(positives, list):
        raise DataError(f"{where}: pos_cand_list must be a list of ids, got {type(positives).__name__}")
    for did in positives:
        split_id(did, f"{where}: pos_cand_list")
    task_id = _req(rec, "task_id", where)
    if isinstance(task_id, bool) or not isinstance(task_id, int) or task_id not in TASK_MODALITIES:
        raise DataError(f"{where}: task_id must be one of {sorted(TASK_MODALITIES)}, got {task_id!r}")
    return Query(qid=qid, text=text, image=image, modality=modality, positives=tuple(positives),
                 task_id=task_id, dataset_id=dataset_id)


def parse_candidate(rec: Mapping[str, Any], root: Path, where: str) -> Candidate:
    """One M-BEIR candidate record -> :class:`Candidate` (``src_content`` may be absent)."""
    did = _req(rec, "did", where)
    split_id(did, f"{where}: did")
    modality = check_modality(_req(rec, "modality", where), where)
    text = _opt_str(rec, "txt", where)
    image = _image(root, _opt_str(rec, "img_path", where))
    _check_parts(modality, text, image, where)
    return Candidate(did=did, text=text, image=image, modality=modality)


def _read_unique(path: PathLike, root: PathLike, parse, id_name: str) -> list:
    """Parse every line of an M-BEIR JSONL file with ``parse(rec, root, where)``; ids must not repeat."""
    root = Path(root)
    out: list = []
    seen: dict[str, int] = {}
    for lineno, rec in iter_jsonl(path):
        where = f"{path}:{lineno}"
        record = parse(rec, root, where)
        key = getattr(record, id_name)
        if key in seen:
            raise DataError(f"{where}: {id_name} {key} repeats line {seen[key]}")
        seen[key] = lineno
        out.append(record)
    logger.debug("read %d records from %s", len(out), path)
    return out


def read_queries(path: PathLike, root: PathLike) -> list[Query]:
    """All queries of an M-BEIR query file, in file order; images resolved against ``root``.

    Raises:
        DataError: naming ``file:line`` for a malformed line or field, or a repeated qid.
    """
    return _read_unique(path, root, parse_query, "qid")


def read_pool(path: PathLike, root: PathLike) -> list[Candidate]:
    """All candidates of an M-BEIR pool file, in file order; images resolved against ``root``.

    Raises:
        DataError: naming ``file:line`` for a malformed line or field, or a repeated did.
    """
    return _read_unique(path, root, parse_candidate, "did")


def read_pool_modalities(path: PathLike, wanted: Container[str] | None = None) -> dict[str, str]:
    """``{did: modality}`` of a pool file, keeping only dids in ``wanted`` when given.

    Cheap on the 5.6M-line global pool: no image paths are resolved and no records are kept.
    """
    out: dict[str, str] = {}
    for lineno, rec in iter_jsonl(path):
        where = f"{path}:{lineno}"
        did = _req(rec, "did", where)
        if wanted is not None and did not in wanted:
            continue
        split_id(did, f"{where}: did")
        out[did] = check_modality(_req(rec, "modality", where), where)
    return out


def read_qrels(path: PathLike) -> dict[str, tuple[str, ...]]:
    """``{qid: positive dids}`` from a qrels file (``qid 0 did relevance task_id``; relevance > 0 kept).

    Raises:
        DataError: naming ``file:line`` for a line without exactly 5 whitespace-separated columns, a
            non-integer relevance, or a malformed id.
    """
    out: dict[str, dict[str, None]] = {}
    for where, parts in iter_columns(path):
        if len(parts) != 5:
            raise DataError(f"{where}: expected 5 columns 'qid 0 did relevance task_id', got {len(parts)}")
        qid, _, did, relevance, _task = parts
        split_id(qid, f"{where}: qid")
        split_id(did, f"{where}: did")
        try:
            rel = int(relevance)
        except ValueError:
            raise DataError(f"{where}: relevance {relevance!r} is not an integer") from None
        if rel > 0:
            out.setdefault(qid, {})[did] = None
    return {qid: tuple(dids) for qid, dids in out.items()}


# -------------------------------------------------------------------------------------- instructions
InstructionKey = tuple[int, str, str]


@dataclass(frozen=True)
class InstructionTable:
    """Prompts of ``query_instructions.tsv`` keyed by ``(dataset_id, query_modality, cand_modality)``."""

    path: str
    prompts: Mapping[InstructionKey, tuple[str, ...]]

    def lookup(self, key: InstructionKey, qid: str) -> tuple[str, ...]:
        """The prompts of ``key``; DataError naming the qid, the key and the file when absent."""
        try:
            return self.prompts[key]
        except KeyError:
            raise DataError(
                f"query {qid}: no instruction row for (dataset_id, query_modality, cand_modality) = "
                f"{key} in {self.path}"
            ) from None


def read_instructions(path: PathLike) -> InstructionTable:
    """Read the instruction TSV: a header row, then col0 query modality, col1 candidate modality,
    col2 (unused), col3 dataset id, col4+ prompts; empty prompt cells are dropped.

    Raises:
        DataError: naming ``file:line`` for a row with fewer than 5 columns, a bad modality or dataset
            id, no prompt, or a key seen before.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    prompts: dict[InstructionKey, tuple[str, ...]] = {}
    seen: dict[InstructionKey, int] = {}
    with open_text(path) as fh:
        for lineno, line in enumerate(fh, start=1):
            if lineno == 1 or not line.strip():
                continue
            where = f"{path}:{lineno}"
            parts = [p.strip() for p in line.rstrip("\r\n").split("\t")]
            if len(parts) < 5:
                raise DataError(f"{where}: expected at least 5 tab-separated columns, got {len(parts)}")
            q_mod = check_modality(parts[0], f"{where}: query_modality")
            c_mod = check_modality(parts[1], f"{where}: cand_modality")
            if not parts[3].isdigit():
                raise DataError(f"{where}: dataset_id {parts[3]!r} is not an integer")
            row = tuple(p for p in parts[4:] if p)
            if not row:
                raise DataError(f"{where}: no prompt in the row")
            key = (int(parts[3]), q_mod, c_mod)
            if key in seen:
                raise DataError(f"{where}: key {key} repeats line {seen[key]}")
            seen[key] = lineno
            prompts[key] = row
    if not prompts:
        raise DataError(f"{path}: no instruction rows")
    return InstructionTable(path=str(path), prompts=prompts)


def instruction_rng(seed: int, stream: str) -> random.Random:
    """A ``random.Random`` for one run and one task: same (seed, stream) -> same draws, whatever
    else runs (string seeding is stable across processes, unlike ``hash()``)."""
    return random.Random(f"{int(seed)}:{stream}")


def positive_modality(query: Query, modality_of: Mapping[str, str], mode: str, rng: random.Random) -> str:
    """The candidate modality of the instruction key: that of a positive chosen at random (``first``:
    the first positive) among those whose modality is known; the task's target modality if none is."""
    known = [p for p in query.positives if p in modality_of]
    if known:
        return modality_of[rng.choice(known) if mode == "random" else known[0]]
    if query.task_id in TASK_MODALITIES:
        logger.debug("query %s: no positive with a known modality; using task %s's target modality",
                     query.qid, query.task_id)
        return TASK_MODALITIES[query.task_id][1]
    raise DataError(f"query {query.qid}: no positive with a known modality and no task id to fall back on")


def choose_instruction(query: Query, table: InstructionTable, modality_of: Mapping[str, str],
                       mode: str, rng: random.Random) -> str:
    """The instruction of one query (D7): random prompt of its key, or ``prompt_1`` when ``mode="first"``."""
    if mode not in INSTRUCTION_MODES:
        raise DataError(f"instruction mode must be one of {INSTRUCTION_MODES}, got {mode!r}")
    if query.dataset_id is None:
        raise DataError(f"query {query.qid}: no dataset id, cannot key the instruction table")
    key = (query.dataset_id, query.modality, positive_modality(query, modality_of, mode, rng))
    prompts = table.lookup(key, query.qid)
    return rng.choice(prompts) if mode == "random" else prompts[0]


def assign_instructions(queries: Sequence[Query], table: InstructionTable, modality_of: Mapping[str, str],
                        mode: str, rng: random.Random) -> list[Query]:
    """Copies of ``queries`` (order kept) carrying their instruction; draws from ``rng`` in query order."""
    return [q.with_instruction(choose_instruction(q, table, modality_of, mode, rng)) for q in queries]


# ------------------------------------------------------------------------------------- id validation
def find_unknown_ids(queries: Sequence[Query], qrels: Mapping[str, Sequence[str]],
                     known: Container[str]) -> dict[str, list[str]]:
    """``{qid: ids not in known}`` over each query's positives and its qrels dids (only faulty qids)."""
    out: dict[str, list[str]] = {}
    for q in queries:
        ids = dict.fromkeys([*q.positives, *qrels.get(q.qid, ())])
        missing = [i for i in ids if i not in known]
        if missing:
            out[q.qid] = missing
    return out


def check_known_ids(queries: Sequence[Query], qrels: Mapping[str, Sequence[str]], known: Container[str],
                    *, where: str, allow_missing: bool = False) -> dict[str, list[str]]:
    """Report queries whose positives or qrels name ids unknown to the pool(s).

    Returns the ``{qid: unknown ids}`` found (empty when all are known).

    Raises:
        DataError: counting the faulty queries and listing the first few, unless ``allow_missing``
            (then a warning is logged instead).
    """
    unknown = find_unknown_ids(queries, qrels, known)
    if not unknown:
        return unknown
    n_ids = sum(len(v) for v in unknown.values())
    listed = "; ".join(f"{qid} -> {', '.join(ids[:3])}{' ...' if len(ids) > 3 else ''}"
                       for qid, ids in list(unknown.items())[:_MAX_LISTED])
    msg = (f"{where}: {len(unknown)} of {len(queries)} queries name {n_ids} positive id(s) unknown to the "
           f"candidate pool(s): {listed}{' ...' if len(unknown) > _MAX_LISTED else ''}")
    if not allow_missing:
        raise DataError(msg + ". Give the global pool, or pass allow_missing=True to score them anyway "
                              "(such positives can never be retrieved).")
    logger.warning("%s (allowed: these positives can never be retrieved)", msg)
    return unknown


# --------------------------------------------------------------------------------------- task loading
@dataclass(frozen=True)
class TaskData:
    """Everything needed to evaluate one M-BEIR task split.

    Attributes:
        task: the registry task.
        split: ``"val"`` or ``"test"``.
        queries: queries in file order, with instructions assigned.
        pool: the task's local pool in file order.
        qrels: ``{qid: positive dids}`` (relevance > 0) from the qrels file.
        unknown: ``{qid: unknown ids}`` allowed through with ``allow_missing``.
    """

    task: Task
    split: str
    queries: tuple[Query, ...]
    pool: tuple[Candidate, ...]
    qrels: Mapping[str, tuple[str, ...]]
    unknown: Mapping[str, list[str]]

    def positives(self) -> list[tuple[str, ...]]:
        """Per-query positive dids from the qrels (the official scorer's ground truth), query order."""
        return [self.qrels.get(q.qid, ()) for q in self.queries]


def _check_task_membership(queries: Sequence[Query], task: Task, path: Path) -> None:
    """Every query of a task file belongs to that task (dataset id of the qid and task id)."""
    for q in queries:
        if q.task_id != task.task_id or q.dataset_id != task.dataset_id:
            raise DataError(f"{path}: query {q.qid} has task_id {q.task_id}, which does not belong to "
                            f"{task.name} (dataset {task.dataset_id}, task {task.task_id})")


def load_mbeir_task(root: PathLike, task: Task, split: str = "test", *,
                    instructions: InstructionTable, instruction_mode: str = "random",
                    seed: int = DEFAULT_INSTRUCTION_SEED,
                    global_modalities: Mapping[str, str] | None = None,
                    allow_missing: bool = False) -> TaskData:
    """Read one task's queries, local pool and qrels, validate ids, and assign instructions.

    Args:
        root: the M-BEIR root (image paths are resolved against it).
        task: an ``mbeir`` registry task.
        split: ``"val"`` or ``"test"``.
        instructions: the table from :func:`read_instructions`.
        instruction_mode: ``"random"`` (seeded, D7) or ``"first"``.
        seed: run seed; each task draws from ``instruction_rng(seed, task.name)``.
        global_modalities: ``{did: modality}`` of the global pool (looked up first, as the official
            code does; the local pool is the fallback). Its dids also count as known.
        allow_missing: log, rather than raise on, positives unknown to both pools.
    """
    root = Path(root)
    files = task.files(split)
    qpath = root / files.queries
    queries = read_queries(qpath, root)
    _check_task_membership(queries, task, qpath)
    pool = read_pool(root / files.pool, root)
    qrels = read_qrels(root / files.qrels)
    modality_of = ChainMap(global_modalities or {}, {c.did: c.modality for c in pool})  # type: ignore[arg-type]
    unknown = check_known_ids(queries, qrels, modality_of, where=f"{task.name} ({split}, {qpath})",
                              allow_missing=allow_missing)
    no_qrels = sum(1 for q in queries if not qrels.get(q.qid))
    if no_qrels:
        logger.warning("%s (%s): %d of %d queries have no qrels line; they score 0 (official scorer)",
                       task.name, split, no_qrels, len(queries))
    qids = {q.qid for q in queries}
    stray = [qid for qid in qrels if qid not in qids]
    if stray:
        logger.warning("%s (%s): %d qid(s) of %s name no query of %s (e.g. %s); their lines are ignored",
                       task.name, split, len(stray), root / files.qrels, qpath, ", ".join(stray[:3]))
    rng = instruction_rng(seed, task.name)
    queries = assign_instructions(queries, instructions, modality_of, instruction_mode, rng)
    logger.info("%s (%s): %d queries, pool of %d candidates", task.name, split, len(queries), len(pool))
    return TaskData(task=task, split=split, queries=tuple(queries), pool=tuple(pool), qrels=qrels,
                    unknown=unknown)
