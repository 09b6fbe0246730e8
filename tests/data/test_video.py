"""Video decoding / sampling (umarvel.data.video) and patch parity with the Qwen2-VL image processor."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from umarvel.data.video import (MSRVTT_VIDEO, MSVD_VIDEO, VIDEO_MIN_PIXELS, VideoSpec, decode_frames,
                                frame_pixel_budget, load_video, probe_video, sample_indices, smart_nframes)
from umarvel.data.visual import token_count, video_patches
from umarvel.errors import DataError
from umarvel.eval.zeroshot.fixtures import write_video


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("vid") / "clip.avi"
    write_video(path, seed=3, n_frames=16, fps=8, size=(64, 48))
    return path


def _rand_image(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_two_identical_frames_equal_image_patches():
    from umarvel.data.processor import _image_processor_class

    im = _rand_image(56, 84, 0)
    ref = _image_processor_class()()(images=[im], do_resize=False, return_tensors="np")
    pv, grid = video_patches([im, im])
    assert pv.dtype == np.float32
    np.testing.assert_array_equal(grid, ref["image_grid_thw"])
    np.testing.assert_array_equal(pv, ref["pixel_values"])


def test_patch_layout_hand_checked():
    # 3 frames of 28x56 -> padded to 4 frames, grid (2, 2, 4), 16 rows of 3*2*14*14 = 1176
    frames = np.stack([np.asarray(_rand_image(28, 56, s)) for s in range(3)])
    pv, grid = video_patches(frames)
    assert pv.shape == (16, 1176) and grid.tolist() == [[2, 2, 4]]
    assert token_count(grid) == 4
    norm = ((frames.astype(np.float64) / 255).astype(np.float32) - np.float32([0.48145466, 0.4578275, 0.40821073])) \
        / np.float32([0.26862954, 0.26130258, 0.27577711])
    # row 5 = t 0, merge block (0, 1), inner (0, 1) -> patch row 0, patch col 3; column (c=1, temporal=1, y=2, x=7)
    col = 1 * (2 * 14 * 14) + 1 * (14 * 14) + 2 * 14 + 7
    assert pv[5, col] == norm[1, 0 * 14 + 2, 3 * 14 + 7, 1]
    # row 14 = t 1 (frame 2 and its padded copy), block (0, 1), inner (1, 0) -> patch row 1, col 2
    col = 0 * (2 * 14 * 14) + 1 * (14 * 14) + 0 * 14 + 0
    assert pv[14, col] == norm[2, 14, 28, 0]


def test_video_patches_rejects_bad_sizes():
    with pytest.raises(DataError, match="multiple of 28"):
        video_patches([_rand_image(30, 56, 0)] * 2)
    with pytest.raises(DataError, match="differ in size"):
        video_patches([_rand_image(28, 56, 0), _rand_image(56, 56, 0)])


def test_smart_nframes_and_indices():
    assert smart_nframes(100, 25.0, MSVD_VIDEO) == 12
    assert smart_nframes(300, 30.0, MSRVTT_VIDEO) == 20            # 10 s at 2 fps
    assert smart_nframes(30, 30.0, MSRVTT_VIDEO) == 4              # clamped up to 4
    assert smart_nframes(3, 30.0, MSRVTT_VIDEO) == 2               # max = floor_even(min(768, 3))
    assert smart_nframes(20000, 10.0, MSRVTT_VIDEO) == 768         # clamped down to 768
    assert smart_nframes(91, 30.0, MSRVTT_VIDEO) == 6              # 6.07 -> round to even
    with pytest.raises(ValueError):
        smart_nframes(8, 25.0, MSVD_VIDEO)
    assert sample_indices(16, 4).tolist() == [0, 5, 10, 15]
    assert sample_indices(100, 12).tolist() == [0, 9, 18, 27, 36, 45, 54, 63, 72, 81, 90, 99]


def test_frame_pixel_budget():
    assert frame_pixel_budget(12) == (VIDEO_MIN_PIXELS, 768 * 28 * 28)
    assert frame_pixel_budget(200) == (VIDEO_MIN_PIXELS, 24576 * 28 * 28 / 200 * 2)
    assert frame_pixel_budget(768) == (VIDEO_MIN_PIXELS, int(VIDEO_MIN_PIXELS * 1.05))


def test_load_video_msvd_and_msrvtt(clip):
    assert probe_video(clip) == (16, 8.0)
    frames = load_video(clip, MSVD_VIDEO, video_id="v1")
    assert len(frames) == 12 and {f.size for f in frames} == {(392, 280)}  # 64x48 upscaled to >= 128*28*28
    assert 392 * 280 >= VIDEO_MIN_PIXELS
    frames = load_video(clip, MSRVTT_VIDEO, video_id="v1")                  # 2 s at 2 fps -> 4 frames
    assert len(frames) == 4
    pv, grid = video_patches(frames)
    assert grid.tolist() == [[2, 20, 28]] and pv.shape == (2 * 20 * 28, 1176)


def test_decoded_frames_follow_the_indices(clip):
    a, b = decode_frames(clip, [15, 0])
    bar_a = np.asarray(a).mean(axis=(0, 2)).argmax()
    bar_b = np.asarray(b).mean(axis=(0, 2)).argmax()
    assert bar_b < 8 and bar_a > bar_b       # the bright bar moves right by 4 px per frame


def test_corrupt_missing_and_short_videos_name_the_id(tmp_path, clip):
    bad = tmp_path / "bad.avi"
    bad.write_bytes(b"\x00not a video" * 64)
    with pytest.raises(DataError, match="video vid_bad .*bad.avi"):
        load_video(bad, MSVD_VIDEO, video_id="vid_bad")
    with pytest.raises(DataError, match="vid_gone.*not found"):
        load_video(tmp_path / "gone.mp4", MSVD_VIDEO, video_id="vid_gone")
    with pytest.raises(DataError, match="vid_short.*cannot sample 24"):
        load_video(clip, VideoSpec(nframes=24), video_id="vid_short")


def test_frame_timestamps_are_the_qwen3_processor_times():
    from umarvel.data.visual import FRAME_LIST_FPS, VideoInput, frame_timestamps

    # Qwen3VLProcessor._calculate_timestamps: index / fps, padded to pairs, mean of each pair's first and last
    assert frame_timestamps([0, 5, 10, 15], 8.0) == [(0 + 5 / 8) / 2, (10 / 8 + 15 / 8) / 2]
    assert frame_timestamps([0, 4, 8], 2.0) == [1.0, 4.0]  # the last frame repeated
    with pytest.raises(DataError, match="positive fps"):
        frame_timestamps([0, 1], 0)
    frames = np.zeros((4, 28, 28, 3), dtype=np.uint8)
    assert VideoInput.from_frames(frames).times() == frame_timestamps(range(4), FRAME_LIST_FPS)
    with pytest.raises(DataError, match="1 timestamps for 2 temporal patches"):
        VideoInput.from_frames(frames, timestamps=[0.5])


def test_video_budgets_keep_their_tokens_on_a_factor_32_backbone(clip):
    from umarvel.data.video import load_video_input
    from umarvel.data.visual import PatchSpec, frame_timestamps

    spec = MSRVTT_VIDEO.for_factor(32)
    assert (spec.factor, spec.min_pixels, spec.max_pixels, spec.total_pixels) == \
        (32, 128 * 32 * 32, 768 * 32 * 32, 24576 * 32 * 32)
    assert MSVD_VIDEO.for_factor(28) is MSVD_VIDEO
    qwen3 = PatchSpec(patch_size=16, image_mean=(0.5,) * 3, image_std=(0.5,) * 3, video_timestamps=True)
    video = load_video_input(clip, MSVD_VIDEO.for_factor(32), qwen3, video_id="v1")
    t, h, w = video.grid_thw
    assert t == 6 and (h * 16) % 32 == 0 and (w * 16) % 32 == 0 and h * w * 256 >= 128 * 32 * 32
    assert video.pixel_values.shape == (t * h * w, 3 * 2 * 16 * 16)
    idx = sample_indices(16, 12).tolist()
    assert list(video.timestamps) == pytest.approx(frame_timestamps(idx, 8.0))  # the stream's fps (8)
