"""Reliability of the training loop, in process: non-finite policy, full disk, unwritable output.

A tiny linear-regression task drives :func:`fiber_train.loop.fit`, so every run takes well under a second;
NaN losses/gradients are injected by the model at chosen forward calls, a full disk by making the
safetensors writer fail with ``ENOSPC`` half-way through a file.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import Dataset

import fiber_train.checkpoint as ckpt_mod
from fiber_train.checkpoint import (
    CheckpointError,
    check_output_dir,
    estimate_checkpoint_bytes,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
)
from fiber_train.config import OptimConfig, TrainerConfig
from fiber_train.loop import TrainingStopped, fit
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
    """``x [B, 3]``, ``y [B]``."""

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


def _collate(items: list[tuple[torch.Tensor, torch.Tensor]]) -> _Batch:
    return _Batch(torch.stack([a for a, _ in items]), torch.stack([b for _, b in items]))


class _Regressor(nn.Module):
    """Linear model; forward call ``k`` (0-based) in ``nan_loss`` returns a NaN loss, in ``nan_grad`` a finite
    loss whose gradient is NaN (``0 * d sqrt(u)/du`` at ``u = 0``)."""

    def __init__(self, nan_loss: set[int], nan_grad: set[int]) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1)
        self.nan_loss, self.nan_grad = nan_loss, nan_grad
        self.calls = 0

    def forward(self, batch: _Batch) -> StepOutput:
        loss = ((self.lin(batch.x).squeeze(-1) - batch.y) ** 2).mean()
        if self.calls in self.nan_loss:
            loss = loss * float("nan")
        if self.calls in self.nan_grad:
            u = self.lin.bias - self.lin.bias.detach()  # value 0, gradient 1
            loss = loss + 0.0 * torch.sqrt(u).sum()  # forward adds 0; backward gives 0 * inf = NaN
        self.calls += 1
        return StepOutput(loss=loss, logs={"mse": loss.detach()})


class _Task:
    name = "toy"

    def __init__(
        self, config: _Config, nan_loss: AbstractSet[int] = frozenset(), nan_grad: AbstractSet[int] = frozenset()
    ) -> None:
        self.config = config
        self.nan_loss, self.nan_grad = set(nan_loss), set(nan_grad)
        self.model: _Regressor | None = None

    def prepare_data(self) -> None:
        pass

    def build_model(self) -> nn.Module:
        torch.manual_seed(0)
        self.model = _Regressor(self.nan_loss, self.nan_grad)
        return self.model

    def param_groups(self, model: nn.Module) -> list[dict]:
        return [{"params": list(model.parameters()), "lr": self.config.optim.lr, "name": "all"}]

    def train_dataset(self) -> Dataset:
        return _Points()

    def collate_fn(self) -> Callable[[list[Any]], Any]:
        return _collate

    def evaluate(self, model: nn.Module, fabric: Any) -> dict[str, float]:
        return {}

    def export(self, model: nn.Module, out_dir: Any) -> None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        ckpt_mod.save_weights(model, Path(out_dir) / "model.safetensors")


def _trainer(**kw: Any) -> TrainerConfig:
    base: dict[str, Any] = dict(
        accelerator="cpu",
        max_steps=4,
        ckpt_every=1,
        keep_checkpoints=10,
        log_every=1,
        progress=False,
        deterministic=True,
        grad_clip=1.0,
    )
    base.update(kw)
    return TrainerConfig(**base)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _all_finite(state: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in state.values())


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 4-step run with a checkpoint after every step."""
    run = tmp_path_factory.mktemp("clean") / "run"
    fit(_Task(_Config(_trainer())), run)
    return run


def test_skip_policy_skips_nan_steps_and_never_writes_nan_weights(tmp_path: Path, clean_run: Path) -> None:
    task = _Task(_Config(_trainer(nonfinite="skip", max_nonfinite=3)), nan_loss={1}, nan_grad={3})
    result = fit(task, tmp_path / "run")
    assert result.step == 4 and result.nonfinite_steps == 2
    assert task.model is not None and task.model.calls == 6  # 4 good steps + 2 skipped micro-batches
    for ckpt in list_checkpoints(tmp_path / "run" / "checkpoints"):
        assert _all_finite(_weights(ckpt)), ckpt
    # The first step is before any NaN: identical to the clean run. Later steps saw other batches.
    a = _weights(clean_run / "checkpoints" / "step_00000001")
    b = _weights(tmp_path / "run" / "checkpoints" / "step_00000001")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert rows[-1].split(",")[rows[0].split(",").index("nonfinite_steps")] == "2"


def test_stop_policy_raises_and_saves_the_last_good_state(tmp_path: Path, clean_run: Path) -> None:
    task = _Task(_Config(_trainer(nonfinite="stop")), nan_grad={2})
    with pytest.raises(TrainingStopped, match=r"non-finite loss or gradients at step 3.*step_00000002"):
        fit(task, tmp_path / "run")
    last = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert last is not None and last.name == "step_00000002"
    saved, expected = _weights(last), _weights(clean_run / "checkpoints" / "step_00000002")
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in saved)
    # the checkpoint written while stopping (a re-save of step 2) is complete and loadable
    state, meta = load_checkpoint(last, _Regressor(set(), set()))
    assert state["step"] == 2 and meta["step"] == 2


def test_skip_policy_stops_after_max_consecutive_nonfinite(tmp_path: Path) -> None:
    task = _Task(_Config(_trainer(nonfinite="skip", max_nonfinite=3)), nan_loss={1, 2, 3})
    with pytest.raises(TrainingStopped, match="total 3"):
        fit(task, tmp_path / "run")
    last = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert last is not None and last.name == "step_00000001" and _all_finite(_weights(last))


def test_disk_full_mid_checkpoint_keeps_the_previous_one(
    tmp_path: Path, clean_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = ckpt_mod.save_file
    calls = {"n": 0}

    def flaky_save_file(tensors: dict, filename: str, metadata: Any = None) -> None:
        calls["n"] += 1
        if calls["n"] == 3:  # the checkpoint of step 3: write half a file, then fail like a full disk
            real(tensors, filename, metadata=metadata)
            with open(filename, "r+b") as fh:
                fh.truncate(Path(filename).stat().st_size // 2)
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ckpt_mod, "save_file", flaky_save_file)
    run = tmp_path / "run"
    with pytest.raises(CheckpointError, match=r"step_00000003 \(disk full\).*still .*step_00000002"):
        fit(_Task(_Config(_trainer())), run)
    root = run / "checkpoints"
    assert [p.name for p in list_checkpoints(root)] == ["step_00000001", "step_00000002"]
    assert sorted(p.name for p in root.iterdir()) == ["step_00000001", "step_00000002"]  # no partial leftovers
    state, _ = load_checkpoint(root / "step_00000002", _Regressor(set(), set()))
    assert state["step"] == 2
    # space is back: resuming finishes with exactly the weights of the uninterrupted run
    monkeypatch.setattr(ckpt_mod, "save_file", real)
    result = fit(_Task(_Config(_trainer())), run)
    assert result.step == 4
    a, b = _weights(clean_run / "checkpoints" / "step_00000004"), _weights(root / "step_00000004")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_preflight_rejects_unwritable_and_full_output_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(CheckpointError, match=r"run directory .*file/run is not writable"):
        check_output_dir(blocker / "run")
    model = nn.Linear(100, 100)  # 10,100 float32 parameters
    need = estimate_checkpoint_bytes(model)
    assert need == 3 * 10_100 * 4  # weights + two AdamW moments
    check_output_dir(tmp_path / "ok", 3 * need)
    assert (tmp_path / "ok").is_dir() and list((tmp_path / "ok").iterdir()) == []

    class _Usage:
        free = 1000

    monkeypatch.setattr(ckpt_mod.shutil, "disk_usage", lambda p: _Usage())
    with pytest.raises(CheckpointError, match=r"0\.0 MiB free .* need about 0\.3 MiB"):
        check_output_dir(tmp_path / "ok", 3 * need)


def test_nan_policy_config_is_validated() -> None:
    with pytest.raises(ValueError, match="trainer.nonfinite must be 'skip' or 'stop'"):
        _trainer(nonfinite="ignore")
