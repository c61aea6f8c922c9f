"""Flickr30k Entities raw files and the VQAv2 / NLVR2 Arrow tables (docs/reference/data-formats.md §10, §1.2)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fiber_data import (
    AnnotationError,
    ArrowNLVR2Dataset,
    ArrowVQADataset,
    FlickrEntitiesDataset,
    GroundingTransform,
    ImageTransform,
    MdetrGroundingDataset,
    NLVR2Batch,
    NLVR2Collator,
    VQABatch,
    VQACollator,
    read_flickr_entities,
    write_flickr_mdetr_json,
    write_nlvr2_table,
    write_vqa_table,
)
from fiber_data.sources.flickr_entities import parse_entities_sentence

pytest.importorskip("pyarrow")

_XML = """<annotation>
  <filename>{id}.jpg</filename>
  <size><width>50</width><height>40</height><depth>3</depth></size>
  <object><name>71001</name><bndbox><xmin>2</xmin><ymin>3</ymin><xmax>20</xmax><ymax>30</ymax></bndbox></object>
  <object><name>71002</name><name>71005</name><bndbox><xmin>25</xmin><ymin>5</ymin><xmax>30</xmax><ymax>60</ymax></bndbox></object>
  <object><name>71003</name><bndbox><xmin>33</xmin><ymin>4</ymin><xmax>35</xmax><ymax>24</ymax></bndbox></object>
  <object><name>71003</name><bndbox><xmin>40</xmin><ymin>4</ymin><xmax>44</xmax><ymax>24</ymax></bndbox></object>
  <object><name>71004</name><nobndbox>1</nobndbox><scene>1</scene></object>
</annotation>
"""
_SENTENCES = (
    "[/EN#71001/people A boy] kicks [/EN#71002/other a red ball] toward [/EN#71003/other two goal posts] .\n"
    "[/EN#71001/people The child] plays on [/EN#71004/scene a grassy field] .\n"
    "[/EN#71004/scene A  field]   with [/EN#0/notvisual nothing] .\n"
    "[/EN#71005/other The ball] is next to [/EN#71002/other it] .\n"
)


def _flickr(tmp_path: Path) -> Path:
    root = tmp_path / "entities"
    (root / "Annotations").mkdir(parents=True)
    (root / "Sentences").mkdir()
    (root / "images").mkdir()
    for image_id in ("111", "222"):
        (root / "Annotations" / f"{image_id}.xml").write_text(_XML.format(id=image_id))
        (root / "Sentences" / f"{image_id}.txt").write_text(_SENTENCES)
        Image.new("RGB", (50, 40), (30, 60, 90)).save(root / "images" / f"{image_id}.jpg")
    (root / "val.txt").write_text("111\n222\n")
    return root


def test_sentence_markup_is_stripped_with_exact_spans() -> None:
    caption, phrases = parse_entities_sentence(
        "[/EN#71001/people/other A  boy] kicks [/EN#71002/other a red ball] toward [/EN#71003/other two goal posts] ."
    )
    assert caption == "A boy kicks a red ball toward two goal posts ."  # the §9.2 example caption
    assert [(e, t, caption[s:x]) for e, t, (s, x) in phrases] == [
        ("71001", ("people", "other"), "A boy"),
        ("71002", ("other",), "a red ball"),
        ("71003", ("other",), "two goal posts"),
    ]
    assert [span for _, _, span in phrases] == [(0, 5), (12, 22), (30, 44)]  # as in the §9.2 JSON


def test_records_group_boxes_and_phrases(tmp_path: Path) -> None:
    records = read_flickr_entities(_flickr(tmp_path), "val")
    # Sentence 2 (index 2) has only box-less phrases: skipped; 3 sentences per image remain.
    assert [(r.image_id, r.sentence_index) for r in records] == [(i, k) for i in ("111", "222") for k in (0, 1, 3)]
    first = records[0]
    assert first.width == 50 and first.height == 40 and first.file_name == "111.jpg"
    # Every box of every mentioned entity ("separateGT"); the ball's ymax 60 is clamped to H - 1 = 39.
    assert first.boxes.tolist() == [[2, 3, 20, 30], [25, 5, 30, 39], [33, 4, 35, 24], [40, 4, 44, 24]]
    assert [[first.caption[s:e] for s, e in spans] for spans in first.tokens_positive] == [
        ["A boy"],
        ["a red ball"],
        ["two goal posts"],
        ["two goal posts"],
    ]
    assert first.tokens_positive_eval == [[[0, 5]], [[12, 22]], [[30, 44]]]
    second = records[1]  # "The child plays on a grassy field ." : the field has no box
    assert second.boxes.tolist() == [[2, 3, 20, 30]] and len(second.phrases) == 2 and second.phrases[1].boxes == ()
    # Box shared by entities 71002 and 71005: one box grounding both phrases.
    fourth = records[2]
    assert fourth.boxes.tolist() == [[25, 5, 30, 39]]
    assert [fourth.caption[s:e] for s, e in fourth.tokens_positive[0]] == ["The ball", "it"]


def test_dataset_matches_the_converted_mdetr_json(tmp_path: Path) -> None:
    root = _flickr(tmp_path)
    transform = GroundingTransform((40,), max_size=None, train=False)
    raw = FlickrEntitiesDataset(root, "val", root / "images", transform)
    converted = write_flickr_mdetr_json(raw.records, tmp_path / "final_flickr_separateGT_val.json")
    mdetr = MdetrGroundingDataset(converted, root / "images", transform)
    assert len(raw) == len(mdetr) == 6
    for k in range(len(raw)):
        a, b = raw[k], mdetr[k]
        assert a.caption == b.caption and a.tokens_positive == b.tokens_positive
        assert torch.equal(a.boxes, b.boxes) and torch.equal(a.image, b.image)
        assert a.dataset_name == b.dataset_name == "flickr"
    assert raw[0].image_id == "111:0" and raw.orig_sizes.tolist()[0] == [40, 50]
    entry = json.loads(converted.read_text())["images"][0]
    assert entry["height"] == 40 and entry["tokens_positive_eval"] == [[[0, 5]], [[12, 22]], [[30, 44]]]


def test_flickr_errors_name_the_file(tmp_path: Path) -> None:
    root = _flickr(tmp_path)
    (root / "Annotations" / "222.xml").write_text("<annotation><size><width>5</width>")
    with pytest.raises(AnnotationError, match=r"222\.xml: invalid XML"):
        read_flickr_entities(root, "val")
    (root / "Annotations" / "222.xml").write_text(_XML.format(id=222).replace("<xmin>2</xmin>", "<xmin>a</xmin>"))
    with pytest.raises(AnnotationError, match=r"222\.xml: record object 0: bndbox"):
        read_flickr_entities(root, "val")
    with pytest.raises(AnnotationError, match=r"test\.txt: Flickr30k Entities split file not found"):
        read_flickr_entities(root, "test")


def _png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 10), color).save(buf, format="PNG")
    return buf.getvalue()


def test_arrow_vqa_table_round_trip(tmp_path: Path, tokenizer) -> None:
    rows = [
        {
            "image": _png((255, 0, 0)),
            "image_id": 262148,
            "questions": ["What color is the kite?", "Is it sunny?"],
            "question_id": [262148000, 262148001],
            "answers": [["red", "orange"], ["yes"]],
            "answer_labels": [[41, 2], [3]],
            "answer_scores": [[1.0, 0.3], [1.0]],
        },
        {
            "image": _png((0, 0, 255)),
            "image_id": 7,
            "questions": ["Why?"],
            "question_id": [7000],
            "answers": [[]],
            "answer_labels": [[]],
            "answer_scores": [[]],
        },
    ]
    path = write_vqa_table(tmp_path / "vqav2_train.arrow", rows, "train")
    ds = ArrowVQADataset([path], ImageTransform(8))
    assert len(ds) == 3
    s = ds[0]
    assert (s.question_id, s.image_id, s.question) == (262148000, 262148, "What color is the kite?")
    assert s.answer_labels.tolist() == [41, 2] and s.answer_scores.tolist() == pytest.approx([1.0, 0.3])
    assert torch.allclose(s.image, ImageTransform(8)(Image.new("RGB", (12, 10), (255, 0, 0))))
    assert ds[2].answer_labels.numel() == 0
    assert len(ArrowVQADataset([path], ImageTransform(8), drop_unanswerable=True)) == 2
    batch = VQACollator(tokenizer, num_answers=50, max_length=12)([ds[0], ds[1]])
    assert isinstance(batch, VQABatch)
    assert batch.targets[0, 41] == 1.0 and batch.targets[0, 2] == pytest.approx(0.3) and batch.targets[1, 3] == 1.0
    test_path = write_vqa_table(
        tmp_path / "vqav2_test.arrow",
        [{**rows[1], "answers": None, "answer_labels": None, "answer_scores": None}],
        "test",
    )
    assert ArrowVQADataset([test_path], ImageTransform(8))[0].answer_scores.numel() == 0
    with pytest.raises(AnnotationError, match="1 Arrow table"):
        ArrowVQADataset([path, tmp_path / "vqav2_val.arrow"], ImageTransform(8))


def test_arrow_nlvr2_table(tmp_path: Path, tokenizer) -> None:
    rows = [
        {
            "image_0": _png((255, 255, 255)),
            "image_1": _png((0, 0, 0)),
            "identifier": "dev-117-3",
            "questions": ["The left image is white.", "The right image is white."],
            "answers": ["True", "False"],
        },
    ]
    path = write_nlvr2_table(tmp_path / "nlvr2_dev.arrow", rows)
    ds = ArrowNLVR2Dataset([path], ImageTransform(6, mean=(0, 0, 0), std=(1, 1, 1)))
    assert len(ds) == 2
    first, second = ds[0], ds[1]
    assert (first.identifier, first.label, second.identifier, second.label) == (
        "dev-117-3-0",
        True,
        "dev-117-3-1",
        False,
    )
    assert float(first.images[0].min()) == 1.0 and float(first.images[1].max()) == 0.0
    batch = NLVR2Collator(tokenizer, max_length=10)([first, second])
    assert isinstance(batch, NLVR2Batch)
    assert batch.pixel_values.shape == (2, 2, 3, 6, 6) and batch.labels.tolist() == [1, 0]
    bad = write_nlvr2_table(tmp_path / "nlvr2_bad.arrow", [{**rows[0], "answers": ["True", "maybe"]}])
    with pytest.raises(AnnotationError, match=r"nlvr2_bad\.arrow: record row 0: answer 1"):
        ArrowNLVR2Dataset([bad], ImageTransform(6))
    corrupt = write_nlvr2_table(tmp_path / "nlvr2_corrupt.arrow", [{**rows[0], "image_1": b"not an image"}])
    with pytest.raises(Exception, match=r"nlvr2_corrupt\.arrow: record row 0: cannot decode"):
        ArrowNLVR2Dataset([corrupt], ImageTransform(6))[0]
    assert np.array_equal(ds.labels, [1, 0])
