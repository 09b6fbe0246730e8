"""Logging setup: one call from the CLI; every module uses ``logging.getLogger(__name__)``."""
from __future__ import annotations

import logging
import os
import sys


def is_main_process() -> bool:
    """True on global rank 0 (the rank that logs at INFO and shows progress bars)."""
    from umarvel.dist import env_rank  # lazy: umarvel.dist imports torch (1.3 s), `umarvel --help` must not

    return env_rank() == 0


def setup_logging(level: int | str = logging.INFO) -> None:
    """Configure the ``umarvel`` logger: INFO on rank 0, WARNING elsewhere, rank in every line."""
    from umarvel.dist import env_rank, env_world_size  # lazy: see is_main_process

    rank = env_rank()
    logger = logging.getLogger("umarvel")
    if getattr(logger, "_umarvel_configured", False):
        return
    handler = logging.StreamHandler(sys.stderr)
    prefix = f"[rank{rank}] " if env_world_size() > 1 else ""
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(level if rank == 0 else logging.WARNING)
    logger.propagate = False
    logger._umarvel_configured = True  # type: ignore[attr-defined]


def progress_disabled() -> bool:
    """Whether tqdm bars should be hidden (non-zero ranks, or UMARVEL_NO_PROGRESS=1)."""
    return not is_main_process() or os.environ.get("UMARVEL_NO_PROGRESS") == "1"
