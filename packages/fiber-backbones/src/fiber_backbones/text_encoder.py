"""RoBERTa-style post-LN text tower with the optional gated text-to-image (t2i) branch (docs/reference/architecture.md §3, §6).

Module names follow the official checkpoints (``embeddings.word_embeddings``, ``encoder.layer.{k}.attention.self.query``,
``attention.output.dense``/``LayerNorm``, ``intermediate.dense``, ``output.dense``/``LayerNorm``,
``crossattention_t2i.self.{query,key,value}``, ``crossattention_t2i.output.dense``, ``alpha_t2i``).

As in the official code, the attention sub-layer returns ``dropout(dense(context))`` *before* the residual so the
t2i branch (query = that pre-residual output, K/V = image tokens, no image mask) can be added there; then
``LN(a + t)`` and the FFN follow.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fiber_backbones.attention import attention
from fiber_backbones.config import TextEncoderConfig
from fiber_backbones.init import init_linear_and_norm

__all__ = ["TextEmbeddings", "TextEncoder", "TextLayer", "roberta_position_ids"]


def roberta_position_ids(attention_mask: Tensor, pad_token_id: int) -> Tensor:
    """RoBERTa positions: ``cumsum(mask) + pad_id`` on real tokens, ``pad_id`` on padding. ``[B, L] -> [B, L]``."""
    mask = attention_mask.long()
    return torch.cumsum(mask, dim=1) * mask + pad_token_id


class TextEmbeddings(nn.Module):
    """Word + position + token-type embeddings, LayerNorm, dropout.

    Args:
        cfg: text geometry.
    """

    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.pad_token_id = cfg.pad_token_id
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(
            cfg.max_position_embeddings, cfg.hidden_size, padding_idx=cfg.pad_token_id
        )
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None) -> Tensor:
        """``input_ids [B, L]`` (+ mask, optional positions) -> ``[B, L, C_txt]`` (token type 0 everywhere)."""
        max_pos = self.position_embeddings.num_embeddings
        if position_ids is None:
            if input_ids.shape[1] + self.pad_token_id + 1 > max_pos:
                raise ValueError(
                    f"text length {input_ids.shape[1]} exceeds max_position_embeddings {max_pos} "
                    f"(RoBERTa positions start at pad_token_id + 1 = {self.pad_token_id + 1})"
                )
            position_ids = roberta_position_ids(attention_mask, self.pad_token_id)
        x = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
        x = x + self.token_type_embeddings.weight[0]
        return self.dropout(self.LayerNorm(x))


class _SelfProjections(nn.Module):
    """``query``, ``key``, ``value`` linears (checkpoint family ``*.self.*``)."""

    def __init__(self, hidden: int, kv_dim: int) -> None:
        super().__init__()
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_dim, hidden)
        self.value = nn.Linear(kv_dim, hidden)


class _OutputDense(nn.Module):
    """``dense`` and an optional ``LayerNorm`` (checkpoint family ``*.output.*``)."""

    def __init__(self, in_dim: int, hidden: int, eps: float, norm: bool) -> None:
        super().__init__()
        self.dense = nn.Linear(in_dim, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps) if norm else None


class _Attention(nn.Module):
    """Multi-head attention ``self`` + ``output`` returning ``dropout(output.dense(context))`` without residual."""

    def __init__(self, hidden: int, kv_dim: int, heads: int, cfg: TextEncoderConfig, output_norm: bool) -> None:
        super().__init__()
        self.num_heads = heads
        self.attn_backend = "auto"
        self.attention_dropout = cfg.attention_dropout
        self.self = _SelfProjections(hidden, kv_dim)
        self.output = _OutputDense(hidden, hidden, cfg.layer_norm_eps, output_norm)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x: Tensor, kv: Tensor, key_padding_mask: Tensor | None, causal: bool = False) -> Tensor:
        """``x [B, L, C]`` attends to ``kv [B, N, C_kv]``; returns ``[B, L, C]`` before any residual."""
        b, length, c = x.shape
        h = self.num_heads
        d = c // h
        q = self.self.query(x).view(b, length, h, d).transpose(1, 2)
        k = self.self.key(kv).view(b, kv.shape[1], h, d).transpose(1, 2)
        v = self.self.value(kv).view(b, kv.shape[1], h, d).transpose(1, 2)
        p = self.attention_dropout if self.training else 0.0
        bias = None
        if causal:
            # Additive causal bias [1, 1, L, N]; padding is still applied through key_padding_mask.
            n = kv.shape[1]
            upper = torch.ones(length, n, dtype=torch.bool, device=x.device).triu(1)
            bias = torch.zeros(length, n, dtype=x.dtype, device=x.device).masked_fill(upper, float("-inf"))[None, None]
        ctx = attention(q, k, v, bias=bias, key_padding_mask=key_padding_mask, dropout_p=p, backend=self.attn_backend)
        return self.dropout(self.output.dense(ctx.transpose(1, 2).reshape(b, length, c)))


class _Intermediate(nn.Module):
    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, inter)


class TextLayer(nn.Module):
    """One post-LN transformer layer with an optional t2i branch (docs/reference/architecture.md §6).

    Args:
        cfg: text geometry.
        image_dim: image width ``C_img`` of the t2i K/V, or ``None`` for a layer without cross-attention.
        gate: create ``alpha_t2i`` (True for fused layers; coarse checkpoints have it in every layer).
        cross_output_norm: create the unused ``crossattention_t2i.output.LayerNorm`` (coarse checkpoints).
    """

    def __init__(
        self, cfg: TextEncoderConfig, image_dim: int | None = None, gate: bool = False, cross_output_norm: bool = False
    ) -> None:
        super().__init__()
        hidden, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.attention = _Attention(hidden, hidden, cfg.num_heads, cfg, output_norm=True)
        self.crossattention_t2i = (
            _Attention(hidden, image_dim, cfg.num_heads, cfg, output_norm=cross_output_norm)
            if image_dim is not None
            else None
        )
        if gate or image_dim is not None:
            # Zero-initialised gate: at init (or with fusion off) the layer is exactly the uni-modal layer.
            self.alpha_t2i = nn.Parameter(torch.zeros(1))
            if image_dim is None:
                # a gate without cross-attention exists only for the coarse checkpoint layout (docs/reference/architecture.md §11): never
                # used, so frozen (an unused trainable parameter would stall DDP's gradient reduction)
                self.alpha_t2i.requires_grad_(False)
        if (
            self.crossattention_t2i is not None
            and (unused_norm := self.crossattention_t2i.output.LayerNorm) is not None
        ):
            # likewise the coarse layout's cross-attention output LayerNorm (built when cross_output_norm), which the
            # branch never applies
            unused_norm.requires_grad_(False)
        self.intermediate = _Intermediate(hidden, cfg.intermediate_size)
        self.output = _OutputDense(cfg.intermediate_size, hidden, eps, norm=True)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(
        self,
        t: Tensor,
        mask: Tensor,
        image: Tensor | None = None,
        *,
        causal: bool = False,
        output_norm: bool = True,
    ) -> Tensor:
        """Layer forward.

        Args:
            t: ``[B, L, C_txt]`` layer input.
            mask: ``BoolTensor [B, L]`` (True = real token).
            image: pre-step image tokens ``[B, N, C_img]`` for the t2i branch, or ``None``.
            causal: causal self-attention (left-to-right decoding).
            output_norm: apply ``output.LayerNorm`` (False reproduces the coarse fused-path quirk, docs/reference/architecture.md §8.1).

        Returns:
            ``[B, L, C_txt]``.
        """
        a = self.attention(t, t, mask, causal=causal)
        if image is not None and self.crossattention_t2i is not None:
            a = a + self.alpha_t2i * self.crossattention_t2i(a, image, None)
        attention_norm, output_norm_layer = self.attention.output.LayerNorm, self.output.LayerNorm
        assert attention_norm is not None and output_norm_layer is not None  # both built with norm=True
        h1 = attention_norm(a + t)
        out = self.dropout(self.output.dense(F.gelu(self.intermediate.dense(h1)))) + h1
        return output_norm_layer(out) if output_norm else out


class TextEncoder(nn.Module):
    """Embeddings + ``encoder.layer`` stack.

    Args:
        cfg: text geometry.
        cross_layers: mapping ``text layer -> image width`` of the layers that carry the t2i branch.
        gate_all_layers: create ``alpha_t2i`` in every layer (coarse checkpoint layout).
        cross_output_norm: create the unused cross-attention output LayerNorm (coarse checkpoint layout).
    """

    def __init__(
        self,
        cfg: TextEncoderConfig,
        cross_layers: Mapping[int, int] | None = None,
        gate_all_layers: bool = False,
        cross_output_norm: bool = False,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        cross = dict(cross_layers or {})
        self.embeddings = TextEmbeddings(cfg)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(
            TextLayer(cfg, cross.get(k), gate=gate_all_layers, cross_output_norm=cross_output_norm)
            for k in range(cfg.num_layers)
        )
        self.apply(_init_weights)

    @property
    def layers(self) -> nn.ModuleList:
        """The ``encoder.layer`` list."""
        return cast(nn.ModuleList, self.encoder.layer)  # set in __init__ (a plain nn.Module holds it, untyped)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        position_ids: Tensor | None = None,
        *,
        causal: bool = False,
        cross_inputs: Mapping[int, Tensor] | None = None,
        final_output_norm: bool = True,
    ) -> Tensor:
        """Run all layers.

        Args:
            input_ids: ``[B, L]``.
            attention_mask: ``BoolTensor [B, L]``.
            position_ids: optional ``[B, L]``.
            causal: causal self-attention (captioning decoder, docs/reference/architecture.md §8.3).
            cross_inputs: optional ``{layer: image tokens [B, N, C_img]}`` fed to those layers' t2i branches
                (e.g. adapter outputs for captioning).
            final_output_norm: apply the last layer's output LayerNorm.

        Returns:
            ``[B, L, C_txt]``.
        """
        mask = attention_mask.bool()
        t = self.embeddings(input_ids, mask, position_ids)
        cross = cross_inputs or {}
        n = len(self.layers)
        for k, layer in enumerate(self.layers):
            t = layer(t, mask, cross.get(k), causal=causal, output_norm=final_output_norm or k < n - 1)
        return t


def _init_weights(module: nn.Module) -> None:
    init_linear_and_norm(module)
    if isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
