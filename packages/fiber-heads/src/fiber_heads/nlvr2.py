"""NLVR2 head (docs/reference/architecture.md §8.4-8.5, docs/reference/training.md §2.4).

The sentence is fused once with each image; ``concat(cls_0, cls_1) [B, 4H]`` -> Linear(4H -> 2H) -> LayerNorm
-> GELU -> Linear(2H -> 2), cross-entropy with label 1 = "True".
"""

from __future__ import annotations

import torch
from torch import Tensor

from fiber_heads._classifier import MLPClassifier, classification_output
from fiber_heads.types import HeadOutput


class NLVR2Head(MLPClassifier):
    """NLVR2 classifier; state-dict keys ``0.*``, ``1.*``, ``3.*`` as the official ``nlvr2_classifier``.

    Args:
        hidden_dim: ``H``; each ``cls`` has ``2H`` features, the pair ``4H``.
    """

    def __init__(self, hidden_dim: int) -> None:
        super().__init__(4 * hidden_dim, 2 * hidden_dim, 2)

    @staticmethod
    def pair(cls_0: Tensor, cls_1: Tensor) -> Tensor:
        """``concat(cls_0, cls_1)``: two ``[B, 2H]`` -> ``[B, 4H]`` (image 0 first)."""
        if cls_0.shape != cls_1.shape:
            raise ValueError(f"NLVR2Head.pair: cls_0 {tuple(cls_0.shape)} != cls_1 {tuple(cls_1.shape)}")
        return torch.cat([cls_0, cls_1], dim=-1)

    # a head takes its targets too: the signature differs from nn.Sequential.forward(input) on purpose
    def forward(self, pair_cls: Tensor, labels: Tensor | None = None) -> HeadOutput:  # pyright: ignore[reportIncompatibleMethodOverride]
        """Logits and, with labels, the cross-entropy.

        Args:
            pair_cls: ``[B, 4H]`` = :meth:`pair` ``(cls_0, cls_1)``.
            labels: optional ``LongTensor [B]``, 1 = the sentence is true of the pair.

        Returns:
            :func:`~fiber_heads._classifier.classification_output` ``"nlvr2"``: logits ``[B, 2]``, with labels
            (any integer dtype) the loss and logs ``nlvr2/loss``, ``nlvr2/acc``.
        """
        return classification_output(
            "nlvr2", "NLVR2Head", self.logits(pair_cls), None if labels is None else labels.long()
        )

    @torch.no_grad()
    def predict(self, pair_cls: Tensor) -> Tensor:
        """Predicted label per sample: ``[B, 4H] -> LongTensor [B]`` (1 = True)."""
        return self.logits(pair_cls).argmax(dim=1)
