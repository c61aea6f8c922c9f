"""Logging and experiment tracking of a training run.

- **Messages** go through :mod:`logging` (loggers ``fiber_train.*``, ``fiber_data.*``, ...). The ``fiber-train``
  command configures the console (:func:`configure_logging`); every run also writes its messages to
  ``<run>/run.log`` (:func:`run_log`), whoever called :func:`fiber_train.loop.fit`. Progress bars stay tqdm.
- **Metrics** go through Lightning Fabric's loggers (:func:`build_loggers`): ``metrics.csv`` in the run
  directory (a :class:`lightning_fabric.loggers.CSVLogger` that resumes, see :class:`RunCSVLogger`) and
  TensorBoard event files in ``<run>/tensorboard`` (:class:`lightning_fabric.loggers.TensorBoardLogger`) by
  default; Weights & Biases and MLflow when their package is installed and ``trainer.loggers`` asks for them.
  Evaluation results are logged at their step as ``eval/<metric>`` (one curve per metric).

Resume keeps the guarantees of the run directory: ``metrics.csv`` is cut back to the resumed step (rows a
killed run logged after its last checkpoint disappear), TensorBoard is told to purge the events after that
step (``purge_step``), and ``metrics.csv`` is rewritten atomically (temporary file + rename) whenever its
header or last row changes.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

from lightning_fabric.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning_fabric.loggers.csv_logs import _ExperimentWriter

from fiber_train.logs import LOGGER_NAMES, configure_logging, run_log

__all__ = [
    "LOGGER_NAMES",
    "RunCSVLogger",
    "build_loggers",
    "configure_logging",
    "finalize_loggers",
    "log_metrics",
    "plot_metrics",
    "run_log",
]

#: Extra trackers ``trainer.loggers`` may name.
TRACKERS = ("wandb", "mlflow")

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- metrics.csv
def _atomic_write_rows(path: Path, fields: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class _ResumingWriter(_ExperimentWriter):
    """Lightning's CSV experiment writer, changed to continue a run instead of deleting its file.

    - An existing ``metrics.csv`` is kept up to ``resume_step`` (later rows, and a half-written last line,
      are dropped); Lightning's writer would delete the file.
    - Metrics logged at the step of the last row are merged into that row (an evaluation at a logging step
      completes the step's row), so there is one row per step.
    - Columns keep the order in which metrics first appeared (``step`` first); a new column or a merge
      rewrites the file atomically, other rows are appended.
    """

    def __init__(self, log_dir: str, resume_step: int) -> None:
        self.rows: list[dict[str, Any]] = []
        self._written = 0  # rows of self.rows already in the file
        self._rewrite = False
        super().__init__(log_dir)
        self.metrics_keys = ["step"]
        path = Path(self.metrics_file_path)
        if path.is_file():
            with open(path, newline="") as fh:
                reader = csv.DictReader(fh)
                self.metrics_keys = list(reader.fieldnames or ["step"])
                old = list(reader)
            self.rows = [r for r in old if (r.get("step") or "").isdigit() and int(r["step"]) <= resume_step]
            self._written = len(self.rows)
            if len(self.rows) != len(old):
                _atomic_write_rows(path, self.metrics_keys, self.rows)

    def _check_log_dir_exists(self) -> None:  # Lightning's version deletes metrics.csv
        pass

    def log_metrics(self, metrics_dict: dict[str, Any], step: int | None = None) -> None:
        step = len(self.rows) if step is None else int(step)
        values = {k: (v.item() if hasattr(v, "item") else v) for k, v in metrics_dict.items()}
        for k in values:
            if k not in self.metrics_keys:
                self.metrics_keys.append(k)
                self._rewrite = True
        if self.rows and str(self.rows[-1].get("step")) == str(step):
            self.rows[-1].update(values)
            self._rewrite = self._rewrite or self._written == len(self.rows)
        else:
            self.rows.append({"step": step, **values})

    def save(self) -> None:
        path = Path(self.metrics_file_path)
        if self._rewrite or not path.is_file():
            _atomic_write_rows(path, self.metrics_keys, self.rows)
        elif self._written < len(self.rows):
            with open(path, "a", newline="") as fh:
                csv.DictWriter(fh, fieldnames=self.metrics_keys).writerows(self.rows[self._written :])
        self._written = len(self.rows)
        self._rewrite = False


class RunCSVLogger(CSVLogger):
    """:class:`lightning_fabric.loggers.CSVLogger` writing ``<run_dir>/metrics.csv`` and resuming it.

    Args:
        run_dir: the run directory (the file is ``run_dir/metrics.csv``, no version sub-folder).
        resume_step: rows after this step are dropped from an existing file (0: a fresh run).
    """

    def __init__(self, run_dir: str | os.PathLike[str], resume_step: int = 0) -> None:
        super().__init__(root_dir=os.fspath(run_dir), name="", version="")  # CSVLogger applies os.fspath too
        self._resume_step = resume_step

    @property
    def experiment(self) -> _ResumingWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ResumingWriter(self.log_dir, self._resume_step)
        return cast(_ResumingWriter, self._experiment)  # only this property sets it

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        self.experiment.log_metrics(metrics, step)

    def log_hyperparams(self, params: Any) -> None:
        """Nothing to do: the resolved configuration is the run's ``config.yaml``."""


# ---------------------------------------------------------------------------------------------- trackers
class _MLflowLogger(Logger):
    """Metrics and parameters to MLflow (``mlflow`` installed). Tracking URI: ``MLFLOW_TRACKING_URI`` when set,
    else ``<out_dir>/mlruns`` beside the run directories; experiment ``fiber-<task>``, run name = run dir name."""

    def __init__(self, run_dir: Path, experiment: str) -> None:
        super().__init__()
        # mlflow and wandb are optional trackers, not installed in the pinned dev venv (constraints.txt)
        import mlflow  # pyright: ignore[reportMissingImports]

        self._mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri((run_dir.parent / "mlruns").resolve().as_uri())
        mlflow.set_experiment(experiment)
        self._run = mlflow.start_run(run_name=run_dir.name)

    @property
    def name(self) -> str:
        return "mlflow"

    @property
    def version(self) -> str:
        return str(self._run.info.run_id)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._mlflow.log_metrics({k.replace("@", "_at_"): float(v) for k, v in metrics.items()}, step=step)

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        flat = _flatten(params)
        self._mlflow.log_params({k: str(v)[:500] for k, v in flat.items()})

    def finalize(self, status: str) -> None:
        self._mlflow.end_run(status={"success": "FINISHED", "failed": "FAILED"}.get(status, "KILLED"))


def _flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in params.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _tracker(kind: str, run_dir: Path, task_name: str) -> Logger:
    if kind == "wandb":
        try:
            # optional tracker, not installed in the pinned dev venv
            from wandb.integration.lightning.fabric import WandbLogger  # pyright: ignore[reportMissingImports]
        except ImportError as exc:
            raise ImportError(
                "trainer.loggers asks for wandb, which is not installed: pip install wandb (then wandb login)"
            ) from exc
        return WandbLogger(project=f"fiber-{task_name}", name=run_dir.name, save_dir=str(run_dir))
    try:
        # optional tracker, not installed in the pinned dev venv
        import mlflow  # pyright: ignore[reportMissingImports]  # noqa: F401
    except ImportError as exc:
        raise ImportError("trainer.loggers asks for mlflow, which is not installed: pip install mlflow") from exc
    return _MLflowLogger(run_dir, f"fiber-{task_name}")


def build_loggers(
    run_dir: str | os.PathLike[str],
    *,
    tensorboard: str = "auto",
    trackers: Sequence[str] = (),
    task_name: str = "run",
    resume_step: int = 0,
    hyperparams: Mapping[str, Any] | None = None,
) -> list[Logger]:
    """The Fabric loggers of a run (call on global rank 0 only).

    Args:
        run_dir: the run directory.
        tensorboard: ``auto`` (when ``tensorboard`` or ``tensorboardX`` is installed), ``true`` (required),
            ``false``.
        trackers: extra trackers, among ``wandb`` and ``mlflow`` (``trainer.loggers``).
        task_name: names the W&B project / MLflow experiment (``fiber-<task>``).
        resume_step: step the run resumes from (0 for a fresh run): later CSV rows are dropped and TensorBoard
            purges later events.
        hyperparams: the resolved configuration, sent to W&B and MLflow.

    Returns:
        ``[RunCSVLogger, TensorBoardLogger?, trackers...]``.
    """
    run_dir = Path(run_dir)
    loggers: list[Logger] = [RunCSVLogger(run_dir, resume_step)]
    if tensorboard != "false":
        try:
            kwargs: dict[str, Any] = {"purge_step": resume_step + 1} if resume_step else {}
            loggers.append(
                TensorBoardLogger(run_dir, name="tensorboard", version="", default_hp_metric=False, **kwargs)
            )
        except ModuleNotFoundError:
            if tensorboard == "true":
                raise ImportError(
                    "trainer.tensorboard=true needs tensorboard: pip install 'fiber-train[tensorboard]'"
                ) from None
            log.info("tensorboard is not installed: no event files (pip install 'fiber-train[tensorboard]')")
    for kind in trackers:
        if kind not in TRACKERS:
            raise ValueError(f"trainer.loggers: unknown tracker {kind!r}; expected {' or '.join(TRACKERS)}")
        tracker = _tracker(kind, run_dir, task_name)
        if hyperparams:
            tracker.log_hyperparams(dict(hyperparams))
        loggers.append(tracker)
    return loggers


def log_metrics(loggers: Sequence[Logger], metrics: Mapping[str, Any], step: int) -> None:
    """Log the numeric values of ``metrics`` at ``step`` to every logger and flush them.

    The ``step`` key and values that are not numbers (``None``, strings, lists) are left out; booleans are
    logged as 0/1 and 0-d tensors as their value.
    """
    values: dict[str, float] = {}
    for k, v in metrics.items():
        if hasattr(v, "item") and getattr(v, "ndim", 0) == 0:
            v = v.item()
        if k != "step" and isinstance(v, bool | int | float):
            values[k] = float(v) if isinstance(v, bool) else v
    if not values:
        return
    for lg in loggers:
        lg.log_metrics(values, step=step)
        lg.save()


def finalize_loggers(loggers: Sequence[Logger], status: str = "success") -> None:
    """Flush and close every logger (``status``: ``success``, ``failed`` or ``preempted``)."""
    for lg in loggers:
        lg.finalize(status)


# ---------------------------------------------------------------------------------------------- plots
def _is_loss(key: str) -> bool:
    """``loss``, a task's ``<head>/loss`` and its components (``grounding/loss_reg``, ``caption/mle``, ...)."""
    last = key.rsplit("/", 1)[-1]
    return key == "loss" or last.startswith("loss") or (key.startswith("caption/") and last in ("mle", "rl"))


def plot_metrics(run_dir: str | os.PathLike[str], *, marker_below: int = 50) -> Path | None:
    """Write ``loss_curve.png`` from ``metrics.csv``: losses, evaluation metrics and fusion gates over steps.

    Panels: every loss the tasks log (the total and each component: ``itc/loss``, ``grounding/loss_reg``,
    ``caption/mle``, ...); the evaluation metrics (``eval/...``, counts left out) when any were logged; the
    fusion gates (``gate/...``) when logged. Each series is drawn over the steps where it has a value, with
    point markers when it has fewer than ``marker_below`` points (a one-step run shows its point).

    Needs matplotlib (the ``plot`` extra); returns ``None`` without it or without metrics.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        return None
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        keys = list(reader.fieldnames or [])
        rows = list(reader)
    if not rows:
        return None

    def series(key: str) -> tuple[list[int], list[float]]:
        pts = [(int(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "") and r["step"].isdigit()]
        return [p[0] for p in pts], [p[1] for p in pts]

    groups = [
        ("losses", "loss", [k for k in keys if _is_loss(k) and not k.startswith("eval/")]),
        (
            "evaluation",
            "metric",
            [k for k in keys if k.startswith("eval/") and "num_" not in k and not k.endswith("/count")],
        ),
        ("fusion gates", "gate value (alpha)", [k for k in keys if k.startswith("gate/")]),
    ]
    groups = [g for g in groups if any(series(k)[0] for k in g[2])]
    if not groups:
        return None
    fig, axes = plt.subplots(1, len(groups), figsize=(7 * len(groups), 4), squeeze=False)
    for ax, (title, ylabel, group) in zip(axes[0], groups):
        for k in group:
            xs, ys = series(k)
            if not xs:
                continue
            shown = [y for y in ys if math.isfinite(y)]
            label = k.split("/", 1)[1] if k.startswith(("gate/", "eval/")) else k
            ax.plot(xs, ys, label=label, marker="o" if len(shown) < marker_below else None, markersize=3)
        ax.set_xlabel("optimiser step")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{Path(run_dir).name}: {title}" if title == "losses" else title)
        ax.legend(fontsize=7 if len(group) > 6 else None)
        ax.grid(alpha=0.3)
    out = Path(run_dir) / "loss_curve.png"
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
