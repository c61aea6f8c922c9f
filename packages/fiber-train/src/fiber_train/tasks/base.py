"""The task Protocol: what the generic Fabric loop needs from a training task.

A task owns its model composition (backbone + heads), datasets, collation and evaluation; the loop owns
devices, precision, accumulation, clipping, scheduling, logging and checkpoints. ``fiber_train.tasks.TASKS``
is the one explicit name -> task table.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from torch import nn
from torch.utils.data import Dataset

from fiber_backbones import FiberBackbone, create_backbone
from fiber_models import StepOutput as StepOutput


class Fabricish(Protocol):
    """The part of ``lightning.fabric.Fabric`` that tasks use during evaluation."""

    device: Any
    global_rank: int
    world_size: int

    def autocast(self) -> Any: ...

    def all_gather(self, data: Any, group: Any = None, sync_grads: bool = False) -> Any: ...


class TrainTask(Protocol):
    """A training task driven by :func:`fiber_train.loop.fit`.

    Attributes:
        name: task name as in ``fiber-train <name>``.
        config: the task's resolved configuration dataclass (has ``trainer``, ``optim`` sections).

    Optional hooks the loop calls when a task defines them: ``attach_fabric(fabric)`` (before the model is
    built), ``build_scheduler(optimizer, max_steps)`` (its own lr schedule), ``train_sampler(n, seed, rank,
    world)`` (a resumable sampler), ``on_step_end(model, step)`` (after each optimiser step, e.g. EMA),
    ``state_dict()`` / ``load_state_dict(state)`` (extra checkpointed state), ``should_stop()`` (read after each
    periodic evaluation: early stopping) and a ``run_dir`` attribute (set to the run directory).
    """

    name: str
    config: Any

    def prepare_data(self) -> None:
        """Create or check data on disk (runs on rank 0 first, e.g. generating the synthetic world)."""
        ...

    def build_model(self) -> nn.Module:
        """The full model; its ``forward(batch)`` returns a :class:`StepOutput`."""
        ...

    def param_groups(self, model: nn.Module) -> list[dict]:
        """AdamW parameter groups (see :func:`fiber_train.optim.build_param_groups`)."""
        ...

    def train_dataset(self) -> Dataset:
        """The training dataset (map-style)."""
        ...

    def collate_fn(self) -> Callable[[list[Any]], Any]:
        """Turns a list of samples into the batch object the model's ``forward`` takes."""
        ...

    def evaluate(self, model: nn.Module, fabric: Fabricish) -> dict[str, float]:
        """Metrics of ``model`` (the unwrapped module) on the evaluation split."""
        ...

    def export(self, model: nn.Module, out_dir: Any) -> None:
        """Write inference weights and configs (``save_pretrained``-style) into ``out_dir``."""
        ...


def missing_tokenizer_message(path: Path) -> str:
    """The error for a missing ``<data.root>/tokenizer.json`` (data.tokenizer unset): what to put where."""
    return (
        f"{path}: tokenizer not found (data.tokenizer is unset, so it is looked for in data.root). Set "
        "data.tokenizer=PATH to a tokenizer file or folder (a Hugging Face tokenizer folder works), or train one on "
        f"your captions: `fiber-data train-tokenizer --ann CAPTIONS.json --vocab-size 8000 --out {path}`"
    )


def build_backbone(model_cfg: Any, vocab_size: int, **extra: Any) -> FiberBackbone:
    """``create_backbone(model.backbone, **model.overrides, **extra)`` with the text vocabulary set to the
    tokenizer's, unless the recipe sets ``text.vocab_size`` itself. Every task builds its backbone here."""
    overrides = dict(model_cfg.overrides)
    text = dict(overrides.get("text", {}))
    text.setdefault("vocab_size", vocab_size)
    return create_backbone(model_cfg.backbone, **{**overrides, **extra, "text": text})
