"""Zero-shot benchmark runner (method spec 6.3): one loaded model, every requested set end to end.

For each task (``umarvel.eval.zeroshot.tasks``): read the set (absent data -> ``skipped: <set> (missing
<path>)``, recorded, never a crash) -> build one loader per item (images resized with the model's budget,
videos decoded with PyAV and turned into the backbone's patches, VIST stories as interleaved content, texts from
:meth:`ZSItem.final_text`, exactly as the official per-set scripts build them) -> encode each side through the
embedding cache with the set's prompt style (no suffix except Flickr30K) -> re-normalise the float16 cache
vectors in fp32 -> exact scores -> metrics. CIRCO test writes the top-50 submission JSON instead.

``ZeroShotOptions(compat="official")`` (with a model loaded with ``compat="official"``) reproduces the official
numerics: each side is encoded in the official script's batch size (:func:`official_batch_size`) and order, so
the same batches are unpadded and run causal (D5), and the official loaders' quirks (Urban1K's Python-set
prompt, VIST's dropped 4th pair) are reproduced. Every results file records the mode.

Outputs under ``output_dir``::

    metrics/<task>.json              metrics and sizes of one task
    results.json                     every task (ok / submission / skipped / error) + the paper table
    results.md                       the paper's zero-shot table, other sets, per-task details, skipped lines
    circo_test_submission.json       {query id: [50 COCO image ids]} for the CIRCO evaluation server

A task whose data is present but broken (a corrupt video, an unreadable image) is recorded as ``error``
with the message (naming the video / image id and path) and the run goes on with the other tasks.

    >>> from umarvel import UMarvel
    >>> model = UMarvel.from_pretrained("checkpoints/umarvel")                     # doctest: +SKIP
    >>> run_zeroshot(model, "data/zeroshot", "runs/zs", tasks="circo,msrvtt")      # doctest: +SKIP
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from umarvel.data.collate import EmbedInput
from umarvel.data.formatting import PromptStyle
from umarvel.data.images import load_image
from umarvel.data.video import VideoSpec, load_video_input
from umarvel.data.visual import PatchSpec
from umarvel.errors import ConfigError, DataError
from umarvel.eval.cache import EmbeddingCache
from umarvel.eval.search import unit_rows_fp32
from umarvel.data.registry import Task
from umarvel.eval.zeroshot.options import VIDEO_SPECS, ZeroShotOptions
from umarvel.eval.zeroshot.metrics import (bidirectional_recall, circo_map_at_k, gallery_scores,
                                           genecis_recall, pair_accuracy, ranked_topk, recall_from_scores)
from umarvel.eval.zeroshot.readers import read_set
from umarvel.eval.zeroshot.tasks import EXTRA_COLUMNS, PAPER_COLUMNS, resolve_zeroshot_names
from umarvel.eval.zeroshot.types import (BidirectionalSet, GallerySet, PairSet, RetrievalSet, Skipped, ZeroShotSet,
                                         ZSItem)
from umarvel.utils.compat import DEFAULT, is_official
from umarvel.utils.io import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
METRICS_DIR = "metrics"
SUBMISSION_FILE = "circo_test_submission.json"
CACHE_VERSION = "zeroshot-2"

#: Prompt styles (spec 6.3): prompt1 (suffix) for Flickr30K only, prompt2 (no suffix) elsewhere; always
#: ``add_generation_prompt=True`` (the eval collator). Flickr30K's images carry no text and take the image-only
#: suffix "\nSummarize above image in one word: " (``dataset/datasets_flickr.py``), not the M-BEIR
#: "image and sentence" one (D15).
SUFFIX_STYLE = PromptStyle(suffix=True, image_only_suffix="image", add_generation_prompt=True)
NO_SUFFIX_STYLE = PromptStyle(suffix=False, add_generation_prompt=True)
#: ``compat="official"``: batch sizes of the official launcher (``scripts/eval/bash/vtools_eval_zero-shot.py``)
#: and scripts (``eval/eval_zeroshot/eval_*.py``) that differ from 4, per set and side; every other side uses 4.
OFFICIAL_BATCH_SIZES: Mapping[str, Mapping[str, int]] = {
    "genecis_change_object": {"queries": 2, "candidates": 2},
    "mscoco5k": {"images": 8, "texts": 16},
    "vist": {"queries": 2, "candidates": 2},
    "ccneg": {"images": 8, "texts": 8},
    "msvd": {"candidates": 1},     # videos one at a time (so always unpadded: causal, D5)
    "msrvtt": {"candidates": 1},
}
OFFICIAL_DEFAULT_BATCH_SIZE = 4


def set_style(zs: ZeroShotSet) -> PromptStyle:
    """The prompt style of a set: suffix on only where the set says so (Flickr30K)."""
    return SUFFIX_STYLE if zs.suffix else NO_SUFFIX_STYLE


def official_batch_size(set_name: str, side: str) -> int:
    """The official script's batch size for one side of a set (``compat="official"``)."""
    return OFFICIAL_BATCH_SIZES.get(set_name, {}).get(side, OFFICIAL_DEFAULT_BATCH_SIZE)


# ------------------------------------------------------------------------------------------------- inputs
def item_record(item: ZSItem, compat: str = DEFAULT) -> dict:
    """JSON description of what the encoder sees for one item (cache content + loader input).

    ``text`` is :meth:`ZSItem.final_text` (``compat`` decides the official-only quirks); interleaved items
    (VIST) keep their segments in order, every text segment verbatim (the official loader formats none).
    """
    rec: dict[str, Any] = {"id": item.id, "text": item.final_text(compat), "image": item.image, "video": item.video}
    if item.segments:
        rec["segments"] = [[kind, value] for kind, value in item.segments]
    return rec


def make_loader(rec: Mapping[str, Any], budget, video_spec: VideoSpec | None, what: str,
                patch_spec: PatchSpec = PatchSpec()) -> Callable[[], EmbedInput]:
    """A zero-argument loader building the :class:`EmbedInput` of one :func:`item_record` (decoding inside).

    ``patch_spec``: the model's patch geometry (videos become patches in the loader; Qwen3-VL keeps their times).

    Raises (when called):
        DataError / ImageLoadError: naming ``what`` (set, side, item id) and the file.
    """
    segments = rec.get("segments")
    if segments:
        def load_interleaved() -> EmbedInput:
            parts = [value if kind == "text" else load_image(value, budget, what=f"{what} image {value}")
                     for kind, value in segments]
            return EmbedInput.interleaved(parts)
        return load_interleaved
    text, image, video = rec["text"], rec.get("image"), rec.get("video")
    if video is not None:
        if video_spec is None:
            raise DataError(f"{what}: a video item in a set without a video spec")

        def load_video_item() -> EmbedInput:
            return EmbedInput(text, video=load_video_input(video, video_spec, patch_spec, video_id=str(rec["id"])))
        return load_video_item
    if image is not None:
        return lambda: EmbedInput(text, (load_image(image, budget, what=what),))
    return lambda: EmbedInput(text)


class SetEncoder:
    """Encodes the sides of zero-shot sets through the :class:`EmbeddingCache`.

    The cache key covers the model fingerprint and settings, the set's prompt style, the image budget, the
    video spec and the content of every item record (text rule included), so a change of any of them
    re-encodes and nothing else does.
    """

    def __init__(self, model, cache: EmbeddingCache, options: ZeroShotOptions):
        self.model = model
        self.cache = cache
        self.options = options
        self.fingerprint = model.fingerprint()
        self.patch_spec: PatchSpec = getattr(model, "patch_spec", PatchSpec())

    def encode(self, cache_name: str, side: str, items: Sequence[ZSItem], style: PromptStyle,
               video_spec: VideoSpec | None = None, set_name: str | None = None) -> np.ndarray:
        """Embeddings of ``items``: float32 (N, D), the float16 cache vectors re-normalised in fp32.

        ``set_name`` (default ``cache_name``) selects the official batch size with ``compat="official"``.
        """
        compat = self.options.compat
        records = [item_record(it, compat) for it in items]
        ids = [f"{k}:{it.id}" for k, it in enumerate(items)]
        has_video = any(r["video"] is not None for r in records)
        settings = {"version": CACHE_VERSION, "model": self.model.settings.as_dict(), "style": asdict(style),
                    "image_budget": asdict(self.model.budget), "role": side,
                    "video": asdict(video_spec) if (has_video and video_spec is not None) else None}
        batch = self.options.video_batch_size if has_video else self.options.batch_size
        official = is_official(compat)
        if official:  # the official batches change the vectors (D5): part of the key
            batch = settings["official_batch_size"] = official_batch_size(set_name or cache_name, side)
        what = f"{cache_name} {side}"

        def loaders_of(recs: Sequence[dict]) -> list:
            return [make_loader(r, self.model.budget, video_spec, f"{what} item {r['id']}", self.patch_spec)
                    for r in recs]

        head = loaders_of(records[:batch]) if official else None  # completes the last official batch

        def encode_fn(recs: list[dict]) -> np.ndarray:
            return self.model.encode_prepared(loaders_of(recs), role=side, batch_size=batch,
                                              max_tokens=self.options.max_tokens,
                                              show_progress=self.options.show_progress, style=style, fill=head)

        cached = self.cache.get_or_encode(f"zeroshot_{cache_name}_{side}", records, ids, encode_fn,
                                          self.fingerprint, settings)
        return unit_rows_fp32(cached.vectors)


# ------------------------------------------------------------------------------------------------ scoring
@dataclass
class TaskOutcome:
    """Metrics (percent) and sizes of one evaluated set; ``submission``: ranked ids for CIRCO test."""

    metrics: dict[str, float]
    num_queries: int
    num_candidates: int
    submission: dict[str, list] | None = None


def _public_id(s: str) -> int | str:
    """COCO ids as ints in submission files, anything else unchanged."""
    return int(s) if s.isdigit() else s


def evaluate_set(task: Task, zs: ZeroShotSet, encoder: SetEncoder) -> TaskOutcome:
    """Encode and score one set (exact dense scores), returning its metrics.

    Shapes: RetrievalSet -> (Q, C) scores, recall or CIRCO mAP (+ R@k vs the single target), or the top-k
    submission for CIRCO test; BidirectionalSet -> (T, I) scores, both directions; GallerySet -> per-query
    gallery scores; PairSet -> row-wise accuracy.
    """
    style = set_style(zs)
    spec = encoder.options.video_spec(zs.video_spec, encoder.patch_spec.factor) if zs.video_spec else None
    cache_name = task.options.get("cache_name", zs.name)
    if isinstance(zs, RetrievalSet):
        gallery_name = "circo" if zs.name in ("circo", "circo_test") else cache_name  # val and test share it
        q = encoder.encode(cache_name, "queries", zs.queries, style, spec, set_name=zs.name)
        c = encoder.encode(gallery_name, "candidates", zs.candidates, style, spec, set_name=zs.name)
        scores = q @ c.T
        exclude = list(zs.exclude) if zs.exclude else None
        if task.options.get("shape") == "submission":
            k = int(task.options.get("topk", 50))
            top = ranked_topk(scores, k, exclude=exclude)
            sub = {it.id: [_public_id(zs.candidates[j].id) for j in row] for it, row in zip(zs.queries, top)}
            return TaskOutcome({}, len(zs.queries), len(zs.candidates), submission=sub)
        if zs.metric == "map":
            m = circo_map_at_k(scores, zs.positives, task.cutoffs, exclude)
            m.update(recall_from_scores(scores, [[t] for t in zs.targets], task.cutoffs, exclude))
        else:
            m = recall_from_scores(scores, zs.positives, task.cutoffs, exclude)
        return TaskOutcome(m, len(zs.queries), len(zs.candidates))
    if isinstance(zs, BidirectionalSet):
        t = encoder.encode(cache_name, "texts", zs.texts, style, set_name=zs.name)
        i = encoder.encode(cache_name, "images", zs.images, style, set_name=zs.name)
        return TaskOutcome(bidirectional_recall(t @ i.T, zs.text_to_image, task.cutoffs), len(zs.texts),
                           len(zs.images))
    if isinstance(zs, GallerySet):
        q = encoder.encode(cache_name, "queries", zs.queries, style, set_name=zs.name)
        c = encoder.encode(cache_name, "candidates", zs.candidates, style, set_name=zs.name)
        return TaskOutcome(genecis_recall(gallery_scores(q, c, zs.galleries), task.cutoffs), len(zs.queries),
                           len(zs.candidates))
    if isinstance(zs, PairSet):
        im = encoder.encode(cache_name, "images", zs.images, style, set_name=zs.name)
        # one text side [pos_0, neg_0, pos_1, neg_1, ...], the official dataset's order (and hence batches)
        texts = encoder.encode(cache_name, "texts", [t for pair in zip(zs.positives, zs.negatives) for t in pair],
                               style, set_name=zs.name)
        return TaskOutcome({"accuracy": pair_accuracy(im, texts[0::2], texts[1::2])}, len(zs.images),
                           2 * len(zs.images))
    raise DataError(f"{task.name}: unsupported set type {type(zs).__name__}")


# ------------------------------------------------------------------------------------------------ the run
def _entry(task: Task, status: str, **fields) -> dict:
    """One ``results.json`` task entry."""
    return {"name": task.name, "dataset": task.dataset, "metric": task.metric, "status": status, "value": None,
            "headline": {}, "metrics": {}, "num_queries": None, "num_candidates": None, **fields}


def run_task(task: Task, data_root: Path, output_dir: Path, encoder: SetEncoder) -> dict:
    """Read, encode and score one task; write its metrics file (and CIRCO test submission). Never raises for
    absent data (``skipped``) or broken data (``error``, message naming the item); returns the entry."""
    before = dict(encoder.cache.stats)
    try:
        zs = read_set(task.options.get("reader", task.name), data_root, encoder.options.compat)
        if isinstance(zs, Skipped):
            return _entry(task, "skipped", missing=str(zs.missing), message=zs.message)
        out = evaluate_set(task, zs, encoder)
    except DataError as exc:  # malformed annotations, corrupt video / image: named in the message
        logger.error("%s failed: %s", task.name, exc)
        return _entry(task, "error", error=str(exc), message=f"error: {task.name}: {exc}")
    counts = {"encoded": encoder.cache.stats["encoded"] - before["encoded"],
              "reused": encoder.cache.stats["reused"] - before["reused"]}
    common = dict(num_queries=out.num_queries, num_candidates=out.num_candidates, **counts)
    if out.submission is not None:
        path = output_dir / SUBMISSION_FILE
        atomic_write_json(path, out.submission)
        logger.info("%s: wrote the submission for %d queries to %s (score it on the CIRCO server)", task.name,
                    len(out.submission), path)
        entry = _entry(task, "submission", submission=SUBMISSION_FILE, **common)
    else:
        headline = {k: out.metrics[k] for k in task.options.get("headline", ())}
        value = next(iter(headline.values()), None)
        entry = _entry(task, "ok", value=value, headline=headline, metrics=out.metrics, **common)
        logger.info("%s: %s", task.name, ", ".join(f"{k} {v:.2f}" for k, v in out.metrics.items()))
    metrics_file = f"{METRICS_DIR}/{task.name}.json"
    entry["metrics_file"] = metrics_file
    atomic_write_json(output_dir / metrics_file, {**entry, "description": task.description,
                                                  "compat": encoder.options.compat})
    return entry


def table_values(entries: Sequence[Mapping], columns=PAPER_COLUMNS) -> dict[str, float | None]:
    """Column label -> value: the metric of the member task, or the unweighted mean over several members;
    None unless every member was evaluated."""
    by_name = {e["name"]: e for e in entries}
    out: dict[str, float | None] = {}
    for label, members, key in columns:
        vals = [by_name[m]["metrics"].get(key) if m in by_name and by_name[m]["status"] == "ok" else None
                for m in members]
        out[label] = None if any(v is None for v in vals) else float(sum(vals) / len(vals))
    return out


def run_zeroshot(model, data_root: str | Path, output_dir: str | Path, tasks: str | Sequence[str] | None = None,
                 cache_dir: str | Path | None = None, options: ZeroShotOptions = ZeroShotOptions(),
                 model_name: str | None = None) -> dict:
    """Evaluate ``tasks`` (comma list / names / groups; default all zero-shot tasks) with one loaded model.

    Args:
        model: a :class:`umarvel.api.UMarvel`.
        data_root: folder holding the sets (docs/zeroshot_data.md).
        output_dir: where metrics, results.json / results.md and the CIRCO submission go.
        cache_dir: embedding cache root (default ``<output_dir>/cache``).
        model_name: how the model is named in the outputs (default: its source path).

    Returns:
        the ``results.json`` content (also written, with ``results.md``).
    """
    data_root, output_dir = Path(data_root), Path(output_dir)
    model_compat = getattr(getattr(model, "settings", None), "compat", DEFAULT)
    if model_compat != options.compat:
        raise ConfigError(f"zero-shot options say compat {options.compat!r} but the model was loaded with "
                          f"compat {model_compat!r} (UMarvel.from_pretrained(..., compat={options.compat!r}))")
    selected = resolve_zeroshot_names(tasks)
    cache = EmbeddingCache(Path(cache_dir) if cache_dir else output_dir / "cache")
    encoder = SetEncoder(model, cache, options)
    output_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for task in selected:
        logger.info("zero-shot task %s (%s)", task.name, task.description)
        entries.append(run_task(task, data_root, output_dir, encoder))
    results = {
        "suite": "zeroshot",
        "model": model_name or str(getattr(model, "source", None) or "<model>"),
        "fingerprint": encoder.fingerprint,
        "compat": options.compat,
        "data_root": str(data_root),
        "settings": model.settings.as_dict(),
        "options": asdict(options),
        "video_specs": {k: asdict(options.video_spec(k, encoder.patch_spec.factor)) for k in VIDEO_SPECS},
        "tasks": entries,
        "paper_table": table_values(entries, PAPER_COLUMNS),
        "extra_table": table_values(entries, EXTRA_COLUMNS),
        "cache": {"encoded": cache.stats["encoded"], "reused": cache.stats["reused"]},
    }
    atomic_write_json(output_dir / RESULTS_JSON, results)
    atomic_write_text(output_dir / RESULTS_MD, render_zeroshot_md(results))
    n = {s: sum(e["status"] == s for e in entries) for s in ("ok", "submission", "skipped", "error")}
    logger.info("zero-shot: %d evaluated, %d submission, %d skipped, %d failed; wrote %s", n["ok"], n["submission"],
                n["skipped"], n["error"], output_dir / RESULTS_JSON)
    return results


# ------------------------------------------------------------------------------------------------ tables
def _fmt(v: float | None) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1f}"


def _table(model: str, values: Mapping[str, float | None]) -> list[str]:
    labels = list(values)
    return ["| Model | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|",
            f"| {model} | " + " | ".join(_fmt(values[k]) for k in labels) + " |"]


def render_zeroshot_md(results: Mapping[str, Any]) -> str:
    """``results.md``: the paper's zero-shot table (multi-task columns are unweighted means: GeneCIS over its 4
    subsets, Sugar-Crepe Replace/Swap/Add over theirs; "–" = not evaluated), the other sets, per-task metrics,
    then the submission, skipped and error lines."""
    model = Path(str(results["model"])).name or str(results["model"])
    compat = results.get("compat", DEFAULT)
    mode = ("compat `official`: the official evaluation numerics (docs/decisions.md)" if compat != DEFAULT
            else "compat `default`")
    lines = ["# Zero-shot results", "", f"Model `{results['model']}` (fingerprint `{results['fingerprint']}`), "
             f"data `{results['data_root']}`, {mode}. Values in percent.", "", "## Paper table", ""]
    lines += _table(model, results["paper_table"])
    lines += ["", "## Other sets", ""] + _table(model, results["extra_table"])
    lines += ["", "## Per task", "", "| Task | Dataset | Metric | Value | All metrics | Queries | Candidates |",
              "|---|---|---|---|---|---|---|"]
    notes = []
    for e in results["tasks"]:
        if e["status"] == "ok":
            allm = ", ".join(f"{k} {v:.1f}" for k, v in e["metrics"].items())
            lines.append(f"| {e['name']} | {e['dataset']} | {e['metric']} | {_fmt(e['value'])} | {allm} | "
                         f"{e['num_queries']} | {e['num_candidates']} |")
        elif e["status"] == "submission":
            notes.append(f"submission: {e['name']} -> `{e['submission']}` ({e['num_queries']} queries; "
                         f"scored by the CIRCO server)")
        else:
            notes.append(e["message"])
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"
