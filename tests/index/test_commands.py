"""``umarvel index build|add``, ``umarvel search`` (table, --json, --queries/--output, --html) and their errors."""
from __future__ import annotations

import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from umarvel import Index
from umarvel.cli import main

N_PHOTOS = 8  # tests/index/conftest.py: photos


class PageParser(HTMLParser):
    """Collects the hit figures (data-id, data-rank, data-score), every img src and the section count."""

    def __init__(self):
        super().__init__()
        self.hits: list[dict] = []
        self.imgs: list[dict] = []
        self.queries = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "figure" and "hit" in a.get("class", "").split():
            self.hits.append(a)
        elif tag == "img":
            self.imgs.append(a)
        elif tag == "section" and a.get("class") == "query":
            self.queries += 1


def parse_page(text: str) -> PageParser:
    p = PageParser()
    p.feed(text)
    p.close()
    return p


@pytest.fixture(scope="module")
def cli_index(tiny_checkpoint, photos, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "photos.idx"
    assert main(["index", "build", "--model", str(tiny_checkpoint), "--input", str(photos), "--output", str(out),
                 "--shard-size", "4", "--device", "cpu"]) == 0
    return out


def test_build_then_search_prints_ranked_hits(cli_index, capsys):
    idx = Index.load(cli_index)
    assert len(idx) == N_PHOTOS and Path(idx.info["parts"][0]["source"]).name.startswith("photos")
    capsys.readouterr()
    assert main(["search", "--index", str(cli_index), "--text", "a blue circle", "--task", "mscoco_task0",
                 "-k", "3", "--device", "cpu"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("query text: a blue circle | instruction: Find me an everyday image")
    ranks = [line.split() for line in out[1:4]]
    assert [r[0] for r in ranks] == ["1", "2", "3"] and all(r[2] in idx.ids for r in ranks)
    assert float(ranks[0][1]) >= float(ranks[1][1]) >= float(ranks[2][1])


def test_search_json_equals_the_python_api(cli_index, tiny_model, photos, capsys):
    capsys.readouterr()
    assert main(["search", "--index", str(cli_index), "--image", str(photos / "red.png"), "--instruction",
                 "Find a similar picture.", "-k", "4", "--json", "--device", "cpu"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["query"] == {"image": str(photos / "red.png"), "instruction": "Find a similar picture."}
    assert [h["rank"] for h in rec["hits"]] == [1, 2, 3, 4] and set(rec["hits"][0]) >= {"rank", "id", "score"}
    api = Index.load(cli_index).query(tiny_model, {"image": str(photos / "red.png"),
                                                   "instruction": "Find a similar picture."}, k=4)[0]
    assert [h["id"] for h in rec["hits"]] == [h.id for h in api]
    np.testing.assert_allclose([h["score"] for h in rec["hits"]], [h.score for h in api], atol=1e-5)


def test_queries_file_output_and_html_page(cli_index, photos, tmp_path, capsys):
    queries = tmp_path / "q.jsonl"
    (tmp_path / "q.png").write_bytes((photos / "trips" / "blue.jpg").read_bytes())
    queries.write_text(json.dumps({"id": "q1", "text": "a green square"}) + "\n"
                       + json.dumps({"id": "q2", "image": "q.png", "task": "nights_task4"}) + "\n"
                       + json.dumps({"id": "q3", "text": "yellow", "image": "q.png"}) + "\n")
    hits_file, html = tmp_path / "hits.jsonl", tmp_path / "results.html"
    assert main(["search", "--index", str(cli_index), "--queries", str(queries), "--output", str(hits_file),
                 "--html", str(html), "-k", "5", "--device", "cpu"]) == 0
    recs = [json.loads(x) for x in hits_file.read_text().splitlines()]
    assert [r["query"]["id"] for r in recs] == ["q1", "q2", "q3"] and all(len(r["hits"]) == 5 for r in recs)
    assert recs[1]["query"]["instruction"].startswith("Find a day-to-day image that looks similar")
    page = parse_page(html.read_text())
    assert page.queries == 3 and len(page.hits) == 15
    assert [h["data-id"] for h in page.hits] == [h["id"] for r in recs for h in r["hits"]]
    assert [float(h["data-score"]) for h in page.hits] == pytest.approx(
        [h["score"] for r in recs for h in r["hits"]], abs=1e-5)
    thumbs = [i for i in page.imgs if i.get("class") == "thumb"]
    assert len(thumbs) == 15 and all(i["src"].startswith("data:image/jpeg;base64,") for i in thumbs)
    query_imgs = [i for i in page.imgs if i.get("class") == "query-image"]
    assert len(query_imgs) == 2 and all(i["src"].startswith("data:image/jpeg;base64,") for i in query_imgs)
    assert "http" not in html.read_text().replace("http-equiv", "")  # self-contained: nothing fetched


def test_list_tasks(capsys):
    assert main(["search", "--list-tasks"]) == 0
    out = capsys.readouterr().out
    assert "mscoco_task0" in out and "cirr_task7" in out and len(out.splitlines()) == 17


def test_add_command_and_errors(cli_index, tiny_checkpoint, tmp_path, draw_image, capsys, monkeypatch):
    import shutil

    idx_dir = tmp_path / "copy.idx"
    shutil.copytree(cli_index, idx_dir)
    more = tmp_path / "more"
    draw_image(more / "new.png", (5, 5, 200))
    assert main(["index", "add", "--index", str(idx_dir), "--input", str(more), "--device", "cpu"]) == 0
    assert Index.load(idx_dir).ids[-1] == "new.png"
    with monkeypatch.context() as m:  # the same folder again: nothing new, no model loaded; a changed picture
        m.setattr("umarvel.api.UMarvel.from_pretrained", lambda *a, **k: pytest.fail("model loaded"))
        assert main(["index", "add", "--index", str(idx_dir), "--input", str(more), "--device", "cpu"]) == 0
        draw_image(more / "new.png", (200, 5, 5), shape="ellipse")
        capsys.readouterr()
        assert main(["index", "add", "--index", str(idx_dir), "--input", str(more), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "'new.png' (image content:" in err and "--overwrite" in err
    jsonl = tmp_path / "dup.jsonl"
    jsonl.write_text(json.dumps({"id": "new.png", "text": "x"}) + "\n")
    assert main(["index", "add", "--index", str(idx_dir), "--input", str(jsonl), "--device", "cpu"]) == 2  # duplicate
    assert main(["search", "--index", str(idx_dir), "--text", "x", "--dtype", "bfloat16", "--device", "cpu"]) == 2
    assert main(["search", "--index", str(idx_dir), "--text", "x", "--task", "nope"]) == 2
    assert main(["search", "--index", str(idx_dir), "--image", str(tmp_path / "missing.jpg")]) == 2
    assert main(["index", "build", "--model", str(tiny_checkpoint), "--input", str(more), "--output",
                 str(idx_dir)]) == 2  # exists
    assert main(["index", "build", "--model", str(tiny_checkpoint), "--input", str(more), "--output",
                 str(tmp_path / "new.idx"), "--nlist", "4"]) == 2  # an ivf option on a flat index
    assert not (tmp_path / "new.idx").exists()
    assert len(Index.load(idx_dir)) == N_PHOTOS + 1


def test_index_folder_has_one_writer_and_knows_its_build(cli_index, tiny_checkpoint, photos, tmp_path, capsys,
                                                        monkeypatch):
    """Run folders (umarvel.utils.runs): a build records its identity; an unfinished build of another backend
    is refused before the model loads; an add while another process writes the folder is refused."""
    import shutil

    from umarvel.utils.runs import LOCK_FILE, RunLock, read_identity

    rec = read_identity(cli_index)
    assert rec["kind"] == "index" and rec["config"]["backend"] == "flat" and not (cli_index / LOCK_FILE).exists()
    idx_dir = tmp_path / "copy.idx"
    shutil.copytree(cli_index, idx_dir)
    monkeypatch.setattr("umarvel.api.UMarvel.from_pretrained", lambda *a, **k: pytest.fail("model loaded"))
    capsys.readouterr()
    with RunLock(idx_dir):
        assert main(["index", "add", "--index", str(idx_dir), "--input", str(photos), "--device", "cpu"]) == 2
    assert "is in use by pid" in capsys.readouterr().err
    (idx_dir / "index.json").unlink()  # as if the build had been killed
    assert main(["index", "build", "--model", str(tiny_checkpoint), "--input", str(photos), "--output", str(idx_dir),
                 "--backend", "hnsw", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "backend: flat -> hnsw" in err and "--overwrite" in err and not (idx_dir / LOCK_FILE).exists()


def test_a_user_error_is_one_clear_line(tmp_path, tiny_checkpoint):
    """The console script itself: an empty folder -> exit 2, one ERROR line naming it, no traceback."""
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run([sys.executable, "-m", "umarvel.cli", "index", "build", "--model", str(tiny_checkpoint),
                           "--input", str(empty), "--output", str(tmp_path / "x.idx")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"{empty}: no images found" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "x.idx").exists()
