"""``umarvel eval mbeir --html``: sample queries per task with their top 5, positives marked (synthetic M-BEIR)."""
from __future__ import annotations

from html.parser import HTMLParser

import pytest

import umarvel.cli as cli
from umarvel.data.mbeir import read_qrels
from umarvel.data.registry import get_task
from umarvel.data.synthetic import make_synthetic_mbeir

TASKS = ("mscoco_task0", "cirr_task7")


class MBeirPage(HTMLParser):
    """``{task: {qid: [(did, rank, positive), ...]}}`` and the number of embedded thumbnails."""

    def __init__(self):
        super().__init__()
        self.tasks: dict[str, dict[str, list]] = {}
        self.task = self.qid = None
        self.thumbs = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        cls = a.get("class", "").split()
        if tag == "section" and "task" in cls:
            self.task = a["data-task"]
            self.tasks[self.task] = {}
        elif tag == "section" and "query" in cls:
            self.qid = a["data-query"]
            self.tasks[self.task][self.qid] = []
        elif tag == "figure" and "hit" in cls:
            self.tasks[self.task][self.qid].append((a["data-id"], int(a["data-rank"]), "pos" in cls))
        elif tag == "img" and a.get("src", "").startswith("data:image/jpeg;base64,"):
            self.thumbs += 1


def _trec(path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        qid, _, did, rank, _score, _run = line.split()
        out.setdefault(qid, []).append(did)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["local", "global"])
def test_eval_html_page(tiny_checkpoint, tmp_path_factory, monkeypatch, capsys, protocol):
    root = tmp_path_factory.getbasetemp() / "html_mbeir"
    if not root.exists():
        make_synthetic_mbeir(root, seed=0, n_queries_per_task=6, n_candidates_per_task=10, tasks=TASKS)
    out = tmp_path_factory.getbasetemp() / "html_eval" / protocol
    page = out.parent / f"{protocol}.html"
    monkeypatch.setattr(cli, "setup_logging", lambda level: None)
    assert cli.main(["eval", "mbeir", "--model", str(tiny_checkpoint), "--mbeir-root", str(root), "--output",
                     str(out), "--protocol", protocol, "--tasks", ",".join(TASKS), "--device", "cpu",
                     "--cache-dir", str(out.parent / "cache"), "--html", str(page), "--html-queries", "3"]) == 0
    parsed = MBeirPage()
    parsed.feed(page.read_text())
    assert sorted(parsed.tasks) == sorted(TASKS)
    for name in TASKS:
        qrels = read_qrels(root / get_task(name).files("test").qrels)
        run = _trec(out / "runs" / f"{name}_test.trec")
        shown = parsed.tasks[name]
        assert len(shown) == 3
        for qid, cards in shown.items():
            assert [d for d, _, _ in cards] == run[qid][:5] and [r for _, r, _ in cards] == [1, 2, 3, 4, 5]
            assert [p for d, _, p in cards] == [d in qrels[qid] for d, _, _ in cards]
    assert parsed.thumbs > 0
