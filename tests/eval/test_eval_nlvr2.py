"""NLVR2 accuracy counts statements; consistency groups identifiers without the pair index."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fiber_eval._io import PredictionFormatError
from fiber_eval.distributed import all_gather_concat
from fiber_eval.nlvr2 import NLVR2Evaluator, load_nlvr2_labels, load_nlvr2_predictions, nlvr2_metrics
from fiber_eval.types import NLVR2Prediction

LABELS = {
    "dev-1-0-0": True,
    "dev-1-1-0": False,  # same sentence (dev-1-*-0) on another pair
    "dev-1-2-0": True,
    "dev-1-0-1": False,
    "dev-2-0-0": True,
}


def test_hand_computed_accuracy_and_consistency() -> None:
    preds = {"dev-1-0-0": True, "dev-1-1-0": True, "dev-1-2-0": True, "dev-1-0-1": False, "dev-2-0-0": True}
    m = nlvr2_metrics(preds, LABELS)
    assert m["accuracy"] == pytest.approx(80.0)  # 4 of 5 statements
    # sentences: dev-1-0 (3 statements, one wrong) x, dev-1-1 ok, dev-2-0 ok -> 2/3
    assert m["consistency"] == pytest.approx(200 / 3)
    assert m["num_statements"] == 5.0


def test_consistency_omitted_for_other_identifiers() -> None:
    m = nlvr2_metrics({"a": True, "b": False}, {"a": True, "b": True})
    assert m == {"accuracy": 50.0, "num_statements": 2.0}
    with pytest.raises(KeyError, match="'c'"):
        nlvr2_metrics({"c": True}, {"a": True})


def test_evaluator_gather_and_strict() -> None:
    preds = [NLVR2Prediction(k, v) for k, v in LABELS.items()]
    r0, r1 = NLVR2Evaluator(LABELS), NLVR2Evaluator(LABELS)
    r0.update(preds[:3])
    r1.update([*preds[3:], preds[0]])
    merged = r0.compute(all_gather_concat([r0.state(), r1.state()]))
    assert merged == {"accuracy": 100.0, "consistency": 100.0, "num_statements": 5.0}
    with pytest.raises(ValueError, match="2 NLVR2 statement"):
        r0.compute()


def test_files(tmp_path: Path) -> None:
    lines = [{"identifier": k, "sentence": "s", "label": "True" if v else "False"} for k, v in LABELS.items()]
    (tmp_path / "dev.json").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    assert load_nlvr2_labels(tmp_path / "dev.json") == LABELS
    (tmp_path / "p.json").write_text(json.dumps([{"identifier": "dev-1-0-0", "prediction": "maybe"}]))
    with pytest.raises(PredictionFormatError, match="p.json: record 0.*'maybe'"):
        load_nlvr2_predictions(tmp_path / "p.json")
    (tmp_path / "q.json").write_text(json.dumps({"dev-1-0-0": True}))
    assert load_nlvr2_predictions(tmp_path / "q.json") == [NLVR2Prediction("dev-1-0-0", True)]
