"""Public embedding API: ``UMarvel.from_pretrained(...).encode_queries / encode_candidates``."""
from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from umarvel.data.collate import (EmbedInput, EmbeddingCollator, EmbeddingTokenizer, TokenizedInput, plan_batches,
                                  sequential_batches)
from umarvel.data.formatting import INFERENCE_STYLE, UMARVEL_TOKENS, PromptStyle, format_string, query_text_with_instruction
from umarvel.data.images import MAX_PIXELS, MIN_PIXELS, ImageBudget, load_image
from umarvel.data.packing import EncodeChunks, PackedCollator, chunk_bounds, plan_packs, to_device
from umarvel.data.processor import build_hf_processor, load_tokenizer
from umarvel.data.visual import PatchSpec, image_patches
from umarvel.errors import CheckpointError, DataError
from umarvel.log import progress_disabled
from umarvel.model import loading
from umarvel.model.backbones import get_backbone_spec
from umarvel.model.embedder import DEFAULT_TEMPERATURE, UMarvelEmbedder
from umarvel.model.lora import is_lora, load_lora
from umarvel.utils.checks import check_device
from umarvel.utils.compat import DEFAULT, check_compat, is_official
from umarvel.version import __version__

logger = logging.getLogger(__name__)

QUERY_KEYS = frozenset({"text", "image", "instruction", "id"})
CANDIDATE_KEYS = frozenset({"text", "image", "id"})


@dataclass(frozen=True)
class EncodeSettings:
    """Everything besides the weights that changes an embedding (part of the cache fingerprint)."""

    min_pixels: int = MIN_PIXELS
    max_pixels: int = MAX_PIXELS
    style: PromptStyle = field(default_factory=lambda: INFERENCE_STYLE)
    attention: str = "bidirectional"
    positions: str = "1d"
    dtype: str = "float32"
    compat: str = DEFAULT

    def as_dict(self) -> dict:
        """JSON-serialisable form (``asdict`` recurses into ``style``)."""
        return asdict(self)


def validate_item(item: Any, index: int, role: str) -> tuple[str | None, Any, str | None]:
    """Check one input dict; return ``(text, image, instruction)``.

    Raises:
        DataError: naming the item index and the problem (not a dict, unknown key, wrong type,
            neither text nor image, instruction on a candidate).
    """
    allowed = QUERY_KEYS if role == "query" else CANDIDATE_KEYS
    if not isinstance(item, Mapping):
        raise DataError(f"{role} item {index}: expected a dict with 'text' and/or 'image', got {type(item).__name__}")
    unknown = set(item) - allowed
    if unknown:
        raise DataError(f"{role} item {index}: unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    text, image, instruction = item.get("text"), item.get("image"), item.get("instruction")
    if text is not None and not isinstance(text, str):
        raise DataError(f"{role} item {index}: 'text' must be a string, got {type(text).__name__}")
    if instruction is not None and not isinstance(instruction, str):
        raise DataError(f"{role} item {index}: 'instruction' must be a string, got {type(instruction).__name__}")
    if image is not None and not isinstance(image, (str, os.PathLike)) and not hasattr(image, "convert"):
        raise DataError(f"{role} item {index}: 'image' must be a path or a PIL image, got {type(image).__name__}")
    if (text is None or not text.strip()) and image is None:
        raise DataError(f"{role} item {index}: has neither text nor image (an empty text does not count)")
    return text, image, instruction


class UMarvel:
    """A U-MARVEL embedding model ready to encode queries and candidates.

    ``compat="official"`` (docs/decisions.md, "Compatibility mode") reproduces the official evaluation
    numerics: a batch without padding runs causal (D5), and batches are formed in input order with the given
    ``batch_size`` (no length sorting, no token budget), the last one completed with the first items as
    accelerate's ``even_batches`` does (their vectors are discarded). Pass the benchmark's official batch size.

    Attributes:
        embedder: the ``UMarvelEmbedder`` nn.Module (for training code).
        tokenizer / image_processor: the checkpoint's tokenizer (with U-MARVEL tokens) and PIL image processor.
        settings: the :class:`EncodeSettings` in force.
        packing: encode packed batches (no padding; ``umarvel.data.packing``) where the embedder supports
            them (1-D positions, not ``compat="official"``); False uses length-sorted padded batches.
        preprocess_workers: DataLoader worker processes for image decoding, patches and tokenization
            (``None``: up to 8 on CUDA, 0 on CPU, where preprocessing runs in threads of this process).
        last_encode_stats: counters of the last ``encode_*`` call (items, batches, real / padded tokens,
            wall and model-busy seconds).
    """

    def __init__(self, embedder: UMarvelEmbedder, tokenizer, image_processor, settings: EncodeSettings,
                 device: str | torch.device = "cpu", source: str | None = None, load_workers: int = 8,
                 preprocess_workers: int | None = None):
        self.embedder = embedder
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.settings = settings
        self.device = torch.device(device)
        self.source = source
        self.load_workers = load_workers
        self.preprocess_workers = preprocess_workers
        self.packing = not is_official(settings.compat)  # official numerics need padded batches (D5)
        self.chunk_items: int | None = None  # inputs per preprocessing chunk (None: 512; the first one 64)
        self.last_encode_stats: dict = {}
        self.patch_spec: PatchSpec = embedder.spec.patch_spec(image_processor)
        self.budget = ImageBudget(settings.min_pixels, settings.max_pixels, self.patch_spec.factor)
        self._tok = EmbeddingTokenizer(tokenizer, settings.style, self.patch_spec)
        self._collator = EmbeddingCollator(tokenizer, image_processor)
        self._packed_collator = PackedCollator(tokenizer, image_processor)
        self._processor = None

    # ------------------------------------------------------------------ construction / saving
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: str | torch.dtype | None = None, min_pixels: int | None = MIN_PIXELS,
                        max_pixels: int | None = MAX_PIXELS, attn_implementation: str = "sdpa",
                        adapter: str | os.PathLike | None = None, style: PromptStyle = INFERENCE_STYLE,
                        attention: str = "bidirectional", positions: str = "1d",
                        compat: str = DEFAULT) -> "UMarvel":
        """Load a checkpoint folder (released 4.x layout, one umarvel saved, or a LoRA adapter folder).

        Args:
            path: checkpoint folder; a LoRA adapter folder loads its base (``base_model_name_or_path``).
            device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
            dtype: ``"float32"``, ``"bfloat16"``, ``"float16"``; default bf16 on CUDA, fp32 on CPU.
            min_pixels / max_pixels: image budget (official 4*28*28 .. 300*28*28, i.e. 4 .. 300 visual tokens;
                on Qwen3-VL these defaults mean 4*32*32 .. 300*32*32, ``ImageBudget.for_backbone``).
            adapter: an extra LoRA adapter folder applied on top of ``path``.
            compat: ``"default"`` or ``"official"`` (the official evaluation numerics, see the class doc).

        The backbone comes from the folder's ``config.json`` (``model_type``: qwen2_vl, qwen2_5_vl, qwen3_vl).
        A folder without tokenizer or image-processor files falls back to the backbone's bundled files, with
        a warning that names the missing files.
        """
        check_device(device)  # EnvError for a device this machine does not have, before anything loads
        compat = check_compat(compat)
        path = loading.check_checkpoint_dir(path)
        torch_dtype = loading.resolve_dtype(dtype, device)
        base, adapters = loading.base_and_adapters(path, adapter)
        model, spec = loading.load_hf_backbone(base, torch_dtype, device, attn_implementation)
        tok_dir, proc_dir = loading.processor_dirs(base, adapters, spec)
        tokenizer = load_tokenizer(tok_dir)
        image_processor, budget = loading.load_image_processor_for(proc_dir, spec, model, min_pixels, max_pixels)
        marker_rows = loading.ensure_token_rows(model, tokenizer)
        meta = loading.read_meta(adapters[-1] if adapters else base) or loading.read_meta(base)
        temperature = meta.get("temperature", loading.official_temperature(base) or DEFAULT_TEMPERATURE)
        embedder = UMarvelEmbedder(model, spec, temperature=temperature, attention=attention, positions=positions,
                                   causal_when_unpadded=is_official(compat))
        for a in adapters:
            load_lora(embedder, a)
        embedder.to(device).eval()
        settings = EncodeSettings(budget.min_pixels, budget.max_pixels, style, attention, positions,
                                  str(torch_dtype).split(".")[-1], compat)
        logger.info("loaded %s (%s, %s on %s, marker rows: %s, temperature %.4g, compat %s)", path, spec.model_type,
                    settings.dtype, device, marker_rows, temperature, compat)
        return cls(embedder, tokenizer, image_processor, settings, device=device, source=str(path))

    @classmethod
    def from_backbone(cls, model: torch.nn.Module, processor_dir: str | os.PathLike | None = None,
                      device: str | torch.device = "cpu", min_pixels: int | None = MIN_PIXELS,
                      max_pixels: int | None = MAX_PIXELS, style: PromptStyle = INFERENCE_STYLE,
                      temperature: float = DEFAULT_TEMPERATURE, attention: str = "bidirectional",
                      positions: str = "1d", compat: str = DEFAULT) -> "UMarvel":
        """Wrap an in-memory transformers model (e.g. a randomly initialised one for benchmarks).

        The tokenizer and image processor come from ``processor_dir`` (default: the backbone's bundled files).
        """
        compat = check_compat(compat)
        spec = get_backbone_spec(model.config.model_type)
        processor_dir = processor_dir if processor_dir is not None else spec.processor_dir
        tokenizer = load_tokenizer(processor_dir)
        image_processor, budget = loading.load_image_processor_for(processor_dir, spec, model, min_pixels, max_pixels)
        loading.ensure_token_rows(model, tokenizer)
        dtype = next(model.parameters()).dtype
        embedder = UMarvelEmbedder(model, spec, temperature=temperature, attention=attention, positions=positions,
                                   causal_when_unpadded=is_official(compat))
        embedder.to(device).eval()
        settings = EncodeSettings(budget.min_pixels, budget.max_pixels, style, attention, positions,
                                  str(dtype).split(".")[-1], compat)
        return cls(embedder, tokenizer, image_processor, settings, device=device, source="<in-memory>")

    def save_pretrained(self, path: str | os.PathLike, extra_meta: dict | None = None) -> Path:
        """Write a self-contained checkpoint folder (merged weights, tokenizer with tokens, umarvel.json)."""
        if is_lora(self.embedder):
            raise CheckpointError("save_pretrained needs merged weights: call umarvel.model.lora.merge_lora first, "
                                  "or save the adapter with umarvel.model.lora.save_lora")
        return loading.save_checkpoint(path, self.embedder.hf_model, self.tokenizer, self.image_processor,
                                       self.checkpoint_meta(extra_meta))

    def checkpoint_meta(self, extra: dict | None = None) -> dict:
        """The ``umarvel.json`` content describing this model."""
        meta = {"format_version": 1, "umarvel_version": __version__,
                "model_type": self.embedder.spec.model_type,
                "temperature": float(self.embedder.temperature.detach().float()),
                "added_tokens": {t: self.tokenizer.convert_tokens_to_ids(t) for t in UMARVEL_TOKENS},
                "attention": self.settings.attention, "positions": self.settings.positions}
        meta.update(extra or {})
        return meta

    # ------------------------------------------------------------------ properties
    @property
    def backbone(self) -> torch.nn.Module:
        """The underlying transformers model."""
        return self.embedder.backbone

    @property
    def processor(self):
        """The backbone's transformers processor (``Qwen2VLProcessor``...; image + text) for users who need one."""
        if self._processor is None:
            self._processor = build_hf_processor(self.tokenizer, self.image_processor, self.embedder.spec.model_type)
        return self._processor

    @property
    def temperature(self) -> float:
        """The model's temperature tau."""
        return float(self.embedder.temperature.detach().float())

    @property
    def embed_dim(self) -> int:
        """Embedding dimension D."""
        return self.embedder.embed_dim

    @property
    def dtype(self) -> torch.dtype:
        return loading.resolve_dtype(self.settings.dtype, self.device)

    def fingerprint(self) -> str:
        """A short hash of the weights (sampled checksum), the checkpoint identity and the settings.

        Any change of checkpoint, adapter, added-token rows or preprocessing setting changes it, so
        embedding caches are never silently reused across them.
        """
        h = hashlib.sha256()
        h.update(json.dumps(self.settings.as_dict(), sort_keys=True).encode())
        h.update(json.dumps(self.checkpoint_meta(), sort_keys=True, default=str).encode())
        with torch.no_grad():
            for name, p in sorted(self.embedder.named_parameters(), key=lambda kv: kv[0]):
                flat = p.detach().reshape(-1)
                step = max(1, flat.numel() // 4096)
                sample = flat[::step].double().cpu().numpy()
                h.update(name.encode())
                h.update(np.float64(sample.sum()).tobytes())
                h.update(np.float64((sample * np.arange(1, sample.size + 1)).sum()).tobytes())
            emb = self.embedder.hf_model.get_input_embeddings().weight
            ids = [self.tokenizer.convert_tokens_to_ids(t) for t in UMARVEL_TOKENS]
            h.update(emb[ids].detach().float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    # ------------------------------------------------------------------ encoding
    def prepare_query(self, item: Mapping, index: int = 0) -> tuple[str, Any]:
        """Final user text and image reference of one query dict (instruction wrapped in markers)."""
        text, image, instruction = validate_item(item, index, "query")
        return query_text_with_instruction(instruction, text or ""), image

    def prepare_candidate(self, item: Mapping, index: int = 0) -> tuple[str, Any]:
        """Final user text and image reference of one candidate dict."""
        text, image, _ = validate_item(item, index, "candidate")
        return format_string(text or ""), image

    def encode_queries(self, items: Sequence[Mapping], batch_size: int = 32, max_tokens: int | None = None,
                       show_progress: bool | None = None, fill: Sequence[Mapping] | None = None) -> np.ndarray:
        """Embed query dicts ``{"text", "image", "instruction"}`` -> float32 (N, D), L2-normalised, in order.

        ``fill`` (``compat="official"`` only): the items whose first ones complete a last partial batch
        (default: the first items of ``items``); for callers that encode one list in several calls.
        """
        prepared = [self.prepare_query(it, i) for i, it in enumerate(items)]
        head = None if fill is None else [self.prepare_query(it, i) for i, it in enumerate(fill[:batch_size])]
        return self._encode(prepared, "query", batch_size, max_tokens, show_progress, head)

    def encode_candidates(self, items: Sequence[Mapping], batch_size: int = 32, max_tokens: int | None = None,
                          show_progress: bool | None = None, fill: Sequence[Mapping] | None = None) -> np.ndarray:
        """Embed candidate dicts ``{"text", "image"}`` -> float32 (N, D), L2-normalised, in order (``fill``:
        see :meth:`encode_queries`)."""
        prepared = [self.prepare_candidate(it, i) for i, it in enumerate(items)]
        head = None if fill is None else [self.prepare_candidate(it, i) for i, it in enumerate(fill[:batch_size])]
        return self._encode(prepared, "candidate", batch_size, max_tokens, show_progress, head)

    def encode_prepared(self, loaders: Sequence[Callable[[], EmbedInput]], role: str = "item",
                        batch_size: int = 32, max_tokens: int | None = None, show_progress: bool | None = None,
                        style: PromptStyle | None = None,
                        fill: Sequence[Callable[[], EmbedInput]] | None = None) -> np.ndarray:
        """Embed inputs given as zero-argument loaders returning :class:`EmbedInput` (run in a thread pool).

        The general entry point behind ``encode_queries`` / ``encode_candidates``: callers with their
        own text rules, videos or interleaved content (zero-shot sets) build the ``EmbedInput`` themselves.
        ``style`` overrides the prompt style (suffix / generation prompt) for this call only. With
        ``compat="official"`` the batches are formed in input order (see the class doc); ``fill`` gives the
        loaders whose first ones complete a last partial batch (default: ``loaders`` itself).

        Returns:
            float32 (N, D), L2-normalised, in input order.
        """
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        out = np.zeros((len(loaders), self.embed_dim), dtype=np.float32)
        if not loaders:
            return out
        max_tokens = max_tokens or batch_size * 1024
        tok = (self._tok if style is None or style == self.settings.style
               else EmbeddingTokenizer(self.tokenizer, style, self.patch_spec))
        show = (len(loaders) >= 256 and not progress_disabled()) if show_progress is None else show_progress
        from tqdm.auto import tqdm

        bar = tqdm(total=len(loaders), desc=f"encode {role}s", unit="item", disable=not show)
        stats = {"items": len(loaders), "batches": 0, "real_tokens": 0, "padded_tokens": 0, "patches": 0,
                 "busy_s": 0.0}
        timer = _BusyTimer(self.device)
        t0 = time.perf_counter()
        pending = None  # (indices, device embeddings): copied out after the next batch is queued
        for idx, batch in self._batches(loaders, tok, batch_size, max_tokens, fill):
            stats["batches"] += 1
            stats["real_tokens"] += int(batch["attention_mask"].sum())
            stats["padded_tokens"] += batch["input_ids"].numel()
            stats["patches"] += sum(batch[k].shape[0] for k in ("pixel_values", "pixel_values_videos") if k in batch)
            with timer:
                emb = self.embed_batch(batch)[:len(idx)]  # completion rows (official) dropped
            if pending is not None:
                out[pending[0]] = pending[1].cpu().numpy()
                bar.update(len(pending[0]))
            pending = (idx, emb)
        if pending is not None:
            out[pending[0]] = pending[1].cpu().numpy()
            bar.update(len(pending[0]))
        bar.close()
        stats["busy_s"] = timer.total()
        stats["wall_s"] = time.perf_counter() - t0
        self.last_encode_stats = stats
        return out

    @property
    def packs(self) -> bool:
        """Whether ``encode_*`` builds packed batches (``packing`` and supported by the embedder)."""
        return self.packing and self.embedder.supports_packing

    def _workers(self, n_chunks: int) -> int:
        """Preprocessing worker processes for an encode call of ``n_chunks`` chunks."""
        if n_chunks < 2 or "fork" not in torch.multiprocessing.get_all_start_methods():
            return 0
        if self.preprocess_workers is not None:
            return max(0, self.preprocess_workers)
        return min(8, max(1, (os.cpu_count() or 2) - 2)) if self.device.type == "cuda" else 0

    def _loader(self, text: str, image: Any, what: str) -> Callable[[], EmbedInput]:
        """A loader for one input: open + resize the image and compute its patches (in a worker thread)."""
        if image is None:
            return lambda: EmbedInput(text)

        def load() -> EmbedInput:
            im = load_image(image, self.budget, what=what)
            return EmbedInput(text, (im,), patches=(image_patches(im, self._collator.patch_spec),))
        return load

    def _batches(self, loaders: Sequence[Callable[[], EmbedInput]], tok: EmbeddingTokenizer, batch_size: int,
                 max_tokens: int, fill: Sequence[Callable[[], EmbedInput]] | None = None
                 ) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
        """Yield ``(indices, collated batch)`` chunk by chunk: packed (first-fit decreasing under ``max_tokens``)
        or length-sorted padded batches, or (``compat="official"``) padded consecutive batches in input order,
        the last one completed by :class:`_OfficialCollate` (those extra rows come after ``indices`` in the batch).

        Loading, tokenization and collation run in DataLoader worker processes (pinned memory) when
        :meth:`_workers` allows, else in a background thread with a thread pool for the images.
        """
        official = is_official(self.settings.compat)
        if official:  # chunks aligned to batch_size: only the very last batch can be partial
            collate = _OfficialCollate(self._collator, tok, fill if fill is not None else loaders, batch_size)
            plan = functools.partial(_in_order, batch_size=batch_size)
            chunk, first = batch_size * -(-(self.chunk_items or 512) // batch_size), None
        elif self.packs:
            collate, plan = self._packed_collator, functools.partial(plan_packs, max_tokens=max_tokens,
                                                                      max_items=batch_size)
            chunk = self.chunk_items or 512
            first = min(64, chunk)
        else:
            collate, plan = self._collator, functools.partial(plan_batches, max_batch_size=batch_size,
                                                               max_tokens=max_tokens)
            chunk = self.chunk_items or max(batch_size * 16, 512)
            first = min(64, chunk)
        bounds = chunk_bounds(len(loaders), chunk, first=first)
        workers = self._workers(len(bounds) - 1)
        if workers > 1 and not official:  # every worker gets a chunk (official chunks stay batch-aligned)
            bounds = chunk_bounds(len(loaders), chunk, first=first, workers=workers)
        pin = self.device.type == "cuda"
        if workers:
            ds = EncodeChunks(loaders, tok, collate, plan, bounds)
            it = iter(torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=workers,
                                                  collate_fn=_identity, pin_memory=pin, prefetch_factor=2,
                                                  multiprocessing_context="fork"))
        else:
            ds = EncodeChunks(loaders, tok, collate, plan, bounds, threads=self.load_workers)
            it = _prefetch(_pinned(ds[i], pin) for i in range(len(ds)))
        for part in it:
            yield from part

    def _encode(self, prepared: Sequence[tuple[str, Any]], role: str, batch_size: int, max_tokens: int | None,
                show_progress: bool | None, head: Sequence[tuple[str, Any]] | None = None) -> np.ndarray:
        loaders = [self._loader(text, image, f"{role} item {i}") for i, (text, image) in enumerate(prepared)]
        fill = None if head is None else [self._loader(t, im, f"{role} fill item {i}") for i, (t, im) in enumerate(head)]
        return self.encode_prepared(loaders, role, batch_size, max_tokens, show_progress, fill=fill)

    @torch.no_grad()
    def embed_batch(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Embed one collated batch (padded or packed): (B, D) float32, L2-normalised, on the model's device
        (not waited for: ``encode_*`` copies it out after queueing the next batch)."""
        batch = to_device(batch, self.device)
        dtype = self.dtype
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32):
            return self.embedder(**batch, normalize=True).float()


def _identity(x):
    return x


def _in_order(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """The official plan of a chunk: consecutive batches in input order (lengths unused)."""
    return sequential_batches(len(lengths), batch_size)


class _OfficialCollate:
    """Padded collation of an official (``compat="official"``) batch: a batch shorter than ``batch_size`` (the
    last one) is completed with the first inputs of ``head`` again, cycled when there are fewer (accelerate
    ``even_batches``, the default of the official ``accelerator.prepare``); those rows come last."""

    def __init__(self, collator: EmbeddingCollator, tok: EmbeddingTokenizer,
                 head: Sequence[Callable[[], EmbedInput]], batch_size: int):
        self.collator, self.tok, self.head, self.batch_size = collator, tok, head, batch_size

    def __call__(self, rows: Sequence[TokenizedInput]) -> dict[str, torch.Tensor]:
        rows = list(rows)
        need = self.batch_size - len(rows)
        if need > 0:
            first = list(itertools.islice(itertools.cycle(self.head[:need]), need))
            rows += self.tok.tokenize([f() for f in first])
        return self.collator(rows)


def _pinned(part: list, pin: bool) -> list:
    """``(indices, batch)`` pairs with the batch tensors in pinned memory (for async host-to-device copies)."""
    if not pin:
        return part
    return [(idx, {k: v.pin_memory() for k, v in batch.items()}) for idx, batch in part]


class _BusyTimer:
    """Sums the time the model is busy: CUDA events around each batch (GPU stream time), wall time on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.events: list = []
        self.cpu = 0.0

    def __enter__(self):
        if self.cuda:
            self.events.append([torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)])
            self.events[-1][0].record()
        else:
            self._t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.events[-1][1].record()
        else:
            self.cpu += time.perf_counter() - self._t
        return False

    def total(self) -> float:
        """Busy seconds (synchronises the device once)."""
        if not self.cuda:
            return self.cpu
        torch.cuda.synchronize()
        return sum(a.elapsed_time(b) for a, b in self.events) / 1000.0


def _prefetch(it: Iterator, depth: int = 3) -> Iterator:
    """Run an iterator in a background thread (CPU preprocessing overlaps GPU compute).

    Exceptions raised by the producer are re-raised in the consumer.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    sentinel = object()

    def produce():
        try:
            for x in it:
                if stop.is_set():
                    return
                q.put(x)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            q.put(exc)
            return
        q.put(sentinel)

    t = threading.Thread(target=produce, daemon=True)
    t.start()
    try:
        while True:
            x = q.get()
            if x is sentinel:
                break
            if isinstance(x, BaseException):
                raise x
            yield x
    finally:
        stop.set()
        while t.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                t.join(timeout=0.05)
