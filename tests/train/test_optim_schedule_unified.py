"""The coarse/downstream schedule is the grounding tasks' scheduler with linear settings: same curve as the
earlier ``LambdaLR`` (warm-up + linear decay), and a checkpoint that holds a ``LambdaLR`` state resumes on it."""

from __future__ import annotations

import torch

from fiber_train.config import OptimConfig
from fiber_train.optim import GroundingLRScheduler, build_optimizer, build_scheduler, warmup_linear_decay


def _optimizer(cfg: OptimConfig) -> torch.optim.Optimizer:
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))]
    groups = [
        {"params": [params[0]], "lr": cfg.lr, "weight_decay": 0.1, "name": "a"},
        {"params": [params[1]], "lr": cfg.lr * 5, "weight_decay": 0.0, "name": "b"},
    ]
    return build_optimizer(groups, cfg)


def test_build_scheduler_follows_the_lambdalr_curve_exactly_and_reads_its_state() -> None:
    cfg = OptimConfig(lr=1e-4, warmup_ratio=0.1, end_lr_ratio=0.2)
    max_steps = 37
    new_opt, old_opt = _optimizer(cfg), _optimizer(cfg)
    new = build_scheduler(new_opt, cfg, max_steps)
    old = torch.optim.lr_scheduler.LambdaLR(
        old_opt, lambda s: warmup_linear_decay(s, max_steps, cfg.warmup_ratio, cfg.end_lr_ratio)
    )
    assert isinstance(new, GroundingLRScheduler)
    for step in range(max_steps):
        assert [g["lr"] for g in new_opt.param_groups] == [g["lr"] for g in old_opt.param_groups], step
        assert [g["weight_decay"] for g in new_opt.param_groups] == [0.1, 0.0]
        old_opt.step()
        old.step()
        new.step()
        if step == 11:  # resume on the unified scheduler from a LambdaLR checkpoint state
            resumed_opt = _optimizer(cfg)
            resumed = build_scheduler(resumed_opt, cfg, max_steps)
            resumed.load_state_dict(old.state_dict())
            assert resumed.last_step == 12
            assert [g["lr"] for g in resumed_opt.param_groups] == [g["lr"] for g in old_opt.param_groups]
    assert abs(new_opt.param_groups[0]["lr"] - 1e-4 * 0.2) < 1e-15  # decayed to end_lr_ratio at max_steps
