"""Typed records of the zero-shot sets (method spec 6.3).

Items carry what the official per-set scripts build their user text from; :meth:`ZSItem.final_text` renders it
exactly as those scripts do (``format_string`` only where they call it), see the table in docs/zeroshot_data.md.

Four set shapes:

- :class:`RetrievalSet`: queries -> one shared candidate pool, positives per query (CIRCO, VisDial, VIST,
  MSVD, MSR-VTT);
- :class:`BidirectionalSet`: texts <-> images, each text belongs to one image (Flickr30K, COCO, ShareGPT4V,
  Urban1K), scored in both directions;
- :class:`GallerySet`: each query ranks its own small gallery, target first (GeneCIS);
- :class:`PairSet`: an image against a positive and a negative caption (CC-Neg, Sugar-Crepe).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Union

from umarvel.data.formatting import INSTRUCTION_END, INSTRUCTION_START, format_string
from umarvel.errors import DataError
from umarvel.utils.compat import DEFAULT, is_official

Segment = tuple[Literal["text", "image"], str]


@dataclass(frozen=True)
class ZSItem:
    """One input to encode.

    Attributes:
        id: stable id within the set (image id, caption index, video id, ...).
        text: the text as the annotation file gives it (raw), or None (an image / video only item).
        image: image path, or None.
        video: video path, or None (decoded with ``umarvel.data.video``; see ``ZeroShotSet.video_spec``).
        instruction: plain instruction string (wrapped in the markers, never ``format_string``-ed), or None.
        instruction_sep: what joins ``<instruction_end>`` and the text: ``" "`` or ``""`` (the official scripts of
            Flickr30K, ShareGPT4V, MSVD and MSR-VTT concatenate with no space).
        format_text: ``format_string`` the text (only Flickr30K captions and GeneCIS conditions: the official
            scripts leave every other text raw).
        set_literal: the official script passes the text as a Python set ``{text}``, so its chat template renders
            ``{'...'}`` (Urban1K images); reproduced with ``compat="official"`` only.
        segments: interleaved content in order (VIST only): ``("text", s)`` / ``("image", path)``, texts raw.
    """

    id: str
    text: str | None = None
    image: str | None = None
    video: str | None = None
    instruction: str | None = None
    instruction_sep: str = " "
    format_text: bool = False
    set_literal: bool = False
    segments: tuple[Segment, ...] = ()

    def final_text(self, compat: str = DEFAULT) -> str:
        """The user text the encoder sees (suffix not included), as the official per-set script builds it.

        ``body`` is ``format_string(text)`` if ``format_text`` else the raw text. With an instruction:
        ``<instruction_start>{instruction}<instruction_end>`` followed, when there is a text, by
        ``instruction_sep + body``. Nothing else is normalised. With ``compat="official"`` a ``set_literal``
        item is rendered as the official script's Python set, ``str({text})``. Interleaved items (VIST) render
        their ``segments`` instead.
        """
        body = format_string(self.text) if self.format_text else (self.text or "")
        if self.instruction is None or not self.instruction.strip():
            out = body
        else:
            out = f"{INSTRUCTION_START}{self.instruction}{INSTRUCTION_END}"
            if self.text is not None:
                out += self.instruction_sep + body
        if self.set_literal and is_official(compat):
            out = str({out})
        return out


@dataclass(frozen=True)
class _SetBase:
    """Fields every set has.

    Attributes:
        name: registry name, e.g. ``"genecis_change_object"``.
        suffix: compression suffix on (prompt1) or off (prompt2); only Flickr30K has it on.
        video_spec: name of the frame sampling (``"msvd"`` / ``"msrvtt"``) for video sets, else None.
    """

    name: str
    suffix: bool = False
    video_spec: str | None = None


@dataclass(frozen=True)
class RetrievalSet(_SetBase):
    """Queries against one candidate pool.

    Attributes:
        queries: Q items; candidates: C items.
        positives: per query, indices into ``candidates`` of its relevant items (len Q; empty tuple when the
            split has no public ground truth, e.g. CIRCO test).
        exclude: per query, candidate indices removed from its ranking (VIST context images); () if none.
        metric: ``"map"`` (CIRCO, plus R@k against ``targets``) or ``"recall"``.
        targets: per query the single main target index (CIRCO ``target_img_id``), or () when unused.
            Item ids are the public ids (CIRCO: query ``id`` and COCO image id, for submission files).
    """

    queries: tuple[ZSItem, ...] = ()
    candidates: tuple[ZSItem, ...] = ()
    positives: tuple[tuple[int, ...], ...] = ()
    exclude: tuple[tuple[int, ...], ...] = ()
    metric: Literal["map", "recall"] = "recall"
    targets: tuple[int, ...] = ()


@dataclass(frozen=True)
class BidirectionalSet(_SetBase):
    """Texts <-> images.

    Attributes:
        texts: T items; images: I items.
        text_to_image: (T,) index into ``images`` of each text's image.
    """

    texts: tuple[ZSItem, ...] = ()
    images: tuple[ZSItem, ...] = ()
    text_to_image: tuple[int, ...] = ()


@dataclass(frozen=True)
class GallerySet(_SetBase):
    """Each query ranks its own gallery (GeneCIS).

    Attributes:
        queries: Q items; candidates: unique gallery images (C items, encode once).
        galleries: per query, candidate indices of ``[target, distractor_1, ...]`` (target first).
    """

    queries: tuple[ZSItem, ...] = ()
    candidates: tuple[ZSItem, ...] = ()
    galleries: tuple[tuple[int, ...], ...] = ()


@dataclass(frozen=True)
class PairSet(_SetBase):
    """Image vs positive and negative caption, row i against row i (CC-Neg, Sugar-Crepe).

    Attributes:
        images: N image items (queries; may carry an instruction); positives / negatives: N text items.
    """

    images: tuple[ZSItem, ...] = ()
    positives: tuple[ZSItem, ...] = ()
    negatives: tuple[ZSItem, ...] = ()


ZeroShotSet = Union[RetrievalSet, BidirectionalSet, GallerySet, PairSet]


class MissingSetData(DataError):
    """A file or folder a set needs is absent; the set is skipped, not failed."""

    def __init__(self, set_name: str, path: str | Path):
        self.set_name = set_name
        self.path = Path(path)
        super().__init__(f"skipped: {set_name} (missing {self.path})")


@dataclass(frozen=True)
class Skipped:
    """Result of reading a set whose data is absent.

    Attributes:
        name: the set; missing: the first missing file or folder.
    """

    name: str
    missing: Path = field(default_factory=Path)

    @property
    def message(self) -> str:
        """``"skipped: <set> (missing <path>)"``."""
        return f"skipped: {self.name} (missing {self.missing})"
