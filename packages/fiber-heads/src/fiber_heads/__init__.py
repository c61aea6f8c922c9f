"""fiber_heads: task heads of the FIBER coarse model (ITC, ITM, MLM, VQA, NLVR2) and their losses.

Heads read backbone outputs structurally (:mod:`fiber_heads.types` Protocols) and never import a backbone.
"""

from __future__ import annotations

from fiber_heads._version import __version__
from fiber_heads.init import init_head_weights
from fiber_heads.itc import ContrastiveHead
from fiber_heads.itm import ITMBatchIndices, MatchingHead, build_itm_batch_indices, sample_hard_negatives
from fiber_heads.mlm import IGNORE_INDEX, MaskedLMHead
from fiber_heads.nlvr2 import NLVR2Head
from fiber_heads.projections import CrossModalProjection, Pooler
from fiber_heads.types import (
    ContrastiveOutput,
    FusedFeatures,
    GatherFn,
    HeadOutput,
    ImageFeatures,
    ProjectedFeatures,
    TextFeatures,
    identity_gather,
)
from fiber_heads.vqa import VQAHead

__all__ = [
    "__version__",
    "IGNORE_INDEX",
    "ContrastiveHead",
    "ContrastiveOutput",
    "CrossModalProjection",
    "FusedFeatures",
    "GatherFn",
    "HeadOutput",
    "ITMBatchIndices",
    "ImageFeatures",
    "MaskedLMHead",
    "MatchingHead",
    "NLVR2Head",
    "Pooler",
    "ProjectedFeatures",
    "TextFeatures",
    "VQAHead",
    "build_itm_batch_indices",
    "identity_gather",
    "init_head_weights",
    "sample_hard_negatives",
]
