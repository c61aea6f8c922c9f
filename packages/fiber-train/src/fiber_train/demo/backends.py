"""The demo's task backends live in :mod:`fiber_models.backends` (shared with ``fiber-train predict``, no trainer
imported); re-exported here."""

from __future__ import annotations

from fiber_models.backends import (
    TASK_LABELS,
    TASK_ORDER,
    BackendSet,
    CaptionBackend,
    DemoInputError,
    GroundingBackend,
    ScoringBackend,
    TaskBackend,
    TaskUnavailableError,
    UnavailableBackend,
    VQABackend,
    decode_image,
    discover_model_dirs,
    load_backends,
    parse_class_names,
    parse_phrases,
)

__all__ = [
    "TASK_LABELS",
    "TASK_ORDER",
    "BackendSet",
    "CaptionBackend",
    "DemoInputError",
    "GroundingBackend",
    "ScoringBackend",
    "TaskBackend",
    "TaskUnavailableError",
    "UnavailableBackend",
    "VQABackend",
    "decode_image",
    "discover_model_dirs",
    "load_backends",
    "parse_class_names",
    "parse_phrases",
]
