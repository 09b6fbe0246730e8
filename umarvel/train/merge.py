"""Merge a stage's LoRA adapter into its base weights (decision D13).

The merge runs in the training dtype (bf16 by default, read from the adapter's ``umarvel.json``), keeps the
temperature learned in the stage (stored in the adapter's ``umarvel.json``) and the added tokens (tokenizer
with ``<emb>``/markers, embedding rows of the base), and writes a complete checkpoint folder atomically. The
result loads with ``UMarvel.from_pretrained`` and embeds like base + adapter (up to the merge's rounding in
the merge dtype).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from umarvel.api import UMarvel
from umarvel.model.loading import check_checkpoint_dir, read_meta, resolve_dtype
from umarvel.model.lora import merge_lora

logger = logging.getLogger(__name__)


def merge_adapter(base: str | os.PathLike, adapter: str | os.PathLike, output: str | os.PathLike,
                  dtype: str | None = None, device: str = "cpu") -> Path:
    """Load ``base`` + ``adapter``, merge in ``dtype`` and save to ``output``.

    Args:
        base: the checkpoint the adapter was trained on (the stage's ``init_from``).
        adapter: a LoRA adapter folder (``output_dir/adapter`` or ``checkpoints/step-N/adapter``).
        output: the merged checkpoint folder to write.
        dtype: merge/save dtype; default the adapter's ``train_dtype`` (bf16 for the published stages).
        device: where to merge (``cpu`` is enough; ``cuda`` is faster for 7B).

    Returns:
        The output folder.
    """
    adapter = check_checkpoint_dir(adapter)
    meta = read_meta(adapter)
    dtype = dtype or meta.get("train_dtype") or "bfloat16"
    model = UMarvel.from_pretrained(base, device=device, dtype=dtype, adapter=adapter)
    merge_lora(model.embedder, resolve_dtype(dtype, device))
    extra = {"merged_from": {"base": str(Path(base).resolve()), "adapter": str(Path(adapter).resolve())},
             "stage": meta.get("stage"), "train_dtype": dtype}
    out = model.save_pretrained(output, extra_meta=extra)
    logger.info("merged %s + %s -> %s (%s, temperature %.6g)", base, adapter, out, dtype, model.temperature)
    return out
