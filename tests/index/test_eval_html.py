"""Result pages of evaluations: ``umarvel eval mbeir --html`` (sample queries per task with their top 5,
positives marked) and the demo's per-stage page, on a synthetic M-BEIR tree with the tiny model."""
from __future__ import annotations

from html.parser import HTMLParser

import pytest

import umarvel.cli as cli
import umarvel.commands as commands
from umarvel.data.mbeir import read_qrels
from umarvel.data.registry import get_task
from umarvel.data.synthetic import make_synthetic_mbeir

pytestmark = pytest.mark.slow
TASKS = ("mscoco_task0", "cirr_task7")


class MBeirPage(HTMLParser):
    """``{task: {qid: {stage: [(did, rank, positive), ...]}}}`` (stage ``""`` outside stage rows)."""

    def __init__(self):
        super().__init__()
        self.tasks: dict[str, dict[str, dict[str, list]]] = {}
        self.task = self.qid = None
        self.stage = ""
        self.thumbs = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        cls = a.get("class", "").split()
        if tag == "section" and "task" in cls:
            self.task = a["data-task"]
            self.tasks[self.task] = {}
        elif tag == "section" and "query" in cls:
            self.qid, self.stage = a["data-query"], ""
            self.tasks[self.task][self.qid] = {}
        elif tag == "div" and "stage" in cls:
            self.stage = a["data-stage"]
        elif tag == "figure" and "hit" in cls:
            self.tasks[self.task][self.qid].setdefault(self.stage, []).append(
                (a["data-id"], int(a["data-rank"]), "pos" in cls))
        elif tag == "img" and a.get("src", "").startswith("data:image/jpeg;base64,"):
            self.thumbs += 1


def _parse(path) -> MBeirPage:
    p = MBeirPage()
    p.feed(path.read_text())
    return p


def _trec(path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        qid, _, did, _rank, _score, _run = line.split()
        out.setdefault(qid, []).append(did)
    return out


@pytest.fixture(scope="module")
def evaluated(tiny_checkpoint, tmp_path_factory):
    """Local and global evaluations with ``--html``: ``(tree, {protocol: (output folder, page)})``."""
    base = tmp_path_factory.mktemp("html_eval")
    root = make_synthetic_mbeir(base / "M-BEIR", seed=0, n_queries_per_task=6, n_candidates_per_task=10, tasks=TASKS)
    out = {}
    saved = commands.setup_logging
    commands.setup_logging = lambda level: None  # keep pytest's log capture intact
    try:
        for protocol in ("local", "global"):
            folder, page = base / protocol, base / f"{protocol}.html"
            assert cli.main(["eval", "mbeir", "--model", str(tiny_checkpoint), "--mbeir-root", str(root),
                             "--output", str(folder), "--protocol", protocol, "--tasks", ",".join(TASKS),
                             "--device", "cpu", "--cache-dir", str(base / "cache"), "--html", str(page),
                             "--html-queries", "3"]) == 0
            out[protocol] = (folder, page)
    finally:
        commands.setup_logging = saved
    return root, out


@pytest.mark.parametrize("protocol", ["local", "global"])
def test_eval_html_page(evaluated, protocol):
    root, out = evaluated
    folder, page = out[protocol]
    parsed = _parse(page)
    assert sorted(parsed.tasks) == sorted(TASKS) and parsed.thumbs > 0
    for name in TASKS:
        qrels = read_qrels(root / get_task(name).files("test").qrels)
        run = _trec(folder / "runs" / f"{name}_test.trec")
        shown = parsed.tasks[name]
        assert len(shown) == 3
        for qid, rows in shown.items():
            cards = rows[""]
            assert [d for d, _, _ in cards] == run[qid][:5] and [r for _, r, _ in cards] == [1, 2, 3, 4, 5]
            assert [p for _, _, p in cards] == [d in qrels[qid] for d, _, _ in cards]


def test_per_stage_page(evaluated, tmp_path):
    from umarvel.index.html import write_stage_page

    root, out = evaluated
    stages = [("local run", out["local"][0]), ("global run", out["global"][0])]
    page = write_stage_page(tmp_path / "retrievals.html", root, "test", stages, n_queries=2, k=4)
    parsed = _parse(page)
    assert sorted(parsed.tasks) == sorted(TASKS)
    for name in TASKS:
        qrels = read_qrels(root / get_task(name).files("test").qrels)
        assert len(parsed.tasks[name]) == 2
        for qid, rows in parsed.tasks[name].items():
            assert list(rows) == ["local run", "global run"]  # the same query, one row per stage, in order
            for label, folder in stages:
                run = _trec(folder / "runs" / f"{name}_test.trec")
                assert [d for d, _, _ in rows[label]] == run[qid][:4]
                assert [p for _, _, p in rows[label]] == [d in qrels[qid] for d, _, _ in rows[label]]


def test_demo_retrievals_page(evaluated, tmp_path):
    """What ``umarvel demo`` calls at its end: ``<output>/retrievals.html`` from ``eval/<key>_test/global``."""
    import shutil

    from umarvel.index.html import write_demo_retrievals

    root, out = evaluated
    for key in ("stage0", "stage3"):
        shutil.copytree(out["global"][0], tmp_path / "eval" / f"{key}_test" / "global")
    page = write_demo_retrievals(tmp_path, root, tmp_path / "eval", [("0 random", "stage0"), ("3 M-BEIR", "stage3")])
    assert page == tmp_path / "retrievals.html"
    rows = next(iter(_parse(page).tasks[TASKS[0]].values()))
    assert list(rows) == ["0 random", "3 M-BEIR"] and len(rows["3 M-BEIR"]) == 5
