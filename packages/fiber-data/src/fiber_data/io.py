"""Small helpers shared by the annotation readers: JSON loading and record validation with precise errors."""

from __future__ import annotations

import json
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any

from fiber_data.errors import AnnotationError

__all__ = ["read_json", "read_jsonl", "require"]


def read_json(path: str | PathLike[str]) -> Any:
    """Parse a JSON file.

    Raises:
        AnnotationError: the file is missing or not valid JSON (with the line and column).
    """
    p = Path(path)
    if not p.is_file():
        raise AnnotationError("annotation file not found", file=p)
    try:
        with p.open("rb") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise AnnotationError(f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}", file=p) from exc
    except UnicodeDecodeError as exc:
        raise AnnotationError(f"not UTF-8 text ({exc})", file=p) from exc


def read_jsonl(path: str | PathLike[str]) -> list[dict[str, Any]]:
    """Parse a JSON Lines file (one object per non-empty line).

    Raises:
        AnnotationError: missing file, or a line that is not a JSON object (the record is the 1-based line).
    """
    p = Path(path)
    if not p.is_file():
        raise AnnotationError("annotation file not found", file=p)
    out: list[dict[str, Any]] = []
    with p.open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise AnnotationError(f"invalid JSON: {exc.msg}", file=p, record=f"line {lineno}") from exc
            if not isinstance(obj, dict):
                raise AnnotationError("expected a JSON object", file=p, record=f"line {lineno}")
            out.append(obj)
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
    return value
