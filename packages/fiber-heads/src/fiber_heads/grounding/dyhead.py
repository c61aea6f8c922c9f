"""DyHead tower of the fine-grained detector (docs/reference/training.md §3.3).

One block (:class:`DyHeadBlock`) maps the list of pyramid levels ``[F_0 .. F_{n-1}]`` (256 channels each) to
a new list of the same shapes. For level ``l``::

    offset_mask = offset(F_l)                               # 3x3 conv 256 -> 27: 18 offsets + 9 mask logits
    G_same   = DyConv[1](F_l)                               # modulated deformable 3x3 conv + GroupNorm(16)
    G_finer  = DyConv[2](F_{l-1})          (l > 0)          # same, stride 2 (output has the size of F_l)
    G_coarse = up_bilinear(DyConv[0](F_{l+1}), size(F_l), align_corners=True)        (l < n - 1)
    w_G      = h_sigmoid(ReLU(AttnConv(GlobalAvgPool(G))))  # scale-aware attention, one scalar per G
    F'_l     = mean_G(w_G * G)
    F''_l    = DyReLU(F'_l)                                 # task-aware attention

All three deformable convs use the offsets/mask computed from ``F_l``.

**Offset-layout quirk** (``offset_mode="compat"``, the default). ``DyConv[0]`` runs on ``F_{l+1}``, whose
output is smaller than ``F_l``, yet receives offsets of ``F_l``'s size. The official CUDA operator does not
check shapes: for every image it reads the *first* ``18 h' w'`` offset values and ``9 h' w'`` mask values of
the row-major per-image buffers, as if they were ``(18, h', w')`` / ``(9, h', w')``. We reproduce this by
flattening each image's offsets, taking that prefix and reshaping, so official checkpoints give the official
numbers. ``offset_mode="resize"`` instead resizes offsets and mask bilinearly to the output size (a cleaner
choice for new training; not checkpoint-compatible).

Submodule names follow the official ``rpn.head.dyhead_tower.{i}.*`` keys (``DyConv.{0,1,2}.{conv,bn}``,
``AttnConv.1``, ``relu.fc.{0,2}``, ``offset``). The deformable convolutions use
:func:`torchvision.ops.deform_conv2d` (no compiled extension of our own) and always run in fp32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torchvision.ops import deform_conv2d

OffsetMode = Literal["compat", "resize"]


def h_sigmoid(x: Tensor) -> Tensor:
    """Hard sigmoid ``ReLU6(x + 3) / 6``."""
    return F.relu6(x + 3.0) / 6.0


class ModulatedDeformConv3x3(nn.Module):
    """Modulated deformable 3x3 convolution (DCNv2), padding 1, with bias.

    Init as the official deformable-conv layer: weights uniform in ``+-1/sqrt(C_in * 9)``, zero bias.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        stride: 1 or 2.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.stride = stride
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 3, 3))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        bound = 1.0 / math.sqrt(in_channels * 9)
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: Tensor, offset: Tensor, mask: Tensor) -> Tensor:
        """Deformable conv of ``x [B, C_in, H, W]`` with ``offset [B, 18, H_o, W_o]`` (``(dy, dx)`` pairs per
        kernel tap) and ``mask [B, 9, H_o, W_o]`` (already in ``[0, 1]``); returns ``[B, C_out, H_o, W_o]``.

        Inputs are cast to fp32 and autocast is disabled, as in the reference.
        """
        with torch.autocast(device_type=x.device.type, enabled=False):
            return deform_conv2d(
                x.float(),
                offset.float(),
                self.weight.float(),
                self.bias.float(),
                stride=(self.stride, self.stride),
                padding=(1, 1),
                mask=mask.float(),
            )

    def extra_repr(self) -> str:
        return f"{self.weight.shape[1]}, {self.weight.shape[0]}, kernel_size=3, stride={self.stride}, padding=1"


class DeformConvNorm(nn.Module):
    """``ModulatedDeformConv3x3`` followed by ``GroupNorm(16, C_out)`` (official ``Conv3x3Norm``)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, num_groups: int = 16) -> None:
        super().__init__()
        self.conv = ModulatedDeformConv3x3(in_channels, out_channels, stride)
        self.bn = nn.GroupNorm(num_groups, out_channels, eps=1e-5)

    def forward(self, x: Tensor, offset: Tensor, mask: Tensor) -> Tensor:
        """``[B, C_in, H, W] -> [B, C_out, H_o, W_o]`` (see :class:`ModulatedDeformConv3x3`)."""
        return self.bn(self.conv(x, offset, mask))


class DyReLU(nn.Module):
    """Task-aware dynamic ReLU: ``max(x a1 + b1, x a2 + b2)`` with per-channel coefficients from the input.

    ``(a1, b1, a2, b2) = split(h_sigmoid(fc(GlobalAvgPool(x))))`` then ``a1 = 2 (a1 - 0.5) + 1``,
    ``a2 = 2 (a2 - 0.5)``, ``b1 = b1 - 0.5``, ``b2 = b2 - 0.5``.

    Args:
        channels: channels of the input and output.
        reduction: squeeze ratio of the hidden layer (``256 // 4 = 64``).
    """

    def __init__(self, channels: int = 256, reduction: int = 4) -> None:
        super().__init__()
        self.channels = channels
        hidden = _make_divisible(channels // reduction, 4)
        self.fc = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 4 * channels))

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, H, W] -> [B, C, H, W]``."""
        b, c = x.shape[:2]
        y = h_sigmoid(self.fc(x.mean(dim=(2, 3)))).view(b, 4 * c, 1, 1)
        a1, b1, a2, b2 = torch.split(y, c, dim=1)
        a1 = (a1 - 0.5) * 2.0 + 1.0
        a2 = (a2 - 0.5) * 2.0
        b1 = b1 - 0.5
        b2 = b2 - 0.5
        return torch.maximum(x * a1 + b1, x * a2 + b2)


def _make_divisible(value: int, divisor: int) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` (at least ``divisor``, never below 90 %)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def _offsets_for(offset: Tensor, mask: Tensor, size: tuple[int, int], mode: OffsetMode) -> tuple[Tensor, Tensor]:
    """Offsets/mask of ``F_l`` (``[B, 18, H, W]`` / ``[B, 9, H, W]``) for a conv whose output is ``size``."""
    h, w = size
    if offset.shape[-2:] == (h, w):
        return offset, mask
    b = offset.shape[0]
    if mode == "compat":
        # Reinterpret the row-major per-image buffers: first 18*h*w (9*h*w) values as (18, h, w) ((9, h, w)).
        off = offset.reshape(b, -1)[:, : 18 * h * w].reshape(b, 18, h, w)
        msk = mask.reshape(b, -1)[:, : 9 * h * w].reshape(b, 9, h, w)
        return off, msk
    off = F.interpolate(offset, size=(h, w), mode="bilinear", align_corners=False)
    msk = F.interpolate(mask, size=(h, w), mode="bilinear", align_corners=False)
    return off, msk


class DyHeadBlock(nn.Module):
    """One DyHead block (official ``DyConv``): scale-, spatial- and task-aware attention over all levels.

    Args:
        channels: channels of every level (256 in FIBER).
        num_groups: GroupNorm groups (16).
        offset_mode: ``"compat"`` (official buffer reinterpretation) or ``"resize"``; see the module docstring.
    """

    def __init__(self, channels: int = 256, num_groups: int = 16, offset_mode: OffsetMode = "compat") -> None:
        super().__init__()
        if offset_mode not in ("compat", "resize"):
            raise ValueError(f"DyHeadBlock: offset_mode must be 'compat' or 'resize', got {offset_mode!r}")
        self.offset_mode: OffsetMode = offset_mode
        # Index 0: applied to the coarser level l+1; 1: to level l; 2: stride 2 on the finer level l-1.
        self.DyConv = nn.ModuleList(
            [
                DeformConvNorm(channels, channels, 1, num_groups),
                DeformConvNorm(channels, channels, 1, num_groups),
                DeformConvNorm(channels, channels, 2, num_groups),
            ]
        )
        attn_conv = nn.Conv2d(channels, 1, 1)
        assert attn_conv.bias is not None  # nn.Conv2d's default bias=True
        nn.init.normal_(attn_conv.weight, std=0.01)
        nn.init.zeros_(attn_conv.bias)
        self.AttnConv = nn.Sequential(nn.AdaptiveAvgPool2d(1), attn_conv, nn.ReLU(inplace=True))
        self.relu = DyReLU(channels)
        self.offset = nn.Conv2d(channels, 27, 3, padding=1)

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        """Apply the block to all levels.

        Args:
            features: ``n`` maps ``[B, C, H_l, W_l]``, finest first; consecutive levels must satisfy
                ``H_l = ceil(H_{l-1} / 2)`` (as FPN outputs do).

        Returns:
            ``n`` maps of the same shapes.
        """
        n = len(features)
        outs: list[Tensor] = []
        for level, feat in enumerate(features):
            offset_mask = self.offset(feat)
            offset = offset_mask[:, :18]
            mask = offset_mask[:, 18:].sigmoid()
            size = (feat.shape[-2], feat.shape[-1])
            terms = [self.DyConv[1](feat, offset, mask)]
            if level > 0:
                terms.append(self.DyConv[2](features[level - 1], offset, mask))
            if level < n - 1:
                coarse = features[level + 1]
                off, msk = _offsets_for(offset, mask, (coarse.shape[-2], coarse.shape[-1]), self.offset_mode)
                g = self.DyConv[0](coarse, off, msk)
                terms.append(F.interpolate(g, size=size, mode="bilinear", align_corners=True))
            stacked = torch.stack(terms)  # [T, B, C, H, W]
            attn = h_sigmoid(torch.stack([self.AttnConv(t) for t in terms]))  # [T, B, 1, 1, 1]
            outs.append((stacked * attn).mean(dim=0))
        return [self.relu(o) for o in outs]


class DyHeadTower(nn.ModuleList):
    """A stack of :class:`DyHeadBlock` (six for FIBER-B), optionally gradient-checkpointed per block.

    A ``ModuleList`` so that its keys are ``{i}.DyConv...``, as the official ``dyhead_tower.{i}.*``.

    Args:
        num_blocks: number of blocks.
        channels: channels of every level.
        num_groups: GroupNorm groups.
        offset_mode: see :class:`DyHeadBlock`.
        grad_checkpointing: recompute each block in the backward pass (memory only).
    """

    def __init__(
        self,
        num_blocks: int = 6,
        channels: int = 256,
        num_groups: int = 16,
        offset_mode: OffsetMode = "compat",
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__([DyHeadBlock(channels, num_groups, offset_mode) for _ in range(num_blocks)])
        self.grad_checkpointing = grad_checkpointing

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        """``n`` maps ``[B, C, H_l, W_l]`` -> ``n`` maps of the same shapes."""
        feats = list(features)
        for block in self:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                feats = list(checkpoint(_run_block, block, *feats, use_reentrant=False))
            else:
                feats = block(feats)
        return feats


def _run_block(block: nn.Module, *feats: Tensor) -> tuple[Tensor, ...]:
    """Checkpoint-friendly call of one block (tensors as positional arguments)."""
    return tuple(block(list(feats)))
