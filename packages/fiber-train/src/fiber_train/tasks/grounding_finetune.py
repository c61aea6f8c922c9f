"""Fine-grained downstream tasks (docs/reference/training.md §4): ``fiber-train finetune refexp | grounding | detection``.

All three use the fine model, input pipeline, AdamW groups, schedule, EMA and export of fine-grained
pre-training (:class:`~fiber_train.tasks.fine.FinePretrainTask`); they differ in their training file and
evaluation:

- ``refexp`` (RefCOCO / RefCOCO+ / RefCOCOg, §4.4): MDETR-style file with one box per expression; no flip;
  evaluated with top-1 accuracy at GIoU >= 0.5 (docs/reference/evaluation.md §7) with the REC inference settings.
- ``grounding`` (Flickr30k Entities, §4.6): MDETR-style grounding file; evaluated with phrase R@1/5/10, ANY-box
  (docs/reference/evaluation.md §6), on the raw Entities files (``data.eval_source=flickr``) or an MDETR file.
- ``detection`` (COCO §4.2, LVIS §4.3, ODinW §4.5): any COCO-format detection file used as grounding with
  class-name prompts (all classes shuffled, all classes in order with optional per-class prompt text, or
  positives + sampled negatives); few-shot subsets; evaluated with COCO AP or LVIS Fixed AP (chunked prompts).

``trainer.max_steps=0`` evaluates the initial model (``model.pretrained``) without training: the zero-shot
setting (e.g. COCO or LVIS zero-shot with a fine pre-trained run or a converted official checkpoint).
Checkpoint selection (ODinW): ``eval.every`` with ``eval.keep_best`` exports the best model on the evaluation
split to ``RUN/best``; ``eval.plateau_patience`` lowers the learning rate and ``eval.early_stop_patience``
ends training when ``eval.select_metric`` stops improving.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, cast

from torch import nn
from torch.utils.data import Dataset, Subset

from fiber_data import (
    DetectionGroundingDataset,
    DetectionPromptSampler,
    GroundingTransform,
    MdetrGroundingDataset,
    token_counter,
)
from fiber_eval.refexp import Criterion
from fiber_heads.grounding import PostprocessConfig
from fiber_train.checkpoint import write_dir_atomically
from fiber_train.config import TaskConfig
from fiber_train.data_sources import OnError
from fiber_train.tasks.base import Fabricish
from fiber_train.tasks.fine import (
    FineModelConfig,
    FineOptimConfig,
    FinePretrainTask,
    GroundingDataBase,
    GroundingEvalBase,
)
from fiber_train.tasks.grounding_common import GroundingLRScheduler, GroundingModel
from fiber_train.tasks.grounding_eval import (
    PromptText,
    build_predictor,
    detection_metrics,
    phrase_grounding_metrics,
    refexp_metrics,
)

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from fiber_train.predictor import GroundingPredictor

__all__ = [
    "DetectionFinetuneTask",
    "DetectionPromptConfig",
    "GroundingFinetuneConfig",
    "GroundingFinetuneDataConfig",
    "GroundingFinetuneEvalConfig",
    "GroundingFinetuneOptimConfig",
    "GroundingFinetuneTask",
    "PhraseGroundingTask",
    "RefExpTask",
]


@dataclass(frozen=True)
class GroundingFinetuneModelConfig(FineModelConfig):
    """The fine model of :class:`~fiber_train.tasks.fine.FineModelConfig`; downstream tasks freeze nothing by
    default (docs/reference/training.md §4; ODinW sets ``freeze_level: 2``). ``pretrained`` is a fine run (or its ``model/``,
    or a converted official fine checkpoint): backbone and grounding head are loaded."""

    freeze_level: int = -1


@dataclass(frozen=True)
class DetectionPromptConfig:
    """Class-name prompts of the ``detection`` task (docs/reference/training.md §3.8, §4.2-§4.5; docs/reference/data-formats.md §11.4).

    Args:
        train: ``shuffled`` (COCO: every class, order shuffled per sample), ``ordered`` (ODinW: every class in
            category order) or ``sampled`` (LVIS: the classes present plus sampled negatives, §3.8).
        negative_control / max_negatives / max_tokens: the negative sampling of ``sampled`` (LVIS: always the
            full negatives, ``(0, 0, 1, 0)``, up to 85; 254-token budget).
        names: category-name overrides, original name -> prompt name (ODinW).
        prefixes / suffixes: per original category name, prompt text before / after the name (ODinW caption
            prompts; the grounded span is the name). Only with ``train: ordered``, as in the reference.
        classes_per_prompt: evaluation prompts hold at most this many names (LVIS: 40); 0 = as many as fit in
            ``data.max_text_len``.
    """

    train: str = "shuffled"
    negative_control: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 0.0)
    max_negatives: int = 85
    max_tokens: int = 254
    names: dict[str, str] = field(default_factory=dict)
    prefixes: dict[str, str] = field(default_factory=dict)
    suffixes: dict[str, str] = field(default_factory=dict)
    classes_per_prompt: int = 0

    def __post_init__(self) -> None:
        if self.train not in ("shuffled", "ordered", "sampled"):
            raise ValueError(f"data.prompts.train must be shuffled, ordered or sampled, got {self.train!r}")
        if (self.prefixes or self.suffixes) and self.train != "ordered":
            raise ValueError(
                "data.prompts.prefixes/suffixes need data.prompts.train=ordered (the reference refuses caption "
                "prompts with a shuffled class order)"
            )
        if self.classes_per_prompt < 0:
            raise ValueError(f"data.prompts.classes_per_prompt must be >= 0, got {self.classes_per_prompt}")

    def text(self) -> PromptText:
        """The names / prefixes / suffixes as a :class:`~fiber_train.tasks.grounding_eval.PromptText`."""
        return PromptText(self.names, self.prefixes, self.suffixes)


@dataclass(frozen=True)
class GroundingFinetuneDataConfig(GroundingDataBase):
    """Data of the fine-grained downstream tasks; the input pipeline fields (``root``, ``format``, ``tokenizer``,
    sizes, flip, normalisation, text budget, batch, synthetic world) are those of
    :class:`~fiber_train.tasks.fine.GroundingDataBase`.

    Args:
        train_ann / train_images: training file and image folder (``{split}`` = ``train_split``; relative paths
            are under ``root``). An empty ``train_ann`` is the synthetic world's file of the task
            (``annotations/refexp_{split}.json``, ``grounding_{split}.json``, ``instances_{split}.json``).
        eval_ann / eval_images: evaluation file and images (``{split}`` = ``eval_split``); empty ``eval_ann``:
            as ``train_ann``. For ``grounding`` with ``eval_source: flickr``, ``eval_ann`` is the Flickr30k
            Entities folder (``Annotations/``, ``Sentences/``, ``<split>.txt``).
        eval_source: ``grounding`` only: ``mdetr`` (phrases = distinct ``tokens_positive`` of an MDETR file) or
            ``flickr`` (the raw Entities files, the official ground truth).
        prompts: class-name prompts of the ``detection`` task.
        few_shot: ``detection``: train on a ``few_shot``-shot subset (0: all images; see
            :meth:`fiber_data.DetectionGroundingDataset.few_shot_indices`).
        few_shot_copies: repeat the few-shot subset this many times per epoch (8/4/2/1 for 1/3/5/10 shots).
        flip_text: what a flip does to a caption's "left"/"right" (``keep``: the reference; ``swap``; ``skip``),
            see :class:`fiber_data.GroundingTransform`.
    """

    train_ann: str = ""
    train_images: str = "images/{split}"
    eval_ann: str = ""
    eval_images: str = "images/{split}"
    eval_split: str = "val"
    eval_source: str = "mdetr"
    prompts: DetectionPromptConfig = field(default_factory=DetectionPromptConfig)
    few_shot: int = 0
    few_shot_copies: int = 1
    flip_text: str = "keep"
    batch_size: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.eval_source not in ("mdetr", "flickr"):
            raise ValueError(f"data.eval_source must be 'mdetr' or 'flickr', got {self.eval_source!r}")
        if self.few_shot < 0 or self.few_shot_copies < 1:
            raise ValueError("data.few_shot must be >= 0 and data.few_shot_copies >= 1")


@dataclass(frozen=True)
class GroundingFinetuneOptimConfig(FineOptimConfig):
    """The fine-stage optimiser (:class:`~fiber_train.tasks.fine.FineOptimConfig`) with the downstream defaults
    of docs/reference/training.md §4.1: lr 1e-5 for both towers, weight decay 1e-4, EMA 0.999, no weight-decay milestones."""

    lr: float = 1e-5
    language_lr: float = 1e-5
    weight_decay: float = 1e-4
    wd_milestone_ratio: float = 0.0


@dataclass(frozen=True)
class GroundingFinetuneEvalConfig(GroundingEvalBase):
    """Evaluation, checkpoint selection and early stopping; ``every``, ``batch_size`` (images per forward),
    ``max_images`` (here the first N images / expressions / sentences), ``use_ema`` and ``start_baseline`` are
    those of :class:`~fiber_train.tasks.fine.GroundingEvalBase`.

    Args:
        enabled: evaluate at the end (and every ``every`` steps).
        protocol: ``detection``: ``coco`` (COCO API AP; COCO, ODinW) or ``lvis`` (Fixed AP; 40 classes per prompt
            and 300 detections per prompt unless set).
        criterion: ``refexp``: ``giou`` (FIBER/MDETR) or ``iou`` (conventional accuracy).
        score_thresh / pre_nms_top_n / detections_per_img: post-processing; unset (``null``) = the task's
            setting (detection 0.05 / 1000 / 100, LVIS 300 detections; refexp and grounding 0.0 / 3000 / 100).
        select_metric: metric that decides "better" for ``keep_best``, ``plateau_patience`` and
            ``early_stop_patience`` (empty: ``bbox/AP``, ``giou/all/P@1`` or ``R@1``).
        keep_best: export the best model so far to ``RUN/best`` at every improving evaluation.
        plateau_patience: multiply the learning rate by ``plateau_factor`` after this many evaluations without
            improvement (ODinW: 3; 0 disables).
        plateau_factor: the lr factor on a plateau.
        early_stop_patience: stop training after this many evaluations without improvement (ODinW: 8; 0 off).
    """

    enabled: bool = True
    protocol: str = "coco"
    criterion: str = "giou"
    score_thresh: float | None = None
    pre_nms_top_n: int | None = None
    detections_per_img: int | None = None
    select_metric: str = ""
    keep_best: bool = False
    plateau_patience: int = 0
    plateau_factor: float = 0.1
    early_stop_patience: int = 0

    def __post_init__(self) -> None:
        if self.protocol not in ("coco", "lvis"):
            raise ValueError(f"eval.protocol must be 'coco' or 'lvis', got {self.protocol!r}")
        if self.criterion not in ("giou", "iou"):
            raise ValueError(f"eval.criterion must be 'giou' or 'iou', got {self.criterion!r}")
        if (self.keep_best or self.plateau_patience or self.early_stop_patience) and not self.enabled:
            raise ValueError("eval.keep_best / plateau_patience / early_stop_patience need eval.enabled=true")


@dataclass(frozen=True)
class GroundingFinetuneConfig(TaskConfig):
    """Complete configuration of ``fiber-train finetune refexp | grounding | detection``: the fine family's
    sections with the downstream defaults."""

    task: str = "refexp"
    model: GroundingFinetuneModelConfig = field(default_factory=GroundingFinetuneModelConfig)
    data: GroundingFinetuneDataConfig = field(default_factory=GroundingFinetuneDataConfig)
    optim: GroundingFinetuneOptimConfig = field(default_factory=GroundingFinetuneOptimConfig)
    eval: GroundingFinetuneEvalConfig = field(default_factory=GroundingFinetuneEvalConfig)


# -------------------------------------------------------------------------------------------------- tasks


class GroundingFinetuneTask(FinePretrainTask):
    """Base of the fine-grained downstream tasks (see the module docstring).

    Subclasses set :attr:`name`, :attr:`synthetic_ann` and :attr:`default_metric` and implement
    :meth:`train_dataset` and :meth:`metrics`. Besides the :class:`~fiber_train.tasks.base.TrainTask` methods
    (model, groups, schedule, EMA, collation and export come from fine pre-training) the task tracks the best
    evaluation (``keep_best``, plateau lr, :meth:`should_stop`) in its checkpointed state.
    """

    name: ClassVar[str] = ""
    synthetic_ann: ClassVar[str] = ""
    """The synthetic world's file of the task (used when ``data.train_ann`` is empty)."""
    default_metric: ClassVar[str] = ""
    start_metrics: ClassVar[tuple[str, ...]] = ()

    config: GroundingFinetuneConfig

    def __init__(self, config: GroundingFinetuneConfig) -> None:
        if config.task != self.name:
            raise ValueError(
                f"the configuration is for task {config.task!r} but this is `fiber-train finetune {self.name}`: "
                f"use a {self.name} recipe (`fiber-train recipes`) or set task: {self.name}"
            )
        # duck-typed: a grounding fine-tuning config has every section that FinePretrainTask reads
        super().__init__(config)  # pyright: ignore[reportArgumentType]
        self.run_dir: Path | None = None
        self.best: float | None = None
        self.evals_since_best = 0
        self.evals_since_lr_drop = 0
        self._scheduler: GroundingLRScheduler | None = None

    # ------------------------------------------------------------------------------------------- data

    def train_ann(self) -> Path:
        """The training file (``data.train_ann`` or the synthetic world's file of the task)."""
        d = self.config.data
        return d.resolve(d.train_ann or self.synthetic_ann, d.train_split)

    def eval_ann(self) -> Path:
        """The evaluation file (or Flickr30k Entities folder)."""
        d = self.config.data
        return d.resolve(d.eval_ann or d.train_ann or self.synthetic_ann, d.eval_split)

    def prepare_data(self) -> None:
        """Generate the synthetic world when asked for; check that the files exist (the error names them)."""
        d = self.config.data
        if d.format == "synthetic":
            d.ensure_synthetic_world(progress=self.config.trainer.progress)
        paths = [self.train_ann(), d.resolve(d.train_images, d.train_split)]
        if self.config.eval.enabled:
            paths += [self.eval_ann(), d.resolve(d.eval_images, d.eval_split)]
        if not d.tokenizer:
            paths.append(self.tokenizer_path())
        for path in paths:
            if not path.exists():
                raise FileNotFoundError(
                    f"{path} not found. `fiber-train finetune {self.name}` reads data.train_ann / data.train_images "
                    "and data.eval_ann / data.eval_images (relative to data.root, {split} substituted); set "
                    f"data.format=synthetic to generate a synthetic world under {d.root}, or see "
                    "packages/fiber-data/README.md for the formats."
                )

    def train_transform(self) -> GroundingTransform:
        """Multi-scale resize, flip (``data.flip_prob``, ``data.flip_text``) and normalisation."""
        d = self.config.data
        return GroundingTransform(
            d.min_sizes,
            d.max_size,
            d.flip_prob,
            train=True,
            bgr255=d.bgr255,
            flip_text=cast(Literal["keep", "swap", "skip"], d.flip_text),  # checked in the config's __post_init__
        )

    def train_dataset(self, fabric: Fabricish | None = None) -> Dataset:
        """MDETR-style grounding samples of :meth:`train_ann` (one per expression / caption)."""
        d = self.config.data
        ann = self.train_ann()
        images = d.resolve(d.train_images, d.train_split)
        on_error = cast(OnError, d.on_error)  # checked in the config's __post_init__
        ds = MdetrGroundingDataset(ann, images, self.train_transform(), on_error=on_error)
        self._note_repairs(Path(ann), ds)
        return self._with_error_policy(ds, Path(ann))

    # ------------------------------------------------------------------------------------------ model

    def build_scheduler(self, optimizer: Any, max_steps: int) -> GroundingLRScheduler:
        """The fine-stage schedule (kept to lower the lr on a plateau)."""
        self._scheduler = super().build_scheduler(optimizer, max_steps)
        return self._scheduler

    # ----------------------------------------------------------------------------------------- evaluate

    def postprocess(self) -> PostprocessConfig:
        """Post-processing: the task's settings with the ``eval`` overrides applied."""
        base = self.default_postprocess()
        e = self.config.eval
        return PostprocessConfig(
            pre_nms_thresh=base.pre_nms_thresh if e.score_thresh is None else e.score_thresh,
            pre_nms_top_n=base.pre_nms_top_n if e.pre_nms_top_n is None else e.pre_nms_top_n,
            nms_thresh=base.nms_thresh,
            detections_per_img=base.detections_per_img if e.detections_per_img is None else e.detections_per_img,
        )

    def default_postprocess(self) -> PostprocessConfig:
        """Settings of ranked grounding (REC, phrases): every candidate, 3,000 per level (docs/reference/training.md §4.4)."""
        return PostprocessConfig.referring_expressions()

    def metrics(self, model: GroundingModel, fabric: Fabricish) -> dict[str, float]:
        """The task's metrics of ``model`` on the evaluation split (implemented by each task)."""
        raise NotImplementedError

    def predictor(
        self, model: GroundingModel, fabric: Fabricish, classes_per_prompt: int | None = None
    ) -> GroundingPredictor:
        """The evaluation predictor: the data config's test preprocessing and :meth:`postprocess`."""
        d = self.config.data
        return build_predictor(
            model, self.tokenizer, d, self.postprocess(), classes_per_prompt=classes_per_prompt, device=fabric.device
        )

    def evaluate(self, model: nn.Module, fabric: Fabricish) -> dict[str, float]:
        """Metrics on ``data.eval_split``; tracks the best value of ``eval.select_metric`` (printed on rank 0)."""
        if not self.config.eval.enabled:
            return {}
        model = self.model_to_evaluate(model)
        metrics = self.metrics(model, fabric)
        key = self.config.eval.select_metric or self.default_metric
        if key not in metrics:
            raise KeyError(f"eval.select_metric {key!r} is not among the metrics {sorted(metrics)}")
        improved = self._track(float(metrics[key]))
        metrics["best/" + key] = float(self.best if self.best is not None else metrics[key])
        if fabric.global_rank == 0:
            shown = [f"{k} {v:.1f}" for k, v in metrics.items() if not k.startswith(("num_", "best/"))]
            more = f"  (+{len(shown) - 6} more in eval.json)" if len(shown) > 6 else ""
            log.info(f"{self.name} on {self.config.data.eval_split}: {'  '.join(shown[:6])}{more}")
            if improved and self.config.eval.keep_best and self.run_dir is not None:
                write_dir_atomically(self.run_dir / "best", lambda out: self.export(model, out))
        return metrics

    def start_baseline(self) -> Sequence[str]:
        """:attr:`start_metrics` with ``eval.start_baseline`` (the trainer evaluates before the first step)."""
        e = self.config.eval
        return self.start_metrics if e.start_baseline and e.enabled else ()

    def _track(self, value: float) -> bool:
        e = self.config.eval
        if self.best is None or value > self.best:
            self.best, self.evals_since_best, self.evals_since_lr_drop = value, 0, 0
            return True
        self.evals_since_best += 1
        self.evals_since_lr_drop += 1
        if e.plateau_patience and self.evals_since_lr_drop >= e.plateau_patience and self._scheduler is not None:
            self._scheduler.scale_lr(e.plateau_factor)
            self.evals_since_lr_drop = 0
            log.info(f"{self.name}: no improvement in {e.plateau_patience} evaluations, lr x {e.plateau_factor}")
        return False

    def should_stop(self) -> bool:
        """Whether ``eval.early_stop_patience`` evaluations passed without improvement (read by the loop)."""
        patience = self.config.eval.early_stop_patience
        return bool(patience) and self.evals_since_best >= patience

    def state_dict(self) -> dict[str, Any]:
        """EMA weights and the selection state (best value, evaluations since the best / the last lr drop)."""
        state = super().state_dict()
        state["selection"] = {
            "best": self.best,
            "evals_since_best": self.evals_since_best,
            "evals_since_lr_drop": self.evals_since_lr_drop,
        }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` on resume."""
        super().load_state_dict(state)
        sel = state.get("selection", {})
        self.best = sel.get("best")
        self.evals_since_best = int(sel.get("evals_since_best", 0))
        self.evals_since_lr_drop = int(sel.get("evals_since_lr_drop", 0))


class RefExpTask(GroundingFinetuneTask):
    """``fiber-train finetune refexp``: RefCOCO / RefCOCO+ / RefCOCOg (docs/reference/training.md §4.4, docs/reference/evaluation.md §7)."""

    name = "refexp"
    baseline_name = "one of the image's objects picked at random"
    synthetic_ann = "annotations/refexp_{split}.json"
    default_metric = "giou/all/P@1"

    def metrics(self, model: GroundingModel, fabric: Fabricish) -> dict[str, float]:
        """Top-1 accuracy (and P@5, P@10) at GIoU (``eval.criterion``) >= 0.5, per dataset name and overall."""
        d, e = self.config.data, self.config.eval
        return refexp_metrics(
            self.predictor(model, fabric),
            self.eval_ann(),
            d.resolve(d.eval_images, d.eval_split),
            criterion=cast(Criterion, e.criterion),  # checked in GroundingFinetuneEvalConfig.__post_init__
            batch_size=e.batch_size,
            max_items=e.max_images,
            rank=fabric.global_rank,
            world_size=fabric.world_size,
        )


class PhraseGroundingTask(GroundingFinetuneTask):
    """``fiber-train finetune grounding``: Flickr30k Entities phrase grounding (docs/reference/training.md §4.6, docs/reference/evaluation.md
    §6); ``trainer.max_steps=0`` evaluates a fine pre-trained model directly, as the reference does."""

    name = "grounding"
    baseline_name = "one of the sentence's boxes picked at random for each phrase"
    synthetic_ann = "annotations/grounding_{split}.json"
    default_metric = "R@1"

    def metrics(self, model: GroundingModel, fabric: Fabricish) -> dict[str, float]:
        """R@1/5/10 and R@upper of every evaluated phrase (ANY-box)."""
        d, e = self.config.data, self.config.eval
        return phrase_grounding_metrics(
            self.predictor(model, fabric),
            ann=self.eval_ann(),
            images=d.resolve(d.eval_images, d.eval_split),
            split=d.eval_split,
            source=d.eval_source,
            batch_size=e.batch_size,
            max_items=e.max_images,
            rank=fabric.global_rank,
            world_size=fabric.world_size,
        )


class DetectionFinetuneTask(GroundingFinetuneTask):
    """``fiber-train finetune detection``: COCO, LVIS or any ODinW-style COCO-format dataset (docs/reference/training.md
    §4.2, §4.3, §4.5); a new dataset needs a recipe (or ``--set``), no code."""

    name = "detection"
    synthetic_ann = "annotations/instances_{split}.json"
    default_metric = "bbox/AP"
    start_metrics = ("bbox/AP", "bbox/AP50")

    def train_dataset(self, fabric: Fabricish | None = None) -> Dataset:
        """The detection file as grounding data with the configured prompts (and few-shot subset)."""
        d = self.config.data
        p = d.prompts
        ann = self.train_ann()
        ds = DetectionGroundingDataset(
            ann, d.resolve(d.train_images, d.train_split), self.train_transform(), seed=d.seed
        )
        self._note_repairs(Path(ann), ds)
        text = p.text()
        text.check(ds.label_names, str(ann))
        if p.train == "ordered":
            ds.prompt = text.prompt(sorted(ds.label_names), ds.label_names)
        else:
            everything = p.train == "shuffled"
            ds.sampler = DetectionPromptSampler(
                text.renamed(ds.label_names),
                token_counter(self.tokenizer),
                max_tokens=p.max_tokens,
                control_probs=(0.0, 0.0, 1.0, 0.0) if everything else p.negative_control,
                max_negatives=len(ds.label_names) if everything else p.max_negatives,
            )
        if not d.few_shot:
            return self._with_error_policy(ds, Path(ann))
        chosen = ds.few_shot_indices(d.few_shot, d.seed)
        log.info(
            f"{self.name}: {d.few_shot}-shot subset of {ann}: {len(chosen)} of {len(ds)} images, "
            f"x {d.few_shot_copies} copies"
        )
        return self._with_error_policy(Subset(ds, chosen * d.few_shot_copies), Path(ann))

    def default_postprocess(self) -> PostprocessConfig:
        """Detection settings (0.05 threshold, 1,000 per level, 100 per image; LVIS 300, docs/reference/training.md §4.7)."""
        return PostprocessConfig.lvis() if self.config.eval.protocol == "lvis" else PostprocessConfig()

    def metrics(self, model: GroundingModel, fabric: Fabricish) -> dict[str, float]:
        """COCO box AP (``eval.protocol=coco``) or LVIS Fixed AP (``lvis``) with all class names prompted."""
        d, e = self.config.data, self.config.eval
        per_prompt = d.prompts.classes_per_prompt or (40 if e.protocol == "lvis" else 0)
        return detection_metrics(
            self.predictor(model, fabric, per_prompt or None),
            self.eval_ann(),
            d.resolve(d.eval_images, d.eval_split),
            protocol=e.protocol,
            prompt_text=d.prompts.text(),
            batch_size=e.batch_size,
            max_images=e.max_images,
            rank=fabric.global_rank,
            world_size=fabric.world_size,
        )
