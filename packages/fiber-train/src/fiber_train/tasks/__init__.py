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
from fiber_train.tasks.caption import CaptionConfig, CaptionTask
from fiber_train.tasks.coarse import CoarseModel, CoarsePretrainTask
from fiber_train.tasks.fine import FineConfig, FinePretrainTask
from fiber_train.tasks.grounding_finetune import (
    DetectionFinetuneTask,
    GroundingFinetuneConfig,
    PhraseGroundingTask,
    RefExpTask,
)
from fiber_train.tasks.nlvr2 import NLVR2Config, NLVR2Task
from fiber_train.tasks.retrieval import RetrievalConfig, RetrievalTask
from fiber_train.tasks.vqa import VQAConfig, VQATask


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
    "fine": TaskSpec(
        FinePretrainTask, FineConfig, "pretrain", "fine/tiny", "fine-grained pre-training (grounding and detection)"
    ),
    "caption": TaskSpec(CaptionTask, CaptionConfig, "finetune", "finetune/caption_tiny", "captioning (MLE / CIDEr)"),
    "nlvr2": TaskSpec(NLVR2Task, NLVR2Config, "finetune", "finetune/nlvr2_tiny", "NLVR2 (two fused passes)"),
    "retrieval": TaskSpec(RetrievalTask, RetrievalConfig, "finetune", "finetune/retrieval_tiny", "ITC/ITM retrieval"),
    "vqa": TaskSpec(VQATask, VQAConfig, "finetune", "finetune/vqa_tiny", "VQAv2 (soft-score BCE, VQA accuracy)"),
    "refexp": TaskSpec(
        RefExpTask,
        GroundingFinetuneConfig,
        "finetune",
        "finetune/refexp_tiny",
        "referring expressions, RefCOCO/+/g (top-1 accuracy at GIoU >= 0.5)",
    ),
    "grounding": TaskSpec(
        PhraseGroundingTask,
        GroundingFinetuneConfig,
        "finetune",
        "finetune/grounding_tiny",
        "phrase grounding, Flickr30k Entities (R@1/5/10, ANY-box)",
    ),
    "detection": TaskSpec(
        DetectionFinetuneTask,
        GroundingFinetuneConfig,
        "finetune",
        "finetune/detection_tiny",
        "detection as grounding: COCO, LVIS (Fixed AP), ODinW / any COCO-format dataset, few-shot",
    ),
}
"""Task name -> :class:`TaskSpec`; the only place task names are looked up."""

__all__ = ["TASKS", "CoarseModel", "CoarsePretrainTask", "StepOutput", "TaskSpec", "TrainTask"]
