"""detectron2 shim, run only where detectron2 is installed (it is an optional extra, not on PyPI)."""

from __future__ import annotations

import pytest
import torch
from adapters_helpers import make_text, set_gates

pytest.importorskip(
    "detectron2",
    reason="detectron2 is not installed (optional; its import guard is tested in test_adapters_frameworks)",
)

# detectron2 is optional, not installed in the pinned dev venv (the module skips without it)
from detectron2.config import get_cfg  # pyright: ignore[reportMissingImports]
from detectron2.modeling import build_backbone  # pyright: ignore[reportMissingImports]

from fiber_backbones.adapters import find_vision_backbone
from fiber_backbones.adapters.detectron2 import FiberD2Backbone, add_fiber_config


def _cfg(name: str):
    cfg = get_cfg()
    add_fiber_config(cfg)
    cfg.MODEL.BACKBONE.NAME = name
    cfg.MODEL.FIBER.NAME = "fiber-tiny"
    cfg.MODEL.FIBER.OVERRIDES = ["swin.drop_path_rate=0.0"]
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    return cfg


def test_add_fiber_config_sets_imagenet_rgb() -> None:
    cfg = _cfg("build_fiber_backbone")
    assert cfg.INPUT.FORMAT == "RGB"
    assert cfg.MODEL.PIXEL_MEAN == [123.675, 116.28, 103.53]
    assert cfg.MODEL.FIBER.VARIANT == "fine_v2"


def test_registered_backbone_builder_and_output_shape() -> None:
    backbone = build_backbone(_cfg("build_fiber_backbone")).eval()
    assert isinstance(backbone, FiberD2Backbone)
    assert backbone.size_divisibility == 32
    shapes = backbone.output_shape()
    assert {k: (v.channels, v.stride) for k, v in shapes.items()} == {
        "stage1": (64, 8),
        "stage2": (128, 16),
        "stage3": (256, 32),
    }
    with torch.no_grad():
        feats = backbone(torch.randn(1, 3, 64, 96))
    for key, fmap in feats.items():
        assert fmap.shape == (1, shapes[key].channels, 64 // shapes[key].stride, 96 // shapes[key].stride)


def test_registered_fpn_builder_binds_text() -> None:
    fpn = build_backbone(_cfg("build_fiber_fpn_backbone")).eval()
    shapes = fpn.output_shape()
    assert {k: (v.channels, v.stride) for k, v in shapes.items()} == {
        "p3": (32, 8),
        "p4": (32, 16),
        "p5": (32, 32),
        "p6": (32, 64),
        "p7": (32, 128),
    }
    set_gates(fpn, 0.5)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        plain = fpn(x)
        with find_vision_backbone(fpn).bind_text(make_text([4])):
            bound = fpn(x)
    assert (bound["p5"] - plain["p5"]).abs().max() > 1e-4
