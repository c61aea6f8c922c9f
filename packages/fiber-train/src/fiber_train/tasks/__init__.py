"""Training tasks and the one explicit name -> (task, config) table."""

from __future__ import annotations

from fiber_train.config import CoarseConfig
from fiber_train.tasks.base import StepOutput, TrainTask
from fiber_train.tasks.coarse import CoarseModel, CoarsePretrainTask

TASKS: dict[str, tuple[type, type]] = {
    "coarse": (CoarsePretrainTask, CoarseConfig),
}
"""``fiber-train <name>`` -> (task class, config dataclass)."""

__all__ = ["TASKS", "CoarseModel", "CoarsePretrainTask", "StepOutput", "TrainTask"]
