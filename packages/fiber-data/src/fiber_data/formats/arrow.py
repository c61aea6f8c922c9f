"""ViLT/METER-style Arrow caption tables (docs/reference/data-formats.md §1): reader and writer. Needs the ``[arrow]`` extra.

Tables are Arrow IPC *file* format, one row per image with the encoded image bytes and a ``list<string>`` of
captions. :class:`ArrowCaptionDataset` memory-maps the files (nothing is copied into Python objects up front
except the index), builds one sample per (row, caption) with the captions of a row de-duplicated (first
occurrence kept; the reference uses an unordered set), accepts ``string`` and ``large_string`` columns, and
raises an error listing *all* missing files (the reference silently skips them).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from fiber_data.errors import AnnotationError, ImageLoadError, MissingExtraError
from fiber_data.images.transforms import load_image_bytes
from fiber_data.io import check_index
from fiber_data.sources.coco_captions import read_karpathy
from fiber_data.types import ImageTextSample

T = TypeVar("T")

__all__ = [
    "ArrowCaptionDataset",
    "ArrowItemDataset",
    "arrow_image",
    "karpathy_to_arrow",
    "open_arrow_tables",
    "read_arrow_table",
    "write_arrow_table",
    "write_caption_table",
]


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.ipc
    except ImportError as exc:
        raise MissingExtraError("pyarrow", "arrow", "Arrow tables") from exc
    return pyarrow


def read_arrow_table(path: str | PathLike[str]) -> Any:
    """Memory-map one Arrow IPC file and return its ``pyarrow.Table``.

    Raises:
        AnnotationError: the file is missing or not an Arrow IPC file.
    """
    pa = _pyarrow()
    p = Path(path)
    if not p.is_file():
        raise AnnotationError("Arrow table not found", file=p)
    try:
        source = pa.memory_map(str(p), "r")
        table = pa.ipc.open_file(source).read_all()
        # The IPC reader trusts the buffer offsets stored in the file; a corrupt file can make later column
        # access read out of bounds (a segfault). Full validation checks every offset first.
        table.validate(full=True)
    except (pa.ArrowException, OSError, ValueError) as exc:  # ValueError: bad UTF-8 in the schema
        raise AnnotationError(f"not an Arrow IPC file, or a corrupt one ({type(exc).__name__}: {exc})", file=p) from exc
    return table


def write_arrow_table(path: str | PathLike[str], columns: Mapping[str, Any]) -> Path:
    """Write ``columns`` (name → ``pyarrow.Array``) as one Arrow IPC file, creating its folder.

    Returns:
        The path written.
    """
    pa = _pyarrow()
    table = pa.table(dict(columns))
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with pa.OSFile(str(p), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return p


def open_arrow_tables(paths: Sequence[str | PathLike[str]], required: Sequence[str]) -> tuple[list[str], list[Any]]:
    """Memory-map several Arrow IPC files, each holding the ``required`` columns.

    Returns:
        ``(paths as strings, tables)``.

    Raises:
        AnnotationError: listing *every* missing file, or naming a table that lacks a required column.
    """
    files = [Path(p) for p in paths]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise AnnotationError(f"{len(missing)} Arrow table(s) not found: {', '.join(missing)}")
    tables = []
    for path in files:
        table = read_arrow_table(path)
        absent = [c for c in required if c not in table.column_names]
        if absent:
            raise AnnotationError(f"missing column(s) {absent} (columns: {table.column_names})", file=path)
        tables.append(table)
    return [str(p) for p in files], tables


def arrow_image(table: Any, column: str, row: int, source: str) -> Image.Image:
    """Decode the image bytes of cell ``(row, column)``; errors name ``source`` and the row."""
    data = table.column(column)[row].as_py()
    if data is None:
        raise ImageLoadError(f"{column} is null", file=source, record=f"row {row}")
    return load_image_bytes(data, source=source, record=f"row {row}")


def write_caption_table(
    path: str | PathLike[str],
    images: Sequence[bytes],
    captions: Sequence[Sequence[str]],
    image_ids: Sequence[str],
    split: str | Sequence[str],
) -> Path:
    """Write a caption table (``image: binary``, ``caption: list<string>``, ``image_id``, ``split``).

    Args:
        path: output ``<name>.arrow``.
        images: encoded image bytes per row.
        captions: captions per row.
        image_ids: image file names per row.
        split: one split name for all rows, or one per row.

    Returns:
        The path written.
    """
    pa = _pyarrow()
    n = len(images)
    if not len(captions) == len(image_ids) == n:
        raise ValueError("images, captions and image_ids need one entry per row")
    splits = [split] * n if isinstance(split, str) else list(split)
    return write_arrow_table(
        path,
        {
            "image": pa.array(list(images), type=pa.binary()),
            "caption": pa.array([list(c) for c in captions], type=pa.list_(pa.string())),
            "image_id": pa.array(list(image_ids), type=pa.string()),
            "split": pa.array(splits, type=pa.string()),
        },
    )


def karpathy_to_arrow(
    ann_file: str | PathLike[str],
    image_root: str | PathLike[str],
    out_dir: str | PathLike[str],
    *,
    dataset: str = "coco",
    splits: Collection[str] = ("train", "val", "restval", "test"),
) -> list[Path]:
    """Convert a Karpathy JSON into ``<dataset>_caption_karpathy_<split>.arrow`` tables (§1.2).

    Splits absent from the file are skipped. Row order follows the JSON (the reference shuffles; order does
    not matter to the loaders).

    Returns:
        The files written.
    """
    written = []
    for split in splits:
        table = read_karpathy(ann_file, image_root, splits=(split,))
        if not table.image_paths:
            continue
        per_image: list[list[str]] = [[] for _ in table.image_paths]
        for text, row in zip(table.texts, table.text_to_image.tolist()):
            per_image[row].append(text)
        blobs = []
        for path, record in zip(table.image_paths, table.image_records):
            p = Path(path)
            if not p.is_file():
                raise ImageLoadError("image file not found", file=p, record=record)
            blobs.append(p.read_bytes())
        names = [Path(p).name for p in table.image_paths]
        out = Path(out_dir) / f"{dataset}_caption_karpathy_{split}.arrow"
        written.append(write_caption_table(out, blobs, per_image, names, split))
    return written


def _check_column_types(table: Any, path: Path, text_column: str, image_column: str) -> None:
    """Raise :class:`AnnotationError` unless captions are ``list<string>`` and images are ``binary``."""
    pa = _pyarrow()
    types = pa.types
    text_type = table.schema.field(text_column).type
    if not (
        (types.is_list(text_type) or types.is_large_list(text_type))
        and (types.is_string(text_type.value_type) or types.is_large_string(text_type.value_type))
    ):
        raise AnnotationError(f"column {text_column!r} should be list<string>, got {text_type}", file=path)
    image_type = table.schema.field(image_column).type
    if not (types.is_binary(image_type) or types.is_large_binary(image_type)):
        raise AnnotationError(f"column {image_column!r} should be binary, got {image_type}", file=path)


class ArrowItemDataset(Dataset[T]):
    """Base of the datasets with one sample per (table, row, item) of memory-mapped Arrow tables (a caption, a
    question, a statement of a row); the index holds only integers.

    Args:
        paths: ``.arrow`` files (all must exist; the error lists every missing one).
        required: columns every table must have.
        transform: PIL image → ``FloatTensor [3, H, W]``.
    """

    #: what one sample is, in messages ("pairs", "questions", ...)
    items = "items"

    def __init__(
        self, paths: Sequence[str | PathLike[str]], required: Sequence[str], transform: Callable[[Image.Image], Tensor]
    ) -> None:
        self.paths, self.tables = open_arrow_tables(paths, required)
        self.transform = transform
        self._entries = np.zeros((0, 3), dtype=np.int64)

    def _index(self, entries: Sequence[tuple[int, int, int]]) -> None:
        """Set the ``(table, row, item)`` of every sample, in sample order."""
        self._entries = np.asarray(entries, dtype=np.int64).reshape(-1, 3)

    def __len__(self) -> int:
        return len(self._entries)

    def locate(self, index: int) -> tuple[int, int, int]:
        """``(table, row, item)`` of sample ``index`` (``IndexError`` when out of range)."""
        check_index(index, len(self), self.items)
        t, r, k = (int(v) for v in self._entries[index])
        return t, r, k

    def image(self, table: int, column: str, row: int) -> Image.Image:
        """The decoded image of cell ``(row, column)`` of table ``table``."""
        return arrow_image(self.tables[table], column, row, self.paths[table])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.items}={len(self)}, tables={len(self.tables)})"


class ArrowCaptionDataset(ArrowItemDataset[ImageTextSample]):
    """(image, caption) pairs from one or more Arrow caption tables.

    Args:
        paths: ``.arrow`` files (all must exist; the error lists every missing one).
        transform: PIL image → ``FloatTensor [3, H, W]``.
        text_column: the ``list<string>`` caption column.
        image_column: the binary image column.
        deduplicate: drop repeated captions within a row.

    ``sample.image_id`` is the table's ``image_id`` string (the image file name).
    """

    items = "pairs"

    def __init__(
        self,
        paths: Sequence[str | PathLike[str]],
        transform: Callable[[Image.Image], Tensor],
        *,
        text_column: str = "caption",
        image_column: str = "image",
        deduplicate: bool = True,
    ) -> None:
        super().__init__(paths, (text_column, image_column), transform)
        self.text_column = text_column
        self.image_column = image_column
        entries: list[tuple[int, int, int]] = []
        for t, table in enumerate(self.tables):
            path = Path(self.paths[t])
            _check_column_types(table, path, text_column, image_column)
            for r, captions in enumerate(table.column(text_column).to_pylist()):
                if captions is None:
                    continue
                seen: set[str] = set()
                for k, caption in enumerate(captions):
                    if caption is None:
                        raise AnnotationError(f"caption {k} is null", file=path, record=f"row {r}")
                    if deduplicate:
                        if caption in seen:
                            continue
                        seen.add(caption)
                    entries.append((t, r, k))
        self._index(entries)

    def caption(self, index: int) -> str:
        """Caption of pair ``index``."""
        t, r, k = (int(v) for v in self._entries[index])
        return str(self.tables[t].column(self.text_column)[r][k].as_py())

    def __getitem__(self, index: int) -> ImageTextSample:
        t, r, _ = self.locate(index)
        table = self.tables[t]
        image = self.image(t, self.image_column, r)
        image_id = table.column("image_id")[r].as_py() if "image_id" in table.column_names else f"{t}:{r}"
        return ImageTextSample(image_id=image_id, image=self.transform(image), caption=self.caption(index), index=index)
