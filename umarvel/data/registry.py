"""The one registry of evaluation tasks (M-BEIR now, zero-shot benchmarks later).

A :class:`Task` is plain data: its name, kind (``"mbeir"`` or ``"zeroshot"``), display dataset name,
headline metric, cutoffs, per-split files (relative to the benchmark root) and, for M-BEIR, the
training-side definition used by hard-negative mining (method spec 5.2). Tasks are kept in
registration order; the 16 M-BEIR tasks are registered at import in the paper's column order.

    >>> from umarvel.data.registry import get_task, list_tasks
    >>> get_task("fashioniq_task7").metric
    'Recall@10'
    >>> [t.name for t in list_tasks(kind="mbeir")][:2]
    ['visualnews_task0', 'mscoco_task0']
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from umarvel.errors import ConfigError

logger = logging.getLogger(__name__)

#: M-BEIR dataset ids, keyed by the lowercase spelling used in file names.
DATASET_IDS: dict[str, int] = {
    "visualnews": 0, "fashion200k": 1, "webqa": 2, "edis": 3, "nights": 4,
    "oven": 5, "infoseek": 6, "fashioniq": 7, "cirr": 8, "mscoco": 9,
}
#: (query modality, candidate modality) of each valid M-BEIR task id (5 is not a valid task).
TASK_MODALITIES: dict[int, tuple[str, str]] = {
    0: ("text", "image"), 1: ("text", "text"), 2: ("text", "image,text"), 3: ("image", "text"),
    4: ("image", "image"), 6: ("image,text", "text"), 7: ("image,text", "image"),
    8: ("image,text", "image,text"),
}
TASK_KINDS: tuple[str, ...] = ("mbeir", "zeroshot")
MBEIR_CUTOFFS: tuple[int, ...] = (1, 5, 10, 50)
MBEIR_EVAL_SPLITS: tuple[str, ...] = ("val", "test")
#: Headline metrics taking a cutoff (``Recall@5``, ``mAP@5``) and those without one (zero-shot pair accuracy).
CUTOFF_METRICS: tuple[str, ...] = ("Recall", "mAP")
PLAIN_METRICS: tuple[str, ...] = ("Accuracy",)

#: Display names (paper spelling) of the M-BEIR datasets, keyed by the lowercase file-name spelling.
MBEIR_DATASET_NAMES: Mapping[str, str] = MappingProxyType({
    "visualnews": "VisualNews", "fashion200k": "Fashion200K", "webqa": "WebQA", "edis": "EDIS",
    "nights": "NIGHTS", "oven": "OVEN", "infoseek": "InfoSeek", "fashioniq": "FashionIQ",
    "cirr": "CIRR", "mscoco": "MSCOCO",
})

#: The 16 (dataset, task) pairs in the paper's / official table column order.
MBEIR_TASK_ORDER: tuple[str, ...] = (
    "visualnews_task0", "mscoco_task0", "fashion200k_task0", "webqa_task1", "edis_task2", "webqa_task2",
    "visualnews_task3", "mscoco_task3", "fashion200k_task3", "nights_task4", "oven_task6",
    "infoseek_task6", "fashioniq_task7", "cirr_task7", "oven_task8", "infoseek_task8",
)

#: Tasks whose headline metric is Recall@10 (all others report Recall@5).
RECALL10_TASKS: frozenset[str] = frozenset({"fashion200k_task0", "fashion200k_task3", "fashioniq_task7"})

#: Union (global) candidate pools shipped with M-BEIR, relative to the root.
MBEIR_UNION_POOLS: Mapping[str, str] = MappingProxyType({
    "train": "cand_pool/global/mbeir_union_train_cand_pool.jsonl",
    "val": "cand_pool/global/mbeir_union_val_cand_pool.jsonl",
    "test": "cand_pool/global/mbeir_union_test_cand_pool.jsonl",
})
MBEIR_UNION_TRAIN_QUERIES = "query/union_train/mbeir_union_up_train.jsonl"
MBEIR_INSTRUCTIONS = "instructions/query_instructions.tsv"

GLOBAL_PROTOCOL = (
    "M-BEIR global (D8): each task's queries are searched in the concatenation of the 16 local "
    "candidate pools of the split, in the registry's task order, with no modality filter and no "
    "deduplication (the official UniIR/LamRA/U-MARVEL protocol)."
)
LOCAL_PROTOCOL = "M-BEIR local: each task's queries are searched in that task's own local candidate pool."

#: Datasets whose train pools are shared by the OVEN/InfoSeek tasks (method spec 5.2).
_WIKI_DATASETS = frozenset({DATASET_IDS["oven"], DATASET_IDS["infoseek"]})


@dataclass(frozen=True)
class SplitFiles:
    """Files of one evaluation split, relative to the benchmark root."""

    queries: str
    pool: str
    qrels: str


@dataclass(frozen=True)
class TrainSpec:
    """Training-side definition of an M-BEIR task (method spec 5.2), used by mining.

    Its queries are rows of the union up-sampled train file (:data:`MBEIR_UNION_TRAIN_QUERIES`), its pool a part
    of the union train pool (:data:`MBEIR_UNION_POOLS`).

    Attributes:
        qrels: the dataset's train qrels file (each task's qrels are a copy of its dataset's).
        query_dataset_id / query_task_id: a train query belongs to the task when the dataset id of its
            qid and its ``task_id`` equal these.
        pool_dataset_ids: the task's train pool holds the train-pool dids whose dataset id is in this set
            ({5, 6} for the four OVEN/InfoSeek tasks, else the task's own dataset) ...
        pool_modality: ... and whose modality equals the task's target modality.
    """

    qrels: str
    query_dataset_id: int
    query_task_id: int
    pool_dataset_ids: frozenset[int]
    pool_modality: str

    def selects_query(self, dataset_id: int, task_id: int) -> bool:
        """Whether a train query (dataset id of its qid, its task_id) belongs to this task."""
        return dataset_id == self.query_dataset_id and task_id == self.query_task_id


@dataclass(frozen=True)
class Task:
    """One evaluation task.

    Attributes:
        name: unique registry name, e.g. ``"mscoco_task0"``.
        kind: ``"mbeir"`` or ``"zeroshot"``.
        dataset: display name of the dataset (``"MSCOCO"``).
        metric: headline metric, ``"Recall@<k>"`` / ``"mAP@<k>"`` (``k`` must be one of ``cutoffs``) or
            ``"Accuracy"`` (zero-shot pair sets; ``cutoffs`` may then be empty).
        cutoffs: the cutoffs computed (and the search depth ``max(cutoffs)``).
        description: one line for listings.
        dataset_id / task_id: M-BEIR ids (``None`` for benchmarks without them).
        query_modality / cand_modality: modalities of queries and target candidates, if fixed.
        splits: per-split files (keys such as ``"val"``, ``"test"``).
        train: training-side definition (M-BEIR tasks), or ``None``.
        options: free-form extra settings for other task kinds (zero-shot readers, etc.).
    """

    name: str
    kind: str
    dataset: str
    metric: str
    cutoffs: tuple[int, ...]
    description: str = ""
    dataset_id: int | None = None
    task_id: int | None = None
    query_modality: str | None = None
    cand_modality: str | None = None
    splits: Mapping[str, SplitFiles] = field(default_factory=dict)
    train: TrainSpec | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise ConfigError(f"task {self.name!r}: kind must be one of {TASK_KINDS}, got {self.kind!r}")
        k = self.metric_k  # validates the metric name
        if (k is not None and not self.cutoffs) or any(int(c) < 1 for c in self.cutoffs):
            raise ConfigError(f"task {self.name!r}: cutoffs must be positive integers, got {self.cutoffs!r}")
        object.__setattr__(self, "cutoffs", tuple(sorted(int(c) for c in self.cutoffs)))
        if k is not None and k not in self.cutoffs:
            raise ConfigError(f"task {self.name!r}: headline {self.metric} is not among cutoffs {self.cutoffs}")
        object.__setattr__(self, "splits", MappingProxyType(dict(self.splits)))
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))

    def __hash__(self) -> int:
        return hash((self.kind, self.name))

    @property
    def metric_k(self) -> int | None:
        """The ``k`` of the headline ``<name>@k`` metric (``Recall@k``, ``mAP@k``); None for ``Accuracy``."""
        name, at, k = self.metric.partition("@")
        if not at and self.metric in PLAIN_METRICS:
            return None
        if name not in CUTOFF_METRICS or not k.isdigit():
            raise ConfigError(f"task {self.name!r}: metric must look like 'Recall@5' / 'mAP@5' or be one of "
                              f"{PLAIN_METRICS}, got {self.metric!r}")
        return int(k)

    @property
    def search_depth(self) -> int:
        """How many candidates to retrieve per query: the largest cutoff (0 for a task without cutoffs)."""
        return max(self.cutoffs, default=0)

    def files(self, split: str) -> SplitFiles:
        """The files of ``split``; ConfigError naming the task and the known splits if absent."""
        try:
            return self.splits[split]
        except KeyError:
            raise ConfigError(
                f"task {self.name!r} has no split {split!r} (known: {', '.join(self.splits) or 'none'})"
            ) from None


_REGISTRY: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Add ``task`` to the registry (kept in registration order) and return it.

    Raises:
        ConfigError: if a task of that name exists.
    """
    if task.name in _REGISTRY:
        raise ConfigError(f"task {task.name!r} is already registered")
    _REGISTRY[task.name] = task
    return task


def get_task(name: str) -> Task:
    """The registered task called ``name``; ConfigError listing the known names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown task {name!r}; known tasks: {', '.join(_REGISTRY)}") from None


def list_tasks(kind: str | None = None) -> list[Task]:
    """Registered tasks in registration order, optionally only those of ``kind``."""
    if kind is not None and kind not in TASK_KINDS:
        raise ConfigError(f"unknown task kind {kind!r}; known kinds: {', '.join(TASK_KINDS)}")
    return [t for t in _REGISTRY.values() if kind is None or t.kind == kind]


def resolve_tasks(names: list[str] | tuple[str, ...] | None, kind: str) -> list[Task]:
    """Tasks named in ``names`` (all of ``kind`` when None), in registry order, each checked to be of ``kind``."""
    if names is None:
        return list_tasks(kind)
    wanted = [get_task(n) for n in names]
    for t in wanted:
        if t.kind != kind:
            raise ConfigError(f"task {t.name!r} is a {t.kind} task, not {kind}")
    order = {t.name: i for i, t in enumerate(list_tasks())}
    return sorted(dict.fromkeys(wanted), key=lambda t: order[t.name])


def mbeir_local_pool_file(dataset: str, task_id: int, split: str) -> str:
    """Relative path of a local pool; MSCOCO's pools are split-specific, the others shared by val/test."""
    if dataset == "mscoco":
        return f"cand_pool/local/mbeir_mscoco_task{task_id}_{split}_cand_pool.jsonl"
    return f"cand_pool/local/mbeir_{dataset}_task{task_id}_cand_pool.jsonl"


def mbeir_split_files(dataset: str, task_id: int, split: str) -> SplitFiles:
    """Query, local pool and qrels files of an M-BEIR (dataset, task) pair for ``split``."""
    stem = f"mbeir_{dataset}_task{task_id}_{split}"
    return SplitFiles(
        queries=f"query/{split}/{stem}.jsonl",
        pool=mbeir_local_pool_file(dataset, task_id, split),
        qrels=f"qrels/{split}/{stem}_qrels.txt",
    )


def mbeir_train_spec(dataset: str, task_id: int) -> TrainSpec:
    """Training-side definition of an M-BEIR task (method spec 5.2)."""
    dataset_id = DATASET_IDS[dataset]
    pool_ids = _WIKI_DATASETS if dataset_id in _WIKI_DATASETS else frozenset({dataset_id})
    return TrainSpec(
        qrels=f"qrels/train/mbeir_{dataset}_train_qrels.txt",
        query_dataset_id=dataset_id,
        query_task_id=task_id,
        pool_dataset_ids=pool_ids,
        pool_modality=TASK_MODALITIES[task_id][1],
    )


def _mbeir_task(name: str) -> Task:
    """Build the registry entry of one of the 16 M-BEIR tasks from its name."""
    dataset, _, task = name.rpartition("_task")
    task_id = int(task)
    q_mod, c_mod = TASK_MODALITIES[task_id]
    display = MBEIR_DATASET_NAMES[dataset]
    return Task(
        name=name,
        kind="mbeir",
        dataset=display,
        metric="Recall@10" if name in RECALL10_TASKS else "Recall@5",
        cutoffs=MBEIR_CUTOFFS,
        description=f"M-BEIR {display} task {task_id}: {q_mod} -> {c_mod}",
        dataset_id=DATASET_IDS[dataset],
        task_id=task_id,
        query_modality=q_mod,
        cand_modality=c_mod,
        splits={s: mbeir_split_files(dataset, task_id, s) for s in MBEIR_EVAL_SPLITS},
        train=mbeir_train_spec(dataset, task_id),
        options={"dataset_key": dataset},
    )


for _name in MBEIR_TASK_ORDER:
    register_task(_mbeir_task(_name))
