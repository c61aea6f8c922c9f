"""Conformance checks for any :class:`~fiber_backbones.types.FusionBackbone` (docs/reference/design.md §9).

Third-party backbones and adapters can call :func:`check_fusion_backbone` in their own test suites to verify
the contract the heads and trainers rely on: attribute types, output shapes consistent with ``feature_specs``,
the uni-modal paths, and that ``fuse=False`` / ``text=None`` give the same image output.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fiber_backbones.types import FusionBackbone, FusionOutput, TextInputs

__all__ = ["check_fusion_backbone"]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def check_fusion_backbone(
    model: FusionBackbone, pixel_values: Tensor, text: TextInputs, *, atol: float = 1e-5
) -> FusionOutput:
    """Run the contract checks on ``model`` (in eval mode, no grad).

    Args:
        model: the backbone under test.
        pixel_values: ``[B, 3, H, W]`` valid input for the model.
        text: ``B`` rows of text.
        atol: tolerance for the ``fuse=False`` vs ``text=None`` comparison.

    Returns:
        The fused output, for further model-specific checks.

    Raises:
        AssertionError: describing the first violated expectation.
    """
    assert isinstance(model, FusionBackbone), f"{type(model).__name__} does not satisfy the FusionBackbone protocol"
    assert model.size_divisibility >= 1 and model.image_dim >= 1 and model.text_dim >= 1
    assert len(model.feature_specs) >= 1, "feature_specs is empty"
    b, _, h, w = pixel_values.shape
    length = text.input_ids.shape[1]
    was_training = getattr(model, "training", False)
    set_eval = getattr(model, "eval", None)  # a FusionBackbone need not be an nn.Module
    if set_eval is not None:
        set_eval()
    try:
        with torch.no_grad():
            fused = model(pixel_values, text)
            off = model(pixel_values, text, fuse=False)
            image_only = model(pixel_values)
            enc_img = model.encode_image(pixel_values)
            enc_txt = model.encode_text(text)
    finally:
        set_train = getattr(model, "train", None)
        if was_training and set_train is not None:
            set_train()
    for name, out in (("fused", fused), ("fuse=False", off), ("text=None", image_only)):
        img = out.image
        gh, gw = img.grid
        assert img.tokens.shape == (b, gh * gw, model.image_dim), f"{name}: tokens {tuple(img.tokens.shape)}"
        assert len(img.pyramid) == len(model.feature_specs), f"{name}: {len(img.pyramid)} pyramid maps"
        for spec, fmap in zip(model.feature_specs, img.pyramid):
            want = (b, spec.channels, _ceil_div(h, spec.stride), _ceil_div(w, spec.stride))
            assert tuple(fmap.shape) == want, f"{name}: {spec.name} has shape {tuple(fmap.shape)}, expected {want}"
            assert torch.isfinite(fmap).all(), f"{name}: {spec.name} has non-finite values"
    assert fused.text is not None and off.text is not None and image_only.text is None
    assert fused.text.hidden.shape == (b, length, model.text_dim)
    assert torch.equal(fused.text.mask, text.attention_mask)
    assert not off.fused and not image_only.fused
    torch.testing.assert_close(off.image.tokens, image_only.image.tokens, atol=atol, rtol=0)
    assert enc_img.tokens.shape == fused.image.tokens.shape
    assert enc_txt.hidden.shape == fused.text.hidden.shape
    return fused
