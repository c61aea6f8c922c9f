"""Crash safety: SIGKILL inside every phase of a checkpoint write, SIGTERM pre-emption, and kill-and-resume
trials of ``fiber-train coarse`` that must end bit-identical to an uninterrupted run.

Processes are forked from a fork server that has imported torch and fiber-train once
(``scripts/crash_resume.py``), and are killed with real signals.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from fiber_train.checkpoint import (
    CRASH_ENV,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from fiber_train.loop import fit
from script_loader import load_script

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def harness_mod() -> Any:
    return load_script(ROOT / "scripts" / "crash_resume.py", "crash_resume")


# ------------------------------------------------------------------------ SIGKILL inside save_checkpoint

# phase -> (newest complete step after the crash, step directories visible under their final name)
_EXPECTED = {
    "weights": (2, [1, 2]),
    "state": (2, [1, 2]),
    "meta": (2, [1, 2]),
    "replace": (2, [1, 2]),  # step 3 was moved aside to be replaced: resume uses step 2
    "rename": (3, [1, 2, 3]),
    "prune": (3, [2, 3]),  # step 1 was moved aside (not half-deleted) before the crash
}


@pytest.mark.parametrize("phase", sorted(_EXPECTED))
def test_sigkill_in_each_phase_of_a_checkpoint_write(harness_mod: Any, tmp_path: Path, phase: str) -> None:
    harness = harness_mod.CrashHarness(tmp_path)
    root = tmp_path / "ckpts"
    proc = harness.ctx.Process(
        target=harness_mod.crash_in_save, args=(str(root), phase, 3, 2 if phase == "prune" else 0)
    )
    proc.start()
    proc.join(120)
    assert proc.exitcode == -signal.SIGKILL, f"hook for {phase!r} did not fire (exit code {proc.exitcode})"
    newest, visible = _EXPECTED[phase]
    assert sorted(int(p.name[5:]) for p in root.glob("step_????????")) == visible
    latest = latest_checkpoint(root)
    assert latest is not None and latest.name == f"step_{newest:08d}"
    _, problems = harness_mod.checkpoint_invariants(root)
    assert problems == []
    model = torch.nn.Linear(4, 4)
    state, meta = load_checkpoint(latest, model)
    assert state["step"] == newest == meta["step"]
    # the weights are those of save `newest`: the child added 1.0 to the initial weights before each save
    torch.manual_seed(0)
    expected = torch.nn.Linear(4, 4).weight.detach() + newest
    assert torch.equal(model.weight.detach(), expected)
    # the next save removes the leftovers of the crash
    save_checkpoint(root, 9, model, {"step": 9}, {})
    assert not [p.name for p in root.iterdir() if ".tmp-" in p.name]


def test_crash_hook_is_inert_unless_it_names_the_phase_and_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CRASH_ENV, "weights@7")  # another step: must not fire in this process
    model = torch.nn.Linear(2, 2)
    for step in (1, 2):
        save_checkpoint(tmp_path, step, model, {"step": step}, {})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001", "step_00000002"]


# ------------------------------------------------------------------------------------------ SIGTERM


def test_sigterm_in_process_saves_and_resume_matches_the_clean_run(tmp_path: Path) -> None:
    """The loop's SIGTERM handler: a signal mid-run saves a checkpoint, returns ``preempted``; resume is exact."""
    from test_rel_training import _Config, _Task, _trainer, _weights  # pytest puts this folder on sys.path

    fit(_Task(_Config(_trainer(ckpt_every=0))), tmp_path / "clean")

    class _TermTask(_Task):
        def build_model(self) -> torch.nn.Module:
            model = super().build_model()
            forward = model.forward

            def forward_then_signal(batch: Any) -> Any:
                if model.calls == 1:  # during optimiser step 2
                    os.kill(os.getpid(), signal.SIGTERM)
                return forward(batch)

            model.forward = forward_then_signal
            return model

    handler = signal.getsignal(signal.SIGTERM)
    result = fit(_TermTask(_Config(_trainer(ckpt_every=0))), tmp_path / "run")
    assert signal.getsignal(signal.SIGTERM) == handler  # the previous handler is restored
    assert result.preempted and result.step == 2
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step_00000002"]
    assert not (tmp_path / "run" / "model").exists()  # no export for a pre-empted run
    resumed = fit(_Task(_Config(_trainer(ckpt_every=0))), tmp_path / "run")
    assert not resumed.preempted and resumed.step == 4
    a = _weights(tmp_path / "clean" / "checkpoints" / "step_00000004")
    b = _weights(tmp_path / "run" / "checkpoints" / "step_00000004")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------- fiber-train coarse, killed for real


@pytest.fixture(scope="module")
def coarse_reference(harness_mod: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Path, float]]:
    """The harness, its uninterrupted reference run and that run's wall time."""
    work = tmp_path_factory.mktemp("crash")
    harness = harness_mod.CrashHarness(work)
    harness.run(harness.argv(work / "warmup"))  # generates the synthetic world
    ref = harness.run(harness.argv(work / "reference"))
    assert ref.exitcode == 0, ref.log[-3000:]
    yield harness, work / "reference", ref.seconds


@pytest.mark.slow
@pytest.mark.integration
def test_sigterm_preemption_of_fiber_train_coarse(harness_mod: Any, coarse_reference: tuple[Any, Path, float]) -> None:
    harness, reference, _ = coarse_reference
    run = harness.workdir / "preempted"
    first = harness.run(
        harness.argv(run), sigterm_when=lambda: (run / "checkpoints" / "step_00000001" / "meta.json").is_file()
    )
    assert first.exitcode == 0, first.log[-3000:]
    assert "SIGTERM received: saved" in first.log and "pre-empted (checkpoint saved)" in first.log
    assert not (run / "model").exists()
    saved = latest_checkpoint(run / "checkpoints")
    assert saved is not None and saved.name != "step_00000003"
    second = harness.run(["coarse", "--resume", str(run), "--set", "trainer.progress=false"])
    assert second.exitcode == 0, second.log[-3000:]
    assert f"resumed from {saved}" in second.log
    assert harness_mod.compare_runs(reference, run, 3) == []


@pytest.mark.slow
@pytest.mark.integration
def test_ten_kill_and_resume_trials_end_bit_identical(
    harness_mod: Any, coarse_reference: tuple[Any, Path, float]
) -> None:
    import random

    harness, reference, seconds = coarse_reference
    rng = random.Random(2026)
    results = [harness_mod.run_trial(harness, reference, k, rng, seconds, 3) for k in range(10)]
    failures = [f"trial {r.trial} ({r.mode}): {r.problems}" for r in results if not r.ok]
    assert not failures, failures
    assert sum(r.kills for r in results) >= 10  # every trial was interrupted at least once
    assert {r.mode.split(" (")[0] for r in results} == {"random SIGKILL", "crash in save"}
