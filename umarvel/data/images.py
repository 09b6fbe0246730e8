"""Image loading and the official Qwen2-VL smart resize (decision D16).

PIL ``open(...).convert("RGB")`` (alpha dropped, not composited on white), then the resize of
``qwen_vl_utils`` / the official ``collators/qwen2_vision_process.py``: sides rounded to multiples of the
backbone's ``patch_size * merge_size`` (28 for Qwen2-VL / Qwen2.5-VL, 32 for Qwen3-VL), pixel count within
``[min_pixels, max_pixels]``, aspect ratio at most 200, PIL bicubic.

Budgets on other backbones (:meth:`ImageBudget.for_backbone`): the recipe's defaults are 4 .. 300 visual
tokens (``4*28*28 .. 300*28*28`` pixels, as ``qwen_vl_utils`` writes budgets: tokens times factor squared);
on a backbone of another factor those two defaults keep their token counts (Qwen3-VL: ``4*32*32 ..
300*32*32``). Any other value is a pixel count and is used as given.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from PIL import Image, UnidentifiedImageError

from umarvel.errors import ImageLoadError

IMAGE_FACTOR = 28
MIN_TOKENS = 4
MAX_TOKENS = 300
MIN_PIXELS = MIN_TOKENS * IMAGE_FACTOR * IMAGE_FACTOR
MAX_PIXELS = MAX_TOKENS * IMAGE_FACTOR * IMAGE_FACTOR
MAX_RATIO = 200

ImageLike = Union[str, os.PathLike, Image.Image]


@dataclass(frozen=True)
class ImageBudget:
    """Pixel bounds of the resize (defaults: the official 4*28*28 .. 300*28*28)."""

    min_pixels: int = MIN_PIXELS
    max_pixels: int = MAX_PIXELS
    factor: int = IMAGE_FACTOR

    @classmethod
    def for_backbone(cls, min_pixels: int | None, max_pixels: int | None, factor: int) -> "ImageBudget":
        """The budget on a backbone of resize multiple ``factor`` (``PatchSpec.factor``).

        ``None`` and the recipe defaults (:data:`MIN_PIXELS` / :data:`MAX_PIXELS`, i.e. 4 / 300 tokens of
        28x28) mean 4 / 300 tokens of ``factor`` x ``factor``; other values are pixel counts, used as given.
        """
        def resolve(value: int | None, default: int, tokens: int) -> int:
            return tokens * factor * factor if value is None or value == default else int(value)

        return cls(resolve(min_pixels, MIN_PIXELS, MIN_TOKENS), resolve(max_pixels, MAX_PIXELS, MAX_TOKENS), factor)


def round_by(x: float, f: int) -> int:
    """``x`` rounded to the nearest multiple of ``f`` (Python ``round``: half to even), as ``qwen_vl_utils``."""
    return round(x / f) * f


def smart_resize(height: int, width: int, factor: int = IMAGE_FACTOR, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """Target ``(height, width)``: multiples of ``factor`` with ``min_pixels <= h*w <= max_pixels``.

    Same arithmetic as ``qwen_vl_utils.smart_resize``.

    Raises:
        ImageLoadError: if the aspect ratio exceeds 200.
    """
    if min(height, width) <= 0:
        raise ImageLoadError(f"image has an empty side ({width}x{height})")
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ImageLoadError(
            f"absolute aspect ratio must be smaller than {MAX_RATIO}, got {max(height, width) / min(height, width):.1f}")
    h_bar = max(factor, round_by(height, factor))
    w_bar = max(factor, round_by(width, factor))
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def open_image(image: ImageLike, what: str = "") -> Image.Image:
    """Open an image as RGB (alpha dropped), raising :class:`ImageLoadError` naming the path.

    ``what`` is a short description of the item (e.g. ``"item 3"``) added to the message.
    """
    label = f"{what}: " if what else ""
    if isinstance(image, Image.Image):
        try:
            return image.convert("RGB")
        except Exception as exc:  # noqa: BLE001 - PIL raises many types
            raise ImageLoadError(f"{label}cannot convert the given PIL image to RGB ({exc})") from None
    path = Path(image)
    if not path.is_file():
        what_is = "is a folder, not an image file" if path.is_dir() else "image file not found"
        raise ImageLoadError(f"{label}{what_is}: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageLoadError(f"{label}cannot read image {path} ({exc})") from None


def load_image(image: ImageLike, budget: ImageBudget = ImageBudget(), what: str = "") -> Image.Image:
    """Open ``image`` and resize it as the official pipeline does (never larger than the budget).

    Large images are only decoded and resized, never processed at full size, so a huge image
    cannot exhaust memory downstream.
    """
    im = open_image(image, what)
    try:
        h, w = smart_resize(im.height, im.width, budget.factor, budget.min_pixels, budget.max_pixels)
    except ImageLoadError as exc:
        label = f"{what}: " if what else ""
        src = "" if isinstance(image, Image.Image) else f" {image}"
        raise ImageLoadError(f"{label}image{src}: {exc}") from None
    if (w, h) != im.size:
        im = im.resize((w, h), resample=Image.BICUBIC)
    return im
