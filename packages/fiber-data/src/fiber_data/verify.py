"""Dataset verification: scan every record of an annotation file and every image it names.

Unlike the dataset constructors, which stop at the first problem, :func:`verify_annotations` collects all
problems as :class:`~fiber_data.errors.DataError` objects (each naming the file and the record), so one run
lists everything that must be fixed. Backs ``fiber-data verify``. Formats: docs/reference/data-formats.md §2 (Karpathy),
§3 (COCO captions), §9 (MDETR-style grounding) and §11.2 (COCO detection).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

from fiber_data.errors import AnnotationError, DataError
from fiber_data.io import read_json, require

__all__ = [
    "FORMATS",
    "LAYOUT",
    "VQA_IMAGE_TEMPLATE",
    "VerifyReport",
    "discover_datasets",
    "split_of",
    "verify_annotations",
]


def read_jsonl_lenient(path: Path, report: VerifyReport) -> list[tuple[int, Any]]:
    """``(line number, record)`` of a JSON Lines file; a bad line becomes an error in ``report`` instead."""
    if not path.is_file():
        raise AnnotationError("annotation file not found", file=path)
    out: list[tuple[int, Any]] = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"line {lineno}"
            try:
                line = raw.decode("utf-8")
                if line.strip():
                    out.append((lineno, json.loads(line)))
            except UnicodeDecodeError as exc:
                report.errors.append(AnnotationError(f"not UTF-8 text ({exc.reason})", file=path, record=where))
            except json.JSONDecodeError as exc:
                report.errors.append(AnnotationError(f"invalid JSON: {exc.msg}", file=path, record=where))
            except RecursionError:
                report.errors.append(AnnotationError("JSON nested too deeply to parse", file=path, record=where))
            except ValueError as exc:  # an integer literal longer than Python's int_max_str_digits
                report.errors.append(AnnotationError(f"invalid JSON ({exc})", file=path, record=where))
    return out


@dataclass
class VerifyReport:
    """Result of :func:`verify_annotations`.

    Attributes:
        ann_file: the annotation file.
        format: the format checked.
        num_records: records scanned (images, annotations, sentences).
        num_images: distinct image files checked.
        errors: every problem found.
        warnings: suspicious records the loaders handle by dropping them (degenerate boxes, which become
            ``x2 <= x1`` or ``y2 <= y1`` in the "+1" convention, docs/reference/data-formats.md §9.5); they do not fail the check.
    """

    ann_file: str
    format: str
    num_records: int = 0
    num_images: int = 0
    errors: list[DataError] = field(default_factory=list)
    warnings: list[DataError] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


class _Checker:
    """Runs record checks, turning each failure into a collected error instead of an exception."""

    def __init__(self, report: VerifyReport, ann: Path) -> None:
        self.report = report
        self.ann = ann

    def get(self, record: Any, key: str, types: type | tuple[type, ...], where: str) -> Any:
        try:
            return require(record, key, types, file=self.ann, where=where)
        except AnnotationError as exc:
            self.report.errors.append(exc)
            return None

    def text(self, record: Any, key: str, where: str) -> str | None:
        """A required string field that must not be empty or white space only."""
        value = self.get(record, key, str, where)
        if value is not None and not value.strip():
            self.fail(f"field {key!r} is empty", where)
        return value

    def warn(self, message: str, where: str) -> None:
        self.report.warnings.append(AnnotationError(message, file=self.ann, record=where))

    def fail(self, message: str, where: str) -> None:
        self.report.errors.append(AnnotationError(message, file=self.ann, record=where))

    def list_field(self, data: Any, key: str) -> list[Any]:
        value = self.get(data, key, list, "top level")
        return value if isinstance(value, list) else []


def _images_table(c: _Checker, images: list[Any], root: Path) -> tuple[dict[int, tuple[str | None, str, Any]], int]:
    """Check COCO ``images[]``; returns ``{id: (path or None, where, record)}`` and the number of records.

    An image record with an id but a bad ``file_name`` stays in the table (path ``None``) so that its
    annotations do not also report a missing image.
    """
    table: dict[int, tuple[str | None, str, Any]] = {}
    for i, rec in enumerate(images):
        where = f"images[{i}]"
        iid = c.get(rec, "id", int, where)
        name = c.get(rec, "file_name", str, where)
        if iid is None:
            continue
        if iid in table:
            c.fail(f"duplicate image id {iid} (first at {table[iid][1]})", where)
            continue
        table[iid] = (str(root / name) if name is not None else None, where, rec)
    return table, len(images)


def _files(table: dict[int, tuple[str | None, str, Any]]) -> Iterator[tuple[str, str]]:
    """Distinct image files of a table with the first record naming each."""
    seen: set[str] = set()
    for path, where, _ in table.values():
        if path is not None and path not in seen:
            seen.add(path)
            yield path, where


def _check_coco_captions(c: _Checker, data: Any, root: Path) -> Iterator[tuple[str, str]]:
    table, n = _images_table(c, c.list_field(data, "images"), root)
    anns = c.list_field(data, "annotations")
    for j, rec in enumerate(anns):
        where = f"annotations[{j}]"
        iid = c.get(rec, "image_id", int, where)
        c.text(rec, "caption", where)
        if iid is not None and iid not in table:
            c.fail(f"image_id {iid} has no entry in 'images'", where)
    c.report.num_records = n + len(anns)
    yield from _files(table)


def _number(value: Any) -> bool:
    """A finite JSON number (``NaN``/``Infinity``, which Python's json reads, are not)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer beyond float range
        return False


def _check_boxes(c: _Checker, data: Any, table: dict[int, tuple[str | None, str, Any]], *, grounding: bool) -> int:
    anns = c.list_field(data, "annotations")
    categories = data.get("categories", []) if isinstance(data, dict) else []
    cat_ids = set()
    for k, cat in enumerate(categories if isinstance(categories, list) else []):
        cid = c.get(cat, "id", int, f"categories[{k}]")
        c.get(cat, "name", str, f"categories[{k}]")
        cat_ids.add(cid)
    for j, rec in enumerate(anns):
        where = f"annotations[{j}]"
        iid = c.get(rec, "image_id", int, where)
        cid = c.get(rec, "category_id", int, where)
        if cid is not None and cat_ids and cid not in cat_ids:
            c.fail(f"category_id {cid} is not in 'categories'", where)
        bbox = c.get(rec, "bbox", list, where)
        image = table.get(iid) if iid is not None else None
        if iid is not None and image is None:
            c.fail(f"image_id {iid} has no entry in 'images'", where)
        if bbox is not None:
            if len(bbox) != 4 or not all(_number(v) for v in bbox):
                c.fail(f"bbox should be four finite numbers [x, y, w, h], got {bbox!r:.80}", where)
            elif bbox[2] < 0 or bbox[3] < 0:
                c.fail(f"bbox has negative width/height: {bbox}", where)
            elif bbox[2] <= 1 or bbox[3] <= 1:
                c.warn(f"degenerate bbox {bbox} (width or height <= 1 pixel; the loaders drop it)", where)
            elif image is not None:
                w_img, h_img = image[2].get("width"), image[2].get("height")
                try:
                    w_img, h_img = float(w_img), float(h_img)  # Flickr files store them as strings
                except (TypeError, ValueError, OverflowError):
                    w_img = h_img = None
                if w_img is not None and h_img is not None:
                    x, y, w, h = bbox
                    if x < -1 or y < -1 or x + w > w_img + 1 or y + h > h_img + 1:
                        c.fail(f"bbox {bbox} lies outside the {w_img:g}x{h_img:g} image", where)
        if grounding and image is not None:
            spans = c.get(rec, "tokens_positive", list, where)
            caption = image[2].get("caption")
            for span in spans or []:
                if not (isinstance(span, list) and len(span) == 2 and all(isinstance(v, int) for v in span)):
                    c.fail(f"tokens_positive entry {span!r:.40} is not [start, end]", where)
                elif isinstance(caption, str) and not 0 <= span[0] < span[1] <= len(caption):
                    c.fail(f"tokens_positive span {span} outside the caption (length {len(caption)})", where)
    return len(anns) + len(categories if isinstance(categories, list) else [])


def _check_coco_detection(c: _Checker, data: Any, root: Path) -> Iterator[tuple[str, str]]:
    table, n = _images_table(c, c.list_field(data, "images"), root)
    c.report.num_records = n + _check_boxes(c, data, table, grounding=False)
    yield from _files(table)


def _check_grounding(c: _Checker, data: Any, root: Path) -> Iterator[tuple[str, str]]:
    table, n = _images_table(c, c.list_field(data, "images"), root)
    for _, where, rec in table.values():
        c.text(rec, "caption", where)
    c.report.num_records = n + _check_boxes(c, data, table, grounding=True)
    yield from _files(table)  # one entry per (image, text): each file is checked once


def _check_karpathy(c: _Checker, data: Any, root: Path) -> Iterator[tuple[str, str]]:
    images = c.list_field(data, "images")
    n = 0
    paths: list[tuple[str, str]] = []
    for i, rec in enumerate(images):
        where = f"images[{i}]"
        n += 1
        c.get(rec, "split", str, where)
        name = c.get(rec, "filename", str, where)
        folder = rec.get("filepath") if isinstance(rec, dict) else None
        sentences = c.get(rec, "sentences", list, where)
        for k, sent in enumerate(sentences or []):
            n += 1
            c.text(sent, "raw", f"{where}.sentences[{k}]")
        if name is not None:
            paths.append((str(root / folder / name) if isinstance(folder, str) else str(root / name), where))
    c.report.num_records = n
    yield from paths


def _check_vqa_questions(c: _Checker, data: Any, root: Path, template: str) -> Iterator[tuple[str, str]]:
    questions = c.list_field(data, "questions")
    subtype = data.get("data_subtype", "") if isinstance(data, dict) else ""
    subtype = subtype.replace("test-dev", "test") if isinstance(subtype, str) else ""
    seen: dict[int, str] = {}
    files: dict[str, str] = {}
    for i, q in enumerate(questions):
        where = f"questions[{i}]"
        qid = c.get(q, "question_id", int, where)
        iid = c.get(q, "image_id", int, where)
        c.text(q, "question", where)
        if qid is not None:
            if qid in seen:
                c.fail(f"duplicate question_id {qid} (first at {seen[qid]})", where)
            seen[qid] = where
        if iid is not None:
            files.setdefault(str(root / template.format(subtype=subtype, image_id=iid)), where)
    c.report.num_records = len(questions)
    yield from files.items()


def _check_nlvr2(c: _Checker, lines: list[tuple[int, Any]], root: Path) -> Iterator[tuple[str, str]]:
    files: dict[str, str] = {}
    for lineno, rec in lines:
        where = f"line {lineno}"
        ident = c.get(rec, "identifier", str, where)
        c.text(rec, "sentence", where)
        label = rec.get("label") if isinstance(rec, dict) else None
        if label not in (None, "True", "False"):
            c.fail(f"label should be 'True' or 'False', got {label!r}", where)
        if ident is None:
            continue
        parts = ident.split("-")
        if len(parts) < 4:
            c.fail(f"identifier {ident!r} is not <split>-<set>-<pair>-<sentence>", where)
            continue
        folder = root / str(rec["directory"]) if "directory" in rec else root
        stem = "-".join(parts[:-1])
        for side in ("img0", "img1"):
            files.setdefault(str(folder / f"{stem}-{side}.png"), where)
    c.report.num_records = len(lines)
    yield from files.items()


FORMATS: dict[str, Callable[[_Checker, Any, Path], Iterator[tuple[str, str]]]] = {
    "coco-captions": _check_coco_captions,
    "coco-detection": _check_coco_detection,
    "grounding": _check_grounding,
    "karpathy": _check_karpathy,
    "nlvr2": _check_nlvr2,
    "vqa-questions": lambda c, data, root: _check_vqa_questions(c, data, root, VQA_IMAGE_TEMPLATE),
}
#: Default VQAv2 image file name (see :class:`~fiber_data.sources.vqa.VQAv2Dataset`).
VQA_IMAGE_TEMPLATE = "COCO_{subtype}_{image_id:012d}.jpg"


def verify_annotations(
    format: str,
    ann_file: str | PathLike[str],
    image_root: str | PathLike[str],
    *,
    check_images: bool = True,
    progress: Callable[[int], object] | None = None,
    image_template: str | None = None,
) -> VerifyReport:
    """Scan an annotation file and the images it names, collecting every problem.

    Args:
        format: one of :data:`FORMATS` (``coco-captions``, ``coco-detection``, ``grounding``, ``karpathy``,
            ``nlvr2`` (JSON Lines), ``vqa-questions`` (a VQAv2 questions file)).
        ann_file: the annotation file.
        image_root: folder the file names are relative to.
        check_images: open and fully decode every referenced image.
        progress: called with 1 after each image checked.
        image_template: ``vqa-questions`` only: image file name pattern (default :data:`VQA_IMAGE_TEMPLATE`).

    Returns:
        The :class:`VerifyReport`; ``report.ok`` is true when nothing is wrong.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose from {sorted(FORMATS)}")
    ann = Path(ann_file)
    report = VerifyReport(ann_file=str(ann), format=format)
    try:
        data = read_jsonl_lenient(ann, report) if format == "nlvr2" else read_json(ann)
    except AnnotationError as exc:
        report.errors.append(exc)
        return report
    checker = _Checker(report, ann)
    if format == "vqa-questions" and image_template is not None:
        images = list(_check_vqa_questions(checker, data, Path(image_root), image_template))
    else:
        images = list(FORMATS[format](checker, data, Path(image_root)))
    report.num_images = len(images)
    if check_images:
        for path, where in images:
            try:
                from fiber_data.images.transforms import load_image  # torch: imported when images are checked

                load_image(path, record=f"{where} ({ann.name})")
            except DataError as exc:
                report.errors.append(exc)
            if progress is not None:
                progress(1)
    return report


#: Where each format's annotation files live inside a dataset directory (globs relative to it), for
#: ``fiber-data verify DIR``. Covers the synthetic world's layout and the official file names.
LAYOUT: dict[str, tuple[str, ...]] = {
    "coco-captions": ("annotations/captions_*.json",),
    "coco-detection": ("annotations/instances_*.json",),
    "grounding": (
        "annotations/grounding_*.json",
        "annotations/refexp_*.json",
        "annotations/final_*.json",
        "annotations/finetune_*.json",
        "mdetr_annotations/*.json",
    ),
    "karpathy": ("annotations/karpathy.json", "annotations/dataset_*.json", "dataset_*.json"),
    "nlvr2": ("nlvr2/*.json", "data/*.json"),
    "vqa-questions": ("annotations/*questions*.json", "*questions*.json"),
}
_NOT_SPLITS = {"questions", "annotations", "corrected", "separategt", "mergedgt", "karpathy"}


def split_of(ann_file: str | PathLike[str]) -> str | None:
    """The split named in an annotation file name: the last ``_``-separated part of the stem that is not a
    format word (``captions_train2017`` → ``train2017``, ``v2_OpenEnded_mscoco_val2014_questions`` →
    ``val2014``, ``nlvr2/dev`` → ``dev``), with ``test-dev`` mapped to ``test`` (its images' folder)."""
    parts = [p for p in Path(ann_file).stem.split("_") if p.lower() not in _NOT_SPLITS]
    if not parts:
        return None
    return parts[-1].replace("test-dev", "test")


def discover_datasets(
    format: str, root: str | PathLike[str], image_root: str | PathLike[str] | None = None
) -> list[tuple[Path, Path]]:
    """``(annotation file, image folder)`` pairs of ``format`` found in a dataset directory.

    Annotation files are found with :data:`LAYOUT`. The image folder of each is ``image_root`` when given,
    else the first existing one of ``<ann dir>/images/<split>``, ``root/images/<split>``, ``root/<split>``,
    ``root/images``, ``root`` (Karpathy files: ``root/images`` then ``root``, since their paths carry the
    split folder).

    Raises:
        ValueError: unknown format.
        AnnotationError: ``root`` is not a directory or holds no annotation file of the format.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose from {sorted(FORMATS)}")
    base = Path(root)
    if not base.is_dir():
        raise AnnotationError("dataset directory not found", file=base)
    found: list[Path] = []
    for pattern in LAYOUT[format]:
        for p in sorted(base.glob(pattern)):
            if p.is_file() and p not in found:
                found.append(p)
    if not found:
        raise AnnotationError(f"no {format} annotation file found (looked for {', '.join(LAYOUT[format])})", file=base)
    out = []
    for ann in found:
        if image_root is not None:
            out.append((ann, Path(image_root)))
            continue
        split = None if format == "karpathy" else split_of(ann)
        candidates = [base / "images", base]
        if split:
            candidates = [ann.parent / "images" / split, base / "images" / split, base / split, *candidates]
        out.append((ann, next((c for c in candidates if c.is_dir()), candidates[0])))
    return out
