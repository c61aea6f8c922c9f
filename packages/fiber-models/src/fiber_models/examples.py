"""Tiny random saved models and example images, for documentation examples and smoke tests (no download).

``tiny_model("vqa", "/tmp/vqa")`` writes a randomly initialised model of that type (a few hundred thousand
parameters, a byte-level tokenizer) in the saved format; its outputs are meaningless but have the real shapes,
so every pipeline runs on it. Use a trained or converted model for real predictions.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from fiber_backbones import create_backbone
from fiber_data import ByteBPETokenizer
from fiber_models.pretrained import MODEL_TYPES, Preprocessing

__all__ = ["example_image", "tiny_model"]

_CAPTIONS = ["a red circle", "a blue square", "a green triangle", "two red circles on the left", "what color is it"]
_SMALL = {
    "swin": {"embed_dim": 8, "num_heads": [1, 1, 1, 1]},
    "text": {"hidden_size": 16, "intermediate_size": 32, "num_heads": 1},
}


def tiny_model(model_type: str, out_dir: str | os.PathLike[str], *, seed: int = 0) -> Path:
    """Write a tiny random model of ``model_type`` (see :data:`fiber_models.MODEL_TYPES`) into ``out_dir``.

    Returns:
        ``out_dir``, loadable with :func:`fiber_models.load`.
    """
    from fiber_models import (
        CaptionModel,
        CaptionSettings,
        CoarseModel,
        GroundingHeadConfig,
        GroundingModel,
        NLVR2Model,
        RetrievalModel,
        VQAModel,
    )

    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown model_type {model_type!r}; known: {sorted(MODEL_TYPES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = ByteBPETokenizer.train(_CAPTIONS * 4, 270)
    tok_file = tok.save(out / "tokenizer.json")
    v = tok.vocab_size
    torch.manual_seed(seed)
    variant = "fine_v2" if model_type == "grounding" else "coarse"
    backbone = create_backbone("fiber-tiny", variant=variant, **{**_SMALL, "text": {**_SMALL["text"], "vocab_size": v}})
    pre = Preprocessing(image_size=64, max_text_len=16)
    model: object
    if model_type == "coarse":
        model = CoarseModel(backbone, v, 16, 16, {"itc": 1.0, "itm": 1.0, "mlm": 1.0})
    elif model_type == "vqa":
        model = VQAModel(backbone, 16, 4)
        model.answers = ("red", "blue", "green", "yes")
    elif model_type == "nlvr2":
        model = NLVR2Model(backbone, 16)
    elif model_type == "retrieval":
        model = RetrievalModel(backbone, 16, 16)
    elif model_type == "caption":
        special = {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id, "mask": tok.mask_token_id}
        model = CaptionModel(backbone, 16, v, special, CaptionSettings(beam_size=2, max_decode_len=8))
    else:
        head = GroundingHeadConfig(
            channels=16, num_groups=8, num_convs=1, anchor_sizes=(32.0, 64.0, 128.0, 256.0, 512.0)
        )
        model = GroundingModel.from_config(backbone, head)
        pre = Preprocessing(resize="shorter_side", test_size=64, max_size=128, max_text_len=32, bgr255=True)
    model.save_pretrained(out, tokenizer=tok_file, preprocessing=pre, info={"example": "tiny random model"})
    return out


def example_image(path: str | os.PathLike[str] | None = None, *, size: tuple[int, int] = (96, 72)) -> Image.Image:
    """A small synthetic RGB image (a red circle and a blue square on grey); saved to ``path`` when given."""
    w, h = size
    image = Image.new("RGB", (w, h), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    draw.ellipse((w * 0.1, h * 0.2, w * 0.45, h * 0.7), fill=(220, 30, 30))
    draw.rectangle((w * 0.55, h * 0.3, w * 0.9, h * 0.8), fill=(30, 30, 220))
    if path is not None:
        image.save(path)
    return image
