"""Backbone registry keyed by ``config.model_type``: Qwen2-VL, Qwen2.5-VL, Qwen3-VL.

Everything backbone-specific sits behind :class:`BackboneSpec`, so the embedder and the reranker have no
per-backbone branches: the model class, where the language model / vision tower / token embeddings live,
the attention modules made bidirectional, the LoRA targets, the vision features and what the language model
receives besides the embeddings (:meth:`BackboneSpec.embed_inputs`), the mask format the language model takes
(:meth:`BackboneSpec.lm_attention_mask`), the bundled processor files and the video token layout.

- ``qwen2_vl``: the released U-MARVEL backbone.
- ``qwen2_5_vl``: same interface; its windowed vision attention lives inside the vision tower
  (``get_image_features``), so nothing changes on our side.
- ``qwen3_vl``: DeepStack. The vision tower also returns features of some of its layers; the stock forward
  adds the k-th of them to the hidden states after language layer k, at the visual positions. We hand the
  stock language model exactly the ``visual_pos_masks`` / ``deepstack_visual_embeds`` the stock
  ``Qwen3VLModel.forward`` builds (:meth:`Qwen3VLSpec.deepstack_inject`), and it does the additions itself.
  Its text model takes no per-layer-type mask dict, and videos use a per-frame ``<t seconds>`` layout.
"""
from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import torch
from torch import nn

from umarvel.data.processor import BUNDLED_PROCESSOR_DIRS
from umarvel.data.visual import PatchSpec
from umarvel.errors import CheckpointError


class VisualFeatures(NamedTuple):
    """Vision-tower output of all images (or all videos) of a batch.

    Attributes:
        embeds: (N, D) merged features, one row per visual placeholder token, in batch order.
        deepstack: per DeepStack layer, an (N, D) tensor (Qwen3-VL), else ``None``.
    """

    embeds: torch.Tensor
    deepstack: list[torch.Tensor] | None = None


def vision_frozen(visual: nn.Module) -> bool:
    """Whether no parameter of the vision tower is trainable."""
    return not any(p.requires_grad for p in visual.parameters())


def _cat(feats) -> torch.Tensor:
    """Per-visual tuples (transformers >= 5) or one tensor -> one (N, D) tensor."""
    return torch.cat(list(feats), dim=0) if isinstance(feats, (tuple, list)) else feats


@dataclass(frozen=True)
class BackboneSpec:
    """How umarvel drives one family of vision-language backbones.

    Attributes:
        model_type: ``config.model_type`` of the checkpoint (e.g. ``"qwen2_vl"``).
        model_class: callable returning the transformers class to load (imported lazily).
        lora_target_regex: peft ``target_modules`` regex matching every linear layer of the
            language model (not the vision tower, merger or DeepStack mergers, not ``lm_head``).
        name: human-readable family name.
        video_timestamps: videos take one ``<t seconds>`` block per temporal patch (Qwen3-VL).
    """

    model_type: str
    model_class: Callable[[], type]
    lora_target_regex: str
    name: str = ""
    video_timestamps: bool = False

    # -- files --------------------------------------------------------------------------------
    @property
    def processor_dir(self) -> Path:
        """The bundled tokenizer / image-processor folder of this family (``umarvel/data/assets``)."""
        return BUNDLED_PROCESSOR_DIRS[self.model_type]

    def patch_spec(self, image_processor) -> PatchSpec:
        """Patch geometry (from the image processor) and this family's video token layout."""
        return PatchSpec.from_processor(image_processor, video_timestamps=self.video_timestamps)

    def check_processor(self, model: nn.Module, image_processor, where: str = "") -> None:
        """The image processor must cut the patches the vision tower expects.

        Raises:
            CheckpointError: naming ``where`` and both patch geometries.
        """
        vc = model.config.vision_config
        ours = (int(image_processor.patch_size), int(image_processor.merge_size), int(image_processor.temporal_patch_size))
        theirs = (int(vc.patch_size), int(vc.spatial_merge_size), int(vc.temporal_patch_size))
        if ours != theirs:
            label = f"{where}: " if where else ""
            raise CheckpointError(f"{label}the image processor's (patch, merge, temporal patch) {ours} do not match the "
                                  f"{self.name or self.model_type} vision tower's {theirs}; use the checkpoint's own "
                                  "preprocessor_config.json")

    # -- module accessors (transformers 5.x layout: model.model.{language_model,visual}) --
    def inner(self, model: nn.Module) -> nn.Module:
        """The multimodal base model (``Qwen2VLModel``...) of a ``...ForConditionalGeneration``."""
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

    # -- vision -------------------------------------------------------------------------------
    def vision_features(self, model: nn.Module, pixel_values: torch.Tensor, grid_thw: torch.Tensor,
                        kind: str = "image") -> VisualFeatures:
        """Vision tower + merger output for all images (``kind="image"``) or videos of a batch, one tower call.

        The tower is called directly (``get_image_features`` would split the output per image with a host
        sync, only for us to concatenate it again); images and videos go through the same tower. A frozen
        tower runs without autograd (its activations would otherwise be kept for a backward pass that never
        reaches a trainable weight).

        Args:
            pixel_values: (sum t*h*w, C*T*P*P) patches. grid_thw: (n, 3).
        Returns:
            :class:`VisualFeatures` with (sum t*h*w / merge**2, D) embeddings.
        """
        visual = self.visual(model)
        ctx = torch.no_grad() if vision_frozen(visual) else contextlib.nullcontext()
        with ctx:
            out = visual(pixel_values.to(next(visual.parameters()).dtype), grid_thw=grid_thw)
        return VisualFeatures(_cat(getattr(out, "pooler_output", out)), self._deepstack_of(out))

    def _deepstack_of(self, out) -> list[torch.Tensor] | None:
        return None

    def embed_inputs(self, model: nn.Module, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                     image_grid_thw: torch.Tensor | None = None, pixel_values_videos: torch.Tensor | None = None,
                     video_grid_thw: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        """Input embeddings with the visual features in the placeholders, and the language model's extra inputs.

        Vision features are computed once for all images (videos) of the batch and scattered into the
        ``<|image_pad|>`` (``<|video_pad|>``) positions, as the stock forward does.

        Args:
            input_ids: (B, L). pixel_values / pixel_values_videos: patches; *_grid_thw: (n, 3).
        Returns:
            ``(inputs_embeds (B, L, D), kwargs)``: kwargs go to the language model's forward
            (:meth:`deepstack_inject`; empty for Qwen2-VL / Qwen2.5-VL).
        Raises:
            ValueError: placeholder tokens and visual features do not pair up.
        """
        cfg = model.config
        embeds = self.inner(model).get_input_embeddings()(input_ids)
        found: dict[str, tuple[torch.Tensor, VisualFeatures]] = {}
        for kind, pix, grid, token_id in (("image", pixel_values, image_grid_thw, cfg.image_token_id),
                                          ("video", pixel_values_videos, video_grid_thw, cfg.video_token_id)):
            if pix is None:
                continue
            feats = self.vision_features(model, pix, grid, kind)
            slots = input_ids == token_id
            # checked where it costs no device sync (CPU tensors)
            if input_ids.device.type == "cpu" and int(slots.sum()) != feats.embeds.shape[0]:
                raise ValueError(f"{int(slots.sum())} {kind} placeholder tokens but {feats.embeds.shape[0]} "
                                 f"{kind} features")
            embeds = embeds.masked_scatter(slots.unsqueeze(-1).expand_as(embeds), feats.embeds.to(embeds.dtype))
            found[kind] = (slots, feats)
        return embeds, self.deepstack_inject(found)

    def deepstack_inject(self, found: dict[str, tuple[torch.Tensor, VisualFeatures]]) -> dict[str, Any]:
        """Extra language-model inputs built from the visual features (none for this family).

        Args:
            found: ``{"image" | "video": ((B, L) placeholder mask, VisualFeatures)}`` of the batch.
        """
        return {}

    # -- language model -----------------------------------------------------------------------
    def lm_attention_mask(self, lm: nn.Module, mask: torch.Tensor | None, embeds: torch.Tensor,
                          packed: bool = False) -> Any:
        """The ``attention_mask`` argument of the language model for a prepared additive mask.

        Args:
            mask: (B, 1, 1|L, L) additive mask, or ``None`` (no padding, bidirectional: the attention
                modules' ``is_causal=False`` decides).
            embeds: (B, L, D) input embeddings (batch shape, dtype and device of a mask to build).
            packed: a packed row (``mask`` is ``None``): the packed attention function takes no mask, the
                sequence boundaries travel as ``cu_seq_lens_*`` (``umarvel.model.attention``).
        Returns:
            one mask per layer type (the Qwen2-VL / Qwen2.5-VL text models take a ``{layer_type: mask}`` dict,
            which bypasses their causal-mask construction).
        """
        layer_types = set(getattr(lm.config, "layer_types", None) or ["full_attention"])
        return {t: mask for t in layer_types}

    def lm_position_ids(self, position_ids: torch.Tensor) -> torch.Tensor:
        """Position ids as the language model takes them: (B, L) 1-D or (3, B, L) M-RoPE, unchanged here."""
        return position_ids


def _transformers_class(name: str) -> type:
    """``transformers.<name>``, imported when first needed (a spec's ``model_class`` is a partial of this)."""
    return getattr(importlib.import_module("transformers"), name)


@dataclass(frozen=True)
class Qwen3VLSpec(BackboneSpec):
    """Qwen3-VL: DeepStack features, a text model without per-layer-type masks, timestamped videos."""

    def _deepstack_of(self, out) -> list[torch.Tensor] | None:
        return [_cat(f) for f in (getattr(out, "deepstack_features", None) or [])]

    def deepstack_inject(self, found: dict[str, tuple[torch.Tensor, VisualFeatures]]) -> dict[str, Any]:
        """``visual_pos_masks`` (B, L) and ``deepstack_visual_embeds`` (per layer, (n_visual, D)), built as
        ``Qwen3VLModel.forward`` builds them: with images and videos together, each layer's rows follow the
        joint visual positions in sequence order."""
        if not found:
            return {}
        if len(found) == 1:
            mask, feats = next(iter(found.values()))
            return {"visual_pos_masks": mask, "deepstack_visual_embeds": list(feats.deepstack)}
        (img_mask, img), (vid_mask, vid) = found["image"], found["video"]
        joint = img_mask | vid_mask
        img_rows, vid_rows = img_mask[joint], vid_mask[joint]
        layers = []
        for i_emb, v_emb in zip(img.deepstack, vid.deepstack):
            emb = i_emb.new_zeros(int(joint.sum()), i_emb.shape[-1])
            emb[img_rows, :] = i_emb
            emb[vid_rows, :] = v_emb
            layers.append(emb)
        return {"visual_pos_masks": joint, "deepstack_visual_embeds": layers}

    def lm_attention_mask(self, lm: nn.Module, mask: torch.Tensor | None, embeds: torch.Tensor,
                          packed: bool = False) -> Any:
        """``Qwen3VLTextModel`` takes one mask and builds a causal one from anything but a 4-D mask, so the
        unpadded case gets an all-zero (B, 1, 1, L) additive mask, except under flash attention (which reads
        ``is_causal=False`` from the modules).

        A packed row gets ``None``: with 3-row positions (:meth:`lm_position_ids`: no text-position row, so no
        packed-sequence detection) and no padding, transformers' mask construction for the packed attention
        (SDPA's mask format) returns ``None`` too, and the packed attention function keeps every sequence to
        itself, bidirectionally as the modules' ``is_causal=False`` says (it refuses any mask it is given).
        """
        if packed:
            return None
        if mask is not None or "flash" in str(getattr(lm.config, "_attn_implementation", "")):
            return mask
        b, length = embeds.shape[:2]
        return torch.zeros(b, 1, 1, length, dtype=embeds.dtype, device=embeds.device)

    def lm_position_ids(self, position_ids: torch.Tensor) -> torch.Tensor:
        """1-D (B, L) positions as (3, B, L): the same rotary angles, and no text-position row that the text
        model would treat as packing information."""
        return position_ids.unsqueeze(0).expand(3, -1, -1) if position_ids.ndim == 2 else position_ids


_LLM_LINEARS = r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
_LM_LORA = rf".*language_model.*\.{_LLM_LINEARS}"

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


register_backbone(BackboneSpec("qwen2_vl", partial(_transformers_class, "Qwen2VLForConditionalGeneration"),
                               _LM_LORA, name="Qwen2-VL"))
register_backbone(BackboneSpec("qwen2_5_vl", partial(_transformers_class, "Qwen2_5_VLForConditionalGeneration"),
                               _LM_LORA, name="Qwen2.5-VL"))
register_backbone(Qwen3VLSpec("qwen3_vl", partial(_transformers_class, "Qwen3VLForConditionalGeneration"),
                              _LM_LORA, name="Qwen3-VL", video_timestamps=True))
