"""``umarvel demo``: the embedded default.

Builds a tiny randomly initialised U-MARVEL model (or loads ``--model``), renders a few images of
coloured shapes, embeds instructed queries and candidates, and prints the query x candidate
similarity table. Everything runs offline on a CPU in seconds.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

SHAPES = [("red", "circle", (220, 40, 40)), ("blue", "square", (40, 60, 220)), ("green", "triangle", (40, 180, 60))]


def add_subparser(sub) -> None:
    """Register ``umarvel demo``."""
    p = sub.add_parser("demo", help="embed generated images and texts with a tiny model and print similarities")
    p.add_argument("--output", default="demo_output", help="folder for the generated images and results")
    p.add_argument("--model", default=None, help="an existing checkpoint instead of the tiny random model")
    p.add_argument("--quick", action="store_true", help="the smallest run")
    p.set_defaults(func=run)


def draw_shape(path: Path, color: tuple[int, int, int], shape: str, size: int = 112) -> Path:
    """Render one coloured shape on a light background."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (size, size), (245, 245, 240))
    d = ImageDraw.Draw(im)
    box = [size // 4, size // 4, 3 * size // 4, 3 * size // 4]
    if shape == "circle":
        d.ellipse(box, fill=color)
    elif shape == "square":
        d.rectangle(box, fill=color)
    else:
        d.polygon([(size // 2, size // 4), (size // 4, 3 * size // 4), (3 * size // 4, 3 * size // 4)], fill=color)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path


def similarity_table(q_names: list[str], c_names: list[str], sims: np.ndarray) -> str:
    """A fixed-width text table of cosine similarities (rows: queries, columns: candidates)."""
    width = max(len(c) for c in c_names) + 2
    head = " " * 34 + "".join(f"{c:>{width}}" for c in c_names)
    rows = [f"{q[:32]:<34}" + "".join(f"{v:>{width}.3f}" for v in row) for q, row in zip(q_names, sims)]
    return "\n".join([head, *rows])


def run(args: argparse.Namespace) -> int:
    """Embed a small generated set and print the similarity table."""
    from umarvel.api import UMarvel
    from umarvel.model.tiny import save_tiny_checkpoint

    out = Path(args.output)
    if args.model:
        model = UMarvel.from_pretrained(args.model)
    else:
        ckpt = out / "tiny_checkpoint"
        if not (ckpt / "config.json").is_file():
            save_tiny_checkpoint(ckpt, seed=0)
        model = UMarvel.from_pretrained(ckpt)
    images = {f"{c} {s}": draw_shape(out / "images" / f"{c}_{s}.png", rgb, s) for c, s, rgb in SHAPES}
    queries = [{"text": f"a {name}", "instruction": "Find me an everyday image that matches the given caption."}
               for name in images]
    queries.append({"image": str(images["red circle"]),
                    "instruction": "Find an image caption describing the following everyday image."})
    candidates = [{"image": str(p)} for p in images.values()] + [{"text": f"A {n}."} for n in images]
    q = model.encode_queries(queries)
    c = model.encode_candidates(candidates)
    sims = q @ c.T
    q_names = [f"q: {x.get('text') or 'image of red circle'}" for x in queries]
    c_names = [f"img:{n.split()[0]}" for n in images] + [f"txt:{n.split()[0]}" for n in images]
    print(f"model: {model.source}  dim={model.embed_dim}  temperature={model.temperature:.3g}")
    print(similarity_table(q_names, c_names, sims))
    np.save(out / "similarities.npy", sims)
    logger.info("wrote %s", out / "similarities.npy")
    return 0
