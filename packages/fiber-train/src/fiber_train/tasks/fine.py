"""Fine-grained pre-training, ``fiber-train fine`` (docs/reference/training.md §3, docs/reference/architecture.md §9).

The model is the fusion backbone in a fine variant (``fine_v2`` by default, ``fine_v3`` for the REC-oriented
variant of §3.11) with the GLIP-style grounding head over its stride-8/16/32 maps and fused text states
(:class:`~fiber_train.tasks.grounding_common.GroundingModel`). The data is a concatenation, uniform over
samples (§3.8), of

- MDETR-style grounding files (GoldG, Flickr30k Entities; the synthetic world's ``grounding_{split}.json``):
  caption + ``tokens_positive`` spans per box;
- COCO-style detection files used as grounding (Objects365; the synthetic world's ``instances_{split}.json``):
  a class-name prompt with the classes present plus sampled negatives (:class:`fiber_data.DetectionPromptSampler`).

Images get the multi-scale resize and flip of §3.9 and are padded to a multiple of 32 by
:class:`fiber_data.GroundingCollator`. Optimisation follows §3.10 (AdamW; vision lr / language lr; biases at
lr x 2 without weight decay; warm-up from 0.001 then x 0.1 at 67 % and 89 %; weight-decay milestones; optional
EMA; patch embedding + stage 0 frozen). After training the exported model is evaluated with COCO box AP on the
evaluation split with the prompt of all class names (§4.7, docs/reference/evaluation.md §8) through
:class:`fiber_train.predictor.GroundingPredictor` and :class:`fiber_eval.COCODetectionEvaluator`.

Not reproduced here: aspect-ratio grouping of batches (the generic loop's sampler is used) and per-epoch
re-drawing of the negative classes (the prompt of an image is a function of its index and the seed).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, cast

import torch
from torch import nn
from torch.utils.data import ConcatDataset, Dataset

from fiber_data import (
    DetectionGroundingDataset,
    DetectionPromptSampler,
    EmptyBatch,
    GroundingBatch,
    GroundingCollator,
    GroundingTransform,
    MdetrGroundingDataset,
    SkipBadSamples,
    token_counter,
)
from fiber_heads.grounding import PostprocessConfig
from fiber_models.pretrained import initialize_from, read_checkpoint_state
from fiber_train.checkpoint import CheckpointError
from fiber_train.config import DataSection, EvalSection, ModelSection, OptimSection, TaskConfig, to_dict
from fiber_train.data_sources import OnError
from fiber_train.tasks.base import DataTokenizer, Fabricish, TaskHooks, build_backbone
from fiber_train.tasks.grounding_common import (
    GroundingHeadConfig,
    GroundingLRScheduler,
    GroundingModel,
    ModelEMA,
    ScheduleSettings,
    export_grounding_model,
    freeze_backbone_stages,
    grounding_param_groups,
    load_backbone_into,
    load_grounding_model,
    read_model_meta,
    resolve_model_dir,
)
from fiber_train.tasks.grounding_eval import build_predictor, detection_metrics

log = logging.getLogger(__name__)

FineModel = GroundingModel
"""The model of ``fiber-train fine`` (an alias of :class:`GroundingModel`, shared with grounding fine-tuning)."""


# ------------------------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class FineModelConfig(ModelSection):
    """Backbone, head and initialisation of the fine model (``backbone``, ``overrides``, ``pretrained``:
    :class:`~fiber_train.config.ModelSection`).

    Args:
        backbone: registered backbone geometry (``fiber-base``, ``fiber-swin-t``, ``fiber-tiny``).
        variant: ``fine_v2`` (main pre-training, COCO/LVIS) or ``fine_v3`` (REC-oriented, i2t query LayerNorm).
        overrides: extra ``create_backbone`` overrides (dotted or nested), e.g. ``{"swin.drop_path_rate": 0.2}``.
        pretrained: initialisation: a coarse run's ``model/`` directory or a backbone ``save_pretrained``
            directory (backbone only, coarse-only keys dropped), or a fine run's ``model/`` (backbone + head).
        freeze_level: ``2`` freezes the patch embedding and Swin stage 0 (reference); ``-1`` nothing.
        head: the grounding head.
    """

    backbone: str = "fiber-base"
    variant: str = "fine_v2"
    freeze_level: int = 2
    head: GroundingHeadConfig = field(default_factory=GroundingHeadConfig)

    def __post_init__(self) -> None:
        if self.variant not in ("fine_v2", "fine_v3", "default"):
            raise ValueError(f"model.variant must be fine_v2, fine_v3 or default, got {self.variant!r}")


@dataclass(frozen=True)
class FineSourceConfig:
    """One training source of the fine mixture.

    Args:
        name: label used in errors and logs.
        kind: ``grounding`` (MDETR-style JSON with ``tokens_positive``) or ``detection`` (COCO-style JSON used as
            grounding with class-name prompts and sampled negatives).
        ann: annotation file; relative paths are under ``data.root``; ``{split}`` is replaced by
            ``data.train_split``.
        images: image folder, same rules.
    """

    name: str = ""
    kind: str = "grounding"
    ann: str = ""
    images: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("grounding", "detection"):
            raise ValueError(f"data.sources: kind must be 'grounding' or 'detection', got {self.kind!r}")


def _synthetic_sources() -> tuple[FineSourceConfig, ...]:
    return (
        FineSourceConfig("synthetic-grounding", "grounding", "annotations/grounding_{split}.json", "images/{split}"),
        FineSourceConfig("synthetic-detection", "detection", "annotations/instances_{split}.json", "images/{split}"),
    )


@dataclass(frozen=True)
class GroundingDataBase(DataSection):
    """Data settings shared by the grounding tasks (``fiber-train fine`` and the fine downstream tasks); the
    fields every task shares (root, splits, tokenizer, batch, workers, synthetic world counts, seed, error
    policy) are those of :class:`~fiber_train.config.DataSection`.

    Args:
        format: ``synthetic`` (generated on demand) or ``files`` (the files as given; ``--data DIR`` selects it
            for a folder that is not a synthetic world).
        min_sizes: candidate shorter sides of the multi-scale resize (docs/reference/training.md §3.9).
        max_size: cap on the longer side.
        test_size: shorter side at evaluation.
        flip_prob: horizontal flip probability (captions unchanged, as the reference; 0 for RefCOCO).
        bgr255: reference normalisation (BGR x 255 with the Caffe mean/std).
        max_text_len: token budget of a caption (256).
        text_padding: ``max_length`` (reference, always ``max_text_len``) or ``longest``.
        size_divisibility: batch padding multiple (32).
        batch_size: images per micro-batch and device.
        synthetic_image_size: image side of the synthetic world (the default equals ``fiber-train coarse``'s
            so all tasks share ``data/synthetic``).
        seed: world seed and base seed of the prompt draws.
    """

    min_sizes: tuple[int, ...] = (480, 560, 640, 720, 800)
    max_size: int = 1333
    test_size: int = 800
    flip_prob: float = 0.5
    bgr255: bool = True
    max_text_len: int = 256
    text_padding: str = "max_length"
    size_divisibility: int = 32
    batch_size: int = 1
    synthetic_image_size: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.format == "coco-captions":  # what `fiber-train ... --data DIR` sets for a non-synthetic folder
            object.__setattr__(self, "format", "files")
        if self.format not in ("synthetic", "files"):
            raise ValueError(f"data.format must be 'synthetic' or 'files', got {self.format!r}")
        if self.text_padding not in ("max_length", "longest"):
            raise ValueError(f"data.text_padding must be 'max_length' or 'longest', got {self.text_padding!r}")

    def synthetic_image_px(self) -> int:
        """The synthetic world is generated at ``synthetic_image_size``."""
        return self.synthetic_image_size

    def resolve(self, template: str, split: str) -> Path:
        """A path: ``{split}`` substituted, relative paths under ``root``."""
        p = Path(template.replace("{split}", split))
        return p if p.is_absolute() else Path(self.root) / p


@dataclass(frozen=True)
class FineDataConfig(GroundingDataBase):
    """Data and prompts of the fine stage (docs/reference/training.md §3.8-§3.9); the input pipeline fields are those of
    :class:`GroundingDataBase`.

    Args:
        train_split / eval_split: ``{split}`` substitutions for the training sources and the evaluation file.
        sources: the training mixture (concatenated, uniform over samples).
        eval_ann / eval_images: COCO detection file and images of the AP evaluation (``{split}`` =
            ``eval_split``).
        prompt_max_tokens: detection-prompt budget (254).
        negative_control: ``(p_a, p_b, p_c, p_d)`` of the negative-class count (§3.8; effective reference
            setting ``(0.05, 0.05, 0.5, 0.0)``).
        max_negatives: ``N_full = min(max_negatives, number of classes)`` (85).
    """

    sources: tuple[FineSourceConfig, ...] = field(default_factory=_synthetic_sources)
    eval_ann: str = "annotations/instances_{split}.json"
    eval_images: str = "images/{split}"
    prompt_max_tokens: int = 254
    negative_control: tuple[float, float, float, float] = (0.05, 0.05, 0.5, 0.0)
    max_negatives: int = 85

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.sources:
            raise ValueError("data.sources is empty: give at least one grounding or detection source")


@dataclass(frozen=True)
class FineOptimConfig(OptimSection, ScheduleSettings):
    """AdamW groups and schedule of the fine stage (docs/reference/training.md §3.10): the fields every task
    shares are those of :class:`~fiber_train.config.OptimSection`, the schedule fields (``schedule``,
    ``warmup_steps``, ``warmup_factor``, ``milestones``, ``gamma``, ``wd_milestone_ratio``, ``end_lr_ratio``)
    those of :class:`~fiber_train.optim.ScheduleSettings` (validated there).

    Args:
        lr: learning rate of every parameter outside the text encoder (1e-4).
        language_lr: learning rate of the text encoder, t2i branches and ``alpha_t2i`` included (1e-5).
        bias_lr_mult: lr multiplier of parameters whose name contains ``bias`` (2).
        weight_decay: weight decay of the other parameters, norms and gates included (0.01).
        bias_weight_decay: weight decay of the bias parameters (0).
        betas / eps: AdamW moments (PyTorch defaults).
        ema_decay: model EMA decay (0.999 in the reference; 0 disables). The raw weights are evaluated unless
            ``eval.use_ema``.
        warmup_ratio: only read by loops without the task-scheduler hook (generic linear warm-up/decay).
    """

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_ratio: float = 0.0
    language_lr: float = 1e-5
    bias_lr_mult: float = 2.0
    bias_weight_decay: float = 0.0
    ema_decay: float = 0.999

    def schedule_settings(self) -> ScheduleSettings:
        """The schedule part as a plain :class:`ScheduleSettings`."""
        return ScheduleSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ScheduleSettings)})

    def __post_init__(self) -> None:
        super().__post_init__()  # ScheduleSettings' checks
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"optim.ema_decay must be in [0, 1), got {self.ema_decay}")


@dataclass(frozen=True)
class GroundingEvalBase(EvalSection):
    """Evaluation settings shared by the grounding tasks (``fiber-train fine`` and the fine downstream tasks);
    ``every`` is that of :class:`~fiber_train.config.EvalSection`.

    Args:
        batch_size: images per forward.
        max_images: evaluate only the first N images of the split (0: all).
        use_ema: evaluate the EMA weights instead of the raw ones (the reference evaluates the raw weights).
        start_baseline: evaluate the model once before training and report the task's ``start_metrics`` of
            that evaluation as ``baseline/<key>`` beside the final figures (the starting point as baseline).
    """

    batch_size: int = 8
    max_images: int = 0
    use_ema: bool = False
    start_baseline: bool = False


@dataclass(frozen=True)
class FineEvalConfig(GroundingEvalBase):
    """COCO box AP on ``data.eval_split`` after training (docs/reference/training.md §4.7,
    docs/reference/evaluation.md §8); ``every`` (off in the reference), ``batch_size``, ``max_images``,
    ``use_ema`` and ``start_baseline`` are those of :class:`GroundingEvalBase`.

    Args:
        detection: run the evaluation.
        score_thresh: candidate threshold (0.05).
        detections_per_img: detections kept per image (100).
    """

    detection: bool = True
    score_thresh: float = 0.05
    detections_per_img: int = 100


@dataclass(frozen=True)
class FineConfig(TaskConfig):
    """Complete configuration of ``fiber-train fine``: the fine family's sections."""

    task: str = "fine"
    model: FineModelConfig = field(default_factory=FineModelConfig)
    data: FineDataConfig = field(default_factory=FineDataConfig)
    optim: FineOptimConfig = field(default_factory=FineOptimConfig)
    eval: FineEvalConfig = field(default_factory=FineEvalConfig)


# -------------------------------------------------------------------------------------------------- task


def _missing_data_message(data: FineDataConfig, missing: Path) -> str:
    return (
        f"{missing} not found. `fiber-train fine` reads the sources of data.sources (MDETR-style grounding JSON "
        "or COCO-style detection JSON plus an image folder each, relative to data.root) and the evaluation file "
        f"data.eval_ann; set data.format=synthetic to generate a synthetic world under {data.root}, or see "
        "packages/fiber-data/README.md for the formats."
    )


class FinePretrainTask(DataTokenizer, TaskHooks):
    """``fiber-train fine``: fine-grained (grounding) pre-training (see :class:`fiber_train.tasks.base.TrainTask`).

    Besides the TrainTask methods it offers ``build_scheduler(optimizer, max_steps)`` (the reference's
    multi-step schedule with weight-decay milestones; used by a loop that supports the hook), and keeps the
    EMA through ``on_step_end`` / ``state_dict`` / ``load_state_dict``.
    """

    name = "fine"
    start_metrics: ClassVar[tuple[str, ...]] = ("bbox/AP", "bbox/AP50")
    """The metrics reported at their starting point (the untrained model) with ``eval.start_baseline``."""

    def __init__(self, config: FineConfig) -> None:
        self.config = config
        self.ema: ModelEMA | None = None
        self._repairs: dict[str, dict[str, int]] = {}  # training source -> what its loader repaired or dropped

    def data_report(self) -> dict[str, int]:
        """Boxes and images the training loaders repaired or dropped and records they skipped, as
        ``{"<source>/<kind>": count}`` (non-zero counts only; kinds: :data:`fiber_data.boxes.REPAIR_KINDS`).
        The trainer logs it."""
        return {f"{src}/{k}": n for src, counts in self._repairs.items() for k, n in counts.items() if n}

    def _source_name(self, ann: Path) -> str:
        return ann.stem.replace(":", "_")

    def _note_repairs(self, ann: Path, ds: DetectionGroundingDataset | MdetrGroundingDataset) -> None:
        self._repairs[self._source_name(ann)] = dict(ds.repairs)

    def _with_error_policy(self, ds: Dataset, ann: Path) -> Dataset:
        """``ds`` under ``data.on_error`` (``skip``: bad records are skipped and counted per source)."""
        if self.config.data.on_error == "raise":
            return ds
        return SkipBadSamples(ds, policy="skip", name=self._source_name(ann))

    # ------------------------------------------------------------------------------------------- data

    def prepare_data(self) -> None:
        """Generate the synthetic world when asked for; check that every source and the eval file exist."""
        data = self.config.data
        if data.format == "synthetic":
            data.ensure_synthetic_world(progress=self.config.trainer.progress)
        paths = [
            p
            for s in data.sources
            for p in (data.resolve(s.ann, data.train_split), data.resolve(s.images, data.train_split))
        ]
        if self.config.eval.detection:
            paths += [data.resolve(data.eval_ann, data.eval_split), data.resolve(data.eval_images, data.eval_split)]
        for path in paths:
            if not path.exists():
                raise FileNotFoundError(_missing_data_message(data, path))
        self.check_tokenizer()

    def train_transform(self) -> GroundingTransform:
        """Multi-scale resize + flip + normalisation (docs/reference/training.md §3.9)."""
        d = self.config.data
        return GroundingTransform(d.min_sizes, d.max_size, d.flip_prob, train=True, bgr255=d.bgr255)

    def train_dataset(self, fabric: Fabricish | None = None) -> Dataset:
        """The concatenated training sources (uniform over samples)."""
        d = self.config.data
        parts: list[Dataset] = []
        for src in d.sources:
            ann, images = d.resolve(src.ann, d.train_split), d.resolve(src.images, d.train_split)
            if src.kind == "grounding":
                on_error = cast(OnError, d.on_error)  # checked in FineDataConfig.__post_init__
                grounding = MdetrGroundingDataset(ann, images, self.train_transform(), on_error=on_error)
                self._note_repairs(ann, grounding)
                parts.append(self._with_error_policy(grounding, ann))
                continue
            ds = DetectionGroundingDataset(ann, images, self.train_transform(), seed=d.seed)
            self._note_repairs(ann, ds)
            ds.sampler = DetectionPromptSampler(
                ds.label_names,
                token_counter(self.tokenizer),
                max_tokens=d.prompt_max_tokens,
                control_probs=d.negative_control,
                max_negatives=d.max_negatives,
            )
            parts.append(self._with_error_policy(ds, ann))
        return parts[0] if len(parts) == 1 else ConcatDataset(parts)

    def collate_fn(self) -> Callable[[list[Any]], GroundingBatch | EmptyBatch]:
        """:class:`fiber_data.GroundingCollator` (tokenisation, positive maps, padding to a multiple of 32)."""
        d = self.config.data
        return GroundingCollator(
            self.tokenizer,
            d.max_text_len,
            padding=cast(Literal["longest", "max_length"], d.text_padding),  # checked in FineDataConfig.__post_init__
            size_divisibility=d.size_divisibility,
        )

    # ------------------------------------------------------------------------------------------ model

    def build_model(self, fabric: Fabricish | None = None) -> GroundingModel:
        """Backbone (fine variant) + grounding head, initialised from ``model.pretrained`` when given."""
        m = self.config.model
        pretrained = Path(m.pretrained) if m.pretrained else None
        if pretrained is not None and _is_grounding_export(pretrained):
            model, _ = load_grounding_model(pretrained)
            model.train()
        else:
            backbone = build_backbone(m, self.tokenizer.vocab_size, variant=m.variant)
            model = GroundingModel.from_config(backbone, m.head)
            if pretrained is not None:
                report = load_backbone_into(backbone, pretrained)
                head_keys = {f"head.{k}" for k in model.head.state_dict()}
                offered = head_keys & set(read_checkpoint_state(pretrained))
                if offered and offered != head_keys:  # part of a head: never train on a silently half-fresh head
                    missing = sorted(head_keys - offered)
                    raise CheckpointError(
                        f"{pretrained} holds {len(offered)} of the {len(head_keys)} grounding-head tensors "
                        f"(missing: {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}); convert the "
                        "whole checkpoint again with `fiber-train convert`, or point model.pretrained at a backbone"
                    )
                if offered:  # a whole head without a saved model's config (earlier `fiber-train convert` output)
                    initialize_from(model.head, pretrained, prefix="head.")
                log.info(
                    f"initialised the backbone from {pretrained}: {len(report['missing'])} new tensors, "
                    f"{len(report['unexpected'])} checkpoint tensors dropped; grounding head: "
                    + (f"{len(head_keys)} tensors loaded" if offered else f"{len(head_keys)} tensors initialised fresh")
                )
        freeze_backbone_stages(cast(nn.Module, model.backbone), m.freeze_level)  # a FiberBackbone (an nn.Module)
        self.ema = ModelEMA(model, self.config.optim.ema_decay) if self.config.optim.ema_decay > 0 else None
        return model

    def param_groups(self, model: nn.Module) -> list[dict]:
        """Vision / language groups with the bias rule of docs/reference/training.md §3.10."""
        o = self.config.optim
        return grounding_param_groups(
            model,
            lr=o.lr,
            language_lr=o.language_lr,
            weight_decay=o.weight_decay,
            bias_lr_mult=o.bias_lr_mult,
            bias_weight_decay=o.bias_weight_decay,
        )

    def build_scheduler(self, optimizer: torch.optim.Optimizer, max_steps: int) -> GroundingLRScheduler:
        """Warm-up + multi-step/cosine/linear lr and weight-decay milestones (docs/reference/training.md §3.10)."""
        return GroundingLRScheduler(optimizer, self.config.optim.schedule_settings(), max_steps)

    # --------------------------------------------------------------------------------------------- EMA

    def on_step_end(self, model: nn.Module, step: int) -> None:
        """Update the EMA after every optimiser step."""
        if self.ema is not None:
            self.ema.update(getattr(model, "module", model))

    def state_dict(self) -> dict[str, Any]:
        """Task state saved in every checkpoint (the EMA weights)."""
        return {"ema": self.ema.state_dict()} if self.ema is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` on resume."""
        if self.ema is not None and "ema" in state:
            self.ema.load_state_dict(state["ema"])

    # ----------------------------------------------------------------------------------------- evaluate

    def start_baseline(self) -> Sequence[str]:
        """:attr:`start_metrics` with ``eval.start_baseline`` (the trainer evaluates before the first step)."""
        e = self.config.eval
        return self.start_metrics if e.start_baseline and e.detection else ()

    def inference_settings(self) -> dict[str, Any]:
        """Preprocessing settings stored with the exported model (read by the predictor)."""
        d = self.config.data
        return {
            "test_size": d.test_size,
            "max_size": d.max_size,
            "max_text_len": d.max_text_len,
            "text_padding": d.text_padding,
            "size_divisibility": d.size_divisibility,
            "bgr255": d.bgr255,
            "tokenizer": d.tokenizer,
        }

    def model_to_evaluate(self, model: nn.Module) -> GroundingModel:
        """``model``, or with ``eval.use_ema`` (and an EMA kept) a copy holding the EMA weights."""
        assert isinstance(model, GroundingModel)
        if self.config.eval.use_ema and self.ema is not None:
            return with_weights(model, self.ema.full_state_dict(model))
        return model

    @torch.no_grad()
    def evaluate(self, model: nn.Module, fabric: Fabricish) -> dict[str, float]:
        """COCO box AP of ``model`` on ``data.eval_split`` with the prompt of all class names; printed on rank 0."""
        if not self.config.eval.detection:
            return {}
        model = self.model_to_evaluate(model)
        d, e = self.config.data, self.config.eval
        predictor = build_predictor(
            model,
            self.tokenizer,
            d,
            PostprocessConfig(pre_nms_thresh=e.score_thresh, detections_per_img=e.detections_per_img),
            device=fabric.device,
        )
        metrics = detection_metrics(
            predictor,
            d.resolve(d.eval_ann, d.eval_split),
            d.resolve(d.eval_images, d.eval_split),
            batch_size=e.batch_size,
            max_images=e.max_images,
            rank=fabric.global_rank,
            world_size=fabric.world_size,
        )
        if fabric.global_rank == 0:
            log.info(
                f"COCO box AP on {int(metrics['num_images'])} {self.config.data.eval_split} images "
                f"({int(metrics['num_classes'])} class-name prompt): AP {metrics['bbox/AP']:.1f}  "
                f"AP50 {metrics['bbox/AP50']:.1f}  AP75 {metrics['bbox/AP75']:.1f}"
            )
        return metrics

    # ------------------------------------------------------------------------------------------- export

    def export(self, model: nn.Module, out_dir: Path) -> None:
        """The saved format of :mod:`fiber_models` (``config.json``, ``model.safetensors``, ``tokenizer.json``) plus
        ``ema.safetensors`` (with EMA)."""
        assert isinstance(model, GroundingModel)
        export_grounding_model(
            model,
            Path(out_dir),
            task=self.name,
            head_config=self.config.model.head,
            inference=self.inference_settings(),
            config=to_dict(self.config),
            tokenizer_file=self.tokenizer_file(),
            ema=self.ema,
        )


def _is_grounding_export(path: Path) -> bool:
    """Whether ``path`` is an exported model (or run) with a grounding head."""
    try:
        return read_model_meta(resolve_model_dir(path))["model_type"] == "grounding"
    except (FileNotFoundError, CheckpointError):
        return False


def with_weights(model: GroundingModel, state: dict[str, torch.Tensor]) -> GroundingModel:
    """A copy of ``model`` in eval mode holding ``state`` (e.g. the EMA weights), leaving ``model`` untouched."""
    import copy

    other = copy.deepcopy(model)
    other.load_state_dict(state)
    return other.eval()


def ensure_synthetic_world(data: DataSection, *, progress: bool = True) -> Path:
    """Generate (or verify) the synthetic world of a ``data`` section
    (:meth:`fiber_train.config.DataSection.ensure_synthetic_world`)."""
    return data.ensure_synthetic_world(progress=progress)
