"""Fine-stage data of `fiber-train fine`: the mixture, detection prompts, multi-scale sizes, padding, skipping."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import pytest
import torch
from torch.utils.data import ConcatDataset

from fiber_data import DetectionGroundingDataset, GroundingBatch, GroundingSample, MdetrGroundingDataset
from fiber_train.config import load_config
from fiber_train.tasks.fine import FineConfig, FinePretrainTask


@pytest.fixture(scope="module")
def task(fine_world: Path, fine_tiny: list[str]) -> FinePretrainTask:
    sizes = ["data.min_sizes=[64, 96, 128]", "data.flip_prob=0.5"]
    cfg = load_config(FineConfig, "fine/tiny", [f"data.root={fine_world}", *fine_tiny, *sizes])
    t = FinePretrainTask(cfg)
    t.prepare_data()
    return t


def test_training_set_mixes_grounding_and_detection_sources(task: FinePretrainTask) -> None:
    ds = task.train_dataset()
    assert isinstance(ds, ConcatDataset)
    kinds = [type(d) for d in ds.datasets]
    assert kinds == [MdetrGroundingDataset, DetectionGroundingDataset]
    grounding, detection = ds.datasets
    assert isinstance(grounding, MdetrGroundingDataset) and isinstance(detection, DetectionGroundingDataset)
    assert len(ds) == len(grounding) + len(detection)
    assert len(grounding) == 3 * len(detection)  # three captions per image in the synthetic world
    assert detection.sampler is not None  # training prompts with sampled negative classes


def test_detection_prompt_spans_ground_each_box_to_its_class_name(task: FinePretrainTask) -> None:
    ds = task.train_dataset()
    assert isinstance(ds, ConcatDataset)
    detection = ds.datasets[1]
    assert isinstance(detection, DetectionGroundingDataset)
    tok = task.tokenizer
    collate = task.collate_fn()
    for i in range(4):
        sample = detection[i]
        names = [detection.label_names[int(k)] for k in sample.labels]
        assert sample.boxes.shape[0] == len(names) > 0
        for box_spans, name in zip(sample.tokens_positive, names):
            (start, end), *_ = box_spans
            assert sample.caption[start:end] == name
        batch = collate([sample])
        assert isinstance(batch, GroundingBatch)
        target = batch.targets[0]
        for row, name in zip(target.positive_map, names):
            ids = batch.input_ids[0][row > 0].tolist()
            assert tok.decode(ids).strip() == name


def test_multiscale_sizes_and_padding_to_a_multiple_of_32(task: FinePretrainTask) -> None:
    ds = task.train_dataset()
    collate = task.collate_fn()
    torch.manual_seed(0)
    assert isinstance(ds, ConcatDataset)
    samples = [cast(GroundingSample, ds[i]) for i in range(0, len(ds), max(1, len(ds) // 12))]
    shorts = {min(s.image.shape[1:]) for s in samples}
    assert shorts <= {64, 96, 128} and len(shorts) > 1
    batch = collate(samples[:4])
    assert isinstance(batch, GroundingBatch)
    hp, wp = batch.pixel_values.shape[-2:]
    assert hp % 32 == 0 and wp % 32 == 0
    assert hp == -(-max(s.image.shape[1] for s in samples[:4]) // 32) * 32
    for s, size, target in zip(samples[:4], batch.image_sizes, batch.targets):
        h, w = s.image.shape[1:]
        assert size.tolist() == [h, w]
        assert (target.boxes[:, 2] <= w - 1 + 1e-4).all() and (target.boxes[:, 3] <= h - 1 + 1e-4).all()
        assert target.positive_map.shape == (target.boxes.shape[0], batch.input_ids.shape[1])
        assert (target.positive_map.sum(dim=1) > 0).all()


def test_batch_without_boxes_is_skipped_with_a_zero_loss(task: FinePretrainTask) -> None:
    from dataclasses import replace

    model = task.build_model()
    ds = task.train_dataset()
    batch = task.collate_fn()([ds[0], ds[1]])
    assert isinstance(batch, GroundingBatch)
    empty = tuple(
        replace(t, boxes=t.boxes[:0], positive_map=t.positive_map[:0], labels=t.labels[:0]) for t in batch.targets
    )
    out = model(replace(batch, targets=empty))
    assert float(out.loss.detach()) == 0.0 and float(out.logs["grounding/skipped"]) == 1.0
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and not g.any() for g in grads)
