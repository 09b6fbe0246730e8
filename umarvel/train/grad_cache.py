"""Gradient cache (GradCache, Gao et al. 2021): large contrastive batches with the memory of one chunk.

Pass 1 embeds every chunk without autograd, computes the loss on the full embeddings (leaf tensors with
``requires_grad``) and backpropagates it to d loss / d embeddings. Pass 2 re-embeds each chunk with autograd
and backpropagates the cached embedding gradient into the parameters. The RNG state of each chunk is saved
in pass 1 and restored in pass 2, so dropout (LoRA dropout included) draws the same masks
(sentence-transformers' ``RandContext``).

Composition with :func:`umarvel.dist.all_gather_with_grad`: the loss function may gather the pass-1 leaf
embeddings; the gather's backward sums the other ranks' gradients into this rank's leaf gradient, which pass 2
then pushes into the local parameters. Parameters used only by the loss (the learnable temperature) get
their gradient directly from pass 1. No backward here synchronises ranks: the trainer all-reduces the
gradients once per optimiser step.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, ContextManager, Sequence

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

EmbedFn = Callable[[Any], Tensor]


class RandContext:
    """Capture the CPU (and initialised CUDA) RNG state now; ``with ctx:`` replays it, then restores.

    Used so the pass-2 forward of a chunk draws the same dropout masks as its pass-1 forward, while the global
    RNG stream after the step is the one pass 1 left.
    """

    def __init__(self) -> None:
        self.cpu_state = torch.get_rng_state()
        self.cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        self._fork: ContextManager | None = None

    def __enter__(self) -> RandContext:
        devices = list(range(len(self.cuda_states))) if self.cuda_states is not None else []
        self._fork = torch.random.fork_rng(devices=devices, enabled=True)
        self._fork.__enter__()
        torch.set_rng_state(self.cpu_state)
        if self.cuda_states is not None:
            torch.cuda.set_rng_state_all(self.cuda_states)
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._fork is not None
        self._fork.__exit__(*exc)
        self._fork = None


def _embed_fns(embed_fn: EmbedFn | Sequence[EmbedFn], groups: int) -> list[EmbedFn]:
    """One embedding function per input group."""
    if callable(embed_fn):
        return [embed_fn] * groups
    fns = list(embed_fn)
    if len(fns) != groups:
        raise ValueError(f"{len(fns)} embed functions for {groups} input groups")
    return fns


def _first_pass(
    fns: list[EmbedFn], inputs: Sequence[Sequence[Any]], restore_rng: bool
) -> tuple[list[Tensor], list[list[RandContext | None]], list[list[int]]]:
    """Embed every chunk without grad; return per-group leaf embeddings (n_g, D), RNG states, chunk sizes."""
    leaves, states, sizes = [], [], []
    for fn, chunks in zip(fns, inputs):
        embs, group_states = [], []
        for chunk in chunks:
            group_states.append(RandContext() if restore_rng else None)
            with torch.no_grad():
                embs.append(fn(chunk))  # (b, D)
        if not embs:
            raise ValueError("every input group needs at least one chunk")
        leaves.append(torch.cat(embs, dim=0).detach().requires_grad_(True))  # (n_g, D)
        states.append(group_states)
        sizes.append([e.shape[0] for e in embs])
    return leaves, states, sizes


def grad_cache_step(
    embed_fn: EmbedFn | Sequence[EmbedFn],
    inputs: Sequence[Sequence[Any]],
    loss_fn: Callable[..., Tensor],
    restore_rng: bool = True,
) -> Tensor:
    """One cached forward/backward; parameter ``.grad`` ends up as for a plain step on the whole batch.

    Args:
        embed_fn: ``embed_fn(chunk) -> (b, D)`` (one function, or one per input group).
        inputs: per input group (e.g. ``[query_chunks, candidate_chunks, negative_chunks]``), the list of
            sub-batches to embed; a group's embeddings are the concatenation of its chunks (n_g, D).
        loss_fn: ``loss_fn(*group_embeddings) -> scalar``; may call
            :func:`umarvel.dist.all_gather_with_grad` and use parameters of its own (temperature).
        restore_rng: replay each chunk's RNG state in pass 2 (keep True; False only to show why it matters).

    Returns:
        The detached 0-d loss. Gradients are accumulated into the parameters (``.grad``), not zeroed.
    """
    fns = _embed_fns(embed_fn, len(inputs))
    leaves, states, sizes = _first_pass(fns, inputs, restore_rng)
    loss = loss_fn(*leaves)
    if loss.dim() != 0:
        raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
    loss.backward()  # d loss / d embeddings into the leaves (+ grads of loss-only parameters)
    for g in range(len(inputs)):
        grad = leaves[g].grad
        cached = torch.zeros_like(leaves[g]) if grad is None else grad  # (n_g, D)
        for i, chunk in enumerate(inputs[g]):
            start = sum(sizes[g][:i])
            with states[g][i] if states[g][i] is not None else contextlib.nullcontext():
                emb = fns[g](chunk)  # (b, D)
            torch.autograd.backward(emb, cached[start : start + emb.shape[0]])
    return loss.detach()
