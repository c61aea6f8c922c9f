"""Regional compile of the backbone: no graph breaks inside a block, and compiled blocks compute the same thing."""

from __future__ import annotations

from typing import Any, cast

import pytest
import torch
from bb_helpers import make_text, randomize_gates

from fiber_backbones import create_backbone
from fiber_backbones.swin import SwinStage


def _fused_inputs(model):
    swin = model.image_encoder
    (s, b), k = model.fusion_schedule[0]
    blk, layer = swin.block(s, b), model.text_encoder.layers[k]
    side = model.config.swin.img_size // (model.config.swin.patch_size * 2**s)
    x = torch.randn(2, side * side, blk.attn.dim)
    text = torch.randn(2, 7, model.text_dim)
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    return blk, layer, x, (side, side), text, mask


def test_fused_blocks_trace_without_graph_breaks() -> None:
    torch.manual_seed(0)
    model = create_backbone("fiber-tiny").train()  # training: dropout, drop path, bias that needs a gradient
    blk, layer, x, hw, text, mask = _fused_inputs(model)
    assert blk.has_i2t and blk.shift > 0  # shifted window (shift mask) + i2t branch + padded text
    for module, args in ((blk, (x, hw, text, mask)), (layer, (text, mask, x))):
        explained = torch._dynamo.explain(module)(*args)
        assert explained.graph_break_count == 0, [str(r.reason) for r in explained.break_reasons]
        assert explained.graph_count == 1


def test_unfused_regions_trace_without_graph_breaks() -> None:
    torch.manual_seed(0)
    model = create_backbone("fiber-tiny").train()
    swin, text = model.image_encoder, make_text([9, 5], vocab=1000)
    side = model.config.swin.img_size // model.config.swin.patch_size
    x = torch.randn(2, side * side, model.config.swin.embed_dim)
    downsample = cast(SwinStage, swin.layers[0]).downsample
    assert downsample is not None
    regions = (
        (swin.patch_embed, (torch.randn(2, 3, 64, 64),)),
        (swin.block(0, 0), (x, (side, side))),
        (downsample, (x, (side, side))),
        (model.text_encoder.embeddings, (text.input_ids, text.attention_mask)),
    )
    for module, args in regions:
        explained = torch._dynamo.explain(module)(*args)
        assert explained.graph_break_count == 0, (
            type(module).__name__,
            [str(r.reason) for r in explained.break_reasons],
        )


@pytest.mark.slow
def test_compiled_blocks_match_eager_forward_and_gradients() -> None:
    torch.manual_seed(0)
    no_drop_path: dict[str, Any] = {"swin.drop_path_rate": 0.0}
    eager = create_backbone("fiber-tiny", **no_drop_path).eval()
    randomize_gates(eager)
    compiled = create_backbone("fiber-tiny", **no_drop_path).eval()
    compiled.load_state_dict(eager.state_dict())
    n = compiled.compile_blocks(backend="aot_eager")  # dynamo + autograd tracing, no code generation (fast)
    assert n == 2 + 4 + 6 + 3  # patch embed, text embeddings, 4 text layers, 6 Swin blocks, 3 patch mergings
    px, text = torch.randn(2, 3, 64, 64), make_text([9, 5], vocab=1000)
    outs = []
    for model in (eager, compiled):
        out = model(px, text)
        loss = out.image.tokens.square().mean() + out.text.hidden.square().mean()
        loss.backward()
        gate = model.image_encoder.block(*model.fusion_schedule[0][0]).attn.alpha_i2t.grad
        table = model.image_encoder.block(0, 0).attn.relative_position_bias_table.grad
        assert gate is not None and table is not None
        outs.append((out.image.tokens.detach(), out.text.hidden.detach(), gate.clone(), table.clone()))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
