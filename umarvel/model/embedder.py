"""The U-MARVEL embedding module: a bidirectional Qwen2-VL (or Qwen2.5-VL / Qwen3-VL), mean pooling, L2 normalisation.

Conventions (method spec section 1, decisions D5/D6; golden README "Parity conditions"):
- attention is always bidirectional (also for a batch of one and batches without padding): the
  language model's attention modules get ``is_causal=False`` (read by transformers' sdpa / flash
  paths) and, when the batch has padding, an explicit additive mask hides pad keys;
- positions are plain 1-D (0.. over each row's real tokens) in all three M-RoPE sections, as the
  released checkpoint was trained (``positions="mrope"`` is offered for ablations);
- the embedding is the mean of the final-norm hidden states over ``pool_mask`` (non-pad tokens minus
  the instruction span, markers included), from the language model only: vocabulary logits are
  never computed.
"""
from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from umarvel.model.backbones import BackboneSpec
from umarvel.model.constants import DEFAULT_TEMPERATURE
from umarvel.model.positions import position_ids

logger = logging.getLogger(__name__)


def mean_pool(hidden: torch.Tensor, pool_mask: torch.Tensor) -> torch.Tensor:
    """Masked mean over the sequence, computed in float32.

    Args:
        hidden: (B, L, D) hidden states.
        pool_mask: (B, L) 1 on pooled positions.
    Returns:
        (B, D) float32 means (denominator clamped at 1e-7, as the official ``_global_mean_pool``).
    """
    m = pool_mask.to(torch.float32).unsqueeze(-1)
    return (hidden.to(torch.float32) * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-7)


def pad_key_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive bidirectional mask hiding pad keys, or ``None`` when nothing is padded.

    Args:
        attention_mask: (B, L) 1 on real tokens.
    Returns:
        (B, 1, 1, L) tensor: 0 on real keys, ``finfo(dtype).min`` on pad keys (broadcast over queries).
    """
    if bool(attention_mask.all()):
        return None
    blocked = attention_mask[:, None, None, :] == 0
    return torch.zeros(blocked.shape, dtype=dtype, device=attention_mask.device).masked_fill(
        blocked, torch.finfo(dtype).min)


class UMarvelEmbedder(nn.Module):
    """Wraps a vision-language backbone into an embedding model (no loss, no distributed logic).

    Args:
        backbone: a transformers ``...ForConditionalGeneration`` (optionally peft-wrapped).
        spec: the backbone family's :class:`BackboneSpec`.
        temperature: initial raw temperature tau (logits = cos / tau); 0.05 by default.
        attention: ``"bidirectional"`` (U-MARVEL) or ``"causal"`` (ablations).
        positions: ``"1d"`` (released checkpoint) or ``"mrope"`` (ablations / new backbones).
    """

    def __init__(self, backbone: nn.Module, spec: BackboneSpec, temperature: float = DEFAULT_TEMPERATURE,
                 attention: Literal["bidirectional", "causal"] = "bidirectional",
                 positions: Literal["1d", "mrope"] = "1d"):
        super().__init__()
        self.backbone = backbone
        self.spec = spec
        # Shape (1,), not a 0-dim scalar: DeepSpeed's parameter broadcast cannot view 0-dim tensors as bytes.
        self.temperature = nn.Parameter(torch.tensor([float(temperature)]), requires_grad=False)
        self.attention = attention
        self.positions = positions
        self.set_attention(attention)

    # -- structure ----------------------------------------------------------------------------
    @property
    def hf_model(self) -> nn.Module:
        """The underlying transformers model (peft wrapper removed; LoRA layers stay injected)."""
        model = self.backbone
        get_base = getattr(model, "get_base_model", None)
        return get_base() if callable(get_base) else model

    @property
    def config(self):
        """The backbone's transformers config."""
        return self.hf_model.config

    def set_attention(self, attention: Literal["bidirectional", "causal"]) -> None:
        """Switch the language model's attention between bidirectional and causal."""
        if attention not in ("bidirectional", "causal"):
            raise ValueError(f"attention must be 'bidirectional' or 'causal', got {attention!r}")
        self.attention = attention
        for module in self.spec.attention_modules(self.hf_model):
            module.is_causal = attention == "causal"

    @property
    def embed_dim(self) -> int:
        """Output dimension D (the language model's hidden size)."""
        cfg = self.config
        return getattr(getattr(cfg, "text_config", cfg), "hidden_size")

    # -- forward ------------------------------------------------------------------------------
    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      pixel_values: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
                      pixel_values_videos: torch.Tensor | None = None,
                      video_grid_thw: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states of the language model, (B, L, D).

        The backbone's :meth:`BackboneSpec.embed_inputs` puts the visual features into the ``<|image_pad|>``
        / ``<|video_pad|>`` positions and returns what else the language model takes (Qwen3-VL: DeepStack).
        """
        model = self.hf_model
        embeds, lm_inputs = self.spec.embed_inputs(model, input_ids, pixel_values, image_grid_thw,
                                                   pixel_values_videos, video_grid_thw)
        lm = self.spec.language_model(model)
        if self.attention == "bidirectional":
            mask = pad_key_mask(attention_mask, embeds.dtype)
        else:
            mask = _causal_mask(attention_mask, embeds.dtype)
        pos = position_ids(self.positions, self.spec, model, input_ids, attention_mask, image_grid_thw, video_grid_thw)
        out = lm(inputs_embeds=embeds, attention_mask=self.spec.lm_attention_mask(lm, mask, embeds),
                 position_ids=self.spec.lm_position_ids(pos), use_cache=False, **lm_inputs)
        return out.last_hidden_state

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pool_mask: torch.Tensor,
                pixel_values: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
                pixel_values_videos: torch.Tensor | None = None, video_grid_thw: torch.Tensor | None = None,
                normalize: bool = True, **_: torch.Tensor) -> torch.Tensor:
        """Embed a collated batch (see ``umarvel.data.collate.EmbeddingCollator``).

        Returns:
            (B, D) float32 embeddings, L2-normalised when ``normalize`` (else the raw means).
        """
        hidden = self.hidden_states(input_ids, attention_mask, pixel_values, image_grid_thw,
                                    pixel_values_videos, video_grid_thw)
        emb = mean_pool(hidden, pool_mask)
        return F.normalize(emb, dim=-1) if normalize else emb


def _causal_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive causal mask with pad keys hidden: (B, 1, L, L)."""
    b, length = attention_mask.shape
    causal = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal[None, None] & (attention_mask[:, None, None, :] != 0)
    return torch.zeros(allowed.shape, dtype=dtype, device=attention_mask.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)
