"""COCO boxes as the loaders keep them (docs/reference/data-formats.md §9.5, §12): xywh → xyxy in the "+1"
convention clamped to the image, the repairs counted on the way (:data:`REPAIR_KINDS`), and the columnar store
of images with a ragged list of boxes each (:class:`BoxColumns`)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from torch import Tensor

__all__ = ["REPAIR_KINDS", "BoxColumns", "clip_boxes_counted", "repairs_summary", "xywh_to_xyxy_plus1"]


def xywh_to_xyxy_plus1(boxes: np.ndarray | Tensor, width: float, height: float) -> np.ndarray:
    """COCO ``[x, y, w, h]`` → xyxy with ``x2 = x + w - 1`` and clamping to ``[0, W-1] x [0, H-1]`` (§12).

    Args:
        boxes: ``[N, 4]`` xywh.
        width, height: image size.

    Returns:
        ``float32 [N, 4]`` xyxy (degenerate boxes are *not* removed here).
    """
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    out = np.stack([b[:, 0], b[:, 1], b[:, 0] + b[:, 2] - 1, b[:, 1] + b[:, 3] - 1], axis=1)
    out[:, 0::2] = out[:, 0::2].clip(0, width - 1)
    out[:, 1::2] = out[:, 1::2].clip(0, height - 1)
    return out.astype(np.float32)


#: what the grounding and detection loaders count when they repair or drop boxes (``repairs`` attributes) ->
#: its description in messages; ``records_skipped`` counts records left out under ``on_error="skip"``
REPAIR_KINDS: dict[str, str] = {
    "boxes_clipped": "boxes clipped to the image",
    "boxes_degenerate_dropped": "boxes dropped as empty after clipping (w or h <= 0, or outside the image)",
    "boxes_nonfinite_dropped": "boxes dropped for NaN/inf coordinates",
    "images_without_valid_boxes_removed": "images removed for having no valid box",
    "records_skipped": "bad records skipped (on_error=skip)",
}


def clip_boxes_counted(
    xywh: np.ndarray, width: float, height: float, repairs: dict[str, int]
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`xywh_to_xyxy_plus1` plus what it changed, counted into ``repairs`` (keys of :data:`REPAIR_KINDS`).

    Returns:
        ``(xyxy float32 [N, 4], valid bool [N])``: a box is valid when finite and non-empty after clipping.
    """
    raw = np.asarray(xywh, dtype=np.float64).reshape(-1, 4)
    xyxy = xywh_to_xyxy_plus1(raw, width, height)
    finite = np.isfinite(raw).all(axis=1)
    valid = finite & (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
    with np.errstate(invalid="ignore", over="ignore"):
        unclipped = np.stack([raw[:, 0], raw[:, 1], raw[:, 0] + raw[:, 2] - 1, raw[:, 1] + raw[:, 3] - 1], 1)
        clipped = valid & ~np.isclose(unclipped, xyxy, atol=1e-3).all(axis=1)
    repairs["boxes_nonfinite_dropped"] += int((~finite).sum())
    repairs["boxes_degenerate_dropped"] += int((finite & ~valid).sum())
    repairs["boxes_clipped"] += int(clipped.sum())
    return xyxy, valid


def repairs_summary(repairs: dict[str, int]) -> str:
    """One line of the non-zero counts of ``repairs``, e.g. ``"3 boxes clipped to the image"``."""
    return ", ".join(f"{n} {REPAIR_KINDS[k]}" for k, n in repairs.items() if n) or "nothing repaired or dropped"


class BoxColumns:
    """Images with a ragged list of boxes each, collected image by image into flat columns.

    Attributes:
        paths: image file per image.
        records: the annotation record of each image (for errors).
    """

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.paths: list[str] = []
        self.sizes: list[tuple[int, int]] = []
        self.records: list[str] = []
        self.offsets = [0]
        self.boxes: list[np.ndarray] = []
        self.labels: list[int] = []

    def add(
        self, image_id: int, path: str, size: tuple[int, int], record: str, boxes: np.ndarray, labels: Iterable[int]
    ) -> None:
        """Append one image: ``size = (height, width)``, ``boxes [K, 4]`` xyxy and their ``K`` labels."""
        self.ids.append(image_id)
        self.paths.append(path)
        self.sizes.append(size)
        self.records.append(record)
        self.boxes.extend(np.asarray(boxes).reshape(-1, 4))
        self.labels.extend(int(v) for v in labels)
        self.offsets.append(len(self.labels))

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(image_ids int64 [N], sizes int64 [N, 2], offsets int64 [N + 1], boxes float32 [M, 4], labels int64
        [M])``; the boxes of image ``i`` are rows ``offsets[i]:offsets[i + 1]``."""
        return (
            np.asarray(self.ids, dtype=np.int64),
            np.asarray(self.sizes, dtype=np.int64).reshape(-1, 2),
            np.asarray(self.offsets, dtype=np.int64),
            np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4),
            np.asarray(self.labels, dtype=np.int64),
        )
