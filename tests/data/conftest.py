"""Fixtures for the fiber-data tests: one tiny synthetic world and a tokenizer trained on it."""

from __future__ import annotations

from pathlib import Path

import pytest

from fiber_data import ByteBPETokenizer, SyntheticWorldConfig, generate_world

TINY_WORLD = SyntheticWorldConfig(seed=3, image_size=48, num_train=16, num_val=6, num_test=6, tokenizer_vocab_size=400)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic world with 16/6/6 images of 48 px (generated once per session)."""
    return generate_world(tmp_path_factory.mktemp("world"), TINY_WORLD, progress=False)


@pytest.fixture(scope="session")
def tokenizer(tiny_world: Path) -> ByteBPETokenizer:
    """The BPE tokenizer the world trained on its train captions."""
    return ByteBPETokenizer.load(tiny_world / "tokenizer.json")
