"""FiberVisionBackbone: feature contract, uni-modal identity, text binding and broadcast, last_output."""

from __future__ import annotations

import warnings

import pytest
import torch
from adapters_helpers import make_text, set_gates, tiny_fine

from fiber_backbones import TextInputs, create_backbone
from fiber_backbones.adapters import FiberVisionBackbone, ShapeSpec, broadcast_text, find_vision_backbone

H, W = 64, 96  # non-square, multiples of 32


@pytest.fixture(scope="module")
def backbone():
    model = tiny_fine()
    set_gates(model, 0.5)
    return model


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, H, W, generator=torch.Generator().manual_seed(1))


def test_feature_contract_matches_forward(backbone, images) -> None:
    view = FiberVisionBackbone(backbone)
    assert view.out_feature_names == ("stage1", "stage2", "stage3")
    assert view.out_indices == (1, 2, 3)
    assert view.channels() == [64, 128, 256] and view.reduction() == [8, 16, 32]
    assert view.size_divisibility == 32
    assert view.padding_constraints == {"size_divisibility": 32, "square_size": 0}
    assert view.output_shape() == {
        "stage1": ShapeSpec(channels=64, stride=8),
        "stage2": ShapeSpec(channels=128, stride=16),
        "stage3": ShapeSpec(channels=256, stride=32),
    }
    assert [f["num_chs"] for f in view.feature_info] == [64, 128, 256]
    assert [f["index"] for f in view.feature_info] == [1, 2, 3]
    with torch.no_grad():
        feats = view(images)
        as_tuple = view.forward_tuple(images)
    assert list(feats) == ["stage1", "stage2", "stage3"]
    for (name, fmap), shape in zip(feats.items(), view.output_shape().values()):
        assert shape.stride is not None
        assert fmap.shape == (2, shape.channels, H // shape.stride, W // shape.stride), name
    assert all(torch.equal(a, b) for a, b in zip(feats.values(), as_tuple))


def test_unbound_view_is_the_unimodal_swin(backbone, images) -> None:
    """Without text the maps equal the stand-alone Swin tower's (its own forward loop, never fusing)."""
    view = FiberVisionBackbone(backbone)
    with torch.no_grad():
        feats = view(images)
        _, _, swin_pyramid = backbone.image_encoder(images)
    for got, want in zip(feats.values(), swin_pyramid):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert view.last_output is not None and view.last_output.text is None and not view.last_output.fused


def test_zero_gates_bound_equals_unbound(images) -> None:
    """Gates at their zero init: binding text leaves the image maps unchanged (docs/reference/architecture.md §7 identity)."""
    view = FiberVisionBackbone(tiny_fine())
    with torch.no_grad():
        plain = view(images)
        with view.bind_text(make_text([5, 3])):
            bound = view(images)
    for key in plain:
        torch.testing.assert_close(bound[key], plain[key], atol=1e-5, rtol=0)


def test_bound_prompt_changes_fused_stages_only(backbone, images) -> None:
    """With non-zero gates, stage2/stage3 (which hold fused blocks) change; stage1 (no fusion) does not."""
    view = FiberVisionBackbone(backbone)
    text = make_text([5, 3])
    with torch.no_grad():
        plain = view(images)
        with view.bind_text(text):
            bound = view(images)
            out = view.last_output
        other = make_text([6, 6], seed=3)
        with view.bind_text(other):
            bound_other = view(images)
    torch.testing.assert_close(bound["stage1"], plain["stage1"], atol=1e-5, rtol=0)
    for key in ("stage2", "stage3"):
        assert (bound[key] - plain[key]).abs().max() > 1e-3, key
        assert (bound[key] - bound_other[key]).abs().max() > 1e-3, key
    assert out is not None and out.fused and out.text is not None
    assert out.text.hidden.shape == (2, 5, backbone.text_dim)
    assert torch.equal(out.text.mask, text.attention_mask)
    # and the maps are exactly the backbone's own fused pyramid for the same text
    with torch.no_grad():
        direct = backbone(images, text).image.pyramid
    for got, want in zip(bound.values(), direct):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_single_prompt_broadcasts_to_the_batch(backbone, images) -> None:
    view = FiberVisionBackbone(backbone)
    one = make_text([4])
    repeated = TextInputs(one.input_ids.repeat(2, 1), one.attention_mask.repeat(2, 1))
    with torch.no_grad():
        with view.bind_text(one):
            a = view(images)
            assert view.last_output is not None and view.last_output.text is not None
            assert view.last_output.text.hidden.shape[0] == 2
        with view.bind_text(repeated):
            b = view(images)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)


def test_per_image_prompts_follow_image_order(backbone, images) -> None:
    """Row i of a batch bound with prompts [p0, p1] equals image i alone bound with p_i."""
    view = FiberVisionBackbone(backbone)
    text = make_text([5, 3])
    with torch.no_grad(), view.bind_text(text):
        batch = view(images)
    for i in range(2):
        with torch.no_grad(), view.bind_text(text.index_select(torch.tensor([i]))):
            single = view(images[i : i + 1])
        for key in batch:
            torch.testing.assert_close(batch[key][i : i + 1], single[key], atol=1e-5, rtol=0)


def test_batch_size_is_checked_at_call_time(backbone, images) -> None:
    view = FiberVisionBackbone(backbone)
    view.text = make_text([3, 3, 3])  # binding itself is accepted; the batch is only known at call time
    with pytest.raises(ValueError, match="3 rows but the batch has 2 images"), torch.no_grad():
        view(images)
    with pytest.raises(ValueError, match="3 rows but the batch has 2 images"):
        broadcast_text(make_text([3, 3, 3]), 2)


def test_bind_text_restores_previous_binding(backbone) -> None:
    view = FiberVisionBackbone(backbone)
    outer, inner = make_text([2]), make_text([3])
    assert view.text is None
    with view.bind_text(outer) as bound_view:
        assert bound_view is view and view.text is outer
        with view.bind_text(inner):
            assert view.text is inner
        assert view.text is outer
        with pytest.raises(RuntimeError), view.bind_text(None):
            assert view.text is None
            raise RuntimeError("detector failed")
        assert view.text is outer
    assert view.text is None
    view.text = inner
    view.clear_text()
    assert view.text is None
    with pytest.raises(TypeError, match="TextInputs"):
        view.text = torch.ones(1, 3, dtype=torch.long)  # pyright: ignore[reportAttributeAccessIssue]  # wrong type on purpose


def test_fuse_false_gives_unimodal_maps_with_text_features(backbone, images) -> None:
    view = FiberVisionBackbone(backbone, fuse=False)
    with torch.no_grad():
        plain = view(images)
        with view.bind_text(make_text([4, 2])):
            bound = view(images)
    for key in plain:
        torch.testing.assert_close(bound[key], plain[key], atol=1e-5, rtol=0)
    assert view.last_output is not None
    assert view.last_output.text is not None and not view.last_output.fused


def test_keep_last_output_false(backbone, images) -> None:
    view = FiberVisionBackbone(backbone, keep_last_output=False)
    with torch.no_grad():
        view(images)
    assert view.last_output is None


def test_out_features_selection_and_renaming(backbone, images) -> None:
    view = FiberVisionBackbone(backbone, out_features=["stage3", "stage2"], feature_names=["res5", "res4"])
    # each key stays paired with its map, and the outputs come in pyramid order
    assert view.out_feature_names == ("res4", "res5")
    assert view.out_indices == (2, 3)
    assert view.output_shape() == {"res4": ShapeSpec(128, stride=16), "res5": ShapeSpec(256, stride=32)}
    with torch.no_grad():
        feats = view(images)
        full = FiberVisionBackbone(backbone)(images)
    assert torch.equal(feats["res4"], full["stage2"]) and torch.equal(feats["res5"], full["stage3"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"out_features": ["stage9"]}, "stage9"),
        ({"out_features": ["stage1", "stage1"]}, "distinct"),
        ({"out_features": []}, "distinct"),
        ({"feature_names": ["a", "b"]}, "3 distinct keys"),
    ],
)
def test_bad_feature_selection_is_rejected(backbone, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        FiberVisionBackbone(backbone, **kwargs)


def test_rejects_non_backbones() -> None:
    with pytest.raises(TypeError, match="FusionBackbone"):
        FiberVisionBackbone(torch.nn.Linear(2, 2))  # pyright: ignore[reportArgumentType]  # wrong type on purpose


def test_coarse_variant_warns_about_fixed_input_size() -> None:
    with pytest.warns(UserWarning, match="64x64 inputs"):
        FiberVisionBackbone(create_backbone("fiber-tiny", variant="coarse"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FiberVisionBackbone(tiny_fine())


def test_find_vision_backbone(backbone) -> None:
    view = FiberVisionBackbone(backbone)
    detector = torch.nn.Sequential(torch.nn.Identity(), torch.nn.ModuleDict({"backbone": view}))
    assert find_vision_backbone(detector) is view
    with pytest.raises(LookupError, match="Sequential"):
        find_vision_backbone(torch.nn.Sequential(torch.nn.Identity()))


def test_state_dict_is_the_backbones_under_a_prefix(backbone) -> None:
    view = FiberVisionBackbone(backbone)
    keys = set(view.state_dict())
    assert keys == {f"backbone.{k}" for k in backbone.state_dict()}
