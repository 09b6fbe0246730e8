"""Flags generated from config dataclasses (umarvel.commands.flags): types, defaults, help, precedence."""
from __future__ import annotations

import argparse
import typing
from dataclasses import dataclass, field
from typing import Literal

import pytest

from umarvel.commands.flags import add_config_flags, config_from_flags
from umarvel.errors import ConfigError


@dataclass(frozen=True)
class Toy:
    path: str = field(metadata={"help": "a required path"})
    mode: Literal["a", "b"] = field(default="a", metadata={"help": "the mode"})
    size: int = field(default=4, metadata={"help": "100% of the size"})
    scale: float | None = None
    names: list[str] | None = None
    grid: list[float] = field(default_factory=lambda: [0.5, 1.0])
    strict: bool = False
    renamed: str = field(default="x", metadata={"flag": "--other-name"})
    hidden: int = field(default=1, metadata={"cli": False})


def _parser(config_file: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="toy")
    add_config_flags(p, Toy, config_file=config_file)
    return p


def _options(p: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in p._actions for s in a.option_strings}


def test_one_flag_per_field_with_type_choices_and_help():
    p = _parser()
    opts = _options(p)
    assert {"--path", "--mode", "--size", "--scale", "--names", "--grid", "--strict", "--no-strict", "--other-name",
            "--config", "--set"} <= set(opts)
    assert "--hidden" not in opts and "--renamed" not in opts
    assert opts["--mode"].choices == ("a", "b") and opts["--size"].type is int and opts["--scale"].type is float
    assert "(default 4)" in opts["--size"].help and "(default 0.5,1.0)" in opts["--grid"].help
    assert "required unless given by --config" in opts["--path"].help
    assert "100%% of the size" in opts["--size"].help
    p.format_help()  # '%' in a help text is escaped for argparse
    with pytest.raises(SystemExit):
        p.parse_args(["--mode", "c"])


def test_a_field_without_a_flag_type_is_refused_when_the_parser_is_built():
    @dataclass(frozen=True)
    class Nested:
        table: dict[str, int] = field(default_factory=dict)

    with pytest.raises(TypeError, match="Nested.table: no flag"):
        add_config_flags(argparse.ArgumentParser(), Nested)


def test_values_and_defaults():
    args = _parser().parse_args(["--path", "p", "--names", "x, y", "--grid", "0.1,0.2", "--strict",
                                 "--other-name", "z"])
    cfg = config_from_flags(args, Toy)
    assert cfg == Toy(path="p", names=["x", "y"], grid=[0.1, 0.2], strict=True, renamed="z")
    assert config_from_flags(_parser().parse_args(["--path", "p"]), Toy) == Toy(path="p")


def test_precedence_flags_over_set_over_config_over_defaults(tmp_path):
    cfg_file = tmp_path / "toy.yaml"
    cfg_file.write_text("path: from_file\nsize: 8\nscale: 2.0\nstrict: true\nhidden: 3\n")
    args = _parser().parse_args(["--config", str(cfg_file), "--set", "size=16", "--set", "scale=3.0",
                                 "--scale", "5", "--no-strict"])
    cfg = config_from_flags(args, Toy)
    assert (cfg.path, cfg.size, cfg.scale, cfg.strict, cfg.hidden, cfg.mode) == ("from_file", 16, 5.0, False, 3, "a")


def test_errors_name_the_flag_or_key(tmp_path):
    with pytest.raises(ConfigError, match="--path required \\(or --config FILE\\)"):
        config_from_flags(_parser().parse_args([]), Toy)
    with pytest.raises(ConfigError, match="--path required$"):
        config_from_flags(_parser(config_file=False).parse_args([]), Toy)
    with pytest.raises(ConfigError, match="--set needs --config"):
        config_from_flags(_parser().parse_args(["--path", "p", "--set", "size=2"]), Toy)
    with pytest.raises(ConfigError, match="grid"):
        config_from_flags(_parser().parse_args(["--path", "p", "--grid", "0.1,x"]), Toy)
    with pytest.raises(ConfigError, match="--names"):
        config_from_flags(_parser().parse_args(["--path", "p", "--names", ","]), Toy)


# ------------------------------------------------------------------------------ the real commands
def _subparser(*path: str) -> argparse.ArgumentParser:
    from umarvel.cli import build_parser

    p = build_parser()
    for name in path:
        sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
        p = sub.choices[name]
    return p


def test_eval_commands_keep_their_flag_names():
    mbeir = {"--model", "--mbeir-root", "--output", "--protocol", "--tasks", "--split", "--instruction", "--seed",
             "--batch-size", "--device", "--dtype", "--cache-dir", "--backend", "--search-device", "--allow-missing",
             "--shard-size", "--config", "--set"}
    zeroshot = {"--model", "--data-root", "--output-dir", "--tasks", "--cache-dir", "--batch-size",
                "--video-batch-size", "--max-tokens", "--device", "--dtype", "--video-min-pixels", "--video-max-pixels",
                "--video-total-pixels"}
    plus = {"--run", "--reranker", "--output", "--weight", "--weight-from", "--choose-weight", "--grid", "--top-k",
            "--batch-size", "--positions", "--device", "--dtype"}
    for path, flags in ((("eval", "mbeir"), mbeir), (("eval", "zeroshot"), zeroshot), (("eval", "plus"), plus)):
        assert flags <= set(_options(_subparser(*path))), path


def test_mbeir_choices_match_the_runtime_constants():
    from umarvel.data.mbeir import INSTRUCTION_MODES
    from umarvel.data.registry import MBEIR_EVAL_SPLITS
    from umarvel.eval.mbeir.config import MBeirEvalConfig
    from umarvel.eval.outputs import PROTOCOLS
    from umarvel.eval.search import BACKENDS

    hints = typing.get_type_hints(MBeirEvalConfig)
    for key, constant in (("protocol", PROTOCOLS), ("split", MBEIR_EVAL_SPLITS), ("instruction", INSTRUCTION_MODES),
                          ("backend", BACKENDS)):
        assert set(typing.get_args(hints[key])) == set(constant), key
    opts = _options(_subparser("eval", "mbeir"))
    assert set(opts["--backend"].choices) == set(BACKENDS)


def test_mbeir_tasks_flag():
    from umarvel.eval.mbeir.config import MBeirEvalConfig

    p = _subparser("eval", "mbeir")
    base = ["--model", "m", "--mbeir-root", "r", "--output", "o"]
    assert config_from_flags(p.parse_args([*base, "--tasks", "all"]), MBeirEvalConfig).tasks is None
    assert config_from_flags(p.parse_args([*base, "--tasks", "a, b"]), MBeirEvalConfig).tasks == ["a", "b"]
    with pytest.raises(ConfigError, match="--tasks"):
        config_from_flags(p.parse_args([*base, "--tasks", " , "]), MBeirEvalConfig)


def test_plus_and_zeroshot_configs_from_flags():
    from umarvel.eval.zeroshot.options import ZeroShotOptions
    from umarvel.pipelines.plus import PlusConfig
    from umarvel.rerank.fusion import DEFAULT_GRID

    plus = _subparser("eval", "plus")
    cfg = config_from_flags(plus.parse_args(["--run", "r", "--reranker", "rr", "--output", "o", "--grid", "0,0.5",
                                             "--choose-weight", "--positions", "mrope"]), PlusConfig)
    assert cfg == PlusConfig(run_dir="r", reranker="rr", output="o", grid=[0.0, 0.5], choose_weight=True,
                             positions="mrope")
    assert config_from_flags(plus.parse_args(["--run", "r", "--reranker", "rr", "--output", "o"]),
                             PlusConfig).grid == list(DEFAULT_GRID)
    with pytest.raises(ConfigError, match="at most one of weight"):
        config_from_flags(plus.parse_args(["--run", "r", "--reranker", "rr", "--output", "o", "--weight", "0.2",
                                           "--choose-weight"]), PlusConfig)
    zs = _subparser("eval", "zeroshot")
    args = zs.parse_args(["--model", "m", "--data-root", "d", "--output-dir", "o", "--video-max-pixels", "1024"])
    assert config_from_flags(args, ZeroShotOptions) == ZeroShotOptions(video_max_pixels=1024)
