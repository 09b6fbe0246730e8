"""Before an evaluation loads its model: checks and the claim of the output folder.

- :func:`start_mbeir_run` (``umarvel eval mbeir``): the devices exist, the model is a checkpoint folder, the
  M-BEIR root and the files of the requested tasks are present, the output folder is writable; rank 0 then
  claims it (:func:`umarvel.utils.runs.claim_run_dir`): one writer (lock), and a folder holding results of
  another evaluation (other model content, protocol, split, tasks, instructions, dtype...) is refused
  unless ``overwrite``. The images are scanned by :func:`umarvel.eval.mbeir.runner.evaluate_mbeir` once the
  records are read, before anything is encoded.
- :func:`start_zeroshot_run` (``umarvel eval zeroshot``): the same checks, then the requested sets are read
  and their images checked (:func:`zeroshot_image_refs`) before the model loads.

Both return a claim to release when the run ends (a no-op object on ranks other than 0).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

from umarvel.data.registry import MBEIR_INSTRUCTIONS, MBEIR_TASK_ORDER, get_task
from umarvel.errors import DataError
from umarvel.eval.mbeir.config import MBeirEvalConfig
from umarvel.eval.mbeir.runner import select_tasks
from umarvel.eval.zeroshot.options import ZeroShotOptions
from umarvel.model.loading import check_checkpoint_dir
from umarvel.utils.checks import (check_device, check_input_dir, check_input_file, check_output_dir, check_positive,
                                  scan_images)
from umarvel.utils.runs import RunIdentity, claim_on_rank0

#: What an M-BEIR evaluation writes into its folder (removed by ``--overwrite``).
MBEIR_OUTPUTS = ("results.json", "results.md", "config.yaml", "run.json", "runs")
#: Settings that do not change M-BEIR results; the model / data paths are compared by content instead.
MBEIR_IGNORE = ("model", "mbeir_root", "output", "batch_size", "device", "cache_dir", "search_device",
                "shard_size", "allow_missing")
ZEROSHOT_OUTPUTS = ("results.json", "results.md", "metrics", "circo_test_submission.json")
ZEROSHOT_IGNORE = ("model", "data_root", "output_dir", "cache_dir", "device", "options.batch_size",
                   "options.video_batch_size", "options.max_tokens", "options.show_progress")
OVERRIDE_HINT = "rerun with --overwrite to replace its results"


def _claim(folder: str | os.PathLike, identity: RunIdentity, overwrite: bool, outputs: Sequence[str], what: str):
    return claim_on_rank0(folder, identity, overwrite=overwrite, outputs=outputs, what=what,
                          override_hint=OVERRIDE_HINT)


# ------------------------------------------------------------------------------------------------- M-BEIR
def mbeir_input_files(cfg: MBeirEvalConfig, tasks: Sequence[Any]) -> dict[str, Path]:
    """``{name: file}`` whose content determines the results: the tasks' query / pool / qrels files, the
    instructions and (global protocol) every local pool present."""
    root = Path(cfg.mbeir_root)
    files: dict[str, Path] = {"instructions": root / MBEIR_INSTRUCTIONS}
    for t in tasks:
        f = t.files(cfg.split)
        files.update({f"{t.name}.queries": root / f.queries, f"{t.name}.pool": root / f.pool,
                      f"{t.name}.qrels": root / f.qrels})
    if cfg.protocol == "global":
        for name in MBEIR_TASK_ORDER:
            pool = root / get_task(name).files(cfg.split).pool
            if pool.is_file():
                files[f"{name}.pool"] = pool
    return files


def start_mbeir_run(cfg: MBeirEvalConfig, *, overwrite: bool = False):
    """The checks of an M-BEIR evaluation that need no model, then the folder claim (see the module doc).

    Raises:
        ConfigError / EnvError / CheckpointError / DataError / FileAccessError / RunConflictError.
    """
    check_device(cfg.device, "--device")
    check_device(cfg.search_device, "--search-device")
    check_checkpoint_dir(cfg.model)
    root = check_input_dir(cfg.mbeir_root, "--mbeir-root")
    tasks, _ = select_tasks(root, cfg.tasks, cfg.split)
    check_input_file(root / MBEIR_INSTRUCTIONS, "M-BEIR instructions")
    identity = RunIdentity.build("eval-mbeir", cfg, ignore=MBEIR_IGNORE,
                                 inputs={"model": cfg.model, **mbeir_input_files(cfg, tasks)})
    return _claim(cfg.output, identity, overwrite, MBEIR_OUTPUTS, "--output")


# ----------------------------------------------------------------------------------------------- zero-shot
def zeroshot_image_refs(sets: dict) -> Iterator[tuple[str, str]]:
    """``(image path, where)`` of every image item (and interleaved image segment) of read zero-shot sets."""
    from umarvel.eval.zeroshot.types import ZSItem  # lazy: only scans need the set types

    for name, zs in sets.items():
        if not dataclasses.is_dataclass(zs):
            continue
        for f in dataclasses.fields(zs):
            items = getattr(zs, f.name)
            if not isinstance(items, tuple) or not items or not isinstance(items[0], ZSItem):
                continue
            for it in items:
                where = f"{name} {f.name} item {it.id}"
                if it.image:
                    yield str(it.image), where
                for kind, value in it.segments:
                    if kind == "image":
                        yield str(value), where


def start_zeroshot_run(model: str, data_root: str, output_dir: str, tasks: Sequence[Any], *,
                       options: ZeroShotOptions, device: str | None = None, dtype: str | None = None,
                       overwrite: bool = False, check_images: bool = True):
    """Checks of a zero-shot run before its model loads, the read of the sets and the image scan, then
    the claim of ``output_dir`` (identity: task names, options, dtype, model content).

    Args:
        tasks: the resolved registry tasks (:func:`umarvel.eval.zeroshot.tasks.resolve_zeroshot_names`).
    """
    from umarvel.eval.zeroshot.readers import read_set  # lazy: the readers are only needed for the scan

    check_device(device, "--device")
    check_checkpoint_dir(model)
    root = check_input_dir(data_root, "--data-root")
    for key in ("batch_size", "video_batch_size"):
        check_positive(getattr(options, key), f"--{key.replace('_', '-')}")
    check_output_dir(output_dir, "--output-dir")
    if check_images:
        sets = {}
        quiet = logging.getLogger("umarvel.eval.zeroshot")
        level, quiet.level = quiet.level, logging.ERROR  # the runner reports skipped sets, once
        try:
            for t in tasks:
                try:
                    sets[t.name] = read_set(t.options.get("reader", t.name), root)
                except DataError:  # malformed annotations: the runner records the task as an error, goes on
                    continue
        finally:
            quiet.level = level
        scan_images(zeroshot_image_refs(sets), what="zero-shot sets")
    config = {"tasks": [t.name for t in tasks], "dtype": dtype, "options": options, "model": model,
              "data_root": data_root, "output_dir": output_dir, "device": device}
    identity = RunIdentity.build("eval-zeroshot", config, ignore=ZEROSHOT_IGNORE, inputs={"model": model})
    return _claim(output_dir, identity, overwrite, ZEROSHOT_OUTPUTS, "--output-dir")
