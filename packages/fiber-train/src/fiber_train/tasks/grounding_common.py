"""Building blocks shared by the grounding tasks: fine-grained pre-training (docs/reference/training.md §3) and the
fine-grained downstream tasks that reuse its model and optimisation (§4).

- :class:`GroundingHeadConfig` / :class:`GroundingModel`: fusion backbone (fine variant) + the GLIP-style
  :class:`fiber_heads.grounding.GroundingHead` over the stride-8/16/32 pyramid and the fused text hidden states
  (docs/reference/architecture.md §9, docs/reference/training.md §3.1).
- :func:`grounding_param_groups`, :class:`GroundingLRScheduler`, :class:`ScheduleSettings`, :func:`lr_factor`,
  :func:`weight_decay_factor`: re-exported from :mod:`fiber_train.optim`, the one optimiser and schedule module.
- :class:`ModelEMA`: exponential moving average of floating-point parameters and buffers (§3.10, "EMA").
- :func:`freeze_backbone_stages`: the reference's freeze levels (2 = patch embedding + Swin stage 0).
- :func:`export_grounding_model` / :func:`load_grounding_model`: the ``RUN/model`` directory format read by
  :class:`fiber_train.predictor.GroundingPredictor`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fiber_models.grounding import EMA_WEIGHTS
from fiber_models.grounding import GroundingHeadConfig as GroundingHeadConfig
from fiber_models.grounding import GroundingModel as GroundingModel
from fiber_models.grounding import build_grounding_head as build_grounding_head
from fiber_models.grounding import distributed_mean as distributed_mean
from fiber_models.pretrained import ModelFormatError, Preprocessing, initialize_from, read_model_config
from fiber_models.pretrained import resolve_model_dir as resolve_model_dir
from fiber_train.checkpoint import CheckpointError, load_weights, save_weights
from fiber_train.optim import GroundingLRScheduler as GroundingLRScheduler
from fiber_train.optim import ScheduleSettings as ScheduleSettings
from fiber_train.optim import grounding_param_groups as grounding_param_groups
from fiber_train.optim import lr_factor as lr_factor
from fiber_train.optim import milestone_steps as milestone_steps
from fiber_train.optim import weight_decay_factor as weight_decay_factor

# ------------------------------------------------------------------------------------------------ model


def freeze_backbone_stages(backbone: nn.Module, level: int) -> list[str]:
    """Freeze the first Swin stages as the reference's ``FREEZE_CONV_BODY_AT`` (docs/reference/training.md §3.10).

    Args:
        backbone: a :class:`fiber_backbones.FiberBackbone` (``image_encoder.patch_embed`` /
            ``image_encoder.layers.{i}``).
        level: ``<= 0`` nothing; ``1`` the patch embedding; ``k >= 2`` the patch embedding and stages
            ``0 .. k-2`` (their patch merging included).

    Returns:
        Names of the parameters frozen.
    """
    frozen: list[str] = []
    if level <= 0:
        return frozen
    prefixes = ["image_encoder.patch_embed."] + [f"image_encoder.layers.{i}." for i in range(level - 1)]
    for name, p in backbone.named_parameters():
        if any(name.startswith(pref) for pref in prefixes):
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


# ------------------------------------------------------------------------------------------- optimisation


class ModelEMA:
    """Exponential moving average of a model's floating-point parameters and buffers (docs/reference/training.md §3.10).

    ``shadow = decay * shadow + (1 - decay) * current`` after every optimiser step. Integer buffers are not
    averaged (the reference averages and casts them back; they never change, so the result is the same).

    Args:
        model: the model to track (its current values initialise the average).
        decay: 0.999 in the reference.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.shadow: dict[str, Tensor] = {
            k: v.detach().clone().float() for k, v in model.state_dict().items() if v.is_floating_point()
        }

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current values into the average."""
        for k, v in model.state_dict().items():
            if k in self.shadow:
                s = self.shadow[k]
                if s.device != v.device:
                    s = self.shadow[k] = s.to(v.device)
                s.mul_(self.decay).add_(v.detach().float(), alpha=1.0 - self.decay)

    def state_dict(self) -> dict[str, Tensor]:
        """The averaged tensors (CPU copies)."""
        return {k: v.detach().cpu().clone() for k, v in self.shadow.items()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore the averaged tensors (keys must match)."""
        missing = set(self.shadow) - set(state)
        if missing:
            raise CheckpointError(f"EMA state lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
        self.shadow = {k: state[k].detach().clone().float() for k in self.shadow}

    def full_state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        """A complete state dict of ``model`` with the averaged floating-point values (for export)."""
        out = {}
        for k, v in model.state_dict().items():
            out[k] = self.shadow[k].to(v.dtype) if k in self.shadow else v
        return out


# ------------------------------------------------------------------------------------------------ export


def export_grounding_model(
    model: GroundingModel,
    out_dir: Path,
    *,
    task: str,
    head_config: GroundingHeadConfig,
    inference: Mapping[str, Any],
    config: Mapping[str, Any] | None = None,
    tokenizer_file: Path | None = None,
    ema: ModelEMA | None = None,
) -> Path:
    """Write the model in the saved format of :mod:`fiber_models` (``config.json``, ``model.safetensors``, the
    tokenizer) and, with ``ema``, ``ema.safetensors`` (the full state with EMA weights).

    Args:
        model: the trained model.
        out_dir: target directory (created).
        task: name of the task that trained it.
        head_config: the head's configuration (to rebuild it).
        inference: preprocessing settings the predictor needs (``max_text_len``, ``text_padding``,
            ``test_size``, ``max_size``, ``size_divisibility``, ``bgr255``).
        config: the resolved training configuration (stored as provenance).
        tokenizer_file: tokenizer file to copy.
        ema: EMA weights to store next to the raw ones.

    Returns:
        ``out_dir``.
    """
    out_dir = Path(out_dir)
    model.head_config = head_config
    pre = Preprocessing.for_backbone(
        str(dict(config or {}).get("model", {}).get("backbone", "")),
        resize="shorter_side",
        max_text_len=int(inference.get("max_text_len", 256)),
        test_size=int(inference.get("test_size", 800)),
        max_size=inference.get("max_size", 1333),
        size_divisibility=int(inference.get("size_divisibility", 32)),
        bgr255=bool(inference.get("bgr255", True)),
        text_padding=str(inference.get("text_padding", "max_length")),
    )
    tok = tokenizer_file if tokenizer_file is not None and Path(tokenizer_file).is_file() else None
    model.save_pretrained(out_dir, tokenizer=tok, preprocessing=pre, info={"task": task, "config": dict(config or {})})
    if ema is not None:
        save_weights(ema.full_state_dict(model), out_dir / EMA_WEIGHTS)
    return out_dir


def read_model_meta(model_dir: Path) -> dict[str, Any]:
    """The ``config.json`` of a saved model (see :func:`fiber_models.read_model_config`)."""
    try:
        return read_model_config(model_dir)
    except ModelFormatError as exc:
        raise CheckpointError(str(exc)) from exc


def load_grounding_model(
    path: str | Path, *, use_ema: bool = False, device: torch.device | str = "cpu"
) -> tuple[GroundingModel, dict[str, Any]]:
    """Load a saved :class:`GroundingModel` (:meth:`GroundingModel.from_pretrained`), optionally with its EMA weights.

    Args:
        path: a run directory or its ``model/`` directory.
        use_ema: load the EMA weights (``ema.safetensors``) instead of the raw ones.
        device: where to put the model.

    Returns:
        ``(model in eval mode, its config.json)``.

    Raises:
        CheckpointError: the directory holds no grounding model (e.g. a coarse pre-training export), the EMA
            weights are requested but absent, or the weights do not match.
    """
    model_dir = resolve_model_dir(path)
    meta = read_model_meta(model_dir)
    if meta["model_type"] != "grounding":
        task = meta.get("info", {}).get("task", meta["model_type"])
        raise CheckpointError(
            f"{model_dir}: this checkpoint (task {task!r}) has no grounding head; grounding and detection need a "
            "model trained by `fiber-train fine`, a grounding fine-tuning task, or a converted fine checkpoint"
        )
    try:
        model = GroundingModel.from_pretrained(model_dir)
    except ModelFormatError as exc:
        raise CheckpointError(str(exc)) from exc
    if use_ema:
        if not (model_dir / EMA_WEIGHTS).is_file():
            raise CheckpointError(f"{model_dir}: no {EMA_WEIGHTS} (the run was trained without EMA)")
        load_weights(model, model_dir / EMA_WEIGHTS)
    return model.to(device).eval(), meta


def load_backbone_into(backbone: nn.Module, path: Path) -> dict[str, list[str]]:
    """Initialise a fine backbone from a saved model, a run directory or a backbone directory (e.g. a coarse
    pre-training run, docs/reference/training.md §3.10 "initialisation").

    Keys that exist only in the coarse variant (final ``norm``, ``norm_i2t_i`` for v2, unused gates) are
    dropped and new ones (stage norms ``norm1-3``) keep their initialisation; shapes must match.

    Returns:
        ``{"missing": [...], "unexpected": [...], "resized": [...]}``.

    Raises:
        CheckpointError: backbone tensors of another shape.
    """
    report = initialize_from(backbone, path, prefix="backbone.")
    if report.shape_mismatch:
        raise CheckpointError(f"{path}: backbone tensors of another shape: {', '.join(report.shape_mismatch[:10])}")
    return {"missing": report.fresh, "unexpected": report.unused, "resized": report.resized}
