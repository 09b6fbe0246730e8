"""scripts/train_umarvel.sh: the tiny CPU chain (UMARVEL_TINY=1, one optimiser step per stage) resumes after an
interruption without redoing finished steps, and an interrupted training step resumes from its checkpoint.

SLOW: about 2 minutes on 2 CPU cores (stages 1-5, mining, reranker, teacher; U-MARVEL+ steps are not run here).
Skip with ``UMARVEL_SKIP_SLOW=1``.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.environ.get("UMARVEL_SKIP_SLOW") == "1", reason="slow recipe test (~2 min)")]
ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "train_umarvel.sh"
STEPS = ["stage1", "stage2", "stage3", "mine3", "rerank", "stage4", "mine4", "teacher", "stage5"]


def _run(out: Path, **env) -> subprocess.CompletedProcess:
    e = dict(os.environ, UMARVEL_TINY="1", OUT=str(out), OMP_NUM_THREADS="1", UMARVEL_NO_PROGRESS="1",
             PYTHON=sys.executable, **env)
    e.pop("PLUS", None)
    return subprocess.run(["bash", str(SCRIPT)], env=e, capture_output=True, text=True, timeout=600)


def _lines(proc, word: str) -> list[str]:
    return [ln.split("] ", 1)[1].split(":")[0] for ln in proc.stderr.splitlines()
            if ln.startswith("[train_umarvel]") and ln.endswith(word)]


def test_recipe_resumes_without_redoing_finished_steps(tmp_path):
    out = tmp_path / "run"
    # 1st run: the teacher step fails (a bad override), as an interruption after mine4 would.
    first = _run(out, TEACHER_ARGS="top_k=not_a_number")
    assert first.returncode != 0, first.stderr[-2000:]
    assert _lines(first, "complete") == STEPS[:7]
    assert not (out / ".done" / "teacher").exists()
    marks = {s: (out / ".done" / s).stat().st_mtime_ns for s in STEPS[:7]}

    # 2nd run: the finished steps are skipped, the rest runs.
    second = _run(out)
    assert second.returncode == 0, second.stderr[-3000:]
    assert _lines(second, "already complete, skipped") == STEPS[:7]
    assert _lines(second, "complete") == ["teacher", "stage5"]
    assert {s: (out / ".done" / s).stat().st_mtime_ns for s in STEPS[:7]} == marks
    assert (out / "05_mbeir_distill" / "merged" / "config.json").is_file()
    assert (out / "teacher" / "fusion_results.jsonl").is_file()

    # An interrupted training step (checkpoint written, no marker, no export) resumes from its checkpoint.
    (out / ".done" / "stage5").unlink()
    shutil.rmtree(out / "05_mbeir_distill" / "merged")
    shutil.rmtree(out / "05_mbeir_distill" / "adapter")
    third = _run(out, STEPS="stage5")
    assert third.returncode == 0, third.stderr[-3000:]
    assert "resumed from" in third.stderr
    assert (out / "05_mbeir_distill" / "merged" / "config.json").is_file()
    assert _lines(third, "complete") == ["stage5"]
