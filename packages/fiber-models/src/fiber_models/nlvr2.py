"""NLVR2: two fused passes (left and right image) sharing the sentence + ``nlvr2_classifier`` (docs/reference/training.md §2.4)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from fiber_backbones import FusionBackbone, TextInputs
from fiber_data import NLVR2Batch
from fiber_heads import NLVR2Head
from fiber_models.downstream import DownstreamModel, set_text_pool
from fiber_models.outputs import StepOutput

__all__ = ["NLVR2Model", "NLVR2ModelConfig"]


@dataclass(frozen=True)
class NLVR2ModelConfig:
    """What rebuilds a :class:`NLVR2Model` around its backbone (``hidden_dim`` ``H``, text pooling)."""

    hidden_dim: int
    text_pool: str = "first"


class NLVR2Model(DownstreamModel):
    """Backbone + fused projection + ``nlvr2_classifier`` (:class:`fiber_heads.NLVR2Head`)."""

    def __init__(self, backbone: FusionBackbone, hidden_dim: int) -> None:
        super().__init__(backbone, hidden_dim)
        self.nlvr2_classifier = NLVR2Head(hidden_dim)

    model_type = "nlvr2"
    config_class = NLVR2ModelConfig

    def get_config(self) -> NLVR2ModelConfig:
        """The model's config."""
        return NLVR2ModelConfig(self.hidden_dim, self.projection.text_pool)

    @classmethod
    def from_config(cls, backbone: FusionBackbone, config: NLVR2ModelConfig) -> NLVR2Model:
        """A fresh model around ``backbone``."""
        model = cls(backbone, config.hidden_dim)
        set_text_pool(model, config.text_pool)
        return model

    def head_modules(self) -> list[nn.Module]:
        return [self.nlvr2_classifier]

    def pair_cls(self, pixel_values: Tensor, text: TextInputs) -> Tensor:
        """Two fused passes sharing the sentence.

        Args:
            pixel_values: ``[B, 2, 3, S, S]`` (left, right).
            text: the sentences, ``[B, L]``.

        Returns:
            ``concat(cls_left, cls_right)`` ``[B, 4H]``.
        """
        if pixel_values.dim() != 5 or pixel_values.shape[1] != 2:
            raise ValueError(f"NLVR2Model: pixel_values must be [B, 2, 3, H, W], got {tuple(pixel_values.shape)}")
        b = pixel_values.shape[0]
        # [B, 2, 3, H, W] -> [2B, 3, H, W] with all left images first, then all right images.
        images = pixel_values.transpose(0, 1).reshape(2 * b, *pixel_values.shape[2:])
        both = TextInputs(
            text.input_ids.repeat(2, 1),
            text.attention_mask.repeat(2, 1),
            None if text.position_ids is None else text.position_ids.repeat(2, 1),
        )
        cls = self.projection(self.backbone(images, both, fuse=True)).cls
        return NLVR2Head.pair(cls[:b], cls[b:])

    def forward(self, batch: NLVR2Batch) -> StepOutput:
        """Cross-entropy on one batch; logs ``nlvr2/loss`` and ``nlvr2/acc``."""
        pair = self.pair_cls(batch.pixel_values, TextInputs(batch.input_ids, batch.attention_mask))
        out = self.nlvr2_classifier(pair, batch.labels)
        assert out.loss is not None
        return StepOutput(loss=out.loss, logs=out.logs)
