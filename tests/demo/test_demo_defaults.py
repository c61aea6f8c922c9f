"""The demo's default models: trained once on the synthetic world through the training API, then reused."""

from __future__ import annotations

from pathlib import Path

import pytest

from fiber_train.demo import ensure_default_models, load_backends

# one optimiser step on a 10-image world with tiny batches: only the plumbing is under test
TINY = ["data.batch_size=2", "trainer.log_every=1", "trainer.ckpt_every=0", "model.hidden_dim=32", "model.itc_dim=32"]


def test_bad_task_lists_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown default-model task"):
        ensure_default_models(tmp_path, tasks=("coarse", "nlvr2"))
    with pytest.raises(ValueError, match="include 'coarse'"):
        ensure_default_models(tmp_path, tasks=("vqa",))
    with pytest.raises(ValueError, match="steps must be >= 1"):
        ensure_default_models(tmp_path, steps=0, tasks=("coarse",))
    assert not (tmp_path / "demo").exists()  # nothing generated before the arguments are checked


@pytest.mark.slow
def test_default_coarse_model_is_trained_once_and_serves_scoring(tmp_path: Path) -> None:
    kwargs = {"steps": 1, "tasks": ("coarse",), "world_size": (6, 2, 2), "extra_overrides": TINY, "progress": False}
    messages: list[str] = []
    first = ensure_default_models(tmp_path, log=messages.append, **kwargs)
    (run,) = first.run_dirs
    assert run == tmp_path / "demo" / "runs" / "coarse-1steps-6"
    weights = run / "model" / "model.safetensors"
    assert weights.is_file() and (run / "metrics.csv").is_file()
    assert len(messages) == 1 and "training the default coarse model (1 steps" in messages[0]
    assert [p.name for p in first.samples] == ["test_000009.png", "test_000010.png"]

    stamp = weights.stat().st_mtime_ns
    second = ensure_default_models(tmp_path, log=messages.append, **kwargs)
    assert second == first and len(messages) == 1  # cached: no second training
    assert weights.stat().st_mtime_ns == stamp

    bs = load_backends(first.run_dirs, samples=first.samples)
    info = {t["task"]: t["available"] for t in bs.info()}
    assert info == {"grounding": False, "detection": False, "vqa": False, "caption": False, "scoring": True}


def test_interrupted_training_stops_instead_of_going_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fiber_train.loop
    from fiber_train.demo.defaults import TrainingInterrupted

    calls: list[Path] = []

    def preempted_fit(task: object, run_dir: Path) -> fiber_train.loop.FitResult:
        calls.append(run_dir)
        return fiber_train.loop.FitResult(run_dir=run_dir, step=3, preempted=True)

    monkeypatch.setattr(fiber_train.loop, "fit", preempted_fit)
    with pytest.raises(TrainingInterrupted, match="default coarse model was interrupted"):
        ensure_default_models(tmp_path, steps=5, tasks=("coarse", "vqa"), world_size=(6, 2, 2), progress=False)
    assert [p.name for p in calls] == ["coarse-5steps-6"]  # the VQA run, which needs the coarse one, never started
