"""A small synthetic M-BEIR tree in the exact released format (mbeir_benchmark.md 1.1-1.4).

The world is made of simple drawn objects: a shape (circle, square, ...) of a colour and a size at a
position on a light background. Texts truly describe the images, so a model can learn the tasks:

| registry task  | query -> candidate        | content                                                      |
|----------------|---------------------------|--------------------------------------------------------------|
| mscoco_task0   | text -> image             | caption -> drawing                                           |
| webqa_task1    | text -> text              | question -> fact passage                                     |
| edis_task2     | text -> image,text        | caption -> drawing + headline                                |
| mscoco_task3   | image -> text             | drawing -> its two captions (two positives)                  |
| nights_task4   | image -> image            | drawing -> the same object drawn again, slightly moved (PNG) |
| oven_task6     | image,text -> text        | drawing + question -> encyclopedia entry of the object       |
| cirr_task7     | image,text -> image       | reference drawing + "the same object, but red" -> target     |

Files written (names from the task registry, so the real code path runs on them)::

    query/{train,union_train,val,union_val,test}/...   cand_pool/local/... (MSCOCO: _val_/_test_ pools)
    cand_pool/global/mbeir_union_{train,val,test}_cand_pool.jsonl
    qrels/{train,val,test}/...   instructions/query_instructions.tsv   mbeir_images/<ds>_images/...

Use :func:`make_synthetic_mbeir`. The tree is a pure function of its arguments (deterministic per seed).
"""
from __future__ import annotations

import itertools
import logging
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from PIL import Image, ImageDraw

from umarvel.data.formatting import format_string
from umarvel.data.registry import DATASET_IDS, MBEIR_INSTRUCTIONS, MBEIR_UNION_POOLS, MBEIR_UNION_TRAIN_QUERIES, get_task
from umarvel.utils.io import atomic_write_json, atomic_write_text, write_jsonl

logger = logging.getLogger(__name__)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30),
    "purple": (140, 60, 180), "orange": (245, 140, 30), "black": (25, 25, 25),
}
SIZES: dict[str, float] = {"small": 0.16, "large": 0.32}          # half-extent, fraction of the side
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.3, 0.5), "right": (0.7, 0.5), "top": (0.5, 0.3), "bottom": (0.5, 0.7), "center": (0.5, 0.5),
}
POSITION_PHRASES: dict[str, str] = {
    "left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
    "center": "in the center",
}
SYNTHETIC_TASKS: tuple[str, ...] = (
    "mscoco_task0", "webqa_task1", "edis_task2", "mscoco_task3", "nights_task4", "oven_task6", "cirr_task7",
)
#: Datasets whose train queries are repeated in the union train file (M-BEIR up-samples small sets).
UPSAMPLED_DATASETS: frozenset[str] = frozenset({"nights", "cirr"})

# Real-looking prompts per (dataset_id, query modality, candidate modality); the first of each row
# is the M-BEIR prompt quoted in mbeir_benchmark.md 1.7 where one is known.
INSTRUCTION_ROWS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("text", "image", "visualnews", ("Identify the news-related image in line with the described event.",
                                     "Retrieve a news photo that matches this caption.",
                                     "Find the image that goes with the following news description.")),
    ("image", "text", "visualnews", ("Find a caption for the news in the given photo.",
                                     "Retrieve the news caption that describes this image.")),
    ("text", "image", "fashion200k", ("Based on the following fashion description, retrieve the best matching image.",
                                      "Find a product photo that matches this fashion description.")),
    ("image", "text", "fashion200k", ("Find a product description for the fashion item in the image.",
                                      "Retrieve the catalogue text that describes this clothing item.")),
    ("text", "text", "webqa", ("Retrieve passages from Wikipedia that provide answers to the following question.",
                               "Find a paragraph that answers this question.",
                               "Which passage contains the answer to the question below?")),
    ("text", "image,text", "webqa", ("Find a Wikipedia image that answers this question.",
                                     "Retrieve an image with its description that answers the question.")),
    ("text", "image,text", "edis", ("Find a news image that matches the provided caption.",
                                    "Retrieve a news photo with its headline that fits this description.",
                                    "Identify the news image and headline described below.")),
    ("image", "image", "nights", ("Find a day-to-day image that looks similar to the provided image.",
                                  "Retrieve the picture most similar to this one.")),
    ("image,text", "text", "oven", ("Retrieve a Wikipedia paragraph that provides an answer to the given query about the image.",
                                    "Find the encyclopedia entry about the object in this picture.")),
    ("image,text", "image,text", "oven", ("Retrieve a Wikipedia image-description pair that provides evidence for the question of this image.",
                                          "Find an illustrated article that answers the question about this image.")),
    ("image,text", "text", "infoseek", ("Retrieve a Wikipedia paragraph that provides an answer to the given query about the image.",
                                        "Find a passage that answers the question about this image.")),
    ("image,text", "image,text", "infoseek", ("Retrieve a Wikipedia image-description pair that provides evidence for the question of this image.",
                                              "Find an image with its article that answers this visual question.")),
    ("image,text", "image", "fashioniq", ("Find a fashion image that aligns with the reference image and style note.",
                                          "Retrieve the garment photo that matches the reference item after the described change.")),
    ("image,text", "image", "cirr", ("Retrieve a day-to-day image that aligns with the modification instructions of the provided image.",
                                     "Find the picture that shows the reference image changed as described.",
                                     "Apply the requested change to the image and retrieve the result.")),
    ("text", "image", "mscoco", ("Find me an everyday image that matches the given caption.",
                                 "Retrieve the photo described by this caption.",
                                 "Identify the image that this sentence describes.")),
    ("image", "text", "mscoco", ("Find an image caption describing the following everyday image.",
                                 "Retrieve a sentence that describes this picture.")),
)
_TSV_WIDTH = 4  # prompt columns; shorter rows leave empty cells, as in the released file


@dataclass(frozen=True, order=True)
class Obj:
    """One drawable object; its attributes are what texts talk about."""

    shape: str
    colour: str
    size: str
    position: str

    @property
    def where(self) -> str:
        return POSITION_PHRASES[self.position]

    def caption(self, style: int) -> str:
        """A caption describing the drawing (``style`` picks one of three templates)."""
        s, c, z, w = self.shape, self.colour, self.size, self.where
        templates = (f"a {z} {c} {s} {w} of the picture",
                     f"a picture with a {z} {c} {s} {w}",
                     f"there is a {c} {s} {w}; it is {z}")
        return format_string(templates[style % len(templates)])


UNIVERSE: tuple[Obj, ...] = tuple(Obj(*t) for t in itertools.product(SHAPES, COLOURS, SIZES, POSITIONS))
#: Objects chosen for pools: ``{(task, split): objects}`` (see :func:`make_synthetic_mbeir`).
PoolObjects = Mapping[tuple[str, str], Sequence[Obj]]


# --------------------------------------------------------------------------------------------- state
@dataclass
class _Tree:
    """Mutable state of one generation: ids per dataset, rendered images, accumulated records."""

    root: Path
    seed: int
    image_size: int
    query_jitter: float = 0.12
    pool_objects: PoolObjects | None = None
    next_n: dict[tuple[str, str], int] = field(default_factory=dict)   # (dataset, "q"|"d") -> last n
    images: dict[tuple, str] = field(default_factory=dict)
    candidate_objects: dict[str, Obj] = field(default_factory=dict)    # did -> the object it shows / describes
    train_queries: dict[str, list[dict]] = field(default_factory=dict)  # dataset -> records
    train_pool: list[dict] = field(default_factory=list)

    def objects(self, task: str, split: str, n: int, rng: random.Random) -> list[Obj]:
        """The ``n`` objects of ``task``'s pool built for ``split``: from :attr:`pool_objects` when it has the
        key ``(task, split)``, else ``n`` distinct random objects of the universe."""
        chosen = (self.pool_objects or {}).get((task, split))
        if chosen is None:
            return rng.sample(UNIVERSE, n)
        if len(chosen) != n or len(set(chosen)) != n:
            raise ValueError(f"pool_objects[({task!r}, {split!r})]: {len(chosen)} objects "
                             f"({len(set(chosen))} distinct), the pool needs {n} distinct objects")
        return list(chosen)

    def new_id(self, dataset: str, kind: str) -> str:
        """Next ``"<dataset_id>:<n>"`` (n from 1, one space per dataset for queries and one for dids)."""
        key = (dataset, kind)
        self.next_n[key] = self.next_n.get(key, 0) + 1
        return f"{DATASET_IDS[dataset]}:{self.next_n[key]}"

    def image(self, dataset: str, split: str, obj: Obj, variant: int = 0) -> str:
        """Relative path of the drawing of ``obj`` (rendered once per dataset, split, object, variant)."""
        key = (dataset, split, obj, variant)
        if key not in self.images:
            ext = "png" if dataset == "nights" else "jpg"
            rel = f"mbeir_images/{dataset}_images/{split}/{dataset}_{len(self.images) + 1:06d}.{ext}"
            rng = random.Random(f"{self.seed}:img:{dataset}:{split}:{obj}:{variant}")
            img = draw_object(obj, self.image_size, rng, jitter=0.04 if variant == 0 else self.query_jitter)
            path = self.root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            img.save(path, format="PNG" if ext == "png" else "JPEG", quality=90)
            self.images[key] = rel
        return self.images[key]


def draw_object(obj: Obj, size: int, rng: random.Random, jitter: float = 0.04) -> Image.Image:
    """Draw ``obj`` on a light background: (size, size) RGB image; ``jitter`` moves it a little."""
    bg = tuple(rng.randint(225, 250) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    cx = (POSITIONS[obj.position][0] + rng.uniform(-jitter, jitter)) * size
    cy = (POSITIONS[obj.position][1] + rng.uniform(-jitter, jitter)) * size
    r = SIZES[obj.size] * size * rng.uniform(0.9, 1.1)
    fill = COLOURS[obj.colour]
    if obj.shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif obj.shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif obj.shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif obj.shape == "diamond":
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    else:  # cross
        t = r / 3
        d.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
        d.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
    return img


# ------------------------------------------------------------------------------------------- records
def _query(qid: str, txt: str | None, img: str | None, modality: str, positives: Sequence[str],
           task_id: int) -> dict:
    """A query record with the released key order."""
    return {"qid": qid, "query_txt": txt, "query_img_path": img, "query_modality": modality,
            "query_src_content": None, "pos_cand_list": list(positives), "neg_cand_list": [],
            "task_id": task_id}


def _cand(did: str, txt: str | None, img: str | None, modality: str) -> dict:
    """A candidate record with the released key order."""
    return {"txt": txt, "img_path": img, "modality": modality, "did": did, "src_content": None}


# A task spec turns objects into candidates and queries.
#   candidates(tree, dataset, split, obj) -> list of (txt, img) pairs (one candidate each)
#   query(tree, dataset, split, target, rng) -> (txt, img) of a query whose positives are target's candidates
CandFn = Callable[[_Tree, str, str, Obj], list[tuple[str | None, str | None]]]
QueryFn = Callable[[_Tree, str, str, Obj, random.Random], tuple[str | None, str | None]]


def _cands_image(tree: _Tree, ds: str, split: str, obj: Obj) -> list[tuple[str | None, str | None]]:
    return [(None, tree.image(ds, split, obj))]


def _cands_two_captions(tree: _Tree, ds: str, split: str, obj: Obj) -> list[tuple[str | None, str | None]]:
    return [(obj.caption(0), None), (obj.caption(2), None)]


def _cands_fact(tree: _Tree, ds: str, split: str, obj: Obj) -> list[tuple[str | None, str | None]]:
    text = (f"{obj.colour} {obj.shape} ({obj.size}, {obj.position}). The {obj.colour} {obj.shape} in this "
            f"picture is {obj.size} and is drawn {obj.where}")
    return [(format_string(text), None)]


def _cands_news(tree: _Tree, ds: str, split: str, obj: Obj) -> list[tuple[str | None, str | None]]:
    text = f"breaking: {obj.size} {obj.colour} {obj.shape} spotted {obj.where} of the frame"
    return [(format_string(text), tree.image(ds, split, obj))]


def _cands_entry(tree: _Tree, ds: str, split: str, obj: Obj) -> list[tuple[str | None, str | None]]:
    text = (f"{obj.size} {obj.colour} {obj.shape} ({obj.position}). A {obj.size} {obj.colour} {obj.shape} "
            f"is a {obj.colour} {obj.shape}-shaped figure drawn {obj.where} of a plain light background")
    return [(format_string(text), None)]


def _q_caption(tree: _Tree, ds: str, split: str, obj: Obj, rng: random.Random) -> tuple[str | None, str | None]:
    return obj.caption(rng.randrange(3)), None


def _q_question(tree: _Tree, ds: str, split: str, obj: Obj, rng: random.Random) -> tuple[str | None, str | None]:
    templates = (f"is the {obj.size} {obj.colour} {obj.shape} drawn {obj.where}?",
                 f"which fact is about a {obj.size} {obj.colour} {obj.shape} {obj.where}?")
    return format_string(rng.choice(templates)), None


def _q_image(tree: _Tree, ds: str, split: str, obj: Obj, rng: random.Random) -> tuple[str | None, str | None]:
    return None, tree.image(ds, split, obj)


def _q_similar_image(tree: _Tree, ds: str, split: str, obj: Obj, rng: random.Random) -> tuple[str | None, str | None]:
    return None, tree.image(ds, split, obj, variant=1)


def _q_image_question(tree: _Tree, ds: str, split: str, obj: Obj, rng: random.Random) -> tuple[str | None, str | None]:
    question = rng.choice(("which object is shown in this image?", "what is drawn in this picture?",
                           "what shape and colour does this object have?"))
    return format_string(question), tree.image(ds, split, obj, variant=2)


def _q_composed(tree: _Tree, ds: str, split: str, obj: Obj, rng: random.Random) -> tuple[str | None, str | None]:
    """Reference = target with one attribute changed; the text asks for the target's value."""
    attr = rng.choice(("colour", "shape", "size", "position"))
    if attr == "colour":
        ref = Obj(obj.shape, rng.choice([c for c in COLOURS if c != obj.colour]), obj.size, obj.position)
        text = f"the same object, but {obj.colour}"
    elif attr == "shape":
        ref = Obj(rng.choice([s for s in SHAPES if s != obj.shape]), obj.colour, obj.size, obj.position)
        text = f"the same colour, but make it a {obj.shape}"
    elif attr == "size":
        ref = Obj(obj.shape, obj.colour, "small" if obj.size == "large" else "large", obj.position)
        text = f"the same object, but {'larger' if obj.size == 'large' else 'smaller'}"
    else:
        ref = Obj(obj.shape, obj.colour, obj.size, rng.choice([p for p in POSITIONS if p != obj.position]))
        text = f"the same object, but move it to the {obj.position}"
    return format_string(text), tree.image(ds, split, ref, variant=3)


@dataclass(frozen=True)
class _Spec:
    candidates: CandFn
    query: QueryFn
    cands_per_object: int = 1


_SPECS: dict[str, _Spec] = {
    "mscoco_task0": _Spec(_cands_image, _q_caption),
    "webqa_task1": _Spec(_cands_fact, _q_question),
    "edis_task2": _Spec(_cands_news, _q_caption),
    "mscoco_task3": _Spec(_cands_two_captions, _q_image, cands_per_object=2),
    "nights_task4": _Spec(_cands_image, _q_similar_image),
    "oven_task6": _Spec(_cands_entry, _q_image_question),
    "cirr_task7": _Spec(_cands_image, _q_composed),
}


# ------------------------------------------------------------------------------------------ builders
def _sample(rng: random.Random, objs: Sequence[Obj], n: int) -> list[Obj]:
    """``n`` objects from ``objs``: without repetition while possible, then cycling a shuffled copy."""
    if n <= len(objs):
        return rng.sample(list(objs), n)
    shuffled = rng.sample(list(objs), len(objs))
    return [shuffled[i % len(shuffled)] for i in range(n)]


def _build_pool(tree: _Tree, task: str, split: str, objs: Sequence[Obj]) -> tuple[list[dict], dict[Obj, list[str]]]:
    """Candidate records of ``objs`` and each object's dids."""
    t = get_task(task)
    ds = t.options["dataset_key"]
    records: list[dict] = []
    dids: dict[Obj, list[str]] = {}
    for obj in objs:
        for txt, img in _SPECS[task].candidates(tree, ds, split, obj):
            did = tree.new_id(ds, "d")
            records.append(_cand(did, txt, img, t.cand_modality))
            tree.candidate_objects[did] = obj
            dids.setdefault(obj, []).append(did)
    return records, dids


def _build_queries(tree: _Tree, task: str, split: str, targets: Sequence[Obj], dids: dict[Obj, list[str]],
                   rng: random.Random) -> list[dict]:
    """Query records whose positives are the candidates of each target object."""
    t = get_task(task)
    ds = t.options["dataset_key"]
    out = []
    for obj in targets:
        txt, img = _SPECS[task].query(tree, ds, split, obj, rng)
        out.append(_query(tree.new_id(ds, "q"), txt, img, t.query_modality, dids[obj], t.task_id))
    return out


def _qrels_text(queries: Sequence[dict]) -> str:
    """qrels lines ``qid 0 did 1 task_id`` for every positive, in query order."""
    return "".join(f"{q['qid']} 0 {did} 1 {q['task_id']}\n" for q in queries for did in q["pos_cand_list"])


def pool_object_count(task: str, n_candidates: int) -> int:
    """How many objects give ``n_candidates`` candidates for ``task`` (at least one; MSCOCO image -> text has
    two captions per object)."""
    return max(1, n_candidates // _SPECS[task].cands_per_object)


def _write_eval_task(tree: _Tree, task: str, n_queries: int, n_candidates: int,
                     pools_by_split: dict[str, list[dict]], queries_by_split: dict[str, list[dict]]) -> None:
    """Local pool(s), val/test queries and qrels of one task (MSCOCO: one pool per split)."""
    t = get_task(task)
    rng = random.Random(f"{tree.seed}:task:{task}")
    n_obj = pool_object_count(task, n_candidates)
    built: dict[str, tuple[list[dict], dict[Obj, list[str]]]] = {}
    for split in ("val", "test"):
        files = t.files(split)
        if files.pool not in built:
            built[files.pool] = _build_pool(tree, task, split, tree.objects(task, split, n_obj, rng))
            write_jsonl(tree.root / files.pool, built[files.pool][0])
        records, dids = built[files.pool]
        pools_by_split[split].extend(records)
        queries = _build_queries(tree, task, split, _sample(rng, list(dids), n_queries), dids, rng)
        write_jsonl(tree.root / files.queries, queries)
        atomic_write_text(tree.root / files.qrels, _qrels_text(queries))
        queries_by_split[split].extend(queries)


def _add_train_task(tree: _Tree, task: str, n_queries: int, n_candidates: int) -> None:
    """Train candidates (union train pool) and train queries of one task."""
    rng = random.Random(f"{tree.seed}:train:{task}")
    objs = tree.objects(task, "train", pool_object_count(task, n_candidates), rng)
    records, dids = _build_pool(tree, task, "train", objs)
    tree.train_pool.extend(records)
    ds = get_task(task).options["dataset_key"]
    queries = _build_queries(tree, task, "train", _sample(rng, objs, n_queries), dids, rng)
    tree.train_queries.setdefault(ds, []).extend(queries)


def _did_order(rec: dict) -> tuple[int, int]:
    d, n = rec["did"].split(":")
    return int(d), int(n)


def _instructions_tsv() -> str:
    """The instruction TSV: header, then one row per key, prompts padded with empty cells."""
    header = ["query_modality", "cand_modality", "dataset_name", "dataset_id"] + [
        f"prompt_{i}" for i in range(1, _TSV_WIDTH + 1)]
    lines = ["\t".join(header)]
    for q_mod, c_mod, ds, prompts in INSTRUCTION_ROWS:
        cells = list(prompts) + [""] * (_TSV_WIDTH - len(prompts))
        lines.append("\t".join([q_mod, c_mod, ds, str(DATASET_IDS[ds])] + cells))
    return "\n".join(lines) + "\n"


def _check_args(tasks: Sequence[str], n_queries: int, n_candidates: int, n_train: int, image_size: int) -> None:
    unknown = [t for t in tasks if t not in _SPECS]
    if unknown:
        raise ValueError(f"no synthetic generator for {unknown}; available: {', '.join(_SPECS)}")
    if min(n_queries, n_candidates, n_train) < 1:
        raise ValueError("n_queries_per_task, n_candidates_per_task and n_train_queries_per_task must be >= 1")
    if n_candidates > len(UNIVERSE):
        raise ValueError(f"n_candidates_per_task is at most {len(UNIVERSE)} (distinct objects)")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")


def make_synthetic_mbeir(root: str | os.PathLike, seed: int = 0, n_queries_per_task: int = 6,
                         n_candidates_per_task: int = 12, image_size: int = 48,
                         n_train_queries_per_task: int | None = None,
                         tasks: Sequence[str] = SYNTHETIC_TASKS, pool_objects: PoolObjects | None = None,
                         query_jitter: float = 0.12, objects_file: str | None = None) -> Path:
    """Write a synthetic M-BEIR tree under ``root`` and return ``root``.

    Args:
        root: output folder (created; files of the same names are overwritten).
        seed: everything (objects, captions, images) is a deterministic function of the arguments.
        n_queries_per_task: val and test queries per task.
        n_candidates_per_task: local pool size per task (and per-task share of the train pool).
        image_size: side of the square drawings, pixels.
        n_train_queries_per_task: train queries per task (default ``2 * n_queries_per_task``).
        tasks: registry task names to generate (a subset of :data:`SYNTHETIC_TASKS`).
        pool_objects: the objects of chosen pools, ``{(task, split): objects}`` (split ``train``, ``val`` or
            ``test``; a local pool that val and test share, every task's but MSCOCO's, is keyed by ``val``), each
            :func:`pool_object_count` distinct objects; pools not in it draw random objects.
        query_jitter: how far (fraction of the side) query drawings (image queries, the composed references)
            move from their nominal position; candidate drawings move at most 0.04.
        objects_file: also write ``root/objects_file``, JSON ``{did: {shape, colour, size, position}}`` of every
            candidate (train, val and test pools): the ground truth of what each candidate shows or describes.
    """
    n_train = 2 * n_queries_per_task if n_train_queries_per_task is None else n_train_queries_per_task
    tasks = [t for t in SYNTHETIC_TASKS if t in set(tasks)] + [t for t in tasks if t not in SYNTHETIC_TASKS]
    _check_args(tasks, n_queries_per_task, n_candidates_per_task, n_train, image_size)
    tree = _Tree(root=Path(root), seed=seed, image_size=image_size, query_jitter=query_jitter,
                 pool_objects=pool_objects)
    pools: dict[str, list[dict]] = {"val": [], "test": []}
    queries: dict[str, list[dict]] = {"val": [], "test": []}
    for task in tasks:
        _write_eval_task(tree, task, n_queries_per_task, n_candidates_per_task, pools, queries)
        _add_train_task(tree, task, n_train, n_candidates_per_task)
    _write_unions(tree, pools, queries)
    atomic_write_text(tree.root / MBEIR_INSTRUCTIONS, _instructions_tsv())
    if objects_file:
        atomic_write_json(tree.root / objects_file, {did: asdict(obj) for did, obj in tree.candidate_objects.items()},
                          indent=None)
    logger.info("synthetic M-BEIR tree at %s: %d tasks, %d images", tree.root, len(tasks), len(tree.images))
    return tree.root


def _write_unions(tree: _Tree, pools: dict[str, list[dict]], queries: dict[str, list[dict]]) -> None:
    """Global pools, union val queries, per-dataset train queries and qrels, union up-sampled train."""
    for split in ("val", "test"):
        write_jsonl(tree.root / MBEIR_UNION_POOLS[split], sorted(pools[split], key=_did_order))
    write_jsonl(tree.root / "query/union_val/mbeir_union_val.jsonl", queries["val"])
    write_jsonl(tree.root / MBEIR_UNION_POOLS["train"], sorted(tree.train_pool, key=_did_order))
    union: list[dict] = []
    for ds, recs in tree.train_queries.items():
        write_jsonl(tree.root / f"query/train/mbeir_{ds}_train.jsonl", recs)
        atomic_write_text(tree.root / f"qrels/train/mbeir_{ds}_train_qrels.txt", _qrels_text(recs))
        union.extend(recs * (2 if ds in UPSAMPLED_DATASETS else 1))
    random.Random(f"{tree.seed}:union_train").shuffle(union)
    write_jsonl(tree.root / MBEIR_UNION_TRAIN_QUERIES, union)
