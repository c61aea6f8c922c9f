"""Local web demo of a FIBER model (issue 13): ``fiber-train demo`` / ``python -m fiber_train.demo``.

A standard-library HTTP server on 127.0.0.1 (:mod:`fiber_train.demo.server`) serves a plain HTML/JS page
(``static/``) and a JSON API over per-task backends (:mod:`fiber_train.demo.backends`): phrase grounding and
detection with class names, VQA, captioning and image-text scoring. Without a checkpoint, tiny models trained on
the synthetic world are used (:mod:`fiber_train.demo.defaults`).

Python use::

    from fiber_train.demo import create_server, load_backends

    server = create_server(load_backends(["runs/fine-20261125-010000"]), port=0)
    server.start_background()
    print(server.url)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fiber_train._lazy import lazy_getattr

if TYPE_CHECKING:
    from fiber_train.demo.backends import (
        TASK_ORDER,
        BackendSet,
        DemoInputError,
        TaskBackend,
        TaskUnavailableError,
        UnavailableBackend,
        decode_image,
        load_backends,
    )
    from fiber_train.demo.defaults import DefaultModels, ensure_default_models
    from fiber_train.demo.server import DemoServer, create_server

__all__ = [
    "TASK_ORDER",
    "BackendSet",
    "DefaultModels",
    "DemoInputError",
    "DemoServer",
    "TaskBackend",
    "TaskUnavailableError",
    "UnavailableBackend",
    "create_server",
    "decode_image",
    "ensure_default_models",
    "load_backends",
]

# imported on first use, so that `fiber-train --help` (which reads the demo's arguments) does not import torch
_LAZY = {
    **dict.fromkeys(
        (
            "TASK_ORDER",
            "BackendSet",
            "DemoInputError",
            "TaskBackend",
            "TaskUnavailableError",
            "UnavailableBackend",
            "decode_image",
            "load_backends",
        ),
        "fiber_train.demo.backends",
    ),
    "DefaultModels": "fiber_train.demo.defaults",
    "ensure_default_models": "fiber_train.demo.defaults",
    "DemoServer": "fiber_train.demo.server",
    "create_server": "fiber_train.demo.server",
}


__getattr__ = lazy_getattr(__name__, _LAZY)
