"""Tokenizer and image processor of Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoints, without torchvision.

``AutoProcessor`` fails for these models when torchvision is missing (their video processors need it), so
the processor is assembled from ``AutoTokenizer`` and the PIL image processor. The PIL backend is also the
one that reproduces the official pixels exactly (golden fixture, convention 8).

Bundled files (offline; provenance in each folder's ``PROVENANCE.md``):
``assets/qwen2vl_processor`` (Qwen2-VL), ``assets/qwen2_5_vl_processor`` (Qwen2.5-VL),
``assets/qwen3_vl_processor`` (Qwen3-VL). All three share the Qwen2 byte-level BPE (``vocab.json`` +
``merges.txt``), stored once in the Qwen2-VL folder; the other folders carry only what differs (added
tokens, chat template, image-processor config) and borrow the BPE files at load time.
"""
from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

from umarvel.data.formatting import UMARVEL_TOKENS
from umarvel.errors import CheckpointError

logger = logging.getLogger(__name__)

ASSETS_DIR = Path(__file__).parent / "assets"
#: Qwen2-VL tokenizer / image-processor files shipped with the package (see assets/.../PROVENANCE.md).
BUNDLED_PROCESSOR_DIR = ASSETS_DIR / "qwen2vl_processor"
#: The bundled processor folder of each backbone ``model_type``.
BUNDLED_PROCESSOR_DIRS: dict[str, Path] = {
    "qwen2_vl": BUNDLED_PROCESSOR_DIR,
    "qwen2_5_vl": ASSETS_DIR / "qwen2_5_vl_processor",
    "qwen3_vl": ASSETS_DIR / "qwen3_vl_processor",
}
#: Where the shared Qwen2 BPE files live (reused by the bundled folders that do not carry them).
SHARED_BPE_DIR = BUNDLED_PROCESSOR_DIR
BPE_FILES = ("vocab.json", "merges.txt")
TOKENIZER_FILES = "tokenizer.json or vocab.json + merges.txt"
IMAGE_PROCESSOR_FILE = "preprocessor_config.json"

#: Token ids the official loader gives the three U-MARVEL tokens on the 151,657-entry tokenizer.
OFFICIAL_ADDED_IDS = {"<emb>": 151657, "<instruction_start>": 151658, "<instruction_end>": 151659}


def _is_bundled(path: Path) -> bool:
    return path.resolve().parent == ASSETS_DIR.resolve()


def load_tokenizer(path: str | Path, add_umarvel_tokens: bool = True):
    """Load the tokenizer of a checkpoint folder and add ``<emb>`` and the instruction markers.

    The tokens are added one at a time as plain (non-special) tokens, as the official loader does,
    so they get ids 151657-151659 on the stock Qwen2-VL tokenizer (151665-151667 on Qwen2.5-VL,
    151669-151671 on Qwen3-VL, whose tokenizers carry 8 / 12 more added tokens). A bundled folder without
    ``vocab.json`` / ``merges.txt`` takes them from :data:`SHARED_BPE_DIR`.

    Raises:
        CheckpointError: naming the folder and the missing tokenizer files.
    """
    from transformers import AutoTokenizer

    p = Path(path)
    kwargs = {}
    if not has_processor_files(p):
        if not (_is_bundled(p) and (p / "tokenizer_config.json").is_file()):
            raise CheckpointError(f"{p}: no tokenizer files (needs {TOKENIZER_FILES})")
        kwargs = {"vocab_file": str(SHARED_BPE_DIR / BPE_FILES[0]), "merges_file": str(SHARED_BPE_DIR / BPE_FILES[1])}
    try:
        tok = AutoTokenizer.from_pretrained(str(p), **kwargs)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{p}: cannot load a tokenizer ({exc})") from None
    if add_umarvel_tokens:
        for t in UMARVEL_TOKENS:
            if t not in tok.get_vocab():
                tok.add_tokens([t])
        ids = {t: tok.convert_tokens_to_ids(t) for t in UMARVEL_TOKENS}
        if len(tok) == 151660 and ids != OFFICIAL_ADDED_IDS:
            logger.warning("U-MARVEL tokens got ids %s, not the official %s", ids, OFFICIAL_ADDED_IDS)
    return tok


def _image_processor_class():
    """The PIL Qwen2-VL image processor class (named ``Qwen2VLImageProcessorPil`` in transformers 5.x).

    Qwen2.5-VL and Qwen3-VL use the same image processor (different patch size / mean / std in their files).
    """
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
        return Qwen2VLImageProcessorPil
    except ImportError:  # transformers layouts without the split PIL class
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
        return Qwen2VLImageProcessor


def load_image_processor(path: str | Path, min_pixels: int, max_pixels: int):
    """The PIL image processor of a checkpoint folder, with the given pixel budget.

    Raises:
        CheckpointError: naming the folder when ``preprocessor_config.json`` is missing or unreadable.
    """
    p = Path(path)
    if not (p / IMAGE_PROCESSOR_FILE).is_file():
        raise CheckpointError(f"{p}: no {IMAGE_PROCESSOR_FILE} (the image processor's configuration)")
    cls = _image_processor_class()
    try:
        ip = cls.from_pretrained(str(p))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{p}: cannot load the image processor ({exc})") from None
    return set_image_budget(ip, min_pixels, max_pixels)


def set_image_budget(image_processor, min_pixels: int, max_pixels: int):
    """Give a loaded image processor the pixel budget ``[min_pixels, max_pixels]`` (returns it)."""
    # transformers 5.x reads the budget from ``size``; the legacy min/max attributes only trigger a
    # deprecation warning at call time. umarvel resizes images itself (``umarvel.data.images``) and
    # calls the processor with ``do_resize=False``, so this only matters for direct users.
    image_processor.size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    for legacy in ("min_pixels", "max_pixels"):
        if getattr(image_processor, legacy, None) is not None:
            setattr(image_processor, legacy, None)
    return image_processor


#: transformers processor class of each backbone (built without the torchvision-only video processor).
_HF_PROCESSORS = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor"}


@lru_cache(maxsize=None)
def _processor_class(model_type: str = "qwen2_vl"):
    import transformers

    base = getattr(transformers, _HF_PROCESSORS.get(model_type, "Qwen2VLProcessor"))

    class ImageTextProcessor(base):
        """The backbone's transformers processor without the torchvision-only video processor."""

        attributes = ["image_processor", "tokenizer"]

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                             chat_template=chat_template, **kwargs)

    ImageTextProcessor.__name__ = ImageTextProcessor.__qualname__ = f"{base.__name__}ImageText"
    return ImageTextProcessor


def build_hf_processor(tokenizer, image_processor, model_type: str = "qwen2_vl"):
    """A transformers ``Qwen2VLProcessor`` / ``Qwen2_5_VLProcessor`` / ``Qwen3VLProcessor`` (image + text)
    built from loaded parts, for users who want one."""
    return _processor_class(model_type)(image_processor=image_processor, tokenizer=tokenizer,
                                        chat_template=getattr(tokenizer, "chat_template", None))


def has_processor_files(path: str | Path) -> bool:
    """Whether a folder carries its own tokenizer files (vocab/merges or tokenizer.json)."""
    p = Path(path)
    return (p / "tokenizer.json").is_file() or ((p / "vocab.json").is_file() and (p / "merges.txt").is_file())
