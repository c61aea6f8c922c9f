"""Detection data is never repaired silently (issue 21, item 5): invalid boxes are counted per source and
reported (metrics and the final summary); the detection tasks honour ``data.on_error``."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import shutil
from collections.abc import Sized
from pathlib import Path
from typing import cast

import pytest
from PIL import Image

from fiber_data import DetectionGroundingDataset, GroundingTransform, ImageLoadError, SkippedSample
from fiber_train.cli import main
from fiber_train.config import load_config
from fiber_train.tasks import TASKS
from fiber_train.tasks.grounding_finetune import DetectionFinetuneTask, GroundingFinetuneConfig


def _detection_file(tmp_path: Path) -> tuple[Path, Path]:
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (40, 30), (90, 90, 90)).save(images / name)
    ann = {
        "categories": [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}],
        "images": [
            {"id": 1, "file_name": "a.png", "width": 40, "height": 30},
            {"id": 2, "file_name": "b.png", "width": 40, "height": 30},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10]},  # fine
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [30, 20, 50, 50]},  # beyond the image: clipped
            {"id": 3, "image_id": 1, "category_id": 1, "bbox": [5, 5, 0, 8]},  # zero width: dropped
            {"id": 4, "image_id": 1, "category_id": 2, "bbox": [float("nan"), 1, 4, 4]},  # NaN: dropped
            {"id": 5, "image_id": 2, "category_id": 1, "bbox": [60, 60, 5, 5]},  # outside: dropped, image removed
        ],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(ann))  # json writes NaN as a bare NaN literal, as some exporters do
    return path, images


def test_invalid_boxes_are_counted_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ann, images = _detection_file(tmp_path)
    with caplog.at_level(logging.WARNING, logger="fiber_data"):
        ds = DetectionGroundingDataset(ann, images, GroundingTransform(min_sizes=(32,), max_size=64, train=False))
    assert ds.repairs == {
        "boxes_clipped": 1,
        "boxes_degenerate_dropped": 2,
        "boxes_nonfinite_dropped": 1,
        "images_without_valid_boxes_removed": 1,
    }
    assert len(ds) == 1 and len(ds.labels_of(0)) == 2
    assert ds.boxes[1].tolist() == [30.0, 20.0, 39.0, 29.0]  # the clipped box, as the spec's +1 convention says
    [record] = [r for r in caplog.records if "instances.json" in r.getMessage()]
    assert "1 boxes clipped to the image" in record.getMessage() and "NaN" in record.getMessage()
    kept = DetectionGroundingDataset(ann, images, GroundingTransform(min_sizes=(32,), max_size=64, train=False),
                                     remove_empty=False)  # fmt: skip
    assert len(kept) == 2 and kept.repairs["images_without_valid_boxes_removed"] == 0


def _config(world: Path, tiny: list[str], *extra: str) -> GroundingFinetuneConfig:
    return load_config(
        GroundingFinetuneConfig, TASKS["detection"].default_recipe, [f"data.root={world}", *tiny, *extra]
    )


@pytest.fixture()
def broken_world(fine_world: Path, tmp_path: Path) -> tuple[Path, str]:
    """A copy of the fine world as plain files: one training image missing, one box NaN, one box clipped."""
    root = tmp_path / "w"
    shutil.copytree(fine_world, root)
    (root / "world.json").unlink()
    ann_path = root / "annotations" / "instances_train.json"
    ann = json.loads(ann_path.read_text())
    ann["annotations"][0]["bbox"][0] = float("nan")
    ann["annotations"][1]["bbox"][2] = 500.0
    ann_path.write_text(json.dumps(ann))
    missing = ann["images"][-1]["file_name"]
    (root / "images" / "train" / missing).unlink()
    return root, missing


def test_detection_task_honours_on_error_and_reports_repairs(broken_world, fine_tiny: list[str]) -> None:
    root, missing = broken_world
    files = ["data.format=files"]
    raising = DetectionFinetuneTask(_config(root, fine_tiny, *files))
    ds = raising.train_dataset()
    last = len(cast(Sized, ds)) - 1  # a map-style dataset
    with pytest.raises(ImageLoadError, match=missing):
        ds[last]
    assert raising.data_report() == {
        "instances_train/boxes_clipped": 1,
        "instances_train/boxes_nonfinite_dropped": 1,
    }
    skipping = DetectionFinetuneTask(_config(root, fine_tiny, *files, "data.on_error=skip"))
    sample = skipping.train_dataset()[last]
    assert isinstance(sample, SkippedSample) and sample.dataset == "instances_train" and missing in sample.file


def test_detection_run_reports_repairs_in_metrics_and_summary(
    broken_world, fine_tiny: list[str], tmp_path: Path
) -> None:
    root, _ = broken_world
    buf = io.StringIO()
    argv = ["finetune", "detection", "--out", str(tmp_path / "runs"), "--run-name", "d", "--set", f"data.root={root}"]
    extra = ["data.format=files", "data.on_error=skip", "trainer.max_steps=4", "eval.batch_size=6"]
    with contextlib.redirect_stdout(buf):
        assert main([*argv, *fine_tiny, *extra]) == 0
    out = buf.getvalue()
    assert "repaired or dropped while loading" in out
    assert "instances_train/boxes_clipped: 1" in out and "instances_train/boxes_nonfinite_dropped: 1" in out
    assert "skipped bad samples (data.on_error=skip): instances_train:" in out
    with open(tmp_path / "runs" / "d" / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows[-1]["repaired/instances_train/boxes_clipped"] == "1"


def test_grounding_records_not_utf8_or_malformed_are_skipped_and_counted(
    fine_world: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from fiber_data import AnnotationError, MdetrGroundingDataset

    src = fine_world / "annotations" / "grounding_train.json"
    data = json.loads(src.read_text())
    data["images"][0]["caption"] = "@@BAD@@"
    data["images"][1]["width"] = "wide"
    data["annotations"][0]["bbox"] = [float("nan"), 1, 2, 3]
    bad = tmp_path / "grounding_bad.json"
    bad.write_bytes(json.dumps(data).encode().replace(b"@@BAD@@", b"a red \xff circle"))
    t = GroundingTransform(min_sizes=(32,), max_size=64, train=False)
    with pytest.raises(AnnotationError, match="not UTF-8"):
        MdetrGroundingDataset(bad, fine_world / "images" / "train", t)
    with caplog.at_level(logging.WARNING, logger="fiber_data"):
        ds = MdetrGroundingDataset(bad, fine_world / "images" / "train", t, on_error="skip")
    assert ds.repairs["records_skipped"] == 2 and len(ds.skipped_records) == 2
    assert ds.skipped_records[0].startswith("images[0]: field 'caption' is not valid Unicode")
    assert ds.skipped_records[1].startswith("images[1]: fields 'width' and 'height'")
    assert len(ds) == len(data["images"]) - 2 - ds.repairs["images_without_valid_boxes_removed"]
    nan_image = data["annotations"][0]["image_id"]
    assert ds.repairs["boxes_nonfinite_dropped"] == (
        0 if nan_image in (data["images"][0]["id"], data["images"][1]["id"]) else 1
    )
    assert any(
        "grounding_bad.json" in r.getMessage() and "bad records skipped" in r.getMessage() for r in caplog.records
    )
