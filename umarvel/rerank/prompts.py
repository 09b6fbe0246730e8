"""The official point-wise reranker prompt (method spec section 4), exactly.

One user turn whose content items are concatenated with no separators, then (training only) the
assistant answer::

    <instruction text>  "Query:"  [query image]  [query text]  "Candidate:"  [candidate image]  [candidate text]

The instruction text is the official backslash-continued Python literal: 24 spaces between
"candidate" and "meets", and the typo "responed". A side without text contributes only its image
(no empty text item); a side without image contributes only its text.

Texts:
- query: ``format_string(f"{instruction} {query_txt}")`` with NO instruction markers
  (:func:`rerank_query_text`);
- candidate: ``format_string(txt)`` (:func:`rerank_candidate_text`);
- both truncated to 256 tokens in training (tokenize, keep 256, decode; ``truncate_text``), not
  truncated at scoring time.

Training renders with the assistant answer ``Yes`` / ``No`` and ``add_generation_prompt=False``
(ends ``<|im_start|>assistant\\nYes<|im_end|>\\n``); scoring renders without an answer and with
``add_generation_prompt=True`` (ends ``<|im_start|>assistant\\n``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from umarvel.data.formatting import format_string, truncate_text
from umarvel.errors import DataError

#: The official instruction item, typo and 24 spaces included (golden ``meta.train.prompt_text_item``).
RERANK_INSTRUCTION = (
    "I will provide you with a query and a candidate. Please evaluate whether the candidate"
    + " " * 24
    + "meets the requirements of the query. If it does, respond with 'Yes'; if it doesn't, responed with 'No'."
)
QUERY_HEADER = "Query:"
CANDIDATE_HEADER = "Candidate:"
ANSWER_YES = "Yes"
ANSWER_NO = "No"
#: Token budget of each text side in reranker training (official ``datasets_mbeir_rerank_only_pointwise``).
TRAIN_MAX_TEXT_TOKENS = 256


def rerank_query_text(instruction: str | None, query_txt: str | None) -> str:
    """Query text of the reranker: ``format_string(f"{instruction} {query_txt}")``, no markers.

    Without an instruction it is ``format_string(query_txt)``. An image-only query with an
    instruction keeps the instruction as its text (``"Instr."``).
    """
    if instruction is None or not str(instruction).strip():
        return format_string(query_txt)
    return format_string(f"{instruction} {query_txt or ''}")


def rerank_candidate_text(txt: str | None) -> str:
    """Candidate text of the reranker: ``format_string(txt)`` (``""`` for an image-only candidate)."""
    return format_string(txt)


@dataclass(frozen=True)
class RerankSide:
    """One side (query or candidate) of a reranker pair.

    Attributes:
        text: the final text (already formatted, truncated where applicable); ``""`` = no text item.
        image: a resized RGB ``PIL.Image`` (``umarvel.data.images.load_image``), an image reference
            (anything truthy, for rendering only), or ``None``.
    """

    text: str
    image: Any = None

    @property
    def has_image(self) -> bool:
        return self.image is not None


@dataclass(frozen=True)
class RerankPair:
    """A (query, candidate) pair, with the training answer (``True`` = ``Yes``) or ``None`` for scoring."""

    query: RerankSide
    candidate: RerankSide
    label: bool | None = None
    id: str = ""

    def __post_init__(self) -> None:
        for name, side in (("query", self.query), ("candidate", self.candidate)):
            if not side.text and not side.has_image:
                raise DataError(f"rerank pair {self.id or '?'}: the {name} has neither text nor image")


def _side_items(header: str, side: RerankSide) -> list[dict]:
    items: list[dict] = [{"type": "text", "text": header}]
    if side.has_image:
        items.append({"type": "image"})
    if side.text:
        items.append({"type": "text", "text": side.text})
    return items


def build_rerank_messages(pair: RerankPair, with_answer: bool) -> list[dict]:
    """Chat messages of one pair: the user turn, plus the assistant answer when ``with_answer``.

    Raises:
        DataError: ``with_answer`` on a pair without a label.
    """
    content = [{"type": "text", "text": RERANK_INSTRUCTION}]
    content += _side_items(QUERY_HEADER, pair.query)
    content += _side_items(CANDIDATE_HEADER, pair.candidate)
    messages = [{"role": "user", "content": content}]
    if with_answer:
        if pair.label is None:
            raise DataError(f"rerank pair {pair.id or '?'}: a training pair needs a label (Yes/No)")
        answer = ANSWER_YES if pair.label else ANSWER_NO
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def render_rerank(tokenizer, pair: RerankPair, training: bool) -> str:
    """The exact chat string of a pair (before ``<|image_pad|>`` expansion).

    Training: with the answer, ``add_generation_prompt=False``; scoring: no answer,
    ``add_generation_prompt=True``.
    """
    return tokenizer.apply_chat_template(build_rerank_messages(pair, with_answer=training), tokenize=False,
                                         add_generation_prompt=not training)


def make_side(tokenizer, text: str, image: Any, max_text_tokens: int | None) -> RerankSide:
    """A side with its (formatted) ``text`` truncated to ``max_text_tokens`` tokens (``None``: no truncation)."""
    return RerankSide(truncate_text(tokenizer, text, max_text_tokens) if max_text_tokens else text, image)
