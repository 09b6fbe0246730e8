"""Backbone registry keyed by ``config.model_type``.

Everything backbone-specific (model class, where the language model / vision tower / token
embeddings live, which attention modules to make bidirectional) sits behind ``BackboneSpec`` so
Qwen2.5-VL / Qwen3-VL can be added by registering one more spec.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from umarvel.errors import CheckpointError


@dataclass(frozen=True)
class BackboneSpec:
    """How umarvel drives one family of vision-language backbones.

    Attributes:
        model_type: ``config.model_type`` of the checkpoint (e.g. ``"qwen2_vl"``).
        model_class: callable returning the transformers class to load (imported lazily).
        lora_target_regex: peft ``target_modules`` regex matching every linear layer of the
            language model (not the vision tower or merger, not ``lm_head``).
    """

    model_type: str
    model_class: Callable[[], type]
    lora_target_regex: str

    # -- module accessors (transformers 5.x layout: model.model.{language_model,visual}) --
    def inner(self, model: nn.Module) -> nn.Module:
        """The multimodal base model (``Qwen2VLModel``) of a ``...ForConditionalGeneration``."""
        return model.model

    def language_model(self, model: nn.Module) -> nn.Module:
        """The decoder stack + final norm."""
        return self.inner(model).language_model

    def visual(self, model: nn.Module) -> nn.Module:
        """The vision tower + merger."""
        return self.inner(model).visual

    def attention_modules(self, model: nn.Module) -> Iterator[nn.Module]:
        """The language model's self-attention modules (the ones made bidirectional)."""
        for layer in self.language_model(model).layers:
            yield layer.self_attn

    def vision_attention_modules(self, model: nn.Module) -> Iterator[nn.Module]:
        """The vision tower's self-attention modules."""
        for block in self.visual(model).blocks:
            yield block.attn

    def image_features(self, model: nn.Module, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Vision tower + merger output for all images of a batch, one tower call: (sum t*h*w/4, hidden).

        The tower is called directly (``get_image_features`` would split the output per image with a host
        sync, only for us to concatenate it again).
        """
        return _merged(self.visual(model)(pixel_values, grid_thw=grid_thw))

    def video_features(self, model: nn.Module, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Vision tower + merger output for all videos of a batch: (sum t*h*w/4, hidden)."""
        return _merged(self.visual(model)(pixel_values, grid_thw=grid_thw))


def _merged(out) -> torch.Tensor:
    """The merger output of a vision-tower call (a tensor, or ``pooler_output`` of a model output)."""
    feats = getattr(out, "pooler_output", out)
    return torch.cat(list(feats), dim=0) if isinstance(feats, (tuple, list)) else feats


def _qwen2_vl_class():
    from transformers import Qwen2VLForConditionalGeneration
    return Qwen2VLForConditionalGeneration


_LLM_LINEARS = r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"

_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> None:
    """Register a backbone family (overwrites an existing entry of the same ``model_type``)."""
    _REGISTRY[spec.model_type] = spec


def get_backbone_spec(model_type: str) -> BackboneSpec:
    """The spec for ``model_type``; a clear error lists the supported types otherwise."""
    try:
        return _REGISTRY[model_type]
    except KeyError:
        raise CheckpointError(
            f"unsupported backbone model_type {model_type!r}; supported: {sorted(_REGISTRY)}") from None


def supported_model_types() -> list[str]:
    """Registered ``model_type`` names."""
    return sorted(_REGISTRY)


register_backbone(BackboneSpec(
    model_type="qwen2_vl",
    model_class=_qwen2_vl_class,
    lora_target_regex=rf".*language_model.*\.{_LLM_LINEARS}",
))
