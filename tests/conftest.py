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
    torch = None


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    random.seed(0)
    np.random.seed(0)
    if torch is not None:
        torch.manual_seed(0)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    cuda = torch is not None and torch.cuda.is_available()
    why_no_xformers = "no CUDA device" if not cuda else None
    if cuda and any(item.get_closest_marker("xformers") for item in items):
        # an importable xformers is not enough: its kernels must run here (a wheel built without CUDA has none)
        from fiber_backbones.attention import AttentionCase, probe_xformers

        assert torch is not None  # cuda implies torch
        why_no_xformers = probe_xformers(AttentionCase("cuda", torch.float16, 32, "bias", True))
    for item in items:
        # markers, not item.keywords: keywords also hold directory names (a checkout named "gpu" would match)
        if item.get_closest_marker("gpu") and not cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device (none here)"))
        if item.get_closest_marker("xformers") and why_no_xformers:
            item.add_marker(pytest.mark.skip(reason=f"needs xformers with CUDA kernels ({why_no_xformers})"))
