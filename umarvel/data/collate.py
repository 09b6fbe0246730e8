"""From inputs to padded model batches: chat rendering, tokenization, image patches, pool masks.

Pipeline for one input (``EmbedInput``): the chat is rendered with the checkpoint's own template
(``build_messages`` + ``apply_chat_template``), tokenized once, and each ``<|image_pad|>`` /
``<|video_pad|>`` placeholder is expanded to the number of visual tokens of its (already resized)
image or video (``umarvel.data.visual``). ``collate`` then pads (left by default, like the official
collators), builds the instruction and pool masks, and concatenates the patches of the batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from umarvel.data.formatting import (ASSISTANT_TEXT, INSTRUCTION_END, INSTRUCTION_START, PromptStyle, build_messages,
                                     pick_suffix)
from umarvel.data.visual import (VIDEO_PAD, VISION_END, VISION_START, PatchSpec, VideoInput, image_patches,
                                 image_token_count, render_chat, timestamped_video_text, tokenize_chats,
                                 video_token_counts, visual_batch)

_TEXT_SLOT = "\u0000UMARVEL_TEXT\u0000"


@dataclass
class EmbedInput:
    """One input ready to tokenize.

    Attributes:
        text: the final user text (formatted; instruction markers included for queries), without suffix.
        images: resized RGB images (``umarvel.data.images.load_image``), shown before the text.
        video: optional video patches, shown before the text (instead of images).
        segments: interleaved content (see :meth:`interleaved`).
        patches: optional precomputed ``umarvel.data.visual.image_patches`` of ``images`` (computed
            in loader threads so that collation only concatenates).
    """

    text: str
    images: tuple[Image.Image, ...] = ()
    video: VideoInput | None = None
    segments: tuple[str | None, ...] | None = None
    patches: tuple[tuple[np.ndarray, np.ndarray], ...] | None = None

    @classmethod
    def interleaved(cls, parts: Sequence[str | Image.Image]) -> "EmbedInput":
        """Text and images in a given order (e.g. a VIST story): ``parts`` are strings or resized images.

        The suffix, if the style has one, is appended after the last part.
        """
        images = tuple(p for p in parts if isinstance(p, Image.Image))
        segments = tuple(None if isinstance(p, Image.Image) else str(p) for p in parts)
        return cls(text="", images=images, segments=segments)


@dataclass
class TokenizedInput:
    """An input after tokenization: ids with visual placeholders expanded, plus its visuals."""

    input_ids: list[int]
    images: tuple[Image.Image, ...] = ()
    video: VideoInput | None = None
    patches: tuple[tuple[np.ndarray, np.ndarray], ...] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)


class EmbeddingTokenizer:
    """Renders and tokenizes ``EmbedInput`` items exactly as the official collators do.

    Args:
        tokenizer: the checkpoint tokenizer with the U-MARVEL tokens added.
        style: suffix / generation-prompt policy (``umarvel.data.formatting.PromptStyle``).
        spec: patch geometry (visual tokens = patches / merge_size**2) and video layout of the backbone
            (``BackboneSpec.patch_spec``); images must be resized to multiples of ``spec.factor`` (28 / 32).
    """

    def __init__(self, tokenizer, style: PromptStyle, spec: PatchSpec = PatchSpec()):
        self.tokenizer = tokenizer
        self.style = style
        self.spec = spec
        self._templates: dict[tuple, tuple[str, str]] = {}

    def _template(self, n_images: int, video: bool, text_empty: bool) -> tuple[str, str]:
        """Rendered chat around the user text, cached per layout: ``(before, after)``."""
        key = (n_images, video, text_empty)
        if key not in self._templates:
            has_visual = n_images > 0 or video
            msgs = build_messages("" if text_empty else _TEXT_SLOT, has_visual, self.style,
                                  n_images=max(n_images, 1), video=video)
            rendered = render_chat(self.tokenizer, msgs, self.style.add_generation_prompt)
            if text_empty:  # nothing to substitute: the whole rendering is fixed for this layout
                self._templates[key] = (rendered, "")
            else:
                before, after = rendered.split(_TEXT_SLOT)
                self._templates[key] = (before, after)
        return self._templates[key]

    def render(self, inp: EmbedInput) -> str:
        """The exact chat string (before visual placeholder expansion)."""
        if inp.segments is not None:
            return self._render_segments(inp.segments)
        before, after = self._template(len(inp.images), inp.video is not None, inp.text == "")
        rendered = before + inp.text + after
        if inp.video is not None and self.spec.video_timestamps:  # Qwen3-VL: one timestamped block per patch
            rendered = rendered.replace(VISION_START + VIDEO_PAD + VISION_END,
                                        timestamped_video_text(inp.video.times(self.spec.temporal_patch_size)), 1)
        return rendered

    def _render_segments(self, segments: Sequence[str | None]) -> str:
        """Render interleaved content: ``None`` marks an image, strings are text items."""
        content = [{"type": "image"} if seg is None else {"type": "text", "text": seg} for seg in segments]
        last_text = content[-1]["text"] if content and content[-1]["type"] == "text" else ""
        suffix = pick_suffix(any(seg is None for seg in segments), last_text, self.style)
        if suffix:
            if content and content[-1]["type"] == "text":
                content[-1] = {"type": "text", "text": last_text + suffix}
            else:
                content.append({"type": "text", "text": suffix})
        msgs = [{"role": "user", "content": content},
                {"role": "assistant", "content": [{"type": "text", "text": ASSISTANT_TEXT}]}]
        return render_chat(self.tokenizer, msgs, self.style.add_generation_prompt)

    def tokenize(self, inputs: Sequence[EmbedInput]) -> list[TokenizedInput]:
        """Tokenize a list of inputs (one fast-tokenizer call) and expand visual placeholders."""
        wheres = [f"embedding input {i}" for i in range(len(inputs))]
        image_counts = [[image_token_count(im, self.spec, w) for im in x.images] for x, w in zip(inputs, wheres)]
        video_counts = [video_token_counts(x.video, self.spec) if x.video is not None else [] for x in inputs]
        ids = tokenize_chats(self.tokenizer, [self.render(x) for x in inputs], image_counts, video_counts, wheres)
        return [TokenizedInput(i, tuple(x.images), x.video, x.patches) for i, x in zip(ids, inputs)]


def instruction_mask(input_ids: torch.Tensor, start_id: int, end_id: int) -> torch.Tensor:
    """1 on ``<instruction_start> ... <instruction_end>`` spans, both markers included.

    Args:
        input_ids: (B, L) token ids.
    Returns:
        (B, L) int64 mask.
    """
    is_start = (input_ids == start_id).long()
    is_end = (input_ids == end_id).long()
    depth = torch.cumsum(is_start - is_end, dim=-1)
    return ((depth > 0) | (is_end > 0)).long()


def pad_sequences(seqs: Sequence[Sequence[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad id lists to ``input_ids`` (B, L) and ``attention_mask`` (B, L) int64, on the ``side`` given."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(length - len(s), length) if side == "left" else slice(0, len(s))
        ids[i, sl] = torch.as_tensor(s, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


class EmbeddingCollator:
    """Pads tokenized inputs into a model batch and builds pool masks.

    Output dict (B sequences, L padded length):
        ``input_ids`` (B, L) int64; ``attention_mask`` (B, L) int64; ``instruction_mask`` (B, L);
        ``pool_mask`` (B, L) = non-pad and outside the instruction span; and, when present,
        ``pixel_values`` (patches, 1176) float32 + ``image_grid_thw`` (n_images, 3) int64,
        ``pixel_values_videos`` + ``video_grid_thw`` (``umarvel.data.visual.visual_batch``).
    """

    def __init__(self, tokenizer, image_processor, padding_side: str = "left", mask_instruction: bool = True):
        self.image_processor = image_processor
        self.patch_spec = PatchSpec.from_processor(image_processor)
        self.pad_id = tokenizer.pad_token_id
        self.padding_side = padding_side
        self.mask_instruction = mask_instruction
        self.start_id = tokenizer.convert_tokens_to_ids(INSTRUCTION_START)
        self.end_id = tokenizer.convert_tokens_to_ids(INSTRUCTION_END)

    def __call__(self, items: Sequence[TokenizedInput]) -> dict[str, torch.Tensor]:
        ids, attn = pad_sequences([x.input_ids for x in items], self.pad_id, self.padding_side)
        instr = instruction_mask(ids, self.start_id, self.end_id)
        pool = attn * (1 - instr) if self.mask_instruction else attn.clone()
        batch = {"input_ids": ids, "attention_mask": attn, "instruction_mask": instr, "pool_mask": pool}
        # the patches of all images (videos) in order (umarvel.data.visual.visual_batch); absent when none
        parts = [p for x in items for p in (x.patches or [image_patches(im, self.patch_spec) for im in x.images])]
        batch.update(visual_batch(parts, [x.video for x in items if x.video is not None]))
        return batch


def plan_batches(lengths: Sequence[int], max_batch_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """Length-aware batching: indices sorted by length (longest first), cut so that
    ``len(batch) * longest <= max_tokens`` and ``len(batch) <= max_batch_size``.

    Returns a list of index lists; every index appears exactly once. Order is restored by the caller.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        longest = lengths[cur[0]] if cur else lengths[i]
        if cur and (len(cur) >= max_batch_size or (max_tokens and (len(cur) + 1) * longest > max_tokens)):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def sequential_batches(n: int, batch_size: int) -> list[list[int]]:
    """Consecutive batches in input order, ``batch_size`` items each (the last one may be shorter).

    This is a ``DataLoader(shuffle=False)`` over the items: the batching of the official evaluation scripts,
    used by ``compat="official"`` so that the same batches (and hence the same unpadded ones, D5) are formed.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    return [list(range(s, min(n, s + batch_size))) for s in range(0, n, batch_size)]
