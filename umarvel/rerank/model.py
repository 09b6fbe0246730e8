"""The point-wise reranker: a stock causal Qwen2-VL answering ``Yes`` / ``No`` (method spec section 4).

- Model: stock ``Qwen2VLForConditionalGeneration`` (or Qwen2.5-VL / Qwen3-VL, whichever ``config.json``
  names; its own forward, DeepStack included) with causal attention and NO added tokens
  (tokenizer loaded with ``add_umarvel_tokens=False``); LoRA (``task_type=CAUSAL_LM``) on every
  language-model linear, vision tower and merger frozen.
- Training loss: the HF causal-LM loss (shift by one, mean CE over labels != -100), but vocabulary
  logits are computed only at the supervised positions (6 per row), never for the whole sequence.
- Scoring (D10): ONE forward pass; ``P(yes) = softmax([logit_Yes, logit_No])[0]`` at the last
  position (left padding), ``lm_head`` applied to that position only.
- Positions: ``"1d"`` (default) = 0.. over each row's real tokens in all three M-RoPE sections, the
  convention the reranker is trained with (the official plain forward used 0..L-1 over the padded
  length; for the real tokens of a left-padded row this differs only by a shift, and the golden
  fixture shows the two agree to 2.4e-7). ``"mrope"`` = ``get_rope_index`` positions, which is what
  the official ``generate``-based scorer used: it equals generate's first step. The two differ by
  up to 0.12 in P(yes) on rows with images.
- Any ``repetition_penalty`` of a checkpoint's ``generation_config`` is NOT applied (one forward, no
  logits processors); the official generate-based scores include it (``Yes``/``No`` occur in the prompt).
- Packed batches (``umarvel.data.packing.pack_padded``: one row, ``cu_seqlens``, causal attention inside
  each pair, 1-D positions from 0) give the same scores and loss as padded ones, without computing padding.
- ``compat="official"`` (:meth:`Reranker.p_yes_generate`): the official number, ``scores[0]`` of greedy
  ``generate`` with the checkpoint's ``generation_config`` (M-RoPE positions, logits processors such as a
  repetition penalty included), ``P(yes) = softmax([s_Yes, s_No])[0]``; padded batches only.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from umarvel.data.images import MAX_PIXELS, MIN_PIXELS, ImageBudget
from umarvel.data.processor import load_tokenizer
from umarvel.errors import CheckpointError
from umarvel.model import loading
from umarvel.model.attention import install_packed_attention, packed_kwargs, packing_supported
from umarvel.model.backbones import BackboneSpec
from umarvel.model.embedder import packed_max_len, packed_positions
from umarvel.model.positions import POSITIONS, Positions, position_ids
from umarvel.rerank.collate import IGNORE_INDEX, answer_token_ids
from umarvel.utils.compat import DEFAULT, check_compat

logger = logging.getLogger(__name__)


class Reranker(nn.Module):
    """A causal vision-language model scoring (query, candidate) pairs.

    Args:
        backbone: a transformers ``Qwen2VLForConditionalGeneration`` (optionally peft-wrapped).
        spec: the backbone family's :class:`BackboneSpec`.
        yes_id / no_id: token ids of ``Yes`` and ``No`` (9454 / 2753 on Qwen2-VL).
        positions: default position convention, ``"1d"`` or ``"mrope"``.
    """

    def __init__(self, backbone: nn.Module, spec: BackboneSpec, yes_id: int, no_id: int, positions: Positions = "1d"):
        super().__init__()
        if positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
        self.backbone = backbone
        self.spec = spec
        self.yes_id, self.no_id = int(yes_id), int(no_id)
        self.positions = positions
        model = self.hf_model
        install_packed_attention(spec.language_model(model).config, spec.attention_modules(model),
                                 getattr(spec.visual(model), "config", None), spec.vision_attention_modules(model))

    @property
    def supports_packing(self) -> bool:
        """Whether packed batches can be scored / trained (1-D positions, packing-aware attention)."""
        return self.positions == "1d" and packing_supported(self.spec.language_model(self.hf_model).config)

    @property
    def hf_model(self) -> nn.Module:
        """The transformers model (peft wrapper removed; injected LoRA layers stay active)."""
        get_base = getattr(self.backbone, "get_base_model", None)
        return get_base() if callable(get_base) else self.backbone

    def position_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     image_grid_thw: torch.Tensor | None, positions: Positions | None = None) -> torch.Tensor:
        """Position ids: (B, L) row-wise 1-D, or (3, B, L) M-RoPE (``umarvel.model.positions``)."""
        return position_ids(positions or self.positions, self.spec, self.hf_model, input_ids, attention_mask,
                            image_grid_thw)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      pixel_values: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
                      positions: Positions | None = None, cu_seqlens: torch.Tensor | None = None,
                      seq_lens: torch.Tensor | None = None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states (B, L, D) of the causal language model (no vocabulary logits); (1, T, D)
        for a packed row (``cu_seqlens`` given)."""
        if cu_seqlens is not None:
            if (positions or self.positions) != "1d" or not self.supports_packing:
                raise ValueError("packed reranker batches need positions='1d' and a packing-aware attention")
            model = self.hf_model
            # the backbone's hooks: DeepStack inputs at the packed row's visual positions, its mask / position format
            embeds, lm_inputs = self.spec.embed_inputs(model, input_ids, pixel_values, image_grid_thw)
            lm = self.spec.language_model(model)
            if position_ids is None:
                position_ids = packed_positions(cu_seqlens, input_ids.shape[1])
            out = lm(inputs_embeds=embeds, attention_mask=self.spec.lm_attention_mask(lm, None, embeds, packed=True),
                     position_ids=self.spec.lm_position_ids(position_ids), use_cache=False,
                     **packed_kwargs(cu_seqlens, packed_max_len(cu_seqlens, seq_lens)), **lm_inputs)
            return out.last_hidden_state
        inner = self.spec.inner(self.hf_model)
        if pixel_values is not None:
            pixel_values = pixel_values.to(next(self.spec.visual(self.hf_model).parameters()).dtype)
        out = inner(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                    image_grid_thw=image_grid_thw, use_cache=False,
                    position_ids=self.position_ids(input_ids, attention_mask, image_grid_thw, positions))
        return out.last_hidden_state

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``lm_head`` on selected hidden states: (..., D) -> (..., V) float32."""
        return self.hf_model.lm_head(hidden).float()

    def last_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    pixel_values: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
                    positions: Positions | None = None, **packed: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits (B, V) float32 at the last position of each row of a LEFT-padded batch, or at
        the last token of each sequence of a packed row."""
        cu = packed.get("cu_seqlens")
        if cu is None and not bool(attention_mask[:, -1].all()):
            raise ValueError("scoring batches must be left-padded (every row's last token real)")
        hidden = self.hidden_states(input_ids, attention_mask, pixel_values, image_grid_thw, positions, **packed)
        return self.lm_logits(hidden[:, -1] if cu is None else hidden[0, cu[1:].long() - 1])

    def yes_no_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      pixel_values: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
                      positions: Positions | None = None, **rest: torch.Tensor) -> torch.Tensor:
        """``[logit_Yes, logit_No]`` at the last position: (B, 2) float32."""
        logits = self.last_logits(input_ids, attention_mask, pixel_values, image_grid_thw, positions,
                                  **_packed_keys(rest))
        return logits[:, [self.yes_id, self.no_id]]

    def p_yes(self, batch: Mapping[str, torch.Tensor], positions: Positions | None = None) -> torch.Tensor:
        """``P(yes) = softmax([logit_Yes, logit_No])[0]`` of a left-padded or packed scoring batch: (B,) float32."""
        return torch.softmax(self.yes_no_logits(**batch, positions=positions), dim=-1)[:, 0]

    def p_yes_generate(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The official P(yes) (D10, ``compat="official"``): the first step of greedy ``generate``.

        ``generate`` runs with the checkpoint's ``generation_config`` (``do_sample=False`` as the official
        scorer passes it, so only logits processors such as ``repetition_penalty`` act) and computes M-RoPE
        positions itself; ``P(yes) = softmax([s_Yes, s_No])[0]`` of the processed ``scores[0]``. Only the first
        token is generated (the official ``max_new_tokens=128`` does not change ``scores[0]``).

        Args:
            batch: a left-padded scoring batch (``input_ids``, ``attention_mask``, optional ``pixel_values`` /
                ``image_grid_thw``).
        Returns:
            (B,) float32.
        """
        hf = self.hf_model
        kw = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")
              if batch.get(k) is not None}
        if "pixel_values" in kw:
            kw["pixel_values"] = kw["pixel_values"].to(next(self.spec.visual(hf).parameters()).dtype)
        ids = kw["input_ids"]
        mm_types = torch.zeros_like(ids, dtype=torch.int)
        mm_types[ids == hf.config.image_token_id] = 1
        mm_types[ids == hf.config.video_token_id] = 2
        out = hf.generate(**kw, mm_token_type_ids=mm_types, max_new_tokens=1, do_sample=False, output_scores=True,
                          return_dict_in_generate=True)
        first = out.scores[0][:, [self.yes_id, self.no_id]].float()
        return torch.softmax(first, dim=-1)[:, 0]

    def loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
             pixel_values: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
             positions: Positions | None = None, **rest: torch.Tensor) -> torch.Tensor:
        """HF causal-LM loss: the logits at t predict ``labels[t+1]``; mean CE over labels != -100.

        Args:
            input_ids / attention_mask / labels: (B, L) training batch (``RerankTrainCollator``), or (1, T)
                packed (``pack_padded`` of it: the last token of a pair never predicts the next pair's first).
        Returns:
            scalar float32 loss (vocabulary logits are computed for the supervised positions only).
        """
        packed = _packed_keys(rest)
        hidden = self.hidden_states(input_ids, attention_mask, pixel_values, image_grid_thw, positions, **packed)
        target = labels[:, 1:]  # (B, L-1)
        if "cu_seqlens" in packed:
            target = target.clone()
            target[0, packed["cu_seqlens"][1:-1].long() - 1] = IGNORE_INDEX
        sel = target != IGNORE_INDEX
        if not bool(sel.any()):
            raise ValueError("the batch has no supervised token (all labels are -100)")
        logits = self.lm_logits(hidden[:, :-1][sel])  # (N, V)
        return F.cross_entropy(logits, target[sel])

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        """Training forward: :meth:`loss` of a collated batch (so DDP wraps this module)."""
        return self.loss(**batch)


def _packed_keys(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The packed-batch entries of ``batch`` (``cu_seqlens``, ``seq_lens``, ``position_ids``)."""
    return {k: batch[k] for k in ("cu_seqlens", "seq_lens", "position_ids") if k in batch}


def attach_reranker_lora(reranker: Reranker, r: int, alpha: int, dropout: float = 0.05) -> Reranker:
    """Wrap the backbone with a fresh LoRA (``task_type=CAUSAL_LM``) on all language-model linears.

    Every other weight (vision tower, merger, embeddings, ``lm_head``) is frozen.
    """
    from peft import LoraConfig, get_peft_model

    if hasattr(reranker.backbone, "peft_config"):
        raise CheckpointError("the reranker already has a LoRA attached; merge it first")
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none", task_type="CAUSAL_LM",
                     target_modules=reranker.spec.lora_target_regex)
    reranker.backbone = get_peft_model(reranker.backbone, cfg)
    n = sum(p.numel() for p in reranker.backbone.parameters() if p.requires_grad)
    logger.info("reranker LoRA r=%d alpha=%d dropout=%.3g: %d trainable parameters", r, alpha, dropout, n)
    return reranker


@dataclass
class LoadedReranker:
    """A reranker with its preprocessing: the module, stock tokenizer, PIL image processor and pixel budget."""

    model: Reranker
    tokenizer: object
    image_processor: object
    device: torch.device
    dtype: torch.dtype
    source: str
    budget: ImageBudget = ImageBudget()
    compat: str = DEFAULT


def load_reranker(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
                  adapter: str | os.PathLike | None = None, positions: Positions = "1d",
                  min_pixels: int | None = MIN_PIXELS, max_pixels: int | None = MAX_PIXELS,
                  attn_implementation: str = "sdpa", trainable_adapter: bool = False,
                  compat: str = DEFAULT) -> LoadedReranker:
    """Load a reranker checkpoint folder (stock or merged), optionally with a LoRA adapter on top.

    A LoRA adapter folder given as ``path`` loads its base (``base_model_name_or_path``) first. The backbone
    (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) comes from ``config.json``; the image budget is resolved for it
    (``ImageBudget.for_backbone``: the 4..300-token defaults keep their token counts on Qwen3-VL).
    ``compat="official"``: scoring uses :meth:`Reranker.p_yes_generate` and the official batching
    (``umarvel.rerank.score.score_pairs``); ``positions`` is then unused.
    """
    compat = check_compat(compat)
    from peft import PeftModel

    p = loading.check_checkpoint_dir(path)
    torch_dtype = loading.resolve_dtype(dtype, device)
    base, adapters = loading.base_and_adapters(p, adapter)
    model, spec = loading.load_hf_backbone(base, torch_dtype, device, attn_implementation)
    tok_dir, proc_dir = loading.processor_dirs(Path(base), adapters, spec)
    tokenizer = load_tokenizer(tok_dir, add_umarvel_tokens=False)
    image_processor, budget = loading.load_image_processor_for(proc_dir, spec, model, min_pixels, max_pixels)
    yes_id, no_id = answer_token_ids(tokenizer)
    reranker = Reranker(model, spec, yes_id, no_id, positions)
    for a in adapters:
        reranker.backbone = PeftModel.from_pretrained(reranker.backbone, str(a), is_trainable=trainable_adapter)
    reranker.to(device).eval()
    logger.info("loaded reranker %s (%s on %s, %s, Yes/No ids %d/%d)", p, torch_dtype, device,
                "official generate scoring" if compat != DEFAULT else f"positions {positions}", yes_id, no_id)
    return LoadedReranker(reranker, tokenizer, image_processor, torch.device(device), torch_dtype, str(p),
                          budget, compat)
