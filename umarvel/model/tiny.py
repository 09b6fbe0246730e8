"""A seeded tiny random Qwen2-VL for tests, benchmarks and the demo (no download needed).

Hidden 32-64, 2 layers, vocab 151,936 so the real Qwen2-VL token ids fit, real special ids.
"""
from __future__ import annotations

from pathlib import Path

import torch

from umarvel.data.processor import BUNDLED_PROCESSOR_DIR, _image_processor_class


def tiny_qwen2vl_config(hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                        vision_dim: int = 32, vision_depth: int = 2, initializer_range: float = 0.02):
    """A transformers ``Qwen2VLConfig`` of a tiny model (mrope sections sum to head_dim/2)."""
    from transformers import Qwen2VLConfig

    head_dim = hidden // heads
    half = head_dim // 2
    t = half // 4
    mrope = [t, (half - t) // 2, half - t - (half - t) // 2]
    return Qwen2VLConfig(
        text_config=dict(vocab_size=151936, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=32768, initializer_range=initializer_range,
                         rope_parameters={"rope_type": "default", "mrope_section": mrope, "rope_theta": 1e6},
                         bos_token_id=151643, eos_token_id=151645, pad_token_id=151643),
        vision_config=dict(depth=vision_depth, embed_dim=vision_dim, hidden_size=hidden, num_heads=2, mlp_ratio=2,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                           initializer_range=initializer_range),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
        tie_word_embeddings=True, initializer_range=initializer_range)


def build_tiny_qwen2vl(seed: int = 0, dtype: torch.dtype = torch.float32, **config_kwargs):
    """A randomly initialised tiny ``Qwen2VLForConditionalGeneration`` (deterministic for ``seed``)."""
    from transformers import Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(tiny_qwen2vl_config(**config_kwargs))
    return model.to(dtype).eval()


def save_tiny_checkpoint(path: str | Path, seed: int = 0, **config_kwargs) -> Path:
    """Write a tiny random checkpoint folder (weights + the bundled Qwen2-VL tokenizer/processor),
    laid out like a released checkpoint: the U-MARVEL tokens are added at load time."""
    from transformers import AutoTokenizer

    path = Path(path)
    model = build_tiny_qwen2vl(seed=seed, **config_kwargs)
    model.save_pretrained(str(path))
    AutoTokenizer.from_pretrained(str(BUNDLED_PROCESSOR_DIR)).save_pretrained(str(path))
    _image_processor_class().from_pretrained(str(BUNDLED_PROCESSOR_DIR)).save_pretrained(str(path))
    return path
