"""fiber-eval: FIBER benchmark evaluators (VQA, NLVR2, retrieval, captions, detection, grounding).

Pure numpy at its core (no torch). Optional extras, imported lazily by the evaluators that need them:
``[coco]`` (pycocotools), ``[lvis]`` (lvis-api), ``[caption]`` (pycocoevalcap; Java for PTB/METEOR).
Every evaluator follows :class:`fiber_eval.types.Evaluator`: ``reset()``, ``update(predictions)``,
``compute(gather=None) -> dict[str, float]`` (percentages), plus ``state()`` (what ``gather`` all-gathers).
"""

from __future__ import annotations

from fiber_eval._io import MissingPredictionsError, PredictionFormatError
from fiber_eval._version import __version__ as __version__
from fiber_eval.caption import (
    CaptionEvaluator,
    DocumentFrequencies,
    caption_metrics,
    cider_d,
    compute_document_frequencies,
    load_document_frequencies,
    save_document_frequencies,
)
from fiber_eval.detection import (
    COCODetectionEvaluator,
    ODinWEvaluator,
    coco_bbox_eval,
    detections_to_coco_results,
    odinw_mean,
)
from fiber_eval.distributed import all_gather_concat, gather_items, merge_unique
from fiber_eval.grounding import FlickrEntitiesEvaluator, FlickrPhrase, load_flickr_entities
from fiber_eval.lvis_eval import LVISEvaluator, lvis_eval, lvis_fixed_ap
from fiber_eval.nlvr2 import NLVR2Evaluator, load_nlvr2_labels, nlvr2_metrics
from fiber_eval.refexp import RefExpEvaluator, RefExpTarget, load_refexp_targets
from fiber_eval.retrieval import RetrievalEvaluator, flatten_captions, recall_at_k, retrieval_ranks
from fiber_eval.types import (
    Caption,
    Detections,
    Evaluator,
    GatherObjects,
    NLVR2Prediction,
    PhraseBoxes,
    RankingScores,
    RefExpPrediction,
    VQAAnswer,
)
from fiber_eval.vqa import (
    VQAAnnotation,
    VQAEvaluator,
    load_vqa_annotations,
    normalize_answer,
    vqa_accuracy,
    write_vqa_submission,
)

__all__ = [
    "COCODetectionEvaluator",
    "Caption",
    "CaptionEvaluator",
    "Detections",
    "DocumentFrequencies",
    "Evaluator",
    "FlickrEntitiesEvaluator",
    "FlickrPhrase",
    "GatherObjects",
    "LVISEvaluator",
    "MissingPredictionsError",
    "NLVR2Evaluator",
    "NLVR2Prediction",
    "ODinWEvaluator",
    "PhraseBoxes",
    "PredictionFormatError",
    "RankingScores",
    "RefExpEvaluator",
    "RefExpPrediction",
    "RefExpTarget",
    "RetrievalEvaluator",
    "VQAAnnotation",
    "VQAAnswer",
    "VQAEvaluator",
    "all_gather_concat",
    "caption_metrics",
    "cider_d",
    "coco_bbox_eval",
    "compute_document_frequencies",
    "detections_to_coco_results",
    "flatten_captions",
    "gather_items",
    "load_document_frequencies",
    "load_flickr_entities",
    "load_nlvr2_labels",
    "load_refexp_targets",
    "load_vqa_annotations",
    "lvis_eval",
    "lvis_fixed_ap",
    "merge_unique",
    "nlvr2_metrics",
    "normalize_answer",
    "odinw_mean",
    "recall_at_k",
    "retrieval_ranks",
    "save_document_frequencies",
    "vqa_accuracy",
    "write_vqa_submission",
]
