"""Public embedding API: ``UMarvel.from_pretrained(...).encode_queries / encode_candidates``."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from umarvel.data.collate import EmbedInput, EmbeddingCollator, EmbeddingTokenizer, TokenizedInput, plan_batches
from umarvel.data.formatting import INFERENCE_STYLE, UMARVEL_TOKENS, PromptStyle, format_string, query_text_with_instruction
from umarvel.data.images import MAX_PIXELS, MIN_PIXELS, ImageBudget, load_image
from umarvel.data.processor import build_hf_processor, load_tokenizer
from umarvel.data.visual import PatchSpec, image_patches
from umarvel.errors import CheckpointError, DataError
from umarvel.log import progress_disabled
from umarvel.model import loading
from umarvel.model.backbones import get_backbone_spec
from umarvel.model.embedder import DEFAULT_TEMPERATURE, UMarvelEmbedder
from umarvel.model.lora import is_lora, load_lora
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

    def as_dict(self) -> dict:
        """JSON-serialisable form."""
        d = asdict(self)
        d["style"] = asdict(self.style)
        return d


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

    Attributes:
        embedder: the ``UMarvelEmbedder`` nn.Module (for training code).
        tokenizer / image_processor: the checkpoint's tokenizer (with U-MARVEL tokens) and PIL image processor.
        settings: the :class:`EncodeSettings` in force.
    """

    def __init__(self, embedder: UMarvelEmbedder, tokenizer, image_processor, settings: EncodeSettings,
                 device: str | torch.device = "cpu", source: str | None = None, load_workers: int = 8):
        self.embedder = embedder
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.settings = settings
        self.device = torch.device(device)
        self.source = source
        self.load_workers = load_workers
        self.patch_spec: PatchSpec = embedder.spec.patch_spec(image_processor)
        self.budget = ImageBudget(settings.min_pixels, settings.max_pixels, self.patch_spec.factor)
        self._tok = EmbeddingTokenizer(tokenizer, settings.style, self.patch_spec)
        self._collator = EmbeddingCollator(tokenizer, image_processor)
        self._processor = None

    # ------------------------------------------------------------------ construction / saving
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: str | torch.dtype | None = None, min_pixels: int | None = MIN_PIXELS,
                        max_pixels: int | None = MAX_PIXELS, attn_implementation: str = "sdpa",
                        adapter: str | os.PathLike | None = None, style: PromptStyle = INFERENCE_STYLE,
                        attention: str = "bidirectional", positions: str = "1d") -> "UMarvel":
        """Load a checkpoint folder (released 4.x layout, one umarvel saved, or a LoRA adapter folder).

        Args:
            path: checkpoint folder; a LoRA adapter folder loads its base (``base_model_name_or_path``).
            device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
            dtype: ``"float32"``, ``"bfloat16"``, ``"float16"``; default bf16 on CUDA, fp32 on CPU.
            min_pixels / max_pixels: image budget (official 4*28*28 .. 300*28*28, i.e. 4 .. 300 visual tokens;
                on Qwen3-VL these defaults mean 4*32*32 .. 300*32*32, ``ImageBudget.for_backbone``).
            adapter: an extra LoRA adapter folder applied on top of ``path``.

        The backbone comes from the folder's ``config.json`` (``model_type``: qwen2_vl, qwen2_5_vl, qwen3_vl).
        A folder without tokenizer or image-processor files falls back to the backbone's bundled files, with
        a warning that names the missing files.
        """
        path = loading.check_checkpoint_dir(path)
        torch_dtype = loading.resolve_dtype(dtype, device)
        base, adapters = path, []
        if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
            cfg = json.loads((path / "adapter_config.json").read_text())
            meta = loading.read_meta(path)
            base_name = meta.get("base_model") or cfg.get("base_model_name_or_path")
            if not base_name:
                raise CheckpointError(f"{path}: adapter folder without base_model_name_or_path")
            base = loading.check_checkpoint_dir(base_name)
            adapters.append(path)
        if adapter is not None:
            adapters.append(loading.check_checkpoint_dir(adapter))
        model, spec = loading.load_hf_backbone(base, torch_dtype, device, attn_implementation)
        tok_dir, proc_dir = loading.processor_dirs(base, adapters, spec)
        tokenizer = load_tokenizer(tok_dir)
        image_processor, budget = loading.load_image_processor_for(proc_dir, spec, model, min_pixels, max_pixels)
        marker_rows = loading.ensure_token_rows(model, tokenizer)
        meta = loading.read_meta(adapters[-1] if adapters else base) or loading.read_meta(base)
        temperature = meta.get("temperature", loading.official_temperature(base) or DEFAULT_TEMPERATURE)
        embedder = UMarvelEmbedder(model, spec, temperature=temperature, attention=attention, positions=positions)
        for a in adapters:
            load_lora(embedder, a)
        embedder.to(device).eval()
        settings = EncodeSettings(budget.min_pixels, budget.max_pixels, style, attention, positions,
                                  str(torch_dtype).split(".")[-1])
        logger.info("loaded %s (%s, %s on %s, marker rows: %s, temperature %.4g)", path, spec.model_type,
                    settings.dtype, device, marker_rows, temperature)
        return cls(embedder, tokenizer, image_processor, settings, device=device, source=str(path))

    @classmethod
    def from_backbone(cls, model: torch.nn.Module, processor_dir: str | os.PathLike | None = None,
                      device: str | torch.device = "cpu", min_pixels: int | None = MIN_PIXELS,
                      max_pixels: int | None = MAX_PIXELS, style: PromptStyle = INFERENCE_STYLE,
                      temperature: float = DEFAULT_TEMPERATURE, attention: str = "bidirectional",
                      positions: str = "1d") -> "UMarvel":
        """Wrap an in-memory transformers model (e.g. a randomly initialised one for benchmarks).

        The tokenizer and image processor come from ``processor_dir`` (default: the backbone's bundled files).
        """
        spec = get_backbone_spec(model.config.model_type)
        processor_dir = processor_dir if processor_dir is not None else spec.processor_dir
        tokenizer = load_tokenizer(processor_dir)
        image_processor, budget = loading.load_image_processor_for(processor_dir, spec, model, min_pixels, max_pixels)
        loading.ensure_token_rows(model, tokenizer)
        dtype = next(model.parameters()).dtype
        embedder = UMarvelEmbedder(model, spec, temperature=temperature, attention=attention, positions=positions)
        embedder.to(device).eval()
        settings = EncodeSettings(budget.min_pixels, budget.max_pixels, style, attention, positions,
                                  str(dtype).split(".")[-1])
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
                       show_progress: bool | None = None) -> np.ndarray:
        """Embed query dicts ``{"text", "image", "instruction"}`` -> float32 (N, D), L2-normalised, in order."""
        prepared = [self.prepare_query(it, i) for i, it in enumerate(items)]
        return self._encode(prepared, "query", batch_size, max_tokens, show_progress)

    def encode_candidates(self, items: Sequence[Mapping], batch_size: int = 32, max_tokens: int | None = None,
                          show_progress: bool | None = None) -> np.ndarray:
        """Embed candidate dicts ``{"text", "image"}`` -> float32 (N, D), L2-normalised, in order."""
        prepared = [self.prepare_candidate(it, i) for i, it in enumerate(items)]
        return self._encode(prepared, "candidate", batch_size, max_tokens, show_progress)

    def encode_prepared(self, loaders: Sequence[Callable[[], EmbedInput]], role: str = "item",
                        batch_size: int = 32, max_tokens: int | None = None, show_progress: bool | None = None,
                        style: PromptStyle | None = None) -> np.ndarray:
        """Embed inputs given as zero-argument loaders returning :class:`EmbedInput` (run in a thread pool).

        The general entry point behind ``encode_queries`` / ``encode_candidates``: callers with their
        own text rules, videos or interleaved content (zero-shot sets) build the ``EmbedInput`` themselves.
        ``style`` overrides the prompt style (suffix / generation prompt) for this call only.

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
        for idx, batch in _prefetch(self._batches(loaders, tok, batch_size, max_tokens)):
            out[idx] = self.embed_batch(batch).cpu().numpy()
            bar.update(len(idx))
        bar.close()
        return out

    def _loader(self, text: str, image: Any, what: str) -> Callable[[], EmbedInput]:
        """A loader for one input: open + resize the image and compute its patches (in a worker thread)."""
        if image is None:
            return lambda: EmbedInput(text)

        def load() -> EmbedInput:
            im = load_image(image, self.budget, what=what)
            return EmbedInput(text, (im,), patches=(image_patches(im, self._collator.patch_spec),))
        return load

    def _batches(self, loaders: Sequence[Callable[[], EmbedInput]], tok: EmbeddingTokenizer, batch_size: int,
                 max_tokens: int) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
        """Yield ``(indices, collated batch)`` in length-sorted order, chunk by chunk."""
        chunk = max(batch_size * 16, 512)
        with ThreadPoolExecutor(max_workers=self.load_workers) as pool:
            for start in range(0, len(loaders), chunk):
                inputs = list(pool.map(lambda f: f(), loaders[start:start + chunk]))
                tokenized: list[TokenizedInput] = tok.tokenize(inputs)
                lengths = [len(t) for t in tokenized]
                for idx in plan_batches(lengths, batch_size, max_tokens):
                    yield [start + i for i in idx], self._collator([tokenized[i] for i in idx])

    def _encode(self, prepared: Sequence[tuple[str, Any]], role: str, batch_size: int, max_tokens: int | None,
                show_progress: bool | None) -> np.ndarray:
        loaders = [self._loader(text, image, f"{role} item {i}") for i, (text, image) in enumerate(prepared)]
        return self.encode_prepared(loaders, role, batch_size, max_tokens, show_progress)

    @torch.no_grad()
    def embed_batch(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Embed one collated batch on the model's device: (B, D) float32, L2-normalised."""
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        dtype = self.dtype
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32):
            return self.embedder(**batch, normalize=True).float()


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
