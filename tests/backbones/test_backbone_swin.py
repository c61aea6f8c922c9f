"""Swin tower: window ops, masks, block math against naive references, timm parity, un-windowed i2t parity."""

from __future__ import annotations

import math
from typing import Any

import pytest
import timm
import torch
from bb_helpers import make_text, randomize_gates, tiny

from fiber_backbones.config import SwinConfig
from fiber_backbones.swin import (
    PatchMerging,
    SwinBlock,
    SwinTransformer,
    _block_forward_per_window_reference,
    relative_position_index,
    shift_window_mask,
    window_partition,
    window_reverse,
)


def test_window_partition_roundtrip_and_order() -> None:
    x = torch.arange(2 * 4 * 6 * 1, dtype=torch.float32).view(2, 4, 6, 1)
    win = window_partition(x, 2)
    assert win.shape == (2 * 6, 4, 1)
    # Second window of the first image covers rows 0-1, columns 2-3 (row-major window order).
    assert win[1, :, 0].tolist() == [
        x[0, 0, 2, 0].item(),
        x[0, 0, 3, 0].item(),
        x[0, 1, 2, 0].item(),
        x[0, 1, 3, 0].item(),
    ]
    torch.testing.assert_close(window_reverse(win, 2, 4, 6), x)


def test_relative_position_index_formula() -> None:
    w = 3
    idx = relative_position_index(w)
    for i in range(w * w):
        for j in range(w * w):
            (ri, ci), (rj, cj) = divmod(i, w), divmod(j, w)
            assert idx[i, j] == (ri - rj + w - 1) * (2 * w - 1) + (ci - cj + w - 1)


def naive_shift_mask(h: int, w: int, win: int, shift: int) -> torch.Tensor:
    """Label the three row bands × three column bands of the rolled map, −100 between different labels."""
    label = torch.zeros(h, w, dtype=torch.long)
    cnt = 0
    for rs in (slice(0, -win), slice(-win, -shift), slice(-shift, None)):
        for cs in (slice(0, -win), slice(-win, -shift), slice(-shift, None)):
            label[rs, cs] = cnt
            cnt += 1
    masks = []
    for wr in range(h // win):
        for wc in range(w // win):
            lab = label[wr * win : (wr + 1) * win, wc * win : (wc + 1) * win].reshape(-1)
            masks.append((lab[:, None] != lab[None, :]).float() * -100.0)
    return torch.stack(masks)


@pytest.mark.parametrize("h,w,win,shift", [(8, 8, 4, 2), (12, 8, 4, 2), (6, 9, 3, 1)])
def test_shift_mask_matches_naive(h: int, w: int, win: int, shift: int) -> None:
    torch.testing.assert_close(shift_window_mask(h, w, win, shift), naive_shift_mask(h, w, win, shift))


def test_patch_merging_order() -> None:
    merge = PatchMerging(1, eps=1e-5)
    captured = {}
    merge.norm.register_forward_hook(lambda m, i, o: captured.setdefault("x", i[0]))
    x = torch.arange(16, dtype=torch.float32).view(1, 16, 1)  # 4x4 map, value = row*4 + col
    merge(x, (4, 4))
    # First output cell concatenates (0,0), (1,0), (0,1), (1,1) -> values 0, 4, 1, 5.
    assert captured["x"][0, 0].tolist() == [0.0, 4.0, 1.0, 5.0]
    assert captured["x"][0, 1].tolist() == [2.0, 6.0, 3.0, 7.0]


def test_patch_merging_odd_grid_pads() -> None:
    merge = PatchMerging(4, eps=1e-5)
    out, hw = merge(torch.randn(2, 3 * 5, 4), (3, 5))
    assert hw == (2, 3) and out.shape == (2, 6, 8)


def naive_block(block: SwinBlock, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Loop-based Swin block (pad, roll, per-window attention with explicit bias lookup, crop)."""
    b, _, c = x.shape
    h, w = hw
    win, shift, attn = block.window, block.shift, block.attn
    heads, d = attn.num_heads, attn.head_dim
    u = block.norm1(x).view(b, h, w, c)
    hp, wp = math.ceil(h / win) * win, math.ceil(w / win) * win
    padded = torch.zeros(b, hp, wp, c)
    padded[:, :h, :w] = u
    rolled = torch.roll(padded, (-shift, -shift), (1, 2)) if shift else padded
    mask = naive_shift_mask(hp, wp, win, shift) if shift else None
    out = torch.zeros_like(rolled)
    table = attn.relative_position_bias_table
    n_win = 0
    for wr in range(hp // win):
        for wc in range(wp // win):
            tok = rolled[:, wr * win : (wr + 1) * win, wc * win : (wc + 1) * win].reshape(b, win * win, c)
            q, k, v = attn.qkv(tok).view(b, win * win, 3, heads, d).permute(2, 0, 3, 1, 4)
            logits = q @ k.transpose(-1, -2) / math.sqrt(d)
            for i in range(win * win):
                for j in range(win * win):
                    (ri, ci), (rj, cj) = divmod(i, win), divmod(j, win)
                    logits[:, :, i, j] += table[(ri - rj + win - 1) * (2 * win - 1) + (ci - cj + win - 1)]
            if mask is not None:
                logits = logits + mask[n_win]
            s = attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(b, win * win, c))
            out[:, wr * win : (wr + 1) * win, wc * win : (wc + 1) * win] = s.view(b, win, win, c)
            n_win += 1
    if shift:
        out = torch.roll(out, (shift, shift), (1, 2))
    x = x + out[:, :h, :w].reshape(b, h * w, c)
    return x + block.mlp(block.norm2(x))


@pytest.mark.parametrize("hw,win,shift", [((4, 4), 2, 0), ((4, 4), 2, 1), ((5, 7), 3, 1), ((2, 3), 4, 2)])
def test_block_matches_naive_loop(hw: tuple[int, int], win: int, shift: int) -> None:
    block = SwinBlock(8, 2, win, shift).eval()
    with torch.no_grad():
        block.attn.relative_position_bias_table.normal_()
        x = torch.randn(2, hw[0] * hw[1], 8)
        torch.testing.assert_close(block(x, hw), naive_block(block, x, hw), atol=1e-5, rtol=1e-5)


def test_uni_modal_coarse_swin_matches_timm() -> None:
    cfg = SwinConfig(img_size=64, embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), drop_path_rate=0.0)
    ours = SwinTransformer(cfg).eval()
    ref: Any = timm.create_model(  # timm's SwinTransformer (forward_features)
        "swin_tiny_patch4_window7_224",
        pretrained=False,
        img_size=64,
        window_size=cfg.img_size // 32,
        embed_dim=32,
        depths=(2, 2, 2, 2),
        num_heads=(1, 2, 4, 8),
        num_classes=0,
    ).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.05 * torch.randn_like(p))  # move LayerNorms and biases away from their trivial init
    state = {}
    for key, value in ours.state_dict().items():
        parts = key.split(".")
        if parts[0] == "layers" and parts[2] == "downsample":  # timm merges at the start of the next stage
            parts[1] = str(int(parts[1]) + 1)
        state[".".join(parts)] = value
    result = ref.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    assert all("relative_position_index" in k or "attn_mask" in k for k in result.missing_keys)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens, grid, pyramid = ours(x)
        expected = ref.forward_features(x)  # [B, h, w, C] after the final norm
    assert grid == (2, 2)
    torch.testing.assert_close(tokens, expected.reshape(2, 4, 256), atol=1e-5, rtol=1e-5)
    assert [tuple(p.shape) for p in pyramid] == [(2, 64, 8, 8), (2, 128, 4, 4), (2, 256, 2, 2)]


def test_fine_rule_equals_coarse_rule_where_they_coincide() -> None:
    # Window 2 at 64 px: the rules differ only in stage 3 (coarse: no shift since grid <= window).
    common: dict[str, Any] = dict(
        img_size=64, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 2), drop_path_rate=0.0
    )
    coarse = SwinTransformer(SwinConfig(window_rule="coarse", **common)).eval()
    fine = SwinTransformer(SwinConfig(window_rule="fine", window_size=2, **common)).eval()
    fine.load_state_dict(coarse.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        _, _, pc = coarse(x)
        _, _, pf = fine(x)
    torch.testing.assert_close(pc[0], pf[0])
    torch.testing.assert_close(pc[1], pf[1])
    assert not torch.allclose(pc[2], pf[2])  # stage 3 is shifted in the fine rule only
    assert coarse.block(3, 1).shift == 0 and fine.block(3, 1).shift == 1


def test_coarse_rule_windows_and_size_check() -> None:
    cfg = SwinConfig(img_size=576)
    assert [cfg.stage_window(s) for s in range(4)] == [(18, 9), (18, 9), (18, 9), (18, 0)]
    model = tiny("coarse")
    with pytest.raises(ValueError, match="64x64"):
        model.image_encoder.embed(torch.randn(1, 3, 96, 64))


@pytest.mark.parametrize(
    "variant,size,block",
    [
        ("coarse", (64, 64), (2, 1)),
        ("coarse", (64, 64), (3, 0)),
        ("fine_v2", (64, 96), (2, 1)),
        ("fine_v3", (64, 96), (3, 1)),
    ],
)
def test_unwindowed_i2t_equals_per_window(variant: str, size: tuple[int, int], block: tuple[int, int]) -> None:
    model = tiny(variant)
    randomize_gates(model, 0.7)
    swin = model.image_encoder
    blk = swin.block(*block)
    assert blk.has_i2t
    stage_dim = swin.cfg.stage_dim(block[0])
    grid = (size[0] // (4 * 2 ** block[0]), size[1] // (4 * 2 ** block[0]))
    if variant != "coarse":
        # The fine cases must exercise window padding and a shifted block.
        assert grid[0] % blk.window or grid[1] % blk.window
    assert blk.shift or block == (3, 0)
    text = make_text([6, 3, 0], max_len=6)
    hidden = torch.randn(3, 6, model.text_dim)
    x = torch.randn(3, grid[0] * grid[1], stage_dim)
    with torch.no_grad():
        fast = blk(x, grid, hidden, text.attention_mask)
        ref = _block_forward_per_window_reference(blk, x, grid, hidden, text.attention_mask)
        uni = blk(x, grid)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    assert (fast - uni).abs().max() > 1e-3  # the branch really contributes
