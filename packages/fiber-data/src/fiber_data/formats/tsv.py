"""Objects365-style TSV detection bundles (docs/reference/data-formats.md §11.1), read as grounding data (docs/reference/training.md §3.8).

A bundle is a set of line-aligned TSV files with ``.lineidx`` companions (the byte offset of every line):

- images: ``<key>\\t<base64 JPEG>``;
- labels: ``<key>\\t<JSON list of {"class": str, "rect": [x1, y1, x2, y2], "conf"?: float}>``;
- optional sizes: ``<key>\\t[{"height": h, "width": w}]``;
- optional line list: the line numbers to use, with repeats (class-aware resampling);
- label map: ``{"<class name>": id}`` JSON (the reference adds ``__background__`` = 0; the project does not).

Lines are read by seeking to their offset, so nothing but the offsets is held in memory; file handles are
opened lazily in each DataLoader worker.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from os import PathLike
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch.utils.data import Dataset

from fiber_data.errors import AnnotationError
from fiber_data.images.transforms import GroundingTransform, load_image_bytes
from fiber_data.io import check_index, check_value, iter_lines, read_json
from fiber_data.prompts import DetectionPromptSampler, build_prompt
from fiber_data.sampling import EpochSeeded
from fiber_data.types import GroundingSample

__all__ = ["TSVDetectionDataset", "build_lineidx", "write_tsv"]


def build_lineidx(tsv: str | PathLike[str]) -> Path:
    """Write ``<file>.lineidx`` (one byte offset per line) next to ``tsv`` and return its path."""
    p = Path(tsv)
    offsets = []
    with p.open("rb") as f:
        pos = 0
        for line in f:
            offsets.append(pos)
            pos += len(line)
    out = p.with_suffix(".lineidx")
    out.write_text("".join(f"{o}\n" for o in offsets))
    return out


def write_tsv(path: str | PathLike[str], rows: list[tuple[str, str]]) -> Path:
    """Write ``key\\tvalue`` rows and their ``.lineidx``; returns the TSV path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", encoding="utf-8", newline="\n") as f:
        for key, value in rows:
            if "\t" in key or "\n" in key or "\n" in value:
                raise ValueError(f"row {key!r}: keys and values must not contain tabs/newlines")
            f.write(f"{key}\t{value}\n")
    build_lineidx(p)
    return p


def _read_offsets(idx: Path, size: int) -> np.ndarray:
    """The byte offsets of a ``.lineidx`` file, checked to lie inside the TSV (``size`` bytes).

    Raises:
        AnnotationError: a line that is not a non-negative integer, or an offset past the end of the TSV.
    """
    offsets: list[int] = []
    for lineno, text in iter_lines(idx):
        if not text.strip():
            continue
        value = text.split()[0]
        if not value.isdigit():
            raise AnnotationError(f"expected a byte offset, got {value!r:.40}", file=idx, record=f"line {lineno}")
        offset = int(value)
        if offset >= max(size, 1):
            raise AnnotationError(
                f"offset {offset} is past the end of the TSV ({size} bytes); rebuild the .lineidx",
                file=idx,
                record=f"line {lineno}",
            )
        offsets.append(offset)
    return np.asarray(offsets, dtype=np.int64)


def _read_linelist(path: Path, num_lines: int) -> np.ndarray:
    """Line numbers of a line list (first integer of each non-empty line), each checked against the TSV.

    Raises:
        AnnotationError: a missing file, a line that is not an integer, or a line number out of range.
    """
    if not path.is_file():
        raise AnnotationError("line list not found", file=path)
    lines: list[int] = []
    for lineno, text in iter_lines(path):
        if not text.strip():
            continue
        value = text.split()[0]
        if not value.isdigit() or int(value) >= num_lines:
            raise AnnotationError(
                f"expected a line number in [0, {num_lines}), got {value!r:.40}", file=path, record=f"line {lineno}"
            )
        lines.append(int(value))
    return np.asarray(lines, dtype=np.int64)


def _number(value: Any) -> bool:
    """A finite JSON number (``bool`` excluded; huge integers are not finite as ``float32``)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return abs(value) < 2**63
    return isinstance(value, float) and math.isfinite(value)


class _TSVFile:
    """Random access to the lines of a TSV file through its ``.lineidx``."""

    def __init__(self, path: str | PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise AnnotationError("TSV file not found", file=self.path)
        idx = self.path.with_suffix(".lineidx")
        if not idx.is_file():
            idx = build_lineidx(self.path)
        self.offsets = _read_offsets(idx, self.path.stat().st_size)
        self._handle: IO[bytes] | None = None

    def __len__(self) -> int:
        return len(self.offsets)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handle"] = None  # never ship an open file to a worker
        return state

    def row(self, line: int) -> tuple[str, str]:
        if not 0 <= line < len(self.offsets):
            raise AnnotationError(f"line {line} out of range ({len(self.offsets)} lines)", file=self.path)
        if self._handle is None:
            self._handle = self.path.open("rb")
        self._handle.seek(int(self.offsets[line]))
        raw = self._handle.readline()
        try:
            text = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as exc:
            raise AnnotationError(f"not UTF-8 text ({exc.reason})", file=self.path, record=f"line {line}") from exc
        key, sep, value = text.partition("\t")
        if not sep:
            raise AnnotationError("expected '<key>\\t<value>'", file=self.path, record=f"line {line}")
        return key, value


class TSVDetectionDataset(EpochSeeded, Dataset[GroundingSample]):
    """Detection samples from a TSV bundle, with class-name prompts.

    Args:
        image_tsv: ``images.tsv`` (base64 images).
        label_tsv: ``train.label.tsv`` (line-aligned with ``image_tsv``).
        labelmap: ``{"class": id}`` JSON file (ids >= 1; no background entry needed).
        transform: a :class:`~fiber_data.images.transforms.GroundingTransform`.
        hw_tsv: optional sizes TSV; without it the decoded image gives the size.
        linelist: optional file of line numbers to use (first integer of each line; repeats allowed).
        sampler: training prompt sampler over :attr:`label_names`; ``None`` = all classes in one caption.
        seed: base seed of the per-sample prompt RNG (with the epoch from :meth:`set_epoch`).

    Attributes:
        label_names: label id → class name.
    """

    def __init__(
        self,
        image_tsv: str | PathLike[str],
        label_tsv: str | PathLike[str],
        labelmap: str | PathLike[str],
        transform: GroundingTransform,
        *,
        hw_tsv: str | PathLike[str] | None = None,
        linelist: str | PathLike[str] | None = None,
        sampler: DetectionPromptSampler | None = None,
        seed: int = 0,
    ) -> None:
        self.images = _TSVFile(image_tsv)
        self.labels_file = _TSVFile(label_tsv)
        if len(self.images) != len(self.labels_file):
            raise AnnotationError(
                f"{len(self.images)} image lines but {len(self.labels_file)} label lines", file=label_tsv
            )
        self.hw = _TSVFile(hw_tsv) if hw_tsv is not None else None
        mapping = read_json(labelmap)
        if not isinstance(mapping, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in mapping.values()
        ):
            raise AnnotationError('expected {"class name": int id}', file=labelmap)
        for k, v in mapping.items():
            check_value(v, k, file=labelmap, where=f"class {k!r:.40}")
            check_value(k, "class name", file=labelmap, where=f"class {k!r:.40}")
        self.class_to_label = {str(k): int(v) for k, v in mapping.items() if k != "__background__" and v != 0}
        self.label_names = {v: k for k, v in self.class_to_label.items()}
        if linelist is not None:
            self.lines = _read_linelist(Path(linelist), len(self.images))
        else:
            self.lines = np.arange(len(self.images), dtype=np.int64)
        self.transform = transform
        self.sampler = sampler
        self.seed = seed
        self._all_prompt = build_prompt(sorted(self.label_names), self.label_names)

    def __len__(self) -> int:
        return len(self.lines)

    def annotation(self, index: int) -> tuple[str, np.ndarray, np.ndarray]:
        """``(key, boxes [N, 4] xyxy as stored, labels [N])`` of sample ``index`` (before clamping)."""
        line = int(self.lines[index])
        key, value = self.labels_file.row(line)
        try:
            objects = json.loads(value)
        except (ValueError, RecursionError) as exc:  # ValueError: bad JSON, or a 5000-digit integer
            raise AnnotationError(f"invalid JSON ({exc})", file=self.labels_file.path, record=f"line {line}") from exc
        if not isinstance(objects, list):
            raise AnnotationError(
                f"expected a JSON list of objects, got {type(objects).__name__}",
                file=self.labels_file.path,
                record=f"line {line}",
            )
        boxes, labels = [], []
        for k, obj in enumerate(objects):
            cls = obj.get("class") if isinstance(obj, dict) else None
            rect = obj.get("rect") if isinstance(obj, dict) else None
            if (
                not isinstance(cls, str)
                or cls not in self.class_to_label
                or not (isinstance(rect, list) and len(rect) == 4 and all(_number(v) for v in rect))
            ):
                raise AnnotationError(
                    f"object {k}: needs a known 'class' and a 4-number 'rect', got {obj!r:.80}",
                    file=self.labels_file.path,
                    record=f"line {line}",
                )
            boxes.append([float(v) for v in rect])
            labels.append(self.class_to_label[cls])
        return key, np.asarray(boxes, dtype=np.float32).reshape(-1, 4), np.asarray(labels, dtype=np.int64)

    def _size(self, line: int) -> tuple[int, int]:
        """``(height, width)`` of ``line`` from the sizes TSV (``[{"height": h, "width": w}]`` or the dict)."""
        assert self.hw is not None
        _, hw_value = self.hw.row(line)
        try:
            hw = json.loads(hw_value)
        except (ValueError, RecursionError) as exc:  # ValueError: bad JSON, or a 5000-digit integer
            raise AnnotationError(f"invalid JSON ({exc})", file=self.hw.path, record=f"line {line}") from exc
        entry = hw[0] if isinstance(hw, list) and hw else hw
        h = entry.get("height") if isinstance(entry, dict) else None
        w = entry.get("width") if isinstance(entry, dict) else None
        if not (
            isinstance(h, int) and isinstance(w, int) and all(not isinstance(v, bool) and 0 < v < 2**31 for v in (h, w))
        ):
            raise AnnotationError(
                f'expected [{{"height": h, "width": w}}] with positive integers, got {hw_value!r:.80}',
                file=self.hw.path,
                record=f"line {line}",
            )
        return int(h), int(w)

    def __getitem__(self, index: int) -> GroundingSample:
        check_index(index, len(self), "samples")
        line = int(self.lines[index])
        key, boxes, labels = self.annotation(index)
        image_key, b64 = self.images.row(line)
        if image_key != key:
            raise AnnotationError(
                f"image key {image_key!r} does not match label key {key!r}",
                file=self.images.path,
                record=f"line {line}",
            )
        try:
            data = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise AnnotationError(f"invalid base64 ({exc})", file=self.images.path, record=f"line {line}") from exc
        image = load_image_bytes(data, source=str(self.images.path), record=f"line {line} ({key})")
        w, h = image.size
        if self.hw is not None:
            h, w = self._size(line)
        boxes = boxes.copy()
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, w - 1)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, h - 1)
        valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, labels = boxes[valid], labels[valid]
        if self.sampler is None:
            prompt = self._all_prompt
        else:
            prompt = self.sampler(labels.tolist(), self.epoch_rng(index))
        keep = np.asarray([int(lab) in prompt.spans for lab in labels], dtype=bool)
        boxes, labels = boxes[keep], labels[keep]
        if image.size != (w, h):
            sx, sy = image.width / w, image.height / h
            boxes = boxes * np.asarray([sx, sy, sx, sy], dtype=np.float32)
        pixels, tboxes = self.transform(image, torch.from_numpy(boxes))
        return GroundingSample(
            image_id=key,
            image=pixels,
            caption=prompt.caption,
            boxes=tboxes,
            labels=torch.from_numpy(labels),
            tokens_positive=tuple(tuple(s) for s in prompt.tokens_positive(labels.tolist())),
            orig_size=(h, w),
            index=index,
            dataset_name="tsv",
        )
