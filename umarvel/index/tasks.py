"""``--task NAME``: the instruction U-MARVEL was trained with for one kind of search.

The instruction of an M-BEIR task is ``prompt_1`` of its row in the M-BEIR instruction table
(``instructions/query_instructions.tsv``, keyed by ``(dataset_id, query modality, candidate modality)``,
read with :func:`umarvel.data.mbeir.read_instructions`): the deterministic choice (Pyserini's fixed
instructions; the evaluation's ``instruction: first``). When no table file is given, the built-in copy below
is used: the first prompt of each of the 16 tasks' rows, as listed in Pyserini's fixed-instruction table
(the M-BEIR benchmark notes, section 1.7). Task names are the registry's
(:mod:`umarvel.data.registry`), e.g. ``mscoco_task0`` (text -> everyday image).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from umarvel.data.mbeir import read_instructions
from umarvel.data.registry import get_task, list_tasks
from umarvel.errors import ConfigError, DataError

#: prompt_1 per (dataset_id, query modality, candidate modality) of the 16 M-BEIR evaluation tasks.
BUILTIN_PROMPTS: dict[tuple[int, str, str], str] = {
    (0, "text", "image"): "Identify the news-related image in line with the described event.",
    (0, "image", "text"): "Find a caption for the news in the given photo.",
    (1, "text", "image"): "Based on the following fashion description, retrieve the best matching image.",
    (1, "image", "text"): "Find a product description for the fashion item in the image.",
    (2, "text", "text"): "Retrieve passages from Wikipedia that provide answers to the following question.",
    (2, "text", "image,text"): "Find a Wikipedia image that answers this question.",
    (3, "text", "image,text"): "Find a news image that matches the provided caption.",
    (4, "image", "image"): "Find a day-to-day image that looks similar to the provided image.",
    (5, "image,text", "text"): "Retrieve a Wikipedia paragraph that provides an answer to the given query about the image.",
    (6, "image,text", "text"): "Retrieve a Wikipedia paragraph that provides an answer to the given query about the image.",
    (5, "image,text", "image,text"): "Retrieve a Wikipedia image-description pair that provides evidence for the question of this image.",
    (6, "image,text", "image,text"): "Retrieve a Wikipedia image-description pair that provides evidence for the question of this image.",
    (7, "image,text", "image"): "Find a fashion image that aligns with the reference image and style note.",
    (8, "image,text", "image"): "Retrieve a day-to-day image that aligns with the modification instructions of the provided image.",
    (9, "text", "image"): "Find me an everyday image that matches the given caption.",
    (9, "image", "text"): "Find an image caption describing the following everyday image.",
}


@dataclass(frozen=True)
class SearchTask:
    """One ``--task`` choice: registry name, modalities and the instruction it selects."""

    name: str
    query_modality: str
    cand_modality: str
    instruction: str
    description: str


def search_tasks(table: str | os.PathLike | None = None) -> list[SearchTask]:
    """The 16 M-BEIR tasks with their instruction (from ``table`` when given, else the built-in copy).

    Raises:
        DataError: the table file is malformed or lacks a task's row (naming the file and the key).
    """
    prompts = read_instructions(table).prompts if table is not None else None
    out = []
    for t in list_tasks("mbeir"):
        key = (t.dataset_id, t.query_modality, t.cand_modality)
        if prompts is None:
            text = BUILTIN_PROMPTS[key]
        elif key in prompts:
            text = prompts[key][0]
        else:
            raise DataError(f"{table}: no instruction row for task {t.name} "
                            f"(dataset_id, query_modality, cand_modality) = {key}")
        out.append(SearchTask(t.name, t.query_modality, t.cand_modality, text, t.description))
    return out


def task_instruction(name: str, table: str | os.PathLike | None = None) -> str:
    """The instruction of task ``name``.

    Raises:
        ConfigError: an unknown name (listing the known ones) or a non-M-BEIR task.
    """
    known = {t.name: t for t in search_tasks(table)}
    if name not in known:
        get_task(name)  # unknown names: ConfigError listing every registered task
        raise ConfigError(f"task {name!r} has no M-BEIR instruction; use one of: {', '.join(known)}")
    return known[name].instruction


def format_task_list(table: str | os.PathLike | None = None) -> str:
    """A text table of the tasks (``--list-tasks``)."""
    rows = search_tasks(table)
    width = max(len(t.name) for t in rows)
    lines = [f"{'task':<{width}}  {'query -> candidates':<24}  instruction"]
    for t in rows:
        lines.append(f"{t.name:<{width}}  {t.query_modality + ' -> ' + t.cand_modality:<24}  {t.instruction}")
    return "\n".join(lines) + "\n"
