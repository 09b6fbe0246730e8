"""Compatibility modes: ``"default"`` (umarvel's numerics) or ``"official"`` (the official evaluation numerics).

``compat="official"`` reproduces how the published numbers were computed, bugs included, where umarvel
deliberately does better by default (docs/decisions.md, table "Compatibility mode"): causal attention for a
batch without padding (D5), the official batch sizes and dataset order per benchmark (so the same batches
have no padding), the reranker's P(yes) as the first step of ``generate`` (D10) and the official global
U-MARVEL+ fusion (D9). Every number written by an evaluation is labelled with its mode.
"""
from __future__ import annotations

from typing import Literal, get_args

from umarvel.errors import ConfigError

DEFAULT = "default"
OFFICIAL = "official"
#: The annotation of a config field holding a mode (its flag then offers exactly these choices).
CompatMode = Literal["default", "official"]
COMPAT_MODES: tuple[str, ...] = get_args(CompatMode)


def check_compat(value: str | None, where: str = "compat") -> str:
    """Validate a compatibility mode (``None`` means ``"default"``) and return it.

    Raises:
        ConfigError: naming ``where`` and the allowed values.
    """
    if value is None:
        return DEFAULT
    if value not in COMPAT_MODES:
        raise ConfigError(f"{where} must be one of {list(COMPAT_MODES)}, got {value!r}")
    return value


def is_official(value: str | None) -> bool:
    """True for ``"official"``."""
    return check_compat(value) == OFFICIAL
