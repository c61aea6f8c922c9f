"""The demo HTTP server: routes, JSON results equal to the backends', clear errors, and it keeps running."""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from fiber_train.demo import BackendSet, create_server, load_backends
from fiber_train.demo.__main__ import add_arguments, build_parser, main, run
from fiber_train.demo.defaults import sample_images


def request(
    server: Any, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def predict(server: Any, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    status, _, body = request(
        server, "POST", "/api/predict", json.dumps(payload).encode(), {"Content-Type": "application/json"}
    )
    return status, json.loads(body)


def b64_png(width: int, height: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (20, 120, 220)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def backends(demo_backends: BackendSet) -> BackendSet:
    return demo_backends


@pytest.fixture(scope="module")
def server(backends: BackendSet) -> Iterator[Any]:
    srv = create_server(backends, port=0, max_upload_mb=0.05, max_pixels=200 * 200)
    srv.start_background()
    yield srv
    srv.stop()


def alive(server: Any) -> bool:
    status, _, body = request(server, "GET", "/api/info")
    return status == 200 and len(json.loads(body)["tasks"]) == 5


def test_page_and_static_files(server: Any) -> None:
    status, headers, body = request(server, "GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b"<title>FIBER demo</title>" in body and b"/static/app.js" in body
    status, headers, body = request(server, "GET", "/static/app.js")
    assert status == 200 and headers["content-type"].startswith("text/javascript") and b"/api/predict" in body
    assert "default-src 'self'" in headers["content-security-policy"]
    for bad in ("/static/../backends.py", "/static/%2e%2e/server.py", "/static/missing.js", "/etc/passwd"):
        status, headers, body = request(server, "GET", bad)
        assert status == 404 and headers["content-type"] == "application/json", bad
        assert "error" in json.loads(body)


def test_info_and_samples(server: Any, demo_world: Path) -> None:
    status, _, body = request(server, "GET", "/api/info")
    info = json.loads(body)
    assert status == 200
    assert [t["task"] for t in info["tasks"]] == ["grounding", "detection", "vqa", "caption", "scoring"]
    assert all(t["available"] for t in info["tasks"])
    samples = sample_images(demo_world)
    assert [s["name"] for s in info["samples"]] == [p.name for p in samples]
    assert info["limits"] == {"max_upload_bytes": int(0.05 * 1024 * 1024), "max_pixels": 40_000}
    status, headers, body = request(server, "GET", "/api/samples/1")
    assert status == 200 and headers["content-type"] == "image/png" and body == samples[1].read_bytes()
    assert request(server, "GET", "/api/samples/99")[0] == 404


def test_predict_results_equal_the_backends(server: Any, backends: BackendSet, demo_world: Path) -> None:
    image = Image.open(sample_images(demo_world)[0]).convert("RGB")
    cases = {
        "grounding": "the red circle",
        "vqa": "what color is the circle?",
        "caption": "",
        "scoring": "a red circle\na blue square",
    }
    for task, text in cases.items():
        status, out = predict(server, {"task": task, "text": text, "sample": 0})
        assert status == 200, out
        direct = backends.run(task, image, text)
        for key in ("task", "model", "boxes", "answers", "caption", "captions"):
            assert out.get(key) == direct.get(key), (task, key)
        assert out["image"] == {"width": image.width, "height": image.height, "name": sample_images(demo_world)[0].name}
        assert out["text"] == text
    # an uploaded file (base64, with or without the data-URL prefix) is decoded like a sample
    raw = b64_png(50, 30)
    for data in (raw, f"data:image/png;base64,{raw}"):
        status, out = predict(
            server, {"task": "grounding", "text": "a blue square", "image": data, "filename": "x.png"}
        )
        assert status == 200 and out["image"] == {"width": 50, "height": 30, "name": "x.png"}
        assert all(
            0 <= b["box"][0] <= b["box"][2] <= 50 and 0 <= b["box"][1] <= b["box"][3] <= 30 for b in out["boxes"]
        )


@pytest.mark.parametrize(
    ("payload", "status", "message"),
    [
        ({"task": "grounding", "text": "a", "image": base64.b64encode(b"GIF? no, text").decode(), "filename": "n.txt"},
         400, "n.txt: not an image"),
        ({"task": "grounding", "text": "a", "image": "***not base64***"}, 400, "not valid base64"),
        ({"task": "grounding", "text": "a", "image": b64_png(201, 200), "filename": "huge.png"}, 413, "201 x 200"),
        ({"task": "grounding", "text": "   ", "sample": 0}, 400, "caption is empty"),
        ({"task": "detection", "text": ", ,", "sample": 0}, 400, "at least one class name"),
        ({"task": "teleport", "text": "a", "sample": 0}, 400, "unknown task 'teleport'"),
        ({"task": "grounding", "text": "a"}, 400, "no image"),
        ({"text": "a", "sample": 0}, 400, "missing 'task'"),
        ({"task": "grounding", "text": "a", "sample": 42}, 404, "no sample image 42"),
    ],
)  # fmt: skip
def test_bad_input_gives_a_clear_error_and_the_server_keeps_running(
    server: Any, payload: dict[str, Any], status: int, message: str
) -> None:
    got, out = predict(server, payload)
    assert got == status and message in out["error"], out
    assert alive(server)


def test_protocol_errors(server: Any) -> None:
    status, _, body = request(server, "POST", "/api/predict", b"{not json", {"Content-Type": "application/json"})
    assert status == 400 and "not JSON" in json.loads(body)["error"]
    # a body over the upload limit is refused with 413 before it is parsed
    big = b" " * (server.max_request_bytes + 1)
    status, _, body = request(server, "POST", "/api/predict", big, {"Content-Type": "application/json"})
    assert status == 413 and "MB" in json.loads(body)["error"]
    status, _, body = request(server, "GET", "/api/info", headers={"Host": "evil.example:80"})
    assert status == 403 and "127.0.0.1 only" in json.loads(body)["error"]
    assert request(server, "GET", "/api/info", headers={"Host": f"localhost:{server.port}"})[0] == 200
    # refused before its body was read: the connection is closed (the body is not parsed as a next request)
    status, headers, _ = request(server, "POST", "/api/predict", b'{"task": "x"}', {"Host": "evil.example"})
    assert status == 403 and headers["connection"] == "close"
    assert request(server, "PUT", "/api/predict", b"{}")[0] == 405
    assert request(server, "POST", "/api/other", b"{}")[0] == 404
    assert alive(server)


def test_missing_head_and_crashing_backend(demo_runs: dict[str, Path], demo_world: Path) -> None:
    class Exploding:
        task = "caption"
        source = "test"
        available = True
        text_required = False

        def run(self, image: Image.Image, text: str) -> dict[str, Any]:
            raise RuntimeError("boom")

    bs = load_backends([demo_runs["fine"]], samples=sample_images(demo_world))
    bs.backends["caption"] = Exploding()
    srv = create_server(bs, port=0)
    srv.start_background()
    try:
        status, out = predict(srv, {"task": "vqa", "text": "what?", "sample": 0})
        assert status == 409
        assert out["error"].startswith("Visual question answering is not available in this checkpoint:")
        assert "finetune vqa" in out["error"] and str(demo_runs["fine"] / "model") in out["error"]
        status, out = predict(srv, {"task": "caption", "sample": 0})
        assert status == 500 and out["error"] == "internal error: RuntimeError: boom"
        status, out = predict(srv, {"task": "grounding", "text": "a circle", "sample": 0})
        assert status == 200 and out["boxes"]
    finally:
        srv.stop()


def test_cli_arguments_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["--checkpoint", "a", "--checkpoint", "b", "--port", "0"])
    assert args.checkpoint == ["a", "b"] and args.port == 0 and args.default_steps == 100
    assert main(["--checkpoint", str(tmp_path / "nope"), "--cache-dir", str(tmp_path)]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    # the wiring of `fiber-train demo`: the options on a sub-parser, then run(args)
    parser = argparse.ArgumentParser(prog="fiber-train")
    add_arguments(parser.add_subparsers(dest="command").add_parser("demo"))
    args = parser.parse_args(["demo", "--checkpoint", str(tmp_path), "--port", "0"])
    assert run(args) == 2
    assert "not a saved FIBER model" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_serves_a_checkpoint(demo_runs: dict[str, Path], tmp_path: Path) -> None:
    """``python -m fiber_train.demo --checkpoint RUN --port 0`` prints its URL and answers there."""
    import os
    import subprocess
    import sys
    import urllib.request

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "fiber_train.demo", "--checkpoint", str(demo_runs["fine"]), "--port", "0"]
    proc = subprocess.Popen([*cmd, "--cache-dir", str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        lines = []
        assert proc.stdout is not None
        for line in proc.stdout:  # the status lines, then the URL
            lines.append(line)
            if line.startswith("FIBER demo on "):
                break
        assert any("Phrase grounding" in x and "ready" in x for x in lines), lines
        assert any("Captioning" in x and "not available" in x for x in lines), lines
        url = lines[-1].split()[3]
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(url + "api/info", timeout=60) as resp:
            info = json.loads(resp.read())
        assert [t["available"] for t in info["tasks"]] == [True, True, False, False, False]
        assert len(info["samples"]) == 8  # drawn in the cache: the checkpoint has no data next to it
    finally:
        proc.terminate()
        proc.wait(timeout=30)
