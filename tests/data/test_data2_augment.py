"""Coarse fine-tuning augmentation, fine-stage box/caption transforms, and box properties through every step.

Box properties are checked against a rendered box mask: a box in the "+1" convention covers the integer pixels
``x1..x2`` x ``y1..y2``; transforming the mask with numpy/PIL and taking its tight box must give what the box
function computes (seeded randomized loops; hypothesis is not installed).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fiber_data import (
    CoarseTrainTransform,
    GroundingBatch,
    GroundingCollator,
    GroundingTransform,
    MdetrGroundingDataset,
    RandAugment,
    crop_boxes,
    flip_caption,
    pad_boxes,
)
from fiber_data.images.augment import RANDAUGMENT_OPS, random_resized_crop_params
from fiber_data.images.transforms import hflip_boxes, resize_boxes
from fiber_data.text.left_right import mentions_left_right


def _mask(box: np.ndarray, width: int, height: int) -> np.ndarray:
    m = np.zeros((height, width), dtype=bool)
    x1, y1, x2, y2 = (int(v) for v in box)
    m[y1 : y2 + 1, x1 : x2 + 1] = True
    return m


def _tight(mask: np.ndarray) -> np.ndarray | None:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float32)


def _random_box(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    x1, x2 = sorted(rng.choice(width, 2, replace=False))
    y1, y2 = sorted(rng.choice(height, 2, replace=False))
    return np.array([x1, y1, x2, y2], dtype=np.float32)


# ------------------------------------------------------------------------------------------------- box properties


def test_flip_and_pad_match_the_rendered_mask() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        w, h = int(rng.integers(3, 60)), int(rng.integers(3, 60))
        box = _random_box(rng, w, h)
        mask = _mask(box, w, h)
        flipped = hflip_boxes(torch.from_numpy(box)[None], w)[0].numpy()
        tight = _tight(mask[:, ::-1])
        assert tight is not None and np.array_equal(flipped, tight)
        # Flipping twice is the identity.
        assert np.array_equal(hflip_boxes(torch.from_numpy(flipped)[None], w)[0].numpy(), box)
        bottom, right = int(rng.integers(0, 20)), int(rng.integers(0, 20))
        padded = np.pad(mask, ((0, bottom), (0, right)))
        tight = _tight(padded)
        assert tight is not None and np.array_equal(
            pad_boxes(torch.from_numpy(box)[None], (bottom, right))[0].numpy(), tight
        )


def test_crop_clips_and_drops_degenerate_boxes_like_the_mask() -> None:
    rng = np.random.default_rng(1)
    dropped_total = 0
    for _ in range(200):
        w, h = int(rng.integers(8, 50)), int(rng.integers(8, 50))
        boxes = np.stack([_random_box(rng, w, h) for _ in range(4)])
        cw, ch = int(rng.integers(2, w + 1)), int(rng.integers(2, h + 1))
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        out, keep = crop_boxes(torch.from_numpy(boxes), (left, top, cw, ch))
        assert out.shape == (int(keep.sum()), 4)
        dropped_total += int((~keep).sum())
        kept = iter(out.numpy())
        for k, box in enumerate(boxes):
            cropped = _mask(box, w, h)[top : top + ch, left : left + cw]
            ref = _tight(cropped)
            if keep[k]:
                assert ref is not None and np.array_equal(next(kept), ref)
            else:
                # Dropped: nothing left, or a single row/column (x2 <= x1 or y2 <= y1 in the "+1" convention).
                assert ref is None or ref[2] == ref[0] or ref[3] == ref[1]
    assert dropped_total > 20  # the loop exercises dropping


def test_resize_matches_the_mask_within_one_scaled_pixel() -> None:
    rng = np.random.default_rng(2)
    for _ in range(100):
        w, h = int(rng.integers(4, 40)), int(rng.integers(4, 40))
        nw, nh = int(rng.integers(4, 80)), int(rng.integers(4, 80))
        box = _random_box(rng, w, h)
        mask = Image.fromarray(_mask(box, w, h).astype(np.uint8) * 255).resize((nw, nh), Image.Resampling.NEAREST)
        ref = _tight(np.asarray(mask) > 0)
        got = resize_boxes(torch.from_numpy(box)[None], (w, h), (nw, nh))[0].numpy()
        if ref is None:  # a thin box can vanish when shrinking
            continue
        sx, sy = nw / w, nh / h
        # NEAREST sampling moves an edge by up to one source pixel (sx) when enlarging, one output pixel when shrinking.
        assert np.all(np.abs(got - ref) <= np.maximum(np.array([sx, sy, sx, sy]), 1.0) + 1.0)


def test_grounding_transform_boxes_follow_the_drawn_object() -> None:
    rng = np.random.default_rng(3)
    for trial in range(12):
        w, h = int(rng.integers(30, 80)), int(rng.integers(30, 80))
        box = _random_box(rng, w, h)
        box[2:] = np.maximum(box[2:], box[:2] + 4)
        box[2], box[3] = min(box[2], w - 1), min(box[3], h - 1)
        array = np.zeros((h, w, 3), dtype=np.uint8)
        array[_mask(box, w, h)] = 255
        transform = GroundingTransform(
            (int(rng.integers(20, 90)),),
            max_size=120,
            flip_prob=float(trial % 2),
            bgr255=False,
            mean=(0, 0, 0),
            std=(1, 1, 1),
        )
        pixels, out = transform(Image.fromarray(array), torch.from_numpy(box)[None])
        ref = _tight(pixels[0].numpy() > 0.5)
        assert ref is not None
        sx, sy = pixels.shape[2] / w, pixels.shape[1] / h
        assert np.all(np.abs(out[0].numpy() - ref) <= np.array([sx, sy, sx, sy]) + 1.0), (trial, out, ref)


def test_collator_pads_with_a_pixel_mask_and_keeps_boxes(tokenizer) -> None:
    from fiber_data import GroundingSample

    samples = [
        GroundingSample(
            k,
            torch.full((3, h, w), 1.0 + k),
            "a red circle",
            torch.tensor([[1.0, 2.0, 5.0, 7.0]]),
            torch.tensor([1]),
            (((2, 12),),),
            (h, w),
            k,
        )
        for k, (h, w) in enumerate([(13, 20), (17, 9)])
    ]
    batch = GroundingCollator(tokenizer, max_length=16, size_divisibility=8)(samples)
    assert isinstance(batch, GroundingBatch)
    assert batch.pixel_values.shape == (2, 3, 24, 24) and batch.pixel_mask is not None
    assert batch.pixel_mask.shape == (2, 24, 24) and batch.pixel_mask.dtype == torch.bool
    for k, s in enumerate(samples):
        h, w = s.image.shape[1:]
        assert int(batch.pixel_mask[k].sum()) == h * w and bool(batch.pixel_mask[k, :h, :w].all())
        assert torch.equal(batch.pixel_values[k][:, ~batch.pixel_mask[k]], torch.zeros(3, 24 * 24 - h * w))
        assert torch.equal(batch.targets[k].boxes, s.boxes)
    assert batch.to("cpu").pixel_mask is not None


# ------------------------------------------------------------------------------------------ captions on a flip


def test_flip_caption_swaps_words_and_moves_spans() -> None:
    caption = "the red circle on the left, Left of the Right square; RIGHT. leftover"
    spans = [[(4, 14)], [(22, 26)], [(28, 32), (40, 45)], [(46, 52)], [(54, 59)], [(61, 69)]]
    text, moved = flip_caption(caption, spans)
    assert text == "the red circle on the right, Right of the Left square; LEFT. leftover"
    got = [[text[s:e] for s, e in box] for box in moved]
    assert got == [["red circle"], ["right"], ["Right", "Left"], ["square"], ["LEFT"], ["leftover"]]
    assert flip_caption(text, moved) == (caption, tuple(tuple(b) for b in spans))
    assert mentions_left_right("to the LEFT") and not mentions_left_right("leftover bright")
    assert mentions_left_right("the rightmost cup")
    text, ((span,),) = flip_caption("the Leftmost cup and the RIGHTMOST one", [[(4, 12)]])
    assert text == "the Rightmost cup and the LEFTMOST one" and text[span[0] : span[1]] == "Rightmost"


def test_flip_caption_random_word_sequences() -> None:
    rng = np.random.default_rng(4)
    vocab = ["left", "right", "Left", "RIGHT", "red", "circle", "bright", "lefty", "a"]
    swap = {"left": "right", "right": "left", "Left": "Right", "RIGHT": "LEFT"}
    for _ in range(100):
        words = [vocab[int(i)] for i in rng.integers(len(vocab), size=int(rng.integers(1, 12)))]
        caption = " ".join(words)
        starts = np.cumsum([0] + [len(x) + 1 for x in words[:-1]])
        spans = [[(int(starts[i]), int(starts[i] + len(words[i])))] for i in range(len(words))]
        text, moved = flip_caption(caption, spans)
        assert text == " ".join(swap.get(x, x) for x in words)
        assert [text[s:e] for ((s, e),) in moved] == [swap.get(x, x) for x in words]


def test_transform_sample_flip_text_modes() -> None:
    image = Image.fromarray(np.arange(20 * 30 * 3, dtype=np.uint8).reshape(20, 30, 3))
    boxes = torch.tensor([[2.0, 3.0, 10.0, 12.0]])
    caption, spans = "the circle on the left", [[(4, 10)], [(18, 22)]]
    kw = {"min_sizes": (20,), "max_size": None, "flip_prob": 1.0}
    plain = GroundingTransform(flip_prob=0.0, min_sizes=(20,), max_size=None)(image, boxes)
    _, b_keep, c_keep, s_keep = GroundingTransform(**kw).transform_sample(image, boxes, caption, spans)
    assert c_keep == caption and s_keep == ((((4, 10),), ((18, 22),)))
    assert torch.equal(b_keep, hflip_boxes(boxes, 30))
    px_skip, b_skip, c_skip, _ = GroundingTransform(**kw, flip_text="skip").transform_sample(
        image, boxes, caption, spans
    )
    assert c_skip == caption and torch.equal(b_skip, boxes) and torch.equal(px_skip, plain[0])
    _, b_other, _, _ = GroundingTransform(**kw, flip_text="skip").transform_sample(image, boxes, "a circle", [])
    assert torch.equal(b_other, hflip_boxes(boxes, 30))  # nothing left/right: flipped as usual
    _, b_swap, c_swap, s_swap = GroundingTransform(**kw, flip_text="swap").transform_sample(
        image, boxes, caption, spans
    )
    assert c_swap == "the circle on the right" and c_swap[slice(*s_swap[1][0])] == "right"
    assert torch.equal(b_swap, hflip_boxes(boxes, 30))
    with pytest.raises(ValueError, match="flip_text"):
        GroundingTransform(flip_text="mirror")  # pyright: ignore[reportArgumentType]  # invalid on purpose


def test_grounding_dataset_swaps_left_right_on_flip(tmp_path: Path) -> None:
    Image.new("RGB", (40, 30), (9, 9, 9)).save(tmp_path / "im.png")
    ann = {
        "images": [{"id": 1, "file_name": "im.png", "height": 30, "width": 40, "caption": "the cat on the left"}],
        "annotations": [{"id": 1, "image_id": 1, "bbox": [2, 3, 10, 10], "tokens_positive": [[4, 7], [15, 19]]}],
    }
    (tmp_path / "g.json").write_text(json.dumps(ann))
    t = GroundingTransform((30,), max_size=None, flip_prob=1.0, flip_text="swap")
    sample = MdetrGroundingDataset(tmp_path / "g.json", tmp_path, t)[0]
    assert sample.caption == "the cat on the right"
    assert [sample.caption[s:e] for s, e in sample.tokens_positive[0]] == ["cat", "right"]
    assert sample.boxes.tolist() == [[40 - 11 - 1, 3.0, 40 - 2 - 1, 12.0]]


# ------------------------------------------------------------------------------------ coarse fine-tuning (§2.1)


def test_random_resized_crop_params_respect_scale_and_ratio() -> None:
    g = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(5)
    for _ in range(300):
        w, h = int(rng.integers(40, 200)), int(rng.integers(40, 200))
        left, top, cw, ch = random_resized_crop_params(w, h, (0.5, 1.0), generator=g)
        assert left >= 0 and left + cw <= w and top >= 0 and top + ch <= h
        if 3 / 4 <= w / h <= 4 / 3:
            assert 0.5 - 0.03 <= cw * ch / (w * h) <= 1.0
            assert 3 / 4 - 0.04 <= cw / ch <= 4 / 3 + 0.04
    # Impossible draws fall back to the centred crop with the ratio clamped.
    assert random_resized_crop_params(400, 10, (0.99, 1.0), generator=g) == (193, 0, 13, 10)


def test_coarse_transform_crops_and_flips_where_it_says() -> None:
    ramp = np.tile(np.arange(200, dtype=np.uint8)[None, :, None], (60, 1, 3))  # value = x
    image = Image.fromarray(ramp)
    for flip in (0.0, 1.0):
        g = torch.Generator().manual_seed(11)
        t = CoarseTrainTransform(
            32, flip_prob=flip, use_randaugment=False, mean=(0, 0, 0), std=(1 / 255,) * 3, generator=g
        )
        out = t(image)
        assert out.shape == (3, 32, 32)
        left, _, cw, _ = random_resized_crop_params(200, 60, (0.5, 1.0), generator=torch.Generator().manual_seed(11))
        expected = left + (np.arange(32) + 0.5) * cw / 32 - 0.5
        if flip:
            expected = expected[::-1]
        assert np.allclose(out[0, 16, 2:-2].numpy(), expected[2:-2], atol=1.0)


def test_randaugment_operations_numbers() -> None:
    rng = np.random.default_rng(6)
    array = rng.integers(50, 101, size=(16, 20, 3), dtype=np.uint8)
    image = Image.fromarray(array)
    g = torch.Generator().manual_seed(0)
    assert np.array_equal(np.asarray(RANDAUGMENT_OPS["Identity"](image, 7, g)), array)
    bright = np.asarray(RANDAUGMENT_OPS["Brightness"](image, 7, g)).astype(float)
    assert np.abs(bright - np.clip(array * 1.36, 0, 255)).max() <= 1.0
    auto = np.asarray(RANDAUGMENT_OPS["AutoContrast"](image, 7, g))
    assert auto.min() == 0 and auto.max() >= 254  # stretched to the full range (PIL rounds)
    for name, axis in (("TranslateX", 1), ("TranslateY", 0)):
        out = np.asarray(RANDAUGMENT_OPS[name](image, 7, g)).astype(int)
        grey = np.full_like(array, 128).astype(int)
        shifted = []
        for sign in (1, -1):
            ref = grey.copy()
            src = np.roll(array.astype(int), 7 * sign, axis=axis)
            sl = [slice(None)] * 2
            sl[axis] = slice(7, None) if sign > 0 else slice(None, -7)
            ref[tuple(sl)] = src[tuple(sl)]
            shifted.append(np.array_equal(out, ref))
        assert any(shifted), name
    shear = np.asarray(RANDAUGMENT_OPS["ShearX"](image, 7, g))
    assert np.array_equal(shear[0], array[0])  # row y = 0 does not move under x' = x + 0.21 y
    rotated = np.asarray(RANDAUGMENT_OPS["Rotate"](Image.new("RGB", (21, 21), (7, 7, 7)), 7, g))
    assert rotated[0, 0].tolist() == [128, 128, 128] and rotated[10, 10].tolist() == [7, 7, 7]


def test_randaugment_draw_statistics_and_determinism() -> None:
    aug = RandAugment()
    g = torch.Generator().manual_seed(1)
    counts: dict[str, int] = {}
    for _ in range(2000):
        for name in aug.draw(g):
            counts[name] = counts.get(name, 0) + 1
    assert set(counts) == set(RANDAUGMENT_OPS)
    assert all(abs(c / 4000 - 0.1) < 0.025 for c in counts.values())
    single = RandAugment(num_ops=1, ops=("Brightness",))
    image = Image.new("RGB", (4, 4), (100, 100, 100))
    changed = sum(np.asarray(single(image, g))[0, 0, 0] != 100 for _ in range(400))
    assert 160 < changed < 240  # applied with probability 0.5
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8))
    t = CoarseTrainTransform(16)
    a = t.__class__(16, generator=torch.Generator().manual_seed(3))(picture)
    b = t.__class__(16, generator=torch.Generator().manual_seed(3))(picture)
    c = t.__class__(16, generator=torch.Generator().manual_seed(4))(picture)
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="unknown RandAugment"):
        RandAugment(ops=("Solarize",))
