"""End-to-end tiny GroundingHead: shapes, gradients, prediction, and an overfitting run."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, cast

import pytest
import torch
from torchvision.ops import box_iou

from fiber_heads.grounding import GroundingHead, GroundingTargets, PostprocessConfig, boxes_per_label
from fiber_heads.grounding.dyhead import DeformConvNorm, DyHeadBlock
from fiber_heads.grounding.head import Scale
from fiber_heads.types import HeadOutput

IN_CHANNELS = (16, 32, 64)
TEXT_DIM = 16


def _tiny_head(**kwargs: Any) -> GroundingHead:
    return GroundingHead(IN_CHANNELS, TEXT_DIM, num_convs=2, channels=32, **kwargs)


def _pyramid(b: int, h: int, w: int) -> list[torch.Tensor]:
    return [torch.randn(b, c, h // s, w // s) for c, s in zip(IN_CHANNELS, (8, 16, 32))]


def _batch() -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, GroundingTargets]:
    pyramid = _pyramid(2, 96, 128)
    text = torch.randn(2, 7, TEXT_DIM)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    targets = GroundingTargets(
        boxes=[
            torch.tensor([[10.0, 10.0, 60.0, 70.0], [40.0, 30.0, 110.0, 90.0]]),
            torch.tensor([[0.0, 0.0, 50.0, 50.0]]),
        ],
        positive_maps=[torch.tensor([[0, 1, 1, 0, 0, 0, 0.0], [0, 0, 0, 1, 0, 0, 0]]), torch.tensor([[0, 1, 0, 0.0]])],
    )
    return pyramid, text, mask, targets


def test_reference_initial_values() -> None:
    head = _tiny_head()
    torch.testing.assert_close(head.cls_logits.bias, torch.full((80,), -math.log(99.0)))
    assert head.bbox_pred.bias is not None and head.bbox_pred.bias.abs().sum() == 0
    assert 0.005 < head.bbox_pred.weight.std() < 0.02
    assert all(cast(Scale, s).scale.item() == 1.0 for s in head.scales)
    torch.testing.assert_close(head.token_alignment.bias0, torch.tensor([-math.log(99.0)]))


def test_forward_shapes_and_no_loss_without_targets() -> None:
    head = _tiny_head().eval()
    pyramid, text, mask, _ = _batch()
    out = head(pyramid, text, mask)
    assert isinstance(out, HeadOutput) and out.loss is None
    # levels: 12x16, 6x8, 3x4, 2x2, 1x1
    a = 192 + 48 + 12 + 4 + 1
    assert out.logits["token_logits"].shape == (2, a, 7)
    assert out.logits["box_regression"].shape == (2, a, 4)
    assert out.logits["centerness"].shape == (2, a)
    assert out.logits["anchors"].shape == (a, 4)
    raw = head.forward_raw(pyramid, text, mask)
    assert raw.num_anchors_per_level == (192, 48, 12, 4, 1) and raw.cls_logits is None
    # deterministic in eval mode (no DropBlock)
    torch.testing.assert_close(head(pyramid, text, mask).logits["token_logits"], out.logits["token_logits"])


def test_forward_backward_reaches_every_parameter() -> None:
    head = _tiny_head().train()
    pyramid, text, mask, targets = _batch()
    text.requires_grad_(True)
    out = head(pyramid, text, mask, targets)
    assert out.loss is not None and torch.isfinite(out.loss)
    assert set(out.logs) == {
        "grounding/loss_token",
        "grounding/loss_reg",
        "grounding/loss_centerness",
        "grounding/num_pos",
    }
    total = out.logs["grounding/loss_token"] + out.logs["grounding/loss_reg"] + out.logs["grounding/loss_centerness"]
    torch.testing.assert_close(out.loss.detach(), total)
    assert out.logs["grounding/num_pos"] > 0
    out.loss.backward()
    for name, p in head.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        # per-level box scales only get gradient from levels that hold positives
        if not name.startswith(("cls_logits", "scales.")):
            assert p.grad.abs().sum() > 0, name
    scales = [cast(Scale, s).scale for s in head.scales]
    assert any(s.grad is not None and s.grad.abs().sum() > 0 for s in scales)
    assert head.cls_logits.weight.grad is not None and head.cls_logits.weight.grad.abs().sum() == 0
    assert text.grad is not None and text.grad[1, 4:].abs().sum() == 0  # padding tokens get no gradient


def test_injected_reduce_and_grad_checkpointing() -> None:
    pyramid, text, mask, targets = _batch()
    head = _tiny_head(drop_block_prob=0.0).train()
    ref = head(pyramid, text, mask, targets)
    head.reduce_mean = lambda x: 2 * x
    halved = head(pyramid, text, mask, targets)
    torch.testing.assert_close(halved.loss, ref.loss / 2)
    head.reduce_mean = None
    head.set_grad_checkpointing(True)
    ckpt = head(pyramid, text, mask, targets)
    torch.testing.assert_close(ckpt.loss, ref.loss)


def test_forward_features_and_input_errors() -> None:
    @dataclass(frozen=True)
    class _Image:
        pyramid: tuple[torch.Tensor, ...]

    @dataclass(frozen=True)
    class _Text:
        hidden: torch.Tensor
        mask: torch.Tensor

    @dataclass(frozen=True)
    class _Fused:
        image: _Image
        text: _Text | None

    head = _tiny_head().eval()
    pyramid, text, mask, _ = _batch()
    stage0 = torch.randn(2, 8, 24, 32)  # an extra finer map is ignored: the last three are used
    out = head.forward_features(_Fused(_Image((stage0, *pyramid)), _Text(text, mask)))
    torch.testing.assert_close(out.logits["token_logits"], head(pyramid, text, mask).logits["token_logits"])
    with pytest.raises(ValueError, match="no text features"):
        head.forward_features(_Fused(_Image(tuple(pyramid)), None))
    with pytest.raises(ValueError, match=r"expected \[B, L, 16\]"):
        head(pyramid, torch.randn(2, 7, 8), mask)
    with pytest.raises(ValueError, match="2 images but 1 texts"):
        head(pyramid, text[:1], mask[:1])


def test_predict_returns_rescaled_detections() -> None:
    head = _tiny_head().eval()
    pyramid, text, mask, _ = _batch()
    pm = torch.tensor([[[0, 1, 1, 0, 0, 0, 0.0], [0, 0, 0, 1, 0, 0, 0]]] * 2)
    sizes = torch.tensor([[90, 120], [96, 100]])
    dets = head.predict(pyramid, text, mask, pm, sizes, sizes * 2, PostprocessConfig(pre_nms_thresh=0.0))
    assert len(dets) == 2
    for d, (h, w) in zip(dets, sizes.tolist()):
        assert len(d) > 0 and d.boxes.shape == (len(d), 4)
        assert set(d.labels.tolist()) <= {0, 1}
        assert (d.boxes[:, 0::2] <= 2 * (w - 1) + 1e-4).all() and (d.boxes[:, 1::2] <= 2 * (h - 1) + 1e-4).all()
        assert (d.boxes >= 0).all() and (d.scores[:-1] >= d.scores[1:]).all()


@pytest.mark.slow
def test_overfits_one_image_with_two_boxes() -> None:
    torch.manual_seed(0)
    head = _tiny_head(drop_block_prob=0.0).train()
    pyramid = _pyramid(1, 128, 128)
    text = torch.randn(1, 6, TEXT_DIM)
    mask = torch.tensor([[True, True, True, True, True, False]])
    boxes = torch.tensor([[8.0, 16.0, 63.0, 79.0], [60.0, 40.0, 119.0, 111.0]])
    pm = torch.tensor([[0, 1, 1, 0, 0, 0.0], [0, 0, 0, 1, 0, 0]])
    targets = GroundingTargets([boxes], [pm])
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    for step in range(40):
        out = head(pyramid, text, mask, targets)
        assert out.loss is not None
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        logs = {k: float(v) for k, v in out.logs.items()}
        logs["total"] = float(out.loss.detach())
        if step == 0:
            first = logs
        last = logs
    assert last["total"] < 0.5 * first["total"]
    assert last["grounding/loss_token"] < 0.1 * first["grounding/loss_token"]
    assert last["grounding/loss_reg"] < first["grounding/loss_reg"]
    head.eval()
    dets = head.predict(pyramid, text, mask, pm[None], torch.tensor([[128, 128]]))[0]
    for k, ranked in enumerate(boxes_per_label(dets, 2)):
        assert ranked.shape[0] > 0
        assert box_iou(ranked[:1], boxes[k : k + 1]).item() > 0.5


def test_mixed_precision_runs_deformable_convs_in_fp32() -> None:
    head = _tiny_head(drop_block_prob=0.0).train()
    pyramid, text, mask, targets = _batch()
    dcn_dtypes: list[torch.dtype] = []
    dcn = cast(DeformConvNorm, cast(DyHeadBlock, head.dyhead_tower[0]).DyConv[1]).conv
    handle = dcn.register_forward_hook(lambda _m, _i, o: dcn_dtypes.append(o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(pyramid, text, mask, targets)
    handle.remove()
    assert dcn_dtypes and all(d == torch.float32 for d in dcn_dtypes)
    assert out.loss is not None and out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters() if p.grad is not None)
