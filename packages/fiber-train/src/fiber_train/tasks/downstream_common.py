"""Shared machinery of the coarse downstream tasks (training.md §2.1): initialisation from a coarse
pre-trained export, data preparation, parameter groups and export.

Every downstream model is a :class:`DownstreamModel`: the fusion backbone (``backbone.*``), the fused
projections/poolers (``projection.*``, as in :class:`~fiber_train.tasks.coarse.CoarseModel`) and task heads
under their official names (``vqa_classifier``, ``nlvr2_classifier``, ``itm_score``, ``mlm_score``,
``cross_modal_att_layers``, ...). A run's ``model/`` export has the same layout as the coarse export
(``backbone/`` + ``heads.safetensors``), so :func:`load_pretrained_into` initialises any downstream model
from a coarse run *or* re-loads a finished downstream run (``fiber-train evaluate --run``).

Fine-tuning loads non-strictly (training.md §2.1): the ITC queue is never stored (non-persistent buffers),
relative-position tables are resized to the task's window, and every parameter the checkpoint does not
provide keeps its fresh ``N(0, 0.02)`` initialisation; :class:`InitReport` lists which.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from fiber_backbones import load_weights as load_backbone_weights
from fiber_backbones import save_pretrained
from fiber_data import CoarseTrainTransform, ImageTransform, SyntheticWorldConfig, generate_world, load_tokenizer
from fiber_models.downstream import DownstreamModel as DownstreamModel
from fiber_models.downstream import set_text_pool
from fiber_train.checkpoint import CheckpointError, save_weights
from fiber_train.config import DataConfig, to_dict
from fiber_train.optim import build_param_groups
from fiber_train.tasks.base import build_backbone

__all__ = [
    "DownstreamEvalConfig",
    "DownstreamModel",
    "DownstreamTaskBase",
    "InitReport",
    "build_backbone",
    "load_pretrained_into",
]


@dataclass(frozen=True)
class DownstreamEvalConfig:
    """Evaluation settings shared by the downstream tasks.

    Args:
        enabled: evaluate at the end of training (and every ``every`` steps).
        every: optimiser steps between evaluations during training (0: only at the end).
        batch_size: inference batch size.
        max_samples: evaluate only the first N samples of the evaluation split (0: all).
    """

    enabled: bool = True
    every: int = 0
    batch_size: int = 64
    max_samples: int = 0


@dataclass
class InitReport:
    """What :func:`load_pretrained_into` did.

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
        return asdict(self)


def load_pretrained_into(model: DownstreamModel, path: str | Path) -> InitReport:
    """Initialise ``model`` non-strictly from an exported run directory or a backbone directory.

    Args:
        model: the downstream model.
        path: ``RUN_DIR/model`` of any fiber-train run (``backbone/`` + optional ``heads.safetensors``), or a
            backbone ``save_pretrained`` directory / ``.safetensors`` file.

    Returns:
        The :class:`InitReport` (which keys stayed fresh, which were unused).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: ``heads.safetensors`` is unreadable.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model.pretrained={path} not found (expected RUN_DIR/model of a fiber-train run)")
    report = InitReport(source=str(path))
    backbone_src = path / "backbone" if (path / "backbone").is_dir() else path
    bb = load_backbone_weights(model.backbone, backbone_src, strict=False)  # type: ignore[arg-type]
    report.resized = list(bb["resized"])
    report.unused = [f"backbone.{k}" for k in bb["unexpected"]]
    missing = set(bb["missing"])
    loaded = {f"backbone.{k}" for k in model.backbone.state_dict() if k not in missing}
    heads_file = path / "heads.safetensors"
    if heads_file.is_file():
        try:
            state = load_file(str(heads_file))
        except Exception as exc:  # safetensors raises its own error type
            raise CheckpointError(f"{heads_file}: not a readable safetensors file ({exc})") from exc
        own = {k: v for k, v in model.state_dict().items() if not k.startswith("backbone.")}
        usable: dict[str, torch.Tensor] = {}
        for k, v in state.items():
            if k not in own:
                report.unused.append(k)
            elif own[k].shape != v.shape:
                report.shape_mismatch.append(f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}")
            else:
                usable[k] = v
        model.load_state_dict(usable, strict=False)
        loaded |= set(usable)
    report.loaded = len(loaded)
    report.fresh = sorted(set(model.state_dict()) - loaded)
    return report


class DownstreamTaskBase:
    """Data preparation, tokenizer, model initialisation, parameter groups and export of a downstream task.

    Subclasses set ``name``, implement ``build_model`` (calling :meth:`init_from_pretrained`),
    ``train_dataset``, ``collate_fn``, ``evaluate``, and list their data files in :meth:`required_files`.

    Attributes:
        run_dir: when set, ``evaluate`` also writes its predictions there in the official formats.
        init_report: what :meth:`init_from_pretrained` loaded (``None`` without ``model.pretrained``).
    """

    name = "downstream"

    def __init__(self, config: Any) -> None:
        self.config = config
        self._tokenizer: Any = None
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
            generate_world(
                Path(data.root),
                config=SyntheticWorldConfig(
                    seed=data.seed,
                    image_size=data.image_size,
                    num_train=data.synthetic_train,
                    num_val=data.synthetic_val,
                    num_test=data.synthetic_test,
                ),
                progress=self.config.trainer.progress,
            )
        for p in [*self.required_files(), *([] if data.tokenizer else [self.tokenizer_path()])]:
            if not Path(p).exists():
                raise FileNotFoundError(f"{p} not found (task {self.name}, data.root={data.root}). {self.data_help()}")

    def tokenizer_path(self) -> Path:
        """``data.tokenizer`` or ``<data.root>/tokenizer.json``."""
        return Path(self.data.tokenizer) if self.data.tokenizer else Path(self.data.root) / "tokenizer.json"

    @property
    def tokenizer(self) -> Any:
        """The tokenizer (loaded once)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.data.tokenizer or self.tokenizer_path())
        return self._tokenizer

    def image_transform(self) -> ImageTransform:
        """Bicubic ``S x S`` resize + ImageNet normalisation (the evaluation transform of training.md §2.1)."""
        return ImageTransform(self.data.image_size)

    def train_transform(self, augment: bool) -> Callable[[Any], Any]:
        """The training transform: :class:`fiber_data.CoarseTrainTransform` (RandomResizedCrop(0.5, 1) + flip +
        RandAugment(2, 7), training.md §2.1) when ``augment``, else :meth:`image_transform`."""
        return CoarseTrainTransform(self.data.image_size) if augment else self.image_transform()

    # ------------------------------------------------------------------------------------------ model

    def init_from_pretrained(self, model: DownstreamModel) -> DownstreamModel:
        """Apply ``model.text_pool`` to the poolers, load ``model.pretrained`` (when set) into ``model`` and print
        which keys were initialised fresh."""
        set_text_pool(model, self.config.model.text_pool)
        if self.config.model.pretrained:
            self.init_report = load_pretrained_into(model, self.config.model.pretrained)
            print(f"[{self.name}] {self.init_report.summary()}")
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

    def export_extras(self, model: nn.Module, out_dir: Path) -> None:
        """Task-specific files written next to the weights (e.g. the VQA answer list)."""

    def export(self, model: nn.Module, out_dir: Path) -> None:
        """Write ``backbone/``, ``heads.safetensors`` (every non-backbone tensor), the tokenizer and
        ``fiber_model.json`` (task, resolved config, initialisation report)."""
        assert isinstance(model, DownstreamModel)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_pretrained(model.backbone, out_dir / "backbone")  # type: ignore[arg-type]
        heads = {k: v for k, v in model.state_dict().items() if not k.startswith("backbone.")}
        save_weights(heads, out_dir / "heads.safetensors")
        tok = self.tokenizer_path()
        if tok.is_file():
            shutil.copyfile(tok, out_dir / "tokenizer.json")
        info: dict[str, Any] = {"task": self.name, "config": to_dict(self.config)}
        if self.init_report is not None:
            info["init"] = self.init_report.to_dict()
        (out_dir / "fiber_model.json").write_text(json.dumps(info, indent=2))
        self.export_extras(model, out_dir)


def batched(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    """Consecutive slices of ``items`` of at most ``size`` elements."""
    for start in range(0, len(items), size):
        yield items[start : start + size]
