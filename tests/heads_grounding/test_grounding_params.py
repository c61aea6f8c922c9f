"""Parameter counts (docs/reference/architecture.md §12.2) and official key layout (§13.2) of the grounding head."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fiber_heads.grounding import (
    FPN,
    AnchorGenerator,
    DyHeadBlock,
    GroundingHead,
    TokenAlignment,
    cell_anchor,
    convert_official_state_dict,
)

KEYS_FILE = Path(__file__).with_name("official_fine_head_keys.tsv")


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def fiber_b_head() -> GroundingHead:
    with torch.device("meta"):
        return GroundingHead((256, 512, 1024), 768, num_convs=6)


def test_fpn_parameter_count() -> None:
    with torch.device("meta"):
        assert _count(FPN((256, 512, 1024), 256)) == 3_409_920


def test_dyhead_block_parameter_count() -> None:
    with torch.device("meta"):
        assert _count(DyHeadBlock(256)) == 1_917_276


def test_token_alignment_parameter_count() -> None:
    with torch.device("meta"):
        assert _count(TokenAlignment(256, 768)) == 197_634


def test_head_parameter_counts(fiber_b_head: GroundingHead) -> None:
    h = fiber_b_head
    assert _count(h.dyhead_tower) == 6 * 1_917_276 == 11_503_656
    predictors = sum(_count(m) for m in (h.cls_logits, h.bbox_pred, h.centerness, h.scales))
    assert predictors == 21_850
    assert _count(h) == 3_409_920 + 11_503_656 + 21_850 + 197_634


def test_state_dict_matches_official_layout(fiber_b_head: GroundingHead) -> None:
    official: dict[str, torch.Tensor] = {}
    for line in KEYS_FILE.read_text().splitlines():
        key, shape = line.split("\t")
        dims = tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
        official["module." + key] = torch.empty(dims, device="meta")
    converted, skipped = convert_official_state_dict(official, strict=True)
    assert skipped == []
    ours = fiber_b_head.state_dict()
    assert set(converted) == set(ours)
    for k, v in converted.items():
        assert tuple(v.shape) == tuple(ours[k].shape), k


def test_convert_skips_backbone_keys() -> None:
    sd = {"fusion_backbone.backbone.body.norm1.weight": torch.zeros(3), "rpn.head.bias0": torch.zeros(1)}
    converted, skipped = convert_official_state_dict(sd)
    assert list(converted) == ["token_alignment.bias0"]
    assert skipped == ["fusion_backbone.backbone.body.norm1.weight"]
    with pytest.raises(KeyError, match="rpn.unknown"):
        convert_official_state_dict({"rpn.unknown": torch.zeros(1)}, strict=True)


def test_cell_anchors_follow_the_rule() -> None:
    gen = AnchorGenerator()
    cells = [getattr(gen.cell_anchors, str(i)) for i in range(5)]
    assert cells[0].tolist() == [[-28.0, -28.0, 35.0, 35.0]]
    for cell, s, a in zip(cells, (8, 16, 32, 64, 128), (64, 128, 256, 512, 1024)):
        assert torch.equal(cell, cell_anchor(s, a))
        # side A (inclusive pixels), centred on (s - 1) / 2
        assert cell[0, 2] - cell[0, 0] + 1 == a
        assert (cell[0, 0] + cell[0, 2]) / 2 == (s - 1) / 2


def test_anchor_grid_order() -> None:
    gen = AnchorGenerator()
    anchors, counts = gen([(2, 3), (1, 2), (1, 1), (1, 1), (1, 1)])
    assert counts == [6, 2, 1, 1, 1]
    assert anchors.shape == (11, 4)
    # level 0, row-major: index 4 is (y=1, x=1) -> shift (8, 8)
    assert anchors[4].tolist() == [-20.0, -20.0, 43.0, 43.0]
    # level 1 second anchor: x = 1 -> shift 16
    assert anchors[7].tolist() == [-56.0 + 16, -56.0, 71.0 + 16, 71.0]
