"""Typed run configuration: YAML recipes and dotted ``--set`` overrides parsed into frozen dataclasses.

A recipe is one YAML file whose top-level keys are the sections below. Composition is "one recipe plus
overrides": ``--set optim.lr=1e-4 data.batch_size=32``. Every key is checked against the dataclasses; an
unknown key is an error that names it (and the closest valid keys). The fully resolved configuration is
written into every run directory and checkpoint.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import yaml

CONFIG_VERSION = 1

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")


class ConfigError(ValueError):
    """A recipe or override is invalid (unknown key, wrong type, malformed ``--set``)."""


@dataclass(frozen=True)
class ModelSection:
    """The ``model`` fields every task family shares.

    Args:
        backbone: registered variant name (``fiber_backbones.list_backbones()``), e.g. ``fiber-tiny``.
        overrides: keyword overrides for ``create_backbone`` (nested dicts or dotted keys).
        pretrained: optional path of weights to start from (a ``save_pretrained`` directory, a run's ``model/``
            or a converted official checkpoint).
    """

    backbone: str = "fiber-tiny"
    overrides: dict[str, Any] = field(default_factory=dict)
    pretrained: str | None = None


@dataclass(frozen=True)
class ModelConfig(ModelSection):
    """Which backbone to build and how (the coarse family: ``coarse`` and the coarse downstream tasks); the
    shared fields are those of :class:`ModelSection`.

    Args:
        hidden_dim: width of the cross-modal projections and poolers (768 in FIBER-B).
        itc_dim: width of the contrastive embedding (768 in FIBER-B).
        share_prefix: compute the uni-modal prefixes once per training step and re-index them for every pass
            (``false``: the reference's per-pass recomputation, for comparison).
        text_pool: how the ITC and fused poolers summarise a text: ``first`` (the ``<s>`` token, the reference,
            right for a pretrained RoBERTa) or ``mean`` over real tokens (needed to learn from scratch, as the
            synthetic default does).
    """

    hidden_dim: int = 768
    itc_dim: int = 768
    share_prefix: bool = True
    text_pool: str = "first"


SOURCE_KINDS = ("coco-captions", "karpathy", "arrow", "vg", "annot-pairs", "tar", "webdataset")
#: kinds read as a stream (an ``IterableDataset``) rather than by index
STREAM_KINDS = ("tar", "webdataset")


@dataclass(frozen=True)
class SourceConfig:
    """One training source.

    Args:
        kind: ``coco-captions`` | ``karpathy`` | ``arrow`` | ``vg`` | ``annot-pairs`` | ``tar`` (local shards,
            standard library reader) | ``webdataset`` (img2dataset shards through the ``webdataset`` package:
            local paths, ``pipe:`` commands, ``http(s)://`` URLs).
        path: annotation file, Arrow file(s) or shard pattern (brace patterns such as ``{0..30}`` expand).
        images: image folder (not used by ``arrow`` and ``tar``, whose samples carry their image bytes).
        splits: Karpathy splits to read (the coarse stage uses ``train`` + ``val``).
        weight: sampling weight; 0 for every source means uniform over all pairs (the reference).
        resampled: ``webdataset`` only: draw shards with replacement per rank and worker (an endless stream that
            resumes exactly at its position); otherwise each epoch reads every shard once.
        shuffle_buffer: ``webdataset`` only: samples in the shuffle buffer (0: stream order).
    """

    kind: str
    path: str
    images: str = ""
    splits: tuple[str, ...] = ("train", "val")
    weight: float = 0.0
    resampled: bool = False
    shuffle_buffer: int = 0

    def __post_init__(self) -> None:
        if self.kind not in SOURCE_KINDS:
            raise ValueError(f"data.sources: unknown kind {self.kind!r}; expected one of {', '.join(SOURCE_KINDS)}")
        if self.weight < 0:
            raise ValueError(f"data.sources: weight must be >= 0, got {self.weight} for {self.path}")
        if self.kind != "webdataset" and (self.resampled or self.shuffle_buffer):
            raise ValueError(f"data.sources: resampled / shuffle_buffer apply to kind webdataset only ({self.path})")
        if self.shuffle_buffer < 0:
            raise ValueError(f"data.sources: shuffle_buffer must be >= 0, got {self.shuffle_buffer} for {self.path}")
        if self.kind in ("coco-captions", "karpathy", "vg", "annot-pairs") and not self.images:
            raise ValueError(f"data.sources: kind {self.kind!r} needs `images` (the image folder) for {self.path}")


@dataclass(frozen=True)
class DataSection:
    """The ``data`` fields every task family shares, and the one place that resolves the tokenizer and prepares
    the synthetic world.

    Args:
        root: dataset directory. For ``format: synthetic`` it is created (``fiber-data synth``) when absent.
        format: ``synthetic`` (generated on demand) or the task family's file format.
        train_split / eval_split: split names.
        tokenizer: a tokenizer file/directory/hub name; empty means ``<root>/tokenizer.json``.
        max_text_len: token budget of a text.
        batch_size: micro-batch size per device.
        num_workers: dataloader workers per device.
        synthetic_train / synthetic_val / synthetic_test: image counts when generating the synthetic world (the
            defaults are the same for every task, so all tasks share ``data/synthetic``).
        seed: seed of the synthetic world.
        on_error: ``raise`` stops at the first bad training record (the error names file and record);
            ``skip`` skips it, logs a warning and counts it per source (reported in metrics and at the end).
    """

    root: str = "data/synthetic"
    format: str = "synthetic"
    train_split: str = "train"
    eval_split: str = "test"
    tokenizer: str = ""
    max_text_len: int = 40
    batch_size: int = 32
    num_workers: int = 0
    synthetic_train: int = 2000
    synthetic_val: int = 200
    synthetic_test: int = 200
    seed: int = 0
    on_error: str = "raise"

    def __post_init__(self) -> None:
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"data.on_error must be 'raise' or 'skip', got {self.on_error!r}")

    def synthetic_image_px(self) -> int:
        """Image side of the generated synthetic world (the task family's input size setting)."""
        raise NotImplementedError

    def tokenizer_path(self) -> Path:
        """``tokenizer`` as a path, or ``<root>/tokenizer.json`` when it is unset."""
        return Path(self.tokenizer) if self.tokenizer else Path(self.root) / "tokenizer.json"

    def load_tokenizer(self) -> Any:
        """The tokenizer (:func:`fiber_data.load_tokenizer` of ``tokenizer``, a hub name included, or of
        :meth:`tokenizer_path`)."""
        from fiber_data import load_tokenizer

        return load_tokenizer(self.tokenizer or self.tokenizer_path())

    def ensure_synthetic_world(self, *, progress: bool = True) -> Path:
        """Generate (or verify) the synthetic world under ``root`` with ``seed``, :meth:`synthetic_image_px` and
        the ``synthetic_*`` counts (:func:`fiber_data.generate_world`)."""
        from fiber_data import SyntheticWorldConfig, generate_world

        world = SyntheticWorldConfig(
            seed=self.seed,
            image_size=self.synthetic_image_px(),
            num_train=self.synthetic_train,
            num_val=self.synthetic_val,
            num_test=self.synthetic_test,
        )
        return generate_world(Path(self.root), config=world, progress=progress)


@dataclass(frozen=True)
class DataConfig(DataSection):
    """Where the data of the coarse family is and how it is batched; the shared fields are those of
    :class:`DataSection`.

    Args:
        format: ``synthetic`` (generated on demand, COCO-captions layout) or ``coco-captions``.
        train_split / eval_split: split names (``annotations/captions_{split}.json``, ``images/{split}/``).
        image_size: square input size S (images are resized to S x S, bicubic); also the synthetic world's.
        image_decoder: ``pil`` (reference) or ``torchvision``: decode files with ``torchvision.io`` and resize the
            tensor (:class:`fiber_data.images.tv_decode.TorchvisionImageTransform`; about 3x cheaper per photo, same
            pixels to ~1e-4), for image-folder sources (COCO captions, Karpathy, VG, annotation pairs).
        max_text_len: text is padded/truncated to exactly this many tokens (40 in pre-training).
        sources: training sources mixed into one dataset (see :mod:`fiber_train.data_sources`); when given,
            they replace ``root``/``train_split`` for training (evaluation still reads ``root``/``eval_split``).
    """

    image_size: int = 64
    image_decoder: str = "pil"
    sources: tuple[SourceConfig, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.image_decoder not in ("pil", "torchvision"):
            raise ValueError(f"data.image_decoder must be 'pil' or 'torchvision', got {self.image_decoder!r}")

    def synthetic_image_px(self) -> int:
        """The synthetic world is generated at ``image_size``."""
        return self.image_size


@dataclass(frozen=True)
class LossConfig:
    """Coarse pre-training objectives (docs/reference/training.md §1.2-1.5).

    Args:
        itc / itm / mlm: loss weights (0 disables an objective).
        queue_size: ITC feature queue length (4096 in the reference; 0 disables it).
        mlm_probability: BERT masking probability.
        temperature_init: initial ITC temperature.
    """

    itc: float = 1.0
    itm: float = 1.0
    mlm: float = 1.0
    queue_size: int = 0
    mlm_probability: float = 0.15
    temperature_init: float = 0.07


@dataclass(frozen=True)
class OptimSection:
    """The ``optim`` fields every task family shares: AdamW and the ends of the schedule.

    Args:
        lr: base learning rate.
        weight_decay: decoupled weight decay.
        betas / eps: AdamW moments.
        warmup_ratio: fraction of ``max_steps`` spent warming up from 0 (by the generic warm-up + linear-decay
            schedule; a task with its own ``build_scheduler`` reads its own warm-up settings).
        end_lr_ratio: learning rate at the end, as a fraction of the peak.
    """

    lr: float = 1e-5
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    warmup_ratio: float = 0.1
    end_lr_ratio: float = 0.0


@dataclass(frozen=True)
class OptimConfig(OptimSection):
    """AdamW with the reference parameter groups and a warm-up + linear-decay schedule (docs/reference/training.md
    §1.6), the coarse family's; the shared fields are those of :class:`OptimSection` (biases and norms get no
    weight decay).

    Args:
        lr_mult_cross_modal: multiplier for fusion modules, gates, projections and poolers.
        lr_mult_head: multiplier for objective heads.
    """

    lr_mult_cross_modal: float = 5.0
    lr_mult_head: float = 5.0


@dataclass(frozen=True)
class TrainerConfig:
    """Lightning Fabric and loop settings.

    Args:
        accelerator / devices / num_nodes / strategy / precision: passed to ``lightning.fabric.Fabric``;
            ``strategy: fsdp`` shards parameters, gradients and optimiser state with FSDP2 (``fully_shard`` per
            transformer block, see :mod:`fiber_train.distributed`).
        fsdp_checkpoint: how ``strategy: fsdp`` saves checkpoints: ``sharded`` (every rank writes its shard
            through Fabric's distributed checkpoint; resumable on another number of processes) or ``full``
            (the full weights and optimiser state gathered on rank 0, written like a single-process checkpoint).
        max_steps: optimiser steps; 0 trains nothing: the initial model (``model.pretrained``) is exported and
            evaluated (zero-shot evaluation).
        grad_accum: micro-batches per optimiser step.
        grad_clip: max gradient norm (0 disables clipping).
        log_every: optimiser steps between metric rows.
        ckpt_every: optimiser steps between checkpoints (0: only at the end).
        keep_checkpoints: how many step checkpoints to keep.
        out_dir: parent of run directories.
        run_name: run directory name (default: ``<task>-<timestamp>``).
        seed: global seed.
        progress: show a progress bar.
        tensorboard: also write TensorBoard event files to ``<run>/tensorboard`` through Fabric's
            ``TensorBoardLogger`` (``auto``: when ``tensorboard`` is installed, the ``tensorboard`` extra;
            ``true``: required; ``false``: off). Open them with ``tensorboard --logdir runs``.
        loggers: extra experiment trackers besides ``metrics.csv`` and TensorBoard: ``wandb`` (W&B project
            ``fiber-<task>``) and/or ``mlflow`` (experiment ``fiber-<task>``, ``MLFLOW_TRACKING_URI`` or
            ``<out_dir>/mlruns``); each needs its package installed.
        deterministic: ``torch.use_deterministic_algorithms`` (CPU reproducibility).
        threads: CPU threads of torch's intra-op pool in each training process, set before the model is
            built. 0 (default): ``OMP_NUM_THREADS`` when it is set, else the cores this process may run on
            (``os.sched_getaffinity``) divided among the node's training processes. Torch's own default (all
            physical cores) oversubscribes a machine shared with other jobs; set 1 there.
        nonfinite: what to do when the loss or the gradients are not finite: ``skip`` the optimiser step
            (counted and logged; the run stops after ``max_nonfinite`` consecutive skips) or ``stop`` at once
            (a checkpoint of the last good state is saved first).
        max_nonfinite: consecutive non-finite steps tolerated by ``skip``.
        max_skipped_batches: consecutive batches whose every sample was skipped (``data.on_error=skip``)
            after which the run stops with an error naming the sources (unusable data, e.g. a wrong image
            folder, would otherwise loop forever).
        compile: regional ``torch.compile`` of the backbone (each Swin block and text layer its own graph,
            static shapes; :meth:`fiber_backbones.FiberBackbone.compile_blocks`). ``null`` (default): on when
            training on CUDA, off on the CPU (inductor's compile time outweighs its gain in short CPU runs).
        compile_options: keyword arguments of ``torch.compile`` for those regions, e.g. ``{mode: max-autotune}``
            or ``{backend: aot_eager}``.
        activation_checkpointing: recompute every Swin block and text layer in the backward pass (less memory,
            about a third more compute; for per-GPU batches that do not fit otherwise).
        fused_optimizer: AdamW's fused kernel (one launch for every parameter); ``null`` (default): on CUDA.
    """

    accelerator: str = "auto"
    devices: int | str = 1
    num_nodes: int = 1
    strategy: str = "auto"
    fsdp_checkpoint: str = "sharded"
    precision: str = "32-true"
    max_steps: int = 1000
    grad_accum: int = 1
    grad_clip: float = 1.0
    log_every: int = 10
    ckpt_every: int = 0
    keep_checkpoints: int = 2
    out_dir: str = "runs"
    run_name: str = ""
    seed: int = 0
    progress: bool = True
    tensorboard: str = "auto"
    loggers: tuple[str, ...] = ()
    deterministic: bool = False
    threads: int = 0
    nonfinite: str = "skip"
    max_nonfinite: int = 20
    max_skipped_batches: int = 50
    compile: bool | None = None
    compile_options: dict[str, Any] = field(default_factory=dict)
    activation_checkpointing: bool = False
    fused_optimizer: bool | None = None

    def __post_init__(self) -> None:
        if self.tensorboard not in ("auto", "true", "false"):
            raise ValueError(f"trainer.tensorboard must be auto, true or false, got {self.tensorboard!r}")
        if self.nonfinite not in ("skip", "stop"):
            raise ValueError(f"trainer.nonfinite must be 'skip' or 'stop', got {self.nonfinite!r}")
        if self.max_skipped_batches < 1:
            raise ValueError(f"trainer.max_skipped_batches must be >= 1, got {self.max_skipped_batches}")
        if self.fsdp_checkpoint not in ("sharded", "full"):
            raise ValueError(f"trainer.fsdp_checkpoint must be 'sharded' or 'full', got {self.fsdp_checkpoint!r}")
        unknown = [k for k in self.loggers if k not in ("wandb", "mlflow")]
        if unknown:
            raise ValueError(f"trainer.loggers: unknown tracker {unknown[0]!r}; expected wandb and/or mlflow")
        if self.threads < 0:
            raise ValueError(f"trainer.threads must be >= 0 (0: the cores this process may use), got {self.threads}")
        if self.max_steps < 0 or self.grad_accum < 1:
            raise ValueError("trainer.max_steps must be >= 0 and trainer.grad_accum >= 1")


@dataclass(frozen=True)
class EvalSection:
    """The ``eval`` fields every task family shares.

    Args:
        every: optimiser steps between evaluations during training (0: only at the end).
        batch_size: evaluation batch size.
    """

    every: int = 0
    batch_size: int = 64


@dataclass(frozen=True)
class EvalConfig(EvalSection):
    """Evaluation of ``fiber-train coarse`` after (and optionally during) training; the shared fields are those
    of :class:`EvalSection`.

    Args:
        retrieval: run zero-shot image-text retrieval on ``data.eval_split`` at the end.
        fusion: also prove the fused path on held-out data (coarse): ITM accuracy on 1 positive : 2 ITC-hard
            negatives, text->image R@1 of ITC alone vs ITC top-``rerank_k`` re-ranked by ITM, MLM accuracy vs
            a unigram baseline, and the gate values (:func:`fiber_train.tasks.coarse.fusion_metrics`).
        fusion_queries: held-out images (one query caption each) those fusion metrics use.
        rerank_k: ITC candidates re-ranked by ITM.
    """

    retrieval: bool = True
    fusion: bool = True
    fusion_queries: int = 200
    rerank_k: int = 8


@dataclass(frozen=True)
class TaskConfig:
    """The one layout of a task's complete configuration: ``version``, ``task``, then the sections ``model``,
    ``data``, ``optim``, ``trainer`` and ``eval``. ``trainer`` is the same for every task; a task family narrows
    the other sections to its own subclasses of :class:`ModelSection`, :class:`DataSection`,
    :class:`OptimSection` and :class:`EvalSection`, and a task adds its own sections after them (``loss``,
    ``vqa``, ...)."""

    version: int = CONFIG_VERSION
    task: str = ""
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalSection = field(default_factory=EvalSection)


@dataclass(frozen=True)
class CoarseConfig(TaskConfig):
    """Complete configuration of ``fiber-train coarse``: the coarse family's sections and the ``loss`` weights."""

    task: str = "coarse"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    loss: LossConfig = field(default_factory=LossConfig)


# --------------------------------------------------------------------------------------------------------------
# dict <-> dataclass


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert a YAML value to the annotated type ``tp``; raise ConfigError naming ``where``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping for section {_type_name(tp)}, got {value!r}")
        return from_dict(cast("type[DataclassInstance]", tp), value, prefix=where)  # an annotation: a class
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: {value!r} matches none of {[_type_name(a) for a in args]}")
    if origin is tuple:
        if not isinstance(value, Sequence) or isinstance(value, str):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is list:
        return list(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) mapping, rejecting unknown keys by name.

    Raises:
        ConfigError: unknown key (with suggestions), wrong type.
    """
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        where = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), sorted(names), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; valid keys: {', '.join(sorted(names))}"
            raise ConfigError(f"unknown config key '{where}'{hint}")
        kwargs[key] = _coerce(value, hints[key], where)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{prefix or cls.__name__}: {exc}") from exc


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass (tuples become lists, ready for YAML/JSON)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """Turn ``["optim.lr=1e-4", "model.overrides.text.layers=2"]`` into a nested dict.

    Values are parsed as YAML scalars/lists (``1e-4`` -> float, ``[1,2]`` -> list, ``true`` -> bool). A value
    that is not valid YAML (``{split}/ann.json``) or that starts with the ``{split}`` path placeholder is taken
    as the literal string; the field's type is checked later, naming the key.

    Raises:
        ConfigError: an item without ``=`` or with an empty key.
    """
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value: Any = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, dict) and raw.strip().startswith("{split}"):  # "{split}" alone is a YAML mapping
            value = raw
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of '{p}'")
        node[parts[-1]] = value
    return out


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive merge; ``update`` wins. Dicts merge, everything else is replaced."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(
    cls: type[T], recipe: str | Path | None = None, overrides: Sequence[str] = (), base: Mapping[str, Any] | None = None
) -> T:
    """Resolve a configuration: dataclass defaults < ``base`` < recipe YAML < ``--set`` overrides.

    Args:
        cls: the top-level config dataclass (e.g. :class:`CoarseConfig`).
        recipe: path of a YAML recipe, or a packaged recipe name such as ``coarse/tiny``.
        overrides: ``key=value`` strings.
        base: mapping applied before the recipe (e.g. a task's embedded default).

    Raises:
        ConfigError: unknown keys, bad types, unreadable recipe.
        FileNotFoundError: the recipe does not exist (message lists packaged recipes).
    """
    data: dict[str, Any] = dict(base or {})
    if recipe is not None:
        path = resolve_recipe(recipe)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(loaded).__name__}")
        data = deep_merge(data, loaded)
    data = deep_merge(data, parse_overrides(overrides))
    return from_dict(cls, data)


RECIPES_DIR = Path(__file__).parent / "recipes"


def list_recipes() -> list[str]:
    """Names of the recipes shipped with the package (``coarse/tiny``, ...)."""
    return sorted(str(p.relative_to(RECIPES_DIR).with_suffix("")) for p in RECIPES_DIR.rglob("*.yaml"))


def resolve_recipe(recipe: str | Path) -> Path:
    """A recipe path, or the packaged recipe of that name."""
    path = Path(recipe)
    if path.is_file():
        return path
    packaged = RECIPES_DIR / f"{recipe}.yaml"
    if packaged.is_file():
        return packaged
    raise FileNotFoundError(f"recipe {str(recipe)!r} not found; packaged recipes: {', '.join(list_recipes())}")
