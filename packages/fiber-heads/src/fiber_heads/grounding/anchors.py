"""One-anchor-per-location generator of the fine-grained detector (docs/reference/training.md §3.4, "Anchors").

For a level of stride ``s`` and anchor size ``A`` the cell anchor is the square of side ``A`` (inclusive-pixel
convention) centred on ``c = (s - 1) / 2``: ``[c - (A - 1)/2, c - (A - 1)/2, c + (A - 1)/2, c + (A - 1)/2]``,
e.g. ``[-28, -28, 35, 35]`` for ``s = 8, A = 64``. It is shifted by ``(x s, y s)`` for every cell of the map,
row-major (``y`` outer, ``x`` inner), which is the order in which the head flattens its ``[H, W]`` outputs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

DEFAULT_ANCHOR_SIZES: tuple[int, ...] = (64, 128, 256, 512, 1024)
DEFAULT_ANCHOR_STRIDES: tuple[int, ...] = (8, 16, 32, 64, 128)


def cell_anchor(stride: int, size: float) -> Tensor:
    """The ``[1, 4]`` xyxy anchor of the cell at the origin for one level (aspect ratio 1)."""
    c = (stride - 1) / 2.0
    half = (size - 1) / 2.0
    return torch.tensor([[c - half, c - half, c + half, c + half]], dtype=torch.float32)


class _BufferList(nn.Module):
    """Buffers addressable as ``<name>.0``, ``<name>.1``, ... (the official ``cell_anchors`` key layout)."""

    def __init__(self, buffers: Sequence[Tensor]) -> None:
        super().__init__()
        for i, b in enumerate(buffers):
            self.register_buffer(str(i), b)

    def __len__(self) -> int:
        return len(self._buffers)

    def __iter__(self) -> Iterator[Tensor]:
        return iter(b for b in self._buffers.values() if b is not None)


class AnchorGenerator(nn.Module):
    """Anchors of every level of the pyramid, one per feature-map location.

    The cell anchors are persistent buffers (``cell_anchors.{l}``, shape ``[1, 4]``), as in the official
    checkpoints, so a converted checkpoint can be checked against the rule above.

    Args:
        sizes: anchor side per level (pixels of the padded input).
        strides: stride of each level.
    """

    def __init__(
        self, sizes: Sequence[float] = DEFAULT_ANCHOR_SIZES, strides: Sequence[int] = DEFAULT_ANCHOR_STRIDES
    ) -> None:
        super().__init__()
        if len(sizes) != len(strides):
            raise ValueError(f"AnchorGenerator: {len(sizes)} sizes but {len(strides)} strides")
        self.strides = tuple(int(s) for s in strides)
        self.sizes = tuple(float(a) for a in sizes)
        self.cell_anchors = _BufferList([cell_anchor(s, a) for s, a in zip(self.strides, self.sizes)])

    @property
    def num_levels(self) -> int:
        """Number of pyramid levels."""
        return len(self.strides)

    def forward(self, feature_sizes: Sequence[tuple[int, int]]) -> tuple[Tensor, list[int]]:
        """Anchors of all levels, concatenated in level order.

        Args:
            feature_sizes: ``(H_l, W_l)`` of every level, in level order.

        Returns:
            ``anchors [A, 4]`` xyxy (float32, on the buffers' device) with ``A = sum_l H_l W_l``, and the number
            of anchors per level.
        """
        if len(feature_sizes) != self.num_levels:
            raise ValueError(f"AnchorGenerator: got {len(feature_sizes)} feature maps for {self.num_levels} levels")
        out: list[Tensor] = []
        counts: list[int] = []
        for (h, w), stride, cell in zip(feature_sizes, self.strides, self.cell_anchors):
            device = cell.device
            sy = torch.arange(h, device=device, dtype=torch.float32) * stride
            sx = torch.arange(w, device=device, dtype=torch.float32) * stride
            yy, xx = torch.meshgrid(sy, sx, indexing="ij")
            shifts = torch.stack((xx, yy, xx, yy), dim=-1).reshape(-1, 4)
            out.append(shifts + cell.float())
            counts.append(h * w)
        return torch.cat(out, dim=0), counts
