"""Logging setup: one call from the CLI; every module uses ``logging.getLogger(__name__)``."""
from __future__ import annotations

import logging
import os
import sys


def get_rank() -> int:
    """Global rank from the launcher's environment (0 when not distributed)."""
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """True on global rank 0 (the rank that logs at INFO and shows progress bars)."""
    return get_rank() == 0


def setup_logging(level: int | str = logging.INFO) -> None:
    """Configure the ``umarvel`` logger: INFO on rank 0, WARNING elsewhere, rank in every line."""
    rank = get_rank()
    logger = logging.getLogger("umarvel")
    if getattr(logger, "_umarvel_configured", False):
        return
    handler = logging.StreamHandler(sys.stderr)
    prefix = f"[rank{rank}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(level if rank == 0 else logging.WARNING)
    logger.propagate = False
    logger._umarvel_configured = True  # type: ignore[attr-defined]


def progress_disabled() -> bool:
    """Whether tqdm bars should be hidden (non-zero ranks, or UMARVEL_NO_PROGRESS=1)."""
    return not is_main_process() or os.environ.get("UMARVEL_NO_PROGRESS") == "1"
