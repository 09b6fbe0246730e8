"""Checks that run before any model loads or any embedding is computed ("fail before work").

- :func:`check_output_dir` / :func:`check_output_file`: the output can be created and written (not under a
  regular file, not a folder where a file is expected, not read-only), tested by creating and removing a
  hidden probe file, so a permission problem is found in a second, not after hours of encoding.
- :func:`check_input_file` / :func:`check_input_dir`: an input exists and has the right kind.
- :func:`check_device`: the requested torch device exists on this machine (``--device cuda`` without CUDA is
  an :class:`~umarvel.errors.EnvError`, not a traceback from deep inside torch).
- :func:`scan_images`: every referenced image exists and has a readable header (PIL ``Image.open`` reads
  the header only, no decode), threaded; all problems are counted and the first few named with the record
  that references them. Commands expose ``--skip-image-check`` for huge sets.

Every error names the path and, where there is one, the option or key that gave it (``what``).
"""
from __future__ import annotations

import logging
import os
import stat
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

from umarvel.errors import ConfigError, DataError, EnvError, FileAccessError, ImageLoadError

logger = logging.getLogger(__name__)

#: Problems named in a scan error (the rest are counted).
SHOWN_PROBLEMS = 3
#: Images checked per block of the threaded scan (bounds the pending futures on multi-million sets).
SCAN_BLOCK = 8192
SKIP_HINT = "--skip-image-check skips this scan"


def _label(what: str | None, path: Path) -> str:
    return f"{what} {path}" if what else str(path)


def _existing_ancestor(path: Path) -> Path:
    """The deepest ancestor of ``path`` (or ``path`` itself) that exists; a regular file on the way is
    returned as is (the caller reports it)."""
    p = path
    while not os.path.lexists(p):
        if p.parent == p:
            break
        p = p.parent
    return p


def _probe_writable(folder: Path, label: str) -> None:
    """Create and remove a hidden file in ``folder``; FileAccessError if that fails."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".umarvel-write-test.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise FileAccessError(f"{label}: cannot write into {folder} ({exc.strerror or exc}); "
                              "nothing was written") from None


def _check_dir(path: Path, label: str) -> Path:
    """Create the folder ``path`` and check that it is writable (``label`` names it in errors)."""
    if path.exists() and not path.is_dir():
        raise FileAccessError(f"{label}: is a file, not a folder; give a folder path")
    anchor = _existing_ancestor(path)
    if not anchor.is_dir():
        raise FileAccessError(f"{label}: {anchor} is a file, not a folder, so nothing can be created under it")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FileAccessError(f"{label}: cannot create the folder {path} ({exc.strerror or exc})") from None
    _probe_writable(path, label)
    return path


def check_output_dir(path: str | os.PathLike, what: str | None = None) -> Path:
    """Make sure ``path`` is (or can become) a writable folder, and create it.

    Raises:
        FileAccessError: ``path`` is a file, a parent of it is a file, or the folder is not writable.
    """
    path = Path(path)
    return _check_dir(path, _label(what, path))


def check_output_file(path: str | os.PathLike, what: str | None = None) -> Path:
    """Make sure a file can be written at ``path`` (its folder is created if missing).

    Raises:
        FileAccessError: ``path`` is a folder, lies under a regular file, or its folder is not writable.
    """
    path = Path(path)
    label = _label(what, path)
    if path.is_dir():
        raise FileAccessError(f"{label}: is a folder; give a file path (e.g. {path / 'out.npy'})")
    anchor = _existing_ancestor(path.parent)
    if not anchor.is_dir():
        raise FileAccessError(f"{label}: {anchor} is a file, not a folder, so nothing can be created under it")
    _check_dir(path.parent, label)
    return path


def check_input_file(path: str | os.PathLike, what: str | None = None, error: type = DataError) -> Path:
    """``path`` must be an existing, readable file (``error`` is raised otherwise, naming ``what``)."""
    path = Path(path)
    label = _label(what, path)
    if path.is_dir():
        raise error(f"{label}: is a folder, expected a file")
    if not path.is_file():
        raise error(f"{label}: file not found")
    if not os.access(path, os.R_OK):
        raise FileAccessError(f"{label}: not readable (permission denied)")
    return path


def check_input_dir(path: str | os.PathLike, what: str | None = None, error: type = DataError) -> Path:
    """``path`` must be an existing folder."""
    path = Path(path)
    label = _label(what, path)
    if path.exists() and not path.is_dir():
        raise error(f"{label}: is a file, expected a folder")
    if not path.is_dir():
        raise error(f"{label}: folder not found")
    return path


def check_device(device: object, what: str = "--device") -> None:
    """The torch device ``device`` (``None``/``"auto"`` pass) exists on this machine.

    Raises:
        ConfigError: not a device name. EnvError: CUDA (or MPS) asked for but not available, or a GPU
            index beyond the visible GPUs.
    """
    if device is None or device == "auto":
        return
    import torch  # lazy: callers run before any model loads, and some keep torch off their imports

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ConfigError(f"{what} {device!r}: not a device ({exc}); use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "built without CUDA"
            raise EnvError(f"{what} {device}: CUDA is not available on this machine (torch {torch.__version__} "
                           f"{build}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
                           "use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise EnvError(f"{what} {device}: only {torch.cuda.device_count()} GPU(s) visible")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise EnvError(f"{what} {device}: MPS is not available on this machine; use --device cpu")


def check_positive(value: object, what: str) -> None:
    """ConfigError unless ``value`` is an int >= 1 (batch sizes, shard sizes)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")


# ------------------------------------------------------------------------------------------- image scan
def _image_problem(path: str) -> str | None:
    """None if ``path`` is an image PIL can identify (header only, no decode), else the reason."""
    from PIL import Image, UnidentifiedImageError  # lazy: only scans need PIL

    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "image file not found"
    except OSError as exc:
        return f"cannot access the image ({exc.strerror})"
    if stat.S_ISDIR(st.st_mode):
        return "is a folder, not an image file"
    if st.st_size == 0:
        return "empty image file (0 bytes)"
    try:
        with Image.open(path) as im:
            w, h = im.size
    except UnidentifiedImageError:
        return "not an image PIL can read (unknown format or corrupt header)"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        return f"cannot read the image header ({exc})"
    if w <= 0 or h <= 0:
        return f"image has an empty side ({w}x{h})"
    return None


def scan_images(refs: Iterable[tuple[str, str]], *, what: str = "", workers: int = 16,
                shard: tuple[int, int] = (0, 1)) -> int:
    """Check every referenced image before any work starts.

    Args:
        refs: ``(image path, where)`` pairs; ``where`` names the record (``file:line`` and id). A path
            referenced several times is checked once (its first reference is named).
        what: what is being prepared (``"training data"``), for the log line.
        workers: threads (the scan is I/O bound).
        shard: ``(rank, world)``: check only every ``world``-th distinct path starting at ``rank`` (the
            ranks of a torchrun job share the scan).
    Returns:
        the number of distinct images checked (by this shard).
    Raises:
        ImageLoadError: naming the first problems (record, path, reason) and the total count, with the
            hint to pass ``--skip-image-check``.
    """
    first: dict[str, str] = {}
    for path, where in refs:
        if path not in first:
            first[path] = where
    rank, world = shard
    paths = list(first)[rank::world]
    if not paths:
        return 0
    t0 = time.perf_counter()
    problems: list[tuple[str, str]] = []
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(paths)))) as pool:
        for start in range(0, len(paths), SCAN_BLOCK):  # bounded: one future per image of a block only
            block = paths[start:start + SCAN_BLOCK]
            problems += [(p, r) for p, r in zip(block, pool.map(_image_problem, block)) if r]
            if len(paths) > 4 * SCAN_BLOCK and (start // SCAN_BLOCK) % 32 == 31:
                logger.info("checked %d / %d images (%d problems so far)", start + len(block), len(paths),
                            len(problems))
    logger.info("checked %d image(s)%s in %.1fs: %d problem(s)", len(paths), f" of the {what}" if what else "",
                time.perf_counter() - t0, len(problems))
    if problems:
        shown = "; ".join(f"{first[p]}: {r}: {p}" for p, r in problems[:SHOWN_PROBLEMS])
        more = f" (and {len(problems) - SHOWN_PROBLEMS} more)" if len(problems) > SHOWN_PROBLEMS else ""
        raise ImageLoadError(f"{len(problems)} of {len(paths)} referenced image(s) cannot be used: {shown}{more}; "
                             f"nothing was computed yet; fix the files or the records ({SKIP_HINT})")
    return len(paths)

