"""fiber-backbones: the FIBER fusion backbone (Swin + RoBERTa with gated cross-attention in the backbone).

Typical use::

    from fiber_backbones import TextInputs, create_backbone

    model = create_backbone("fiber-tiny", **{"text.vocab_size": 1000}).eval()
    out = model(pixel_values, TextInputs(input_ids, attention_mask))   # FusionOutput
    image_only = model.encode_image(pixel_values)                       # ImageOutput (ITC path)
"""

from __future__ import annotations

from fiber_backbones._version import __version__
from fiber_backbones.attention import (
    AttentionCase,
    attention,
    attention_report,
    probe_xformers,
    resolve_backend,
    use_attention_backend,
)
from fiber_backbones.config import (
    BackboneConfig,
    FusionConfig,
    SwinConfig,
    TextEncoderConfig,
    last_n_schedule,
    variant_overrides,
)
from fiber_backbones.convert import (
    CheckpointFormatError,
    ConversionReport,
    convert_official_backbone,
    read_official_checkpoint,
    to_official_backbone,
)
from fiber_backbones.model import FiberBackbone
from fiber_backbones.pretrained import (
    TowerLoadReport,
    create_backbone_from_towers,
    init_from_towers,
    load_roberta_weights,
    load_swin_weights,
)
from fiber_backbones.registry import create_backbone, get_config, get_entry, list_backbones, register_backbone
from fiber_backbones.types import (
    AttentionBackend,
    FeatureSpec,
    FusionBackbone,
    FusionOutput,
    ImageOutput,
    ImagePrefix,
    PrefixBackbone,
    TextInputs,
    TextOutput,
    TextPrefix,
)
from fiber_backbones.weights import (
    WeightsFormatError,
    WeightsMismatchError,
    from_pretrained,
    load_weights,
    resize_relative_position_bias_table,
    save_pretrained,
)

__all__ = [
    "AttentionBackend",
    "AttentionCase",
    "BackboneConfig",
    "CheckpointFormatError",
    "ConversionReport",
    "FeatureSpec",
    "FiberBackbone",
    "FusionBackbone",
    "FusionConfig",
    "FusionOutput",
    "ImageOutput",
    "ImagePrefix",
    "PrefixBackbone",
    "SwinConfig",
    "TextEncoderConfig",
    "TextInputs",
    "TextOutput",
    "TextPrefix",
    "TowerLoadReport",
    "WeightsFormatError",
    "WeightsMismatchError",
    "__version__",
    "attention",
    "attention_report",
    "convert_official_backbone",
    "create_backbone",
    "create_backbone_from_towers",
    "from_pretrained",
    "get_config",
    "get_entry",
    "init_from_towers",
    "last_n_schedule",
    "list_backbones",
    "load_roberta_weights",
    "load_swin_weights",
    "load_weights",
    "probe_xformers",
    "read_official_checkpoint",
    "register_backbone",
    "resize_relative_position_bias_table",
    "resolve_backend",
    "save_pretrained",
    "to_official_backbone",
    "use_attention_backend",
    "variant_overrides",
]
