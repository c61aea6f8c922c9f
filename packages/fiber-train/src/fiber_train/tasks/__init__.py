"""Training tasks and the one explicit name -> task table.

To add a task: write a module in ``fiber_train/tasks/`` with a config dataclass (sections ``model``, ``data``,
``optim``, ``trainer``, ``eval`` like :class:`fiber_train.config.CoarseConfig`) and a class following
:class:`fiber_train.tasks.base.TrainTask`, ship a tiny recipe, and add one :class:`TaskSpec` line below. The
CLI (``fiber-train <name>`` for pre-training stages, ``fiber-train finetune <name>`` for downstream tasks)
is generated from this table.
"""

from __future__ import annotations

from dataclasses import dataclass

from fiber_train.config import CoarseConfig
from fiber_train.tasks.base import StepOutput, TrainTask
from fiber_train.tasks.coarse import CoarseModel, CoarsePretrainTask


@dataclass(frozen=True)
class TaskSpec:
    """One row of the task table.

    Attributes:
        task: the task class (constructed with the resolved config).
        config: the config dataclass.
        stage: ``"pretrain"`` (``fiber-train NAME``) or ``"finetune"`` (``fiber-train finetune NAME``).
        default_recipe: packaged recipe used when no ``--recipe`` is given (the tiny synthetic default).
        help: one line for ``--help``.
    """

    task: type
    config: type
    stage: str
    default_recipe: str
    help: str


TASKS: dict[str, TaskSpec] = {
    "coarse": TaskSpec(
        CoarsePretrainTask, CoarseConfig, "pretrain", "coarse/tiny", "coarse-grained pre-training (ITC + ITM + MLM)"
    ),
}
"""Task name -> :class:`TaskSpec`; the only place task names are looked up."""

__all__ = ["TASKS", "CoarseModel", "CoarsePretrainTask", "StepOutput", "TaskSpec", "TrainTask"]
