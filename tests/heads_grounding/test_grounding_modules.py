"""FPN, DropBlock, DyHead block (vs a plain-conv reference of the docs/reference/training.md §3.3 formulas), DyReLU, token alignment."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import cast

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import deform_conv2d

from fiber_heads.grounding import FPN, DropBlock2d, DyHeadBlock, DyHeadTower, DyReLU, TokenAlignment
from fiber_heads.grounding.dyhead import DeformConvNorm, _offsets_for

# typed views of the submodules that these tests read (nn.ModuleList / nn.Sequential items are plain Modules)


def _dyconv(block: DyHeadBlock, i: int) -> DeformConvNorm:
    return cast(DeformConvNorm, block.DyConv[i])


def _attn_conv(block: DyHeadBlock) -> nn.Conv2d:
    return cast(nn.Conv2d, block.AttnConv[1])


def _bias(module: nn.Conv2d | nn.Linear | nn.GroupNorm) -> torch.Tensor:
    assert module.bias is not None
    return module.bias


def _tensor_sum(parts: Iterable[torch.Tensor]) -> torch.Tensor:
    """``sum(parts)`` typed as a tensor (the same additions, in the same order, from 0)."""
    return sum(parts, torch.zeros(()))


def test_fpn_shapes_for_spec_example() -> None:
    fpn = FPN((8, 16, 32), out_channels=16, drop_block_prob=0.0)
    feats = [torch.randn(1, 8, 64, 80), torch.randn(1, 16, 32, 40), torch.randn(1, 32, 16, 20)]
    outs = fpn(feats)
    assert [tuple(o.shape[-2:]) for o in outs] == [(64, 80), (32, 40), (16, 20), (8, 10), (4, 5)]
    assert all(o.shape[:2] == (1, 16) for o in outs)


def test_fpn_matches_manual_computation() -> None:
    fpn = FPN((4, 6, 8), out_channels=16, drop_block_prob=0.0)
    c3, c4, c5 = torch.randn(2, 4, 10, 12), torch.randn(2, 6, 5, 6), torch.randn(2, 8, 3, 3)
    p3, p4, p5, p6, p7 = fpn([c3, c4, c5])
    i5 = fpn.fpn_inner4(c5)
    i4 = fpn.fpn_inner3(c4) + F.interpolate(i5, size=(5, 6), mode="nearest")
    i3 = fpn.fpn_inner2(c3) + F.interpolate(i4, size=(10, 12), mode="nearest")
    torch.testing.assert_close(p5, fpn.fpn_layer4(i5))
    torch.testing.assert_close(p4, fpn.fpn_layer3(i4))
    torch.testing.assert_close(p3, fpn.fpn_layer2(i3))
    # P6 from P5 (not C5), P7 from ReLU(P6)
    torch.testing.assert_close(p6, fpn.top_blocks.p6(p5))
    torch.testing.assert_close(p7, fpn.top_blocks.p7(F.relu(p6)))
    assert p6.shape[-2:] == (2, 2) and p7.shape[-2:] == (1, 1)
    # Kaiming-uniform(a=1) init: bound sqrt(6 / ((1 + 1) * fan_in)) = sqrt(3 / fan_in); zero biases
    bound = math.sqrt(3.0 / (16 * 9))
    assert fpn.fpn_layer2.weight.abs().max() <= bound and _bias(fpn.fpn_layer2).abs().sum() == 0


def test_fpn_rejects_bad_channels() -> None:
    fpn = FPN((4, 6, 8), out_channels=16)
    with pytest.raises(ValueError, match="input map 1"):
        fpn([torch.randn(1, 4, 8, 8), torch.randn(1, 5, 4, 4), torch.randn(1, 8, 2, 2)])


def test_fpn_drop_block_only_before_p3_p4_in_training() -> None:
    fpn = FPN((4, 6, 8), out_channels=16, drop_block_prob=0.3)
    feats = [torch.randn(2, 4, 16, 16), torch.randn(2, 6, 8, 8), torch.randn(2, 8, 4, 4)]
    fpn.eval()
    ref = fpn(feats)
    fpn.train()
    torch.manual_seed(0)
    out = fpn(feats)
    assert not torch.allclose(out[0], ref[0]) and not torch.allclose(out[1], ref[1])
    for i in (2, 3, 4):
        torch.testing.assert_close(out[i], ref[i])


def test_drop_block_semantics() -> None:
    db = DropBlock2d(0.3, 3)
    x = torch.ones(4, 5, 20, 20)
    db.eval()
    assert torch.equal(db(x), x)
    db.train()
    torch.manual_seed(0)
    y = db(x)
    # the same spatial mask for every channel; kept values rescaled so that the mean is preserved
    zeros = y == 0
    assert zeros.any() and torch.equal(zeros, zeros[:, :1].expand_as(zeros))
    keep = (~zeros[:, :1]).float()
    torch.testing.assert_close(y[~zeros].unique(), (keep.numel() / keep.sum()).reshape(1))
    assert torch.equal(DropBlock2d(0.0)(x), x)


def test_deform_conv_offset_layout_is_dy_dx() -> None:
    # The reference operator stores (dy, dx) pairs per kernel tap; an offset dy = 1 everywhere samples one row
    # below, i.e. equals a plain conv whose zero padding is moved from the top to the bottom.
    x = torch.randn(1, 3, 6, 7)
    w = torch.randn(4, 3, 3, 3)
    off = torch.zeros(1, 18, 6, 7)
    off[:, 0::2] = 1.0
    out = deform_conv2d(x, off, w, padding=(1, 1), mask=torch.ones(1, 9, 6, 7))
    torch.testing.assert_close(out, F.conv2d(F.pad(x, (1, 1, 0, 2)), w), rtol=1e-4, atol=1e-4)


def test_offset_compat_reinterpretation() -> None:
    offset = torch.arange(2 * 18 * 4 * 6, dtype=torch.float32).view(2, 18, 4, 6)
    mask = torch.arange(2 * 9 * 4 * 6, dtype=torch.float32).view(2, 9, 4, 6)
    off, msk = _offsets_for(offset, mask, (2, 3), "compat")
    assert torch.equal(off[1].flatten(), offset[1].flatten()[: 18 * 6])
    assert torch.equal(msk[0].flatten(), mask[0].flatten()[: 9 * 6])
    off_r, msk_r = _offsets_for(offset, mask, (2, 3), "resize")
    assert off_r.shape == (2, 18, 2, 3) and msk_r.shape == (2, 9, 2, 3)
    same = _offsets_for(offset, mask, (4, 6), "compat")
    assert same[0] is offset and same[1] is mask


def _h_sigmoid(x: torch.Tensor) -> torch.Tensor:
    return torch.clamp(x + 3, 0, 6) / 6


def _reference_block(block: DyHeadBlock, feats: list[torch.Tensor]) -> list[torch.Tensor]:
    """Spec formulas of docs/reference/training.md §3.3 for zero offsets and a constant mask, with plain convs.

    (With a mask constant over taps and positions the compat reinterpretation of the coarse level's buffers is
    the identity, so plain convolutions reproduce every term.)
    """
    m = torch.sigmoid(_bias(block.offset)[18:])  # [9], one value per kernel tap
    outs = []
    for level, f in enumerate(feats):

        def conv(i: int, x: torch.Tensor, stride: int) -> torch.Tensor:
            layer = _dyconv(block, i)
            w = layer.conv.weight * m.view(1, 1, 3, 3)
            y = F.conv2d(x, w, layer.conv.bias, stride=stride, padding=1)
            return F.group_norm(y, 16, layer.bn.weight, layer.bn.bias, eps=1e-5)

        terms = [conv(1, f, 1)]
        if level > 0:
            terms.append(conv(2, feats[level - 1], 2))
        if level < len(feats) - 1:
            terms.append(
                F.interpolate(conv(0, feats[level + 1], 1), size=f.shape[-2:], mode="bilinear", align_corners=True)
            )
        ws = [
            _h_sigmoid(
                F.relu(F.conv2d(t.mean(dim=(2, 3), keepdim=True), _attn_conv(block).weight, _attn_conv(block).bias))
            )
            for t in terms
        ]
        fused = _tensor_sum(w * t for w, t in zip(ws, terms)) / len(terms)
        fc0, fc2 = cast(nn.Linear, block.relu.fc[0]), cast(nn.Linear, block.relu.fc[2])
        y = _h_sigmoid(F.linear(F.relu(F.linear(fused.mean(dim=(2, 3)), fc0.weight, fc0.bias)), fc2.weight, fc2.bias))
        c = fused.shape[1]
        a1, b1, a2, b2 = (y[:, i * c : (i + 1) * c, None, None] for i in range(4))
        outs.append(torch.maximum(fused * (2 * (a1 - 0.5) + 1) + (b1 - 0.5), fused * (2 * (a2 - 0.5)) + (b2 - 0.5)))
    return outs


def test_dyhead_block_matches_reference_with_zero_offsets() -> None:
    block = DyHeadBlock(32)
    with torch.no_grad():
        block.offset.weight.zero_()
        _bias(block.offset)[:18].zero_()
        _bias(block.offset)[18:].fill_(0.7)
        _attn_conv(block).weight.normal_(std=0.3)
        _bias(_attn_conv(block)).fill_(0.5)
        for i in range(len(block.DyConv)):
            _dyconv(block, i).bn.weight.normal_()
            _bias(_dyconv(block, i).bn).normal_()
    sizes = [(8, 10), (4, 5), (2, 3), (1, 2), (1, 1)]
    feats = [torch.randn(2, 32, h, w) for h, w in sizes]
    outs = block(feats)
    ref = _reference_block(block, feats)
    for o, r, s in zip(outs, ref, sizes):
        assert o.shape == (2, 32, *s)
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4)


def test_dyhead_block_init_and_gradients() -> None:
    block = DyHeadBlock(32)
    w = _dyconv(block, 0).conv.weight
    assert w.abs().max() <= 1 / math.sqrt(32 * 9) and _dyconv(block, 0).conv.bias.abs().sum() == 0
    assert _bias(_attn_conv(block)).abs().sum() == 0
    feats = [torch.randn(1, 32, 6, 6, requires_grad=True), torch.randn(1, 32, 3, 3), torch.randn(1, 32, 2, 2)]
    _tensor_sum(o.square().sum() for o in block(feats)).backward()
    assert block.offset.weight.grad is not None and block.offset.weight.grad.abs().sum() > 0
    assert feats[0].grad is not None and torch.isfinite(feats[0].grad).all()


def test_dyhead_tower_grad_checkpointing_is_exact() -> None:
    tower = DyHeadTower(2, 32)
    feats = [torch.randn(1, 32, 4, 4), torch.randn(1, 32, 2, 2), torch.randn(1, 32, 1, 1)]
    ref = tower(feats)
    offset_weight = cast(DyHeadBlock, tower[0]).offset.weight
    g_ref = torch.autograd.grad(_tensor_sum(o.sum() for o in ref), offset_weight)[0]
    tower.grad_checkpointing = True
    out = tower(feats)
    g = torch.autograd.grad(_tensor_sum(o.sum() for o in out), offset_weight)[0]
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(g, g_ref)


def test_dyrelu_hand_formula() -> None:
    m = DyReLU(8)
    assert m.fc[0].out_features == 4  # 8 // 4 rounded to a multiple of 4
    x = torch.randn(3, 8, 2, 2)
    y = _h_sigmoid(m.fc(x.mean(dim=(2, 3))))
    a1, b1, a2, b2 = y[:, :8], y[:, 8:16], y[:, 16:24], y[:, 24:]
    v = x[1, 5, 0, 1]
    expected = max(v * (2 * (a1[1, 5] - 0.5) + 1) + b1[1, 5] - 0.5, v * 2 * (a2[1, 5] - 0.5) + b2[1, 5] - 0.5)
    torch.testing.assert_close(m(x)[1, 5, 0, 1], expected)
    assert DyReLU(256).fc[0].out_features == 64


def test_token_alignment_formula_and_padding() -> None:
    ta = TokenAlignment(channels=6, text_dim=10)
    torch.testing.assert_close(ta.bias0, torch.tensor([-math.log(99.0)]))
    with torch.no_grad():
        ta.bias_lang.normal_()
        ta.log_scale.fill_(0.3)
    regions = torch.randn(2, 5, 6)
    hidden = torch.randn(2, 4, 10)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    z = ta(regions, hidden, mask)
    assert z.shape == (2, 5, 4)
    # hand value for image 1, anchor 3, token 1
    e = hidden[1, 1] / hidden[1, 1].norm()
    p = ta.dot_product_projection_text.weight @ (e / 2) + ta.dot_product_projection_text.bias
    expected = regions[1, 3] @ p / math.exp(0.3) + e @ ta.bias_lang + ta.bias0[0]
    torch.testing.assert_close(z[1, 3, 1], expected)
    # padding tokens: hidden values are irrelevant (row zeroed before normalisation)
    pad_expected = regions[1] @ ta.dot_product_projection_text.bias / math.exp(0.3) + ta.bias0
    torch.testing.assert_close(z[1, :, 2], pad_expected)
    hidden2 = hidden.clone()
    hidden2[1, 2:] = 1e6
    torch.testing.assert_close(ta(regions, hidden2, mask), z)
    # clamp at +-50000
    assert ta(regions * 1e9, hidden, mask).abs().max() == 50000.0


def test_dyhead_compat_mode_reads_the_prefix_of_the_finer_buffers() -> None:
    # Per-tap masks that vary over space: the coarse-level conv must see the first 9*h'*w' mask values of the
    # finer level's per-image buffer, reshaped to (9, h', w').
    block = DyHeadBlock(16)
    with torch.no_grad():
        block.offset.weight.zero_()
        block.offset.weight[18:].normal_(std=0.5)
        _bias(block.offset).zero_()
    f0, f1 = torch.randn(2, 16, 4, 6), torch.randn(2, 16, 2, 3)
    mask0 = torch.sigmoid(block.offset(f0)[:, 18:])  # [2, 9, 4, 6]
    assert block.offset(f0)[:, :18].abs().max() == 0
    coarse_mask = torch.stack([m.flatten()[: 9 * 2 * 3].view(9, 2, 3) for m in mask0])
    layer = _dyconv(block, 0)
    g = F.group_norm(
        deform_conv2d(
            f1, torch.zeros(2, 18, 2, 3), layer.conv.weight, layer.conv.bias, padding=(1, 1), mask=coarse_mask
        ),
        16,
        layer.bn.weight,
        layer.bn.bias,
    )
    seen: list[torch.Tensor] = []

    def keep(_module: nn.Module, _inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        seen.append(out)

    handle = layer.register_forward_hook(keep)
    block([f0, f1])
    handle.remove()
    torch.testing.assert_close(seen[0], g, rtol=1e-4, atol=1e-5)
    resize_block = DyHeadBlock(16, offset_mode="resize")
    resize_block.load_state_dict(block.state_dict())
    assert not torch.allclose(resize_block([f0, f1])[0], block([f0, f1])[0])


def _bilinear_zero_outside(img: torch.Tensor, y: float, x: float) -> torch.Tensor:
    """DCNv2 sampling of ``img [C, H, W]`` at ``(y, x)``: zero outside ``(-1, H) x (-1, W)``, zero corners."""
    c, h, w = img.shape
    if y <= -1 or y >= h or x <= -1 or x >= w:
        return torch.zeros(c)
    y0, x0 = math.floor(y), math.floor(x)
    out = torch.zeros(c)
    for yy, xx in ((y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)):
        if 0 <= yy < h and 0 <= xx < w:
            out += (1 - abs(y - yy)) * (1 - abs(x - xx)) * img[:, yy, xx]
    return out


def test_modulated_deform_conv_matches_brute_force() -> None:
    from fiber_heads.grounding import ModulatedDeformConv3x3

    g = torch.Generator().manual_seed(5)
    for stride in (1, 2):
        conv = ModulatedDeformConv3x3(3, 2, stride=stride)
        x = torch.randn(1, 3, 5, 6, generator=g)
        ho, wo = (5 + 2 - 3) // stride + 1, (6 + 2 - 3) // stride + 1
        offset = torch.randn(1, 18, ho, wo, generator=g) * 1.5
        mask = torch.rand(1, 9, ho, wo, generator=g)
        out = conv(x, offset, mask)
        ref = torch.zeros(1, 2, ho, wo)
        for oy in range(ho):
            for ox in range(wo):
                acc = conv.bias.detach().clone()
                for k in range(9):
                    ky, kx = divmod(k, 3)
                    dy, dx = offset[0, 2 * k, oy, ox].item(), offset[0, 2 * k + 1, oy, ox].item()
                    v = _bilinear_zero_outside(x[0], oy * stride - 1 + ky + dy, ox * stride - 1 + kx + dx)
                    acc += conv.weight.detach()[:, :, ky, kx] @ v * mask[0, k, oy, ox]
                ref[0, :, oy, ox] = acc
        torch.testing.assert_close(out.detach(), ref, rtol=1e-4, atol=1e-4)
