"""Tiny learnable training files for stages 1-3 (tests, the CPU chain through the scripts, benchmarks).

- ``make_toy_nli(path, n)``: a SimCSE-style CSV; sent1 paraphrases sent0 (same object words).
- ``make_toy_cc3m(root, n)``: a CC3M-style ``train_anno.json`` plus drawn images; the caption describes the image.
- stage 3 uses :func:`umarvel.data.synthetic.make_synthetic_mbeir` (the real M-BEIR layout).

``python -m umarvel.train.toy_data OUT`` writes ``OUT/nli.csv``, ``OUT/cc3m/train_anno.json`` and ``OUT/mbeir``.
"""
from __future__ import annotations

import csv
import json
import random
import sys
from pathlib import Path

from umarvel.data.synthetic import UNIVERSE, draw_object, make_synthetic_mbeir

_PARAPHRASE = ("The {c} {s} is {w}.", "We see a {z} {c} {s} {w}", "{w}: one {c} {s}, {z}.")


def make_toy_nli(path: str | Path, n: int = 32, seed: int = 0) -> Path:
    """Write an ``nli_for_simcse.csv`` with ``n`` rows (sent0, sent1, hard_neg)."""
    rng = random.Random(f"{seed}:nli")
    objs = rng.sample(UNIVERSE, n)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["sent0", "sent1", "hard_neg"])
        for i, o in enumerate(objs):
            other = objs[(i + 1) % n]
            fill = dict(c=o.colour, s=o.shape, z=o.size, w=o.where)
            w.writerow([o.caption(i), rng.choice(_PARAPHRASE).format(**fill), other.caption(i)])
    return path


def make_toy_cc3m(root: str | Path, n: int = 32, seed: int = 0, image_size: int = 56) -> Path:
    """Write ``root/train_anno.json`` and ``root/images/*.png``; returns the JSON path (h5v relative to root)."""
    rng = random.Random(f"{seed}:cc3m")
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    records = {}
    for i, o in enumerate(rng.sample(UNIVERSE, n)):
        rel = f"images/cc3m_{i:05d}.png"
        draw_object(o, image_size, random.Random(f"{seed}:{i}")).save(root / rel)
        rec = {"h5v": rel, "h5a": "none.hdf5", "text": "", "instruct_ans": [o.caption(i + 1)], "pos_text": ""}
        if i % 3:
            rec["instruction"] = "Find an image that matches the given caption."
        records[f"GCC_train_{i:09d}"] = rec
    out = root / "train_anno.json"
    out.write_text(json.dumps(records, indent=1))
    return out


def make_toy_all(out: str | Path, n: int = 32, seed: int = 0) -> dict[str, Path]:
    """All three stages' data under ``out``."""
    out = Path(out)
    return {"nli": make_toy_nli(out / "nli.csv", n, seed), "cc3m": make_toy_cc3m(out / "cc3m", n, seed),
            "mbeir": make_synthetic_mbeir(out / "mbeir", seed=seed, n_queries_per_task=2,
                                          n_candidates_per_task=4, image_size=56)}


if __name__ == "__main__":
    for k, v in make_toy_all(sys.argv[1] if len(sys.argv) > 1 else "toy_data").items():
        print(f"{k}: {v}")
