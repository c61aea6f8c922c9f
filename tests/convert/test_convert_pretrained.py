"""Initialising the fusion backbone from uni-modal towers: timm / original Swin and Hugging Face RoBERTa."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fiber_backbones import FiberBackbone, TextInputs, create_backbone
from fiber_backbones.config import last_n_schedule
from fiber_backbones.convert import CheckpointFormatError
from fiber_backbones.pretrained import (
    create_backbone_from_towers,
    init_from_towers,
    load_roberta_weights,
    load_swin_weights,
)

timm_swin = pytest.importorskip("timm.models.swin_transformer")
transformers = pytest.importorskip("transformers")

DEPTHS = (2, 2, 2, 2)  # shifted blocks in every stage, every downsample exercised
HEADS = (1, 2, 4, 8)


def _ours(img_size: int = 64, variant: str = "coarse") -> FiberBackbone:
    return create_backbone(
        "fiber-tiny",
        variant=variant,
        attention_backend="eager",
        **{"swin.img_size": img_size, "swin.depths": DEPTHS, "fusion.schedule": last_n_schedule(DEPTHS, 4, 3)},
    ).eval()


def _timm_swin(img_size: int = 64, window: int = 2, embed_dim: int = 32, seed: int = 0):
    torch.manual_seed(seed)
    model = timm_swin.SwinTransformer(
        img_size=img_size,
        patch_size=4,
        embed_dim=embed_dim,
        depths=DEPTHS,
        num_heads=HEADS,
        window_size=window,
        num_classes=5,
    ).eval()
    # random, non-trivial values everywhere (LayerNorms and biases included)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def _timm_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm >= 0.9 keys -> original Swin release keys (merging at the end of the previous stage, ``head``)."""
    out = {}
    for key, value in state.items():
        m = re.fullmatch(r"layers\.(\d+)\.downsample\.(.+)", key)
        if m:
            key = f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}"
        elif key.startswith("head.fc."):
            key = "head." + key[len("head.fc.") :]
        out[key] = value
    return out


def _fusion_snapshot(model: FiberBackbone) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_fusion_parameters()}


@pytest.fixture(scope="module")
def swin_pair():
    return _timm_swin()


def _features_match(ours: FiberBackbone, tm) -> None:
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a = ours.encode_image(x).tokens
        b = tm.forward_features(x)  # [B, H, W, C] after the final norm
    torch.testing.assert_close(a, b.flatten(1, 2), rtol=0, atol=1e-5)


def test_timm_swin_layout_gives_timm_features(swin_pair) -> None:
    ours = _ours()
    before = _fusion_snapshot(ours)
    rep = load_swin_weights(ours, swin_pair.state_dict())
    assert rep.layout == "timm"
    assert rep.missing == [] and rep.resized == {}
    assert set(rep.ignored) == {"head.fc.weight", "head.fc.bias"}
    assert len(rep.initialised) == 3 * 9  # 3 fused blocks x (gate, 3 linears x 2, query LN x 2)
    # fusion parameters keep their reference initialisation
    after = _fusion_snapshot(ours)
    assert all(torch.equal(before[k], after[k]) for k in before)
    _features_match(ours, swin_pair)


def test_original_release_layout_gives_the_same_features(swin_pair, tmp_path: Path) -> None:
    original = _timm_to_original(swin_pair.state_dict())
    assert "layers.0.downsample.reduction.weight" in original
    # the original release stores the index / mask buffers; they are recognised and ignored
    original["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(4, 4, dtype=torch.long)
    original["layers.0.blocks.1.attn_mask"] = torch.zeros(64, 4, 4)
    path = tmp_path / "swin_original.pth"
    torch.save({"model": original}, path)
    ours = _ours()
    rep = load_swin_weights(ours, path)
    assert rep.layout == "swin-original"
    assert "rebuilt" in rep.ignored["layers.0.blocks.0.attn.relative_position_index"]
    assert "head.weight" in rep.ignored
    _features_match(ours, swin_pair)


def test_swin_tables_are_resized_for_another_window() -> None:
    tm = _timm_swin(img_size=64, window=2, seed=1)  # window 2 -> ours at 128 px has window 4 (coarse rule)
    ours = _ours(128)
    rep = load_swin_weights(ours, tm.state_dict())
    assert len(rep.resized) == 8 and set(rep.resized.values()) == {(9, 49)}
    src = tm.state_dict()["layers.2.blocks.1.attn.relative_position_bias_table"]  # [9, 4]
    grid = src.t().reshape(1, 4, 3, 3)
    ref = F.interpolate(grid, size=(7, 7), mode="bicubic", align_corners=False).reshape(4, 49).t()
    got = ours.state_dict()["image_encoder.layers.2.blocks.1.attn.relative_position_bias_table"]
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


def test_fine_variant_ignores_final_norm_and_keeps_stage_norms(swin_pair) -> None:
    ours = _ours(variant="fine_v2")
    rep = load_swin_weights(ours, swin_pair.state_dict())
    assert "no final Swin norm" in rep.ignored["norm.weight"]
    assert {f"image_encoder.norm{i}.weight" for i in (1, 2, 3)} <= set(rep.initialised)
    assert torch.equal(ours.state_dict()["image_encoder.norm2.weight"], torch.ones(128))


def test_swin_of_another_width_is_rejected() -> None:
    tm = _timm_swin(embed_dim=64)
    with pytest.raises(CheckpointFormatError, match=r"patch_embed\.proj\.weight: source \(64, 3, 4, 4\)"):
        load_swin_weights(_ours(), tm.state_dict())
    state = tm.state_dict()
    state["layers.0.blocks.0.attn.something_new"] = torch.zeros(2)
    with pytest.raises(CheckpointFormatError, match="not recognised"):
        load_swin_weights(_ours(), state)


def _hf_roberta(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.RobertaConfig(
        vocab_size=1000,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=130,
        type_vocab_size=1,
        pad_token_id=1,
        layer_norm_eps=1e-5,
    )
    model = transformers.RobertaModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _text_match(ours: FiberBackbone, hf) -> None:
    ids = torch.randint(3, 1000, (3, 9))
    ids[1, 6:] = 1
    ids[2, 3:] = 1
    mask = ids != 1
    with torch.no_grad():
        a = ours.encode_text(TextInputs(ids, mask)).hidden
        b = hf(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    torch.testing.assert_close(a[mask], b[mask], rtol=0, atol=1e-5)


def test_hf_roberta_directory_gives_hf_hidden_states(tmp_path: Path) -> None:
    hf = _hf_roberta()
    hf.save_pretrained(tmp_path / "roberta")
    ours = _ours()
    before = _fusion_snapshot(ours)
    rep = load_roberta_weights(ours, tmp_path / "roberta")
    assert rep.missing == [] and set(rep.ignored) == {"pooler.dense.weight", "pooler.dense.bias"}
    assert "text_encoder.encoder.layer.2.crossattention_t2i.self.key.weight" in rep.initialised
    after = _fusion_snapshot(ours)
    assert all(torch.equal(before[k], after[k]) for k in before)
    _text_match(ours, hf)


def test_hf_masked_lm_bin_with_prefix(tmp_path: Path) -> None:
    hf = _hf_roberta(seed=1)
    state = {f"roberta.{k}": v for k, v in hf.state_dict().items() if not k.startswith("pooler.")}
    state["lm_head.dense.weight"] = torch.zeros(64, 64)
    state["lm_head.bias"] = torch.zeros(1000)
    (tmp_path / "mlm").mkdir()
    torch.save(state, tmp_path / "mlm" / "pytorch_model.bin")
    ours = _ours()
    rep = load_roberta_weights(ours, tmp_path / "mlm")
    assert "masked-LM head" in rep.ignored["lm_head.bias"]
    _text_match(ours, hf)


def test_roberta_missing_layer_is_reported_or_raises() -> None:
    state = {k: v for k, v in _hf_roberta().state_dict().items() if "layer.3.output" not in k}
    with pytest.raises(CheckpointFormatError, match=r"lack 4 tower parameters.*layer\.3\.output"):
        load_roberta_weights(_ours(), state)
    rep = load_roberta_weights(_ours(), state, strict=False)
    assert len(rep.missing) == 4 and all("layer.3.output" in k for k in rep.missing)


def test_init_from_towers_loads_both(swin_pair, tmp_path: Path) -> None:
    hf = _hf_roberta()
    hf.save_pretrained(tmp_path / "rb")
    ours = _ours()
    reports = init_from_towers(ours, swin=swin_pair.state_dict(), roberta=tmp_path / "rb")
    assert set(reports) == {"swin", "roberta"}
    _features_match(ours, swin_pair)
    _text_match(ours, hf)
    # zero gates: the fused forward equals the two towers (docs/reference/architecture.md §7 identity)
    ids = torch.randint(3, 1000, (2, 5))
    text = TextInputs(ids, torch.ones_like(ids, dtype=torch.bool))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fused, off = ours(x, text), ours(x, text, fuse=False)
    torch.testing.assert_close(fused.image.tokens, off.image.tokens, rtol=0, atol=0)
    assert math.isfinite(fused.text.hidden.abs().max().item())


def test_create_backbone_from_towers_applies_overrides(swin_pair) -> None:
    model, reports = create_backbone_from_towers(
        "fiber-tiny",
        swin=swin_pair.state_dict(),
        attention_backend="eager",
        **{"swin.depths": DEPTHS, "fusion.schedule": last_n_schedule(DEPTHS, 4, 3)},
    )
    assert set(reports) == {"swin"} and reports["swin"].layout == "timm"
    _features_match(model.eval(), swin_pair)
