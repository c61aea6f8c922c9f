"""Shared machinery of the coarse downstream tasks (docs/reference/training.md §2.1): initialisation from a coarse
pre-trained export, data preparation, parameter groups and export.

Every downstream model is a :class:`DownstreamModel`: the fusion backbone (``backbone.*``), the fused
projections/poolers (``projection.*``, as in :class:`~fiber_train.tasks.coarse.CoarseModel`) and task heads
under their official names (``vqa_classifier``, ``nlvr2_classifier``, ``itm_score``, ``mlm_score``,
``cross_modal_att_layers``, ...). A run's ``model/`` export is a saved :mod:`fiber_models` model like the coarse
export, so :func:`load_pretrained_into` initialises any downstream model from a coarse run *or* re-loads a
finished downstream run (``fiber-train evaluate --run``).

Fine-tuning loads non-strictly (docs/reference/training.md §2.1): the ITC queue is never stored (non-persistent buffers),
relative-position tables are resized to the task's window, and every parameter the checkpoint does not
provide keeps its fresh ``N(0, 0.02)`` initialisation; :class:`InitReport` lists which.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from fiber_data import CoarseTrainTransform, CocoCaptionsDataset, ImageTransform
from fiber_models.downstream import DownstreamModel as DownstreamModel
from fiber_models.downstream import set_text_pool
from fiber_models.pretrained import InitReport as InitReport
from fiber_models.pretrained import initialize_from
from fiber_train.config import DataConfig, EvalSection, ModelConfig, OptimConfig, TaskConfig, to_dict
from fiber_train.optim import build_param_groups
from fiber_train.tasks.base import DataTokenizer, TaskHooks, build_backbone, save_coarse_family

log = logging.getLogger(__name__)

__all__ = [
    "CaptionPairsTask",
    "DownstreamConfig",
    "DownstreamEvalConfig",
    "DownstreamModel",
    "DownstreamTaskBase",
    "InitReport",
    "build_backbone",
    "load_pretrained_into",
]


@dataclass(frozen=True)
class DownstreamEvalConfig(EvalSection):
    """Evaluation settings shared by the downstream tasks (``every`` and ``batch_size``: :class:`EvalSection`).

    Args:
        enabled: evaluate at the end of training (and every ``every`` steps).
        max_samples: evaluate only the first N samples of the evaluation split (0: all).
        start_baseline: evaluate the model once before training and report the task's ``start_metrics`` of
            that evaluation as ``baseline/<key>`` beside the final figures (the starting point as baseline).
    """

    enabled: bool = True
    max_samples: int = 0
    start_baseline: bool = False


@dataclass(frozen=True)
class DownstreamConfig(TaskConfig):
    """The sections of every coarse downstream task (``finetune vqa | nlvr2 | caption | retrieval``): the coarse
    family's model, data (text budget 50) and optimiser, and :class:`DownstreamEvalConfig`; each task adds its
    own settings section."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(max_text_len=50))
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: DownstreamEvalConfig = field(default_factory=DownstreamEvalConfig)


def load_pretrained_into(model: DownstreamModel, path: str | Path) -> InitReport:
    """Initialise ``model`` non-strictly from a saved model, a run directory or a backbone directory
    (:func:`fiber_models.initialize_from`).

    Returns:
        The :class:`InitReport` (which keys stayed fresh, which were unused).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        fiber_models.ModelFormatError: unreadable weights.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model.pretrained={path} not found (expected RUN_DIR/model of a fiber-train run)")
    return initialize_from(model, path)


class DownstreamTaskBase(DataTokenizer, TaskHooks):
    """Data preparation, tokenizer, model initialisation, parameter groups and export of a downstream task.

    Subclasses set ``name``, implement ``build_model`` (calling :meth:`init_from_pretrained`),
    ``train_dataset``, ``collate_fn``, ``evaluate``, and list their data files in :meth:`required_files`.

    Attributes:
        run_dir: when set, ``evaluate`` also writes its predictions there in the official formats.
        init_report: what :meth:`init_from_pretrained` loaded (``None`` without ``model.pretrained``).
    """

    name = "downstream"
    start_metrics: tuple[str, ...] = ()
    """The metrics reported at their starting point with ``eval.start_baseline`` (:meth:`start_baseline`)."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.init_report: InitReport | None = None
        # Where evaluation writes prediction files (VQA submission, captions, NLVR2 predictions); set by the
        # caller that owns the run directory. ``None``: predictions are scored but not written.
        self.run_dir: Path | None = None

    # ------------------------------------------------------------------------------------------- data

    @property
    def data(self) -> DataConfig:
        """The ``data`` section of the config."""
        return self.config.data

    def required_files(self) -> Sequence[Path]:
        """Files/folders that must exist after :meth:`prepare_data` (checked, named in the error)."""
        return ()

    def data_help(self) -> str:
        """One sentence on the expected data layout, appended to missing-file errors."""
        return "Create a synthetic world with `fiber-data synth --out DIR` (it holds every downstream format)."

    def prepare_data(self) -> None:
        """Generate the synthetic world when ``data.format`` is ``synthetic``; check the needed files exist."""
        data = self.data
        if data.format == "synthetic":
            data.ensure_synthetic_world(progress=self.config.trainer.progress)
        for p in [*self.required_files(), *([] if data.tokenizer else [self.tokenizer_path()])]:
            if not Path(p).exists():
                raise FileNotFoundError(f"{p} not found (task {self.name}, data.root={data.root}). {self.data_help()}")

    def data_file(self, template: str, split: str) -> Path:
        """``<data.root>/<template formatted with split>`` (the file templates of a task's settings section)."""
        return Path(self.data.root) / template.format(split=split)

    def image_transform(self) -> ImageTransform:
        """Bicubic ``S x S`` resize + ImageNet normalisation (the evaluation transform of docs/reference/training.md §2.1)."""
        return ImageTransform(self.data.image_size)

    def train_transform(self, augment: bool) -> Callable[[Any], Any]:
        """The training transform: :class:`fiber_data.CoarseTrainTransform` (RandomResizedCrop(0.5, 1) + flip +
        RandAugment(2, 7), docs/reference/training.md §2.1) when ``augment``, else :meth:`image_transform`."""
        return CoarseTrainTransform(self.data.image_size) if augment else self.image_transform()

    def start_baseline(self) -> Sequence[str]:
        """:attr:`start_metrics` with ``eval.start_baseline`` (the trainer evaluates before the first step)."""
        e = self.config.eval
        return self.start_metrics if e.start_baseline and e.enabled else ()

    # ------------------------------------------------------------------------------------------- evaluate

    def eval_subset(self, dataset: Dataset) -> Dataset:
        """The first ``eval.max_samples`` items of the map-style ``dataset`` (a :class:`~torch.utils.data.Subset`),
        or ``dataset`` itself when ``eval.max_samples`` is 0."""
        limit = self.config.eval.max_samples
        # a map-style dataset has a length (torch's Dataset type does not declare it)
        return Subset(dataset, range(min(limit, len(cast(Sized, dataset))))) if limit else dataset

    def eval_loader(self, dataset: Dataset, collate_fn: Callable[[list[Any]], Any] | None = None) -> DataLoader:
        """Evaluation batches of ``dataset`` in order: ``eval.batch_size`` items each, ``data.num_workers``
        workers, ``collate_fn`` (``None``: PyTorch's default collation, e.g. ``[B, 3, S, S]`` image tensors)."""
        return DataLoader(
            dataset,
            batch_size=self.config.eval.batch_size,
            collate_fn=collate_fn,
            num_workers=self.data.num_workers,
        )

    # ------------------------------------------------------------------------------------------ model

    def init_from_pretrained(self, model: DownstreamModel) -> DownstreamModel:
        """Apply ``model.text_pool`` to the poolers, load ``model.pretrained`` (when set) into ``model`` and print
        which keys were initialised fresh."""
        set_text_pool(model, self.config.model.text_pool)
        if self.config.model.pretrained:
            self.init_report = load_pretrained_into(model, self.config.model.pretrained)
            log.info(f"[{self.name}] {self.init_report.summary()}")
        return model

    def param_groups(self, model: nn.Module) -> list[dict]:
        """AdamW groups: fusion modules + projections ``cross_modal``, task heads ``head``, the rest ``base``."""
        assert isinstance(model, DownstreamModel)
        cross = list(model.backbone.fusion_parameters())
        for m in model.cross_modal_modules():
            cross += list(m.parameters())
        heads = [p for m in model.head_modules() for p in m.parameters()]
        no_decay = {f"backbone.{n}" for n in model.backbone.no_weight_decay()}
        return build_param_groups(model, self.config.optim, {"cross_modal": cross, "head": heads}, no_decay)

    # ------------------------------------------------------------------------------------------- export

    def export(self, model: nn.Module, out_dir: Path) -> None:
        """Write the model in the saved format of :mod:`fiber_models` (``config.json``, ``model.safetensors``,
        the tokenizer) with the task name, resolved config and initialisation report as provenance."""
        assert isinstance(model, DownstreamModel)
        info: dict[str, Any] = {"task": self.name, "config": to_dict(self.config)}
        if self.init_report is not None:
            info["init"] = self.init_report.to_dict()
        save_coarse_family(model, out_dir, self.config, tokenizer=self.tokenizer_file(), info=info)


class CaptionPairsTask(DownstreamTaskBase):
    """A downstream task trained on the (image, caption) pairs of a COCO-captions settings section (captioning,
    retrieval): the section is ``config.<name>`` with ``annotations`` and ``images`` file templates and
    ``augment``."""

    #: the task, as the first word of the missing-data help (``Captioning``, ``Retrieval``)
    title = ""
    _train: CocoCaptionsDataset | None = None

    @property
    def settings(self) -> Any:
        """The task's settings section (``config.<name>``)."""
        return getattr(self.config, self.name)

    def required_files(self) -> Sequence[Path]:
        """The ``annotations`` file and ``images`` folder for ``data.train_split`` and ``data.eval_split``."""
        splits = (self.data.train_split, self.data.eval_split)
        return [self.data_file(t, sp) for sp in splits for t in (self.settings.annotations, self.settings.images)]

    def data_help(self) -> str:
        return (
            f"{self.title} expects a COCO-captions file at {self.name}.annotations and images under {self.name}.images "
            "(templates with {split}); `fiber-data synth --out DIR` writes them."
        )

    def train_dataset(self, fabric: Any = None) -> Dataset:
        """(image, caption) pairs of ``data.train_split``, built once (an image with k captions is visited k times;
        retrieval's ITM collator draws its negatives from them)."""
        if self._train is None:
            split = self.data.train_split
            self._train = CocoCaptionsDataset(
                self.data_file(self.settings.annotations, split),
                self.data_file(self.settings.images, split),
                transform=self.train_transform(self.settings.augment),
            )
        return self._train


def batched(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    """Consecutive slices of ``items`` of at most ``size`` elements."""
    for start in range(0, len(items), size):
        yield items[start : start + size]
