"""Adaptive Training Sample Selection (ATSS) for the fine-grained detector (docs/reference/training.md §3.6).

Per image and per ground-truth box ``g``:

1. on every pyramid level, the ``topk`` anchors whose centres are closest (Euclidean) to the centre of ``g``
   are candidates;
2. the IoU threshold of ``g`` is the mean plus the unbiased standard deviation of its candidates' IoUs;
3. a candidate is positive if its IoU reaches the threshold and its centre lies inside ``g`` with
   ``min(l, t, r, b) > 0.01``;
4. an anchor positive for several boxes takes the box with the highest IoU.

IoUs use the inclusive-pixel ("+1") convention. Everything is vectorised over the ground-truth boxes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fiber_heads.grounding.box_coder import box_iou_plus_one

INSIDE_EPS: float = 0.01


def box_centres(boxes: Tensor) -> Tensor:
    """``[N, 2]`` centres ``((x1 + x2) / 2, (y1 + y2) / 2)`` of ``[N, 4]`` xyxy boxes."""
    return torch.stack(((boxes[:, 0] + boxes[:, 2]) * 0.5, (boxes[:, 1] + boxes[:, 3]) * 0.5), dim=1)


@torch.no_grad()
def atss_assign(
    anchors: Tensor, num_anchors_per_level: Sequence[int], gt_boxes: Tensor, topk: int = 9
) -> tuple[Tensor, Tensor]:
    """Assign every anchor to a ground-truth box or to the background.

    Args:
        anchors: ``[A, 4]`` xyxy anchors of all levels, concatenated in level order.
        num_anchors_per_level: number of anchors of each level (sums to ``A``).
        gt_boxes: ``[G, 4]`` xyxy ground-truth boxes ("+1" convention) in the same coordinates.
        topk: candidates per level and box (the reference uses 9 with one anchor per location).

    Returns:
        ``matched [A]`` (long): index of the assigned box, ``-1`` for background; and ``ious [A, G]``, the
        anchor-box IoU matrix (for diagnostics).
    """
    if sum(num_anchors_per_level) != anchors.shape[0]:
        raise ValueError(
            f"atss_assign: num_anchors_per_level sums to {sum(num_anchors_per_level)} but there are "
            f"{anchors.shape[0]} anchors"
        )
    num_anchors = anchors.shape[0]
    num_gt = gt_boxes.shape[0]
    if num_gt == 0:
        return torch.full((num_anchors,), -1, dtype=torch.long, device=anchors.device), anchors.new_zeros(
            (num_anchors, 0)
        )
    anchors = anchors.float()
    gt_boxes = gt_boxes.float()
    ious = box_iou_plus_one(anchors, gt_boxes)  # [A, G]
    anchor_ctr = box_centres(anchors)
    gt_ctr = box_centres(gt_boxes)
    # Exact Euclidean distances (cdist's matrix-product path can reorder near-ties).
    distances = (anchor_ctr[:, None, :] - gt_ctr[None, :, :]).pow(2).sum(dim=-1).sqrt()  # [A, G]

    # Candidate anchor indices per level, each [k_l, G]; indices are global (offset by the level start).
    candidates: list[Tensor] = []
    start = 0
    for count in num_anchors_per_level:
        k = min(topk, count)
        if k > 0:
            _, idx = distances[start : start + count].topk(k, dim=0, largest=False)
            candidates.append(idx + start)
        start += count
    cand = torch.cat(candidates, dim=0)  # [K, G]
    gt_index = torch.arange(num_gt, device=anchors.device).expand_as(cand)
    cand_ious = ious[cand, gt_index]  # [K, G]
    threshold = cand_ious.mean(dim=0) + cand_ious.std(dim=0)  # unbiased std, as the reference
    is_pos = cand_ious >= threshold[None, :]

    # Centre of each candidate anchor strictly inside its box: distances to the four sides > eps.
    cx = anchor_ctr[cand, 0]
    cy = anchor_ctr[cand, 1]
    sides = torch.stack(
        (cx - gt_boxes[None, :, 0], cy - gt_boxes[None, :, 1], gt_boxes[None, :, 2] - cx, gt_boxes[None, :, 3] - cy),
        dim=-1,
    )
    is_pos &= sides.amin(dim=-1) > INSIDE_EPS

    # IoU where (anchor, box) is a positive pair, -inf elsewhere; the best box per anchor wins.
    masked = torch.full_like(ious, float("-inf"))
    masked[cand[is_pos], gt_index[is_pos]] = cand_ious[is_pos]
    best, matched = masked.max(dim=1)
    matched = torch.where(torch.isfinite(best), matched, torch.full_like(matched, -1))
    return matched, ious
