"""FiberFPNBackbone in torchvision's FCOS / RetinaNet / Faster R-CNN, including a short FCOS training run."""

from __future__ import annotations

import statistics
from typing import cast

import pytest
import torch
from adapters_helpers import gate_grads, make_text, rectangles, set_gates, tiny_fine

pytest.importorskip("torchvision", reason="the torchvision adapter needs torchvision")

from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from fiber_backbones import FiberBackbone
from fiber_backbones.adapters import FiberVisionBackbone, ShapeSpec, find_vision_backbone
from fiber_backbones.adapters.torchvision import OFFICIAL_FPN_PREFIX, FiberFPNBackbone

H, W = 64, 96


def _fpn(out_channels: int = 32, **kwargs) -> FiberFPNBackbone:
    return FiberFPNBackbone(tiny_fine(), out_channels=out_channels, **kwargs)


def test_fpn_levels_match_output_shape() -> None:
    backbone = _fpn().eval()
    assert backbone.out_channels == 32 and backbone.size_divisibility == 32
    shapes = backbone.output_shape()
    assert list(shapes) == ["0", "1", "2", "p6", "p7"]
    assert [s.stride for s in shapes.values()] == [8, 16, 32, 64, 128]
    with torch.no_grad():
        feats = backbone(torch.randn(2, 3, H, W))
    assert list(feats) == list(shapes)
    for key, fmap in feats.items():
        stride = shapes[key].stride
        assert stride is not None
        assert fmap.shape == (2, 32, -(-H // stride), -(-W // stride)), key


def test_p6_is_computed_from_p5_not_c5() -> None:
    """Spec docs/reference/training.md §3.2: P6 = Conv3x3/2 on the FPN output P5 (torchvision's use_P5 branch)."""
    backbone = _fpn().eval()
    with torch.no_grad():
        feats = backbone(torch.randn(1, 3, H, W))
        p6 = cast(LastLevelP6P7, backbone.fpn.extra_blocks).p6(feats["2"])
    torch.testing.assert_close(feats["p6"], p6)


def test_maxpool_extra_block_and_wrapping_a_view() -> None:
    view = FiberVisionBackbone(tiny_fine(), out_features=["stage2", "stage3"], feature_names=["a", "b"])
    backbone = FiberFPNBackbone(view, out_channels=16, extra_blocks="maxpool").eval()
    assert isinstance(backbone.fpn.extra_blocks, LastLevelMaxPool)
    assert backbone.output_shape() == {
        "a": ShapeSpec(16, stride=16),
        "b": ShapeSpec(16, stride=32),
        "pool": ShapeSpec(16, stride=64),
    }
    with torch.no_grad():
        feats = backbone(torch.randn(1, 3, H, W))
    assert {k: tuple(v.shape[-2:]) for k, v in feats.items()} == {"a": (4, 6), "b": (2, 3), "pool": (1, 2)}
    with pytest.raises(ValueError, match="extra_blocks"):
        _fpn(extra_blocks="p5p6")
    with pytest.raises(ValueError, match="FiberVisionBackbone"):
        FiberFPNBackbone(view, fuse=False)


def test_out_features_subset_keeps_pyramid_order() -> None:
    backbone = FiberFPNBackbone(tiny_fine(), out_features=["stage3", "stage2"], out_channels=16).eval()
    assert {k: s.stride for k, s in backbone.output_shape().items()} == {"0": 16, "1": 32, "p6": 64, "p7": 128}
    assert backbone.body.out_indices == (2, 3)
    with pytest.raises(ValueError, match="stage7"):
        FiberFPNBackbone(tiny_fine(), out_features=["stage7"])


def test_from_name_builds_a_registered_variant() -> None:
    backbone = FiberFPNBackbone.from_name("fiber-tiny", out_channels=16, extra_blocks=None)
    assert cast(FiberBackbone, backbone.body.backbone).config.variant == "fine_v2"
    assert list(backbone.output_shape()) == ["0", "1", "2"]


@pytest.mark.parametrize("arch", ["fcos", "retinanet", "faster_rcnn"])
def test_torchvision_detectors_accept_the_backbone_unchanged(arch: str) -> None:
    backbone = _fpn()
    if arch == "fcos":
        detector = FCOS(backbone, num_classes=4, min_size=H, max_size=W)
    elif arch == "retinanet":
        detector = RetinaNet(backbone, num_classes=4, min_size=H, max_size=W)
    else:
        detector = FasterRCNN(
            backbone, num_classes=4, min_size=H, max_size=W, rpn_batch_size_per_image=32, box_batch_size_per_image=32
        )
    images, targets = rectangles(2, H, W)
    detector.train()
    with find_vision_backbone(detector).bind_text(make_text([4])):
        losses = detector(images, targets)
    total = sum(losses.values(), torch.zeros(()))
    assert torch.isfinite(total)
    total.backward()
    # the fused path ran: the image-side gates (zero-initialised) receive gradients from the detection loss
    i2t = gate_grads(detector, "alpha_i2t")
    assert len(i2t) == 3 and all(g is not None and g.abs().sum() > 0 for g in i2t)
    detector.eval()
    with torch.no_grad():
        detections = detector(images)
    assert len(detections) == 2
    assert all(d["boxes"].shape[-1] == 4 and d["boxes"].shape[0] == d["labels"].shape[0] for d in detections)


def test_unbound_detector_is_a_pure_vision_model() -> None:
    """No bound text: the text tower and the gates take no part in the loss."""
    backbone = _fpn()
    detector = FCOS(backbone, num_classes=4, min_size=H, max_size=W).train()
    images, targets = rectangles(2, H, W)
    sum(detector(images, targets).values(), torch.zeros(())).backward()
    assert all(g is None for g in gate_grads(detector))
    assert backbone.last_output is not None and backbone.last_output.text is None
    assert cast(FiberBackbone, backbone.body.backbone).image_encoder.patch_embed.proj.weight.grad is not None


def test_bound_prompt_changes_fpn_features_once_gates_are_nonzero() -> None:
    backbone = _fpn().eval()
    set_gates(backbone, 0.5)
    x = torch.randn(2, 3, H, W)
    with torch.no_grad():
        plain = backbone(x)
        with backbone.bind_text(make_text([5, 2])):
            assert backbone.text is not None
            bound = backbone(x)
            assert backbone.last_output is not None
            text_out = backbone.last_output.text
        assert backbone.text is None
    for key in plain:  # top-down FPN: every level sees the fused stage2/stage3 maps
        assert (bound[key] - plain[key]).abs().max() > 1e-4, key
    assert text_out is not None and text_out.hidden.shape == (2, 5, 64)


@pytest.mark.slow
def test_fcos_training_loss_falls_with_a_bound_prompt() -> None:
    """A few dozen AdamW steps of FCOS + fiber-tiny on coloured rectangles, one class prompt for the dataset."""
    torch.manual_seed(0)
    images, targets = rectangles(8, H, W, seed=0)
    backbone = _fpn()
    detector = FCOS(backbone, num_classes=4, min_size=H, max_size=W).train()
    optimizer = torch.optim.AdamW(detector.parameters(), lr=1e-3, weight_decay=0.0)
    prompt = make_text([6])  # one prompt broadcast to every image (closed-set detection)
    losses, giou = [], []
    for step in range(30):
        i = (step * 4) % len(images)
        with backbone.bind_text(prompt):
            parts = detector(images[i : i + 4], targets[i : i + 4])
        loss = sum(parts.values(), torch.zeros(()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        giou.append(parts["bbox_regression"].item())
    first, last = statistics.mean(losses[:5]), statistics.mean(losses[-5:])
    assert all(torch.isfinite(torch.tensor(losses)))
    assert last < 0.7 * first, f"loss did not fall: first-5 mean {first:.3f}, last-5 mean {last:.3f}"
    # not only the classification prior: the boxes themselves improve (GIoU loss, ~0.9 -> ~0.25 measured)
    assert statistics.mean(giou[-5:]) < 0.6 * statistics.mean(giou[:5]), giou
    # the gates moved away from zero: the detector uses fused features
    assert max(abs(p.item()) for n, p in detector.named_parameters() if "alpha_" in n) > 0


def test_example_runs_with_tiny(capsys: pytest.CaptureFixture[str]) -> None:
    """examples/torchvision_fcos.py --tiny (the documented CPU smoke run), shortened to 3 steps."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "torchvision_fcos.py"
    spec = importlib.util.spec_from_file_location("torchvision_fcos_example", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    previous = torch.get_num_threads()
    try:
        result = module.main(["--tiny", "--steps", "3", "--batch-size", "2"])
    finally:
        torch.set_num_threads(previous)
    assert set(result) == {"first_loss", "last_loss"} and all(torch.isfinite(torch.tensor(list(result.values()))))
    out = capsys.readouterr().out
    assert "3 steps in" in out and "text features of the last batch: (2, 6, 64)" in out


def _official_fpn_state(backbone: FiberFPNBackbone, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the official checkpoint's FPN names (layout of fine-*.tsv), for fiber-tiny sizes."""
    g = torch.Generator().manual_seed(seed)
    c = backbone.out_channels
    state = {}
    for stage, ch in zip((1, 2, 3), (64, 128, 256)):
        state[f"fpn_inner{stage + 1}.weight"] = torch.randn(c, ch, 1, 1, generator=g) * 0.1
        state[f"fpn_layer{stage + 1}.weight"] = torch.randn(c, c, 3, 3, generator=g) * 0.1
        state[f"fpn_inner{stage + 1}.bias"] = torch.randn(c, generator=g)
        state[f"fpn_layer{stage + 1}.bias"] = torch.randn(c, generator=g)
    for block in ("p6", "p7"):
        state[f"top_blocks.{block}.weight"] = torch.randn(c, c, 3, 3, generator=g) * 0.1
        state[f"top_blocks.{block}.bias"] = torch.randn(c, generator=g)
    return {OFFICIAL_FPN_PREFIX + k: v for k, v in state.items()}


def _reference_fpn(maps: list[torch.Tensor], sd: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Spec docs/reference/training.md §3.2 written out with F.conv2d on the official parameter names."""
    import torch.nn.functional as F

    def w(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return sd[f"{OFFICIAL_FPN_PREFIX}{name}.weight"], sd[f"{OFFICIAL_FPN_PREFIX}{name}.bias"]

    laterals = [F.conv2d(x, *w(f"fpn_inner{i + 2}")) for i, x in enumerate(maps)]
    inner = laterals[-1]
    outs = [F.conv2d(inner, *w(f"fpn_layer{len(maps) + 1}"), padding=1)]
    for i in range(len(maps) - 2, -1, -1):
        inner = laterals[i] + F.interpolate(inner, size=laterals[i].shape[-2:], mode="nearest")
        outs.insert(0, F.conv2d(inner, *w(f"fpn_layer{i + 2}"), padding=1))
    p6 = F.conv2d(outs[-1], *w("top_blocks.p6"), stride=2, padding=1)
    p7 = F.conv2d(F.relu(p6), *w("top_blocks.p7"), stride=2, padding=1)
    return [*outs, p6, p7]


def test_official_fpn_weights_reproduce_the_spec_fpn() -> None:
    backbone = _fpn().eval()
    state = _official_fpn_state(backbone)
    backbone.load_official_fpn({**state, "unrelated.key": torch.zeros(1)})
    x = torch.randn(1, 3, H, W)
    with torch.no_grad():
        got = backbone(x)
        want = _reference_fpn(list(backbone.body(x).values()), state)
    assert len(got) == len(want) == 5
    for (key, g), r in zip(got.items(), want):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5, msg=key)


def test_official_fpn_loading_errors_name_the_key() -> None:
    backbone = _fpn()
    state = _official_fpn_state(backbone)
    missing = {k: v for k, v in state.items() if "fpn_layer3" not in k}
    with pytest.raises(KeyError, match="fpn_layer3.weight"):
        backbone.load_official_fpn(missing)
    with pytest.raises(ValueError, match=r"fpn_inner2.weight has shape \(32, 64, 1, 1\).*\(16, 64, 1, 1\)"):
        _fpn(out_channels=16).load_official_fpn(state)
    with pytest.raises(ValueError, match="p6p7"):
        _fpn(extra_blocks="maxpool").official_fpn_key_map()
