"""Tokenization and collation of reranker pairs (training: right padding + labels; scoring: left padding).

Labels (official ``collators/mbeir_rerank.py``): ``input_ids`` with pads -> -100, the user turn
(2nd ``<|im_start|>`` up to the 3rd) -> -100 and the system turn (``[:, :11]``) -> -100, so each row
supervises exactly ``<|im_start|>assistant\\nYes|No<|im_end|>\\n`` (6 tokens) and the loss is their mean.
Here the rule is expressed without magic numbers: everything before the assistant turn's
``<|im_start|>`` (the last one of the row) is masked. :func:`chat_layout` derives the system-turn
length from the template (11 on the stock Qwen2-VL template) so tests can check the two rules agree.

``answer_only_loss=True`` supervises only the ``Yes`` / ``No`` token (1 per row) instead of the 6
assistant-turn tokens. The default (False) is the official behaviour, under which the published
hyper-parameters were tuned; with it, 5 of the 6 supervised tokens are constant template tokens.

The shared tokenizer's ``padding_side`` is never touched (the official collator switched it to
``right`` permanently); padding is done here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image

from umarvel.data.collate import pad_sequences
from umarvel.data.visual import PatchSpec, image_patches, image_token_count, tokenize_chats, visual_batch
from umarvel.errors import DataError
from umarvel.rerank.prompts import ANSWER_NO, ANSWER_YES, RerankPair, render_rerank

IGNORE_INDEX = -100
IM_START = "<|im_start|>"


def answer_token_ids(tokenizer) -> tuple[int, int]:
    """``(yes_id, no_id)`` = ``tokenizer("Yes").input_ids[0]``, ``tokenizer("No").input_ids[0]`` (9454, 2753)."""
    return (tokenizer(ANSWER_YES, add_special_tokens=False)["input_ids"][0],
            tokenizer(ANSWER_NO, add_special_tokens=False)["input_ids"][0])


@dataclass(frozen=True)
class ChatLayout:
    """Token layout of the checkpoint's chat template.

    Attributes:
        system_len: tokens before the user turn (the default system turn; 11 on Qwen2-VL).
        assistant_header_len: tokens of the generation prompt ``<|im_start|>assistant\\n`` (3).
    """

    system_len: int
    assistant_header_len: int


def chat_layout(tokenizer) -> ChatLayout:
    """Derive :class:`ChatLayout` from ``tokenizer.apply_chat_template`` (no hard-coded counts)."""
    msgs = [{"role": "user", "content": [{"type": "text", "text": "x"}]}]
    plain = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
    with_gen = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    user_at = plain.rfind(f"{IM_START}user")
    if user_at < 0 or not with_gen.startswith(plain):
        raise DataError("the chat template has no '<|im_start|>user' turn or no generation prompt; "
                        "the reranker needs a ChatML (Qwen) template")
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    return ChatLayout(system_len=len(enc(plain[:user_at])),
                      assistant_header_len=len(enc(with_gen[len(plain):])))


@dataclass
class TokenizedPair:
    """A pair after tokenization.

    Attributes:
        input_ids: ids with each ``<|image_pad|>`` expanded to its image's visual-token count.
        images: the pair's resized images in prompt order (query image first).
        label: the training answer (``True`` = Yes) or ``None``.
    """

    input_ids: list[int]
    images: tuple[Image.Image, ...] = ()
    label: bool | None = None

    def __len__(self) -> int:
        return len(self.input_ids)


class RerankTokenizer:
    """Renders and tokenizes :class:`RerankPair` items (one fast-tokenizer call per list).

    Args:
        tokenizer: the stock checkpoint tokenizer (``load_tokenizer(path, add_umarvel_tokens=False)``).
        training: render with the answer (``add_generation_prompt=False``) or for scoring (True).
        spec: patch geometry (Qwen2-VL: patch 14, merge 2; images resized to multiples of 28).
    """

    def __init__(self, tokenizer, training: bool, spec: PatchSpec = PatchSpec()):
        self.tokenizer = tokenizer
        self.training = training
        self.spec = spec

    def render(self, pair: RerankPair) -> str:
        """The exact chat string of ``pair`` (see :func:`umarvel.rerank.prompts.render_rerank`)."""
        return render_rerank(self.tokenizer, pair, self.training)

    def tokenize(self, pairs: Sequence[RerankPair]) -> list[TokenizedPair]:
        """Tokenize pairs (each ``<|image_pad|>`` expanded); every image of a pair must be a resized ``PIL.Image``."""
        wheres = [f"rerank pair {p.id or '?'}" for p in pairs]
        images = [_pair_images(p, w) for p, w in zip(pairs, wheres)]
        counts = [[image_token_count(im, self.spec, w) for im in ims] for ims, w in zip(images, wheres)]
        ids = tokenize_chats(self.tokenizer, [self.render(p) for p in pairs], counts, wheres=wheres)
        return [TokenizedPair(i, ims, p.label) for i, ims, p in zip(ids, images, pairs)]


def _pair_images(pair: RerankPair, where: str) -> tuple[Image.Image, ...]:
    """The pair's images in prompt order (query first); each must be a loaded PIL image."""
    images = tuple(s.image for s in (pair.query, pair.candidate) if s.has_image)
    for im in images:
        if not isinstance(im, Image.Image):
            raise DataError(f"{where}: images must be loaded PIL images, got {type(im).__name__}")
    return images


def assistant_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor, im_start_id: int,
                     answer_ids: Sequence[int], header_len: int, answer_only: bool = False) -> torch.Tensor:
    """Labels supervising the assistant turn of each row (official rule, see module docstring).

    Args:
        input_ids: (B, L) ids of training sequences (right or left padded).
        attention_mask: (B, L) 1 on real tokens.
        im_start_id: id of ``<|im_start|>`` (151644).
        answer_ids: the allowed answer token ids (Yes, No).
        header_len: tokens of ``<|im_start|>assistant\\n`` (the answer token follows them).
        answer_only: supervise only the answer token.
    Returns:
        (B, L) int64: ``input_ids`` on supervised positions, -100 elsewhere.
    Raises:
        DataError: a row without an assistant turn or whose answer token is not Yes/No.
    """
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    real = attention_mask.bool()
    for b in range(input_ids.shape[0]):
        starts = ((input_ids[b] == im_start_id) & real[b]).nonzero().flatten()
        if starts.numel() == 0:
            raise DataError(f"training row {b}: no <|im_start|> (not a chat sequence)")
        a = int(starts[-1])
        ans = a + header_len
        if ans >= input_ids.shape[1] or not bool(real[b, ans]) or int(input_ids[b, ans]) not in answer_ids:
            raise DataError(f"training row {b}: the assistant turn does not start with a Yes/No answer")
        if answer_only:
            labels[b, ans] = input_ids[b, ans]
        else:
            span = real[b].clone()
            span[:a] = False
            labels[b, span] = input_ids[b, span]
    return labels


class _BaseCollator:
    def __init__(self, tokenizer, image_processor, padding_side: str):
        self.image_processor = image_processor
        self.patch_spec = PatchSpec.from_processor(image_processor)
        self.pad_id = tokenizer.pad_token_id
        self.padding_side = padding_side
        if self.pad_id is None:
            raise DataError("the tokenizer has no pad token")

    def _batch(self, items: Sequence[TokenizedPair]) -> dict[str, torch.Tensor]:
        ids, attn = pad_sequences([x.input_ids for x in items], self.pad_id, self.padding_side)
        batch = {"input_ids": ids, "attention_mask": attn}
        batch.update(visual_batch([image_patches(im, self.patch_spec) for x in items for im in x.images]))
        return batch


class RerankTrainCollator(_BaseCollator):
    """Right-padded training batch with labels.

    Output (B sequences, L padded length): ``input_ids`` (B, L), ``attention_mask`` (B, L), ``labels``
    (B, L) (-100 outside the assistant turn), and, when the batch has images, ``pixel_values``
    (patches, 1176) float32 + ``image_grid_thw`` (n_images, 3) in row order.
    """

    def __init__(self, tokenizer, image_processor, answer_only_loss: bool = False):
        super().__init__(tokenizer, image_processor, "right")
        self.answer_only_loss = answer_only_loss
        self.im_start_id = tokenizer.convert_tokens_to_ids(IM_START)
        self.answer_ids = answer_token_ids(tokenizer)
        self.layout = chat_layout(tokenizer)

    def __call__(self, items: Sequence[TokenizedPair]) -> dict[str, torch.Tensor]:
        batch = self._batch(items)
        batch["labels"] = assistant_labels(batch["input_ids"], batch["attention_mask"], self.im_start_id,
                                           self.answer_ids, self.layout.assistant_header_len,
                                           self.answer_only_loss)
        return batch


class RerankScoreCollator(_BaseCollator):
    """Left-padded scoring batch (the last position of every row is its last real token).

    Output: ``input_ids`` (B, L), ``attention_mask`` (B, L), and ``pixel_values`` / ``image_grid_thw``
    when the batch has images.
    """

    def __init__(self, tokenizer, image_processor):
        super().__init__(tokenizer, image_processor, "left")

    def __call__(self, items: Sequence[TokenizedPair]) -> dict[str, torch.Tensor]:
        return self._batch(items)
