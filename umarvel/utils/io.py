"""Atomic file writes and text reading with ``file:line`` error reporting.

Writes (:func:`atomic_path`, :func:`atomic_dir` and the helpers on top of them) go to a temporary name beside
the target and are renamed over it only when complete; the new file or folder gets the permissions of a plain
``open`` / ``mkdir`` under the current umask (0644 / 0755 with the usual 022). An ``OSError`` while writing
(permission denied, a file where a folder should be, disk full) becomes a :class:`FileAccessError` naming
the path and saying that the previous content is untouched.

Reads (:func:`iter_jsonl`, :func:`iter_columns`, :func:`read_json`, :func:`open_text`) are UTF-8; a
byte that is not UTF-8 is a :class:`DataError` ``not UTF-8 at byte N of FILE:LINE``.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

from umarvel.errors import DataError, FileAccessError


def current_umask() -> int:
    """The process umask, read without changing it (``/proc/self/status`` on Linux; else set-and-restore)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # no race-free read elsewhere; restored at once
    os.umask(mask)
    return mask


def os_error_message(exc: OSError) -> str:
    """``"PATH: reason"`` of an ``OSError`` (disk full, permission denied, not a directory, ...)."""
    where = exc.filename
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        reason += " (free space or quota exhausted)"
    elif exc.errno == errno.ENOTDIR or (exc.errno == errno.EEXIST and where is not None and os.path.exists(where)
                                         and not os.path.isdir(where)):
        reason += " (a parent of the path is a file, not a folder)"
    elif exc.errno == errno.EISDIR:
        reason += " (expected a file, got a folder)"
    return f"{where}: {reason}" if where is not None else reason


def write_failed(path: str | os.PathLike, exc: OSError) -> FileAccessError:
    """The error of a failed atomic write of ``path``: what went wrong, and that nothing was lost."""
    detail = os_error_message(exc)
    return FileAccessError(f"cannot write {path}: {detail}; nothing was lost ({path} and every file written "
                           "before are unchanged; fix it and rerun to continue)")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it over ``path`` only if the block succeeds.

    A reader therefore sees either the old file, or the complete new one, never a partial write. The
    file's mode follows the umask (``mkstemp`` alone would make it 0600, private to its owner).

    Raises:
        FileAccessError: an ``OSError`` while creating the folder, writing or renaming (permission,
            not a folder, disk full), naming ``path``; the old ``path`` is untouched.
    """
    path = Path(path)
    tmp_path: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        tmp_path = Path(tmp)
        os.fchmod(fd, 0o666 & ~current_umask())
        os.close(fd)
        yield tmp_path
        os.replace(tmp_path, path)
    except FileAccessError:
        raise
    except OSError as exc:
        raise write_failed(path, exc) from exc
    finally:
        if tmp_path is not None and tmp_path.exists():
            tmp_path.unlink()


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``path``; it becomes ``path`` only if the block succeeds.

    Readers see the old complete folder or the new complete one, never a partial one: an existing ``path``
    is swapped out (renamed aside, then removed). On failure the temporary folder is removed and ``path``
    is untouched. The folder is created with the umask's permissions.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_failed(path, exc) from exc
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as exc:
        raise write_failed(path, exc) from exc
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700; follow the umask like a plain mkdir
    try:
        yield tmp
        if path.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, backup / path.name)
            os.replace(tmp, path)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except FileAccessError:
        raise
    except OSError as exc:
        raise write_failed(path, exc) from exc
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


def not_utf8(path: str | os.PathLike) -> DataError:
    """The error for a text file that is not UTF-8: ``not UTF-8 at byte N of FILE:LINE`` (N counted from 1
    within the line), located by reading the file again as bytes."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    return DataError(f"not UTF-8 at byte {exc.start + 1} of {path}:{lineno} (byte "
                                     f"0x{raw[exc.start]:02x}); save the file as UTF-8")
    except OSError:
        pass
    return DataError(f"{path}: not UTF-8 text; save the file as UTF-8")


@contextmanager
def open_text(path: str | os.PathLike, newline: str | None = None) -> Iterator[IO[str]]:
    """Open a UTF-8 text file for reading (``with open_text(path) as fh``); a byte that is not UTF-8, met by
    any read of ``fh`` in the block, raises ``DataError("not UTF-8 at byte N of FILE:LINE")``. ``newline``
    as in ``open`` (``""`` for the csv module)."""
    path = Path(path)
    try:
        with path.open("r", encoding="utf-8", newline=newline) as fh:
            yield fh
    except UnicodeDecodeError:
        raise not_utf8(path) from None


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, record)`` for each non-blank line of a JSONL file.

    Raises:
        DataError: naming ``file:line`` when a line is not a JSON object or not UTF-8.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found" + (" (it is a folder)" if path.is_dir() else ""))
    with open_text(path) as fh:
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
        DataError: ``"<path>: <missing>"`` when the file does not exist; a byte that is not UTF-8.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {missing}")
    with open_text(path) as fh:
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
        with open_text(path) as fh:
            return json.loads(fh.read())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})") from None


def write_jsonl(path: str | os.PathLike, records: Iterable[dict], *, ensure_ascii: bool = False) -> int:
    """Write records (any iterable, consumed once) as JSONL atomically; returns the number of lines.

    ``ensure_ascii=True``: ``json.dumps``' default escaping (the byte format of the official pipeline files).
    """
    n = 0
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=ensure_ascii) + "\n")
            n += 1
    return n
