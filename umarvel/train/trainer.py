"""The one training loop: every embedding stage (1-5) and the point-wise reranker train through :class:`Trainer`.

A *task* (:class:`TrainTask`) says what is trained and what one micro-batch computes; the trainer owns
everything else, once:

    data position (epoch, step in epoch) -> DataLoader -> task.forward_backward per micro-batch (gradient
    accumulation) -> NaN guard -> gradient all-reduce or DeepSpeed -> clip -> AdamW + ``transformers.get_scheduler``
    -> log (tqdm, INFO lines, TensorBoard / W&B on rank 0) -> callbacks -> checkpoint -> at the end ``adapter/``,
    ``merged/`` (if the task merges, D13) and ``train_history.json``.

Tasks: :class:`umarvel.train.stage.EmbeddingTask` (InfoNCE / distillation through the embedder, GradCache) and
:class:`umarvel.rerank.train.RerankTask` (the causal-LM loss of the Yes/No reranker).

Why an own loop rather than ``transformers.Trainer`` (conventions 11 allow it "with reasons"):
- an embedding step is not ``loss = model(**batch)``: the device batch is embedded in several length-sorted
  chunks and the loss needs all of them (plus the other ranks'); GradCache needs two passes and several
  backward calls per optimiser step, which ``Trainer.training_step`` cannot express by overriding
  ``compute_loss``;
- resume must restore the data position exactly (the samplers are pure functions of (seed, epoch, step)),
  checkpoints must be atomic with a "last good" pointer, and a non-finite loss must stop the run before the
  optimiser touches the weights; all three fight Trainer's internals;
- data-parallel gradients are all-reduced once per optimiser step by hand (one flat bucket per ~64M values),
  which works with any number of forward chunks or accumulated micro-batches, gradient checkpointing and
  GradCache (DDP's reducer needs ``no_sync`` juggling for that); DeepSpeed ZeRO-1/2/3 is used through
  ``deepspeed.initialize`` instead.

Checkpoints: ``output_dir/checkpoints/step-N`` + ``latest`` (:mod:`umarvel.train.checkpoint`); a resumed run
equals an uninterrupted one (weights, optimiser, scheduler, every rank's RNG and the data position).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch
import torch.distributed as dist

from umarvel import dist as udist
from umarvel.config import save_resolved, to_plain
from umarvel.errors import ConfigError, UMarvelError
from umarvel.log import progress_disabled
from umarvel.train import checkpoint as ckpt
from umarvel.utils.io import atomic_dir, atomic_write_json

logger = logging.getLogger(__name__)

HISTORY_FILE = "train_history.json"


class TrainingDiverged(UMarvelError):
    """A non-finite loss or gradient norm: the run stops; the last good checkpoint is kept."""


class TrainerCallback:
    """Hooks into a training run (the demo's progress bar, tests that stop a run); override what you need."""

    def on_step(self, step: int, total: int, loss: float) -> None:
        """After optimiser step ``step`` of ``total`` (and its checkpoint, if one was due); ``loss``: rank mean."""

    def on_save(self, step: int, path: Path) -> None:
        """After the complete checkpoint ``path`` of step ``step`` was published."""


@dataclass(frozen=True)
class LoopConfig:
    """The settings of the loop shared by every task (built from a stage's or the reranker's config).

    Attributes:
        output_dir: run folder: ``checkpoints/step-N``, ``adapter``, ``merged``, ``tb``, ``train_history.json``.
        num_epochs / max_steps: length of the run; ``max_steps`` (when set) overrides the epochs.
        gradient_accumulation_steps: micro-batches per optimiser step (the last, partial window of an epoch
            also steps, with the same 1/accumulation loss scale, as the HF Trainer does).
        lr_scheduler: a ``transformers.SchedulerType`` name (``cosine``, ``linear``, ``constant_with_warmup``,
            ...; note that ``constant`` ignores the warmup), with ``ceil(warmup_ratio * total)`` warmup steps.
        save_steps: checkpoint every N optimiser steps (0: only at the end); the last step is always saved.
        save_total_limit: checkpoints kept. logging_steps: TensorBoard / W&B / INFO-line period.
        resume: ``auto`` (the run folder's latest checkpoint if any), ``never``, or a checkpoint path.
        report_to: ``tensorboard`` and/or ``wandb`` (``auto``: tensorboard, plus wandb when configured through
            ``WANDB_API_KEY`` / ``WANDB_MODE``).
        deepspeed: a DeepSpeed JSON config or None; ``micro_batch_size`` / ``dtype`` fill its batch and
            precision fields.
        fused_optimizer: fused AdamW kernels where the device is CUDA (one kernel for all parameters; same
            update rule); ignored elsewhere.
    """

    output_dir: str
    learning_rate: float
    num_epochs: float = 1.0
    max_steps: int | None = None
    gradient_accumulation_steps: int = 1
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    seed: int = 42
    save_steps: int = 500
    save_total_limit: int = 2
    logging_steps: int = 1
    resume: str = "auto"
    report_to: tuple[str, ...] = ("auto",)
    deepspeed: str | None = None
    micro_batch_size: int = 1
    dtype: str = "float32"
    fused_optimizer: bool = False


class TrainTask(Protocol):
    """What the trainer needs from a task.

    Attributes:
        name: run name (logs, W&B). config: the resolved config dataclass (``resolved_config.yaml``).
        module: the trained ``nn.Module``; its ``requires_grad`` parameters, in order, are what is trained.
        data_source: map-style dataset the DataLoader reads. collate_fn: its collate function.
        num_workers: DataLoader worker processes. merge_at_end: write ``merged/`` at the end.
    """

    name: str
    config: Any
    module: torch.nn.Module
    data_source: torch.utils.data.Dataset
    collate_fn: Callable[[list], Any]
    num_workers: int
    merge_at_end: bool

    def micro_batches_per_epoch(self, world: int) -> int:
        """Micro-batches of one rank in one epoch (ConfigError when the data cannot fill one)."""

    def batch_sampler(self, epoch: int, start: int, rank: int, world: int) -> Sequence[list]:
        """This rank's micro-batches (lists of ``data_source`` keys) of ``epoch`` from micro-batch ``start`` on."""

    def param_groups(self, params: list[torch.nn.Parameter], weight_decay: float) -> list[dict]:
        """AdamW parameter groups of the trainable parameters."""

    def forward_backward(self, batch: Any, model: torch.nn.Module,
                         backward: Callable[[torch.Tensor], None]) -> tuple[torch.Tensor, dict]:
        """Loss of one collated micro-batch, back-propagated with ``backward(loss)``; returns the detached
        0-d loss and scalar metrics (``samples``: examples in the batch, for the throughput)."""

    def after_optimizer_step(self) -> dict:
        """After every optimiser step (e.g. clamp the temperature); returns scalars to log."""

    def check_deepspeed(self, zero_stage: int, where: str) -> None:
        """Refuse (ConfigError naming ``where``) a DeepSpeed setting the task cannot train with."""

    def save_adapter(self, folder: Path, step: int) -> None:
        """Write the trainable adapter (+ tokenizer) into ``folder`` (rank 0)."""

    def export_merged(self, folder: Path, adapter: Path, step: int) -> None:
        """Write the model with the adapter merged into ``folder`` (rank 0, at the end of the run)."""


@dataclass
class TrainState:
    """Where the run is: optimiser steps done, current epoch and steps done inside it; per-step logs."""

    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    history: list[dict] = field(default_factory=list)


class Trainer:
    """Train ``task`` as ``loop`` says.

    Args:
        task: see :class:`TrainTask` (built on ``device``, after :func:`umarvel.dist.init_from_env`).
        loop: the shared loop settings.
        device: this rank's device.
        callbacks: :class:`TrainerCallback` objects.
    """

    def __init__(self, task: TrainTask, loop: LoopConfig, device: torch.device,
                 callbacks: Sequence[TrainerCallback] = ()):
        self.task, self.loop, self.device = task, loop, torch.device(device)
        self.callbacks = list(callbacks)
        udist.init_from_env(self.device)
        self.rank, self.world = udist.get_rank(), udist.get_world_size()
        self.output_dir = Path(loop.output_dir)
        self.state = TrainState()
        self.engine = None
        self.zero_stage = 0
        self.named_trainable = [(n, p) for n, p in task.module.named_parameters() if p.requires_grad]
        if udist.is_dist():  # identical start on every rank
            for _, p in self.named_trainable:
                dist.broadcast(p.data, 0)
        micro = task.micro_batches_per_epoch(self.world)
        self.steps_per_epoch = math.ceil(micro / loop.gradient_accumulation_steps)
        self.total_steps = loop.max_steps or math.ceil(loop.num_epochs * self.steps_per_epoch)
        self._build_optimizer()
        self._setup_deepspeed()
        if self.rank == 0:
            save_resolved(task.config, self.output_dir / "resolved_config.yaml")
        self.writers = _Reporters(loop.report_to, self.output_dir, task.name, task.config) if self.rank == 0 else None
        self.resumed_from = self._maybe_resume()
        n = sum(p.numel() for _, p in self.named_trainable)
        logger.info("%s: %d trainable parameters, %d optimizer steps (%d per epoch), %d rank(s)", task.name, n,
                    self.total_steps, self.steps_per_epoch, self.world)

    # ------------------------------------------------------------------------------------------- setup
    def _build_optimizer(self) -> None:
        from transformers import SchedulerType, get_scheduler

        t = self.loop
        params = [p for _, p in self.named_trainable]
        fused = t.fused_optimizer and self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(self.task.param_groups(params, t.weight_decay), lr=t.learning_rate,
                                           betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon,
                                           **({"fused": True} if fused else {}))
        try:
            SchedulerType(t.lr_scheduler)
        except ValueError:
            raise ConfigError(f"train.lr_scheduler={t.lr_scheduler!r}: not a transformers scheduler "
                              f"({', '.join(s.value for s in SchedulerType)})") from None
        self.scheduler = get_scheduler(t.lr_scheduler, self.optimizer,
                                       num_warmup_steps=math.ceil(t.warmup_ratio * self.total_steps),
                                       num_training_steps=self.total_steps)

    def _setup_deepspeed(self) -> None:
        t = self.loop
        if not t.deepspeed:
            return
        path = Path(t.deepspeed)
        try:
            ds = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"train.deepspeed={path}: cannot read the DeepSpeed config ({exc})") from None
        if t.gradient_accumulation_steps != 1:
            raise ConfigError(f"train.deepspeed={path}: gradient accumulation is not supported with DeepSpeed")
        self.zero_stage = int(ds.get("zero_optimization", {}).get("stage", 0))
        self.task.check_deepspeed(self.zero_stage, f"train.deepspeed={path}")
        import deepspeed

        ds.update(train_micro_batch_size_per_gpu=t.micro_batch_size, gradient_accumulation_steps=1,
                  gradient_clipping=t.max_grad_norm, steps_per_print=10 ** 9)
        ds["bf16"] = {"enabled": t.dtype == "bfloat16"}
        ds["fp16"] = {"enabled": t.dtype == "float16"}
        if not udist.is_dist():
            deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo")
            self.rank, self.world = udist.get_rank(), udist.get_world_size()
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.task.module, optimizer=self.optimizer, lr_scheduler=self.scheduler, config=ds)

    # ------------------------------------------------------------------------------------------- step
    @property
    def model(self) -> torch.nn.Module:
        """What forward calls go through (the DeepSpeed engine or the task's module)."""
        return self.engine if self.engine is not None else self.task.module

    def _backward(self, loss: torch.Tensor) -> None:
        accum = self.loop.gradient_accumulation_steps
        loss = loss / accum if accum > 1 else loss
        if self.engine is not None:
            self.engine.backward(loss)
        else:
            loss.backward()

    def forward_backward(self, micro_batches: Sequence[Any]) -> tuple[torch.Tensor, dict]:
        """Forward + backward of every micro-batch of one step; returns the mean loss (float64) and metrics.

        Raises:
            TrainingDiverged: when the loss is not finite on some rank (before the optimiser step).
        """
        losses, metrics = [], {}
        for batch in micro_batches:
            loss, m = self.task.forward_backward(batch, self.model, self._backward)
            losses.append(float(loss))
            for k, v in m.items():
                metrics.setdefault(k, []).append(v)
        metrics = {k: sum(v) if k == "samples" else sum(v) / len(v) for k, v in metrics.items()}
        mean = torch.tensor(sum(losses) / len(losses), dtype=torch.float64, device=self.device)
        self._check_finite(mean, "loss")
        return mean, metrics

    def _check_finite(self, value: torch.Tensor, what: str) -> None:
        ok = torch.tensor([1.0 if bool(torch.isfinite(value).all()) else 0.0], device=self.device)
        if udist.is_dist():
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if ok.item() < 1.0:
            last = ckpt.latest_checkpoint(self.output_dir)
            raise TrainingDiverged(
                f"non-finite {what} ({float(value.detach().float().reshape(-1)[0])}) at step "
                f"{self.state.global_step + 1} (epoch {self.state.epoch}); the run stops and the weights of "
                f"this step are not saved. Last good checkpoint: {last or 'none yet'} (resume with "
                f"train.resume=auto after lowering the learning rate / checking the data)")

    def _allreduce_grads(self) -> None:
        """Average the trainable gradients over ranks (one flat all-reduce per ~64M values)."""
        if not udist.is_dist() or self.world == 1:
            return
        params = [p for _, p in self.named_trainable]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        bucket, size = [], 0
        for p in params + [None]:
            if p is not None:
                bucket.append(p)
                size += p.numel()
            if bucket and (p is None or size >= 64 * 2 ** 20):
                flat = torch.cat([q.grad.reshape(-1) for q in bucket])
                dist.all_reduce(flat)
                flat /= self.world
                off = 0
                for q in bucket:
                    q.grad.copy_(flat[off:off + q.numel()].view_as(q.grad))
                    off += q.numel()
                bucket, size = [], 0

    def optimizer_step(self) -> float:
        """All-reduce, clip, step, schedule; returns the gradient norm before clipping."""
        if self.engine is not None:
            self.engine.step()
            norm = self.engine.get_global_grad_norm()
            return float(norm) if norm is not None else float("nan")
        self._allreduce_grads()
        norm = torch.nn.utils.clip_grad_norm_([p for _, p in self.named_trainable], self.loop.max_grad_norm)
        self._check_finite(norm, "gradient norm")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    # ------------------------------------------------------------------------------------------- loop
    def steps(self, epoch: int, start_step: int) -> Iterator[list]:
        """The collated micro-batches of each optimiser step of ``epoch`` from ``start_step`` on (this rank)."""
        t, accum = self.loop, self.loop.gradient_accumulation_steps
        sampler = self.task.batch_sampler(epoch, start_step * accum, self.rank, self.world)
        workers = self.task.num_workers
        loader = torch.utils.data.DataLoader(
            self.task.data_source, batch_sampler=sampler, collate_fn=self.task.collate_fn, num_workers=workers,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(t.seed),  # never draws from the global RNG (exact resume)
            persistent_workers=False, prefetch_factor=2 if workers > 0 else None)
        window, n = [], len(sampler)
        for i, batch in enumerate(loader, start=1):
            window.append(batch)
            if len(window) == accum or i == n:
                yield window
                window = []

    def train(self) -> TrainState:
        """Run to ``total_steps``, checkpointing every ``save_steps``; export adapter / merged at the end."""
        from tqdm.auto import tqdm

        t = self.loop
        bar = tqdm(total=self.total_steps, initial=self.state.global_step, desc=f"train {self.task.name}",
                   unit="step", disable=progress_disabled())
        last_saved = self.state.global_step if self.resumed_from else -1
        while self.state.global_step < self.total_steps:
            tick = time.perf_counter()
            for micro_batches in self.steps(self.state.epoch, self.state.step_in_epoch):
                loss, metrics = self.forward_backward(micro_batches)
                norm = self.optimizer_step()
                metrics.update(self.task.after_optimizer_step())
                self.state.global_step += 1
                self.state.step_in_epoch += 1
                now = time.perf_counter()
                info = self._log(loss, metrics, norm, now - tick)
                tick = now
                bar.update(1)
                bar.set_postfix(loss=f"{info['loss']:.4f}")
                step = self.state.global_step
                if (t.save_steps > 0 and step % t.save_steps == 0) or step == self.total_steps:
                    self.save_checkpoint()
                    last_saved = step
                for cb in self.callbacks:
                    cb.on_step(step, self.total_steps, info["loss"])
                if step >= self.total_steps:
                    break
            else:
                self.state.epoch += 1
                self.state.step_in_epoch = 0
        bar.close()
        if last_saved != self.state.global_step:
            self.save_checkpoint()
        self.export()
        if self.writers:
            self.writers.close()
        return self.state

    def _log(self, loss: torch.Tensor, metrics: dict, norm: float, seconds: float) -> dict:
        """Record one step (rank-mean loss) in the history, TensorBoard / W&B and the log."""
        step = self.state.global_step
        info = {"step": step, "epoch": self.state.epoch,
                "loss": float(udist.all_reduce_mean(loss.detach().reshape(1).to(self.device))),
                "lr": float(self.scheduler.get_last_lr()[0]), "grad_norm": norm}
        samples = metrics.pop("samples", None)
        if samples is not None:
            info["samples_per_second"] = samples * self.world / max(seconds, 1e-9)
        info.update(metrics)
        self.state.history.append(info)
        if step % self.loop.logging_steps == 0 or step == self.total_steps:
            if self.writers:
                self.writers.log(info, step)
            if progress_disabled():  # otherwise the bar shows it
                logger.info("step %d/%d loss %.4f lr %.3g (%.2fs/step)", step, self.total_steps, info["loss"],
                            info["lr"], seconds)
        return info

    # ------------------------------------------------------------------------------------------- save / load
    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step-N`` atomically (every rank writes into rank 0's temp folder), point
        ``latest`` at it and keep the newest ``save_total_limit``."""
        step = self.state.global_step
        final = ckpt.checkpoints_dir(self.output_dir) / ckpt.step_name(step)
        with (atomic_dir(final) if self.rank == 0 else contextlib.nullcontext()) as tmp:
            tmp = Path(udist.broadcast_object(str(tmp) if tmp is not None else None))
            params = [p for _, p in self.named_trainable]
            with _zero3_gather(params) if self.zero_stage == 3 else contextlib.nullcontext():
                if self.rank == 0:
                    self.task.save_adapter(tmp / "adapter", step)
            if self.engine is not None:
                self.engine.save_checkpoint(str(tmp / "deepspeed"), tag="state", exclude_frozen_parameters=True)
            elif self.rank == 0:
                ckpt.save_trainable(tmp, self.named_trainable)
                torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                           tmp / "optimizer.pt")
            ckpt.save_rng(tmp, self.rank)
            if self.rank == 0:
                save_resolved(self.task.config, tmp / "resolved_config.yaml")
                last = self.state.history[-1] if self.state.history else {}
                ckpt.write_state(tmp, {"global_step": step, "epoch": self.state.epoch,
                                       "step_in_epoch": self.state.step_in_epoch, "world_size": self.world,
                                       "total_steps": self.total_steps, "loss": last.get("loss")})
            udist.barrier()  # every rank's files are in the temp folder before rank 0 publishes it
        if self.rank == 0:
            ckpt.point_latest(self.output_dir, final, self.loop.save_total_limit)
            logger.info("saved checkpoint %s", final)
        udist.barrier()
        for cb in self.callbacks:
            cb.on_save(step, final)
        return final

    def _maybe_resume(self) -> Path | None:
        path = ckpt.resolve_resume(self.loop.resume, self.output_dir)
        if path is None:
            return None
        state = ckpt.read_state(path)
        if state.get("world_size", self.world) != self.world:
            logger.warning("resuming a run saved with world size %s on %d ranks: the data order changes",
                           state.get("world_size"), self.world)
        if self.engine is not None:
            self.engine.load_checkpoint(str(path / "deepspeed"), tag="state", load_module_strict=False)
        else:
            ckpt.load_trainable(path, self.named_trainable)
            opt = torch.load(path / "optimizer.pt", map_location=self.device, weights_only=True)
            self.optimizer.load_state_dict(opt["optimizer"])
            self.scheduler.load_state_dict(opt["scheduler"])
        ckpt.load_rng(path, self.rank)
        self.state.global_step = int(state["global_step"])
        self.state.epoch = int(state["epoch"])
        self.state.step_in_epoch = int(state["step_in_epoch"])
        if self.state.step_in_epoch >= self.steps_per_epoch:
            self.state.epoch += 1
            self.state.step_in_epoch = 0
        logger.info("resumed from %s at step %d (epoch %d, step %d in it)", path, self.state.global_step,
                    self.state.epoch, self.state.step_in_epoch)
        return path

    def export(self) -> None:
        """``output_dir/adapter`` (the last checkpoint's), ``train_history.json`` and, if the task merges,
        ``output_dir/merged``."""
        udist.barrier()
        if self.rank == 0:
            last = ckpt.latest_checkpoint(self.output_dir)
            adapter = self.output_dir / "adapter"
            with atomic_dir(adapter) as tmp:
                shutil.copytree(last / "adapter", tmp, dirs_exist_ok=True)
            atomic_write_json(self.output_dir / HISTORY_FILE,
                              {"loss_per_step": [h["loss"] for h in self.state.history]})
            if self.task.merge_at_end and self.zero_stage == 3:
                logger.warning("ZeRO-3: no merged/ written; merge %s with `umarvel merge-lora --base <init_from> "
                               "--adapter %s --output <folder>`", adapter, adapter)
            elif self.task.merge_at_end:
                self.task.export_merged(self.output_dir / "merged", adapter, self.state.global_step)
        udist.barrier()


def _zero3_gather(params):
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


class _Reporters:
    """TensorBoard (and W&B) writers of rank 0."""

    def __init__(self, report_to: Sequence[str], output_dir: Path, name: str, config: Any):
        wanted = set(report_to)
        auto = "auto" in wanted
        self.tb = self.wandb = None
        if auto or "tensorboard" in wanted:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(output_dir / "tb"))
            except ImportError:
                logger.warning("tensorboard not installed: no TensorBoard logs")
        if "wandb" in wanted or (auto and (os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE"))):
            try:
                import wandb


                self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "umarvel"), name=name,
                                        config=to_plain(config), dir=str(output_dir))
            except ImportError:
                if "wandb" in wanted:
                    logger.warning("wandb not installed: no W&B logs")

    def log(self, info: dict, step: int) -> None:
        scalars = {k: v for k, v in info.items() if isinstance(v, (int, float)) and k not in ("step",)}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"train/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
