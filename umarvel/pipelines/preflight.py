"""Before mining or teacher scoring loads a model: checks and the claim of the output folder.

:func:`start_mine_run` / :func:`start_teacher_run` check the device, the model (checkpoint folder) and the input
files, then claim the output folder (:func:`umarvel.utils.runs.claim_run_dir`: one writer; a folder holding the
output of another config, another model or other input files is refused unless ``overwrite``). The returned
claim is released when the run ends. The configs are taken duck-typed (``MineConfig`` / ``TeacherConfig``), so
this module imports neither pipeline.
"""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

from umarvel.utils.checks import check_device, check_input_dir, check_input_file, check_positive
from umarvel.utils.runs import RunClaim, RunIdentity, claim_on_rank0

MINE_OUTPUTS = ("rerank_data_all_eval_train_local.jsonl", "rerank_data_all_eval_train_global.jsonl",
                "mbeir_union_up_train_10percent.jsonl", "distill_subset.json", "mine_done.json", "parts")
MINE_IGNORE = ("model", "mbeir_root", "output", "queries", "pool", "instructions", "batch_size", "shard_size",
               "device", "cache_dir")
TEACHER_OUTPUTS = ("fusion_results.jsonl", "teacher_done.json", "teacher_parts")
TEACHER_IGNORE = ("reranker", "mbeir_root", "queries", "mined", "output", "pool", "instructions", "batch_size",
                  "device", "shard_queries")
OVERRIDE_HINT = "rerun with --overwrite to replace its files"


def _check_checkpoint(path: str) -> None:
    from umarvel.model.loading import check_checkpoint_dir  # lazy: `umarvel mine --help` stays free of torch

    check_checkpoint_dir(path)


def _model_input(name: str, path: str, given: Any) -> tuple[dict, dict]:
    """``(inputs, fingerprints)`` of the model: its folder, or the fingerprint of a model given as an object."""
    if given is None:
        _check_checkpoint(path)
        return {name: path}, {}
    fp = given.fingerprint() if hasattr(given, "fingerprint") else f"object:{type(given).__name__}"
    return {}, {name: fp}


def start_mine_run(cfg: Any, *, overwrite: bool = False, encoder: Any = None) -> RunClaim | nullcontext:
    """Checks of a mining run before its model loads, then the claim of ``cfg.output``.

    Args:
        encoder: the model when given as an object (its fingerprint identifies it; ``cfg.model`` is not read).
    """
    check_device(cfg.device, "--device")
    check_positive(cfg.batch_size, "--batch-size")
    check_positive(cfg.shard_size, "shard_size")
    model_in, model_fp = _model_input("model", cfg.model, encoder)
    check_input_dir(cfg.mbeir_root, "--mbeir-root")
    files = {key: cfg.path(getattr(cfg, key)) for key in ("queries", "pool", "instructions")}
    for key, path in files.items():
        check_input_file(path, f"--{key}")
    identity = RunIdentity.build("mine", cfg, ignore=MINE_IGNORE, inputs={**model_in, **files},
                                 fingerprints=model_fp)
    return claim_on_rank0(cfg.output, identity, overwrite=overwrite, outputs=MINE_OUTPUTS, what="--output",
                         override_hint=OVERRIDE_HINT)


def start_teacher_run(cfg: Any, *, overwrite: bool = False, reranker: Any = None) -> RunClaim | nullcontext:
    """Checks of a teacher run before the reranker loads, then the claim of ``cfg.output``.

    Args:
        reranker: the reranker when given as an object (``cfg.reranker`` is then only fingerprinted if present).
    """
    check_device(cfg.device, "device")
    if reranker is None:
        _check_checkpoint(cfg.reranker)
    check_input_dir(cfg.mbeir_root, "mbeir_root")
    files = {"queries": Path(cfg.queries), "mined": Path(cfg.mined), "pool": cfg.path(cfg.pool),
             "instructions": cfg.path(cfg.instructions)}
    for key, path in files.items():
        check_input_file(path, key)
    identity = RunIdentity.build("teacher", cfg, ignore=TEACHER_IGNORE, inputs={"reranker": cfg.reranker, **files})
    if reranker is not None and identity.inputs["reranker"] == "missing":
        identity.inputs["reranker"] = f"object:{type(reranker).__name__}"
    return claim_on_rank0(cfg.output, identity, overwrite=overwrite, outputs=TEACHER_OUTPUTS, what="output",
                         override_hint=OVERRIDE_HINT)
