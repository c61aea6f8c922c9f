"""COCO box AP via pycocotools and the ODinW mean (docs/reference/evaluation.md §8, §10; box conventions docs/reference/data-formats.md §12).

Detections arrive as :class:`~fiber_eval.types.Detections` in original-image ``xyxy`` pixels and are exported
to COCO ``[x, y, w, h]`` results. The reference pipeline works in the inclusive-pixel ("+1") convention, so its
COCO/ODinW exporter writes ``w = x2 − x1 + 1``, ``h = y2 − y1 + 1``; ``box_convention="plus_one"`` (the
default, compatibility mode) reproduces it and ``"continuous"`` writes ``w = x2 − x1``. At most 100 detections
per image (highest scores) are kept before evaluation, as the official inference does.

Results are validated against their ground truth before scoring (:func:`validate_results`): image ids and
category ids must exist there (unknown categories can be dropped and counted instead), and boxes that look
like xyxy (or the wrong scale) are refused, since pycocotools would score them silently.

Needs the ``coco`` extra (``pip install 'fiber-eval[coco]'``); pycocotools is imported lazily.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fiber_eval._io import PredictionFormatError, load_json, prediction_records
from fiber_eval.boxes import BoxFormat, check_box_format, convert_boxes
from fiber_eval.distributed import gather_items, merge_unique
from fiber_eval.types import AccumulatingEvaluator, Detections, GatherObjects

__all__ = [
    "COCO_STAT_NAMES",
    "COCODetectionEvaluator",
    "ODinWEvaluator",
    "coco_bbox_eval",
    "detections_to_coco_results",
    "load_coco_results",
    "odinw_mean",
    "validate_results",
]

BoxConvention = Literal["plus_one", "continuous"]
UnknownCategories = Literal["error", "drop"]
COCO_STAT_NAMES: tuple[str, ...] = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)


def _require_pycocotools() -> Any:
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as e:
        raise ImportError("COCO AP needs pycocotools: pip install 'fiber-eval[coco]'") from e
    return COCO, COCOeval


def detections_to_coco_results(
    detections: Sequence[Detections],
    *,
    box_convention: BoxConvention = "plus_one",
    label_to_category_id: Mapping[int, int] | None = None,
    max_per_image: int | None = 100,
) -> list[dict[str, Any]]:
    """Converts per-image detections to COCO result records.

    Args:
        detections: one entry per image (several entries for one image are concatenated).
        box_convention: ``"plus_one"`` → ``w = x2 − x1 + 1`` (reference COCO/ODinW exporter);
            ``"continuous"`` → ``w = x2 − x1`` (LVIS exporter, pycocotools' own convention).
        label_to_category_id: maps contiguous labels to dataset category ids; ``None`` = labels are ids.
        max_per_image: keep the highest-scoring detections of each image (``None``: keep all).

    Returns:
        ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}, ...]``.

    Raises:
        ValueError: for arrays of inconsistent shape, non-finite values, or an unmapped label.
    """
    if box_convention not in ("plus_one", "continuous"):
        raise ValueError(f"box_convention must be 'plus_one' or 'continuous', got {box_convention!r}")
    extra = 1.0 if box_convention == "plus_one" else 0.0
    per_image: dict[Any, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
    for i, det in enumerate(detections):
        boxes = np.asarray(det.boxes_xyxy, dtype=np.float64).reshape(-1, 4) if np.size(det.boxes_xyxy) else None
        scores = np.asarray(det.scores, dtype=np.float64).reshape(-1)
        labels = np.asarray(det.labels).reshape(-1)
        k = 0 if boxes is None else boxes.shape[0]
        if scores.shape[0] != k or labels.shape[0] != k:
            raise ValueError(
                f"detections {i} (image_id={det.image_id}): {k} boxes, {scores.shape[0]} scores, "
                f"{labels.shape[0]} labels"
            )
        if boxes is None:  # no boxes (k == 0)
            per_image.setdefault(det.image_id, [])
            continue
        if not (np.isfinite(boxes).all() and np.isfinite(scores).all()):
            raise ValueError(f"detections {i} (image_id={det.image_id}): non-finite box or score")
        per_image.setdefault(det.image_id, []).append((boxes, scores, labels))
    results: list[dict[str, Any]] = []
    for image_id, parts in per_image.items():
        if not parts:
            continue
        boxes = np.concatenate([p[0] for p in parts])
        scores = np.concatenate([p[1] for p in parts])
        labels = np.concatenate([p[2] for p in parts])
        order = np.argsort(-scores, kind="stable")
        if max_per_image is not None:
            order = order[:max_per_image]
        for j in order:
            lab = int(labels[j])
            if label_to_category_id is not None:
                if lab not in label_to_category_id:
                    raise ValueError(f"image_id={image_id}: label {lab} has no entry in label_to_category_id")
                lab = int(label_to_category_id[lab])
            x1, y1, x2, y2 = boxes[j]
            results.append(
                {
                    "image_id": image_id,
                    "category_id": lab,
                    "bbox": [float(x1), float(y1), float(x2 - x1 + extra), float(y2 - y1 + extra)],
                    "score": float(scores[j]),
                }
            )
    return results


def load_coco_results(source: str | Path | Sequence[Any], *, allow_empty: bool = False) -> list[dict[str, Any]]:
    """Reads and validates a COCO results file ``[{"image_id", "category_id", "bbox": [x,y,w,h], "score"}]``.

    Args:
        source: the file (or its decoded list).
        allow_empty: accept an empty list (it scores 0); by default an empty file is refused, since it is far
            more often a failed export than a model that detects nothing.

    Raises:
        PredictionFormatError: naming the file and record index of a malformed record, or an empty file.
    """
    name = str(source) if isinstance(source, (str, Path)) else "<results>"
    data = load_json(source) if isinstance(source, (str, Path)) else source
    if isinstance(data, list) and not data and not allow_empty:
        raise PredictionFormatError(f"{name}: no detection records (empty list); pass --allow-empty to score it as 0")
    for where, rec in prediction_records(
        data, ("image_id", "category_id", "bbox", "score"), name=name, what="detection"
    ):
        bbox = rec["bbox"]
        if (
            not isinstance(bbox, list)
            or len(bbox) != 4
            or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)
        ):
            raise PredictionFormatError(f"{where} (image_id={rec['image_id']}): bbox must be 4 finite numbers")
        if not isinstance(rec["score"], (int, float)) or not math.isfinite(rec["score"]):
            raise PredictionFormatError(f"{where} (image_id={rec['image_id']}): score must be a finite number")
    return list(data)


def validate_results(
    results: Sequence[Mapping[str, Any]],
    gt: Mapping[str, Any],
    *,
    box_format: BoxFormat = "xywh",
    unknown_categories: UnknownCategories = "error",
    source: str = "results",
    gt_name: str = "the ground truth",
) -> tuple[list[Mapping[str, Any]], int]:
    """Checks COCO-format results against their ground truth before scoring (COCO, ODinW and LVIS).

    Args:
        results: records ``{"image_id", "category_id", "bbox", "score"}`` with ``bbox`` in ``box_format``.
        gt: the decoded ground truth (``images`` with ``width`` / ``height`` when known, ``annotations``,
            ``categories``).
        box_format: ``"xywh"`` (the COCO results format) or ``"xyxy"`` (converted to xywh here,
            ``w = x2 − x1``).
        unknown_categories: ``"error"`` refuses category ids that are neither in ``categories`` nor in the
            annotations; ``"drop"`` removes those records and counts them.
        source / gt_name: names used in messages (the results file, the ground-truth file).

    Returns:
        ``(records with xywh boxes, number of records dropped for an unknown category)``; the records are the
        input mappings themselves when nothing is converted.

    Raises:
        PredictionFormatError: for image ids not in the ground truth, unknown category ids (``"error"``), or
            boxes that look like the other format or lie beyond their image (see
            :func:`fiber_eval.boxes.check_box_format`).
    """
    if box_format not in ("xywh", "xyxy"):
        raise ValueError(f"box_format must be 'xywh' or 'xyxy', got {box_format!r}")
    if unknown_categories not in ("error", "drop"):
        raise ValueError(f"unknown_categories must be 'error' or 'drop', got {unknown_categories!r}")
    images = {img["id"]: img for img in gt.get("images", [])}
    unknown = {r["image_id"] for r in results} - images.keys()
    if unknown:
        raise PredictionFormatError(
            f"{source}: {len(unknown)} result image id(s) are not in {gt_name}, e.g. {sorted(unknown)[:5]}"
        )
    known_cats = {c["id"] for c in gt.get("categories", [])} | {a["category_id"] for a in gt.get("annotations", [])}
    bad_cat = [i for i, r in enumerate(results) if r["category_id"] not in known_cats]
    if bad_cat and unknown_categories == "error":
        ids = sorted({results[i]["category_id"] for i in bad_cat}, key=str)
        raise PredictionFormatError(
            f"{source}: {len(bad_cat)} record(s) have category ids that are not in {gt_name} (e.g. record "
            f"{bad_cat[0]}: category_id={results[bad_cat[0]]['category_id']}; unknown ids {ids[:5]}); map labels "
            "to the dataset's category ids, or pass --drop-unknown-categories (API: unknown_categories='drop') to "
            "drop and count them"
        )
    dropped = set(bad_cat)
    kept_idx = [i for i in range(len(results)) if i not in dropped] if dropped else list(range(len(results)))
    raw = np.array([results[i]["bbox"] for i in kept_idx], dtype=np.float64).reshape(-1, 4)

    def _size(img: Mapping[str, Any]) -> tuple[float, float]:
        w, h = img.get("width"), img.get("height")
        if isinstance(w, (int, float)) and isinstance(h, (int, float)):
            return float(w), float(h)
        return math.nan, math.nan

    size_of = {k: _size(img) for k, img in images.items()}
    image_wh = np.array([size_of[results[i]["image_id"]] for i in kept_idx], dtype=np.float64).reshape(-1, 2)
    ref = np.array([a["bbox"] for a in gt.get("annotations", []) if "bbox" in a], dtype=np.float64).reshape(-1, 4)

    def _describe(j: int) -> str:
        r = results[kept_idx[j]]
        w, h = image_wh[j]
        size = f" in a {w:g}x{h:g} image" if math.isfinite(w) else ""
        return f"record {kept_idx[j]} (image_id={r['image_id']}): bbox {list(r['bbox'])}{size}"

    check_box_format(
        raw,
        box_format,
        where=source,
        describe=_describe,
        image_wh=image_wh,
        reference_xywh=ref if box_format == "xywh" else None,
    )
    if box_format == "xywh":  # the records themselves (the evaluators copy them before pycocotools edits them)
        return (list(results) if not dropped else [results[i] for i in kept_idx]), len(dropped)
    boxes = convert_boxes(raw, box_format, "xywh").tolist()
    return [{**results[i], "bbox": b} for i, b in zip(kept_idx, boxes)], len(dropped)


def _checked_results(
    results: Sequence[Mapping[str, Any]],
    gt: Mapping[str, Any],
    gt_name: str,
    box_format: BoxFormat,
    unknown_categories: UnknownCategories,
    source: str,
) -> tuple[list[Mapping[str, Any]], dict[str, float]]:
    """:func:`validate_results`, with the count of dropped records as the evaluations report it:
    ``{"num_dropped_unknown_category": n}`` under ``unknown_categories="drop"``, else ``{}``."""
    kept, n_dropped = validate_results(
        results, gt, box_format=box_format, unknown_categories=unknown_categories, source=source, gt_name=gt_name
    )
    return kept, ({"num_dropped_unknown_category": float(n_dropped)} if unknown_categories == "drop" else {})


def _api_percent(value: float) -> float:
    """A pycocotools / LVIS API statistic in percent; ``nan`` for the APIs' -1 (nothing to evaluate, e.g. no
    ground truth in that area range)."""
    return 100.0 * float(value) if value >= 0 else float("nan")


def _load_gt(gt: str | Path | Mapping[str, Any]) -> tuple[Any, str]:
    coco_cls, _ = _require_pycocotools()
    name = str(gt) if isinstance(gt, (str, Path)) else "<ground truth>"
    data = load_json(gt) if isinstance(gt, (str, Path)) else dict(gt)
    if not isinstance(data, Mapping) or "annotations" not in data or "images" not in data:
        raise PredictionFormatError(f"{name}: expected a COCO JSON object with 'images' and 'annotations'")
    data = dict(data)
    data.setdefault("categories", [])
    coco = coco_cls()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco, name


def coco_bbox_eval(
    gt: str | Path | Mapping[str, Any] | Any,
    results: Sequence[Mapping[str, Any]],
    *,
    image_ids: Sequence[int] | None = None,
    box_format: BoxFormat = "xywh",
    unknown_categories: UnknownCategories = "error",
    source: str = "results",
) -> dict[str, float]:
    """COCO bbox AP/AR with pycocotools' default parameters (IoU .50:.05:.95, 101 recall points, 100 dets).

    Args:
        gt: a COCO ground-truth file, its decoded dict, or a ``pycocotools.coco.COCO`` object.
        results: COCO result records. Image ids absent from the ground truth are an error.
        image_ids: restrict the evaluation to these images (default: all GT images).
        box_format: the ``bbox`` format of ``results`` (``"xyxy"`` is converted); boxes that look like the
            other format are refused (see :func:`validate_results`).
        unknown_categories: ``"error"`` or ``"drop"`` (then ``num_dropped_unknown_category`` is reported).
        source: the name of the results in error messages (e.g. the file).

    Returns:
        :data:`COCO_STAT_NAMES` in percent; an entry is ``nan`` where pycocotools reports -1 (no GT in that
        area range). With no detections at all, every AP/AR is 0.

    Raises:
        PredictionFormatError: see :func:`validate_results`.
    """
    coco_cls, cocoeval_cls = _require_pycocotools()
    coco_gt: Any  # a pycocotools COCO object (an optional dependency, imported at run time)
    coco_gt, name = (gt, "<COCO>") if isinstance(gt, coco_cls) else _load_gt(gt)
    results, extra = _checked_results(results, coco_gt.dataset, name, box_format, unknown_categories, source)
    if not results:
        return {**dict.fromkeys(COCO_STAT_NAMES, 0.0), **extra}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes([dict(r) for r in results])
        ev = cocoeval_cls(coco_gt, coco_dt, iouType="bbox")
        if image_ids is not None:
            ev.params.imgIds = list(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = {k: _api_percent(v) for k, v in zip(COCO_STAT_NAMES, ev.stats)}
    return {**stats, **extra}


class COCODetectionEvaluator(AccumulatingEvaluator[Detections]):
    """Accumulates :class:`~fiber_eval.types.Detections` and computes COCO box AP.

    Args:
        gt: COCO ground truth (file, dict or ``COCO`` object), e.g. ``instances_val2017.json``.
        box_convention: see :func:`detections_to_coco_results` (default ``"plus_one"``, the reference).
        label_to_category_id: contiguous label → category id (``None``: labels are category ids).
        max_per_image: per-image cap before evaluation (100 in the reference).
    """

    def __init__(
        self,
        gt: str | Path | Mapping[str, Any] | Any,
        *,
        box_convention: BoxConvention = "plus_one",
        label_to_category_id: Mapping[int, int] | None = None,
        max_per_image: int | None = 100,
    ) -> None:
        coco_cls, _ = _require_pycocotools()
        self.coco_gt = gt if isinstance(gt, coco_cls) else _load_gt(gt)[0]
        self.box_convention: BoxConvention = box_convention
        self.label_to_category_id = label_to_category_id
        self.max_per_image = max_per_image
        self._items: list[Detections] = []

    def check(self, prediction: Detections, index: int) -> None:
        """Accepts any ``Detections``. Give **one** per image (concatenate prompt chunks first): an image id seen
        again, as sampler padding produces, keeps its first entry."""

    def results(self, gather: GatherObjects | None = None) -> list[dict[str, Any]]:
        """Gathers all ranks' detections and returns the COCO result records."""
        by_image, _ = merge_unique(gather_items(self.state(), gather), key=lambda d: d.image_id, what="image_id")
        return detections_to_coco_results(
            list(by_image.values()),
            box_convention=self.box_convention,
            label_to_category_id=self.label_to_category_id,
            max_per_image=self.max_per_image,
        )

    def compute(self, gather: GatherObjects | None = None) -> dict[str, float]:
        """COCO AP family in percent (see :func:`coco_bbox_eval`)."""
        return coco_bbox_eval(self.coco_gt, self.results(gather), source="COCODetectionEvaluator detections")


def odinw_mean(per_dataset_ap: Mapping[str, float]) -> dict[str, float]:
    """ODinW score: the unweighted arithmetic mean of per-dataset AP (docs/reference/evaluation.md §10).

    Args:
        per_dataset_ap: dataset name → AP@[.50:.95] in percent (13 datasets for ODinW-13).

    Returns:
        ``{"<dataset>/AP": ap, ..., "mean_AP": mean, "num_datasets": n}``.

    Raises:
        ValueError: if empty or an AP is not finite.
    """
    if not per_dataset_ap:
        raise ValueError("odinw_mean: no datasets")
    bad = [k for k, v in per_dataset_ap.items() if not math.isfinite(v)]
    if bad:
        raise ValueError(f"odinw_mean: AP of {bad} is not finite")
    out = {f"{k}/AP": float(v) for k, v in per_dataset_ap.items()}
    out["mean_AP"] = float(sum(per_dataset_ap.values()) / len(per_dataset_ap))
    out["num_datasets"] = float(len(per_dataset_ap))
    return out


class ODinWEvaluator:
    """One :class:`COCODetectionEvaluator` per ODinW dataset, averaged with :func:`odinw_mean`.

    Args:
        evaluators: dataset name → its evaluator (built on that dataset's background-free GT).

    ``update`` takes ``(dataset_name, detections)`` pairs; ``compute`` also reports every dataset's AP.
    """

    def __init__(self, evaluators: Mapping[str, COCODetectionEvaluator]) -> None:
        self.evaluators = dict(evaluators)

    def reset(self) -> None:
        """Resets every dataset's evaluator."""
        for ev in self.evaluators.values():
            ev.reset()

    def update(self, predictions: Sequence[tuple[str, Detections]]) -> None:
        """Routes ``(dataset_name, detections)`` pairs to their dataset's evaluator.

        Raises:
            KeyError: for an unknown dataset name.
        """
        for name, det in predictions:
            if name not in self.evaluators:
                raise KeyError(f"ODinW detections for unknown dataset {name!r}; known: {sorted(self.evaluators)}")
            self.evaluators[name].update([det])

    def state(self) -> list[tuple[str, Detections]]:
        """The picklable state that ``compute`` gathers across ranks."""
        return [(name, d) for name, ev in self.evaluators.items() for d in ev.state()]

    def compute(self, gather: GatherObjects | None = None) -> dict[str, float]:
        """Per-dataset AP and their mean, in percent."""
        items = gather_items(self.state(), gather)
        per: dict[str, float] = {}
        for name, ev in self.evaluators.items():
            dets = [d for n, d in items if n == name]
            per[name] = coco_bbox_eval(
                ev.coco_gt,
                detections_to_coco_results(
                    list(merge_unique(dets, key=lambda d: d.image_id, what="image_id")[0].values()),
                    box_convention=ev.box_convention,
                    label_to_category_id=ev.label_to_category_id,
                    max_per_image=ev.max_per_image,
                ),
                source=f"ODinWEvaluator detections of {name!r}",
            )["AP"]
        return odinw_mean(per)
