"""The training loop's CPU-thread setting, logging (run.log) and metric tracking (CSV, TensorBoard, plots).

A linear-regression task drives :func:`fiber_train.loop.fit` in well under a second per run; its evaluation
returns the mean squared error on fixed points and a made-up "R@1" so that evaluation curves can be checked.
"""

from __future__ import annotations

import csv
import shutil
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from fiber_train.checkpoint import save_weights
from fiber_train.config import OptimConfig, TrainerConfig
from fiber_train.loop import cpu_threads, fit
from fiber_train.tasks.base import StepOutput


@dataclass(frozen=True)
class _Data:
    batch_size: int = 4
    num_workers: int = 0


@dataclass(frozen=True)
class _Eval:
    every: int = 0


@dataclass(frozen=True)
class _Config:
    trainer: TrainerConfig
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=0.05, warmup_ratio=0.0))
    data: _Data = field(default_factory=_Data)
    eval: _Eval = field(default_factory=_Eval)


class _Batch:
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def to(self, device: Any) -> _Batch:
        return _Batch(self.x.to(device), self.y.to(device))

    def __len__(self) -> int:
        return self.x.shape[0]


class _Points(Dataset):
    def __init__(self, n: int = 32) -> None:
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 3, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


class _Regressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1)
        self.threads_seen: list[int] = []

    def forward(self, batch: _Batch) -> StepOutput:
        self.threads_seen.append(torch.get_num_threads())
        err = self.lin(batch.x).squeeze(-1) - batch.y
        mse, mae = (err**2).mean(), err.abs().mean().detach()
        return StepOutput(loss=mse, logs={"reg/loss": mse.detach(), "reg/mae": mae})


class _Task:
    name = "toy"

    def __init__(self, config: _Config) -> None:
        self.config = config
        self.model: _Regressor | None = None
        self.evaluations: list[dict[str, float]] = []

    def prepare_data(self) -> None:
        pass

    def build_model(self) -> nn.Module:
        torch.manual_seed(0)
        self.model = _Regressor()
        return self.model

    def param_groups(self, model: nn.Module) -> list[dict]:
        return [{"params": list(model.parameters()), "lr": self.config.optim.lr, "name": "all"}]

    def train_dataset(self) -> Dataset:
        return _Points()

    def collate_fn(self) -> Callable[[list[Any]], Any]:
        return lambda items: _Batch(torch.stack([a for a, _ in items]), torch.stack([b for _, b in items]))

    def evaluate(self, model: _Regressor, fabric: Any) -> dict[str, float]:
        data = _Points(8)
        mse = float(((model.lin(data.x).squeeze(-1) - data.y) ** 2).mean())
        result = {"mse": mse, "R@1": 100.0 / (1.0 + mse)}
        self.evaluations.append(result)
        return result

    def export(self, model: nn.Module, out_dir: Any) -> None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        save_weights(model, Path(out_dir) / "model.safetensors")


def _trainer(**kw: Any) -> TrainerConfig:
    base: dict[str, Any] = dict(
        accelerator="cpu", max_steps=4, log_every=1, progress=False, deterministic=True, ckpt_every=2
    )
    base.update(kw)
    return TrainerConfig(**base)


@pytest.fixture
def restore_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_cpu_threads_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 4, 5, 6, 7}, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert cpu_threads(0) == 6  # the cores this process may use, not the machine's
    assert cpu_threads(0, local_processes=4) == 1  # shared among the node's training processes
    assert cpu_threads(0, local_processes=8) == 1  # never 0
    assert cpu_threads(3, local_processes=8) == 3  # an explicit setting wins
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert cpu_threads(0) == 2
    with pytest.raises(ValueError, match="trainer.threads must be >= 0"):
        TrainerConfig(threads=-1)


def test_threads_setting_is_applied_before_training(tmp_path: Path, restore_threads: None) -> None:
    torch.set_num_threads(2)
    task = _Task(_Config(_trainer(threads=1)))
    fit(task, tmp_path / "run")
    assert task.model is not None and task.model.threads_seen and set(task.model.threads_seen) == {1}


def _csv_rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the run's TensorBoard event files, read back with TensorBoard's own reader."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = event_accumulator.EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tiny_run_logs_losses_and_evaluation_curves_to_csv_tensorboard_and_run_log(tmp_path: Path) -> None:
    task = _Task(_Config(_trainer(), eval=_Eval(every=2)))
    run = tmp_path / "run"
    fit(task, run)
    # evaluation at step 2 (periodic) and step 4 (final): one row per step, the evaluation merged into it
    rows = _csv_rows(run)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert [r["eval/R@1"] for r in rows] == ["", str(task.evaluations[0]["R@1"]), "", str(task.evaluations[1]["R@1"])]
    scalars = _scalars(run)
    assert [s for s, _ in scalars["eval/R@1"]] == [2, 4]
    assert [v for _, v in scalars["eval/R@1"]] == pytest.approx([e["R@1"] for e in task.evaluations], rel=1e-6)
    assert [v for _, v in scalars["eval/mse"]] == pytest.approx([e["mse"] for e in task.evaluations], rel=1e-6)
    assert [s for s, _ in scalars["loss"]] == [1, 2, 3, 4]
    assert [v for _, v in scalars["reg/mae"]] == pytest.approx([float(r["reg/mae"]) for r in rows], rel=1e-5)
    log_text = (run / "run.log").read_text()
    assert "INFO fiber_train.loop" in log_text and "toy: 4 steps into" in log_text


def test_resume_cuts_metrics_back_to_the_checkpoint_and_tensorboard_purges(tmp_path: Path) -> None:
    full = tmp_path / "full"
    fit(_Task(_Config(_trainer(), eval=_Eval(every=2))), full)
    crashed = tmp_path / "crashed"
    shutil.copytree(full, crashed)
    # a crash after step 3 was logged but before the step-4 checkpoint: the step-3 row and its events are stale
    shutil.rmtree(crashed / "checkpoints" / "step_00000004")
    shutil.rmtree(crashed / "model")
    with open(crashed / "metrics.csv", newline="") as fh:
        lines = fh.read().splitlines()
    (crashed / "metrics.csv").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:5])  # half-written step-4 row
    fit(_Task(_Config(_trainer(), eval=_Eval(every=2))), crashed)
    a, b = _csv_rows(full), _csv_rows(crashed)
    assert [int(r["step"]) for r in b] == [1, 2, 3, 4]  # step 3 logged again, not twice
    for key in ("loss", "reg/mae", "eval/R@1"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    scalars = _scalars(crashed)  # TensorBoard drops the events after the resumed step (purge_step)
    assert [s for s, _ in scalars["loss"]] == [1, 2, 3, 4]
    assert [s for s, _ in scalars["eval/R@1"]] == [2, 4]


def test_loss_plot_has_markers_for_short_runs_and_a_curve_per_loss_component(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.axes import Axes

    drawn: list[tuple[str | None, list[int], Any]] = []
    original = Axes.plot

    def record(self: Axes, *args: Any, **kwargs: Any) -> Any:
        drawn.append((kwargs.get("label"), list(args[0]), kwargs.get("marker")))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", record)
    run = tmp_path / "run"
    fit(_Task(_Config(_trainer(max_steps=1, ckpt_every=0))), run)
    assert (run / "loss_curve.png").is_file()
    labels = {label: (steps, marker) for label, steps, marker in drawn}
    assert labels["loss"] == ([1], "o") and labels["reg/loss"] == ([1], "o")  # one point, visible
    assert labels["R@1"] == ([1], "o")  # the final evaluation, on its own panel
    assert "reg/mae" not in labels and "num_images" not in labels


class _FakeMLflow(types.ModuleType):
    """Records the calls the MLflow tracker makes (the ``mlflow`` client API it uses)."""

    def __init__(self) -> None:
        super().__init__("mlflow")
        self.calls: list[tuple[str, Any]] = []

    def set_tracking_uri(self, uri: str) -> None:
        self.calls.append(("uri", uri))

    def set_experiment(self, name: str) -> None:
        self.calls.append(("experiment", name))

    def start_run(self, run_name: str) -> Any:
        self.calls.append(("start", run_name))
        return types.SimpleNamespace(info=types.SimpleNamespace(run_id="r1"))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.calls.append(("metrics", (step, dict(metrics))))

    def log_params(self, params: dict[str, str]) -> None:
        self.calls.append(("params", dict(params)))

    def end_run(self, status: str) -> None:
        self.calls.append(("end", status))


def test_mlflow_tracker_gets_params_losses_and_evaluation_at_their_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = _FakeMLflow()
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    task = _Task(_Config(_trainer(loggers=("mlflow",)), eval=_Eval(every=2)))
    fit(task, tmp_path / "runs" / "r")
    kinds = [k for k, _ in fake.calls]
    assert kinds[:3] == ["uri", "experiment", "start"] and kinds[-1] == "end"
    assert fake.calls[0][1] == (tmp_path / "runs" / "mlruns").resolve().as_uri()
    assert ("experiment", "fiber-toy") in fake.calls and ("end", "FINISHED") in fake.calls
    params = next(v for k, v in fake.calls if k == "params")
    assert params["trainer.max_steps"] == "4" and params["optim.lr"] == "0.05"
    metrics = [v for k, v in fake.calls if k == "metrics"]
    assert [s for s, m in metrics if "loss" in m] == [1, 2, 3, 4]
    evals = [(s, m["eval/R_at_1"]) for s, m in metrics if "eval/R_at_1" in m]  # "@" is not allowed by MLflow
    assert evals == [(2, task.evaluations[0]["R@1"]), (4, task.evaluations[1]["R@1"])]


def test_asking_for_a_tracker_that_is_not_installed_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail
    with pytest.raises(ImportError, match="pip install wandb"):
        fit(_Task(_Config(_trainer(loggers=("wandb",)))), tmp_path / "run")
    with pytest.raises(ValueError, match="unknown tracker 'comet'"):
        TrainerConfig(loggers=("comet",))


def test_a_failing_run_closes_its_trackers_as_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeMLflow()
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    task = _Task(_Config(_trainer(loggers=("mlflow",))))

    def broken(model: nn.Module, fabric: Any) -> dict[str, float]:
        raise RuntimeError("evaluation data is gone")

    monkeypatch.setattr(task, "evaluate", broken)
    with pytest.raises(RuntimeError, match="evaluation data is gone"):
        fit(task, tmp_path / "runs" / "r")
    assert fake.calls[-1] == ("end", "FAILED")
    assert [int(r["step"]) for r in _csv_rows(tmp_path / "runs" / "r")] == [1, 2, 3, 4]  # metrics kept
