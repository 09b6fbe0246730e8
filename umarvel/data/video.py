"""Video decoding, frame sampling and Qwen2-VL video patches, without torchvision (method spec 1.7).

Pipeline of the official ``fetch_video`` (``qwen_vl_utils`` fork), reimplemented on PyAV:

1. decode every frame of the first video stream (``total_frames``; fps from the stream's average rate);
2. pick ``n`` frames (:func:`smart_nframes`): a fixed ``nframes`` rounded to an even count (MSVD: 12), or
   ``fps=2`` sampling clamped to ``[4, min(768, total_frames)]`` and rounded to even (MSR-VTT);
3. frame indices ``linspace(0, total_frames - 1, n).round()`` (:func:`sample_indices`);
4. resize every frame to one ``smart_resize`` size (factor 28; Qwen3-VL 32, :meth:`VideoSpec.for_factor`) within
   the per-frame budget
   ``[VIDEO_MIN_PIXELS, max(min(VIDEO_MAX_PIXELS, VIDEO_TOTAL_PIXELS / n * 2), int(1.05 * VIDEO_MIN_PIXELS))]``
   (:func:`frame_pixel_budget`), bicubic;
5. patches: :func:`umarvel.data.visual.video_patches` (rescale 1/255, CLIP mean/std, temporal patch 2, patch 14,
   2x2 merge order, exactly as transformers' Qwen2-VL video processor flattens them); :func:`load_video_input`
   also keeps each temporal patch's time (the Qwen3-VL processor's timestamps: frame index / stream fps).

Resize difference: the official code resizes the uint8 frame tensor with torchvision's antialiased bicubic;
here each frame is resized with PIL's bicubic (which always antialiases when downscaling). torchvision's
antialiased uint8 kernel is modelled on PIL's, so pixels agree up to rounding (at most a few levels).
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Sequence

import numpy as np
from PIL import Image

from umarvel.data.images import round_by, smart_resize
from umarvel.errors import DataError

if TYPE_CHECKING:
    from umarvel.data.visual import PatchSpec, VideoInput

logger = logging.getLogger(__name__)

VIDEO_FACTOR = 28
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28
VIDEO_TOTAL_PIXELS = 24576 * 28 * 28
FRAME_FACTOR = 2
FPS = 2.0
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768


@dataclass(frozen=True)
class VideoSpec:
    """How a set samples and sizes its videos.

    Attributes:
        nframes: fixed frame count (rounded to even); ``None`` samples at ``fps``.
        fps: target sampling rate when ``nframes`` is None.
        min_frames / max_frames: clamp of the fps sampling (``max_frames`` is also capped by the clip length).
        min_pixels / max_pixels / total_pixels: per-frame budget, see :func:`frame_pixel_budget`.
        factor: frames are resized to multiples of it (the backbone's ``patch_size * merge_size``).
    """

    nframes: int | None = None
    fps: float = FPS
    min_frames: int = FPS_MIN_FRAMES
    max_frames: int = FPS_MAX_FRAMES
    min_pixels: int = VIDEO_MIN_PIXELS
    max_pixels: int = VIDEO_MAX_PIXELS
    total_pixels: int = VIDEO_TOTAL_PIXELS
    factor: int = VIDEO_FACTOR

    def for_factor(self, factor: int) -> "VideoSpec":
        """The same sampling on a backbone of resize multiple ``factor``, budgets kept in tokens.

        ``qwen_vl_utils`` writes video budgets as tokens times ``factor**2`` (128 / 768 / 24576 tokens of 28x28
        here); on Qwen3-VL (factor 32) they become 128*32*32 etc. Pixel overrides are applied after this.
        """
        if factor == self.factor:
            return self
        scale = (factor * factor) / (self.factor * self.factor)
        return replace(self, factor=factor, min_pixels=round(self.min_pixels * scale),
                       max_pixels=round(self.max_pixels * scale), total_pixels=round(self.total_pixels * scale))


#: MSVD: 12 uniformly spaced frames.
MSVD_VIDEO = VideoSpec(nframes=12)
#: MSR-VTT: qwen_vl_utils default (2 fps, 4..768 frames).
MSRVTT_VIDEO = VideoSpec()


def _ceil_by(x: float, f: int) -> int:
    return math.ceil(x / f) * f


def _floor_by(x: float, f: int) -> int:
    return math.floor(x / f) * f


def smart_nframes(total_frames: int, video_fps: float | None, spec: VideoSpec = VideoSpec()) -> int:
    """Number of frames to sample (``qwen_vl_utils.smart_nframes``): even, within ``[2, total_frames]``.

    Raises:
        ValueError: when the clip is too short for the request (the caller names the video).
    """
    if spec.nframes is not None:
        n = round_by(spec.nframes, FRAME_FACTOR)
    else:
        if not video_fps or video_fps <= 0:
            raise ValueError("the video has no frame rate, cannot sample at a fixed fps")
        min_frames = _ceil_by(spec.min_frames, FRAME_FACTOR)
        max_frames = _floor_by(min(spec.max_frames, total_frames), FRAME_FACTOR)
        n = total_frames / video_fps * spec.fps
        n = min(max(n, min_frames), max_frames)
        n = round_by(n, FRAME_FACTOR)
    if not FRAME_FACTOR <= n <= total_frames:
        raise ValueError(f"cannot sample {n} frames from a clip of {total_frames} frames "
                         f"(need {FRAME_FACTOR} <= n <= total)")
    return int(n)


def sample_indices(total_frames: int, n: int) -> np.ndarray:
    """Frame indices ``torch.linspace(0, total_frames - 1, n).round()`` (float32 linspace, half to even): (n,) int64."""
    import torch

    return torch.linspace(0, total_frames - 1, n).round().long().numpy()


def frame_pixel_budget(n_frames: int, spec: VideoSpec = VideoSpec()) -> tuple[int, float]:
    """Per-frame ``(min_pixels, max_pixels)`` for a clip of ``n_frames`` sampled frames.

    ``max = max(min(spec.max_pixels, spec.total_pixels / n * 2), int(spec.min_pixels * 1.05))`` as in
    ``qwen_vl_utils.fetch_video`` (the floor is truncated to an int there, too).
    """
    max_pixels = max(min(spec.max_pixels, spec.total_pixels / n_frames * FRAME_FACTOR), int(spec.min_pixels * 1.05))
    return spec.min_pixels, max_pixels


def _label(path, video_id: str | None) -> str:
    return f"video {video_id} ({path})" if video_id else f"video {path}"


def _open_container(path, label: str):
    import av

    if not os.path.isfile(path):
        raise DataError(f"{label}: file not found")
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{label}: cannot open ({exc})") from None
    if not container.streams.video:
        container.close()
        raise DataError(f"{label}: no video stream")
    return container


def _stream_fps(stream) -> float | None:
    rate = stream.average_rate or stream.guessed_rate
    return float(rate) if rate else None


def probe_video(path: str | os.PathLike, video_id: str | None = None) -> tuple[int, float | None]:
    """``(total_frames, fps)`` of the first video stream, counting frames by decoding them all.

    Raises:
        DataError: naming the video when it is missing, unreadable, corrupt or has no frames.
    """
    import av

    label = _label(path, video_id)
    container = _open_container(path, label)
    try:
        fps = _stream_fps(container.streams.video[0])
        total = sum(1 for _ in container.decode(video=0))
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise DataError(f"{label}: corrupt or unreadable ({exc})") from None
    finally:
        container.close()
    if total == 0:
        raise DataError(f"{label}: no decodable frames")
    return total, fps


def decode_frames(path: str | os.PathLike, indices: Sequence[int], video_id: str | None = None) -> list[Image.Image]:
    """Decode the frames at ``indices`` (0-based decode order; repeats allowed) as RGB PIL images.

    Raises:
        DataError: naming the video when it is unreadable or shorter than ``max(indices) + 1`` frames.
    """
    import av

    label = _label(path, video_id)
    wanted = sorted(set(int(i) for i in indices))
    got: dict[int, Image.Image] = {}
    container = _open_container(path, label)
    try:
        pos = 0
        for i, frame in enumerate(container.decode(video=0)):
            if i == wanted[pos]:
                got[i] = frame.to_image().convert("RGB")
                pos += 1
                if pos == len(wanted):
                    break
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise DataError(f"{label}: corrupt or unreadable ({exc})") from None
    finally:
        container.close()
    missing = [i for i in wanted if i not in got]
    if missing:
        raise DataError(f"{label}: frame {missing[0]} could not be decoded")
    return [got[int(i)] for i in indices]


def resize_frames(frames: Sequence[Image.Image], spec: VideoSpec = VideoSpec(),
                  label: str = "video") -> list[Image.Image]:
    """Resize all frames to one ``smart_resize`` size (``spec.factor``) inside :func:`frame_pixel_budget`, bicubic.

    Shapes: n frames (H, W) -> n frames (h, w), h and w multiples of ``spec.factor`` (28; Qwen3-VL 32).
    """
    if not frames:
        raise DataError(f"{label}: no frames to resize")
    width, height = frames[0].size
    min_px, max_px = frame_pixel_budget(len(frames), spec)
    try:
        h, w = smart_resize(height, width, spec.factor, min_px, max_px)
    except DataError as exc:
        raise DataError(f"{label}: {exc}") from None
    return [f if f.size == (w, h) else f.resize((w, h), resample=Image.BICUBIC) for f in frames]


def _sample_video(path, spec: VideoSpec, video_id: str | None) -> tuple[list[Image.Image], np.ndarray, float | None]:
    """Decoded, sampled and resized frames, with the sampled frame indices and the stream fps."""
    label = _label(path, video_id)
    total, fps = probe_video(path, video_id)
    try:
        n = smart_nframes(total, fps, spec)
    except ValueError as exc:
        raise DataError(f"{label}: {exc}") from None
    idx = sample_indices(total, n)
    frames = decode_frames(path, idx.tolist(), video_id)
    logger.debug("%s: %d frames at %s fps -> %d sampled", label, total, fps, n)
    return resize_frames(frames, spec, label), idx, fps


def load_video(path: str | os.PathLike, spec: VideoSpec = VideoSpec(), video_id: str | None = None) -> list[Image.Image]:
    """Decode, sample and resize a video as the official ``fetch_video`` does.

    Returns:
        n RGB PIL frames of one size (multiples of ``spec.factor``), n even.

    Raises:
        DataError: naming ``video_id`` and the path for a missing, corrupt or too short video.
    """
    return _sample_video(path, spec, video_id)[0]


def load_video_input(path: str | os.PathLike, spec: VideoSpec = VideoSpec(), patch_spec: PatchSpec | None = None,
                     video_id: str | None = None) -> VideoInput:
    """:func:`load_video` turned into patches, each temporal patch with its time in seconds.

    The times are the Qwen3-VL processor's (``frame_timestamps`` of the sampled indices at the stream's fps;
    ``qwen_vl_utils`` passes the same indices and fps); without a known fps the frame-list default applies.
    """
    # lazy: data.visual imports torch; this module stays torch-free for the CLI's zero-shot options
    from umarvel.data.visual import PatchSpec, VideoInput, frame_timestamps

    patch_spec = patch_spec or PatchSpec()
    frames, idx, fps = _sample_video(path, spec, video_id)
    times = frame_timestamps(idx.tolist(), fps, patch_spec.temporal_patch_size) if fps else None
    return VideoInput.from_frames(frames, patch_spec, times)
