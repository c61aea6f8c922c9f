"""Official FIBER checkpoint layouts -> our backbone and back (docs/reference/architecture.md §2.2, §11, §13)."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from convert_helpers import LAYOUTS, backbone_entries, distinct_state, same_values, synth_official

from fiber_backbones import FiberBackbone
from fiber_backbones.convert import (
    QUEUE_BUFFERS,
    CheckpointFormatError,
    _target_shapes,
    convert_official_backbone,
    official_target_config,
    read_official_checkpoint,
    to_official_backbone,
    unwrap_state_dict,
)


def _strict_load(report) -> None:
    with torch.device("meta"):
        model = FiberBackbone(report.config)
    model.load_state_dict(report.backbone_state, strict=True, assign=True)


@pytest.mark.parametrize("stem", sorted(LAYOUTS))
def test_every_official_layout_converts_to_our_key_set(stem: str) -> None:
    kind, variant, size = LAYOUTS[stem]
    official = synth_official(stem)
    rep = convert_official_backbone(official, target_variant=variant)
    assert rep.source == kind
    assert rep.config.variant == variant
    if variant == "coarse":
        assert rep.config.swin.img_size == size  # resolution taken from the table size (23² or 35² rows)
    # every official key is accounted for exactly once
    accounted = set(rep.key_map) | set(rep.rest) | set(rep.dropped)
    assert accounted == set(official)
    assert not set(rep.key_map) & set(rep.dropped) and not set(rep.rest) & (set(rep.key_map) | set(rep.dropped))
    assert all(reason.strip() for reason in rep.dropped.values())
    # our key set and shapes, strict load
    target = _target_shapes(rep.config)
    assert set(rep.backbone_state) == set(target)
    assert all(rep.backbone_state[k].shape == s for k, (s, _) in target.items())
    assert rep.initialised == [] and rep.resized == {}
    _strict_load(rep)
    # values land where they should: every mapped tensor is the official one (distinct constants / random tables)
    for off_key, ours in rep.key_map.items():
        assert same_values(rep.backbone_state[ours], official[off_key]), (off_key, ours)
    img, txt = (
        ("vit_model.", "text_transformer.")
        if kind == "coarse"
        else (
            "fusion_backbone.backbone.body.",
            "fusion_backbone.language_backbone.body.model.",
        )
    )
    spot = {
        f"{img}layers.2.blocks.14.attn.qkv_text_i2t.weight": "image_encoder.layers.2.blocks.14.attn.qkv_text_i2t.weight",
        f"{img}layers.1.downsample.reduction.weight": "image_encoder.layers.1.downsample.reduction.weight",
        f"{txt}encoder.layer.10.crossattention_t2i.self.key.weight": "text_encoder.encoder.layer.10.crossattention_t2i.self.key.weight",
        f"{img}layers.3.blocks.1.attn.relative_position_bias_table": "image_encoder.layers.3.blocks.1.attn.relative_position_bias_table",
    }
    for off_key, ours in spot.items():
        assert rep.backbone_state[ours] is official[off_key]
    # the non-backbone entries are returned untouched
    for key, value in rep.rest.items():
        assert value is official[key]
        assert not key.startswith((img, txt))


def test_coarse_dropped_keys_and_reasons() -> None:
    official = synth_official("coarse-pretrain")
    rep = convert_official_backbone(official, target_variant="coarse")
    dropped = rep.dropped
    assert set(QUEUE_BUFFERS) <= set(dropped)
    assert sum("relative_position_index" in k for k in dropped) == 24
    assert sum(k.endswith("attn_mask") for k in dropped) == 11
    assert "text_transformer.embeddings.position_ids" in dropped
    assert (
        "text_transformer.pooler.dense.weight" in dropped and "§11" in dropped["text_transformer.pooler.dense.weight"]
    )
    assert len(dropped) == 7 + 24 + 11 + 1 + 2
    # the coarse variant keeps the unused gates / cross LayerNorms (they exist in our coarse layout)
    assert rep.key_map["text_transformer.encoder.layer.0.alpha_t2i"] == "text_encoder.encoder.layer.0.alpha_t2i"
    assert sorted(rep.rest)[:3] == [
        "cross_modal_image_pooler.dense.bias",
        "cross_modal_image_pooler.dense.weight",
        "cross_modal_image_pooler_itc.dense.bias",
    ]


def test_coarse_to_fine_v2_drops_and_initialises_per_spec() -> None:
    official = synth_official("coarse-pretrain")
    rep = convert_official_backbone(official, target_variant="fine_v2")
    _strict_load(rep)
    d = rep.dropped
    assert "§11" in d["text_transformer.encoder.layer.3.alpha_t2i"]
    assert "text_transformer.encoder.layer.6.alpha_t2i" in rep.key_map  # fused layers keep their gate
    assert "never used" in d["text_transformer.encoder.layer.7.crossattention_t2i.output.LayerNorm.weight"]
    assert "v2" in d["vit_model.layers.2.blocks.15.attn.norm_i2t_i.weight"]
    assert "fine model" in d["vit_model.norm.weight"]
    assert sum(".alpha_t2i" in k for k in d) == 6
    assert sum("crossattention_t2i.output.LayerNorm" in k for k in d) == 12
    assert sum("norm_i2t_i" in k for k in d) == 12
    # the fine stage norms are new: LayerNorm (1, 0), docs/reference/architecture.md §13.3
    assert rep.initialised == sorted(f"image_encoder.norm{i}.{p}" for i in (1, 2, 3) for p in ("weight", "bias"))
    for i, c in ((1, 256), (2, 512), (3, 1024)):
        assert torch.equal(rep.backbone_state[f"image_encoder.norm{i}.weight"], torch.ones(c))
        assert torch.equal(rep.backbone_state[f"image_encoder.norm{i}.bias"], torch.zeros(c))


def test_fine_to_coarse_initialises_missing_coarse_parameters() -> None:
    official = {f"module.{k}": v for k, v in synth_official("fine-refcoco").items()}
    rep = convert_official_backbone(official, target_variant="coarse")
    _strict_load(rep)
    assert "fusion_backbone.backbone.body.norm1.weight" in rep.dropped
    assert len(rep.initialised) == 2 + 6 + 12  # final norm, gates of layers 0-5, cross-attention LayerNorms
    assert torch.equal(rep.backbone_state["text_encoder.encoder.layer.2.alpha_t2i"], torch.zeros(1))
    assert torch.equal(rep.backbone_state["image_encoder.norm.weight"], torch.ones(1024))
    assert "gate 0" in rep.init_rules["text_encoder.encoder.layer.2.alpha_t2i"]


def _bicubic_reference(table: torch.Tensor, new_side: int) -> torch.Tensor:
    rows, heads = table.shape
    side = math.isqrt(rows)
    grid = table.t().reshape(1, heads, side, side)
    out = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)
    return out.reshape(heads, new_side * new_side).t()


def test_384_checkpoint_converted_for_576_resizes_tables_bicubically() -> None:
    official = synth_official("coarse-pretrain", seed=3)
    rep = convert_official_backbone(official, target_variant="coarse", image_size=576)
    _strict_load(rep)
    assert rep.config.swin.img_size == 576
    assert len(rep.resized) == 24 and set(rep.resized.values()) == {(529, 1225)}
    for s, b, heads in ((0, 1, 4), (2, 7, 16), (3, 0, 32)):
        ours = rep.backbone_state[f"image_encoder.layers.{s}.blocks.{b}.attn.relative_position_bias_table"]
        src = official[f"vit_model.layers.{s}.blocks.{b}.attn.relative_position_bias_table"]
        assert ours.shape == (1225, heads)
        torch.testing.assert_close(ours, _bicubic_reference(src, 35), rtol=0, atol=1e-6)
    assert "resized" in rep.summary() and len(rep.summary()["resized"]) == 24


def test_576_checkpoint_converted_for_the_fine_model_shrinks_tables_to_window_12() -> None:
    official = synth_official("coarse-vqa", seed=4)
    rep = convert_official_backbone(official, target_variant="fine_v3")
    _strict_load(rep)
    assert set(rep.resized.values()) == {(1225, 529)} and len(rep.resized) == 24
    src = official["vit_model.layers.2.blocks.16.attn.relative_position_bias_table"]
    ours = rep.backbone_state["image_encoder.layers.2.blocks.16.attn.relative_position_bias_table"]
    torch.testing.assert_close(ours, _bicubic_reference(src, 23), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("stem", "variant"),
    [
        ("coarse-pretrain", "coarse"),
        ("coarse-vqa", "coarse"),
        ("fine-mixed-nococo-flickr-objects365", "fine_v2"),
        ("fine-refcoco", "fine_v3"),
    ],
)
def test_round_trip_ours_official_ours_is_identity(stem: str, variant: str) -> None:
    size = LAYOUTS[stem][2]
    config = official_target_config(variant, image_size=size)
    ours = distinct_state(_target_shapes(config))
    official = to_official_backbone(ours, config, complete=True)
    # exactly the official backbone key set, shapes and dtypes (buffers and the unused pooler included)
    expected = backbone_entries(stem)
    assert set(official) == set(expected)
    for key, (shape, dtype) in expected.items():
        assert tuple(official[key].shape) == shape, key
        assert official[key].dtype == dtype, key
    back = convert_official_backbone(official, target_variant=variant, image_size=size)
    assert set(back.backbone_state) == set(ours)
    assert all(same_values(back.backbone_state[k], v) for k, v in ours.items())
    assert back.initialised == []
    # without `complete`, only our parameters are renamed
    assert len(to_official_backbone(ours, config)) == len(ours)


def test_round_trip_official_buffers_are_the_standard_ones() -> None:
    config = official_target_config("coarse", image_size=384)
    official = to_official_backbone(distinct_state(_target_shapes(config)), "coarse", complete=True)
    index = official["vit_model.layers.0.blocks.0.attn.relative_position_index"]
    # standard Swin index: token (0,0) vs itself is the table centre, (0,0) vs (w-1,w-1) the first row
    w = 12
    assert (
        index[0, 0] == (w - 1) * (2 * w - 1) + (w - 1) and index[w * w - 1, 0] == (2 * w - 2) * (2 * w - 1) + 2 * w - 2
    )
    mask = official["vit_model.layers.0.blocks.1.attn_mask"]
    assert set(mask.unique().tolist()) == {-100.0, 0.0}
    assert torch.equal(mask[0], torch.zeros(144, 144))  # the first window contains a single region
    assert torch.equal(official["text_transformer.embeddings.position_ids"], torch.arange(514)[None])


def test_to_official_rejects_wrong_state() -> None:
    config = official_target_config("fine_v2")
    ours = distinct_state(_target_shapes(config))
    with pytest.raises(ValueError, match="does not match a coarse"):
        to_official_backbone(ours, "coarse")
    with pytest.raises(ValueError, match="no official counterpart"):
        to_official_backbone(ours, official_target_config("default"))


# ------------------------------------------------------------------------------------------ containers / files
def test_lightning_and_detector_containers_from_files(tmp_path: Path) -> None:
    coarse = synth_official("coarse-nlvr2")
    path = tmp_path / "nlvr2.ckpt"
    torch.save({"state_dict": coarse, "epoch": 3, "global_step": 100, "hyper_parameters": {"lr": 1e-4}}, path)
    state, container = read_official_checkpoint(path)
    assert container == "lightning" and set(state) == set(coarse)
    assert torch.equal(state["vit_model.patch_embed.proj.weight"], coarse["vit_model.patch_embed.proj.weight"])

    fine = synth_official("fine-refcoco")
    ema = synth_official("fine-refcoco", offset=10_000.0)
    path = tmp_path / "refcoco.pth"
    torch.save(
        {
            "model": {f"module.{k}": v for k, v in fine.items()},
            "model_ema": {f"module.{k}": v for k, v in ema.items()},
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]},
            "iteration": 7,
        },
        path,
    )
    state, container = read_official_checkpoint(path)
    assert container == "detector" and set(state) == set(fine)
    rep = convert_official_backbone(state, target_variant="fine_v3")
    key = "fusion_backbone.backbone.body.layers.2.blocks.3.mlp.fc1.weight"
    assert torch.equal(rep.backbone_state["image_encoder.layers.2.blocks.3.mlp.fc1.weight"], fine[key])
    state_ema, container = read_official_checkpoint(path, ema=True)
    assert container == "detector-ema"
    assert torch.equal(state_ema[key], ema[key]) and not torch.equal(state_ema[key], fine[key])

    bare = tmp_path / "bare.pt"
    torch.save({k: v for k, v in fine.items()}, bare)
    assert read_official_checkpoint(bare)[1] == "bare"
    with pytest.raises(CheckpointFormatError, match="no 'model_ema'"):
        read_official_checkpoint(bare, ema=True)


def test_resnet_state_dict_is_rejected_naming_missing_families() -> None:
    resnet = {
        "conv1.weight": torch.zeros(64, 3, 7, 7),
        "bn1.weight": torch.ones(64),
        "bn1.running_mean": torch.zeros(64),
        "layer1.0.conv1.weight": torch.zeros(64, 64, 3, 3),
        "fc.weight": torch.zeros(1000, 2048),
    }
    with pytest.raises(CheckpointFormatError) as err:
        convert_official_backbone(resnet)
    msg = str(err.value)
    assert "not an official FIBER checkpoint" in msg
    assert "Swin image tower ('vit_model.*')" in msg and "RoBERTa text tower ('text_transformer.*')" in msg
    assert "fusion_backbone.backbone.body." in msg and "conv1.weight" in msg


def test_half_a_checkpoint_is_rejected() -> None:
    official = {k: v for k, v in synth_official("coarse-nlvr2").items() if not k.startswith("text_transformer.")}
    with pytest.raises(CheckpointFormatError, match=r"RoBERTa text tower \('text_transformer\.\*'\)"):
        convert_official_backbone(official)
    with pytest.raises(CheckpointFormatError, match=r"no Swin image tower weights for a fine checkpoint"):
        convert_official_backbone(synth_official("coarse-nlvr2"), source="fine")


def test_unrecognised_missing_and_misshaped_backbone_keys_raise() -> None:
    official = synth_official("coarse-nlvr2")
    extra = dict(official)
    extra["vit_model.layers.0.blocks.0.attn.mystery"] = torch.zeros(3)
    with pytest.raises(CheckpointFormatError, match="unrecognised coarse backbone keys.*attn.mystery"):
        convert_official_backbone(extra)
    missing = dict(official)
    del missing["text_transformer.encoder.layer.4.intermediate.dense.weight"]
    with pytest.raises(CheckpointFormatError, match=r"lacks 1 weights.*layer\.4\.intermediate\.dense\.weight"):
        convert_official_backbone(missing)
    wrong = dict(official)
    wrong["vit_model.layers.1.blocks.0.attn.qkv.weight"] = torch.zeros(10, 256)
    with pytest.raises(CheckpointFormatError, match=r"layers\.1\.blocks\.0\.attn\.qkv\.weight: shape \(10, 256\)"):
        convert_official_backbone(wrong)


def test_truncated_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "cut.ckpt"
    torch.save({"state_dict": {"vit_model.norm.weight": torch.randn(1024)}}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointFormatError, match="truncated or corrupt"):
        read_official_checkpoint(path)
    st = tmp_path / "cut.safetensors"
    st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(CheckpointFormatError, match="truncated or corrupt"):
        read_official_checkpoint(st)


def _leave_marker(path: str) -> None:
    Path(path).write_text("code ran")


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (_leave_marker, (self.marker,))


@pytest.mark.parametrize("fmt", ["torch-zip", "raw-pickle"])
def test_crafted_pickle_is_refused_without_running_code(tmp_path: Path, fmt: str) -> None:
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.ckpt"
    payload = {"state_dict": {"vit_model.norm.weight": torch.zeros(4)}, "callback": _Evil(str(marker))}
    if fmt == "torch-zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(CheckpointFormatError, match="refusing to load"):
        read_official_checkpoint(path)
    assert not marker.exists()


def test_unwrap_rejects_non_tensor_weights() -> None:
    with pytest.raises(CheckpointFormatError, match="non-tensor entries"):
        unwrap_state_dict({"state_dict": {"a": torch.zeros(1), "b": "text"}}, where="x.ckpt")
    with pytest.raises(CheckpointFormatError, match="expected a dict"):
        unwrap_state_dict([1, 2], where="x.ckpt")
