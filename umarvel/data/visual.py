"""Visual inputs of Qwen2-VL: image and video patches, visual-token counts, chat pad expansion.

Patches. The Qwen2-VL processors rescale (``uint8 -> float64 * 1/255 -> float32``), normalise
(``(x - mean) / std`` in float32), pad the frames to a multiple of ``temporal_patch_size`` by repeating the
last one (a still image is one frame, so it is repeated), and flatten rows ``(t, h/m, w/m, m_h, m_w)`` x
columns ``(C, temporal, p_h, p_w)``. Every output value depends only on one uint8 input and its channel, so
the arithmetic is tabulated once per channel (256 entries) and frames become patches by one table lookup
and one transpose: bit-identical to the transformers PIL image processor and ~10x faster, so images can be
patchified in loader threads instead of the collation thread. Images and videos share this one path.

Tokens. An image or video of patch grid ``(t, h, w)`` takes ``t * h * w / merge_size**2`` language-model
tokens: its single ``<|image_pad|>`` / ``<|video_pad|>`` placeholder in the rendered chat is repeated that
many times (:func:`expand_pads`), for the embedding and the reranker collators alike.

Videos on Qwen3-VL (``PatchSpec.video_timestamps``): as the Qwen3-VL processor does, the chat's
``<|vision_start|><|video_pad|><|vision_end|>`` is replaced by one block per temporal patch,
``<{t:.1f} seconds><|vision_start|><|video_pad|><|vision_end|>``, each pad then repeated ``h * w / merge**2``
times (:func:`timestamped_video_text`, :func:`frame_timestamps`); Qwen3-VL's M-RoPE index expects this layout.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image

from umarvel.errors import DataError

PATCH_SIZE = 14
TEMPORAL_PATCH_SIZE = 2
MERGE_SIZE = 2
#: OpenAI CLIP normalisation used by the Qwen2-VL processors.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
#: Sampling rate assumed for frames given without timestamps (``qwen_vl_utils``' default for a frame list).
FRAME_LIST_FPS = 2.0

FramesLike = Union[Sequence[Image.Image], np.ndarray]
#: One visual's patches: float32 (N, C*T*P*P) pixel rows and its int64 (1, 3) ``[[t, h, w]]`` grid.
Patches = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class PatchSpec:
    """Patch geometry and normalisation of a Qwen2-VL-style image processor, and the video token layout.

    Attributes:
        patch_size / temporal_patch_size / merge_size / image_mean / image_std: from the image processor
            (Qwen2-VL / Qwen2.5-VL: 14, 2, 2, CLIP mean/std; Qwen3-VL: 16, 2, 2, 0.5/0.5).
        video_timestamps: the Qwen3-VL video layout (one ``<t seconds>`` block per temporal patch); a property
            of the backbone, not of the processor files (``umarvel.model.backbones.BackboneSpec``).
    """

    patch_size: int = PATCH_SIZE
    temporal_patch_size: int = TEMPORAL_PATCH_SIZE
    merge_size: int = MERGE_SIZE
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    video_timestamps: bool = False

    @classmethod
    def from_processor(cls, image_processor, video_timestamps: bool = False) -> "PatchSpec":
        """Read the geometry and mean/std from a transformers Qwen2-VL image processor."""
        return cls(int(image_processor.patch_size), int(image_processor.temporal_patch_size),
                   int(image_processor.merge_size), tuple(float(v) for v in image_processor.image_mean),
                   tuple(float(v) for v in image_processor.image_std), video_timestamps)

    @property
    def factor(self) -> int:
        """Side multiple of a resized image or frame: ``patch_size * merge_size`` (28)."""
        return self.patch_size * self.merge_size


@lru_cache(maxsize=8)
def _table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(C, 256) float32: the processor's value for each uint8 level of each channel."""
    levels = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    m = np.asarray(mean, dtype=np.float32)[:, None]
    s = np.asarray(std, dtype=np.float32)[:, None]
    return (levels[None, :] - m) / s


def frame_patches(frames: np.ndarray, spec: PatchSpec = PatchSpec(), what: str = "image") -> Patches:
    """Patches of T resized frames (one image is T = 1), the core of :func:`image_patches` / :func:`video_patches`.

    Args:
        frames: uint8 (T, H, W, C), H and W multiples of ``spec.factor``.
        what: names the input in errors.
    Returns:
        pixel_values: float32 (t*gh*gw, C*temporal*p*p), i.e. (N, 1176) for Qwen2-VL;
        grid_thw: int64 (1, 3) = [[t, gh, gw]], t = ceil(T / temporal), gh = H / p, gw = W / p.
    """
    n, h, w, c = frames.shape
    p, m, tp = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    if h % spec.factor or w % spec.factor:
        raise DataError(f"{what} of size {w}x{h} is not a multiple of {spec.factor}; resize it first")
    table = _table(spec.image_mean, spec.image_std)
    chw = np.ascontiguousarray(frames.transpose(3, 0, 1, 2))          # (C, T, H, W) uint8
    x = np.stack([np.take(table[i], chw[i]) for i in range(c)], 1)   # (T, C, H, W) float32
    if pad := -n % tp:  # repeat the last frame (a still image: itself), without a copy for one frame
        x = (np.broadcast_to(x, (tp,) + x.shape[1:]) if n == 1
             else np.concatenate([x, np.repeat(x[-1:], pad, axis=0)]))
    gt, gh, gw = x.shape[0] // tp, h // p, w // p
    x = x.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)                       # (t, h/m, w/m, m_h, m_w, C, temporal, p_h, p_w)
    flat = np.ascontiguousarray(x).reshape(gt * gh * gw, c * tp * p * p)
    return flat, np.array([[gt, gh, gw]], dtype=np.int64)


def image_patches(image: Image.Image, spec: PatchSpec = PatchSpec()) -> Patches:
    """Patches of one resized RGB image (``umarvel.data.images.load_image``): (gh*gw, 1176) and [[1, gh, gw]]."""
    arr = np.asarray(image.convert("RGB") if image.mode != "RGB" else image, dtype=np.uint8)
    return frame_patches(arr[None], spec, "image")


def _frames_array(frames: FramesLike) -> np.ndarray:
    """Frames as uint8 (T, H, W, 3)."""
    if isinstance(frames, np.ndarray):
        arr = frames
    else:
        if len(frames) == 0:
            raise DataError("video_patches: no frames")
        sizes = {f.size for f in frames}
        if len(sizes) != 1:
            raise DataError(f"video_patches: frames differ in size {sorted(sizes)}")
        arr = np.stack([np.asarray(f.convert("RGB")) for f in frames])
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[0] == 0:
        raise DataError(f"video_patches: expected (T, H, W, 3) frames, got shape {arr.shape}")
    return arr


def video_patches(frames: FramesLike, spec: PatchSpec = PatchSpec()) -> Patches:
    """Qwen2-VL video patches of already resized frames (``umarvel.data.video.load_video``; no resize here).

    Args:
        frames: T RGB PIL images of one size, or a uint8 array (T, H, W, 3); H, W multiples of ``spec.factor``.
            An odd frame count is padded by repeating the last frame.
    Returns:
        pixel_values_videos: float32 (t*gh*gw, 1176); video_grid_thw: int64 (1, 3) = [[ceil(T/2), H/14, W/14]].
    """
    return frame_patches(_frames_array(frames).astype(np.uint8, copy=False), spec, "video_patches: frame")


def frame_timestamps(indices: Sequence[int], fps: float, temporal_patch_size: int = TEMPORAL_PATCH_SIZE) -> list[float]:
    """Seconds of each temporal patch: the Qwen3-VL processor's ``_calculate_timestamps``.

    The sampled frame ``indices`` (padded by repeating the last to a multiple of ``temporal_patch_size``)
    become ``index / fps`` seconds; each group of ``temporal_patch_size`` frames gets the mean of its first
    and last time. Returns ``ceil(len(indices) / temporal_patch_size)`` floats.
    """
    idx = [int(i) for i in indices]
    if not idx or fps <= 0:
        raise DataError(f"frame_timestamps: need frame indices and a positive fps (got {len(idx)} frames, fps {fps})")
    idx += [idx[-1]] * (-len(idx) % temporal_patch_size)
    times = [i / fps for i in idx]
    return [(times[i] + times[i + temporal_patch_size - 1]) / 2 for i in range(0, len(times), temporal_patch_size)]


@dataclass(frozen=True)
class VideoInput:
    """A video already turned into Qwen2-VL patches.

    Attributes:
        pixel_values: float32 (t*h*w, C*T*P*P) patches.
        grid_thw: (t, h, w) patch grid.
        timestamps: seconds of each of the t temporal patches (:func:`frame_timestamps`), used by the
            Qwen3-VL layout; ``None``: frames taken as sampled at :data:`FRAME_LIST_FPS` from frame 0.
    """

    pixel_values: np.ndarray
    grid_thw: tuple[int, int, int]
    timestamps: tuple[float, ...] | None = None

    @classmethod
    def from_frames(cls, frames: FramesLike, spec: PatchSpec = PatchSpec(),
                    timestamps: Sequence[float] | None = None) -> "VideoInput":
        """Patches of resized frames (see :func:`video_patches`); ``timestamps``: one per temporal patch."""
        pv, grid = video_patches(frames, spec)
        grid_thw = tuple(int(g) for g in grid[0])
        if timestamps is not None and len(timestamps) != grid_thw[0]:
            raise DataError(f"VideoInput: {len(timestamps)} timestamps for {grid_thw[0]} temporal patches")
        return cls(pv, grid_thw, None if timestamps is None else tuple(float(t) for t in timestamps))

    def times(self, temporal_patch_size: int = TEMPORAL_PATCH_SIZE) -> list[float]:
        """Seconds of each temporal patch (:attr:`timestamps`, or the frame-list default)."""
        if self.timestamps is not None:
            return list(self.timestamps)
        return frame_timestamps(range(self.grid_thw[0] * temporal_patch_size), FRAME_LIST_FPS, temporal_patch_size)


def timestamped_video_text(times: Sequence[float]) -> str:
    """The Qwen3-VL video placeholder: ``<{t:.1f} seconds><|vision_start|><|video_pad|><|vision_end|>`` per patch."""
    return "".join(f"<{t:.1f} seconds>{VISION_START}{VIDEO_PAD}{VISION_END}" for t in times)


def video_token_counts(video: VideoInput, spec: PatchSpec) -> list[int]:
    """Token counts of the video's ``<|video_pad|>`` runs: one run (Qwen2/2.5-VL) or one per temporal patch."""
    t, h, w = video.grid_thw
    if spec.video_timestamps:
        return [token_count((1, h, w), spec.merge_size)] * t
    return [token_count((t, h, w), spec.merge_size)]


# ------------------------------------------------------------------------------------------ token counts
def token_count(grid_thw: Sequence[int] | np.ndarray, merge_size: int = MERGE_SIZE) -> int:
    """Language-model tokens of one visual of patch grid ``(t, h, w)``: ``t * h * w / merge_size**2``."""
    t, h, w = (int(v) for v in np.asarray(grid_thw).reshape(-1)[:3])
    return t * h * w // (merge_size * merge_size)


def image_token_count(image: Image.Image, spec: PatchSpec = PatchSpec(), where: str = "") -> int:
    """Language-model tokens of one resized image: ``(H / 28) * (W / 28)``.

    Raises:
        DataError: naming ``where`` when the image is not resized to multiples of ``spec.factor``.
    """
    w, h = image.size
    if h % spec.factor or w % spec.factor:
        label = f"{where}: " if where else ""
        raise DataError(f"{label}image of size {w}x{h} is not resized to multiples of {spec.factor}; "
                        "use umarvel.data.images.load_image")
    return token_count((1, h // spec.patch_size, w // spec.patch_size), spec.merge_size)


# ------------------------------------------------------------------------------ chat rendering and pads
def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    """The exact chat string of ``messages`` under the checkpoint's template (one pad token per visual)."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def expand_pads(ids: Sequence[int], image_pad_id: int, video_pad_id: int, image_counts: Sequence[int],
                video_counts: Sequence[int] = (), where: str = "input") -> list[int]:
    """Repeat the k-th ``<|image_pad|>`` ``image_counts[k]`` times and the k-th ``<|video_pad|>`` ``video_counts[k]`` times.

    Raises:
        DataError: naming ``where`` when the pads and the visuals do not pair up one to one.
    """
    counts = {image_pad_id: iter(image_counts), video_pad_id: iter(video_counts)}
    out: list[int] = []
    for tok in ids:
        it = counts.get(tok)
        if it is None:
            out.append(tok)
            continue
        n = next(it, None)
        if n is None:
            raise DataError(f"{where}: more {IMAGE_PAD if tok == image_pad_id else VIDEO_PAD} tokens than "
                            "visuals (a pad token in the text?)")
        out.extend([tok] * n)
    for pad, it in ((IMAGE_PAD, counts[image_pad_id]), (VIDEO_PAD, counts[video_pad_id])):
        if next(it, None) is not None:
            raise DataError(f"{where}: fewer {pad} tokens than visuals")
    return out


def tokenize_chats(tokenizer, texts: Sequence[str], image_counts: Sequence[Sequence[int]],
                   video_counts: Sequence[Sequence[int]] | None = None,
                   wheres: Sequence[str] | None = None) -> list[list[int]]:
    """Token ids of rendered chats (one fast-tokenizer call), every visual pad expanded (:func:`expand_pads`).

    Args:
        texts: n rendered chats. image_counts / video_counts: per chat, the token count of each image / video
            in prompt order. wheres: per chat, a label for errors.
    """
    image_pad_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    video_pad_id = tokenizer.convert_tokens_to_ids(VIDEO_PAD)
    ids_list = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    video_counts = video_counts if video_counts is not None else [()] * len(ids_list)
    wheres = wheres if wheres is not None else [f"input {i}" for i in range(len(ids_list))]
    return [expand_pads(ids, image_pad_id, video_pad_id, ic, vc, where)
            for ids, ic, vc, where in zip(ids_list, image_counts, video_counts, wheres)]


# ------------------------------------------------------------------------------------- batched pixels
def visual_batch(images: Sequence[Patches], videos: Sequence[VideoInput] = ()) -> dict[str, torch.Tensor]:
    """The model's pixel inputs for a batch, visuals in prompt order, empty keys left out.

    Returns:
        ``pixel_values`` float32 (sum N_i, 1176) + ``image_grid_thw`` int64 (n_images, 3);
        ``pixel_values_videos`` float32 + ``video_grid_thw`` int64 (n_videos, 3).
    """
    out: dict[str, torch.Tensor] = {}
    if images:
        out["pixel_values"] = torch.from_numpy(np.concatenate([pv for pv, _ in images]))
        out["image_grid_thw"] = torch.from_numpy(np.concatenate([g for _, g in images]))
    if videos:
        out["pixel_values_videos"] = torch.from_numpy(np.concatenate([v.pixel_values for v in videos]))
        out["video_grid_thw"] = torch.tensor([v.grid_thw for v in videos], dtype=torch.long)
    return out
