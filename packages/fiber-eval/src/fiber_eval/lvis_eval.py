"""LVIS box AP and AR with the LVIS API's federated rules: the standard result and "Fixed AP" (docs/reference/evaluation.md §9).

* Standard (``protocol="standard"``, the CLI default): the LVIS API's own evaluation, at most **300**
  detections per image (highest scores); reports AR@300 and ARs/m/l@300 besides the AP family.
* Fixed AP (Dave et al.; ``protocol="fixed"``, what FIBER reports): per-category cap instead of a per-image cap: for every category the top **10,000** detections by score
  over the whole evaluation set are kept (ties ordered deterministically by image id, then input order);
  the LVIS API is then run with no per-image limit.
* The LVIS API applies the federated rules: a detection of category c on image I counts only if c is a GT
  category of I or in ``neg_category_ids``; unmatched detections of ``not_exhaustive_category_ids`` are
  ignored; AP averages over categories with GT, APr/APc/APf over the frequency groups.
* Box export from "+1"-space ``xyxy`` predictions uses ``w = x2 − x1`` (no "+1", unlike the COCO exporter):
  ``box_convention="continuous"`` is the default here.

Needs the ``lvis`` extra (``pip install 'fiber-eval[lvis]'``). The LVIS API (0.5.3) still calls ``np.float``,
removed in NumPy 2; the shim below substitutes a NumPy proxy *inside the ``lvis.eval`` module only* for the
duration of one evaluation, leaving the global ``numpy`` module untouched.
"""

from __future__ import annotations

import contextlib
import io
import logging
import types
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fiber_eval._io import PredictionFormatError, load_json
from fiber_eval.boxes import BoxFormat
from fiber_eval.detection import (
    BoxConvention,
    UnknownCategories,
    _api_percent,
    _checked_results,
    detections_to_coco_results,
)
from fiber_eval.distributed import gather_items, merge_unique
from fiber_eval.types import AccumulatingEvaluator, Detections, GatherObjects

__all__ = ["LVIS_AR_NAMES", "LVIS_STAT_NAMES", "LVISEvaluator", "lvis_eval", "lvis_fixed_ap", "top_k_per_category"]

LVIS_STAT_NAMES: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")
LVIS_AR_NAMES: tuple[str, ...] = ("AR", "ARs", "ARm", "ARl")
LVISProtocol = Literal["standard", "fixed"]


class _NumpyWithFloat(types.ModuleType):
    """Proxy of the numpy module that also provides the aliases NumPy 2 removed (``np.float``)."""

    float = float
    int = int

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)


@contextlib.contextmanager
def _lvis_numpy_shim() -> Iterator[None]:
    import lvis.eval as lvis_eval_module

    original = lvis_eval_module.np
    if hasattr(original, "float"):
        yield
        return
    lvis_eval_module.np = _NumpyWithFloat("numpy")
    try:
        yield
    finally:
        lvis_eval_module.np = original


def _require_lvis() -> Any:
    try:
        import lvis
    except ImportError as e:
        raise ImportError("LVIS Fixed AP needs the LVIS API: pip install 'fiber-eval[lvis]'") from e
    return lvis


def top_k_per_category(results: Sequence[Mapping[str, Any]], k: int = 10_000) -> list[Mapping[str, Any]]:
    """Keeps the ``k`` highest-scoring results of every category over the whole set.

    Args:
        results: COCO-style result records.
        k: the per-category cap.

    Returns:
        The kept records, grouped by category, each group by descending score (ties: ascending image id,
        then input order).
    """
    by_cat: dict[Any, list[int]] = {}
    for i, r in enumerate(results):
        by_cat.setdefault(r["category_id"], []).append(i)

    def _order(i: int) -> tuple[float, tuple[int, Any], int]:
        img = results[i]["image_id"]
        return (-float(results[i]["score"]), (0, img) if isinstance(img, int) else (1, str(img)), i)

    kept: list[Mapping[str, Any]] = []
    for idx in by_cat.values():
        kept.extend(results[i] for i in sorted(idx, key=_order)[:k])
    return kept


def _build_lvis(gt: str | Path | Mapping[str, Any] | Any) -> Any:
    lvis = _require_lvis()
    if isinstance(gt, lvis.LVIS):
        return gt
    name = str(gt) if isinstance(gt, (str, Path)) else "<ground truth>"
    data = load_json(gt) if isinstance(gt, (str, Path)) else dict(gt)
    for key in ("images", "annotations", "categories"):
        if not isinstance(data, Mapping) or key not in data:
            raise PredictionFormatError(f"{name}: LVIS ground truth needs an '{key}' list")
    for i, img in enumerate(data["images"]):
        for key in ("id", "neg_category_ids", "not_exhaustive_category_ids"):
            if key not in img:
                raise PredictionFormatError(f"{name}: images[{i}] lacks '{key}' (required by the federated rules)")
    obj = lvis.LVIS.__new__(lvis.LVIS)
    obj.logger = logging.getLogger("lvis.lvis")
    obj.dataset = dict(data)
    obj._create_index()
    return obj


def lvis_eval(
    gt: str | Path | Mapping[str, Any] | Any,
    results: Sequence[Mapping[str, Any]],
    *,
    protocol: LVISProtocol = "standard",
    max_dets: int = 300,
    topk_per_category: int = 10_000,
    box_format: BoxFormat = "xywh",
    unknown_categories: UnknownCategories = "error",
    source: str = "results",
) -> dict[str, float]:
    """LVIS box AP and AR of COCO-format results with the LVIS API's federated rules.

    Args:
        gt: LVIS ground truth (file, dict or ``lvis.LVIS``), e.g. the 5k MiniVal file.
        results: result records; image ids must belong to the GT.
        protocol: ``"standard"``: the LVIS API's own result, at most ``max_dets`` (300) detections per image
            (highest scores); ``"fixed"``: Fixed AP (Dave et al.), the top ``topk_per_category`` detections of
            each category over the whole set and no per-image cap (the FIBER paper's LVIS number).
        max_dets: per-image cap of the standard protocol.
        topk_per_category: per-category cap of the Fixed-AP protocol.
        box_format / unknown_categories / source: see :func:`fiber_eval.detection.validate_results`.

    Returns:
        :data:`LVIS_STAT_NAMES` and the recalls in percent: ``AR@300``, ``ARs@300``, ``ARm@300``, ``ARl@300``
        for the standard protocol (``@max_dets``), ``AR``, ``ARs``, ``ARm``, ``ARl`` for Fixed AP (no per-image
        cap). ``nan`` where the LVIS API reports -1 (e.g. no rare category); all zeros when there is no
        detection. With ``unknown_categories="drop"`` also ``num_dropped_unknown_category``.

    Raises:
        PredictionFormatError: for results on images that are not in the ground truth, unknown category ids,
            or implausible boxes (see :func:`fiber_eval.detection.validate_results`).
    """
    lvis = _require_lvis()
    from lvis import LVISEval, LVISResults

    if protocol not in ("standard", "fixed"):
        raise ValueError(f"LVIS protocol must be 'standard' or 'fixed', got {protocol!r}")
    if max_dets < 1 or topk_per_category < 1:
        raise ValueError(f"max_dets and topk_per_category must be >= 1, got {max_dets} and {topk_per_category}")
    lvis_gt = _build_lvis(gt)
    gt_name = "the LVIS ground truth"
    results, extra = _checked_results(results, lvis_gt.dataset, gt_name, box_format, unknown_categories, source)
    suffix = f"@{max_dets}" if protocol == "standard" else ""
    names = (*LVIS_STAT_NAMES, *(f"{k}{suffix}" for k in LVIS_AR_NAMES))
    if not results:
        return {**dict.fromkeys(names, 0.0), **extra}
    if protocol == "fixed":
        kept = [dict(r) for r in top_k_per_category(results, topk_per_category)]
        cap = -1
    else:
        kept, cap = [dict(r) for r in results], max_dets
    logging.getLogger(lvis.__name__).setLevel(logging.WARNING)
    with _lvis_numpy_shim(), contextlib.redirect_stdout(io.StringIO()):
        lvis_dt = LVISResults(lvis_gt, kept, max_dets=cap)
        ev = LVISEval(lvis_gt, lvis_dt, iou_type="bbox")
        ev.params.max_dets = cap
        ev.run()
    res = ev.get_results()
    api_keys = (*LVIS_STAT_NAMES, *(f"{k}@{cap}" for k in LVIS_AR_NAMES))
    out = {k: _api_percent(res[a]) for k, a in zip(names, api_keys)}
    return {**out, **extra}


def lvis_fixed_ap(
    gt: str | Path | Mapping[str, Any] | Any,
    results: Sequence[Mapping[str, Any]],
    *,
    topk_per_category: int = 10_000,
    box_format: BoxFormat = "xywh",
    unknown_categories: UnknownCategories = "error",
    source: str = "results",
) -> dict[str, float]:
    """LVIS Fixed AP: :func:`lvis_eval` with ``protocol="fixed"`` (AP family plus ``AR``, ``ARs/m/l``)."""
    return lvis_eval(
        gt,
        results,
        protocol="fixed",
        topk_per_category=topk_per_category,
        box_format=box_format,
        unknown_categories=unknown_categories,
        source=source,
    )


class LVISEvaluator(AccumulatingEvaluator[Detections]):
    """Accumulates :class:`~fiber_eval.types.Detections` and computes LVIS AP / AR.

    Args:
        gt: LVIS ground truth (file, dict or ``lvis.LVIS``).
        box_convention: ``"continuous"`` (default: the reference LVIS exporter, ``w = x2 − x1``) or
            ``"plus_one"``.
        protocol: ``"fixed"`` (default here: Fixed AP, the number FIBER reports for LVIS MiniVal) or
            ``"standard"`` (the LVIS API's 300 detections per image); see :func:`lvis_eval`.
        topk_per_category: per-category cap of Fixed AP (10,000).
        max_dets: per-image cap of the standard protocol (300).

    Give one ``Detections`` per image with all prompt chunks concatenated (labels are LVIS category ids); a
    repeated image id keeps its first entry.
    """

    def __init__(
        self,
        gt: str | Path | Mapping[str, Any] | Any,
        *,
        box_convention: BoxConvention = "continuous",
        protocol: LVISProtocol = "fixed",
        topk_per_category: int = 10_000,
        max_dets: int = 300,
    ) -> None:
        if protocol not in ("standard", "fixed"):
            raise ValueError(f"LVIS protocol must be 'standard' or 'fixed', got {protocol!r}")
        self.lvis_gt = _build_lvis(gt)
        self.box_convention: BoxConvention = box_convention
        self.protocol: LVISProtocol = protocol
        self.topk_per_category = topk_per_category
        self.max_dets = max_dets
        self._items: list[Detections] = []

    def compute(self, gather: GatherObjects | None = None) -> dict[str, float]:
        """AP, AP50, AP75, APs/m/l, APr/c/f and AR (``AR@300`` ... or, for Fixed AP, ``AR`` ...) in percent."""
        by_image, _ = merge_unique(gather_items(self.state(), gather), key=lambda d: d.image_id, what="image_id")
        results = detections_to_coco_results(
            list(by_image.values()), box_convention=self.box_convention, max_per_image=None
        )
        return lvis_eval(
            self.lvis_gt,
            results,
            protocol=self.protocol,
            max_dets=self.max_dets,
            topk_per_category=self.topk_per_category,
            source="LVISEvaluator detections",
        )
