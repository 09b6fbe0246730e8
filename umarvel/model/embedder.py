"""The U-MARVEL embedding module: a bidirectional Qwen2-VL (or Qwen2.5-VL / Qwen3-VL), mean pooling, L2 normalisation.

Conventions (method spec section 1, decisions D5/D6; golden README "Parity conditions"):
- attention is always bidirectional (also for a batch of one and batches without padding): the
  language model's attention modules get ``is_causal=False`` (read by transformers' sdpa / flash
  paths) and, when the batch has padding, an explicit additive mask hides pad keys. With
  ``causal_when_unpadded`` (``compat="official"``) a batch without padding runs causal instead, as
  the official SDPA early exit made it (D5);
- positions are plain 1-D (0.. over each row's real tokens) in all three M-RoPE sections, as the
  released checkpoint was trained (``positions="mrope"`` is offered for ablations);
- the embedding is the mean of the final-norm hidden states over ``pool_mask`` (non-pad tokens minus
  the instruction span, markers included), from the language model only: vocabulary logits are
  never computed.

Two batch layouts, one module: padded ``(B, L)`` batches (``umarvel.data.collate.EmbeddingCollator``) and
packed ``(1, T)`` rows without padding (``umarvel.data.packing.PackedCollator``: ``cu_seqlens`` marks the
sequences; attention stays inside each, positions restart at 0, pooling is per sequence). Both give the same
vectors (fp32: within 1e-5). A frozen vision tower always runs without autograd.
"""
from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from umarvel.model.attention import install_packed_attention, packed_kwargs, packing_supported, segment_ids
from umarvel.model.backbones import BackboneSpec
from umarvel.model.constants import DEFAULT_TEMPERATURE
from umarvel.model.positions import position_ids as batch_positions

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


def segment_mean_pool(hidden: torch.Tensor, pool_mask: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Per-sequence masked mean over a packed row, computed in float32 (as :func:`mean_pool`).

    Args:
        hidden: (1, T, D) or (T, D) hidden states of a packed row.
        pool_mask: (1, T) or (T,) 1 on pooled positions.
        cu_seqlens: (N+1,) sequence boundaries on the same device.
    Returns:
        (N, D) float32 means (denominator clamped at 1e-7).
    """
    h = hidden.reshape(-1, hidden.shape[-1]).to(torch.float32)
    m = pool_mask.reshape(-1).to(torch.float32)
    seg = segment_ids(cu_seqlens, h.shape[0])
    n = cu_seqlens.shape[0] - 1
    sums = torch.zeros(n, h.shape[1], dtype=torch.float32, device=h.device).index_add_(0, seg, h * m[:, None])
    counts = torch.zeros(n, dtype=torch.float32, device=h.device).index_add_(0, seg, m)
    return sums / counts.clamp(min=1e-7)[:, None]


def packed_max_len(cu_seqlens: torch.Tensor, seq_lens: torch.Tensor | None) -> int:
    """Longest sequence of a packed batch, read from the host-side ``seq_lens`` when given (no device sync)."""
    src = seq_lens if seq_lens is not None else cu_seqlens[1:] - cu_seqlens[:-1]
    return int(src.max())


class UMarvelEmbedder(nn.Module):
    """Wraps a vision-language backbone into an embedding model (no loss, no distributed logic).

    Args:
        backbone: a transformers ``...ForConditionalGeneration`` (optionally peft-wrapped).
        spec: the backbone family's :class:`BackboneSpec`.
        temperature: initial raw temperature tau (logits = cos / tau); 0.05 by default.
        attention: ``"bidirectional"`` (U-MARVEL) or ``"causal"`` (ablations).
        positions: ``"1d"`` (released checkpoint) or ``"mrope"`` (ablations / new backbones).
        causal_when_unpadded: run a batch without any padding causal (the official numerics, D5;
            ``compat="official"``); padded batches stay bidirectional. Needs the padded forward.
    """

    def __init__(self, backbone: nn.Module, spec: BackboneSpec, temperature: float = DEFAULT_TEMPERATURE,
                 attention: Literal["bidirectional", "causal"] = "bidirectional",
                 positions: Literal["1d", "mrope"] = "1d", causal_when_unpadded: bool = False):
        super().__init__()
        self.backbone = backbone
        self.spec = spec
        # Shape (1,), not a 0-dim scalar: DeepSpeed's parameter broadcast cannot view 0-dim tensors as bytes.
        self.temperature = nn.Parameter(torch.tensor([float(temperature)]), requires_grad=False)
        self.attention = attention
        self.positions = positions
        self.causal_when_unpadded = causal_when_unpadded
        self.set_attention(attention)
        self.enable_packing()

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

    def enable_packing(self) -> None:
        """Route attention through the packed-attention function (padded batches are unaffected)."""
        model = self.hf_model
        visual = self.spec.visual(model)
        install_packed_attention(self.spec.language_model(model).config, self.spec.attention_modules(model),
                                 getattr(visual, "config", None), self.spec.vision_attention_modules(model))

    @property
    def supports_packing(self) -> bool:
        """Whether packed batches can be embedded: 1-D positions, a packing-aware attention and not
        ``causal_when_unpadded`` (``compat="official"`` needs the padded forward: whether a batch runs causal
        depends on its padding, D5)."""
        return (self.positions == "1d" and not self.causal_when_unpadded
                and packing_supported(self.spec.language_model(self.hf_model).config))

    @property
    def embed_dim(self) -> int:
        """Output dimension D (the language model's hidden size)."""
        cfg = self.config
        return getattr(getattr(cfg, "text_config", cfg), "hidden_size")

    # -- forward ------------------------------------------------------------------------------
    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      pixel_values: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
                      pixel_values_videos: torch.Tensor | None = None,
                      video_grid_thw: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                      seq_lens: torch.Tensor | None = None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states of the language model: (B, L, D), or (1, T, D) for a packed row.

        The backbone's :meth:`BackboneSpec.embed_inputs` puts the visual features into the ``<|image_pad|>``
        / ``<|video_pad|>`` positions and returns what else the language model takes (Qwen3-VL: DeepStack,
        at the visual positions of the padded batch or of the packed row). A packed row (``cu_seqlens``
        given, see ``umarvel.data.packing``) attends within each sequence only; ``position_ids`` default to
        0.. per sequence. Masks and positions go through the spec's ``lm_attention_mask`` / ``lm_position_ids``.
        """
        model = self.hf_model
        embeds, lm_inputs = self.spec.embed_inputs(model, input_ids, pixel_values, image_grid_thw,
                                                   pixel_values_videos, video_grid_thw)
        lm = self.spec.language_model(model)
        if cu_seqlens is not None:
            if not self.supports_packing:
                raise ValueError(f"packed batches need positions='1d', a packing-aware attention and no "
                                 f"causal_when_unpadded (positions={self.positions!r}, causal_when_unpadded="
                                 f"{self.causal_when_unpadded}, attention implementation "
                                 f"{getattr(lm.config, '_attn_implementation', None)!r}); use padded batches")
            if position_ids is None:
                position_ids = packed_positions(cu_seqlens, input_ids.shape[1])
            out = lm(inputs_embeds=embeds, attention_mask=self.spec.lm_attention_mask(lm, None, embeds, packed=True),
                     position_ids=self.spec.lm_position_ids(position_ids), use_cache=False,
                     **packed_kwargs(cu_seqlens, packed_max_len(cu_seqlens, seq_lens)), **lm_inputs)
            return out.last_hidden_state
        # D5: compat="official" reproduces the SDPA early exit (no padding in the batch -> causal).
        official_causal = self.causal_when_unpadded and bool(attention_mask.all())
        if self.attention == "bidirectional" and not official_causal:
            mask = pad_key_mask(attention_mask, embeds.dtype)
        else:
            mask = _causal_mask(attention_mask, embeds.dtype)
        pos = batch_positions(self.positions, self.spec, model, input_ids, attention_mask, image_grid_thw,
                              video_grid_thw)
        out = lm(inputs_embeds=embeds, attention_mask=self.spec.lm_attention_mask(lm, mask, embeds),
                 position_ids=self.spec.lm_position_ids(pos), use_cache=False, **lm_inputs)
        return out.last_hidden_state

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pool_mask: torch.Tensor,
                pixel_values: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
                pixel_values_videos: torch.Tensor | None = None, video_grid_thw: torch.Tensor | None = None,
                normalize: bool = True, cu_seqlens: torch.Tensor | None = None, seq_lens: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, **_: torch.Tensor) -> torch.Tensor:
        """Embed a collated batch, padded (``umarvel.data.collate.EmbeddingCollator``) or packed
        (``umarvel.data.packing.PackedCollator``).

        Returns:
            (B, D) float32 embeddings (B sequences, in batch order), L2-normalised when ``normalize`` (else
            the raw means).
        """
        hidden = self.hidden_states(input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos,
                                    video_grid_thw, cu_seqlens=cu_seqlens, seq_lens=seq_lens,
                                    position_ids=position_ids)
        if cu_seqlens is not None:
            emb = segment_mean_pool(hidden, pool_mask, cu_seqlens)
        else:
            emb = mean_pool(hidden, pool_mask)
        return F.normalize(emb, dim=-1) if normalize else emb


def packed_positions(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Positions 0..n_i-1 restarting at every sequence of a packed row: (1, T) int64."""
    seg = segment_ids(cu_seqlens, total)
    return (torch.arange(total, device=cu_seqlens.device) - cu_seqlens.long()[seg])[None]


def _causal_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive causal mask with pad keys hidden: (B, 1, L, L)."""
    b, length = attention_mask.shape
    causal = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal[None, None] & (attention_mask[:, None, None, :] != 0)
    return torch.zeros(allowed.shape, dtype=dtype, device=attention_mask.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)
