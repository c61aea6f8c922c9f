"""Masked-language-modelling head of the coarse model (docs/reference/architecture.md §8.5, docs/reference/training.md §1.3).

Applied to the fused text tokens after ``cross_modal_text_transform``: ``transform`` = Linear -> GELU (exact)
-> LayerNorm (eps 1e-12), then ``decoder`` Linear(H -> V, no bias) plus a separate ``bias``. The decoder is
**not** tied to the word embeddings. Sub-module names equal the official ``mlm_score.*`` keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fiber_heads.init import init_head_weights
from fiber_heads.types import HeadOutput

IGNORE_INDEX = -100
"""Label value of positions that do not enter the MLM loss."""


class MLMTransform(nn.Module):
    """``LayerNorm(GELU(dense(x)))`` with LayerNorm eps 1e-12 (official ``mlm_score.transform``)."""

    def __init__(self, hidden_dim: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_dim, hidden_dim)
        self.transform_act_fn = nn.GELU()
        self.LayerNorm = nn.LayerNorm(hidden_dim, eps=1e-12)

    def forward(self, x: Tensor) -> Tensor:
        """``[..., H] -> [..., H]``."""
        return self.LayerNorm(self.transform_act_fn(self.dense(x)))


class MaskedLMHead(nn.Module):
    """MLM head with an untied decoder.

    Args:
        hidden_dim: width ``H`` of the projected text tokens.
        vocab_size: ``V`` (50265 for RoBERTa).
    """

    def __init__(self, hidden_dim: int, vocab_size: int) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.vocab_size = vocab_size
        self.transform = MLMTransform(hidden_dim)
        self.decoder = nn.Linear(hidden_dim, vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Reference initialisation: Linear ``N(0, 0.02)``, LayerNorm (1, 0), zero output bias."""
        init_head_weights(self)
        nn.init.zeros_(self.bias)

    def logits(self, text_feats: Tensor) -> Tensor:
        """``[B, L, H] -> [B, L, V]`` vocabulary logits."""
        if text_feats.shape[-1] != self.hidden_dim:
            raise ValueError(f"MaskedLMHead: text_feats width {text_feats.shape[-1]} != hidden_dim {self.hidden_dim}")
        return self.decoder(self.transform(text_feats)) + self.bias

    def forward(self, text_feats: Tensor, labels: Tensor | None = None) -> HeadOutput:
        """Vocabulary logits and, with labels, the mean cross-entropy over the masked positions.

        Args:
            text_feats: ``[B, L, H]`` fused text tokens after ``cross_modal_text_transform``
                (``ProjectedFeatures.text_feats``).
            labels: optional ``LongTensor [B, L]``: original token id at masked positions, ``-100`` elsewhere.

        Returns:
            :class:`HeadOutput` with ``logits {"mlm": [B, L, V]}`` and, with labels, ``loss`` (a zero that still
            carries a gradient path when no position is masked, never NaN) and logs ``mlm/loss``, ``mlm/acc``
            (accuracy on masked positions).
        """
        logits = self.logits(text_feats)
        if labels is None:
            return HeadOutput(loss=None, logits={"mlm": logits})
        if labels.shape != logits.shape[:-1]:
            raise ValueError(
                f"MaskedLMHead: labels shape {tuple(labels.shape)} != text shape {tuple(logits.shape[:-1])}"
            )
        flat_logits = logits.reshape(-1, self.vocab_size).float()
        flat_labels = labels.reshape(-1)
        selected = flat_labels != IGNORE_INDEX
        count = selected.sum()
        # Sum then divide by max(count, 1): the mean over masked tokens, and 0 (not NaN) without any, with no
        # host sync on the count.
        loss_sum = F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX, reduction="sum")
        loss = loss_sum / count.clamp(min=1)
        with torch.no_grad():
            correct = ((flat_logits.argmax(-1) == flat_labels) & selected).sum()
            acc = correct.float() / count.clamp(min=1).float()
        return HeadOutput(loss=loss, logits={"mlm": logits}, logs={"mlm/loss": loss.detach(), "mlm/acc": acc})
