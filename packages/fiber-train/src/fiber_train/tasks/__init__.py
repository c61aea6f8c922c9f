"""Training tasks and the one explicit name -> task table.

To add a task: write a module in ``fiber_train/tasks/`` with a config dataclass (sections ``model``, ``data``,
``optim``, ``trainer``, ``eval`` like :class:`fiber_train.config.CoarseConfig`) and a class following
:class:`fiber_train.tasks.base.TrainTask`, ship a tiny recipe, and add one :class:`TaskSpec` line below. The
CLI (``fiber-train <name>`` for pre-training stages, ``fiber-train finetune <name>`` for downstream tasks)
is generated from this table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fiber_train._lazy import lazy_getattr, resolve

if TYPE_CHECKING:
    from fiber_train.tasks.base import StepOutput, TrainTask
    from fiber_train.tasks.coarse import CoarseModel, CoarsePretrainTask


@dataclass(frozen=True)
class TaskSpec:
    """One row of the task table. The task and config classes are named, not imported, so that building the
    CLI (``fiber-train --help``) does not import torch and every task module; :attr:`task` and :attr:`config`
    import them on first use.

    Attributes:
        task_ref: ``"module:Class"`` of the task class (constructed with the resolved config).
        config_ref: ``"module:Class"`` of the config dataclass.
        stage: ``"pretrain"`` (``fiber-train NAME``) or ``"finetune"`` (``fiber-train finetune NAME``).
        default_recipe: packaged recipe used when no ``--recipe`` is given (the tiny synthetic default).
        help: one line for ``--help``.
    """

    task_ref: str
    config_ref: str
    stage: str
    default_recipe: str
    help: str

    @property
    def task(self) -> type:
        """The task class (imported now)."""
        return resolve(self.task_ref)

    @property
    def config(self) -> type:
        """The config dataclass (imported now)."""
        return resolve(self.config_ref)


_T = "fiber_train.tasks."
_GROUNDING_CONFIG = _T + "grounding_finetune:GroundingFinetuneConfig"

TASKS: dict[str, TaskSpec] = {
    "coarse": TaskSpec(
        _T + "coarse:CoarsePretrainTask",
        "fiber_train.config:CoarseConfig",
        "pretrain",
        "coarse/tiny",
        "coarse-grained pre-training (ITC + ITM + MLM)",
    ),
    "fine": TaskSpec(
        _T + "fine:FinePretrainTask",
        _T + "fine:FineConfig",
        "pretrain",
        "fine/tiny",
        "fine-grained pre-training (grounding and detection)",
    ),
    "caption": TaskSpec(
        _T + "caption:CaptionTask",
        _T + "caption:CaptionConfig",
        "finetune",
        "finetune/caption_tiny",
        "captioning (MLE / CIDEr)",
    ),
    "nlvr2": TaskSpec(
        _T + "nlvr2:NLVR2Task", _T + "nlvr2:NLVR2Config", "finetune", "finetune/nlvr2_tiny", "NLVR2 (two fused passes)"
    ),
    "retrieval": TaskSpec(
        _T + "retrieval:RetrievalTask",
        _T + "retrieval:RetrievalConfig",
        "finetune",
        "finetune/retrieval_tiny",
        "ITC/ITM retrieval",
    ),
    "vqa": TaskSpec(
        _T + "vqa:VQATask",
        _T + "vqa:VQAConfig",
        "finetune",
        "finetune/vqa_tiny",
        "VQAv2 (soft-score BCE, VQA accuracy)",
    ),
    "refexp": TaskSpec(
        _T + "grounding_finetune:RefExpTask",
        _GROUNDING_CONFIG,
        "finetune",
        "finetune/refexp_tiny",
        "referring expressions, RefCOCO/+/g (top-1 accuracy at GIoU >= 0.5)",
    ),
    "grounding": TaskSpec(
        _T + "grounding_finetune:PhraseGroundingTask",
        _GROUNDING_CONFIG,
        "finetune",
        "finetune/grounding_tiny",
        "phrase grounding, Flickr30k Entities (R@1/5/10, ANY-box)",
    ),
    "detection": TaskSpec(
        _T + "grounding_finetune:DetectionFinetuneTask",
        _GROUNDING_CONFIG,
        "finetune",
        "finetune/detection_tiny",
        "detection as grounding: COCO, LVIS (Fixed AP), ODinW / any COCO-format dataset, few-shot",
    ),
}
"""Task name -> :class:`TaskSpec`; the only place task names are looked up."""

_LAZY = {
    "CoarseModel": _T + "coarse",
    "CoarsePretrainTask": _T + "coarse",
    "StepOutput": _T + "base",
    "TrainTask": _T + "base",
}
__getattr__ = lazy_getattr(__name__, _LAZY)

__all__ = ["TASKS", "CoarseModel", "CoarsePretrainTask", "StepOutput", "TaskSpec", "TrainTask"]
