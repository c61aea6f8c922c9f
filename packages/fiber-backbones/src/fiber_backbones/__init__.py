"""fiber-backbones: the FIBER fusion backbone (Swin + RoBERTa with gated cross-attention in the backbone).

Typical use::

    from fiber_backbones import TextInputs, create_backbone

    model = create_backbone("fiber-tiny", **{"text.vocab_size": 1000}).eval()
    out = model(pixel_values, TextInputs(input_ids, attention_mask))   # FusionOutput
    image_only = model.encode_image(pixel_values)                       # ImageOutput (ITC path)
"""

from __future__ import annotations

from fiber_backbones.attention import attention, resolve_backend, use_attention_backend
from fiber_backbones.config import (
    BackboneConfig,
    FusionConfig,
    SwinConfig,
    TextEncoderConfig,
    last_n_schedule,
    variant_overrides,
)
from fiber_backbones.model import FiberBackbone
from fiber_backbones.registry import create_backbone, get_config, get_entry, list_backbones, register_backbone
from fiber_backbones.types import (
    AttentionBackend,
    FeatureSpec,
    FusionBackbone,
    FusionOutput,
    ImageOutput,
    TextInputs,
    TextOutput,
)
from fiber_backbones.weights import (
    WeightsMismatchError,
    from_pretrained,
    load_weights,
    resize_relative_position_bias_table,
    save_pretrained,
)

__version__ = "0.1.0"

__all__ = [
    "AttentionBackend",
    "BackboneConfig",
    "FeatureSpec",
    "FiberBackbone",
    "FusionBackbone",
    "FusionConfig",
    "FusionOutput",
    "ImageOutput",
    "SwinConfig",
    "TextEncoderConfig",
    "TextInputs",
    "TextOutput",
    "WeightsMismatchError",
    "__version__",
    "attention",
    "create_backbone",
    "from_pretrained",
    "get_config",
    "get_entry",
    "last_n_schedule",
    "list_backbones",
    "load_weights",
    "register_backbone",
    "resize_relative_position_bias_table",
    "resolve_backend",
    "save_pretrained",
    "use_attention_backend",
    "variant_overrides",
]
