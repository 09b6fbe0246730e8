"""Exact U-MARVEL prompt construction (method spec section 1.2, decisions D3, D4, D15).

Every input is a two-turn chat: a user turn (optional image, then text) and the assistant turn
``<emb>.``. The stock Qwen2-VL chat template adds the default system prompt.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

EMB_TOKEN = "<emb>"
INSTRUCTION_START = "<instruction_start>"
INSTRUCTION_END = "<instruction_end>"
UMARVEL_TOKENS = (EMB_TOKEN, INSTRUCTION_START, INSTRUCTION_END)
ASSISTANT_TEXT = "<emb>."

SUFFIX_IMAGE_TEXT = "\nSummarize above image and sentence in one word: "
SUFFIX_TEXT = "\nSummarize above sentence in one word: "
SUFFIX_IMAGE = "\nSummarize above image in one word: "


def format_string(s: str | None) -> str:
    """The official ``format_string``: drop ``\\r``, strip blanks and ``"``, capitalise, end with ``.?!``.

    The empty string stays empty (an image-only candidate keeps ``""`` as its text).
    """
    s = (s or "").replace("\r", "").strip().strip('"')
    if not s:
        return s
    s = s[0].upper() + s[1:]
    if not s.endswith((".", "?", "!")):
        s = s + "."
    return s


def query_text_with_instruction(instruction: str | None, text: str | None) -> str:
    """M-BEIR query text: ``format_string(<instruction_start>fmt(instr)<instruction_end> + " " + text)``.

    Computed as one string, so the query's own first letter is not capitalised. Without an
    instruction the text is just ``format_string(text)``.
    """
    if instruction is None or not str(instruction).strip():
        return format_string(text)
    wrapped = f"{INSTRUCTION_START}{format_string(instruction)}{INSTRUCTION_END}"
    return format_string(f"{wrapped} {text or ''}")


@dataclass(frozen=True)
class PromptStyle:
    """How user text is completed and the chat rendered.

    Attributes:
        suffix: append the compression suffix (D3: on in stages 1-3 and M-BEIR eval, off in 4-5).
        image_only_suffix: suffix for an image with empty text. ``"image_and_sentence"`` is the
            official eval/inference behaviour (D15); ``"image"`` is what the training datasets use.
        add_generation_prompt: append ``<|im_start|>assistant\\n`` after the ``<emb>.`` turn (D4:
            True at inference, False in training).
    """

    suffix: bool = True
    image_only_suffix: Literal["image_and_sentence", "image"] = "image_and_sentence"
    add_generation_prompt: bool = True


INFERENCE_STYLE = PromptStyle()
TRAIN_STYLE = PromptStyle(suffix=True, image_only_suffix="image", add_generation_prompt=False)


def pick_suffix(has_image: bool, text: str, style: PromptStyle) -> str:
    """The compression suffix for one input under ``style`` ("" when suffixes are off)."""
    if not style.suffix:
        return ""
    if not has_image:
        return SUFFIX_TEXT
    if text == "" and style.image_only_suffix == "image":
        return SUFFIX_IMAGE
    return SUFFIX_IMAGE_TEXT


def build_messages(text: str, has_image: bool, style: PromptStyle, n_images: int = 1,
                   video: bool = False) -> list[dict]:
    """Chat messages for one input: user ``[image?, text + suffix]`` and assistant ``<emb>.``.

    ``text`` is the final user text (already formatted). ``n_images`` images (or one video) precede it.
    """
    content: list[dict] = []
    if has_image:
        kind = "video" if video else "image"
        content.extend({"type": kind} for _ in range(n_images))
    content.append({"type": "text", "text": text + pick_suffix(has_image, text, style)})
    return [
        {"role": "user", "content": content},
        {"role": "assistant", "content": [{"type": "text", "text": ASSISTANT_TEXT}]},
    ]


def truncate_text(tokenizer, text: str, max_tokens: int | None) -> str:
    """Official training truncation: tokenize without special tokens, keep ``max_tokens``, decode."""
    if not max_tokens or not text:
        return text
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids[:max_tokens])
