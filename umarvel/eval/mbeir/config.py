"""Settings of one M-BEIR evaluation run (``configs/eval/mbeir_{local,global}.yaml``, ``umarvel eval mbeir``).

Kept apart from the runner and free of torch: ``umarvel eval mbeir`` generates its flags from these fields
(:mod:`umarvel.commands.flags`), and ``umarvel --help`` must stay fast. A new option is one field here,
with its help in the field's metadata; the flag, the YAML key and the resolved ``config.yaml`` follow.
"""
from __future__ import annotations

import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from umarvel.data.mbeir import DEFAULT_INSTRUCTION_SEED
from umarvel.errors import ConfigError
from umarvel.eval import DEFAULT_SHARD_SIZE
from umarvel.utils.checks import check_positive
from umarvel.utils.compat import DEFAULT, CompatMode


def parse_task_list(value: str) -> list[str] | None:
    """``--tasks``: ``"a,b"`` -> ``["a", "b"]``; ``"all"`` -> ``None`` (every task)."""
    if value.strip().lower() == "all":
        return None
    names = [t.strip() for t in value.split(",") if t.strip()]
    if not names:
        raise ConfigError(f"--tasks {value!r}: give comma-separated task names or 'all'")
    return names


def _opt(help: str, **meta) -> dict:
    return {"help": help, **meta}


@dataclass(frozen=True)
class MBeirEvalConfig:
    """Settings of one M-BEIR evaluation run; each field's help (metadata) is also its flag's help.

    The cache key does not include ``batch_size`` (it does not change the vectors; with ``compat="official"``
    the official batches do, and the mode is in the key). ``model``, ``mbeir_root`` and ``output`` are required.
    """

    model: str = field(metadata=_opt("checkpoint folder"))
    mbeir_root: str = field(metadata=_opt("M-BEIR root folder (query/, cand_pool/, qrels/, instructions/, images)"))
    output: str = field(metadata=_opt("output folder; use .../local and .../global to pair both protocols"))
    protocol: Literal["local", "global"] = field(default="local", metadata=_opt(
        "local: each task's own pool; global: the 16 local pools concatenated (D8)"))
    split: Literal["test", "val"] = field(default="test", metadata=_opt("query split"))
    tasks: list[str] | None = field(default=None, metadata=_opt(
        "comma-separated registry task names, or 'all' (default: all 16; absent ones are skipped with a "
        "warning, named ones that are absent are an error)", parse=parse_task_list))
    instruction: Literal["random", "first"] = field(default="random", metadata=_opt(
        "random (seeded per query, official protocol, D7) or first (always prompt_1)"))
    seed: int = field(default=DEFAULT_INSTRUCTION_SEED, metadata=_opt("instruction seed (written into results.json)"))
    batch_size: int = field(default=32, metadata=_opt("encode batch size"))
    device: str | None = field(default=None, metadata=_opt("cpu | cuda | cuda:N (default: cuda if available)"))
    dtype: str | None = field(default=None, metadata=_opt(
        "float32 | bfloat16 | float16 (default: bf16 on CUDA, fp32 on CPU)"))
    cache_dir: str | None = field(default=None, metadata=_opt("embedding cache (default <output>/../cache)"))
    backend: Literal["torch", "faiss", "faiss-ivf", "faiss-hnsw"] = field(default="torch", metadata=_opt(
        "search backend: torch or faiss (exact), faiss-ivf or faiss-hnsw (approximate)"))
    search_device: str | None = field(default=None, metadata=_opt("torch search device (default: the model's)"))
    allow_missing: bool = field(default=False, metadata=_opt(
        "score queries whose positives are unknown to the pool(s) instead of failing"))
    shard_size: int = field(default=DEFAULT_SHARD_SIZE, metadata=_opt(
        "items per cache shard (resume unit, rank sharding unit)"))
    compat: CompatMode = field(default=DEFAULT, metadata=_opt(
        "official: the official evaluation numerics (unpadded batches causal, D5; the official batches of 16 in "
        "file order, --batch-size then unused; docs/decisions.md 'Compatibility mode'); recorded in results.json; "
        "default: umarvel's"))

    def __post_init__(self) -> None:
        for key in ("model", "mbeir_root", "output"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                raise ConfigError(f"MBeirEvalConfig.{key} is required (a non-empty path)")
        hints = typing.get_type_hints(type(self))
        for key in ("protocol", "split", "instruction", "backend", "compat"):
            allowed = typing.get_args(hints[key])
            if getattr(self, key) not in allowed:
                raise ConfigError(f"MBeirEvalConfig.{key} must be one of {list(allowed)}, got {getattr(self, key)!r}")
        for key in ("batch_size", "shard_size"):
            check_positive(getattr(self, key), f"MBeirEvalConfig.{key}")
        if self.tasks is not None:
            if isinstance(self.tasks, str) or not all(isinstance(t, str) and t for t in self.tasks):
                raise ConfigError(f"MBeirEvalConfig.tasks must be a list of task names or null, got {self.tasks!r}")
            object.__setattr__(self, "tasks", list(self.tasks))

    def resolved_cache_dir(self) -> Path:
        """``cache_dir``, or ``<output>/../cache`` (shared by sibling local/global output folders)."""
        return Path(self.cache_dir) if self.cache_dir else Path(self.output).resolve().parent / "cache"
