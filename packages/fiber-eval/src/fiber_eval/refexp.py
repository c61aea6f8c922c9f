"""Referring expression comprehension accuracy, RefCOCO / RefCOCO+ / RefCOCOg (docs/reference/evaluation.md §7).

One item per expression with exactly one GT box (xywh → xyxy with the continuous rule ``x2 = x + w``).
The predicted boxes of the expression are sorted by descending score; ``P@k`` = 1 if the best overlap
between the GT and the top-k boxes is ≥ 0.5. The overlap is **GIoU** (``criterion="giou"``, the
MDETR/FIBER protocol) or plain **IoU** (``criterion="iou"``, the conventional REC accuracy); output keys
carry the criterion. The reported accuracy is P@1, per ``dataset_name``.

Compatibility mode (``compat_sort=True``, default) sorts ``(score, box)`` tuples descending as the official
code does, so equal scores are ordered by box coordinates (descending); otherwise ties keep input order.
An expression without any predicted box counts as a miss (the official evaluator crashes). Predicted boxes
are checked for the xyxy format (``box_format="xywh"`` converts xywh boxes).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fiber_eval._io import (
    PredictionFormatError,
    load_json,
    prediction_records,
    require_keys,
    require_predictions,
)
from fiber_eval.boxes import BoxFormat, check_box_format, convert_boxes, pairwise_giou, pairwise_iou, xywh_to_xyxy
from fiber_eval.distributed import gather_items, merge_unique
from fiber_eval.types import AccumulatingEvaluator, GatherObjects, RefExpPrediction

__all__ = ["RefExpEvaluator", "RefExpTarget", "load_refexp_predictions", "load_refexp_targets", "rank_boxes"]

Criterion = Literal["giou", "iou"]


@dataclass(frozen=True)
class RefExpTarget:
    """Ground truth of one referring expression.

    Attributes:
        item_id: the MDETR ``images[].id`` of the expression.
        box_xyxy: the GT box ``(x1, y1, x2, y2)`` (continuous conversion of the xywh annotation).
        dataset_name: ``refcoco``, ``refcoco+`` or ``refcocog``.
        image_wh: ``(width, height)`` of the image when the file gives it (box plausibility checks).
    """

    item_id: int
    box_xyxy: tuple[float, float, float, float]
    dataset_name: str = "refexp"
    image_wh: tuple[float, float] | None = None


def load_refexp_targets(source: str | Path | Mapping[str, Any]) -> list[RefExpTarget]:
    """Reads an MDETR ``finetune_refcoco*_<split>.json`` (one image entry and one annotation per expression).

    Raises:
        PredictionFormatError: naming the file and the record when an expression has no or several boxes.
    """
    name = str(source) if isinstance(source, (str, Path)) else "<ground truth>"
    data = load_json(source) if isinstance(source, (str, Path)) else source
    if not isinstance(data, Mapping) or "images" not in data or "annotations" not in data:
        raise PredictionFormatError(f"{name}: expected an MDETR JSON object with 'images' and 'annotations'")
    boxes: dict[int, list[list[float]]] = defaultdict(list)
    for i, ann in enumerate(data["annotations"]):
        ann = require_keys(ann, ("image_id", "bbox"), f"{name}: annotations[{i}]")
        boxes[int(ann["image_id"])].append(list(ann["bbox"]))
    out = []
    for i, img in enumerate(data["images"]):
        img = require_keys(img, ("id",), f"{name}: images[{i}]")
        found = boxes.get(int(img["id"]), [])
        if len(found) != 1:
            raise PredictionFormatError(f"{name}: images[{i}] (id={img['id']}) has {len(found)} boxes, expected 1")
        x1, y1, x2, y2 = (float(v) for v in xywh_to_xyxy(np.array(found[0]))[0])
        w, h = img.get("width"), img.get("height")
        size = (float(w), float(h)) if isinstance(w, (int, float)) and isinstance(h, (int, float)) else None
        out.append(RefExpTarget(int(img["id"]), (x1, y1, x2, y2), str(img.get("dataset_name", "refexp")), size))
    return out


def load_refexp_predictions(path: str | Path) -> list[RefExpPrediction]:
    """Reads ``[{"image_id": int, "boxes": [[x1, y1, x2, y2], ...], "scores": [...]}, ...]``.

    Raises:
        PredictionFormatError: naming the file and record index of a malformed record.
    """
    out = []
    for record, rec in prediction_records(path, ("image_id", "boxes", "scores")):
        where = f"{record} (image_id={rec['image_id']})"
        try:
            b = np.asarray(rec["boxes"], dtype=np.float64).reshape(-1, 4)
            s = np.asarray(rec["scores"], dtype=np.float64).reshape(-1)
        except (TypeError, ValueError) as e:
            raise PredictionFormatError(f"{where}: boxes must be [K, 4] numbers and scores [K] numbers") from e
        if b.shape[0] != s.shape[0]:
            raise PredictionFormatError(f"{where}: {b.shape[0]} boxes but {s.shape[0]} scores")
        out.append(RefExpPrediction(int(rec["image_id"]), b, s))
    return out


def rank_boxes(boxes: np.ndarray, scores: np.ndarray, *, compat_sort: bool = True) -> np.ndarray:
    """Sorts boxes by descending score.

    Args:
        boxes: ``[K, 4]`` boxes.
        scores: ``[K]`` scores.
        compat_sort: order equal scores by box coordinates, descending (official ``sorted`` of tuples);
            otherwise keep input order among ties.

    Returns:
        ``[K, 4]`` boxes, best first.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if compat_sort:
        # lexsort: last key is primary -> score, then x1, y1, x2, y2, all descending
        order = np.lexsort((-boxes[:, 3], -boxes[:, 2], -boxes[:, 1], -boxes[:, 0], -scores))
    else:
        order = np.argsort(-scores, kind="stable")
    return boxes[order]


class RefExpEvaluator(AccumulatingEvaluator[RefExpPrediction]):
    """Accumulates :class:`~fiber_eval.types.RefExpPrediction` and computes P@k per dataset.

    Args:
        targets: one :class:`RefExpTarget` per expression.
        ks: the k of P@k (1, 5, 10); P@1 is the reported accuracy.
        criterion: ``"giou"`` (FIBER/MDETR) or ``"iou"`` (conventional).
        compat_sort: see :func:`rank_boxes`.
        strict: if True every target needs a prediction.
        box_format: the format of the predicted boxes: ``"xyxy"`` (expected) or ``"xywh"`` (converted). Boxes
            that look like the other format are refused (see :func:`fiber_eval.boxes.check_box_format`).

    ``compute`` returns ``"<criterion>/<dataset>/P@k"`` and ``"<criterion>/all/P@k"`` in percent, plus
    ``num_expressions``.
    """

    def __init__(
        self,
        targets: Sequence[RefExpTarget],
        *,
        ks: Sequence[int] = (1, 5, 10),
        criterion: Criterion = "giou",
        compat_sort: bool = True,
        strict: bool = True,
        box_format: BoxFormat = "xyxy",
    ) -> None:
        if criterion not in ("giou", "iou"):
            raise ValueError(f"criterion must be 'giou' or 'iou', got {criterion!r}")
        if box_format not in ("xyxy", "xywh"):
            raise ValueError(f"box_format must be 'xyxy' or 'xywh', got {box_format!r}")
        self.box_format: BoxFormat = box_format
        self.targets = {t.item_id: t for t in targets}
        self.ks = tuple(int(k) for k in ks)
        self.criterion: Criterion = criterion
        self.compat_sort = compat_sort
        self.strict = strict
        self._items: list[RefExpPrediction] = []

    def check(self, prediction: RefExpPrediction, index: int) -> None:
        """Raises ``KeyError`` for an item id without target."""
        if prediction.item_id not in self.targets:
            raise KeyError(f"REC prediction for item_id {prediction.item_id}, which is not in the targets")

    def _checked_boxes(self, by_id: Mapping[int, RefExpPrediction]) -> dict[int, np.ndarray]:
        """Every prediction's boxes in xyxy, after the plausibility check of all boxes together."""
        ids = list(by_id)
        parts = [np.asarray(by_id[i].boxes_xyxy, dtype=np.float64).reshape(-1, 4) for i in ids]
        allb = np.concatenate(parts) if parts else np.zeros((0, 4))
        owner = [(i, k) for i, b in zip(ids, parts) for k in range(len(b))]
        wh = [self.targets[i].image_wh or (math.nan, math.nan) for i, b in zip(ids, parts) for _ in range(len(b))]

        def _describe(j: int) -> str:
            item, k = owner[j]
            return f"item_id {item} box {k}: {allb[j].tolist()}"

        check_box_format(
            allb,
            self.box_format,
            where="REC predictions",
            describe=_describe,
            image_wh=np.asarray(wh, dtype=np.float64).reshape(-1, 2),
        )
        return {i: convert_boxes(b, self.box_format, "xyxy") for i, b in zip(ids, parts)}

    def compute(self, gather: GatherObjects | None = None) -> dict[str, float]:
        """P@k per dataset and overall, in percent.

        Raises:
            ValueError: if there are no predictions, or (``strict``) some targets have none.
            PredictionFormatError: if the boxes look like the other box format (see ``box_format``).
        """
        by_id, _ = merge_unique(gather_items(self.state(), gather), key=lambda p: p.item_id, what="item_id")
        require_predictions(
            self.targets, by_id, strict=self.strict, what="expression(s)", nothing="the referring expressions"
        )
        boxes_of = self._checked_boxes(by_id)
        overlap = pairwise_giou if self.criterion == "giou" else pairwise_iou
        hits: dict[str, list[list[bool]]] = defaultdict(list)
        for item_id, pred in by_id.items():
            tgt = self.targets[item_id]
            ranked = rank_boxes(boxes_of[item_id], pred.scores, compat_sort=self.compat_sort)
            ov = overlap(np.array([tgt.box_xyxy]), ranked)[0] if len(ranked) else np.zeros(0)
            row = [bool(ov[:k].size and ov[:k].max() >= 0.5) for k in self.ks]
            hits[tgt.dataset_name].append(row)
            hits["all"].append(row)
        out: dict[str, float] = {}
        for name, rows in sorted(hits.items()):
            arr = np.array(rows, dtype=np.float64)  # [N, len(ks)]
            for j, k in enumerate(self.ks):
                out[f"{self.criterion}/{name}/P@{k}"] = 100.0 * float(arr[:, j].mean())
        out["num_expressions"] = float(len(hits["all"]))
        return out
