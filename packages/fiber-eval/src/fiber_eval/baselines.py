"""Trivial baselines of the benchmarks, scored by the same evaluators as the models (issue 19).

A trained model's figure means something only beside what a model that ignores the input gets. Each function
here gives that figure for one benchmark, computed with the benchmark's own scoring code:

- VQA: every question answered with the most frequent training answer (:func:`most_frequent_answer`,
  :func:`constant_answer_accuracy`, official VQA accuracy);
- NLVR2: every statement given the majority label of the scored split (:func:`majority_label_accuracy`; at
  least 50 %);
- captioning: every image given the most common training caption (:func:`most_common_caption`,
  :func:`constant_caption_cider`, CIDEr-D on simply tokenised text as :func:`simple_cider`);
- referring expressions: the expected P@1 of picking one of the image's objects at random
  (:func:`random_box_accuracy`: the box localisation is perfect, the expression is ignored);
- phrase grounding: the expected R@1 of picking one of the sentence's boxes at random for each phrase
  (:func:`random_box_recall`, ANY-box IoU as the Flickr30k Entities protocol).

All figures are percentages, like the evaluators' (CIDEr x100).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from fiber_eval.boxes import pairwise_giou, pairwise_iou
from fiber_eval.caption import simple_cider
from fiber_eval.grounding import FlickrPhrase
from fiber_eval.nlvr2 import nlvr2_metrics
from fiber_eval.refexp import Criterion, RefExpTarget
from fiber_eval.types import VQAAnswer
from fiber_eval.vqa import VQAAnnotation, VQAEvaluator, normalize_answer

__all__ = [
    "constant_answer_accuracy",
    "constant_caption_cider",
    "majority_label_accuracy",
    "most_common_caption",
    "most_frequent_answer",
    "random_box_accuracy",
    "random_box_recall",
]


def most_frequent_answer(annotations: Iterable[VQAAnnotation]) -> str:
    """The normalised answer given most often over every human answer of ``annotations`` (ties: the first seen).

    Raises:
        ValueError: no annotation.
    """
    counts = Counter(normalize_answer(a) for ann in annotations for a in ann.answers)
    if not counts:
        raise ValueError("most_frequent_answer: no annotated answer")
    return counts.most_common(1)[0][0]


def constant_answer_accuracy(annotations: Sequence[VQAAnnotation], answer: str) -> float:
    """Official VQA accuracy (percent) of answering every question of ``annotations`` with ``answer``."""
    evaluator = VQAEvaluator(annotations)
    evaluator.update([VQAAnswer(question_id=a.question_id, answer=answer) for a in annotations])
    return evaluator.compute()["accuracy"]


def majority_label_accuracy(labels: Mapping[str, bool]) -> float:
    """Accuracy (percent) of predicting the majority label of ``labels`` for every statement (>= 50).

    Raises:
        ValueError: no label.
    """
    if not labels:
        raise ValueError("majority_label_accuracy: no label")
    majority = 2 * sum(bool(v) for v in labels.values()) >= len(labels)
    return nlvr2_metrics(dict.fromkeys(labels, majority), labels)["accuracy"]


def most_common_caption(captions: Iterable[str]) -> str:
    """The caption written most often (compared after stripping and lower-casing; ties: the first seen).

    Raises:
        ValueError: no caption.
    """
    counts = Counter(c.strip().lower() for c in captions)
    if not counts:
        raise ValueError("most_common_caption: no caption")
    return counts.most_common(1)[0][0]


def constant_caption_cider(caption: str, references: Mapping[Any, Sequence[str]]) -> float:
    """CIDEr-D (x100, :func:`~fiber_eval.caption.simple_cider`) of giving every image of ``references`` the
    same ``caption``."""
    return 100.0 * simple_cider(dict.fromkeys(references, caption), references)[0]


def _chance_of_hit(targets: np.ndarray, candidates: np.ndarray, overlap: Callable[..., np.ndarray]) -> float:
    """The fraction of ``candidates`` ``[M, 4]`` whose best overlap with any of ``targets`` ``[T, 4]`` is >= 0.5:
    the hit probability of one candidate drawn uniformly at random (0 without candidates)."""
    if not len(candidates):
        return 0.0
    return float((overlap(candidates, targets).max(axis=1) >= 0.5).mean())


def random_box_accuracy(
    targets: Sequence[RefExpTarget],
    candidates: Mapping[int, np.ndarray],
    *,
    criterion: Criterion = "giou",
) -> float:
    """Expected P@1 (percent) of picking, for each expression, one of its image's objects at random.

    Args:
        targets: the evaluated expressions (:func:`~fiber_eval.refexp.load_refexp_targets`).
        candidates: ``item_id`` -> ``[M, 4]`` xyxy boxes of the objects of the expression's image (e.g. the
            boxes of every expression on the same image).
        criterion: ``giou`` or ``iou`` >= 0.5, as :class:`~fiber_eval.refexp.RefExpEvaluator`.
    """
    if not targets:
        raise ValueError("random_box_accuracy: no target")
    overlap = pairwise_giou if criterion == "giou" else pairwise_iou
    hits = [
        _chance_of_hit(np.asarray([t.box_xyxy]), np.asarray(candidates[t.item_id]).reshape(-1, 4), overlap)
        for t in targets
    ]
    return 100.0 * float(np.mean(hits))


def random_box_recall(
    gt: Mapping[tuple[str, int], Sequence[FlickrPhrase]],
    candidates: Mapping[tuple[str, int], np.ndarray] | None = None,
) -> float:
    """Expected R@1 (percent, ANY-box IoU >= 0.5) of picking, for each phrase, one box at random.

    Args:
        gt: sentence key -> evaluated phrases (as :class:`~fiber_eval.grounding.FlickrEntitiesEvaluator`).
        candidates: sentence key -> ``[M, 4]`` xyxy candidate boxes; default: the boxes of every phrase of the
            sentence (the objects the sentence mentions).
    """
    hits = []
    for key, phrases in gt.items():
        if candidates is not None:
            pool = np.asarray(candidates[key], dtype=np.float64).reshape(-1, 4)
        else:
            parts = [np.asarray(p.boxes, dtype=np.float64).reshape(-1, 4) for p in phrases]
            pool = np.unique(np.concatenate(parts), axis=0) if parts else np.zeros((0, 4))
        hits += [_chance_of_hit(np.asarray(p.boxes).reshape(-1, 4), pool, pairwise_iou) for p in phrases]
    if not hits:
        raise ValueError("random_box_recall: no evaluated phrase")
    return 100.0 * float(np.mean(hits))
