"""AdamW parameter groups and the warm-up + linear-decay schedule (docs/reference/training.md §1.6).

Parameters are sorted into three learning-rate roles (``base`` x1, ``cross_modal`` x ``lr_mult_cross_modal``,
``head`` x ``lr_mult_head``), each split by weight decay. The reference decides both by substrings of
checkpoint names; we decide by module membership, which the task declares explicitly
(:func:`build_param_groups`'s ``roles`` argument), and by a cleaner no-decay rule: every tensor with at most
one dimension (biases, norm weights, gates, temperature) plus the backbone's ``no_weight_decay()`` names
(relative-position tables). The reference's quirks (gates, temperature and ``norm_i2t_i.weight`` decayed)
are therefore not reproduced; their effect at weight decay 0.01 is negligible.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from fiber_train.config import OptimConfig

ROLES = ("base", "cross_modal", "head")


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
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        role = role_of.get(id(p), "base")
        decay = p.ndim > 1 and name not in skip and not any(name.endswith("." + s) or name == s for s in skip)
        groups.setdefault((role, decay), []).append(p)
    out = []
    for role in ROLES:
        for decay in (True, False):
            params = groups.get((role, decay))
            if params:
                out.append(
                    {
                        "name": f"{role}/{'decay' if decay else 'no_decay'}",
                        "params": params,
                        "lr": cfg.lr * mult[role],
                        "weight_decay": cfg.weight_decay if decay else 0.0,
                    }
                )
    return out


def build_optimizer(param_groups: list[dict], cfg: OptimConfig, *, fused: bool = False) -> torch.optim.AdamW:
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
    linear 1 -> ``end_ratio`` at ``max_steps`` (the reference's polynomial decay with power 1)."""
    warmup = int(math.ceil(warmup_ratio * max_steps))
    if warmup > 0 and step < warmup:
        return step / warmup
    if max_steps <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / (max_steps - warmup))
    return 1.0 - (1.0 - end_ratio) * progress


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Step-level scheduler implementing :func:`warmup_linear_decay` for every group."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_linear_decay(step, max_steps, cfg.warmup_ratio, cfg.end_lr_ratio)
    )
