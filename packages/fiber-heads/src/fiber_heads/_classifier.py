"""Shared two-layer classifier of the VQA and NLVR2 heads (docs/reference/architecture.md §8.5), and the
cross-entropy output of the two-way classification heads (ITM, NLVR2).

``Linear -> LayerNorm -> GELU -> Linear``, stored as a ``Sequential`` so its state-dict keys are ``0``, ``1``
and ``3`` exactly like the official ``vqa_classifier`` / ``nlvr2_classifier``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from fiber_heads.init import init_head_weights
from fiber_heads.types import HeadOutput


def classification_output(task: str, head: str, logits: Tensor, labels: Tensor | None) -> HeadOutput:
    """The output of a classification head: its logits and, with labels, the mean cross-entropy.

    Args:
        task: the key of the logits and the prefix of the logs (``itm``, ``nlvr2``).
        head: the head's name in the error for mis-shaped labels.
        logits: ``[B, C]`` class logits.
        labels: optional ``LongTensor [B]`` of class indices.

    Returns:
        :class:`HeadOutput` with ``logits {task: [B, C]}`` and, with labels, ``loss`` (cross-entropy computed in
        float32) and logs ``<task>/loss``, ``<task>/acc`` (fraction of argmax predictions equal to the label).

    Raises:
        ValueError: ``labels`` is not ``[B]``.
    """
    if labels is None:
        return HeadOutput(loss=None, logits={task: logits})
    if tuple(labels.shape) != (logits.shape[0],):
        raise ValueError(f"{head}: labels must be [{logits.shape[0]}], got {tuple(labels.shape)}")
    loss = F.cross_entropy(logits.float(), labels)
    acc = (logits.detach().argmax(-1) == labels).float().mean()
    return HeadOutput(loss=loss, logits={task: logits}, logs={f"{task}/loss": loss.detach(), f"{task}/acc": acc})


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
