"""Fast Qwen2-VL image patches, bit-identical to the transformers PIL image processor.

The processor rescales (``uint8 -> float64 * 1/255 -> float32``), normalises (``(x - mean) / std`` in
float32), repeats a still image ``temporal_patch_size`` times and flattens patches in the order
``(t, h/m, w/m, m_h, m_w) x (C, temporal, p_h, p_w)``. Because every output value depends only on one
uint8 input and its channel, the arithmetic is tabulated once per channel (256 entries) and the image
is turned into patches by one table lookup and one transpose: ~10x faster than the processor call, so
images can be patchified in the loader threads instead of the collation thread.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np
from PIL import Image

from umarvel.errors import DataError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class PatchSpec:
    """Patch geometry and normalisation of a Qwen2-VL image processor."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD

    @classmethod
    def from_processor(cls, image_processor) -> "PatchSpec":
        """Read the geometry and mean/std from a transformers Qwen2-VL image processor."""
        return cls(int(image_processor.patch_size), int(image_processor.temporal_patch_size),
                   int(image_processor.merge_size), tuple(float(v) for v in image_processor.image_mean),
                   tuple(float(v) for v in image_processor.image_std))


@lru_cache(maxsize=8)
def _table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(C, 256) float32: the processor's value for each uint8 level of each channel."""
    levels = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    m = np.asarray(mean, dtype=np.float32)[:, None]
    s = np.asarray(std, dtype=np.float32)[:, None]
    return (levels[None, :] - m) / s


def image_patches(image: Image.Image, spec: PatchSpec = PatchSpec()) -> tuple[np.ndarray, np.ndarray]:
    """Patches of one resized RGB image.

    Args:
        image: RGB PIL image whose sides are multiples of ``patch_size * merge_size``.
    Returns:
        pixel_values: float32 (gh*gw, C*temporal*p*p), i.e. (N, 1176) for Qwen2-VL;
        grid_thw: int64 (1, 3) = [[1, gh, gw]].
    """
    arr = np.asarray(image.convert("RGB") if image.mode != "RGB" else image, dtype=np.uint8)
    h, w, c = arr.shape
    p, m, t = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    if h % (p * m) or w % (p * m):
        raise DataError(f"image of size {w}x{h} is not a multiple of {p * m}; resize it first")
    table = _table(spec.image_mean, spec.image_std)
    chw = np.ascontiguousarray(arr.transpose(2, 0, 1))               # (C, H, W) uint8
    x = np.stack([np.take(table[i], chw[i]) for i in range(c)])      # (C, H, W) float32
    gh, gw = h // p, w // p
    x = x.reshape(c, gh // m, m, p, gw // m, m, p)                   # (C, h/m, m_h, p_h, w/m, m_w, p_w)
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)                             # (h/m, w/m, m_h, m_w, C, p_h, p_w)
    x = np.broadcast_to(x[:, :, :, :, :, None], x.shape[:5] + (t,) + x.shape[5:])
    flat = np.ascontiguousarray(x).reshape(gh * gw, c * t * p * p)
    return flat, np.array([[1, gh, gw]], dtype=np.int64)


def batch_patches(images: Sequence[Image.Image], spec: PatchSpec = PatchSpec()) -> tuple[np.ndarray, np.ndarray]:
    """Patches of several images concatenated in order: ((sum N_i), 1176) and (n_images, 3)."""
    parts = [image_patches(im, spec) for im in images]
    return np.concatenate([pv for pv, _ in parts]), np.concatenate([g for _, g in parts])
