"""GroundingPredictor: batching, padding dependence, box coordinates, phrases, chunked class lists, errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from fiber_backbones import create_backbone
from fiber_data import Prompt, load_tokenizer
from fiber_heads.grounding import PostprocessConfig
from fiber_train.predictor import GroundingPredictor
from fiber_train.tasks.grounding_common import GroundingHeadConfig, GroundingModel, build_grounding_head

NAMES = ["red circle", "blue square", "green triangle", "yellow diamond"]
# random weights give class scores around sigmoid(bias0) = 0.01: keep every candidate
ALL = PostprocessConfig(pre_nms_thresh=0.0, pre_nms_top_n=50, detections_per_img=30)


@pytest.fixture(scope="module")
def model_and_tokenizer(fine_world: Path) -> tuple[GroundingModel, object]:
    torch.manual_seed(0)
    tok = load_tokenizer(fine_world)
    vocab: dict[str, Any] = {"text.vocab_size": tok.vocab_size}
    backbone = create_backbone("fiber-tiny", variant="fine_v2", **vocab)
    head_cfg = GroundingHeadConfig(channels=32, num_convs=1, anchor_sizes=(32, 64, 128, 256, 512))
    return GroundingModel(backbone, build_grounding_head(backbone, head_cfg)).eval(), tok


def _images(fine_world: Path) -> list[Image.Image]:
    files = sorted((fine_world / "images" / "test").glob("*.png"))
    # two sizes and aspect ratios: 64 x 64 and (h 80, w 48)
    return [Image.open(files[0]).convert("RGB"), Image.open(files[1]).convert("RGB").resize((48, 80))]


def test_batched_equals_batch_size_one_at_the_same_padding(model_and_tokenizer, fine_world: Path) -> None:
    model, tok = model_and_tokenizer
    predictor = GroundingPredictor(model, tok, test_size=64, max_text_len=64, pad_to=(128, 96), postprocess=ALL)
    images = _images(fine_world)
    batched = predictor.detect(images, NAMES)
    for image, together in zip(images, batched):
        (alone,) = predictor.detect([image], NAMES)
        assert len(together) == len(alone) > 0
        assert torch.equal(together.labels[:20], alone.labels[:20])
        torch.testing.assert_close(together.boxes[:20], alone.boxes[:20], atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(together.scores[:20], alone.scores[:20], atol=1e-5, rtol=1e-4)


def test_boxes_are_inside_each_original_image(model_and_tokenizer, fine_world: Path) -> None:
    model, tok = model_and_tokenizer
    predictor = GroundingPredictor(model, tok, test_size=64, max_text_len=64, postprocess=ALL)
    images = _images(fine_world)
    preds = predictor.detect(images, NAMES)
    for image, pred in zip(images, preds):
        assert pred.image_size == (image.height, image.width)
        assert len(pred) > 0 and pred.boxes.shape == (len(pred), 4)
        b = pred.boxes
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all()
        assert (b[:, 2] <= image.width).all() and (b[:, 3] <= image.height).all()
        assert (b[:, 2] >= b[:, 0]).all() and (b[:, 3] >= b[:, 1]).all()
        assert (pred.scores[:-1] >= pred.scores[1:]).all()
        assert pred.phrases == tuple(NAMES[int(k)] for k in pred.labels)
    # the same image as a path, a uint8 tensor and a float tensor gives the same prediction
    path = sorted((fine_world / "images" / "test").glob("*.png"))[0]
    arr = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
    a, b, c = predictor.detect([path, arr, arr.float() / 255.0], NAMES)
    for other in (b, c):
        torch.testing.assert_close(a.boxes, other.boxes)
        assert torch.equal(a.labels, other.labels)


def test_captions_and_explicit_phrases(model_and_tokenizer, fine_world: Path) -> None:
    model, tok = model_and_tokenizer
    predictor = GroundingPredictor(model, tok, test_size=64, max_text_len=64, pad_to=(128, 96), postprocess=ALL)
    images = _images(fine_world)
    caption = "a small red circle in the top left"
    phrases = Prompt(caption, (7, 3), {7: (8, 18), 3: (22, 34)})  # "red circle", "the top left"
    cap, multi = predictor.predict(images, [caption, phrases])
    assert set(cap.phrases) == {caption} and cap.label_names == (caption,)
    assert multi.label_names == ("red circle", "the top left")
    assert set(multi.labels.tolist()) <= {0, 1} and set(multi.phrases) <= set(multi.label_names)
    # ground() with the caption alone equals its row of the mixed batch (same padding, see the module doc)
    (again,) = predictor.ground(images[:1], [caption])
    torch.testing.assert_close(again.boxes, cap.boxes, atol=1e-3, rtol=1e-4)


def test_long_class_lists_are_chunked_into_rows_of_one_forward(model_and_tokenizer, fine_world: Path) -> None:
    model, tok = model_and_tokenizer
    # the 4 names need 12 tokens (5 + 6 + 4 + 4 with separators): a budget of 10 - 2 splits them into chunks
    short = GroundingPredictor(model, tok, test_size=64, max_text_len=10, pad_to=(64, 64), postprocess=ALL)
    image = _images(fine_world)[0]
    (chunked,) = short.detect([image], NAMES)
    queries = short._query(NAMES, 0)
    assert len(queries.prompts) >= 2
    assert sorted(lab for p in queries.prompts for lab in p.labels) == list(range(len(NAMES)))
    # the detections of each chunk's classes equal those of a query made of that chunk alone (same caption)
    for prompt in queries.prompts:
        names = [NAMES[k] for k in prompt.labels]
        (alone,) = short.detect([image], names)
        mine = torch.isin(chunked.labels, torch.tensor(prompt.labels))
        got_scores = chunked.scores[mine]
        ref = alone.scores[: len(got_scores)]
        torch.testing.assert_close(got_scores[: len(ref)], ref, atol=1e-5, rtol=1e-4)


def test_bad_inputs_raise_clear_errors(model_and_tokenizer, fine_world: Path) -> None:
    model, tok = model_and_tokenizer
    predictor = GroundingPredictor(model, tok, test_size=64, max_text_len=8)
    image = _images(fine_world)[0]
    with pytest.raises(ValueError, match="2 images but 1 text"):
        predictor.predict([image, image], ["a red circle"])
    with pytest.raises(ValueError, match="no token within max_text_len=8"):
        predictor.ground([image], ["a very long caption about a red circle in the top left corner"])
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        predictor.detect([torch.zeros(64, 64)], NAMES)
    with pytest.raises(ValueError, match="empty caption"):
        predictor.ground([image], ["  "])
    with pytest.raises(TypeError, match="list of names"):
        predictor.detect([image], "red circle")
    with pytest.raises(ValueError, match="pad_to"):
        GroundingPredictor(model, tok, test_size=64, pad_to=(32, 32)).detect([image], NAMES)
