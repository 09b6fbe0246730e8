"""Demo outputs: the recall table per stage (text and Markdown), ``results.md``, ``results.json`` and the plot.

Rows are the evaluated models in run order (random init, stages 1-5, U-MARVEL+), then the chance level;
columns are the tasks (by query -> candidate modality) and the unweighted average of their headline
Recall@k (Recall@5 for every generated task), as the M-BEIR scorer computes it.
"""
from __future__ import annotations

import logging
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
        ax.set_xticks(x)
        ax.set_xticklabels([r[0].replace(" (U-MARVEL+)", "\n(U-MARVEL+)") for r in models], rotation=30, ha="right",
                           fontsize=8)
        ax.set_ylim(0, 100)
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
           "TASK_SHORT", "RESULTS_MD", "RESULTS_JSON", "PLOT_PNG"]
