"""``umarvel search``: search an index with a text and/or an image (or a file of queries).

    umarvel search --index photos.idx --text "a red car" --task mscoco_task0 -k 10
    umarvel search --index photos.idx --image q.jpg --html results.html
    umarvel search --index photos.idx --queries q.jsonl --output hits.jsonl
    umarvel search --list-tasks

Prints rank, score, id and a text snippet or the image path; ``--json`` prints one JSON object per query
(``{"query": {...}, "hits": [{"rank": 1, "id": "...", "score": 0.81, ...}]}``). Under ``torchrun`` a flat
index is searched shard by shard across the ranks (each rank searches its rows; the top-k are merged exactly).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

QUERY_KEYS = frozenset({"id", "text", "image", "instruction", "task"})


def add_subparser(sub) -> None:
    """Register ``umarvel search``."""
    p = sub.add_parser("search", help="search an index with a text and/or an image",
                       description="Search an index folder built by `umarvel index build`. The model defaults to "
                                   "the one recorded in index.json; a model whose fingerprint differs is an error.")
    p.add_argument("--index", help="index folder")
    p.add_argument("--model", default=None, help="checkpoint folder (default: the index's)")
    p.add_argument("--text", default=None, help="query text")
    p.add_argument("--image", default=None, help="query image file")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--instruction", default=None, help="instruction prepended to the query")
    g.add_argument("--task", default=None, help="use the trained instruction of this M-BEIR task (see --list-tasks)")
    p.add_argument("--instructions", default=None,
                   help="M-BEIR instructions/query_instructions.tsv to take --task instructions from "
                        "(default: the built-in copy of each task's first prompt)")
    p.add_argument("--list-tasks", action="store_true", help="list the --task names and their instructions")
    p.add_argument("-k", "--k", type=int, default=10, help="hits per query (default 10)")
    p.add_argument("--queries", default=None,
                   help="JSONL of queries (text, image, instruction, task, id); relative images from its folder")
    p.add_argument("--output", default=None, help="write hits as JSONL (one object per query)")
    p.add_argument("--json", action="store_true", help="print one JSON object per query instead of a table")
    p.add_argument("--html", default=None, help="write a self-contained results page (thumbnails embedded)")
    p.add_argument("--exact", action="store_true", help="ivf / hnsw index: search exactly instead")
    p.add_argument("--nprobe", type=int, default=None, help="ivf: lists probed (default: as built)")
    p.add_argument("--ef-search", type=int, default=None, help="hnsw: search beam (default: as built)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="model dtype (default: the one the index was built with)")
    p.add_argument("--batch-size", type=int, default=16, help="query encode batch size")
    p.set_defaults(func=run)


def read_queries(args: argparse.Namespace) -> list[dict]:
    """The queries of the command line or of ``--queries`` (checked; ``task`` resolved to an instruction)."""
    from umarvel.errors import ConfigError, DataError, ImageLoadError  # lazy: keeps the CLI start-up free of torch
    from umarvel.index.tasks import task_instruction
    from umarvel.utils.io import iter_jsonl

    if args.queries:
        if args.text or args.image:
            raise ConfigError("give either --queries or --text / --image, not both")
        path = Path(args.queries)
        out = []
        for lineno, rec in iter_jsonl(path):
            where = f"{path}:{lineno}"
            unknown = set(rec) - QUERY_KEYS
            if unknown:
                raise DataError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(QUERY_KEYS)}")
            if rec.get("image") and not Path(rec["image"]).is_absolute():
                rec["image"] = str(path.parent / rec["image"])
            out.append((where, rec))
        if not out:
            raise DataError(f"{path}: no queries")
    else:
        if not args.text and not args.image:
            raise ConfigError("give --text and/or --image (or --queries FILE)")
        out = [("command line", {"text": args.text, "image": args.image})]
    queries = []
    for where, rec in out:
        task = rec.get("task") or args.task
        instruction = rec.get("instruction") or args.instruction
        if task and not instruction:
            instruction = task_instruction(task, args.instructions)
        if rec.get("image") and not Path(rec["image"]).is_file():
            raise ImageLoadError(f"{where}: query image not found: {rec['image']}")
        if not (rec.get("text") or "").strip() and not rec.get("image"):
            raise DataError(f"{where}: query has neither text nor image")
        q = {"id": rec.get("id"), "text": rec.get("text") or None, "image": rec.get("image") or None,
             "instruction": instruction, "task": task}
        queries.append({k: v for k, v in q.items() if v is not None})
    return queries


def format_table(query: dict, hits: list) -> str:
    """The human-readable listing of one query's hits."""
    from umarvel.index.html import snippet  # lazy: keeps the CLI start-up free of torch

    head = " | ".join(f"{k}: {query[k]}" for k in ("id", "text", "image", "instruction") if query.get(k))
    lines = [f"query {head}"]
    for h in hits:
        what = h.image if h.image and not h.text else snippet(h.text, 80) + (f"  [{h.image}]" if h.image else "")
        lines.append(f"{h.rank:>4}  {h.score:8.4f}  {h.id}  {what}")
    if not hits:
        lines.append("   (no hits)")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    """Encode the queries, search, print / write the hits."""
    from umarvel.errors import ConfigError  # lazy: keeps the CLI start-up free of torch
    from umarvel.index.tasks import format_task_list

    if args.list_tasks:
        sys.stdout.write(format_task_list(args.instructions))
        return 0
    if not args.index:
        raise ConfigError("--index is required (or --list-tasks)")
    from umarvel import dist
    from umarvel.index import Index

    index = Index.load(args.index)
    queries = read_queries(args)
    device = dist.device_for_rank(args.device)
    with dist.process_group(device):
        rank = dist.get_rank()  # read inside: the process group is gone after the block
        vectors = None
        if rank == 0:
            model = index.load_model(args.model, device=device, dtype=args.dtype)
            vectors = index.encode_queries(model, [{k: q[k] for k in ("text", "image", "instruction") if k in q}
                                                   for q in queries], batch_size=args.batch_size)
        flat = index.backend == "flat" or args.exact
        vectors = dist.broadcast_object(vectors) if flat else vectors
        if rank != 0 and not flat:
            return 0
        results = index.search(vectors, args.k, device=device, distributed=flat, exact=args.exact,
                               nprobe=args.nprobe, ef_search=args.ef_search)
    if rank != 0:
        return 0
    write_outputs(args, queries, results)
    return 0


def write_outputs(args: argparse.Namespace, queries: list[dict], results: list) -> None:
    """stdout (table or JSON lines), ``--output`` JSONL and ``--html`` page."""
    from umarvel.utils.io import write_jsonl  # lazy: keeps the CLI start-up free of torch

    records = [{"query": q, "hits": [h.to_dict() for h in hits]} for q, hits in zip(queries, results)]
    if args.json:
        for rec in records:
            sys.stdout.write(json.dumps(rec, ensure_ascii=False) + "\n")
    elif not args.output:
        sys.stdout.write("\n".join(format_table(q, h) for q, h in zip(queries, results)))
    sys.stdout.flush()
    if args.output:
        write_jsonl(args.output, records)
        logger.info("wrote %s (%d queries)", args.output, len(records))
    if args.html:
        from umarvel.index.html import write_results_page

        write_results_page(args.html, list(zip(queries, results)), title="umarvel search",
                           subtitle=f"index {args.index}, top {args.k}")
