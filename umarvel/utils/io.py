"""Atomic file writes and JSONL reading with ``file:line`` error reporting."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from umarvel.errors import DataError


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it over ``path`` only if the block succeeds.

    A reader therefore sees either the old file, or the complete new one, never a partial write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextmanager
def atomic_dir(path: str | os.PathLike, *, replace: bool = True) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``path``; it becomes ``path`` only if the block succeeds.

    Readers see the old complete folder or the new complete one, never a partial one. With
    ``replace=True`` an existing ``path`` is swapped out (renamed aside, then removed); with
    ``replace=False`` an existing ``path`` is an error (``FileExistsError``). On failure the temporary
    folder is removed and ``path`` is untouched. The folder is created with the umask's permissions.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not replace:
        raise FileExistsError(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; follow the umask like a plain mkdir
    try:
        yield tmp
        if path.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, backup / path.name)
            os.replace(tmp, path)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, record)`` for each non-blank line of a JSONL file.

    Raises:
        DataError: naming ``file:line`` when a line is not a JSON object.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with path.open("r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: malformed JSON line ({exc.msg})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            yield lineno, rec


def iter_columns(path: str | os.PathLike, missing: str = "file not found") -> Iterator[tuple[str, list[str]]]:
    """Yield ``("file:line", whitespace-split columns)`` for each non-blank line of a text file.

    Raises:
        DataError: ``"<path>: <missing>"`` when the file does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {missing}")
    with path.open("r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            parts = line.split()
            if parts:
                yield f"{path}:{lineno}", parts


def read_json(path: str | os.PathLike) -> Any:
    """Parse a whole JSON file.

    Raises:
        DataError: ``"<path>: file not found"``, ``"<path>:<line>: malformed JSON (...)"`` or not UTF-8.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with path.open("r", encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason})") from None


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a whole JSONL file into a list of dicts (see :func:`iter_jsonl`)."""
    return [rec for _, rec in iter_jsonl(path)]


def write_jsonl(path: str | os.PathLike, records: list[dict]) -> None:
    """Write records as JSONL atomically."""
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
