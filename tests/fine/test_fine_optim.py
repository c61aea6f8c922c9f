"""Fine-stage optimisation (docs/reference/training.md §3.10): parameter groups, freezing, schedule, EMA."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from fiber_backbones import create_backbone
from fiber_train.config import ConfigError, load_config
from fiber_train.optim import build_optimizer
from fiber_train.tasks.fine import FineConfig, FineOptimConfig
from fiber_train.tasks.grounding_common import (
    GroundingHeadConfig,
    GroundingLRScheduler,
    GroundingModel,
    ModelEMA,
    ScheduleSettings,
    build_grounding_head,
    freeze_backbone_stages,
    grounding_param_groups,
    lr_factor,
    weight_decay_factor,
)


@pytest.fixture(scope="module")
def model() -> GroundingModel:
    backbone = create_backbone("fiber-tiny", variant="fine_v2")
    head = build_grounding_head(backbone, GroundingHeadConfig(channels=32, num_convs=1))
    return GroundingModel(backbone, head)


def test_param_groups_follow_the_reference_rules(model: GroundingModel) -> None:
    groups = grounding_param_groups(model, lr=1e-4, language_lr=1e-5, weight_decay=0.01)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"vision/weight", "vision/bias", "language/weight", "language/bias"}
    assert (by_name["vision/weight"]["lr"], by_name["vision/weight"]["weight_decay"]) == (1e-4, 0.01)
    assert (by_name["vision/bias"]["lr"], by_name["vision/bias"]["weight_decay"]) == (2e-4, 0.0)
    assert (by_name["language/weight"]["lr"], by_name["language/weight"]["weight_decay"]) == (1e-5, 0.01)
    assert (by_name["language/bias"]["lr"], by_name["language/bias"]["weight_decay"]) == (2e-5, 0.0)
    group_of = {id(p): g["name"] for g in groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert len(group_of) == len(names)  # every parameter exactly once
    expect = {
        "backbone.text_encoder.encoder.layer.3.alpha_t2i": "language/weight",  # gates of the text side: language lr
        "backbone.text_encoder.encoder.layer.3.crossattention_t2i.self.query.weight": "language/weight",
        "backbone.image_encoder.layers.3.blocks.1.attn.alpha_i2t": "vision/weight",  # i2t gates: vision lr, decayed
        "backbone.image_encoder.layers.0.blocks.0.attn.relative_position_bias_table": "vision/bias",
        "backbone.image_encoder.norm1.weight": "vision/weight",  # norms are decayed in the reference
        "head.token_alignment.bias_lang": "vision/bias",
        "head.token_alignment.bias0": "vision/bias",
        "head.token_alignment.log_scale": "vision/weight",
        "backbone.text_encoder.embeddings.LayerNorm.bias": "language/bias",
    }
    for name, group in expect.items():
        assert group_of[id(names[name])] == group, name


def test_freeze_level_two_freezes_patch_embedding_and_stage_zero() -> None:
    backbone = create_backbone("fiber-tiny", variant="fine_v2")
    frozen = set(freeze_backbone_stages(backbone, 2))
    expected = {
        n
        for n, _ in backbone.named_parameters()
        if n.startswith(("image_encoder.patch_embed.", "image_encoder.layers.0."))
    }
    assert frozen == expected and expected
    assert all(p.requires_grad == (n not in expected) for n, p in backbone.named_parameters())
    head = build_grounding_head(backbone, GroundingHeadConfig(channels=32, num_convs=1))
    groups = grounding_param_groups(GroundingModel(backbone, head), lr=1.0, language_lr=1.0, weight_decay=0.0)
    in_groups = {id(p) for g in groups for p in g["params"]}
    assert all(id(p) not in in_groups for n, p in backbone.named_parameters() if n in expected)
    assert freeze_backbone_stages(create_backbone("fiber-tiny", variant="fine_v2"), -1) == []


def test_multistep_schedule_with_warmup_and_weight_decay_milestones() -> None:
    s = ScheduleSettings(warmup_steps=100, warmup_factor=0.001, milestones=(0.67, 0.89), gamma=0.1)
    max_steps = 1000  # milestones at steps 670 and 890; weight-decay milestones at 446.89 and 593.63
    assert lr_factor(0, max_steps, s) == pytest.approx(0.001)
    assert lr_factor(50, max_steps, s) == pytest.approx(0.001 * 0.5 + 0.5)
    assert lr_factor(100, max_steps, s) == pytest.approx(1.0)
    assert lr_factor(669, max_steps, s) == pytest.approx(1.0)
    assert lr_factor(670, max_steps, s) == pytest.approx(0.1)
    assert lr_factor(890, max_steps, s) == pytest.approx(0.01)
    assert weight_decay_factor(446, max_steps, s) == 1.0
    assert weight_decay_factor(447, max_steps, s) == pytest.approx(0.1)
    assert weight_decay_factor(594, max_steps, s) == pytest.approx(0.01)
    off = ScheduleSettings(warmup_steps=0, wd_milestone_ratio=0.0)
    assert weight_decay_factor(999, max_steps, off) == 1.0
    cos = ScheduleSettings(schedule="cosine", warmup_steps=0, end_lr_ratio=0.1)
    assert lr_factor(500, max_steps, cos) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(1000, max_steps, cos) == pytest.approx(0.1)
    lin = ScheduleSettings(schedule="linear", warmup_steps=0)
    assert lr_factor(250, max_steps, lin) == pytest.approx(0.75)


def test_scheduler_drives_lr_and_weight_decay_and_resumes() -> None:
    params = [nn.Parameter(torch.zeros(2, 2)), nn.Parameter(torch.zeros(2))]

    def groups() -> list[dict]:
        return [
            {"name": "w", "params": [params[0]], "lr": 1e-4, "weight_decay": 0.01},
            {"name": "b", "params": [params[1]], "lr": 2e-4, "weight_decay": 0.0},
        ]

    cfg = FineOptimConfig(warmup_steps=2, warmup_factor=0.5, milestones=(0.5,), wd_milestone_ratio=0.5)
    opt = build_optimizer(groups(), cfg)
    sched = GroundingLRScheduler(opt, cfg.schedule_settings(), max_steps=10)
    seen = []
    for _ in range(7):
        seen.append((opt.param_groups[0]["lr"], opt.param_groups[1]["lr"], opt.param_groups[0]["weight_decay"]))
        opt.step()
        sched.step()
    # warm-up 0.5 -> 0.75 -> 1, lr milestone at step 5, weight-decay milestone at step 2.5
    assert [round(x[0] / 1e-4, 6) for x in seen] == [0.5, 0.75, 1.0, 1.0, 1.0, 0.1, 0.1]
    assert [round(x[1] / 2e-4, 6) for x in seen] == [0.5, 0.75, 1.0, 1.0, 1.0, 0.1, 0.1]
    assert [round(x[2] / 0.01, 6) for x in seen] == [1.0, 1.0, 1.0, 0.1, 0.1, 0.1, 0.1]
    state = sched.state_dict()
    opt2 = build_optimizer(groups(), cfg)
    sched2 = GroundingLRScheduler(opt2, cfg.schedule_settings(), max_steps=10)
    sched2.load_state_dict(state)
    assert sched2.get_last_lr() == sched.get_last_lr()
    assert opt2.param_groups[0]["weight_decay"] == opt.param_groups[0]["weight_decay"]


def test_ema_matches_the_closed_form_and_round_trips() -> None:
    net = nn.Linear(3, 2)
    net.register_buffer("count", torch.tensor(7))
    start = {k: v.clone() for k, v in net.state_dict().items()}
    ema = ModelEMA(net, decay=0.9)
    values = []
    for step in range(3):
        with torch.no_grad():
            net.weight.add_(1.0 + step)
        values.append(net.weight.detach().clone())
        ema.update(net)
    expected = start["weight"]
    for v in values:
        expected = 0.9 * expected + 0.1 * v
    torch.testing.assert_close(ema.shadow["weight"], expected)
    assert "count" not in ema.shadow  # integer buffers are not averaged
    full = ema.full_state_dict(net)
    assert torch.equal(full["count"], torch.tensor(7)) and torch.equal(full["weight"], ema.shadow["weight"])
    other = ModelEMA(nn.Linear(3, 2), decay=0.9)
    other.load_state_dict(ema.state_dict())
    torch.testing.assert_close(other.shadow["weight"], expected)
    with pytest.raises(ValueError, match="decay"):
        ModelEMA(net, decay=1.0)


def test_config_defaults_are_the_reference_values_and_bad_values_are_named() -> None:
    cfg = load_config(FineConfig, "fine/o365_goldg")
    o = cfg.optim
    assert (o.lr, o.language_lr, o.bias_lr_mult, o.weight_decay, o.betas) == (1e-4, 1e-5, 2.0, 0.01, (0.9, 0.999))
    assert (o.warmup_steps, o.warmup_factor, o.milestones, o.gamma, o.ema_decay) == (
        2000,
        0.001,
        (0.67, 0.89),
        0.1,
        0.999,
    )
    assert cfg.trainer.max_steps == 800_000 and cfg.trainer.grad_clip == 1.0
    assert cfg.data.batch_size * cfg.trainer.devices * cfg.trainer.num_nodes * cfg.trainer.grad_accum == 64
    assert cfg.model.variant == "fine_v2" and cfg.model.freeze_level == 2
    assert [s.kind for s in cfg.data.sources] == ["grounding", "grounding", "detection"]
    assert cfg.data.negative_control == (0.05, 0.05, 0.5, 0.0) and cfg.data.max_text_len == 256
    with pytest.raises(ConfigError, match="optim.schedule"):
        load_config(FineConfig, "fine/tiny", ["optim.schedule=poly"])
    with pytest.raises(ConfigError, match="kind"):
        load_config(FineConfig, "fine/tiny", ["data.sources=[{name: x, kind: boxes, ann: a, images: b}]"])
    with pytest.raises(ConfigError, match="model.head.ancher_sizes"):
        load_config(FineConfig, "fine/tiny", ["model.head.ancher_sizes=[1]"])


def test_ema_is_updated_each_step_exported_and_reloaded(fine_world: Path, fine_tiny: list[str], tmp_path: Path) -> None:
    from fiber_train.checkpoint import CheckpointError
    from fiber_train.tasks.fine import FinePretrainTask
    from fiber_train.tasks.grounding_common import load_grounding_model

    cfg = load_config(FineConfig, "fine/tiny", [f"data.root={fine_world}", *fine_tiny, "optim.ema_decay=0.5"])
    task = FinePretrainTask(cfg)
    model = task.build_model()
    assert task.ema is not None
    w0 = model.head.bbox_pred.weight.detach().clone()
    with torch.no_grad():
        model.head.bbox_pred.weight.add_(1.0)
    task.on_step_end(model, 1)
    torch.testing.assert_close(task.ema.shadow["head.bbox_pred.weight"], w0 + 0.5)
    restored = FinePretrainTask(cfg)
    restored.build_model()
    restored.load_state_dict(task.state_dict())
    assert restored.ema is not None
    torch.testing.assert_close(restored.ema.shadow["head.bbox_pred.weight"], w0 + 0.5)
    task.export(model, tmp_path / "model")
    raw, _ = load_grounding_model(tmp_path / "model")
    ema, _ = load_grounding_model(tmp_path / "model", use_ema=True)
    torch.testing.assert_close(raw.head.bbox_pred.weight, w0 + 1.0)
    torch.testing.assert_close(ema.head.bbox_pred.weight, w0 + 0.5)
    (tmp_path / "model" / "ema.safetensors").unlink()
    with pytest.raises(CheckpointError, match="without EMA"):
        load_grounding_model(tmp_path / "model", use_ema=True)
