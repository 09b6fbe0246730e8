"""Shared helpers of the tests/test_train_*.py files: tiny stage configs on generated data."""
from __future__ import annotations

from pathlib import Path

from umarvel.train.config import StageConfig, load_stage_config

REPO = Path(__file__).resolve().parents[1]
STAGE_FILES = {"nli": "01_nli.yaml", "cc3m": "02_cc3m.yaml", "mbeir": "03_mbeir.yaml"}


def make_data(root: Path) -> dict[str, Path]:
    """Toy data of the three stages under ``root`` (created once per root)."""
    from umarvel.train.toy_data import make_toy_all

    if not (root / "nli.csv").is_file():
        make_toy_all(root, n=32)
    return {"nli": root / "nli.csv", "cc3m": root / "cc3m", "mbeir": root / "mbeir"}


def data_overrides(kind: str, data: dict[str, Path]) -> list[str]:
    if kind == "nli":
        return [f"data.path={data['nli']}"]
    if kind == "cc3m":
        return [f"data.path={data['cc3m'] / 'train_anno.json'}", f"data.root={data['cc3m']}"]
    return [f"data.root={data['mbeir']}", "data.path=null", "data.pool=null", "data.instructions=null"]


def tiny_config(kind: str, init_from: Path, data: dict[str, Path], out: Path, *extra: str) -> StageConfig:
    """The stage's real YAML with tiny-model overrides (fp32, no DeepSpeed, small LoRA, no workers)."""
    overrides = [f"init_from={init_from}", f"train.output_dir={out}", "model.dtype=float32",
                 "train.deepspeed=null", "data.num_workers=0", "lora.r=4", "lora.alpha=8",
                 "train.per_device_batch_size=4", "train.max_steps=2", "train.report_to=[tensorboard]",
                 *data_overrides(kind, data), *extra]
    return load_stage_config(REPO / "configs" / "stages" / STAGE_FILES[kind], overrides)
