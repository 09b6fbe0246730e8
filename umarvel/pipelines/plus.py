"""U-MARVEL+ evaluation: rerank the top 50 of an M-BEIR run (local or global) and fuse ``cos + w * P(yes)``.

Input: the output folder of ``umarvel eval mbeir`` (``config.yaml``, ``results.json``, ``runs/<task>_<split>.trec``).
For every task of that run the queries are reloaded with the SAME instructions (same seed, mode and modality
lookup as the evaluation, D7), the top ``top_k`` (50) candidates of each query are scored by the point-wise
reranker (:func:`umarvel.rerank.score.score_run`, one forward, D10), and each candidate's P(yes) is added to
ITS OWN cosine (:class:`umarvel.rerank.fusion.ScoredCandidate`, D9), then the list is re-sorted.

The fusion weight ``w``: a fixed value (published 0.1, the default), the weight chosen by a validation run
(``weight_from``: its ``fusion_weight.json``), or chosen here with ``choose_weight`` on a run of split ``val``
(refused on any other split): the best unweighted mean headline recall over the tasks on the grid.

``compat="official"`` reproduces the official U-MARVEL+ numerics instead: P(yes) from the first step of
``generate`` with the checkpoint's generation config, in the official batches of 4 in pair order (D10), and on
the global protocol the official global fusion (:func:`umarvel.rerank.fusion.official_global_fuse_query`, D9).
The reranker's instructions are the evaluation's seeded draw (D7; the official scorer draws its own, unseeded).

Outputs in ``output`` (as the M-BEIR evaluation writes them, marked ``"reranked": true`` and with ``"compat"``)::

    results.json  results.md  runs/<task>_<split>.trec (fused)  scores/<task>_<split>.json (P(yes), resumable)
    fusion_weight.json (the weight used; with choose_weight also the grid table)  plus.json (provenance)
"""
from __future__ import annotations

import json
import logging
import os
from collections import ChainMap
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from umarvel.config import load_config
from umarvel.errors import ConfigError, DataError
from umarvel.data.images import MAX_PIXELS
from umarvel.data.mbeir import load_mbeir_task, read_instructions, read_pool
from umarvel.data.runfiles import read_trec_run, write_trec_run
from umarvel.eval.mbeir.config import MBeirEvalConfig
from umarvel.eval.metrics import score_task
from umarvel.eval.outputs import build_results, compat_of, read_results_json, write_results
from umarvel.data.registry import MBEIR_INSTRUCTIONS, MBEIR_TASK_ORDER, get_task
from umarvel.rerank.fusion import (DEFAULT_FUSION_WEIGHT, DEFAULT_GRID, RerankedQuery, RerankResults,
                                   choose_weight, fuse_results)
from umarvel.utils.compat import DEFAULT, CompatMode, check_compat, is_official
from umarvel.utils.io import atomic_write_json

logger = logging.getLogger(__name__)

WEIGHT_FILE = "fusion_weight.json"
#: ``compat="official"``: the batch size of the official scorer (``eval/eval_mbeir_rerank_pointwise.py``).
OFFICIAL_RERANK_BATCH_SIZE = 4
PathLike = str | os.PathLike


@dataclass(frozen=True)
class PlusConfig:
    """Settings of one U-MARVEL+ evaluation; each field's help (metadata) is also its flag's help
    (``umarvel eval plus``). ``run_dir``, ``reranker`` and ``output`` are required; give at most one of
    ``weight``, ``weight_from`` and ``choose_weight`` (none: the published w = 0.1)."""

    run_dir: str = field(metadata={"flag": "--run", "help": "output folder of 'umarvel eval mbeir' (local or "
                                                            "global, val or test)"})
    reranker: str = field(metadata={"help": "reranker checkpoint (merged folder or LoRA adapter folder; U-MARVEL+: "
                                            "the reranker trained on negatives mined by the stage-5 model)"})
    output: str = field(metadata={"help": "output folder"})
    weight: float | None = field(default=None, metadata={"help": "fixed fusion weight w (default 0.1)"})
    weight_from: str | None = field(default=None, metadata={
        "help": "fusion_weight.json of a U-MARVEL+ run on the validation split"})
    choose_weight: bool = field(default=False, metadata={
        "help": "choose w on this run's results (its split must be val)"})
    grid: list[float] = field(default_factory=lambda: list(DEFAULT_GRID), metadata={
        "help": "comma-separated candidate weights of --choose-weight"})
    top_k: int = field(default=50, metadata={"help": "reranked depth"})
    batch_size: int = field(default=8, metadata={"help": "reranker scoring batch size"})
    positions: Literal["1d", "mrope"] = field(default="1d", metadata={
        "help": "reranker position ids: 1d (training convention, D10) or mrope (the official generate() scores)"})
    device: str | None = field(default=None, metadata={"help": "reranker device (default: cuda if available)"})
    dtype: str | None = field(default=None, metadata={
        "help": "float32 | bfloat16 | float16 (default: bf16 on CUDA, fp32 on CPU)"})
    max_pixels: int = field(default=MAX_PIXELS, metadata={"help": "reranker image budget"})
    compat: CompatMode = field(default=DEFAULT, metadata={
        "help": "official: P(yes) from the first step of generate with the checkpoint's generation config in the "
                "official batches of 4, and on a global run the official global fusion (D9, D10; docs/decisions.md "
                "'Compatibility mode'); default: umarvel's"})

    def __post_init__(self) -> None:
        check_compat(self.compat, "PlusConfig.compat")
        if sum(x is not None and x is not False for x in (self.weight, self.weight_from, self.choose_weight)) > 1:
            raise ConfigError("give at most one of weight, weight_from and choose_weight")
        if self.top_k < 1:
            raise ConfigError(f"top_k must be >= 1, got {self.top_k}")


def resolve_weight(cfg: PlusConfig) -> tuple[float, str]:
    """``(w, provenance)`` unless it is chosen on this run (then ``choose_weight`` decides later)."""
    if cfg.weight is not None:
        return float(cfg.weight), "given"
    if cfg.weight_from:
        path = Path(cfg.weight_from)
        if not path.is_file():
            raise DataError(f"{path}: weight file not found (written by a U-MARVEL+ run with choose_weight)")
        obj = json.loads(path.read_text())
        if obj.get("split") != "val" or obj.get("chosen_on") != "val":
            raise DataError(f"{path}: the weight was not chosen on the validation split (split {obj.get('split')!r})")
        return float(obj["weight"]), f"chosen on val ({path})"
    return DEFAULT_FUSION_WEIGHT, "default (published 0.1)"


def _eval_config(path: Path) -> MBeirEvalConfig:
    """The resolved config (``config.yaml``) of an M-BEIR evaluation output folder."""
    if not path.is_file():
        raise DataError(f"{path}: not found; run_dir must be an output folder of 'umarvel eval mbeir'")
    return load_config(path, MBeirEvalConfig)


def evaluate_plus(cfg: PlusConfig, reranker=None) -> dict:
    """Rerank, fuse, score and write (see the module doc); returns the ``results.json`` object.

    Args:
        reranker: a loaded :class:`~umarvel.rerank.model.LoadedReranker` (default: load ``cfg.reranker``).
    Raises:
        ConfigError: ``choose_weight`` on a split other than ``val``.
        DataError: a missing run file, or run candidates / queries unknown to the M-BEIR files.
    """
    # lazy: commands.eval_plus imports this module, and `umarvel --help` stays free of torch (tests/cli)
    from umarvel.dist import device_for_rank  # lazy: the CLI imports this module for its config (no torch at start-up)
    from umarvel.eval.mbeir.runner import CONFIG_FILE, RUNS_DIR, _union_modalities
    from umarvel.rerank.model import load_reranker
    from umarvel.rerank.score import score_run

    run_dir, out = Path(cfg.run_dir), Path(cfg.output)
    ev = _eval_config(run_dir / CONFIG_FILE)
    base = read_results_json(run_dir / "results.json")
    if base.get("reranked"):
        raise DataError(f"{run_dir}: already a reranked run")
    if cfg.choose_weight and ev.split != "val":
        raise ConfigError(f"choose_weight on split {ev.split!r} refused: the fusion weight is tuned on the "
                          "validation split only (D9); pass weight_from=<val run>/fusion_weight.json")
    root = Path(ev.mbeir_root)
    tasks = [get_task(t["name"]) for t in base["tasks"]]
    table = read_instructions(root / MBEIR_INSTRUCTIONS)
    modalities = _union_modalities(root, tasks, ev.split)
    pools: dict[str, object] = {}
    if ev.protocol == "global":  # candidates may come from any local pool of the split
        for name in MBEIR_TASK_ORDER:
            rel = get_task(name).files(ev.split).pool
            if (root / rel).is_file():
                for c in read_pool(root / rel, root):
                    pools.setdefault(c.did, c)
        modalities = ChainMap(dict(modalities), {d: c.modality for d, c in pools.items()})
    pool_size = {t["name"]: t["pool_size"] for t in base["tasks"]}
    official = is_official(cfg.compat)
    if compat_of(base) != cfg.compat:
        logger.warning("U-MARVEL+ with compat %s on a retrieval run made with compat %s (%s)", cfg.compat,
                       compat_of(base), run_dir)
    rule = "official_global" if official and ev.protocol == "global" else "cosine"
    batch_size = OFFICIAL_RERANK_BATCH_SIZE if official else cfg.batch_size
    settings = {"reranker": str(Path(cfg.reranker).resolve()), "top_k": cfg.top_k, "positions": cfg.positions,
                "max_pixels": cfg.max_pixels, "compat": cfg.compat}

    per_task: list[tuple] = []
    for t in tasks:
        data = load_mbeir_task(root, t, ev.split, instructions=table, instruction_mode=ev.instruction, seed=ev.seed,
                               global_modalities=modalities, allow_missing=ev.allow_missing)
        run = read_trec_run(run_dir / RUNS_DIR / f"{t.name}_{ev.split}.trec")
        cands = pools if ev.protocol == "global" else {c.did: c for c in data.pool}
        score_path = out / "scores" / f"{t.name}_{ev.split}.json"
        p_yes = None
        if score_path.is_file():
            old = json.loads(score_path.read_text())
            if old.get("settings") == settings and set(old["p_yes"]) == set(run):
                p_yes = old["p_yes"]
                logger.info("%s: reranker scores reused (%s)", t.name, score_path)
        if p_yes is None:
            if reranker is None:
                reranker = load_reranker(cfg.reranker, device=device_for_rank(cfg.device), dtype=cfg.dtype,
                                         positions=cfg.positions, max_pixels=cfg.max_pixels, compat=cfg.compat)
            if getattr(reranker, "compat", DEFAULT) != cfg.compat:
                raise ConfigError(f"the reranker was loaded with compat {getattr(reranker, 'compat', DEFAULT)!r}, "
                                  f"the config says {cfg.compat!r}")
            p_yes = score_run(reranker, run, {q.qid: q for q in data.queries}, cands, top_k=cfg.top_k,
                              batch_size=batch_size)
            atomic_write_json(score_path, {"settings": settings, "p_yes": p_yes}, indent=None)
        qrels = data.qrels
        queries = tuple(RerankedQuery.from_lists(qid, [d for d, _ in ranked], [s for _, s in ranked], p_yes[qid],
                                                 qrels.get(qid, ())) for qid, ranked in run.items())
        per_task.append((t, data, RerankResults(ev.split, t.name, queries, t.metric_k)))

    if cfg.choose_weight:
        w, grid_table = choose_weight([r for _, _, r in per_task], cfg.grid, rule=rule)
        how = "chosen on val"
        atomic_write_json(out / WEIGHT_FILE, {"weight": w, "split": ev.split, "chosen_on": "val",
                                              "run_dir": str(run_dir.resolve()),
                                              "mean_recall": {str(k): v for k, v in grid_table.items()}})
    else:
        w, how = resolve_weight(cfg)
        atomic_write_json(out / WEIGHT_FILE, {"weight": w, "split": ev.split, "chosen_on": None, "how": how})

    scored = []
    for t, data, res in per_task:
        fused = fuse_results(res, w, rule)
        qids = [q.qid for q in data.queries if q.qid in fused]
        width = max(len(v) for v in fused.values())
        ids = [[d for d, _ in fused[q]] + [""] * (width - len(fused[q])) for q in qids]
        sc = [[s for _, s in fused[q]] + [0.0] * (width - len(fused[q])) for q in qids]
        write_trec_run(out / RUNS_DIR / f"{t.name}_{ev.split}.trec", qids, ids, sc,
                       run_id=f"umarvel_plus_{ev.protocol}_{t.name}_{ev.split}_w{w:g}"
                              + ("_official" if official else ""))
        missing = [q.qid for q in data.queries if q.qid not in fused]
        if missing:
            raise DataError(f"{run_dir / RUNS_DIR}/{t.name}_{ev.split}.trec: no ranking for query {missing[0]} "
                            f"({len(missing)} missing)")
        scored.append(score_task(t, [[d for d, _ in fused[q]] for q in qids], [qrels_of(data, q) for q in qids],
                                 pool_size=pool_size[t.name]))
        logger.info("%s (+rerank, w=%g): %s = %.2f", t.name, w, t.metric, scored[-1].value)
    results = build_results(protocol=ev.protocol, model=base["model"], split=ev.split,
                            instruction_mode=ev.instruction, instruction_seed=ev.seed, tasks=scored, reranked=True,
                            compat=cfg.compat)
    write_results(out, results)
    atomic_write_json(out / "plus.json", {"config": asdict(cfg), "compat": cfg.compat, "fusion_rule": rule,
                                          "retrieval_compat": compat_of(base), "weight": w, "weight_how": how,
                                          "run_dir": str(run_dir.resolve()), "base_average": base["average"],
                                          "reranked_average": results["average"]})
    logger.info("U-MARVEL+ %s (%s, w=%g, compat %s): average %.2f (retrieval only %.2f) -> %s", ev.protocol,
                ev.split, w, cfg.compat, results["average"], base["average"], out)
    return results


def qrels_of(data, qid: str) -> tuple[str, ...]:
    """Positive dids of one query (the official scorer's qrels)."""
    return tuple(data.qrels.get(qid, ()))
