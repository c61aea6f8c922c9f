"""LVIS standard result (300 detections per image) and Fixed AP, both with AR (issue 21, item 9): numbers
derived by hand on a small fixture, and equality with the LVIS API called the documented way (files in,
``LVISEval.run``) on a random fixture."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fiber_eval.cli import main
from fiber_eval.detection import load_coco_results
from fiber_eval.lvis_eval import lvis_eval, lvis_fixed_ap

pytest.importorskip("lvis", reason="the LVIS evaluator needs the lvis extra (pip install 'fiber-eval[lvis]')")


def _hand_gt() -> dict[str, Any]:
    return {
        "images": [
            {"id": 1, "width": 300, "height": 300, "neg_category_ids": [], "not_exhaustive_category_ids": []},
            {"id": 2, "width": 300, "height": 300, "neg_category_ids": [], "not_exhaustive_category_ids": []},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 100, 100], "area": 10000},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [150, 150, 100, 100], "area": 10000},
            {"id": 3, "image_id": 2, "category_id": 2, "bbox": [100, 100, 120, 120], "area": 14400},
        ],
        "categories": [{"id": 1, "name": "a", "frequency": "f"}, {"id": 2, "name": "b", "frequency": "c"}],
    }


def _hand_results() -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    # image 1: one of the two category-1 boxes found exactly -> recall 1/2, precision 1 up to it
    res = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 100, 100], "score": 0.9}]
    # image 2: 300 category-1 detections (not a GT category of image 2, nor a negative: ignored by the federated
    # rules, but they fill the 300-per-image cap) above the exact category-2 detection
    for _ in range(300):
        x, y = rng.uniform(0, 200, size=2)
        res.append({"image_id": 2, "category_id": 1, "bbox": [float(x), float(y), 50.0, 50.0], "score": 0.5})
    res.append({"image_id": 2, "category_id": 2, "bbox": [100, 100, 120, 120], "score": 0.1})
    return res


def test_standard_and_fixed_by_hand() -> None:
    # category 1: precision 1 at the 51 recall thresholds 0, .01, ..., .50 and 0 above (101-point interpolation)
    ap_a = 100.0 * 51 / 101
    std = lvis_eval(_hand_gt(), _hand_results())
    # standard: the category-2 detection is the 301st of image 2 -> cut; category 2 has AP 0 and recall 0
    assert std["AP"] == pytest.approx(ap_a / 2) and std["APl"] == pytest.approx(ap_a / 2)
    assert std["APf"] == pytest.approx(ap_a) and std["APc"] == 0.0 and math.isnan(std["APr"])
    assert std["AR@300"] == pytest.approx(25.0) and std["ARl@300"] == pytest.approx(25.0)
    assert math.isnan(std["ARs@300"]) and math.isnan(std["ARm@300"])
    # Fixed AP: no per-image cap -> category 2 is found (AP 100, recall 1)
    fixed = lvis_fixed_ap(_hand_gt(), _hand_results())
    assert fixed == pytest.approx(lvis_eval(_hand_gt(), _hand_results(), protocol="fixed"), nan_ok=True)
    assert fixed["AP"] == pytest.approx((ap_a + 100.0) / 2) and fixed["APc"] == pytest.approx(100.0)
    assert fixed["AR"] == pytest.approx(75.0) and fixed["ARl"] == pytest.approx(75.0)
    # a larger per-image cap keeps it in the standard protocol too
    assert lvis_eval(_hand_gt(), _hand_results(), max_dets=301)["AR@301"] == pytest.approx(75.0)


def test_cli_default_is_standard(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gt, pred = tmp_path / "gt.json", tmp_path / "p.json"
    gt.write_text(json.dumps(_hand_gt()))
    pred.write_text(json.dumps(_hand_results()))
    assert main(["lvis", "--pred", str(pred), "--gt", str(gt)]) == 0
    std = json.loads(capsys.readouterr().out)["metrics"]
    assert set(std) == {"AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf"} | {
        "AR@300",
        "ARs@300",
        "ARm@300",
        "ARl@300",
    }
    assert std["AR@300"] == 25.0
    assert main(["lvis", "--pred", str(pred), "--gt", str(gt), "--fixed-ap"]) == 0
    fixed = json.loads(capsys.readouterr().out)["metrics"]
    assert fixed["AR"] == 75.0 and fixed["AP"] == pytest.approx(round((100.0 * 51 / 101 + 100.0) / 2, 2))


def _random_fixture(seed: int = 3) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """12 images, 6 categories (rare / common / frequent), noisy true positives, misses, false positives,
    negative-category and not-exhaustive detections, one image over the 300 cap; distinct scores."""
    rng = np.random.default_rng(seed)
    freq = ["r", "r", "c", "c", "f", "f"]
    cats = [{"id": c + 1, "name": f"k{c}", "frequency": f} for c, f in enumerate(freq)]
    images, anns = [], []
    for i in range(1, 13):
        w, h = int(rng.integers(300, 600)), int(rng.integers(300, 600))
        present = sorted(set(rng.integers(1, 7, size=2).tolist()))
        others = [c for c in range(1, 7) if c not in present]
        images.append(
            {
                "id": i,
                "width": w,
                "height": h,
                "neg_category_ids": others[:1],
                "not_exhaustive_category_ids": present[:1] if i % 4 == 0 else [],
            }
        )
        for c in present:
            for _ in range(int(rng.integers(1, 4))):
                bw, bh = rng.uniform(8, 200, size=2)
                x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
                box = [float(x), float(y), float(bw), float(bh)]
                anns.append(
                    {"id": len(anns) + 1, "image_id": i, "category_id": c, "bbox": box, "area": box[2] * box[3]}
                )
    res = []
    for a in anns:
        if rng.random() < 0.8:
            x, y, bw, bh = (np.array(a["bbox"]) + rng.normal(0, 4, size=4)).tolist()
            img = images[a["image_id"] - 1]
            x, y = max(0.0, x), max(0.0, y)
            bw, bh = min(max(bw, 2.0), img["width"] - x), min(max(bh, 2.0), img["height"] - y)
            res.append({"image_id": a["image_id"], "category_id": a["category_id"], "bbox": [x, y, bw, bh]})
    for img in images:
        n_fp = 320 if img["id"] == 5 else int(rng.integers(5, 40))
        for _ in range(n_fp):
            bw, bh = rng.uniform(8, 100, size=2)
            x, y = rng.uniform(0, img["width"] - bw), rng.uniform(0, img["height"] - bh)
            res.append({"image_id": img["id"], "category_id": int(rng.integers(1, 7)), "bbox": [x, y, bw, bh]})
    scores = rng.permutation(len(res)) / len(res) + 1e-3
    for r, s in zip(res, scores):
        r["score"] = float(s)
    return {"images": images, "annotations": anns, "categories": cats}, res


def _official(gt_path: Path, results: Any, max_dets: int) -> dict[str, float]:
    """The LVIS API as its README uses it, with ``np.float`` restored for it (removed in NumPy 2)."""
    from lvis import LVIS, LVISEval, LVISResults

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(np, "float", float, raising=False)
        lvis_gt = LVIS(str(gt_path))
        ev = LVISEval(lvis_gt, LVISResults(lvis_gt, results, max_dets=max_dets), "bbox")
        ev.params.max_dets = max_dets
        ev.run()
        return {k: 100.0 * v if v >= 0 else math.nan for k, v in ev.get_results().items()}


def test_equal_to_lvis_api(tmp_path: Path) -> None:
    gt, res = _random_fixture()
    gt_path, res_path = tmp_path / "gt.json", tmp_path / "res.json"
    gt_path.write_text(json.dumps(gt))
    res_path.write_text(json.dumps(res))
    ours = lvis_eval(gt_path, load_coco_results(res_path))
    official = _official(gt_path, str(res_path), 300)
    assert set(official) == set(ours) and 0 < ours["AP"] < 100 and 0 < ours["AR@300"] < 100
    assert ours == pytest.approx(official, nan_ok=True)
    # Fixed AP: our per-category top-k, against the API fed with a top-k selected here by sorting
    k = 6
    by_cat: dict[int, list[dict[str, Any]]] = {}
    for r in res:
        by_cat.setdefault(r["category_id"], []).append(r)
    kept = [r for rs in by_cat.values() for r in sorted(rs, key=lambda r: -r["score"])[:k]]
    official = _official(gt_path, kept, -1)
    ours = lvis_fixed_ap(gt_path, load_coco_results(res_path), topk_per_category=k)
    renamed = {key.replace("@-1", ""): v for key, v in official.items()}
    assert set(renamed) == set(ours)
    assert ours == pytest.approx(renamed, nan_ok=True)
    assert ours["AR"] != lvis_fixed_ap(gt_path, res)["AR"]  # the cap mattered
