"""Checkpoint I/O, strict loading errors, relative-position table resizing, docs/reference/architecture.md §12 parameter counts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from bb_helpers import make_text, randomize_gates, tiny
from safetensors.torch import load_file

from fiber_backbones import (
    FiberBackbone,
    WeightsMismatchError,
    create_backbone,
    from_pretrained,
    get_config,
    load_weights,
    resize_relative_position_bias_table,
    save_pretrained,
)
from fiber_backbones.cli import count_parameters


def test_save_load_roundtrip(tmp_path: Path) -> None:
    model = tiny("fine_v3")
    randomize_gates(model)
    save_pretrained(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "config.json").read_text())["config"]["variant"] == "fine_v3"
    state = load_file(str(tmp_path / "model.safetensors"))
    assert "image_encoder.layers.2.blocks.1.attn.alpha_i2t" in state
    assert not any("relative_position_index" in k for k in state)  # deterministic buffers are not stored
    loaded = from_pretrained(tmp_path)
    x, text = torch.randn(2, 3, 64, 96), make_text([6, 2])
    with torch.no_grad():
        a, b = model(x, text), loaded(x, text)
    assert torch.equal(a.image.tokens, b.image.tokens) and torch.equal(a.text.hidden, b.text.hidden)
    again = create_backbone("fiber-tiny", pretrained=tmp_path, variant="fine_v3").eval()
    with torch.no_grad():
        assert torch.equal(again(x, text).image.tokens, a.image.tokens)


def test_loading_another_model_names_keys(tmp_path: Path) -> None:
    save_pretrained(tiny("fine_v3"), tmp_path)
    with pytest.raises(WeightsMismatchError) as err:
        load_weights(tiny("fine_v2"), tmp_path)
    msg = str(err.value)
    assert "unexpected (6)" in msg and "attn.norm_i2t_i.weight" in msg and str(tmp_path) in msg
    with pytest.raises(WeightsMismatchError, match="shape mismatch"):
        load_weights(tiny("fine_v3", **{"text.vocab_size": 500}), tmp_path)
    result = load_weights(tiny("fine_v2"), tmp_path, strict=False)
    assert len(result["unexpected"]) == 6 and not result["missing"]


def test_rejects_non_safetensors(tmp_path: Path) -> None:
    bad = tmp_path / "weights.pt"
    bad.write_bytes(b"not a pickle you should open")
    with pytest.raises(ValueError, match="safetensors"):
        load_weights(tiny(), bad)


def test_relative_position_table_resize() -> None:
    table = torch.randn(23 * 23, 4)
    assert resize_relative_position_bias_table(table, 12) is table  # unchanged size: identity
    out = resize_relative_position_bias_table(table, 18)
    assert out.shape == (35 * 35, 4)
    const = torch.full((9, 3), 0.25)  # bicubic weights sum to one: constants are preserved
    torch.testing.assert_close(resize_relative_position_bias_table(const, 3), torch.full((25, 3), 0.25))
    # The centre of the table (zero offset) maps to the centre of the resized grid.
    ramp = torch.arange(9.0)[:, None].repeat(1, 2)
    resized = resize_relative_position_bias_table(ramp, 4)
    assert resized.shape == (49, 2) and torch.allclose(resized[24], torch.tensor([4.0, 4.0]), atol=0.3)
    with pytest.raises(ValueError, match="grid"):
        resize_relative_position_bias_table(torch.zeros(10, 2), 3)


def test_resolution_change_on_load(tmp_path: Path) -> None:
    model = tiny("coarse")  # 64 px: window 2
    save_pretrained(model, tmp_path)
    img_96: dict[str, Any] = {"swin.img_size": 96}
    bigger = from_pretrained(tmp_path, **img_96)  # window 3: tables 9 -> 25 rows
    table = bigger.image_encoder.block(0, 0).attn.relative_position_bias_table
    assert table.shape == (25, 1)
    expected = resize_relative_position_bias_table(model.image_encoder.block(0, 0).attn.relative_position_bias_table, 3)
    torch.testing.assert_close(table, expected)
    with torch.no_grad():
        out = bigger(torch.randn(1, 3, 96, 96), make_text([4]))
    assert out.image.grid == (3, 3) and torch.isfinite(out.image.tokens).all()
    with pytest.raises(WeightsMismatchError):
        load_weights(FiberBackbone(bigger.config), tmp_path, resize_rel_pos=False)


def _meta_counts(**overrides: object) -> dict[str, int]:
    with torch.device("meta"):
        model = FiberBackbone(get_config("fiber-base", **overrides))
    return count_parameters(model)


def test_parameter_counts_coarse_match_spec() -> None:
    c384 = _meta_counts()
    assert c384 == {
        "image_unimodal": 86_878_584,
        "image_i2t": 12_607_494,
        "text_unimodal": 124_055_040,
        "text_t2i": 13_397_004,
        "total": 236_938_122,
    }
    c576 = _meta_counts(**{"swin.img_size": 576})
    assert c576["image_unimodal"] == 87_140_280 and c576["total"] == 237_199_818
    with torch.device("meta"):
        model = FiberBackbone(get_config("fiber-base"))
    tables = sum(p.numel() for n, p in model.named_parameters() if n.endswith("relative_position_bias_table"))
    assert tables == 198_904
    unused_ln = sum(p.numel() for n, p in model.named_parameters() if "crossattention_t2i.output.LayerNorm" in n)
    assert unused_ln == 9_216


def test_parameter_counts_fine_match_spec() -> None:
    v2, v3 = _meta_counts(variant="fine_v2"), _meta_counts(variant="fine_v3")
    assert v2["image_unimodal"] == v3["image_unimodal"] == 86_880_120
    assert (v2["image_i2t"], v3["image_i2t"]) == (12_599_302, 12_607_494)
    assert v2["text_t2i"] == v3["text_t2i"] == 13_387_782
    assert (v2["total"], v3["total"]) == (236_922_244, 236_930_436)


LAYOUTS = Path(__file__).resolve().parents[1] / "fixtures" / "official-checkpoint-layout"
COARSE_PREFIXES = ("vit_model.", "text_transformer.")
FINE_PREFIXES = ("fusion_backbone.backbone.body.", "fusion_backbone.language_backbone.body.model.")


@pytest.mark.parametrize(
    "file,overrides,prefixes",
    [
        ("coarse-pretrain.tsv", {}, COARSE_PREFIXES),
        ("coarse-vqa.tsv", {"swin.img_size": 576}, COARSE_PREFIXES),
        ("fine-mixed-nococo-flickr-objects365.tsv", {"variant": "fine_v2"}, FINE_PREFIXES),
        ("fine-refcoco.tsv", {"variant": "fine_v3"}, FINE_PREFIXES),
    ],
)
def test_key_layout_matches_official_names(file: str, overrides: dict, prefixes: tuple[str, str]) -> None:
    """Our keys and shapes equal the official backbone keys after swapping the two top-level prefixes."""
    table = LAYOUTS / file
    if not table.exists():
        pytest.skip("reference key layout not available")
    official = {}
    for line in table.read_text().splitlines():
        key, shape = line.split("\t")[:2]
        if key.startswith(prefixes) and ".pooler." not in key:
            official[key] = tuple(int(v) for v in shape.strip("()").split(",") if v.strip())
    buffers = ("relative_position_index", "attn_mask", "position_ids")
    official = {k: v for k, v in official.items() if not k.endswith(buffers) and ".fpn." not in k}
    with torch.device("meta"):
        model = FiberBackbone(get_config("fiber-base", **overrides))
    ours = {
        k.replace("image_encoder.", prefixes[0], 1).replace("text_encoder.", prefixes[1], 1): tuple(p.shape)
        for k, p in model.state_dict().items()
    }
    assert ours == official
