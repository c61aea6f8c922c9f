"""Swin image tower with the optional gated image-to-text (i2t) branch (``docs/reference/architecture.md`` §2, §5).

Module names follow the official checkpoints (``patch_embed.proj``, ``layers.{s}.blocks.{b}.attn.qkv``,
``attn.relative_position_bias_table``, ``attn.qkv_text_i2t``, ``layers.{s}.downsample.reduction``, ``norm``,
``norm{i}``), so a converter only swaps prefixes. ``relative_position_index`` is a non-persistent buffer and shift
masks are computed on the fly, so neither appears in our state dicts.

The i2t branch is computed **un-windowed** on all ``H*W`` tokens after the window self-attention has been
reversed, un-shifted and cropped, which is mathematically identical to the official per-window formulation because
the branch is token-wise in its queries and has no window-dependent term (docs/reference/architecture.md §5). The per-window formulation is
kept as :func:`_block_forward_per_window_reference` for the parity test.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fiber_backbones.attention import attention
from fiber_backbones.config import SwinConfig
from fiber_backbones.init import init_linear_and_norm

__all__ = [
    "DropPath",
    "PatchEmbed",
    "PatchMerging",
    "SwinBlock",
    "SwinStage",
    "SwinTransformer",
    "WindowAttention",
    "relative_position_index",
    "shift_window_mask",
    "window_partition",
    "window_reverse",
]

SHIFT_MASK_VALUE = -100.0


class DropPath(nn.Module):
    """Stochastic depth: zero the whole residual branch of a sample with probability ``p`` (training only).

    The keep probability lives in a non-persistent 0-d buffer rather than a Python float, so that
    ``torch.compile`` does not specialise each block's graph on its own rate (blocks of one stage share a graph).

    Args:
        p: drop probability.
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("keep_prob", torch.tensor(1.0 - float(p)), persistent=False)
        self._p = float(p)
        self.active = self._p > 0.0

    @property
    def p(self) -> float:
        """Drop probability (setting it updates the buffer)."""
        return self._p

    @p.setter
    def p(self, value: float) -> None:
        self._p = float(value)
        self.active = self._p > 0.0
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """Rewrite ``keep_prob`` from ``p`` (e.g. after building on the meta device)."""
        self.keep_prob = torch.tensor(1.0 - self._p, device="cpu" if self.keep_prob.is_meta else self.keep_prob.device)

    def forward(self, x: Tensor) -> Tensor:
        """Apply to ``x [B, ...]``."""
        if not self.active or not self.training:
            return x
        keep = self.keep_prob.to(x.dtype)
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        return x * torch.bernoulli(keep.expand(shape)) / keep

    def extra_repr(self) -> str:
        return f"p={self._p:.4f}"


class Mlp(nn.Module):
    """``fc2(GELU(fc1(x)))`` with exact (erf) GELU.

    Args:
        dim: input/output width ``C``.
        hidden: hidden width.
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        """``[..., C] -> [..., C]``."""
        return self.fc2(self.act(self.fc1(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding: Conv(k=p, s=p) then LayerNorm; pads right/bottom to a multiple of ``p``.

    Args:
        patch_size: ``p``.
        in_chans: input channels.
        embed_dim: output channels.
        eps: LayerNorm epsilon.
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, eps: float) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim, eps=eps)

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """``[B, 3, H, W] -> ([B, h*w, C], (h, w))`` with ``h = ceil(H / p)``."""
        p = self.patch_size
        pad_h, pad_w = (-x.shape[2]) % p, (-x.shape[3]) % p
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        x = self.proj(x)
        hw = (x.shape[2], x.shape[3])
        return self.norm(x.flatten(2).transpose(1, 2)), hw


class PatchMerging(nn.Module):
    """2×2 neighbourhood concat → LayerNorm(4C) → Linear(4C → 2C, no bias) (docs/reference/architecture.md §2.1).

    Odd grids are padded with one zero row/column (an extension; the official code requires even grids).

    Args:
        dim: input width ``C``.
        eps: LayerNorm epsilon.
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim, eps=eps)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> tuple[Tensor, tuple[int, int]]:
        """``[B, H*W, C] -> ([B, ceil(H/2)*ceil(W/2), 2C], (ceil(H/2), ceil(W/2)))``."""
        b, _, c = x.shape
        h, w = hw
        x = x.view(b, h, w, c)
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        # Official order: (even row, even col), (odd row, even col), (even row, odd col), (odd row, odd col).
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        new_hw = (x.shape[1], x.shape[2])
        return self.reduction(self.norm(x.reshape(b, -1, 4 * c))), new_hw


def window_partition(x: Tensor, window: int) -> Tensor:
    """Split ``[B, H, W, C]`` (H, W multiples of ``window``) into ``[B * nW, window², C]``, windows row-major."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def window_reverse(windows: Tensor, window: int, h: int, w: int) -> Tensor:
    """Inverse of :func:`window_partition`: ``[B * nW, window², C] -> [B, H, W, C]``."""
    c = windows.shape[-1]
    x = windows.view(-1, h // window, w // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


def relative_position_index(window: int, device: torch.device | None = None) -> Tensor:
    """Standard Swin index ``LongTensor [w², w²]`` into a ``((2w-1)², heads)`` table."""
    coords = torch.stack(
        torch.meshgrid(torch.arange(window, device=device), torch.arange(window, device=device), indexing="ij")
    ).flatten(1)  # [2, w²] (row, col) of every token in the window
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)  # [w², w², 2] in [0, 2w-2]
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def shift_window_mask(h: int, w: int, window: int, shift: int, device: torch.device | None = None) -> Tensor:
    """Additive mask ``[nW, w², w²]`` of a cyclically shifted ``h × w`` map (−100 across regions, 0 within).

    ``h`` and ``w`` are the (padded) map sizes, multiples of ``window``.
    """

    def region(n: int) -> Tensor:
        idx = torch.arange(n, device=device)
        # After the roll by −shift the map splits into [0, n−window), [n−window, n−shift), [n−shift, n).
        return (idx >= n - window).long() + (idx >= n - shift).long()

    ids = (region(h)[:, None] * 3 + region(w)[None, :]).view(1, h, w, 1)
    ids = window_partition(ids, window).squeeze(-1)  # [nW, w²]
    diff = ids[:, None, :] != ids[:, :, None]
    return torch.zeros(diff.shape, device=device).masked_fill(diff, SHIFT_MASK_VALUE)


class WindowAttention(nn.Module):
    """Window multi-head self-attention with relative position bias, plus the optional gated i2t branch.

    Args:
        dim: width ``C``.
        num_heads: heads (``C / 32`` for Swin-B).
        window: window side ``w``.
        qkv_bias: bias in ``qkv``.
        text_dim: width of the text states for the i2t branch, or ``None`` for a block without fusion.
        i2t_query_norm: LayerNorm ``norm_i2t_i`` on the i2t query (coarse / fine v3).
        eps: LayerNorm epsilon.
    """

    relative_position_index: Tensor  # buffer registered in __init__

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window: int,
        qkv_bias: bool = True,
        text_dim: int | None = None,
        i2t_query_norm: bool = True,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window = window
        self.attn_backend = "auto"
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.has_i2t = text_dim is not None
        if text_dim is not None:
            # Zero-initialised gate: at init (or with fusion off) the block is exactly the uni-modal Swin block.
            self.alpha_i2t = nn.Parameter(torch.zeros(1))
            self.qkv_text_i2t = nn.Linear(text_dim, 2 * dim)
            self.qkv_i2t = nn.Linear(dim, dim)
            self.proj_i2t = nn.Linear(dim, dim)
            self.norm_i2t_i = nn.LayerNorm(dim, eps=eps) if i2t_query_norm else nn.Identity()

    def relative_position_bias(self) -> Tensor:
        """Bias ``[heads, w², w²]`` gathered from the table."""
        m = self.window * self.window
        idx = self.relative_position_index.reshape(-1)
        # index_select rather than advanced indexing: its backward is an index_add, not a sorting index_put
        return self.relative_position_bias_table.index_select(0, idx).view(m, m, self.num_heads).permute(2, 0, 1)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Self-attention inside windows.

        Args:
            x: ``[B * nW, w², C]`` window tokens.
            mask: optional additive shift mask ``[nW, w², w²]``.

        Returns:
            SA output after ``proj``, ``[B * nW, w², C]``.
        """
        bw, m, c = x.shape
        h, d = self.num_heads, self.head_dim
        q, k, v = self.qkv(x).view(bw, m, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)  # 3 × [B*nW, H, M, d]
        # The bias is built in the attention's compute dtype (bf16 under autocast): the [nW*H, M, M] sum is then
        # written once, in half the bytes, and not converted again inside the kernel.
        bias = self.relative_position_bias().to(q.dtype)
        if mask is None:
            out = attention(q, k, v, bias=bias[None], backend=self.attn_backend)
        else:
            nw = mask.shape[0]
            # Fold the window index into the head axis ([B, nW*H, M, d]) so the per-window bias [1, nW*H, M, M]
            # broadcasts over the batch without materialising a [B*nW, H, M, M] tensor.
            q, k, v = (t.reshape(bw // nw, nw * h, m, d) for t in (q, k, v))
            full = (bias[None] + mask[:, None].to(q.dtype)).reshape(1, nw * h, m, m)
            out = attention(q, k, v, bias=full, backend=self.attn_backend)
        out = out.reshape(bw, h, m, d).transpose(1, 2).reshape(bw, m, c)
        return self.proj(out)

    def i2t(self, s: Tensor, text: Tensor, text_mask: Tensor | None) -> Tensor:
        """Gated image-to-text cross-attention applied to the SA output (docs/reference/architecture.md §5).

        Args:
            s: SA output ``[B', N, C]`` (all tokens of an image, or windows with ``B' = B * nW``).
            text: pre-step text states ``[B', L, C_txt]``.
            text_mask: ``BoolTensor [B', L]`` (True = real token) or ``None``.

        Returns:
            ``s + alpha_i2t * proj_i2t(attn)``, ``[B', N, C]``.
        """
        b, n, c = s.shape
        h, d = self.num_heads, self.head_dim
        k, v = self.qkv_text_i2t(text).view(b, text.shape[1], 2, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        q = self.qkv_i2t(self.norm_i2t_i(s)).view(b, n, h, d).transpose(1, 2)
        out = attention(q, k, v, key_padding_mask=text_mask, backend=self.attn_backend)
        out = self.proj_i2t(out.transpose(1, 2).reshape(b, n, c))
        return s + self.alpha_i2t * out


class SwinBlock(nn.Module):
    """One (shifted-)window transformer block with the optional i2t branch (docs/reference/architecture.md §2.1, §2.3, §5).

    Args:
        dim: width ``C``.
        num_heads: heads.
        window: window side.
        shift: cyclic shift (0 for regular blocks).
        mlp_ratio: MLP hidden ratio.
        drop_path: stochastic-depth probability.
        qkv_bias: bias in ``qkv``.
        eps: LayerNorm epsilon.
        text_dim: text width for the i2t branch, or ``None``.
        i2t_query_norm: LayerNorm on the i2t query.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window: int,
        shift: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        qkv_bias: bool = True,
        eps: float = 1e-5,
        text_dim: int | None = None,
        i2t_query_norm: bool = True,
    ) -> None:
        super().__init__()
        self.window = window
        self.shift = shift
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = WindowAttention(dim, num_heads, window, qkv_bias, text_dim, i2t_query_norm, eps)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    @property
    def has_i2t(self) -> bool:
        """Whether the block carries the i2t branch."""
        return self.attn.has_i2t

    def _windowed_sa(self, x: Tensor, hw: tuple[int, int]) -> tuple[Tensor, tuple[int, int], Tensor | None]:
        # LN1, zero-pad to a multiple of the window, roll, partition: returns SA windows, padded size, mask.
        b, _, c = x.shape
        h, w = hw
        u = self.norm1(x).view(b, h, w, c)
        ws = self.window
        hp, wp = h + (-h) % ws, w + (-w) % ws
        if (hp, wp) != (h, w):
            u = F.pad(u, (0, 0, 0, wp - w, 0, hp - h))
        mask = None
        if self.shift:
            u = torch.roll(u, shifts=(-self.shift, -self.shift), dims=(1, 2))
            mask = shift_window_mask(hp, wp, ws, self.shift, device=x.device)
        return self.attn(window_partition(u, ws), mask), (hp, wp), mask

    def _unwindow(self, s: Tensor, hw: tuple[int, int], padded: tuple[int, int]) -> Tensor:
        h, w = hw
        s = window_reverse(s, self.window, *padded)
        if self.shift:
            s = torch.roll(s, shifts=(self.shift, self.shift), dims=(1, 2))
        return s[:, :h, :w].reshape(s.shape[0], h * w, -1)

    def forward(
        self, x: Tensor, hw: tuple[int, int], text: Tensor | None = None, text_mask: Tensor | None = None
    ) -> Tensor:
        """Block forward.

        Args:
            x: ``[B, H*W, C]``.
            hw: ``(H, W)``.
            text: pre-step text states ``[B, L, C_txt]`` to fuse, or ``None`` (uni-modal).
            text_mask: ``BoolTensor [B, L]``.

        Returns:
            ``[B, H*W, C]``.
        """
        s, padded, _ = self._windowed_sa(x, hw)
        s = self._unwindow(s, hw, padded)
        if text is not None and self.has_i2t:
            s = self.attn.i2t(s, text, text_mask)
        x = x + self.drop_path(s)
        return x + self.drop_path(self.mlp(self.norm2(x)))


def _block_forward_per_window_reference(
    block: SwinBlock, x: Tensor, hw: tuple[int, int], text: Tensor, text_mask: Tensor | None
) -> Tensor:
    """Official per-window i2t formulation (text K/V repeated per window); used only by the parity test."""
    s, padded, _ = block._windowed_sa(x, hw)
    nw = s.shape[0] // x.shape[0]
    rep_text = text.repeat_interleave(nw, dim=0)
    rep_mask = None if text_mask is None else text_mask.repeat_interleave(nw, dim=0)
    s = block.attn.i2t(s, rep_text, rep_mask)
    s = block._unwindow(s, hw, padded)
    x = x + block.drop_path(s)
    return x + block.drop_path(block.mlp(block.norm2(x)))


class SwinStage(nn.Module):
    """Container of one stage: ``blocks`` and the optional ``downsample`` (patch merging) at its end."""

    def __init__(self, blocks: list[SwinBlock], downsample: PatchMerging | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample


class SwinTransformer(nn.Module):
    """Swin tower. Block-level pieces are exposed for the fusion driver in :mod:`fiber_backbones.model`.

    Args:
        cfg: geometry and window rule.
        fused_blocks: ``(stage, block)`` pairs that carry the i2t branch.
        text_dim: width of the text states (needed when ``fused_blocks`` is non-empty).
        i2t_query_norm: LayerNorm on the i2t query.
    """

    def __init__(
        self,
        cfg: SwinConfig,
        fused_blocks: frozenset[tuple[int, int]] = frozenset(),
        text_dim: int = 768,
        i2t_query_norm: bool = True,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        eps = cfg.layer_norm_eps
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, cfg.embed_dim, eps)
        total = sum(cfg.depths)
        rates = [cfg.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        self.layers = nn.ModuleList()
        idx = 0
        for s, depth in enumerate(cfg.depths):
            dim = cfg.stage_dim(s)
            window, shift = cfg.stage_window(s)
            blocks = [
                SwinBlock(
                    dim,
                    cfg.num_heads[s],
                    window,
                    shift if b % 2 == 1 else 0,
                    cfg.mlp_ratio,
                    rates[idx + b],
                    cfg.qkv_bias,
                    eps,
                    text_dim if (s, b) in fused_blocks else None,
                    i2t_query_norm,
                )
                for b in range(depth)
            ]
            idx += depth
            down = PatchMerging(dim, eps) if s < cfg.num_stages - 1 else None
            self.layers.append(SwinStage(blocks, down))
        last = cfg.stage_dim(cfg.num_stages - 1)
        self.norm = nn.LayerNorm(last, eps=eps) if cfg.final_norm else None
        if cfg.stage_norms:
            for i in cfg.out_indices:
                self.add_module(f"norm{i}", nn.LayerNorm(cfg.stage_dim(i), eps=eps))
        self.apply(_init_weights)

    def block(self, stage: int, index: int) -> SwinBlock:
        """Block ``(stage, index)``."""
        return cast(SwinBlock, self._stage(stage).blocks[index])

    def _stage(self, stage: int) -> SwinStage:
        return cast(SwinStage, self.layers[stage])  # nn.ModuleList is untyped; layers holds SwinStage only

    def embed(self, pixel_values: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Patch embedding: ``[B, 3, H, W] -> ([B, h*w, C0], (h, w))``.

        Raises:
            ValueError: for a non-4D input, the wrong channel count, or (coarse rule) a size other than
                ``img_size``.
        """
        if pixel_values.dim() != 4 or pixel_values.shape[1] != self.cfg.in_chans:
            raise ValueError(f"pixel_values must be [B, {self.cfg.in_chans}, H, W], got {tuple(pixel_values.shape)}")
        size = self.cfg.img_size
        if self.cfg.window_rule == "coarse" and tuple(pixel_values.shape[-2:]) != (size, size):
            raise ValueError(
                f"coarse-rule Swin is built for {size}x{size} inputs, got {tuple(pixel_values.shape[-2:])}; "
                "rebuild with swin.img_size (tables are resized by fiber_backbones.weights) or use a fine variant"
            )
        return self.patch_embed(pixel_values)

    def stage_map(self, stage: int, x: Tensor, hw: tuple[int, int]) -> Tensor:
        """Pyramid map of ``stage`` (through ``norm{stage}`` when stage norms exist): ``[B, C, H, W]``."""
        norm = getattr(self, f"norm{stage}", None)
        if norm is not None:
            x = norm(x)
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], hw[0], hw[1])

    def merge(self, stage: int, x: Tensor, hw: tuple[int, int]) -> tuple[Tensor, tuple[int, int]]:
        """Patch merging at the end of ``stage`` (identity for the last stage)."""
        down = self._stage(stage).downsample
        return (x, hw) if down is None else down(x, hw)

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, tuple[int, int], tuple[Tensor, ...]]:
        """Uni-modal forward.

        Args:
            pixel_values: ``[B, 3, H, W]``.

        Returns:
            ``(tokens [B, N, C_last] after the final norm if any, grid, pyramid maps per out index)``.
        """
        x, hw = self.embed(pixel_values)
        pyramid = []
        for s, stage in enumerate(cast("Iterable[SwinStage]", self.layers)):  # layers holds SwinStage only
            for blk in stage.blocks:
                x = blk(x, hw)
            if s in self.cfg.out_indices:
                pyramid.append(self.stage_map(s, x, hw))
            x, hw = self.merge(s, x, hw)
        if self.norm is not None:
            x = self.norm(x)
        return x, hw, tuple(pyramid)


def _init_weights(module: nn.Module) -> None:
    init_linear_and_norm(module, truncated=True)
    if isinstance(module, WindowAttention):
        nn.init.trunc_normal_(module.relative_position_bias_table, std=0.02)
