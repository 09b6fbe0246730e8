"""Position ids of the language model, for the embedder and the reranker alike.

- ``"1d"``: 0.. over each row's real tokens, the same in all three M-RoPE sections (the released U-MARVEL
  checkpoint and the reranker were trained so); pads get 0.
- ``"mrope"``: the backbone's ``get_rope_index`` (3-D positions of the visual tokens), what transformers'
  ``generate`` uses at its first step.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from umarvel.model.backbones import BackboneSpec

Positions = Literal["1d", "mrope"]
POSITIONS: tuple[str, ...] = ("1d", "mrope")


def rowwise_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """1-D positions 0..n-1 over each row's real tokens (pads get 0). (B, L) int64."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def mrope_positions(spec: BackboneSpec, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    image_grid_thw: torch.Tensor | None = None,
                    video_grid_thw: torch.Tensor | None = None) -> torch.Tensor:
    """M-RoPE positions (3, B, L) from the backbone's ``get_rope_index``.

    Args:
        model: the transformers ``...ForConditionalGeneration`` (peft wrapper removed).
        input_ids / attention_mask: (B, L). image_grid_thw / video_grid_thw: (n, 3) patch grids or None.
    """
    cfg = model.config
    mm_types = torch.zeros_like(input_ids, dtype=torch.int)
    mm_types[input_ids == cfg.image_token_id] = 1
    mm_types[input_ids == cfg.video_token_id] = 2
    pos, _ = spec.inner(model).get_rope_index(input_ids, mm_types, image_grid_thw=image_grid_thw,
                                              video_grid_thw=video_grid_thw, attention_mask=attention_mask)
    return pos


def position_ids(positions: str, spec: BackboneSpec, model: nn.Module, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor, image_grid_thw: torch.Tensor | None = None,
                 video_grid_thw: torch.Tensor | None = None) -> torch.Tensor:
    """Position ids of a batch: (B, L) for ``"1d"``, (3, B, L) for ``"mrope"``.

    Raises:
        ValueError: an unknown ``positions``.
    """
    if positions == "1d":
        return rowwise_positions(attention_mask)
    if positions == "mrope":
        return mrope_positions(spec, model, input_ids, attention_mask, image_grid_thw, video_grid_thw)
    raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
