"""Flickr30k Entities ANY-box / MERGED R@k on raw files the test writes, and REC P@k with GIoU vs IoU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fiber_eval._io import PredictionFormatError
from fiber_eval.boxes import pairwise_giou, pairwise_iou
from fiber_eval.distributed import all_gather_concat
from fiber_eval.grounding import (
    FlickrEntitiesEvaluator,
    load_flickr_entities,
    load_phrase_predictions,
    parse_flickr_sentence,
)
from fiber_eval.refexp import RefExpEvaluator, RefExpTarget, load_refexp_targets, rank_boxes
from fiber_eval.types import PhraseBoxes, RefExpPrediction

XML = """<annotation><filename>3385593926.jpg</filename>
<size><width>500</width><height>333</height><depth>3</depth></size>
<object><name>71001</name><bndbox><xmin>60</xmin><ymin>80</ymin><xmax>180</xmax><ymax>320</ymax></bndbox></object>
<object><name>71002</name><bndbox><xmin>200</xmin><ymin>270</ymin><xmax>240</xmax><ymax>310</ymax></bndbox></object>
<object><name>71003</name><bndbox><xmin>330</xmin><ymin>40</ymin><xmax>350</xmax><ymax>240</ymax></bndbox></object>
<object><name>71003</name><bndbox><xmin>450</xmin><ymin>45</ymin><xmax>472</xmax><ymax>240</ymax></bndbox></object>
<object><name>71004</name><nobndbox>1</nobndbox><scene>1</scene></object>
</annotation>"""
SENTENCES = (
    "[/EN#71001/people A boy] kicks [/EN#71002/other a red ball] toward [/EN#71003/other two goal posts] .\n"
    "[/EN#71001/people The child] plays on [/EN#71004/scene a grassy field] .\n"
    "[/EN#0/notvisual Nothing] happens on [/EN#71004/scene a field] .\n"
)


@pytest.fixture
def entities_root(tmp_path: Path) -> Path:
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "Sentences").mkdir()
    (tmp_path / "Annotations" / "3385593926.xml").write_text(XML)
    (tmp_path / "Sentences" / "3385593926.txt").write_text(SENTENCES)
    (tmp_path / "test.txt").write_text("3385593926\n")
    return tmp_path


def test_parse_sentence() -> None:
    assert parse_flickr_sentence("[/EN#5/people/clothing A man in red] waves .") == [
        ("A man in red", "5", ("people", "clothing"))
    ]


def _preds() -> list[PhraseBoxes]:
    return [
        PhraseBoxes(
            "3385593926",
            0,
            [
                np.array([[60, 80, 180, 320]]),  # exact: hit@1
                np.array([[0, 0, 10, 10], [200, 270, 240, 310]]),  # hit at rank 2
                np.array([[450, 45, 472, 240]]),  # second box of entity 71003: ANY-box hit, MERGED miss
            ],
        ),
        PhraseBoxes("3385593926", 1, [np.zeros((0, 4))]),  # empty list: a miss, no dummy box needed
    ]


def test_flickr_any_box_and_merged(entities_root: Path) -> None:
    gt = load_flickr_entities(entities_root, "test")
    # sentence 2 has only box-less phrases (entity 0, scene) and is skipped; sentence 1 keeps "The child"
    assert sorted(gt) == [("3385593926", 0), ("3385593926", 1)]
    assert [p.entity_id for p in gt[("3385593926", 0)]] == ["71001", "71002", "71003"]
    assert gt[("3385593926", 0)][2].boxes.shape == (2, 4)

    ev = FlickrEntitiesEvaluator(gt)
    ev.update(_preds())
    m = ev.compute()
    assert m["R@1"] == pytest.approx(50.0)
    assert m["R@5"] == pytest.approx(75.0) and m["R@10"] == pytest.approx(75.0)
    assert m["R@upper"] == pytest.approx(75.0)
    assert m["R@1/people"] == pytest.approx(50.0)
    assert m["R@5/other"] == pytest.approx(100.0)
    assert m["num_phrases"] == 4.0

    merged = FlickrEntitiesEvaluator(gt, merged=True)
    merged.update(_preds())
    # enclosing box [330, 40, 472, 240] vs [450, 45, 472, 240]: IoU 4290 / 28400 < 0.5
    assert merged.compute()["R@1"] == pytest.approx(25.0)


def test_flickr_errors_and_gather(entities_root: Path, tmp_path: Path) -> None:
    gt = load_flickr_entities(entities_root, "test")
    ev = FlickrEntitiesEvaluator(gt)
    with pytest.raises(ValueError, match="2 box lists for 3"):
        ev.update([PhraseBoxes("3385593926", 0, [np.zeros((0, 4))] * 2)])
    with pytest.raises(KeyError, match="sentence 2"):
        ev.update([PhraseBoxes("3385593926", 2, [])])
    ev.update(_preds()[:1])
    with pytest.raises(ValueError, match="1 evaluated sentence"):
        ev.compute()
    other = FlickrEntitiesEvaluator(gt)
    other.update(_preds()[1:])
    single = FlickrEntitiesEvaluator(gt)
    single.update(_preds())
    with pytest.warns(UserWarning, match="1 repeated"):
        merged = ev.compute(all_gather_concat([ev.state(), other.state(), ev.state()[:1]]))
    assert merged == single.compute()
    with pytest.raises(FileNotFoundError, match="val.txt"):
        load_flickr_entities(entities_root, "val")
    (tmp_path / "p.json").write_text(json.dumps([{"image_id": "1", "sentence_index": 0, "boxes": [[[1, 2, 3]]]}]))
    with pytest.raises(PredictionFormatError, match=r"record 0 \(image_id=1, sentence_index=0\): phrase 0"):
        load_phrase_predictions(tmp_path / "p.json")


def test_iou_giou_worked_example() -> None:
    pred, gt = np.array([[0, 0, 100, 100]]), np.array([[18, 18, 118, 118]])
    assert pairwise_iou(pred, gt)[0, 0] == pytest.approx(6724 / 13276)
    assert pairwise_giou(pred, gt)[0, 0] == pytest.approx(6724 / 13276 - 648 / 13924)


def test_refexp_giou_vs_iou_and_datasets() -> None:
    targets = [
        RefExpTarget(1, (18.0, 18.0, 118.0, 118.0), "refcoco"),  # spec example: IoU hit, GIoU miss
        RefExpTarget(2, (0.0, 0.0, 10.0, 10.0), "refcoco+"),
        RefExpTarget(3, (0.0, 0.0, 10.0, 10.0), "refcoco+"),
    ]
    preds = [
        RefExpPrediction(1, np.array([[0.0, 0, 100, 100]]), np.array([0.9])),
        RefExpPrediction(2, np.array([[50.0, 50, 60, 60], [0, 0, 10, 5]]), np.array([0.9, 0.8])),  # IoU .5 at rank 2
        RefExpPrediction(3, np.zeros((0, 4)), np.zeros(0)),  # no box: a miss, not a crash
    ]
    giou = RefExpEvaluator(targets, ks=(1, 5))
    iou = RefExpEvaluator(targets, ks=(1, 5), criterion="iou")
    for ev in (giou, iou):
        ev.update(preds)
    g, i = giou.compute(), iou.compute()
    assert g["giou/refcoco/P@1"] == 0.0 and i["iou/refcoco/P@1"] == 100.0
    # [0,0,10,5] vs [0,0,10,10]: IoU = 0.5 exactly (>= counts) and GIoU = 0.5 (enclosing box = union)
    assert g["giou/refcoco+/P@1"] == 0.0 and g["giou/refcoco+/P@5"] == 50.0
    assert g["giou/all/P@5"] == pytest.approx(100 / 3) and i["iou/all/P@1"] == pytest.approx(100 / 3)
    assert g["num_expressions"] == 3.0

    r0, r1 = RefExpEvaluator(targets, ks=(1, 5)), RefExpEvaluator(targets, ks=(1, 5))
    r0.update(preds[:1])
    r1.update(preds[1:])
    assert r1.compute(all_gather_concat([r0.state(), r1.state()])) == g


def test_refexp_compat_tie_order() -> None:
    boxes = np.array([[0.0, 0, 50, 50], [50.0, 0, 100, 50]])
    scores = np.array([0.7, 0.7])
    np.testing.assert_array_equal(rank_boxes(boxes, scores), boxes[::-1])  # ties: box coordinates descending
    np.testing.assert_array_equal(rank_boxes(boxes, scores, compat_sort=False), boxes)
    tgt = [RefExpTarget(1, (50.0, 0.0, 100.0, 50.0))]
    for compat, expected in ((True, 100.0), (False, 0.0)):
        ev = RefExpEvaluator(tgt, ks=(1,), compat_sort=compat)
        ev.update([RefExpPrediction(1, boxes, scores)])
        assert ev.compute()["giou/refexp/P@1"] == expected


def test_refexp_loader(tmp_path: Path) -> None:
    data = {
        "images": [{"id": 17, "caption": "woman", "dataset_name": "refcoco"}],
        "annotations": [{"id": 1, "image_id": 17, "bbox": [402.5, 96.0, 180.0, 370.0], "category_id": 1}],
        "categories": [],
    }
    (tmp_path / "gt.json").write_text(json.dumps(data))
    assert load_refexp_targets(tmp_path / "gt.json") == [RefExpTarget(17, (402.5, 96.0, 582.5, 466.0), "refcoco")]
    data["annotations"].append({"id": 2, "image_id": 17, "bbox": [0, 0, 1, 1]})
    (tmp_path / "gt2.json").write_text(json.dumps(data))
    with pytest.raises(PredictionFormatError, match=r"gt2.json: images\[0\] \(id=17\) has 2 boxes"):
        load_refexp_targets(tmp_path / "gt2.json")
