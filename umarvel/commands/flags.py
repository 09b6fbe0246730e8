"""Command-line flags generated from a config dataclass: one declaration per option (the field).

:func:`add_config_flags` adds one ``--field-name`` flag per dataclass field: its type, choices (``Literal``),
default (shown in the help) and help text come from the field, the help from ``field(metadata={"help": ...})``.
:func:`config_from_flags` builds the dataclass with the precedence
``flags > --set key=value > --config FILE > the dataclass defaults`` (``--config`` / ``--set`` exist when
``config_file=True``), every value type-checked by :mod:`umarvel.config`.

Field metadata understood here (all optional):

- ``help``: the flag's help text (the default is appended, unless the field's default is ``None``);
- ``flag``: the flag name when it is not ``--field-name`` (e.g. ``"--run"`` for ``run_dir``);
- ``parse``: ``str -> value`` for the flag's text (default: the annotation's scalar type; list fields take
  comma-separated items); a :class:`~umarvel.errors.ConfigError` it raises is reported like any other;
- ``cli``: ``False`` keeps the field off the command line (config file only).

Booleans become ``--x`` / ``--no-x``. A flag left out is "unset" and never overrides the config file.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import PurePath
from typing import Any, Callable, Literal, Union

from umarvel.config import config_from_dict, load_config
from umarvel.errors import ConfigError

#: The ``argparse`` destination of ``--set``.
OVERRIDES_DEST = "overrides"


def cli_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of ``cls`` that have a flag (``metadata["cli"]`` not False), in declaration order."""
    return [f for f in dataclasses.fields(cls) if f.init and f.metadata.get("cli", True)]


def flag_name(f: dataclasses.Field) -> str:
    """``--batch-size`` for ``batch_size`` (or ``metadata["flag"]``)."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _strip_optional(tp: Any) -> Any:
    """``X | None`` -> ``X`` (other annotations unchanged)."""
    if typing.get_origin(tp) in (Union, getattr(types, "UnionType", Union)):
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(members) == 1:
            return members[0]
    return tp


def _is_list(tp: Any) -> bool:
    return tp is list or typing.get_origin(tp) in (list, tuple)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _show(value: Any) -> str:
    """A default as it is written in YAML / on the command line."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(_show(v) for v in value)
    return str(value)


def _help(f: dataclasses.Field, config_file: bool) -> str:
    """The flag's help: metadata help plus the default (argparse's ``%`` escaped)."""
    text = f.metadata.get("help", "").replace("%", "%%")
    default = _default(f)
    if default is dataclasses.MISSING:
        note = "(required unless given by --config)" if config_file else "(required)"
    elif default is None:
        return text
    else:
        note = "(default " + _show(default).replace("%", "%%") + ")"
    return f"{text} {note}".strip()


def add_config_flags(parser: argparse.ArgumentParser, cls: type, *, config_file: bool = False,
                     config_help: str = "YAML config; flags win over it") -> None:
    """Add one flag per field of dataclass ``cls`` (plus ``--config`` / ``--set`` when ``config_file``).

    Every flag defaults to ``None`` (unset); required fields are checked by :func:`config_from_flags`.
    """
    hints = typing.get_type_hints(cls)
    for f in cli_fields(cls):
        tp = _strip_optional(hints[f.name])
        name = flag_name(f)
        metavar = name.lstrip("-").replace("-", "_").upper()
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": _help(f, config_file)}
        if "parse" in f.metadata or _is_list(tp):
            kwargs["metavar"] = metavar  # a string, turned into the value by config_from_flags
        elif tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) is Literal:
            kwargs["choices"] = typing.get_args(tp)
        elif tp in (int, float):
            kwargs.update(type=tp, metavar=metavar)
        elif isinstance(tp, type) and issubclass(tp, (str, PurePath)):
            kwargs["metavar"] = metavar
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no flag for {tp!r}; give field metadata 'parse' "
                            "(str -> value) or cli=False")
        parser.add_argument(name, **kwargs)
    if config_file:
        parser.add_argument("--config", default=None, help=config_help)
        parser.add_argument("--set", dest=OVERRIDES_DEST, action="append", default=[], metavar="KEY=VALUE",
                            help="dotted config override applied to --config (repeatable)")


def _parse(f: dataclasses.Field, tp: Any, value: Any) -> Any:
    """The config value of a flag's argparse value (``parse`` metadata, comma lists)."""
    parse: Callable[[str], Any] | None = f.metadata.get("parse")
    if parse is not None:
        return parse(value)
    if _is_list(_strip_optional(tp)) and isinstance(value, str):
        items = [v.strip() for v in value.split(",") if v.strip()]
        if not items:
            raise ConfigError(f"{flag_name(f)} {value!r}: give comma-separated values")
        return items
    return value


def flag_values(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """``{field: value}`` of the flags given on the command line (unset flags left out)."""
    hints = typing.get_type_hints(cls)
    return {f.name: _parse(f, hints[f.name], getattr(args, f.name)) for f in cli_fields(cls)
            if getattr(args, f.name, None) is not None}


def config_from_flags(args: argparse.Namespace, cls: type, *, source: str = "command line"):
    """Build ``cls``: its defaults, then ``--config`` with its ``--set`` overrides, then the flags given.

    Raises:
        ConfigError: a required field given neither by a flag nor by the config file, ``--set`` without
            ``--config``, or an invalid value (naming the key and where it came from).
    """
    flags = flag_values(args, cls)
    config, overrides = getattr(args, "config", None), getattr(args, OVERRIDES_DEST, None) or []
    if config:
        tree = dataclasses.asdict(load_config(config, cls, overrides=overrides))
        tree.update(flags)
        return config_from_dict(tree, cls, source=f"{config} + {source}")
    if overrides:
        raise ConfigError("--set needs --config (use the flags directly otherwise)")
    missing = [flag_name(f) for f in cli_fields(cls) if _default(f) is dataclasses.MISSING and f.name not in flags]
    if missing:
        hint = " (or --config FILE)" if hasattr(args, "config") else ""
        raise ConfigError(f"{', '.join(missing)} required{hint}")
    return config_from_dict(flags, cls, source=source)
