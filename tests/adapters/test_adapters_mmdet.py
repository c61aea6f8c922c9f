"""mmdetection shim, run only where mmdet (>= 3) and mmengine are installed (optional extra)."""

from __future__ import annotations

import pytest
import torch
from adapters_helpers import make_text, set_gates

pytest.importorskip(
    "mmdet", reason="mmdetection is not installed (optional; its import guard is tested in test_adapters_frameworks)"
)

# mmdet is optional, not installed in the pinned dev venv (the module skips without it)
from mmdet.registry import MODELS  # pyright: ignore[reportMissingImports]

from fiber_backbones.adapters.mmdet import FiberFusionBackbone

TINY = {"type": "FiberFusionBackbone", "name": "fiber-tiny", "overrides": {"swin.drop_path_rate": 0.0}}


def test_registered_in_mmdet_models_and_feeds_an_fpn_neck() -> None:
    backbone = MODELS.build(dict(TINY)).eval()
    assert isinstance(backbone, FiberFusionBackbone)
    assert backbone.out_indices == (1, 2, 3) and backbone.size_divisibility == 32
    with torch.no_grad():
        outs = backbone(torch.randn(1, 3, 64, 96))
    assert [tuple(o.shape) for o in outs] == [(1, 64, 8, 12), (1, 128, 4, 6), (1, 256, 2, 3)]
    neck = MODELS.build(
        {
            "type": "FPN",
            "in_channels": [64, 128, 256],
            "out_channels": 32,
            "num_outs": 5,
            "add_extra_convs": "on_output",
        }
    )
    with torch.no_grad():
        levels = neck(outs)
    assert [tuple(p.shape[-2:]) for p in levels] == [(8, 12), (4, 6), (2, 3), (1, 2), (1, 1)]


def test_out_indices_and_text_binding() -> None:
    backbone = MODELS.build({**TINY, "out_indices": (2, 3)}).eval()
    set_gates(backbone, 0.5)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        plain = backbone(x)
        with backbone.bind_text(make_text([3, 5])):
            bound = backbone(x)
            assert backbone.last_output.text is not None
    assert len(plain) == 2 and all((b - p).abs().max() > 1e-4 for b, p in zip(bound, plain))
