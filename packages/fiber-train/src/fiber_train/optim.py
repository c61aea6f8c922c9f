"""AdamW parameter groups and learning-rate schedules of every task: the one optimiser and schedule module.

- :func:`build_param_groups` (coarse and downstream tasks: roles x weight decay) and
  :func:`grounding_param_groups` (grounding tasks: towers x bias, docs/reference/training.md §3.10);
  :func:`build_optimizer` (AdamW over either).
- :class:`GroundingLRScheduler` with :class:`ScheduleSettings`: linear warm-up from a factor, then multi-step,
  cosine or linear decay, weight-decay milestones, an lr scale for reduce-on-plateau. :func:`build_scheduler`
  is the coarse/downstream schedule (warm-up + linear decay, docs/reference/training.md §1.6) expressed with it.

Parameters are sorted into three learning-rate roles (``base`` x1, ``cross_modal`` x ``lr_mult_cross_modal``,
``head`` x ``lr_mult_head``), each split by weight decay. The reference decides both by substrings of
checkpoint names; we decide by module membership, which the task declares explicitly
(:func:`build_param_groups`'s ``roles`` argument), and by a cleaner no-decay rule: every tensor with at most
one dimension (biases, norm weights, gates, temperature) plus the backbone's ``no_weight_decay()`` names
(relative-position tables). The reference's quirks (gates, temperature and ``norm_i2t_i.weight`` decayed)
are therefore not reproduced; their effect at weight decay 0.01 is negligible.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from fiber_train.config import OptimConfig, OptimSection

ROLES = ("base", "cross_modal", "head")


#: a parameter bucket key (e.g. ``(role, decay)``)
K = TypeVar("K", bound=Hashable)


def build_param_groups(
    model: nn.Module,
    cfg: OptimConfig,
    roles: Mapping[str, Iterable[nn.Parameter]],
    no_decay_names: Iterable[str] = (),
) -> list[dict]:
    """Split ``model``'s trainable parameters into AdamW groups.

    Args:
        model: the full model.
        cfg: optimiser settings (base lr and multipliers).
        roles: ``{"cross_modal": params, "head": params}``; every other parameter is ``base``.
        no_decay_names: fully qualified parameter names excluded from weight decay in addition to 1-D tensors.

    Returns:
        Up to six groups, each with ``params``, ``lr``, ``weight_decay`` and a ``name`` like ``head/no_decay``.

    Raises:
        ValueError: a parameter is assigned two roles, or a role name is unknown.
    """
    role_of: dict[int, str] = {}
    for role, params in roles.items():
        if role not in ROLES:
            raise ValueError(f"unknown parameter role {role!r}; expected one of {ROLES}")
        for p in params:
            if id(p) in role_of and role_of[id(p)] != role:
                raise ValueError(f"a parameter is assigned to both {role_of[id(p)]!r} and {role!r}")
            role_of[id(p)] = role
    skip = set(no_decay_names)
    mult = {"base": 1.0, "cross_modal": cfg.lr_mult_cross_modal, "head": cfg.lr_mult_head}

    def bucket(name: str, p: nn.Parameter) -> tuple[str, bool]:
        decay = p.ndim > 1 and name not in skip and not any(name.endswith("." + s) or name == s for s in skip)
        return role_of.get(id(p), "base"), decay

    settings = {
        (role, decay): (
            f"{role}/{'decay' if decay else 'no_decay'}",
            cfg.lr * mult[role],
            cfg.weight_decay if decay else 0.0,
        )
        for role in ROLES
        for decay in (True, False)
    }
    return bucketed_param_groups(model, bucket, settings)


def bucketed_param_groups(
    model: nn.Module,
    bucket_of: Callable[[str, nn.Parameter], K],
    settings: Mapping[K, tuple[str, float, float]],
) -> list[dict]:
    """AdamW parameter groups: every trainable parameter of ``model`` goes to the bucket ``bucket_of(name, p)``;
    each non-empty bucket of ``settings`` (in its order) becomes ``{"name", "params", "lr", "weight_decay"}`` from
    ``settings[bucket] = (name, lr, weight_decay)``. Frozen parameters are left out."""
    buckets: dict[K, list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            buckets.setdefault(bucket_of(name, p), []).append(p)
    return [
        {"name": group, "params": buckets[key], "lr": lr, "weight_decay": wd}
        for key, (group, lr, wd) in settings.items()
        if buckets.get(key)
    ]


def build_optimizer(param_groups: list[dict], cfg: OptimSection, *, fused: bool = False) -> torch.optim.AdamW:
    """AdamW over ``param_groups`` with the configured moments (each group keeps its own lr).

    Args:
        param_groups: groups from :func:`build_param_groups` (or a task's own).
        cfg: optimiser settings.
        fused: use AdamW's fused kernel (CUDA training: one launch for every parameter instead of several
            per tensor); the parameters must be on a device the fused kernel supports when ``step`` runs.
    """
    for g in param_groups:
        g["initial_lr"] = g["lr"]
    extra = {"fused": True} if fused else {}
    return torch.optim.AdamW(
        param_groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, **extra
    )


def warmup_linear_decay(step: int, max_steps: int, warmup_ratio: float, end_ratio: float = 0.0) -> float:
    """Learning-rate factor at optimiser ``step``: linear 0 -> 1 over ``warmup_ratio * max_steps`` steps, then
    linear 1 -> ``end_ratio`` at ``max_steps`` (the reference's polynomial decay with power 1); the schedule of
    :func:`linear_schedule` (:func:`lr_factor`)."""
    return lr_factor(step, max_steps, linear_schedule(max_steps, warmup_ratio, end_ratio))


def linear_schedule(max_steps: int, warmup_ratio: float, end_ratio: float = 0.0) -> ScheduleSettings:
    """The coarse and downstream schedule (``optim.warmup_ratio``, ``optim.end_lr_ratio``) as
    :class:`ScheduleSettings`: warm-up from 0 over ``ceil(warmup_ratio * max_steps)`` steps, then linear decay
    to ``end_ratio``; no milestones, constant weight decay."""
    return ScheduleSettings(
        schedule="linear",
        warmup_steps=int(math.ceil(warmup_ratio * max_steps)),
        warmup_factor=0.0,
        milestones=(),
        wd_milestone_ratio=0.0,
        end_lr_ratio=end_ratio,
    )


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int) -> GroundingLRScheduler:
    """Step-level scheduler implementing :func:`warmup_linear_decay` for every group (``optim.warmup_ratio``,
    ``optim.end_lr_ratio``)."""
    return GroundingLRScheduler(optimizer, linear_schedule(max_steps, cfg.warmup_ratio, cfg.end_lr_ratio), max_steps)


# ------------------------------------------------------------------- the grounding tasks' groups and schedule


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
    base = {"vision": lr, "language": language_lr}
    settings = {
        (tower, is_bias): (
            f"{tower}/{'bias' if is_bias else 'weight'}",
            base[tower] * (bias_lr_mult if is_bias else 1.0),
            bias_weight_decay if is_bias else weight_decay,
        )
        for tower in ("vision", "language")
        for is_bias in (False, True)
    }
    return bucketed_param_groups(
        model, lambda name, p: ("language" if name.startswith(language_prefix) else "vision", "bias" in name), settings
    )


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
        """Restore the step count and lr scale and re-apply the factors. A ``LambdaLR`` state (``last_epoch``:
        the checkpoints of coarse and downstream runs written before this scheduler replaced it) is read too."""
        self.last_step = int(state["last_step"] if "last_step" in state else state["last_epoch"])
        self.lr_scale = float(state.get("lr_scale", 1.0))
        self._apply()
