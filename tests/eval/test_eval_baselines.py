"""The trivial baselines of fiber_eval.baselines, each scored by its benchmark's own evaluator."""

from __future__ import annotations

import numpy as np
import pytest

from fiber_eval import FlickrPhrase, RefExpTarget, VQAAnnotation
from fiber_eval.baselines import (
    constant_answer_accuracy,
    constant_caption_cider,
    majority_label_accuracy,
    most_common_caption,
    most_frequent_answer,
    random_box_accuracy,
    random_box_recall,
)
from fiber_eval.caption import simple_cider


def test_vqa_baseline_answers_the_most_frequent_normalised_answer() -> None:
    train = [VQAAnnotation(1, ("Yes", "yes", "no")), VQAAnnotation(2, ("two", "2", "2"))]
    assert most_frequent_answer(train) == "2"  # "two" normalises to "2": 4 of 6 answers
    test = [VQAAnnotation(3, ("2",) * 10), VQAAnnotation(4, ("red",) * 10)]
    assert constant_answer_accuracy(test, "2") == pytest.approx(50.0)
    with pytest.raises(ValueError, match="no annotated answer"):
        most_frequent_answer([])


def test_nlvr2_baseline_is_the_majority_share_and_never_below_half() -> None:
    assert majority_label_accuracy({"a": False, "b": False, "c": True, "d": False}) == pytest.approx(75.0)
    assert majority_label_accuracy({"a": True, "b": False}) == pytest.approx(50.0)


def test_caption_baseline_scores_the_most_common_caption_like_the_task() -> None:
    assert most_common_caption(["A red circle.", "a red circle.", "a blue square"]) == "a red circle."
    refs = {1: ["a red circle", "the red circle"], 2: ["a blue square", "one blue square"]}
    constant = constant_caption_cider("a red circle", refs)
    assert constant == pytest.approx(100.0 * simple_cider({1: "a red circle", 2: "a red circle"}, refs)[0])
    assert 0.0 < constant < 100.0 * simple_cider({1: "a red circle", 2: "a blue square"}, refs)[0]


def test_refexp_baseline_is_the_share_of_matching_objects_per_expression() -> None:
    left, right = (0.0, 0.0, 10.0, 10.0), (20.0, 0.0, 30.0, 10.0)
    targets = [RefExpTarget(1, left), RefExpTarget(2, right), RefExpTarget(3, left)]
    two = np.asarray([left, right])
    candidates = {1: two, 2: two, 3: np.asarray([left])}  # expression 3: its image holds one object
    assert random_box_accuracy(targets, candidates) == pytest.approx(100.0 * (0.5 + 0.5 + 1.0) / 3)
    assert random_box_accuracy(targets, candidates, criterion="iou") == pytest.approx(100.0 * 2 / 3)


def test_grounding_baseline_draws_among_the_boxes_of_the_sentence() -> None:
    a, b, c = (np.asarray([[0.0, 0.0, 10.0, 10.0]]), np.asarray([[20.0, 0, 30, 10]]), np.asarray([[40.0, 0, 50, 10]]))
    gt = {
        ("1", 0): [FlickrPhrase("a", "1", ("t",), a), FlickrPhrase("b", "2", ("t",), np.concatenate([b, c]))],
        ("2", 0): [FlickrPhrase("c", "3", ("t",), c)],
    }
    # sentence 1: 3 candidate boxes, phrase a hits 1 of them, phrase b 2; sentence 2: its one box
    assert random_box_recall(gt) == pytest.approx(100.0 * (1 / 3 + 2 / 3 + 1.0) / 3)
    assert random_box_recall(gt, {("1", 0): a, ("2", 0): a}) == pytest.approx(100.0 / 3)
