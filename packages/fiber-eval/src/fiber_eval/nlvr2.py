"""NLVR2 accuracy and consistency (docs/reference/evaluation.md §3, docs/reference/data-formats.md §8).

* Accuracy = correct statements / all statements (statements, not image pairs, are counted).
* Consistency = fraction of unique sentences whose every (image pair, sentence) statement is classified
  correctly. A sentence is the identifier ``<split>-<set>-<pair>-<sentence>`` with the pair index removed;
  it is reported only when every identifier has this four-part form.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fiber_eval._io import (
    PredictionFormatError,
    load_json,
    load_jsonl,
    prediction_records,
    require_keys,
    require_predictions,
)
from fiber_eval.distributed import gather_items, merge_unique
from fiber_eval.types import AccumulatingEvaluator, GatherObjects, NLVR2Prediction

__all__ = ["NLVR2Evaluator", "load_nlvr2_labels", "load_nlvr2_predictions", "nlvr2_metrics", "parse_label"]


def parse_label(value: Any, where: str = "label") -> bool:
    """Parses ``"True"``/``"False"`` (any case), booleans and 0/1.

    Raises:
        PredictionFormatError: for anything else, naming ``where``.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise PredictionFormatError(f"{where}: expected 'True'/'False', a boolean or 0/1, got {value!r}")


def _sentence_key(identifier: str) -> str | None:
    parts = identifier.split("-")
    if len(parts) != 4:
        return None
    split, set_id, _pair, sentence = parts
    return f"{split}-{set_id}-{sentence}"


def nlvr2_metrics(predictions: Mapping[str, bool], labels: Mapping[str, bool]) -> dict[str, float]:
    """Accuracy (and consistency when identifiers allow) in percent.

    Args:
        predictions: identifier → predicted truth value; must cover exactly the scored statements.
        labels: identifier → ground-truth truth value.

    Returns:
        ``{"accuracy", "consistency" (if identifiers are four-part), "num_statements"}``.

    Raises:
        KeyError: for a prediction whose identifier has no label.
        ValueError: if there are no predictions.
    """
    if not predictions:
        raise ValueError("nlvr2_metrics: no predictions")
    correct: dict[str, bool] = {}
    for ident, pred in predictions.items():
        if ident not in labels:
            raise KeyError(f"NLVR2 prediction for identifier {ident!r}, which has no label")
        correct[ident] = bool(pred) == bool(labels[ident])
    out = {"accuracy": 100.0 * sum(correct.values()) / len(correct)}
    keys = {ident: key for ident in correct if (key := _sentence_key(ident)) is not None}
    if len(keys) == len(correct):
        per_sentence: dict[str, bool] = defaultdict(lambda: True)
        for ident, ok in correct.items():
            per_sentence[keys[ident]] &= ok
        out["consistency"] = 100.0 * sum(per_sentence.values()) / len(per_sentence)
    out["num_statements"] = float(len(correct))
    return out


def load_nlvr2_labels(path: str | Path) -> dict[str, bool]:
    """Reads identifier → label from an NLVR2 JSON Lines file (``dev.json``, ``test1.json``).

    Raises:
        PredictionFormatError: naming the file and line of a malformed record.
    """
    out = {}
    for i, rec in enumerate(load_jsonl(path)):
        where = f"{path}: record {i}"
        rec = require_keys(rec, ("identifier", "label"), where)
        out[str(rec["identifier"])] = parse_label(rec["label"], f"{where} (identifier={rec['identifier']})")
    return out


def load_nlvr2_predictions(path: str | Path) -> list[NLVR2Prediction]:
    """Reads predictions: a JSON list of ``{"identifier": str, "prediction": "True"|"False"|bool}`` or a JSON
    object ``{identifier: prediction}``.

    Raises:
        PredictionFormatError: naming the file and record of a malformed entry.
    """
    data = load_json(path)
    if isinstance(data, Mapping):
        return [NLVR2Prediction(str(k), parse_label(v, f"{path}: identifier {k}")) for k, v in data.items()]
    if not isinstance(data, list):
        raise PredictionFormatError(f"{path}: expected a list of records or an identifier->prediction object")
    records = prediction_records(data, ("identifier", "prediction"), name=str(path))
    return [NLVR2Prediction(str(rec["identifier"]), parse_label(rec["prediction"], where)) for where, rec in records]


class NLVR2Evaluator(AccumulatingEvaluator[NLVR2Prediction]):
    """Accumulates :class:`~fiber_eval.types.NLVR2Prediction` and computes :func:`nlvr2_metrics`.

    Args:
        labels: identifier → ground-truth truth value.
        strict: if True every labelled statement must be predicted.

    Repeats of an identifier (sampler padding) keep the first prediction.
    """

    def __init__(self, labels: Mapping[str, bool], *, strict: bool = True) -> None:
        self.labels = dict(labels)
        self.strict = strict
        self._items: list[NLVR2Prediction] = []

    def compute(self, gather: GatherObjects | None = None) -> dict[str, float]:
        """Gathers all ranks' predictions and returns accuracy / consistency in percent.

        Raises:
            ValueError: (``strict``) if some labelled statements have no prediction.
        """
        by_id, _ = merge_unique(gather_items(self.state(), gather), key=lambda p: p.identifier, what="identifier")
        require_predictions(self.labels, by_id, strict=self.strict, what="NLVR2 statement(s)", examples=3)
        return nlvr2_metrics({str(k): p.prediction for k, p in by_id.items()}, self.labels)
