"""Tokenizer and image processor for Qwen2-VL checkpoints, without torchvision.

``AutoProcessor`` fails for Qwen2-VL when torchvision is missing (its video processor needs it), so
the processor is assembled from ``AutoTokenizer`` and the PIL image processor. The PIL backend is
also the one that reproduces the official pixels exactly (golden fixture, convention 8).
"""
from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

from umarvel.data.formatting import UMARVEL_TOKENS
from umarvel.errors import CheckpointError

logger = logging.getLogger(__name__)

#: Qwen2-VL tokenizer / image-processor files shipped with the package (see assets/.../README.md).
BUNDLED_PROCESSOR_DIR = Path(__file__).parent / "assets" / "qwen2vl_processor"

#: Token ids the official loader gives the three U-MARVEL tokens on the 151,657-entry tokenizer.
OFFICIAL_ADDED_IDS = {"<emb>": 151657, "<instruction_start>": 151658, "<instruction_end>": 151659}


def load_tokenizer(path: str | Path, add_umarvel_tokens: bool = True):
    """Load the tokenizer of a checkpoint folder and add ``<emb>`` and the instruction markers.

    The tokens are added one at a time as plain (non-special) tokens, as the official loader does,
    so they get ids 151657-151659 on the stock Qwen2-VL tokenizer.
    """
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot load a tokenizer ({exc})") from None
    if add_umarvel_tokens:
        for t in UMARVEL_TOKENS:
            if t not in tok.get_vocab():
                tok.add_tokens([t])
        ids = {t: tok.convert_tokens_to_ids(t) for t in UMARVEL_TOKENS}
        if len(tok) == 151660 and ids != OFFICIAL_ADDED_IDS:
            logger.warning("U-MARVEL tokens got ids %s, not the official %s", ids, OFFICIAL_ADDED_IDS)
    return tok


def _image_processor_class():
    """The PIL Qwen2-VL image processor class (named ``Qwen2VLImageProcessorPil`` in transformers 5.x)."""
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
        return Qwen2VLImageProcessorPil
    except ImportError:  # transformers layouts without the split PIL class
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
        return Qwen2VLImageProcessor


def load_image_processor(path: str | Path, min_pixels: int, max_pixels: int):
    """The PIL image processor of a checkpoint folder, with the given pixel budget."""
    cls = _image_processor_class()
    try:
        ip = cls.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot load the image processor ({exc})") from None
    # transformers 5.x reads the budget from ``size``; the legacy min/max attributes only trigger a
    # deprecation warning at call time. umarvel resizes images itself (``umarvel.data.images``) and
    # calls the processor with ``do_resize=False``, so this only matters for direct users.
    ip.size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    for legacy in ("min_pixels", "max_pixels"):
        if getattr(ip, legacy, None) is not None:
            setattr(ip, legacy, None)
    return ip


@lru_cache(maxsize=1)
def _processor_class():
    from transformers import Qwen2VLProcessor

    class Qwen2VLImageTextProcessor(Qwen2VLProcessor):
        """``Qwen2VLProcessor`` without the torchvision-only video processor."""

        attributes = ["image_processor", "tokenizer"]

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                             chat_template=chat_template, **kwargs)

    return Qwen2VLImageTextProcessor


def build_hf_processor(tokenizer, image_processor):
    """A transformers ``Qwen2VLProcessor`` (image + text) built from loaded parts, for users who want one."""
    return _processor_class()(image_processor=image_processor, tokenizer=tokenizer,
                              chat_template=getattr(tokenizer, "chat_template", None))


def has_processor_files(path: str | Path) -> bool:
    """Whether a folder carries its own tokenizer files (vocab/merges or tokenizer.json)."""
    p = Path(path)
    return (p / "tokenizer.json").is_file() or ((p / "vocab.json").is_file() and (p / "merges.txt").is_file())
