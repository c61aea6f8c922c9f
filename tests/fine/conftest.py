"""Fixtures of the fine-stage tests: one tiny synthetic world and one tiny finished `fiber-train fine` run."""

from __future__ import annotations

from pathlib import Path

import pytest

from fiber_data import SyntheticWorldConfig, generate_world

# Exactly what FinePretrainTask.prepare_data asks for with the TINY overrides, so the run reuses this world.
WORLD = SyntheticWorldConfig(seed=0, image_size=64, num_train=16, num_val=2, num_test=6)

# `fiber-train fine` overrides that keep a run to a few seconds on 2 CPU cores.
TINY = [
    "data.synthetic_train=16",
    "data.synthetic_val=2",
    "data.synthetic_test=6",
    "data.min_sizes=[64]",
    "data.test_size=64",
    "data.batch_size=4",
    "model.head.num_convs=1",
    "trainer.max_steps=3",
    "trainer.log_every=1",
    "trainer.ckpt_every=0",
    "trainer.progress=false",
    "trainer.deterministic=true",
    "eval.batch_size=6",
]


@pytest.fixture(scope="session")
def fine_tiny() -> list[str]:
    """The ``TINY`` overrides (a copy)."""
    return list(TINY)


@pytest.fixture(scope="session")
def fine_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic world matching the ``TINY`` overrides (generated once per session)."""
    root = tmp_path_factory.mktemp("fine_world") / "synthetic"
    return generate_world(root, WORLD, progress=False)


@pytest.fixture(scope="session")
def fine_run(tmp_path_factory: pytest.TempPathFactory, fine_world: Path) -> tuple[Path, str]:
    """A finished 3-step tiny run: ``(run directory, captured stdout + stderr)``."""
    import contextlib
    import io

    from fiber_train.cli import main

    out = tmp_path_factory.mktemp("fine_runs")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):  # messages are logged on stderr
        code = main(["fine", "--out", str(out), "--run-name", "tiny", "--set", f"data.root={fine_world}", *TINY])
    assert code == 0, buf.getvalue()
    return out / "tiny", buf.getvalue()
