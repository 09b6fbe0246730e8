"""``umarvel serve`` on a free loopback port with the tiny model: JSON endpoint, uploads, limits, the page,
and the page in headless Chromium (skipped, with the reason, where ``chromium`` is not installed)."""
from __future__ import annotations

import base64
import http.client
import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pytest

from helpers import free_port

pytestmark = pytest.mark.slow
START_TIMEOUT_S = 240
REQUEST_TIMEOUT_S = 60
K = 4


@pytest.fixture(scope="module")
def server(photo_index, tmp_path_factory):
    """``python -m umarvel.cli serve`` on 127.0.0.1:<free port>; stopped at the end of the module."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "umarvel.cli", "serve", "--index", str(photo_index.path),
                                 "--port", str(port), "--device", "cpu", "-k", str(K), "--max-upload-mb", "1"],
                                stdout=fh, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"umarvel serve exited with {proc.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(f"{base}/healthz", timeout=2) as r:
                    if json.loads(r.read())["status"] == "ok":
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"umarvel serve did not answer within {START_TIMEOUT_S}s:\n{log.read_text()}")
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def _get(url: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=REQUEST_TIMEOUT_S) as r:
            return r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers.get("Content-Type", "")


def _post(url: str, body: bytes, ctype: str) -> tuple[int, bytes, str]:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": ctype})
    try:
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as r:
            return r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers.get("Content-Type", "")


def _multipart(fields: dict[str, str], image: bytes | None) -> tuple[bytes, str]:
    boundary = "----umarvel-test-boundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()]
    if image is not None:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q.png"\r\n'
                     f"Content-Type: image/png\r\n\r\n".encode() + image + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


class Figures(HTMLParser):
    def __init__(self):
        super().__init__()
        self.hits, self.thumbs, self.body = [], [], {}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "figure" and "hit" in a.get("class", ""):
            self.hits.append(a["data-id"])
        elif tag == "img" and a.get("class") == "thumb":
            self.thumbs.append(a["src"])
        elif tag == "body":
            self.body = a


def _figures(html: str) -> Figures:
    f = Figures()
    f.feed(html)
    return f


def test_json_endpoint_matches_the_python_api(server, photo_index, tiny_model):
    q = urllib.parse.urlencode({"q": "a blue circle", "task": "mscoco_task0", "k": 3})
    status, body, ctype = _get(f"{server}/api/search?{q}")
    assert status == 200 and ctype.startswith("application/json")
    rec = json.loads(body)
    assert rec["query"]["text"] == "a blue circle" and rec["query"]["instruction"].startswith("Find me an everyday")
    api = photo_index.query(tiny_model, {"text": "a blue circle", "instruction": rec["query"]["instruction"]}, k=3)[0]
    assert [h["id"] for h in rec["hits"]] == [h.id for h in api] and [h["rank"] for h in rec["hits"]] == [1, 2, 3]
    assert [h["score"] for h in rec["hits"]] == pytest.approx([h.score for h in api], abs=1e-5)


def test_image_upload_multipart_and_json(server, photos):
    png = (photos / "red.png").read_bytes()
    body, ctype = _multipart({"k": "2"}, png)
    status, out, _ = _post(f"{server}/api/search", body, ctype)
    hits = json.loads(out)["hits"]
    assert status == 200 and len(hits) == 2
    status, out2, _ = _post(f"{server}/api/search", json.dumps(
        {"image_base64": base64.b64encode(png).decode(), "k": 2}).encode(), "application/json")
    assert status == 200 and [h["id"] for h in json.loads(out2)["hits"]] == [h["id"] for h in hits]
    status, page, ctype = _post(f"{server}/", body, ctype)  # the page route with the same upload
    assert status == 200 and ctype.startswith("text/html") and len(_figures(page.decode()).hits) == 2


def test_bad_requests_get_clear_messages(server):
    body, ctype = _multipart({"q": ""}, b"this is not an image")
    status, out, _ = _post(f"{server}/api/search", body, ctype)
    assert status == 400 and json.loads(out)["error"].startswith("the uploaded file is not an image")
    status, page, _ = _post(f"{server}/", body, ctype)
    assert status == 400 and b"the uploaded file is not an image" in page and b"Traceback" not in page
    for query, message in [({"q": "x", "k": 0}, "k must be between 1 and 100"),
                           ({"q": "x", "k": "many"}, "k must be an integer"),
                           ({"q": "x", "task": "nope"}, "unknown task 'nope'"),
                           ({"q": ""}, "empty query")]:
        status, out, _ = _get(f"{server}/api/search?{urllib.parse.urlencode(query)}")
        assert status == 400 and message in json.loads(out)["error"]
    status, out, _ = _post(f"{server}/api/search", b"{not json", "application/json")
    assert status == 400 and "malformed JSON" in json.loads(out)["error"]
    assert _get(f"{server}/nope")[0] == 404 and _get(f"{server}/thumb/999.jpg")[0] == 404
    # a body over the limit is refused before it is read
    host, port = urllib.parse.urlsplit(server).netloc.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=REQUEST_TIMEOUT_S)
    try:
        conn.putrequest("POST", "/api/search")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(5 << 20))
        conn.endheaders()
        resp = conn.getresponse()
        assert resp.status == 413 and "request too large" in json.loads(resp.read())["error"]
    finally:
        conn.close()
    assert _get(f"{server}/healthz")[0] == 200  # still serving


def test_page_and_thumbnails(server, photo_index):
    status, page, _ = _get(f"{server}/")
    assert status == 200 and b'<form class="search"' in page and b'type="file"' in page
    status, page, _ = _get(f"{server}/?{urllib.parse.urlencode({'q': 'a green square'})}")
    figs = _figures(page.decode())
    assert status == 200 and len(figs.hits) == K and all(h in photo_index.ids for h in figs.hits)
    rows = [int(src.split("/")[-1].removesuffix(".jpg")) for src in figs.thumbs]
    assert [photo_index.ids[r] for r in rows] == figs.hits
    status, jpeg, ctype = _get(f"{server}{figs.thumbs[0]}")
    assert status == 200 and ctype == "image/jpeg" and jpeg[:2] == b"\xff\xd8"


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("headless Chromium not installed (Debian package `chromium`; .ci/run installs it)")
    return exe


def _rendered_count(exe: str, url: str) -> int:
    """Load ``url`` in headless Chromium; the page's script counts decoded thumbnails into <body data-rendered>."""
    proc = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--no-first-run", "--virtual-time-budget=10000", "--dump-dom", url],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    body = _figures(proc.stdout).body
    assert "data-rendered" in body, proc.stdout[:2000]
    return int(body["data-rendered"])


def test_chromium_renders_k_thumbnails(server):
    exe = _chromium()
    url = f"{server}/?{urllib.parse.urlencode({'q': 'a red square', 'k': K})}"
    assert _rendered_count(exe, url) == K


def test_chromium_renders_the_self_contained_page(photo_index, tiny_model, tmp_path):
    from umarvel.index.html import write_results_page

    exe = _chromium()
    q = {"text": "a yellow circle"}
    page = write_results_page(tmp_path / "results.html", [(q, photo_index.query(tiny_model, q, k=5)[0])])
    assert _rendered_count(exe, Path(page).as_uri()) == 5
