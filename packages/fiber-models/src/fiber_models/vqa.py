"""VQA: backbone + fused projection + ``vqa_classifier`` (docs/reference/training.md §2.3)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from fiber_backbones import FusionBackbone, TextInputs
from fiber_data import VQABatch
from fiber_heads import VQAHead
from fiber_models.downstream import DownstreamModel, set_text_pool
from fiber_models.outputs import StepOutput

__all__ = ["VQAModel", "VQAModelConfig"]


@dataclass(frozen=True)
class VQAModelConfig:
    """What rebuilds a :class:`VQAModel` around its backbone.

    Args:
        hidden_dim: ``H``.
        num_answers: ``A``, rows of the classifier.
        answers: the answer string of each row (empty when unknown, e.g. a converted checkpoint).
        text_pool: ``first`` or ``mean``.
    """

    hidden_dim: int
    num_answers: int
    answers: tuple[str, ...] = ()
    text_pool: str = "first"

    def __post_init__(self) -> None:
        if self.answers and len(self.answers) != self.num_answers:
            raise ValueError(f"VQAModelConfig: {len(self.answers)} answers for {self.num_answers} classifier rows")


class VQAModel(DownstreamModel):
    """Backbone + fused projection + ``vqa_classifier`` (:class:`fiber_heads.VQAHead`).

    Args:
        backbone: the fusion backbone.
        hidden_dim: ``H``.
        num_answers: ``A``, the answer vocabulary size.
    """

    def __init__(self, backbone: FusionBackbone, hidden_dim: int, num_answers: int) -> None:
        super().__init__(backbone, hidden_dim)
        self.vqa_classifier = VQAHead(hidden_dim, num_answers)
        self.answers: tuple[str, ...] = ()

    model_type = "vqa"
    config_class = VQAModelConfig

    def get_config(self) -> VQAModelConfig:
        """The model's config; ``answers`` is the label of each classifier row (set by the trainer's export)."""
        return VQAModelConfig(
            self.hidden_dim, self.vqa_classifier.num_answers, tuple(self.answers), self.projection.text_pool
        )

    @classmethod
    def from_config(cls, backbone: FusionBackbone, config: VQAModelConfig) -> VQAModel:
        """A fresh model around ``backbone``."""
        model = cls(backbone, config.hidden_dim, config.num_answers)
        model.answers = tuple(config.answers)
        set_text_pool(model, config.text_pool)
        return model

    def head_modules(self) -> list[nn.Module]:
        return [self.vqa_classifier]

    def fused_cls(self, pixel_values: Tensor, text: TextInputs) -> Tensor:
        """``[B, 3, S, S]`` + question -> fused ``cls [B, 2H]``."""
        return self.projection(self.backbone(pixel_values, text, fuse=True)).cls

    def answer_logits(self, pixel_values: Tensor, text: TextInputs) -> Tensor:
        """Answer logits ``[B, A]``."""
        return self.vqa_classifier.logits(self.fused_cls(pixel_values, text))

    def forward(self, batch: VQABatch) -> StepOutput:
        """Soft-score BCE on one batch; logs ``vqa/loss`` and ``vqa/score``."""
        cls = self.fused_cls(batch.pixel_values, TextInputs(batch.input_ids, batch.attention_mask))
        out = self.vqa_classifier(cls, batch.targets)
        assert out.loss is not None
        return StepOutput(loss=out.loss, logs=out.logs)
