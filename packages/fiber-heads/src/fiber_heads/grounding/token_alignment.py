"""Token-alignment (dot-product) logits between region features and text tokens (docs/reference/training.md §3.5).

For image ``b``, anchor ``a`` and token ``j``::

    e_j  = embedded_j / max(||embedded_j||, 1e-12)     # embedded = text hidden * attention mask (padding rows 0)
    p_j  = W_p (e_j / 2) + b_p                         # dot_product_projection_text: C_txt -> C
    beta_j = e_j . bias_lang + bias0
    z_aj = clamp((f_a . p_j) / exp(log_scale) + beta_j, -50000, 50000)

``f_a`` is the final DyHead feature of the anchor, not normalised. Init: ``log_scale = 0``,
``bias_lang = 0``, ``bias0 = -log((1 - prior) / prior)`` with ``prior = 0.01``; the projection keeps the
default ``nn.Linear`` init. Parameter names follow the official ``rpn.head.*`` keys.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOGIT_CLAMP: float = 50000.0


class TokenAlignment(nn.Module):
    """Dot-product logits ``[B, A, L]`` between anchor features and text tokens.

    Padding tokens are zeroed before normalisation, so their logits reduce to ``(f_a . b_p) / s + bias0``;
    they carry no information and must be excluded by the caller (the loss masks them, post-processing reads
    only tokens of the positive maps). This matches the reference numerically.

    Args:
        channels: width of the region features (256).
        text_dim: width of the text hidden states (768 for RoBERTa-base).
        prior_prob: prior probability that sets the initial ``bias0``.
    """

    def __init__(self, channels: int = 256, text_dim: int = 768, prior_prob: float = 0.01) -> None:
        super().__init__()
        self.dot_product_projection_text = nn.Linear(text_dim, channels)
        self.bias_lang = nn.Parameter(torch.zeros(text_dim))
        self.bias0 = nn.Parameter(torch.full((1,), -math.log((1.0 - prior_prob) / prior_prob)))
        self.log_scale = nn.Parameter(torch.zeros(1))

    def project_text(self, text_hidden: Tensor, text_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Projected tokens and per-token biases.

        Args:
            text_hidden: ``[B, L, C_txt]`` text hidden states.
            text_mask: ``[B, L]`` attention mask (bool or 0/1), ``True``/1 for real tokens.

        Returns:
            ``p [B, L, C]`` and ``beta [B, L]``.
        """
        embedded = text_hidden * text_mask.to(text_hidden.dtype).unsqueeze(-1)
        e = F.normalize(embedded, p=2, dim=-1, eps=1e-12)
        p = self.dot_product_projection_text(e / 2.0)
        beta = e @ self.bias_lang + self.bias0
        return p, beta

    def forward(self, region_features: Tensor, text_hidden: Tensor, text_mask: Tensor) -> Tensor:
        """Logits of every (anchor, token) pair.

        Args:
            region_features: ``[B, A, C]`` final DyHead features, anchors flattened over levels.
            text_hidden: ``[B, L, C_txt]`` text hidden states.
            text_mask: ``[B, L]`` attention mask, ``True``/1 for real tokens.

        Returns:
            ``[B, A, L]`` logits, clamped to ``+-50000``.
        """
        if region_features.shape[0] != text_hidden.shape[0] or text_hidden.shape[:2] != text_mask.shape:
            raise ValueError(
                f"TokenAlignment: batch/length mismatch: regions {tuple(region_features.shape)}, text "
                f"{tuple(text_hidden.shape)}, mask {tuple(text_mask.shape)}"
            )
        p, beta = self.project_text(text_hidden, text_mask)
        logits = torch.matmul(region_features, p.transpose(-1, -2)) / self.log_scale.exp() + beta.unsqueeze(1)
        return logits.clamp(min=-LOGIT_CLAMP, max=LOGIT_CLAMP)
