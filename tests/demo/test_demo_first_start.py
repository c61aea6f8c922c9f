"""The demo's first start (issue 21, item 11): the page answers while the default models train and shows the
training progress; model paths are shown relative to the working directory (or ``~``)."""

from __future__ import annotations

import http.client
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import fiber_train.demo.defaults as defaults_mod
import fiber_train.demo.server as server_mod
from fiber_train.demo.__main__ import build_parser, run
from fiber_train.demo.defaults import DefaultModels, display_path, sample_images


def _info(port: int) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", "/api/info")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def test_display_path_is_relative(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert display_path(tmp_path / "runs" / "r" / "model") == "runs/r/model"
    assert display_path(Path.home() / ".cache" / "fiber" / "x") == "~/.cache/fiber/x" or str(tmp_path).startswith(
        str(Path.home())
    )


def test_first_start_serves_the_training_progress_then_the_models(
    demo_runs: dict[str, Path], demo_world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    servers: list[Any] = []
    real_create = server_mod.create_server

    def capture(*a: Any, **kw: Any) -> Any:
        servers.append(real_create(*a, **kw))
        return servers[-1]

    seen: list[dict[str, Any]] = []

    def fake_training(cache: Any, *, steps: int, on_progress: Any) -> DefaultModels:
        on_progress({"model": "fine", "index": 1, "models": 2, "step": 0, "steps": steps})
        on_progress({"model": "coarse", "index": 2, "models": 2, "step": 3, "steps": steps})
        seen.append(_info(servers[0].port))  # what the page sees meanwhile
        return DefaultModels((demo_runs["fine"], demo_runs["coarse"]), demo_world, tuple(sample_images(demo_world)))

    monkeypatch.setattr(server_mod, "create_server", capture)
    monkeypatch.setattr(defaults_mod, "ensure_default_models", fake_training)
    monkeypatch.chdir(demo_runs["fine"].parent)
    args = build_parser().parse_args(["--port", "0", "--cache-dir", str(tmp_path), "--default-steps", "7"])
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(run(args)), daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not (servers and servers[0].training is None and seen) and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        [during] = seen
        assert during["training"] == {"state": "training", "model": "coarse", "index": 2, "models": 2, "step": 3,
                                      "steps": 7}  # fmt: skip
        assert not any(t["available"] for t in during["tasks"])
        assert "being trained" in during["tasks"][0]["reason"]
        after = _info(servers[0].port)
        assert after["training"] is None
        assert [t["available"] for t in after["tasks"]] == [True, True, False, False, True]
        paths = [m["path"] for m in after["models"]]
        assert paths == ["fine/model", "coarse/model"]  # relative to the working directory
        assert "loaded: fine (fine/model), coarse (coarse/model)" in after["tasks"][2]["reason"]
    finally:
        servers[0].stop()
        thread.join(timeout=30)
    assert codes == [0]
    out = capsys.readouterr().out
    assert out.index("FIBER demo on http://127.0.0.1:") < out.index("default models ready")
    assert "model fine     fine/model" in out and str(demo_runs["fine"]) not in out


def test_page_has_the_training_progress_bar() -> None:
    page = (server_mod.STATIC_DIR / "index.html").read_text()
    script = (server_mod.STATIC_DIR / "app.js").read_text()
    assert '<progress id="training"' in page and "pollTraining" in script and "window.location.reload" in script
