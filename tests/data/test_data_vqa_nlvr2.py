"""VQAv2 normalisation, vocabulary, soft scores and dataset; NLVR2 JSON Lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from fiber_data import AnnotationError, ByteBPETokenizer, ImageLoadError, ImageTransform, NLVR2Batch, VQABatch
from fiber_data.sources.nlvr2 import NLVR2Collator, NLVR2Dataset, pair_identifier
from fiber_data.sources.vqa import (
    AnswerVocab,
    VQACollator,
    VQAv2Dataset,
    answer_scores,
    build_answer_vocab,
    normalize_word,
    score_for_count,
)

T = ImageTransform(8)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Two dogs!", "2 dogs"),
        ("The 1,000", "1000"),  # digit-comma-digit: punctuation deleted, not spaced
        ("Yes.", "yes"),
        ("3.5", "3.5"),  # a period before a digit stays
        ("red-white", "red white"),  # no space around '-': replaced by a space
        ("hi -there", "hi there"),  # space before '-': deleted
        ("a man, woman", "man woman"),
        ("dont know", "don't know"),
        ("None", "0"),
        ("an apple (green)", "apple green"),
    ],
)
def test_normalize_word(raw: str, expected: str) -> None:
    assert normalize_word(raw) == expected


def test_scores_and_vocabulary(tmp_path: Path) -> None:
    assert [score_for_count(c) for c in range(6)] == [0.0, 0.3, 0.6, 0.9, 1.0, 1.0]
    train = {
        "annotations": [
            {"question_id": i, "multiple_choice_answer": a} for i, a in enumerate(["Two", "yes", "2", "no"] * 5)
        ]
    }
    val = {
        "annotations": [
            {"question_id": 100 + i, "multiple_choice_answer": a} for i, a in enumerate(["no", "cat", "cat"])
        ]
    }
    (tmp_path / "t.json").write_text(json.dumps(train))
    (tmp_path / "v.json").write_text(json.dumps(val))
    vocab = build_answer_vocab([tmp_path / "t.json", tmp_path / "v.json"], min_count=6)
    assert vocab.answers == ("2", "no")  # "two" and "2" merge (10); "no" 5 + 1; first-occurrence order
    assert build_answer_vocab([tmp_path / "t.json", tmp_path / "v.json"], min_count=2).answers == (
        "2",
        "yes",
        "no",
        "cat",
    )
    vocab = AnswerVocab(("yes", "no", "2"))
    labels, scores = answer_scores(["yes"] * 5 + ["Yes"] * 3 + ["no"] * 2, vocab)
    assert (labels, scores) == ([0, 1], [1.0, 0.6])  # raw "Yes" is not in the vocabulary and is lost
    assert AnswerVocab.load(vocab.save(tmp_path / "vocab.json")) == vocab


def _write_vqa(tmp_path: Path) -> tuple[Path, Path, Path]:
    root = tmp_path / "val2014"
    root.mkdir()
    for iid in (1, 2):
        Image.new("RGB", (10, 10), (iid, 0, 0)).save(root / f"COCO_val2014_{iid:012d}.jpg", format="JPEG")
    q = {
        "data_subtype": "val2014",
        "questions": [
            {"image_id": 1, "question": "What color?", "question_id": 10},
            {"image_id": 2, "question": "How many?", "question_id": 20},
            {"image_id": 3, "question": "Is it?", "question_id": 30},
        ],
    }
    a = {
        "annotations": [
            {
                "question_id": 10,
                "image_id": 1,
                "multiple_choice_answer": "red",
                "answers": [{"answer": x} for x in ["red"] * 4 + ["blue"] * 6],
            },
            {
                "question_id": 20,
                "image_id": 2,
                "multiple_choice_answer": "2",
                "answers": [{"answer": x} for x in ["2", "two"] + ["3"] * 8],
            },
            {"question_id": 30, "image_id": 3, "multiple_choice_answer": "yes", "answers": [{"answer": "maybe"}] * 10},
        ]
    }
    (tmp_path / "q.json").write_text(json.dumps(q))
    (tmp_path / "a.json").write_text(json.dumps(a))
    return tmp_path / "q.json", tmp_path / "a.json", root


def test_vqa_dataset_and_collator(tmp_path: Path, tokenizer: ByteBPETokenizer) -> None:
    qf, af, root = _write_vqa(tmp_path)
    vocab = AnswerVocab(("red", "2", "blue", "yes"))
    ds = VQAv2Dataset(qf, af, root, T, vocab)
    assert len(ds) == 2  # question 30 has no in-vocabulary answer
    s = ds[0]
    assert s.question_id == 10 and s.image.shape == (3, 8, 8)
    assert s.answer_labels.tolist() == [0, 2] and s.answer_scores.tolist() == pytest.approx([1.0, 1.0])
    batch = VQACollator(tokenizer, num_answers=len(vocab), max_length=12)([ds[0], ds[1]])
    assert isinstance(batch, VQABatch)
    assert torch.allclose(batch.targets, torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.3, 0.0, 0.0]]))
    assert batch.input_ids.shape == (2, 12) and batch.question_ids.tolist() == [10, 20]
    test = VQAv2Dataset(qf, None, root, T, vocab)
    assert len(test) == 3 and test[1].answer_labels.numel() == 0
    with pytest.raises(ImageLoadError, match=r"COCO_val2014_000000000003\.jpg: record questions\[2\] \(q\.json\)"):
        test[2]
    bad = json.loads(af.read_text())
    del bad["annotations"][1]["answers"][3]["answer"]
    af.write_text(json.dumps(bad))
    with pytest.raises(
        AnnotationError, match=r"a\.json: record annotations\[1\]\.answers\[3\]: missing field 'answer'"
    ):
        VQAv2Dataset(qf, af, root, T, vocab)


def test_nlvr2(tmp_path: Path, tokenizer: ByteBPETokenizer) -> None:
    assert pair_identifier("dev-117-3-0") == "dev-117-3"
    (tmp_path / "dev").mkdir()
    (tmp_path / "train" / "7").mkdir(parents=True)
    for folder, pair in [(tmp_path / "dev", "dev-1-2"), (tmp_path / "train" / "7", "train-5-0")]:
        Image.new("RGB", (9, 9), (255, 0, 0)).save(folder / f"{pair}-img0.png", format="JPEG")  # JPEG bytes in .png
        Image.new("RGB", (9, 9), (0, 0, 255)).save(folder / f"{pair}-img1.png")
    lines = [
        {"identifier": "dev-1-2-0", "sentence": "Left is red.", "label": "True"},
        {"identifier": "dev-1-2-1", "sentence": "Right is red.", "label": "False"},
    ]
    (tmp_path / "dev.json").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    ds = NLVR2Dataset(tmp_path / "dev.json", tmp_path / "dev", T)
    assert len(ds) == 2 and ds[0].label is True and ds[1].label is False
    left, right = ds[0].images
    assert left[0].mean() > right[0].mean()  # left image is the red one
    batch = NLVR2Collator(tokenizer, max_length=10)([ds[0], ds[1]])
    assert isinstance(batch, NLVR2Batch)
    assert batch.pixel_values.shape == (2, 2, 3, 8, 8) and batch.labels.tolist() == [1, 0]
    (tmp_path / "train.json").write_text(
        json.dumps({"identifier": "train-5-0-3", "sentence": "x", "label": "True", "directory": 7}) + "\n"
    )
    assert NLVR2Dataset(tmp_path / "train.json", tmp_path / "train", T)[0].label is True
    (tmp_path / "bad.json").write_text(json.dumps(lines[0]) + "\n{oops\n")
    with pytest.raises(AnnotationError, match=r"bad\.json: record line 2: invalid JSON"):
        NLVR2Dataset(tmp_path / "bad.json", tmp_path / "dev", T)
    (tmp_path / "bad2.json").write_text(
        json.dumps({"identifier": "dev-1-2-0", "sentence": "x", "label": "maybe"}) + "\n"
    )
    with pytest.raises(AnnotationError, match=r"bad2\.json: record record 0: label should be"):
        NLVR2Dataset(tmp_path / "bad2.json", tmp_path / "dev", T)
