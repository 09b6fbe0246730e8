"""The demo benchmark: generated training data for stages 1-3 and a small M-BEIR tree in the real layout.

Everything is drawn objects (shape, colour, size, position on a light background) and texts that truly
describe them (:mod:`umarvel.data.synthetic`), so the tasks are learnable, but only by reading the image:

- stage 1: ``nli.csv``, caption -> paraphrase pairs (:func:`umarvel.train.toy_data.make_toy_nli`);
- stage 2: ``cc3m/train_anno.json`` + drawings, caption <-> image (:func:`umarvel.train.toy_data.make_toy_cc3m`);
- stages 3-5 and evaluation: ``mbeir/``, seven M-BEIR tasks (text -> image, text -> text, text -> image+text,
  image -> text, image -> image, image+question -> text, composed image+"the same object, but red" -> image)
  with train / val / test queries, local pools, the global (union) pools, qrels and instructions
  (:func:`umarvel.data.synthetic.make_synthetic_mbeir`).

Negatives are true negatives, and the hard ones are informative (:func:`demo_pool_objects`): within a split
no object appears in two task pools, so no candidate of the local or the global pool (nor of the train pool
that mining searches) shows or describes what a positive of its query shows under another id; each pool is
made of *clusters* of near-duplicates, every object with its four other positions ("same object, other
position") and two to four other colours of its shape and size ("same shape, other colour"), which is what
stage-4 mining finds and the reranker must tell apart. Query drawings move at most ``query_jitter`` (0.05) from
their nominal position, so a query image is always nearer its positive than any other position's drawing.
``objects.json`` records what every candidate shows (``{did: {shape, colour, size, position}}``).

:func:`make_demo_benchmark` writes it (or reuses an identical earlier one: the tree is a pure function of
its :class:`BenchmarkSpec`), :func:`chance_recall` gives the Recall@k a random ranking would reach.
"""
from __future__ import annotations

import json
import logging
import math
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence

from umarvel.data.registry import get_task
from umarvel.data.synthetic import (COLOURS, POSITIONS, SHAPES, SIZES, SYNTHETIC_TASKS, UNIVERSE, Obj,
                                    pool_object_count)
from umarvel.errors import ConfigError
from umarvel.utils.io import atomic_write_json
from umarvel.data.mbeir import read_qrels
from umarvel.data.synthetic import make_synthetic_mbeir
from umarvel.train.toy_data import make_toy_cc3m, make_toy_nli

logger = logging.getLogger(__name__)

SPEC_FILE = "benchmark.json"
OBJECTS_FILE = "objects.json"
#: Version of the pool layout (:func:`demo_pool_objects`); recorded with the spec, so a change regenerates.
LAYOUT = "disjoint-clusters-1"


@dataclass(frozen=True)
class BenchmarkSpec:
    """Sizes of the generated benchmark.

    Attributes:
        seed: every object, caption and image is a deterministic function of the spec.
        image_size: side of the drawings in pixels (a multiple of 28 is used as is by the image budget).
        eval_queries_per_task: val and test queries per task.
        pool_size_per_task: candidates per local pool (the global pool is the union of the seven pools).
        train_queries_per_task: M-BEIR train queries per task (stage 3-5 data).
        nli_pairs / cc3m_pairs: stage-1 paraphrase pairs and stage-2 image-caption pairs (at most 350 each:
            one per distinct object).
        tasks: the M-BEIR registry tasks generated.
        query_jitter: how far query drawings move from their nominal position (fraction of the side; positions
            are 0.2 apart and candidate drawings move at most 0.04).
    """

    seed: int = 0
    image_size: int = 84
    eval_queries_per_task: int = 40
    pool_size_per_task: int = 50
    train_queries_per_task: int = 200
    nli_pairs: int = 300
    cc3m_pairs: int = 300
    tasks: tuple[str, ...] = SYNTHETIC_TASKS
    query_jitter: float = 0.05

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", tuple(self.tasks))
        for key in ("nli_pairs", "cc3m_pairs", "pool_size_per_task"):
            value = getattr(self, key)
            if not 1 <= value <= len(UNIVERSE):
                raise ConfigError(f"BenchmarkSpec.{key} must be in [1, {len(UNIVERSE)}] (distinct objects), "
                                  f"got {value}")
        unknown = [t for t in self.tasks if t not in SYNTHETIC_TASKS]
        if unknown or not self.tasks:
            raise ConfigError(f"BenchmarkSpec.tasks must be a non-empty subset of {list(SYNTHETIC_TASKS)}, "
                              f"got {list(self.tasks)}")
        lines = sum(_lines_needed(t, self.pool_size_per_task) for t in self.tasks)
        if lines > len(_LINES):
            raise ConfigError(f"BenchmarkSpec.pool_size_per_task={self.pool_size_per_task}: the {len(self.tasks)} task "
                              f"pools of a split would need {lines} lines of {len(POSITIONS)} positions, the universe "
                              f"has {len(_LINES)} (pools are disjoint)")
        if not 0.0 <= self.query_jitter < 0.06:
            raise ConfigError(f"BenchmarkSpec.query_jitter must be in [0, 0.06) (beyond, a query drawing can be "
                              f"nearer another position's drawing than its positive), got {self.query_jitter}")


@dataclass(frozen=True)
class DemoBenchmark:
    """Where the generated files are.

    Attributes:
        root: the benchmark folder. nli: stage-1 CSV. cc3m_json / cc3m_root: stage-2 annotation file and the
        folder its image paths are relative to. mbeir: the M-BEIR root. spec: what was generated.
    """

    root: Path
    nli: Path
    cc3m_json: Path
    cc3m_root: Path
    mbeir: Path
    spec: BenchmarkSpec


def _paths(root: Path, spec: BenchmarkSpec) -> DemoBenchmark:
    return DemoBenchmark(root=root, nli=root / "nli.csv", cc3m_json=root / "cc3m" / "train_anno.json",
                         cc3m_root=root / "cc3m", mbeir=root / "mbeir", spec=spec)


def _spec_json(spec: BenchmarkSpec) -> dict:
    d = asdict(spec)
    d["tasks"] = list(spec.tasks)
    d["layout"] = LAYOUT
    return d


# ------------------------------------------------------------------------------------------ pool layout
#: A line: one (shape, size, colour), drawn at every position (5 objects).
_LINES: tuple[tuple[str, str, str], ...] = tuple((s, z, c) for s in SHAPES for z in SIZES for c in COLOURS)


def _lines_needed(task: str, pool_size: int) -> int:
    return math.ceil(pool_object_count(task, pool_size) / len(POSITIONS))


def _deal(demands: dict[tuple[str, str], int], lines: Sequence[tuple[str, str, str]],
          rng: random.Random) -> dict[tuple[str, str], list[tuple[str, str, str]]]:
    """Give each pool its number of lines, in chunks of 2-4 colours of one (shape, size).

    The pool with the most lines still missing takes the next chunk, so every pool gets clusters of colours.
    """
    groups: dict[tuple[str, str], list[str]] = {}
    for s, z, c in lines:
        groups.setdefault((s, z), []).append(c)
    order = rng.sample(sorted(groups), len(groups))
    left = dict(demands)
    out: dict[tuple[str, str], list[tuple[str, str, str]]] = {k: [] for k in demands}
    for g in order:
        colours = rng.sample(groups[g], len(groups[g]))
        while colours and any(left.values()):
            pool = max(left, key=lambda k: left[k])  # first of the largest: deterministic
            n = min(rng.choice((2, 3, 4)), left[pool], len(colours))
            out[pool] += [(*g, c) for c in colours[:n]]
            colours, left[pool] = colours[n:], left[pool] - n
    if any(left.values()):
        raise ConfigError(f"the pools need {sum(demands.values())} lines, only {len(lines)} are free")
    return out


def _objects(lines: Sequence[tuple[str, str, str]], n: int, rng: random.Random) -> list[Obj]:
    """The first ``n`` objects of ``lines`` (each line at every position), shuffled."""
    objs = [Obj(s, c, z, p) for s, z, c in lines for p in POSITIONS][:n]
    return rng.sample(objs, len(objs))


def demo_pool_objects(spec: BenchmarkSpec) -> dict[tuple[str, str], list[Obj]]:
    """The objects of every pool, ``{(task, split): objects}`` (``make_synthetic_mbeir``'s ``pool_objects``).

    Per split (train; the test pools; the val pools) the task pools are disjoint: the global pool holds every
    object once (MSCOCO image -> text: its two captions, both positives of the same queries). Each pool is
    made of whole lines (one shape, size and colour at all five positions) dealt in chunks of two to four
    colours of the same shape and size. The val and test splits share the pools of every task but MSCOCO's
    (registry files): the MSCOCO val pools use the lines the shared pools leave free.
    """
    out: dict[tuple[str, str], list[Obj]] = {}
    shared = {t for t in spec.tasks if get_task(t).files("val").pool == get_task(t).files("test").pool}

    def fill(split: str, keys: dict[tuple[str, str], str], lines: Sequence[tuple[str, str, str]]) -> None:
        rng = random.Random(f"{spec.seed}:pools:{split}")
        demands = {key: _lines_needed(task, spec.pool_size_per_task) for key, task in keys.items()}
        for key, got in _deal(demands, lines, rng).items():
            out[key] = _objects(got, pool_object_count(keys[key], spec.pool_size_per_task), rng)

    fill("train", {(t, "train"): t for t in spec.tasks}, _LINES)
    fill("test", {(t, "val" if t in shared else "test"): t for t in spec.tasks}, _LINES)
    used = {(o.shape, o.size, o.colour) for t in shared for o in out[(t, "val")]}
    fill("val", {(t, "val"): t for t in spec.tasks if t not in shared}, [ln for ln in _LINES if ln not in used])
    return out


def make_demo_benchmark(root: str | Path, spec: BenchmarkSpec) -> DemoBenchmark:
    """Generate the benchmark under ``root`` (reused as is when ``root/benchmark.json`` records the same spec).

    A folder holding anything else is replaced: the generator owns ``root``.
    """
    root = Path(root)
    bench = _paths(root, spec)
    marker = root / SPEC_FILE
    if marker.is_file():
        try:
            same = json.loads(marker.read_text()) == _spec_json(spec)
        except json.JSONDecodeError:
            same = False
        if same and bench.nli.is_file() and bench.cc3m_json.is_file() and bench.mbeir.is_dir():
            logger.info("benchmark reused: %s", root)
            return bench
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    make_toy_nli(bench.nli, spec.nli_pairs, seed=spec.seed)
    make_toy_cc3m(bench.cc3m_root, spec.cc3m_pairs, seed=spec.seed, image_size=spec.image_size)
    make_synthetic_mbeir(bench.mbeir, seed=spec.seed, n_queries_per_task=spec.eval_queries_per_task,
                         n_candidates_per_task=spec.pool_size_per_task, image_size=spec.image_size,
                         n_train_queries_per_task=spec.train_queries_per_task, tasks=spec.tasks,
                         pool_objects=demo_pool_objects(spec), query_jitter=spec.query_jitter,
                         objects_file=OBJECTS_FILE)
    atomic_write_json(marker, _spec_json(spec))  # written last: marks a complete tree
    logger.info("benchmark generated: %s (%d tasks, %d eval queries and %d candidates per task, %dpx images)",
                root, len(spec.tasks), spec.eval_queries_per_task, spec.pool_size_per_task, spec.image_size)
    return bench


def _hit_chance(pool_size: int, positives: int, k: int) -> float:
    """P(at least one of ``positives`` among the first ``k`` of a uniformly random ranking of ``pool_size``)."""
    positives = min(positives, pool_size)
    if positives <= 0:
        return 0.0
    if k >= pool_size:
        return 1.0
    return 1.0 - math.comb(pool_size - positives, k) / math.comb(pool_size, k)


def chance_recall(mbeir_root: str | Path, tasks: Sequence[str], pool_sizes: Mapping[str, int],
                  split: str = "test") -> dict[str, float]:
    """Expected headline Recall@k (percent) of a random ranking, per task, from the qrels and pool sizes.

    Args:
        tasks: registry task names. pool_sizes: the number of candidates searched per task (local pool, or
            the global pool's size). split: which qrels.
    Returns:
        ``{task: percent}`` plus ``"average"`` (unweighted, as the M-BEIR average).
    """
    out: dict[str, float] = {}
    for name in tasks:
        task = get_task(name)
        qrels = read_qrels(Path(mbeir_root) / task.files(split).qrels)
        values = [_hit_chance(pool_sizes[name], len(dids), task.metric_k) for dids in qrels.values()]
        out[name] = 100.0 * sum(values) / max(len(values), 1)
    out["average"] = sum(out[t] for t in tasks) / len(tasks)
    return out


__all__ = ["BenchmarkSpec", "DemoBenchmark", "make_demo_benchmark", "demo_pool_objects", "chance_recall", "SPEC_FILE",
           "OBJECTS_FILE", "LAYOUT"]
