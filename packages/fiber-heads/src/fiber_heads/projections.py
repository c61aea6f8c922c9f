"""Fused-path projections and poolers of the coarse model (docs/reference/architecture.md §8.1 and §8.5).

The fused backbone output is mapped to the common width ``H`` by two per-token linear transforms
(``cross_modal_text_transform``, ``cross_modal_image_transform``); two poolers (dense + tanh) then summarise
the text on its first token (``<s>``) and the image on the average of *all* its transformed tokens. Their
concatenation, text first, is the ``cls`` vector read by the ITM, VQA and NLVR2 heads.

Attribute names equal the official checkpoint's sub-names, so converting a checkpoint is a pure prefix copy.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fiber_heads.init import init_head_weights
from fiber_heads.types import FusedFeatures, ProjectedFeatures


class Pooler(nn.Module):
    """``tanh(dense(x))`` on an already selected vector (official ``Pooler`` with key ``dense``).

    Args:
        dim: input and output width.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.activation = nn.Tanh()

    def forward(self, x: Tensor) -> Tensor:
        """Pool.

        Args:
            x: ``[B, D]`` selected (first-token or averaged) features.

        Returns:
            ``[B, D]`` pooled features.
        """
        return self.activation(self.dense(x))


def _check_width(tensor: Tensor, dim: int, what: str, owner: str) -> None:
    if tensor.dim() != 3:
        raise ValueError(f"{owner}: {what} must be [B, T, C], got shape {tuple(tensor.shape)}")
    if tensor.shape[-1] != dim:
        raise ValueError(f"{owner}: {what} has width {tensor.shape[-1]}, the head was built for {dim}")


TEXT_POOLING = ("first", "mean")


def pool_text(feats: Tensor, mask: Tensor | None, mode: str) -> Tensor:
    """One vector per text from per-token features ``[B, L, H]`` -> ``[B, H]``.

    ``"first"``: token 0 (``<s>``), the reference. ``"mean"``: the mean over real tokens (``mask`` ``[B, L]``,
    ``True`` = real). The reference's ``<s>`` pooling needs a pretrained text tower: in a randomly initialised
    post-LN encoder the ``<s>`` state hardly depends on the text, and contrastive/matching losses from scratch
    (the synthetic-world defaults) barely move; mean pooling learns at once.
    """
    if mode == "first":
        return feats[:, 0]
    if mode == "mean":
        if mask is None:
            return feats.mean(dim=1)
        m = mask.unsqueeze(-1).to(feats.dtype)
        return (feats * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)
    raise ValueError(f"text pooling must be one of {TEXT_POOLING}, got {mode!r}")


class CrossModalProjection(nn.Module):
    """Projections + poolers of the fused path, producing ``text_feats``, ``image_feats`` and ``cls``.

    Args:
        image_dim: width ``C_img`` of the backbone's image tokens (1024 for FIBER-B).
        text_dim: width ``C_txt`` of the backbone's text hidden states (768 for FIBER-B).
        hidden_dim: common width ``H`` (768 for FIBER-B); ``cls`` has ``2H`` features.
        text_pool: ``"first"`` (``<s>``, the reference) or ``"mean"`` over real tokens (see :func:`pool_text`).
    """

    def __init__(self, image_dim: int, text_dim: int, hidden_dim: int, text_pool: str = "first") -> None:
        super().__init__()
        if text_pool not in TEXT_POOLING:
            raise ValueError(f"text_pool must be one of {TEXT_POOLING}, got {text_pool!r}")
        self.text_pool = text_pool
        self.image_dim = image_dim
        self.text_dim = text_dim
        self.hidden_dim = hidden_dim
        self.cross_modal_text_transform = nn.Linear(text_dim, hidden_dim)
        self.cross_modal_image_transform = nn.Linear(image_dim, hidden_dim)
        self.cross_modal_text_pooler = Pooler(hidden_dim)
        self.cross_modal_image_pooler = Pooler(hidden_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Reference initialisation: Linear ``N(0, 0.02)`` with zero bias."""
        init_head_weights(self)

    def forward(self, features: FusedFeatures) -> ProjectedFeatures:
        """Project and pool a fused backbone output.

        Args:
            features: anything with ``image.tokens`` ``[B, N, C_img]`` and ``text.hidden`` ``[B, L, C_txt]``
                (e.g. ``fiber_backbones.FusionOutput`` of a fused forward).

        Returns:
            :class:`ProjectedFeatures` with ``text_feats [B, L, H]``, ``image_feats [B, N, H]`` and
            ``cls [B, 2H]`` (text first).

        Raises:
            ValueError: when ``features.text`` is ``None`` or a width/batch size does not match.
        """
        if features.text is None:
            raise ValueError("CrossModalProjection needs fused text features, got features.text=None")
        tokens = features.image.tokens
        hidden = features.text.hidden
        _check_width(tokens, self.image_dim, "image.tokens", type(self).__name__)
        _check_width(hidden, self.text_dim, "text.hidden", type(self).__name__)
        if tokens.shape[0] != hidden.shape[0]:
            raise ValueError(f"CrossModalProjection: image batch {tokens.shape[0]} != text batch {hidden.shape[0]}")
        text_feats = self.cross_modal_text_transform(hidden)
        image_feats = self.cross_modal_image_transform(tokens)
        pooled_text = self.cross_modal_text_pooler(pool_text(text_feats, features.text.mask, self.text_pool))
        # Mean over all N image tokens is taken after the projection (quirk 3 of docs/reference/architecture.md §8.1).
        pooled_image = self.cross_modal_image_pooler(image_feats.mean(dim=1))
        cls = torch.cat([pooled_text, pooled_image], dim=-1)
        return ProjectedFeatures(text_feats=text_feats, image_feats=image_feats, cls=cls)
