"""Error policy during training: SkipBadSamples + collators that drop and record skipped samples."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from fiber_data import (
    AnnotationError,
    CocoCaptionsDataset,
    EmptyBatch,
    GroundingBatch,
    GroundingCollator,
    GroundingSample,
    ImageLoadError,
    ImageTextCollator,
    ImageTransform,
    NLVR2Batch,
    NLVR2Collator,
    NLVR2Sample,
    SkipBadSamples,
    SkippedSample,
    VQABatch,
    VQACollator,
    VQASample,
)


def _captions_dataset(tmp_path: Path) -> CocoCaptionsDataset:
    """Four images: 0 and 3 fine, 1 corrupt bytes, 2 missing."""
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (20, 16), (200, 10, 10)).save(images / "a.png")
    (images / "b.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    Image.new("RGB", (20, 16), (10, 200, 10)).save(images / "d.png")
    ann = {
        "images": [{"id": k + 1, "file_name": n} for k, n in enumerate(["a.png", "b.png", "c.png", "d.png"])],
        "annotations": [{"id": k + 1, "image_id": k + 1, "caption": f"caption {k}"} for k in range(4)],
    }
    (tmp_path / "captions.json").write_text(json.dumps(ann))
    return CocoCaptionsDataset(tmp_path / "captions.json", images, transform=ImageTransform(8))


class _MalformedAt(Dataset[GroundingSample]):
    """A dataset whose record 1 is malformed (raises the error a lazy reader raises)."""

    def __len__(self) -> int:
        return 3

    def __getitem__(self, index: int) -> GroundingSample:
        if index == 1:
            raise AnnotationError("bbox should be [x, y, w, h]", file="/data/ann.tsv", record="line 2")
        h, w = 10 + index, 12
        return GroundingSample(
            image_id=index,
            image=torch.ones(3, h, w),
            caption="a red circle",
            boxes=torch.tensor([[1.0, 1.0, 5.0, 6.0]]),
            labels=torch.tensor([1]),
            tokens_positive=(((2, 12),),),
            orig_size=(h, w),
            index=index,
        )


def test_raise_policy_propagates_the_error_unchanged(tmp_path: Path) -> None:
    ds = SkipBadSamples(_captions_dataset(tmp_path), policy="raise")
    assert ds[0].caption == "caption 0"
    with pytest.raises(ImageLoadError, match=r"b\.png: record annotations\[1\]") as info:
        ds[1]
    assert info.value.file is not None and info.value.file.endswith("b.png")
    with pytest.raises(ImageLoadError, match="image file not found"):
        ds[2]
    with pytest.raises(ValueError, match="policy"):
        SkipBadSamples(ds.dataset, policy="ignore")  # pyright: ignore[reportArgumentType]  # invalid on purpose


def test_skip_policy_drops_corrupt_and_missing_images_and_records_them(
    tmp_path: Path, tokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    ds = SkipBadSamples(_captions_dataset(tmp_path), policy="skip", name="coco")
    with caplog.at_level(logging.WARNING, logger="fiber_data"):
        bad = ds[1]
    assert isinstance(bad, SkippedSample)
    assert bad.dataset == "coco" and bad.file.endswith("b.png") and bad.index == 1
    assert bad.description == f"coco:{bad.file}:{bad.record}" and "annotations[1]" in bad.record
    assert any("b.png" in r.getMessage() and "annotations[1]" in r.getMessage() for r in caplog.records)

    collate = ImageTextCollator(tokenizer, max_length=12, mlm=False)
    loader = DataLoader(ds, batch_size=4, collate_fn=collate)
    (batch,) = list(loader)
    assert len(batch) == 2 and batch.captions == ("caption 0", "caption 3")
    assert batch.index.tolist() == [0, 3]
    assert len(batch.skipped) == 2
    assert batch.skipped[0].startswith("coco:") and "b.png" in batch.skipped[0]
    assert "c.png" in batch.skipped[1] and "annotations[2]" in batch.skipped[1]
    assert ds.num_skipped == 3  # ds[1] above, then 1 and 2 in the loader

    # Every sample skipped: an EmptyBatch carrying the descriptions.
    empty = collate([ds[1], None])
    assert isinstance(empty, EmptyBatch) and len(empty) == 0
    assert empty.skipped[1] == "unknown:?:?" and empty.to("cpu") is empty


def test_skip_policy_with_malformed_record_in_grounding_batches(tokenizer) -> None:
    ds = SkipBadSamples(_MalformedAt(), policy="skip")
    batch = GroundingCollator(tokenizer, max_length=16, size_divisibility=8)([ds[i] for i in range(3)])
    assert isinstance(batch, GroundingBatch)
    assert batch.index.tolist() == [0, 2]
    assert batch.skipped == ("_MalformedAt:/data/ann.tsv:line 2",)
    assert batch.pixel_values.shape == (2, 3, 16, 16)
    with pytest.raises(AnnotationError, match="line 2"):
        SkipBadSamples(_MalformedAt())[1]


def test_vqa_and_nlvr2_collators_drop_skipped(tokenizer) -> None:
    skipped = SkippedSample("vqa", "img.jpg", "questions[3]", "cannot decode", 3)
    vqa = VQASample(7, 1, torch.zeros(3, 4, 4), "what?", torch.tensor([2]), torch.tensor([0.6]), 0)
    batch = VQACollator(tokenizer, num_answers=5, max_length=8)([skipped, vqa])
    assert isinstance(batch, VQABatch)
    assert batch.question_ids.tolist() == [7] and batch.skipped == ("vqa:img.jpg:questions[3]",)
    assert batch.targets[0].tolist() == pytest.approx([0, 0, 0.6, 0, 0])
    pair = NLVR2Sample("dev-0-1-0", (torch.zeros(3, 4, 4), torch.ones(3, 4, 4)), "two shapes", True, 0)
    nb = NLVR2Collator(tokenizer, max_length=8)([pair, None])
    assert isinstance(nb, NLVR2Batch)
    assert nb.identifiers == ("dev-0-1-0",) and nb.skipped == ("unknown:?:?",)
    assert isinstance(NLVR2Collator(tokenizer)([skipped]), EmptyBatch)
    # Batches built without skips keep the default.
    assert VQACollator(tokenizer, num_answers=5)([vqa]).skipped == ()


def test_wrapper_forwards_attributes_and_pickles(tmp_path: Path) -> None:
    inner = _captions_dataset(tmp_path)
    ds = SkipBadSamples(inner, policy="skip", name="coco")
    assert ds.num_images == inner.num_images and len(ds) == 4
    with pytest.raises(AttributeError):
        ds.no_such_attribute  # noqa: B018
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.policy == "skip" and clone.name == "coco" and len(clone) == 4
    assert isinstance(clone[1], SkippedSample)
    assert np.allclose(clone[0].image.numpy(), ds[0].image.numpy())


def test_skip_policy_on_a_lazy_tsv_reader(tmp_path: Path, tokenizer) -> None:
    """A real reader that parses records lazily: one malformed label row and one corrupt image row."""
    import base64
    import io

    from fiber_data import GroundingTransform, TSVDetectionDataset
    from fiber_data.formats.tsv import write_tsv

    def png() -> str:
        buf = io.BytesIO()
        Image.new("RGB", (16, 12), (90, 20, 20)).save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    keys = [f"im{k}" for k in range(4)]
    images = [(k, png()) for k in keys]
    images[2] = ("im2", base64.b64encode(b"garbage bytes").decode())
    labels = [(k, json.dumps([{"class": "red circle", "rect": [1, 1, 8, 9]}])) for k in keys]
    labels[1] = ("im1", json.dumps([{"class": "unicorn", "rect": [1, 1, 8, 9]}]))
    (tmp_path / "labelmap.json").write_text(json.dumps({"red circle": 1}))
    ds = TSVDetectionDataset(
        write_tsv(tmp_path / "images.tsv", images),
        write_tsv(tmp_path / "labels.tsv", labels),
        tmp_path / "labelmap.json",
        GroundingTransform((12,), None, 0.0, train=False),
    )
    wrapped = SkipBadSamples(ds, policy="skip", name="o365")
    batch = GroundingCollator(tokenizer, max_length=16)([wrapped[i] for i in range(4)])
    assert isinstance(batch, GroundingBatch)
    assert [int(i) for i in batch.index] == [0, 3]
    assert len(batch.skipped) == 2
    assert batch.skipped[0].startswith("o365:") and "labels.tsv:line 1" in batch.skipped[0]
    assert "images.tsv" in batch.skipped[1] and "line 2" in batch.skipped[1]
    with pytest.raises(AnnotationError, match=r"labels\.tsv: record line 1"):
        SkipBadSamples(ds)[1]
