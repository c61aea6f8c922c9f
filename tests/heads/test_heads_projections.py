"""CrossModalProjection, reference init, and the structural contract (any object with the right attributes)."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest
import torch

import fiber_heads
from fiber_heads import (
    ContrastiveHead,
    CrossModalProjection,
    MaskedLMHead,
    MatchingHead,
    NLVR2Head,
    VQAHead,
    init_head_weights,
)


@dataclass(frozen=True)
class Img:
    tokens: torch.Tensor


@dataclass(frozen=True)
class Txt:
    hidden: torch.Tensor
    mask: torch.Tensor


@dataclass(frozen=True)
class Fused:
    image: Img
    text: Txt | None


def fused(b: int = 2, n: int = 5, length: int = 4, ci: int = 64, ct: int = 32) -> Fused:
    return Fused(Img(torch.randn(b, n, ci)), Txt(torch.randn(b, length, ct), torch.ones(b, length, dtype=torch.bool)))


def _text(feats: Fused) -> Txt:
    assert feats.text is not None
    return feats.text


def test_projection_pooling_mean_then_dense() -> None:
    proj = CrossModalProjection(image_dim=64, text_dim=32, hidden_dim=32)
    feats = fused()
    out = proj(feats)
    assert out.text_feats.shape == (2, 4, 32) and out.image_feats.shape == (2, 5, 32) and out.cls.shape == (2, 64)
    ti, pi = proj.cross_modal_image_transform, proj.cross_modal_image_pooler.dense
    tt, pt = proj.cross_modal_text_transform, proj.cross_modal_text_pooler.dense
    # Other route: the transform is affine, so mean(W x + b) == W mean(x) + b (all tokens, no mask).
    mean_tokens = feats.image.tokens.double().mean(1)
    pooled_image = torch.tanh((mean_tokens @ ti.weight.double().t() + ti.bias) @ pi.weight.double().t() + pi.bias)
    pooled_text = torch.tanh(
        (_text(feats).hidden[:, 0].double() @ tt.weight.double().t() + tt.bias) @ pt.weight.double().t() + pt.bias
    )
    torch.testing.assert_close(out.cls[:, :32].double(), pooled_text, rtol=1e-5, atol=1e-6)  # text first
    torch.testing.assert_close(out.cls[:, 32:].double(), pooled_image, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.image_feats, ti(feats.image.tokens))


def test_projection_ignores_text_mask_and_padding_content_for_pooling() -> None:
    proj = CrossModalProjection(64, 32, 32)
    feats = fused()
    other = Fused(feats.image, Txt(_text(feats).hidden.clone(), torch.zeros_like(_text(feats).mask)))
    _text(other).hidden[:, 1:] = 0.0
    # Text pooling reads token 0 only, so masks and later tokens do not change cls.
    torch.testing.assert_close(proj(feats).cls, proj(other).cls)


def test_projection_errors() -> None:
    proj = CrossModalProjection(64, 32, 32)
    feats = fused()
    with pytest.raises(ValueError, match="features.text=None"):
        proj(Fused(feats.image, None))
    with pytest.raises(ValueError, match="image.tokens has width 32"):
        proj(Fused(Img(torch.randn(2, 5, 32)), feats.text))
    with pytest.raises(ValueError, match="image batch 3 != text batch 2"):
        proj(Fused(Img(torch.randn(3, 5, 64)), feats.text))


def test_projection_keys_match_official_names() -> None:
    assert set(CrossModalProjection(64, 32, 32).state_dict()) == {
        f"cross_modal_{side}_{kind}.{p}"
        for side in ("text", "image")
        for kind in ("transform", "pooler.dense")
        for p in ("weight", "bias")
    }


def test_reference_init() -> None:
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.LayerNorm(128))
    with torch.no_grad():
        for p in layer.parameters():
            p.fill_(3.0)
    init_head_weights(layer)
    linear, norm = cast(torch.nn.Linear, layer[0]), cast(torch.nn.LayerNorm, layer[1])
    assert linear.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert linear.weight.mean().abs().item() < 0.002
    assert (linear.bias == 0).all() and (norm.weight == 1).all() and (norm.bias == 0).all()
    head = VQAHead(8, 5)
    assert (cast(torch.nn.Linear, head[0]).bias == 0).all() and (cast(torch.nn.LayerNorm, head[1]).weight == 1).all()


def test_plain_dataclasses_feed_every_head_and_gradients_flow() -> None:
    """Structural contract: objects that are not fiber_backbones types drive the whole coarse head stack."""
    feats = fused(b=3)
    proj = CrossModalProjection(64, 32, 32)
    itc = ContrastiveHead(64, 32, 16)
    mlm, itm, vqa, nlvr2 = MaskedLMHead(32, 20), MatchingHead(32), VQAHead(32, 7), NLVR2Head(32)
    feats.image.tokens.requires_grad_(True)
    out = proj(feats)
    labels = torch.full((3, 4), -100)
    labels[:, 1] = 5
    losses = [
        itc(itc.embed_image(feats.image), itc.embed_text(_text(feats))).loss,
        mlm(out.text_feats, labels).loss,
        itm(out.cls, torch.tensor([1, 0, 0])).loss,
        vqa(out.cls, torch.rand(3, 7)).loss,
        nlvr2(NLVR2Head.pair(out.cls, out.cls.flip(0)), torch.tensor([0, 1, 1])).loss,
    ]
    total = torch.stack(losses).sum()
    total.backward()
    assert torch.isfinite(total)
    assert feats.image.tokens.grad is not None and feats.image.tokens.grad.abs().sum() > 0
    for module in (proj, itc, mlm, itm, vqa, nlvr2):
        for name, p in module.named_parameters():
            assert p.grad is not None, f"{type(module).__name__}.{name} got no gradient"


def test_backbone_fusion_output_satisfies_protocols() -> None:
    types = pytest.importorskip("fiber_backbones.types")
    out = types.FusionOutput(
        image=types.ImageOutput(tokens=torch.randn(2, 4, 64), grid=(2, 2)),
        text=types.TextOutput(hidden=torch.randn(2, 3, 32), mask=torch.ones(2, 3, dtype=torch.bool)),
        fused=True,
    )
    assert CrossModalProjection(64, 32, 32)(out).cls.shape == (2, 64)
    assert ContrastiveHead(64, 32, 16).embed_image(out.image).shape == (2, 16)


def test_package_imports_no_sibling() -> None:
    root = Path(fiber_heads.__file__).parent
    siblings = {"fiber_backbones", "fiber_data", "fiber_train", "fiber_eval"}
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in siblings, f"{path.name} imports {name}"
