"""Fixtures of the demo tests: a tiny synthetic world and four exported models with random weights.

The models are built by the training tasks and exported exactly as a finished run would be (``RUN/model``), but
without training: the tests check that the demo shows what the model computes, not that the model is good.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import pytest

from fiber_data import SyntheticWorldConfig, generate_world
from fiber_train.demo import BackendSet

WORLD = SyntheticWorldConfig(seed=0, image_size=64, num_train=16, num_val=2, num_test=4, tokenizer_vocab_size=400)
DATA = [
    f"data.synthetic_train={WORLD.num_train}",
    f"data.synthetic_val={WORLD.num_val}",
    f"data.synthetic_test={WORLD.num_test}",
]
SMALL = ["model.hidden_dim=32", "model.itc_dim=32", "data.max_text_len=16"]


@pytest.fixture(scope="session")
def demo_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 22-image synthetic world with its tokenizer and VQA files."""
    return generate_world(tmp_path_factory.mktemp("demo_world") / "synthetic", WORLD, progress=False)


def _export(task: Any, out: Path) -> Path:
    with contextlib.redirect_stdout(io.StringIO()):
        model = task.build_model()
        task.export(model, out / "model")
    return out


@pytest.fixture(scope="session")
def demo_runs(tmp_path_factory: pytest.TempPathFactory, demo_world: Path) -> dict[str, Path]:
    """``{"fine", "coarse", "vqa", "caption"}`` -> a directory laid out like a finished run (``RUN/model``)."""
    from fiber_train.config import CoarseConfig, load_config
    from fiber_train.tasks.caption import CaptionConfig, CaptionTask
    from fiber_train.tasks.coarse import CoarsePretrainTask
    from fiber_train.tasks.fine import FineConfig, FinePretrainTask
    from fiber_train.tasks.vqa import VQAConfig, VQATask

    root = tmp_path_factory.mktemp("demo_runs")
    data = [f"data.root={demo_world}", *DATA]
    fine = load_config(FineConfig, "fine/tiny", [*data, "data.test_size=64", "model.head.num_convs=1"])
    coarse = load_config(CoarseConfig, "coarse/tiny", [*data, *SMALL])
    vqa = load_config(VQAConfig, "finetune/vqa_tiny", [*data, *SMALL])
    caption = load_config(CaptionConfig, "finetune/caption_tiny", [*data, *SMALL, "caption.max_decode_len=8"])
    return {
        "fine": _export(FinePretrainTask(fine), root / "fine"),
        "coarse": _export(CoarsePretrainTask(coarse), root / "coarse"),
        "vqa": _export(VQATask(vqa), root / "vqa"),
        "caption": _export(CaptionTask(caption), root / "caption"),
    }


@pytest.fixture(scope="session")
def demo_backends(demo_runs: dict[str, Path], demo_world: Path) -> BackendSet:
    """:func:`fiber_train.demo.load_backends` over the four runs, with the world's test images as samples."""
    from fiber_train.demo import load_backends
    from fiber_train.demo.defaults import sample_images

    return load_backends(list(demo_runs.values()), samples=sample_images(demo_world))
