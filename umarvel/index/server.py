"""``umarvel serve``: a local search page over an index (standard library ``http.server``).

Routes::

    GET  /                     the page: search box, instruction / task, optional image upload, k;
                               with ?q=... (and task, instruction, k) it also shows the results
    POST /                     the same form with an uploaded image (multipart/form-data)
    GET  /api/search?q=...     JSON {"query": {...}, "hits": [{"rank", "id", "score", "text", "image"}]}
    POST /api/search           JSON body {"text", "instruction", "task", "k", "image_base64"} or the form
    GET  /thumb/<row>.jpg      a JPEG thumbnail of item <row> (only items of the index are ever read)
    GET  /healthz              {"status": "ok", "count": N}

Bound to 127.0.0.1 by default. Limits: request body (``max_upload_bytes``), query text length, ``k``, and the
pixel count of an uploaded image. A bad request (unreadable upload, k out of range, empty query...) gets a
400 with one clear message, as HTML for the page and JSON for the API; unexpected errors a 500 whose
traceback goes to the server log only. The model encodes one query at a time (a lock); pages and
thumbnails are served concurrently (``ThreadingHTTPServer``).
"""
from __future__ import annotations

import base64
import binascii
import functools
import io
import json
import logging
import threading
from email.parser import BytesParser
from email.policy import HTTP
from html import escape
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

from PIL import Image

from umarvel.errors import UMarvelError
from umarvel.index.core import Index
from umarvel.index.html import embedded_thumb, page, query_block, render_queries, thumbnail_jpeg
from umarvel.index.tasks import search_tasks

logger = logging.getLogger(__name__)

DEFAULT_PORT = 7860
MAX_UPLOAD_BYTES = 10 << 20
MAX_TEXT_CHARS = 2000
MAX_K = 100
MAX_IMAGE_PIXELS = 40_000_000


class BadRequest(Exception):
    """A client error: answered with 400 (or ``status``) and this message."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.status = status


class SearchApp:
    """What the handler calls: query parsing, encoding, search, thumbnails.

    Args:
        index: the loaded index. model: a ``UMarvel`` checked against it (encodes the queries).
        k: default hits per query. device: search device. instructions: optional M-BEIR instruction TSV.
    """

    def __init__(self, index: Index, model: Any, k: int = 10, device: str | None = None,
                 max_upload_bytes: int = MAX_UPLOAD_BYTES, instructions: str | None = None):
        index.check_model(model)
        self.index, self.model, self.k, self.device = index, model, k, device
        self.max_upload_bytes = max_upload_bytes
        self.tasks = {t.name: t for t in search_tasks(instructions)}
        self._lock = threading.Lock()
        self._thumb = functools.lru_cache(maxsize=4096)(self._make_thumb)
        index.searcher(device)  # build / upload once, before the first request

    # ------------------------------------------------------------------ queries
    def parse_query(self, fields: dict[str, str], image_bytes: bytes | None) -> tuple[dict, Image.Image | None, int]:
        """Form / JSON fields -> (query dict for display, PIL image or None, k). Raises BadRequest."""
        text = (fields.get("q") or fields.get("text") or "").strip()
        if len(text) > MAX_TEXT_CHARS:
            raise BadRequest(f"query text too long ({len(text)} characters; at most {MAX_TEXT_CHARS})")
        instruction = (fields.get("instruction") or "").strip() or None
        task = (fields.get("task") or "").strip()
        if task:
            if task not in self.tasks:
                raise BadRequest(f"unknown task {task!r}; known: {', '.join(self.tasks)}")
            instruction = instruction or self.tasks[task].instruction
        k_raw = (fields.get("k") or "").strip() or str(self.k)
        try:
            k = int(k_raw)
        except ValueError:
            raise BadRequest(f"k must be an integer, got {k_raw!r}") from None
        if not 1 <= k <= MAX_K:
            raise BadRequest(f"k must be between 1 and {MAX_K}, got {k}")
        image = self.open_upload(image_bytes) if image_bytes else None
        if not text and image is None:
            raise BadRequest("empty query: type some text or upload an image")
        query = {"text": text or None, "instruction": instruction, "task": task or None,
                 "image": "<upload>" if image is not None else None}
        return query, image, k

    def open_upload(self, data: bytes) -> Image.Image:
        """Decode an uploaded image (size and pixel limits); BadRequest with the reason otherwise."""
        try:
            with Image.open(io.BytesIO(data)) as im:
                if im.width * im.height > MAX_IMAGE_PIXELS:
                    raise BadRequest(f"uploaded image too large ({im.width}x{im.height} pixels; at most "
                                     f"{MAX_IMAGE_PIXELS:,} pixels)")
                im.load()
                return im.convert("RGB")
        except BadRequest:
            raise
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
            raise BadRequest(f"the uploaded file is not an image that can be read ({type(exc).__name__}: "
                             f"{str(exc)[:200]})") from None

    def search(self, query: dict, image: Image.Image | None, k: int) -> list:
        """Encode the query and search (one query at a time): the hits."""
        item = {"text": query["text"], "instruction": query["instruction"]}
        if image is not None:
            item["image"] = image
        item = {key: v for key, v in item.items() if v is not None}
        with self._lock:
            vec = self.model.encode_queries([item], batch_size=1)
            return self.index.search(vec, k, device=self.device)[0]

    # ------------------------------------------------------------------ thumbnails
    def _make_thumb(self, row: int) -> bytes | None:
        image = self.index.items[row].get("image")
        return thumbnail_jpeg(image) if image else None

    def thumb(self, row: int) -> bytes | None:
        """JPEG thumbnail of item ``row`` (cached); None for a text item or an unreadable image."""
        if not 0 <= row < len(self.index):
            return None
        return self._thumb(row)

    # ------------------------------------------------------------------ pages
    def form_html(self, query: dict | None = None, k: int | None = None) -> str:
        """The search form, pre-filled with ``query``."""
        q = query or {}
        options = ['<option value="">(no task)</option>'] + [
            f'<option value="{escape(n)}"{" selected" if q.get("task") == n else ""}>'
            f'{escape(n)}: {escape(t.query_modality)} \u2192 {escape(t.cand_modality)}</option>'
            for n, t in self.tasks.items()]
        return ('<form class="search" method="post" action="/" enctype="multipart/form-data">'
                f'<input type="text" name="q" placeholder="search text" value="{escape(q.get("text") or "")}" '
                f'maxlength="{MAX_TEXT_CHARS}" autofocus>'
                f'<select name="task" title="instruction of an M-BEIR task">{"".join(options)}</select>'
                f'<input type="text" name="instruction" placeholder="or your own instruction" '
                f'value="{escape(q.get("instruction") if not q.get("task") and q.get("instruction") else "")}" '
                'style="flex:0 1 240px">'
                '<input type="file" name="image" accept="image/*">'
                f'<label>k <input type="number" name="k" min="1" max="{MAX_K}" value="{k or self.k}" '
                'style="width:4em"></label><button type="submit">Search</button></form>')

    def page_html(self, query: dict | None = None, hits: list | None = None, k: int | None = None,
                  error: str | None = None, query_image: Image.Image | None = None) -> str:
        """The whole page: form, then an error or the results (thumbnails as /thumb URLs)."""
        body = self.form_html(query, k)
        if error:
            body += f'<div class="error">{escape(error)}</div>'
        if query is not None and hits is not None:
            shown = {k_: v for k_, v in query.items() if k_ != "image"}
            qimg = embedded_thumb(query_image, 320) if query_image is not None else None
            block = query_block(shown, hits, lambda h: f"/thumb/{h.row}.jpg", query_image_src=qimg)
            body += render_queries([block])
        info = f"{len(self.index):,} items \u00b7 {self.index.backend} \u00b7 {self.index.path}"
        return page("umarvel search", info, body)


# ------------------------------------------------------------------------------------------ HTTP
def _parse_multipart(content_type: str, body: bytes) -> tuple[dict[str, str], bytes | None]:
    """``multipart/form-data`` -> (text fields, bytes of the ``image`` file field or None)."""
    msg = BytesParser(policy=HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\nMIME-Version: 1.0\r\n\r\n" + body)
    if not msg.is_multipart():
        raise BadRequest("malformed multipart/form-data body")
    fields: dict[str, str] = {}
    image = None
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        data = part.get_payload(decode=True) or b""
        if name == "image":
            image = data if data else None
        elif name:
            fields[str(name)] = data.decode("utf-8", errors="replace")
    return fields, image


def make_handler(app: SearchApp) -> type[BaseHTTPRequestHandler]:
    """The request handler class bound to ``app``."""

    class Handler(BaseHTTPRequestHandler):
        server_version = "umarvel-serve"
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt: str, *args: Any) -> None:  # route http.server's lines to logging
            logger.info("%s %s", self.address_string(), fmt % args)

        # -------------------------------------------------------------- responses
        def _send(self, status: int, body: bytes, ctype: str, extra: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Content-Type-Options", "nosniff")
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, status: int, obj: Any) -> None:
            self._send(status, (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8"),
                       "application/json; charset=utf-8")

        def _html(self, status: int, text: str) -> None:
            self._send(status, text.encode("utf-8"), "text/html; charset=utf-8")

        def _guard(self, api: bool, fn: Callable[[], None]) -> None:
            """Run ``fn``; BadRequest / user errors -> 4xx with the message; anything else -> 500."""
            try:
                fn()
            except BadRequest as exc:
                self._error(api, exc.status, str(exc))
            except UMarvelError as exc:
                self._error(api, HTTPStatus.BAD_REQUEST, str(exc))
            except Exception:  # noqa: BLE001 - never a traceback to the client
                logger.exception("error while serving %s", self.path)
                self._error(api, HTTPStatus.INTERNAL_SERVER_ERROR, "internal error (see the server log)")

        def _error(self, api: bool, status: int, message: str) -> None:
            if api:
                self._json(status, {"error": message})
            else:
                self._html(status, app.page_html(error=message))

        # -------------------------------------------------------------- bodies
        def _body(self) -> bytes:
            length = self.headers.get("Content-Length")
            if length is None:
                raise BadRequest("a Content-Length header is required", HTTPStatus.LENGTH_REQUIRED)
            try:
                n = int(length)
            except ValueError:
                raise BadRequest(f"bad Content-Length {length!r}") from None
            if n < 0:
                raise BadRequest(f"bad Content-Length {length!r}")
            if n > app.max_upload_bytes:
                self.close_connection = True  # the body is not read
                raise BadRequest(f"request too large ({n:,} bytes; uploads are limited to "
                                 f"{app.max_upload_bytes:,} bytes)", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
            return self.rfile.read(n)

        def _fields(self) -> tuple[dict[str, str], bytes | None]:
            """Form or JSON fields of a POST and the uploaded image bytes."""
            body = self._body()
            ctype = self.headers.get("Content-Type", "")
            if ctype.startswith("multipart/form-data"):
                return _parse_multipart(ctype, body)
            if ctype.startswith("application/json"):
                try:
                    obj = json.loads(body.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                    raise BadRequest(f"malformed JSON body ({exc})") from None
                if not isinstance(obj, dict):
                    raise BadRequest("the JSON body must be an object")
                img = obj.pop("image_base64", None)
                try:
                    data = base64.b64decode(img, validate=True) if img else None
                except (binascii.Error, TypeError, ValueError):
                    raise BadRequest("image_base64 is not valid base64") from None
                return {k: str(v) for k, v in obj.items() if v is not None}, data
            if ctype.startswith("application/x-www-form-urlencoded"):
                q = parse_qs(body.decode("utf-8", errors="replace"))
                return {k: v[-1] for k, v in q.items()}, None
            raise BadRequest(f"unsupported Content-Type {ctype!r} (use multipart/form-data or application/json)",
                             HTTPStatus.UNSUPPORTED_MEDIA_TYPE)

        # -------------------------------------------------------------- routes
        def do_GET(self) -> None:  # noqa: N802 - http.server API
            url = urlsplit(self.path)
            fields = {k: v[-1] for k, v in parse_qs(url.query).items()}
            if url.path == "/":
                self._guard(False, lambda: self._page(fields, None))
            elif url.path == "/api/search":
                self._guard(True, lambda: self._api(fields, None))
            elif url.path.startswith("/thumb/"):
                self._guard(False, lambda: self._thumb(url.path))
            elif url.path == "/healthz":
                self._json(HTTPStatus.OK, {"status": "ok", "count": len(app.index)})
            else:
                self._error(url.path.startswith("/api/"), HTTPStatus.NOT_FOUND, f"no page {url.path}")

        do_HEAD = do_GET

        def do_POST(self) -> None:  # noqa: N802 - http.server API
            url = urlsplit(self.path)
            if url.path not in ("/", "/api/search"):
                self.close_connection = True
                self._error(url.path.startswith("/api/"), HTTPStatus.NOT_FOUND, f"no page {url.path}")
                return
            api = url.path == "/api/search"
            self._guard(api, lambda: (self._api if api else self._page)(*self._fields()))

        def _page(self, fields: dict[str, str], image_bytes: bytes | None) -> None:
            if not fields and image_bytes is None:
                self._html(HTTPStatus.OK, app.page_html())
                return
            try:
                query, image, k = app.parse_query(fields, image_bytes)
            except BadRequest as exc:
                self._html(exc.status, app.page_html(query=None, error=str(exc)))
                return
            hits = app.search(query, image, k)
            self._html(HTTPStatus.OK, app.page_html(query, hits, k, query_image=image))

        def _api(self, fields: dict[str, str], image_bytes: bytes | None) -> None:
            query, image, k = app.parse_query(fields, image_bytes)
            hits = app.search(query, image, k)
            self._json(HTTPStatus.OK, {"query": {k_: v for k_, v in query.items() if v is not None},
                                       "hits": [h.to_dict() for h in hits]})

        def _thumb(self, path: str) -> None:
            name = path[len("/thumb/"):].removesuffix(".jpg")
            if not name.isdigit():
                raise BadRequest(f"no thumbnail {path}", HTTPStatus.NOT_FOUND)
            data = app.thumb(int(name))
            if data is None:
                raise BadRequest(f"no thumbnail for row {name}", HTTPStatus.NOT_FOUND)
            self._send(HTTPStatus.OK, data, "image/jpeg", {"Cache-Control": "max-age=3600"})

    return Handler


def make_server(app: SearchApp, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> ThreadingHTTPServer:
    """A ``ThreadingHTTPServer`` serving ``app`` (``port=0`` picks a free port: see ``server_address``)."""
    server = ThreadingHTTPServer((host, port), make_handler(app))
    server.daemon_threads = True
    return server
