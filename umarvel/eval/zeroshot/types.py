"""Typed records of the zero-shot sets (method spec 6.3).

These are local to ``umarvel.eval.zeroshot`` until ``umarvel.data.records`` (M-BEIR ``Query`` / ``Candidate``)
lands; :meth:`ZSItem.as_encode_dict` gives the dict the encode contract of ``umarvel.api`` takes.

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

Segment = tuple[Literal["text", "image"], str]


@dataclass(frozen=True)
class ZSItem:
    """One input to encode.

    Attributes:
        id: stable id within the set (image id, caption index, video id, ...).
        text: raw text (not yet ``format_string``-ed), or None.
        image: image path, or None.
        video: video path, or None (decoded with ``umarvel.data.video``; see ``ZeroShotSet.video_spec``).
        instruction: plain instruction string (wrapped in the markers at encode time), or None.
        instruction_sep: what joins ``<instruction_end>`` and the text: ``" "`` (M-BEIR style) or ``""``
            for the sets the spec marks "concatenated with no space" (Flickr texts, MSVD, MSR-VTT).
        segments: interleaved content in order (VIST only): ``("text", s)`` / ``("image", path)``.
    """

    id: str
    text: str | None = None
    image: str | None = None
    video: str | None = None
    instruction: str | None = None
    instruction_sep: str = " "
    segments: tuple[Segment, ...] = ()

    def final_text(self) -> str:
        """The user text the encoder sees (suffix not included).

        With an instruction: ``format_string(<instruction_start>fmt(instr)<instruction_end> + sep + text)``
        (with ``sep=" "`` this equals ``umarvel.data.formatting.query_text_with_instruction``); without:
        ``format_string(text)``. For interleaved items this is the formatted last text segment.
        """
        text = self.text or ""
        if self.instruction is None or not self.instruction.strip():
            return format_string(text)
        wrapped = f"{INSTRUCTION_START}{format_string(self.instruction)}{INSTRUCTION_END}"
        return format_string(f"{wrapped}{self.instruction_sep}{text}")

    def as_encode_dict(self) -> dict:
        """``{"text", "image", "instruction"}`` for ``UMarvel.encode_queries`` (M-BEIR-style joiner only).

        Raises:
            DataError: for items the image-text API cannot express yet (video, interleaved, "" joiner).
        """
        if self.video is not None or self.segments:
            raise DataError(f"item {self.id}: video / interleaved inputs need the video-aware encoder")
        if self.instruction and self.instruction_sep != " ":
            raise DataError(f"item {self.id}: instruction joined without a space needs ZSItem.final_text()")
        return {"text": self.text, "image": self.image, "instruction": self.instruction}


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
