"""Loading and saving checkpoint folders.

Accepted folders:
- a released / official checkpoint: a ``Qwen2VLForConditionalGeneration`` folder in the
  transformers 4.x key layout (``model.*``, ``visual.*``), tokenizer WITHOUT the U-MARVEL tokens;
- a stock Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint (the backbone is read from ``config.json``'s
  ``model_type``, :mod:`umarvel.model.backbones`);
- a folder written by umarvel (transformers 5.x layout, tokenizer with the tokens, ``umarvel.json``);
- a peft LoRA adapter folder (``adapter_config.json``) on top of either.

Added tokens (method spec 1.1, decision D14): ``<emb>``, ``<instruction_start>`` and
``<instruction_end>`` are added to the tokenizer (ids 151657-151659) and index EXISTING rows of the
embedding matrix (which has 151,936 / 152,064 rows); nothing is truncated. The two marker rows are
taken from the checkpoint, so they are deterministic; where both are all zeros they are drawn once
from N(0, initializer_range^2) with a fixed seed, and every checkpoint umarvel writes carries them.
The official loader instead draws fresh random marker rows at every load, so official query
vectors change from load to load.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Sequence

import torch

from umarvel.data.formatting import UMARVEL_TOKENS
from umarvel.data.images import MAX_PIXELS, MIN_PIXELS, ImageBudget
from umarvel.data.processor import (IMAGE_PROCESSOR_FILE, TOKENIZER_FILES, has_processor_files, load_image_processor,
                                    set_image_budget)
from umarvel.errors import CheckpointError
from umarvel.model.backbones import BackboneSpec, get_backbone_spec
from umarvel.utils.io import atomic_dir

logger = logging.getLogger(__name__)

UMARVEL_META = "umarvel.json"
MARKER_SEED = 1234
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """``None`` -> bfloat16 on CUDA, float32 elsewhere; strings map to torch dtypes."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    try:
        return DTYPES[str(dtype)]
    except KeyError:
        raise CheckpointError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}") from None


def check_checkpoint_dir(path: str | os.PathLike) -> Path:
    """Validate that ``path`` is a loadable checkpoint folder, with a clear reason otherwise."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint folder not found: {p}")
    if not p.is_dir():
        raise CheckpointError(f"checkpoint path is not a folder: {p}")
    if not (p / "config.json").is_file() and not (p / "adapter_config.json").is_file():
        raise CheckpointError(f"{p}: not a checkpoint folder (no config.json or adapter_config.json)")
    return p


def read_meta(path: str | os.PathLike) -> dict:
    """The ``umarvel.json`` of a folder written by umarvel, or ``{}``."""
    f = Path(path) / UMARVEL_META
    if not f.is_file():
        return {}
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{f}: corrupt ({exc.msg})") from None


def base_and_adapters(path: Path, adapter: str | os.PathLike | None = None) -> tuple[Path, list[Path]]:
    """``(base checkpoint folder, LoRA adapter folders to apply in order)`` of the checkpoint folder ``path``:
    an adapter folder loads its base (``umarvel.json``'s ``base_model``, else ``base_model_name_or_path``);
    ``adapter`` is applied on top."""
    base, adapters = path, []
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        cfg = json.loads((path / "adapter_config.json").read_text())
        base_name = read_meta(path).get("base_model") or cfg.get("base_model_name_or_path")
        if not base_name:
            raise CheckpointError(f"{path}: adapter folder without base_model_name_or_path")
        base, adapters = check_checkpoint_dir(base_name), [path]
    if adapter is not None:
        adapters.append(check_checkpoint_dir(adapter))
    return base, adapters


def model_type_of(path: str | os.PathLike) -> str:
    """``model_type`` from ``config.json``."""
    cfg_file = Path(path) / "config.json"
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{cfg_file}: cannot read config ({exc})") from None
    if "model_type" not in cfg:
        raise CheckpointError(f"{cfg_file}: no model_type")
    return cfg["model_type"]


def official_temperature(path: str | os.PathLike) -> float | None:
    """A temperature saved by the official Finetune class (key ``sim.temp``), if any."""
    from safetensors import safe_open

    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():
                if key.endswith("sim.temp"):
                    return float(fh.get_tensor(key).float())
    return None


def load_hf_backbone(path: str | os.PathLike, dtype: torch.dtype, device: str | torch.device = "cpu",
                     attn_implementation: str = "sdpa") -> tuple[torch.nn.Module, BackboneSpec]:
    """Load the transformers model of a checkpoint folder in ``dtype`` on ``device``."""
    p = check_checkpoint_dir(path)
    spec = get_backbone_spec(model_type_of(p))
    cls = spec.model_class()
    try:
        model = cls.from_pretrained(str(p), dtype=dtype, attn_implementation=attn_implementation)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{p}: cannot load {cls.__name__} ({exc})") from None
    return model.to(device).eval(), spec


def processor_dirs(base: Path, adapters: Sequence[Path], spec: BackboneSpec) -> tuple[Path, Path]:
    """``(tokenizer folder, image-processor folder)`` of a checkpoint: the newest adapter or the base folder
    carrying the files, else the backbone's bundled files (with a warning naming what is missing)."""
    tok_dir = next((p for p in [*adapters[::-1], base] if has_processor_files(p)), None)
    if tok_dir is None:
        logger.warning("%s has no tokenizer files (%s); using the bundled %s tokenizer (%s)", base, TOKENIZER_FILES,
                       spec.name or spec.model_type, spec.processor_dir)
        tok_dir = spec.processor_dir
    proc_dir = base
    if not (base / IMAGE_PROCESSOR_FILE).is_file():
        logger.warning("%s has no %s; using the bundled %s image processor (%s)", base, IMAGE_PROCESSOR_FILE,
                       spec.name or spec.model_type, spec.processor_dir)
        proc_dir = spec.processor_dir
    return tok_dir, proc_dir


def load_image_processor_for(proc_dir: str | os.PathLike, spec: BackboneSpec, model: torch.nn.Module,
                             min_pixels: int | None, max_pixels: int | None) -> tuple[object, ImageBudget]:
    """The image processor of ``proc_dir`` and the image budget resolved for the backbone.

    Returns:
        ``(image_processor, ImageBudget)``: the processor carries the budget; the budget's ``factor`` is the
        processor's ``patch_size * merge_size`` (``ImageBudget.for_backbone``).
    Raises:
        CheckpointError: the processor's patch geometry does not fit the vision tower, or its file is missing.
    """
    ip = load_image_processor(proc_dir, MIN_PIXELS, MAX_PIXELS)
    spec.check_processor(model, ip, str(proc_dir))
    budget = ImageBudget.for_backbone(min_pixels, max_pixels, spec.patch_spec(ip).factor)
    return set_image_budget(ip, budget.min_pixels, budget.max_pixels), budget


def ensure_token_rows(model: torch.nn.Module, tokenizer, seed: int = MARKER_SEED) -> str:
    """Make the U-MARVEL token ids index valid, deterministic rows of the input embedding matrix.

    Grows the matrix if the tokenizer is larger than it (rare; new rows drawn with ``seed``), and
    draws the two instruction-marker rows once from N(0, initializer_range^2) when both are all
    zeros (D14). Returns a short description of what was done.
    """
    emb = model.get_input_embeddings()
    ids = [tokenizer.convert_tokens_to_ids(t) for t in UMARVEL_TOKENS]
    std = float(getattr(model.config, "initializer_range", None)
                or getattr(getattr(model.config, "text_config", None), "initializer_range", 0.02))
    gen = torch.Generator().manual_seed(seed)
    if max(ids) >= emb.weight.shape[0]:
        old = emb.weight.shape[0]
        model.resize_token_embeddings(max(ids) + 1, mean_resizing=False)
        emb = model.get_input_embeddings()
        with torch.no_grad():
            new = torch.randn(emb.weight.shape[0] - old, emb.weight.shape[1], generator=gen) * std
            emb.weight[old:] = new.to(emb.weight)
        logger.warning("grew the embedding matrix from %d to %d rows for the U-MARVEL tokens", old, emb.weight.shape[0])
        return "grown"
    markers = ids[1:]
    with torch.no_grad():
        if bool((emb.weight[markers] == 0).all()):
            rows = torch.randn(len(markers), emb.weight.shape[1], generator=gen) * std
            emb.weight[markers] = rows.to(emb.weight)
            logger.info("instruction-marker rows were zero; drew them once with seed %d (D14)", seed)
            return f"drawn(seed={seed})"
    return "checkpoint"


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, tokenizer, image_processor,
                    meta: dict) -> Path:
    """Write a complete checkpoint folder atomically (temp folder, then rename).

    ``model`` is a plain transformers model (merge or unwrap LoRA first). ``meta`` goes to
    ``umarvel.json`` (temperature, token ids, provenance).
    """
    path = Path(path)
    with atomic_dir(path) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        if image_processor is not None:
            image_processor.save_pretrained(str(tmp))
        (tmp / UMARVEL_META).write_text(json.dumps(meta, indent=2) + "\n")
    return path
