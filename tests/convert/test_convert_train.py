"""Whole-model conversion for fiber-train: coarse heads, task heads, rank_output, fine detector head, the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast

import pytest
import torch
from convert_helpers import synth_official
from safetensors.torch import load_file

import fiber_models
from fiber_backbones import FiberBackbone, TextInputs, create_backbone, from_pretrained, get_entry
from fiber_backbones import cli as backbones_cli
from fiber_backbones.convert import CheckpointFormatError, to_official_backbone
from fiber_heads import NLVR2Head, VQAHead
from fiber_heads.grounding import GroundingHead, PostprocessConfig
from fiber_models import GroundingModel
from fiber_train.convert import (
    COARSE_HEAD_KEYS,
    build_converted_model,
    coarse_model_type,
    convert_official_coarse,
    convert_official_fine,
    main,
)
from fiber_train.tasks.coarse import CoarseModel, load_pretrained_into


def _coarse_model_meta(state: dict, vocab: int = 50265) -> CoarseModel:
    with torch.device("meta"):
        model = CoarseModel(
            create_backbone("fiber-base"), vocab_size=vocab, hidden_dim=768, itc_dim=768, loss_weights={}
        )
    model.load_state_dict(state, strict=True, assign=True)
    return model


def test_coarse_pretrain_maps_every_head_and_reports_rank_output() -> None:
    official = synth_official("coarse-pretrain")
    state, rep = convert_official_coarse({"state_dict": official})
    _coarse_model_meta(state)  # strict: exactly CoarseModel's keys and shapes
    assert rep.missing == [] and rep.task_heads == {}
    for off_key, ours in COARSE_HEAD_KEYS.items():
        assert state[ours] is official[off_key]
    assert state["itc.temp"] is official["temp"]
    assert (
        state["projection.cross_modal_image_pooler.dense.weight"] is official["cross_modal_image_pooler.dense.weight"]
    )
    assert set(rep.dropped) == {"rank_output.weight", "rank_output.bias"}
    assert "§10 item 9" in rep.dropped["rank_output.weight"]
    assert rep.rank_output is not None and rep.rank_output["equals_itm_row1"] is False
    assert rep.rank_output["max_abs_diff_weight"] > 0
    # the backbone part drops the 7 queue buffers with their reason
    assert sum("queue" in r for r in rep.backbone.dropped.values()) == 7
    summary = json.loads(json.dumps(rep.summary()))
    assert summary["rank_output"]["equals_itm_row1"] is False and summary["heads_mapped"] == len(COARSE_HEAD_KEYS)


def test_rank_output_equal_to_itm_row_1_is_detected() -> None:
    official = synth_official("coarse-pretrain")
    fc_w = torch.randn(2, 1536)
    fc_b = torch.randn(2)
    official.update({"itm_score.fc.weight": fc_w, "itm_score.fc.bias": fc_b})
    official.update({"rank_output.weight": fc_w[1:2].clone(), "rank_output.bias": fc_b[1:2].clone()})
    _, rep = convert_official_coarse({"state_dict": official})
    assert rep.rank_output is not None and rep.rank_output["equals_itm_row1"] is True
    assert rep.rank_output["max_abs_diff_weight"] == 0.0 and rep.rank_output["max_abs_diff_bias"] == 0.0


@pytest.mark.parametrize("stem", ["coarse-vqa", "coarse-nlvr2", "coarse-caption"])
def test_task_checkpoints_keep_task_heads_and_report_missing(stem: str) -> None:
    official = synth_official(stem)
    state, rep = convert_official_coarse({"state_dict": official})
    assert rep.backbone.config.swin.img_size == (576 if stem in ("coarse-vqa", "coarse-caption") else 384)
    with torch.device("meta"):
        model = CoarseModel(
            FiberBackbone(rep.backbone.config), vocab_size=50265, hidden_dim=768, itc_dim=768, loss_weights={}
        )
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    assert unexpected == [] and sorted(missing) == rep.missing
    assert "itm_score.fc.weight" in rep.missing and "itc.temp" in rep.missing
    if stem == "coarse-vqa":
        head = {k.removeprefix("vqa_classifier."): v for k, v in rep.task_heads.items()}
        with torch.device("meta"):
            VQAHead(768, 3129).load_state_dict(head, strict=True, assign=True)
    elif stem == "coarse-nlvr2":
        head = {k.removeprefix("nlvr2_classifier."): v for k, v in rep.task_heads.items()}
        with torch.device("meta"):
            NLVR2Head(768).load_state_dict(head, strict=True, assign=True)
    else:
        assert len(rep.task_heads) == 20 and "mlm_score.decoder.weight" not in rep.missing


def test_unknown_head_key_and_wrong_kind_raise() -> None:
    official = synth_official("coarse-nlvr2")
    official["snli_classifier.0.weight"] = torch.zeros(2, 2)
    with pytest.raises(CheckpointFormatError, match="unrecognised coarse keys.*snli_classifier"):
        convert_official_coarse({"state_dict": official})
    fine = {"model": synth_official("fine-refcoco")}
    with pytest.raises(CheckpointFormatError, match="use convert_official_fine"):
        convert_official_coarse(fine)
    with pytest.raises(CheckpointFormatError, match="use convert_official_coarse"):
        convert_official_fine({"state_dict": synth_official("coarse-nlvr2")})


@pytest.mark.parametrize(
    ("stem", "variant"), [("fine-mixed-nococo-flickr-objects365", "fine_v2"), ("fine-refcoco", "fine_v3")]
)
def test_fine_checkpoint_gives_backbone_and_grounding_head(stem: str, variant: str) -> None:
    official = synth_official(stem)
    container = {"model": {f"module.{k}": v for k, v in official.items()}, "iteration": 90000}
    backbone, head, rep = convert_official_fine(container)
    assert rep.backbone.config.variant == variant  # detected from the presence of norm_i2t_i
    with torch.device("meta"):
        FiberBackbone(rep.backbone.config).load_state_dict(backbone, strict=True, assign=True)
        GroundingHead().load_state_dict(head, strict=True, assign=True)
    assert rep.missing == []
    assert head["token_alignment.log_scale"] is official["rpn.head.log_scale"]
    assert head["fpn.fpn_inner2.weight"] is official["fusion_backbone.backbone.fpn.fpn_inner2.weight"]
    assert rep.head_map["rpn.head.dyhead_tower.0.DyConv.0.conv.weight"] == "dyhead_tower.0.DyConv.0.conv.weight"
    assert len(backbone) + len(head) + len(rep.backbone.dropped) == len(official)


# ------------------------------------------------------------------------------------------ CLI on tiny geometries
def _inverse_coarse_head(name: str) -> str:
    """Our CoarseModel head key -> official key, written independently of the converter's table."""
    for ours_prefix in ("projection.", "itc."):
        if name.startswith(ours_prefix):
            rest = name[len(ours_prefix) :]
            return "temp" if rest == "temp" else rest
    return name


@pytest.fixture(scope="module")
def tiny_coarse_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CoarseModel]:
    torch.manual_seed(0)
    model = CoarseModel(create_backbone("fiber-tiny"), vocab_size=1000, hidden_dim=64, itc_dim=64, loss_weights={})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # gates and LayerNorms away from their init
    sd = model.state_dict()
    official = to_official_backbone(
        {k.removeprefix("backbone."): v for k, v in sd.items() if k.startswith("backbone.")},
        cast(FiberBackbone, model.backbone).config,
        complete=True,
    )
    official.update({_inverse_coarse_head(k): v for k, v in sd.items() if not k.startswith("backbone.")})
    official["rank_output.weight"] = sd["itm_score.fc.weight"][1:2].clone()
    official["rank_output.bias"] = sd["itm_score.fc.bias"][1:2].clone()
    official.update({"image_queue": torch.zeros(64, 8), "queue_ptr": torch.zeros(1, dtype=torch.long)})
    path = tmp_path_factory.mktemp("tiny") / "tiny-coarse.ckpt"
    torch.save({"state_dict": official, "epoch": 1}, path)
    return path, model


def test_fiber_train_convert_cli_coarse_round_trip(tiny_coarse_file, tmp_path: Path) -> None:
    path, model = tiny_coarse_file
    out = tmp_path / "converted"
    assert main([str(path), str(out), "--geometry", "fiber-tiny"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "coarse" and config["info"]["kind"] == "coarse"
    # preprocessing from the backbone registry entry (timm's pretrained_cfg idea): mean/std, tokenizer name
    entry = get_entry("fiber-tiny")
    pre = config["preprocessing"]
    assert pre["image_mean"] == list(entry.image_mean) and pre["tokenizer"] == entry.tokenizer == "roberta-base"
    assert pre["image_size"] == 64
    report = config["info"]["conversion"]
    assert report["rank_output"]["equals_itm_row1"] is True
    assert "rank_output.weight" in report["dropped"] and "image_queue" in report["backbone"]["dropped"]
    assert report["backbone"]["container"] == "lightning"
    # the whole model loads strictly, equal to the original tensor for tensor
    loaded = fiber_models.load(out)
    assert isinstance(loaded, CoarseModel) and loaded.fresh_keys == []
    want, got = model.state_dict(), loaded.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    # ... and computes what the original computes (ITC embeddings, ITM scores)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    text = TextInputs(torch.tensor([[0, 5, 9, 2], [0, 7, 2, 1]]), torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]).bool())
    with torch.no_grad():
        assert torch.equal(loaded.embed_images(x), model.embed_images(x))
        assert torch.equal(loaded.itm_scores(x, text), model.itm_scores(x, text))
    # the trainer's initialisation reads the converted model too
    torch.manual_seed(1)
    fresh = CoarseModel(create_backbone("fiber-tiny"), vocab_size=1000, hidden_dim=64, itc_dim=64, loss_weights={})
    assert load_pretrained_into(fresh, out) == []
    assert all(torch.equal(fresh.state_dict()[k], want[k]) for k in want)


@pytest.mark.slow
def test_fiber_backbones_convert_cli_with_resolution_change(tiny_coarse_file, tmp_path: Path, capsys) -> None:
    path, model = tiny_coarse_file
    out = tmp_path / "bb"
    code = backbones_cli.main(["convert", str(path), str(out), "--geometry", "fiber-tiny", "--image-size", "128"])
    assert code == 0 and "tables resized" in capsys.readouterr().out
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["target_image_size"] == 128 and len(report["resized"]) == 6
    assert "itm_score.fc.weight" in report["rest"]
    converted = from_pretrained(out)
    assert converted.config.swin.img_size == 128
    sd, ref = converted.state_dict(), model.backbone.state_dict()
    assert torch.equal(sd["text_encoder.encoder.layer.3.alpha_t2i"], ref["text_encoder.encoder.layer.3.alpha_t2i"])
    assert sd["image_encoder.layers.0.blocks.0.attn.relative_position_bias_table"].shape == (49, 1)
    # same window -> identical image features through the loaded model
    out_same = tmp_path / "bb64"
    assert backbones_cli.main(["convert", str(path), str(out_same), "--geometry", "fiber-tiny"]) == 0
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a = from_pretrained(out_same).encode_image(x).tokens
        b = model.backbone.eval().encode_image(x).tokens
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def _inverse_head_key(name: str) -> str:
    if name.startswith("fpn."):
        return "fusion_backbone.backbone." + name
    if name.startswith("anchor_generator."):
        return "rpn." + name
    if name.startswith("token_alignment."):
        return "rpn.head." + name[len("token_alignment.") :]
    return "rpn.head." + name


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["fine_v2", "fine_v3"])
def test_fiber_train_convert_cli_fine_keeps_the_whole_detection_head(variant: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    backbone = create_backbone("fiber-tiny", variant=variant)
    head = GroundingHead(in_channels_list=(64, 128, 256), text_dim=64, num_convs=6)  # the released head's layout
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # away from any initialisation
    official = to_official_backbone(backbone.state_dict(), backbone.config, complete=True)
    official.update({_inverse_head_key(k): v for k, v in head.state_dict().items()})
    path = tmp_path / "tiny-fine.pth"
    torch.save({"model": {f"module.{k}": v for k, v in official.items()}, "iteration": 3}, path)
    out = tmp_path / "out"
    assert main([str(path), str(out), "--geometry", "fiber-tiny", "--variant", variant]) == 0
    config = json.loads((out / "config.json").read_text())
    report = config["info"]["conversion"]
    assert config["model_type"] == "grounding" and config["head"]["num_convs"] == 6
    assert report["kind"] == "fine" and report["backbone"]["target_variant"] == variant
    assert report["backbone"]["container"] == "detector"
    # every one of the 157 head tensors (FPN and DyHead included) is in the saved model and loads strictly
    saved_head = {k for k in load_file(str(out / "model.safetensors")) if k.startswith("head.")}
    assert len(head.state_dict()) == 157 and saved_head == {f"head.{k}" for k in head.state_dict()}
    loaded = GroundingModel.from_pretrained(out)
    got = loaded.head.state_dict()
    assert len(got) == 157 and all(torch.equal(got[k], v) for k, v in head.state_dict().items())
    loaded_backbone = cast(FiberBackbone, loaded.backbone)
    assert all(torch.equal(loaded_backbone.state_dict()[k], v) for k, v in backbone.state_dict().items())
    # the detector runs and gives what the original modules give
    original = GroundingModel(backbone, head).eval()
    x = torch.randn(1, 3, 64, 64)
    text = TextInputs(torch.tensor([[0, 5, 9, 2]]), torch.ones(1, 4, dtype=torch.bool))
    pos = torch.zeros(1, 1, 4)
    pos[0, 0, 1:3] = 1.0
    sizes = torch.tensor([[64, 64]])
    keep = PostprocessConfig(pre_nms_thresh=0.0, pre_nms_top_n=20, detections_per_img=10)
    with torch.no_grad():
        a = loaded.predict(x, text, pos, sizes, config=keep)[0]
        b = original.predict(x, text, pos, sizes, config=keep)[0]
    assert len(a.boxes) > 0 and torch.equal(a.boxes, b.boxes) and torch.equal(a.scores, b.scores)


@pytest.mark.filterwarnings("ignore:.*meta parameter")
@pytest.mark.parametrize(
    ("stem", "model_type"), [("coarse-vqa", "vqa"), ("coarse-nlvr2", "nlvr2"), ("coarse-caption", "caption")]
)
def test_official_fine_tuned_layouts_become_whole_task_models(stem: str, model_type: str) -> None:
    """The official VQA / NLVR2 / captioning key layouts (fiber-base size, built on the meta device) convert into
    the task's fiber_models model with every tensor of it provided: strict loading passes, the task head is kept."""
    full, report = convert_official_coarse({"state_dict": synth_official(stem)})
    with torch.device("meta"):
        model = build_converted_model(full, report)
    assert model.model_type == model_type and coarse_model_type(report.task_heads) == model_type
    assert set(report.task_heads) <= set(model.state_dict())  # the fine-tuned head is part of the model


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--geometry", "no-such-geometry"], "no-such-geometry"),
        (["--geometry", "fiber-tiny", "--kind", "fine"], "coarse"),
        (["--geometry", "fiber-tiny", "OUT_IS_A_FILE"], "out"),
    ],
)
def test_fiber_train_convert_refusals_are_one_line(
    tiny_coarse_file, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    from fiber_train.cli import main as cli_main

    path, _ = tiny_coarse_file
    out = tmp_path / "out"
    if "OUT_IS_A_FILE" in extra:
        out.write_text("a file, not a folder")
        extra = [e for e in extra if e != "OUT_IS_A_FILE"]
    assert cli_main(["convert", str(path), str(out), *extra]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fiber-train:")]
    assert len(err) == 1 and message in err[0] and "\x1b" not in err[0], err
