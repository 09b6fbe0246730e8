"""Typed records shared by all evaluation code (M-BEIR and zero-shot).

A :class:`Query` or :class:`Candidate` holds what the encoder needs (text, absolute image path) plus
the ids the scorer needs. ``to_encode_item()`` gives the dict accepted by
``UMarvel.encode_queries`` / ``UMarvel.encode_candidates`` (see docs/architecture.md).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from umarvel.errors import DataError

MODALITIES: tuple[str, ...] = ("text", "image", "image,text")


def check_modality(modality: str, where: str) -> str:
    """Return ``modality`` if it is one of :data:`MODALITIES`, else raise DataError naming ``where``."""
    if modality not in MODALITIES:
        raise DataError(f"{where}: unknown modality {modality!r} (expected one of {', '.join(MODALITIES)})")
    return modality


def _check_content(text: str | None, image: str | None, where: str) -> None:
    """An item needs text or an image (or both)."""
    if (text is None or text == "") and image is None:
        raise DataError(f"{where}: has neither text nor image")


@dataclass(frozen=True, slots=True)
class Query:
    """One evaluation query.

    Attributes:
        qid: query id, ``"<dataset_id>:<n>"`` for M-BEIR.
        text: query text (``None`` for image-only queries).
        image: absolute image path, or ``None``.
        modality: ``"text"``, ``"image"`` or ``"image,text"``.
        positives: ids of the positive candidates (M-BEIR ``pos_cand_list``), in file order.
        task_id: M-BEIR task id 0-8 (``None`` where a benchmark has none).
        dataset_id: M-BEIR dataset id 0-9 (``None`` where a benchmark has none).
        instruction: the instruction prepended at encode time, or ``None``.
    """

    qid: str
    text: str | None
    image: str | None
    modality: str
    positives: tuple[str, ...]
    task_id: int | None
    dataset_id: int | None
    instruction: str | None = None

    def __post_init__(self) -> None:
        where = f"query {self.qid}"
        check_modality(self.modality, where)
        _check_content(self.text, self.image, where)
        if not isinstance(self.positives, tuple):
            raise DataError(f"{where}: positives must be a tuple, got {type(self.positives).__name__}")

    def with_instruction(self, instruction: str | None) -> "Query":
        """A copy of this query carrying ``instruction``."""
        return replace(self, instruction=instruction)

    def to_encode_item(self) -> dict:
        """The dict ``encode_queries`` accepts: ``{"text", "image", "instruction"}`` (None where missing)."""
        return {"text": self.text or None, "image": self.image, "instruction": self.instruction}


@dataclass(frozen=True, slots=True)
class Candidate:
    """One pool candidate.

    Attributes:
        did: candidate id, ``"<dataset_id>:<n>"`` for M-BEIR.
        text: candidate text (``None`` for image-only candidates).
        image: absolute image path, or ``None``.
        modality: ``"text"``, ``"image"`` or ``"image,text"``.
    """

    did: str
    text: str | None
    image: str | None
    modality: str

    def __post_init__(self) -> None:
        where = f"candidate {self.did}"
        check_modality(self.modality, where)
        _check_content(self.text, self.image, where)

    def to_encode_item(self) -> dict:
        """The dict ``encode_candidates`` accepts: ``{"text", "image"}`` (None where missing)."""
        return {"text": self.text or None, "image": self.image}
