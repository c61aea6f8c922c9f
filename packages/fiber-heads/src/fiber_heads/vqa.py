"""VQAv2 head (docs/reference/architecture.md §8.5, docs/reference/training.md §2.3).

``cls [B, 2H]`` -> Linear(2H -> 2H) -> LayerNorm -> GELU -> Linear(2H -> A). The loss is binary cross-entropy
with logits against the soft answer scores, averaged over batch x answers and then multiplied by the number
of answers ``A`` (the reference scaling, equivalent to summing over answers and averaging over questions).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fiber_heads._classifier import MLPClassifier
from fiber_heads.types import HeadOutput


class VQAHead(MLPClassifier):
    """VQA classifier; state-dict keys ``0.*``, ``1.*``, ``3.*`` as the official ``vqa_classifier``.

    Args:
        hidden_dim: ``H``; the input ``cls`` has ``2H`` features.
        num_answers: ``A``, size of the answer vocabulary (3129 for VQAv2).
    """

    def __init__(self, hidden_dim: int, num_answers: int) -> None:
        super().__init__(2 * hidden_dim, 2 * hidden_dim, num_answers)
        self.num_answers = num_answers

    # a head takes its targets too: the signature differs from nn.Sequential.forward(input) on purpose
    def forward(self, cls: Tensor, targets: Tensor | None = None) -> HeadOutput:  # pyright: ignore[reportIncompatibleMethodOverride]
        """Answer logits and, with targets, the scaled BCE loss.

        Args:
            cls: ``[B, 2H]`` fused pooled features.
            targets: optional ``[B, A]`` soft scores in ``[0, 1]`` (0.3 / 0.6 / 0.9 / 1.0 per answer).

        Returns:
            :class:`HeadOutput` with ``logits {"vqa": [B, A]}`` and, with targets, ``loss`` =
            ``A * mean(BCEWithLogits(logits, targets))`` and logs ``vqa/loss``, ``vqa/score`` (mean soft target
            at the argmax answer, the training-time "VQA score").
        """
        logits = self.logits(cls)
        if targets is None:
            return HeadOutput(loss=None, logits={"vqa": logits})
        if targets.shape != logits.shape:
            raise ValueError(f"VQAHead: targets must be {tuple(logits.shape)}, got {tuple(targets.shape)}")
        loss = F.binary_cross_entropy_with_logits(logits.float(), targets.float()) * self.num_answers
        with torch.no_grad():
            score = targets.float().gather(1, logits.argmax(dim=1, keepdim=True)).mean()
        return HeadOutput(loss=loss, logits={"vqa": logits}, logs={"vqa/loss": loss.detach(), "vqa/score": score})

    @torch.no_grad()
    def predict(self, cls: Tensor) -> Tensor:
        """Predicted answer index per question: ``[B, 2H] -> LongTensor [B]`` (argmax)."""
        return self.logits(cls).argmax(dim=1)
