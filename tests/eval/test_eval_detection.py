"""COCO AP on tiny hand-made GT: perfect, shifted and partial-IoU boxes, the +1 export, ODinW mean, gather."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pycocotools")

from fiber_eval._io import PredictionFormatError
from fiber_eval.detection import (
    COCODetectionEvaluator,
    ODinWEvaluator,
    coco_bbox_eval,
    detections_to_coco_results,
    load_coco_results,
    odinw_mean,
)
from fiber_eval.distributed import all_gather_concat
from fiber_eval.types import Detections


def _gt() -> dict:
    return {
        "images": [{"id": 1, "height": 200, "width": 200}, {"id": 2, "height": 200, "width": 200}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 3, "bbox": [0, 0, 100, 100], "area": 10000, "iscrowd": 0},
            {"id": 2, "image_id": 2, "category_id": 5, "bbox": [10, 10, 120, 100], "area": 12000, "iscrowd": 0},
        ],
        "categories": [{"id": 3, "name": "cat"}, {"id": 5, "name": "dog"}, {"id": 7, "name": "unused"}],
    }


def _res(image_id: int, cat: int, bbox: list[float], score: float = 0.9) -> dict:
    return {"image_id": image_id, "category_id": cat, "bbox": bbox, "score": score}


def test_perfect_predictions_score_100() -> None:
    m = coco_bbox_eval(_gt(), [_res(1, 3, [0, 0, 100, 100]), _res(2, 5, [10, 10, 120, 100])])
    assert m["AP"] == pytest.approx(100.0)
    assert m["AP50"] == pytest.approx(100.0)
    assert m["APl"] == pytest.approx(100.0)
    assert math.isnan(m["APs"])  # no small GT: pycocotools reports -1


def test_shifted_and_partial_boxes() -> None:
    # IoU 1/3 for both images -> nothing matches at 0.5
    m = coco_bbox_eval(_gt(), [_res(1, 3, [50, 0, 100, 100]), _res(2, 5, [70, 10, 120, 100])])
    assert m["AP50"] == 0.0 and m["AP"] == 0.0
    # IoU 0.62 on each image: matched at thresholds .50, .55, .60 only -> AP = 3/10
    m = coco_bbox_eval(_gt(), [_res(1, 3, [0, 0, 100, 62]), _res(2, 5, [10, 10, 120, 62])])
    assert m["AP50"] == pytest.approx(100.0)
    assert m["AP75"] == 0.0
    assert m["AP"] == pytest.approx(30.0)


def test_category_without_gt_is_excluded_and_empty_results() -> None:
    res = [_res(1, 3, [0, 0, 100, 100]), _res(2, 5, [10, 10, 120, 100]), _res(1, 7, [0, 0, 5, 5])]
    assert coco_bbox_eval(_gt(), res)["AP"] == pytest.approx(100.0)
    assert coco_bbox_eval(_gt(), [])["AP"] == 0.0
    with pytest.raises(ValueError, match="not in"):
        coco_bbox_eval(_gt(), [_res(9, 3, [0, 0, 1, 1])])


def test_plus_one_export_round_trips_gt() -> None:
    # GT xywh [0,0,100,100] loaded with the +1 rule is xyxy [0,0,99,99]
    det = Detections(1, np.array([[0.0, 0.0, 99.0, 99.0]]), np.array([0.9]), np.array([3]))
    (rec,) = detections_to_coco_results([det])
    assert rec["bbox"] == [0.0, 0.0, 100.0, 100.0]
    (rec,) = detections_to_coco_results([det], box_convention="continuous")
    assert rec["bbox"] == [0.0, 0.0, 99.0, 99.0]
    ev = COCODetectionEvaluator(_gt(), box_convention="continuous")
    ev.update([det])
    # image 1: IoU 99²/100² = 0.9801 >= 0.95, matched at every threshold (category 3 AP 100); image 2 has no
    # detection (category 5 AP 0) -> mean 50
    assert ev.compute()["AP"] == pytest.approx(50.0)


def test_continuous_export_loses_high_iou_thresholds() -> None:
    # xyxy [10,10,29,29] in +1 space == GT xywh [10,10,20,20]; continuous export gives w=h=19, IoU 0.9025
    gt = {
        "images": [{"id": 1, "height": 50, "width": 50}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0}
        ],
        "categories": [{"id": 1, "name": "x"}],
    }
    det = Detections(1, np.array([[10.0, 10.0, 29.0, 29.0]]), np.array([0.5]), np.array([1]))
    plus = COCODetectionEvaluator(gt)
    cont = COCODetectionEvaluator(gt, box_convention="continuous")
    plus.update([det])
    cont.update([det])
    assert plus.compute()["AP"] == pytest.approx(100.0)
    assert cont.compute()["AP"] == pytest.approx(90.0)  # thresholds .50 ... .90 pass, .95 fails


def test_label_mapping_cap_and_errors() -> None:
    det = Detections(
        1, np.array([[0, 0, 9, 9], [0, 0, 5, 5], [1, 1, 3, 3]]), np.array([0.1, 0.9, 0.5]), np.array([0, 1, 1])
    )
    recs = detections_to_coco_results([det], label_to_category_id={0: 3, 1: 5}, max_per_image=2)
    assert [(r["category_id"], r["score"]) for r in recs] == [(5, 0.9), (5, 0.5)]
    with pytest.raises(ValueError, match="label 1 has no entry"):
        detections_to_coco_results([det], label_to_category_id={0: 3})
    bad = Detections(4, np.zeros((2, 4)), np.zeros(3), np.zeros(2))
    with pytest.raises(ValueError, match="image_id=4"):
        detections_to_coco_results([bad])


def test_evaluator_gather_equals_single_rank() -> None:
    d1 = Detections(1, np.array([[0.0, 0.0, 99.0, 99.0]]), np.array([0.9]), np.array([3]))
    d2 = Detections(2, np.array([[10.0, 10.0, 129.0, 109.0], [0, 0, 50, 50]]), np.array([0.8, 0.3]), np.array([5, 5]))
    single = COCODetectionEvaluator(_gt())
    single.update([d1, d2])
    expected = single.compute()
    r0, r1 = COCODetectionEvaluator(_gt()), COCODetectionEvaluator(_gt())
    r0.update([d1])
    r1.update([d2, d1])  # padded repeat
    assert r1.compute(all_gather_concat([r0.state(), r1.state()])) == pytest.approx(expected, nan_ok=True)
    assert expected["AP"] == pytest.approx(100.0)


def test_odinw_mean() -> None:
    m = odinw_mean({"Aquarium": 40.0, "pothole": 20.0, "Raccoon": 60.0})
    assert m["mean_AP"] == pytest.approx(40.0) and m["pothole/AP"] == 20.0 and m["num_datasets"] == 3.0
    perfect = COCODetectionEvaluator(_gt())
    empty = COCODetectionEvaluator(_gt())
    ev = ODinWEvaluator({"a": perfect, "b": empty})
    ev.update(
        [
            ("a", Detections(1, np.array([[0.0, 0.0, 99.0, 99.0]]), np.array([0.9]), np.array([3]))),
            ("a", Detections(2, np.array([[10.0, 10.0, 129.0, 109.0]]), np.array([0.9]), np.array([5]))),
        ]
    )
    assert ev.compute() == pytest.approx({"a/AP": 100.0, "b/AP": 0.0, "mean_AP": 50.0, "num_datasets": 2.0})
    with pytest.raises(KeyError, match="'c'"):
        ev.update([("c", Detections(1, np.zeros((0, 4)), np.zeros(0), np.zeros(0)))])


def test_results_file_errors(tmp_path: Path) -> None:
    (tmp_path / "r.json").write_text(json.dumps([_res(1, 3, [0, 0, 1, 1]), _res(2, 3, [0, 0, 1])]))
    with pytest.raises(PredictionFormatError, match=r"r.json: record 1 \(image_id=2\): bbox"):
        load_coco_results(tmp_path / "r.json")
