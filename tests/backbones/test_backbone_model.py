"""FiberBackbone: uni-modal identities, the parallel fusion schedule, coarse path quirks, gradients."""

from __future__ import annotations

from typing import cast

import pytest
import torch
from bb_helpers import make_text, randomize_gates, tiny

from fiber_backbones import FusionBackbone, TextInputs
from fiber_backbones.swin import DropPath
from fiber_backbones.testing import check_fusion_backbone
from fiber_backbones.text_encoder import TextLayer


def test_satisfies_protocol_and_metadata() -> None:
    model = tiny("fine_v2")
    assert isinstance(model, FusionBackbone)
    assert model.size_divisibility == 32
    assert (model.image_dim, model.text_dim) == (256, 64)
    assert model.fusion_schedule == (((2, 1), 1), ((3, 0), 2), ((3, 1), 3))
    assert [(f.name, f.channels, f.stride) for f in model.feature_specs] == [
        ("stage1", 64, 8),
        ("stage2", 128, 16),
        ("stage3", 256, 32),
    ]


@pytest.mark.parametrize("variant", ["coarse", "fine_v2", "fine_v3", "default"])
def test_zero_gates_equal_fuse_off_and_towers(variant: str) -> None:
    model = tiny(variant)
    x = torch.randn(2, 3, 64, 64)
    text = make_text([7, 3])
    with torch.no_grad():
        fused = model(x, text)
        off = model(x, text, fuse=False)
        image_only = model(x)
        tower_text = model.text_encoder(
            text.input_ids, text.attention_mask, final_output_norm=model.config.fused_path_norms
        )
        enc_img = model.encode_image(x)
        enc_txt = model.encode_text(text)
    assert fused.fused and not off.fused and not image_only.fused and image_only.text is None
    assert torch.equal(fused.image.tokens, off.image.tokens)
    assert torch.equal(fused.text.hidden, off.text.hidden)
    for a, b in zip(fused.image.pyramid, off.image.pyramid):
        assert torch.equal(a, b)
    assert torch.equal(off.image.tokens, image_only.image.tokens)
    torch.testing.assert_close(off.text.hidden, tower_text, atol=0, rtol=0)
    if variant == "coarse":
        # Coarse fused path: no final Swin norm, no output LN in the last text layer (docs/reference/architecture.md §8.1).
        assert not torch.allclose(off.image.tokens, enc_img.tokens)
        assert model.image_encoder.norm is not None
        torch.testing.assert_close(model.image_encoder.norm(off.image.tokens), enc_img.tokens)
        assert not torch.allclose(off.text.hidden, enc_txt.hidden)
        last_ln = cast(TextLayer, model.text_encoder.layers[-1]).output.LayerNorm
        assert last_ln is not None
        torch.testing.assert_close(last_ln(off.text.hidden), enc_txt.hidden)
    else:
        torch.testing.assert_close(off.image.tokens, enc_img.tokens)
        torch.testing.assert_close(off.text.hidden, enc_txt.hidden)


def test_nonzero_gates_change_both_sides() -> None:
    model = tiny("fine_v3")
    randomize_gates(model)
    x = torch.randn(2, 3, 64, 64)
    text = make_text([7, 3])
    with torch.no_grad():
        fused, off = model(x, text), model(x, text, fuse=False)
    assert (fused.image.tokens - off.image.tokens).abs().max() > 1e-3
    assert (fused.text.hidden - off.text.hidden).abs().max() > 1e-3
    # Stage 1 precedes every fused block: unchanged. Stage 2 ends with fused block (2, 1): changed.
    assert torch.equal(fused.image.pyramid[0], off.image.pyramid[0])
    assert not torch.allclose(fused.image.pyramid[1], off.image.pyramid[1])


def manual_parallel_forward(model, x: torch.Tensor, text: TextInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Hand-written schedule of fiber-tiny: blocks (2,1),(3,0),(3,1) <-> text layers 1,2,3 (fine variant)."""
    swin, enc, mask = model.image_encoder, model.text_encoder, text.attention_mask
    layers = enc.layers
    h, hw = swin.embed(x)
    for s in (0, 1):
        h = swin.block(s, 0)(h, hw)
        h, hw = swin.merge(s, h, hw)
    h = swin.block(2, 0)(h, hw)
    t = layers[0](enc.embeddings(text.input_ids, mask), mask)
    # step 1: block (2,1) reads t after layer 0; layer 1 reads the image before block (2,1)
    h_new = swin.block(2, 1)(h, hw, t, mask)
    t = layers[1](t, mask, h)
    h = h_new
    h, hw = swin.merge(2, h, hw)  # image-only merging; layer 2 attends to the merged map
    h_new = swin.block(3, 0)(h, hw, t, mask)
    t = layers[2](t, mask, h)
    h = h_new
    h_new = swin.block(3, 1)(h, hw, t, mask)
    t = layers[3](t, mask, h)
    return h_new, t


def test_parallel_update_matches_hand_written_schedule() -> None:
    model = tiny("fine_v3", **{"swin.final_norm": False})
    randomize_gates(model, 0.9)
    x = torch.randn(2, 3, 64, 64)
    text = make_text([7, 2])
    with torch.no_grad():
        out = model(x, text)
        img, txt = manual_parallel_forward(model, x, text)
    torch.testing.assert_close(out.image.tokens, img)
    torch.testing.assert_close(out.text.hidden, txt)


def test_fine_any_size_pyramid_strides() -> None:
    model = tiny("fine_v2")
    randomize_gates(model)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        out = model(x, make_text([5]))
    assert [tuple(p.shape) for p in out.image.pyramid] == [(1, 64, 8, 12), (1, 128, 4, 6), (1, 256, 2, 3)]
    assert out.image.grid == (2, 3) and out.image.tokens.shape == (1, 6, 256)
    # Sizes that are not multiples of 32 still run (odd grids are padded at merging).
    with torch.no_grad():
        odd = model(torch.randn(1, 3, 40, 72), make_text([3]))
    assert [tuple(p.shape[-2:]) for p in odd.image.pyramid] == [(5, 9), (3, 5), (2, 3)]


def test_fully_padded_text_row_is_finite() -> None:
    model = tiny("coarse")
    randomize_gates(model)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64), make_text([5, 0]))
    assert torch.isfinite(out.image.tokens).all() and torch.isfinite(out.text.hidden).all()


def test_input_errors() -> None:
    model = tiny("fine_v2")
    with pytest.raises(ValueError, match="batch mismatch"):
        model(torch.randn(2, 3, 64, 64), make_text([3]))
    with pytest.raises(ValueError, match="pixel_values"):
        model(torch.randn(3, 64, 64))
    with pytest.raises(TypeError, match="TextInputs"):
        model.encode_text({"input_ids": torch.zeros(1, 2)})  # pyright: ignore[reportArgumentType]  # the wrong type on purpose


def test_backward_reaches_gates_not_cross_weights_at_init() -> None:
    model = tiny("fine_v3").train()
    for m in model.modules():  # deterministic: no dropout / drop path
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(m, DropPath):
            m.p = 0.0
    out = model(torch.randn(2, 3, 64, 64), make_text([6, 4]))
    (out.image.tokens.square().mean() + out.text.hidden.square().mean()).backward()
    grads = dict(model.named_parameters())
    gates = [n for n in grads if "alpha_" in n]
    assert len(gates) == 6
    for n in gates:
        grad = grads[n].grad
        assert grad is not None and grad.abs().sum() > 0, n
    cross = [n for n, _ in model.named_fusion_parameters() if "alpha_" not in n]
    assert cross
    for n in cross:
        g = grads[n].grad
        assert g is None or torch.count_nonzero(g) == 0, n  # gate 0 blocks the gradient into the branch


def test_fusion_parameters_and_no_weight_decay() -> None:
    model = tiny("coarse")
    fusion = {n for n, _ in model.named_fusion_parameters()}
    assert "image_encoder.layers.2.blocks.1.attn.qkv_text_i2t.weight" in fusion
    assert "text_encoder.encoder.layer.0.alpha_t2i" in fusion  # coarse: unused gate, still a fusion param
    assert "image_encoder.layers.2.blocks.1.attn.qkv.weight" not in fusion
    assert len(list(model.fusion_parameters())) == len(fusion)
    nwd = model.no_weight_decay()
    assert "image_encoder.layers.0.blocks.0.attn.relative_position_bias_table" in nwd
    assert "text_encoder.embeddings.LayerNorm.weight" in nwd
    assert "image_encoder.layers.0.blocks.0.attn.qkv.bias" in nwd
    assert "image_encoder.layers.0.blocks.0.attn.qkv.weight" not in nwd
    assert not any("alpha_" in n for n in nwd)


def test_grad_checkpointing_gives_identical_grads() -> None:
    torch.manual_seed(1)
    model = tiny("fine_v3").train()
    randomize_gates(model, 0.3)
    x = torch.randn(2, 3, 64, 64)
    text = make_text([6, 4])

    def grads() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        torch.manual_seed(123)  # same dropout / drop-path draws in both runs
        out = model(x, text)
        loss = out.image.tokens.square().mean() + out.text.hidden.square().mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_a, ga = grads()
    model.set_grad_checkpointing(True)
    loss_b, gb = grads()
    assert torch.equal(loss_a, loss_b)
    assert ga.keys() == gb.keys()
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], atol=1e-6, rtol=1e-5, msg=n)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 0.1)])
def test_sdpa_and_eager_agree_on_full_model(dtype: torch.dtype, tol: float) -> None:
    model = tiny("fine_v3").to(dtype)
    randomize_gates(model)
    x = torch.randn(2, 3, 64, 96, dtype=dtype)
    text = make_text([7, 0])  # includes a fully padded row
    outs = []
    with torch.no_grad():
        for backend in ("sdpa", "eager"):
            model.set_attention_backend(backend)
            outs.append(model(x, text))
    a, b = outs
    assert a.image.tokens.dtype == dtype and torch.isfinite(a.image.tokens).all()
    torch.testing.assert_close(a.image.tokens, b.image.tokens, atol=tol, rtol=tol)
    torch.testing.assert_close(a.text.hidden, b.text.hidden, atol=tol, rtol=tol)


@pytest.mark.slow
def test_torch_compile_smoke() -> None:
    # fullgraph=True proves the fused forward captures as one graph (no graph breaks); aot_eager skips the
    # inductor C++ build, which takes minutes on a 2-core CI machine.
    model = tiny("fine_v3")
    randomize_gates(model)
    x = torch.randn(1, 3, 64, 64)
    text = make_text([5])
    with torch.no_grad():
        ref = model(x, text)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        out = compiled(x, text)
    torch.testing.assert_close(out.image.tokens, ref.image.tokens, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.text.hidden, ref.text.hidden, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant,size", [("coarse", (64, 64)), ("fine_v2", (64, 96)), ("default", (96, 64))])
def test_conformance_suite(variant: str, size: tuple[int, int]) -> None:
    model = tiny(variant)
    randomize_gates(model)
    fused = check_fusion_backbone(model, torch.randn(2, *size).unsqueeze(1).expand(2, 3, *size), make_text([5, 2]))
    assert fused.fused


def test_conformance_suite_catches_a_broken_backbone() -> None:
    model = tiny("fine_v2")
    model.feature_specs = model.feature_specs[:2]  # claims two maps, returns three
    with pytest.raises(AssertionError, match="pyramid"):
        check_fusion_backbone(model, torch.randn(1, 3, 64, 64), make_text([3]))


def test_bf16_autocast_runs_close_to_fp32() -> None:
    model = tiny("fine_v3")
    randomize_gates(model)
    x, text = torch.randn(2, 3, 64, 64), make_text([6, 3])
    with torch.no_grad():
        ref = model(x, text)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, text)
    assert not torch.equal(out.image.tokens.float(), ref.image.tokens)  # bf16 matmuls really ran
    torch.testing.assert_close(out.image.tokens.float(), ref.image.tokens, atol=0.15, rtol=0.05)
    torch.testing.assert_close(out.text.hidden.float(), ref.text.hidden, atol=0.15, rtol=0.05)


def test_gate_init_opens_only_the_scheduled_gates() -> None:
    model = tiny(fusion={"gate_init": 1.0})
    assert model.config.fusion.gate_init == 1.0
    gates = {n: p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] in ("alpha_i2t", "alpha_t2i")}
    scheduled = {n for n, p in gates.items() if p.requires_grad}
    assert len(scheduled) == 6  # 3 fused pairs, one gate per side
    assert all(float(gates[n].detach()) == 1.0 for n in scheduled)
    assert all(
        float(p.detach()) == 0.0 for n, p in gates.items() if n not in scheduled
    )  # the unused coarse gate stays 0
    # an open branch makes the fused text depend on the image from the first step (the default keeps it closed)
    text = make_text([6, 4])
    closed = tiny()
    closed.load_state_dict({k: v for k, v in model.state_dict().items() if "alpha_" not in k}, strict=False)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        opened = model(x, text).text.hidden
        shut = closed(x, text).text.hidden
        assert not torch.allclose(opened, shut, atol=1e-4)
