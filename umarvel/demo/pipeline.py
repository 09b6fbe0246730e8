"""The demo run: the U-MARVEL recipe on the generated benchmark with a tiny model, evaluated after every stage.

Order (as ``scripts/train_umarvel.sh``, method spec section 0), each step through the library function the
corresponding command uses:

=============  ===============================================================  ======================================
job            what                                                             library call
=============  ===============================================================  ======================================
benchmark      generate the data, write the tiny random model                   ``make_demo_benchmark``, ``save_tiny_checkpoint``
eval stage0    local + global test evaluation of the random model               ``evaluate_mbeir``
stage1         NLI paraphrases (``configs/stages/01_nli.yaml``)                 ``run_stage``
stage2         image-caption pairs (``02_cc3m.yaml``)                           ``run_stage``
stage3         M-BEIR instruction tuning (``03_mbeir.yaml``)                    ``run_stage``
mine3          stage-3 top-k of the train queries, local + global, subset       ``mine``
rerank         point-wise reranker on the stage-3 local lists (``reranker.yaml``) ``train_reranker``
rerank_check   the reranker alone vs stage 3 on the stage-3 val top-k (local)   ``evaluate_plus`` (P(yes) order)
stage4         global hard negatives (``04_mbeir_hardneg.yaml``)                ``run_stage``
mine4          stage-4 local top-k of the distillation subset                   ``mine``
teacher        reranker P(yes) fused with the cosines (``teacher.yaml`` fields)  ``build_teacher_file``
stage5         reranker distillation (``05_mbeir_distill.yaml``): the final model ``run_stage``
plus           U-MARVEL+: rerank the stage-5 top-k, weight chosen on val        ``evaluate_plus``
=============  ===============================================================  ======================================

Every embedding stage is followed by a local and a global evaluation on the test split. The demo
simplifies the published recipe in documented ways: a tiny randomly initialised model stands in for
Qwen2-VL-7B (hidden 64, 2 layers, the real tokenizer), step counts / learning rates / LoRA ranks / the
hard-negative skip and the compression suffix of stages 4-5 are the preset's (:mod:`umarvel.demo.plan`, which
says why), and U-MARVEL+ reuses the stage-3 reranker (the published U-MARVEL+ retrains it on stage-5 mined
lists).

Outputs in the output folder: ``results.md``, ``results.json``, ``recall_per_stage.png``, ``benchmark/``
(the data), ``runs/`` (checkpoints, mined lists, teacher file) and ``eval/`` (every evaluation's own
``results.json`` / ``results.md`` / TREC runs).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import umarvel
from umarvel.api import UMarvel
from umarvel.config import load_config
from umarvel.demo.benchmark import DemoBenchmark, chance_recall, make_demo_benchmark
from umarvel.demo.plan import DemoPlan, DemoResult, StagePlan, StageResult
from umarvel.demo.progress import Job, Progress
from umarvel.demo.report import write_report
from umarvel.errors import ConfigError
from umarvel.eval.mbeir.runner import MBeirEvalConfig, evaluate_mbeir
from umarvel.index.html import write_demo_retrievals
from umarvel.model.tiny import save_tiny_checkpoint
from umarvel.pipelines.mining import MineConfig, mine
from umarvel.pipelines.plus import WEIGHT_FILE, PlusConfig, evaluate_plus
from umarvel.pipelines.teacher import TeacherConfig, build_teacher_file
from umarvel.rerank.model import load_reranker
from umarvel.rerank.train import RerankTrainConfig, train_reranker
from umarvel.train.config import load_stage_config
from umarvel.train.stage import run_stage
from umarvel.train.trainer import TrainerCallback

logger = logging.getLogger(__name__)

PROTOCOLS = ("local", "global")
#: Fusion weight that orders a reranked list by P(yes) alone (the cosines, at most 2 apart, only break ties).
RERANKER_ALONE = 1e6
#: Library loggers kept at WARNING during a non-verbose run (their INFO lines would drown the progress).
QUIET_LOGGERS = ("umarvel.train", "umarvel.eval", "umarvel.rerank", "umarvel.model", "umarvel.data", "umarvel.api")
#: Loggers at ERROR in a non-verbose run: the global pool of the generated tree is, by design, the union of
#: its seven pools, which the evaluation reports once per absent M-BEIR pool.
SILENT_LOGGERS = ("umarvel.eval.mbeir.runner",)

# Overrides of every stage YAML for the tiny model on a CPU.
_CPU_OVERRIDES = ("model.dtype=float32", "model.gradient_checkpointing=false", "train.deepspeed=null",
                  "data.num_workers=0", "train.device=cpu", "train.report_to=[]", "train.save_total_limit=1",
                  "train.resume=never")

STAGES: tuple[tuple[str, str, str], ...] = (
    ("stage1", "01_nli.yaml", "stage 1/5: NLI paraphrases"),
    ("stage2", "02_cc3m.yaml", "stage 2/5: image-caption pairs"),
    ("stage3", "03_mbeir.yaml", "stage 3/5: M-BEIR instruction tuning"),
    ("stage4", "04_mbeir_hardneg.yaml", "stage 4/5: hard negatives"),
    ("stage5", "05_mbeir_distill.yaml", "stage 5/5: reranker distillation"),
)
STAGE_LABELS: dict[str, str] = {
    "stage0": "0 random init", "stage1": "1 NLI", "stage2": "2 image-caption", "stage3": "3 M-BEIR",
    "stage4": "4 hard negatives", "stage5": "5 distillation", "plus": "5 + rerank (U-MARVEL+)",
}


def configs_dir() -> Path:
    """The repository's ``configs/`` folder (the demo runs the real stage YAML files)."""
    path = Path(umarvel.__file__).resolve().parents[1] / "configs"
    if not (path / "stages").is_dir():
        raise ConfigError(f"{path}/stages not found: the demo runs the repository's stage configs; run it from a "
                          "clone of the repository (pip install -e .)")
    return path


# ----------------------------------------------------------------------------------- environment
@contextlib.contextmanager
def demo_environment(threads: int, verbose: bool) -> Iterator[None]:
    """Torch threads, quiet library logging and hidden inner progress bars for the run; restored afterwards.

    One thread is the default: the tiny model's matrices are far too small to gain from several, and on a
    shared 2-core machine a second thread that waits for a busy core made steps up to 30x slower.
    """
    import torch

    old_threads = torch.get_num_threads()
    old_env = os.environ.get("UMARVEL_NO_PROGRESS")
    levels = {}
    torch.set_num_threads(max(1, threads))
    os.environ["UMARVEL_NO_PROGRESS"] = "1"  # the library's own bars; the demo shows one bar over the run
    if not verbose:
        for name, level in [(n, logging.WARNING) for n in QUIET_LOGGERS] + [(n, logging.ERROR) for n in SILENT_LOGGERS]:
            lg = logging.getLogger(name)
            levels[name] = lg.level
            lg.setLevel(level)
    hf_bars = _hf_progress(False)
    old_ds = os.environ.get("DS_ACCELERATOR")
    if old_ds is None and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"  # DeepSpeed (imported by peft) would warn that it fell back to CPU
    from tqdm.contrib.logging import logging_redirect_tqdm

    try:
        with warnings.catch_warnings(), logging_redirect_tqdm(loggers=[logging.getLogger("umarvel")]):
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module=r"(torch|transformers|peft)\.")
            yield
    finally:
        torch.set_num_threads(old_threads)
        if old_env is None:
            os.environ.pop("UMARVEL_NO_PROGRESS", None)
        else:
            os.environ["UMARVEL_NO_PROGRESS"] = old_env
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        _hf_progress(hf_bars)
        if old_ds is None:
            os.environ.pop("DS_ACCELERATOR", None)


def _hf_progress(enable: bool) -> bool:
    """Switch the transformers progress bars (checkpoint loading/saving); returns the previous state."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enable else hf_logging.disable_progress_bar)()
    return before


def environment_info(threads: int) -> dict[str, Any]:
    """Machine facts recorded with the timings (CPU count, load average, torch threads, versions)."""
    import torch

    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {"cpus": os.cpu_count(), "load_average_at_start": load, "torch_threads": threads,
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()}


# ------------------------------------------------------------------------------------------ evaluation
def evaluate_checkpoint(checkpoint: str | Path, bench: DemoBenchmark, out_dir: Path, *, split: str = "test",
                        protocols: tuple[str, ...] = PROTOCOLS, device: str = "cpu", dtype: str | None = "float32",
                        batch_size: int = 64) -> dict[str, dict]:
    """Local and/or global M-BEIR evaluation of ``checkpoint`` on the demo tree (``umarvel eval mbeir``'s path).

    The pools are encoded once and shared by both protocols (``out_dir/cache``).
    Returns ``{protocol: results.json object}``.
    """
    encoder = UMarvel.from_pretrained(checkpoint, device=device, dtype=dtype)
    out = {}
    for protocol in protocols:
        cfg = MBeirEvalConfig(model=str(checkpoint), mbeir_root=str(bench.mbeir), output=str(out_dir / protocol),
                              protocol=protocol, split=split, tasks=list(bench.spec.tasks), device=device,
                              dtype=str(encoder.settings.dtype), batch_size=batch_size)
        out[protocol] = evaluate_mbeir(encoder, cfg).results
    return out


def pool_sizes(results: dict) -> dict[str, int]:
    """``{task: pool size}`` of an evaluation's ``results.json`` object."""
    return {t["name"]: int(t["pool_size"]) for t in results["tasks"]}


# ------------------------------------------------------------------------------------------ the run
class _ProgressCallback(TrainerCallback):
    """Feeds a training run's steps (stage or reranker) into the demo's progress display."""

    def __init__(self, progress: Progress):
        self.progress = progress

    def on_step(self, step: int, total: int, loss: float) -> None:
        self.progress.update(step / max(total, 1), f"step {step}/{total} loss {loss:.3f}")


class DemoRun:
    """One demo run into ``output`` (see the module doc).

    Args:
        output: output folder (its ``runs/`` and ``eval/`` are replaced; an identical benchmark is reused).
        plan: the preset.
        threads: torch CPU threads.
        verbose: keep the library's INFO logs.
    """

    def __init__(self, output: str | Path, plan: DemoPlan, threads: int = 1, verbose: bool = False):
        self.output = Path(output).resolve()
        self.plan = plan
        self.threads = threads
        self.verbose = verbose
        self.runs = self.output / "runs"
        self.evals = self.output / "eval"
        self.bench: DemoBenchmark | None = None
        self.result = DemoResult(mode=plan.name, plan=asdict(plan), output=self.output)
        self.progress: Progress | None = None

    # -------------------------------------------------------------------------------- planning
    def jobs(self) -> list[Job]:
        """The planned jobs with their expected cost (reference seconds on the 2-core machine, one thread)."""
        p, b = self.plan, self.plan.benchmark
        n_eval = len(b.tasks) * (b.eval_queries_per_task + b.pool_size_per_task)
        n_train = len(b.tasks) * b.train_queries_per_task
        eval_cost = 1.5 + n_eval / 150.0
        jobs = [Job("benchmark", "generate the benchmark and the tiny model", 2.0 + n_train / 400.0),
                Job("eval_stage0", "evaluate the random model (local + global)", eval_cost)]
        per_seq = 1.0 / 550.0  # seconds per embedded training sequence (forward + backward)
        for key, _, label in STAGES:
            sp: StagePlan = getattr(p, key)
            seqs_per_query = {"stage4": 2 + p.hard_negatives, "stage5": 1 + p.teacher_top_k}.get(key, 2)
            jobs.append(Job(key, label, 2.0 + sp.steps * sp.batch_size * seqs_per_query * per_seq))
            if key == "stage3":
                jobs.append(Job("mine3", "mine the stage-3 top-k (local + global)", 1.5 + n_train / 250.0))
                jobs.append(Job("rerank", "train the reranker",
                                2.0 + p.rerank.steps * p.rerank.queries_per_step * 2 / 160.0))
                n_val = len(b.tasks) * b.eval_queries_per_task
                jobs.append(Job("rerank_check", "reranker alone vs the stage-3 embedding (val top-k)",
                                2.0 + eval_cost / 2 + n_val * p.plus_top_k / 400.0))
            if key == "stage4":
                n_sub = max(1, int(n_train * p.subset_fraction))
                jobs.append(Job("mine4", "mine the stage-4 top-k of the subset", 1.0 + n_sub / 250.0))
                jobs.append(Job("teacher", "teacher scores (reranker P(yes) + cosine)",
                                1.0 + n_sub * p.teacher_top_k / 400.0))
            jobs.append(Job(f"eval_{key}", f"evaluate {key} (local + global)", eval_cost))
        n_q = len(b.tasks) * b.eval_queries_per_task
        jobs.append(Job("plus", "U-MARVEL+ (rerank val + test, local + global)",
                        2.0 + eval_cost + 4 * n_q * p.plus_top_k / 400.0))
        jobs.append(Job("report", "write results.md, results.json and the plot", 3.0))
        return jobs

    # -------------------------------------------------------------------------------- steps
    def _stage_overrides(self, key: str, init_from: Path) -> list[str]:
        b, p = self.bench, self.plan
        mbeir = b.mbeir
        files = [f"data.root={mbeir}", f"data.path={mbeir / 'query/union_train/mbeir_union_up_train.jsonl'}",
                 f"data.pool={mbeir / 'cand_pool/global/mbeir_union_train_cand_pool.jsonl'}",
                 f"data.instructions={mbeir / 'instructions/query_instructions.tsv'}"]
        if key == "stage1":
            data = [f"data.path={b.nli}"]
        elif key == "stage2":
            data = [f"data.path={b.cc3m_json}", f"data.root={b.cc3m_root}"]
        elif key == "stage3":
            data = files
        elif key == "stage4":
            mined = self.runs / "mined3" / f"rerank_data_all_eval_train_{p.hard_negative_scope}.jsonl"
            data = files + [f"data.negatives={mined}", f"data.num_hard_negatives={p.hard_negatives}",
                            f"data.hard_negative_skip_top={p.hard_negative_skip_top}"]
        else:  # stage 5: the distillation subset and its teacher lists
            data = files[:1] + files[2:] + [f"data.path={self.subset}",
                                            f"data.scores={self.runs / 'teacher' / 'fusion_results.jsonl'}",
                                            f"data.num_candidates={p.teacher_top_k}"]
        if key in ("stage4", "stage5") and p.suffix_stages45:
            data.append("data.suffix=true")
        sp: StagePlan = getattr(p, key)
        return [f"init_from={init_from}", f"train.output_dir={self.runs / key}", *_CPU_OVERRIDES,
                f"train.save_steps={sp.steps}", f"train.seed={42 + p.seed}", *sp.overrides(), *data]

    def train_stage(self, key: str, yaml_name: str, init_from: Path) -> Path:
        """Train one embedding stage with its real YAML + the demo overrides; returns its merged checkpoint."""
        shutil.rmtree(self.runs / key, ignore_errors=True)
        cfg = load_stage_config(configs_dir() / "stages" / yaml_name, self._stage_overrides(key, init_from))
        t0 = time.perf_counter()
        state = run_stage(cfg, callbacks=[_ProgressCallback(self.progress)])
        losses = [h["loss"] for h in state.history]
        head = max(1, len(losses) // 10)
        self.result.training[key] = {
            "steps": state.global_step, "batch_size": cfg.train.per_device_batch_size,
            "learning_rate": cfg.train.learning_rate, "lora_r": cfg.lora.r, "seconds": round(time.perf_counter() - t0, 2),
            "loss_first": round(sum(losses[:head]) / head, 4), "loss_last": round(sum(losses[-head:]) / head, 4),
            "temperature": round(state.history[-1]["temperature"], 4) if state.history else None}
        self.progress.end(f"loss {self.result.training[key]['loss_first']:.3f} -> "
                          f"{self.result.training[key]['loss_last']:.3f}")
        return self.runs / key / "merged"

    def mine(self, key: str, model: Path, **kw) -> dict[str, Path]:
        """``umarvel mine`` on the train split (``MineConfig`` fields in ``kw``)."""
        out = self.runs / key
        shutil.rmtree(out, ignore_errors=True)
        cfg = MineConfig(model=str(model), mbeir_root=str(self.bench.mbeir), output=str(out),
                         top_k=self.plan.mine_top_k, device="cpu", dtype="float32", batch_size=64,
                         subset_seed=42 + self.plan.seed, **kw)
        files = mine(cfg, encoder=UMarvel.from_pretrained(model, device="cpu", dtype="float32"))
        self.progress.end()
        return files

    def train_reranker(self, mined_local: Path) -> Path:
        """The point-wise reranker (``configs/rerank/reranker.yaml`` + overrides), from the tiny base model."""
        r = self.plan.rerank
        out = self.runs / "rerank"
        shutil.rmtree(out, ignore_errors=True)

        # The published reranker starts from the pretrained Qwen2-VL-Instruct, whose language-model head
        # separates answers; a random tiny model's tied head (init std 0.02, hidden 64) gives logits of
        # about +-1 over 151,936 tokens, so "Yes"/"No" cannot be learned through it. The demo's reranker
        # base is therefore a tiny model with a larger initialisation scale (0.3).
        base = save_tiny_checkpoint(self.runs / "rerank_base", seed=self.plan.seed + 1,
                                    **{**self.plan.model, "initializer_range": 0.3})
        overrides = [f"model.init_from={base}", "model.dtype=float32", "model.gradient_checkpointing=false",
                     f"data.mbeir_root={self.bench.mbeir}", f"data.mined={mined_local}", "data.num_workers=0",
                     f"lora.r={r.lora_r}", f"lora.alpha={2 * r.lora_r}", f"train.output_dir={out}",
                     f"train.learning_rate={r.learning_rate}", f"train.per_device_queries={r.queries_per_step}",
                     "train.gradient_accumulation_steps=1", f"train.max_steps={r.steps}", "train.bf16=false",
                     "train.device=cpu", "train.save_steps=0", f"train.logging_steps={max(1, r.steps // 20)}",
                     "train.resume=never", "train.report_to=[]",
                     f"train.seed={42 + self.plan.seed}"]
        cfg = load_config(configs_dir() / "rerank" / "reranker.yaml", RerankTrainConfig, overrides)
        t0 = time.perf_counter()
        train_reranker(cfg, callbacks=[_ProgressCallback(self.progress)])
        hist = json.loads((out / "train_history.json").read_text())["loss_per_step"]
        head = max(1, len(hist) // 10)
        self.result.training["rerank"] = {
            "steps": len(hist), "queries_per_step": r.queries_per_step, "learning_rate": r.learning_rate,
            "lora_r": r.lora_r, "seconds": round(time.perf_counter() - t0, 2),
            "loss_first": round(sum(hist[:head]) / head, 4), "loss_last": round(sum(hist[-head:]) / head, 4)}
        self.progress.end(f"loss {self.result.training['rerank']['loss_first']:.3f} -> "
                          f"{self.result.training['rerank']['loss_last']:.3f}")
        return out / "merged"

    def reranker_check(self, stage3: Path, reranker) -> dict:
        """The reranker as a ranker on its own, before it teaches: Recall@5 of the stage-3 val top-k (local pools)
        ordered by P(yes) alone, next to the stage-3 embedding's order of the same lists."""
        self.evaluate("stage3", stage3, split="val", protocols=("local",))
        out = self.evals / "rerank_check"
        evaluate_plus(PlusConfig(run_dir=str(self.evals / "stage3_val" / "local"), reranker=str(self.runs / "rerank" /
                                 "merged"), output=str(out), choose_weight=True, grid=[0.0, RERANKER_ALONE],
                                 top_k=self.plan.plus_top_k, batch_size=32, device="cpu", dtype="float32"),
                      reranker=reranker)
        table = {float(w): 100.0 * r for w, r in json.loads((out / WEIGHT_FILE).read_text())["mean_recall"].items()}
        check = {"split": "val", "protocol": "local", "top_k": self.plan.plus_top_k,
                 "embedding_recall": round(table[0.0], 2), "reranker_recall": round(table[RERANKER_ALONE], 2)}
        self.progress.end(f"reranker alone R@5 {check['reranker_recall']:.1f} vs stage-3 embedding "
                          f"{check['embedding_recall']:.1f} on the stage-3 val top {check['top_k']} (local)")
        return check

    def teacher(self, reranker, mined_local: Path) -> Path:
        """Stage-5 teacher lists (``umarvel teacher``): P(yes) of the top-k fused with the cosines."""
        out = self.runs / "teacher"
        shutil.rmtree(out, ignore_errors=True)
        # the plan's one weight for every task, else the published per-task weights
        weights = {} if self.plan.teacher_weight is None else {"weights": {}, "default_weight": self.plan.teacher_weight}
        cfg = TeacherConfig(reranker=str(self.runs / "rerank" / "merged"), mbeir_root=str(self.bench.mbeir),
                            queries=str(self.subset), mined=str(mined_local), output=str(out),
                            top_k=self.plan.teacher_top_k, batch_size=32, device="cpu", dtype="float32",
                            shard_queries=1 << 20, **weights)
        path = build_teacher_file(cfg, reranker=reranker)
        self.progress.end()
        return path

    def evaluate(self, key: str, checkpoint: Path, split: str = "test",
                 protocols: tuple[str, ...] = PROTOCOLS) -> dict[str, dict]:
        """Evaluate a stage's checkpoint; records it as a row of the tables (test split)."""
        res = evaluate_checkpoint(checkpoint, self.bench, self.evals / f"{key}_{split}", split=split,
                                  protocols=protocols)
        if split == "test":
            row = StageResult(key=key, label=STAGE_LABELS.get(key, key), checkpoint=str(checkpoint),
                              local=res.get("local"), global_=res.get("global"))
            self.result.stages.append(row)
        return res

    def _log_row(self, row: StageResult) -> None:
        parts = [f"{p} R@5 avg {row.protocol(p)['average']:.1f}" for p in PROTOCOLS if row.protocol(p)]
        chance = ", ".join(f"chance {p} {self.result.chance[p]['average']:.1f}" for p in PROTOCOLS
                           if p in self.result.chance)
        logger.info("%s: %s (%s)", row.label, ", ".join(parts), chance)

    def plus(self, reranker, stage5: Path) -> dict:
        """U-MARVEL+: rerank the stage-5 top-k of val (choose the fusion weight) and test, per protocol."""
        self.evaluate("stage5", stage5, split="val")
        out: dict[str, Any] = {}
        common = dict(reranker=str(self.runs / "rerank" / "merged"), top_k=self.plan.plus_top_k, batch_size=32,
                      device="cpu", dtype="float32")
        for protocol in PROTOCOLS:
            val_dir = self.evals / "plus_val" / protocol
            evaluate_plus(PlusConfig(run_dir=str(self.evals / "stage5_val" / protocol), output=str(val_dir),
                                     choose_weight=True, **common), reranker=reranker)
            test = evaluate_plus(PlusConfig(run_dir=str(self.evals / "stage5_test" / protocol),
                                            output=str(self.evals / "plus_test" / protocol),
                                            weight_from=str(val_dir / WEIGHT_FILE), **common), reranker=reranker)
            out[protocol] = test
            out[f"{protocol}_weight"] = json.loads((val_dir / WEIGHT_FILE).read_text())["weight"]
        row = StageResult(key="plus", label=STAGE_LABELS["plus"], checkpoint=str(stage5), local=out["local"],
                          global_=out["global"])
        self.result.stages.append(row)
        self._log_row(row)
        self.progress.end(f"fusion weights chosen on val: local {out['local_weight']:g}, "
                          f"global {out['global_weight']:g}")
        return {"weights": {p: out[f"{p}_weight"] for p in PROTOCOLS}, "top_k": self.plan.plus_top_k,
                "reranker": str(self.runs / "rerank" / "merged")}

    # -------------------------------------------------------------------------------- driver
    def _timed(self, key: str):
        self.progress.begin(key)
        self._t_job = time.perf_counter()

    def _record(self, key: str) -> None:
        self.result.timings[key] = time.perf_counter() - self._t_job

    def run(self) -> DemoResult:
        """Run every job; writes the report files and returns the results."""
        t_start = time.perf_counter()
        self.result.environment = environment_info(self.threads)
        for folder in (self.runs, self.evals):
            shutil.rmtree(folder, ignore_errors=True)
        with demo_environment(self.threads, self.verbose):
            self.progress = Progress(self.jobs())
            try:
                self._timed("benchmark")
                self.bench = make_demo_benchmark(self.output / "benchmark", self.plan.benchmark)
                self.base = save_tiny_checkpoint(self.runs / "base", seed=self.plan.seed, **self.plan.model)
                self.progress.end()
                self._record("benchmark")

                self._timed("eval_stage0")
                first = self.evaluate("stage0", self.base)
                self.result.chance = {p: chance_recall(self.bench.mbeir, self.bench.spec.tasks, pool_sizes(first[p]))
                                      for p in PROTOCOLS}
                self._log_row(self.result.stages[-1])
                self.progress.end()
                self._record("eval_stage0")

                model = self.base
                mined4: dict | None = None  # written after stage 4, read by the teacher before stage 5
                for key, yaml_name, _ in STAGES:
                    if key == "stage5":
                        assert mined4 is not None, "stage 4 mining must run before the teacher"
                        self._timed("teacher")
                        self.teacher(rr, mined4["local"])
                        self._record("teacher")
                    self._timed(key)
                    model = self.train_stage(key, yaml_name, model)
                    self._record(key)
                    if key == "stage3":
                        self._timed("mine3")
                        mined3 = self.mine("mined3", model, scope="both", subset=True,
                                           subset_fraction=self.plan.subset_fraction)
                        self.subset = mined3["subset"]
                        self._record("mine3")
                        self._timed("rerank")
                        self.train_reranker(mined3["local"])
                        self._record("rerank")
                        self._timed("rerank_check")
                        rr = load_reranker(self.runs / "rerank" / "merged", device="cpu", dtype="float32")
                        self.result.reranker_check = self.reranker_check(model, rr)
                        self._record("rerank_check")
                    if key == "stage4":
                        self._timed("mine4")
                        mined4 = self.mine("mined4", model, queries=str(self.subset), scope="local", subset=False)
                        self._record("mine4")
                    self._timed(f"eval_{key}")
                    self.evaluate(key, model)
                    self._log_row(self.result.stages[-1])
                    self.progress.end()
                    self._record(f"eval_{key}")

                self._timed("plus")
                self.result.plus = self.plus(rr, model)
                self._record("plus")

                self._timed("report")
                self.result.total_seconds = time.perf_counter() - t_start
                write_report(self.result, self.output)
                self.progress.end()
                self._record("report")
            finally:
                self.progress.close()
        self.result.total_seconds = time.perf_counter() - t_start
        write_report(self.result, self.output)  # final timings included
        write_demo_retrievals(self.output, self.bench.mbeir, self.evals, [(r.label, r.key) for r in self.result.stages])
        return self.result


def run_demo(output: str | Path, plan: DemoPlan, threads: int = 1, verbose: bool = False) -> DemoResult:
    """Train and evaluate the whole recipe on the generated benchmark (see the module doc)."""
    return DemoRun(output, plan, threads=threads, verbose=verbose).run()


def evaluate_model(model: str | Path, output: str | Path, plan: DemoPlan, threads: int = 1, verbose: bool = False,
                   device: str = "cpu", dtype: str | None = None) -> DemoResult:
    """Evaluate an existing checkpoint (e.g. the released one) on the demo benchmark: local and global test.

    Writes the same report files as a training run, with one model row next to the chance level.
    """
    t_start = time.perf_counter()
    output = Path(output).resolve()
    result = DemoResult(mode=f"evaluate ({plan.name} benchmark)", plan=asdict(plan), output=output,
                        environment=environment_info(threads))
    shutil.rmtree(output / "eval", ignore_errors=True)
    b = plan.benchmark
    cost = 1.5 + len(b.tasks) * (b.eval_queries_per_task + b.pool_size_per_task) / 150.0
    with demo_environment(threads, verbose):
        progress = Progress([Job("benchmark", "generate the benchmark", 2.0),
                             Job("eval", f"evaluate {model} (local + global)", cost)])
        try:
            progress.begin("benchmark")
            bench = make_demo_benchmark(output / "benchmark", b)
            progress.end()
            progress.begin("eval")
            t0 = time.perf_counter()
            res = evaluate_checkpoint(model, bench, output / "eval" / "model_test", device=device, dtype=dtype)
            result.timings["eval"] = time.perf_counter() - t0
            progress.end()
        finally:
            progress.close()
    result.chance = {p: chance_recall(bench.mbeir, b.tasks, pool_sizes(res[p])) for p in PROTOCOLS}
    result.stages.append(StageResult(key="model", label=Path(model).name or str(model), checkpoint=str(model),
                                     local=res["local"], global_=res["global"]))
    result.total_seconds = time.perf_counter() - t_start
    write_report(result, output)
    return result


__all__ = ["DemoRun", "DemoResult", "StageResult", "run_demo", "evaluate_model", "evaluate_checkpoint",
           "demo_environment", "configs_dir", "STAGES", "STAGE_LABELS", "PROTOCOLS"]
