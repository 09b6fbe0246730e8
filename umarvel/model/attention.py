"""Packed (padding-free) attention: block-diagonal attention over sequences concatenated into one row.

A packed forward runs one row ``(1, T)`` holding N sequences back to back; ``cu_seqlens`` (N+1,) int32 marks
their boundaries (``cu_seqlens[i]:cu_seqlens[i+1]`` is sequence i, ``cu_seqlens[-1] == T``). Every token
attends only to the tokens of its own sequence: bidirectionally (U-MARVEL, D5) or causally, as the attention
module's ``is_causal`` says (the reranker). The sequence boundaries travel through the model as transformers'
own flash-attention keyword arguments (``cu_seq_lens_q/k``, ``max_length_q/k``), so no transformers code is
copied: :func:`packed_attention_forward` is registered in ``transformers.AttentionInterface`` under
:data:`PACKED_ATTENTION` and installed on the language model (:func:`install_packed_attention`). Called
without those arguments (a padded batch) it hands over to the implementation the model was loaded with
(``sdpa`` / ``eager``), so the padded path is unchanged.

The vision tower gets the same function under :data:`VISION_ATTENTION`: transformers' Qwen2-VL vision
attention passes ``cu_seqlens`` to implementations whose name contains ``flash``, so all images of a batch
run in one kernel call per layer instead of one SDPA call per image (older transformers without that
dispatch keep calling it per image, and it hands over to SDPA).

Kernels (:func:`select_kernel`, ``UMARVEL_PACKED_KERNEL`` overrides ``auto``):
- ``varlen``: ``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.10; CUDA, fp16/bf16);
- ``flash_attn``: ``flash_attn.flash_attn_varlen_func`` when the package is installed (CUDA, fp16/bf16);
- ``flex``: FlexAttention with a document mask (compiled on CUDA);
- ``sdpa``: each sequence gathered into an (N, H, Lmax, D) block with a key mask and run through
  ``scaled_dot_product_attention`` (any device and dtype: the CPU and fp32 path, and the reference).
"""
from __future__ import annotations

import functools
import inspect
import logging
import os
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

PACKED_ATTENTION = "umarvel_packed"
VISION_ATTENTION = "umarvel_flash_varlen"  # "flash" in the name: transformers then passes cu_seqlens
KERNELS = ("auto", "varlen", "flash_attn", "flex", "sdpa")
_BASE_ATTR = "umarvel_base_attention"  # on each attention module: the implementation padded batches use


# ----------------------------------------------------------------------------------------- kernel choice
@functools.lru_cache(maxsize=None)
def _varlen_fn():
    """``torch.nn.attention.varlen.varlen_attn`` and its keyword names, or None (torch < 2.10)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


@functools.lru_cache(maxsize=None)
def _flash_attn_fn():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def available_kernels(device: torch.device, dtype: torch.dtype) -> list[str]:
    """Packed kernels usable for tensors of ``dtype`` on ``device``, best first."""
    out = []
    half = dtype in (torch.float16, torch.bfloat16)
    if device.type == "cuda" and half:
        if _varlen_fn() is not None and torch.backends.cuda.is_flash_attention_available():
            out.append("varlen")
        if _flash_attn_fn() is not None:
            out.append("flash_attn")
    if device.type == "cuda":
        out.append("flex")
    out.append("sdpa")
    return out


def select_kernel(device: torch.device, dtype: torch.dtype, requested: str | None = None) -> str:
    """The packed kernel to use: ``requested`` (or ``$UMARVEL_PACKED_KERNEL``, default ``auto``).

    ``auto`` picks ``varlen``, then ``flash_attn`` (CUDA, half precision), else ``sdpa`` (FlexAttention is
    used on request only: it compiles a kernel per shape). An explicit kernel that cannot run here raises.
    """
    return _select(device.type, dtype, requested or os.environ.get("UMARVEL_PACKED_KERNEL", "auto"))


@functools.lru_cache(maxsize=64)
def _select(device_type: str, dtype: torch.dtype, requested: str) -> str:
    device = torch.device(device_type)
    if requested not in KERNELS:
        raise ValueError(f"packed attention kernel must be one of {KERNELS}, got {requested!r}")
    usable = available_kernels(device, dtype)
    if requested == "auto":
        return next(k for k in usable if k != "flex")
    if requested not in usable and not (requested == "flex"):
        raise ValueError(f"packed attention kernel {requested!r} is not available for {dtype} on {device.type} "
                         f"(available: {usable})")
    return requested


# ----------------------------------------------------------------------------------------- per-forward cache
class _PackCache:
    """Index structures derived from one ``cu_seqlens`` tensor, reused by every layer of a forward
    (and by its recomputation under activation checkpointing)."""

    def __init__(self):
        self.key = None
        self.value: dict = {}

    def get(self, cu: torch.Tensor) -> dict:
        key = (id(cu), cu.data_ptr(), cu.device, cu.numel(), cu._version)
        if self.key != key:
            self.key, self.value = key, {"cu": cu}  # hold cu: its id stays unique while cached
        return self.value


_CACHE = _PackCache()


def _segment_index(cu: torch.Tensor, max_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather index (N, Lmax) into the packed row (pads point at 0), the validity mask (N, Lmax) and the
    flat positions of the valid entries (T,) (computed once per forward: one data-dependent op)."""
    store = _CACHE.get(cu)
    if "index" not in store:
        starts, lens = cu[:-1].long(), (cu[1:] - cu[:-1]).long()
        ar = torch.arange(max_len, device=cu.device)
        valid = ar[None, :] < lens[:, None]
        store["index"] = torch.where(valid, starts[:, None] + ar[None, :], torch.zeros_like(ar)[None, :])
        store["valid"] = valid
        store["flat"] = valid.reshape(-1).nonzero().squeeze(1)
    return store["index"], store["valid"], store["flat"]


def segment_ids(cu: torch.Tensor, total: int) -> torch.Tensor:
    """Sequence index of every packed position: (T,) int64 (no host sync)."""
    pos = torch.arange(total, device=cu.device)
    return torch.searchsorted(cu[1:].long(), pos, right=True)


# ----------------------------------------------------------------------------------------- kernels
def _sdpa_packed(q, k, v, cu, max_len, causal, scale):
    """q: (T, H, D), k/v: (T, Hkv, D) -> (T, H, D) via per-sequence blocks and a key mask."""
    index, valid, flat = _segment_index(cu, max_len)
    qs, ks, vs = (x[index].transpose(1, 2) for x in (q, k, v))  # (N, H, Lmax, D)
    mask = valid[:, None, None, :]
    if causal:
        mask = mask & torch.ones(max_len, max_len, dtype=torch.bool, device=q.device).tril()[None, None]
    if ks.shape[1] != qs.shape[1]:
        rep = qs.shape[1] // ks.shape[1]
        ks, vs = ks.repeat_interleave(rep, dim=1), vs.repeat_interleave(rep, dim=1)
    out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale)  # (N, H, Lmax, D)
    out = out.transpose(1, 2).reshape(-1, out.shape[1], out.shape[3])  # (N * Lmax, H, D)
    return out.index_select(0, flat)  # (T, H, D): sequences are contiguous and in order


def _varlen_packed(q, k, v, cu, max_len, causal, scale):
    fn, params = _varlen_fn()
    kw = {}
    if "scale" in params:
        kw["scale"] = scale
    if "window_size" in params:
        kw["window_size"] = (-1, 0) if causal else (-1, -1)
    elif causal:
        kw["is_causal"] = True
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:  # torch 2.10/2.11: expand the key/value heads
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return fn(q, k, v, cu, cu, max_len, max_len, **kw)


def _flash_attn_packed(q, k, v, cu, max_len, causal, scale):
    return _flash_attn_fn()(q, k, v, cu, cu, max_len, max_len, dropout_p=0.0, softmax_scale=scale, causal=causal)


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def _flex_packed(q, k, v, cu, max_len, causal, scale):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    store = _CACHE.get(cu)
    total = q.shape[0]
    if ("block_mask", causal) not in store:
        doc = segment_ids(cu, total)

        def mask_mod(b, h, qi, ki):
            same = doc[qi] == doc[ki]
            return same & (qi >= ki) if causal else same

        store[("block_mask", causal)] = create_block_mask(mask_mod, None, None, total, total, device=q.device)
    fn = _compiled_flex() if q.device.type == "cuda" else flex_attention
    out = fn(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
             block_mask=store[("block_mask", causal)], scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    return out[0].transpose(0, 1)  # (T, H, D)


_KERNEL_FNS = {"sdpa": _sdpa_packed, "varlen": _varlen_packed, "flash_attn": _flash_attn_packed, "flex": _flex_packed}


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int,
                     causal: bool = False, scale: float | None = None, kernel: str | None = None) -> torch.Tensor:
    """Block-diagonal attention over packed sequences.

    Args:
        q: (T, H, D); k, v: (T, Hkv, D) with H a multiple of Hkv.
        cu_seqlens: (N+1,) int32 boundaries on q's device, ``cu_seqlens[-1] == T``.
        max_len: the longest sequence (a Python int: no host sync).
        causal: causal within each sequence (else bidirectional).
        kernel: see :func:`select_kernel`.
    Returns:
        (T, H, D) in q's dtype.
    """
    name = select_kernel(q.device, q.dtype, kernel)
    return _KERNEL_FNS[name](q, k, v, cu_seqlens, int(max_len), causal, scale)


# ----------------------------------------------------------------------------------------- transformers hook
def packed_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """A transformers attention function (``AttentionInterface``): packed when ``cu_seq_lens_q`` is given.

    Args:
        query: (1, H, T, D); key / value: (1, Hkv, T, D) (transformers' layout).
        kwargs: ``cu_seq_lens_q`` (N+1,) int32, ``max_length_q`` int; anything else is passed on to the
            module's base implementation for padded batches.
    Returns:
        ``(attn_output (1, T, H, D), None)``.
    """
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        base = getattr(module, _BASE_ATTR, "sdpa")
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        if base == "eager" or base not in ALL_ATTENTION_FUNCTIONS:
            mask = _additive_mask(attention_mask, module, query, key, kwargs.get("is_causal"))
            return _eager(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
        return ALL_ATTENTION_FUNCTIONS[base](module, query, key, value, attention_mask, dropout=dropout,
                                             scaling=scaling, **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"packed attention expects one packed row, got a batch of {query.shape[0]}")
    if attention_mask is not None:
        raise ValueError("packed attention takes no attention mask (sequence boundaries come from cu_seqlens)")
    max_len = kwargs.get("max_length_q")
    if max_len is None:  # transformers computes it for the vision tower in some versions; else one host sync
        max_len = int((cu[1:] - cu[:-1]).max())
    causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", False)))
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # (T, H, D)
    if q.device.type == "cuda":
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = packed_attention(q, k, v, cu.to(torch.int32), max_len, causal, scaling,
                           kernel=getattr(module, "umarvel_packed_kernel", None))
    return out[None], None


def _additive_mask(mask, module, query, key, is_causal):
    """The SDPA-style mask transformers built for us (boolean, or None for a plain causal / full pattern) as
    the additive float mask eager attention expects."""
    if mask is not None and mask.dtype != torch.bool:
        return mask
    q_len, k_len = query.shape[2], key.shape[2]
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", False))
    if mask is None:
        if not (causal and q_len > 1):
            return None
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)[None, None]
    return torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
        ~mask, torch.finfo(query.dtype).min)


def _eager(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' eager attention of the module's model family."""
    mod = inspect.getmodule(type(module))
    fn = getattr(mod, "eager_attention_forward", None)
    if fn is None:
        raise ValueError(f"{type(module).__name__}: no eager attention function found in {mod}")
    return fn(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


@functools.lru_cache(maxsize=None)
def register() -> None:
    """Register :func:`packed_attention_forward` in transformers' ``AttentionInterface`` (once)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PACKED_ATTENTION, packed_attention_forward)
    AttentionInterface.register(VISION_ATTENTION, packed_attention_forward)
    # padded batches whose mask transformers builds (the reranker): SDPA's boolean mask format
    AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)
    AttentionMaskInterface.register(VISION_ATTENTION, sdpa_mask)


def _install(modules: Iterable[nn.Module], config, name: str) -> None:
    """Point ``config`` at ``name``, remembering the previous implementation on each module."""
    current = getattr(config, "_attn_implementation", None) or "eager"
    if current.startswith("flash_attention"):
        return  # transformers' own flash-attention already reads cu_seq_lens_* (packed batches work)
    if current not in (PACKED_ATTENTION, VISION_ATTENTION):
        for m in modules:
            setattr(m, _BASE_ATTR, current)
    config._attn_implementation = name


def install_packed_attention(language_config, lm_attention: Iterable[nn.Module], vision_config=None,
                             vision_attention: Iterable[nn.Module] = ()) -> None:
    """Route the language model's (and the vision tower's) attention through :func:`packed_attention_forward`.

    Padded batches keep their old implementation; the configs' ``_attn_implementation`` is not saved with
    a checkpoint (transformers drops it from ``config.json``). Idempotent.
    """
    register()
    _install(list(lm_attention), language_config, PACKED_ATTENTION)
    if vision_config is not None:
        _install(list(vision_attention), vision_config, VISION_ATTENTION)


def packing_supported(language_config) -> bool:
    """Whether the language model's attention understands packed keyword arguments."""
    impl = getattr(language_config, "_attn_implementation", None) or ""
    return impl == PACKED_ATTENTION or impl.startswith("flash_attention")


def packed_kwargs(cu_seqlens: torch.Tensor, max_len: int) -> dict:
    """The keyword arguments carrying sequence boundaries through a transformers model."""
    return {"cu_seq_lens_q": cu_seqlens, "cu_seq_lens_k": cu_seqlens, "max_length_q": int(max_len),
            "max_length_k": int(max_len)}
