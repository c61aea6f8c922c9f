"""Evaluation of grounding models through :class:`fiber_train.predictor.GroundingPredictor` (docs/reference/training.md §4.7):

- :func:`detection_metrics`: COCO box AP (COCO, ODinW: "+1" width) or LVIS Fixed AP (chunked prompts, no "+1")
  of a COCO-format detection file, every image prompted with all class names (docs/reference/evaluation.md §8-§10);
- :func:`refexp_metrics`: referring-expression top-1 accuracy at GIoU (or IoU) >= 0.5 (docs/reference/evaluation.md §7),
  beside the accuracy of picking one of the image's objects at random (``baseline/<criterion>/all/P@1``);
- :func:`phrase_grounding_metrics`: phrase grounding R@1/5/10 with the ANY-box protocol (docs/reference/evaluation.md §6) on
  the raw Flickr30k Entities files or on an MDETR-style grounding file, beside the R@1 of picking one of the
  sentence's boxes at random for each phrase (``baseline/R@1``).

Each function evaluates the items ``rank::world_size`` and all-gathers the predictions, so the same call works
on one process and under ``torchrun``. Boxes go to fiber-eval in original-image pixels.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np
import torch

from fiber_data import (
    DetectionGroundingDataset,
    MdetrGroundingDataset,
    Prompt,
    build_prompt,
    chunk_prompts,
    read_flickr_entities,
    token_counter,
)
from fiber_eval import (
    COCODetectionEvaluator,
    Detections,
    FlickrEntitiesEvaluator,
    LVISEvaluator,
    PhraseBoxes,
    RefExpEvaluator,
    RefExpPrediction,
    load_flickr_entities,
    load_refexp_targets,
)
from fiber_eval.baselines import random_box_accuracy, random_box_recall
from fiber_eval.grounding import FlickrPhrase
from fiber_eval.refexp import Criterion
from fiber_heads.grounding import PostprocessConfig
from fiber_train.tasks.grounding_common import GroundingModel

if TYPE_CHECKING:  # fiber_train.predictor imports the tasks package: imported lazily below
    from fiber_train.predictor import GroundingPredictor

__all__ = [
    "PromptText",
    "build_predictor",
    "detection_metrics",
    "phrase_grounding_metrics",
    "refexp_metrics",
]


class _Around(TypedDict):
    """Per-label prompt prefixes and suffixes (keywords of :func:`fiber_data.build_prompt` / ``chunk_prompts``)."""

    prefixes: dict[int, str]
    suffixes: dict[int, str]


class PromptText:
    """How class names are written into detection prompts (ODinW, docs/reference/data-formats.md §11.4).

    Args:
        names: category-name overrides, original name -> name written in the prompt.
        prefixes / suffixes: per original category name, text around the name (the grounded span is the name).
    """

    def __init__(
        self,
        names: Mapping[str, str] | None = None,
        prefixes: Mapping[str, str] | None = None,
        suffixes: Mapping[str, str] | None = None,
    ) -> None:
        self.names = dict(names or {})
        self.prefixes = dict(prefixes or {})
        self.suffixes = dict(suffixes or {})

    @property
    def plain(self) -> bool:
        """Whether prompts are just the class names (no prefix or suffix text)."""
        return not self.prefixes and not self.suffixes

    def check(self, label_names: Mapping[int, str], where: str) -> None:
        """Raise ``ValueError`` naming ``where`` when an entry refers to a category that does not exist."""
        known = set(label_names.values())
        for field_name, table in (("names", self.names), ("prefixes", self.prefixes), ("suffixes", self.suffixes)):
            unknown = sorted(set(table) - known)
            if unknown:
                raise ValueError(
                    f"{where}: prompt {field_name} name categories that are not in the file: {unknown[:5]} "
                    f"(categories: {sorted(known)[:8]}...)"
                )

    def renamed(self, label_names: Mapping[int, str]) -> dict[int, str]:
        """Label -> the name written in the prompt."""
        return {lab: self.names.get(n, n) for lab, n in label_names.items()}

    def chunks(
        self,
        labels: Sequence[int],
        label_names: Mapping[int, str],
        count_tokens: Callable[[str], int],
        *,
        max_tokens: int,
        max_labels: int | None = None,
    ) -> list[Prompt]:
        """The prompts of ``labels`` (in order) split greedily to at most ``max_tokens`` tokens and
        ``max_labels`` classes each (:func:`fiber_data.chunk_prompts` with this text's names, prefixes and
        suffixes).

        Raises:
            ValueError: one class alone does not fit.
        """
        return chunk_prompts(
            labels,
            self.renamed(label_names),
            count_tokens,
            max_tokens=max_tokens,
            max_labels=max_labels,
            **self._around(labels, label_names),
        )

    def _around(self, labels: Sequence[int], label_names: Mapping[int, str]) -> _Around:
        return {
            "prefixes": {lab: self.prefixes[label_names[lab]] for lab in labels if label_names[lab] in self.prefixes},
            "suffixes": {lab: self.suffixes[label_names[lab]] for lab in labels if label_names[lab] in self.suffixes},
        }

    def prompt(self, labels: Sequence[int], label_names: Mapping[int, str]) -> Prompt:
        """The prompt of ``labels`` in the given order, with names, prefixes and suffixes applied."""
        return build_prompt(labels, self.renamed(label_names), **self._around(labels, label_names))


def build_predictor(
    model: GroundingModel,
    tokenizer: Any,
    data: Any,
    postprocess: PostprocessConfig,
    *,
    classes_per_prompt: int | None = None,
    device: Any = "cpu",
) -> GroundingPredictor:
    """A predictor with the test-time preprocessing of a task's data config (``test_size``, ``max_size``,
    ``max_text_len``, ``text_padding``, ``size_divisibility``, ``bgr255``)."""
    from fiber_train.predictor import GroundingPredictor

    return GroundingPredictor(
        model,
        tokenizer,
        test_size=data.test_size,
        max_size=data.max_size,
        max_text_len=data.max_text_len,
        text_padding=data.text_padding,
        size_divisibility=data.size_divisibility,
        bgr255=data.bgr255,
        postprocess=postprocess,
        classes_per_prompt=classes_per_prompt,
        device=device,
    )


def _mine(count: int, rank: int, world_size: int, batch_size: int) -> list[list[int]]:
    """This rank's share of ``range(count)`` in batches."""
    idx = list(range(rank, count, world_size))
    return [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]


def _limit(total: int, max_items: int) -> int:
    return total if max_items <= 0 else min(total, max_items)


def _all_gather_objects(items: list) -> list:
    """All ranks' lists concatenated (``torch.distributed.all_gather_object``)."""
    world = torch.distributed.get_world_size()
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, items)
    return [x for part in gathered for x in part]


def _gather(world_size: int) -> Callable[[list], list] | None:
    return _all_gather_objects if world_size > 1 else None


def detection_metrics(
    predictor: GroundingPredictor,
    ann: Path,
    images: Path,
    *,
    protocol: str = "coco",
    prompt_text: PromptText | None = None,
    batch_size: int = 8,
    max_images: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, float]:
    """Box AP of a COCO-format detection file, every image prompted with all its class names in label order.

    Args:
        predictor: the model and its preprocessing (``postprocess.detections_per_img`` is also the per-image cap
            of the COCO evaluator; chunking of long class lists follows the predictor's settings).
        ann / images: detection JSON (COCO, LVIS or ODinW) and image folder.
        protocol: ``"coco"`` (COCO API AP, "+1" width: COCO and ODinW) or ``"lvis"`` (Fixed AP, 10,000 per
            category over the set, ``w = x2 - x1``; labels are the LVIS category ids).
        prompt_text: ODinW names / prefixes / suffixes (the prompt is then one row with every class).
        batch_size: images per forward.
        max_images: evaluate only the first N images (0: all).

    Returns:
        ``bbox/AP``, ``bbox/AP50``, ... in percent (entries the evaluator cannot compute are left out),
        ``num_images`` and ``num_classes``.
    """
    if protocol not in ("coco", "lvis"):
        raise ValueError(f"detection protocol must be 'coco' or 'lvis', got {protocol!r}")
    ds = DetectionGroundingDataset(ann, images, predictor.transform, remove_empty=False)
    text = prompt_text or PromptText()
    text.check(ds.label_names, str(ann))
    labels = np.asarray(sorted(ds.label_names), dtype=np.int64)
    # one pass per prompt: plain class lists are chunked by the predictor itself (rows of one forward); prompts
    # with prefixes / suffixes are chunked here to the predictor's token budget
    passes: list[tuple[np.ndarray, Prompt | list[str]]]
    if text.plain:
        passes = [(labels, [text.renamed(ds.label_names)[int(k)] for k in labels])]
    else:
        chunks = text.chunks(
            labels.tolist(),
            ds.label_names,
            token_counter(predictor.tokenizer),
            max_tokens=predictor.max_text_len - 2,
            max_labels=predictor.classes_per_prompt,
        )
        passes = [(np.asarray(c.labels, dtype=np.int64), c) for c in chunks]
    count = _limit(len(ds), max_images)
    dets: list[Detections] = []
    for idx in _mine(count, rank, world_size, batch_size):
        found: dict[int, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {i: [] for i in idx}
        for chunk_labels, query in passes:
            preds = predictor.predict([ds.image_paths[i] for i in idx], [query] * len(idx))
            for i, p in zip(idx, preds):
                found[i].append((p.boxes.double().numpy(), p.scores.double().numpy(), chunk_labels[p.labels.numpy()]))
        for i in idx:
            boxes, scores, contiguous = (np.concatenate(parts) for parts in zip(*found[i]))
            order = np.argsort(-scores, kind="stable")
            out_labels = (
                np.asarray([ds.label_to_category_id[int(c)] for c in contiguous], dtype=np.int64)
                if protocol == "lvis"
                else contiguous
            )
            dets.append(
                Detections(
                    image_id=int(ds.image_ids[i]),
                    boxes_xyxy=boxes.reshape(-1, 4)[order],
                    scores=scores[order],
                    labels=out_labels[order],
                )
            )
    image_ids = {int(ds.image_ids[i]) for i in range(count)}
    gt: Any = _json_subset(ann, image_ids) if count < len(ds) else ann
    evaluator: COCODetectionEvaluator | LVISEvaluator
    if protocol == "lvis":
        evaluator = LVISEvaluator(gt)
    else:
        evaluator = COCODetectionEvaluator(
            gt,
            label_to_category_id=ds.label_to_category_id,
            max_per_image=predictor.postprocess.detections_per_img,
        )
    evaluator.update(dets)
    stats = evaluator.compute(gather=_gather(world_size))
    # pycocotools / lvis report -1 (here NaN) for area ranges without ground truth: leave those out (valid JSON)
    out = {f"bbox/{k}": float(v) for k, v in stats.items() if math.isfinite(v)}
    out["num_images"] = float(count)
    out["num_classes"] = float(len(labels))
    return out


def refexp_metrics(
    predictor: GroundingPredictor,
    ann: Path,
    images: Path,
    *,
    criterion: Criterion = "giou",
    batch_size: int = 8,
    max_items: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, float]:
    """Referring-expression accuracy on an MDETR-style RefCOCO/+/g file (docs/reference/evaluation.md §7).

    The query of an expression is its caption with one phrase, the annotated ``tokens_positive`` span of its
    box (spans of a box are joined into the one covering them); its boxes are ranked by score.

    Returns:
        ``<criterion>/<dataset>/P@k`` and ``<criterion>/all/P@k`` (k = 1, 5, 10) in percent, ``num_expressions``,
        and ``baseline/<criterion>/all/P@1``: the expected P@1 of picking at random one of the objects that the
        file's expressions on the same image refer to (:func:`fiber_eval.baselines.random_box_accuracy`).
    """
    ds = MdetrGroundingDataset(ann, images, predictor.transform, keep_empty=True)
    count = _limit(len(ds), max_items)
    wanted = {int(ds.image_ids[i]) for i in range(count)}
    every = load_refexp_targets(ann)
    targets = [t for t in every if t.item_id in wanted]
    image_of = {int(ds.image_ids[i]): ds.image_paths[i] for i in range(len(ds))}
    objects: dict[Any, list[tuple[float, float, float, float]]] = {}
    for t in every:
        objects.setdefault(image_of[t.item_id], []).append(t.box_xyxy)
    candidates = {t.item_id: np.unique(np.asarray(objects[image_of[t.item_id]]), axis=0) for t in targets}
    preds: list[RefExpPrediction] = []
    for idx in _mine(count, rank, world_size, batch_size):
        queries = []
        for i in idx:
            _, _, spans = ds.annotation(i)
            flat = [s for box in spans for s in box]
            if len(spans) != 1 or not flat:
                raise ValueError(
                    f"{ann}: {ds.records[i]} has {len(spans)} boxes / no tokens_positive span; a referring "
                    "expression needs exactly one box with a span"
                )
            span = (min(s for s, _ in flat), max(e for _, e in flat))
            queries.append(Prompt(ds.captions[i], (0,), {0: span}))
        results = predictor.predict([ds.image_paths[i] for i in idx], queries)
        for i, p in zip(idx, results):
            preds.append(RefExpPrediction(int(ds.image_ids[i]), p.boxes.double().numpy(), p.scores.double().numpy()))
    evaluator = RefExpEvaluator(targets, criterion=criterion)
    evaluator.update(preds)
    out = evaluator.compute(gather=_gather(world_size))
    out[f"baseline/{criterion}/all/P@1"] = random_box_accuracy(targets, candidates, criterion=criterion)  # type: ignore[arg-type]
    return out


def mdetr_phrases(ds: MdetrGroundingDataset, index: int) -> tuple[list[tuple[int, int]], list[np.ndarray]]:
    """The phrases of an MDETR grounding entry: one per distinct ``tokens_positive`` of its boxes, ordered by
    position in the caption, with the boxes that share it (an entity with several boxes is one phrase).

    Returns:
        ``(spans, boxes)``: per phrase the ``(start, end)`` covering its spans and its ``[M, 4]`` xyxy boxes.
    """
    boxes, _, spans = ds.annotation(index)
    groups: dict[tuple[tuple[int, int], ...], list[int]] = {}
    for k, box_spans in enumerate(spans):
        if box_spans:
            groups.setdefault(tuple(sorted(box_spans)), []).append(k)
    keys = sorted(groups, key=lambda key: key[0])
    return (
        [(key[0][0], max(e for _, e in key)) for key in keys],
        [np.asarray(boxes[groups[key]], dtype=np.float64) for key in keys],
    )


def phrase_grounding_metrics(
    predictor: GroundingPredictor,
    *,
    ann: Path,
    images: Path,
    split: str,
    source: str = "mdetr",
    batch_size: int = 8,
    max_items: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, float]:
    """Phrase grounding R@1/5/10 with the ANY-box protocol (docs/reference/evaluation.md §6).

    Args:
        predictor: the model; every phrase of a sentence is one class of the query (its span), so one forward
            scores all phrases of a sentence.
        ann: ``source="flickr"``: the Flickr30k Entities folder (``Annotations/``, ``Sentences/``,
            ``<split>.txt``: the official ground truth); ``source="mdetr"``: an MDETR-style grounding file whose
            entries are the sentences and whose distinct ``tokens_positive`` are the phrases (e.g. the synthetic
            world's ``grounding_{split}.json``).
        images: image folder (``flickr30k-images`` for the raw files).
        split: Flickr split (``val`` / ``test``); unused for ``mdetr``.
        source: ``"flickr"`` or ``"mdetr"``.

    Returns:
        ``R@1``, ``R@5``, ``R@10``, ``R@upper`` (and per phrase type for Flickr) in percent, ``num_phrases``, and
        ``baseline/R@1``: the expected R@1 of picking, for each phrase, one of the boxes of the sentence's
        evaluated phrases at random (:func:`fiber_eval.baselines.random_box_recall`).
    """
    items: list[tuple[tuple[str, int], str, str, list[tuple[int, int]]]] = []  # key, image path, caption, spans
    gt: dict[tuple[str, int], list[FlickrPhrase]] = {}
    if source == "flickr":
        gt = load_flickr_entities(ann, split)
        for rec in read_flickr_entities(ann, split):
            key = (rec.image_id, rec.sentence_index)
            if key not in gt:
                continue
            evaluated = {p.entity_id for p in gt[key]}
            spans = [p.span for p in rec.phrases if p.entity_id in evaluated]
            items.append((key, str(Path(images) / rec.file_name), rec.caption, spans))
    elif source == "mdetr":
        ds = MdetrGroundingDataset(ann, images, predictor.transform)
        for i in range(len(ds)):
            spans, boxes = mdetr_phrases(ds, i)
            key = (str(int(ds.image_ids[i])), 0)
            caption = ds.captions[i]
            gt[key] = [
                FlickrPhrase(caption[s:e], str(j), (ds.dataset_names[i] or "phrase",), b)
                for j, ((s, e), b) in enumerate(zip(spans, boxes))
            ]
            items.append((key, ds.image_paths[i], caption, spans))
    else:
        raise ValueError(f"phrase grounding source must be 'flickr' or 'mdetr', got {source!r}")
    count = _limit(len(items), max_items)
    gt = {items[i][0]: gt[items[i][0]] for i in range(count)}
    preds: list[PhraseBoxes] = []
    for idx in _mine(count, rank, world_size, batch_size):
        queries = [Prompt(items[i][2], tuple(range(len(items[i][3]))), dict(enumerate(items[i][3]))) for i in idx]
        results = predictor.predict([items[i][1] for i in idx], queries)
        for i, p in zip(idx, results):
            per_phrase = [p.boxes_for(k).double().numpy() for k in range(len(items[i][3]))]
            preds.append(PhraseBoxes(items[i][0][0], items[i][0][1], per_phrase))
    evaluator = FlickrEntitiesEvaluator(gt)
    evaluator.update(preds)
    out = evaluator.compute(gather=_gather(world_size))
    out["baseline/R@1"] = random_box_recall({k: v for k, v in gt.items() if v})
    return out


def _json_subset(ann: Path, image_ids: set[int]) -> dict[str, Any]:
    """The ground truth of a COCO-format file restricted to ``image_ids`` (``max_images`` evaluations)."""
    data = json.loads(Path(ann).read_text())
    return {
        **data,
        "images": [im for im in data["images"] if im["id"] in image_ids],
        "annotations": [a for a in data["annotations"] if a["image_id"] in image_ids],
    }
