"""The zero-shot sets as ``kind="zeroshot"`` tasks of the one registry (``umarvel.data.registry``).

Importing this module registers one task per set of :data:`umarvel.eval.zeroshot.readers.SET_NAMES` plus
``circo_test`` (which only produces the CIRCO server submission file), in the order results are reported.
Each task's ``options`` name its reader (``reader``), the set shape (``shape``), the metric keys it writes
(``metric_keys``), its headline keys (``headline``), where the instruction goes (``instruction`` /
``instruction_side``) and, for video sets, the frame sampling (``video``). The paper's table layout is
:data:`PAPER_COLUMNS` (plus :data:`EXTRA_COLUMNS` for the sets the paper's zero-shot table does not show).

    >>> from umarvel.data.registry import get_task
    >>> import umarvel.eval.zeroshot.tasks  # noqa: F401 (registers)
    >>> get_task("circo").metric, get_task("ccneg").metric
    ('mAP@5', 'Accuracy')
"""
from __future__ import annotations

from typing import Iterable, Sequence

from umarvel.errors import ConfigError
from umarvel.data.registry import Task, get_task, list_tasks, register_task
from umarvel.eval.zeroshot import instructions as ins
from umarvel.eval.zeroshot.metrics import CIRCO_KS, GENECIS_KS, RECALL_KS
from umarvel.eval.zeroshot.readers import EXTRA_READERS, READERS
from umarvel.eval.zeroshot.readers_captions import SUGARCREPE_SUBSETS
from umarvel.eval.zeroshot.readers_cir import GENECIS_SUBSETS

KIND = "zeroshot"
ACCURACY = "accuracy"
BIDIR_KEYS = tuple(f"{d}_R@{k}" for d in ("t2i", "i2t") for k in RECALL_KS)

#: ``--tasks`` group names expanding to several registry tasks.
GROUPS: dict[str, tuple[str, ...]] = {
    "genecis": tuple(f"genecis_{s}" for s in GENECIS_SUBSETS),
    "sugarcrepe": tuple(f"sugarcrepe_{s}" for s in SUGARCREPE_SUBSETS),
}

#: (column label, member tasks, metric key): the paper's zero-shot table (LamRA / U-MARVEL layout). A column
#: over several tasks is their unweighted mean, shown only when every member was evaluated.
PAPER_COLUMNS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("ShareGPT4V T2I", ("sharegpt4v",), "t2i_R@1"),
    ("ShareGPT4V I2T", ("sharegpt4v",), "i2t_R@1"),
    ("Urban1K T2I", ("urban1k",), "t2i_R@1"),
    ("Urban1K I2T", ("urban1k",), "i2t_R@1"),
    ("Flickr30K T2I", ("flickr30k",), "t2i_R@1"),
    ("Flickr30K I2T", ("flickr30k",), "i2t_R@1"),
    ("CIRCO mAP@5", ("circo",), "mAP@5"),
    ("GeneCIS R@1", GROUPS["genecis"], "R@1"),
    ("VisDial R@1", ("visdial",), "R@1"),
    ("CC-Neg Acc", ("ccneg",), ACCURACY),
    ("Sugar-Crepe Replace", ("sugarcrepe_replace_att", "sugarcrepe_replace_obj", "sugarcrepe_replace_rel"), ACCURACY),
    ("Sugar-Crepe Swap", ("sugarcrepe_swap_att", "sugarcrepe_swap_obj"), ACCURACY),
    ("Sugar-Crepe Add", ("sugarcrepe_add_att", "sugarcrepe_add_obj"), ACCURACY),
    ("MSVD R@1", ("msvd",), "R@1"),
    ("MSR-VTT R@1", ("msrvtt",), "R@1"),
)
#: Sets evaluated by the suite but not in the paper's zero-shot table.
EXTRA_COLUMNS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("COCO 5K T2I", ("mscoco5k",), "t2i_R@1"),
    ("COCO 5K I2T", ("mscoco5k",), "i2t_R@1"),
    ("VIST R@1", ("vist",), "R@1"),
)


def _task(name: str, dataset: str, shape: str, metric: str, cutoffs: Sequence[int], metric_keys: Sequence[str],
          headline: Sequence[str], q_mod: str, c_mod: str, description: str, instruction: str | None = None,
          instruction_side: str | None = None, **extra) -> Task:
    """One zero-shot registry entry (reader = the task name)."""
    options = {"reader": name, "shape": shape, "metric_keys": tuple(metric_keys), "headline": tuple(headline),
               "instruction": instruction, "instruction_side": instruction_side, **extra}
    return Task(name=name, kind=KIND, dataset=dataset, metric=metric, cutoffs=tuple(cutoffs),
                description=description, query_modality=q_mod, cand_modality=c_mod, options=options)


def _recall_keys(ks: Iterable[int]) -> tuple[str, ...]:
    return tuple(f"R@{k}" for k in ks)


def zeroshot_task_defs() -> list[Task]:
    """All zero-shot tasks, in report order (CIRCO, CIRCO test, GeneCIS, caption sets, VisDial, VIST, CC-Neg,
    Sugar-Crepe, MSVD, MSR-VTT)."""
    circo_keys = tuple(f"mAP@{k}" for k in CIRCO_KS) + _recall_keys(CIRCO_KS)
    tasks = [
        _task("circo", "CIRCO", "retrieval", "mAP@5", CIRCO_KS, circo_keys, ("mAP@5",), "image,text", "image",
              "CIRCO val: reference image + relative caption -> COCO unlabeled2017 (mAP@k; R@k vs the target)",
              ins.CIRCO, "query"),
        _task("circo_test", "CIRCO", "submission", "mAP@5", CIRCO_KS, (), (), "image,text", "image",
              "CIRCO test: writes the top-50 submission JSON for the CIRCO evaluation server (no ground truth)",
              ins.CIRCO, "query", topk=50),
    ]
    for s in GENECIS_SUBSETS:
        tasks.append(_task(f"genecis_{s}", "GeneCIS", "gallery", "Recall@1", GENECIS_KS, _recall_keys(GENECIS_KS),
                           ("R@1",), "image,text", "image",
                           f"GeneCIS {s}: reference + condition -> own gallery (R@k within the gallery)",
                           ins.GENECIS[s], "query", subset=s))
    for name, dataset, instr, side in (
            ("flickr30k", "Flickr30K", ins.CAPTION_TO_IMAGE, "text"),
            ("mscoco5k", "MSCOCO 5K", None, None),
            ("sharegpt4v", "ShareGPT4V", ins.CAPTION_TO_IMAGE, "text"),
            ("urban1k", "Urban1K", ins.IMAGE_TO_CAPTION_EVERYDAY, "image")):
        tasks.append(_task(name, dataset, "bidirectional", "Recall@1", RECALL_KS, BIDIR_KEYS, ("t2i_R@1", "i2t_R@1"),
                           "text", "image", f"{dataset}: text <-> image (R@k both directions)", instr, side))
    tasks.append(_task("visdial", "VisDial", "retrieval", "Recall@1", RECALL_KS, _recall_keys(RECALL_KS), ("R@1",),
                       "text", "image", "VisDial v1.0 val: dialog -> image", ins.DIALOG_TO_IMAGE, "query"))
    tasks.append(_task("vist", "VIST", "retrieval", "Recall@1", RECALL_KS, _recall_keys(RECALL_KS), ("R@1",),
                       "image,text", "image", "VIST val SIS: interleaved story -> last image (context excluded)",
                       ins.VIST, "query (plain leading text)"))
    tasks.append(_task("ccneg", "CC-Neg", "pair", "Accuracy", (), (ACCURACY,), (ACCURACY,), "image", "text",
                       "CC-Neg (last 40,000): cos(image, caption) > cos(image, negated caption)"))
    for s in SUGARCREPE_SUBSETS:
        instr = ins.IMAGE_TO_CAPTION if s in ins.SUGARCREPE_WITH_INSTRUCTION else None
        tasks.append(_task(f"sugarcrepe_{s}", "Sugar-Crepe", "pair", "Accuracy", (), (ACCURACY,), (ACCURACY,),
                           "image", "text", f"Sugar-Crepe {s}: cos(image, positive) > cos(image, negative)",
                           instr, "image" if instr else None, subset=s))
    for name, dataset, video in (("msvd", "MSVD", "12 uniform frames"),
                                 ("msrvtt", "MSR-VTT", "2 fps, clamped to [4, 768] frames")):
        tasks.append(_task(name, dataset, "retrieval", "Recall@1", RECALL_KS, _recall_keys(RECALL_KS), ("R@1",),
                           "text", "video", f"{dataset}: caption -> video ({video})", ins.CAPTION_TO_VIDEO,
                           "query (no space)", video=video))
    known = set(READERS) | set(EXTRA_READERS)
    missing = [t.name for t in tasks if t.name not in known]
    if missing:  # the registry and the readers must name the same sets
        raise ConfigError(f"zero-shot tasks without a reader: {missing}")
    return tasks


def register_zeroshot_tasks() -> list[Task]:
    """Register every zero-shot task once (idempotent) and return them in order."""
    registered = {t.name for t in list_tasks(KIND)}
    for t in zeroshot_task_defs():
        if t.name not in registered:
            register_task(t)
    return list_tasks(KIND)


def resolve_zeroshot_names(spec: str | Sequence[str] | None) -> list[Task]:
    """Tasks named by ``--tasks`` (comma-separated string or list; group names ``genecis`` / ``sugarcrepe``
    expand), in registry order; all zero-shot tasks when ``spec`` is None or empty.

    Raises:
        ConfigError: an unknown name (listing the known ones) or a task of another kind.
    """
    tasks = register_zeroshot_tasks()
    if spec is None:
        return tasks
    names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec) if n and n.strip()]
    if not names:
        return tasks
    wanted: list[str] = []
    for n in names:
        key = n.lower().replace("-", "_")
        if key in GROUPS:
            wanted.extend(GROUPS[key])
            continue
        try:
            task = get_task(key)
        except ConfigError:
            raise ConfigError(f"unknown zero-shot task {n!r}; known: {', '.join(t.name for t in tasks)} "
                              f"(groups: {', '.join(GROUPS)})") from None
        if task.kind != KIND:
            raise ConfigError(f"task {n!r} is a {task.kind} task, not a zero-shot one")
        wanted.append(key)
    order = {t.name: i for i, t in enumerate(tasks)}
    return [get_task(n) for n in sorted(dict.fromkeys(wanted), key=order.__getitem__)]


register_zeroshot_tasks()
