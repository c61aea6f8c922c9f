"""Evaluators refuse inputs that would score silently wrong (issue 21, item 8): boxes in the other convention,
category ids that are not in the ground truth, empty result files. Each refusal is exit code 2 with one line
naming the file and the option that fixes it; the option then gives the score of the correct input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from eval_helpers import write_entities

from fiber_eval._io import PredictionFormatError
from fiber_eval.boxes import BoxFormat, box_format_problem, check_box_format, convert_boxes
from fiber_eval.cli import main
from fiber_eval.refexp import RefExpEvaluator, RefExpTarget
from fiber_eval.types import RefExpPrediction


def _write(path: Path, obj: object) -> Path:
    path.write_text(json.dumps(obj))
    return path


def _detection_gt(n_images: int = 30, seed: int = 0, lvis: bool = False) -> dict[str, Any]:
    """Images of 200-400 px with one or two boxes each at uniform positions (xywh), categories 1-3."""
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for i in range(1, n_images + 1):
        width, height = int(rng.integers(200, 400)), int(rng.integers(200, 400))
        img: dict[str, Any] = {"id": i, "width": width, "height": height}
        if lvis:
            img.update(neg_category_ids=[], not_exhaustive_category_ids=[])
        images.append(img)
        for _ in range(int(rng.integers(1, 3))):
            w, h = float(rng.uniform(20, 80)), float(rng.uniform(20, 80))
            x, y = float(rng.uniform(0, width - w)), float(rng.uniform(0, height - h))
            ann = {"id": len(anns) + 1, "image_id": i, "category_id": int(rng.integers(1, 4))}
            anns.append({**ann, "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
    cats = [{"id": c, "name": f"c{c}", "frequency": "f"} for c in (1, 2, 3)]
    return {"images": images, "annotations": anns, "categories": cats}


def _perfect(gt: dict[str, Any], fmt: BoxFormat = "xywh") -> list[dict[str, Any]]:
    return [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": convert_boxes(np.array([a["bbox"]]), "xywh", fmt)[0].tolist(),
            "score": 0.9 - 0.001 * k,
        }
        for k, a in enumerate(gt["annotations"])
    ]


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any] | None, str]:
    code = main(argv)
    cap = capsys.readouterr()
    return code, (json.loads(cap.out) if code == 0 else None), cap.err


@pytest.mark.parametrize("task", ["coco", "lvis"])
def test_xyxy_boxes_refused_and_converted(task: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("pycocotools")
    if task == "lvis":
        pytest.importorskip("lvis")
    gt = _write(tmp_path / "gt.json", _detection_gt(lvis=task == "lvis"))
    data = json.loads(gt.read_text())
    good = _write(tmp_path / "xywh.json", _perfect(data))
    wrong = _write(tmp_path / "xyxy.json", _perfect(data, "xyxy"))
    code, ok, _ = _run([task, "--pred", str(good), "--gt", str(gt)], capsys)
    assert code == 0 and ok is not None and ok["metrics"]["AP"] == pytest.approx(100.0)
    # before: the xyxy file scored with exit code 0 (COCO AP 0.00 instead of 25.00 in the issue)
    code, _, err = _run([task, "--pred", str(wrong), "--gt", str(gt)], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"fiber-eval {task}: error: {wrong}: ")
    assert "lie beyond their image" in err and "xywh [x, y, width, height]" in err
    assert "--box-format xyxy" in err and "record " in err
    code, conv, _ = _run([task, "--pred", str(wrong), "--gt", str(gt), "--box-format", "xyxy"], capsys)
    assert code == 0 and conv is not None and conv["metrics"] == ok["metrics"]


def test_xyxy_distribution_without_boxes_beyond_the_image() -> None:
    pytest.importorskip("pycocotools")
    from fiber_eval.detection import coco_bbox_eval

    # GT boxes sit away from the origin and are smaller than their offset (w < x), as in most real images: read
    # as xywh, xyxy boxes still fit inside these 400 px images, but every one of them has "w" >= "x"
    rng = np.random.default_rng(1)
    images = [{"id": i, "width": 400, "height": 400} for i in range(1, 25)]
    anns = []
    for i in range(1, 25):
        x, y, w, h = rng.uniform(100, 150), rng.uniform(100, 150), rng.uniform(10, 30), rng.uniform(10, 30)
        anns.append({"id": i, "image_id": i, "category_id": 1, "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
    gt = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "x"}]}
    assert coco_bbox_eval(gt, _perfect(gt))["AP"] == pytest.approx(100.0)
    with pytest.raises(PredictionFormatError, match=r"all 24 boxes have width >= x.*they look like xyxy"):
        coco_bbox_eval(gt, _perfect(gt, "xyxy"), source="p.json")
    assert coco_bbox_eval(gt, _perfect(gt, "xyxy"), box_format="xyxy")["AP"] == pytest.approx(100.0)


def test_few_stray_boxes_warn_instead_of_refusing() -> None:
    rng = np.random.default_rng(2)
    xy = rng.uniform(0, 100, size=(200, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 50, size=(200, 2))], axis=1)  # xyxy inside 200x200
    sizes = np.full((200, 2), 200.0)
    assert box_format_problem(boxes, "xyxy", image_wh=sizes) is None
    boxes[7] = [10, 10, 5, 30]  # one inverted box of 200 (0.5 %): scored as given, with a warning
    with pytest.warns(UserWarning, match="1 of 200 boxes are inverted or beyond"):
        check_box_format(boxes, "xyxy", where="preds", image_wh=sizes)
    boxes[8] = [10, 10, 5, 30]
    boxes[9] = [300, 10, 350, 30]  # 3 of 200: refused, and they do not fit xywh either
    with pytest.raises(PredictionFormatError, match=r"preds: 3 of 200 boxes .*e\.g\. box 7; boxes must be xyxy"):
        check_box_format(boxes, "xyxy", where="preds", image_wh=sizes)


def _entities(tmp_path: Path) -> Path:
    xml = (
        "<annotation><size><width>500</width><height>333</height></size>"
        "<object><name>1</name><bndbox><xmin>60</xmin><ymin>80</ymin><xmax>180</xmax><ymax>320</ymax></bndbox></object>"
        "<object><name>2</name><bndbox><xmin>200</xmin><ymin>270</ymin><xmax>240</xmax><ymax>310</ymax></bndbox>"
        "</object><object><name>3</name><bndbox><xmin>330</xmin><ymin>40</ymin><xmax>350</xmax><ymax>240</ymax>"
        "</bndbox></object><object><name>4</name><nobndbox>1</nobndbox></object></annotation>"
    )
    sentences = "[/EN#1/people A boy] kicks [/EN#2/other a ball] at [/EN#3/other a post] .\n[/EN#4/scene A field] .\n"
    return write_entities(tmp_path / "entities", "42", xml, sentences)


def test_flickr30k_xywh_refused_and_converted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _entities(tmp_path)
    xyxy = [[60, 80, 180, 320]], [[200, 270, 240, 310]], [[330, 40, 350, 240]]
    xywh = [[convert_boxes(np.array(b), "xyxy", "xywh")[0].tolist()] for b in xyxy]
    good = _write(tmp_path / "good.json", [{"image_id": "42", "sentence_index": 0, "boxes": list(xyxy)}])
    wrong = _write(tmp_path / "wrong.json", [{"image_id": "42", "sentence_index": 0, "boxes": xywh}])
    code, ok, _ = _run(["flickr30k", "--pred", str(good), "--gt", str(root)], capsys)
    assert code == 0 and ok is not None and ok["metrics"]["R@1"] == 100.0
    code, _, err = _run(["flickr30k", "--pred", str(wrong), "--gt", str(root)], capsys)  # before: R@1 33.33
    assert code == 2 and err.count("\n") == 1
    assert f"{wrong}: Flickr30k phrase boxes: 2 of 3 boxes" in err and "xyxy [x1, y1, x2, y2]" in err
    assert "image 42 sentence 0 phrase 1 box 0" in err and "--box-format xywh" in err
    code, conv, _ = _run(["flickr30k", "--pred", str(wrong), "--gt", str(root), "--box-format", "xywh"], capsys)
    assert code == 0 and conv is not None and conv["metrics"] == ok["metrics"]
    # boxes in another scale (here twice the image) lie beyond the 500x333 image
    scaled = _write(
        tmp_path / "scaled.json",
        [{"image_id": "42", "sentence_index": 0, "boxes": [[[2 * v for v in b[0]]] for b in xyxy]}],
    )
    code, _, err = _run(["flickr30k", "--pred", str(scaled), "--gt", str(root)], capsys)
    assert code == 2 and "lie beyond their image" in err and "original-image pixels" in err


def test_refexp_xywh_refused_and_converted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = [{"id": i, "width": 640, "height": 480, "dataset_name": "refcoco"} for i in (1, 2)]
    gt_boxes = {1: [150, 60, 100, 80], 2: [300, 200, 50, 120]}
    anns = [{"id": i, "image_id": i, "bbox": b} for i, b in gt_boxes.items()]
    gt = _write(tmp_path / "ref.json", {"images": images, "annotations": anns})
    wrong = _write(
        tmp_path / "r.json",
        [{"image_id": i, "boxes": [b, [0, 0, 1, 1]], "scores": [0.9, 0.1]} for i, b in gt_boxes.items()],
    )
    code, _, err = _run(["refexp", "--pred", str(wrong), "--gt", str(gt)], capsys)  # before: P@1 0 with exit 0
    assert code == 2 and err.count("\n") == 1 and f"{wrong}: REC predictions: 2 of 4 boxes" in err
    assert "item_id 1 box 0" in err and "--box-format xywh" in err
    code, out, _ = _run(["refexp", "--pred", str(wrong), "--gt", str(gt), "--box-format", "xywh"], capsys)
    assert code == 0 and out is not None and out["metrics"]["giou/refcoco/P@1"] == 100.0
    # the API parameter does the same
    ev = RefExpEvaluator([RefExpTarget(1, (150.0, 60.0, 250.0, 140.0), "refcoco", (640.0, 480.0))], box_format="xywh")
    ev.update([RefExpPrediction(1, np.array([[150.0, 60, 100, 80]]), np.array([1.0]))])
    assert ev.compute()["giou/refcoco/P@1"] == 100.0


@pytest.mark.parametrize("task", ["coco", "lvis"])
def test_unknown_category_ids(task: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("pycocotools")
    if task == "lvis":
        pytest.importorskip("lvis")
    data = _detection_gt(lvis=task == "lvis")
    gt = _write(tmp_path / "gt.json", data)
    extra = [{"image_id": 1, "category_id": 99, "bbox": [0, 0, 10, 10], "score": 0.99}] * 2
    good = _write(tmp_path / "good.json", _perfect(data))
    mixed = _write(tmp_path / "mixed.json", _perfect(data) + extra)
    code, ok, _ = _run([task, "--pred", str(good), "--gt", str(gt)], capsys)
    assert code == 0 and ok is not None
    code, _, err = _run([task, "--pred", str(mixed), "--gt", str(gt)], capsys)  # before: scored with exit 0
    assert code == 2 and err.count("\n") == 1
    assert f"{mixed}: 2 record(s) have category ids that are not in" in err and "category_id=99" in err
    assert "--drop-unknown-categories" in err
    code, out, _ = _run([task, "--pred", str(mixed), "--gt", str(gt), "--drop-unknown-categories"], capsys)
    assert code == 0 and out is not None
    assert out["metrics"].pop("num_dropped_unknown_category") == 2.0
    assert out["metrics"] == ok["metrics"]
    assert out["skipped"] == {f"{mixed}: unknown category ids": "2 record(s) dropped (--drop-unknown-categories)"}


@pytest.mark.parametrize("task", ["coco", "lvis", "odinw"])
def test_empty_prediction_file(task: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("pycocotools")
    if task == "lvis":
        pytest.importorskip("lvis")
    gt = _write(tmp_path / "gt.json", _detection_gt(lvis=task == "lvis"))
    empty = _write(tmp_path / "empty.json", [])
    code, _, err = _run([task, "--pred", str(empty), "--gt", str(gt)], capsys)  # before: AP 0 with exit 0
    assert code == 2 and err.count("\n") == 1
    assert f"{empty}: no detection records (empty list); pass --allow-empty" in err
    code, out, _ = _run([task, "--pred", str(empty), "--gt", str(gt), "--allow-empty"], capsys)
    assert code == 0 and out is not None
    assert out["metrics"]["mean_AP" if task == "odinw" else "AP"] == 0.0
