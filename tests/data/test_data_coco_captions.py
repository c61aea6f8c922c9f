"""Caption datasets: dedup, Karpathy reading, retrieval corpus, and errors that name file and record."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from fiber_data import (
    AnnotationError,
    CocoCaptionsDataset,
    ImageLoadError,
    ImageTransform,
    KarpathyCaptionsDataset,
    load_retrieval_corpus,
)

T = ImageTransform(16)


def _write_coco(tmp_path: Path, annotations: list, images: list | None = None) -> tuple[Path, Path]:
    root = tmp_path / "imgs"
    root.mkdir(exist_ok=True)
    images = images or [
        {"id": 10, "file_name": "a.png"},
        {"id": 20, "file_name": "b.png"},
        {"id": 30, "file_name": "c.png"},
    ]
    for im in images:
        if isinstance(im, dict) and "file_name" in im:
            Image.new("RGB", (20, 10), (im["id"], 0, 0)).save(root / im["file_name"])
    ann = tmp_path / "captions.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations}))
    return ann, root


def test_pairs_are_deduplicated_per_image(tmp_path: Path) -> None:
    anns = [
        {"id": 1, "image_id": 10, "caption": "a red thing"},
        {"id": 2, "image_id": 10, "caption": "a red thing"},  # duplicate of the same image: dropped
        {"id": 3, "image_id": 20, "caption": "a red thing"},  # same text, other image: kept
        {"id": 4, "image_id": 10, "caption": "another caption"},
    ]
    ann, root = _write_coco(tmp_path, anns)
    ds = CocoCaptionsDataset(ann, root, T)
    assert len(ds) == 3 and ds.num_images == 3  # image 30 has no caption but stays in the image table
    assert [ds.caption(i) for i in range(3)] == ["a red thing", "a red thing", "another caption"]
    assert [ds.image_id(i) for i in range(3)] == [10, 20, 10]
    sample = ds[1]
    assert sample.index == 1 and sample.image_id == 20 and sample.image.shape == (3, 16, 16)
    # The pixel colour identifies the image: red channel = image id / 255.
    assert sample.image[0, 8, 8].item() == pytest.approx((20 / 255 - 0.485) / 0.229, abs=1e-5)
    assert len(CocoCaptionsDataset(ann, root, T, deduplicate=False)) == 4
    assert len(CocoCaptionsDataset(ann, root, T, image_ids=[20])) == 1
    assert isinstance(ds.table.text_to_image, np.ndarray)


@pytest.mark.parametrize(
    ("annotations", "images", "pattern"),
    [
        ([{"id": 1, "image_id": 10}], None, r"captions\.json: record annotations\[0\]: missing field 'caption'"),
        (
            [{"id": 1, "image_id": 10, "caption": "x"}, {"id": 2, "image_id": 99, "caption": "y"}],
            None,
            r"annotations\[1\]: image_id 99 has no entry",
        ),
        ([{"id": 1, "image_id": "10", "caption": "x"}], None, r"annotations\[0\]: field 'image_id' should be int"),
        ([], [{"id": 1, "file_name": "a.png"}, {"id": 1, "file_name": "b.png"}], r"images\[1\]: duplicate image id 1"),
        ([], [{"id": 1}], r"images\[0\]: missing field 'file_name'"),
        ([], ["not a dict"], r"images\[0\]: expected a JSON object"),
    ],
)
def test_malformed_records_are_named(tmp_path: Path, annotations: list, images: list | None, pattern: str) -> None:
    ann, root = _write_coco(tmp_path, annotations, images)
    with pytest.raises(AnnotationError, match=pattern):
        CocoCaptionsDataset(ann, root, T)


def test_bad_json_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [}')
    with pytest.raises(AnnotationError, match=r"bad\.json: invalid JSON at line 1"):
        CocoCaptionsDataset(bad, tmp_path, T)
    with pytest.raises(AnnotationError, match=r"absent\.json: annotation file not found"):
        CocoCaptionsDataset(tmp_path / "absent.json", tmp_path, T)


def test_missing_and_corrupt_images_name_file_and_record(tmp_path: Path) -> None:
    anns = [
        {"id": 1, "image_id": 10, "caption": "x"},
        {"id": 2, "image_id": 20, "caption": "y"},
        {"id": 3, "image_id": 30, "caption": "z"},
    ]
    ann, root = _write_coco(tmp_path, anns)
    (root / "b.png").unlink()
    (root / "c.png").write_bytes(b"garbage")
    ds = CocoCaptionsDataset(ann, root, T)
    assert ds[0].caption == "x"
    with pytest.raises(
        ImageLoadError, match=r"b\.png: record annotations\[1\] \(.*captions\.json\): image file not found"
    ):
        ds[1]
    with pytest.raises(ImageLoadError, match=r"c\.png: record annotations\[2\].*cannot decode"):
        ds[2]


def test_synthetic_world_through_coco_and_karpathy_readers(tiny_world: Path) -> None:
    coco = CocoCaptionsDataset(tiny_world / "annotations" / "captions_val.json", tiny_world / "images" / "val", T)
    karpathy = KarpathyCaptionsDataset(
        tiny_world / "annotations" / "karpathy.json", tiny_world / "images", T, splits=["val"]
    )
    assert len(coco) == len(karpathy) == 18
    assert [coco.caption(i) for i in range(18)] == [karpathy.caption(i) for i in range(18)]
    assert [coco.image_id(i) for i in range(18)] == [karpathy.image_id(i) for i in range(18)]
    assert torch.equal(coco[5].image, karpathy[5].image)
    train = KarpathyCaptionsDataset(tiny_world / "annotations" / "karpathy.json", tiny_world / "images", T)
    assert len(train) == 3 * (16 + 6)  # default splits: train + val (docs/reference/data-formats.md §13)


def test_retrieval_corpus(tiny_world: Path) -> None:
    corpus = load_retrieval_corpus(tiny_world / "annotations" / "captions_test.json", tiny_world / "images" / "test")
    assert corpus.num_images == 6 and corpus.num_texts == 18
    caps = json.loads((tiny_world / "annotations" / "captions_test.json").read_text())
    for t, ann in enumerate(caps["annotations"]):
        assert corpus.texts[t] == ann["caption"]
        assert corpus.image_ids[corpus.text_to_image[t]] == ann["image_id"]
    groups = corpus.image_to_texts()
    assert [g.tolist() for g in groups] == [[3 * i, 3 * i + 1, 3 * i + 2] for i in range(6)]
    same = load_retrieval_corpus(tiny_world / "annotations" / "karpathy.json", tiny_world / "images", split="test")
    assert same.texts == corpus.texts and np.array_equal(same.image_ids, corpus.image_ids)
    loader = DataLoader(corpus.image_dataset(T), batch_size=4)
    images, rows = next(iter(loader))
    assert images.shape == (4, 3, 16, 16) and rows.tolist() == [0, 1, 2, 3]


def test_retrieval_corpus_drops_images_without_text(tmp_path: Path) -> None:
    ann, root = _write_coco(
        tmp_path, [{"id": 1, "image_id": 30, "caption": "z"}, {"id": 2, "image_id": 10, "caption": "x"}]
    )
    corpus = load_retrieval_corpus(ann, root)
    assert corpus.image_ids.tolist() == [10, 30] and corpus.text_to_image.tolist() == [1, 0]
    assert load_retrieval_corpus(ann, root, drop_images_without_text=False).num_images == 3
