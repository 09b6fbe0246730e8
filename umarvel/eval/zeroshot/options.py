"""Encoding knobs of a zero-shot run (:class:`ZeroShotOptions`) and the published video sampling.

Kept apart from the runner and free of torch: ``umarvel eval zeroshot`` generates its encoding flags from
these fields (:mod:`umarvel.commands.flags`); each field's help (metadata) is also its flag's help.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Mapping

from umarvel.data.video import MSRVTT_VIDEO, MSVD_VIDEO, VideoSpec
from umarvel.errors import DataError
from umarvel.utils.compat import DEFAULT, CompatMode, check_compat

#: ``ZeroShotSet.video_spec`` -> the published frame sampling and per-frame pixel budget.
VIDEO_SPECS: Mapping[str, VideoSpec] = {"msvd": MSVD_VIDEO, "msrvtt": MSRVTT_VIDEO}

_QUICK = "; quick runs only, results are then not comparable"


@dataclass(frozen=True)
class ZeroShotOptions:
    """Encoding knobs of a run (defaults: the published protocol)."""

    batch_size: int = field(default=32, metadata={"help": "items per batch for text / image sides"})
    video_batch_size: int = field(default=1, metadata={
        "help": "videos per batch (the official code uses 1)"})
    max_tokens: int | None = field(default=None, metadata={
        "help": "token budget per batch (default: batch size * 1024, the API default)"})
    video_min_pixels: int | None = field(default=None, metadata={
        "help": "override the per-frame minimum of every video set (default: the published 128*28*28)" + _QUICK})
    video_max_pixels: int | None = field(default=None, metadata={
        "help": "override the per-frame maximum (default: the published 768*28*28)" + _QUICK})
    video_total_pixels: int | None = field(default=None, metadata={
        "help": "override the per-clip total (default: the published 24576*28*28)" + _QUICK})
    show_progress: bool | None = field(default=None, metadata={
        "help": "tqdm bars (None: the API decides)", "cli": False})
    compat: CompatMode = field(default=DEFAULT, metadata={
        "help": "official: the official evaluation numerics (unpadded batches causal, D5; each set's official batch "
                "sizes and order, the official prompt quirks; docs/decisions.md 'Compatibility mode'), "
                "--batch-size / --video-batch-size / --max-tokens then unused, the model loaded in the same mode; "
                "default: umarvel's"})

    def __post_init__(self) -> None:
        check_compat(self.compat, "ZeroShotOptions.compat")

    def video_spec(self, name: str, factor: int | None = None) -> VideoSpec:
        """The frame sampling of a set's ``video_spec`` name with the pixel overrides applied.

        ``factor``: the model's resize multiple (``PatchSpec.factor``; 32 on Qwen3-VL): the published budgets keep
        their token counts (``VideoSpec.for_factor``); the pixel overrides are pixels.
        """
        try:
            spec = VIDEO_SPECS[name]
        except KeyError:
            raise DataError(f"unknown video spec {name!r} (known: {', '.join(VIDEO_SPECS)})") from None
        if factor is not None:
            spec = spec.for_factor(factor)
        over = {k: v for k, v in (("min_pixels", self.video_min_pixels), ("max_pixels", self.video_max_pixels),
                                  ("total_pixels", self.video_total_pixels)) if v is not None}
        return replace(spec, **over) if over else spec
