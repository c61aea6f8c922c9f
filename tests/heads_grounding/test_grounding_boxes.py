"""Box coder, "+1" IoU, ATSS assignment (vs a brute-force loop), centerness and GIoU targets."""

from __future__ import annotations

import math

import torch
from torchvision.ops import box_iou, generalized_box_iou

from fiber_heads.grounding import (
    AnchorGenerator,
    BoxCoder,
    atss_assign,
    box_iou_plus_one,
    centerness_targets,
    giou_loss,
)


def _random_boxes(n: int, size: float = 200.0, generator: torch.Generator | None = None) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=generator) * size
    wh = torch.rand(n, 2, generator=generator) * size / 2 + 2
    return torch.cat([xy, xy + wh], dim=1)


def test_box_coder_hand_values() -> None:
    coder = BoxCoder()
    anchor = torch.tensor([[0.0, 0.0, 9.0, 19.0]])  # w 10, h 20, centre (4.5, 9.5)
    gt = torch.tensor([[2.0, 4.0, 21.0, 23.0]])  # w 20, h 20, centre (11.5, 13.5)
    d = coder.encode(gt, anchor)
    expected = torch.tensor([[10 * 7 / 10, 10 * 4 / 20, 5 * math.log(2.0), 5 * math.log(1.0)]])
    torch.testing.assert_close(d, expected)
    torch.testing.assert_close(coder.decode(d, anchor), gt)


def test_box_coder_round_trip_and_clamp() -> None:
    g = torch.Generator().manual_seed(1)
    coder = BoxCoder()
    anchors = _random_boxes(50, generator=g)
    gts = _random_boxes(50, generator=g)
    torch.testing.assert_close(coder.decode(coder.encode(gts, anchors), anchors), gts, atol=1e-3, rtol=1e-5)
    # batched leading dims
    torch.testing.assert_close(
        coder.decode(coder.encode(gts.view(5, 10, 4), anchors.view(5, 10, 4)), anchors.view(5, 10, 4)),
        gts.view(5, 10, 4),
        atol=1e-3,
        rtol=1e-5,
    )
    # dw / 5 is clamped at log(1000 / 16): a huge delta gives width 62.5 * anchor width
    anchor = torch.tensor([[0.0, 0.0, 15.0, 15.0]])
    box = coder.decode(torch.tensor([[0.0, 0.0, 100.0, 100.0]]), anchor)
    torch.testing.assert_close(box[0, 2] - box[0, 0] + 1, torch.tensor(1000.0))


def test_box_iou_plus_one_matches_shifted_continuous_iou() -> None:
    g = torch.Generator().manual_seed(2)
    a, b = _random_boxes(7, generator=g), _random_boxes(5, generator=g)
    shift = torch.tensor([0.0, 0.0, 1.0, 1.0])
    torch.testing.assert_close(box_iou_plus_one(a, b), box_iou(a + shift, b + shift))
    # hand value: two 10x10 pixel boxes overlapping by 5 columns
    iou = box_iou_plus_one(torch.tensor([[0.0, 0.0, 9.0, 9.0]]), torch.tensor([[5.0, 0.0, 14.0, 9.0]]))
    torch.testing.assert_close(iou, torch.tensor([[50.0 / 150.0]]))


def _iou_plus_one(a: list[float], g: list[float]) -> float:
    iw = max(0.0, min(a[2], g[2]) - max(a[0], g[0]) + 1)
    ih = max(0.0, min(a[3], g[3]) - max(a[1], g[1]) + 1)
    inter = iw * ih
    area_a = (a[2] - a[0] + 1) * (a[3] - a[1] + 1)
    area_g = (g[2] - g[0] + 1) * (g[3] - g[1] + 1)
    return inter / (area_a + area_g - inter)


def _atss_brute_force(anchors: torch.Tensor, counts: list[int], gts: torch.Tensor, topk: int = 9) -> torch.Tensor:
    """Loop implementation of docs/reference/training.md §3.6, written independently of the vectorised one."""
    matched = [-1] * anchors.shape[0]
    best = [float("-inf")] * anchors.shape[0]
    for g_idx in range(gts.shape[0]):
        gx1, gy1, gx2, gy2 = gts[g_idx].tolist()
        gcx, gcy = (gx1 + gx2) / 2, (gy1 + gy2) / 2
        candidates: list[int] = []
        start = 0
        for count in counts:
            dists = []
            for a in range(start, start + count):
                ax1, ay1, ax2, ay2 = anchors[a].tolist()
                dists.append((math.hypot((ax1 + ax2) / 2 - gcx, (ay1 + ay2) / 2 - gcy), a))
            candidates += [a for _, a in sorted(dists)[:topk]]
            start += count

        ious = [_iou_plus_one(anchors[a].tolist(), gts[g_idx].tolist()) for a in candidates]
        mean = sum(ious) / len(ious)
        std = math.sqrt(sum((v - mean) ** 2 for v in ious) / (len(ious) - 1))
        for a, v in zip(candidates, ious):
            ax1, ay1, ax2, ay2 = anchors[a].tolist()
            cx, cy = (ax1 + ax2) / 2, (ay1 + ay2) / 2
            inside = min(cx - gx1, cy - gy1, gx2 - cx, gy2 - cy) > 0.01
            if v >= mean + std - 1e-6 and inside and v > best[a]:
                best[a] = v
                matched[a] = g_idx
    return torch.tensor(matched)


def test_atss_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(3)
    gen = AnchorGenerator(sizes=(16, 32, 64, 128, 256), strides=(4, 8, 16, 32, 64))
    anchors, counts = gen([(24, 20), (12, 10), (6, 5), (3, 3), (2, 2)])
    for _ in range(3):
        gts = _random_boxes(6, size=80.0, generator=g)
        gts[:, 2:] = torch.minimum(gts[:, 2:], torch.tensor([79.0, 95.0]))
        matched, ious = atss_assign(anchors, counts, gts, topk=9)
        expected = _atss_brute_force(anchors, counts, gts)
        assert (expected >= 0).sum() > 0
        assert torch.equal(matched, expected)
        assert ious.shape == (anchors.shape[0], 6)


def test_atss_no_boxes_and_bad_counts() -> None:
    anchors, counts = AnchorGenerator()([(2, 2), (1, 1), (1, 1), (1, 1), (1, 1)])
    matched, _ = atss_assign(anchors, counts, torch.zeros(0, 4))
    assert torch.equal(matched, torch.full((8,), -1))
    try:
        atss_assign(anchors, [1, 1], torch.zeros(1, 4))
    except ValueError as e:
        assert "sums to 2" in str(e)
    else:
        raise AssertionError("expected ValueError")


def test_centerness_targets_hand_values() -> None:
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 15.0, 15.0]])  # centres (5, 5), (10, 10)
    boxes = torch.tensor([[0.0, 0.0, 20.0, 10.0], [0.0, 0.0, 20.0, 20.0]])
    # first: l=5, r=15, t=5, b=5 -> sqrt(1/3); second: centred -> 1
    torch.testing.assert_close(centerness_targets(anchors, boxes), torch.tensor([math.sqrt(1 / 3), 1.0]))


def test_giou_loss_matches_torchvision() -> None:
    g = torch.Generator().manual_seed(4)
    pred, target = _random_boxes(20, generator=g), _random_boxes(20, generator=g)
    w = torch.rand(20, generator=g)
    expected = ((1 - generalized_box_iou(pred, target).diagonal()) * w).sum()
    torch.testing.assert_close(giou_loss(pred, target, w), expected, rtol=1e-5, atol=1e-5)
    # an inverted prediction is clamped to a degenerate box (x2 := x1, y2 := y1), not flipped
    inv = torch.tensor([[10.0, 10.0, 0.0, 0.0]])
    tgt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    deg = torch.tensor([[10.0, 10.0, 10.0, 10.0]])
    torch.testing.assert_close(giou_loss(inv, tgt), giou_loss(deg, tgt))
