"""Run folders (umarvel.utils.runs): identity compared on relaunch, one writer (lock), workers die with
their launcher."""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field

import pytest
from helpers import REPO

from umarvel.errors import RunConflictError
from umarvel.utils.runs import (IDENTITY_FILE, LOCK_FILE, RunIdentity, RunLock, claim_run_dir, fingerprint_path,
                                read_identity)


@dataclass(frozen=True)
class _Train:
    learning_rate: float = 1e-4
    batch_size: int = 8
    output_dir: str = "out"


@dataclass(frozen=True)
class _Cfg:
    stage: str = "03_mbeir"
    data_path: str = "data.jsonl"
    train: _Train = field(default_factory=_Train)


IGNORE = ("train.batch_size", "train.output_dir", "data_path")


def _identity(tmp_path, cfg=_Cfg(), data_text="a\nb\n", data_name="data.jsonl") -> RunIdentity:
    data = tmp_path / data_name
    if not data.exists():
        data.write_text(data_text)
    return RunIdentity.build("train", cfg, ignore=IGNORE, inputs={"data": data})


# ------------------------------------------------------------------------------------------------ identity
def test_same_identity_resumes_and_ignored_keys_do_not_block(tmp_path):
    out = tmp_path / "run"
    with claim_run_dir(out, _identity(tmp_path)) as first:
        assert first.state == "new"
    rec = read_identity(out)
    assert rec["kind"] == "train" and rec["config"]["train"]["learning_rate"] == 1e-4
    # batch size and the output / data paths do not change the result; the data content is the same
    moved = tmp_path / "copy"
    moved.mkdir()
    (moved / "data.jsonl").write_text("a\nb\n")
    cfg = _Cfg(data_path="copy/data.jsonl", train=_Train(batch_size=64, output_dir="elsewhere"))
    with claim_run_dir(out, RunIdentity.build("train", cfg, ignore=IGNORE, inputs={"data": moved / "data.jsonl"})) as c:
        assert c.state == "resumed" and c.changes == []
    assert read_identity(out)["created"] == rec["created"]


def test_different_config_refused_naming_keys_and_ways_forward(tmp_path):
    out = tmp_path / "run"
    claim_run_dir(out, _identity(tmp_path)).release()
    cfg = _Cfg(stage="02_cc3m", train=_Train(learning_rate=2e-4))
    with pytest.raises(RunConflictError) as err:
        claim_run_dir(out, _identity(tmp_path, cfg), override_hint="rerun with --overwrite to replace it")
    msg = str(err.value)
    assert "\n" not in msg and str(out) in msg
    assert "train.learning_rate: 0.0001 -> 0.0002" in msg and "stage: 03_mbeir -> 02_cc3m" in msg
    assert "--overwrite" in msg and "new output folder" in msg
    assert not (out / LOCK_FILE).exists()  # a refused launch leaves no lock behind
    assert read_identity(out)["config"]["stage"] == "03_mbeir"  # nothing recorded


def test_changed_input_content_is_a_difference(tmp_path):
    out = tmp_path / "run"
    claim_run_dir(out, _identity(tmp_path)).release()
    (tmp_path / "data.jsonl").write_text("a\nb\nc\n")
    with pytest.raises(RunConflictError, match="data content changed"):
        claim_run_dir(out, _identity(tmp_path))


def test_overwrite_replaces_and_accept_changes_continues(tmp_path):
    out = tmp_path / "run"
    claim_run_dir(out, _identity(tmp_path), outputs=("checkpoints", "merged")).release()
    (out / "checkpoints" / "step-1").mkdir(parents=True)
    (out / "merged").mkdir()
    (out / "notes.txt").write_text("mine")
    changed = _identity(tmp_path, _Cfg(train=_Train(learning_rate=5e-5)))
    # record=False: checked, nothing removed or written until record()
    claim = claim_run_dir(out, changed, overwrite=True, outputs=("checkpoints", "merged"), record=False)
    assert claim.state == "replaced" and (out / "checkpoints").exists()
    assert read_identity(out)["config"]["train"]["learning_rate"] == 1e-4
    claim.record()
    claim.release()
    assert not (out / "checkpoints").exists() and not (out / "merged").exists()
    assert (out / "notes.txt").read_text() == "mine"  # only the run's own outputs are removed
    rec = read_identity(out)
    assert rec["config"]["train"]["learning_rate"] == 5e-5 and rec["history"][0]["how"] == "replaced"
    again = _identity(tmp_path, _Cfg(train=_Train(learning_rate=1e-5)))
    with claim_run_dir(out, again, accept_changes=True) as c:
        assert c.state == "changed" and c.changes == ["train.learning_rate: 5e-05 -> 1e-05"]
    assert [h["how"] for h in read_identity(out)["history"]] == ["replaced", "changed"]


def test_keys_unknown_to_the_recorded_run_are_not_compared(tmp_path):
    out = tmp_path / "run"
    claim_run_dir(out, _identity(tmp_path)).release()
    rec = json.loads((out / IDENTITY_FILE).read_text())
    del rec["config"]["train"]["learning_rate"]  # a field added by a newer version
    (out / IDENTITY_FILE).write_text(json.dumps(rec))
    with claim_run_dir(out, _identity(tmp_path, _Cfg(train=_Train(learning_rate=3.0)))) as c:
        assert c.state == "resumed"


def test_legacy_folder_compared_with_its_saved_config(tmp_path):
    out = tmp_path / "run"
    legacy = {"kind": "train", "config": {"stage": "01_nli", "train": {"learning_rate": 1e-4}}}
    with pytest.raises(RunConflictError, match="stage: 01_nli -> 03_mbeir"):
        claim_run_dir(out, _identity(tmp_path), legacy=legacy)
    with claim_run_dir(out, _identity(tmp_path), legacy={**legacy, "config": {"stage": "03_mbeir"}}) as c:
        assert c.state == "resumed"


def test_fingerprint_of_files_and_folders(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(b"0" * 300_000)
    a = fingerprint_path(f)
    f.write_bytes(b"0" * 299_999 + b"1")
    assert fingerprint_path(f) != a and fingerprint_path(tmp_path / "nope") == "missing"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    d = fingerprint_path(ckpt)
    (ckpt / ".lock").write_text("x")  # hidden files do not count
    assert fingerprint_path(ckpt) == d
    (ckpt / "model.safetensors").write_bytes(b"w")
    assert fingerprint_path(ckpt) != d


# ---------------------------------------------------------------------------------------------------- lock
def test_second_claim_refused_naming_the_holder_and_lock_removed_on_release(tmp_path):
    out = tmp_path / "run"
    first = claim_run_dir(out, _identity(tmp_path))
    holder = json.loads((out / LOCK_FILE).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname() and holder["started"]
    with pytest.raises(RunConflictError) as err:
        claim_run_dir(out, _identity(tmp_path))
    msg = str(err.value)
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in msg and "in use" in msg
    first.release()
    first.release()  # idempotent
    assert not (out / LOCK_FILE).exists()
    claim_run_dir(out, _identity(tmp_path)).release()


_HOLD = textwrap.dedent("""
    import sys, time
    from umarvel.utils.runs import RunLock
    lock = RunLock(sys.argv[1]).acquire()
    print("held", flush=True)
    time.sleep(60)
""")


def _python(code: str, *args: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE, text=True, **kw)


def test_lock_of_another_live_process_refused_then_stale_after_kill_9(tmp_path, caplog):
    out = tmp_path / "run"
    out.mkdir()
    proc = _python(_HOLD, str(out))
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(RunConflictError, match=f"in use by pid {proc.pid} on host"):
            RunLock(out).acquire()
    finally:
        proc.kill()  # SIGKILL: no cleanup, the lock file stays with its content
        proc.wait()
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == proc.pid
    with caplog.at_level(logging.WARNING, logger="umarvel"):
        lock = RunLock(out).acquire()
    assert "taking over the stale lock" in caplog.text and f"pid {proc.pid}" in caplog.text
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_lock_of_another_host_trusted_while_its_heartbeat_is_fresh(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps({"pid": 4242, "host": "node-17", "started": "earlier"}))
    with pytest.raises(RunConflictError, match="pid 4242 on host node-17"):
        RunLock(out).acquire()
    old = time.time() - 3600
    os.utime(out / LOCK_FILE, (old, old))  # no heartbeat for an hour: that run is gone
    RunLock(out).acquire().release()


# ---------------------------------------------------------------------------------- workers die with launcher
_LAUNCHER = textwrap.dedent("""
    import os, subprocess, sys, time
    env = dict(os.environ, LOCAL_RANK="0", RANK="0", WORLD_SIZE="1")
    child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], env=env, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    print(child.pid, flush=True)
    time.sleep(120)
""")
# The worker goes through the CLI dispatcher, which binds it to its launcher under torchrun-like env.
_WORKER = textwrap.dedent("""
    import argparse, time
    from umarvel.commands import dispatch
    def work(args):
        print("ready", flush=True)
        time.sleep(120)
    dispatch(work, argparse.Namespace(log_level="WARNING"))
""")
_BARE_WORKER = "import time; print('ready', flush=True); time.sleep(120)"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _orphan_after_launcher_kill(worker_code: str, wait: float) -> tuple[int, bool]:
    launcher = _python(_LAUNCHER, worker_code)
    worker = int(launcher.stdout.readline())
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait()
    deadline = time.monotonic() + wait
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    return worker, _alive(worker)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_worker_exits_when_its_launcher_is_killed():
    worker, alive = _orphan_after_launcher_kill(_WORKER, wait=15)
    assert not alive, f"worker {worker} survived the SIGKILL of its launcher"
    # control: a worker that does not bind itself outlives the launcher (what the issue observed)
    bare, bare_alive = _orphan_after_launcher_kill(_BARE_WORKER, wait=1)
    try:
        assert bare_alive
    finally:
        os.kill(bare, signal.SIGKILL)


_TORCHRUN_SCRIPT = textwrap.dedent("""
    import argparse, os, sys, time
    from umarvel.commands import dispatch
    def work(args):
        with open(sys.argv[1], "w") as fh:
            fh.write(str(os.getpid()))
        time.sleep(120)
    dispatch(work, argparse.Namespace(log_level="WARNING"))
""")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_torchrun_worker_exits_when_torchrun_is_killed(tmp_path):
    """The issue's probe: ``kill -9`` of the torchrun launcher alone must not leave the worker running."""
    script = tmp_path / "worker.py"
    script.write_text(_TORCHRUN_SCRIPT)
    pid_file = tmp_path / "worker.pid"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
                                 "--master-port", str(_free_port()), str(script), str(pid_file)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (pid_file.is_file() and pid_file.read_text()) and time.monotonic() < deadline:
            assert launcher.poll() is None, "torchrun ended early"
            time.sleep(0.2)
        worker = int(pid_file.read_text())
    finally:
        launcher.kill()
        launcher.wait()
    deadline = time.monotonic() + 15
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(worker):
        os.kill(worker, signal.SIGKILL)
        pytest.fail(f"worker {worker} survived the SIGKILL of torchrun")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
