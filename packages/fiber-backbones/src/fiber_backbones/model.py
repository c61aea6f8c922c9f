"""The FIBER fusion backbone: Swin + RoBERTa towers fused by a schedule of gated cross-attention (spec §4, §7–§9).

:class:`FiberBackbone` runs the uni-modal prefixes of both towers, then the fusion schedule with the **parallel
update** of spec §4: at every step the Swin block's i2t branch reads the pre-step text states and the text
layer's t2i branch reads the pre-step image tokens, then both states are replaced. Patch merging between stages
happens on the image side only, so a text layer paired with the first block of a stage attends to the merged map.

Top-level state-dict prefixes are ``image_encoder.`` (official coarse ``vit_model.``, fine
``fusion_backbone.backbone.body.``) and ``text_encoder.`` (official coarse ``text_transformer.``, fine
``fusion_backbone.language_backbone.body.model.``); everything below them uses the official sub-names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from fiber_backbones.attention import resolve_backend
from fiber_backbones.config import BackboneConfig
from fiber_backbones.swin import SwinTransformer, WindowAttention
from fiber_backbones.text_encoder import TextEncoder, _Attention
from fiber_backbones.types import FeatureSpec, FusionOutput, ImageOutput, TextInputs, TextOutput

__all__ = ["FiberBackbone"]


class FiberBackbone(nn.Module):
    """Fusion-in-the-backbone image/text encoder (satisfies :class:`~fiber_backbones.types.FusionBackbone`).

    Args:
        config: complete configuration (see :mod:`fiber_backbones.config`).

    Attributes:
        feature_specs: one :class:`FeatureSpec` per pyramid map (``stage{i}`` for ``swin.out_indices``).
        size_divisibility: input sizes must be multiples of this (32 for 4-stage Swin).
        image_dim: width of the last-stage image tokens.
        text_dim: width of the text hidden states.
        fusion_schedule: the ``((stage, block), text_layer)`` pairs.
    """

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        self.config = config
        sw, tx, fu = config.swin, config.text, config.fusion
        self.image_encoder = SwinTransformer(
            sw, frozenset(blk for blk, _ in fu.schedule), text_dim=tx.hidden_size, i2t_query_norm=fu.i2t_query_norm
        )
        self.text_encoder = TextEncoder(
            tx,
            cross_layers={k: sw.stage_dim(s) for (s, _), k in fu.schedule},
            gate_all_layers=fu.t2i_gate_all_layers,
            cross_output_norm=fu.t2i_output_norm,
        )
        self.feature_specs: tuple[FeatureSpec, ...] = tuple(
            FeatureSpec(f"stage{i}", sw.stage_dim(i), sw.patch_size * 2**i) for i in sw.out_indices
        )
        self.size_divisibility: int = sw.size_divisibility
        self.image_dim: int = sw.stage_dim(sw.num_stages - 1)
        self.text_dim: int = tx.hidden_size
        self.fusion_schedule: tuple[tuple[tuple[int, int], int], ...] = fu.schedule
        self._fused_at = {blk: k for blk, k in fu.schedule}
        self.grad_checkpointing = False
        self.set_attention_backend(config.attention_backend)

    # ------------------------------------------------------------------ configuration helpers
    def set_attention_backend(self, name: str) -> None:
        """Set the requested attention backend of every attention module (``"auto"|"xformers"|"sdpa"|"eager"``)."""
        resolve_backend(name, device="cpu")  # validates the name
        for m in self.modules():
            if isinstance(m, (WindowAttention, _Attention)):
                m.attn_backend = name

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute every Swin block and text layer in the backward pass (training only)."""
        self.grad_checkpointing = enabled

    def named_fusion_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of the gates and the i2t / t2i cross-attention modules (incl. unused gates)."""
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[0]
            if "alpha_i2t" in name or "alpha_t2i" in name or "_i2t" in leaf or "crossattention_t2i" in leaf:
                yield name, p

    def fusion_parameters(self) -> Iterator[nn.Parameter]:
        """Gates and cross-attention parameters, e.g. for their own learning-rate group."""
        for _, p in self.named_fusion_parameters():
            yield p

    def no_weight_decay(self) -> set[str]:
        """Full names of parameters that conventionally get no weight decay.

        Biases, LayerNorm weights, relative-position-bias tables. The gates are *not* included (the official
        recipes decay them); a trainer wanting the exact official name-pattern rules can apply them itself.
        """
        names: set[str] = set()
        norm_params = {
            f"{mn}.{pn}" if mn else pn
            for mn, m in self.named_modules()
            if isinstance(m, nn.LayerNorm)
            for pn, _ in m.named_parameters(recurse=False)
        }
        for name, _ in self.named_parameters():
            if name.endswith(".bias") or name.endswith("relative_position_bias_table") or name in norm_params:
                names.add(name)
        return names

    # ------------------------------------------------------------------ towers
    def _run(self, fn: Callable[..., Tensor], *args: Any, **kwargs: Any) -> Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False, **kwargs)  # type: ignore[return-value]
        return fn(*args, **kwargs)

    def encode_image(self, pixel_values: Tensor) -> ImageOutput:
        """Uni-modal image tower with every norm (ITC path, spec §8.2).

        Args:
            pixel_values: ``[B, 3, H, W]``.

        Returns:
            :class:`ImageOutput` with tokens through the final norm (if the config has one).
        """
        return self._forward(pixel_values, None, fuse=False, path_norms=True).image

    def encode_text(self, text: TextInputs) -> TextOutput:
        """Uni-modal text tower with every LayerNorm, never fused.

        Args:
            text: ``input_ids [B, L]``, ``attention_mask [B, L]``.

        Returns:
            :class:`TextOutput` with ``hidden [B, L, C_txt]``.
        """
        _check_text(text)
        enc = self.text_encoder
        mask = text.attention_mask
        t = enc.embeddings(text.input_ids, mask, text.position_ids)
        for layer in enc.layers:
            t = self._run(layer, t, mask)
        return TextOutput(hidden=t, mask=mask)

    def forward(self, pixel_values: Tensor, text: TextInputs | None = None, *, fuse: bool = True) -> FusionOutput:
        """Fused forward (spec §4, §8.1).

        Args:
            pixel_values: ``[B, 3, H, W]``; fine variants accept any size (multiples of ``size_divisibility``
                match the official model), coarse variants exactly ``swin.img_size``.
            text: tokenised text or ``None`` (image only).
            fuse: run the cross-attention branches; ``False`` gives the two towers on the same path.

        Returns:
            :class:`FusionOutput`. On a coarse config (``fused_path_norms=False``) neither the final Swin norm
            nor the last text layer's output LayerNorm is applied, with or without fusion.
        """
        return self._forward(pixel_values, text, fuse=fuse, path_norms=self.config.fused_path_norms)

    def _forward(self, pixel_values: Tensor, text: TextInputs | None, *, fuse: bool, path_norms: bool) -> FusionOutput:
        swin, enc = self.image_encoder, self.text_encoder
        if text is not None:
            _check_text(text)
            if text.input_ids.shape[0] != pixel_values.shape[0]:
                raise ValueError(
                    f"batch mismatch: pixel_values has {pixel_values.shape[0]} images, text has {text.input_ids.shape[0]} rows"
                )
        fusing = fuse and text is not None and bool(self.fusion_schedule)
        x, hw = swin.embed(pixel_values)
        t: Tensor | None = None
        mask: Tensor | None = None
        if text is not None:
            mask = text.attention_mask
            t = enc.embeddings(text.input_ids, mask, text.position_ids)
        layers = enc.layers
        n_layers = len(layers)
        next_layer = 0

        def run_text_until(stop: int) -> None:
            nonlocal t, next_layer
            while t is not None and next_layer < stop:
                last = next_layer == n_layers - 1
                t = self._run(layers[next_layer], t, mask, output_norm=path_norms or not last)
                next_layer += 1

        pyramid: list[Tensor] = []
        for s, stage in enumerate(swin.layers):
            for b, blk in enumerate(stage.blocks):
                k = self._fused_at.get((s, b)) if fusing else None
                if k is None:
                    x = self._run(blk, x, hw)
                    continue
                run_text_until(k)
                # Parallel update: both branches read the pre-step states (x, t), then both are replaced.
                x_new = self._run(blk, x, hw, t, mask)
                t = self._run(layers[k], t, mask, x, output_norm=path_norms or k < n_layers - 1)
                next_layer = k + 1
                x = x_new
            if s in swin.cfg.out_indices:
                pyramid.append(swin.stage_map(s, x, hw))
            x, hw = swin.merge(s, x, hw)
        run_text_until(n_layers)
        if path_norms and swin.norm is not None:
            x = swin.norm(x)
        image = ImageOutput(tokens=x, grid=hw, pyramid=tuple(pyramid))
        text_out = None if t is None or mask is None else TextOutput(hidden=t, mask=mask)
        return FusionOutput(image=image, text=text_out, fused=fusing)


def _check_text(text: TextInputs) -> None:
    if not isinstance(text, TextInputs):
        raise TypeError(f"text must be a fiber_backbones.TextInputs, got {type(text).__name__}")
