"""``umarvel index build|add``: build an index of one's own images / texts, and grow it.

    umarvel index build --model CKPT --input photos/ --output photos.idx [--backend flat|ivf|hnsw]
    umarvel index add --index photos.idx --input more.jsonl

``--input`` is a JSONL of candidates (``id``, ``text``, ``image``, optional ``meta``) or a folder of images
searched recursively (id = relative path; an optional ``captions.jsonl`` in it adds text); ``index add`` of the
same folder later encodes only its new pictures (one replaced under the same name is refused). A killed build
resumes when run again; under ``torchrun`` the encoding is sharded over the ranks. The folder has one writer
at a time (``.lock``), and a build records its identity (``run_identity.json``): an unfinished build of another
model, input file, backend or dtype is refused unless ``--overwrite`` (:mod:`umarvel.utils.runs`).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def _add_encode_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image-root", default=None,
                   help="folder relative image paths of a JSONL input are resolved against (default: its folder)")
    p.add_argument("--batch-size", type=int, default=32, help="encode batch size (default 32)")
    p.add_argument("--shard-size", type=int, default=1024,
                   help="items per saved shard: what a killed run keeps, and the torchrun sharding unit (default 1024)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bf16 on CUDA, fp32 on CPU; "
                                                  "add: the index's)")
    p.add_argument("--recall-sample", type=int, default=1000,
                   help="ivf / hnsw: queries of the recall@10 estimate written to index.json (made from a "
                        "seeded sample of the collection, held-out style: not the indexed vectors themselves)")


def add_subparser(sub) -> None:
    """Register ``umarvel index`` with ``build`` and ``add``."""
    p = sub.add_parser("index", help="build or grow a search index of your own images and texts",
                       description="Build (umarvel index build) or grow (umarvel index add) an index folder; "
                                   "search it with `umarvel search` or `umarvel serve`.")
    isub = p.add_subparsers(dest="index_command", metavar="ACTION")

    b = isub.add_parser("build", help="encode items into a new index folder",
                        description="Encode a JSONL of items or a folder of images into an index folder "
                                    "(index.json, items.jsonl, vectors/, faiss index). Resumes a killed build.")
    b.add_argument("--model", required=True, help="checkpoint folder")
    b.add_argument("--input", required=True, help="items JSONL (id, text, image, meta) or a folder of images")
    b.add_argument("--output", required=True, help="index folder to write")
    b.add_argument("--backend", choices=("flat", "ivf", "hnsw"), default="flat",
                   help="flat: exact (default); ivf / hnsw: faiss approximate indexes for millions of items")
    b.add_argument("--nlist", type=int, default=None, help="ivf: inverted lists (default ~4 sqrt(N))")
    b.add_argument("--nprobe", type=int, default=None, help="ivf: lists probed per query (default 16)")
    b.add_argument("--hnsw-m", type=int, default=None, help="hnsw: links per node (default 32)")
    b.add_argument("--ef-construction", type=int, default=None, help="hnsw: build beam (default 128)")
    b.add_argument("--ef-search", type=int, default=None, help="hnsw: search beam (default 128)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing index at --output")
    _add_encode_args(b)
    b.set_defaults(func=run_build)

    a = isub.add_parser("add", help="encode new items into an existing index",
                        description="Encode only the new items and append them. A folder of images may be given "
                                    "again as it grows: the pictures already indexed with the same caption and "
                                    "content are skipped, one that changed under the same name is an error "
                                    "naming it (rebuild with `index build --overwrite`). In a JSONL an id "
                                    "already in the index, and a different model, are errors naming it.")
    a.add_argument("--index", required=True, help="index folder")
    a.add_argument("--input", required=True, help="items JSONL or a folder of images")
    a.add_argument("--model", default=None, help="checkpoint folder (default: the one recorded in index.json; "
                                                  "its fingerprint must match)")
    _add_encode_args(a)
    a.set_defaults(func=run_add)

    def _no_action(args: argparse.Namespace) -> int:
        p.print_help()
        return 2

    p.set_defaults(func=_no_action)


def _backend_params(args: argparse.Namespace) -> dict:
    """The faiss options given on the command line (only those set), checked against the backend."""
    from umarvel.errors import ConfigError  # lazy: keeps the CLI start-up free of torch

    names = {"ivf": ("nlist", "nprobe"), "hnsw": ("hnsw_m", "ef_construction", "ef_search")}
    given = {k: getattr(args, k) for k in ("nlist", "nprobe", "hnsw_m", "ef_construction", "ef_search")
             if getattr(args, k) is not None}
    bad = sorted(set(given) - set(names.get(args.backend, ())))
    if bad:
        flags = ", ".join("--" + b.replace("_", "-") for b in bad)
        raise ConfigError(f"{flags}: not an option of --backend {args.backend}")
    return given


def run_build(args: argparse.Namespace) -> int:
    """``umarvel index build``."""
    from umarvel.api import UMarvel  # lazy: keeps the CLI start-up free of torch
    from umarvel import dist
    from umarvel.index import Index, read_items
    from umarvel.index.core import check_new_index, claim_build

    params = _backend_params(args)
    check_new_index(args.output, args.backend, params, args.overwrite)
    items = read_items(args.input, image_root=args.image_root, exclude=[args.output])  # errors before the model loads
    device = dist.device_for_rank(args.device)
    with claim_build(args.output, args.model, args.input, args.backend, params, args.dtype, args.image_root,
                     args.overwrite, batch_size=args.batch_size, shard_size=args.shard_size, device=args.device,
                     recall_sample=args.recall_sample), dist.process_group(device):
        model = UMarvel.from_pretrained(args.model, device=device, dtype=args.dtype)
        index = Index.build(model, items, args.output, backend=args.backend, batch_size=args.batch_size,
                            shard_size=args.shard_size, overwrite=args.overwrite, backend_params=params,
                            recall_sample=args.recall_sample, source=args.input)
    logger.info("built %r", index)
    return 0


def run_add(args: argparse.Namespace) -> int:
    """``umarvel index add``."""
    from umarvel import dist  # lazy: keeps the CLI start-up free of torch
    from umarvel.index import Index
    from umarvel.index.core import INDEX_JSON, lock_index

    if not (Path(args.index) / INDEX_JSON).is_file():
        Index.load(args.index)  # raises the clear error (not an index, an unfinished build) before the lock
    device = dist.device_for_rank(args.device)
    with lock_index(args.index), dist.process_group(device):
        index = Index.load(args.index)  # under the lock: the state this add extends
        # errors (bad items, an id already indexed, a changed picture) before the model loads; nothing new: no model
        todo = index.items_to_add(args.input, image_root=args.image_root, source=args.input)
        if not todo:
            logger.info("nothing new to add: %r", index)
            return 0
        model = index.load_model(args.model, device=device, dtype=args.dtype)
        n = index.add(model, todo, batch_size=args.batch_size, shard_size=args.shard_size,
                      recall_sample=args.recall_sample, source=args.input)
    logger.info("added %d items: %r", n, index)
    return 0
