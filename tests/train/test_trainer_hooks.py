"""The Trainer calls the task's hooks by name with what they need as arguments (no call order to know).

A task derived from :class:`fiber_train.tasks.base.TaskHooks` gets the run's Fabric in ``build_model(fabric)`` and
``train_dataset(fabric)``, ``on_step_end(model, step)`` after every optimiser step, its ``state_dict`` saved in
checkpoints and given back on resume, and ``should_stop`` read after each evaluation; hooks it does not override
take the base class's defaults. A plain class (the earlier protocol) is seen through ``PlainTask``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from lightning_fabric import Fabric
from test_loop_threads_tracking import _Batch, _Config, _Eval, _Points, _Regressor, _trainer  # same folder
from torch import nn
from torch.utils.data import Dataset

from fiber_train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_weights
from fiber_train.loop import Trainer, fit
from fiber_train.tasks.base import PlainTask, TaskHooks, as_train_task


def _collate(items: list[tuple[torch.Tensor, torch.Tensor]]) -> _Batch:
    return _Batch(torch.stack([a for a, _ in items]), torch.stack([b for _, b in items]))


class _Minimal(TaskHooks):
    """Only the required methods: every optional hook is TaskHooks' default."""

    name = "minimal"

    def __init__(self, config: _Config) -> None:
        self.config = config
        self.calls: list[tuple[str, Any]] = []

    def prepare_data(self) -> None:
        self.calls.append(("prepare_data", self.run_dir))

    def build_model(self, fabric: Any = None) -> nn.Module:
        self.calls.append(("build_model", fabric))
        torch.manual_seed(0)
        return _Regressor()

    def param_groups(self, model: nn.Module) -> list[dict]:
        return [{"params": list(model.parameters()), "lr": self.config.optim.lr, "name": "all"}]

    def train_dataset(self, fabric: Any = None) -> Dataset:
        self.calls.append(("train_dataset", fabric))
        return _Points()

    def collate_fn(self) -> Callable[[list[Any]], Any]:
        return _collate

    def evaluate(self, model: _Regressor, fabric: Any) -> dict[str, float]:
        data = _Points(8)
        return {"mse": float(((model.lin(data.x).squeeze(-1) - data.y) ** 2).mean())}

    def export(self, model: nn.Module, out_dir: Any) -> None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        save_weights(model, Path(out_dir) / "model.safetensors")


class _Hooked(_Minimal):
    name = "hooked"

    def __init__(self, config: _Config, stop_after_evals: int = 0) -> None:
        super().__init__(config)
        self.steps: list[int] = []
        self.restored: dict[str, Any] | None = None
        self.evals = 0
        self.stop_after_evals = stop_after_evals

    def on_step_end(self, model: nn.Module, step: int) -> None:
        self.steps.append(step)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": torch.tensor(self.steps)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.restored = state
        self.steps = state["steps"].tolist()

    def evaluate(self, model: _Regressor, fabric: Any) -> dict[str, float]:
        self.evals += 1
        return super().evaluate(model, fabric)

    def should_stop(self) -> bool:
        return bool(self.stop_after_evals) and self.evals >= self.stop_after_evals


def test_hooks_get_the_fabric_and_the_step_as_arguments_and_task_state_survives_resume(tmp_path: Path) -> None:
    run = tmp_path / "run"
    task = _Hooked(_Config(_trainer(max_steps=4, ckpt_every=2, keep_checkpoints=5)))
    result = fit(task, run)
    assert result.step == 4 and task.steps == [1, 2, 3, 4]
    assert task.calls[0] == ("prepare_data", run)  # run_dir is set before the first hook
    (_, fab_model), (_, fab_data) = task.calls[1:]
    assert isinstance(fab_model, Fabric) and fab_data is fab_model and fab_model.world_size == 1
    state, _ = load_checkpoint(list_checkpoints(run / "checkpoints")[0], None)
    assert state["step"] == 2 and state["task"]["steps"].tolist() == [1, 2]

    more = _Hooked(_Config(_trainer(max_steps=6, ckpt_every=2, keep_checkpoints=5)))
    assert fit(more, run).step == 6
    assert more.restored is not None and more.restored["steps"].tolist() == [1, 2, 3, 4]
    assert more.steps == [1, 2, 3, 4, 5, 6]  # on_step_end resumed counting at step 5


def test_default_hooks_save_no_task_state_and_never_stop_early(tmp_path: Path) -> None:
    config = replace(_Config(_trainer(max_steps=3, ckpt_every=0)), eval=_Eval(every=1))
    task = _Minimal(config)
    assert as_train_task(task) is task
    result = fit(task, tmp_path / "run")
    assert result.step == 3 and "mse" in result.metrics
    newest = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert newest is not None
    state, _ = load_checkpoint(newest, None)
    assert "task" not in state


def test_should_stop_is_read_after_each_evaluation(tmp_path: Path) -> None:
    config = replace(_Config(_trainer(max_steps=6, ckpt_every=0)), eval=_Eval(every=1))
    task = _Hooked(config, stop_after_evals=2)
    result = fit(task, tmp_path / "run")
    assert result.step == 2 and task.steps == [1, 2]
    assert task.evals == 3  # two periodic evaluations, then the final one after the export
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


def test_a_plain_task_keeps_its_attach_fabric_before_build_model(tmp_path: Path) -> None:
    order: list[str] = []

    class _Plain:
        name = "plain"

        def __init__(self) -> None:
            self.config = _Config(_trainer(max_steps=2, ckpt_every=0))
            self.inner = _Minimal(self.config)

        def attach_fabric(self, fabric: Any) -> None:
            order.append(f"attach_fabric:{type(fabric).__name__}")

        def prepare_data(self) -> None:
            pass

        def build_model(self) -> nn.Module:
            order.append("build_model")
            return self.inner.build_model()

        def param_groups(self, model: nn.Module) -> list[dict]:
            return self.inner.param_groups(model)

        def train_dataset(self) -> Dataset:
            return _Points()

        def collate_fn(self) -> Callable[[list[Any]], Any]:
            return _collate

        def evaluate(self, model: nn.Module, fabric: Any) -> dict[str, float]:
            return {}

        def export(self, model: nn.Module, out_dir: Any) -> None:
            self.inner.export(model, out_dir)

        def on_step_end(self, model: nn.Module, step: int) -> None:
            order.append(f"step:{step}")

    plain = _Plain()
    trainer = Trainer(plain, tmp_path / "run")
    assert isinstance(trainer.task, PlainTask) and trainer.task.task is plain
    assert trainer.fit().step == 2
    assert order == ["attach_fabric:Fabric", "build_model", "step:1", "step:2"]
    assert not hasattr(plain, "run_dir")  # a plain task without the attribute is not given one


class _StartBaseline(_Minimal):
    """Asks the trainer to evaluate the model before training: its ``mse`` then is the baseline."""

    name = "start"
    baseline_name = "the model before training"

    def start_baseline(self) -> list[str]:
        return ["mse", "absent"]


def test_start_baseline_is_evaluated_once_before_training_and_kept_across_resume(tmp_path: Path, caplog) -> None:
    import json
    import logging

    run = tmp_path / "run"
    task = _StartBaseline(_Config(_trainer(max_steps=4, ckpt_every=2, keep_checkpoints=5)))
    with caplog.at_level(logging.INFO, logger="fiber_train.loop"):
        result = fit(task, run)
    records = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 4]
    start = records[0]["mse"]
    assert result.metrics["baseline/mse"] == start and "baseline/absent" not in result.metrics
    assert result.metrics["mse"] < start  # the regression trained
    assert json.loads((run / "eval.json").read_text())["baseline/mse"] == start
    line = f"start held-out mse {result.metrics['mse']:.1f} vs baseline {start:.1f} (the model before training)"
    assert line in caplog.text

    more = _StartBaseline(_Config(_trainer(max_steps=6, ckpt_every=2, keep_checkpoints=5)))
    resumed = fit(more, run)  # from step 4: no second evaluation before training, the baseline comes back
    assert resumed.metrics["baseline/mse"] == start
    assert [json.loads(line)["step"] for line in (run / "eval.jsonl").read_text().splitlines()] == [0, 4, 6]
