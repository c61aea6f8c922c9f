"""Image-caption datasets from COCO-captions and Karpathy-split JSON, and the retrieval corpus.

Implements the coarse-stage sample definition of docs/reference/training.md §1.1 (one sample = one (image, caption) pair,
duplicate captions of an image removed) over the formats of docs/reference/data-formats.md §3 (COCO captions) and §2
(Karpathy JSON), plus the image/text corpus that retrieval evaluation ranks (evaluation of §2.5).

Storage is compact (numpy index arrays and one list of caption strings, no dict per record), so DataLoader
workers do not copy large Python object graphs on every access.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, Literal, Protocol, TypeGuard

import numpy as np
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from fiber_data.errors import AnnotationError
from fiber_data.images.transforms import load_image
from fiber_data.images.tv_decode import read_image_file
from fiber_data.io import check_value, read_json, require
from fiber_data.types import ImageTextSample

logger = logging.getLogger("fiber_data")

__all__ = [
    "CaptionTable",
    "CocoCaptionsDataset",
    "ImageFolderDataset",
    "ImageTextDataset",
    "KarpathyCaptionsDataset",
    "RetrievalCorpus",
    "load_retrieval_corpus",
    "read_coco_captions",
    "read_karpathy",
]

Transform = Callable[[Image.Image], Tensor]


class _BytesTransform(Protocol):
    """A transform that decodes the encoded file bytes itself (e.g. :mod:`fiber_data.images.tv_decode`)."""

    decodes_bytes: bool

    def from_bytes(self, data: bytes, *, source: str | None = None, record: str | int | None = None) -> Tensor: ...


def _decodes_bytes(transform: object) -> TypeGuard[_BytesTransform]:
    """Whether datasets pass ``transform`` the encoded file bytes (its ``decodes_bytes`` flag) instead of a PIL image."""
    return bool(getattr(transform, "decodes_bytes", False))


@dataclass(frozen=True)
class CaptionTable:
    """Images and their captions, in columnar form.

    Attributes:
        source: the annotation file.
        image_ids: ``[N]`` image identifiers (int64, or object array of str).
        image_paths: ``N`` image file paths.
        image_records: ``N`` record locators of the images in ``source`` (for errors).
        texts: ``T`` caption strings.
        text_to_image: ``int64 [T]`` row in the image arrays of each caption.
        text_records: ``T`` record locators of the captions in ``source``.
        skipped_records: caption records left out as bad (``on_error="skip"``), as ``"<record>: <problem>"``.
    """

    source: str
    image_ids: np.ndarray
    image_paths: list[str]
    image_records: list[str]
    texts: list[str]
    text_to_image: np.ndarray
    text_records: list[str]
    skipped_records: tuple[str, ...] = ()

    def deduplicated(self) -> CaptionTable:
        """Drop repeated (image, caption) pairs, keeping the first occurrence (docs/reference/training.md §1.1)."""
        seen: set[tuple[int, str]] = set()
        keep: list[int] = []
        for t, (img, text) in enumerate(zip(self.text_to_image.tolist(), self.texts)):
            if (img, text) not in seen:
                seen.add((img, text))
                keep.append(t)
        return CaptionTable(
            source=self.source,
            image_ids=self.image_ids,
            image_paths=self.image_paths,
            image_records=self.image_records,
            texts=[self.texts[t] for t in keep],
            text_to_image=self.text_to_image[np.asarray(keep, dtype=np.int64)],
            text_records=[self.text_records[t] for t in keep],
            skipped_records=self.skipped_records,
        )


def _ids_array(ids: Sequence[int | str]) -> np.ndarray:
    if all(isinstance(i, int) for i in ids):
        return np.asarray(ids, dtype=np.int64)
    return np.asarray(ids, dtype=object)


class CaptionTableBuilder:
    """The columns of a :class:`CaptionTable` as a caption reader collects them: images first
    (:meth:`add_image` returns the row), then each caption of a row (:meth:`add_text`); :meth:`build` makes the
    table. Every caption reader (COCO, Karpathy, Visual Genome, annotation pairs) fills one."""

    def __init__(self, source: str | PathLike[str]) -> None:
        self.source = str(source)
        self.ids: list[int | str] = []
        self.paths: list[str] = []
        self.image_records: list[str] = []
        self.texts: list[str] = []
        self.text_to_image: list[int] = []
        self.text_records: list[str] = []
        self.skipped: list[str] = []

    def add_image(self, image_id: int | str, path: str | PathLike[str], record: str) -> int:
        """Append an image (``record`` locates it in the source, for errors); returns its row."""
        self.ids.append(image_id)
        self.paths.append(str(path))
        self.image_records.append(record)
        return len(self.ids) - 1

    def add_text(self, text: str, row: int, record: str) -> None:
        """Append a caption of image ``row``."""
        self.texts.append(text)
        self.text_to_image.append(row)
        self.text_records.append(record)

    def build(self, id_dtype: Any = None) -> CaptionTable:
        """The table; image ids as ``id_dtype`` (default: int64 when every id is an int, else object)."""
        return CaptionTable(
            source=self.source,
            image_ids=_ids_array(self.ids) if id_dtype is None else np.asarray(self.ids, dtype=id_dtype),
            image_paths=self.paths,
            image_records=self.image_records,
            texts=self.texts,
            text_to_image=np.asarray(self.text_to_image, dtype=np.int64),
            text_records=self.text_records,
            skipped_records=tuple(self.skipped),
        )


def read_coco_captions(
    ann_file: str | PathLike[str],
    image_root: str | PathLike[str],
    *,
    image_ids: Collection[int] | None = None,
    on_error: Literal["raise", "skip"] = "raise",
) -> CaptionTable:
    """Parse a COCO captions file (docs/reference/data-formats.md §3) into a :class:`CaptionTable`.

    Images without captions are kept in the image arrays (they are part of a retrieval gallery) but yield no
    pairs.

    Args:
        ann_file: ``captions_*.json``.
        image_root: folder holding the ``file_name`` of every image.
        image_ids: keep only these images.
        on_error: ``"skip"`` leaves out a bad caption record (malformed, bytes that are not UTF-8, an unknown
            ``image_id``) and lists it in :attr:`CaptionTable.skipped_records` (a warning names the file and
            the count); ``"raise"`` stops at it. A broken ``images`` entry or JSON structure always raises.

    Raises:
        AnnotationError: malformed file or record (named as ``images[i]`` / ``annotations[j]``), duplicate
            image ids, or a caption whose ``image_id`` has no image.
    """
    data = read_json(ann_file, escape_bad_utf8=on_error == "skip")
    return _coco_table(data, Path(ann_file), Path(image_root), image_ids, on_error=on_error)


def _coco_table(
    data: Any, ann_file: Path, root: Path, image_ids: Collection[int] | None, *, on_error: str = "raise"
) -> CaptionTable:
    """:func:`read_coco_captions` on parsed JSON."""
    if not isinstance(data, dict):
        raise AnnotationError("top level should be a JSON object with 'images' and 'annotations'", file=ann_file)
    images = require(data, "images", list, file=ann_file, where="top level")
    anns = require(data, "annotations", list, file=ann_file, where="top level")
    keep = None if image_ids is None else set(image_ids)
    table = CaptionTableBuilder(ann_file)
    row_of: dict[int, int] = {}
    for i, rec in enumerate(images):
        where = f"images[{i}]"
        iid = require(rec, "id", int, file=ann_file, where=where)
        name = require(rec, "file_name", str, file=ann_file, where=where)
        if iid in row_of:
            raise AnnotationError(
                f"duplicate image id {iid} (first at {table.image_records[row_of[iid]]})", file=ann_file, record=where
            )
        if keep is not None and iid not in keep:
            row_of[iid] = -1
            continue
        row_of[iid] = table.add_image(iid, root / name, where)
    for j, rec in enumerate(anns):
        where = f"annotations[{j}]"
        try:
            iid = require(rec, "image_id", int, file=ann_file, where=where)
            caption = require(rec, "caption", str, file=ann_file, where=where)
            row = row_of.get(iid)
            if row is None:
                raise AnnotationError(f"image_id {iid} has no entry in 'images'", file=ann_file, record=where)
        except AnnotationError as exc:
            if on_error != "skip":
                raise
            table.skipped.append(f"{where}: {exc.message}")
            continue
        if row >= 0:
            table.add_text(caption, row, where)
    return table.build()


def read_karpathy(
    ann_file: str | PathLike[str],
    image_root: str | PathLike[str],
    *,
    splits: Collection[str] = ("test",),
) -> CaptionTable:
    """Parse a Karpathy split file (docs/reference/data-formats.md §2) for the given splits.

    The image path is ``image_root/filepath/filename`` when ``filepath`` is present (COCO), else
    ``image_root/filename`` (Flickr30k). The image id is ``cocoid`` when present, else the file name. Texts
    are the ``raw`` sentences.

    Args:
        ann_file: ``dataset_coco.json`` / ``dataset_flickr30k.json``.
        image_root: image folder.
        splits: Karpathy splits to keep (``train``, ``restval``, ``val``, ``test``). The official coarse
            training set is ``("train", "val")`` (docs/reference/data-formats.md §13).

    Raises:
        AnnotationError: malformed file or record (named as ``images[i]`` / ``images[i].sentences[k]``).
    """
    return _karpathy_table(read_json(ann_file), Path(ann_file), Path(image_root), splits)


def _karpathy_table(data: Any, ann_file: Path, root: Path, splits: Collection[str]) -> CaptionTable:
    """:func:`read_karpathy` on parsed JSON."""
    images = require(data, "images", list, file=ann_file, where="top level")
    wanted = set(splits)
    table = CaptionTableBuilder(ann_file)
    for i, rec in enumerate(images):
        where = f"images[{i}]"
        split = require(rec, "split", str, file=ann_file, where=where)
        if split not in wanted:
            continue
        name = require(rec, "filename", str, file=ann_file, where=where)
        folder = rec.get("filepath")
        if folder is not None and not isinstance(folder, str):
            raise AnnotationError("field 'filepath' should be str", file=ann_file, record=where)
        cocoid = rec.get("cocoid")
        if cocoid is not None and (not isinstance(cocoid, int) or isinstance(cocoid, bool)):
            raise AnnotationError("field 'cocoid' should be int", file=ann_file, record=where)
        check_value(cocoid, "cocoid", file=ann_file, where=where)
        sentences = require(rec, "sentences", list, file=ann_file, where=where)
        row = table.add_image(
            cocoid if cocoid is not None else name, root / folder / name if folder else root / name, where
        )
        for k, sent in enumerate(sentences):
            swhere = f"{where}.sentences[{k}]"
            table.add_text(require(sent, "raw", str, file=ann_file, where=swhere), row, swhere)
    return table.build()


class ImageTextDataset(Dataset[ImageTextSample]):
    """One sample per (image, caption) pair of a :class:`CaptionTable`.

    Args:
        table: the parsed annotations.
        transform: PIL image → ``FloatTensor [3, H, W]`` (e.g. :class:`~fiber_data.images.transforms.ImageTransform`).
        deduplicate: drop repeated captions of the same image (docs/reference/training.md §1.1).

    ``dataset[i]`` returns :class:`~fiber_data.types.ImageTextSample` with ``index = i``. A missing or corrupt
    image raises :class:`~fiber_data.errors.ImageLoadError` naming the image file and the caption record.
    """

    def __init__(self, table: CaptionTable, transform: Transform, *, deduplicate: bool = True) -> None:
        self.table = table.deduplicated() if deduplicate else table
        self.transform = transform

    @property
    def source(self) -> str:
        """The annotation file."""
        return self.table.source

    def __len__(self) -> int:
        return len(self.table.texts)

    @property
    def num_images(self) -> int:
        """Number of distinct images referred to by the table."""
        return len(self.table.image_paths)

    def image_id(self, index: int) -> int | str:
        """Image identifier of pair ``index`` without loading the image."""
        value = self.table.image_ids[int(self.table.text_to_image[index])]
        return value.item() if isinstance(value, np.generic) else value

    def caption(self, index: int) -> str:
        """Caption of pair ``index``."""
        return self.table.texts[index]

    def __getitem__(self, index: int) -> ImageTextSample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} pairs")
        index = index % len(self)
        row = int(self.table.text_to_image[index])
        record = f"{self.table.text_records[index]} ({self.table.source})"
        path = self.table.image_paths[row]
        if _decodes_bytes(self.transform):  # e.g. fiber_data.images.tv_decode (torchvision.io)
            pixels = self.transform.from_bytes(read_image_file(path, record=record), source=str(path), record=record)
        else:
            pixels = self.transform(load_image(path, record=record))
        return ImageTextSample(
            image_id=self.image_id(index),
            image=pixels,
            caption=self.table.texts[index],
            index=index,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(pairs={len(self)}, images={self.num_images}, source={self.source!r})"


class CocoCaptionsDataset(ImageTextDataset):
    """(image, caption) pairs of a COCO captions file (docs/reference/data-formats.md §3), duplicates removed.

    Args:
        ann_file: ``captions_*.json``.
        image_root: folder holding the images' ``file_name``.
        transform: PIL image → ``FloatTensor [3, H, W]``.
        deduplicate: drop repeated captions of the same image.
        image_ids: keep only these images.
        on_error: ``"skip"`` leaves out bad caption records (see :func:`read_coco_captions`), counted in
            ``table.skipped_records`` and logged.
    """

    def __init__(
        self,
        ann_file: str | PathLike[str],
        image_root: str | PathLike[str],
        transform: Transform,
        *,
        deduplicate: bool = True,
        image_ids: Collection[int] | None = None,
        on_error: Literal["raise", "skip"] = "raise",
    ) -> None:
        table = read_coco_captions(ann_file, image_root, image_ids=image_ids, on_error=on_error)
        if table.skipped_records:
            logger.warning(
                "%s: skipped %d bad caption records (on_error=skip), first: %s",
                ann_file,
                len(table.skipped_records),
                table.skipped_records[0],
            )
        super().__init__(table, transform, deduplicate=deduplicate)


class KarpathyCaptionsDataset(ImageTextDataset):
    """(image, caption) pairs of the given Karpathy splits (docs/reference/data-formats.md §2), duplicates removed.

    Args:
        ann_file: ``dataset_coco.json`` / ``dataset_flickr30k.json``.
        image_root: image folder (COCO: the folder holding ``train2014/`` and ``val2014/``).
        transform: PIL image → ``FloatTensor [3, H, W]``.
        splits: splits to read; the coarse-stage training set is ``("train", "val")``.
        deduplicate: drop repeated captions of the same image.
    """

    def __init__(
        self,
        ann_file: str | PathLike[str],
        image_root: str | PathLike[str],
        transform: Transform,
        *,
        splits: Collection[str] = ("train", "val"),
        deduplicate: bool = True,
    ) -> None:
        super().__init__(read_karpathy(ann_file, image_root, splits=splits), transform, deduplicate=deduplicate)


class ImageFolderDataset(Dataset[tuple[Tensor, int]]):
    """Images from a list of paths, for batched image encoding (retrieval galleries).

    Args:
        paths: image files.
        transform: PIL image → ``FloatTensor [3, H, W]``.
        records: optional record locator per path, reported in errors.

    ``dataset[i]`` returns ``(image [3, H, W], i)``; the default collate stacks these to ``[B, 3, H, W]`` and
    ``[B]``.
    """

    def __init__(self, paths: Sequence[str], transform: Transform, *, records: Sequence[str] | None = None) -> None:
        if records is not None and len(records) != len(paths):
            raise ValueError("records must have one entry per path")
        self.paths = list(paths)
        self.records = list(records) if records is not None else None
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        record: str | int = self.records[index] if self.records is not None else index
        path = self.paths[index]
        if _decodes_bytes(self.transform):
            return self.transform.from_bytes(
                read_image_file(path, record=record), source=str(path), record=record
            ), index
        return self.transform(load_image(path, record=record)), index


@dataclass(frozen=True)
class RetrievalCorpus:
    """The image gallery and text queries of a retrieval split (all captions kept, duplicates included).

    Attributes:
        source: annotation file.
        image_ids: ``[N]`` image identifiers.
        image_paths: ``N`` image files.
        texts: ``T`` captions.
        text_to_image: ``int64 [T]``, row in ``image_ids`` of the image each caption describes.
        image_records: ``N`` record locators (for errors).
    """

    source: str
    image_ids: np.ndarray
    image_paths: list[str]
    texts: list[str]
    text_to_image: np.ndarray
    image_records: list[str]

    @property
    def num_images(self) -> int:
        return len(self.image_paths)

    @property
    def num_texts(self) -> int:
        return len(self.texts)

    def image_to_texts(self) -> list[np.ndarray]:
        """Per image, the ``int64`` indices of its captions (ascending)."""
        order = np.argsort(self.text_to_image, kind="stable")
        counts = np.bincount(self.text_to_image, minlength=self.num_images)
        return np.split(order, np.cumsum(counts)[:-1])

    def image_dataset(self, transform: Transform) -> ImageFolderDataset:
        """The gallery as a dataset of ``(image [3, H, W], row)``."""
        return ImageFolderDataset(
            self.image_paths, transform, records=[f"{r} ({self.source})" for r in self.image_records]
        )


def load_retrieval_corpus(
    ann_file: str | PathLike[str],
    image_root: str | PathLike[str],
    *,
    split: str = "test",
    drop_images_without_text: bool = True,
) -> RetrievalCorpus:
    """Read a retrieval split from a COCO captions file or a Karpathy JSON (format detected).

    Args:
        ann_file: ``captions_*.json`` (COCO) or ``dataset_*.json`` (Karpathy).
        image_root: image folder.
        split: Karpathy split to read (ignored for COCO captions, which hold one split per file).
        drop_images_without_text: remove gallery images that have no caption.

    Returns:
        The :class:`RetrievalCorpus`.
    """
    data = read_json(ann_file)
    if isinstance(data, dict) and "images" in data and "annotations" not in data:
        table = _karpathy_table(data, Path(ann_file), Path(image_root), (split,))
    else:
        table = _coco_table(data, Path(ann_file), Path(image_root), None)
    image_ids, paths, records, t2i = table.image_ids, table.image_paths, table.image_records, table.text_to_image
    if drop_images_without_text:
        used = np.zeros(len(paths), dtype=bool)
        used[t2i] = True
        if not used.all():
            new_row = np.cumsum(used) - 1
            keep = np.flatnonzero(used)
            image_ids = image_ids[keep]
            paths = [paths[i] for i in keep]
            records = [records[i] for i in keep]
            t2i = new_row[t2i].astype(np.int64)
    return RetrievalCorpus(
        source=table.source,
        image_ids=image_ids,
        image_paths=paths,
        texts=list(table.texts),
        text_to_image=t2i,
        image_records=records,
    )
