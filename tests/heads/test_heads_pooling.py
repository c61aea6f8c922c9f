"""Text pooling options of the ITC head and the fused projection."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from fiber_heads import ContrastiveHead, CrossModalProjection
from fiber_heads.projections import pool_text


@dataclass
class _Txt:
    hidden: torch.Tensor
    mask: torch.Tensor


@dataclass
class _Img:
    tokens: torch.Tensor


@dataclass
class _Fused:
    image: _Img
    text: _Txt


def test_pool_text_modes() -> None:
    feats = torch.arange(2 * 3 * 2, dtype=torch.float).view(2, 3, 2)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    torch.testing.assert_close(pool_text(feats, mask, "first"), feats[:, 0])
    expected = torch.stack([feats[0, :2].mean(0), feats[1].mean(0)])
    torch.testing.assert_close(pool_text(feats, mask, "mean"), expected)
    with pytest.raises(ValueError, match="text pooling"):
        pool_text(feats, mask, "max")


@pytest.mark.parametrize("mode", ["first", "mean"])
def test_padding_content_never_changes_the_pooled_text(mode: str) -> None:
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 8)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[:, 3:] = False
    other = hidden.clone()
    other[:, 3:] = 100.0  # padding positions hold garbage
    itc = ContrastiveHead(6, 8, 4, text_pool=mode)
    torch.testing.assert_close(itc.embed_text(_Txt(hidden, mask)), itc.embed_text(_Txt(other, mask)))
    proj = CrossModalProjection(6, 8, 4, text_pool=mode)
    img = _Img(torch.randn(2, 4, 6))
    torch.testing.assert_close(proj(_Fused(img, _Txt(hidden, mask))).cls, proj(_Fused(img, _Txt(other, mask))).cls)
    if mode == "mean":  # and, unlike <s> pooling, every real token counts
        moved = hidden.clone()
        moved[:, 2] += 1.0
        assert not torch.allclose(itc.embed_text(_Txt(hidden, mask)), itc.embed_text(_Txt(moved, mask)))
