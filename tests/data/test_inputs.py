"""Input construction: format_string, suffixes, smart resize, image loading and bad-input errors."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from umarvel.data.formatting import (INFERENCE_STYLE, SUFFIX_IMAGE, SUFFIX_IMAGE_TEXT, SUFFIX_TEXT, TRAIN_STYLE,
                                     build_messages, format_string,
                                     query_text_with_instruction)
from umarvel.data.images import ImageBudget, load_image, smart_resize
from umarvel.data.visual import PatchSpec, image_patches
from umarvel.errors import CheckpointError, DataError, ImageLoadError


@pytest.mark.parametrize("raw,expected", [
    ("a dog", "A dog."), ('  "quoted" \r', "Quoted."), ("Why?", "Why?"), ("Wow!", "Wow!"), ("", ""),
    ("  ", ""), ("über", "Über."),
])
def test_format_string(raw, expected):
    assert format_string(raw) == expected


def test_query_text_is_formatted_as_one_string():
    got = query_text_with_instruction("find me an image", "a red car")
    assert got == "<instruction_start>Find me an image.<instruction_end> a red car."
    assert query_text_with_instruction("Find it.", "") == "<instruction_start>Find it.<instruction_end>."
    assert query_text_with_instruction(None, "plain") == "Plain."


def test_suffixes_per_style():
    text = lambda msgs: msgs[0]["content"][-1]["text"]
    assert text(build_messages("Hi.", False, INFERENCE_STYLE)) == "Hi." + SUFFIX_TEXT
    assert text(build_messages("Hi.", True, INFERENCE_STYLE)) == "Hi." + SUFFIX_IMAGE_TEXT
    assert text(build_messages("", True, INFERENCE_STYLE)) == SUFFIX_IMAGE_TEXT  # D15 eval quirk
    assert text(build_messages("", True, TRAIN_STYLE)) == SUFFIX_IMAGE
    assert text(build_messages("Hi.", True, replace(TRAIN_STYLE, suffix=False))) == "Hi."
    msgs = build_messages("Hi.", True, INFERENCE_STYLE)
    assert msgs[0]["content"][0] == {"type": "image"} and msgs[1]["content"][0]["text"] == "<emb>."


@pytest.mark.parametrize("hw,expected", [
    ((112, 84), (112, 84)), ((300, 300), (308, 308)), ((480, 640), (420, 560)), ((90, 1000), (84, 1008)),
    ((150, 200), (140, 196)), ((10, 10), (56, 56)),
])
def test_smart_resize_official_values(hw, expected):
    assert smart_resize(*hw) == expected


def test_smart_resize_bounds_and_ratio():
    h, w = smart_resize(10000, 7000)
    assert h % 28 == 0 and w % 28 == 0 and h * w <= 300 * 28 * 28
    with pytest.raises(ImageLoadError, match="aspect ratio"):
        smart_resize(10, 3000)


def test_load_image_drops_alpha_and_resizes(sample_images):
    im = load_image(sample_images["alpha"])
    assert im.mode == "RGB" and im.size == (56, 56)
    assert np.asarray(im)[0, 0].tolist() == [10, 200, 10]  # alpha dropped, not composited on white
    big = load_image(sample_images["big"], ImageBudget(max_pixels=64 * 28 * 28))
    assert big.size[0] * big.size[1] <= 64 * 28 * 28


def test_missing_and_corrupt_images_name_the_item(tiny_model, tmp_path):
    with pytest.raises(ImageLoadError, match=r"candidate item 1: image file not found: .*nope\.png"):
        tiny_model.encode_candidates([{"text": "ok"}, {"image": str(tmp_path / "nope.png")}])
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ImageLoadError, match=r"query item 0: cannot read image .*bad\.jpg"):
        tiny_model.encode_queries([{"image": str(bad), "instruction": "x"}])


@pytest.mark.parametrize("item,match", [
    ({}, "neither text nor image"), ({"text": "   "}, "neither text nor image"),
    ({"txt": "typo"}, "unknown key"), ("just a string", "expected a dict"), ({"text": 3}, "must be a string"),
])
def test_bad_items_raise_clear_errors(tiny_model, item, match):
    with pytest.raises(DataError, match=match):
        tiny_model.encode_candidates([{"text": "fine"}, item])


def test_instruction_on_candidate_is_rejected(tiny_model):
    with pytest.raises(DataError, match="candidate item 0: unknown key"):
        tiny_model.encode_candidates([{"text": "a", "instruction": "b"}])


def test_huge_image_is_resized_by_budget(tiny_model, tmp_path):
    path = tmp_path / "huge.png"
    Image.new("RGB", (6000, 4000), (120, 10, 10)).save(path)
    out = tiny_model.encode_candidates([{"image": str(path)}])
    assert out.shape == (1, tiny_model.embed_dim) and np.isfinite(out).all()


def test_unsupported_checkpoint_folders(tmp_path, tiny_checkpoint):
    from umarvel import UMarvel

    with pytest.raises(CheckpointError, match="not found"):
        UMarvel.from_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        UMarvel.from_pretrained(tmp_path / "empty")
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(CheckpointError, match="unsupported backbone model_type 'bert'"):
        UMarvel.from_pretrained(other)


def test_fast_patches_bit_identical_to_the_image_processor(tiny_model, sample_images):
    spec = PatchSpec.from_processor(tiny_model.image_processor)
    for name in ("red", "blue", "green_tall", "big", "alpha"):
        im = load_image(sample_images[name])
        ours, grid = image_patches(im, spec)
        ref = tiny_model.image_processor(images=[im], do_resize=False, return_tensors="np")
        np.testing.assert_array_equal(grid, ref["image_grid_thw"])
        np.testing.assert_array_equal(ours, ref["pixel_values"])
    with pytest.raises(DataError, match="not a multiple of 28"):
        image_patches(Image.new("RGB", (30, 28)), spec)
