"""Detection → grounding prompts (docs/reference/training.md §3.8) and the detection dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fiber_data import ByteBPETokenizer
from fiber_data.images.transforms import GroundingTransform
from fiber_data.prompts import DetectionPromptSampler, build_prompt, chunk_prompts, clean_class_name, token_counter
from fiber_data.sources.detection import DetectionGroundingDataset

NAMES = {1: "aa", 2: "bb", 3: "cc", 4: "dd", 5: "ee", 6: "ff"}


def chars(text: str) -> int:
    """A stand-in token counter: one token per character ("aa. " costs 4)."""
    return len(text)


def test_clean_names_and_build_prompt() -> None:
    assert clean_class_name("bat_(animal)") == "bat"
    assert clean_class_name("hair_drier  (tool) x") == "hair drier x"
    p = build_prompt([3, 1], {1: "traffic_light", 3: "dog"}, prefixes={3: "a "}, suffixes={1: " on a pole"})
    assert p.caption == "a dog. traffic light on a pole"
    assert p.caption[slice(*p.spans[3])] == "dog" and p.caption[slice(*p.spans[1])] == "traffic light"
    assert p.tokens_positive([1, 2, 3]) == [[p.spans[1]], [], [p.spans[3]]]


def test_chunks_cover_every_label_once_within_budget() -> None:
    chunks = chunk_prompts(list(NAMES), NAMES, chars, max_tokens=10)
    assert [c.labels for c in chunks] == [(1, 2), (3, 4), (5, 6)]
    assert [c.caption for c in chunks] == ["aa. bb", "cc. dd", "ee. ff"]
    assert [c.labels for c in chunk_prompts(list(NAMES), NAMES, chars, max_tokens=100, max_labels=4)] == [
        (1, 2, 3, 4),
        (5, 6),
    ]
    with pytest.raises(ValueError, match="alone needs"):
        chunk_prompts([1], NAMES, chars, max_tokens=3)


def test_positive_overflow_drops_the_class_and_leaves_no_room_for_negatives() -> None:
    sampler = DetectionPromptSampler(NAMES, chars, max_tokens=10, control_probs=(0.0, 0.0, 1.0, 0.0))
    for seed in range(10):
        p = sampler([1, 2, 3], np.random.default_rng(seed))
        assert len(p.labels) == 2 and set(p.labels) < {1, 2, 3}  # 4 + 4 fits, the third (12 > 10) is dropped


def test_negative_budget_is_strict() -> None:
    all_neg = DetectionPromptSampler(NAMES, chars, max_tokens=10, control_probs=(0.0, 0.0, 1.0, 0.0))
    for seed in range(10):
        p = all_neg([1], np.random.default_rng(seed))
        # budget 10 - 4 = 6: the first negative leaves 2 > 0 (kept), the second would leave -2 (stop).
        assert len(p.labels) == 2 and 1 in p.labels
    roomy = DetectionPromptSampler(NAMES, chars, max_tokens=100, control_probs=(0.0, 0.0, 1.0, 0.0))
    p = roomy([1, 2], np.random.default_rng(0))
    assert sorted(p.labels) == [1, 2, 3, 4, 5, 6]
    none = DetectionPromptSampler(NAMES, chars, max_tokens=100, control_probs=(0.0, 1.0, 0.0, 0.0))
    assert sorted(none([2, 5], np.random.default_rng(0)).labels) == [2, 5]
    one = DetectionPromptSampler(NAMES, chars, max_tokens=100, control_probs=(1.0, 0.0, 0.0, 0.0))
    sizes = {len(one([2], np.random.default_rng(s)).labels) for s in range(40)}
    assert sizes == {1, 2}  # one negative drawn; it is discarded when it hits the positive
    with pytest.raises(ValueError, match="p_a, p_b, p_c, 0.0"):
        DetectionPromptSampler(NAMES, chars, control_probs=(0.05, 0.05, 0.5, 0.2))


def test_number_of_negatives_distribution() -> None:
    sampler = DetectionPromptSampler(NAMES, chars, control_probs=(0.2, 0.3, 0.1, 0.0), max_negatives=4)
    rng = np.random.default_rng(0)
    draws = np.array([sampler.num_negatives(rng) for _ in range(4000)])
    # P(0) = 0.3; P(4) = 0.1 (all) + 0.4 / 4; P(1) = 0.2 + 0.1; P(2) = P(3) = 0.1.
    freq = np.bincount(draws, minlength=5) / len(draws)
    assert np.allclose(freq, [0.3, 0.3, 0.1, 0.1, 0.2], atol=0.03)


def _write_detection(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "img"
    (root / "val2017").mkdir(parents=True)
    Image.new("RGB", (40, 30)).save(root / "a.png")
    Image.new("RGB", (40, 30)).save(root / "val2017" / "b.jpg")
    data = {
        "categories": [
            {"id": 0, "name": "creatures"},
            {"id": 90, "name": "toothbrush"},
            {"id": 7, "name": "hair_drier"},
        ],
        "images": [
            {"id": 5, "file_name": "a.png", "width": 40, "height": 30},
            {"id": 6, "coco_url": "http://host/val2017/b.jpg", "width": 40, "height": 30},
            {"id": 7, "file_name": "a.png", "width": 40, "height": 30},
        ],
        "annotations": [
            {"id": 1, "image_id": 5, "category_id": 90, "bbox": [1, 2, 10, 5], "iscrowd": 0},
            {"id": 2, "image_id": 5, "category_id": 7, "bbox": [20, 10, 5, 5], "iscrowd": 1},
            {"id": 3, "image_id": 6, "category_id": 7, "bbox": [0, 0, 4, 4]},
            {"id": 4, "image_id": 7, "category_id": 0, "bbox": [0, 0, 4, 4]},
        ],
    }
    ann = tmp_path / "det.json"
    ann.write_text(json.dumps(data))
    return ann, root


def test_detection_dataset_labels_paths_and_eval_prompt(tmp_path: Path) -> None:
    ann, root = _write_detection(tmp_path)
    t = GroundingTransform((30,), None, 0.0, train=False)
    ds = DetectionGroundingDataset(ann, root, t)
    assert ds.label_names == {1: "hair_drier", 2: "toothbrush"} and ds.label_to_category_id == {1: 7, 2: 90}
    assert len(ds) == 2  # image 7 only had a background-category box
    assert ds.image_paths[1].endswith("val2017/b.jpg")  # LVIS-style path from coco_url
    s = ds[0]
    assert s.caption == "hair drier. toothbrush"
    assert s.labels.tolist() == [2] and s.boxes.tolist() == [[1.0, 2.0, 10.0, 6.0]]
    assert [s.caption[b:e] for ((b, e),) in s.tokens_positive] == ["toothbrush"]


def test_training_prompts_are_reproducible_per_epoch(tiny_world: Path, tokenizer: ByteBPETokenizer) -> None:
    t = GroundingTransform((48,), None, 0.0, train=False)
    ann = tiny_world / "annotations" / "instances_train.json"
    base = DetectionGroundingDataset(ann, tiny_world / "images" / "train", t)
    sampler = DetectionPromptSampler(base.label_names, token_counter(tokenizer), max_tokens=40)
    ds = DetectionGroundingDataset(ann, tiny_world / "images" / "train", t, sampler=sampler, seed=1)
    first = [ds.prompt_for(i).caption for i in range(len(ds))]
    assert first == [ds.prompt_for(i).caption for i in range(len(ds))]
    ds.set_epoch(1)
    assert first != [ds.prompt_for(i).caption for i in range(len(ds))]
    count = token_counter(tokenizer)
    for i in range(len(ds)):
        s = ds[i]
        assert count(s.caption) <= 40
        for lab, ((b, e),) in zip(s.labels.tolist(), s.tokens_positive):
            assert s.caption[b:e] == base.label_names[lab]
