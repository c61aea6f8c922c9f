"""Anchor box coder of the fine-grained detector (docs/reference/training.md §3.4, "Box coder").

Boxes use the inclusive-pixel ("+1") convention of the reference detector: a box ``[x1, y1, x2, y2]`` covers
``x2 - x1 + 1`` pixels horizontally. Deltas are weighted by ``(wx, wy, ww, wh) = (10, 10, 5, 5)`` and the
decoded log-size deltas are clamped at ``log(1000 / 16)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

DEFAULT_WEIGHTS: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
DEFAULT_SCALE_CLAMP: float = math.log(1000.0 / 16)


class BoxCoder:
    """Encode ground-truth boxes as deltas relative to anchors and decode deltas back to boxes.

    With ``w = x2 - x1 + 1`` and centre ``c = (x1 + x2) / 2``::

        encode: dx = wx (gx - ax) / aw,  dy = wy (gy - ay) / ah,  dw = ww log(gw / aw),  dh = wh log(gh / ah)
        decode: w = exp(min(dw / ww, clamp)) aw,  box = [cx - (w - 1) / 2, cy - (h - 1) / 2, cx + (w - 1) / 2, ...]

    Args:
        weights: ``(wx, wy, ww, wh)`` delta weights.
        scale_clamp: upper bound of ``dw / ww`` and ``dh / wh`` before ``exp`` in :meth:`decode`.
    """

    def __init__(
        self, weights: tuple[float, float, float, float] = DEFAULT_WEIGHTS, scale_clamp: float = DEFAULT_SCALE_CLAMP
    ) -> None:
        self.weights = tuple(float(w) for w in weights)
        self.scale_clamp = float(scale_clamp)

    @staticmethod
    def _centre_size(boxes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        widths = boxes[..., 2] - boxes[..., 0] + 1.0
        heights = boxes[..., 3] - boxes[..., 1] + 1.0
        cx = (boxes[..., 0] + boxes[..., 2]) * 0.5
        cy = (boxes[..., 1] + boxes[..., 3]) * 0.5
        return cx, cy, widths, heights

    def encode(self, gt_boxes: Tensor, anchors: Tensor) -> Tensor:
        """Deltas that map ``anchors`` onto ``gt_boxes``.

        Args:
            gt_boxes: ``[..., 4]`` xyxy target boxes ("+1" convention).
            anchors: ``[..., 4]`` xyxy anchors, broadcastable to ``gt_boxes``.

        Returns:
            ``[..., 4]`` deltas ``(dx, dy, dw, dh)``.
        """
        wx, wy, ww, wh = self.weights
        gx, gy, gw, gh = self._centre_size(gt_boxes)
        ax, ay, aw, ah = self._centre_size(anchors)
        dx = wx * (gx - ax) / aw
        dy = wy * (gy - ay) / ah
        dw = ww * torch.log(gw / aw)
        dh = wh * torch.log(gh / ah)
        return torch.stack((dx, dy, dw, dh), dim=-1)

    def decode(self, deltas: Tensor, anchors: Tensor) -> Tensor:
        """Boxes obtained by applying ``deltas`` to ``anchors``.

        Args:
            deltas: ``[..., 4]`` predicted or encoded deltas ``(dx, dy, dw, dh)``.
            anchors: ``[..., 4]`` xyxy anchors, broadcastable to ``deltas``.

        Returns:
            ``[..., 4]`` xyxy boxes ("+1" convention), in the dtype of ``deltas``.
        """
        anchors = anchors.to(deltas.dtype)
        wx, wy, ww, wh = self.weights
        ax, ay, aw, ah = self._centre_size(anchors)
        dx = deltas[..., 0] / wx
        dy = deltas[..., 1] / wy
        dw = (deltas[..., 2] / ww).clamp(max=self.scale_clamp)
        dh = (deltas[..., 3] / wh).clamp(max=self.scale_clamp)
        cx = dx * aw + ax
        cy = dy * ah + ay
        half_w = (torch.exp(dw) * aw - 1.0) * 0.5
        half_h = (torch.exp(dh) * ah - 1.0) * 0.5
        return torch.stack((cx - half_w, cy - half_h, cx + half_w, cy + half_h), dim=-1)


def box_iou_plus_one(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU with the inclusive-pixel convention (areas ``(x2 - x1 + 1)(y2 - y1 + 1)``).

    Args:
        boxes1: ``[N, 4]`` xyxy boxes.
        boxes2: ``[M, 4]`` xyxy boxes.

    Returns:
        ``[N, M]`` IoU matrix.
    """
    area1 = (boxes1[:, 2] - boxes1[:, 0] + 1) * (boxes1[:, 3] - boxes1[:, 1] + 1)
    area2 = (boxes2[:, 2] - boxes2[:, 0] + 1) * (boxes2[:, 3] - boxes2[:, 1] + 1)
    lt = torch.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt + 1).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area1[:, None] + area2[None, :] - inter)
