"""Feature pyramid of the fine-grained detector (docs/reference/training.md §3.2).

Three backbone maps ``C3, C4, C5`` (strides 8/16/32; FIBER-B channels 256/512/1024) become five 256-channel
maps ``P3..P7`` (strides 8..128):

* lateral 1x1 convs ``fpn_inner{2,3,4}``, a top-down pathway with nearest up-sampling to the lateral's exact
  size, and 3x3 output convs ``fpn_layer{2,3,4}`` (no norm, no activation);
* ``P6 = top_blocks.p6(P5)`` (3x3, stride 2, on the FPN output P5, not on C5) and
  ``P7 = top_blocks.p7(ReLU(P6))``;
* training-only DropBlock on the merged map before the P3 and P4 output convs (not before P5).

Module names follow the official ``fusion_backbone.backbone.fpn.*`` keys, so a checkpoint converts by
stripping that prefix. Init: Kaiming-uniform (``a = 1``) weights, zero biases.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _init_conv(conv: nn.Conv2d) -> None:
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class DropBlock2d(nn.Module):
    """DropBlock (Ghiasi et al., 2018): zero square blocks of the map, shared across channels.

    Block seeds are drawn with probability ``drop_prob / block_size**2`` per location; every seed drops the
    ``block_size x block_size`` square centred on it, and the kept activations are rescaled by
    ``numel(mask) / sum(mask)``. The identity in eval mode or when ``drop_prob == 0``.

    Args:
        drop_prob: drop probability (the reference uses 0.3).
        block_size: side of the dropped squares (odd; the reference uses 3).
    """

    def __init__(self, drop_prob: float = 0.3, block_size: int = 3) -> None:
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"DropBlock2d: drop_prob must be in [0, 1), got {drop_prob}")
        if block_size < 1 or block_size % 2 == 0:
            raise ValueError(f"DropBlock2d: block_size must be a positive odd number, got {block_size}")
        self.drop_prob = drop_prob
        self.block_size = block_size

    def forward(self, x: Tensor) -> Tensor:
        """Apply DropBlock to ``x [B, C, H, W]`` (training only)."""
        if not self.training or self.drop_prob == 0.0:
            return x
        gamma = self.drop_prob / self.block_size**2
        seeds = (torch.rand(x.shape[0], 1, x.shape[2], x.shape[3], device=x.device) < gamma).to(x.dtype)
        dropped = F.max_pool2d(seeds, kernel_size=self.block_size, stride=1, padding=self.block_size // 2)
        keep = 1.0 - dropped  # [B, 1, H, W]
        return x * keep * (keep.numel() / keep.sum().clamp(min=1.0))

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}, block_size={self.block_size}"


class LastLevelP6P7(nn.Module):
    """``P6 = conv3x3_s2(P5)``, ``P7 = conv3x3_s2(ReLU(P6))`` (official ``top_blocks``)."""

    def __init__(self, channels: int = 256) -> None:
        super().__init__()
        self.p6 = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        self.p7 = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        _init_conv(self.p6)
        _init_conv(self.p7)

    def forward(self, p5: Tensor) -> tuple[Tensor, Tensor]:
        """``p5 [B, C, H, W]`` -> ``(P6 [B, C, ceil(H/2), ceil(W/2)], P7 [B, C, ceil(H/4), ceil(W/4)])``."""
        p6 = self.p6(p5)
        p7 = self.p7(F.relu(p6))
        return p6, p7


class FPN(nn.Module):
    """Feature pyramid ``(C3, C4, C5) -> (P3, P4, P5, P6, P7)``.

    Args:
        in_channels_list: channels of the three input maps, finest first (FIBER-B: ``(256, 512, 1024)``).
        out_channels: channels of every output level.
        drop_block_prob: DropBlock probability before the P3/P4 output convs (training only; 0 disables).
        drop_block_size: DropBlock block size.
    """

    # lateral (inner) and output (layer) convs, registered with add_module under their official names
    fpn_inner2: nn.Conv2d
    fpn_inner3: nn.Conv2d
    fpn_inner4: nn.Conv2d
    fpn_layer2: nn.Conv2d
    fpn_layer3: nn.Conv2d
    fpn_layer4: nn.Conv2d

    def __init__(
        self,
        in_channels_list: Sequence[int] = (256, 512, 1024),
        out_channels: int = 256,
        drop_block_prob: float = 0.3,
        drop_block_size: int = 3,
    ) -> None:
        super().__init__()
        if len(in_channels_list) != 3:
            raise ValueError(f"FPN: expected 3 input maps (C3, C4, C5), got in_channels_list={in_channels_list}")
        self.in_channels_list = tuple(int(c) for c in in_channels_list)
        self.out_channels = out_channels
        # Official names: index 2, 3, 4 for the maps of strides 8, 16, 32.
        for idx, c in zip((2, 3, 4), self.in_channels_list):
            inner = nn.Conv2d(c, out_channels, 1)
            layer = nn.Conv2d(out_channels, out_channels, 3, padding=1)
            _init_conv(inner)
            _init_conv(layer)
            self.add_module(f"fpn_inner{idx}", inner)
            self.add_module(f"fpn_layer{idx}", layer)
        self.top_blocks = LastLevelP6P7(out_channels)
        self.drop_block = DropBlock2d(drop_block_prob, drop_block_size) if drop_block_prob > 0 else nn.Identity()

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        """Build the pyramid.

        Args:
            features: ``[C3 [B, c3, H/8, W/8], C4 [B, c4, H/16, W/16], C5 [B, c5, H/32, W/32]]``.

        Returns:
            ``[P3, P4, P5, P6, P7]``, each ``[B, out_channels, H_l, W_l]``.
        """
        if len(features) != 3:
            raise ValueError(f"FPN: expected 3 feature maps, got {len(features)}")
        for i, (f, c) in enumerate(zip(features, self.in_channels_list)):
            if f.dim() != 4 or f.shape[1] != c:
                raise ValueError(f"FPN: input map {i} has shape {tuple(f.shape)}, expected [B, {c}, H, W]")
        c3, c4, c5 = features
        last_inner = self.fpn_inner4(c5)
        p5 = self.fpn_layer4(last_inner)
        outs = [p5]
        for feature, inner, layer in ((c4, self.fpn_inner3, self.fpn_layer3), (c3, self.fpn_inner2, self.fpn_layer2)):
            top_down = F.interpolate(last_inner, size=feature.shape[-2:], mode="nearest")
            last_inner = inner(feature) + top_down
            outs.insert(0, layer(self.drop_block(last_inner)))
        p6, p7 = self.top_blocks(p5)
        return [*outs, p6, p7]
