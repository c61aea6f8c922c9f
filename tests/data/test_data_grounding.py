"""Fine-stage grounding data: box conventions, transform, MDETR dataset and collator."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fiber_data import AnnotationError, ByteBPETokenizer, GroundingBatch
from fiber_data.boxes import xywh_to_xyxy_plus1
from fiber_data.images.transforms import BGR255_MEAN, BGR255_STD, GroundingTransform, hflip_boxes, resized_size
from fiber_data.sources.grounding import AspectRatioBatchSampler, GroundingCollator, MdetrGroundingDataset
from fiber_data.synthetic.config import PALETTE

IDENTITY = {"bgr255": False, "mean": (0.0, 0.0, 0.0), "std": (1 / 255, 1 / 255, 1 / 255)}  # pixels stay 0..255


def test_box_conventions() -> None:
    xyxy = xywh_to_xyxy_plus1(np.array([[10, 20, 30, 40], [-5, 0, 10, 10], [95, 5, 20, 2]]), width=100, height=50)
    assert xyxy.tolist() == [[10, 20, 39, 49], [0, 0, 4, 9], [95, 5, 99, 6]]
    assert hflip_boxes(torch.tensor([[10.0, 0, 39, 5]]), 100).tolist() == [[60.0, 0, 89, 5]]
    # Shorter side to 800 with the 1333 cap (docs/reference/training.md §3.9), sizes truncated.
    assert resized_size(640, 480, 800, 1333) == (1066, 800)
    assert resized_size(2000, 500, 800, 1333) == (1332, 333)
    assert resized_size(500, 2000, 800, 1333) == (333, 1332)
    assert resized_size(800, 600, 600, 1333) == (800, 600)


def test_flip_moves_boxes_with_the_pixels() -> None:
    array = np.zeros((20, 30, 3), dtype=np.uint8)
    array[4:9, 3:11] = (200, 10, 10)  # inclusive pixel box x 3..10, y 4..8
    image = Image.fromarray(array)
    t = GroundingTransform((20,), None, flip_prob=1.0, **IDENTITY)
    pixels, boxes = t(image, torch.tensor([[3.0, 4.0, 10.0, 8.0]]))
    ys, xs = np.nonzero(pixels[0].numpy() > 100)
    assert boxes.tolist() == [[float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())]]


def test_resize_scales_boxes_and_bgr_normalisation() -> None:
    image = Image.new("RGB", (40, 20), (10, 20, 30))
    t = GroundingTransform((40,), 1333, flip_prob=0.0, train=False)
    pixels, boxes = t(image, torch.tensor([[4.0, 2.0, 9.0, 7.0]]))
    assert pixels.shape == (3, 40, 80)
    assert boxes.tolist() == [[8.0, 4.0, 18.0, 14.0]]
    expected = [(v - m) / s for v, m, s in zip((30, 20, 10), BGR255_MEAN, BGR255_STD)]  # BGR order
    assert torch.allclose(pixels[:, 5, 5], torch.tensor(expected))
    g = torch.Generator().manual_seed(0)
    sizes = {
        GroundingTransform((16, 24, 32), None, 0.0)(image, torch.zeros(0, 4), generator=g)[0].shape[1]
        for _ in range(30)
    }
    assert sizes == {16, 24, 32}


def _write_grounding(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "img"
    root.mkdir()
    Image.new("RGB", (50, 40), (0, 0, 0)).save(root / "a.png")
    Image.new("RGB", (50, 40), (0, 0, 0)).save(root / "vg.png")
    data = {
        "images": [
            {
                "id": 1,
                "file_name": "a.png",
                "height": "40",
                "width": "50",
                "caption": "a cat and a dog .",
                "dataset_name": "flickr",
            },
            {
                "id": 2,
                "file_name": "a.png",
                "height": 40,
                "width": 50,
                "caption": "only a crowd",
                "dataset_name": "flickr",
            },
            {"id": 3, "file_name": "vg.png", "height": 40, "width": 50, "caption": "a lamp.", "data_source": "vg"},
        ],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "bbox": [5, 5, 10, 10],
                "iscrowd": 0,
                "tokens_positive": [[2, 5]],
            },
            {
                "id": 2,
                "image_id": 1,
                "category_id": 1,
                "bbox": [30, 10, 0.5, 10],
                "iscrowd": 0,
                "tokens_positive": [[12, 15]],
            },
            {
                "id": 3,
                "image_id": 1,
                "category_id": 1,
                "bbox": [40, 30, 20, 20],
                "iscrowd": 0,
                "tokens_positive": [[12, 15], [0, 1]],
            },
            {
                "id": 4,
                "image_id": 2,
                "category_id": 1,
                "bbox": [1, 1, 10, 10],
                "iscrowd": 1,
                "tokens_positive": [[0, 4]],
            },
            {"id": 5, "image_id": 3, "category_id": 1, "bbox": [0, 0, 5, 5], "iscrowd": 0, "tokens_positive": [[2, 6]]},
        ],
    }
    ann = tmp_path / "g.json"
    ann.write_text(json.dumps(data))
    return ann, root


def test_mdetr_dataset_filters_boxes_and_entries(tmp_path: Path) -> None:
    ann, root = _write_grounding(tmp_path)
    t = GroundingTransform((40,), None, 0.0, train=False, **IDENTITY)
    ds = MdetrGroundingDataset(ann, {"default": root, "vg": root}, t)
    assert len(ds) == 2  # entry 2 has only a crowd box → removed
    boxes, labels, spans = ds.annotation(0)
    # The 0.5-wide box is degenerate after "+1" conversion; the third is clamped to the 50x40 image.
    assert boxes.tolist() == [[5, 5, 14, 14], [40, 30, 49, 39]]
    assert spans == [[(2, 5)], [(12, 15), (0, 1)]] and labels.tolist() == [1, 1]
    sample = ds[0]
    assert sample.orig_size == (40, 50) and sample.image.shape == (3, 40, 50) and sample.dataset_name == "flickr"
    assert torch.equal(sample.boxes, torch.from_numpy(boxes))
    assert len(MdetrGroundingDataset(ann, root, t, keep_empty=True)) == 3
    bad = json.loads(ann.read_text())
    bad["annotations"][2]["tokens_positive"] = [[1, 2, 3]]
    ann.write_text(json.dumps(bad))
    with pytest.raises(AnnotationError, match=r"g\.json: record annotations\[2\]: tokens_positive entry"):
        MdetrGroundingDataset(ann, root, t)


def test_collator_on_the_synthetic_world(tiny_world: Path, tokenizer: ByteBPETokenizer) -> None:
    t = GroundingTransform((48,), None, 0.0, train=False, **IDENTITY)
    ds = MdetrGroundingDataset(tiny_world / "annotations" / "grounding_val.json", tiny_world / "images" / "val", t)
    assert len(ds) == 18
    samples = [ds[i] for i in range(5)]
    batch = GroundingCollator(tokenizer, size_divisibility=32)(samples)
    assert isinstance(batch, GroundingBatch)
    assert batch.pixel_values.shape == (5, 3, 64, 64)
    assert (batch.pixel_values[:, :, 48:, :] == 0).all() and (batch.pixel_values[:, :, :, 48:] == 0).all()
    assert batch.image_sizes.tolist() == [[48, 48]] * 5
    instances = json.loads((tiny_world / "annotations" / "instances_val.json").read_text())
    names = {c["id"]: c["name"] for c in instances["categories"]}
    for i, (s, target) in enumerate(zip(samples, batch.targets)):
        assert target.positive_map.shape == (len(s.boxes), batch.input_ids.shape[1])
        assert set(target.positive_map.unique().tolist()) <= {0.0, 1.0}
        for k in range(len(s.boxes)):
            tokens = batch.input_ids[i][target.positive_map[k].bool()]
            phrase = tokenizer.decode(tokens).strip()
            ((b, e),) = s.tokens_positive[k]
            assert phrase == s.caption[b:e]
            color = names[int(target.labels[k])].split(" ")[0]
            assert color in phrase
            # The box still frames pixels of the stated colour after the transform.
            x1, y1, x2, y2 = (int(v) for v in target.boxes[k])
            crop = s.image[:, y1 : y2 + 1, x1 : x2 + 1]
            hits = (crop.round() == torch.tensor(PALETTE[color], dtype=torch.float32).view(3, 1, 1)).all(0)
            assert hits[:, 0].any() and hits[:, -1].any() and hits[0].any() and hits[-1].any()
    moved = batch.to("cpu")
    assert moved.targets[0].positive_map.shape == batch.targets[0].positive_map.shape


def test_aspect_ratio_batches() -> None:
    sizes = [(10, 20) if i % 3 else (20, 10) for i in range(23)]  # every third sample is portrait
    sampler = AspectRatioBatchSampler(sizes, 4, seed=0)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(23))  # every sample exactly once
    for b in batches:
        assert len({sizes[i][1] > sizes[i][0] for i in b}) == 1  # one orientation per batch
        assert len(b) <= 4
    assert len(sampler) == len(batches)
    assert list(sampler) == batches  # same epoch → same batches
    sampler.set_epoch(1)
    assert list(sampler) != batches
    ranks = [
        [i for b in AspectRatioBatchSampler(sizes, 4, num_replicas=2, rank=r, drop_last=True) for i in b]
        for r in (0, 1)
    ]
    assert not set(ranks[0]) & set(ranks[1])
    assert all(
        len(b) == 4 for r in (0, 1) for b in AspectRatioBatchSampler(sizes, 4, num_replicas=2, rank=r, drop_last=True)
    )
