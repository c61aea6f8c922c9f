"""The task Protocol: what the trainer (:class:`fiber_train.loop.Trainer`) needs from a training task.

A task owns its model composition (backbone + heads), datasets, collation and evaluation; the loop owns
devices, precision, accumulation, clipping, scheduling, logging and checkpoints. A task derives from
:class:`TaskHooks` (the optional hooks with their defaults) and satisfies :class:`TrainTask`.
``fiber_train.tasks.TASKS`` is the one explicit name -> task table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, cast

import torch
from torch import nn
from torch.utils.data import Dataset

from fiber_backbones import FiberBackbone, create_backbone
from fiber_models import StepOutput as StepOutput


class Fabricish(Protocol):
    """The part of ``lightning.fabric.Fabric`` that tasks use during evaluation."""

    # read-only properties on Fabric
    @property
    def device(self) -> Any: ...

    @property
    def global_rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    def autocast(self) -> Any: ...

    def all_gather(self, data: Any, group: Any = None, sync_grads: bool = False) -> Any: ...


class TrainTask(Protocol):
    """A training task driven by :class:`fiber_train.loop.Trainer` (:func:`fiber_train.loop.fit`).

    The required members are the first seven methods; the hooks after them are optional: derive the task from
    :class:`TaskHooks`, which declares each of them with its default, and override those it needs. Every hook
    receives what it needs as arguments (the Fabric, the step), so none depends on another having run first.

    Attributes:
        name: task name as in ``fiber-train <name>``.
        config: the task's resolved configuration dataclass (has ``trainer``, ``optim``, ``data``, ``eval``).
        run_dir: the run directory (set by the trainer before any other hook runs; ``None`` outside a run):
            evaluation writes prediction files there.
    """

    # properties: a class attribute, an instance attribute or a property (PlainTask's) all provide them
    @property
    def name(self) -> str: ...

    @property
    def config(self) -> Any: ...

    @property
    def baseline_name(self) -> str:
        """What the task's ``baseline/<key>`` metrics are (printed beside them at the end of a run)."""
        ...

    @property
    def run_dir(self) -> Path | None: ...

    @run_dir.setter
    def run_dir(self, value: Path | None) -> None: ...

    def prepare_data(self) -> None:
        """Create or check data on disk (runs on rank 0 first, e.g. generating the synthetic world)."""
        ...

    def build_model(self, fabric: Fabricish | None = None) -> nn.Module:
        """The full model; its ``forward(batch)`` returns a :class:`StepOutput`. ``fabric``: the run's Fabric
        (rank, world size, all-gather across processes); ``None`` outside a training run (one process)."""
        ...

    def param_groups(self, model: nn.Module) -> list[dict]:
        """AdamW parameter groups (see :func:`fiber_train.optim.build_param_groups`)."""
        ...

    def train_dataset(self, fabric: Fabricish | None = None) -> Dataset:
        """The training dataset (map-style or a stream); ``fabric`` as in :meth:`build_model`."""
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

    # -------------------------------------------------------------- optional hooks (defaults: TaskHooks)

    def build_scheduler(self, optimizer: torch.optim.Optimizer, max_steps: int) -> Any | None:
        """The task's own step-level lr schedule; ``None``: the trainer's schedule from ``config.optim``."""
        ...

    def train_sampler(self, num_samples: int, seed: int, rank: int, world_size: int) -> Any | None:
        """A resumable sampler (``set_position(epoch, offset)``) over a map-style dataset; ``None``: uniform."""
        ...

    def data_report(self) -> Mapping[str, int]:
        """Records the loaders repaired or dropped while reading, ``{"<source>/<kind>": count}`` (logged)."""
        ...

    def on_step_end(self, model: nn.Module, step: int) -> None:
        """After each optimiser step (``step`` counts from 1), e.g. an EMA update."""
        ...

    def should_stop(self) -> bool:
        """Read after each periodic evaluation: ``True`` stops training early (then export and evaluate)."""
        ...

    def state_dict(self) -> dict[str, Any] | None:
        """Training state outside the weights, saved in checkpoints; ``None``: nothing to save."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (on resume, after the model is built)."""
        ...

    def start_baseline(self) -> Sequence[str]:
        """Metrics whose value before the first step is the task's baseline: the trainer then evaluates the
        model once before training and reports each as ``baseline/<key>`` beside the final figure (e.g.
        retrieval R@1 at its starting point, detection AP untrained). Empty: no evaluation before training."""
        ...


BASELINE_PREFIX = "baseline/"
"""Metric ``baseline/<key>``: the trivial baseline of metric ``<key>`` (issue 19), described by the task's
``baseline_name``; the trainer logs each beside its figure at the end of a run (:func:`baseline_lines`)."""


def baseline_lines(task_name: str, metrics: Mapping[str, float], baseline_name: str) -> list[str]:
    """One line per ``baseline/<key>`` of ``metrics`` whose ``<key>`` is there too: the figure beside its
    baseline, e.g. ``vqa held-out vqa/accuracy 38.7 vs baseline 12.0 (the most frequent ...)``."""
    lines = []
    for key, base in metrics.items():
        figure = key[len(BASELINE_PREFIX) :]
        if key.startswith(BASELINE_PREFIX) and figure in metrics:
            lines.append(
                f"{task_name} held-out {figure} {metrics[figure]:.1f} vs baseline {base:.1f} ({baseline_name})"
            )
    return lines


class TaskHooks:
    """Base class of a task: the optional hooks of :class:`TrainTask`, each with its default.

    Attributes:
        baseline_name: what the task's ``baseline/<key>`` metrics are (printed beside them at the end of a run).
    """

    run_dir: Path | None = None
    baseline_name: str = "the model before training"

    def build_scheduler(self, optimizer: torch.optim.Optimizer, max_steps: int) -> Any | None:
        """Default: ``None`` (the trainer builds the schedule from ``config.optim``)."""
        return None

    def train_sampler(self, num_samples: int, seed: int, rank: int, world_size: int) -> Any | None:
        """Default: ``None`` (the trainer's uniform :class:`fiber_train.sampling.ResumableRandomSampler`)."""
        return None

    def data_report(self) -> Mapping[str, int]:
        """Default: nothing repaired."""
        return {}

    def on_step_end(self, model: nn.Module, step: int) -> None:
        """Default: nothing."""

    def should_stop(self) -> bool:
        """Default: never stop early."""
        return False

    def state_dict(self) -> dict[str, Any] | None:
        """Default: ``None`` (no task state in checkpoints)."""
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Default: nothing to restore."""

    def start_baseline(self) -> Sequence[str]:
        """Default: none (no evaluation before training)."""
        return ()


class PlainTask(TaskHooks):
    """A task written as a plain class (not derived from :class:`TaskHooks`), seen as a :class:`TrainTask`.

    Such a task follows the earlier protocol: ``build_model()`` and ``train_dataset()`` without arguments, an
    optional ``attach_fabric(fabric)`` called before ``build_model``, and any of the optional hooks. Each hook
    it defines is called; each it lacks takes the :class:`TaskHooks` default. The trainer wraps such a task
    once (:func:`as_train_task`); this is the one place where optional hooks are looked up by name.
    """

    def __init__(self, task: Any) -> None:
        self.task = task
        self.baseline_name = getattr(task, "baseline_name", TaskHooks.baseline_name)

    @property
    def name(self) -> str:
        return self.task.name

    @property
    def config(self) -> Any:
        return self.task.config

    @property
    def run_dir(self) -> Path | None:
        return getattr(self.task, "run_dir", None)

    # a read-write property in place of TaskHooks' attribute: it forwards to the wrapped task
    @run_dir.setter
    def run_dir(self, value: Path | None) -> None:  # pyright: ignore[reportIncompatibleVariableOverride]
        if hasattr(self.task, "run_dir"):  # a plain task without the attribute writes no prediction files
            self.task.run_dir = value

    def prepare_data(self) -> None:
        self.task.prepare_data()

    def build_model(self, fabric: Fabricish | None = None) -> nn.Module:
        if fabric is not None and hasattr(self.task, "attach_fabric"):
            self.task.attach_fabric(fabric)
        return self.task.build_model()

    def param_groups(self, model: nn.Module) -> list[dict]:
        return self.task.param_groups(model)

    def train_dataset(self, fabric: Fabricish | None = None) -> Dataset:
        return self.task.train_dataset()

    def collate_fn(self) -> Callable[[list[Any]], Any]:
        return self.task.collate_fn()

    def evaluate(self, model: nn.Module, fabric: Fabricish) -> dict[str, float]:
        return self.task.evaluate(model, fabric)

    def export(self, model: nn.Module, out_dir: Any) -> None:
        self.task.export(model, out_dir)

    def _own(self, hook: str) -> Any:
        return getattr(self.task, hook, None)

    def build_scheduler(self, optimizer: torch.optim.Optimizer, max_steps: int) -> Any | None:
        own = self._own("build_scheduler")
        return None if own is None else own(optimizer, max_steps)

    def train_sampler(self, num_samples: int, seed: int, rank: int, world_size: int) -> Any | None:
        own = self._own("train_sampler")
        return None if own is None else own(num_samples, seed, rank, world_size)

    def data_report(self) -> Mapping[str, int]:
        own = self._own("data_report")
        return {} if own is None else own()

    def on_step_end(self, model: nn.Module, step: int) -> None:
        own = self._own("on_step_end")
        if own is not None:
            own(model, step)

    def should_stop(self) -> bool:
        own = self._own("should_stop")
        return False if own is None else bool(own())

    def state_dict(self) -> dict[str, Any] | None:
        own = self._own("state_dict")
        return None if own is None else own()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        own = self._own("load_state_dict")
        if own is not None:
            own(state)

    def start_baseline(self) -> Sequence[str]:
        own = self._own("start_baseline")
        return () if own is None else tuple(own())


def as_train_task(task: Any) -> TrainTask:
    """``task`` itself when it derives from :class:`TaskHooks`, else a :class:`PlainTask` view of it."""
    # a TaskHooks subclass implements the required members itself
    return cast(TrainTask, task) if isinstance(task, TaskHooks) else PlainTask(task)


def missing_tokenizer_message(path: Path) -> str:
    """The error for a missing ``<data.root>/tokenizer.json`` (data.tokenizer unset): what to put where."""
    return (
        f"{path}: tokenizer not found (data.tokenizer is unset, so it is looked for in data.root). Set "
        "data.tokenizer=PATH to a tokenizer file or folder (a Hugging Face tokenizer folder works), or train one on "
        f"your captions: `fiber-data train-tokenizer --ann CAPTIONS.json --vocab-size 8000 --out {path}`"
    )


class DataTokenizer:
    """The tokenizer of a task whose ``config.data`` is a :class:`fiber_train.config.DataSection` (every built-in
    task): where it is, the loaded tokenizer (once) and the check that it exists."""

    config: Any
    _tokenizer: Any = None

    def tokenizer_path(self) -> Path:
        """``data.tokenizer`` or ``<data.root>/tokenizer.json`` (:meth:`fiber_train.config.DataSection.tokenizer_path`)."""
        return self.config.data.tokenizer_path()

    def tokenizer_file(self) -> Path | None:
        """:meth:`tokenizer_path` when it is a file (an export copies it), else ``None`` (a folder or hub name)."""
        path = self.tokenizer_path()
        return path if path.is_file() else None

    @property
    def tokenizer(self) -> Any:
        """The tokenizer (loaded once, :meth:`fiber_train.config.DataSection.load_tokenizer`)."""
        if self._tokenizer is None:
            self._tokenizer = self.config.data.load_tokenizer()
        return self._tokenizer

    def check_tokenizer(self) -> None:
        """Raise ``FileNotFoundError`` (:func:`missing_tokenizer_message`) when ``data.tokenizer`` is unset and
        ``<data.root>/tokenizer.json`` is absent."""
        if not self.config.data.tokenizer and not self.tokenizer_path().exists():
            raise FileNotFoundError(missing_tokenizer_message(self.tokenizer_path()))


def save_coarse_family(model: Any, out_dir: Path, config: Any, *, tokenizer: Path | None, info: dict[str, Any]) -> None:
    """``model.save_pretrained`` for a model of the coarse family (coarse pre-training and its downstream tasks):
    the saved preprocessing is that of ``config.model.backbone`` at ``config.data.image_size`` /
    ``max_text_len`` with ``config.model.text_pool``; ``tokenizer`` (a file) is copied; ``info`` is the
    provenance."""
    from fiber_models.pretrained import Preprocessing

    model.save_pretrained(
        out_dir,
        tokenizer=tokenizer,
        preprocessing=Preprocessing.for_backbone(
            config.model.backbone,
            image_size=config.data.image_size,
            max_text_len=config.data.max_text_len,
            text_pool=config.model.text_pool,
        ),
        info=info,
    )


def build_backbone(model_cfg: Any, vocab_size: int, **extra: Any) -> FiberBackbone:
    """``create_backbone(model.backbone, **model.overrides, **extra)`` with the text vocabulary set to the
    tokenizer's, unless the recipe sets ``text.vocab_size`` itself. Every task builds its backbone here."""
    overrides = dict(model_cfg.overrides)
    text = dict(overrides.get("text", {}))
    text.setdefault("vocab_size", vocab_size)
    return create_backbone(model_cfg.backbone, **{**overrides, **extra, "text": text})
