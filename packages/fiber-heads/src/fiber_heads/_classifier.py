"""Shared two-layer classifier of the VQA and NLVR2 heads (docs/reference/architecture.md §8.5).

``Linear -> LayerNorm -> GELU -> Linear``, stored as a ``Sequential`` so its state-dict keys are ``0``, ``1``
and ``3`` exactly like the official ``vqa_classifier`` / ``nlvr2_classifier``.
"""

from __future__ import annotations

from torch import Tensor, nn

from fiber_heads.init import init_head_weights


class MLPClassifier(nn.Sequential):
    """``Linear(in -> hidden) -> LayerNorm(hidden) -> GELU -> Linear(hidden -> out)``.

    Subclasses override ``forward`` to add a loss; :meth:`logits` runs the layers.

    Args:
        in_dim: input width.
        hidden_dim: width of the hidden layer.
        out_dim: number of output logits.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__(
            nn.Linear(in_dim, hidden_dim),
            nn.LayerNorm(hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, out_dim),
        )
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Reference initialisation: Linear ``N(0, 0.02)``, zero bias, LayerNorm (1, 0)."""
        init_head_weights(self)

    def logits(self, x: Tensor) -> Tensor:
        """``[B, in_dim] -> [B, out_dim]``."""
        if x.dim() != 2 or x.shape[-1] != self.in_dim:
            raise ValueError(f"{type(self).__name__}: input must be [B, {self.in_dim}], got {tuple(x.shape)}")
        for layer in self:
            x = layer(x)
        return x
