"""Demo outputs: the recall table per stage (text and Markdown), ``results.md``, ``results.json`` and the plot.

Rows are the evaluated models in run order (random init, stages 1-5, U-MARVEL+), then the chance level;
columns are the tasks (by query -> candidate modality) and the unweighted average of their headline
Recall@k (Recall@5 for every generated task), as the M-BEIR scorer computes it. ``results.md`` also says in
one line per stage what it added (:func:`stage_gains`), next to what the stage is for and the direction the
paper reports (:data:`STAGE_ROLES`); the plot marks the chance level and, above every stage, the paper's
direction (green where the demo moves the same way, red where it does not).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from umarvel.demo.plan import DemoResult
from umarvel.demo.progress import format_seconds
from umarvel.utils.io import atomic_path, atomic_write_json, atomic_write_text


logger = logging.getLogger(__name__)

RESULTS_MD = "results.md"
RESULTS_JSON = "results.json"
PLOT_PNG = "recall_per_stage.png"

#: Column names of the generated tasks (query -> candidate).
TASK_SHORT: dict[str, str] = {
    "mscoco_task0": "txt>img", "webqa_task1": "txt>txt", "edis_task2": "txt>img+txt", "mscoco_task3": "img>txt",
    "nights_task4": "img>img", "oven_task6": "img+q>txt", "cirr_task7": "img+edit>img",
}


@dataclass(frozen=True)
class StageRole:
    """What a stage is for, the row it is compared with, and the direction of its effect in the paper."""

    purpose: str
    baseline: str
    paper: str  # "up": the paper reports that the stage raises retrieval


#: Every row's role. The paper (arXiv 2507.14902, ablations) reports a gain for each stage of the recipe.
STAGE_ROLES: dict[str, StageRole] = {
    "stage1": StageRole("a text-only warm-up on NLI paraphrases", "stage0", "up"),
    "stage2": StageRole("drawings aligned with their captions", "stage1", "up"),
    "stage3": StageRole("the seven instructed tasks, with in-batch negatives", "stage2", "up"),
    "stage4": StageRole("the stage-3 model's near misses (other colours, other positions) as negatives", "stage3",
                        "up"),
    "stage5": StageRole("the reranker's scores of the top candidates as soft targets", "stage4", "up"),
    "plus": StageRole("the reranker re-scoring the final model's top candidates", "stage5", "up"),
}


def _tasks(result: "DemoResult", protocol: str) -> list[str]:
    for s in result.stages:
        res = s.protocol(protocol)
        if res:
            return [t["name"] for t in res["tasks"]]
    return []


def _rows(result: "DemoResult", protocol: str) -> tuple[list[str], list[tuple[str, list[float], float]]]:
    """(task names, [(label, per-task values, average)]) including the chance row."""
    tasks = _tasks(result, protocol)
    rows = []
    for s in result.stages:
        res = s.protocol(protocol)
        if res:
            values = {t["name"]: t["value"] for t in res["tasks"]}
            rows.append((s.label, [values[t] for t in tasks], res["average"]))
    chance = result.chance.get(protocol)
    if chance:
        rows.append(("chance (random ranking)", [chance[t] for t in tasks], chance["average"]))
    return tasks, rows


def recall_table(result: "DemoResult", protocol: str) -> str:
    """Fixed-width text table of one protocol (for the terminal)."""
    tasks, rows = _rows(result, protocol)
    heads = [TASK_SHORT.get(t, t) for t in tasks] + ["AVERAGE"]
    width = max(len(r[0]) for r in rows) + 2 if rows else 10
    cols = [max(len(h), 6) + 2 for h in heads]
    lines = ["".ljust(width) + "".join(h.rjust(c) for h, c in zip(heads, cols))]
    for label, values, avg in rows:
        lines.append(label.ljust(width) + "".join(f"{v:.1f}".rjust(c) for v, c in zip(values + [avg], cols)))
    return "\n".join(lines)


def markdown_table(result: "DemoResult", protocol: str) -> str:
    """The same table in Markdown (average in bold)."""
    tasks, rows = _rows(result, protocol)
    heads = ["model"] + [f"{TASK_SHORT.get(t, t)}<br>`{t}`" for t in tasks] + ["**average**"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for label, values, avg in rows:
        lines.append("| " + " | ".join([label] + [f"{v:.1f}" for v in values] + [f"**{avg:.1f}**"]) + " |")
    return "\n".join(lines)


def plot_recall(result: "DemoResult", path: Path) -> Path:
    """PNG: average and per-task Recall@5 per stage, one panel per protocol, chance level dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    protocols = [p for p in ("local", "global") if _tasks(result, p)]
    fig, axes = plt.subplots(1, len(protocols), figsize=(6.5 * len(protocols), 4.6), squeeze=False)
    for ax, protocol in zip(axes[0], protocols):
        tasks, rows = _rows(result, protocol)
        models = [r for r in rows if not r[0].startswith("chance")]
        x = list(range(len(models)))
        for i, t in enumerate(tasks):
            ax.plot(x, [r[1][i] for r in models], marker="o", markersize=3, linewidth=1, alpha=0.75,
                    label=TASK_SHORT.get(t, t))
        ax.plot(x, [r[2] for r in models], marker="o", color="black", linewidth=2.8, label="average")
        chance = result.chance.get(protocol)
        if chance:
            ax.axhline(chance["average"], color="grey", linestyle="--", linewidth=1.2, label="chance (average)")
            ax.text(x[-1], chance["average"] + 1.5, "chance", color="grey", fontsize=7, ha="right")
        _mark_paper_direction(ax, result, protocol, x)
        ax.set_xticks(x)
        ax.set_xticklabels([r[0].replace(" (U-MARVEL+)", "\n(U-MARVEL+)") for r in models], rotation=30, ha="right",
                           fontsize=8)
        ax.set_ylim(0, 108)
        ax.set_ylabel("Recall@5 (%)")
        ax.set_title(f"{protocol} pool" + (" (one pool per task)" if protocol == "local" else " (union of all pools)"))
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(f"umarvel demo ({result.mode}): Recall@5 per stage on the generated M-BEIR test split")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def _mark_paper_direction(ax, result: "DemoResult", protocol: str, x: list[int]) -> None:
    """Above every stage: a triangle for the paper's direction (up), green where the demo's average moved
    the same way from the stage's baseline row, red where it did not."""
    gains = {g["key"]: g for g in stage_gains(result, protocol)}
    keys = [s.key for s in result.stages if s.protocol(protocol)]
    for xi, key in zip(x, keys):
        if key not in gains:
            continue
        g = gains[key]
        agrees = g["delta"] >= 0 if g["paper"] == "up" else g["delta"] <= 0
        ax.scatter([xi], [104], marker="^" if g["paper"] == "up" else "v", s=40, zorder=3,
                   color="tab:green" if agrees else "tab:red")
    ax.scatter([], [], marker="^", s=40, color="tab:green", label="paper: the stage raises recall\n"
               "(green: so does the demo; red: not here)")


def stage_gains(result: "DemoResult", protocol: str) -> list[dict]:
    """Per stage row: its average, its baseline row's average and the difference (``delta``), plus its role.

    Returns ``[{key, label, baseline, average, baseline_average, delta, purpose, paper}]`` in run order, for
    the rows with a role whose baseline row was evaluated.
    """
    avg = {s.key: s.protocol(protocol)["average"] for s in result.stages if s.protocol(protocol)}
    labels = {s.key: s.label for s in result.stages}
    out = []
    for key in avg:
        role = STAGE_ROLES.get(key)
        if role is None or role.baseline not in avg:
            continue
        out.append({"key": key, "label": labels[key], "baseline": role.baseline, "average": avg[key],
                    "baseline_average": avg[role.baseline], "delta": avg[key] - avg[role.baseline],
                    "purpose": role.purpose, "paper": role.paper})
    return out


def gains_markdown(result: "DemoResult") -> str:
    """One line per stage: what it is for and what it added (local and global average Recall@5)."""
    per = {p: {g["key"]: g for g in stage_gains(result, p)} for p in ("local", "global")}
    lines = []
    for key, g in per["local"].items():
        parts = []
        for p in ("local", "global"):
            if key in per[p]:
                q = per[p][key]
                parts.append(f"{p} {q['baseline_average']:.1f} -> {q['average']:.1f} (**{q['delta']:+.1f}**)")
        base = next(s.label for s in result.stages if s.key == g["baseline"])
        paper = "raises" if g["paper"] == "up" else "lowers"
        lines.append(f"- **{g['label']}**: {', '.join(parts)} over {base}; adds {g['purpose']} "
                     f"(paper: {paper} recall).")
    return "\n".join(lines)


def _training_table(result: "DemoResult") -> str:
    lines = ["| step | optimiser steps | batch (queries) | learning rate | LoRA r | loss (first 10% -> last 10%) | seconds |",
             "|---|---|---|---|---|---|---|"]
    for key, info in result.training.items():
        batch = info.get("batch_size", info.get("queries_per_step"))
        lines.append(f"| {key} | {info['steps']} | {batch} | {info['learning_rate']:g} | {info['lora_r']} | "
                     f"{info['loss_first']:.3f} -> {info['loss_last']:.3f} | {info['seconds']:.0f} |")
    return "\n".join(lines)


def _timings(result: "DemoResult") -> str:
    lines = ["| job | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in result.timings.items()]
    lines.append(f"| **total** | **{result.total_seconds:.1f}** ({format_seconds(result.total_seconds)}) |")
    return "\n".join(lines)


def results_markdown(result: "DemoResult") -> str:
    """The ``results.md`` text."""
    env = result.environment
    bench = result.plan.get("benchmark", {})
    parts = [f"# umarvel demo: {result.mode}", ""]
    if any(s.key == "stage1" for s in result.stages):
        parts += ["The whole U-MARVEL recipe on a generated benchmark with a tiny randomly initialised Qwen2-VL "
                  "(the real tokenizer and chat format): stage 1 (NLI paraphrases) -> stage 2 (image-caption "
                  "pairs) -> stage 3 (M-BEIR instruction tuning) -> mining -> reranker -> stage 4 (hard "
                  "negatives) -> teacher lists -> stage 5 (reranker distillation), then U-MARVEL+ (rerank the "
                  "top candidates, fusion weight chosen on the validation split). Every model is evaluated on "
                  "the test split of the generated M-BEIR tree; the metric is the M-BEIR hit-rate Recall@5.", ""]
    parts += ["## Recall@5, local pools (each task searches its own pool)", "", markdown_table(result, "local"), "",
              "## Recall@5, global pool (every query searches the union of all task pools)", "",
              markdown_table(result, "global"), "", f"![Recall@5 per stage]({PLOT_PNG})", ""]
    gains = gains_markdown(result)
    if gains:
        parts += ["## What each stage added", "", gains, ""]
    if result.reranker_check:
        c = result.reranker_check
        verdict = "a better" if c["reranker_recall"] > c["embedding_recall"] else "not a better"
        parts += [f"Reranker check (before it teaches): ordering the stage-3 model's {c['split']} top {c['top_k']} "
                  f"({c['protocol']} pools) by the reranker's P(yes) alone gives Recall@5 {c['reranker_recall']:.1f}, "
                  f"the stage-3 embedding's own order {c['embedding_recall']:.1f}: {verdict} ranker.", ""]
    if result.plus:
        w = result.plus["weights"]
        parts += [f"U-MARVEL+: the reranker's P(yes) of the stage-5 top {result.plus['top_k']} is added to each "
                  f"candidate's cosine with weight w chosen on the validation split (local w = {w['local']:g}, "
                  f"global w = {w['global']:g}). The demo reuses the stage-3 reranker; the published U-MARVEL+ "
                  "retrains it on stage-5 mined lists.", ""]
    if result.training:
        parts += ["## Training", "", _training_table(result), ""]
    parts += ["## Run", "", _timings(result), "",
              f"Machine: {env.get('cpus')} CPUs, load average at start {env.get('load_average_at_start')}, "
              f"torch threads {env.get('torch_threads')}, torch {env.get('torch')}, Python {env.get('python')}.", "",
              "Benchmark: " + ", ".join(f"{k} {v if not isinstance(v, list) else len(v)}" for k, v in bench.items())
              + " (generated; the global pool is the union of the generated task pools, not the 16-pool M-BEIR "
                "one).", ""]
    return "\n".join(parts)


def write_report(result: "DemoResult", output: str | Path) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and the PNG into ``output``; returns their paths."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    atomic_write_json(output / RESULTS_JSON, result.to_json())
    atomic_write_text(output / RESULTS_MD, results_markdown(result))
    plot_recall(result, output / PLOT_PNG)
    return {"json": output / RESULTS_JSON, "md": output / RESULTS_MD, "png": output / PLOT_PNG}


def stage_averages(result_json: dict, protocol: str) -> dict[str, float]:
    """``{stage key: average}`` of a ``results.json`` object (tests, summaries)."""
    return {s["key"]: s[protocol]["average"] for s in result_json["stages"] if s.get(protocol)}


__all__ = ["recall_table", "markdown_table", "plot_recall", "results_markdown", "write_report", "stage_averages",
           "stage_gains", "gains_markdown", "StageRole", "STAGE_ROLES", "TASK_SHORT", "RESULTS_MD", "RESULTS_JSON",
           "PLOT_PNG"]
