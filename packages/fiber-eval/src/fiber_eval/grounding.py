"""Flickr30k Entities phrase grounding, R@k with the ANY-box protocol (docs/reference/evaluation.md §6, docs/reference/data-formats.md §10).

Ground truth comes from the raw Entities files (``Annotations/<id>.xml``, ``Sentences/<id>.txt`` and a split
list). The evaluated phrases of a sentence are its annotated phrases whose entity has at least one box, in
sentence order; sentences without such a phrase are skipped. For each phrase the model gives a ranked box
list; the phrase is a hit at k if the max IoU between its first k boxes and *any* GT box of the entity is
≥ 0.5 (``merged=True``: against the single enclosing box of the entity's boxes instead). IoU uses the
continuous formula on the integer XML corners as stored (no −1). ``R@k = 100 · hits / phrases``, overall and
per phrase type (a phrase with several types counts in each); ``R@upper`` uses every predicted box.

An empty box list is a miss (no dummy ``[0, 0, 0, 0]`` box is needed); a missing sentence is an error; a
repeated prediction for a sentence keeps the first (with a warning when they differ). A prediction with no box
list for a sentence without a boxed phrase (``boxes: []``, as the MDETR files hold) is skipped and counted
when the ground truth keeps such sentences (``load_flickr_entities(..., keep_unevaluated=True)``, as the CLI
does). Predicted boxes are checked for the xyxy format (see ``box_format``).
"""

from __future__ import annotations

import math
import re
import warnings
import xml.etree.ElementTree as ET
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fiber_eval._io import PredictionFormatError, prediction_records
from fiber_eval.boxes import BoxFormat, check_box_format, convert_boxes, pairwise_iou
from fiber_eval.distributed import gather_items, merge_unique
from fiber_eval.types import AccumulatingEvaluator, GatherObjects, PhraseBoxes

__all__ = [
    "FlickrEntitiesEvaluator",
    "FlickrPhrase",
    "load_flickr_entities",
    "load_phrase_predictions",
    "parse_flickr_annotation",
    "parse_flickr_sentence",
]

_PHRASE = re.compile(r"\[/EN#(\d+)((?:/[^\s\]]+)+)\s+([^\]]*)\]")


@dataclass(frozen=True)
class FlickrPhrase:
    """One evaluated phrase.

    Attributes:
        text: the phrase words.
        entity_id: the Entities id (``"71001"``).
        types: phrase types (``people``, ``clothing``, ...).
        boxes: ``float [M, 4]`` xyxy GT boxes of the entity (M ≥ 1).
        image_wh: ``(width, height)`` of the image when the annotation gives it (box plausibility checks).
    """

    text: str
    entity_id: str
    types: tuple[str, ...]
    boxes: np.ndarray
    image_wh: tuple[float, float] | None = None


def parse_flickr_sentence(line: str) -> list[tuple[str, str, tuple[str, ...]]]:
    """Extracts the annotated phrases of one ``Sentences/<id>.txt`` line.

    Args:
        line: e.g. ``"[/EN#71001/people A boy] kicks [/EN#71002/other a red ball] ."``.

    Returns:
        ``[(phrase text, entity id, types), ...]`` in sentence order.
    """
    return [(m.group(3).strip(), m.group(1), tuple(m.group(2).strip("/").split("/"))) for m in _PHRASE.finditer(line)]


def parse_flickr_annotation(path: str | Path) -> dict[str, np.ndarray]:
    """Reads the boxes of every entity from an ``Annotations/<id>.xml`` file.

    Returns:
        entity id → ``float [M, 4]`` xyxy boxes as stored (integer corners). Box-less entities (``nobndbox``,
        ``scene``) are absent; a box listed under several ``<name>`` elements belongs to each.

    Raises:
        PredictionFormatError: naming the file for unreadable XML or a malformed ``bndbox``.
    """
    return _parse_annotation(path)[0]


def _parse_annotation(path: str | Path) -> tuple[dict[str, np.ndarray], tuple[float, float] | None]:
    """:func:`parse_flickr_annotation` plus the image ``(width, height)`` of ``<size>`` (``None`` if absent)."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise PredictionFormatError(f"{path}: invalid XML: {e}") from e
    boxes: dict[str, list[list[float]]] = defaultdict(list)
    for k, obj in enumerate(root.iter("object")):
        bnd = obj.find("bndbox")
        if bnd is None:
            continue
        try:
            # float(None) for a missing tag raises the TypeError handled below
            box = [float(bnd.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax")]  # pyright: ignore[reportArgumentType]
        except (TypeError, ValueError) as e:
            raise PredictionFormatError(f"{path}: object {k} has a malformed bndbox") from e
        for name in obj.findall("name"):
            if name.text and name.text.strip() != "0":
                boxes[name.text.strip()].append(box)
    size: tuple[float, float] | None = None
    try:
        # float(None) for a missing tag raises the TypeError handled below
        size = (float(root.findtext("size/width")), float(root.findtext("size/height")))  # pyright: ignore[reportArgumentType]
    except (TypeError, ValueError):
        size = None
    return {eid: np.array(b, dtype=np.float64) for eid, b in boxes.items()}, size


def load_flickr_entities(
    root: str | Path,
    split: str = "test",
    *,
    image_ids: Iterable[str] | None = None,
    keep_unevaluated: bool = False,
) -> dict[tuple[str, int], list[FlickrPhrase]]:
    """Builds the evaluated phrases of a split from the raw Entities files.

    Args:
        root: folder holding ``Annotations/``, ``Sentences/`` and ``<split>.txt``.
        split: ``val`` or ``test`` (reads ``<root>/<split>.txt``) unless ``image_ids`` is given.
        image_ids: explicit image ids instead of the split file.
        keep_unevaluated: also map sentences without a boxed phrase, to an empty list: the evaluator then
            skips (and counts) predictions with no box list for them, as the MDETR files do, instead of
            refusing them as unknown sentences.

    Returns:
        ``(image id, sentence index) → phrases`` for every sentence with at least one evaluated phrase (and,
        with ``keep_unevaluated``, ``[]`` for the others).

    Raises:
        FileNotFoundError: for a missing split, annotation or sentence file (the path is named).
    """
    root = Path(root)
    if image_ids is None:
        split_file = root / f"{split}.txt"
        if not split_file.is_file():
            raise FileNotFoundError(f"Flickr30k Entities split file not found: {split_file}")
        image_ids = [ln.strip() for ln in split_file.read_text().splitlines() if ln.strip()]
    out: dict[tuple[str, int], list[FlickrPhrase]] = {}
    for image_id in image_ids:
        ann_path = root / "Annotations" / f"{image_id}.xml"
        sent_path = root / "Sentences" / f"{image_id}.txt"
        for p in (ann_path, sent_path):
            if not p.is_file():
                raise FileNotFoundError(f"Flickr30k Entities file not found: {p}")
        entity_boxes, size = _parse_annotation(ann_path)
        for s_idx, line in enumerate(sent_path.read_text(encoding="utf-8").splitlines()):
            phrases = [
                FlickrPhrase(text, eid, types, entity_boxes[eid], size)
                for text, eid, types in parse_flickr_sentence(line)
                if eid in entity_boxes
            ]
            if phrases or keep_unevaluated:
                out[(str(image_id), s_idx)] = phrases
    return out


def load_phrase_predictions(path: str | Path) -> list[PhraseBoxes]:
    """Reads ``[{"image_id": str, "sentence_index": int, "boxes": [[[x1,y1,x2,y2], ...], ...]}, ...]``
    (one ranked box list per evaluated phrase).

    Raises:
        PredictionFormatError: naming the file and record index of a malformed record.
    """
    out = []
    for record, rec in prediction_records(path, ("image_id", "sentence_index", "boxes")):
        where = f"{record} (image_id={rec['image_id']}, sentence_index={rec['sentence_index']})"
        if not isinstance(rec["boxes"], list):
            raise PredictionFormatError(f"{where}: 'boxes' must be a list with one box list per phrase")
        lists = []
        for j, boxes in enumerate(rec["boxes"]):
            try:
                lists.append(np.asarray(boxes, dtype=np.float64).reshape(-1, 4))
            except (TypeError, ValueError) as e:
                raise PredictionFormatError(f"{where}: phrase {j} boxes must be [K, 4] numbers") from e
        out.append(PhraseBoxes(str(rec["image_id"]), int(rec["sentence_index"]), lists))
    return out


class FlickrEntitiesEvaluator(AccumulatingEvaluator[PhraseBoxes]):
    """Accumulates :class:`~fiber_eval.types.PhraseBoxes` and computes R@k (ANY-box or MERGED).

    Args:
        gt: output of :func:`load_flickr_entities` (sentences mapped to ``[]`` have no boxed phrase: a
            prediction with no box list for them is skipped and counted in ``num_skipped_sentences``).
        ks: the k of R@k (1, 5, 10).
        merged: evaluate against each entity's enclosing box (MERGED protocol) instead of ANY box.
        box_format: the format of the predicted boxes: ``"xyxy"`` (expected) or ``"xywh"`` (converted).
            Boxes that look like the other format are refused (see :func:`fiber_eval.boxes.check_box_format`).

    ``compute`` returns ``R@k``, ``R@upper`` and ``R@k/<type>`` in percent, and ``num_phrases`` (plus
    ``num_skipped_sentences`` when some were skipped).
    """

    def __init__(
        self,
        gt: Mapping[tuple[str, int], Sequence[FlickrPhrase]],
        *,
        ks: Sequence[int] = (1, 5, 10),
        merged: bool = False,
        box_format: BoxFormat = "xyxy",
    ) -> None:
        if box_format not in ("xyxy", "xywh"):
            raise ValueError(f"box_format must be 'xyxy' or 'xywh', got {box_format!r}")
        self.gt = {(str(k[0]), int(k[1])): list(v) for k, v in gt.items()}
        self.ks = tuple(int(k) for k in ks)
        self.merged = merged
        self.box_format: BoxFormat = box_format
        self._items: list[PhraseBoxes] = []

    def check(self, prediction: PhraseBoxes, index: int) -> None:
        """Raises ``KeyError`` for a sentence that is not in the ground truth, ``ValueError`` when the number of box
        lists differs from the number of evaluated phrases."""
        p = prediction
        key = (str(p.image_id), int(p.sentence_index))
        if key not in self.gt:
            raise KeyError(f"phrase boxes for image {key[0]} sentence {key[1]}, which is not an evaluated sentence")
        if len(p.boxes) != len(self.gt[key]):
            raise ValueError(
                f"image {key[0]} sentence {key[1]}: {len(p.boxes)} box lists for {len(self.gt[key])} evaluated "
                "phrases (one ranked list per phrase with a box, in sentence order)"
            )

    def _checked_boxes(self, by_key: Mapping[tuple[str, int], PhraseBoxes]) -> dict[tuple[str, int], list[np.ndarray]]:
        """Every prediction's box lists in xyxy, after the plausibility check of all boxes together."""
        flat, sizes, where = [], [], []
        for key, pred in by_key.items():
            phrases = self.gt[key]
            for j, boxes in enumerate(pred.boxes):
                b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
                flat.append(b)
                wh = phrases[j].image_wh if j < len(phrases) and phrases[j].image_wh else (math.nan, math.nan)
                sizes.append(np.tile(np.asarray(wh, dtype=np.float64), (len(b), 1)))
                where.extend((key, j, k) for k in range(len(b)))
        allb = np.concatenate(flat) if flat else np.zeros((0, 4))

        def _describe(i: int) -> str:
            (img, sent), j, k = where[i]
            return f"image {img} sentence {sent} phrase {j} box {k}: {allb[i].tolist()}"

        check_box_format(
            allb,
            self.box_format,
            where="Flickr30k phrase boxes",
            describe=_describe,
            image_wh=np.concatenate(sizes) if sizes else None,
        )
        return {key: [convert_boxes(b, self.box_format, "xyxy") for b in pred.boxes] for key, pred in by_key.items()}

    def compute(self, gather: GatherObjects | None = None) -> dict[str, float]:
        """R@k over all evaluated phrases and per phrase type.

        Raises:
            ValueError: if some evaluated sentence has no prediction.
            PredictionFormatError: if the boxes look like the other box format (see ``box_format``).
        """
        by_key, repeats = merge_unique(
            gather_items(self.state(), gather),
            key=lambda p: (str(p.image_id), int(p.sentence_index)),
            what="sentence (image_id, sentence_index)",
        )
        if repeats:
            warnings.warn(
                f"{repeats} repeated sentence prediction(s) ignored (the first of each is kept)", stacklevel=2
            )
        skipped = sum(1 for key in by_key if not self.gt[key])
        missing = {k for k, v in self.gt.items() if v} - by_key.keys()
        if missing:
            raise ValueError(f"{len(missing)} evaluated sentence(s) have no prediction, e.g. {sorted(missing)[:3]}")
        boxes_of = self._checked_boxes(by_key)
        cols = [*self.ks, None]  # None = every predicted box (upper bound)
        hits: dict[str, list[list[bool]]] = defaultdict(list)
        for key, phrases in self.gt.items():
            for phrase, boxes in zip(phrases, boxes_of.get(key, [])):
                gt_boxes = phrase.boxes
                if self.merged:
                    gt_boxes = np.concatenate([gt_boxes[:, :2].min(0), gt_boxes[:, 2:].max(0)])[None]
                best = pairwise_iou(boxes, gt_boxes).max(axis=1) if len(boxes) else np.zeros(0)  # [K]
                row = [bool(best[:k].size and best[:k].max() >= 0.5) for k in cols]
                hits["all"].append(row)
                for t in phrase.types:
                    hits[t].append(row)
        if not hits["all"]:
            raise ValueError("no evaluated phrase: every predicted sentence has no boxed phrase")
        out: dict[str, float] = {}
        for name, rows in sorted(hits.items(), key=lambda kv: kv[0] != "all"):
            arr = np.array(rows, dtype=np.float64)
            suffix = "" if name == "all" else f"/{name}"
            for j, k in enumerate(cols):
                out[f"R@{'upper' if k is None else k}{suffix}"] = 100.0 * float(arr[:, j].mean())
        out["num_phrases"] = float(len(hits["all"]))
        if skipped:
            out["num_skipped_sentences"] = float(skipped)
        return out
