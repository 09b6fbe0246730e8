"""The zero-shot prompts, per set and side, exactly as the official per-set scripts build them.

Each expected string below was read off the official dataset classes (chaxjli/U-MARVEL ``2f8afed``,
``dataset/datasets_{circo,genecis,flickr,coco,sharegpt4v,urban1k,visdial,vist,ccneg,sugar_crepe,msvd,msrvtt}.py``)
applied to the first item of each side of the generated fixture: the user turn of the chat, as rendered by the
real encode path (reader -> ``item_record`` -> loader -> ``EmbeddingTokenizer`` with the set's prompt style).
The table in docs/zeroshot_data.md gives the same strings as templates.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from umarvel.data.collate import EmbeddingTokenizer
from umarvel.data.images import ImageBudget
from umarvel.data.processor import BUNDLED_PROCESSOR_DIR, load_tokenizer
from umarvel.eval.zeroshot import instructions as ins
from umarvel.eval.zeroshot.fixtures import write_zeroshot_fixture
from umarvel.eval.zeroshot.readers import SET_NAMES, read_set
from umarvel.eval.zeroshot.runner import VIDEO_SPECS, item_record, make_loader, set_style
from umarvel.eval.zeroshot.types import BidirectionalSet, GallerySet, PairSet, RetrievalSet

IMG = "<|vision_start|><|image_pad|><|vision_end|>"
VID = "<|vision_start|><|video_pad|><|vision_end|>"
IS, IE = "<instruction_start>", "<instruction_end>"
SENTENCE = "\nSummarize above sentence in one word: "
IMAGE = "\nSummarize above image in one word: "

SIDES = {RetrievalSet: ("queries", "candidates"), GallerySet: ("queries", "candidates"),
         BidirectionalSet: ("texts", "images"), PairSet: ("images", "positives", "negatives")}


def _genecis(instruction: str, condition: str) -> dict:
    return {"queries": f"{IMG}{IS}{instruction}{IE} {condition}", "candidates": IMG}


def _sugarcrepe(subset: str, instructed: bool) -> dict:
    return {"images": IMG + (f"{IS}{ins.IMAGE_TO_CAPTION}{IE}" if instructed else ""),
            "positives": f"{subset} true 1", "negatives": f"{subset} false 1"}


_VIST_HEAD = ins.VIST + "s1 sentence 0" + IMG + "s1 sentence 1" + IMG + "s1 sentence 2" + IMG
_URBAN_IMAGE = f"{IS}{ins.IMAGE_TO_CAPTION_EVERYDAY}{IE}"

#: set -> {side: user turn} in both modes, and the sides whose official string differs ({side: official}).
EXPECTED: dict[str, tuple[dict, dict]] = {
    # datasets_circo.py: f"{instruction} {relative_caption}", caption raw; gallery image only (prompt2 = "")
    "circo": ({"queries": f"{IMG}{IS}{ins.CIRCO}{IE} has a dog", "candidates": IMG}, {}),
    "circo_test": ({"queries": f"{IMG}{IS}{ins.CIRCO}{IE} is red", "candidates": IMG}, {}),
    # datasets_genecis.py: f"{instruction} {format_string(condition)}"; focus_object uses the "change" one
    "genecis_change_attribute": (_genecis(ins.GENECIS_CHANGE, "Red."), {}),
    "genecis_change_object": (_genecis(ins.GENECIS_CHANGE, "Dog."), {}),
    "genecis_focus_attribute": (_genecis(ins.GENECIS_FOCUS_ATTRIBUTE, "Red."), {}),
    "genecis_focus_object": (_genecis(ins.GENECIS_CHANGE, "Dog."), {}),
    # datasets_flickr.py: instruction + format_string(text), no space, prompt1; images: the image-only prompt1
    "flickr30k": ({"texts": f"{IS}{ins.CAPTION_TO_IMAGE}{IE}A photo number 0 caption 0.{SENTENCE}",
                   "images": IMG + IMAGE}, {}),
    # datasets_coco.py: raw caption, image only
    "mscoco5k": ({"texts": "coco image 0 says 0", "images": IMG}, {}),
    # datasets_sharegpt4v.py: instruction + raw caption, no space
    "sharegpt4v": ({"texts": f"{IS}{ins.CAPTION_TO_IMAGE}{IE}A long detailed caption 0.", "images": IMG}, {}),
    # datasets_urban1k.py: caption = first line stripped; images get {text} (a Python set) -> "{'...'}"
    "urban1k": ({"texts": "Urban scene 1.", "images": IMG + _URBAN_IMAGE},
                {"images": IMG + "{'" + _URBAN_IMAGE + "'}"}),
    # datasets_visdial.py: f"{instruction} {text}", text = " ".join("Q: " + q + "?", "A: " + a + ".", ...)
    "visdial": ({"queries": f"{IS}{ins.DIALOG_TO_IMAGE}{IE} Q: is it sunny? A: yes. Q: how many people? A: 2.",
                 "candidates": IMG}, {}),
    # datasets_vist.py: plain instruction, then caption/image pairs, the last caption, all raw; the official
    # double slicing drops the 4th pair
    "vist": ({"queries": _VIST_HEAD + "s1 sentence 3" + IMG + "s1 sentence 4", "candidates": IMG},
             {"queries": _VIST_HEAD + "s1 sentence 4"}),
    # datasets_ccneg.py: raw caption / negative prompt with its commas removed
    "ccneg": ({"images": IMG, "positives": "a dog on grass 0", "negatives": "a dog but not on grass 0"}, {}),
    # datasets_sugar_crepe.py: the instruction alone on the images of add_* / replace_att / replace_obj
    **{f"sugarcrepe_{s}": (_sugarcrepe(s, s in ins.SUGARCREPE_WITH_INSTRUCTION), {})
       for s in ("add_att", "add_obj", "replace_att", "replace_obj", "replace_rel", "swap_att", "swap_obj")},
    # datasets_msvd.py / datasets_msrvtt.py: instruction + raw caption, no space; video only
    "msvd": ({"queries": f"{IS}{ins.CAPTION_TO_VIDEO}{IE}a man runs", "candidates": VID}, {}),
    "msrvtt": ({"queries": f"{IS}{ins.CAPTION_TO_VIDEO}{IE}a woman is cooking", "candidates": VID}, {}),
}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return write_zeroshot_fixture(tmp_path_factory.mktemp("zs_prompts"))


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(BUNDLED_PROCESSOR_DIR)


def _user_turns(name: str, root: Path, tokenizer, compat: str) -> dict[str, str]:
    """The rendered user turn of the first item of every side of one set."""
    zs = read_set(name, root, compat)
    tok = EmbeddingTokenizer(tokenizer, set_style(zs))
    spec = VIDEO_SPECS[zs.video_spec] if zs.video_spec else None
    out = {}
    for side in SIDES[type(zs)]:
        rec = item_record(getattr(zs, side)[0], compat)
        rendered = tok.render(make_loader(rec, ImageBudget(), spec, f"{name} {side}")())
        out[side] = rendered.split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]
    return out


def test_every_set_is_pinned():
    assert set(EXPECTED) == set(SET_NAMES) | {"circo_test"}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_prompts_exactly_as_the_official_scripts(name, root, tokenizer):
    default, official_changes = EXPECTED[name]
    assert _user_turns(name, root, tokenizer, "default") == default
    assert _user_turns(name, root, tokenizer, "official") == {**default, **official_changes}


def test_whole_chat_of_one_item(root, tokenizer):
    """The rest of the chat is the eval collator's: default system turn, ``<emb>.`` and the generation prompt."""
    zs = read_set("flickr30k", root)
    rec = item_record(zs.images[0])
    rendered = EmbeddingTokenizer(tokenizer, set_style(zs)).render(make_loader(rec, ImageBudget(), None, "x")())
    assert rendered == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n" + IMG + IMAGE
                        + "<|im_end|>\n<|im_start|>assistant\n<emb>.<|im_end|>\n<|im_start|>assistant\n")
