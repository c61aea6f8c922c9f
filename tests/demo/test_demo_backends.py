"""Demo task backends: input checks, checkpoint discovery, and results equal to the models computed directly."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from fiber_backbones import BackboneConfig, FiberBackbone, TextInputs
from fiber_data import ImageTransform, Prompt, load_tokenizer
from fiber_heads.grounding import PostprocessConfig
from fiber_train.demo import DemoInputError, TaskUnavailableError, decode_image, load_backends
from fiber_train.demo.backends import TASK_ORDER, discover_model_dirs, parse_class_names, parse_phrases
from fiber_train.predictor import GroundingPredictor


def png_bytes(width: int, height: int, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


def first_test_image(demo_world: Path) -> Image.Image:
    return Image.open(sorted((demo_world / "images" / "test").glob("*.png"))[0]).convert("RGB")


@pytest.fixture(scope="module")
def backends(demo_backends):
    return demo_backends


# ------------------------------------------------------------------------------------------------- input


def test_decode_image_accepts_png_and_refuses_bad_input() -> None:
    im = decode_image(png_bytes(7, 5), max_bytes=10_000, max_pixels=100, name="a.png")
    assert im.size == (7, 5) and im.mode == "RGB" and im.getpixel((3, 2)) == (200, 30, 30)

    with pytest.raises(DemoInputError, match=r"notes\.txt: not an image") as err:
        decode_image(b"hello, this is text", max_bytes=10_000, max_pixels=100, name="notes.txt")
    assert err.value.status == 400
    with pytest.raises(DemoInputError, match="empty"):
        decode_image(b"", max_bytes=10_000, max_pixels=100)
    big = png_bytes(20, 20)
    with pytest.raises(DemoInputError, match="limit is") as err:
        decode_image(big, max_bytes=len(big) - 1, max_pixels=10_000, name="big.png")
    assert err.value.status == 413
    # the pixel limit is checked from the header: 20 x 20 = 400 > 399
    with pytest.raises(DemoInputError, match=r"20 x 20") as err:
        decode_image(big, max_bytes=10_000, max_pixels=399, name="big.png")
    assert err.value.status == 413
    # a truncated PNG: the header is fine, decoding fails
    with pytest.raises(DemoInputError, match="cut.png"):
        decode_image(png_bytes(64, 64)[:60], max_bytes=10_000, max_pixels=10_000, name="cut.png")


def test_parse_class_names() -> None:
    assert parse_class_names("red circle, blue  square.\ngreen triangle, red circle") == [
        "red circle",
        "blue square",
        "green triangle",
    ]
    with pytest.raises(DemoInputError, match="at least one class name"):
        parse_class_names(" , . \n")


def test_parse_phrases() -> None:
    caption, spans = parse_phrases("[a red  circle] left of [ the blue square ]")
    assert caption == "a red circle left of the blue square"
    assert [caption[a:b] for a, b in spans] == ["a red circle", "the blue square"]
    assert parse_phrases("  a red circle ") == ("a red circle", [(0, 12)])
    for bad, message in [("[a [b]]", "nested"), ("a]", "unmatched ']'"), ("[a", "unmatched '\\['"), ("[ ] x", "empty")]:
        with pytest.raises(DemoInputError, match=message):
            parse_phrases(bad)


# ------------------------------------------------------------------------------------------- discovery


def test_discover_model_dirs(demo_runs: dict[str, Path], tmp_path: Path) -> None:
    fine = demo_runs["fine"]
    assert discover_model_dirs([fine]) == [fine / "model"]
    assert discover_model_dirs([fine / "model"]) == [fine / "model"]
    parent = fine.parent
    assert discover_model_dirs([parent]) == sorted(r / "model" for r in demo_runs.values())
    with pytest.raises(FileNotFoundError, match="no such file"):
        discover_model_dirs([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a saved FIBER model"):
        discover_model_dirs([tmp_path / "empty"])


def test_every_task_available_with_its_source(backends, demo_runs: dict[str, Path]) -> None:
    info = {t["task"]: t for t in backends.info()}
    assert list(info) == list(TASK_ORDER)
    assert all(t["available"] for t in info.values())
    assert info["grounding"]["source"] == str(demo_runs["fine"] / "model")
    assert info["vqa"]["source"] == str(demo_runs["vqa"] / "model")
    assert info["caption"]["text_required"] is False and info["vqa"]["text_required"] is True
    assert {m["task"] for m in backends.models} == {"fine", "coarse", "vqa", "caption"}


# --------------------------------------------------------------------------------------------- results


def test_grounding_and_detection_equal_the_predictor(backends, demo_runs, demo_world) -> None:
    image = first_test_image(demo_world)
    predictor = GroundingPredictor.from_run(demo_runs["fine"])
    ref = predictor.ground([image], ["the red circle"], config=PostprocessConfig.referring_expressions())[0]
    out = backends.run("grounding", image, "  the red   circle ")
    assert out["task"] == "grounding" and out["query"] == "the red circle"
    assert out["image"] == {"width": image.width, "height": image.height}
    assert len(out["boxes"]) == len(ref) > 0
    torch.testing.assert_close(torch.tensor([b["box"] for b in out["boxes"]]), ref.boxes, atol=0.006, rtol=0)
    torch.testing.assert_close(torch.tensor([b["score"] for b in out["boxes"]]), ref.scores, atol=6e-5, rtol=0)
    assert all(b["phrase"] == "the red circle" and b["label"] == 0 for b in out["boxes"])

    # several phrases marked with brackets = one prompt with one label per phrase
    caption = "a red circle left of the blue square"
    prompt = Prompt(caption, (0, 1), {0: (0, 12), 1: (21, 36)})
    ref = predictor.predict([image], [prompt], config=PostprocessConfig.referring_expressions())[0]
    out = backends.run("grounding", image, "[a red circle] left of [the blue square]")
    assert out["query"] == caption and out["label_names"] == ["a red circle", "the blue square"]
    assert [b["phrase"] for b in out["boxes"]] == list(ref.phrases) and len(set(ref.phrases)) == 2
    torch.testing.assert_close(torch.tensor([b["box"] for b in out["boxes"]]), ref.boxes, atol=0.006, rtol=0)

    names = ["red circle", "blue square", "green triangle"]
    det = predictor.detect([image], names, config=PostprocessConfig(pre_nms_thresh=0.0))[0]
    detection = backends.backends["detection"]
    default = detection.postprocess
    assert default == predictor.postprocess  # detection uses the predictor's thresholds
    detection.postprocess = PostprocessConfig(pre_nms_thresh=0.0)  # random weights: no score passes 0.05
    try:
        out = backends.run("detection", image, "red circle, blue square\ngreen triangle")
    finally:
        detection.postprocess = default
    assert out["query"] == names and out["label_names"] == names
    assert [b["phrase"] for b in out["boxes"]] == list(det.phrases)
    assert [b["label"] for b in out["boxes"]] == det.labels.tolist()
    torch.testing.assert_close(torch.tensor([b["box"] for b in out["boxes"]]), det.boxes, atol=0.006, rtol=0)
    json.dumps(out)  # JSON-ready


def _reference_state(model_dir: Path) -> dict[str, torch.Tensor]:
    """The exported weights read straight from the file."""
    return load_file(str(model_dir / "model.safetensors"))


def _reference_parts(model_dir: Path) -> tuple[FiberBackbone, dict, dict]:
    """(fresh backbone, head config, training config) read straight from ``config.json``."""
    config = json.loads((model_dir / "config.json").read_text())
    return FiberBackbone(BackboneConfig.from_dict(config["backbone"])), config["head"], config["info"]["config"]


def test_vqa_answers_equal_the_exported_model(backends, demo_runs, demo_world) -> None:
    from fiber_train.tasks.vqa import VQAModel

    model_dir = demo_runs["vqa"] / "model"
    backbone, head, meta = _reference_parts(model_dir)
    answers = head["answers"]
    ref = VQAModel(backbone, meta["model"]["hidden_dim"], len(answers))
    ref.projection.text_pool = meta["model"].get("text_pool", "first")  # recorded in the exported config
    ref.load_state_dict(_reference_state(model_dir), strict=True)
    ref.eval()
    image = first_test_image(demo_world)
    tok = load_tokenizer(model_dir / "tokenizer.json")
    enc = tok(["what color is the circle?"], max_length=meta["data"]["max_text_len"])
    pixels = ImageTransform(meta["data"]["image_size"])(image)[None]
    with torch.no_grad():
        probs = ref.answer_logits(pixels, TextInputs(enc.input_ids, enc.attention_mask))[0].sigmoid()
    top = torch.topk(probs, 5)

    out = backends.run("vqa", image, "what color is the circle?")
    assert [a["answer"] for a in out["answers"]] == [answers[i] for i in top.indices.tolist()]
    torch.testing.assert_close(torch.tensor([a["score"] for a in out["answers"]]), top.values, atol=6e-5, rtol=0)
    with pytest.raises(DemoInputError, match="question is empty"):
        backends.run("vqa", image, "   ")


def test_scoring_equals_the_exported_model(backends, demo_runs, demo_world) -> None:
    from fiber_train.tasks.coarse import CoarseModel

    model_dir = demo_runs["coarse"] / "model"
    backbone, _, meta = _reference_parts(model_dir)
    tok = load_tokenizer(model_dir / "tokenizer.json")
    ref = CoarseModel(
        backbone,
        vocab_size=tok.vocab_size,
        hidden_dim=meta["model"]["hidden_dim"],
        itc_dim=meta["model"]["itc_dim"],
        loss_weights={},
        text_pool=meta["model"].get("text_pool", "first"),
    )
    ref.load_state_dict(_reference_state(model_dir), strict=True)
    ref.eval()
    image = first_test_image(demo_world)
    captions = ["a red circle", "a blue square on the left"]
    pixels = ImageTransform(meta["data"]["image_size"])(image)[None]
    itm, itc = [], []
    with torch.no_grad():
        for c in captions:  # one caption at a time: the backend batches them
            enc = tok([c], max_length=meta["data"]["max_text_len"])
            text = TextInputs(enc.input_ids, enc.attention_mask)
            logits = ref.itm_score.logits(ref.projection(ref.backbone(pixels, text, fuse=True)).cls)
            itm.append(float(logits.softmax(-1)[0, 1]))
            itc.append(float(ref.embed_images(pixels)[0] @ ref.embed_texts(text)[0]))

    out = backends.run("scoring", image, "a red circle\n\n  a blue square on the left \n")
    assert [r["text"] for r in out["captions"]] == captions
    torch.testing.assert_close(torch.tensor([r["itm"] for r in out["captions"]]), torch.tensor(itm), atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.tensor([r["itc"] for r in out["captions"]]), torch.tensor(itc), atol=1e-4, rtol=0)
    assert out["best"] == int(torch.tensor(itm).argmax())
    with pytest.raises(DemoInputError, match="caption is empty"):
        backends.run("scoring", image, "\n \n")


def test_caption_equals_beam_search_of_the_exported_model(backends, demo_runs, demo_world) -> None:
    from fiber_train.config import load_config
    from fiber_train.tasks.caption import CaptionConfig, CaptionModel

    model_dir = demo_runs["caption"] / "model"
    backbone, _, meta = _reference_parts(model_dir)
    cfg = load_config(CaptionConfig, None, base=meta)
    tok = load_tokenizer(model_dir / "tokenizer.json")
    special = {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id, "mask": tok.mask_token_id}
    ref = CaptionModel(backbone, cfg.model.hidden_dim, tok.vocab_size, special, cfg.caption)
    ref.load_state_dict(_reference_state(model_dir), strict=True)
    ref.eval()
    image = first_test_image(demo_world)
    tokens = ref.generate(ImageTransform(cfg.data.image_size)(image)[None])
    expected = tok.decode(tokens[0].tolist(), skip_special_tokens=True).strip()

    out = backends.run("caption", image, "ignored")
    assert out["caption"] == expected and out["beam_size"] == cfg.caption.beam_size


# ------------------------------------------------------------------------------------------ unavailable


def test_tasks_missing_from_the_checkpoint_are_unavailable(demo_runs, demo_world, tmp_path) -> None:
    # a coarse export whose ITM head is gone: scoring cannot run, grounding (other checkpoint) still can
    broken = tmp_path / "coarse-no-heads"
    shutil.copytree(demo_runs["coarse"] / "model", broken / "model")
    state = load_file(str(broken / "model" / "model.safetensors"))
    save_file(
        {k: v for k, v in state.items() if not k.startswith("itm_score.")}, str(broken / "model" / "model.safetensors")
    )
    bs = load_backends([demo_runs["fine"], broken])
    info = {t["task"]: t for t in bs.info()}
    assert info["grounding"]["available"] and info["detection"]["available"]
    assert not info["vqa"]["available"] and "finetune vqa" in info["vqa"]["reason"]
    assert (
        not info["scoring"]["available"]
        and "missing (2): itm_score.fc.bias, itm_score.fc.weight" in info["scoring"]["reason"]
    )
    image = first_test_image(demo_world)
    with pytest.raises(
        TaskUnavailableError, match=r"Captioning is not available in this checkpoint: .*finetune caption"
    ):
        bs.run("caption", image, "")
    with pytest.raises(DemoInputError, match="unknown task 'segmentation'"):
        bs.run("segmentation", image, "x")
    assert bs.run("grounding", image, "a circle")["boxes"]
