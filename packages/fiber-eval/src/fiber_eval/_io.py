"""Small file helpers shared by the evaluators: JSON / JSON Lines loading with errors that name the file."""

from __future__ import annotations

import json
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "MissingPredictionsError",
    "PredictionFormatError",
    "load_json",
    "load_jsonl",
    "prediction_records",
    "require_keys",
    "require_predictions",
]


class PredictionFormatError(ValueError):
    """A prediction or ground-truth file (or record) is malformed; the message names the file and record."""


class MissingPredictionsError(ValueError):
    """Some ground-truth items have no prediction (or there is no prediction at all).

    Attributes:
        missing: how many items lack a prediction (0 with ``total`` 0: no prediction at all).
        what: the items, e.g. ``"annotated question(s)"``.
        examples: a few of the missing ids.
    """

    def __init__(self, missing: int, what: str, examples: list[Any], hint: str = "pass strict=False to score a subset"):
        self.missing, self.what, self.examples = missing, what, examples
        text = f"{missing} {what} have no prediction (e.g. {examples})" if missing else f"no predictions for {what}"
        super().__init__(f"{text}; {hint}" if missing else text)


def require_predictions(
    expected: Collection[Any],
    predicted: Collection[Any],
    *,
    strict: bool,
    what: str,
    nothing: str | None = None,
    examples: int = 5,
) -> None:
    """Checks that predictions cover the ground truth, as the ``strict`` evaluators require.

    Args:
        expected: the ids of the ground-truth items (e.g. the keys of the annotations).
        predicted: the ids that have a prediction.
        strict: require a prediction for every id of ``expected``.
        what: the items in the error for missing ones, e.g. ``"annotated question(s)"``.
        nothing: when given, having no prediction at all is an error naming these items (even when not
            ``strict``), e.g. ``"the VQA questions"``.
        examples: how many of the missing ids (sorted) the error shows.

    Raises:
        MissingPredictionsError: no prediction (with ``nothing``), or (``strict``) some expected ids lack one.
    """
    if nothing is not None and not predicted:
        raise MissingPredictionsError(0, nothing, [])
    if strict:
        missing = set(expected) - set(predicted)
        if missing:
            raise MissingPredictionsError(len(missing), what, sorted(missing)[:examples])


def load_json(path: str | Path) -> Any:
    """Reads one JSON document.

    Raises:
        FileNotFoundError: if the file does not exist.
        PredictionFormatError: if it is not valid JSON (message gives file, line and column).
    """
    path = Path(path)
    with path.open("r", encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise PredictionFormatError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
        except UnicodeDecodeError as e:
            raise PredictionFormatError(f"{path}: not a UTF-8 JSON file (byte {e.start} cannot be decoded)") from e


def load_jsonl(path: str | Path) -> list[Any]:
    """Reads a JSON Lines file (blank lines skipped).

    Raises:
        PredictionFormatError: naming the file and 1-based line number of an invalid line.
    """
    path = Path(path)
    records = []
    with path.open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise PredictionFormatError(f"{path}: line {lineno} is not valid JSON: {e.msg}") from e
    return records


def require_keys(record: Any, keys: tuple[str, ...], where: str) -> Mapping[str, Any]:
    """Checks that a record is an object holding ``keys``.

    Args:
        record: one decoded JSON value.
        keys: required field names.
        where: description used in the error, e.g. ``"preds.json: record 3"``.

    Raises:
        PredictionFormatError: if the record is not an object or lacks a key.
    """
    if not isinstance(record, Mapping):
        raise PredictionFormatError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [k for k in keys if k not in record]
    if missing:
        raise PredictionFormatError(f"{where}: missing key(s) {missing}; has {sorted(record)}")
    return record


def prediction_records(
    source: str | Path | Sequence[Any], keys: tuple[str, ...], *, name: str | None = None, what: str | None = None
) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """The records of a JSON list of predictions, each checked by :func:`require_keys`, with its locator.

    Args:
        source: a JSON file, or the decoded list.
        keys: the fields every record needs.
        name: how errors name the source (default: the path, or ``<results>`` for a decoded list).
        what: the records' kind in the not-a-list error (default: ``{key, key, ...}``).

    Yields:
        ``(where, record)``: ``where`` is ``"<name>: record <i>"``, for the caller's own errors.

    Raises:
        PredictionFormatError: the source is not a JSON list, or a record is not an object holding ``keys``.
    """
    is_file = isinstance(source, (str, Path))
    if name is None:
        name = str(source) if is_file else "<results>"
    data = load_json(source) if is_file else source  # type: ignore[arg-type]
    if not isinstance(data, list):
        what = what or "{" + ", ".join(keys) + "}"
        raise PredictionFormatError(f"{name}: expected a JSON list of {what} records")
    for i, rec in enumerate(data):
        where = f"{name}: record {i}"
        yield where, require_keys(rec, keys, where)
