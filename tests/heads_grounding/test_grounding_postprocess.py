"""Detection / grounding post-processing on hand-made logits (docs/reference/training.md §4.7)."""

from __future__ import annotations

import math

import pytest
import torch

from fiber_heads.grounding import (
    GroundingDetections,
    PostprocessConfig,
    boxes_per_label,
    class_scores,
    postprocess_detections,
)


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _case() -> dict[str, torch.Tensor]:
    anchors = torch.tensor(
        [
            [10.0, 10.0, 49.0, 49.0],  # a0: class 0, best
            [12.0, 12.0, 51.0, 51.0],  # a1: class 0 duplicate of a0 (IoU 0.82), weaker
            [100.0, 100.0, 139.0, 139.0],  # a2: class 1, sticks out of the image at the bottom
            [0.0, 0.0, 19.0, 19.0],  # a3: nothing
        ]
    )
    logits = torch.full((1, 4, 6), -10.0)
    logits[0, 0, 1], logits[0, 0, 2] = 3.0, 1.0
    logits[0, 1, 1], logits[0, 1, 2] = 2.0, 0.0
    logits[0, 2, 4] = 2.0
    # a padding class token (5) that is high everywhere must not matter
    logits[0, :, 5] = 10.0
    ctr = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    positive_maps = torch.tensor([[[0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 0]]], dtype=torch.float32)
    return {"anchors": anchors, "logits": logits, "ctr": ctr, "pm": positive_maps}


def test_known_boxes_labels_scores_and_nms() -> None:
    c = _case()
    dets = postprocess_detections(
        c["logits"],
        torch.zeros(1, 4, 4),
        c["ctr"],
        c["anchors"],
        [2, 2],
        c["pm"],
        image_sizes=torch.tensor([[120, 150]]),
        original_sizes=torch.tensor([[240, 300]]),
    )
    assert len(dets) == 1
    d = dets[0]
    assert d.labels.tolist() == [0, 1]  # a1 removed by NMS, a3 and the padding class never scored
    s0 = math.sqrt((_sig(3.0) + _sig(1.0)) / 2 * _sig(1.0))
    s1 = math.sqrt(_sig(2.0) * 0.5)
    torch.testing.assert_close(d.scores, torch.tensor([s0, s1]))
    # zero deltas decode to the anchors; a2 clipped to y <= 119; then everything x2 for the original size
    expected = torch.tensor([[10.0, 10.0, 49.0, 49.0], [100.0, 100.0, 139.0, 119.0]]) * 2
    torch.testing.assert_close(d.boxes, expected)
    per_label = boxes_per_label(d, 3)
    assert [b.shape[0] for b in per_label] == [1, 1, 0]


def test_class_scores_mean_and_validity() -> None:
    c = _case()
    scores, valid = class_scores(c["logits"], c["pm"][:, :, :5])  # narrower maps are zero-padded
    assert valid.tolist() == [[True, True, False]]
    torch.testing.assert_close(scores[0, 0, 0], torch.tensor((_sig(3.0) + _sig(1.0)) / 2))
    assert scores[0, 0, 2] == 0
    with pytest.raises(ValueError, match="positive_maps has shape"):
        class_scores(c["logits"], torch.zeros(1, 2, 7))


def test_nms_uses_plus_one_areas() -> None:
    # +1 IoU of these boxes is 60/140 = 0.43, the continuous IoU 45/117 = 0.38
    anchors = torch.tensor([[0.0, 0.0, 9.0, 9.0], [4.0, 0.0, 13.0, 9.0]])
    logits = torch.tensor([[[3.0], [2.0]]])
    pm = torch.ones(1, 1, 1)
    args = (logits, torch.zeros(1, 2, 4), torch.zeros(1, 2), anchors, [2], pm, torch.tensor([[50, 50]]))
    plus_one = postprocess_detections(*args, config=PostprocessConfig(nms_thresh=0.4))
    continuous = postprocess_detections(*args, config=PostprocessConfig(nms_thresh=0.4, plus_one_nms=False))
    assert len(plus_one[0]) == 1 and len(continuous[0]) == 2


def test_top_k_keeps_ties_and_per_level_candidates() -> None:
    anchors = torch.tensor([[i * 20.0, 0.0, i * 20.0 + 9, 9.0] for i in range(4)])  # disjoint boxes
    logits = torch.tensor([[[3.0], [1.0], [1.0], [0.0]]])
    pm = torch.ones(1, 1, 1)
    args = (logits, torch.zeros(1, 4, 4), torch.zeros(1, 4), anchors)
    dets = postprocess_detections(
        *args, [4], pm, torch.tensor([[50, 100]]), config=PostprocessConfig(detections_per_img=2)
    )
    assert len(dets[0]) == 3  # the two tied second-best scores are both kept
    assert dets[0].scores[0] > dets[0].scores[1] == dets[0].scores[2]
    # pre_nms_top_n = 1 per level: levels {a0, a1} and {a2, a3} keep a0 and a2
    dets = postprocess_detections(
        *args, [2, 2], pm, torch.tensor([[50, 100]]), config=PostprocessConfig(pre_nms_top_n=1)
    )
    torch.testing.assert_close(dets[0].boxes, anchors[[0, 2]])
    # threshold on the class score (before centerness): the best, sigmoid(3) = 0.953, fails 0.96
    dets = postprocess_detections(
        *args, [4], pm, torch.tensor([[50, 100]]), config=PostprocessConfig(pre_nms_thresh=0.96)
    )
    assert len(dets[0]) == 0 and dets[0].boxes.shape == (0, 4)


def test_batched_with_padded_positive_maps() -> None:
    c = _case()
    logits = torch.cat([c["logits"], c["logits"].flip(1)])  # image 1: anchors reversed
    pm = torch.cat([c["pm"], torch.tensor([[[0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0.0]]])])
    dets = postprocess_detections(
        logits,
        torch.zeros(2, 4, 4),
        torch.cat([c["ctr"], c["ctr"].flip(1)]),
        c["anchors"],
        [2, 2],
        pm,
        image_sizes=torch.tensor([[200, 200], [200, 200]]),
    )
    assert dets[0].labels.tolist() == [0, 1]
    # image 1 has a single real class (its class-1 row is padding); with the anchor order reversed, the a0/a1
    # logits now sit on the disjoint anchors a3/a2, so both survive NMS, best first
    assert dets[1].labels.tolist() == [0, 0]
    torch.testing.assert_close(dets[1].boxes, c["anchors"][[3, 2]])
    torch.testing.assert_close(dets[1].scores[0], dets[0].scores[0])


def test_boxes_per_label_orders_by_score() -> None:
    d = GroundingDetections(
        boxes=torch.arange(16, dtype=torch.float32).view(4, 4),
        scores=torch.tensor([0.2, 0.9, 0.5, 0.7]),
        labels=torch.tensor([1, 0, 1, 1]),
    )
    groups = boxes_per_label(d, 2)
    torch.testing.assert_close(groups[0], d.boxes[[1]])
    torch.testing.assert_close(groups[1], d.boxes[[3, 2, 0]])
