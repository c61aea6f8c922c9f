"""Small helpers shared by the annotation readers: JSON loading and record validation with precise errors."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

from fiber_data.errors import AnnotationError

__all__ = ["annotations_by_image", "check_index", "check_value", "iter_lines", "read_json", "read_jsonl", "require"]


def as_int(value: Any) -> int | None:
    """An integer field that may be stored as a string of digits (Flickr sizes, some exports); ``None`` for
    anything else (booleans included)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def read_json(path: str | PathLike[str], *, escape_bad_utf8: bool = False) -> Any:
    """Parse a JSON file.

    Args:
        path: the file.
        escape_bad_utf8: decode bytes that are not UTF-8 as lone surrogates (``surrogateescape``) instead of
            refusing the file: a string holding them then fails :func:`check_value` (and :func:`require`) with
            the record named, so that a reader can skip that record (``on_error="skip"``).

    Raises:
        AnnotationError: the file is missing or not valid JSON (with the line and column).
    """
    p = Path(path)
    if not p.is_file():
        raise AnnotationError("annotation file not found", file=p)
    try:
        if escape_bad_utf8:
            return json.loads(p.read_bytes().decode("utf-8", errors="surrogateescape"))
        with p.open("rb") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise AnnotationError(f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}", file=p) from exc
    except UnicodeDecodeError as exc:
        raise AnnotationError(f"not UTF-8 text ({exc})", file=p) from exc
    except RecursionError as exc:
        raise AnnotationError("JSON nested too deeply to parse", file=p) from exc
    except ValueError as exc:  # e.g. an integer literal longer than Python's int_max_str_digits
        raise AnnotationError(f"invalid JSON ({exc})", file=p) from exc


def read_jsonl(path: str | PathLike[str]) -> list[dict[str, Any]]:
    """Parse a JSON Lines file (one object per non-empty line).

    Raises:
        AnnotationError: missing file, or a line that is not a JSON object (the record is the 1-based line).
    """
    p = Path(path)
    if not p.is_file():
        raise AnnotationError("annotation file not found", file=p)
    out: list[dict[str, Any]] = []
    for lineno, line in iter_lines(p):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise AnnotationError(f"invalid JSON: {exc.msg}", file=p, record=f"line {lineno}") from exc
        except RecursionError as exc:
            raise AnnotationError("JSON nested too deeply to parse", file=p, record=f"line {lineno}") from exc
        except ValueError as exc:  # e.g. an integer literal longer than Python's int_max_str_digits
            raise AnnotationError(f"invalid JSON ({exc})", file=p, record=f"line {lineno}") from exc
        if not isinstance(obj, dict):
            raise AnnotationError("expected a JSON object", file=p, record=f"line {lineno}")
        out.append(obj)
    return out


def iter_lines(path: Path) -> list[tuple[int, str]]:
    """``(1-based line number, text)`` of a UTF-8 text file.

    Raises:
        AnnotationError: a line is not valid UTF-8 (the record is that line).
    """
    out: list[tuple[int, str]] = []
    with Path(path).open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                out.append((lineno, raw.decode("utf-8")))
            except UnicodeDecodeError as exc:
                raise AnnotationError(f"not UTF-8 text ({exc.reason})", file=path, record=f"line {lineno}") from exc
    return out


def require(
    record: Any,
    key: str,
    types: type | tuple[type, ...],
    *,
    file: str | PathLike[str],
    where: str,
) -> Any:
    """Return ``record[key]`` after checking that the record is an object and the value has ``types``.

    Args:
        record: the JSON value of the record.
        key: field name.
        types: accepted Python types (``bool`` is never accepted for ``int``).
        file: annotation file, for the error.
        where: record locator such as ``"annotations[12]"``, for the error.

    Raises:
        AnnotationError: the record is not an object, lacks ``key``, or has a value of the wrong type.
    """
    if not isinstance(record, Mapping):
        raise AnnotationError(f"expected a JSON object, got {type(record).__name__}", file=file, record=where)
    if key not in record:
        raise AnnotationError(f"missing field {key!r}", file=file, record=where)
    value = record[key]
    wanted = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool) and bool not in wanted or not isinstance(value, wanted):
        names = "/".join(t.__name__ for t in wanted)
        raise AnnotationError(
            f"field {key!r} should be {names}, got {type(value).__name__} ({value!r:.60})", file=file, record=where
        )
    check_value(value, key, file=file, where=where)
    return value


#: JSON integers the loaders store in ``int64`` arrays must fit there.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def check_value(value: Any, key: str, *, file: str | PathLike[str], where: str) -> None:
    """Reject JSON values no loader can use: integers outside ``int64`` and strings with lone surrogates.

    ``json`` accepts both (``123456789012345678901234567890``, ``"\\ud800"``); they would otherwise fail
    much later (``OverflowError`` building an id array, ``UnicodeEncodeError`` in the tokenizer) without
    naming the record.

    Raises:
        AnnotationError: naming ``file``, ``where`` and ``key``.
    """
    if isinstance(value, int) and not isinstance(value, bool) and not INT64_MIN <= value <= INT64_MAX:
        shown = str(value) if abs(value) < 10**24 else f"a {len(str(abs(value)))}-digit integer"
        raise AnnotationError(f"field {key!r} = {shown} does not fit in 64 bits", file=file, record=where)
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise AnnotationError(
                f"field {key!r} is not valid Unicode ({exc.reason} at {exc.start})", file=file, record=where
            ) from exc


def check_index(index: int, length: int, what: str) -> None:
    """Raise ``IndexError`` unless ``0 <= index < length`` (``what`` names the items: "pairs", "questions")."""
    if not 0 <= index < length:
        raise IndexError(f"index {index} out of range for {length} {what}")


def annotations_by_image(
    anns: Sequence[Any], *, file: str | PathLike[str], skipped: list[str] | None = None
) -> dict[int, list[int]]:
    """Positions in ``anns`` (a COCO ``annotations`` list) of each ``image_id``, in file order.

    Args:
        anns: the annotation records.
        file: the annotation file, for errors.
        skipped: when given, a record without an integer ``image_id`` is described here
            (``"annotations[j]: <reason>"``) and left out instead of raising.

    Raises:
        AnnotationError: a record without an integer ``image_id`` (unless ``skipped`` is given).
    """
    per_image: dict[int, list[int]] = {}
    for j, rec in enumerate(anns):
        try:
            iid = require(rec, "image_id", int, file=file, where=f"annotations[{j}]")
        except AnnotationError as exc:
            if skipped is None:
                raise
            skipped.append(f"annotations[{j}]: {exc.message}")
            continue
        per_image.setdefault(iid, []).append(j)
    return per_image
