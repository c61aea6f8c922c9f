"""Box overlap helpers (numpy, continuous convention: area = (x2 − x1)(y2 − y1), no "+1").

Used by the Flickr30k Entities and REC evaluators (evaluation.md §6–§7), which compute IoU with continuous
areas on whatever coordinates they are given.
"""

from __future__ import annotations

import numpy as np

__all__ = ["box_area", "pairwise_giou", "pairwise_iou", "xywh_to_xyxy"]


def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """``[N, 4]`` xywh → xyxy with the continuous rule ``x2 = x + w``, ``y2 = y + h``."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1)


def box_area(boxes: np.ndarray) -> np.ndarray:
    """``[N, 4]`` xyxy → ``[N]`` areas (negative widths/heights count as 0)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)


def _inter_union(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])  # [N, M, 2]
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return inter, union


def pairwise_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every pair: ``[N, 4]`` × ``[M, 4]`` xyxy → ``[N, M]`` (0 where the union is empty)."""
    inter, union = _inter_union(a, b)
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def pairwise_giou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Generalised IoU ``IoU − (|C| − |A ∪ B|) / |C|`` of every pair, C the smallest enclosing box → ``[N, M]``."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    inter, union = _inter_union(a, b)
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    lt = np.minimum(a[:, None, :2], b[None, :, :2])
    rb = np.maximum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    enclose = wh[..., 0] * wh[..., 1]
    penalty = np.divide(enclose - union, enclose, out=np.zeros_like(enclose), where=enclose > 0)
    return iou - penalty
