"""Results as pictures: self-contained HTML pages of queries and their hits.

- :func:`write_results_page`: ``umarvel search --html``: for each query, the query first (text, instruction,
  image), then a grid of its hits (thumbnail, rank, score, id, text snippet). Thumbnails are embedded as
  JPEG data URIs, so the page is one file that opens anywhere.
- :func:`query_block` with a ``thumb_src`` callback: the same markup with thumbnail URLs (``umarvel serve``).
- :func:`write_mbeir_page`: ``umarvel eval mbeir --html``: sample queries per task with their top 5, the
  positives marked.

Every hit is a ``<figure class="hit" data-id=... data-rank=... data-score=...>``; image hits hold an
``<img class="thumb">``. A small inline script sets ``data-rendered`` on ``<body>`` to the number of
thumbnails the browser decoded (used by the headless-browser test).
"""
from __future__ import annotations

import base64
import io
import logging
import os
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from umarvel.data.mbeir import parse_candidate, read_qrels, read_queries
from umarvel.data.registry import MBEIR_TASK_ORDER, get_task
from umarvel.data.runfiles import read_trec_run
from umarvel.errors import UMarvelError
from umarvel.utils.io import atomic_write_text

logger = logging.getLogger(__name__)

THUMB_SIZE = 224
SNIPPET_CHARS = 160

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f6f7f9;color:#1d2430}
header{background:#1d2430;color:#fff;padding:12px 20px}header h1{font-size:18px;margin:0}
header .sub{font-size:12px;opacity:.75;margin-top:2px}
main{padding:16px 20px}
section.query{background:#fff;border:1px solid #dde1e7;border-radius:8px;margin:0 0 18px;padding:12px 14px}
section.task>h2{font-size:16px;margin:22px 0 8px}
.qhead{display:flex;gap:14px;align-items:flex-start;margin-bottom:10px}
.qhead img{max-width:160px;max-height:160px;border-radius:4px;border:1px solid #ccd}
.qtext{font-size:15px}.qinst{font-size:12px;color:#667;margin-top:4px}.qid{font-size:11px;color:#889}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:10px}
figure.hit{margin:0;background:#fafbfc;border:1px solid #e1e4ea;border-radius:6px;overflow:hidden}
figure.hit.pos{border:3px solid #1e9e4a}
figure.hit img.thumb{width:100%;height:150px;object-fit:contain;display:block;background:#eceef2}
figure.hit .textonly{height:150px;overflow:hidden;padding:8px;font-size:12px;color:#334;background:#eef1f5}
figure.hit .noimg{height:150px;display:flex;align-items:center;justify-content:center;font-size:12px;color:#a33}
figcaption{padding:6px 8px;font-size:12px}
.rank{font-weight:600}.score{float:right;font-variant-numeric:tabular-nums;color:#335}
.id{display:block;color:#556;word-break:break-all;margin-top:2px}.snip{display:block;color:#333;margin-top:3px}
.badge{display:inline-block;background:#1e9e4a;color:#fff;border-radius:3px;padding:0 4px;font-size:11px;
 margin-left:4px}
.note{font-size:12px;color:#a33;margin-top:6px}
form.search{background:#fff;border:1px solid #dde1e7;border-radius:8px;padding:12px 14px;margin-bottom:18px;
 display:flex;flex-wrap:wrap;gap:8px;align-items:center}
form.search input[type=text]{flex:1 1 320px;padding:7px;font-size:15px}
form.search select,form.search input{font-size:13px}
.stage{margin-top:8px}.stage-label{font-size:12px;font-weight:600;color:#445;margin:4px 0}
.error{background:#fdecea;border:1px solid #f5c2c0;color:#8a1c1c;border-radius:6px;padding:10px 12px;margin-bottom:14px}
"""

RENDER_SCRIPT = """<script>
window.addEventListener('load',function(){var n=0;document.querySelectorAll('img.thumb').forEach(function(i){
if(i.complete&&i.naturalWidth>0){n++;}});document.body.setAttribute('data-rendered',String(n));});
</script>"""


def thumbnail_jpeg(image: Any, size: int = THUMB_SIZE) -> bytes | None:
    """JPEG bytes of a thumbnail (longest side ``size``) of a path or PIL image; None if unreadable."""
    try:
        if isinstance(image, Image.Image):
            im = image.copy()
        else:
            with Image.open(image) as src:
                src.draft("RGB", (size, size))  # JPEG: decode at reduced scale
                im = src.copy()
        im = ImageOps.exif_transpose(im).convert("RGB")
        im.thumbnail((size, size))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=82)
        return buf.getvalue()
    except Exception as exc:  # noqa: BLE001 - PIL raises many types; the page shows a placeholder
        logger.warning("no thumbnail for %s (%s)", image if not isinstance(image, Image.Image) else "<image>", exc)
        return None


def embedded_thumb(image: Any, size: int = THUMB_SIZE) -> str | None:
    """A thumbnail of ``image`` as a ``data:image/jpeg;base64,...`` URI (None if unreadable)."""
    jpeg = thumbnail_jpeg(image, size)
    return None if jpeg is None else "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def snippet(text: str | None, n: int = SNIPPET_CHARS) -> str:
    """First ``n`` characters of ``text`` on one line (with an ellipsis when cut)."""
    t = " ".join((text or "").split())
    return t if len(t) <= n else t[: n - 1] + "\u2026"


# -------------------------------------------------------------------------------------------- markup
@dataclass
class Card:
    """One hit as shown: id, rank, score, optional text / image source, positive flag."""

    id: str
    rank: int
    score: float
    text: str | None = None
    image: Any = None            # what the thumbnail is made from (path / PIL), if any
    src: str | None = None       # resolved thumbnail URL / data URI
    positive: bool = False


@dataclass
class QueryBlock:
    """One query and its cards."""

    text: str | None = None
    instruction: str | None = None
    image_src: str | None = None
    label: str | None = None
    cards: list[Card] = field(default_factory=list)
    note: str | None = None


def _card_html(c: Card) -> str:
    cls = "hit pos" if c.positive else "hit"
    if c.src:
        visual = f'<img class="thumb" src="{escape(c.src)}" alt="{escape(c.id)}" loading="eager">'
    elif c.image is not None:
        visual = '<div class="noimg">image unavailable</div>'
    else:
        visual = f'<div class="textonly">{escape(snippet(c.text, 400))}</div>'
    snip = f'<span class="snip">{escape(snippet(c.text))}</span>' if c.text and c.src else ""
    badge = '<span class="badge">positive</span>' if c.positive else ""
    return (f'<figure class="{cls}" data-id="{escape(c.id)}" data-rank="{c.rank}" data-score="{c.score:.6f}">'
            f'{visual}<figcaption><span class="rank">#{c.rank}</span>{badge}'
            f'<span class="score">{c.score:.4f}</span><span class="id">{escape(c.id)}</span>{snip}'
            f'</figcaption></figure>')


def _query_html(q: QueryBlock) -> str:
    img = f'<img class="query-image" src="{escape(q.image_src)}" alt="query image">' if q.image_src else ""
    text = f'<div class="qtext">{escape(q.text)}</div>' if q.text else ""
    inst = f'<div class="qinst">instruction: {escape(q.instruction)}</div>' if q.instruction else ""
    label = f'<div class="qid">{escape(q.label)}</div>' if q.label else ""
    note = f'<div class="note">{escape(q.note)}</div>' if q.note else ""
    cards = "".join(_card_html(c) for c in q.cards)
    attr = f' data-query="{escape(q.label)}"' if q.label else ""
    return (f'<section class="query"{attr}><div class="qhead">{img}<div>{label}{text}{inst}</div></div>'
            f'<div class="grid">{cards}</div>{note}</section>')


def page(title: str, subtitle: str, body: str) -> str:
    """A complete HTML document (inline CSS and the render-count script, nothing external)."""
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1"><title>{escape(title)}</title>'
            f'<style>{CSS}</style></head><body><header><h1>{escape(title)}</h1>'
            f'<div class="sub">{escape(subtitle)}</div></header><main>{body}</main>{RENDER_SCRIPT}</body></html>\n')


def render_queries(blocks: Sequence[QueryBlock]) -> str:
    """The query sections of a page."""
    return "".join(_query_html(q) for q in blocks)


def hit_cards(hits: Sequence[Any], thumb_src: Callable[[Any], str | None]) -> list[Card]:
    """Cards of :class:`~umarvel.index.core.Hit` objects; ``thumb_src(hit)`` gives each image's source."""
    return [Card(id=h.id, rank=h.rank, score=h.score, text=h.text, image=h.image,
                 src=thumb_src(h) if h.image else None) for h in hits]


def query_block(query: Mapping[str, Any], hits: Sequence[Any], thumb_src: Callable[[Any], str | None],
                query_image_src: str | None = None) -> QueryBlock:
    """A :class:`QueryBlock` of one query dict (``text``, ``image``, ``instruction``, ``id``) and its hits."""
    img_src = query_image_src
    if img_src is None and query.get("image") is not None:
        img_src = embedded_thumb(query["image"], 320)
    label = str(query["id"]) if query.get("id") is not None else None
    return QueryBlock(text=query.get("text"), instruction=query.get("instruction"), image_src=img_src,
                      label=label, cards=hit_cards(hits, thumb_src),
                      note=None if hits else "no hits")


def render_page(results: Sequence[tuple[Mapping[str, Any], Sequence[Any]]], title: str = "umarvel search",
                subtitle: str = "") -> str:
    """A results page: ``results`` = ``[(query dict, hits), ...]``, thumbnails embedded."""
    blocks = [query_block(q, h, lambda hit: embedded_thumb(hit.image)) for q, h in results]
    return page(title, subtitle, render_queries(blocks))


def write_results_page(path: str | os.PathLike, results: Sequence[tuple[Mapping[str, Any], Sequence[Any]]],
                       title: str = "umarvel search", subtitle: str = "") -> Path:
    """Write the self-contained results page (atomic); returns its path."""
    path = Path(path)
    atomic_write_text(path, render_page(results, title, subtitle))
    logger.info("wrote %s (%d queries)", path, len(results))
    return path


# --------------------------------------------------------------------------------------- M-BEIR page
_DID_RE = re.compile(r'"did"\s*:\s*"([^"]+)"')


def find_candidates(pool_files: Sequence[Path], root: Path, wanted: set[str]) -> dict[str, Any]:
    """``{did: Candidate}`` of the wanted ids, scanning pool files line by line (only matching lines parsed)."""
    import json

    out: dict[str, Any] = {}
    for f in pool_files:
        if len(out) == len(wanted):
            break
        with open(f, "r", encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                m = _DID_RE.search(line)
                if m and m.group(1) in wanted and m.group(1) not in out:
                    out[m.group(1)] = parse_candidate(json.loads(line), root, f"{f}:{lineno}")
    return out


def _present_pools(root: Path, split: str) -> list[Path]:
    """The local pool files of ``split`` present under ``root``, registry order (the global pool's parts)."""
    return [root / get_task(n).files(split).pool for n in MBEIR_TASK_ORDER
            if (root / get_task(n).files(split).pool).is_file()]


def _cards(ranked: Sequence[tuple[str, float]], cands: Mapping[str, Any], positives: frozenset,
           thumb: int) -> list[Card]:
    """Cards of ``(did, score)`` pairs in rank order: text / image from ``cands``, positives marked."""
    cards = []
    for r, (did, score) in enumerate(ranked, start=1):
        c = cands.get(did)
        img = c.image if c is not None else None
        cards.append(Card(id=did, rank=r, score=float(score), text=c.text if c else None, image=img,
                          src=embedded_thumb(img, thumb) if img else None, positive=did in positives))
    return cards


def mbeir_blocks(root: Path, split: str, task_name: str, retrieval: Any, pool_files: Sequence[Path],
                 n_queries: int, k: int, seed: int) -> list[QueryBlock]:
    """Sample queries of one task with their top ``k`` (positives from the qrels marked)."""
    task = get_task(task_name)
    files = task.files(split)
    queries = {q.qid: q for q in read_queries(root / files.queries, root)}
    qrels = read_qrels(root / files.qrels)
    rng = random.Random(f"{seed}:{task_name}")
    picks = sorted(rng.sample(range(len(retrieval.qids)), min(n_queries, len(retrieval.qids))))
    dids = retrieval.dids
    wanted = {str(d) for p in picks for d in dids[p, :k] if d}
    cands = find_candidates(pool_files, root, wanted)
    blocks = []
    for p in picks:
        qid = retrieval.qids[p]
        q = queries.get(qid)
        pos = frozenset(qrels.get(qid, ()) or (q.positives if q else ()))
        ranked = [(str(d), s) for d, s in zip(dids[p, :k], retrieval.scores[p, :k]) if d]  # padding is last
        cards = _cards(ranked, cands, pos, 160)
        found = any(c.positive for c in cards)
        blocks.append(QueryBlock(
            text=q.text if q else None, instruction=q.instruction if q else None,
            image_src=embedded_thumb(q.image, 200) if q and q.image else None, label=qid,
            cards=cards, note=None if found else f"no positive in the top {k} (positives: "
                                                 f"{', '.join(sorted(pos)[:5])})"))
    return blocks


def write_mbeir_page(path: str | os.PathLike, result: Any, mbeir_root: str | os.PathLike, split: str,
                     protocol: str, n_queries: int = 5, k: int = 5, seed: int = 0) -> Path:
    """``umarvel eval mbeir --html``: per evaluated task, ``n_queries`` seeded sample queries with their
    top ``k``, positives marked (rank 0 only; ``result`` is the :class:`MBeirEvalResult`).

    Queries are shown as in their query file (the instruction drawn per query for the evaluation is not
    repeated); texts and images of the hits are found in the pool file(s) searched.
    """
    root = Path(mbeir_root)
    sections = []
    scores = {t.name: t for t in result.tasks}
    for name, ret in result.retrievals.items():
        pools = _present_pools(root, split) if protocol == "global" else [root / get_task(name).files(split).pool]
        blocks = mbeir_blocks(root, split, name, ret, pools, n_queries, k, seed)
        tr = scores.get(name)
        head = f"{name}" + (f" \u2014 {tr.metric} {tr.value:.2f}" if tr is not None else "")
        sections.append(f'<section class="task" data-task="{escape(name)}"><h2>{escape(head)}</h2>'
                        f'{render_queries(blocks)}</section>')
    subtitle = f"M-BEIR {protocol} ({split}): {n_queries} sample queries per task, top {k}; green = positive"
    path = Path(path)
    atomic_write_text(path, page("umarvel M-BEIR retrievals", subtitle, "".join(sections)))
    logger.info("wrote %s (%d tasks)", path, len(sections))
    return path


# ---------------------------------------------------------------------------------- per-stage page
def write_stage_page(path: str | os.PathLike, mbeir_root: str | os.PathLike, split: str,
                     stages: Sequence[tuple[str, str | os.PathLike]], n_queries: int = 3, k: int = 5,
                     seed: int = 0) -> Path:
    """The same sample queries after each stage: per task, each query with one row of top ``k`` per stage.

    Args:
        stages: ``[(label, evaluation output folder), ...]`` in order; each folder holds
            ``runs/<task>_<split>.trec`` (an ``umarvel eval mbeir`` output). Tasks are those of the first.
        n_queries: seeded sample of queries per task (the same for every stage).
    """
    root = Path(mbeir_root)
    first = Path(stages[0][1]) / "runs"
    tasks = [t for t in MBEIR_TASK_ORDER if (first / f"{t}_{split}.trec").is_file()]
    runs = {label: {t: read_trec_run(Path(d) / "runs" / f"{t}_{split}.trec") for t in tasks
                    if (Path(d) / "runs" / f"{t}_{split}.trec").is_file()} for label, d in stages}
    pools = _present_pools(root, split)
    sections = []
    for name in tasks:
        files = get_task(name).files(split)
        queries = read_queries(root / files.queries, root)
        qrels = read_qrels(root / files.qrels)
        rng = random.Random(f"{seed}:{name}")
        picks = [queries[i] for i in sorted(rng.sample(range(len(queries)), min(n_queries, len(queries))))]
        wanted = {d for lab in runs for q in picks for d, _ in runs[lab].get(name, {}).get(q.qid, [])[:k]}
        cands = find_candidates(pools, root, wanted)
        blocks = []
        for q in picks:
            pos = frozenset(qrels.get(q.qid, ()) or q.positives)
            head = QueryBlock(text=q.text, image_src=embedded_thumb(q.image, 200) if q.image else None, label=q.qid)
            rows = []
            for label in runs:
                cards = _cards(runs[label].get(name, {}).get(q.qid, [])[:k], cands, pos, 140)
                rows.append(f'<div class="stage" data-stage="{escape(label)}"><div class="stage-label">'
                            f'{escape(label)}</div><div class="grid">{"".join(_card_html(c) for c in cards)}'
                            f'</div></div>')
            html_q = _query_html(head).replace('<div class="grid"></div>', "".join(rows), 1)
            blocks.append(html_q)
        sections.append(f'<section class="task" data-task="{escape(name)}"><h2>{escape(name)}</h2>'
                        f'{"".join(blocks)}</section>')
    subtitle = (f"the same {n_queries} queries per task after each stage, top {k} ({split}); green = positive")
    path = Path(path)
    atomic_write_text(path, page("umarvel: retrieval after each stage", subtitle, "".join(sections)))
    logger.info("wrote %s (%d tasks, %d stages)", path, len(sections), len(stages))
    return path


def write_demo_retrievals(output: Path, mbeir_root: Path, evals: Path, stages: Sequence[tuple[str, str]],
                          protocol: str = "global") -> Path | None:
    """``<output>/retrievals.html`` of ``umarvel demo``: the same test queries after each stage (evaluation
    folders ``<evals>/<key>_test/<protocol>``); a failure is logged, never fatal to the demo."""
    try:
        return write_stage_page(Path(output) / "retrievals.html", mbeir_root, "test",
                                [(label, Path(evals) / f"{key}_test" / protocol) for label, key in stages])
    except (UMarvelError, OSError, ValueError) as exc:
        logger.warning("retrievals.html not written: %s", exc)
        return None
