"""Evaluation outputs: ``results.json`` (fixed schema) and ``results.md`` (TREC runs: :mod:`umarvel.data.runfiles`).

``results.json`` schema (exactly these keys; ``"reranked"`` and ``"compat"`` optional, ``"compat"`` always
written; a file without it was made before the compatibility mode existed, i.e. ``"default"``)::

    {"protocol": "local"|"global", "model": str, "split": str, "instruction_mode": "random"|"first",
     "instruction_seed": int, "compat": "default"|"official",
     "tasks": [{"name", "dataset", "task_id", "metric", "value", "recall": {"1","5","10","50"},
                "num_queries", "pool_size"}],
     "average": float}

Values are percentages. ``results.md`` shows the tasks in the paper's column order; when a local and
a global ``results.json`` of the same model and split are given together or sit in sibling folders,
both protocols are shown side by side. Everything is written atomically.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from umarvel.errors import DataError
from umarvel.data.mbeir import INSTRUCTION_MODES
from umarvel.eval.metrics import TaskResult, average
from umarvel.data.registry import MBEIR_TASK_ORDER, list_tasks
from umarvel.utils.compat import COMPAT_MODES, DEFAULT
from umarvel.utils.io import atomic_write_json, atomic_write_text, read_json

logger = logging.getLogger(__name__)

PROTOCOLS: tuple[str, ...] = ("local", "global")
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
_TOP_KEYS = ("protocol", "model", "split", "instruction_mode", "instruction_seed", "tasks", "average")
_OPTIONAL_TOP_KEYS = ("reranked", "compat")
_TASK_KEYS = ("name", "dataset", "task_id", "metric", "value", "recall", "num_queries", "pool_size")

PathLike = str | os.PathLike


# ------------------------------------------------------------------------------------- results.json
def build_results(*, protocol: str, model: str, split: str, instruction_mode: str, instruction_seed: int,
                  tasks: Sequence[TaskResult], reranked: bool | None = None, compat: str = DEFAULT) -> dict:
    """The ``results.json`` object; tasks sorted in registry (paper) order, average unweighted.

    ``compat``: the mode the numbers were computed in (``"official"``: the official numerics), always written.
    """
    order = {t.name: i for i, t in enumerate(list_tasks())}
    ordered = sorted(tasks, key=lambda r: order.get(r.name, len(order)))
    out: dict[str, Any] = {
        "protocol": protocol, "model": model, "split": split, "instruction_mode": instruction_mode,
        "instruction_seed": int(instruction_seed), "compat": compat, "tasks": [r.to_json() for r in ordered],
        "average": average(ordered),
    }
    if reranked is not None:
        out["reranked"] = bool(reranked)
    return validate_results(out, "results")


def _fail(where: str, msg: str) -> None:
    raise DataError(f"{where}: {msg}")


def _check_number(value: Any, where: str) -> None:
    """A finite int/float (not bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(where, f"expected a finite number, got {value!r}")


def _validate_task_entry(entry: Any, where: str) -> None:
    """One element of ``tasks``."""
    if not isinstance(entry, dict) or set(entry) != set(_TASK_KEYS):
        got = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        _fail(where, f"task entry must have exactly the keys {list(_TASK_KEYS)}, got {got}")
    for key in ("name", "dataset", "metric"):
        if not isinstance(entry[key], str) or not entry[key]:
            _fail(where, f"{key!r} must be a non-empty string")
    if entry["task_id"] is not None and (isinstance(entry["task_id"], bool) or not isinstance(entry["task_id"], int)):
        _fail(where, "'task_id' must be an integer or null")
    _check_number(entry["value"], f"{where}.value")
    recall = entry["recall"]
    if not isinstance(recall, dict) or not recall or not all(isinstance(k, str) and k.isdigit() for k in recall):
        _fail(where, "'recall' must map cutoffs written as strings ('1', '5', ...) to values")
    for k, v in recall.items():
        _check_number(v, f"{where}.recall[{k}]")
    for key in ("num_queries", "pool_size"):
        if isinstance(entry[key], bool) or not isinstance(entry[key], int) or entry[key] < 0:
            _fail(where, f"{key!r} must be a non-negative integer")


def validate_results(obj: Any, where: str) -> dict:
    """Check ``obj`` against the ``results.json`` schema; return it, or raise DataError naming ``where``."""
    if not isinstance(obj, dict):
        _fail(where, f"expected a JSON object, got {type(obj).__name__}")
    keys = set(obj)
    missing = [k for k in _TOP_KEYS if k not in keys]
    extra = sorted(keys - set(_TOP_KEYS) - set(_OPTIONAL_TOP_KEYS))
    if missing or extra:
        _fail(where, f"keys differ from the schema (missing {missing}, unexpected {extra})")
    if obj["protocol"] not in PROTOCOLS:
        _fail(where, f"protocol must be one of {PROTOCOLS}, got {obj['protocol']!r}")
    if obj["instruction_mode"] not in INSTRUCTION_MODES:
        _fail(where, f"instruction_mode must be one of {INSTRUCTION_MODES}, got {obj['instruction_mode']!r}")
    for key in ("model", "split"):
        if not isinstance(obj[key], str) or not obj[key]:
            _fail(where, f"{key!r} must be a non-empty string")
    if isinstance(obj["instruction_seed"], bool) or not isinstance(obj["instruction_seed"], int):
        _fail(where, "'instruction_seed' must be an integer")
    if "reranked" in obj and not isinstance(obj["reranked"], bool):
        _fail(where, "'reranked' must be true or false")
    if "compat" in obj and obj["compat"] not in COMPAT_MODES:
        _fail(where, f"'compat' must be one of {list(COMPAT_MODES)}, got {obj['compat']!r}")
    if not isinstance(obj["tasks"], list) or not obj["tasks"]:
        _fail(where, "'tasks' must be a non-empty list")
    for i, entry in enumerate(obj["tasks"]):
        _validate_task_entry(entry, f"{where}: tasks[{i}]")
    _check_number(obj["average"], f"{where}: average")
    return obj


def write_results_json(path: PathLike, results: Mapping[str, Any]) -> None:
    """Validate and write ``results.json`` atomically."""
    atomic_write_json(path, validate_results(dict(results), str(path)))


def read_results_json(path: PathLike) -> dict:
    """Read and validate a ``results.json``; DataError naming the file on any deviation."""
    return validate_results(read_json(path), str(path))


# --------------------------------------------------------------------------------------- results.md
def compat_of(res: Mapping[str, Any]) -> str:
    """The compatibility mode of a results object (``"default"`` for files written before it existed)."""
    return str(res.get("compat", DEFAULT))


def _pair_key(res: Mapping[str, Any]) -> tuple:
    """Results that may be shown side by side share model, split, reranking and compatibility mode."""
    return res["model"], res["split"], bool(res.get("reranked", False)), compat_of(res)


def _by_protocol(results: Sequence[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """``{protocol: results}``; DataError for two of one protocol or an unmatched pair."""
    out: dict[str, Mapping[str, Any]] = {}
    for res in results:
        if res["protocol"] in out:
            raise DataError(f"two {res['protocol']} results given for one results.md")
        out[res["protocol"]] = res
    if len({_pair_key(r) for r in out.values()}) > 1:
        raise DataError("local and global results differ in model, split, reranking or compat: "
                        + "; ".join(f"{p}: {_pair_key(r)}" for p, r in out.items()))
    return out


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _instruction_line(res: Mapping[str, Any]) -> str:
    return f"{res['instruction_mode']} (seed {res['instruction_seed']})"


def render_results_md(results: Sequence[Mapping[str, Any]]) -> str:
    """Markdown for one or two (local + global) results objects: a per-task table in the paper's
    column order (tasks as rows, one value column per protocol) and the paper's one-row layout."""
    if not results:
        raise DataError("no results to render")
    by_proto = _by_protocol(results)
    protos = [p for p in PROTOCOLS if p in by_proto]
    first = by_proto[protos[0]]
    values = {p: {t["name"]: t for t in by_proto[p]["tasks"]} for p in protos}
    order = [t.name for t in list_tasks()]
    names = [n for n in order if any(n in values[p] for p in protos)]
    names += sorted({n for p in protos for n in values[p]} - set(names))
    meta = {n: next(values[p][n] for p in protos if n in values[p]) for n in names}
    rerank = " (reranked)" if first.get("reranked") else ""
    lines = [f"# Results: {first['model']}{rerank}", "",
             f"- split: {first['split']}",
             f"- compat: {compat_of(first)}" + (" (the official evaluation numerics, docs/decisions.md)"
                                                if compat_of(first) != DEFAULT else ""),
             *[f"- {p}: instruction {_instruction_line(by_proto[p])}, {len(values[p])} task(s)" for p in protos],
             *([] if all(len(values[p]) == len(MBEIR_TASK_ORDER) for p in protos) else
               ["- note: the average covers only the tasks shown, not the 16-task M-BEIR average"]),
             "", "| # | Task | Dataset | Metric | " + " | ".join(p.capitalize() for p in protos) + " |",
             "|---:|---|---|---|" + "---:|" * len(protos)]
    for i, n in enumerate(names, start=1):
        row = [_fmt(values[p][n]["value"] if n in values[p] else None) for p in protos]
        lines.append(f"| {i} | {n} | {meta[n]['dataset']} | {meta[n]['metric'].replace('Recall', 'R')} | "
                     + " | ".join(row) + " |")
    lines.append("|  | **Average** |  |  | " + " | ".join(_fmt(by_proto[p]["average"]) for p in protos) + " |")
    lines += ["", "Paper layout (headline metric per task, then the unweighted average):", "",
              "| Protocol | " + " | ".join(names) + " | Avg |", "|---|" + "---:|" * (len(names) + 1)]
    for p in protos:
        cells = [_fmt(values[p][n]["value"] if n in values[p] else None) for n in names]
        lines.append(f"| {p} | " + " | ".join(cells) + f" | {_fmt(by_proto[p]['average'])} |")
    return "\n".join(lines) + "\n"


def find_sibling_results(out_dir: PathLike, results: Mapping[str, Any]) -> tuple[Path, dict] | None:
    """The other protocol's results in a sibling folder of ``out_dir`` (same model, split, reranking, compat).

    A sibling named after the other protocol wins; otherwise a unique match among all siblings.
    Unreadable siblings are skipped with a warning.
    """
    out_dir = Path(out_dir).resolve()
    other = "global" if results["protocol"] == "local" else "local"
    named = out_dir.parent / other / RESULTS_JSON
    paths = [named] + sorted(p for p in out_dir.parent.glob(f"*/{RESULTS_JSON}") if p != named)
    matches: list[tuple[Path, dict]] = []
    for p in paths:
        if not p.is_file() or p.parent == out_dir:
            continue
        try:
            cand = read_results_json(p)
        except DataError as exc:
            logger.warning("ignoring sibling results: %s", exc)
            continue
        if cand["protocol"] == other and _pair_key(cand) == _pair_key(results):
            if p == named:
                return p, cand
            matches.append((p, cand))
    if len(matches) > 1:
        logger.warning("several sibling %s results match (%s); not pairing",
                       other, ", ".join(str(m[0]) for m in matches))
        return None
    return matches[0] if matches else None


def write_results(out_dir: PathLike, results: Mapping[str, Any]) -> Path:
    """Write ``results.json`` and ``results.md`` into ``out_dir``; returns the json path.

    A matching other-protocol ``results.json`` in a sibling folder is shown side by side, and that folder's
    ``results.md`` is refreshed to the same side-by-side table.
    """
    out_dir = Path(out_dir)
    json_path = out_dir / RESULTS_JSON
    write_results_json(json_path, results)
    sibling = find_sibling_results(out_dir, results)
    md = render_results_md([results] + ([sibling[1]] if sibling else []))
    atomic_write_text(out_dir / RESULTS_MD, md)
    if sibling:
        atomic_write_text(sibling[0].parent / RESULTS_MD, md)
        logger.info("results.md pairs %s with %s", json_path, sibling[0])
    return json_path
