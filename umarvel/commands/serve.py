"""``umarvel serve``: a local search page over an index (search box, image upload, thumbnails, JSON API).

    umarvel serve --index photos.idx [--port 7860]

Binds 127.0.0.1 unless ``--host`` says otherwise. See :mod:`umarvel.index.server` for the routes and limits.
"""
from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)


def add_subparser(sub) -> None:
    """Register ``umarvel serve``."""
    p = sub.add_parser("serve", help="a local search page over an index",
                       description="Serve a search page (text box, task / instruction, image upload, thumbnail "
                                   "grid with scores) and a JSON endpoint (/api/search?q=...) over an index.")
    p.add_argument("--index", required=True, help="index folder")
    p.add_argument("--model", default=None, help="checkpoint folder (default: the index's)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860; 0 = any free port)")
    p.add_argument("-k", "--k", type=int, default=12, help="default hits per query (default 12)")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest request / upload (default 10 MB)")
    p.add_argument("--instructions", default=None, help="M-BEIR query_instructions.tsv for the task list "
                                                       "(default: the built-in first prompts)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="model dtype (default: the one the index was built with)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load the index and model, then serve until interrupted."""
    from umarvel.errors import ConfigError
    from umarvel import dist
    from umarvel.index import Index
    from umarvel.index.server import SearchApp, make_server

    if not 1 <= args.k <= 100:
        raise ConfigError(f"-k must be between 1 and 100, got {args.k}")
    index = Index.load(args.index)
    device = dist.device_for_rank(args.device)
    model = index.load_model(args.model, device=device, dtype=args.dtype)
    app = SearchApp(index, model, k=args.k, device=device, max_upload_bytes=int(args.max_upload_mb * (1 << 20)),
                    instructions=args.instructions)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("binding %s: the page is reachable from other machines (no authentication)", args.host)
    server = make_server(app, args.host, args.port)
    host, port = server.server_address[:2]
    logger.info("serving %r on http://%s:%d/ (Ctrl-C stops)", index, host, port)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        logger.info("stopped")
    finally:
        server.server_close()
    return 0
