"""Grounding / detection inference lives in :mod:`fiber_models.predictor` (no trainer needed); re-exported here."""

from __future__ import annotations

from fiber_models.predictor import GroundingPrediction, GroundingPredictor, ImageLike, TextQuery

__all__ = ["GroundingPrediction", "GroundingPredictor", "ImageLike", "TextQuery"]
