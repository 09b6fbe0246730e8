"""YAML configuration mapped onto (frozen) dataclasses; unknown keys are errors.

What this module owns (generic; the stage/eval dataclasses live with their owners):
- :func:`load_config`: read a YAML file, merge its ``base:`` includes (a path or a list of paths relative to
  the file; bases in order, the file on top, nested mappings merged key by key), apply dotted ``key=value``
  overrides (values parsed with ``yaml.safe_load``), then build the dataclass with type checks and coercion.
- :func:`config_from_dict`: the same from an in-memory mapping.
- :func:`dump_resolved` / :func:`save_resolved`: the resolved config as YAML (saved atomically next to every
  checkpoint and result); loading that YAML gives an equal config.

Supported annotations: dataclasses (nested), ``int``, ``float``, ``bool``, ``str``, ``pathlib.Path``, ``Any``,
``Optional[...]`` / ``X | None``, ``Union``, ``Literal[...]``, ``list[T]``, ``tuple[T, ...]``, ``tuple[A, B]``,
``dict[K, V]``. Coercion: int -> float, numeric strings -> int/float (YAML 1.1 reads ``1e-4`` as a string),
integral floats -> int, int -> str, str -> Path. Booleans are never coerced to or from numbers.

Every error is a :class:`umarvel.errors.ConfigError` naming the file (or the override) and the dotted key;
unknown keys come with close-match suggestions. ``base`` is reserved at the top level of a file.
"""
from __future__ import annotations

import collections.abc as cabc
import copy
import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path, PurePath
from typing import Any, Literal, Mapping, Sequence, TypeVar, Union

import yaml

from umarvel.errors import ConfigError
from umarvel.utils.io import atomic_write_text

T = TypeVar("T")
BASE_KEY = "base"


# --------------------------------------------------------------------------------------- reading + merging
class _Origins:
    """Which file (or override) set each dotted key; the most specific recorded prefix wins."""

    def __init__(self, default: str) -> None:
        self.default = default
        self.by_key: dict[str, str] = {}

    def record(self, data: Any, source: str, prefix: str = "") -> None:
        """Mark every key of ``data`` (recursively) as coming from ``source``."""
        if prefix:
            self.by_key[prefix] = source
        if isinstance(data, Mapping):
            for k, v in data.items():
                self.record(v, source, f"{prefix}.{k}" if prefix else str(k))

    def of(self, dotted: str) -> str:
        """Source of ``dotted`` or of its closest recorded parent."""
        key = dotted
        while key:
            if key in self.by_key:
                return self.by_key[key]
            key = key.rpartition(".")[0]
        return self.default


def _deep_merge(dst: dict, src: Mapping) -> dict:
    """Merge ``src`` into ``dst`` (mappings key by key, everything else replaced); returns ``dst``."""
    for k, v in src.items():
        if isinstance(v, Mapping) and isinstance(dst.get(k), dict):
            _deep_merge(dst[k], v)
        else:
            dst[k] = copy.deepcopy(v)
    return dst


def _read_yaml(path: Path) -> dict:
    """Parse one YAML file into a mapping (empty file -> {})."""
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def _load_tree(path: Path, origins: _Origins, stack: tuple[Path, ...] = ()) -> dict:
    """Read ``path`` with its ``base:`` includes merged underneath; records key origins."""
    path = path.resolve()
    if path in stack:
        chain = " -> ".join(str(p) for p in (*stack, path))
        raise ConfigError(f"{path}: circular base include ({chain})")
    data = _read_yaml(path)
    bases = data.pop(BASE_KEY, None)
    if isinstance(bases, (str, os.PathLike)):
        bases = [bases]
    if bases is not None and not (isinstance(bases, list) and all(isinstance(b, str) for b in bases)):
        raise ConfigError(f"{path}: '{BASE_KEY}' must be a path or a list of paths, got {bases!r}")
    merged: dict = {}
    for base in bases or []:
        _deep_merge(merged, _load_tree(path.parent / base, origins, (*stack, path)))
    origins.record(data, str(path))
    return _deep_merge(merged, data)


def _apply_override(tree: dict, override: str, origins: _Origins) -> None:
    """Apply one dotted ``a.b.c=value`` override (value parsed with ``yaml.safe_load``)."""
    key, sep, raw = override.partition("=")
    key = key.strip()
    source = f"override '{override}'"
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"{source}: expected dotted key=value, e.g. train.learning_rate=1e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: cannot parse value ({exc})") from None
    *parents, leaf = key.split(".")
    node = tree
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: '{'.'.join(parents[: i + 1])}' is not a section")
        node = child
    node[leaf] = value
    origins.record(value, source, key)


# ------------------------------------------------------------------------------------------ type coercion
class _Fail(Exception):
    """Internal: a value does not fit an annotation (message without location)."""


def _coerce_scalar(value: Any, tp: type) -> Any:
    """Check/coerce a scalar for ``int``, ``float``, ``bool``, ``str`` or a ``PurePath`` subclass."""
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                try:
                    f = float(value)
                except ValueError:
                    f = None
                if f is not None and f.is_integer():
                    return int(f)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
    elif isinstance(tp, type) and issubclass(tp, PurePath):
        if isinstance(value, (str, PurePath)):
            return tp(value)
    elif isinstance(tp, type):
        if isinstance(value, tp):
            return value
    else:
        raise _Fail(f"unsupported annotation {tp!r}")
    raise _Fail(f"expected {getattr(tp, '__name__', tp)}, got {type(value).__name__} {value!r}")


def _coerce(value: Any, tp: Any, key: str, origins: _Origins) -> Any:
    """Check/coerce ``value`` against annotation ``tp``; ``key`` is the dotted key (for errors)."""
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, Mapping):
            raise _Fail(f"expected a mapping for {tp.__name__}, got {type(value).__name__} {value!r}")
        return _build(tp, value, key, origins)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise _Fail(f"expected one of {list(args)}, got {value!r}")
    if origin in (Union, types.UnionType):
        return _coerce_union(value, args, key, origins)
    if value is None:
        raise _Fail("a value is required (got null)")
    if origin in (list, cabc.Sequence) or tp is list:
        return _coerce_list(value, args[0] if args else Any, key, origins, list)
    if tp is tuple:
        return _coerce_list(value, Any, key, origins, tuple)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return _coerce_list(value, args[0], key, origins, tuple)
        return _coerce_fixed_tuple(value, args, key, origins)
    if origin in (dict, cabc.Mapping) or tp is dict:
        return _coerce_dict(value, args or (Any, Any), key, origins)
    return _coerce_scalar(value, tp)


def _coerce_union(value: Any, args: tuple, key: str, origins: _Origins) -> Any:
    """First member of a Union that accepts ``value``, exact type matches preferred over coercion."""
    if value is None:
        if type(None) in args:
            return None
        raise _Fail("a value is required (got null)")
    members = [a for a in args if a is not type(None)]
    for a in members:  # exact type first, so "carry" stays a str in float | Literal["carry"] | str
        if isinstance(a, type) and type(value) is a:
            return value
    errors = []
    for a in members:
        try:
            return _coerce(value, a, key, origins)
        except _Fail as exc:
            errors.append(str(exc))
    raise _Fail(" / ".join(errors))


def _coerce_list(value: Any, item_tp: Any, key: str, origins: _Origins, kind: type) -> Any:
    """list[T] / tuple[T, ...] from a YAML sequence."""
    if not isinstance(value, (list, tuple)):
        raise _Fail(f"expected a list, got {type(value).__name__} {value!r}")
    return kind(_coerce_item(v, item_tp, f"{key}[{i}]", origins) for i, v in enumerate(value))


def _coerce_fixed_tuple(value: Any, args: tuple, key: str, origins: _Origins) -> tuple:
    """tuple[A, B, ...] of fixed length."""
    if not isinstance(value, (list, tuple)) or len(value) != len(args):
        raise _Fail(f"expected a list of {len(args)} items, got {value!r}")
    return tuple(_coerce_item(v, a, f"{key}[{i}]", origins) for i, (v, a) in enumerate(zip(value, args)))


def _coerce_dict(value: Any, args: tuple, key: str, origins: _Origins) -> dict:
    """dict[K, V] from a YAML mapping."""
    if not isinstance(value, Mapping):
        raise _Fail(f"expected a mapping, got {type(value).__name__} {value!r}")
    ktp, vtp = args
    return {_coerce_item(k, ktp, key, origins): _coerce_item(v, vtp, f"{key}.{k}", origins) for k, v in value.items()}


def _coerce_item(value: Any, tp: Any, key: str, origins: _Origins) -> Any:
    """Coerce a nested item, turning a failure into a ConfigError naming its own key."""
    try:
        return _coerce(value, tp, key, origins)
    except _Fail as exc:
        raise ConfigError(f"{origins.of(key)}: {key}: {exc}") from None


# ---------------------------------------------------------------------------------------- dataclass build
def _build(cls: type[T], data: Mapping, prefix: str, origins: _Origins) -> T:
    """Instantiate dataclass ``cls`` from ``data``; ``prefix`` is its dotted position."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    join = (lambda k: f"{prefix}.{k}") if prefix else str
    unknown = [k for k in data if k not in fields]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(str(k), list(fields), n=3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else f"; known keys: {sorted(fields)}"
        raise ConfigError(f"{origins.of(join(k))}: unknown key '{join(k)}'{hint}")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{origins.of(prefix)}: missing required key '{join(name)}'")
            continue
        kwargs[name] = _coerce_item(data[name], hints[name], join(name), origins)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # __post_init__ validation of the owner
        raise ConfigError(f"{origins.of(prefix)}: {prefix or cls.__name__}: {exc}") from None


def _check_cls(cls: Any) -> None:
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"cls must be a dataclass type, got {cls!r}")


def config_from_dict(
    data: Mapping, cls: type[T], overrides: Sequence[str] = (), source: str = "<dict>"
) -> T:
    """Build ``cls`` from an in-memory mapping (no ``base:`` handling), with dotted overrides."""
    _check_cls(cls)
    origins = _Origins(source)
    tree = copy.deepcopy(dict(data))
    origins.record(tree, source)
    for ov in overrides:
        _apply_override(tree, ov, origins)
    return _build(cls, tree, "", origins)


def load_config(path: str | os.PathLike, cls: type[T], overrides: Sequence[str] = ()) -> T:
    """Load a YAML config file into dataclass ``cls``.

    Args:
        path: the YAML file; its top-level ``base:`` (path or list of paths, relative to the file) is merged
            underneath it first.
        cls: the dataclass type (nested dataclasses for sections).
        overrides: dotted ``key=value`` strings applied last, e.g. ``["train.lr=1e-4"]``.

    Raises:
        ConfigError: unknown key (with close matches), wrong type, missing required key, bad YAML, missing
            file or circular include; the message names the file (or override) and the dotted key.
    """
    _check_cls(cls)
    path = Path(path)
    origins = _Origins(str(path))
    tree = _load_tree(path, origins)
    for ov in overrides:
        _apply_override(tree, ov, origins)
    return _build(cls, tree, "", origins)


# ------------------------------------------------------------------------------------------------- dump
def to_plain(obj: Any) -> Any:
    """Dataclasses / mappings / tuples / paths -> YAML- and JSON-safe dicts, lists, strings and numbers."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, PurePath):
        return str(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return repr(obj)


def dump_resolved(cfg: Any) -> str:
    """The resolved config as YAML (field order kept); :func:`load_config` of it gives an equal config."""
    if not (dataclasses.is_dataclass(cfg) and not isinstance(cfg, type)):
        raise TypeError(f"expected a dataclass instance, got {type(cfg).__name__}")
    return yaml.safe_dump(to_plain(cfg), sort_keys=False, allow_unicode=True, default_flow_style=False)


def save_resolved(cfg: Any, path: str | os.PathLike) -> Path:
    """Write :func:`dump_resolved` to ``path`` atomically; returns the path."""
    path = Path(path)
    atomic_write_text(path, dump_resolved(cfg))
    return path
