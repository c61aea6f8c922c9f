"""Building blocks shared by the grounding tasks: fine-grained pre-training (docs/reference/training.md §3) and the
fine-grained downstream tasks that reuse its model and optimisation (§4).

- :class:`GroundingHeadConfig` / :class:`GroundingModel`: fusion backbone (fine variant) + the GLIP-style
  :class:`fiber_heads.grounding.GroundingHead` over the stride-8/16/32 pyramid and the fused text hidden states
  (docs/reference/architecture.md §9, docs/reference/training.md §3.1).
- :func:`grounding_param_groups`: the reference AdamW groups of §3.10 (vision lr, language lr for everything under
  the text encoder including the t2i branches and gates, biases at lr x 2 without weight decay).
- :class:`GroundingLRScheduler` + :func:`lr_factor` / :func:`weight_decay_factor`: linear warm-up from a factor,
  then multi-step (x 0.1 at 67 % and 89 %), cosine or linear decay; the weight-decay milestones of §3.10.
- :class:`ModelEMA`: exponential moving average of floating-point parameters and buffers (§3.10, "EMA").
- :func:`freeze_backbone_stages`: the reference's freeze levels (2 = patch embedding + Swin stage 0).
- :func:`export_grounding_model` / :func:`load_grounding_model`: the ``RUN/model`` directory format read by
  :class:`fiber_train.predictor.GroundingPredictor`.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping
from dataclasses import dataclass
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


def grounding_param_groups(
    model: nn.Module,
    *,
    lr: float,
    language_lr: float,
    weight_decay: float,
    bias_lr_mult: float = 2.0,
    bias_weight_decay: float = 0.0,
    language_prefix: str = "backbone.text_encoder.",
) -> list[dict]:
    """AdamW groups of the fine stage (docs/reference/training.md §3.10).

    Every trainable parameter whose name starts with ``language_prefix`` (the whole text encoder, including
    the t2i cross-attention and ``alpha_t2i``) gets ``language_lr``, every other one ``lr``; a parameter whose
    name contains ``bias`` (also ``relative_position_bias_table``, ``bias_lang``, ``bias0``) gets its lr x
    ``bias_lr_mult`` and ``bias_weight_decay``; all others (LayerNorm/GroupNorm weights and gates included)
    get ``weight_decay``. Frozen parameters are left out.

    Returns:
        Up to four groups named ``vision/weight``, ``vision/bias``, ``language/weight``, ``language/bias``.
    """
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        tower = "language" if name.startswith(language_prefix) else "vision"
        buckets.setdefault((tower, "bias" in name), []).append(p)
    base = {"vision": lr, "language": language_lr}
    groups = []
    for tower in ("vision", "language"):
        for is_bias in (False, True):
            params = buckets.get((tower, is_bias))
            if params:
                groups.append(
                    {
                        "name": f"{tower}/{'bias' if is_bias else 'weight'}",
                        "params": params,
                        "lr": base[tower] * (bias_lr_mult if is_bias else 1.0),
                        "weight_decay": bias_weight_decay if is_bias else weight_decay,
                    }
                )
    return groups


@dataclass(frozen=True)
class ScheduleSettings:
    """Learning-rate and weight-decay schedule of the grounding tasks (docs/reference/training.md §3.10, §4).

    Args:
        schedule: ``"multistep"`` (reference), ``"cosine"`` or ``"linear"`` decay after the warm-up.
        warmup_steps: linear warm-up length in optimiser steps (2000 in the reference).
        warmup_factor: lr factor at step 0 of the warm-up (0.001).
        milestones: multi-step milestones as fractions of ``max_steps`` (0.67, 0.89).
        gamma: lr factor applied at each milestone (0.1); also the weight-decay factor.
        wd_milestone_ratio: the weight decay is multiplied by ``gamma`` when the step reaches this fraction of
            each lr milestone (0.667 in pre-training; 0 disables).
        end_lr_ratio: final lr factor of the cosine/linear schedules.
    """

    schedule: str = "multistep"
    warmup_steps: int = 2000
    warmup_factor: float = 0.001
    milestones: tuple[float, ...] = (0.67, 0.89)
    gamma: float = 0.1
    wd_milestone_ratio: float = 0.667
    end_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.schedule not in ("multistep", "cosine", "linear"):
            raise ValueError(f"optim.schedule must be 'multistep', 'cosine' or 'linear', got {self.schedule!r}")
        if any(not 0.0 < m <= 1.0 for m in self.milestones) or list(self.milestones) != sorted(self.milestones):
            raise ValueError(f"optim.milestones must be increasing fractions in (0, 1], got {self.milestones}")


def milestone_steps(settings: ScheduleSettings, max_steps: int) -> list[int]:
    """The lr milestones in optimiser steps (``int(fraction * max_steps)``)."""
    return [int(m * max_steps) for m in settings.milestones]


def lr_factor(step: int, max_steps: int, settings: ScheduleSettings) -> float:
    """Learning-rate factor at optimiser ``step`` (0-based: the factor used by the ``step + 1``-th update).

    Warm-up (maskrcnn-benchmark's linear method): ``warmup_factor * (1 - a) + a`` with ``a = step / warmup``,
    multiplying the decay factor; multi-step decay ``gamma ** (number of milestones <= step)``; cosine and
    linear go from 1 at the end of the warm-up to ``end_lr_ratio`` at ``max_steps``.
    """
    warm = 1.0
    if step < settings.warmup_steps:
        alpha = step / settings.warmup_steps
        warm = settings.warmup_factor * (1.0 - alpha) + alpha
    if settings.schedule == "multistep":
        return warm * settings.gamma ** bisect.bisect_right(milestone_steps(settings, max_steps), step)
    span = max(1, max_steps - settings.warmup_steps)
    progress = min(1.0, max(0.0, (step - settings.warmup_steps) / span))
    if settings.schedule == "cosine":
        decay = settings.end_lr_ratio + (1.0 - settings.end_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        decay = 1.0 - (1.0 - settings.end_lr_ratio) * progress
    return warm * decay


def weight_decay_factor(step: int, max_steps: int, settings: ScheduleSettings) -> float:
    """Weight-decay factor at ``step``: ``gamma`` per lr milestone ``m`` with ``step >= wd_milestone_ratio * m``."""
    if settings.wd_milestone_ratio <= 0:
        return 1.0
    hits = sum(step >= settings.wd_milestone_ratio * m for m in milestone_steps(settings, max_steps))
    return settings.gamma**hits


class GroundingLRScheduler:
    """Step-level scheduler of the lr and weight decay of every group (see :func:`lr_factor`).

    Each group's ``initial_lr`` (set by :func:`fiber_train.optim.build_optimizer`, else its ``lr``) and
    ``initial_weight_decay`` are the peak values; :meth:`step` is called once per optimiser step;
    :meth:`scale_lr` lowers every lr by a factor from now on (reduce-on-plateau). The state is the step count
    and that factor, so a resumed run continues the same curve.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, settings: ScheduleSettings, max_steps: int) -> None:
        self.optimizer = optimizer
        self.settings = settings
        self.max_steps = max_steps
        self.last_step = 0
        self.lr_scale = 1.0
        for g in optimizer.param_groups:
            g.setdefault("initial_lr", g["lr"])
            g.setdefault("initial_weight_decay", g["weight_decay"])
        self._apply()

    def _apply(self) -> None:
        f = lr_factor(self.last_step, self.max_steps, self.settings)
        w = weight_decay_factor(self.last_step, self.max_steps, self.settings)
        for g in self.optimizer.param_groups:
            g["lr"] = g["initial_lr"] * f * self.lr_scale
            g["weight_decay"] = g["initial_weight_decay"] * w

    def step(self) -> None:
        """Advance one optimiser step."""
        self.last_step += 1
        self._apply()

    def scale_lr(self, factor: float) -> None:
        """Multiply every group's learning rate by ``factor`` for the rest of training."""
        self.lr_scale *= float(factor)
        self._apply()

    def get_last_lr(self) -> list[float]:
        """Current lr of every group."""
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, float]:
        """``{"last_step": n, "lr_scale": s}``."""
        return {"last_step": self.last_step, "lr_scale": self.lr_scale}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the step count and lr scale and re-apply the factors."""
        self.last_step = int(state["last_step"])
        self.lr_scale = float(state.get("lr_scale", 1.0))
        self._apply()


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
