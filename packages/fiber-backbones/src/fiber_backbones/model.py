"""The FIBER fusion backbone: Swin + RoBERTa towers fused by a schedule of gated cross-attention (docs/reference/architecture.md §4, §7–§9).

:class:`FiberBackbone` runs the uni-modal prefixes of both towers, then the fusion schedule with the **parallel
update** of docs/reference/architecture.md §4: at every step the Swin block's i2t branch reads the pre-step text states and the text
layer's t2i branch reads the pre-step image tokens, then both states are replaced. Patch merging between stages
happens on the image side only, so a text layer paired with the first block of a stage attends to the merged map.

Top-level state-dict prefixes are ``image_encoder.`` (official coarse ``vit_model.``, fine
``fusion_backbone.backbone.body.``) and ``text_encoder.`` (official coarse ``text_transformer.``, fine
``fusion_backbone.language_backbone.body.model.``); everything below them uses the official sub-names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from fiber_backbones.attention import BACKENDS
from fiber_backbones.config import BackboneConfig
from fiber_backbones.swin import SwinStage, SwinTransformer, WindowAttention
from fiber_backbones.text_encoder import TextEncoder, _Attention
from fiber_backbones.types import (
    FeatureSpec,
    FusionOutput,
    ImageOutput,
    ImagePrefix,
    TextInputs,
    TextOutput,
    TextPrefix,
)

__all__ = ["FiberBackbone", "ImagePrefix", "TextPrefix"]


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
        # where the shared uni-modal prefixes end (no schedule: the whole towers are the prefix)
        self._first_fused_block = min(self._fused_at) if self._fused_at else (sw.num_stages, 0)
        self._first_fused_layer = min(self._fused_at.values()) if self._fused_at else tx.num_layers
        self.grad_checkpointing = False
        self.set_attention_backend(config.attention_backend)
        if fu.gate_init:
            with torch.no_grad():
                for name, p in self.named_parameters():
                    if p.requires_grad and name.rsplit(".", 1)[-1] in ("alpha_i2t", "alpha_t2i"):
                        p.fill_(fu.gate_init)

    # ------------------------------------------------------------------ configuration helpers
    def set_attention_backend(self, name: str) -> None:
        """Set the requested attention backend of every attention module (``"auto"|"xformers"|"sdpa"|"eager"``)."""
        if name not in BACKENDS:
            raise ValueError(f"set_attention_backend: unknown attention backend {name!r}; expected one of {BACKENDS}")
        for m in self.modules():
            if isinstance(m, (WindowAttention, _Attention)):
                m.attn_backend = name

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute every Swin block and text layer in the backward pass (training only)."""
        self.grad_checkpointing = enabled

    def compile_blocks(self, **compile_kwargs: Any) -> int:
        """Regional ``torch.compile``: compile every Swin block, patch merging, embedding and text layer in place.

        Each block is its own compiled region (no graph breaks inside; the fusion driver between blocks stays
        eager), and blocks of the same shape share one compiled graph, so compilation costs a few graphs per
        stage rather than one per block. Shapes are static by default (``dynamic=False``): one graph per input
        shape, which is what CUDA graphs and the fixed-size recipes want. Inside the compiled regions the
        attention uses SDPA (see :mod:`fiber_backbones.attention`).

        Args:
            **compile_kwargs: passed to :meth:`torch.nn.Module.compile` (e.g. ``mode="max-autotune-no-cudagraphs"``,
                ``backend="aot_eager"``).

        Returns:
            Number of modules compiled.
        """
        kwargs = {"dynamic": False, **compile_kwargs}
        _raise_recompile_limit(64)
        swin, text = self.image_encoder, self.text_encoder
        regions: list[nn.Module] = [swin.patch_embed, text.embeddings, *text.layers]
        for stage in cast("Iterable[SwinStage]", swin.layers):  # nn.ModuleList is untyped; layers holds SwinStage
            regions.extend(stage.blocks)
            if stage.downsample is not None:
                regions.append(stage.downsample)
        for module in regions:
            module.compile(**kwargs)
        return len(regions)

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
            return checkpoint(fn, *args, use_reentrant=False, **kwargs)
        return fn(*args, **kwargs)

    def encode_image(self, pixel_values: Tensor) -> ImageOutput:
        """Uni-modal image tower with every norm (ITC path, docs/reference/architecture.md §8.2).

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
        return self.encode_text_from_prefix(self.text_prefix(text))

    def encode_text_from_prefix(self, prefix: TextPrefix) -> TextOutput:
        """Finish the uni-modal text tower (every LayerNorm, no fusion) from :meth:`text_prefix`."""
        t, mask = prefix.hidden, prefix.mask
        for layer in self.text_encoder.layers[prefix.next_layer :]:
            t = self._run(layer, t, mask)
        return TextOutput(hidden=t, mask=mask)

    def forward(self, pixel_values: Tensor, text: TextInputs | None = None, *, fuse: bool = True) -> FusionOutput:
        """Fused forward (docs/reference/architecture.md §4, §8.1).

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

    # ------------------------------------------------------------------ shared uni-modal prefixes
    def image_prefix(self, pixel_values: Tensor) -> ImagePrefix:
        """Run the image tower up to (not including) the first fused block.

        What this computes does not depend on the text or on ``fuse``, so a training step that runs the image
        tower several times (ITC, MLM, ITM with hard negatives) can compute it once and re-index it with
        :meth:`ImagePrefix.index_select`; gradients flow through the shared prefix.

        Args:
            pixel_values: ``[B, 3, H, W]``.
        """
        swin = self.image_encoder
        x, hw = swin.embed(pixel_values)
        pyramid: list[Tensor] = []
        stop = self._first_fused_block
        for s, stage in enumerate(cast("Iterable[SwinStage]", swin.layers)):  # layers holds SwinStage only
            for b, blk in enumerate(stage.blocks):
                if (s, b) == stop:
                    return ImagePrefix(x, hw, tuple(pyramid), (s, b))
                x = self._run(blk, x, hw)
            if s in swin.cfg.out_indices:
                pyramid.append(swin.stage_map(s, x, hw))
            x, hw = swin.merge(s, x, hw)
        return ImagePrefix(x, hw, tuple(pyramid), (len(swin.layers), 0))

    def text_prefix(self, text: TextInputs) -> TextPrefix:
        """Run the text tower up to (not including) the first fused layer (see :meth:`image_prefix`).

        Args:
            text: ``input_ids [B, L]``, ``attention_mask [B, L]``.
        """
        _check_text(text)
        enc = self.text_encoder
        mask = text.attention_mask
        t = enc.embeddings(text.input_ids, mask, text.position_ids)
        stop = self._first_fused_layer
        for k in range(stop):
            t = self._run(enc.layers[k], t, mask)
        return TextPrefix(t, mask, stop)

    def forward_from_prefixes(
        self, image: ImagePrefix, text: TextPrefix | None = None, *, fuse: bool = True, path_norms: bool | None = None
    ) -> FusionOutput:
        """Finish a forward from prefixes computed by :meth:`image_prefix` / :meth:`text_prefix`.

        ``forward(px, text, fuse=f)`` equals ``forward_from_prefixes(image_prefix(px), text_prefix(text), fuse=f)``.

        Args:
            image: image prefix (``B`` rows).
            text: text prefix with the same ``B`` rows, or ``None``.
            fuse: run the cross-attention branches.
            path_norms: apply the final Swin norm and the last text layer's output LayerNorm (default: the
                config's ``fused_path_norms``; the dual-encoder path uses ``True``).
        """
        if path_norms is None:
            path_norms = self.config.fused_path_norms
        swin, layers = self.image_encoder, self.text_encoder.layers
        if text is not None and text.hidden.shape[0] != image.tokens.shape[0]:
            raise ValueError(
                f"batch mismatch: image prefix has {image.tokens.shape[0]} rows, text prefix {text.hidden.shape[0]}"
            )
        fusing = fuse and text is not None and bool(self.fusion_schedule)
        x, hw = image.tokens, image.hw
        pyramid = list(image.pyramid)
        t = None if text is None else text.hidden
        mask = None if text is None else text.mask
        n_layers = len(layers)
        next_layer = n_layers if text is None else text.next_layer

        def run_text_until(stop: int) -> None:
            nonlocal t, next_layer
            while t is not None and next_layer < stop:
                last = next_layer == n_layers - 1
                t = self._run(layers[next_layer], t, mask, output_norm=path_norms or not last)
                next_layer += 1

        s0, b0 = image.next_block
        for s in range(s0, len(swin.layers)):
            for b, blk in enumerate(cast(SwinStage, swin.layers[s]).blocks):  # layers holds SwinStage only
                if s == s0 and b < b0:
                    continue
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
        image_out = ImageOutput(tokens=x, grid=hw, pyramid=tuple(pyramid))
        text_out = None if t is None or mask is None else TextOutput(hidden=t, mask=mask)
        return FusionOutput(image=image_out, text=text_out, fused=fusing)

    def _forward(self, pixel_values: Tensor, text: TextInputs | None, *, fuse: bool, path_norms: bool) -> FusionOutput:
        if text is not None:
            _check_text(text)
            if text.input_ids.shape[0] != pixel_values.shape[0]:
                raise ValueError(
                    f"batch mismatch: pixel_values has {pixel_values.shape[0]} images, text has {text.input_ids.shape[0]} rows"
                )
        text_state = None if text is None else self.text_prefix(text)
        return self.forward_from_prefixes(self.image_prefix(pixel_values), text_state, fuse=fuse, path_norms=path_norms)


def _raise_recompile_limit(limit: int) -> None:
    # every SwinBlock shares one code object: each (stage shape, shift, fusion, batch) variant is one cache entry
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name) and getattr(cfg, name) < limit:
            setattr(cfg, name, limit)
    for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name) and getattr(cfg, name) < 8 * limit:
            setattr(cfg, name, 8 * limit)


def _check_text(text: TextInputs) -> None:
    if not isinstance(text, TextInputs):
        raise TypeError(f"text must be a fiber_backbones.TextInputs, got {type(text).__name__}")
