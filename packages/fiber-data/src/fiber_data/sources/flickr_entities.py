"""Flickr30k Entities raw files (docs/reference/data-formats.md §10) as grounding data for fine-tuning and evaluation.

Layout under ``root``::

    train.txt, val.txt, test.txt      image ids, one per line
    Annotations/<image id>.xml        boxes per entity (PASCAL-VOC-like; one <object> per box or box-less entity)
    Sentences/<image id>.txt          5 sentences, phrases written "[/EN#<entity id>/<type>[/<type>...] words]"

:func:`read_flickr_entities` gives one :class:`FlickrEntitiesRecord` per (image, sentence) with at least one
boxed phrase, built as MDETR built ``final_flickr_separateGT_*.json`` (§9.2): the caption is the sentence
without the markup, words joined by single spaces; every box of every mentioned entity is kept
("separateGT"), and a box shared by several entities (or repeated) is one box whose ``tokens_positive`` is the
union of their phrase spans. Boxes are the XML integer corners as they are (xyxy, which is the "+1" convention
of docs/reference/data-formats.md §12 for inclusive corners), clamped to the image. Entities without a box (``nobndbox``,
``scene``) and the entity id ``0`` are not grounded. The MDETR IoU ≥ 0.95 clustering of near-identical boxes
is not applied.

:class:`FlickrEntitiesDataset` yields :class:`~fiber_data.types.GroundingSample` like
:class:`~fiber_data.sources.grounding.MdetrGroundingDataset`; :func:`write_flickr_mdetr_json` writes the records as
MDETR-style JSON (with ``tokens_positive_eval`` for the phrase-grounding evaluator).

The XML is parsed with the standard library's expat parser (which refuses entity-expansion bombs since
expat 2.4.1).
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from fiber_data.errors import AnnotationError
from fiber_data.images.transforms import GroundingTransform, load_image
from fiber_data.io import check_index
from fiber_data.types import GroundingSample

__all__ = [
    "FlickrEntitiesDataset",
    "FlickrEntitiesRecord",
    "FlickrPhraseSpan",
    "parse_entities_xml",
    "parse_entities_sentence",
    "read_flickr_entities",
    "write_flickr_mdetr_json",
]

_PHRASE = re.compile(r"\[/EN#(\d+)((?:/[^\s\]]+)+)\s+([^\]]*)\]")


@dataclass(frozen=True)
class FlickrPhraseSpan:
    """One annotated phrase of a caption.

    Attributes:
        entity_id: the Entities id (``"71001"``).
        types: phrase types (``people``, ``clothing``, ``scene``, ``notvisual``, ...).
        span: ``[start, end)`` character span in the caption.
        boxes: indices into the record's ``boxes`` (empty for box-less entities).
    """

    entity_id: str
    types: tuple[str, ...]
    span: tuple[int, int]
    boxes: tuple[int, ...]


@dataclass(frozen=True)
class FlickrEntitiesRecord:
    """One (image, sentence) of Flickr30k Entities.

    Attributes:
        image_id: the Flickr id (``"3385593926"``).
        sentence_index: line number (0-based) in ``Sentences/<id>.txt``.
        file_name: ``"<id>.jpg"``.
        caption: the sentence without markup.
        width, height: image size from the XML.
        boxes: ``float32 [N, 4]`` xyxy of every box of the mentioned entities.
        tokens_positive: per box, the spans of the phrases it grounds.
        phrases: every annotated phrase in sentence order (box-less ones included).
    """

    image_id: str
    sentence_index: int
    file_name: str
    caption: str
    width: int
    height: int
    boxes: np.ndarray
    tokens_positive: tuple[tuple[tuple[int, int], ...], ...]
    phrases: tuple[FlickrPhraseSpan, ...]

    @property
    def tokens_positive_eval(self) -> list[list[list[int]]]:
        """MDETR's ``tokens_positive_eval``: one ``[[start, end]]`` per phrase that has a box, in order."""
        return [[list(p.span)] for p in self.phrases if p.boxes]


def parse_entities_xml(path: str | PathLike[str]) -> tuple[int, int, list[tuple[tuple[str, ...], list[float]]]]:
    """Read ``Annotations/<id>.xml``.

    Returns:
        ``(width, height, [(entity ids, [xmin, ymin, xmax, ymax]), ...])`` for every ``<object>`` with a
        ``<bndbox>``, in file order.

    Raises:
        AnnotationError: missing file, invalid XML, missing size or a malformed box (names the object).
    """
    p = Path(path)
    if not p.is_file():
        raise AnnotationError("Flickr30k Entities annotation not found", file=p)
    try:
        root = ET.parse(p).getroot()
    except ET.ParseError as exc:
        raise AnnotationError(f"invalid XML ({exc})", file=p) from exc
    try:
        width = int(root.findtext("size/width") or "")
        height = int(root.findtext("size/height") or "")
    except ValueError as exc:
        raise AnnotationError("<size> needs integer <width> and <height>", file=p, record="size") from exc
    if width <= 0 or height <= 0:
        raise AnnotationError(f"image size {width}x{height} is not positive", file=p, record="size")
    objects: list[tuple[tuple[str, ...], list[float]]] = []
    for k, obj in enumerate(root.iter("object")):
        bnd = obj.find("bndbox")
        if bnd is None:
            continue
        try:
            box = [float(bnd.findtext(tag) or "") for tag in ("xmin", "ymin", "xmax", "ymax")]
        except ValueError as exc:
            raise AnnotationError("bndbox needs numeric xmin/ymin/xmax/ymax", file=p, record=f"object {k}") from exc
        names = tuple(n.text.strip() for n in obj.findall("name") if n.text and n.text.strip())
        objects.append((names, box))
    return width, height, objects


def parse_entities_sentence(line: str) -> tuple[str, list[tuple[str, tuple[str, ...], tuple[int, int]]]]:
    """Strip the markup of one ``Sentences/<id>.txt`` line.

    Args:
        line: e.g. ``"[/EN#71001/people A boy] kicks [/EN#71002/other a red ball] ."``.

    Returns:
        ``(caption, [(entity id, types, (start, end)), ...])``: the words joined by single spaces and the
        character span of every phrase in it.
    """
    words: list[str] = []
    phrases: list[tuple[str, tuple[str, ...], tuple[int, int]]] = []
    length = 0

    def add(text: str) -> tuple[int, int] | None:
        nonlocal length
        first = None
        for w in text.split():
            if words:
                length += 1  # the joining space
            if first is None:
                first = length
            words.append(w)
            length += len(w)
        return None if first is None else (first, length)

    last = 0
    for m in _PHRASE.finditer(line):
        add(line[last : m.start()])
        span = add(m.group(3))
        if span is not None:
            phrases.append((m.group(1), tuple(m.group(2).strip("/").split("/")), span))
        last = m.end()
    add(line[last:])
    return " ".join(words), phrases


def read_flickr_entities(
    root: str | PathLike[str],
    split: str | None = "train",
    *,
    image_ids: Iterable[str] | None = None,
) -> list[FlickrEntitiesRecord]:
    """Build one record per (image, sentence) with at least one boxed phrase.

    Args:
        root: folder holding ``Annotations/``, ``Sentences/`` and ``<split>.txt``.
        split: reads the image ids from ``<root>/<split>.txt`` unless ``image_ids`` is given.
        image_ids: explicit image ids.

    Raises:
        AnnotationError: a missing split / sentence / annotation file or a malformed one (names the file, and
            the line or object).
    """
    base = Path(root)
    if image_ids is None:
        split_file = base / f"{split}.txt"
        if not split_file.is_file():
            raise AnnotationError("Flickr30k Entities split file not found", file=split_file)
        image_ids = [ln.strip() for ln in split_file.read_text(encoding="utf-8").splitlines() if ln.strip()]
    records: list[FlickrEntitiesRecord] = []
    for image_id in image_ids:
        width, height, objects = parse_entities_xml(base / "Annotations" / f"{image_id}.xml")
        # Entity id -> indices of its distinct boxes (a box named by several entities, or repeated, is one box).
        unique: dict[tuple[float, ...], int] = {}
        entity_boxes: dict[str, list[int]] = {}
        for names, box in objects:
            clamped = (
                min(max(box[0], 0.0), width - 1.0),
                min(max(box[1], 0.0), height - 1.0),
                min(max(box[2], 0.0), width - 1.0),
                min(max(box[3], 0.0), height - 1.0),
            )
            if clamped[2] <= clamped[0] or clamped[3] <= clamped[1]:
                continue  # degenerate after clamping (docs/reference/data-formats.md §9.5)
            k = unique.setdefault(clamped, len(unique))
            for name in names:
                if name != "0" and k not in entity_boxes.setdefault(name, []):
                    entity_boxes[name].append(k)
        all_boxes = list(unique)
        sentence_file = base / "Sentences" / f"{image_id}.txt"
        if not sentence_file.is_file():
            raise AnnotationError("Flickr30k Entities sentences not found", file=sentence_file)
        lines = sentence_file.read_text(encoding="utf-8").splitlines()
        for s_idx, line in enumerate(lines):
            if not line.strip():
                continue
            caption, parsed = parse_entities_sentence(line)
            phrases = []
            spans_of_box: dict[int, list[tuple[int, int]]] = {}
            for eid, types, span in parsed:
                boxes = tuple(entity_boxes.get(eid, ()))
                phrases.append(FlickrPhraseSpan(eid, types, span, ()))
                for b in boxes:
                    spans_of_box.setdefault(b, [])
                    if span not in spans_of_box[b]:
                        spans_of_box[b].append(span)
            if not spans_of_box:
                continue  # every phrase is box-less
            order = sorted(spans_of_box)  # box indices in XML order
            local = {b: i for i, b in enumerate(order)}
            phrases = [
                FlickrPhraseSpan(
                    p.entity_id, p.types, p.span, tuple(local[b] for b in entity_boxes.get(p.entity_id, ()))
                )
                for p in phrases
            ]
            records.append(
                FlickrEntitiesRecord(
                    image_id=str(image_id),
                    sentence_index=s_idx,
                    file_name=f"{image_id}.jpg",
                    caption=caption,
                    width=width,
                    height=height,
                    boxes=np.asarray([all_boxes[b] for b in order], dtype=np.float32).reshape(-1, 4),
                    tokens_positive=tuple(tuple(spans_of_box[b]) for b in order),
                    phrases=tuple(phrases),
                )
            )
    return records


def write_flickr_mdetr_json(records: Iterable[FlickrEntitiesRecord], path: str | PathLike[str]) -> Path:
    """Write records as MDETR-style grounding JSON (docs/reference/data-formats.md §9.2), readable by
    :class:`~fiber_data.sources.grounding.MdetrGroundingDataset`.

    Boxes are written as COCO ``[x, y, w, h]`` with ``w = x2 - x1 + 1`` so that the loader's "+1" conversion
    (§12) gives back the XML corners exactly.
    """
    images, annotations = [], []
    for r in records:
        entry_id = len(images) + 1
        images.append(
            {
                "id": entry_id,
                "file_name": r.file_name,
                "height": r.height,
                "width": r.width,
                "caption": r.caption,
                "dataset_name": "flickr",
                "tokens_negative": [[0, len(r.caption)]],
                "sentence_id": r.sentence_index,
                "original_img_id": int(r.image_id) if r.image_id.isdigit() else r.image_id,
                "tokens_positive_eval": r.tokens_positive_eval,
            }
        )
        for box, spans in zip(r.boxes.tolist(), r.tokens_positive):
            w, h = box[2] - box[0] + 1, box[3] - box[1] + 1
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": entry_id,
                    "category_id": 1,
                    "bbox": [box[0], box[1], w, h],
                    "area": w * h,
                    "iscrowd": 0,
                    "tokens_positive": [list(s) for s in spans],
                }
            )
    payload = {
        "images": images,
        "annotations": annotations,
        "categories": [{"supercategory": "object", "id": 1, "name": "object"}],
    }
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload), encoding="utf-8")
    return out


class FlickrEntitiesDataset(Dataset[GroundingSample]):
    """Flickr30k Entities (image, sentence) grounding samples read from the raw files.

    Args:
        root: the Entities folder (``Annotations/``, ``Sentences/``, ``<split>.txt``).
        split: ``train`` / ``val`` / ``test``.
        image_root: folder of ``<id>.jpg`` (``flickr30k-images``).
        transform: a :class:`~fiber_data.images.transforms.GroundingTransform`.
        generator: RNG for the random resize/flip.
        image_ids: explicit image ids instead of the split file.

    ``sample.image_id`` is ``"<flickr id>:<sentence index>"``; ``dataset_name`` is ``"flickr"``.
    """

    def __init__(
        self,
        root: str | PathLike[str],
        split: str,
        image_root: str | PathLike[str],
        transform: GroundingTransform,
        *,
        generator: torch.Generator | None = None,
        image_ids: Iterable[str] | None = None,
    ) -> None:
        self.root = Path(root)
        self.records = read_flickr_entities(root, split, image_ids=image_ids)
        self.image_root = Path(image_root)
        self.transform = transform
        self.generator = generator
        self.orig_sizes = np.asarray([(r.height, r.width) for r in self.records], dtype=np.int64).reshape(-1, 2)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> GroundingSample:
        check_index(index, len(self), "sentences")
        r = self.records[index]
        where = f"Sentences/{r.image_id}.txt line {r.sentence_index + 1}"
        image = load_image(self.image_root / r.file_name, record=where)
        boxes = r.boxes
        if image.size != (r.width, r.height):
            sx, sy = image.width / r.width, image.height / r.height
            boxes = boxes * np.asarray([sx, sy, sx, sy], dtype=np.float32)
        pixels, tboxes, caption, spans = self.transform.transform_sample(
            image, torch.from_numpy(np.array(boxes)), r.caption, r.tokens_positive, generator=self.generator
        )
        return GroundingSample(
            image_id=f"{r.image_id}:{r.sentence_index}",
            image=pixels,
            caption=caption,
            boxes=tboxes,
            labels=torch.ones(len(r.boxes), dtype=torch.long),
            tokens_positive=spans,
            orig_size=(r.height, r.width),
            index=index,
            dataset_name="flickr",
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sentences={len(self)}, root={str(self.root)!r})"
