"""One embedding stage (1-5) as a task of the trainer: ``run_stage(cfg)`` is ``umarvel train``.

:class:`EmbeddingTask` owns what is particular to the embedder: LoRA per stage and the D2 temperature, the
step sampler and pair collator (:mod:`umarvel.train.batching`: packed forward chunks without padding, or
length-sorted padded ones), the speed knobs (``train.packing``, ``activation_checkpointing``, ``lora_compute``;
``fused_optimizer`` reaches the trainer through :func:`loop_config`), the objective
(:mod:`umarvel.train.objectives`: InfoNCE with cross-device negatives, distillation) and GradCache. The loop,
optimiser, scheduler, checkpoints, resume, NaN guard and logging are :class:`umarvel.train.trainer.Trainer`'s.
At the end the run exports ``output_dir/adapter`` and (``merge_at_end``) ``output_dir/merged`` (D13), which is
the next stage's ``init_from`` (D1).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Sequence

import torch

from umarvel import dist as udist
from umarvel.api import UMarvel
from umarvel.config import save_resolved
from umarvel.data.formatting import PromptStyle
from umarvel.data.images import ImageBudget
from umarvel.data.packing import to_device
from umarvel.errors import ConfigError
from umarvel.model.checkpointing import set_activation_checkpointing
from umarvel.model.loading import resolve_dtype
from umarvel.model.lora import attach_lora, merge_lora, save_lora, set_lora_compute
from umarvel.train.batching import ExampleSource, PairCollator, StepBatch, StepSampler
from umarvel.train.config import StageConfig
from umarvel.train.datasets import build_dataset
from umarvel.train.grad_cache import grad_cache_step
from umarvel.train.losses import initial_temperature
from umarvel.train.objectives import build_objective
from umarvel.train.preflight import start_stage_run
from umarvel.train.trainer import LoopConfig, Trainer, TrainerCallback, TrainState

logger = logging.getLogger(__name__)


class EmbeddingTask:
    """Train the embedder of one stage (see :class:`umarvel.train.trainer.TrainTask`).

    Args:
        cfg: the resolved :class:`StageConfig`.
        device: this rank's device.
        model: an already loaded ``UMarvel`` (tests: golden marker rows); default loads ``cfg.init_from``.
    """

    def __init__(self, cfg: StageConfig, device: torch.device, model=None):
        self.cfg = self.config = cfg
        self.name = cfg.stage
        self.device = device
        self.model = model if model is not None else self._load_model()
        self.embedder = self.module = self.model.embedder
        self._fixed_tau: torch.Tensor | None = None
        self._prepare_model()
        self.dataset = build_dataset(cfg.data, self.model.tokenizer)
        self.data_source = ExampleSource(self.dataset, cfg.train.seed)
        self.collator = self.collate_fn = self._collator()
        self.num_workers = cfg.data.num_workers
        self.objective = build_objective(cfg.loss)
        self.merge_at_end = cfg.train.merge_at_end

    # ------------------------------------------------------------------------------------------- setup
    def _load_model(self):
        m = self.cfg.model
        return UMarvel.from_pretrained(self.cfg.init_from, device=self.device, dtype=m.dtype,
                                       min_pixels=m.min_pixels, max_pixels=m.max_pixels,
                                       attn_implementation=m.attn_implementation, attention=m.attention,
                                       positions=m.positions)

    def _prepare_model(self) -> None:
        """D2 temperature, fresh LoRA (same init on every rank), LoRA compute dtype, activation checkpointing,
        train mode."""
        cfg = self.cfg
        tau = initial_temperature(cfg.temperature.init, carried=float(self.embedder.temperature.detach()))
        with torch.no_grad():
            self.embedder.temperature.fill_(tau)
        torch.manual_seed(cfg.train.seed)
        attach_lora(self.embedder, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout)
        set_lora_compute(self.embedder, cfg.train.lora_compute)
        self.embedder.temperature.requires_grad_(cfg.temperature.learnable)
        if self.checkpointing:
            hf, spec = self.embedder.hf_model, self.embedder.spec
            set_activation_checkpointing(hf, spec.language_model(hf), spec.visual(hf),
                                         cfg.train.activation_checkpointing, cfg.train.checkpoint_every_k)
        self.embedder.to(self.device).train()
        torch.manual_seed(cfg.train.seed + 7919 * udist.get_rank())  # per-rank dropout stream
        logger.info("stage %s: LoRA r=%d, temperature %s at %.4g", cfg.stage, cfg.lora.r,
                    "learnable" if cfg.temperature.learnable else "fixed", tau)

    @property
    def checkpointing(self) -> bool:
        """Whether activation checkpointing is on (``model.gradient_checkpointing`` and a mode other than none)."""
        return self.cfg.model.gradient_checkpointing and self.cfg.train.activation_checkpointing != "none"

    def _collator(self) -> PairCollator:
        d, m, t = self.cfg.data, self.cfg.model, self.cfg.train
        style = PromptStyle(suffix=d.suffix, image_only_suffix="image", add_generation_prompt=d.add_generation_prompt)
        spec = self.model.patch_spec
        return PairCollator(self.model.tokenizer, self.model.image_processor, style,
                            ImageBudget.for_backbone(m.min_pixels, m.max_pixels, spec.factor),
                            mask_instruction=d.mask_instruction, chunk_size=t.chunk_size, chunk_tokens=t.chunk_tokens,
                            patch_spec=spec, packing=t.packing and self.embedder.supports_packing)

    def param_groups(self, params: list[torch.nn.Parameter], weight_decay: float) -> list[dict]:
        """LoRA weights with weight decay; the learnable temperature (if any) without (D2)."""
        tau = self.embedder.temperature
        groups = [{"params": [p for p in params if p is not tau], "weight_decay": weight_decay}]
        if tau.requires_grad:
            groups.append({"params": [tau], "weight_decay": 0.0})
        return groups

    def check_deepspeed(self, zero_stage: int, where: str) -> None:
        """GradCache needs plain backward calls; ZeRO-3 partitions a learnable temperature."""
        if self.cfg.train.grad_cache:
            raise ConfigError("train.grad_cache with train.deepspeed is not supported yet: use deepspeed: null "
                              "(gradients are all-reduced by hand) or grad_cache: false")
        if zero_stage == 3:
            if self.cfg.temperature.learnable:
                raise ConfigError(f"{where}: ZeRO-3 partitions the temperature, which the loss reads outside the "
                                  "model's forward; a learnable temperature needs ZeRO-1/2 (the published recipe "
                                  "uses ZeRO-1) or temperature.learnable=false")
            # A fixed tau is read once, before ZeRO-3 partitions the parameter.
            self._fixed_tau = self.embedder.temperature.detach().clone()

    # ------------------------------------------------------------------------------------------- data
    def micro_batches_per_epoch(self, world: int) -> int:
        """Full global batches per epoch (one device batch per rank and step)."""
        b = self.cfg.train.per_device_batch_size
        n = StepSampler.steps_per_epoch(len(self.dataset), b, world)
        if n < 1:
            raise ConfigError(f"{len(self.dataset)} examples cannot fill one global batch of {b} x {world} devices")
        return n

    def batch_sampler(self, epoch: int, start: int, rank: int, world: int) -> StepSampler:
        """This rank's device batches of ``epoch`` from global step ``start`` on."""
        t, d = self.cfg.train, self.cfg.data
        lengths = [self.dataset.length_hint(i) for i in range(len(self.dataset))] if d.group_by_length else None
        return StepSampler(len(self.dataset), t.per_device_batch_size, world, rank, t.seed, epoch, start, lengths)

    # ------------------------------------------------------------------------------------------- step
    def temperature(self) -> torch.Tensor:
        """tau as a 0-d tensor, clamped into the configured range (identity inside it)."""
        c = self.cfg.temperature
        tau = self.embedder.temperature if self._fixed_tau is None else self._fixed_tau
        return tau.clamp(c.min, c.max).reshape(())

    def embed(self, model: torch.nn.Module, chunk: dict[str, torch.Tensor]) -> torch.Tensor:
        """Raw (unnormalised) float32 means (b, D) of one collated chunk, padded or packed (``lora_compute=model``:
        under autocast in the model dtype)."""
        chunk = to_device(chunk, self.device)
        dtype = self.model.dtype
        autocast = self.cfg.train.lora_compute == "model" and dtype != torch.float32
        with torch.autocast(self.device.type, dtype=dtype, enabled=autocast):
            return model(**chunk, normalize=False)

    def compute_loss(self, embs_sorted: torch.Tensor, batch: StepBatch, metrics: dict) -> torch.Tensor:
        """Loss of a device batch from the concatenated chunk outputs (S, D)."""
        layout = embs_sorted[batch.inverse.to(embs_sorted.device)]  # (S, D) category-major
        groups = list(layout.split(batch.group_sizes))
        loss, extra = self.objective(groups, batch, self.temperature())
        metrics.update(extra)
        return loss

    def forward_backward(self, batch: StepBatch, model: torch.nn.Module,
                         backward: Callable[[torch.Tensor], None]) -> tuple[torch.Tensor, dict]:
        """Embed, compute the loss, backpropagate (plain or GradCache). Returns the local detached loss."""
        metrics: dict = {"samples": batch.num_queries,
                         "padding_ratio": batch.padded_tokens / max(batch.num_tokens, 1)}
        if self.cfg.train.grad_cache:
            loss = grad_cache_step(lambda ch: self.embed(model, ch), [batch.chunks],
                                   lambda e: self.compute_loss(e, batch, metrics))
            return loss, metrics
        embs = torch.cat([self.embed(model, ch) for ch in batch.chunks])  # (S, D)
        loss = self.compute_loss(embs, batch, metrics)
        backward(loss)
        return loss.detach(), metrics

    def after_optimizer_step(self) -> dict:
        """Clamp a learnable temperature into its range; log tau."""
        tau = self.embedder.temperature
        if tau.requires_grad:
            with torch.no_grad():
                tau.clamp_(self.cfg.temperature.min, self.cfg.temperature.max)
        return {"temperature": float(tau.detach().float())}

    # ------------------------------------------------------------------------------------------- outputs
    def save_adapter(self, folder: Path, step: int) -> None:
        """peft adapter + tokenizer + ``umarvel.json`` (base model, temperature, stage, train dtype)."""
        import json


        save_lora(self.embedder, folder)
        self.model.tokenizer.save_pretrained(str(folder))
        meta = self.model.checkpoint_meta({
            "base_model": str(Path(self.cfg.init_from).resolve()), "stage": self.cfg.stage,
            "train_dtype": self.cfg.model.dtype, "step": step})
        (folder / "umarvel.json").write_text(json.dumps(meta, indent=2) + "\n")

    def export_merged(self, folder: Path, adapter: Path, step: int) -> None:
        """Merge the LoRA in the training dtype (D13) and save the next stage's ``init_from``."""
        self.embedder.eval()
        if self.checkpointing:
            hf = self.embedder.hf_model
            (getattr(hf, "activation_checkpointing_disable", None) or hf.gradient_checkpointing_disable)()
        merge_lora(self.embedder, resolve_dtype(self.cfg.model.dtype, self.device))
        meta = {"stage": self.cfg.stage, "init_from": str(Path(self.cfg.init_from).resolve()),
                "adapter": str(adapter.resolve()), "step": step, "train_dtype": self.cfg.model.dtype}
        out = self.model.save_pretrained(folder, extra_meta=meta)
        save_resolved(self.cfg, out / "resolved_config.yaml")
        logger.info("merged model written to %s (next stage's init_from)", out)


def loop_config(cfg: StageConfig) -> LoopConfig:
    """The trainer's loop settings of a stage."""
    t = cfg.train
    return LoopConfig(output_dir=t.output_dir, learning_rate=t.learning_rate, num_epochs=t.num_epochs,
                      max_steps=t.max_steps, lr_scheduler=t.lr_scheduler, warmup_ratio=t.warmup_ratio,
                      weight_decay=t.weight_decay, adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2,
                      adam_epsilon=t.adam_epsilon, max_grad_norm=t.max_grad_norm, seed=t.seed, save_steps=t.save_steps,
                      save_total_limit=t.save_total_limit, logging_steps=t.logging_steps, resume=t.resume,
                      report_to=tuple(t.report_to), deepspeed=t.deepspeed, micro_batch_size=t.per_device_batch_size,
                      dtype=cfg.model.dtype, fused_optimizer=t.fused_optimizer)


def stage_trainer(cfg: StageConfig, model=None, callbacks: Sequence[TrainerCallback] = ()) -> Trainer:
    """The trainer of one stage (process group from the torchrun environment, model on this rank's device)."""
    device = torch.device(udist.device_for_rank(cfg.train.device))
    udist.init_from_env(device)
    return Trainer(EmbeddingTask(cfg, device, model), loop_config(cfg), device, callbacks)


def run_stage(cfg: StageConfig, callbacks: Sequence[TrainerCallback] = (), *, overwrite: bool = False,
              check_images: bool = True) -> TrainState:
    """Train one stage end to end (the ``umarvel train`` command).

    Before the model loads, :func:`umarvel.train.preflight.start_stage_run` checks the config, the data and
    its images, and claims ``train.output_dir`` (lock + run identity; ``overwrite`` discards the run the
    folder holds and starts over); the claim is released when the run ends.
    """
    claim = start_stage_run(cfg, overwrite=overwrite, check_images=check_images)
    try:
        device = udist.device_for_rank(cfg.train.device)
        with udist.process_group(device):
            return stage_trainer(cfg, callbacks=callbacks).train()
    finally:
        if claim is not None:
            claim.release()
