"""The one saved format of every FIBER model, and loading by model type.

A saved model is a directory::

    config.json        {"format": "fiber-model", "format_version": 1, "model_type": "vqa",
                        "backbone": {<fiber_backbones.BackboneConfig>}, "head": {<the model's config>},
                        "preprocessing": {<Preprocessing>}, "info": {<free-form: training task, config, ...>}}
    model.safetensors  the full state dict (backbone.* and head tensors), no pickles
    tokenizer.json     the tokenizer (or the files of a Hugging Face tokenizer folder)
    <extras>           files a model type adds (e.g. ema.safetensors of a grounding run)

:func:`load` dispatches on ``model_type``; every model class has ``from_pretrained(path, *, device=None,
dtype=None, strict=True)`` and ``save_pretrained(path)``. Directories exported by earlier versions of
fiber-train (``fiber_model.json`` + ``backbone/`` + ``heads.safetensors`` / ``head.safetensors``) load through
:mod:`fiber_models.legacy`, read-only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar, cast

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from fiber_backbones import BackboneConfig, FiberBackbone, FusionBackbone
from fiber_backbones.weights import atomic_write, key_mismatch_lines, weights_file

__all__ = [
    "CONFIG_NAME",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MODEL_TYPES",
    "TOKENIZER_FILES",
    "WEIGHTS_NAME",
    "FiberPreTrainedModel",
    "InitReport",
    "ModelFormatError",
    "Preprocessing",
    "config_from_dict",
    "initialize_from",
    "is_saved_model",
    "load",
    "model_class",
    "read_checkpoint_state",
    "read_model_config",
    "resolve_model_dir",
]

FORMAT_NAME = "fiber-model"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json",
    "fiber_tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
)
"""Files of a tokenizer folder that travel with a saved model."""

MODEL_TYPES: dict[str, str] = {
    "coarse": "fiber_models.coarse:CoarseModel",
    "vqa": "fiber_models.vqa:VQAModel",
    "nlvr2": "fiber_models.nlvr2:NLVR2Model",
    "retrieval": "fiber_models.retrieval:RetrievalModel",
    "caption": "fiber_models.caption:CaptionModel",
    "grounding": "fiber_models.grounding:GroundingModel",
}
"""``model_type`` of ``config.json`` -> ``"module:Class"`` (imported on first use)."""


class ModelFormatError(RuntimeError):
    """A saved model directory is unreadable, of another model type, or its weights do not fit (names them)."""


if TYPE_CHECKING:
    from _typeshed import DataclassInstance

C = TypeVar("C", bound="DataclassInstance")
M = TypeVar("M", bound="FiberPreTrainedModel")


@dataclass(frozen=True)
class Preprocessing:
    """How inputs are prepared for a model (stored in ``config.json``; the processor is built from it alone).

    Args:
        image_size: side ``S`` of the square bicubic resize (coarse family).
        image_mean / image_std: per-channel normalisation (RGB in ``[0, 1]``; with ``bgr255`` the reference's
            BGR x 255 statistics are used instead).
        max_text_len: token budget of a text, ``<s>``/``</s>`` included.
        text_pool: ``first`` or ``mean`` text pooling (informational; the model's poolers carry it).
        resize: ``square`` (``S x S``, coarse family) or ``shorter_side`` (grounding: shorter side
            ``test_size``, longer side capped at ``max_size``, padded to ``size_divisibility``).
        test_size / max_size / size_divisibility / bgr255: the grounding test transform.
        text_padding: ``max_length`` (pad to ``max_text_len``, as in training and the reference) or ``longest``.
        prompt: prompt settings of grounding/detection (e.g. ``classes_per_prompt``).
        tokenizer: tokenizer name to fall back on when no tokenizer files were saved with the model (the
            backbone registry's ``tokenizer`` entry, e.g. ``roberta-base`` for converted official checkpoints).
    """

    image_size: int = 384
    image_mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    image_std: tuple[float, ...] = (0.229, 0.224, 0.225)
    max_text_len: int = 40
    text_pool: str = "first"
    resize: str = "square"
    test_size: int = 800
    max_size: int | None = 1333
    size_divisibility: int = 32
    bgr255: bool = False
    text_padding: str = "max_length"
    prompt: Mapping[str, Any] = field(default_factory=dict)
    tokenizer: str = ""

    def __post_init__(self) -> None:
        if self.resize not in ("square", "shorter_side"):
            raise ValueError(f"preprocessing.resize must be 'square' or 'shorter_side', got {self.resize!r}")
        if self.text_padding not in ("longest", "max_length"):
            raise ValueError(f"preprocessing.text_padding must be 'longest' or 'max_length', got {self.text_padding!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return _plain(dataclasses.asdict(self))

    def grounding_kwargs(self) -> dict[str, Any]:
        """The settings of the grounding test transform, as keyword arguments of
        :class:`fiber_models.predictor.GroundingPredictor`."""
        names = ("test_size", "max_size", "max_text_len", "text_padding", "size_divisibility", "bgr255")
        return {name: getattr(self, name) for name in names}

    @classmethod
    def for_backbone(cls, name: str, **kwargs: Any) -> Preprocessing:
        """Settings whose mean/std and tokenizer name come from the backbone registry entry ``name`` (as timm's
        ``pretrained_cfg``); ``kwargs`` set the other fields (an unregistered name keeps the defaults)."""
        from fiber_backbones import get_entry

        try:
            entry = get_entry(name)
        except KeyError:
            return cls(**kwargs)
        base = {
            "image_mean": tuple(entry.image_mean),
            "image_std": tuple(entry.image_std),
            "tokenizer": entry.tokenizer,
        }
        return cls(**{**base, **kwargs})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocessing:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        return config_from_dict(cls, data)


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def config_from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
    """Build the frozen config dataclass ``cls`` from a JSON dict (lists become tuples where the field is a tuple).

    Raises:
        KeyError: ``data`` holds a key ``cls`` has no field for (named).
    """
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise KeyError(f"unknown {cls.__name__} keys: {unknown}")
    out: dict[str, Any] = {}
    for k, v in data.items():
        hint = str(names[k].type)
        out[k] = tuple(v) if isinstance(v, list) and hint.startswith("tuple") else v
    return cls(**out)


def model_class(model_type: str) -> type[FiberPreTrainedModel]:
    """The model class of ``model_type`` (one of :data:`MODEL_TYPES`)."""
    if model_type not in MODEL_TYPES:
        raise ModelFormatError(f"unknown model_type {model_type!r}; known: {sorted(MODEL_TYPES)}")
    module, _, name = MODEL_TYPES[model_type].partition(":")
    return getattr(importlib.import_module(module), name)


def is_saved_model(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a directory in this format (``config.json`` with ``"format": "fiber-model"``)."""
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        return False
    try:
        data = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT_NAME


def resolve_model_dir(path: str | os.PathLike[str]) -> Path:
    """``RUN`` (a fiber-train run directory) -> ``RUN/model``; a model directory (this format or the earlier
    ``fiber_model.json`` layout) is returned as is.

    Raises:
        FileNotFoundError: ``path`` holds no saved model, nor does ``path/model``.
    """
    from fiber_models.legacy import is_legacy_model

    p = Path(path)
    for cand in (p, p / "model"):
        if is_saved_model(cand) or is_legacy_model(cand):
            return cand
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such model directory")
    raise FileNotFoundError(
        f"{p}: not a saved FIBER model (no {CONFIG_NAME} of format {FORMAT_NAME!r} in it or in {p / 'model'}); "
        "pass a model directory, a finished run directory, or the output of `fiber-train convert`"
    )


def read_model_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``config.json`` of a saved model (a legacy directory is translated in memory).

    Raises:
        ModelFormatError: unreadable, another format or an unsupported format version.
    """
    from fiber_models.legacy import is_legacy_model, legacy_config

    model_dir = resolve_model_dir(path)
    if not is_saved_model(model_dir) and is_legacy_model(model_dir):
        return legacy_config(model_dir)
    file = model_dir / CONFIG_NAME
    try:
        data = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"{file}: unreadable ({exc})") from exc
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelFormatError(
            f"{file}: format_version {version!r} is not supported (this code reads {FORMAT_VERSION})"
        )
    for key in ("model_type", "backbone", "head"):
        if key not in data:
            raise ModelFormatError(f"{file}: no {key!r} entry")
    return data


def _read_state(model_dir: Path, config: Mapping[str, Any]) -> dict[str, Tensor]:
    from fiber_models.legacy import legacy_state_dict

    if config.get("legacy"):
        return legacy_state_dict(model_dir, config)
    file = model_dir / WEIGHTS_NAME
    if not file.is_file():
        raise ModelFormatError(f"{model_dir}: no {WEIGHTS_NAME}")
    try:
        return load_file(str(file))
    except Exception as exc:  # safetensors raises its own error types
        raise ModelFormatError(f"{file}: not a readable safetensors file ({exc})") from exc


def copy_tokenizer(source: str | os.PathLike[str] | None, out_dir: Path) -> list[str]:
    """Copy a tokenizer next to a saved model: a tokenizer file becomes ``tokenizer.json``; from a folder
    the files of :data:`TOKENIZER_FILES` are copied. Returns the names written (empty for ``None`` or a hub
    name, which cannot travel)."""
    if source is None:
        return []
    src = Path(source)
    written: list[str] = []
    if src.is_file():
        if src.resolve() != (out_dir / "tokenizer.json").resolve():
            shutil.copyfile(src, out_dir / "tokenizer.json")
        written.append("tokenizer.json")
    elif src.is_dir():
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                if src.resolve() != out_dir.resolve():
                    shutil.copyfile(src / name, out_dir / name)
                written.append(name)
    return written


def _check_fit(
    model: nn.Module, shapes: Mapping[str, tuple[int, ...]], *, source: str, strict: bool
) -> tuple[list[str], dict[str, Tensor]]:
    """``(missing keys, the model's state dict)``; raises when ``shapes`` (checkpoint key -> shape) does not fit."""
    own = model.state_dict()
    mismatched = [
        f"{k}: checkpoint {tuple(v)} vs model {tuple(own[k].shape)}"
        for k, v in shapes.items()
        if k in own and tuple(own[k].shape) != tuple(v)
    ]
    missing = sorted(set(own) - set(shapes))
    unexpected = sorted(set(shapes) - set(own))
    if mismatched or (strict and (missing or unexpected)):
        parts = [
            f"{source} does not fit this {type(model).__name__}:",
            *key_mismatch_lines(missing, unexpected, mismatched),
        ]
        if missing and strict:
            parts.append("  pass strict=False to keep the missing tensors freshly initialised")
        raise ModelFormatError("\n".join(parts))
    return missing, own


def strict_load(model: nn.Module, state: Mapping[str, Tensor], *, source: str, strict: bool = True) -> list[str]:
    """Load ``state`` into ``model``; shape mismatches are always an error, missing/unexpected keys when
    ``strict``. Returns the model keys ``state`` did not provide (initialised fresh).

    Raises:
        ModelFormatError: naming ``source`` and the offending keys.
    """
    missing, own = _check_fit(model, {k: tuple(v.shape) for k, v in state.items()}, source=source, strict=strict)
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return missing


def _stream_load(model: nn.Module, file: Path, *, strict: bool) -> list[str]:
    """Like :func:`strict_load` from a safetensors file, one tensor at a time (peak memory: the model plus the
    largest tensor, not a second copy of the model)."""
    try:
        with safe_open(str(file), framework="pt") as fh:
            keys = list(fh.keys())
            shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in keys}
            missing, own = _check_fit(model, shapes, source=str(file), strict=strict)
            with torch.no_grad():
                for k in keys:
                    if k in own:
                        own[k].copy_(fh.get_tensor(k))
    except ModelFormatError:
        raise
    except Exception as exc:  # safetensors raises its own error types
        raise ModelFormatError(f"{file}: not a readable safetensors file ({exc})") from exc
    return missing


_INIT_FUNCTIONS = (
    "uniform_",
    "normal_",
    "trunc_normal_",
    "constant_",
    "zeros_",
    "ones_",
    "xavier_uniform_",
    "xavier_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "orthogonal_",
)


@contextmanager
def skip_weight_init() -> Iterator[None]:
    """Inside, the ``torch.nn.init`` functions leave tensors as allocated: for building a model whose every tensor
    is loaded right after (``from_pretrained`` with ``strict=True``), which makes building it several times
    faster. It patches ``torch.nn.init`` process-wide for its duration."""
    saved = {n: getattr(nn.init, n) for n in _INIT_FUNCTIONS if hasattr(nn.init, n)}

    def keep(tensor: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return tensor

    try:
        for name in saved:
            setattr(nn.init, name, keep)
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


class FiberPreTrainedModel(nn.Module):
    """Base of the task models: the saved format (``save_pretrained`` / ``from_pretrained``).

    A subclass sets :attr:`model_type` and :attr:`config_class`, implements :meth:`get_config` (its frozen
    config dataclass) and :meth:`from_config` (model from a backbone and that config).

    Attributes:
        preprocessing: how inputs are prepared (saved in ``config.json``; ``None`` until set by an export
            or :meth:`from_pretrained`).
        tokenizer_source: tokenizer file or folder that :meth:`save_pretrained` copies next to the weights.
        info: free-form provenance saved under ``"info"`` (training task, resolved config, initialisation).
    """

    model_type: ClassVar[str] = ""
    config_class: ClassVar[type] = object
    preprocessing: Preprocessing | None = None
    tokenizer_source: str | None = None
    info: dict[str, Any] | None = None

    backbone: FusionBackbone
    fresh_keys: list[str]  # set by from_pretrained

    def get_config(self) -> Any:
        """This model's frozen config dataclass (what :meth:`from_config` needs besides the backbone)."""
        raise NotImplementedError

    @classmethod
    def from_config(cls: type[M], backbone: FusionBackbone, config: Any) -> M:
        """A freshly initialised model around ``backbone``."""
        raise NotImplementedError

    @classmethod
    def head_config_from_dict(cls, data: Mapping[str, Any]) -> Any:
        """The config dataclass from its ``config.json`` ``"head"`` entry."""
        return config_from_dict(cls.config_class, data)

    # ------------------------------------------------------------------------------------------- save

    def save_pretrained(
        self,
        path: str | os.PathLike[str],
        *,
        tokenizer: str | os.PathLike[str] | None = None,
        preprocessing: Preprocessing | None = None,
        info: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write ``config.json``, ``model.safetensors`` (atomically) and the tokenizer into ``path``.

        Args:
            path: target directory (created).
            tokenizer: tokenizer file or folder to copy (default: :attr:`tokenizer_source`).
            preprocessing: overrides :attr:`preprocessing` (default: ``Preprocessing()``).
            info: provenance stored under ``"info"`` (default: :attr:`info`).

        Returns:
            The directory.
        """
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        backbone = self.backbone
        if not isinstance(backbone, FiberBackbone):
            raise TypeError(f"save_pretrained needs a fiber_backbones.FiberBackbone, got {type(backbone).__name__}")
        pre = preprocessing or self.preprocessing or Preprocessing()
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        atomic_write(
            out / WEIGHTS_NAME,
            lambda p: save_file(state, p, metadata={"format": "pt", "fiber_model_type": self.model_type}),
        )
        tok = tokenizer if tokenizer is not None else self.tokenizer_source
        written = copy_tokenizer(tok, out)
        config = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "model_type": self.model_type,
            "backbone": backbone.config.to_dict(),
            "head": _plain(dataclasses.asdict(self.get_config())),
            "preprocessing": pre.to_dict(),
            "tokenizer": written,
            "info": _plain(dict(info if info is not None else (self.info or {}))),
        }
        text = json.dumps(config, indent=2) + "\n"

        def write_json(p: str) -> None:
            Path(p).write_text(text, encoding="utf-8")

        atomic_write(out / CONFIG_NAME, write_json)
        return out

    # ------------------------------------------------------------------------------------------- load

    @classmethod
    def from_pretrained(
        cls: type[M],
        path: str | os.PathLike[str],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        strict: bool = True,
    ) -> M:
        """Rebuild a saved model (this format, or a directory exported by earlier fiber-train versions).

        Args:
            path: a saved model directory, or a fiber-train run directory (its ``model/`` is used).
            device: where to put the model (default: CPU).
            dtype: cast floating-point tensors (e.g. ``torch.bfloat16``); default: as saved.
            strict: every model tensor must be in the file (a missing one is an error naming it); with
                ``False`` missing tensors keep their fresh initialisation and are listed in
                ``model.fresh_keys``.

        Returns:
            The model in eval mode, with :attr:`preprocessing`, :attr:`tokenizer_source` and :attr:`info` set.

        Raises:
            ModelFormatError: unreadable directory, a config of another model type, or weights that do not fit.
        """
        model_dir = resolve_model_dir(path)
        config = read_model_config(model_dir)
        model_type = config["model_type"]
        target: type[M] = cls
        if cls.model_type == "":
            target = cast("type[M]", model_class(model_type))  # cls is this base class, so M is too
        elif model_type != cls.model_type:
            raise ModelFormatError(
                f"{model_dir} holds a {model_type!r} model, not {cls.model_type!r}; load it with "
                f"fiber_models.load() or {model_class(model_type).__name__}.from_pretrained()"
            )
        try:
            backbone_cfg = BackboneConfig.from_dict(config["backbone"])
            head_cfg = target.head_config_from_dict(config["head"])
            pre = Preprocessing.from_dict(config.get("preprocessing", {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFormatError(f"{model_dir / CONFIG_NAME}: {exc}") from exc
        # every tensor is loaded next when strict: skip the random initialisation
        with skip_weight_init() if strict else contextlib.nullcontext():
            model = target.from_config(FiberBackbone(backbone_cfg), head_cfg)
        if config.get("legacy"):
            state = _read_state(model_dir, config)
            source = f"{model_dir} (fiber_model.json layout)"
            model.fresh_keys = strict_load(model, state, source=source, strict=strict)
        else:
            if not (model_dir / WEIGHTS_NAME).is_file():
                raise ModelFormatError(f"{model_dir}: no {WEIGHTS_NAME}")
            model.fresh_keys = _stream_load(model, model_dir / WEIGHTS_NAME, strict=strict)
        model.preprocessing = pre
        if any((model_dir / n).is_file() for n in TOKENIZER_FILES):
            model.tokenizer_source = str(model_dir)
        model.info = dict(config.get("info", {}))
        if dtype is not None:
            model = model.to(dtype=dtype)
        return model.to(device if device is not None else "cpu").eval()


def load(
    path: str | os.PathLike[str],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    strict: bool = True,
) -> FiberPreTrainedModel:
    """Load any saved FIBER model, dispatching on its ``model_type`` (see :data:`MODEL_TYPES`).

    Example::

        model = fiber_models.load("runs/vqa-20261204/model")
        type(model).__name__   # 'VQAModel'
    """
    return FiberPreTrainedModel.from_pretrained(path, device=device, dtype=dtype, strict=strict)


# ------------------------------------------------------------------------------------------ initialisation


@dataclass
class InitReport:
    """What :func:`initialize_from` did.

    Attributes:
        source: the checkpoint directory.
        loaded: number of model tensors initialised from the checkpoint.
        fresh: model keys the checkpoint did not provide (they keep their fresh initialisation).
        unused: checkpoint keys the model has no use for (e.g. ``mlm_score.*`` when fine-tuning VQA).
        resized: relative-position tables resized to the model's window.
        shape_mismatch: checkpoint keys skipped because their shape differs (e.g. another answer vocabulary).
    """

    source: str
    loaded: int = 0
    fresh: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)
    shape_mismatch: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """A few human-readable lines (fresh keys grouped by their first two name components)."""
        groups: dict[str, int] = {}
        for k in self.fresh:
            head = ".".join(k.split(".")[:2])
            groups[head] = groups.get(head, 0) + 1
        fresh = ", ".join(f"{g} ({n})" for g, n in sorted(groups.items())) or "none"
        lines = [f"initialised {self.loaded} tensors from {self.source}", f"  fresh: {fresh}"]
        if self.unused:
            lines.append(f"  unused checkpoint keys: {len(self.unused)}")
        if self.resized:
            lines.append(f"  resized relative-position tables: {len(self.resized)}")
        if self.shape_mismatch:
            lines.append(f"  skipped (shape mismatch): {', '.join(self.shape_mismatch[:5])}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return dataclasses.asdict(self)


def read_checkpoint_state(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Full-model-keyed tensors of any FIBER checkpoint: a saved model (this format or the earlier
    ``fiber_model.json`` layout, a run directory), a backbone ``save_pretrained`` directory or a backbone
    ``.safetensors`` file (keys prefixed with ``backbone.``).

    Raises:
        FileNotFoundError: ``path`` does not exist or holds none of these.
        ModelFormatError: unreadable weights.
    """
    from fiber_models.legacy import is_legacy_model

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} not found (expected a saved model, a run directory or a backbone directory)")
    if is_saved_model(p) or is_legacy_model(p) or is_saved_model(p / "model") or is_legacy_model(p / "model"):
        model_dir = resolve_model_dir(p)
        return _read_state(model_dir, read_model_config(model_dir))
    if (p / "backbone" / WEIGHTS_NAME).is_file():  # earlier `fiber-train convert` output: backbone/ + heads
        state = {f"backbone.{k}": v for k, v in _load_safetensors(p / "backbone" / WEIGHTS_NAME).items()}
        for name in ("heads.safetensors", "head.safetensors"):
            if (p / name).is_file():
                heads = _load_safetensors(p / name)
                # a fine checkpoint's heads file holds GroundingHead keys (fpn.*, dyhead_tower.*, ...)
                grounding = name == "head.safetensors" or any(k.startswith(_GROUNDING_HEAD_PREFIXES) for k in heads)
                state.update({("head." if grounding else "") + k: v for k, v in heads.items()})
        return state
    if p.is_dir() and not (p / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{p}: no saved model, run directory, backbone directory or .safetensors file")
    file = weights_file(p)  # refuses pickles with a message that says how to convert them
    return {f"backbone.{k}": v for k, v in _load_safetensors(file).items()}


_GROUNDING_HEAD_PREFIXES = ("fpn.", "dyhead_tower.", "token_alignment.", "bbox_pred.", "centerness.")


def _load_safetensors(file: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(file))
    except Exception as exc:  # safetensors raises its own error types
        raise ModelFormatError(f"{file}: not a readable safetensors file ({exc})") from exc


def initialize_from(model: nn.Module, path: str | os.PathLike[str], *, prefix: str = "") -> InitReport:
    """Initialise ``model`` non-strictly from any FIBER checkpoint (see :func:`read_checkpoint_state`).

    Checkpoint tensors the model has no slot for are reported as unused; tensors of another shape are skipped
    and reported, except relative-position tables, which are resized bicubically to the model's window; every
    model tensor the checkpoint does not provide keeps its initialisation and is listed in ``fresh``.

    Args:
        model: the model to initialise.
        path: the checkpoint.
        prefix: take only checkpoint keys under this prefix, stripped (``"backbone."`` for a bare backbone).

    Returns:
        The :class:`InitReport`.
    """
    from fiber_backbones import resize_relative_position_bias_table

    state = read_checkpoint_state(path)
    if prefix:
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    report = InitReport(source=str(path))
    own = model.state_dict()
    usable: dict[str, Tensor] = {}
    for k, v in state.items():
        if k not in own:
            report.unused.append(k)
        elif own[k].shape == v.shape:
            usable[k] = v
        elif k.endswith("relative_position_bias_table") and v.dim() == 2 and v.shape[1] == own[k].shape[1]:
            window = (int(round(own[k].shape[0] ** 0.5)) + 1) // 2
            usable[k] = resize_relative_position_bias_table(v, window)
            report.resized.append(k)
        else:
            report.shape_mismatch.append(f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}")
    model.load_state_dict(usable, strict=False)
    report.loaded = len(usable)
    report.fresh = sorted(set(own) - set(usable))
    return report
