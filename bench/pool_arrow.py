"""Does a `datasets` Arrow cache pay for the big M-BEIR JSONL files? (issue 10, item 7)

    .venv/bin/pip install datasets      # not a dependency of umarvel (this measurement is why)
    .venv/bin/python bench/pool_arrow.py [--lines 200000] [--workdir /tmp/pool_arrow]

Writes a synthetic candidate pool in the M-BEIR format (``did``, ``txt``, ``img_path``, ``modality``,
``src_content``; the modality mix and text lengths of the union pool), then measures each way of reading
it in a fresh process (so every number includes nothing of the others):

- ``jsonl``: today's reader, :func:`umarvel.data.mbeir.read_pool` -> ``list[Candidate]``;
- ``arrow-build``: ``datasets.Dataset.from_json`` + ``save_to_disk`` (what rank 0 would do once);
- ``arrow-open``: ``datasets.load_from_disk`` (memory-mapped; what the other ranks would do);
- ``arrow-records``: open + the same ``list[Candidate]`` as ``read_pool`` (the reader API unchanged);
- ``arrow-dict``: open + ``{did: modality}`` from two columns' Python lists (what
  ``read_pool_modalities`` returns; a lower bound of materialising anything per row).

Per process: wall seconds of the read, and the memory it added: anonymous RSS (private to the rank) and
file-backed RSS (memory-mapped pages, shared by every rank on the node through the page cache).
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

WORDS = ("red blue green small large round square photo of a the with near on under dog cat car building river "
         "mountain person people street city table chair book flower tree sky").split()


def write_pool(path: Path, n: int, seed: int = 0) -> None:
    """``n`` candidate lines: 45% image, 35% text, 20% image+text; captions ~12 words, passages ~90."""
    rng = random.Random(seed)
    words = lambda a, b: " ".join(rng.choice(WORDS) for _ in range(rng.randint(a, b)))  # noqa: E731
    with path.open("w", encoding="utf-8") as fh:
        for i in range(n):
            r = rng.random()
            dataset = rng.randint(0, 9)
            img = f"mbeir_images/ds{dataset}_images/train/{i // 1000}/{i}.jpg"
            if r < 0.45:
                rec = {"txt": "", "img_path": img, "modality": "image"}
            elif r < 0.8:
                rec = {"txt": words(8, 16) if rng.random() < 0.6 else words(40, 140), "img_path": "",
                       "modality": "text"}
            else:
                rec = {"txt": words(8, 30), "img_path": img, "modality": "image,text"}
            rec["did"] = f"{dataset}:{i}"
            rec["src_content"] = json.dumps({"id": i}) if rng.random() < 0.3 else ""
            fh.write(json.dumps(rec) + "\n")


def _mem() -> dict[str, int]:
    """Current anonymous / file-backed RSS of this process in KiB (Linux /proc)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, val = line.partition(":")
        if key in ("RssAnon", "RssFile"):
            out[key] = int(val.split()[0])
    return out


def measure(mode: str, pool: Path, arrow: Path) -> dict:
    """Run one reading mode in this process; returns seconds and the memory it added (MiB)."""
    from umarvel.data.mbeir import read_pool
    from umarvel.data.records import Candidate

    import datasets  # noqa: F401  (imported before the baseline so both sides pay the same imports)

    datasets.disable_progress_bars()
    before = _mem()
    t0 = time.perf_counter()
    if mode == "jsonl":
        obj = read_pool(pool, "/root")
    elif mode == "arrow-build":
        ds = datasets.Dataset.from_json(str(pool), cache_dir=str(arrow.parent / "hf_cache"))
        ds.save_to_disk(str(arrow))
        obj = ds
    elif mode == "arrow-open":
        obj = datasets.load_from_disk(str(arrow))
        n = len(obj)
        _ = [obj[i]["did"] for i in range(0, n, max(1, n // 1000))]  # touch 1000 random-access rows
    elif mode == "arrow-records":
        ds = datasets.load_from_disk(str(arrow))
        cols = [ds.data.column(c).to_pylist() for c in ("did", "txt", "img_path", "modality")]
        obj = [Candidate(did=d, text=t or None, image=f"/root/{p}" if p else None, modality=m)
               for d, t, p, m in zip(*cols)]
    elif mode == "arrow-dict":
        ds = datasets.load_from_disk(str(arrow))
        obj = dict(zip(ds.data.column("did").to_pylist(), ds.data.column("modality").to_pylist()))
    else:
        raise SystemExit(f"unknown mode {mode}")
    seconds = time.perf_counter() - t0
    after = _mem()
    return {"mode": mode, "rows": len(obj), "seconds": round(seconds, 2),
            "anon_mib": round((after["RssAnon"] - before["RssAnon"]) / 1024, 1),
            "file_mib": round((after["RssFile"] - before["RssFile"]) / 1024, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lines", type=int, default=200_000)
    p.add_argument("--workdir", default="/tmp/pool_arrow")
    p.add_argument("--modes", default="jsonl,jsonl,arrow-build,arrow-open,arrow-records,arrow-dict",
                   help="comma-separated modes, each measured in a fresh process")
    p.add_argument("--keep", action="store_true", help="reuse the pool file of an earlier run")
    p.add_argument("--mode", default=None, help="internal: measure one mode in this process")
    args = p.parse_args()
    work = Path(args.workdir)
    pool, arrow = work / "pool.jsonl", work / "pool.arrow"
    if args.mode:
        print(json.dumps(measure(args.mode, pool, arrow)))
        return
    work.mkdir(parents=True, exist_ok=True)
    if not (args.keep and pool.is_file()):
        write_pool(pool, args.lines)
    print(f"pool: {sum(1 for _ in pool.open())} lines, {pool.stat().st_size / 2**20:.1f} MiB")
    print("| read | rows | seconds | anonymous RSS added (MiB, per rank) | file-backed RSS (MiB, shared) |")
    print("|---|---|---|---|---|")
    modes = args.modes.split(",")
    for mode in modes:
        res = subprocess.run([sys.executable, __file__, "--workdir", str(work), "--mode", mode],
                             check=True, capture_output=True, text=True)
        r = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"| {r['mode']} | {r['rows']} | {r['seconds']} | {r['anon_mib']} | {r['file_mib']} |", flush=True)


if __name__ == "__main__":
    main()
