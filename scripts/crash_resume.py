#!/usr/bin/env python
"""Kill-and-resume crash test of ``fiber-train coarse`` (issue 12, reliability; docs/reference/training.md, checkpoints).

A reference run trains a tiny model on the synthetic world without interruption. Each trial then starts the
same run, kills it with ``SIGKILL`` (at a seeded random moment, or inside a checkpoint write through the
``FIBER_TEST_CRASH_IN_SAVE`` hook of :mod:`fiber_train.checkpoint`), checks what is on disk, and re-runs it with
``--resume`` until it finishes. A trial passes when

- after every kill, each checkpoint that :func:`fiber_train.checkpoint.list_checkpoints` reports is complete
  and loads (safetensors weights, ``state.pt`` with ``weights_only=True``, ``meta.json``);
- every resumed run resumes from the newest complete checkpoint present when it started (its log says so);
- the finished run's final checkpoint and exported weights equal the reference run's bit for bit.

Runs are separate processes forked from a fork server that has already imported torch and fiber-train, so
that a trial costs training time rather than interpreter start-up; each runs ``fiber_train.cli.main`` exactly
as the ``fiber-train`` command does, and is killed with a real ``SIGKILL``.

Usage::

    python scripts/crash_resume.py --trials 10 --seed 0            # prints a summary; exit 1 on a failure
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["SAVE_PHASES", "TINY", "CrashHarness", "TrialResult", "main", "run_trials"]

#: overrides that make a `fiber-train coarse` run take a few seconds on one CPU core
TINY = [
    "data.synthetic_train=16",
    "data.synthetic_val=4",
    "data.synthetic_test=8",
    "data.batch_size=4",
    "data.max_text_len=16",
    "model.hidden_dim=32",
    "model.itc_dim=32",
    "trainer.max_steps=3",
    "trainer.ckpt_every=1",
    "trainer.keep_checkpoints=2",
    "trainer.log_every=1",
    "trainer.progress=false",
    "trainer.deterministic=true",
    "eval.retrieval=false",
    'trainer.tensorboard="false"',
]
#: phases of ``save_checkpoint`` a save-crash trial kills in (see fiber_train.checkpoint)
SAVE_PHASES = ("weights", "state", "meta", "rename", "prune")
_PRELOAD = [
    "torch",
    "safetensors.torch",
    "lightning_fabric",
    "yaml",
    "fiber_train.cli",
    "fiber_train.loop",
    "fiber_train.tasks",
    "fiber_train.tasks.coarse",
]
_RESUMED = re.compile(r"resumed from (\S+) at step (\d+)")


def _child(argv: list[str], env: dict[str, str], log_path: str) -> None:
    """Body of a forked run: environment, output to ``log_path``, ``fiber_train.cli.main(argv)``, exit code."""
    os.environ.update(env)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 - lives as long as the process
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        pass
    from fiber_train.cli import main as cli_main

    rc = cli_main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def crash_in_save(ckpt_root: str, phase: str, step: int, keep: int = 0) -> None:
    """Child body: save checkpoints ``1..step`` of a tiny model with the crash hook armed at ``phase@step``.

    For ``phase="replace"`` step ``step`` is saved twice (the hook fires in the second save). The process
    is expected to die of ``SIGKILL``; it exits with code 3 if the hook never fired.
    """
    import torch
    from torch import nn

    from fiber_train.checkpoint import CRASH_ENV, save_checkpoint

    os.environ[CRASH_ENV] = f"{phase}@{step}"
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    steps = [*range(1, step + 1), *([step] if phase == "replace" else [])]
    for s in steps:
        with torch.no_grad():
            model.weight.add_(1.0)
        save_checkpoint(Path(ckpt_root), s, model, {"step": s}, {"phase": phase}, keep=keep)
    os._exit(3)


@dataclass
class RunOutcome:
    """One process: exit code (negative: killed by that signal), whether the harness killed it, seconds."""

    exitcode: int
    killed: bool
    seconds: float
    log: str


class CrashHarness:
    """Starts ``fiber-train`` runs as forked processes and kills them on request.

    Args:
        workdir: folder of the world, the run directories and the logs.
        tiny: config overrides of every run (default :data:`TINY`).
    """

    def __init__(self, workdir: Path, tiny: Sequence[str] = TINY) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.world = self.workdir / "world"
        self.tiny = list(tiny)
        here = str(Path(__file__).resolve().parent)
        if here not in sys.path:
            sys.path.insert(0, here)  # the fork server imports this module by name
        self.ctx = mp.get_context("forkserver")
        self.ctx.set_forkserver_preload([*_PRELOAD, Path(__file__).stem])

    def argv(self, run_dir: Path) -> list[str]:
        """The command line of a fresh run writing into ``run_dir``."""
        return [
            "coarse",
            "--out",
            str(run_dir.parent),
            "--run-name",
            run_dir.name,
            "--set",
            f"data.root={self.world}",
            *self.tiny,
        ]

    def run(
        self,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        kill_after: float | None = None,
        sigterm_when: Callable[[], bool] | None = None,
        timeout: float = 600,
    ) -> RunOutcome:
        """Run ``fiber-train argv``.

        Args:
            argv: the command line after ``fiber-train``.
            env: extra environment variables of the run.
            kill_after: ``SIGKILL`` the run after this many seconds if it is still running.
            sigterm_when: polled every 20 ms; the first time it returns true the run gets ``SIGTERM``.
            timeout: seconds after which a run that was not to be killed counts as hung.
        """
        fd, log_name = tempfile.mkstemp(dir=self.workdir, prefix="run-", suffix=".log")
        os.close(fd)
        proc = self.ctx.Process(target=_child, args=(argv, env or {}, log_name))
        t0 = time.perf_counter()
        proc.start()
        if sigterm_when is not None:
            while proc.is_alive() and not sigterm_when():
                time.sleep(0.02)
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signal.SIGTERM)
        proc.join(timeout if kill_after is None else kill_after)
        killed = False
        if proc.is_alive():
            if kill_after is None:
                proc.kill()
                proc.join()
                raise TimeoutError(f"fiber-train {' '.join(argv)} ran past {timeout} s (log: {log_name})")
            proc.kill()  # SIGKILL
            killed = True
            proc.join()
        text = Path(log_name).read_text(errors="replace")
        return RunOutcome(int(proc.exitcode or 0), killed, time.perf_counter() - t0, text)


def checkpoint_invariants(ckpt_root: Path) -> tuple[int | None, list[str]]:
    """``(newest complete step or None, problems)`` of a run's ``checkpoints/`` folder after a crash."""
    import torch
    from safetensors.torch import load_file

    from fiber_train.checkpoint import CHECKPOINT_FILES, list_checkpoints

    problems: list[str] = []
    complete = list_checkpoints(ckpt_root)
    for ckpt in complete:
        try:
            load_file(str(ckpt / "model.safetensors"))
            state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
            meta = json.loads((ckpt / "meta.json").read_text())
            if int(meta["step"]) != int(state["step"]) or ckpt.name != f"step_{int(state['step']):08d}":
                problems.append(f"{ckpt}: step mismatch between name, meta.json and state.pt")
        except Exception as exc:  # any failure to load a 'complete' checkpoint is the bug under test
            problems.append(f"{ckpt}: listed as complete but does not load ({type(exc).__name__}: {exc})")
    if ckpt_root.is_dir():
        for p in ckpt_root.iterdir():
            if p.name.startswith("step_") and ".tmp-" not in p.name and p not in complete:
                missing = [f for f in CHECKPOINT_FILES if not (p / f).is_file()]
                problems.append(f"{p}: checkpoint directory without {missing} is visible under its final name")
    newest = int(complete[-1].name.split("_")[1]) if complete else None
    return newest, problems


def compare_runs(a: Path, b: Path, step: int) -> list[str]:
    """Tensors that differ between two run directories (final checkpoint and exported weights)."""
    import torch
    from safetensors.torch import load_file

    diffs = []
    files = [f"checkpoints/step_{step:08d}/model.safetensors"]
    files += [str(p.relative_to(a)) for p in sorted((a / "model").rglob("*.safetensors"))]
    for rel in files:
        if not (b / rel).is_file():
            diffs.append(f"{rel}: missing in {b}")
            continue
        x, y = load_file(str(a / rel)), load_file(str(b / rel))
        if x.keys() != y.keys():
            diffs.append(f"{rel}: different keys")
            continue
        bad = [k for k in x if x[k].dtype != y[k].dtype or not torch.equal(x[k], y[k])]
        if bad:
            diffs.append(f"{rel}: {len(bad)} tensors differ, e.g. {bad[0]}")
    return diffs


@dataclass
class TrialResult:
    """What happened in one trial."""

    trial: int
    mode: str
    kills: int = 0
    runs: int = 0
    resumed_steps: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    duplicate_metric_rows: int = 0  # rows of metrics.csv logged twice (after a step re-run on resume)

    @property
    def ok(self) -> bool:
        return not self.problems


def run_trial(
    harness: CrashHarness, reference: Path, trial: int, rng: random.Random, ref_seconds: float, max_steps: int
) -> TrialResult:
    """One kill-and-resume trial (see the module docstring)."""
    from fiber_train.checkpoint import CRASH_ENV

    run_dir = harness.workdir / f"trial-{trial:02d}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    save_crash = trial % 2 == 1
    phase = SAVE_PHASES[(trial // 2) % len(SAVE_PHASES)]
    # prune starts once keep_checkpoints (2) are on disk; the final save is step max_steps
    crash_step = rng.randint(3 if phase == "prune" else 1, max_steps)
    result = TrialResult(trial, f"crash in save ({phase}@{crash_step})" if save_crash else "random SIGKILL")
    kill_budget = 2 if not save_crash else 1
    scale = 1.0  # shrinks when a run finished before its random kill time (machine faster than the reference)
    for _ in range(8):
        fresh = not (run_dir / "config.yaml").is_file()
        argv = (
            harness.argv(run_dir) if fresh else ["coarse", "--resume", str(run_dir), "--set", "trainer.progress=false"]
        )
        env: dict[str, str] = {}
        kill_after = None
        if result.kills < kill_budget:
            if save_crash:
                env[CRASH_ENV] = f"{phase}@{crash_step}"
            else:
                kill_after = rng.uniform(0.05, 0.95) * ref_seconds * scale
        before, _ = checkpoint_invariants(run_dir / "checkpoints")
        out = harness.run(argv, env=env, kill_after=kill_after)
        result.runs += 1
        m = _RESUMED.search(out.log)
        if m is not None:
            result.resumed_steps.append(int(m.group(2)))
            if before is None or int(m.group(2)) != before:
                result.problems.append(f"run {result.runs} resumed at step {m.group(2)}, newest complete was {before}")
        elif before is not None and not (out.killed or out.exitcode == -9):
            # (a run killed during start-up, before it reached the resume point, legitimately printed nothing)
            result.problems.append(f"run {result.runs} did not resume although step {before} was on disk")
        if out.killed or out.exitcode == -9:
            result.kills += 1
            _, problems = checkpoint_invariants(run_dir / "checkpoints")
            result.problems.extend(problems)
            continue
        if out.exitcode != 0:
            result.problems.append(f"run {result.runs} exited with {out.exitcode}:\n{out.log[-2000:]}")
            return result
        if result.kills == 0 and not save_crash and scale > 0.1:
            shutil.rmtree(run_dir)  # finished before the kill: start the trial again with an earlier kill
            result.resumed_steps.clear()
            scale /= 2
            continue
        break
    else:
        result.problems.append("did not finish after 8 runs")
        return result
    result.problems.extend(compare_runs(reference, run_dir, max_steps))
    result.duplicate_metric_rows = _duplicate_metric_rows(run_dir / "metrics.csv")
    return result


def _duplicate_metric_rows(path: Path) -> int:
    """Rows of ``metrics.csv`` whose step was already logged (reported, not a failure)."""
    if not path.is_file():
        return 0
    steps = [line.split(",", 1)[0] for line in path.read_text().splitlines()[1:] if line]
    return len(steps) - len(set(steps))


def run_trials(
    workdir: Path, trials: int = 10, seed: int = 0, *, log: Callable[[str], None] = print
) -> tuple[list[TrialResult], dict[str, Any]]:
    """The reference run and ``trials`` kill-and-resume trials.

    Returns:
        The trial results and figures (``reference_seconds``, ``kills``, ``runs``, ``seconds``).
    """
    t0 = time.perf_counter()
    harness = CrashHarness(workdir)
    max_steps = int(next(o for o in harness.tiny if o.startswith("trainer.max_steps=")).split("=")[1])
    reference = harness.workdir / "reference"
    if reference.exists():
        shutil.rmtree(reference)
    harness.run(harness.argv(harness.workdir / "warmup"))  # generates the world; first-run costs excluded
    ref = harness.run(harness.argv(reference))
    if ref.exitcode != 0:
        raise RuntimeError(f"reference run failed:\n{ref.log[-3000:]}")
    log(f"reference run: {ref.seconds:.1f} s")
    rng = random.Random(seed)
    results = []
    for k in range(trials):
        r = run_trial(harness, reference, k, rng, ref.seconds, max_steps)
        results.append(r)
        status = "ok" if r.ok else "FAIL: " + "; ".join(r.problems)
        log(f"trial {k}: {r.mode}: {r.kills} kill(s), {r.runs} runs, resumed at {r.resumed_steps}: {status}")
    figures = {
        "reference_seconds": round(ref.seconds, 2),
        "kills": sum(r.kills for r in results),
        "runs": sum(r.runs for r in results),
        "passed": sum(r.ok for r in results),
        "duplicate_metric_rows": sum(r.duplicate_metric_rows for r in results),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return results, figures


def main(argv: list[str] | None = None) -> int:
    """Command line; exit 1 when a trial fails."""
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder, removed afterwards")
    args = p.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="fiber-crash-"))
    try:
        results, figures = run_trials(work, args.trials, args.seed)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(figures))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
