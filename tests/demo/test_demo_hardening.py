"""The demo server's request parsing under hostile input (issue 21, item 7): no model is needed, since every
check happens before a task runs."""

from __future__ import annotations

import http.client
import json
import socket
import struct
import zlib
from collections.abc import Iterator
from typing import Any

import pytest

from fiber_train.demo import BackendSet, create_server
from fiber_train.demo.backends import DemoInputError
from fiber_train.demo.server import DemoServer, parse_request_json


@pytest.fixture(scope="module")
def server() -> Iterator[Any]:
    srv = create_server(BackendSet(backends={}), port=0, max_upload_mb=0.2, max_pixels=1000 * 1000)
    srv.start_background()
    yield srv
    srv.stop()


def _post(server: Any, body: bytes) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request("POST", "/api/predict", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def _png_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR claiming ``width x height`` (no pixel data: opening reads the header only)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    end = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    return b"\x89PNG\r\n\x1a\n" + chunk + end


def test_negative_content_length_is_refused_without_reading(server: Any) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -1\r\n\r\n{}")
        chunks = []  # today's server blocks reading the body until the client closes; the fixed one replies
        while chunk := sock.recv(65536):  # headers and body may arrive in separate segments: read until close
            chunks.append(chunk)
        reply = b"".join(chunks).decode()
    assert reply.startswith("HTTP/1.1 400") and "bad Content-Length -1" in reply


def test_deeply_nested_json_and_huge_integers_are_http_400(server: Any) -> None:
    status, reply = _post(server, b"[" * 50_000 + b"]" * 50_000)
    assert status == 400 and "nested too deeply" in reply["error"]
    status, reply = _post(server, b'{"task": "vqa", "sample": ' + b"9" * 5000 + b"}")
    assert status == 400 and "number too large" in reply["error"]
    status, reply = _post(server, b"\xff\xfe not json")
    assert status == 400 and "not JSON" in reply["error"]


def test_parse_request_json_is_the_same_check() -> None:
    assert parse_request_json(b'{"a": [1, 2]}') == {"a": [1, 2]}
    with pytest.raises(DemoInputError, match="nested too deeply"):
        parse_request_json(b"{" + b'"a":{' * 20_000 + b"}" * 20_001)


def test_decompression_bomb_png_is_named_as_such(server: Any) -> None:
    import base64

    bomb = base64.b64encode(_png_header(30_000, 30_000)).decode()  # 900 MP: PIL refuses it at open
    status, reply = _post(server, json.dumps({"task": "grounding", "text": "x", "image": bomb}).encode())
    assert status == 413 and "decompression bomb" in reply["error"] and "not an image" not in reply["error"]
    big = base64.b64encode(_png_header(2000, 2000)).decode()  # over the server's 1 MP limit, under PIL's
    status, reply = _post(server, json.dumps({"task": "grounding", "text": "x", "image": big}).encode())
    assert status == 413 and "2000 x 2000" in reply["error"]


def test_listen_backlog_takes_bursts_of_connections(server: Any) -> None:
    assert DemoServer.request_queue_size >= 128
    socks = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(40)]
    try:
        for s in socks:
            s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert all(s.recv(12).startswith(b"HTTP/1.1 200") for s in socks)
    finally:
        for s in socks:
            s.close()
