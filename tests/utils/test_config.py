"""Config loading: nested frozen dataclasses, base includes, overrides, type checks, unknown keys, dump."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import pytest

from umarvel.config import config_from_dict, dump_resolved, load_config, save_resolved
from umarvel.errors import ConfigError


@dataclass(frozen=True)
class TemperatureCfg:
    init: float | Literal["carry"] = 0.05
    learnable: bool = False


@dataclass(frozen=True)
class ModelCfg:
    name: str
    lora_r: int = 8
    temperature: TemperatureCfg = field(default_factory=TemperatureCfg)


@dataclass(frozen=True)
class TrainCfg:
    learning_rate: float = 1e-4
    epochs: int = 1
    output_dir: Path = Path("outputs")
    bf16: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StageCfg:
    stage: Literal["nli", "cc3m", "mbeir", "mbeir_hardneg", "distill"]
    model: ModelCfg
    train: TrainCfg = field(default_factory=TrainCfg)
    init_from: Optional[str] = None
    tasks: tuple[str, ...] = ()
    weights: list[float] = field(default_factory=list)
    loss: list[dict[str, Any]] = field(default_factory=list)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def stage_file(tmp_path):
    _write(tmp_path / "base" / "model.yaml", "model:\n  name: tiny\n  lora_r: 64\ntrain:\n  epochs: 2\n")
    _write(tmp_path / "base" / "train.yaml", "train:\n  learning_rate: 2e-4\n  bf16: true\n")
    return _write(
        tmp_path / "stages" / "s4.yaml",
        "base: [../base/model.yaml, ../base/train.yaml]\n"
        "stage: mbeir_hardneg\n"
        "model:\n  lora_r: 128\n  temperature: {init: carry, learnable: true}\n"
        "train:\n  output_dir: out/s4\n  extra: {warmup_ratio: 0.03}\n"
        "tasks: [webqa_task2, cirr_task7]\n"
        "weights: [1, 0.5]\n"
        "loss:\n  - {name: info_nce, weight: 1.0}\n",
    )


def test_load_with_bases_and_types(stage_file):
    cfg = load_config(stage_file, StageCfg)
    assert cfg.stage == "mbeir_hardneg"
    assert cfg.model == ModelCfg(name="tiny", lora_r=128, temperature=TemperatureCfg("carry", True))
    # base value kept where the file does not set it; YAML 1.1 reads 2e-4 as a string -> float
    assert cfg.train.learning_rate == 2e-4 and isinstance(cfg.train.learning_rate, float)
    assert cfg.train.epochs == 2 and cfg.train.bf16 is True
    assert cfg.train.output_dir == Path("out/s4") and cfg.train.extra == {"warmup_ratio": 0.03}
    assert cfg.tasks == ("webqa_task2", "cirr_task7")
    assert cfg.weights == [1.0, 0.5] and all(isinstance(w, float) for w in cfg.weights)
    assert cfg.init_from is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.stage = "nli"  # type: ignore[misc]


def test_overrides(stage_file):
    cfg = load_config(stage_file, StageCfg, [
        "train.learning_rate=1e-5", "model.temperature.init=0.03", "tasks=[oven_task6]",
        "init_from=outputs/03/merged", "train.epochs=3",
    ])
    assert cfg.train.learning_rate == 1e-5
    assert cfg.model.temperature.init == 0.03
    assert cfg.tasks == ("oven_task6",)
    assert cfg.init_from == "outputs/03/merged" and cfg.train.epochs == 3
    assert load_config(stage_file, StageCfg, ["init_from=null"]).init_from is None


def test_unknown_key_in_file_names_file_key_and_suggestion(stage_file, tmp_path):
    _write(tmp_path / "base" / "train.yaml", "train:\n  learning_rat: 2e-4\n")
    with pytest.raises(ConfigError) as exc:
        load_config(stage_file, StageCfg)
    msg = str(exc.value)
    assert "train.yaml" in msg and "'train.learning_rat'" in msg and "learning_rate" in msg


def test_unknown_key_in_override(stage_file):
    with pytest.raises(ConfigError) as exc:
        load_config(stage_file, StageCfg, ["model.temperature.learnabel=true"])
    msg = str(exc.value)
    assert "override 'model.temperature.learnabel=true'" in msg and "learnable" in msg
    with pytest.raises(ConfigError, match="unknown key 'nonsense'"):
        load_config(stage_file, StageCfg, ["nonsense=1"])


@pytest.mark.parametrize("override,match", [
    ("train.epochs=1.5", "train.epochs: expected int"),
    ("train.bf16=1", "train.bf16: expected bool"),
    ("stage=pretrain", "expected one of"),
    ("train.learning_rate=fast", "train.learning_rate: expected float"),
    ("tasks=webqa", "tasks: expected a list"),
    ("weights=[1, x]", r"weights\[1\]: expected float"),
    ("model=3", "model: expected a mapping"),
    ("model.name=", "model.name: a value is required"),
    ("train.epochs", "expected dotted key=value"),
    ("model.name.x=1", "'model.name' is not a section"),
])
def test_type_errors(stage_file, override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(stage_file, StageCfg, [override])


def test_missing_required_and_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="missing required key 'model.name'"):
        config_from_dict({"stage": "nli", "model": {}}, StageCfg)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml", StageCfg)
    _write(tmp_path / "a.yaml", "base: b.yaml\nstage: nli\n")
    _write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(tmp_path / "a.yaml", StageCfg)
    _write(tmp_path / "list.yaml", "- 1\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(tmp_path / "list.yaml", StageCfg)


def test_dump_and_save_round_trip(stage_file, tmp_path):
    cfg = load_config(stage_file, StageCfg, ["train.learning_rate=3e-5"])
    text = dump_resolved(cfg)
    assert "base" not in text and "learning_rate: 3.0e-05" in text
    out = save_resolved(cfg, tmp_path / "run" / "resolved_config.yaml")
    assert out.read_text() == text
    assert load_config(out, StageCfg) == cfg
    assert not list((tmp_path / "run").glob(".*tmp"))


def test_config_from_dict_coercions():
    cfg = config_from_dict({"stage": "nli", "model": {"name": 7, "lora_r": "64"}}, StageCfg,
                           ["train.output_dir=/tmp/x", "train.epochs=2.0"])
    assert cfg.model.name == "7" and cfg.model.lora_r == 64
    assert cfg.train.output_dir == Path("/tmp/x") and cfg.train.epochs == 2
    assert cfg.model.temperature.init == 0.05
