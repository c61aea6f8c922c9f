"""Text tower: RoBERTa parity with Hugging Face transformers, positions, the t2i branch, causal mode."""

from __future__ import annotations

import math
from typing import Any, cast

import pytest
import torch
from bb_helpers import make_text
from transformers import RobertaConfig, RobertaModel

from fiber_backbones.config import TextEncoderConfig
from fiber_backbones.text_encoder import TextEncoder, TextLayer, roberta_position_ids

CFG = TextEncoderConfig(
    vocab_size=100, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, max_position_embeddings=40
)


def hf_roberta(cfg: TextEncoderConfig) -> RobertaModel:
    hf_cfg = RobertaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        type_vocab_size=cfg.type_vocab_size,
        pad_token_id=cfg.pad_token_id,
        layer_norm_eps=cfg.layer_norm_eps,
        hidden_act="gelu",
    )
    hf_cfg._attn_implementation = "eager"
    return RobertaModel(hf_cfg, add_pooling_layer=False).eval()


def test_position_ids_match_roberta_rule() -> None:
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    assert roberta_position_ids(mask, 1).tolist() == [[2, 3, 4, 1], [2, 1, 1, 1]]


def test_matches_huggingface_roberta() -> None:
    ours = TextEncoder(CFG).eval()
    ref = hf_roberta(CFG)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.05 * torch.randn_like(p))
    result = ref.load_state_dict(ours.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert all("position_ids" in k for k in result.missing_keys)
    text = make_text([9, 5, 2], vocab=100)
    with torch.no_grad():
        expected = ref(input_ids=text.input_ids, attention_mask=text.attention_mask.long()).last_hidden_state
        got = ours(text.input_ids, text.attention_mask)
    mask = text.attention_mask
    torch.testing.assert_close(got[mask], expected[mask], atol=1e-5, rtol=1e-5)


def test_t2i_branch_math_and_gate() -> None:
    layer = TextLayer(CFG, image_dim=24).eval()
    t = torch.randn(2, 5, 32)
    img = torch.randn(2, 7, 24)
    mask = torch.ones(2, 5, dtype=torch.bool)
    with torch.no_grad():
        base = layer(t, mask)
        torch.testing.assert_close(layer(t, mask, img), base)  # gate at 0: identical
        layer.alpha_t2i.fill_(0.8)
        got = layer(t, mask, img)
        # Independent composition: query from the pre-residual SA output, no image mask, gate, then LN.
        a = layer.attention(t, t, mask)
        cross = layer.crossattention_t2i
        norm_1, norm_2 = layer.attention.output.LayerNorm, layer.output.LayerNorm
        assert cross is not None and norm_1 is not None and norm_2 is not None
        q = cross.self.query(a).view(2, 5, 4, 8).transpose(1, 2)
        k = cross.self.key(img).view(2, 7, 4, 8).transpose(1, 2)
        v = cross.self.value(img).view(2, 7, 4, 8).transpose(1, 2)
        c = ((q @ k.transpose(-1, -2) / math.sqrt(8)).softmax(-1) @ v).transpose(1, 2).reshape(2, 5, 32)
        h1 = norm_1(t + a + 0.8 * cross.output.dense(c))
        out = norm_2(layer.output.dense(torch.nn.functional.gelu(layer.intermediate.dense(h1))) + h1)
    torch.testing.assert_close(got, out, atol=1e-5, rtol=1e-5)


def test_unfused_layer_has_no_cross_parameters() -> None:
    names = {n for n, _ in TextLayer(CFG).named_parameters()}
    assert not any("crossattention" in n or "alpha" in n for n in names)
    coarse = {n for n, _ in TextLayer(CFG, image_dim=24, gate=True, cross_output_norm=True).named_parameters()}
    assert {"alpha_t2i", "crossattention_t2i.output.LayerNorm.weight"} <= coarse


def test_causal_mode_ignores_future_tokens() -> None:
    enc = TextEncoder(CFG).eval()
    text = make_text([6, 6], vocab=100)
    ids2 = text.input_ids.clone()
    ids2[:, 4:] = 7  # change only the future of position 3
    with torch.no_grad():
        a = enc(text.input_ids, text.attention_mask, causal=True)
        b = enc(ids2, text.attention_mask, causal=True)
        c = enc(ids2, text.attention_mask)
    torch.testing.assert_close(a[:, :4], b[:, :4])
    assert not torch.allclose(a[:, :4], c[:, :4])


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_fully_padded_row_is_finite(backend: str) -> None:
    enc = TextEncoder(CFG).eval()
    for m in enc.modules():
        if hasattr(m, "attn_backend"):
            cast(Any, m).attn_backend = backend  # any module with the attribute
    text = make_text([4, 0], vocab=100)
    with torch.no_grad():
        out = enc(text.input_ids, text.attention_mask)
    assert torch.isfinite(out).all()


def test_too_long_text_raises_clear_error() -> None:
    enc = TextEncoder(CFG)
    text = make_text([39], vocab=100)  # position ids 2..40 do not fit a 40-row table; 38 tokens (2..39) do
    with pytest.raises(ValueError, match="max_position_embeddings 40"):
        enc(text.input_ids, text.attention_mask)
    assert enc(text.input_ids[:, :38], text.attention_mask[:, :38]).shape == (1, 38, 32)
