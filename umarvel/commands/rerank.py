"""``umarvel rerank train|score|fuse``: the point-wise reranker (method spec section 4, D9, D10).

- ``train CONFIG [key=value ...]``: LoRA reranker training (``configs/rerank/reranker.yaml``).
- ``score``: P(yes) for the top-k candidates of a TREC run -> ``{qid: [p_yes, ...]}`` JSON (run order),
  plus ``<out stem>.meta.json`` (split, task, run, qrels, model, positions) used by ``fuse``.
- ``fuse``: ``cos + w * P(yes)`` re-ranking of a run into a new TREC run; or ``--choose-weight`` on
  VALIDATION score files (refused for any other split).
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from umarvel.errors import ConfigError, DataError

logger = logging.getLogger(__name__)


def add_subparser(sub) -> None:
    """Register ``umarvel rerank`` and its three actions."""
    p = sub.add_parser("rerank", help="point-wise reranker: train, score, fuse",
                       description="U-MARVEL point-wise reranker (Yes/No P(yes)) and score fusion.")
    actions = p.add_subparsers(dest="rerank_action", metavar="ACTION")

    t = actions.add_parser("train", help="train a reranker LoRA from a YAML config")
    t.add_argument("config", help="reranker YAML (configs/rerank/reranker.yaml)")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.learning_rate=1e-5")
    t.add_argument("--overwrite", action="store_true",
                   help="start over in train.output_dir even if it holds a run (its checkpoints, adapter and merged "
                        "model are removed); without it a run with another config is refused")
    t.set_defaults(func=run_train)

    s = actions.add_parser("score", help="P(yes) for the top-k of a retrieval run")
    s.add_argument("--model", required=True, help="reranker checkpoint folder (merged) or LoRA adapter folder")
    s.add_argument("--adapter", default=None, help="extra LoRA adapter applied on top of --model")
    s.add_argument("--mbeir-root", required=True, help="M-BEIR root (image paths are resolved against it)")
    s.add_argument("--run", "--input", dest="run", required=True, help="TREC run file: qid Q0 did rank score run_id")
    s.add_argument("--split", required=True, choices=["val", "test", "train"], help="split of the run's queries")
    s.add_argument("--task", default=None, help="registry task name (its query/pool/qrels files of --split)")
    s.add_argument("--queries", default=None, help="query JSONL (instead of --task; relative to --mbeir-root)")
    s.add_argument("--pool", default=None, help="candidate pool JSONL (instead of --task)")
    s.add_argument("--qrels", default=None, help="qrels file (instead of --task; needed later by fuse --choose-weight)")
    s.add_argument("--instructions", default=None, help="instruction TSV (default: instructions/query_instructions.tsv)")
    s.add_argument("--instruction-mode", default="random", choices=["random", "first"])
    s.add_argument("--seed", type=int, default=None, help="instruction seed (default: the eval default, D7)")
    s.add_argument("--top-k", type=int, default=50)
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--positions", default="1d", choices=["1d", "mrope"],
                   help="1d: training convention (default, D10); mrope: equals the official generate-based scores")
    s.add_argument("--device", default="cpu")
    s.add_argument("--dtype", default=None)
    s.add_argument("--out", required=True, help="output JSON {qid: [p_yes, ...]}")
    s.set_defaults(func=run_score)

    f = actions.add_parser("fuse", help="fuse cosines and P(yes): cos + w * P(yes)")
    f.add_argument("--run", help="TREC run whose scores are the retrieval cosines")
    f.add_argument("--scores", help="P(yes) JSON written by 'umarvel rerank score'")
    f.add_argument("--weight", type=float, default=None, help="fusion weight w (default 0.1, D9)")
    f.add_argument("--out", help="fused TREC run")
    f.add_argument("--choose-weight", action="store_true",
                   help="pick w on validation score files (--val-scores) and print it as JSON")
    f.add_argument("--val-scores", nargs="+", default=[], help="score JSONs of split 'val' (with their .meta.json)")
    f.add_argument("--grid", default=None, help="comma-separated weights (default: fusion.DEFAULT_GRID)")
    f.set_defaults(func=run_fuse)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def meta_path(scores_path: str | Path) -> Path:
    """Sidecar of a score file: ``scores.json`` -> ``scores.meta.json``."""
    p = Path(scores_path)
    return p.with_name(p.stem + ".meta.json")


def run_train(args: argparse.Namespace) -> int:
    """Load the reranker config (strict) and train."""
    from umarvel.config import load_config
    from umarvel.rerank.train import RerankTrainConfig, train_reranker

    cfg = load_config(args.config, RerankTrainConfig, args.overrides)
    out = train_reranker(cfg, overwrite=args.overwrite)
    logger.info("reranker training finished; outputs in %s", out)
    return 0


def _records(args: argparse.Namespace):
    """Queries (with instructions), pool and qrels path for ``score``."""
    from umarvel.data import mbeir as R
    from umarvel.data.registry import MBEIR_INSTRUCTIONS, get_task

    root = Path(args.mbeir_root)
    seed = R.DEFAULT_INSTRUCTION_SEED if args.seed is None else args.seed
    table = R.read_instructions(root / (args.instructions or MBEIR_INSTRUCTIONS))
    if args.task:
        if args.queries or args.pool:
            raise ConfigError("give either --task or --queries/--pool, not both")
        data = R.load_mbeir_task(root, get_task(args.task), args.split, instructions=table,
                                 instruction_mode=args.instruction_mode, seed=seed, allow_missing=True)
        qrels = root / data.task.files(args.split).qrels
        return list(data.queries), list(data.pool), str(qrels)
    if not (args.queries and args.pool):
        raise ConfigError("score needs --task, or both --queries and --pool")
    queries = R.read_queries(root / args.queries, root)
    pool = R.read_pool(root / args.pool, root)
    modality_of = {c.did: c.modality for c in pool}
    rng = R.instruction_rng(seed, Path(args.queries).stem)
    queries = R.assign_instructions(queries, table, modality_of, args.instruction_mode, rng)
    return queries, pool, (str(root / args.qrels) if args.qrels else None)


def run_score(args: argparse.Namespace) -> int:
    """Score the top-k of a run and write ``{qid: [p_yes]}`` and its meta sidecar atomically."""
    from umarvel.data.runfiles import read_trec_run
    from umarvel.rerank.model import load_reranker
    from umarvel.rerank.score import score_run
    from umarvel.utils.io import atomic_write_json

    if args.top_k < 1:
        raise ConfigError(f"--top-k must be >= 1, got {args.top_k}")
    queries, pool, qrels = _records(args)
    run = read_trec_run(args.run)
    reranker = load_reranker(args.model, device=args.device, dtype=args.dtype, adapter=args.adapter,
                             positions=args.positions)
    scores = score_run(reranker, run, {q.qid: q for q in queries}, {c.did: c for c in pool}, top_k=args.top_k,
                       batch_size=args.batch_size)
    atomic_write_json(args.out, scores, indent=None)
    atomic_write_json(meta_path(args.out), {
        "split": args.split, "task": args.task, "run": str(Path(args.run).resolve()), "qrels": qrels,
        "model": str(args.model), "adapter": args.adapter, "positions": args.positions, "top_k": args.top_k,
        "instruction_mode": args.instruction_mode, "seed": args.seed})
    logger.info("wrote P(yes) of %d queries to %s", len(scores), args.out)
    return 0


def load_rerank_results(scores_path: str | Path):
    """A :class:`~umarvel.rerank.fusion.RerankResults` from a score file, its meta, run and qrels."""
    from umarvel.data.mbeir import read_qrels
    from umarvel.data.registry import get_task
    from umarvel.data.runfiles import read_trec_run
    from umarvel.rerank.fusion import RerankedQuery, RerankResults

    mp = meta_path(scores_path)
    if not mp.is_file():
        raise DataError(f"{scores_path}: no {mp.name} next to it (written by 'umarvel rerank score')")
    meta = json.loads(mp.read_text())
    scores = json.loads(Path(scores_path).read_text())
    run = read_trec_run(meta["run"])
    qrels = read_qrels(meta["qrels"]) if meta.get("qrels") else {}
    queries = []
    for qid, p in scores.items():
        if qid not in run:
            raise DataError(f"{scores_path}: query {qid} is not in the run {meta['run']}")
        ranked = run[qid]
        queries.append(RerankedQuery.from_lists(qid, [d for d, _ in ranked], [s for _, s in ranked], p,
                                                qrels.get(qid, ())))
    task = meta.get("task") or Path(scores_path).stem
    metric_k = get_task(task).metric_k if meta.get("task") else 5
    return RerankResults(split=meta.get("split", "?"), task=task, queries=tuple(queries), metric_k=metric_k,
                         meta=meta)


def run_fuse(args: argparse.Namespace) -> int:
    """Fuse one run, or choose the weight on validation score files."""
    from umarvel.rerank.fusion import DEFAULT_FUSION_WEIGHT, DEFAULT_GRID, choose_weight, fuse_results

    if args.choose_weight:
        if not args.val_scores:
            raise ConfigError("--choose-weight needs --val-scores")
        try:
            grid = [float(x) for x in args.grid.split(",")] if args.grid else list(DEFAULT_GRID)
        except ValueError:
            raise ConfigError(f"--grid must be comma-separated numbers, got {args.grid!r}") from None
        best, table = choose_weight([load_rerank_results(s) for s in args.val_scores], grid)
        print(json.dumps({"weight": best, "mean_recall": {str(w): v for w, v in table.items()}}))
        return 0
    if not (args.run and args.scores and args.out):
        raise ConfigError("fuse needs --run, --scores and --out (or --choose-weight)")
    from umarvel.data.runfiles import read_trec_run, write_trec_run
    from umarvel.rerank.fusion import RerankedQuery, RerankResults

    run = read_trec_run(args.run)
    scores = json.loads(Path(args.scores).read_text())
    queries = []
    for qid, ranked in run.items():
        if qid not in scores:
            raise DataError(f"{args.scores}: no P(yes) for query {qid} of {args.run}")
        queries.append(RerankedQuery.from_lists(qid, [d for d, _ in ranked], [s for _, s in ranked], scores[qid]))
    w = DEFAULT_FUSION_WEIGHT if args.weight is None else args.weight
    fused = fuse_results(RerankResults(split="?", task="?", queries=tuple(queries)), w)
    qids = list(fused)
    width = max(len(v) for v in fused.values())
    ids = [[d for d, _ in fused[q]] + [""] * (width - len(fused[q])) for q in qids]
    sc = [[s for _, s in fused[q]] + [0.0] * (width - len(fused[q])) for q in qids]
    write_trec_run(args.out, qids, ids, sc, run_id=f"rerank_fused_w{w:g}")
    logger.info("wrote the fused run of %d queries (w=%g) to %s", len(qids), w, args.out)
    return 0
