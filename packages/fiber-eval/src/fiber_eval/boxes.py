"""Box overlap helpers (numpy, continuous convention: area = (x2 − x1)(y2 − y1), no "+1").

Used by the Flickr30k Entities and REC evaluators (docs/reference/evaluation.md §6–§7), which compute IoU with continuous
areas on whatever coordinates they are given.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Literal

import numpy as np

from fiber_eval._io import PredictionFormatError

__all__ = [
    "BOX_FORMAT_TEXT",
    "BoxFormat",
    "box_area",
    "box_format_problem",
    "check_box_format",
    "convert_boxes",
    "count_implausible",
    "pairwise_giou",
    "pairwise_iou",
    "xywh_to_xyxy",
]


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


# ------------------------------------------------------------------------------------------ format checks

BoxFormat = Literal["xyxy", "xywh"]
BOX_FORMAT_TEXT: dict[str, str] = {"xyxy": "xyxy [x1, y1, x2, y2]", "xywh": "xywh [x, y, width, height]"}
# a box may overhang its image by this fraction of the image side plus one pixel before it counts as "beyond"
_SLACK_FRACTION = 0.02
# "beyond the image" or inverted boxes up to this fraction of all boxes only warn (stray boxes of a valid file)
_TOLERATED_FRACTION = 0.01
# the distribution test needs this many boxes
_MIN_BOXES_FOR_DISTRIBUTION = 20


def convert_boxes(boxes: np.ndarray, src: BoxFormat, dst: BoxFormat) -> np.ndarray:
    """``[N, 4]`` boxes from ``src`` to ``dst`` format (continuous rule: ``x2 = x + w``)."""
    for f in (src, dst):
        if f not in BOX_FORMAT_TEXT:
            raise ValueError(f"box format must be 'xyxy' or 'xywh', got {f!r}")
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if src == dst:
        return b.copy()
    if src == "xywh":
        return xywh_to_xyxy(b)
    return np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], axis=1)


def _implausible(xyxy: np.ndarray, image_wh: np.ndarray | None) -> np.ndarray:
    """``[N]`` True where an xyxy box is inverted (x2 < x1 or y2 < y1) or lies beyond its ``[N, 2]`` image."""
    bad = (xyxy[:, 2] < xyxy[:, 0] - 1e-6) | (xyxy[:, 3] < xyxy[:, 1] - 1e-6)
    if image_wh is not None:
        wh = np.asarray(image_wh, dtype=np.float64).reshape(-1, 2)
        known = np.isfinite(wh).all(axis=1) & (wh > 0).all(axis=1)
        slack = _SLACK_FRACTION * wh + 1.0
        beyond = (
            (xyxy[:, 0] < -slack[:, 0])
            | (xyxy[:, 1] < -slack[:, 1])
            | (xyxy[:, 2] > wh[:, 0] + slack[:, 0])
            | (xyxy[:, 3] > wh[:, 1] + slack[:, 1])
        )
        bad |= known & beyond
    return bad


def _xyxy_like_fraction(boxes: np.ndarray) -> float:
    """Fraction of raw boxes whose third/fourth numbers are at least the first/second (always 1 for xyxy)."""
    return float(((boxes[:, 2] >= boxes[:, 0]) & (boxes[:, 3] >= boxes[:, 1])).mean())


def box_format_problem(
    boxes: np.ndarray,
    expected: BoxFormat,
    *,
    image_wh: np.ndarray | None = None,
    reference_xywh: np.ndarray | None = None,
) -> tuple[str, int, bool] | None:
    """Checks that boxes are plausible in the ``expected`` format; says what looks wrong otherwise.

    Three signs of the other convention (or of the wrong scale): boxes that are inverted (``x2 < x1``),
    boxes beyond their image (with a slack of 2 % of the side + 1 px), and, for xywh with at least 20 boxes,
    every box having ``w ≥ x`` and ``h ≥ y`` while fewer than half of the ground-truth boxes do.

    Args:
        boxes: ``[N, 4]`` boxes as given.
        expected: the format the boxes should be in.
        image_wh: ``[N, 2]`` (width, height) of each box's image (rows of NaN: unknown); ``None``: not checked.
        reference_xywh: ``[M, 4]`` ground-truth boxes in xywh for the distribution test (``None``: skipped).

    Returns:
        ``None`` if the boxes look right, else ``(reason, index of an example box, whether they fit the other
        format)``. Up to 1 % of implausible boxes is tolerated (``None``; see :func:`count_implausible`).
    """
    raw = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if raw.shape[0] == 0:
        return None
    other: BoxFormat = "xywh" if expected == "xyxy" else "xyxy"
    bad = _implausible(convert_boxes(raw, expected, "xyxy"), image_wh)
    bad_other = _implausible(convert_boxes(raw, other, "xyxy"), image_wh)
    n = raw.shape[0]
    what = f"read as {BOX_FORMAT_TEXT[expected]}"
    if bad.sum() > _TOLERATED_FRACTION * n:
        kinds = []
        if image_wh is not None:
            kinds.append("lie beyond their image")
        kinds.append("have x2 < x1 or y2 < y1")
        reason = f"{int(bad.sum())} of {n} boxes {' or '.join(kinds)} when {what}"
        return reason, int(np.flatnonzero(bad)[0]), bool(bad_other.sum() <= _TOLERATED_FRACTION * n)
    if expected == "xywh" and reference_xywh is not None and n >= _MIN_BOXES_FOR_DISTRIBUTION:
        ref = np.asarray(reference_xywh, dtype=np.float64).reshape(-1, 4)
        if len(ref) and _xyxy_like_fraction(raw) == 1.0 and _xyxy_like_fraction(ref) < 0.5:
            reason = (
                f"all {n} boxes have width >= x and height >= y, as xyxy boxes do, but only "
                f"{100 * _xyxy_like_fraction(ref):.0f}% of the ground-truth xywh boxes do"
            )
            return reason, 0, True
    return None


def count_implausible(boxes: np.ndarray, fmt: BoxFormat, image_wh: np.ndarray | None = None) -> int:
    """Number of ``[N, 4]`` boxes in ``fmt`` that are inverted or beyond their image (see :func:`box_format_problem`)."""
    raw = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return int(_implausible(convert_boxes(raw, fmt, "xyxy"), image_wh).sum()) if len(raw) else 0


def check_box_format(
    boxes: np.ndarray,
    expected: BoxFormat,
    *,
    where: str,
    describe: Callable[[int], str] | None = None,
    image_wh: np.ndarray | None = None,
    reference_xywh: np.ndarray | None = None,
) -> None:
    """Refuses boxes that look like the other convention or the wrong scale; warns about a few stray ones.

    Args:
        boxes / expected / image_wh / reference_xywh: see :func:`box_format_problem` (``boxes`` in ``expected``
            format, after any ``--box-format`` conversion).
        where: the file (or evaluator) named in the message.
        describe: box index → the record it came from (``"record 3 (image_id=7): bbox [...]"``).

    Raises:
        PredictionFormatError: one line naming ``where``, an example record, the expected format and the
            ``--box-format`` option (API: ``box_format=``).
    """
    problem = box_format_problem(boxes, expected, image_wh=image_wh, reference_xywh=reference_xywh)
    other = "xywh" if expected == "xyxy" else "xyxy"
    if problem is not None:
        reason, idx, fits_other = problem
        example = describe(idx) if describe is not None else f"box {idx}"
        if fits_other:
            hint = f"they look like {other}: pass --box-format {other} (API: box_format='{other}') to convert"
        else:
            hint = f"boxes must be {BOX_FORMAT_TEXT[expected]} in original-image pixels (--box-format {other} converts)"
        raise PredictionFormatError(f"{where}: {reason}, e.g. {example}; {hint}")
    stray = count_implausible(boxes, expected, image_wh)
    if stray:
        warnings.warn(
            f"{where}: {stray} of {len(np.asarray(boxes).reshape(-1, 4))} boxes are inverted or beyond their image "
            f"when read as {BOX_FORMAT_TEXT[expected]}; they are scored as given",
            stacklevel=2,
        )
