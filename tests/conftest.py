"""Shared test configuration: offline hub, deterministic seeds, small thread pools, markers."""

from __future__ import annotations

import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest

try:
    import torch
except ImportError:  # fiber-eval's tests run without torch
    torch = None  # type: ignore[assignment]


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    random.seed(0)
    np.random.seed(0)
    if torch is not None:
        torch.manual_seed(0)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    cuda = torch is not None and torch.cuda.is_available()
    try:
        import xformers.ops  # noqa: F401

        have_xformers = cuda
    except Exception:
        have_xformers = False
    for item in items:
        if "gpu" in item.keywords and not cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device (none here)"))
        if "xformers" in item.keywords and not have_xformers:
            item.add_marker(pytest.mark.skip(reason="needs xformers with CUDA kernels (CPU-only here)"))
