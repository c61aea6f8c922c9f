"""The demo's default models: tiny FIBERs trained on the synthetic world, cached, so the page works offline.

Without ``--checkpoint`` the demo trains (once) the packaged tiny recipes through their Python API
(:func:`fiber_train.loop.fit`): ``fine/tiny`` (grounding and detection, docs/reference/training.md §3), ``coarse/tiny``
(image-text scoring, docs/reference/training.md §1), then ``finetune/vqa_tiny`` and ``finetune/caption_tiny`` initialised from
the coarse run (docs/reference/training.md §2). Runs live under ``<cache>/demo/runs/<task>-<steps>steps-<world>``; a finished run
(``model/config.json`` present) is reused, an interrupted one resumes from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fiber_data import SyntheticWorldConfig, generate_world

__all__ = [
    "DEFAULT_CACHE_DIR",
    "DEFAULT_TASKS",
    "DefaultModels",
    "TrainingInterrupted",
    "display_path",
    "ensure_default_models",
    "sample_images",
]

DEFAULT_CACHE_DIR = Path("~/.cache/fiber").expanduser()
"""Where the default models and their synthetic world are cached (``--cache-dir`` overrides it)."""

DEFAULT_TASKS: tuple[str, ...] = ("fine", "coarse", "vqa", "caption")
"""Training tasks of the default models, in training order (VQA and captioning start from the coarse run)."""

_RECIPES = {
    "fine": ("fine", "fine/tiny"),
    "coarse": ("coarse", "coarse/tiny"),
    "vqa": ("vqa", "finetune/vqa_tiny"),
    "caption": ("caption", "finetune/caption_tiny"),
}
_EVAL_OFF = {
    "fine": "eval.detection=false",
    "coarse": "eval.retrieval=false",
    "vqa": "eval.enabled=false",
    "caption": "eval.enabled=false",
}


class TrainingInterrupted(RuntimeError):
    """A default model's training was stopped (SIGTERM) before it finished; its checkpoint is kept."""


@dataclass(frozen=True)
class DefaultModels:
    """What :func:`ensure_default_models` produced.

    Attributes:
        run_dirs: finished run directories, one per task, in :data:`DEFAULT_TASKS` order.
        world: the synthetic world they were trained on.
        samples: test-split images of the world (offered on the page).
    """

    run_dirs: tuple[Path, ...]
    world: Path
    samples: tuple[Path, ...]


def sample_images(world: Path, count: int = 8) -> list[Path]:
    """The first ``count`` test images of a synthetic world (sorted by name)."""
    return sorted((Path(world) / "images" / "test").glob("*.png"))[:count]


def display_path(path: str | Path) -> str:
    """``path`` for messages and the page: relative to the working directory when inside it, ``~/...`` when
    under the home folder, else as given."""
    p = Path(path).expanduser()
    for base, prefix in ((Path.cwd(), ""), (Path.home(), "~/")):
        with contextlib.suppress(ValueError):
            return prefix + str(p.resolve().relative_to(base.resolve()))
    return str(path)


class _ReportSteps:
    """A training task that calls ``report(step)`` after every optimiser step (everything else is the task's)."""

    def __init__(self, task: Any, report: Callable[[int], None]) -> None:
        object.__setattr__(self, "_task", task)
        object.__setattr__(self, "_report", report)

    def on_step_end(self, model: Any, step: int) -> None:
        if hasattr(self._task, "on_step_end"):
            self._task.on_step_end(model, step)
        self._report(step)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._task, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._task, name, value)


def ensure_default_models(
    cache_dir: str | Path = DEFAULT_CACHE_DIR,
    *,
    steps: int = 100,
    tasks: Sequence[str] = DEFAULT_TASKS,
    world_size: tuple[int, int, int] = (1000, 50, 50),
    extra_overrides: Sequence[str] = (),
    progress: bool = True,
    log: Callable[[str], None] = print,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> DefaultModels:
    """Train the default demo models on the synthetic world unless they are cached.

    Args:
        cache_dir: cache root; everything goes to ``cache_dir/demo``.
        steps: optimiser steps of every run (the cache key includes it).
        tasks: subset of :data:`DEFAULT_TASKS` (``vqa``/``caption`` need ``coarse`` before them).
        world_size: ``(train, val, test)`` images of the synthetic world.
        extra_overrides: ``key=value`` config overrides applied to every run (e.g. small batches in tests).
        progress: show progress bars and the training log (otherwise the runs' stdout is swallowed).
        log: where the one-line status messages go.
        on_progress: called with ``{"model": name, "index": i, "models": n, "step": s, "steps": steps}`` when
            a model starts (``step`` 0, or the resumed step) and after every optimiser step (the demo page shows
            it); cached models are not reported.

    Returns:
        The run directories, the world and its sample images.

    Raises:
        ValueError: an unknown task, or ``vqa``/``caption`` without ``coarse``.
        TrainingInterrupted: a run was pre-empted (SIGTERM); calling again resumes it.
    """
    unknown = [t for t in tasks if t not in _RECIPES]
    if unknown:
        raise ValueError(f"unknown default-model task(s) {unknown}; choose from {list(DEFAULT_TASKS)}")
    if any(t in tasks for t in ("vqa", "caption")) and "coarse" not in tasks:
        raise ValueError("the default VQA and caption models start from the coarse run: include 'coarse'")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    from fiber_train.config import load_config
    from fiber_train.loop import fit
    from fiber_train.tasks import TASKS

    root = Path(cache_dir).expanduser() / "demo"
    world = root / "synthetic"
    n_train, n_val, n_test = world_size
    world_cfg = SyntheticWorldConfig(num_train=n_train, num_val=n_val, num_test=n_test)
    generate_world(world, world_cfg, progress=progress)
    common = [
        f"data.root={world}",
        f"data.synthetic_train={n_train}",
        f"data.synthetic_val={n_val}",
        f"data.synthetic_test={n_test}",
        f"trainer.max_steps={steps}",
        "trainer.accelerator=cpu",
        f"trainer.progress={'true' if progress else 'false'}",
        *extra_overrides,
    ]
    ordered = [t for t in DEFAULT_TASKS if t in tasks]
    runs: dict[str, Path] = {}
    for name in ordered:
        run_dir = root / "runs" / f"{name}-{steps}steps-{n_train}"
        runs[name] = run_dir
        if (run_dir / "model" / "config.json").is_file():
            continue
        task_name, recipe = _RECIPES[name]
        overrides = [*common, _EVAL_OFF[name]]
        if name in ("vqa", "caption"):
            overrides.append(f"model.pretrained={runs['coarse'] / 'model'}")
        cfg = load_config(TASKS[task_name].config, recipe, overrides)
        log(
            f"fiber demo: training the default {name} model ({steps} steps on the synthetic world) -> "
            f"{display_path(run_dir)}"
        )
        task = TASKS[task_name].task(cfg)
        if on_progress is not None:
            report = {"model": name, "index": ordered.index(name) + 1, "models": len(ordered), "steps": steps}
            on_progress({**report, "step": 0})
            task = _ReportSteps(task, lambda step, r=report: on_progress({**r, "step": step}))
        out = contextlib.nullcontext() if progress else contextlib.redirect_stdout(io.StringIO())
        with out:
            result = fit(task, run_dir)
        if result.preempted:  # SIGTERM: a checkpoint was saved, the next call resumes from it
            raise TrainingInterrupted(f"training of the default {name} model was interrupted; run again to resume")
    return DefaultModels(tuple(runs[t] for t in ordered), world, tuple(sample_images(world)))
