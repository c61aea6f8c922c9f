"""LVIS Fixed AP: federated rules (negative / not-exhaustive / unlisted categories), the per-category cap,
APr/APc/APf, the no-+1 export, and that the NumPy-2 shim does not leak into numpy."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("lvis")

from fiber_eval.distributed import all_gather_concat
from fiber_eval.lvis_eval import LVISEvaluator, lvis_fixed_ap, top_k_per_category
from fiber_eval.types import Detections


def _gt() -> dict:
    return {
        "images": [
            {"id": 1, "height": 300, "width": 300, "neg_category_ids": [2], "not_exhaustive_category_ids": [3]},
            {"id": 2, "height": 300, "width": 300, "neg_category_ids": [], "not_exhaustive_category_ids": []},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 100, 100], "area": 10000},
            {"id": 2, "image_id": 2, "category_id": 2, "bbox": [0, 0, 50, 50], "area": 2500},
            {"id": 3, "image_id": 1, "category_id": 3, "bbox": [100, 100, 50, 50], "area": 2500},
        ],
        "categories": [
            {"id": 1, "name": "a", "frequency": "f"},
            {"id": 2, "name": "b", "frequency": "c"},
            {"id": 3, "name": "c", "frequency": "r"},
        ],
    }


PERFECT = [
    {"image_id": 1, "category_id": 1, "bbox": [0, 0, 100, 100], "score": 0.9},
    {"image_id": 2, "category_id": 2, "bbox": [0, 0, 50, 50], "score": 0.8},
    {"image_id": 1, "category_id": 3, "bbox": [100, 100, 50, 50], "score": 0.7},
]
NEG_FP = {"image_id": 1, "category_id": 2, "bbox": [150, 150, 20, 20], "score": 0.99}


def test_perfect_and_frequency_groups() -> None:
    m = lvis_fixed_ap(_gt(), PERFECT)
    for key in ("AP", "AP50", "APr", "APc", "APf"):
        assert m[key] == pytest.approx(100.0), key
    assert not hasattr(np, "float")  # the shim stayed inside lvis.eval


def test_federated_rules() -> None:
    # category 2 is a negative of image 1: a higher-scored detection there is a false positive for category 2
    # -> its precision is 1/2 at full recall -> AP_b = 50, AP = (100 + 50 + 100) / 3
    m = lvis_fixed_ap(_gt(), [*PERFECT, NEG_FP])
    assert m["APc"] == pytest.approx(50.0)
    assert m["AP"] == pytest.approx(250 / 3)
    ignored = [
        {"image_id": 2, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.99},  # category 1 not checked on image 2
        {"image_id": 1, "category_id": 3, "bbox": [0, 150, 20, 20], "score": 0.99},  # not exhaustive on image 1
    ]
    assert lvis_fixed_ap(_gt(), [*PERFECT, *ignored])["AP"] == pytest.approx(100.0)


def test_per_category_cap() -> None:
    # cap 1: category 2 keeps only the 0.99 false positive, its true positive is cut -> AP_b = 0
    m = lvis_fixed_ap(_gt(), [*PERFECT, NEG_FP], topk_per_category=1)
    assert m["APc"] == pytest.approx(0.0)
    assert m["AP"] == pytest.approx(200 / 3)
    recs = [{"image_id": i, "category_id": 1, "score": s} for i, s in [(5, 0.5), (3, 0.5), (4, 0.9)]]
    assert [r["image_id"] for r in top_k_per_category(recs, k=2)] == [4, 3]  # ties: ascending image id


def test_evaluator_continuous_export_and_gather() -> None:
    dets = [
        Detections(1, np.array([[0.0, 0, 100, 100], [100, 100, 150, 150]]), np.array([0.9, 0.7]), np.array([1, 3])),
        Detections(2, np.array([[0.0, 0, 50, 50]]), np.array([0.8]), np.array([2])),
    ]
    r0, r1 = LVISEvaluator(_gt()), LVISEvaluator(_gt())
    r0.update(dets[:1])
    r1.update([dets[1], dets[0]])
    m = r0.compute(all_gather_concat([r0.state(), r1.state()]))
    assert m["AP"] == pytest.approx(100.0)  # w = x2 - x1 reproduces the GT exactly
    plus = LVISEvaluator(_gt(), box_convention="plus_one")
    plus.update(dets)
    assert plus.compute()["AP"] < 100.0
    with pytest.raises(ValueError, match="not in the LVIS ground truth"):
        lvis_fixed_ap(_gt(), [{"image_id": 9, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1.0}])
