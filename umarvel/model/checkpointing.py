"""Activation checkpointing of the language model: ``full``, ``selective`` (every k-th layer) or ``none``.

transformers' switch (``activation_checkpointing_enable``, formerly ``gradient_checkpointing_enable``) is used
to install the non-reentrant checkpoint function; which layers then recompute is set per decoder layer (its
``gradient_checkpointing`` flag). The vision tower is never checkpointed: it is frozen and runs without autograd
(``BackboneSpec.vision_features``), so there is nothing to recompute.
"""
from __future__ import annotations

import logging
from typing import Literal

from torch import nn

logger = logging.getLogger(__name__)

Mode = Literal["full", "selective", "none"]
MODES = ("full", "selective", "none")


def set_activation_checkpointing(hf_model: nn.Module, language_model: nn.Module, visual: nn.Module | None,
                                 mode: Mode = "full", every_k: int = 2) -> list[int]:
    """Checkpoint the decoder layers of ``language_model`` per ``mode``.

    Args:
        hf_model: the transformers ``PreTrainedModel`` (owner of the enable / disable switches).
        language_model: its decoder stack (``.layers``).
        visual: the vision tower (its checkpointing is turned off), or None.
        mode: ``full`` (every layer), ``selective`` (layers 0, k, 2k, ...: the others keep their activations,
            trading memory for less recomputation), ``none``.
        every_k: k of ``selective`` (>= 1; 1 = full).
    Returns:
        The indices of the checkpointed layers.
    """
    if mode not in MODES:
        raise ValueError(f"activation checkpointing must be one of {MODES}, got {mode!r}")
    if every_k < 1:
        raise ValueError(f"checkpoint_every_k must be >= 1, got {every_k}")
    if mode == "none":
        disable = getattr(hf_model, "activation_checkpointing_disable", None) or hf_model.gradient_checkpointing_disable
        disable()
        return []
    if hasattr(hf_model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        hf_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if visual is not None:
        for m in visual.modules():
            if hasattr(m, "gradient_checkpointing"):
                m.gradient_checkpointing = False
    k = 1 if mode == "full" else every_k
    chosen = []
    for i, layer in enumerate(language_model.layers):
        layer.gradient_checkpointing = i % k == 0
        if layer.gradient_checkpointing:
            chosen.append(i)
    logger.info("activation checkpointing %s: %d of %d decoder layers", mode, len(chosen), len(language_model.layers))
    return chosen
