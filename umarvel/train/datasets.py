"""Training datasets of stages 1-3: records -> :class:`TrainExample` (final texts, image paths, ids).

Each dataset reads its file once (every malformed record raises a ``DataError`` naming ``file:line`` or the
record key) and builds examples on demand with ``example(index, rng)``; all random choices (M-BEIR positive
and instruction) come from ``rng``, which the sampler seeds per ``(seed, epoch, index)`` so a resumed run
draws exactly what an uninterrupted one would.

Texts follow the official training datasets (method spec 1.2, 3; golden ``umarvel_train_tiny``):
- NLI (``nli``): raw CSV cells, no ``format_string``, no truncation; sent0 -> sent1 (``hard_neg`` unused).
- CC3M (``cc3m``): query ``format_string(instruction + " " + format_string(instruct_ans[0]))`` (plain-text
  instruction, pooled), truncated to 480 tokens; candidate: the ``h5v`` image alone.
- M-BEIR (``mbeir``): random positive from ``pos_cand_list``, instruction drawn from the TSV row keyed by
  (dataset id, query modality, that positive's modality), query text
  ``format_string(<instruction_start>fmt(instr)<instruction_end> + " " + query_txt)``, candidate
  ``format_string(txt)``; both truncated to 480 tokens.
The chat rendering (suffix D3, image-only suffix, ``add_generation_prompt`` D4) happens in the collator.

Extending (stage 4/5): register a class in :data:`DATASETS` whose examples carry more candidates
(``TrainExample.candidates[1:]`` = hard negatives, or the 50 distillation candidates with ``scores``).
"""
from __future__ import annotations

import csv
import dataclasses
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from umarvel.data.formatting import format_string, query_text_with_instruction, truncate_text
from umarvel.data.mbeir import parse_query, read_instructions, read_pool
from umarvel.data.registry import MBEIR_INSTRUCTIONS, MBEIR_UNION_POOLS, MBEIR_UNION_TRAIN_QUERIES
from umarvel.errors import ConfigError, DataError
from umarvel.utils.io import iter_jsonl, open_text, read_json

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Side:
    """One thing to embed: final user text (no suffix) and an optional image path."""

    text: str
    image: str | None = None


@dataclass(frozen=True)
class TrainExample:
    """A query with its candidates.

    Attributes:
        query: the query side.
        candidates: ``[positive, hard negative 1, ...]`` (stages 1-4) or the K distillation candidates (stage 5).
        query_id / candidate_ids: record ids for false-negative masking (D12); None when unknown.
        scores: teacher scores of the candidates (stage 5), else None.
        source: where the example comes from (``file:line`` or ``file: record key``), for error messages;
            set by the data loader (:func:`row_source`).
    """

    query: Side
    candidates: tuple[Side, ...]
    query_id: str | None = None
    candidate_ids: tuple[str | None, ...] = ()
    scores: tuple[float, ...] | None = None
    source: str = ""


class TrainDataset(Protocol):
    """What the trainer needs from a dataset."""

    def __len__(self) -> int: ...

    def example(self, index: int, rng: random.Random) -> TrainExample: ...

    def length_hint(self, index: int) -> int: ...


Truncate = Callable[[str], str]


def _no_truncate(text: str) -> str:
    return text


def _resolve(root: Path | None, rel: str) -> str:
    p = Path(rel)
    return str(p if p.is_absolute() or root is None else root / p)


# ---------------------------------------------------------------------------------------------------- NLI
@dataclass
class NliDataset:
    """SimCSE ``nli_for_simcse.csv`` (header ``sent0,sent1,hard_neg``): sent0 -> sent1."""

    path: Path
    rows: list[tuple[str, str]] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)

    @classmethod
    def from_file(cls, path: str | Path, max_examples: int | None = None) -> "NliDataset":
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: file not found")
        ds = cls(path)
        with open_text(path, newline="") as fh:
            reader = csv.reader(fh)
            try:
                header = next(reader)
            except StopIteration:
                raise DataError(f"{path}:1: empty file (expected the header sent0,sent1,hard_neg)") from None
            header = [h.strip() for h in header]
            if "sent0" not in header or "sent1" not in header:
                raise DataError(f"{path}:1: header must name sent0 and sent1, got {header}")
            i0, i1 = header.index("sent0"), header.index("sent1")
            for row in reader:
                line = reader.line_num
                if not row or all(not c.strip() for c in row):
                    continue
                if len(row) != len(header):
                    raise DataError(f"{path}:{line}: expected {len(header)} columns {header}, got {len(row)}")
                s0, s1 = row[i0], row[i1]
                if not s0.strip() or not s1.strip():
                    raise DataError(f"{path}:{line}: empty sent0 or sent1")
                ds.rows.append((s0, s1))
                ds.lines.append(line)
                if max_examples and len(ds.rows) >= max_examples:
                    break
        if not ds.rows:
            raise DataError(f"{path}: no data rows")
        return ds

    def __len__(self) -> int:
        return len(self.rows)

    def example(self, index: int, rng: random.Random) -> TrainExample:
        s0, s1 = self.rows[index]
        # ids in one space (the texts): a query whose text equals another pair's positive is masked (D12)
        return TrainExample(Side(s0), (Side(s1),), query_id=f"text:{s0}", candidate_ids=(f"text:{s1}",))

    def length_hint(self, index: int) -> int:
        s0, s1 = self.rows[index]
        return len(s0) + len(s1)


# --------------------------------------------------------------------------------------------------- CC3M
@dataclass
class Cc3mDataset:
    """CC3M-style JSON: a dict (or list) of records ``{instruction?, instruct_ans: [str, ...], h5v: path}``."""

    path: Path
    root: Path | None
    truncate: Truncate
    records: list[tuple[str, str, str]] = field(default_factory=list)  # (key, query text, image path)

    @classmethod
    def from_file(cls, path: str | Path, root: str | Path | None, truncate: Truncate = _no_truncate,
                  max_examples: int | None = None) -> "Cc3mDataset":
        path = Path(path)
        data = read_json(path)
        items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else None
        if items is None:
            raise DataError(f"{path}: expected a JSON object or list of records, got {type(data).__name__}")
        ds = cls(path, Path(root) if root else None, truncate)
        for key, rec in items:
            where = f"{path}: record {key!r}"
            if not isinstance(rec, dict):
                raise DataError(f"{where}: expected an object, got {type(rec).__name__}")
            ans = rec.get("instruct_ans")
            if not isinstance(ans, list) or not ans or not isinstance(ans[0], str) or not ans[0].strip():
                raise DataError(f"{where}: 'instruct_ans' must be a non-empty list of strings")
            image = rec.get("h5v")
            if not isinstance(image, str) or not image:
                raise DataError(f"{where}: 'h5v' (image path) missing or not a string")
            instruction = rec.get("instruction")
            if instruction is not None and not isinstance(instruction, str):
                raise DataError(f"{where}: 'instruction' must be a string")
            text = format_string(ans[0])
            if instruction:  # plain text, not normalised itself; pooled (no markers)
                text = format_string(f"{instruction} {text}")
            ds.records.append((str(key), text, _resolve(ds.root, image)))
            if max_examples and len(ds.records) >= max_examples:
                break
        if not ds.records:
            raise DataError(f"{path}: no records")
        return ds

    def __len__(self) -> int:
        return len(self.records)

    def example(self, index: int, rng: random.Random) -> TrainExample:
        key, text, image = self.records[index]
        return TrainExample(Side(self.truncate(text)), (Side("", image),), query_id=None,
                            candidate_ids=(f"image:{image}",))

    def length_hint(self, index: int) -> int:
        return len(self.records[index][1])


# ------------------------------------------------------------------------------------------------- M-BEIR
@dataclass
class MbeirTrainDataset:
    """M-BEIR union train: queries (up-sampled, qids may repeat), the train pool and the instruction TSV."""

    path: Path
    queries: list = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    pool: dict = field(default_factory=dict)
    table: object = None
    truncate: Truncate = _no_truncate

    @classmethod
    def from_files(cls, path: str | Path, pool: str | Path, instructions: str | Path, root: str | Path,
                   truncate: Truncate = _no_truncate, max_examples: int | None = None) -> "MbeirTrainDataset":
        root = Path(root)
        ds = cls(Path(path), truncate=truncate)
        ds.pool = {c.did: c for c in read_pool(pool, root)}
        ds.table = read_instructions(instructions)
        for lineno, rec in iter_jsonl(path):
            where = f"{path}:{lineno}"
            q = parse_query(rec, root, where)
            if not q.positives:
                raise DataError(f"{where}: query {q.qid} has an empty pos_cand_list")
            missing = [d for d in q.positives if d not in ds.pool]
            if missing:
                raise DataError(f"{where}: positive(s) {missing[:3]} of query {q.qid} not in the pool {pool}")
            ds.queries.append(q)
            ds.lines.append(lineno)
            if max_examples and len(ds.queries) >= max_examples:
                break
        if not ds.queries:
            raise DataError(f"{path}: no queries")
        return ds

    def __len__(self) -> int:
        return len(self.queries)

    def candidate_sides(self, dids: tuple[str, ...]) -> tuple[Side, ...]:
        """The sides of pool candidates: ``format_string`` of the text, truncated, and the image."""
        return tuple(Side(self.truncate(format_string(self.pool[d].text or "")), self.pool[d].image) for d in dids)

    def example(self, index: int, rng: random.Random) -> TrainExample:
        q = self.queries[index]
        did = rng.choice(q.positives)
        prompts = self.table.lookup((q.dataset_id, q.modality, self.pool[did].modality), q.qid)
        instruction = rng.choice(prompts)
        q_text = self.truncate(query_text_with_instruction(instruction, q.text or ""))
        return TrainExample(Side(q_text, q.image), self.candidate_sides((did,)), query_id=q.qid,
                            candidate_ids=(did,))

    def length_hint(self, index: int) -> int:
        q = self.queries[index]
        c = self.pool[q.positives[0]]
        return len(q.text or "") + len(c.text or "") + 1200 * ((q.image is not None) + (c.image is not None))


# ------------------------------------------------------------------------------------------------ registry
def _need_path(data) -> str:
    if not data.path:
        raise ConfigError(f"data.path is required for data.kind={data.kind}")
    return data.path


def _build_nli(data, tokenizer) -> NliDataset:
    return NliDataset.from_file(_need_path(data), data.max_examples)  # NLI is never truncated (official)


def _build_cc3m(data, tokenizer) -> Cc3mDataset:
    return Cc3mDataset.from_file(_need_path(data), data.root, make_truncate(tokenizer, data.max_text_tokens),
                                 data.max_examples)


def _build_mbeir(data, tokenizer) -> MbeirTrainDataset:
    if not data.root:
        raise ConfigError("data.root (the M-BEIR root folder) is required for data.kind=mbeir")
    root = Path(data.root)
    return MbeirTrainDataset.from_files(
        data.path or root / MBEIR_UNION_TRAIN_QUERIES, data.pool or root / MBEIR_UNION_POOLS["train"],
        data.instructions or root / MBEIR_INSTRUCTIONS, root,
        make_truncate(tokenizer, data.max_text_tokens), data.max_examples)


def _lazy(module: str, attr: str) -> Callable:
    """A builder imported on first use (stage 4/5 modules import this one)."""
    def build(data, tokenizer):
        import importlib

        return getattr(importlib.import_module(module), attr)(data, tokenizer)
    return build


#: ``data.kind`` -> builder ``(DataSection, tokenizer) -> dataset``.
DATASETS: dict[str, Callable] = {"nli": _build_nli, "cc3m": _build_cc3m, "mbeir": _build_mbeir,
                                 "mbeir_hardneg": _lazy("umarvel.train.hardneg", "build_hardneg_dataset"),
                                 "mbeir_distill": _lazy("umarvel.train.distill", "build_distill_dataset")}


def make_truncate(tokenizer, max_tokens: int | None) -> Truncate:
    """The official 480-token truncation as a callable (identity when ``max_tokens`` is None)."""
    if not max_tokens:
        return _no_truncate
    return lambda text: truncate_text(tokenizer, text, max_tokens)


#: Datasets parsed by :func:`prepare_dataset` before the model loaded, picked up once by :func:`build_dataset`.
_PREPARED: dict = {}


def prepare_dataset(data) -> TrainDataset:
    """Read and check the data of ``data`` now, without a tokenizer (so before the model loads).

    Every file is parsed and every record checked here; :func:`build_dataset` then reuses the result (adding
    the tokenizer's truncation) instead of reading the files again.
    """
    ds = _build(dataclasses.replace(data, max_text_tokens=None), None)
    _PREPARED.clear()
    _PREPARED[data] = ds
    return ds


def _build(data, tokenizer) -> TrainDataset:
    try:
        builder = DATASETS[data.kind]
    except KeyError:
        raise ConfigError(f"unknown data.kind {data.kind!r}; known: {sorted(DATASETS)}") from None
    return builder(data, tokenizer)


def build_dataset(data, tokenizer) -> TrainDataset:
    """Build the dataset of ``data.kind`` (a :class:`umarvel.train.config.DataSection`)."""
    ds = _PREPARED.pop(data, None)
    if ds is not None:  # parsed before the model loaded (prepare_dataset): add the truncation
        base = getattr(ds, "base", ds)
        if hasattr(base, "truncate"):
            base.truncate = make_truncate(tokenizer, data.max_text_tokens)
    else:
        ds = _build(data, tokenizer)
    logger.info("dataset %s: %d examples from %s", data.kind, len(ds), data.path or data.root)
    return ds


def row_source(ds, index: int) -> str:
    """``file:line`` (or ``file: record key``) of example ``index`` of a dataset, ``""`` if unknown."""
    base = getattr(ds, "base", ds)
    lines = getattr(base, "lines", None)
    if lines and index < len(lines):
        return f"{base.path}:{lines[index]}"
    records = getattr(base, "records", None)
    if records and index < len(records):
        return f"{base.path}: record {records[index][0]!r}"
    return ""
