"""Run folders: each output folder knows the run it holds, and has one writer at a time.

A *run folder* is the output of one training stage, evaluation, mining, teacher or index run. It holds:

``run_identity.json``
    written when the run starts: the kind of run, its resolved config, the fingerprints of its inputs
    (content of the data files and of the model it starts from) and the resulting fingerprint. A relaunch
    into the same folder compares: the same identity resumes (as before); a different one is refused with
    one line naming the differing keys and the two ways forward (the command's explicit override, e.g.
    ``--overwrite``, or a new folder). Settings that do not change the result (batch size, device, logging,
    where the folder or the data live) are listed in ``ignore`` and never block a resume; input *paths* are
    ignored too, their *content* is compared (data copied to a local disk still resumes).
``.lock``
    an advisory lock (``fcntl.flock`` on Linux, plus the holder's pid, host and start time as JSON for the
    messages), taken for the whole run by the process that writes the folder (rank 0) and removed on exit.
    A second launch is refused naming the holder. A lock left by a process that is gone (killed) is taken
    over with a warning: the kernel frees the ``flock`` of a dead process; where ``flock`` cannot be trusted
    across hosts the holder's heartbeat (the file's mtime, refreshed every minute) decides.

:func:`exit_with_parent` makes a torchrun worker die with its launcher (``prctl(PR_SET_PDEATHSIG)``), so a
``kill -9`` of the launcher does not leave a worker writing into the folder.

Typical use (one call where the run starts, before any model loads)::

    identity = RunIdentity.build("eval-mbeir", cfg, ignore=("batch_size", "device"), inputs={"model": cfg.model})
    with claim_run_dir(cfg.output, identity, overwrite=args.overwrite):
        ...  # the run
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from umarvel.config import to_plain
from umarvel.errors import RunConflictError
from umarvel.utils.checks import check_output_dir
from umarvel.utils.io import atomic_write_json

logger = logging.getLogger(__name__)

IDENTITY_FILE = "run_identity.json"
LOCK_FILE = ".lock"
#: The lock holder refreshes the lock file's mtime this often (seconds) ...
HEARTBEAT_S = 60.0
#: ... and a lock of another host not refreshed for this long is stale.
STALE_AFTER_S = 10 * 60.0
#: Bytes hashed at each end of an input file (its size is always compared).
HASH_EDGE = 1 << 16
#: Files hashed in an input folder (a checkpoint); beyond this only the count is compared.
MAX_FOLDER_FILES = 4096
_SHOWN_DIFFS = 6


# ----------------------------------------------------------------------------------------------- identity
def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}`` (lists are values)."""
    if isinstance(tree, Mapping) and tree:
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: tree} if prefix else {}


def _file_digest(path: Path, size: int) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        h.update(fh.read(HASH_EDGE))
        if size > 2 * HASH_EDGE:
            fh.seek(size - HASH_EDGE)
        h.update(fh.read(HASH_EDGE))
    return h.hexdigest()[:16]


def fingerprint_path(path: str | os.PathLike | None) -> str:
    """A cheap content fingerprint of an input file or folder.

    File: size + SHA-256 of its first and last 64 KiB (any edit of a JSONL changes one or the other, a copy
    keeps it). Folder (a checkpoint): the same for each file under it, by relative path (hidden files and
    ``checkpoints/`` left out). Missing: ``"missing"``.
    """
    if path is None:
        return "none"
    p = Path(path)
    try:
        if p.is_file():
            size = p.stat().st_size
            return f"file:{size}:{_file_digest(p, size)}"
        if p.is_dir():
            h = hashlib.sha256()
            files = sorted(f for f in p.rglob("*") if f.is_file() and not any(
                part.startswith(".") or part == "checkpoints" for part in f.relative_to(p).parts))
            for f in files[:MAX_FOLDER_FILES]:
                size = f.stat().st_size
                h.update(f"{f.relative_to(p).as_posix()}:{size}:{_file_digest(f, size)}\n".encode())
            return f"dir:{len(files)}:{h.hexdigest()[:16]}"
    except OSError as exc:
        return f"unreadable:{exc.errno}"
    return "missing"


def _ignored(key: str, ignore: Iterable[str]) -> bool:
    return any(key == k or key.startswith(k + ".") for k in ignore)


@dataclass(frozen=True)
class RunIdentity:
    """What determines the result of a run.

    Attributes:
        kind: ``train``, ``eval-mbeir``, ``eval-zeroshot``, ``mine``, ``teacher``, ``index``, ...
        config: the resolved config as plain data (dataclass -> dict via :func:`to_plain`).
        ignore: dotted keys (or section prefixes) that do not change the result (batch size, device,
            logging, output and input *paths*); they never block a resume.
        inputs: ``{name: fingerprint}`` of the inputs (:func:`fingerprint_path`; ``"none"`` for an input
            not given): data files, the model.
    """

    kind: str
    config: dict
    ignore: tuple[str, ...] = ()
    inputs: dict[str, str] = field(default_factory=dict)

    @classmethod
    def build(cls, kind: str, config: Any, *, ignore: Iterable[str] = (),
              inputs: Mapping[str, str | os.PathLike | None] | None = None,
              fingerprints: Mapping[str, str] | None = None) -> "RunIdentity":
        """From a config dataclass (or mapping), the input paths to fingerprint and fingerprints known
        already (e.g. ``{"model": encoder.fingerprint()}`` for a model given as an object)."""
        fps = {name: fingerprint_path(p) for name, p in (inputs or {}).items()}
        fps.update(fingerprints or {})
        return cls(kind, to_plain(config), tuple(ignore), fps)

    def determining(self) -> dict[str, Any]:
        """The flat ``{key: value}`` that must match for a resume (config minus ``ignore``, plus inputs)."""
        out = {k: v for k, v in flatten(self.config).items() if not _ignored(k, self.ignore)}
        out.update({f"input:{name}": fp for name, fp in self.inputs.items()})
        return out

    def fingerprint(self) -> str:
        """Short hash of :meth:`determining` and the kind."""
        blob = json.dumps([self.kind, self.determining()], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_json(self) -> dict:
        return {"kind": self.kind, "fingerprint": self.fingerprint(), "config": self.config,
                "ignored_keys": list(self.ignore), "inputs": self.inputs}


def _short(value: Any, width: int = 40) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= width else text[: width - 3] + "..."


def identity_changes(old: Mapping[str, Any], new: RunIdentity) -> tuple[list[str], list[str]]:
    """``(differing, ignored)`` key descriptions between a recorded identity (JSON) and ``new``.

    Keys present on only one side are not compared (a field added by a newer umarvel has its default); the
    recorded config is filtered with ``new.ignore`` so that the current rules apply to both sides.
    """
    old_id = RunIdentity(str(old.get("kind")), dict(old.get("config") or {}), new.ignore,
                         dict(old.get("inputs") or {}))
    a, b = old_id.determining(), new.determining()
    differing = [k for k in sorted(set(a) & set(b)) if a[k] != b[k]]
    if old_id.kind != new.kind:
        differing.insert(0, "kind")
        a, b = {**a, "kind": old_id.kind}, {**b, "kind": new.kind}
    texts = [f"{k}: {_short(a[k])} -> {_short(b[k])}" if not k.startswith("input:")
             else f"{k[6:]} content changed" for k in differing]
    fa, fb = flatten(old_id.config), flatten(new.config)
    ignored = [f"{k}: {_short(fa[k])} -> {_short(fb[k])}" for k in sorted(set(fa) & set(fb))
               if fa[k] != fb[k] and _ignored(k, new.ignore)]
    return texts, ignored


def read_identity(folder: str | os.PathLike) -> dict | None:
    """The recorded ``run_identity.json`` of ``folder`` (None when absent or unreadable)."""
    path = Path(folder) / IDENTITY_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        logger.warning("%s unreadable (%s); treating the folder as new", path, exc)
        return None
    return data if isinstance(data, dict) else None


# --------------------------------------------------------------------------------------------------- lock
def now_iso() -> str:
    """The local time with its UTC offset, to the second (the timestamps of run and index records)."""
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe_holder(info: Mapping[str, Any] | None) -> str:
    """``pid 123 on host h (started ..., command ...)`` of a lock's JSON content."""
    if not info:
        return "an unknown process"
    cmd = info.get("command")
    cmd = f", command {_short(cmd, 80)}" if cmd else ""
    return f"pid {info.get('pid')} on host {info.get('host')} (started {info.get('started')}{cmd})"


class RunLock:
    """The advisory lock of a run folder (see the module doc). ``acquire()`` / ``release()``, or ``with``."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _read(self, fd: int) -> dict | None:
        try:
            raw = os.pread(fd, 65536, 0)
            return json.loads(raw.decode("utf-8")) if raw.strip() else None
        except (OSError, ValueError):
            return {"pid": "?", "host": "?", "started": "?"}

    def _refuse(self, info: dict | None, why: str = "") -> RunConflictError:
        return RunConflictError(
            f"{self.folder} is in use by {describe_holder(info)}{why}; wait for that run to end or stop it, "
            f"or use another output folder (if that process is gone, delete {self.path})")

    def acquire(self) -> "RunLock":
        """Take the lock or raise :class:`RunConflictError` naming the holder; stale locks are taken over."""
        import fcntl  # lazy: POSIX only

        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": now_iso(), "command": " ".join(sys.argv)}
        for _ in range(5):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                flock_ok = True
            except BlockingIOError:
                info = self._read(fd)
                os.close(fd)
                raise self._refuse(info) from None
            except OSError:  # no flock on this filesystem: the content and the heartbeat decide
                flock_ok = False
            try:
                same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same_file = False
            if not same_file:  # released and removed while we opened it: try the new file
                os.close(fd)
                continue
            old = self._read(fd)
            if old:
                try:
                    self._judge_previous(old, flock_ok)
                except RunConflictError:
                    os.close(fd)
                    raise
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
            os.fsync(fd)
            self._fd = fd
            self._start_heartbeat()
            return self
        raise self._refuse(None, " (the lock file keeps changing)")

    def _judge_previous(self, old: dict, flock_ok: bool) -> None:
        """A lock file with content that we could lock: stale (warn, take over) or held (raise)."""
        host, pid = old.get("host"), old.get("pid")
        age = time.time() - os.stat(self.path).st_mtime
        if host == socket.gethostname():
            if isinstance(pid, int) and pid != os.getpid() and _pid_alive(pid) and not flock_ok:
                raise self._refuse(old)
        elif age < STALE_AFTER_S:  # another host: its flock may not reach us; trust the heartbeat
            raise self._refuse(old, f", its lock refreshed {age:.0f}s ago")
        logger.warning("%s: taking over the stale lock of %s: that run ended without releasing it "
                       "(killed?)", self.folder, describe_holder(old))

    def _start_heartbeat(self) -> None:
        path, stop = self.path, self._stop

        def beat() -> None:
            while not stop.wait(HEARTBEAT_S):
                try:
                    os.utime(path)
                except OSError:
                    return
        self._beat = threading.Thread(target=beat, name="umarvel-run-lock", daemon=True)
        self._beat.start()

    def release(self) -> None:
        """Remove the lock file (if it is still ours) and unlock; idempotent."""
        if self._fd is None:
            return
        self._stop.set()
        fd, self._fd = self._fd, None
        try:
            mine = self._read(fd)
            if mine and mine.get("pid") == os.getpid() and os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                os.unlink(self.path)
        except OSError:
            pass
        finally:
            os.close(fd)  # closing drops the flock

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


# -------------------------------------------------------------------------------------------------- claim
@dataclass
class RunClaim:
    """A claimed run folder: the lock is held until :meth:`release` (or the ``with`` block ends).

    Attributes:
        folder: the run folder. identity: this run's identity.
        state: ``new`` (no run recorded), ``resumed`` (same identity), ``replaced`` (``overwrite``: the old
            outputs are removed) or ``changed`` (``accept_changes``: continue with another config).
        previous: the recorded identity found in the folder (None if none).
        changes: the differing keys (``replaced`` / ``changed``).
    """

    folder: Path
    identity: RunIdentity
    lock: RunLock
    state: str
    previous: dict | None = None
    changes: list[str] = field(default_factory=list)
    outputs: tuple[str, ...] = ()
    recorded: bool = False

    def record(self) -> None:
        """Apply the decision: remove the old outputs (``replaced``) and write ``run_identity.json``."""
        if self.recorded:
            return
        if self.state == "replaced":
            removed = [n for n in self.outputs if (self.folder / n).exists()]
            for name in removed:
                target = self.folder / name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                else:
                    target.unlink()
            logger.warning("%s: --overwrite: removed the previous run's %s", self.folder,
                           ", ".join(removed) or "record")
        history = list((self.previous or {}).get("history", []))
        if self.previous and not self.previous.get("legacy") and self.state in ("changed", "replaced"):
            history.append({"fingerprint": self.previous.get("fingerprint"), "until": now_iso(), "how": self.state,
                            "changes": self.changes})
        created = (self.previous or {}).get("created") if self.state in ("resumed", "changed") else None
        atomic_write_json(self.folder / IDENTITY_FILE, {
            **self.identity.to_json(), "created": created or now_iso(), "last_start": now_iso(), "history": history})
        self.recorded = True

    def release(self) -> None:
        """Release the lock (idempotent)."""
        self.lock.release()

    def __enter__(self) -> "RunClaim":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def claim_run_dir(folder: str | os.PathLike, identity: RunIdentity, *, overwrite: bool = False,
                  accept_changes: bool = False, outputs: Iterable[str] = (), record: bool = True,
                  what: str | None = None, override_hint: str = "rerun with --overwrite to replace it",
                  legacy: Mapping[str, Any] | None = None) -> RunClaim:
    """Claim ``folder`` for a run with ``identity``: check it is writable, take the lock, compare identities.

    Args:
        overwrite: start over: a recorded run (any identity) is replaced, its ``outputs`` removed on
            :meth:`RunClaim.record`.
        accept_changes: a different recorded run is continued with the new identity (a warning names the
            changes; for explicit resumes such as ``train.resume=<checkpoint>``).
        outputs: names (relative to ``folder``) of what this kind of run writes, removed by ``overwrite``.
        record: write ``run_identity.json`` now; pass False to check first and call ``record()`` once the
            other checks passed (so a failed start never records a config that did not run).
        what: the option that named the folder (for errors), e.g. ``"--output"``.
        override_hint: the command's own way to replace or continue, for the refusal message.
        legacy: the identity to compare with when the folder has no ``run_identity.json`` (e.g. the config
            saved with a checkpoint by an older umarvel): ``{"kind": ..., "config": ...}``.
    Raises:
        FileAccessError: the folder cannot be created or written.
        RunConflictError: another process holds the lock, or the folder holds a run with another identity.
    """
    folder = check_output_dir(folder, what)
    run_lock = RunLock(folder).acquire()
    try:
        previous = read_identity(folder)
        if previous is None and legacy is not None:
            previous = {**legacy, "legacy": True}
        present = [n for n in outputs if (folder / n).exists()]
        changes: list[str] = []
        if previous is None:
            if present and not overwrite:
                logger.warning("%s holds %s but no %s (written by an older umarvel?); adopting it for this "
                               "%s run", folder, ", ".join(present), IDENTITY_FILE, identity.kind)
            state = "replaced" if overwrite and present else "new"
        else:
            changes, ignored = identity_changes(previous, identity)
            if ignored:
                logger.info("%s: settings allowed to differ from the recorded run changed: %s", folder,
                            "; ".join(ignored))
            if overwrite:
                state = "replaced"
            elif not changes:
                state = "resumed"
            elif accept_changes:
                state = "changed"
                logger.warning("%s: continuing the recorded %s run with a changed config: %s", folder,
                               previous.get("kind"), "; ".join(changes))
            else:
                shown = "; ".join(changes[:_SHOWN_DIFFS])
                if len(changes) > _SHOWN_DIFFS:
                    shown += f"; and {len(changes) - _SHOWN_DIFFS} more"
                raise RunConflictError(
                    f"{folder} holds a {previous.get('kind')} run with a different config ({shown}); "
                    f"{override_hint}, or use a new output folder")
        claim = RunClaim(folder, identity, run_lock, state, previous, changes, tuple(outputs))
        if record:
            claim.record()
        return claim
    except BaseException:
        run_lock.release()
        raise


def claim_on_rank0(folder: str | os.PathLike, identity: RunIdentity, **kwargs: Any) -> RunClaim | nullcontext:
    """:func:`claim_run_dir` on global rank 0 (``RANK``, set by torchrun before any process group exists);
    the other ranks only check that the folder is writable and get a ``nullcontext`` to hold instead."""
    if int(os.environ.get("RANK", "0")) != 0:
        check_output_dir(folder, kwargs.get("what"))
        return nullcontext()
    return claim_run_dir(folder, identity, **kwargs)


# ------------------------------------------------------------------------------------------- launchers
def under_launcher() -> bool:
    """Whether this process is a worker started by torchrun / the DeepSpeed launcher."""
    env = os.environ
    return "TORCHELASTIC_RUN_ID" in env or ("LOCAL_RANK" in env and "WORLD_SIZE" in env)


def exit_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Have the kernel send ``sig`` to this process when its parent (the launcher) dies.

    Linux ``prctl(PR_SET_PDEATHSIG)``; without it a ``kill -9`` of the torchrun launcher leaves its workers
    training and writing into the run folder. If the parent is already gone when this is called, the
    signal is sent at once. Returns False where unsupported (not Linux).
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes  # lazy: Linux only

    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(1, int(sig), 0, 0, 0) != 0:  # 1 = PR_SET_PDEATHSIG
        logger.debug("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
        return False
    if os.getppid() != parent:  # the launcher died before the request took effect
        os.kill(os.getpid(), sig)
    return True
