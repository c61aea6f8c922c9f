"""Building blocks shared by the grounding tasks: fine-grained pre-training (training.md §3) and the
fine-grained downstream tasks that reuse its model and optimisation (§4).

- :class:`GroundingHeadConfig` / :class:`GroundingModel`: fusion backbone (fine variant) + the GLIP-style
  :class:`fiber_heads.grounding.GroundingHead` over the stride-8/16/32 pyramid and the fused text hidden states
  (architecture.md §9, training.md §3.1).
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
import json
import math
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fiber_backbones import FusionBackbone, TextInputs, save_pretrained
from fiber_backbones import from_pretrained as backbone_from_pretrained
from fiber_backbones import load_weights as load_backbone_weights
from fiber_heads.grounding import (
    GroundingDetections,
    GroundingHead,
    GroundingTargets,
    PostprocessConfig,
    should_skip_batch,
)
from fiber_train.checkpoint import CheckpointError, load_weights, save_weights
from fiber_train.tasks.base import StepOutput

MODEL_META = "fiber_model.json"
"""Name of the JSON file describing an exported model directory."""
HEAD_WEIGHTS = "head.safetensors"
EMA_WEIGHTS = "ema.safetensors"
GROUNDING_FORMAT = 1


# ------------------------------------------------------------------------------------------------ model


@dataclass(frozen=True)
class GroundingHeadConfig:
    """Geometry and loss settings of the grounding head (training.md §3.2-§3.7).

    Args:
        channels: FPN / DyHead width (256).
        num_convs: DyHead blocks (6).
        num_classes: width of the unused ``cls_logits`` layer (80 in the released checkpoints).
        anchor_sizes: anchor side per level P3..P7 (64 ... 1024 = 8 x stride).
        anchor_strides: strides of P3..P7.
        num_groups: GroupNorm groups of the tower (16; must divide ``channels``).
        drop_block_prob / drop_block_size: FPN DropBlock (0.3, 3; training only).
        offset_mode: DyHead offsets of the coarser level: ``"compat"`` (reference layout quirk) or ``"resize"``.
        grad_checkpointing: checkpoint the DyHead tower per block (memory only).
        topk: ATSS candidates per level (9).
        focal_alpha / focal_gamma: token focal loss (0.25, 2).
        reg_loss_weight: GIoU loss weight (2.0).
        unmatched_last_token: compat mode of the background token target (§3.6).
        max_empty_fraction: skip a batch where more than this fraction of images has no box (0.1, §3.7).
    """

    channels: int = 256
    num_convs: int = 6
    num_classes: int = 80
    anchor_sizes: tuple[float, ...] = (64.0, 128.0, 256.0, 512.0, 1024.0)
    anchor_strides: tuple[int, ...] = (8, 16, 32, 64, 128)
    num_groups: int = 16
    drop_block_prob: float = 0.3
    drop_block_size: int = 3
    offset_mode: str = "compat"
    grad_checkpointing: bool = False
    topk: int = 9
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    reg_loss_weight: float = 2.0
    unmatched_last_token: bool = False
    max_empty_fraction: float = 0.1

    def __post_init__(self) -> None:
        if len(self.anchor_sizes) != 5 or len(self.anchor_strides) != 5:
            raise ValueError("head.anchor_sizes and head.anchor_strides need 5 entries (P3..P7)")
        if self.channels % self.num_groups:
            raise ValueError(f"head.channels={self.channels} is not divisible by head.num_groups={self.num_groups}")
        if self.offset_mode not in ("compat", "resize"):
            raise ValueError(f"head.offset_mode must be 'compat' or 'resize', got {self.offset_mode!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GroundingHeadConfig:
        """Inverse of ``dataclasses.asdict`` (lists become tuples); unknown keys are an error."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise KeyError(f"unknown grounding head config keys: {unknown}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def build_grounding_head(backbone: FusionBackbone, cfg: GroundingHeadConfig) -> GroundingHead:
    """A :class:`GroundingHead` sized for ``backbone``'s last three pyramid maps and text width.

    Raises:
        ValueError: the backbone exposes fewer than three pyramid maps or they are not at strides 8/16/32.
    """
    specs = backbone.feature_specs[-3:]
    if len(specs) != 3 or tuple(s.stride for s in specs) != (8, 16, 32):
        raise ValueError(
            f"the grounding head needs pyramid maps at strides 8/16/32, the backbone gives "
            f"{[(s.name, s.stride) for s in backbone.feature_specs]}: use a fine variant "
            "(model.variant=fine_v2 or fine_v3)"
        )
    return GroundingHead(
        [s.channels for s in specs],
        backbone.text_dim,
        cfg.num_convs,
        channels=cfg.channels,
        num_classes=cfg.num_classes,
        anchor_sizes=cfg.anchor_sizes,
        anchor_strides=cfg.anchor_strides,
        num_groups=cfg.num_groups,
        drop_block_prob=cfg.drop_block_prob,
        drop_block_size=cfg.drop_block_size,
        offset_mode=cfg.offset_mode,  # type: ignore[arg-type]
        grad_checkpointing=cfg.grad_checkpointing,
        topk=cfg.topk,
        focal_alpha=cfg.focal_alpha,
        focal_gamma=cfg.focal_gamma,
        reg_loss_weight=cfg.reg_loss_weight,
        unmatched_last_token=cfg.unmatched_last_token,
        reduce_mean=distributed_mean,
    )


def distributed_mean(x: Tensor) -> Tensor:
    """Mean of a scalar over all ranks (identity without an initialised process group).

    The grounding losses normalise by the number of positives averaged over ranks (training.md §3.7).
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        if world > 1:
            y = x.detach().clone()
            torch.distributed.all_reduce(y)
            return y / world
    return x


class GroundingModel(nn.Module):
    """Fine FIBER: fusion backbone (fine variant) + grounding head (training.md §3.1).

    ``forward(batch)`` takes a :class:`fiber_data.GroundingBatch` and returns the training loss
    (token focal + GIoU + centerness); :meth:`predict` runs the shared detection/grounding inference (§4.7).

    Args:
        backbone: any fusion backbone whose last three ``feature_specs`` are at strides 8/16/32.
        head: the grounding head (see :func:`build_grounding_head`).
        max_empty_fraction: batches with more box-less images than this fraction are skipped (§3.7).
    """

    def __init__(self, backbone: FusionBackbone, head: GroundingHead, max_empty_fraction: float = 0.1) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.max_empty_fraction = max_empty_fraction

    def features(self, pixel_values: Tensor, text: TextInputs) -> tuple[list[Tensor], Tensor, Tensor]:
        """Fused forward.

        Args:
            pixel_values: ``[B, 3, H, W]`` with ``H``, ``W`` multiples of 32.
            text: ``[B, L]`` token ids and mask.

        Returns:
            ``(pyramid, text_hidden [B, L, C_txt], text_mask [B, L])`` where ``pyramid`` holds the three maps
            at strides 8, 16, 32.
        """
        out = self.backbone(pixel_values, text, fuse=True)
        if out.text is None:  # pragma: no cover - a fused forward with text always returns text features
            raise RuntimeError("the backbone returned no text features")
        return list(out.image.pyramid)[-3:], out.text.hidden, out.text.mask

    def forward(self, batch: Any) -> StepOutput:
        """Training loss of a :class:`fiber_data.GroundingBatch` (boxes in the padded input's pixels).

        A batch that the reference would skip (every image, or more than ``max_empty_fraction`` of them,
        without boxes) returns a zero loss that still touches every trainable parameter (so that DDP sees
        all gradients) and logs ``grounding/skipped = 1``.
        """
        targets = GroundingTargets(
            boxes=[t.boxes for t in batch.targets], positive_maps=[t.positive_map for t in batch.targets]
        )
        if should_skip_batch(targets, self.max_empty_fraction):
            zero = sum((p.sum() * 0.0 for p in self.parameters() if p.requires_grad), batch.pixel_values.new_zeros(()))
            return StepOutput(loss=zero, logs={"grounding/skipped": zero.new_ones(())})
        pyramid, hidden, mask = self.features(batch.pixel_values, TextInputs(batch.input_ids, batch.attention_mask))
        out = self.head(pyramid, hidden, mask, targets)
        assert out.loss is not None
        logs = dict(out.logs)
        logs["grounding/skipped"] = out.loss.new_zeros(())
        return StepOutput(loss=out.loss, logs=logs)

    @torch.no_grad()
    def predict(
        self,
        pixel_values: Tensor,
        text: TextInputs,
        positive_maps: Tensor,
        image_sizes: Tensor,
        original_sizes: Tensor | None = None,
        config: PostprocessConfig | None = None,
    ) -> list[GroundingDetections]:
        """Detections per image for the phrases/classes of ``positive_maps`` (training.md §4.7).

        Args:
            pixel_values: ``[B, 3, Hp, Wp]`` padded batch.
            text: ``[B, L]`` prompt tokens.
            positive_maps: ``[B, K, L]`` binary token map of each phrase/class (zero rows are padding).
            image_sizes: ``[B, 2]`` ``(h, w)`` of each resized image before padding.
            original_sizes: ``[B, 2]`` ``(h, w)`` to rescale boxes to (``None``: input pixels).
            config: post-processing thresholds.

        Returns:
            One :class:`fiber_heads.grounding.GroundingDetections` per image; labels index ``K``.
        """
        pyramid, hidden, mask = self.features(pixel_values, text)
        return self.head.predict(pyramid, hidden, mask, positive_maps, image_sizes, original_sizes, config)


def freeze_backbone_stages(backbone: nn.Module, level: int) -> list[str]:
    """Freeze the first Swin stages as the reference's ``FREEZE_CONV_BODY_AT`` (training.md §3.10).

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
    """AdamW groups of the fine stage (training.md §3.10).

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
    """Learning-rate and weight-decay schedule of the grounding tasks (training.md §3.10, §4).

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
    """Exponential moving average of a model's floating-point parameters and buffers (training.md §3.10).

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
    """Write an inference directory (``save_pretrained`` style)::

        out_dir/backbone/{config.json, model.safetensors}
        out_dir/head.safetensors           the grounding head
        out_dir/ema.safetensors            full model state with EMA weights (only when ``ema`` is given)
        out_dir/tokenizer.json             copy of the tokenizer file (when given)
        out_dir/fiber_model.json           {"task", "format", "grounding_head", "inference", "config"}

    Args:
        model: the trained model.
        out_dir: target directory (created).
        task: name of the task that trained it.
        head_config: the head's configuration (to rebuild it).
        inference: preprocessing settings the predictor needs (``max_text_len``, ``text_padding``,
            ``test_size``, ``max_size``, ``size_divisibility``, ``bgr255``).
        config: the resolved training configuration (stored for reference).
        tokenizer_file: tokenizer file to copy.
        ema: EMA weights to store next to the raw ones.

    Returns:
        ``out_dir``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_pretrained(model.backbone, out_dir / "backbone")  # type: ignore[arg-type]
    save_weights(model.head, out_dir / HEAD_WEIGHTS)
    if ema is not None:
        save_weights(ema.full_state_dict(model), out_dir / EMA_WEIGHTS)
    if tokenizer_file is not None and Path(tokenizer_file).is_file():
        shutil.copyfile(tokenizer_file, out_dir / "tokenizer.json")
    meta = {
        "task": task,
        "format": GROUNDING_FORMAT,
        "grounding_head": asdict(head_config),
        "inference": dict(inference),
        "config": dict(config or {}),
    }
    (out_dir / MODEL_META).write_text(json.dumps(meta, indent=2))
    return out_dir


def resolve_model_dir(path: str | Path) -> Path:
    """``RUN`` (a run directory) -> ``RUN/model``; a model directory is returned as is.

    Raises:
        FileNotFoundError: neither ``path/fiber_model.json`` nor ``path/model/fiber_model.json`` exists.
    """
    p = Path(path)
    if (p / MODEL_META).is_file():
        return p
    if (p / "model" / MODEL_META).is_file():
        return p / "model"
    raise FileNotFoundError(
        f"{p}: not an exported fiber-train model (no {MODEL_META} in it or in {p / 'model'}); pass a finished "
        "run directory or its model/ folder"
    )


def read_model_meta(model_dir: Path) -> dict[str, Any]:
    """The parsed ``fiber_model.json`` of an exported model directory."""
    path = Path(model_dir) / MODEL_META
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc})") from exc
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return meta


def load_grounding_model(
    path: str | Path, *, use_ema: bool = False, device: torch.device | str = "cpu"
) -> tuple[GroundingModel, dict[str, Any]]:
    """Rebuild a :class:`GroundingModel` exported by :func:`export_grounding_model`.

    Args:
        path: a run directory or its ``model/`` directory.
        use_ema: load the EMA weights (``ema.safetensors``) instead of the raw ones.
        device: where to put the model.

    Returns:
        ``(model in eval mode, metadata of fiber_model.json)``.

    Raises:
        CheckpointError: the directory holds no grounding head (e.g. a coarse pre-training export), the EMA
            weights are requested but absent, or the weights do not match.
    """
    model_dir = resolve_model_dir(path)
    meta = read_model_meta(model_dir)
    task = meta.get("task", "?")
    head_file = model_dir / HEAD_WEIGHTS
    if "grounding_head" not in meta or not head_file.is_file():
        raise CheckpointError(
            f"{model_dir}: this checkpoint (task {task!r}) has no grounding head "
            f"({MODEL_META} 'grounding_head' entry and {HEAD_WEIGHTS} are needed); grounding and detection need a "
            "model trained by `fiber-train fine` or a grounding fine-tuning task"
        )
    backbone = backbone_from_pretrained(model_dir / "backbone")
    head_cfg = GroundingHeadConfig.from_dict(meta["grounding_head"])
    model = GroundingModel(backbone, build_grounding_head(backbone, head_cfg), head_cfg.max_empty_fraction)
    if use_ema:
        if not (model_dir / EMA_WEIGHTS).is_file():
            raise CheckpointError(f"{model_dir}: no {EMA_WEIGHTS} (the run was trained without EMA)")
        load_weights(model, model_dir / EMA_WEIGHTS)
    else:
        load_weights(model.head, head_file)
    return model.to(device).eval(), meta


def load_backbone_into(backbone: nn.Module, path: Path) -> dict[str, list[str]]:
    """Initialise a fine backbone from a backbone ``save_pretrained`` directory or an exported run's
    ``model/backbone`` (a coarse pre-training run, training.md §3.10 "initialisation").

    Keys that exist only in the coarse variant (final ``norm``, ``norm_i2t_i`` for v2, unused gates) are
    dropped and new ones (stage norms ``norm1-3``) keep their initialisation; shapes must match.

    Returns:
        ``{"missing": [...], "unexpected": [...], "resized": [...]}``.
    """
    src = path / "backbone" if (path / "backbone").is_dir() else path
    return load_backbone_weights(backbone, src, strict=False)  # type: ignore[arg-type]
