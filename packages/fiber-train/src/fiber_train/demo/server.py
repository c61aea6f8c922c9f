"""The demo's HTTP server: standard-library ``ThreadingHTTPServer`` on loopback, plain HTML/JS page (issue 13).

Routes:

- ``GET /``: the page (``static/index.html``); ``GET /static/<file>``: its script and style sheet.
- ``GET /api/info``: tasks (available or not, with the reason), loaded models (paths relative to the working
  directory or ``~``), sample images, upload limits, and ``training``: the progress of the default models'
  first training (``None`` once they are loaded; the page polls it and reloads when done).
- ``GET /api/samples/<i>``: example image ``i`` (PNG/JPEG bytes).
- ``POST /api/predict``: JSON ``{"task", "text", "image": base64 | "sample": i, "filename"}`` -> the task
  result (see :class:`fiber_train.demo.backends.BackendSet.run`).

Every handler answers JSON ``{"error": "..."}`` with a 4xx/5xx status on failure and the server keeps running.
The server binds 127.0.0.1 only and refuses requests whose ``Host`` header is not a loopback name (a web page
from elsewhere cannot reach it through DNS rebinding).
"""

from __future__ import annotations

import base64
import binascii
import json
import sys
import threading
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from PIL import Image

from fiber_models.backends import BackendSet, DemoInputError, TaskUnavailableError, decode_image, millions
from fiber_train.demo.defaults import display_path

__all__ = ["STATIC_DIR", "DemoServer", "create_server", "parse_request_json"]

STATIC_DIR = Path(__file__).parent / "static"
"""The page's files (package data)."""

_CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css"}
_IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}
_LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
_DRAIN_LIMIT = 256 * 1024 * 1024  # read and discard at most this much of an oversized body before closing


class DemoServer(ThreadingHTTPServer):
    """A threading HTTP server bound to ``127.0.0.1`` serving the demo page and its JSON API.

    Args:
        backends: the task backends.
        port: TCP port (0 picks a free one; see :attr:`url`).
        max_upload_bytes: largest accepted image file.
        max_pixels: largest accepted ``width * height`` of an image.
        verbose: log every request to stderr.
    """

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # listen backlog: the default 5 resets connections at 20+ concurrent requests

    def __init__(
        self,
        backends: BackendSet,
        *,
        port: int = 0,
        max_upload_bytes: int = 10 * 1024 * 1024,
        max_pixels: int = 16 * 1024 * 1024,
        verbose: bool = False,
    ) -> None:
        self.backends = backends
        #: progress of the default models' first training, shown on the page (``None``: not training)
        self.training: dict[str, Any] | None = None
        self.max_upload_bytes = int(max_upload_bytes)
        self.max_pixels = int(max_pixels)
        self.verbose = verbose
        self.static_files = {p.name: p for p in STATIC_DIR.iterdir() if p.suffix in _CONTENT_TYPES}
        if "index.html" not in self.static_files:
            raise FileNotFoundError(
                f"{STATIC_DIR / 'index.html'} is missing: the fiber-train package data is incomplete"
            )
        super().__init__(("127.0.0.1", port), _Handler)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port."""
        return int(self.server_address[1])

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>/``."""
        return f"http://127.0.0.1:{self.port}/"

    @property
    def max_request_bytes(self) -> int:
        """Largest accepted request body: a base64-encoded image of the maximum size plus the JSON around it."""
        return self.max_upload_bytes * 4 // 3 + 64 * 1024

    def start_background(self) -> threading.Thread:
        """Serve in a daemon thread (tests, notebooks); stop with :meth:`stop`."""
        self._thread = threading.Thread(target=self.serve_forever, name="fiber-demo", daemon=True)
        self._thread.start()
        return self._thread

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)


def create_server(
    backends: BackendSet,
    *,
    port: int = 0,
    max_upload_mb: float = 10.0,
    max_pixels: int = 16 * 1024 * 1024,
    verbose: bool = False,
) -> DemoServer:
    """A :class:`DemoServer` on ``127.0.0.1:port`` (not yet serving: call ``serve_forever`` or
    ``start_background``)."""
    return DemoServer(
        backends, port=port, max_upload_bytes=int(max_upload_mb * 1024 * 1024), max_pixels=max_pixels, verbose=verbose
    )


class _HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Handler(BaseHTTPRequestHandler):
    server: DemoServer  # pyright: ignore[reportIncompatibleVariableOverride]  # only DemoServer runs this handler
    server_version = "fiber-demo/1"
    _body_read = True
    protocol_version = "HTTP/1.1"

    # ------------------------------------------------------------------------------------------ plumbing

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.verbose:
            super().log_message(format, *args)

    def _send(self, status: int, body: bytes, content_type: str, *, close: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", "default-src 'self'; img-src 'self' data: blob:")
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload: Any, *, close: bool = False) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json", close=close)

    def _error(self, status: int, message: str, *, close: bool = False) -> None:
        self._json(status, {"error": message}, close=close)

    def _check_host(self) -> None:
        host = (self.headers.get("Host") or "").strip().lower()
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if name not in _LOOPBACK_NAMES:
            raise _HTTPError(HTTPStatus.FORBIDDEN, f"Host {host!r} refused: the demo answers on 127.0.0.1 only")

    def _dispatch(self, method: str) -> None:
        self._body_read = method != "POST"
        status, message = HTTPStatus.OK, ""
        try:
            self._check_host()
            if method == "POST":
                self._post()
            else:
                self._get()
            return
        except _HTTPError as exc:
            status, message = exc.status, str(exc)
        except DemoInputError as exc:
            status, message = exc.status, str(exc)
        except TaskUnavailableError as exc:
            status, message = HTTPStatus.CONFLICT, str(exc)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            return
        except Exception as exc:  # the server must keep running whatever a task does
            traceback.print_exc(file=sys.stderr)
            status, message = HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {type(exc).__name__}: {exc}"
        try:
            # a request body left unread would be parsed as the next request: close such connections
            self._error(status, message, close=not self._body_read)
        except OSError:
            self.close_connection = True

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._error(HTTPStatus.METHOD_NOT_ALLOWED, "use GET or POST")

    do_DELETE = do_PUT
    do_PATCH = do_PUT

    # ------------------------------------------------------------------------------------------- routes

    def _get(self) -> None:
        path = urlsplit(self.path).path
        if path in ("/", "/index.html"):
            self._static("index.html")
        elif path.startswith("/static/"):
            self._static(path[len("/static/") :])
        elif path == "/api/info":
            self._json(HTTPStatus.OK, self._info())
        elif path.startswith("/api/samples/"):
            self._sample(path[len("/api/samples/") :])
        elif path == "/favicon.ico":
            self._send(HTTPStatus.NO_CONTENT, b"", "image/x-icon")
        else:
            raise _HTTPError(HTTPStatus.NOT_FOUND, f"no such page: {path}")

    def _static(self, name: str) -> None:
        # only the files listed at start-up are served: no path from the request reaches the file system
        file = self.server.static_files.get(name)
        if file is None:
            raise _HTTPError(HTTPStatus.NOT_FOUND, f"no such file: {name}")
        self._send(HTTPStatus.OK, file.read_bytes(), _CONTENT_TYPES[file.suffix])

    def _info(self) -> dict[str, Any]:
        b = self.server.backends
        tasks = [
            {**t, "source": display_path(t["source"]) if t["source"] else "", "reason": shorten_paths(t["reason"], b)}
            for t in b.info()
        ]
        return {
            "tasks": tasks,
            "models": [{**m, "path": display_path(m["path"])} for m in b.models],
            "samples": [{"index": i, "name": p.name} for i, p in enumerate(b.samples)],
            "limits": {"max_upload_bytes": self.server.max_upload_bytes, "max_pixels": self.server.max_pixels},
            "training": self.server.training,
        }

    def _sample_path(self, key: Any) -> Path:
        samples = self.server.backends.samples
        try:
            index = int(key)
        except (TypeError, ValueError):
            raise DemoInputError(f"sample must be an index, got {key!r}") from None
        if not 0 <= index < len(samples):
            raise _HTTPError(HTTPStatus.NOT_FOUND, f"no sample image {index} (there are {len(samples)})")
        return samples[index]

    def _sample(self, key: str) -> None:
        path = self._sample_path(key)
        self._send(HTTPStatus.OK, path.read_bytes(), _IMAGE_TYPES.get(path.suffix.lower(), "application/octet-stream"))

    def _read_body(self) -> bytes:
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            raise _HTTPError(HTTPStatus.LENGTH_REQUIRED, "the request has no Content-Length")
        try:
            length = int(length_header)
        except ValueError:
            raise _HTTPError(HTTPStatus.BAD_REQUEST, f"bad Content-Length {length_header[:40]!r}") from None
        if length < 0:  # rfile.read(-1) would read until the client closes, past every limit
            raise _HTTPError(HTTPStatus.BAD_REQUEST, f"bad Content-Length {length}: must be >= 0")
        limit = self.server.max_request_bytes
        if length > limit:
            # read the body away (up to a bound) so that the client sees the answer instead of a reset
            remaining = min(length, _DRAIN_LIMIT)
            while remaining > 0:
                chunk = self.rfile.read(min(remaining, 1 << 20))
                if not chunk:
                    break
                remaining -= len(chunk)
            raise _HTTPError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"the upload is {millions(length)} MB; images up to {millions(self.server.max_upload_bytes)} MB "
                "are accepted",
            )
        body = self.rfile.read(length)
        self._body_read = True
        return body

    def _post(self) -> None:
        path = urlsplit(self.path).path
        if path != "/api/predict":
            raise _HTTPError(HTTPStatus.NOT_FOUND, f"no such endpoint: POST {path}")
        body = self._read_body()
        req = parse_request_json(body)
        if not isinstance(req, dict):
            raise DemoInputError("the request body must be a JSON object")
        task = req.get("task")
        text = req.get("text", "")
        if not isinstance(task, str):
            raise DemoInputError("missing 'task'")
        if not isinstance(text, str):
            raise DemoInputError("'text' must be a string")
        image, name = self._request_image(req)
        result = self.server.backends.run(task, image, text)
        result["image"]["name"] = name
        result["text"] = text
        self._json(HTTPStatus.OK, result)

    def _request_image(self, req: dict[str, Any]) -> tuple[Image.Image, str]:
        srv = self.server
        if req.get("sample") is not None:
            path = self._sample_path(req["sample"])
            return _decode(path.read_bytes(), srv, path.name), path.name
        data = req.get("image")
        name = str(req.get("filename") or "upload")[:200]
        if not isinstance(data, str) or not data:
            raise DemoInputError("no image: upload one or pick a sample")
        if data.startswith("data:"):
            data = data.split(",", 1)[-1]
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise DemoInputError(f"{name}: the image is not valid base64 ({exc})") from exc
        return _decode(raw, srv, name), name


def shorten_paths(text: str, backends: BackendSet) -> str:
    """``text`` with the loaded model directories written as :func:`display_path` shows them."""
    for m in backends.models:
        text = text.replace(str(m["path"]), display_path(m["path"]))
    return text


def parse_request_json(body: bytes) -> Any:
    """The JSON value of a request body.

    Raises:
        DemoInputError: (HTTP 400) not UTF-8 JSON, nested too deeply, or holding an integer beyond Python's digit
            limit; the message says which.
    """
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DemoInputError(f"the request body is not JSON ({exc})") from exc
    except RecursionError:
        raise DemoInputError("the request body is JSON nested too deeply; send a flat object") from None
    except ValueError as exc:  # "Exceeds the limit (4300 digits) for integer string conversion"
        raise DemoInputError(f"the request body holds a number too large to read ({exc})") from None


def _decode(data: bytes, srv: DemoServer, name: str) -> Image.Image:
    """:func:`decode_image` with the server's limits; a decompression bomb is named as one (HTTP 413)."""
    try:
        return decode_image(data, max_bytes=srv.max_upload_bytes, max_pixels=srv.max_pixels, name=name)
    except DemoInputError as exc:
        cause = exc.__cause__
        bomb = isinstance(cause, Image.DecompressionBombError) or (
            isinstance(cause, ValueError) and "decompressed data too large" in str(cause).lower()
        )
        if not bomb:
            raise
        raise DemoInputError(
            f"{name}: refused as a decompression bomb ({cause}); images up to "
            f"{millions(srv.max_pixels)} MP are accepted",
            status=HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
        ) from cause
