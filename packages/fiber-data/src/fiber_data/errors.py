"""Errors raised by the ``fiber-data`` loaders.

Every error carries the offending ``file`` and, where it applies, the ``record`` (an index or key into the
annotation file) so that a broken dataset can be fixed without a debugger. ``fiber-data verify`` collects
these errors instead of stopping at the first one.
"""

from __future__ import annotations

from os import PathLike
from typing import Any

__all__ = ["AnnotationError", "DataError", "ImageLoadError", "MissingExtraError", "TokenizerError"]


class DataError(Exception):
    """Base class for data problems, naming the file and the record at fault.

    Args:
        message: what is wrong.
        file: the file at fault (annotation file or image file), if known.
        record: the record inside the annotation file (e.g. ``"annotations[17]"`` or a line number), if known.

    Attributes:
        message: the bare message (without file and record).
        file: as given, as a string, or ``None``.
        record: as given, or ``None``.
    """

    def __init__(self, message: str, *, file: str | PathLike[str] | None = None, record: str | int | None = None):
        self.message = message
        self.file = None if file is None else str(file)
        self.record = record
        super().__init__(self._format())

    def _format(self) -> str:
        where = []
        if self.file is not None:
            where.append(self.file)
        if self.record is not None:
            where.append(f"record {self.record}")
        return f"{': '.join(where)}: {self.message}" if where else self.message

    def __reduce__(self) -> tuple[Any, ...]:
        # Keeps the keyword-only fields when the error crosses a DataLoader worker boundary.
        return (_rebuild, (type(self), self.message, self.file, self.record))


def _rebuild(cls: type[DataError], message: str, file: str | None, record: str | int | None) -> DataError:
    """Unpickling helper for :class:`DataError` subclasses."""
    return cls(message, file=file, record=record)


class ImageLoadError(DataError):
    """An image file is missing, unreadable or not a decodable image."""


class AnnotationError(DataError):
    """An annotation file is missing, not valid JSON, or has a malformed record."""


class TokenizerError(DataError, ValueError):
    """A tokenizer path or name that cannot be loaded (missing, not a tokenizer, not in the offline hub cache)."""


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the ``fiber-data`` extra to install."""

    def __init__(self, module: str, extra: str, feature: str):
        super().__init__(
            f"{feature} needs the optional dependency '{module}', which is not installed. "
            f"Install it with: pip install 'fiber-data[{extra}]'"
        )
        self.module = module
        self.extra = extra
