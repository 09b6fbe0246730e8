"""Every committed config under configs/ resolves to the values recorded in resolved_configs.yaml.

The snapshot was taken before the shared blocks moved to configs/base/ (issue 10), so factoring YAML can
never change a run. A field added later with a default is tolerated (not in the snapshot); any recorded
value that changes fails. After an intended change of a published value, rewrite the snapshot with
``PYTHONPATH=. python tests/utils/test_repo_configs.py`` and review the diff.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from umarvel.config import dump_resolved, load_config

REPO = Path(__file__).resolve().parents[2]
SNAPSHOT = Path(__file__).with_name("resolved_configs.yaml")


def _resolve(rel: str) -> dict:
    """The resolved config of ``configs/...`` as a plain dict (its dataclass chosen by its folder)."""
    path = REPO / rel
    kind = Path(rel).parts[1]
    if kind == "stages":
        from umarvel.train.config import load_stage_config

        cfg = load_stage_config(path)
    elif kind == "rerank":
        from umarvel.rerank.train import RerankTrainConfig

        cfg = load_config(path, RerankTrainConfig)
    elif kind == "teacher":
        from umarvel.pipelines.teacher import TeacherConfig

        cfg = load_config(path, TeacherConfig)
    elif kind == "eval":
        from umarvel.eval.mbeir.config import MBeirEvalConfig

        cfg = load_config(path, MBeirEvalConfig)
    else:
        raise KeyError(rel)
    return yaml.safe_load(dump_resolved(cfg))


def _config_files() -> list[str]:
    return sorted(str(p.relative_to(REPO)) for d in ("stages", "rerank", "teacher", "eval")
                  for p in (REPO / "configs" / d).glob("*.yaml"))


def _differences(expected: Any, actual: Any, key: str = "") -> list[str]:
    """Keys of ``expected`` whose value differs in ``actual`` (keys only in ``actual`` are new fields: fine)."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        out = []
        for k, v in expected.items():
            sub = f"{key}.{k}" if key else str(k)
            out += [f"{sub}: missing"] if k not in actual else _differences(v, actual[k], sub)
        return out
    return [] if expected == actual else [f"{key}: {expected!r} -> {actual!r}"]


def test_snapshot_covers_every_config():
    assert sorted(yaml.safe_load(SNAPSHOT.read_text())) == _config_files()


@pytest.mark.parametrize("rel", _config_files())
def test_config_resolves_to_the_recorded_values(rel):
    expected = yaml.safe_load(SNAPSHOT.read_text())[rel]
    assert not _differences(expected, _resolve(rel)), _differences(expected, _resolve(rel))


def test_differences_catches_changed_and_missing_values():
    assert _differences({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3, "new": 0}}) == ["a.c: 2 -> 3"]
    assert _differences({"a": 1}, {}) == ["a: missing"]


if __name__ == "__main__":  # rewrite the snapshot (review the diff!)
    data = {rel: _resolve(rel) for rel in _config_files()}
    header = "# Resolved configs/ (dump_resolved); regenerate: PYTHONPATH=. python tests/utils/test_repo_configs.py\n"
    SNAPSHOT.write_text(header + yaml.safe_dump(data, sort_keys=False))
    sys.exit(0)
