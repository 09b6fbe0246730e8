"""The bundled processor files of each backbone (umarvel/data/assets/*/PROVENANCE.md): contents, shared BPE,
token ids, chat templates and image-processor geometry, all offline."""
from __future__ import annotations

import hashlib
import json

import pytest

from umarvel.data.formatting import INFERENCE_STYLE, build_messages
from umarvel.data.processor import BUNDLED_PROCESSOR_DIRS, SHARED_BPE_DIR, load_image_processor, load_tokenizer
from umarvel.errors import CheckpointError

SHA256 = {  # the tables of the PROVENANCE.md files
    "qwen2_5_vl": {"preprocessor_config.json": "da11d0981bfc3d97ea8fb502cea8a19c5492b31c21dd220abe8623413296755f",
                   "chat_template.json": "ab7d6e9401da9a1ac734a8352ac430a2f1fb4f9b99fa8fd1a99661203041caf9",
                   "tokenizer_config.json": "d674fceee140287c18a51c12adbf17dde8f3648dc3a7dd131a4ee5fdd2241644"},
    "qwen3_vl": {"preprocessor_config.json": "5102cc0567b75a34738c5af8e547c00b1faca4ca63c60b1b79acd0423af0ef43",
                 "chat_template.json": "12c3fc2a124c9fb855a52915bc3c9a11999b69a65591fadf8b79ac5efdc698dd",
                 "tokenizer_config.json": "1a0aa047bc1029b228eccf64b9b271686a08837777f5f9a3ccf41914b07db68a"},
}
SPECIAL = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652,
           "<|vision_end|>": 151653, "<|image_pad|>": 151655, "<|video_pad|>": 151656}


@pytest.mark.parametrize("backbone", sorted(SHA256))
def test_files_match_their_provenance_and_do_not_duplicate_the_bpe(backbone):
    folder = BUNDLED_PROCESSOR_DIRS[backbone]
    for name, digest in SHA256[backbone].items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, name
    assert (folder / "PROVENANCE.md").is_file()
    assert not (folder / "vocab.json").exists() and not (folder / "merges.txt").exists()
    assert (folder / "tokenizer_config.json").is_file() and (folder / "preprocessor_config.json").is_file()


@pytest.mark.parametrize("backbone,size,extra,patch,mean", [
    ("qwen2_vl", 151657, {}, 14, 0.48145466),
    ("qwen2_5_vl", 151665, {"<tool_call>": 151657, "<|file_sep|>": 151664}, 14, 0.48145466),
    ("qwen3_vl", 151669, {"<tool_call>": 151657, "<think>": 151667, "</think>": 151668}, 16, 0.5)])
def test_tokenizer_and_image_processor_of_each_backbone(backbone, size, extra, patch, mean):
    folder = BUNDLED_PROCESSOR_DIRS[backbone]
    tok = load_tokenizer(folder, add_umarvel_tokens=False)
    assert len(tok) == size
    for token, i in {**SPECIAL, **extra}.items():
        assert tok.convert_tokens_to_ids(token) == i and tok(token, add_special_tokens=False)["input_ids"] == [i]
    assert tok("Hello, world!")["input_ids"] == [9707, 11, 1879, 0] and tok("你好")["input_ids"] == [108386]
    ip = load_image_processor(folder, 3136, 235200)
    assert (ip.patch_size, ip.merge_size, ip.temporal_patch_size, ip.image_mean[0]) == (patch, 2, 2, pytest.approx(mean))
    rendered = tok.apply_chat_template(build_messages("Hi.", True, INFERENCE_STYLE), tokenize=False,
                                       add_generation_prompt=True)
    user = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi.\nSummarize above image and sentence"
    system = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    assert rendered.startswith(user if backbone == "qwen3_vl" else system + user)  # D17


def test_qwen25_ships_the_qwen2vl_chat_template_and_qwen3_none_with_a_system_prompt():
    def template(b):
        return json.loads((BUNDLED_PROCESSOR_DIRS[b] / "chat_template.json").read_text())["chat_template"]

    assert template("qwen2_5_vl") == template("qwen2_vl")
    assert "You are a helpful assistant" not in template("qwen3_vl")
    cfg = json.loads((BUNDLED_PROCESSOR_DIRS["qwen3_vl"] / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == template("qwen3_vl")


def test_non_bundled_folders(tmp_path):
    # only the package's own folders borrow the shared BPE files
    (tmp_path / "tokenizer_config.json").write_text((BUNDLED_PROCESSOR_DIRS["qwen3_vl"] / "tokenizer_config.json").read_text())
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        load_tokenizer(tmp_path)
    assert (SHARED_BPE_DIR / "vocab.json").is_file()
