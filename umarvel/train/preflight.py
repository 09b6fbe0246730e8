"""Before a training stage loads its model: checks, the data, the images, and the run folder.

:func:`start_stage_run` is the one call :func:`umarvel.train.stage.run_stage` makes before anything heavy:

1. config checks that need the machine: the device exists (``train.device=cuda`` without CUDA is an
   :class:`~umarvel.errors.EnvError`), ``init_from`` is a checkpoint folder, the DeepSpeed file exists;
2. rank 0 claims ``train.output_dir`` (:func:`umarvel.utils.runs.claim_run_dir`): writable, not in use by
   another launch (lock held until the run ends), and, if it already holds a run, the same identity (config
   keys that change the weights + content of ``init_from`` and the data files); a different one is refused
   unless ``overwrite`` (start over: checkpoints, adapter, merged removed) or an explicit
   ``train.resume=<checkpoint>`` (continue from it with the new config, with a warning);
3. the data files are parsed and every record checked (:func:`umarvel.train.datasets.prepare_dataset`,
   reused by the trainer after the model loads, so nothing is read twice);
4. every referenced image is checked (exists, readable header; :func:`umarvel.utils.checks.scan_images`),
   each rank of a torchrun job taking its share; ``check_images=False`` (``--skip-image-check``) skips it;
5. only then is the run recorded in ``run_identity.json`` (a start that failed records nothing).
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Iterator

import yaml

from umarvel.config import to_plain
from umarvel.dist import env_rank, env_world_size
from umarvel.data.registry import MBEIR_INSTRUCTIONS, MBEIR_UNION_POOLS, MBEIR_UNION_TRAIN_QUERIES
from umarvel.errors import ConfigError, EnvError
from umarvel.model.loading import check_checkpoint_dir
from umarvel.train.checkpoint import latest_checkpoint
from umarvel.train.config import StageConfig
from umarvel.train.datasets import Cc3mDataset, MbeirTrainDataset, prepare_dataset
from umarvel.utils.checks import check_device, check_input_file, scan_images
from umarvel.utils.runs import RunClaim, RunIdentity, claim_run_dir

logger = logging.getLogger(__name__)

#: What a training run writes into its folder (removed by ``overwrite``).
TRAIN_OUTPUTS = ("checkpoints", "adapter", "merged", "tb", "train_history.json", ".adapter.tmp")
#: Keys that do not change the trained weights, the length of the run (a finished or interrupted run may be
#: extended: ``train.max_steps`` / ``num_epochs`` raised, the schedule follows the new length), and the paths
#: whose *content* is compared instead.
STAGE_IGNORE = (
    "train.max_steps", "train.num_epochs", "train.output_dir", "train.resume", "train.report_to", "train.logging_steps", "train.save_steps",
    "train.save_total_limit", "train.merge_at_end", "train.device", "train.chunk_size", "train.chunk_tokens",
    "train.grad_cache", "model.attn_implementation", "model.gradient_checkpointing", "data.num_workers",
    "init_from", "data.path", "data.root", "data.pool", "data.instructions", "data.negatives", "data.scores",
)
OVERRIDE_HINT = ("rerun with --overwrite to discard it and start over, or with train.resume=<its checkpoint> "
                 "to continue from its weights with the new config")


def data_files(cfg: StageConfig) -> dict[str, str | None]:
    """The data files whose content determines the run (resolved as the datasets resolve them)."""
    d = cfg.data
    files: dict[str, str | None] = {"data.path": d.path, "data.negatives": d.negatives, "data.scores": d.scores}
    if d.kind.startswith("mbeir") and d.root:
        root = Path(d.root)
        files.update({"data.path": d.path or str(root / MBEIR_UNION_TRAIN_QUERIES),
                      "data.pool": d.pool or str(root / MBEIR_UNION_POOLS["train"]),
                      "data.instructions": d.instructions or str(root / MBEIR_INSTRUCTIONS)})
    return files


def stage_identity(cfg: StageConfig) -> RunIdentity:
    """The identity of a stage run: its config (minus :data:`STAGE_IGNORE`) and the content of its inputs."""
    return RunIdentity.build("train", cfg, ignore=STAGE_IGNORE, inputs={"init_from": cfg.init_from, **data_files(cfg)})


def check_stage_config(cfg: StageConfig) -> None:
    """Checks of a stage config against this machine and the file system (before any model loads).

    Raises:
        EnvError: ``train.device`` not available, ``deepspeed`` not installed for ``train.deepspeed``.
        CheckpointError: ``init_from`` is not a checkpoint folder. ConfigError: the DeepSpeed file is missing.
    """
    check_device(cfg.train.device, "train.device")
    check_checkpoint_dir(cfg.init_from)
    if cfg.train.deepspeed:
        check_input_file(cfg.train.deepspeed, "train.deepspeed", ConfigError)
        if importlib.util.find_spec("deepspeed") is None:
            raise EnvError(f"train.deepspeed={cfg.train.deepspeed}: the deepspeed package is not installed "
                           "(pip install deepspeed, or train.deepspeed=null)")


def _recorded_config(output_dir: Path) -> dict | None:
    """A run folder written before run identities existed: the config saved with its newest checkpoint
    (or its merged model), as a recorded identity to compare with."""
    try:
        last = latest_checkpoint(output_dir)
    except Exception:  # noqa: BLE001 - a broken pointer: nothing to compare with
        last = None
    for f in ([last / "resolved_config.yaml"] if last else []) + [output_dir / "merged" / "resolved_config.yaml"]:
        if f.is_file():
            try:
                return {"kind": "train", "config": to_plain(yaml.safe_load(f.read_text(encoding="utf-8")))}
            except (OSError, yaml.YAMLError):
                return None
    return None


def train_image_refs(ds) -> Iterator[tuple[str, str]]:
    """``(image path, where)`` of every image the examples of a training dataset can use."""
    base = getattr(ds, "base", ds)
    if isinstance(base, Cc3mDataset):
        for key, _, image in base.records:
            yield image, f"{base.path}: record {key!r}"
        return
    if not isinstance(base, MbeirTrainDataset):
        return
    extra = getattr(ds, "negatives", None) or [r.dids[: ds.k] for r in getattr(ds, "rows", [])]
    for i, (q, line) in enumerate(zip(base.queries, base.lines)):
        where = f"{base.path}:{line}"
        if q.image:
            yield q.image, f"{where} query {q.qid}"
        for did in (*q.positives, *(extra[i] if i < len(extra) else ())):
            c = base.pool.get(did)
            if c is not None and c.image:
                yield c.image, f"{where} candidate {did}"
    if getattr(ds, "negatives", None) is not None and not all(ds.negatives):  # random fallback: any candidate
        for did, c in base.pool.items():
            if c.image:
                yield c.image, f"pool candidate {did}"


def start_stage_run(cfg: StageConfig, *, overwrite: bool = False, check_images: bool = True) -> RunClaim | None:
    """Everything a stage checks before its model loads (module doc); returns rank 0's claim of the folder.

    The caller releases the claim when the run ends (``claim.release()``; ``None`` on other ranks).

    Raises:
        ConfigError / RunConflictError / EnvError / CheckpointError / DataError / ImageLoadError /
        FileAccessError: with one clear message; nothing was written and no model was loaded.
    """
    rank, world = env_rank(), env_world_size()
    check_stage_config(cfg)
    claim = None
    if rank == 0:
        out = Path(cfg.train.output_dir)
        explicit = cfg.train.resume not in ("auto", "never")
        claim = claim_run_dir(out, stage_identity(cfg), overwrite=overwrite, accept_changes=explicit,
                              outputs=TRAIN_OUTPUTS, record=False, what="train.output_dir",
                              override_hint=OVERRIDE_HINT, legacy=_recorded_config(out))
    try:
        ds = prepare_dataset(cfg.data)
        if check_images:
            scan_images(train_image_refs(ds), what="training data", shard=(rank, world))
        if claim is not None:
            claim.record()
    except BaseException:
        if claim is not None:
            claim.release()
        raise
    return claim
