"""Zero-shot set readers by name: ``read_set(name, root)`` -> a typed set, or :class:`Skipped` when data is absent.

The readers themselves live in ``readers_cir`` (CIRCO, GeneCIS), ``readers_captions`` (Flickr30K, COCO,
ShareGPT4V, Urban1K, CC-Neg, Sugar-Crepe) and ``readers_sequences`` (VisDial, VIST, MSVD, MSR-VTT). The
folder layout under a data root is documented in docs/zeroshot_data.md.
"""
from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Callable, Iterable

from umarvel.errors import DataError
from umarvel.eval.zeroshot.readers_captions import (SUGARCREPE_SUBSETS, read_ccneg, read_flickr30k, read_mscoco5k,
                                                    read_sharegpt4v, read_sugarcrepe, read_urban1k)
from umarvel.eval.zeroshot.readers_cir import GENECIS_SUBSETS, read_circo, read_genecis
from umarvel.eval.zeroshot.readers_sequences import read_msrvtt, read_msvd, read_visdial, read_vist
from umarvel.eval.zeroshot.types import MissingSetData, Skipped, ZeroShotSet
from umarvel.utils.compat import DEFAULT, check_compat, is_official

logger = logging.getLogger(__name__)

#: name -> reader(root). Order = the order results are reported in.
READERS: dict[str, Callable[[Path], ZeroShotSet]] = {
    "circo": read_circo,
    **{f"genecis_{s}": partial(read_genecis, subset=s) for s in GENECIS_SUBSETS},
    "flickr30k": read_flickr30k,
    "mscoco5k": read_mscoco5k,
    "sharegpt4v": read_sharegpt4v,
    "urban1k": read_urban1k,
    "visdial": read_visdial,
    "vist": read_vist,
    "ccneg": read_ccneg,
    **{f"sugarcrepe_{s}": partial(read_sugarcrepe, subset=s) for s in SUGARCREPE_SUBSETS},
    "msvd": read_msvd,
    "msrvtt": read_msrvtt,
}
#: Sets read by name but not part of the default suite (CIRCO test only yields a submission file).
EXTRA_READERS: dict[str, Callable[[Path], ZeroShotSet]] = {"circo_test": partial(read_circo, split="test")}
SET_NAMES: tuple[str, ...] = tuple(READERS)
#: Reader options that ``compat="official"`` changes: VIST's official loader drops the 4th caption / image.
OFFICIAL_READER_OPTIONS: dict[str, dict] = {"vist": {"drop_fourth": True}}


def read_set(name: str, root: str | Path, compat: str = DEFAULT) -> ZeroShotSet | Skipped:
    """Read one set under ``root``; a missing file or folder gives :class:`Skipped` (logged), never a crash.

    ``compat="official"`` applies :data:`OFFICIAL_READER_OPTIONS` (the official loaders' quirks).

    Raises:
        DataError: unknown set name, or files present but malformed (naming file and entry).
    """
    reader = READERS.get(name) or EXTRA_READERS.get(name)
    if reader is None:
        raise DataError(f"unknown zero-shot set {name!r}; known: {', '.join(SET_NAMES + tuple(EXTRA_READERS))}")
    options = OFFICIAL_READER_OPTIONS.get(name, {}) if is_official(check_compat(compat)) else {}
    try:
        return reader(Path(root), **options)
    except MissingSetData as exc:
        skipped = Skipped(name=name, missing=exc.path)
        logger.warning("%s", skipped.message)
        return skipped


def read_sets(root: str | Path, names: Iterable[str] | None = None,
              compat: str = DEFAULT) -> dict[str, ZeroShotSet | Skipped]:
    """Read several sets (default: all of :data:`SET_NAMES`), in order."""
    return {n: read_set(n, root, compat) for n in (names if names is not None else SET_NAMES)}
