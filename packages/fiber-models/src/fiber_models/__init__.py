"""fiber-models: every FIBER task model, one saved format, processors and pipelines (no trainer needed).

Typical use::

    import fiber_models

    model = fiber_models.load("runs/coarse-20261204/model")      # dispatches on config.json's model_type
    model.save_pretrained("my-model")                             # config.json + model.safetensors + tokenizer

Models (one module per task family): :class:`CoarseModel`, :class:`VQAModel`, :class:`NLVR2Model`,
:class:`RetrievalModel`, :class:`CaptionModel`, :class:`GroundingModel`.
"""

from __future__ import annotations

from fiber_models._version import __version__
from fiber_models.caption import CaptionModel, CaptionModelConfig, CaptionSettings
from fiber_models.coarse import CoarseModel, CoarseModelConfig
from fiber_models.downstream import DownstreamModel
from fiber_models.grounding import GroundingHeadConfig, GroundingModel
from fiber_models.nlvr2 import NLVR2Model, NLVR2ModelConfig
from fiber_models.outputs import StepOutput
from fiber_models.pipelines import PIPELINES, RetrievalIndex, pipeline
from fiber_models.predictor import GroundingPrediction, GroundingPredictor
from fiber_models.pretrained import (
    MODEL_TYPES,
    FiberPreTrainedModel,
    InitReport,
    ModelFormatError,
    Preprocessing,
    initialize_from,
    load,
    read_model_config,
    resolve_model_dir,
)
from fiber_models.processor import FiberProcessor, ProcessorBatch
from fiber_models.retrieval import RetrievalModel, RetrievalModelConfig
from fiber_models.vqa import VQAModel, VQAModelConfig

__all__ = [
    "MODEL_TYPES",
    "PIPELINES",
    "FiberProcessor",
    "GroundingPrediction",
    "GroundingPredictor",
    "ProcessorBatch",
    "RetrievalIndex",
    "pipeline",
    "CaptionModel",
    "CaptionModelConfig",
    "CaptionSettings",
    "CoarseModel",
    "CoarseModelConfig",
    "DownstreamModel",
    "FiberPreTrainedModel",
    "GroundingHeadConfig",
    "GroundingModel",
    "InitReport",
    "ModelFormatError",
    "NLVR2Model",
    "NLVR2ModelConfig",
    "Preprocessing",
    "RetrievalModel",
    "RetrievalModelConfig",
    "StepOutput",
    "VQAModel",
    "VQAModelConfig",
    "__version__",
    "initialize_from",
    "load",
    "read_model_config",
    "resolve_model_dir",
]
