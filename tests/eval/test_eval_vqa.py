"""VQA accuracy: closed form, the current official normalisation rules and their edge cases, files, gather."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fiber_eval._io import PredictionFormatError
from fiber_eval.distributed import all_gather_concat
from fiber_eval.types import VQAAnswer
from fiber_eval.vqa import (
    VQAAnnotation,
    VQAEvaluator,
    load_vqa_annotations,
    load_vqa_results,
    normalize_answer,
    process_punctuation,
    vqa_accuracy,
    write_vqa_submission,
)


@pytest.mark.parametrize(("n", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (7, 1.0)])
def test_closed_form(n: int, expected: float) -> None:
    answers = ["cat"] * n + ["dog"] * (10 - n)
    assert vqa_accuracy("cat", answers) == pytest.approx(expected)


def test_unanimous_answers_are_compared_raw() -> None:
    # current evaluator: no normalisation at all when the ten cleaned answers agree (the old one gave 1.0)
    assert vqa_accuracy("Yes", ["yes"] * 10) == 0.0
    assert vqa_accuracy("yes.", ["yes"] * 10) == 0.0
    assert vqa_accuracy("a yes", ["yes"] * 10) == 0.0
    assert vqa_accuracy("two", ["2"] * 10) == 0.0
    # clean() still applies: newline/tab/outer spaces
    assert vqa_accuracy(" yes\n", ["yes"] * 10) == 1.0
    assert vqa_accuracy("yes", ["yes\t"] * 9 + [" yes"]) == 1.0


def test_disagreeing_answers_normalise_both_sides() -> None:
    answers = ["2"] * 3 + ["Two"] + ["3"] * 6
    # after normalisation four answers equal "2"
    assert vqa_accuracy("two", answers) == 1.0
    assert vqa_accuracy("The Two.", answers) == 1.0
    assert vqa_accuracy("dont know", ["don't know"] * 2 + ["no"] * 8) == pytest.approx(0.6)


def test_punctuation_rules() -> None:
    assert process_punctuation("t-shirt") == "t shirt"  # no space next to "-": replaced by a space
    assert process_punctuation("left - right") == "left  right"  # space next to it: deleted
    assert process_punctuation("1,000") == "1000"  # digit-comma-digit: every listed mark deleted
    assert process_punctuation("10:30") == "10:30"  # ':' is not in the 21-character list
    assert process_punctuation("it's") == "it's"  # nor is "'"
    assert process_punctuation("2.5 m.") == "2.5 m"  # period before a digit is kept
    assert normalize_answer("The Dog!") == "dog"
    assert normalize_answer("none") == "0"
    assert normalize_answer("whats that") == "what's that"


def test_at_most_32_periods_removed() -> None:
    text = "." * 40
    assert process_punctuation(text) == "." * 8


def _annotations() -> list[VQAAnnotation]:
    return [
        VQAAnnotation(1, tuple(["yes"] * 10), "yes/no", "is the"),
        VQAAnnotation(2, tuple(["2"] * 2 + ["3"] * 8), "number", "how many"),
        VQAAnnotation(3, tuple(["red"] * 3 + ["blue"] * 7), "other", "what color is the"),
        VQAAnnotation(4, tuple(["no"] * 9 + ["yes"]), "yes/no", "is the"),
    ]


def test_evaluator_breakdown_and_gather() -> None:
    preds = [VQAAnswer(1, "yes"), VQAAnswer(2, "two"), VQAAnswer(3, "Red"), VQAAnswer(4, "yes")]
    ev = VQAEvaluator(_annotations())
    ev.update(preds)
    m = ev.compute()
    # per question: 1.0, 0.6, 0.9, 0.3
    assert m["accuracy"] == pytest.approx(100 * (1.0 + 0.6 + 0.9 + 0.3) / 4)
    assert m["answer_type/yes/no"] == pytest.approx(100 * (1.0 + 0.3) / 2)
    assert m["answer_type/number"] == pytest.approx(60.0)
    assert m["question_type/what color is the"] == pytest.approx(90.0)
    assert m["num_questions"] == 4.0
    assert ev.per_question == pytest.approx({1: 1.0, 2: 0.6, 3: 0.9, 4: 0.3})

    r0, r1 = VQAEvaluator(_annotations()), VQAEvaluator(_annotations())
    r0.update(preds[:2])
    r1.update([*preds[2:], preds[0]])  # padded repeat of question 1
    gather = all_gather_concat([r0.state(), r1.state()])
    assert r0.compute(gather) == m


def test_strict_requires_every_question() -> None:
    ev = VQAEvaluator(_annotations())
    ev.update([VQAAnswer(1, "yes")])
    with pytest.raises(ValueError, match="3 annotated question"):
        ev.compute()
    ev_sub = VQAEvaluator(_annotations(), strict=False)
    ev_sub.update([VQAAnswer(1, "yes")])
    assert ev_sub.compute()["accuracy"] == 100.0
    with pytest.raises(KeyError, match="99"):
        ev.update([VQAAnswer(99, "x")])


def test_files_roundtrip_and_errors(tmp_path: Path) -> None:
    ann = {
        "annotations": [
            {
                "question_id": 1,
                "image_id": 5,
                "question_type": "is it",
                "answer_type": "yes/no",
                "answers": [{"answer": "yes", "answer_confidence": "yes", "answer_id": i} for i in range(1, 11)],
            }
        ]
    }
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    gts = load_vqa_annotations(tmp_path / "ann.json")
    assert gts == [VQAAnnotation(1, ("yes",) * 10, "yes/no", "is it")]

    n = write_vqa_submission([VQAAnswer(1, "yes"), VQAAnswer(1, "no")], tmp_path / "res.json", question_ids=[1])
    assert n == 1
    assert json.loads((tmp_path / "res.json").read_text()) == [{"question_id": 1, "answer": "yes"}]
    assert load_vqa_results(tmp_path / "res.json") == [VQAAnswer(1, "yes")]
    with pytest.raises(ValueError, match="1 missing"):
        write_vqa_submission([VQAAnswer(1, "yes")], tmp_path / "x.json", question_ids=[1, 2])

    (tmp_path / "bad.json").write_text(json.dumps([{"question_id": 1, "answer": "a"}, {"question_id": 2}]))
    with pytest.raises(PredictionFormatError, match=r"bad.json: record 1: missing key\(s\) \['answer'\]"):
        load_vqa_results(tmp_path / "bad.json")
    (tmp_path / "bad2.json").write_text(json.dumps([{"question_id": 7, "answer": 3}]))
    with pytest.raises(PredictionFormatError, match="record 0 \\(question_id=7\\)"):
        load_vqa_results(tmp_path / "bad2.json")


def test_matches_literal_leave_one_out_loop() -> None:
    """The closed-form count equals the official loop over answer records (compared by record, not text)."""
    rng = np.random.default_rng(0)
    vocab = ["yes", "Yes", "no", "2", "two", "red"]
    for _ in range(200):
        answers = [str(rng.choice(vocab)) for _ in range(10)]
        pred = str(rng.choice(vocab))
        gts = list(answers)
        r = pred
        if len(set(gts)) > 1:
            gts = [normalize_answer(a) for a in gts]
            r = normalize_answer(pred)
        records = [{"answer": a, "answer_id": i} for i, a in enumerate(gts)]
        accs = []
        for rec in records:
            others = [o for o in records if o != rec]
            accs.append(min(1.0, len([o for o in others if o["answer"] == r]) / 3))
        assert vqa_accuracy(pred, answers) == pytest.approx(sum(accs) / len(accs))
