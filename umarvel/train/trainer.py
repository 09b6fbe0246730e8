"""The stage trainer: one small loop for every embedding stage (``run_stage(cfg)``).

Why an own loop rather than ``transformers.Trainer`` (conventions 11 allow it "with reasons"):
- a step is not ``loss = model(**batch)``: the device batch is embedded in several length-sorted chunks and
  the loss needs all of them (plus the other ranks'); GradCache needs two passes and several backward calls
  per optimiser step, which ``Trainer.training_step`` cannot express by overriding ``compute_loss``;
- resume must restore the data position exactly (our sampler is a pure function of (seed, epoch, step)),
  checkpoints must be atomic with a "last good" pointer, and a non-finite loss must stop the run before
  the optimiser touches the weights; all three fight Trainer's internals;
- data-parallel gradients are all-reduced once per step by hand (one flat bucket per ~64M values), which
  works with any number of forward chunks, gradient checkpointing and GradCache (DDP's reducer needs
  ``no_sync`` juggling for that); DeepSpeed ZeRO-1/2/3 is used through ``deepspeed.initialize`` instead.

The loop: sampler -> DataLoader workers (images, tokens, chunks; :mod:`umarvel.train.batching`) -> embed chunks
-> objective (:mod:`umarvel.train.objectives`) -> backward (plain or GradCache) -> all-reduce -> clip ->
AdamW + cosine/warmup -> temperature clamp -> log (TensorBoard / W&B / tqdm on rank 0) -> checkpoint.
At the end it exports ``output_dir/adapter`` and (``merge_at_end``) ``output_dir/merged`` (D13), which is the
next stage's ``init_from`` (D1).
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from umarvel import dist as udist
from umarvel.data.formatting import PromptStyle
from umarvel.data.images import ImageBudget
from umarvel.errors import ConfigError, UMarvelError
from umarvel.log import progress_disabled
from umarvel.train import checkpoint as ckpt
from umarvel.train.batching import ExampleSource, PairCollator, StepBatch, StepSampler
from umarvel.train.config import StageConfig
from umarvel.train.datasets import build_dataset
from umarvel.train.objectives import build_objective

logger = logging.getLogger(__name__)

Callback = Callable[["StageTrainer", str, dict], None]


class TrainingDiverged(UMarvelError):
    """A non-finite loss or gradient norm: the run stops; the last good checkpoint is kept."""


@dataclass
class TrainState:
    """Where the run is: optimiser steps done, current epoch and steps done inside it."""

    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    history: list[dict] = field(default_factory=list)


def _device(cfg_device: str) -> torch.device:
    if cfg_device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    return torch.device(cfg_device)


def init_distributed(device: torch.device) -> None:
    """Initialise the process group from the torchrun environment when WORLD_SIZE > 1."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not udist.is_dist():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


class StageTrainer:
    """Train one stage.

    Args:
        cfg: the resolved :class:`StageConfig`.
        model: an already loaded ``UMarvel`` (tests: golden marker rows); default loads ``cfg.init_from``.
        callbacks: ``cb(trainer, event, info)`` called on ``"step_end"`` (info: step, loss, ...) and ``"saved"``.
    """

    def __init__(self, cfg: StageConfig, model=None, callbacks: list[Callback] | tuple = ()):
        self.cfg = cfg
        self.callbacks = list(callbacks)
        self.device = _device(cfg.train.device)
        init_distributed(self.device)
        self.rank, self.world = udist.get_rank(), udist.get_world_size()
        self.output_dir = Path(cfg.train.output_dir)
        self.state = TrainState()
        self.engine = None
        self.model = model if model is not None else self._load_model()
        self.embedder = self.model.embedder
        self._prepare_model()
        self.dataset = build_dataset(cfg.data, self.model.tokenizer)
        self.collator = self._collator()
        self.objective = build_objective(cfg.loss)
        self.steps_per_epoch = StepSampler.steps_per_epoch(len(self.dataset), cfg.train.per_device_batch_size,
                                                           self.world)
        if self.steps_per_epoch < 1:
            raise ConfigError(f"{len(self.dataset)} examples cannot fill one global batch of "
                              f"{cfg.train.per_device_batch_size} x {self.world} devices")
        self.total_steps = cfg.train.max_steps or math.ceil(cfg.train.num_epochs * self.steps_per_epoch)
        self._build_optimizer()
        self._setup_deepspeed()
        self.writers = _Reporters(cfg, self.output_dir) if self.rank == 0 else None
        self.resumed_from = self._maybe_resume()

    # ------------------------------------------------------------------------------------------- setup
    def _load_model(self):
        from umarvel.api import UMarvel

        m = self.cfg.model
        return UMarvel.from_pretrained(self.cfg.init_from, device=self.device, dtype=m.dtype,
                                       min_pixels=m.min_pixels, max_pixels=m.max_pixels,
                                       attn_implementation=m.attn_implementation, attention=m.attention,
                                       positions=m.positions)

    def _prepare_model(self) -> None:
        """D2 temperature, fresh LoRA (same init on every rank), gradient checkpointing, train mode."""
        from umarvel.model.lora import attach_lora
        from umarvel.train.losses import initial_temperature

        cfg = self.cfg
        tau = initial_temperature(cfg.temperature.init, carried=float(self.embedder.temperature.detach()))
        with torch.no_grad():
            self.embedder.temperature.fill_(tau)
        torch.manual_seed(cfg.train.seed)
        attach_lora(self.embedder, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout)
        self.embedder.temperature.requires_grad_(cfg.temperature.learnable)
        if cfg.model.gradient_checkpointing:
            hf = self.embedder.hf_model
            if hasattr(hf, "activation_checkpointing_enable"):  # transformers >= 5.2x
                hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.embedder.to(self.device).train()
        self.named_trainable = [(n, p) for n, p in self.embedder.named_parameters() if p.requires_grad]
        if udist.is_dist():  # identical start on every rank
            for _, p in self.named_trainable:
                dist.broadcast(p.data, 0)
        torch.manual_seed(cfg.train.seed + 7919 * self.rank)  # per-rank dropout stream
        n = sum(p.numel() for _, p in self.named_trainable)
        logger.info("stage %s: %d trainable parameters (LoRA r=%d, temperature %s at %.4g)", cfg.stage, n,
                    cfg.lora.r, "learnable" if cfg.temperature.learnable else "fixed", tau)

    def _collator(self) -> PairCollator:
        d, m, t = self.cfg.data, self.cfg.model, self.cfg.train
        style = PromptStyle(suffix=d.suffix, image_only_suffix="image", add_generation_prompt=d.add_generation_prompt)
        spec = self.model.patch_spec
        return PairCollator(self.model.tokenizer, self.model.image_processor, style,
                            ImageBudget.for_backbone(m.min_pixels, m.max_pixels, spec.factor),
                            mask_instruction=d.mask_instruction, chunk_size=t.chunk_size, chunk_tokens=t.chunk_tokens,
                            patch_spec=spec)

    def _build_optimizer(self) -> None:
        from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup, \
            get_linear_schedule_with_warmup

        t = self.cfg.train
        tau = self.embedder.temperature
        lora = [p for _, p in self.named_trainable if p is not tau]
        groups = [{"params": lora, "weight_decay": t.weight_decay}]
        if tau.requires_grad:
            groups.append({"params": [tau], "weight_decay": 0.0})
        self.optimizer = torch.optim.AdamW(groups, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                                           eps=t.adam_epsilon)
        warmup = math.ceil(t.warmup_ratio * self.total_steps)
        make = {"cosine": get_cosine_schedule_with_warmup, "linear": get_linear_schedule_with_warmup}
        if t.lr_scheduler == "constant":
            self.scheduler = get_constant_schedule_with_warmup(self.optimizer, warmup)
        else:
            self.scheduler = make[t.lr_scheduler](self.optimizer, warmup, self.total_steps)

    def _setup_deepspeed(self) -> None:
        t = self.cfg.train
        if not t.deepspeed:
            return
        if t.grad_cache:
            raise ConfigError("train.grad_cache with train.deepspeed is not supported yet: use deepspeed: null "
                              "(gradients are all-reduced by hand) or grad_cache: false")
        import deepspeed

        path = Path(t.deepspeed)
        try:
            ds = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"train.deepspeed={path}: cannot read the DeepSpeed config ({exc})") from None
        ds.update(train_micro_batch_size_per_gpu=t.per_device_batch_size, gradient_accumulation_steps=1,
                  gradient_clipping=t.max_grad_norm, steps_per_print=10 ** 9)
        ds["bf16"] = {"enabled": self.cfg.model.dtype == "bfloat16"}
        ds["fp16"] = {"enabled": self.cfg.model.dtype == "float16"}
        if int(ds.get("zero_optimization", {}).get("stage", 0)) == 3:
            if self.cfg.temperature.learnable:
                raise ConfigError(f"train.deepspeed={path}: ZeRO-3 partitions the temperature, which the loss reads "
                                  "outside the model's forward; a learnable temperature needs ZeRO-1/2 (the "
                                  "published recipe uses ZeRO-1) or temperature.learnable=false")
            # A fixed tau is read once, before ZeRO-3 partitions the parameter.
            self._fixed_tau = self.embedder.temperature.detach().clone()
        if not udist.is_dist():
            deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo")
            self.rank, self.world = udist.get_rank(), udist.get_world_size()
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.embedder, optimizer=self.optimizer, lr_scheduler=self.scheduler, config=ds)
        self.zero_stage = int(ds.get("zero_optimization", {}).get("stage", 0))

    # ------------------------------------------------------------------------------------------- step
    @property
    def module(self):
        """What forward calls go through (the DeepSpeed engine or the embedder)."""
        return self.engine if self.engine is not None else self.embedder

    def temperature(self) -> torch.Tensor:
        """tau as a 0-d tensor, clamped into the configured range (identity inside it)."""
        c = self.cfg.temperature
        tau = getattr(self, "_fixed_tau", None)
        tau = self.embedder.temperature if tau is None else tau
        return tau.clamp(c.min, c.max).reshape(())

    def _embed(self, chunk: dict[str, torch.Tensor]) -> torch.Tensor:
        chunk = {k: v.to(self.device, non_blocking=True) for k, v in chunk.items()}
        return self.module(**chunk, normalize=False)  # (b, D) float32 raw means

    def compute_loss(self, embs_sorted: torch.Tensor, batch: StepBatch, metrics: dict) -> torch.Tensor:
        """Loss of a device batch from the concatenated chunk outputs (S, D)."""
        layout = embs_sorted[batch.inverse.to(embs_sorted.device)]  # (S, D) category-major
        groups = list(layout.split(batch.group_sizes))
        loss, extra = self.objective(groups, batch, self.temperature())
        metrics.update(extra)
        return loss

    def forward_backward(self, batch: StepBatch) -> tuple[torch.Tensor, dict]:
        """Embed, compute the loss, backpropagate (plain or GradCache). Returns the local detached loss."""
        from umarvel.train.grad_cache import grad_cache_step

        metrics: dict = {}
        if self.cfg.train.grad_cache:
            loss = grad_cache_step(self._embed, [batch.chunks], lambda e: self.compute_loss(e, batch, metrics))
            self._check_finite(loss, "loss")
            return loss, metrics
        embs = torch.cat([self._embed(ch) for ch in batch.chunks])  # (S, D)
        loss = self.compute_loss(embs, batch, metrics)
        self._check_finite(loss.detach(), "loss")
        if self.engine is not None:
            self.engine.backward(loss)
        else:
            loss.backward()
        return loss.detach(), metrics

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
        """All-reduce, clip, step, schedule, clamp tau; returns the gradient norm before clipping."""
        if self.engine is not None:
            self.engine.step()
            norm = self.engine.get_global_grad_norm()
            norm = float(norm) if norm is not None else float("nan")
        else:
            self._allreduce_grads()
            params = [p for _, p in self.named_trainable]
            norm_t = torch.nn.utils.clip_grad_norm_(params, self.cfg.train.max_grad_norm)
            self._check_finite(norm_t, "gradient norm")
            norm = float(norm_t)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        if self.embedder.temperature.requires_grad:
            with torch.no_grad():
                self.embedder.temperature.clamp_(self.cfg.temperature.min, self.cfg.temperature.max)
        return norm

    # ------------------------------------------------------------------------------------------- loop
    def _loader(self, epoch: int, start_step: int):
        t, d = self.cfg.train, self.cfg.data
        lengths = [self.dataset.length_hint(i) for i in range(len(self.dataset))] if d.group_by_length else None
        sampler = StepSampler(len(self.dataset), t.per_device_batch_size, self.world, self.rank, t.seed, epoch,
                              start_step, lengths)
        return torch.utils.data.DataLoader(
            ExampleSource(self.dataset, t.seed), batch_sampler=sampler, collate_fn=self.collator,
            num_workers=d.num_workers, pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(t.seed),  # never draws from the global RNG (resume)
            persistent_workers=False, prefetch_factor=2 if d.num_workers > 0 else None)

    def train(self) -> TrainState:
        """Run to ``total_steps``, checkpointing every ``save_steps``; export adapter / merged at the end."""
        from tqdm.auto import tqdm

        t = self.cfg.train
        bar = tqdm(total=self.total_steps, initial=self.state.global_step, desc=f"train {self.cfg.stage}",
                   unit="step", disable=progress_disabled())
        last_saved = self.state.global_step if self.resumed_from else -1
        while self.state.global_step < self.total_steps:
            loader = self._loader(self.state.epoch, self.state.step_in_epoch)
            tick = time.perf_counter()
            for batch in loader:
                loss, metrics = self.forward_backward(batch)
                norm = self.optimizer_step()
                self.state.global_step += 1
                self.state.step_in_epoch += 1
                now = time.perf_counter()
                info = self._log(loss, metrics, norm, batch, now - tick)
                tick = now
                bar.update(1)
                bar.set_postfix(loss=f"{info['loss']:.4f}")
                if self.state.global_step % t.save_steps == 0 or self.state.global_step == self.total_steps:
                    self.save_checkpoint()
                    last_saved = self.state.global_step
                self._emit("step_end", info)
                if self.state.global_step >= self.total_steps:
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

    def _log(self, loss, metrics, norm, batch: StepBatch, seconds: float) -> dict:
        g = loss.detach().float().reshape(1).to(self.device)
        if udist.is_dist():
            dist.all_reduce(g)
            g /= self.world
        info = {"step": self.state.global_step, "epoch": self.state.epoch, "loss": float(g),
                "temperature": float(self.embedder.temperature.detach().float()),
                "lr": float(self.scheduler.get_last_lr()[0]), "grad_norm": norm,
                "samples_per_second": batch.num_queries * self.world / max(seconds, 1e-9),
                "padding_ratio": batch.padded_tokens / max(batch.num_tokens, 1), **metrics}
        self.state.history.append(info)
        if self.writers and self.state.global_step % self.cfg.train.logging_steps == 0:
            self.writers.log(info, self.state.global_step)
        return info

    def _emit(self, event: str, info: dict) -> None:
        for cb in self.callbacks:
            cb(self, event, info)

    # ------------------------------------------------------------------------------------------- save / load
    def _adapter_meta(self) -> dict:
        return self.model.checkpoint_meta({
            "base_model": str(Path(self.cfg.init_from).resolve()), "stage": self.cfg.stage,
            "train_dtype": self.cfg.model.dtype, "step": self.state.global_step})

    def _save_adapter(self, folder: Path) -> None:
        from umarvel.model.lora import save_lora

        params = [p for _, p in self.named_trainable]
        gather = _zero3_gather(params) if self.engine is not None and self.zero_stage == 3 else _null()
        with gather:
            if self.rank == 0:
                save_lora(self.embedder, folder)
                self.model.tokenizer.save_pretrained(str(folder))
                (folder / "umarvel.json").write_text(json.dumps(self._adapter_meta(), indent=2) + "\n")

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step-N`` atomically (temp folder, rename, ``latest``; keep the last N)."""
        from umarvel.config import save_resolved

        step = self.state.global_step
        tmp = ckpt.tmp_dir_for(self.output_dir, step)
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        udist.barrier()
        self._save_adapter(tmp / "adapter")
        if self.engine is not None:
            self.engine.save_checkpoint(str(tmp / "deepspeed"), tag="state", exclude_frozen_parameters=True)
        elif self.rank == 0:
            ckpt.save_trainable(tmp, self.named_trainable)
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                       tmp / "optimizer.pt")
        ckpt.save_rng(tmp, self.rank)
        udist.barrier()
        final = ckpt.checkpoints_dir(self.output_dir) / ckpt.step_name(step)
        if self.rank == 0:
            save_resolved(self.cfg, tmp / "resolved_config.yaml")
            last = self.state.history[-1] if self.state.history else {}
            ckpt.write_state(tmp, {"global_step": step, "epoch": self.state.epoch,
                                   "step_in_epoch": self.state.step_in_epoch, "world_size": self.world,
                                   "total_steps": self.total_steps, "loss": last.get("loss")})
            final = ckpt.publish(self.output_dir, step, self.cfg.train.save_total_limit)
            logger.info("saved checkpoint %s", final)
        udist.barrier()
        self._emit("saved", {"step": step, "path": str(final)})
        return final

    def _maybe_resume(self) -> Path | None:
        path = ckpt.resolve_resume(self.cfg.train.resume, self.output_dir)
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
            opt = torch.load(path / "optimizer.pt", map_location=self.device, weights_only=False)
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
        """``output_dir/adapter`` (copy of the last checkpoint's adapter) and, if configured, ``merged``."""
        from umarvel.config import save_resolved
        from umarvel.model.loading import resolve_dtype
        from umarvel.model.lora import merge_lora

        udist.barrier()
        if self.rank == 0:
            last = ckpt.latest_checkpoint(self.output_dir)
            target = self.output_dir / "adapter"
            tmp = self.output_dir / ".adapter.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(last / "adapter", tmp)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
            if self.cfg.train.merge_at_end and not (self.engine is not None and self.zero_stage == 3):
                self.embedder.eval()
                if self.cfg.model.gradient_checkpointing:
                    hf = self.embedder.hf_model
                    (getattr(hf, "activation_checkpointing_disable", None) or hf.gradient_checkpointing_disable)()
                merge_lora(self.embedder, resolve_dtype(self.cfg.model.dtype, self.device))
                meta = {"stage": self.cfg.stage, "init_from": str(Path(self.cfg.init_from).resolve()),
                        "adapter": str(target.resolve()), "step": self.state.global_step,
                        "train_dtype": self.cfg.model.dtype}
                out = self.model.save_pretrained(self.output_dir / "merged", extra_meta=meta)
                save_resolved(self.cfg, out / "resolved_config.yaml")
                logger.info("merged model written to %s (next stage's init_from)", out)
            elif self.cfg.train.merge_at_end:
                logger.warning("ZeRO-3: merge the adapter with `umarvel merge-lora --base %s --adapter %s`",
                               self.cfg.init_from, target)
        udist.barrier()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _zero3_gather(params):
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


class _Reporters:
    """TensorBoard (and W&B) writers of rank 0."""

    def __init__(self, cfg: StageConfig, output_dir: Path):
        wanted = set(cfg.train.report_to)
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

                from umarvel.config import _plain  # noqa: PLC2701 - the config as plain dicts

                self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "umarvel"), name=cfg.stage,
                                        config=_plain(cfg), dir=str(output_dir))
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


def run_stage(cfg: StageConfig, callbacks: list[Callback] | tuple = ()) -> TrainState:
    """Train one stage end to end (the ``umarvel train`` command)."""
    ok = False
    try:
        state = StageTrainer(cfg, callbacks=callbacks).train()
        ok = True
        return state
    finally:
        if udist.is_dist():
            if ok:
                udist.barrier()
            dist.destroy_process_group()
