"""Every evaluator satisfies the Evaluator protocol and merges state through an injected gather."""

from __future__ import annotations

import numpy as np
import pytest

from fiber_eval import (
    FlickrEntitiesEvaluator,
    NLVR2Evaluator,
    RefExpEvaluator,
    RefExpTarget,
    RetrievalEvaluator,
    VQAAnnotation,
    VQAEvaluator,
)
from fiber_eval.caption import CaptionEvaluator
from fiber_eval.distributed import gather_items, merge_unique
from fiber_eval.types import Evaluator, NLVR2Prediction, RankingScores


def test_evaluators_follow_protocol() -> None:
    evaluators = [
        RetrievalEvaluator(),
        VQAEvaluator([VQAAnnotation(1, ("a",))]),
        NLVR2Evaluator({"x": True}),
        CaptionEvaluator({1: ["a"]}),
        RefExpEvaluator([RefExpTarget(1, (0.0, 0.0, 1.0, 1.0))]),
        FlickrEntitiesEvaluator({}),
    ]
    for ev in evaluators:
        state = ev.state()
        assert isinstance(ev, Evaluator), type(ev).__name__
        assert state == []


def test_gather_is_called_with_local_state_and_reset_clears() -> None:
    seen: list[list[object]] = []
    remote = [NLVR2Prediction("b", False)]

    def gather(items: list[object]) -> list[object]:
        seen.append(items)
        return items + remote  # what rank 0 of a two-rank all-gather returns

    ev = NLVR2Evaluator({"a": True, "b": True})
    ev.update([NLVR2Prediction("a", True)])
    assert ev.compute(gather) == {"accuracy": 50.0, "num_statements": 2.0}
    assert seen == [[NLVR2Prediction("a", True)]]
    ev.reset()
    assert ev.state() == []

    ret = RetrievalEvaluator()
    ret.update([RankingScores(np.eye(2), np.array([0, 1]))])
    ret.reset()
    with pytest.raises(ValueError, match="was update"):
        ret.compute()


def test_gather_helpers() -> None:
    assert gather_items([1], None) == [1]
    with pytest.raises(TypeError, match="must return a list"):
        gather_items([1], lambda items: tuple(items))  # pyright: ignore[reportArgumentType]  # wrong on purpose
    merged, dropped = merge_unique([("a", 1), ("b", 2), ("a", 3)], key=lambda x: x[0])
    assert merged == {"a": ("a", 1), "b": ("b", 2)} and dropped == 1
