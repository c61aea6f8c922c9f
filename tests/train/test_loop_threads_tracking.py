"""The training loop's CPU-thread setting, logging (run.log) and metric tracking (CSV, TensorBoard, plots).

A linear-regression task drives :func:`fiber_train.loop.fit` in well under a second per run; its evaluation
returns the mean squared error on fixed points and a made-up "R@1" so that evaluation curves can be checked.
"""

from __future__ import annotations

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

    def evaluate(self, model: nn.Module, fabric: Any) -> dict[str, float]:
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
