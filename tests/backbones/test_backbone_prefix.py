"""Shared uni-modal prefixes: computing them once and re-indexing gives exactly the per-pass results."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from fiber_backbones import TextInputs, create_backbone

VOCAB_100: dict[str, Any] = {"text.vocab_size": 100}


@pytest.mark.parametrize("variant", ["coarse", "fine_v2"])
def test_forward_from_prefixes_equals_forward(variant: str) -> None:
    torch.manual_seed(0)
    model = create_backbone("fiber-tiny", variant=variant, **VOCAB_100).eval()
    # non-zero gates so that fusion really changes the outputs
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "alpha" in name:
                p.fill_(0.5)
    px = torch.randn(3, 3, 64, 64)
    ids = torch.randint(3, 100, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, 6:] = False
    text = TextInputs(ids, mask)
    with torch.no_grad():
        ip, tp = model.image_prefix(px), model.text_prefix(text)
        ref = model(px, text)
        got = model.forward_from_prefixes(ip, tp)
        torch.testing.assert_close(got.image.tokens, ref.image.tokens, rtol=0, atol=0)
        assert got.text is not None and ref.text is not None
        torch.testing.assert_close(got.text.hidden, ref.text.hidden, rtol=0, atol=0)
        for a, b in zip(got.image.pyramid, ref.image.pyramid, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        # dual-encoder paths from the same prefixes
        torch.testing.assert_close(
            model.forward_from_prefixes(ip, None, fuse=False, path_norms=True).image.tokens,
            model.encode_image(px).tokens,
            rtol=0,
            atol=0,
        )
        torch.testing.assert_close(
            model.encode_text_from_prefix(tp).hidden, model.encode_text(text).hidden, rtol=0, atol=0
        )
        # re-indexed prefixes (ITM hard negatives) equal a forward on re-indexed inputs
        idx_i, idx_t = torch.tensor([2, 0, 0, 1]), torch.tensor([1, 1, 2, 0])
        mixed = model.forward_from_prefixes(ip.index_select(idx_i), tp.index_select(idx_t))
        direct = model(px[idx_i], text.index_select(idx_t))
        torch.testing.assert_close(mixed.image.tokens, direct.image.tokens, rtol=1e-6, atol=1e-6)
        assert mixed.text is not None and direct.text is not None
        torch.testing.assert_close(mixed.text.hidden, direct.text.hidden, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(
            mixed.image.tokens, model(px[idx_i], text.index_select(idx_t), fuse=False).image.tokens
        )


def test_prefix_gradients_flow_through_shared_prefix() -> None:
    model = create_backbone("fiber-tiny", **VOCAB_100)
    px = torch.randn(2, 3, 64, 64)
    text = TextInputs(torch.randint(3, 100, (2, 5)), torch.ones(2, 5, dtype=torch.bool))
    ip = model.image_prefix(px)
    out = model.forward_from_prefixes(
        ip.index_select(torch.tensor([0, 1, 1])), model.text_prefix(text).index_select(torch.tensor([0, 0, 1]))
    )
    out.image.tokens.sum().backward()
    assert model.image_encoder.patch_embed.proj.weight.grad is not None
    assert model.image_encoder.patch_embed.proj.weight.grad.abs().sum() > 0
