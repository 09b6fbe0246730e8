"""``umarvel eval <benchmark>``: evaluation commands (``umarvel eval mbeir`` here; more can plug in).

Adding a benchmark (e.g. ``umarvel eval zeroshot``) without touching this file's logic, either:

- list ``"module:function"`` in :data:`EVAL_SUBCOMMANDS`; ``function(eval_subparsers)`` adds its parser
  with ``set_defaults(func=...)`` (imported lazily and skipped while the module is absent, like
  ``umarvel/cli.py`` does), or
- call :func:`add_eval_command` ``(name, help, configure_fn)`` at import time of a module that is imported
  before the parser is built; ``configure_fn(parser)`` adds the arguments and ``set_defaults(func=...)``.

The M-BEIR arguments (:func:`add_mbeir_arguments`) are shared with ``scripts/vtools_eval_mbeir_model.py``
(:func:`mbeir_main`) so the script and ``umarvel eval mbeir`` accept exactly the same options.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import sys
from pathlib import Path
from typing import Callable, Sequence

from umarvel.errors import ConfigError, UMarvelError

logger = logging.getLogger(__name__)

#: ``"module:function"`` entries; ``function(eval_subparsers)`` registers one benchmark under ``umarvel eval``.
EVAL_SUBCOMMANDS: list[str] = [
    "umarvel.commands.eval_zeroshot:add_zeroshot_parser",
    "umarvel.commands.eval_plus:add_plus_parser",
]

_EVAL_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {}


def add_eval_command(name: str, help: str, configure_fn: Callable[[argparse.ArgumentParser], None]) -> None:
    """Register ``umarvel eval <name>``: ``configure_fn(parser)`` adds arguments and ``set_defaults(func=...)``.

    Raises:
        ConfigError: if ``name`` is taken (``mbeir`` or an earlier registration).
    """
    if name == "mbeir" or name in _EVAL_COMMANDS:
        raise ConfigError(f"eval command {name!r} is already registered")
    _EVAL_COMMANDS[name] = (help, configure_fn)


# ------------------------------------------------------------------------------------------ M-BEIR
def add_mbeir_arguments(p: argparse.ArgumentParser) -> None:
    """The M-BEIR evaluation options. Flags left unset fall back to ``--config`` (if any), then to the
    :class:`~umarvel.eval.mbeir.runner.MBeirEvalConfig` defaults."""
    from umarvel.eval.search import BACKENDS

    p.add_argument("--model", help="checkpoint folder (required unless given by --config)")
    p.add_argument("--mbeir-root", help="M-BEIR root folder (query/, cand_pool/, qrels/, instructions/, images)")
    p.add_argument("--output", help="output folder; use .../local and .../global to pair both protocols")
    p.add_argument("--protocol", choices=("local", "global"), default=None,
                   help="local: each task's own pool; global: the 16 local pools concatenated (default local)")
    p.add_argument("--tasks", default=None,
                   help="comma-separated registry task names, or 'all' (default: all 16; absent ones are skipped)")
    p.add_argument("--split", choices=("test", "val"), default=None, help="default test")
    p.add_argument("--instruction", choices=("random", "first"), default=None,
                   help="random (seeded per query, official protocol; default) or first (always prompt_1)")
    p.add_argument("--seed", type=int, default=None, help="instruction seed (default 2023)")
    p.add_argument("--batch-size", type=int, default=None, help="encode batch size (default 32)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--cache-dir", default=None, help="embedding cache (default <output>/../cache)")
    p.add_argument("--backend", choices=BACKENDS, default=None, help="search backend (default torch, exact)")
    p.add_argument("--search-device", default=None, help="torch search device (default: the model's)")
    p.add_argument("--allow-missing", action="store_true", default=None,
                   help="score queries whose positives are unknown to the pool(s) instead of failing")
    p.add_argument("--shard-size", type=int, default=None, help="items per cache shard (default 16384)")
    p.add_argument("--html", default=None, metavar="PAGE",
                   help="also write a self-contained page of sample queries per task with their top 5 "
                        "(thumbnails embedded, positives marked)")
    p.add_argument("--html-queries", type=int, default=5, help="sample queries per task on the --html page")
    p.add_argument("--config", default=None, help="YAML config (configs/eval/mbeir_local.yaml ...); flags win")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted config override applied to --config (repeatable)")


_FLAG_FIELDS = ("model", "mbeir_root", "output", "protocol", "split", "instruction", "seed", "batch_size",
                "device", "dtype", "cache_dir", "backend", "search_device", "allow_missing", "shard_size")


def _parse_tasks(value: str | None) -> list[str] | None | str:
    """``"a,b"`` -> ``["a", "b"]``; ``"all"`` -> ``None``; unset -> the sentinel ``"unset"``."""
    if value is None:
        return "unset"
    if value.strip().lower() == "all":
        return None
    names = [t.strip() for t in value.split(",") if t.strip()]
    if not names:
        raise ConfigError(f"--tasks {value!r}: give comma-separated task names or 'all'")
    return names


def config_from_args(args: argparse.Namespace):
    """Build the :class:`MBeirEvalConfig`: ``--config`` (with ``--set`` overrides), then explicit flags.

    Raises:
        ConfigError: a required path missing from both flags and config, or an invalid value.
    """
    from umarvel.config import config_from_dict, load_config
    from umarvel.eval.mbeir.runner import MBeirEvalConfig

    flags = {f: getattr(args, f) for f in _FLAG_FIELDS if getattr(args, f, None) is not None}
    tasks = _parse_tasks(args.tasks)
    if tasks != "unset":
        flags["tasks"] = tasks
    if args.config:
        cfg = load_config(args.config, MBeirEvalConfig, overrides=args.overrides)
        return dataclasses.replace(cfg, **flags)
    if args.overrides:
        raise ConfigError("--set needs --config (use the flags directly otherwise)")
    missing = [f"--{f.replace('_', '-')}" for f in ("model", "mbeir_root", "output") if f not in flags]
    if missing:
        raise ConfigError(f"{', '.join(missing)} required (or --config FILE)")
    return config_from_dict(flags, MBeirEvalConfig, source="command line")


def run_mbeir(args: argparse.Namespace) -> int:
    """Run one M-BEIR evaluation; rank 0 prints the results table (results.md) to stdout."""
    from umarvel.eval.mbeir.runner import RESULTS_MD, run_mbeir_eval

    cfg = config_from_args(args)
    result = run_mbeir_eval(cfg)
    if result.results is not None:
        sys.stdout.write((Path(result.output) / RESULTS_MD).read_text(encoding="utf-8"))
        sys.stdout.flush()
        if getattr(args, "html", None):
            from umarvel.index.html import write_mbeir_page  # lazy: only for --html

            write_mbeir_page(args.html, result, cfg.mbeir_root, cfg.split, cfg.protocol,
                             n_queries=args.html_queries, k=5, seed=cfg.seed)
    return 0


def _configure_mbeir(p: argparse.ArgumentParser) -> None:
    add_mbeir_arguments(p)
    p.set_defaults(func=run_mbeir)


def mbeir_main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Entry point of ``scripts/vtools_eval_mbeir_model.py`` (same options as ``umarvel eval mbeir``)."""
    from umarvel.log import setup_logging

    parser = argparse.ArgumentParser(prog=prog, description=_MBEIR_DESCRIPTION)
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    add_mbeir_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging(args.log_level.upper())
    try:
        return run_mbeir(args)
    except UMarvelError as exc:
        logger.error("%s", exc)
        return 2


_MBEIR_DESCRIPTION = (
    "Evaluate a checkpoint on M-BEIR (hit-rate Recall@k, official protocol). Writes results.json, "
    "results.md, config.yaml, run.json and runs/<task>_<split>.trec into --output; embeddings are cached "
    "(default <output>/../cache) and reused by the other protocol and by later runs. Under torchrun the "
    "encoding is sharded over ranks and rank 0 searches.")


# ---------------------------------------------------------------------------------------- registry
def add_subparser(sub) -> None:
    """Register ``umarvel eval`` with its benchmarks (``mbeir``, plus plugged-in ones)."""
    p = sub.add_parser("eval", help="evaluate a checkpoint on a benchmark",
                       description="Evaluation commands: umarvel eval <benchmark> --help")
    esub = p.add_subparsers(dest="eval_command", metavar="BENCHMARK")
    _configure_mbeir(esub.add_parser("mbeir", help="M-BEIR local / global (hit-rate Recall@k)",
                                     description=_MBEIR_DESCRIPTION))
    for entry in EVAL_SUBCOMMANDS:
        name, _, func = entry.partition(":")
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # benchmark not present in this build
                continue
            raise
        getattr(module, func)(esub)
    for name, (help_, configure) in _EVAL_COMMANDS.items():
        configure(esub.add_parser(name, help=help_))

    def _no_benchmark(args: argparse.Namespace) -> int:
        p.print_help(sys.stderr)
        return 2

    p.set_defaults(func=_no_benchmark)
