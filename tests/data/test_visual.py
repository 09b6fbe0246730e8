"""The visual-input module (umarvel.data.visual): token counts agree with the patches, pads pair up with visuals."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from umarvel.data.collate import EmbedInput, EmbeddingTokenizer
from umarvel.data.formatting import INFERENCE_STYLE
from umarvel.data.processor import BUNDLED_PROCESSOR_DIR, load_tokenizer
from umarvel.data.visual import (IMAGE_PAD, VIDEO_PAD, expand_pads, image_patches, image_token_count, token_count,
                                 video_patches)
from umarvel.errors import DataError


def _rand_image(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("h,w", [(28, 28), (56, 84), (252, 28)])
def test_token_counts_match_the_patches(h, w):
    im = _rand_image(h, w, 0)
    pv, grid = image_patches(im)
    assert image_token_count(im) == token_count(grid) == pv.shape[0] // 4 == (h // 28) * (w // 28)
    pv, grid = video_patches([im] * 5)                      # 5 frames -> padded to 6 -> t = 3
    assert grid.tolist() == [[3, h // 14, w // 14]] and token_count(grid) == pv.shape[0] // 4
    with pytest.raises(DataError, match="item 3: image of size 30x28 is not resized to multiples of 28"):
        image_token_count(_rand_image(28, 30, 0), where="item 3")


def test_expand_pads_pairs_each_pad_with_its_visual():
    img, vid = 7, 8
    assert expand_pads([1, img, 2, img, vid, 3], img, vid, [2, 3], [4]) == [1, 7, 7, 2, 7, 7, 7, 8, 8, 8, 8, 3]
    with pytest.raises(DataError, match=f"pair 9: more {IMAGE_PAD}"):
        expand_pads([img, img], img, vid, [1], where="pair 9")
    with pytest.raises(DataError, match=f"fewer {VIDEO_PAD}"):
        expand_pads([img], img, vid, [1], [4])


def test_pad_token_in_the_text_is_a_data_error():
    tok = EmbeddingTokenizer(load_tokenizer(BUNDLED_PROCESSOR_DIR), INFERENCE_STYLE)
    with pytest.raises(DataError, match=f"embedding input 1: more {IMAGE_PAD}"):
        tok.tokenize([EmbedInput("fine"), EmbedInput(f"a {IMAGE_PAD} b")])
