"""The shared-prefix capability is an optional typed Protocol (``fiber_backbones.PrefixBackbone``): coarse training
uses it when the backbone has it and runs every pass from the inputs with a backbone that only satisfies
``FusionBackbone`` (a third-party backbone), with the same losses."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any, cast

import torch
from test_coarse_model import _batch, _model  # pytest puts this folder on sys.path
from torch import Tensor, nn

from fiber_backbones import (
    FeatureSpec,
    FiberBackbone,
    FusionBackbone,
    FusionOutput,
    ImageOutput,
    PrefixBackbone,
    TextInputs,
    TextOutput,
)


class _FusionOnly(nn.Module):
    """A stand-in third-party backbone: exactly the ``FusionBackbone`` members, computed by a FIBER backbone."""

    def __init__(self, inner: FiberBackbone) -> None:
        super().__init__()
        self.inner = inner
        self.feature_specs: tuple[FeatureSpec, ...] = inner.feature_specs
        self.size_divisibility = inner.size_divisibility
        self.image_dim, self.text_dim = inner.image_dim, inner.text_dim
        self.fusion_schedule = inner.fusion_schedule

    def encode_image(self, pixel_values: Tensor) -> ImageOutput:
        return self.inner.encode_image(pixel_values)

    def encode_text(self, text: TextInputs) -> TextOutput:
        return self.inner.encode_text(text)

    def forward(self, pixel_values: Tensor, text: TextInputs | None = None, *, fuse: bool = True) -> FusionOutput:
        return self.inner(pixel_values, text, fuse=fuse)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self.inner.set_grad_checkpointing(enabled)

    def fusion_parameters(self) -> Iterator[nn.Parameter]:
        return self.inner.fusion_parameters()

    def no_weight_decay(self) -> set[str]:
        return {f"inner.{n}" for n in self.inner.no_weight_decay()}


def test_the_fiber_backbone_has_the_prefix_capability_and_the_stand_in_has_not() -> None:
    model = _model(True)
    standin = _FusionOnly(cast(FiberBackbone, model.backbone))
    assert isinstance(model.backbone, PrefixBackbone) and isinstance(model.backbone, FusionBackbone)
    assert isinstance(standin, FusionBackbone)
    assert not isinstance(standin, PrefixBackbone)


def test_share_prefix_with_a_fusion_only_backbone_runs_every_pass_with_the_same_losses() -> None:
    batch = _batch()
    shared = _model(True).eval()  # the FIBER backbone: the shared-prefix path
    standin = copy.deepcopy(shared)
    standin.backbone = _FusionOnly(cast(FiberBackbone, standin.backbone))  # same weights, no prefix methods
    calls: list[str] = []
    spied: Any = shared.backbone
    prefix = spied.image_prefix
    spied.image_prefix = lambda px: calls.append("image_prefix") or prefix(px)
    outs = []
    for model in (shared, standin):
        torch.manual_seed(123)  # same hard-negative draws
        outs.append(model(batch))
    assert calls == ["image_prefix"]  # the capable backbone took the shared path, once per step
    (a, b) = outs
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-5)
    for k in ("itc/loss", "itm/loss", "mlm/loss"):
        torch.testing.assert_close(a.logs[k], b.logs[k], rtol=1e-5, atol=1e-5)
    b.loss.backward()  # gradients reach the wrapped backbone through the per-pass path
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in standin.backbone.inner.parameters())
    # the per-pass path of the stand-in is exactly the share_prefix=false path of the FIBER backbone
    naive = copy.deepcopy(shared)
    naive.share_prefix = False
    naive_backbone: Any = naive.backbone
    del naive_backbone.image_prefix  # the spy
    torch.manual_seed(123)
    torch.testing.assert_close(naive(batch).loss, b.loss, rtol=0, atol=0)
