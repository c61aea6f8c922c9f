"""Base of the coarse downstream models (VQA, NLVR2, retrieval, captioning): backbone + fused projection.

Every downstream model is the fusion backbone (``backbone.*``), the fused projections/poolers (``projection.*``,
as in :class:`fiber_models.coarse.CoarseModel`) and task heads under their official names (``vqa_classifier``,
``nlvr2_classifier``, ``itm_score``, ``mlm_score``, ``cross_modal_att_layers``, ...), so that a coarse model's
weights initialise any of them by name.
"""

from __future__ import annotations

from torch import nn

from fiber_backbones import FusionBackbone
from fiber_heads import ContrastiveHead, CrossModalProjection
from fiber_models.pretrained import FiberPreTrainedModel

__all__ = ["DownstreamModel", "set_text_pool"]


class DownstreamModel(FiberPreTrainedModel):
    """Base of the downstream models: ``backbone`` + fused ``projection`` + task heads.

    Subclasses add their heads and list them in :meth:`head_modules` (they get the ``head`` lr multiplier);
    :meth:`cross_modal_modules` get the ``cross_modal`` multiplier together with the backbone's fusion
    parameters (docs/reference/training.md §1.6, §2.2).

    Args:
        backbone: any :class:`fiber_backbones.FusionBackbone`.
        hidden_dim: width ``H`` of the fused projections (``cls`` is ``[B, 2H]``).
    """

    def __init__(self, backbone: FusionBackbone, hidden_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.hidden_dim = hidden_dim
        self.projection = CrossModalProjection(backbone.image_dim, backbone.text_dim, hidden_dim)

    def head_modules(self) -> list[nn.Module]:
        """Task heads (``head`` learning-rate role)."""
        return []

    def cross_modal_modules(self) -> list[nn.Module]:
        """Projections and poolers (``cross_modal`` learning-rate role, with the backbone's fusion modules)."""
        return [self.projection]


def set_text_pool(model: nn.Module, text_pool: str) -> None:
    """Set the text pooling (``first`` or ``mean``) of every fused projection and ITC head of ``model``."""
    for m in model.modules():
        if isinstance(m, CrossModalProjection | ContrastiveHead):
            m.text_pool = text_pool
