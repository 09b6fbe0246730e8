"""Seeded tiny random backbones for tests, benchmarks and the demo (no download needed).

Qwen2-VL (default), Qwen2.5-VL and Qwen3-VL: hidden 32-64, 2 layers, vocab 151,936 so the real token ids fit,
the real special ids, a tiny vision tower of the family's kind (Qwen2.5-VL: one windowed and one full-attention
block, window 56 px so that small images already span several windows; Qwen3-VL: patch 16 with a DeepStack
feature after each of its 2 vision blocks, fed to language layers 0 and 1).
"""
from __future__ import annotations

from pathlib import Path

import torch

from umarvel.data.processor import _image_processor_class, load_tokenizer
from umarvel.model.backbones import get_backbone_spec
from umarvel.model.constants import BACKBONES


def _mrope_sections(head_dim: int, interleaved: bool = False) -> list[int]:
    """M-RoPE sections (t, h, w) summing to ``head_dim / 2``."""
    half = head_dim // 2
    if interleaved:  # Qwen3-VL: h and w frequencies interleaved with t (24/20/20 of 64 in the 8B)
        hw = half // 4
        return [half - 2 * hw, hw, hw]
    t = half // 4
    return [t, (half - t) // 2, half - t - (half - t) // 2]


def _text_config(hidden: int, layers: int, heads: int, kv_heads: int, initializer_range: float,
                 intermediate: int | None = None) -> dict:
    return dict(vocab_size=151936, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=32768,
                initializer_range=initializer_range, bos_token_id=151643, eos_token_id=151645, pad_token_id=151643)


_SPECIAL_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                    vision_end_token_id=151653)


def tiny_config(backbone: str = "qwen2_vl", hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                vision_dim: int = 32, vision_depth: int = 2, initializer_range: float = 0.02,
                intermediate: int | None = None, vision_heads: int = 2, vision_mlp_ratio: int = 2):
    """A transformers config of a tiny model of ``backbone`` (a ``model_type`` of :data:`BACKBONES`).

    ``intermediate`` (default ``2 * hidden``), ``vision_heads`` and ``vision_mlp_ratio`` allow wider shapes
    (e.g. the 7B widths with few layers, for GPU checks)."""
    head_dim = hidden // heads
    text = _text_config(hidden, layers, heads, kv_heads, initializer_range, intermediate)
    if backbone == "qwen2_vl":
        from transformers import Qwen2VLConfig

        text["rope_parameters"] = {"rope_type": "default", "mrope_section": _mrope_sections(head_dim), "rope_theta": 1e6}
        vision = dict(depth=vision_depth, embed_dim=vision_dim, hidden_size=hidden, num_heads=vision_heads,
                      mlp_ratio=vision_mlp_ratio,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                      initializer_range=initializer_range)
        return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True,
                             initializer_range=initializer_range, **_SPECIAL_IDS)
    if backbone == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig

        text["rope_parameters"] = {"rope_type": "default", "mrope_section": _mrope_sections(head_dim), "rope_theta": 1e6}
        vision = dict(depth=vision_depth, hidden_size=vision_dim, intermediate_size=vision_mlp_ratio * vision_dim,
                      num_heads=vision_heads,
                      out_hidden_size=hidden, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                      in_channels=3, tokens_per_second=2, window_size=56,
                      fullatt_block_indexes=[vision_depth - 1], initializer_range=initializer_range)
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True,
                                initializer_range=initializer_range, **_SPECIAL_IDS)
    if backbone == "qwen3_vl":
        from transformers import Qwen3VLConfig

        text.update(head_dim=head_dim, rope_parameters={"rope_type": "default", "mrope_interleaved": True,
                                                        "mrope_section": _mrope_sections(head_dim, True),
                                                        "rope_theta": 5e6})
        vision = dict(depth=vision_depth, hidden_size=vision_dim, intermediate_size=vision_mlp_ratio * vision_dim,
                      num_heads=vision_heads,
                      out_hidden_size=hidden, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                      in_channels=3, num_position_embeddings=64,
                      deepstack_visual_indexes=list(range(min(vision_depth, layers))),
                      initializer_range=initializer_range)
        return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **_SPECIAL_IDS)
    raise ValueError(f"no tiny config for backbone {backbone!r}; known: {BACKBONES}")


def build_tiny(backbone: str = "qwen2_vl", seed: int = 0, dtype: torch.dtype = torch.float32, **config_kwargs):
    """A randomly initialised tiny ``...ForConditionalGeneration`` of ``backbone`` (deterministic for ``seed``)."""
    cls = get_backbone_spec(backbone).model_class()
    torch.manual_seed(seed)
    model = cls(tiny_config(backbone, **config_kwargs))
    return model.to(dtype).eval()


def save_tiny_checkpoint(path: str | Path, seed: int = 0, backbone: str = "qwen2_vl", **config_kwargs) -> Path:
    """Write a tiny random checkpoint folder (weights + the backbone's bundled tokenizer/processor files),
    laid out like a released checkpoint: the U-MARVEL tokens are added at load time."""
    path = Path(path)
    files = get_backbone_spec(backbone).processor_dir
    model = build_tiny(backbone, seed=seed, **config_kwargs)
    model.save_pretrained(str(path))
    load_tokenizer(files, add_umarvel_tokens=False).save_pretrained(str(path))
    _image_processor_class().from_pretrained(str(files)).save_pretrained(str(path))
    return path
