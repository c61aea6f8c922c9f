"""Input preparation built from a saved model's ``config.json`` alone: ``processor(images=..., text=...) -> batch``.

Example::

    processor = FiberProcessor.from_pretrained("runs/coarse-20261204/model")
    batch = processor(images=["a.jpg", pil_image], text=["a red circle", "two dogs"])
    batch.pixel_values.shape     # [2, 3, S, S]
    model.itm_scores(batch.pixel_values, batch.text)
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from fiber_backbones import TextInputs
from fiber_data import GroundingTransform, ImageTransform, load_image, load_tokenizer
from fiber_models.pretrained import Preprocessing, read_model_config, resolve_model_dir

__all__ = ["FiberProcessor", "ImageLike", "ProcessorBatch", "to_pil"]

ImageLike = Image.Image | str | PathLike[str] | Tensor
"""An image given as a PIL image, a file path, or an RGB tensor ``[3, H, W]`` (uint8, or float in ``[0, 1]``)."""


def to_pil(image: ImageLike, index: int = 0) -> Image.Image:
    """An RGB PIL image from a PIL image, a path or a ``[3, H, W]`` RGB tensor (``index`` names it in errors).

    Raises:
        ValueError: a tensor of another shape.
        fiber_data.ImageLoadError: an unreadable file (named).
    """
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"image {index}: tensor must be [3, H, W] RGB, got shape {tuple(image.shape)}")
        arr = image.detach().cpu()
        if arr.is_floating_point():
            arr = (arr.clamp(0, 1) * 255.0).round()
        return Image.fromarray(arr.to(torch.uint8).permute(1, 2, 0).numpy(), mode="RGB")
    return load_image(image, record=f"image {index}")


@dataclass
class ProcessorBatch:
    """A prepared batch.

    Attributes:
        pixel_values: ``[B, 3, H, W]`` (``S x S`` for square resizing; zero-padded to a multiple of
            ``size_divisibility`` for ``shorter_side``), or ``None`` without images.
        input_ids / attention_mask: ``[B, L]`` tokens, or ``None`` without text.
        image_sizes: ``[B, 2]`` ``(h, w)`` of each resized image before padding.
        original_sizes: ``[B, 2]`` ``(h, w)`` of each input image.
    """

    pixel_values: Tensor | None = None
    input_ids: Tensor | None = None
    attention_mask: Tensor | None = None
    image_sizes: Tensor | None = None
    original_sizes: Tensor | None = None

    @property
    def text(self) -> TextInputs:
        """The tokens as :class:`fiber_backbones.TextInputs`.

        Raises:
            ValueError: the batch holds no text.
        """
        if self.input_ids is None or self.attention_mask is None:
            raise ValueError("this batch was prepared without text")
        return TextInputs(self.input_ids, self.attention_mask)

    def to(self, device: torch.device | str) -> ProcessorBatch:
        """A copy with every tensor on ``device``."""
        return ProcessorBatch(*(None if t is None else t.to(device) for t in self._tensors()))

    def _tensors(self) -> tuple[Tensor | None, ...]:
        return (self.pixel_values, self.input_ids, self.attention_mask, self.image_sizes, self.original_sizes)


class FiberProcessor:
    """Image transform + tokenizer of a model, from its saved preprocessing settings.

    Args:
        tokenizer: any :class:`fiber_data.Tokenizer` (called as ``tokenizer(texts, max_length=, padding=)``).
        preprocessing: the model's :class:`fiber_models.Preprocessing`.
    """

    def __init__(self, tokenizer: Any, preprocessing: Preprocessing) -> None:
        self.tokenizer = tokenizer
        self.preprocessing = preprocessing
        p = preprocessing
        if p.resize == "square":
            self.transform: Any = ImageTransform(p.image_size, p.image_mean, p.image_std)
        else:
            self.transform = GroundingTransform((p.test_size,), p.max_size, 0.0, train=False, bgr255=p.bgr255)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> FiberProcessor:
        """The processor of a saved model (its ``config.json`` preprocessing and its tokenizer files).

        Raises:
            FileNotFoundError: no tokenizer was saved with the model.
        """
        model_dir = resolve_model_dir(path)
        config = read_model_config(model_dir)
        pre = Preprocessing.from_dict(config.get("preprocessing", {}))
        if pre.tokenizer and not _has_tokenizer_files(model_dir):
            return cls(load_tokenizer(pre.tokenizer), pre)
        return cls(load_tokenizer(tokenizer_location(model_dir)), pre)

    @classmethod
    def for_model(cls, model: Any) -> FiberProcessor:
        """The processor of a model returned by ``from_pretrained`` (its :attr:`preprocessing` and tokenizer).

        Raises:
            FileNotFoundError: the model carries no tokenizer (build ``FiberProcessor(tokenizer, ...)`` directly).
        """
        pre = model.preprocessing or Preprocessing()
        if model.tokenizer_source is None and pre.tokenizer:
            return cls(load_tokenizer(pre.tokenizer), pre)
        if model.tokenizer_source is None:
            raise FileNotFoundError(
                f"this {type(model).__name__} has no tokenizer saved with it; pass one: FiberProcessor(tokenizer, "
                "model.preprocessing)"
            )
        return cls(load_tokenizer(model.tokenizer_source), pre)

    def images(self, images: Sequence[ImageLike]) -> ProcessorBatch:
        """``pixel_values``, ``image_sizes`` and ``original_sizes`` of ``images``."""
        pils = [to_pil(im, i) for i, im in enumerate(images)]
        original = torch.tensor([[im.height, im.width] for im in pils], dtype=torch.long)
        if self.preprocessing.resize == "square":
            pixels = torch.stack([self.transform(im) for im in pils])
            sizes = torch.tensor([[pixels.shape[2], pixels.shape[3]]] * len(pils), dtype=torch.long)
            return ProcessorBatch(pixel_values=pixels, image_sizes=sizes, original_sizes=original)
        each = [self.transform(im, torch.zeros((0, 4)))[0] for im in pils]
        d = self.preprocessing.size_divisibility
        hp = math.ceil(max(int(p.shape[1]) for p in each) / d) * d
        wp = math.ceil(max(int(p.shape[2]) for p in each) / d) * d
        batch = torch.zeros((len(each), 3, hp, wp), dtype=torch.float32)
        for i, p in enumerate(each):
            batch[i, :, : p.shape[1], : p.shape[2]] = p
        sizes = torch.tensor([[p.shape[1], p.shape[2]] for p in each], dtype=torch.long)
        return ProcessorBatch(pixel_values=batch, image_sizes=sizes, original_sizes=original)

    def text(self, texts: Sequence[str], *, max_length: int | None = None) -> ProcessorBatch:
        """``input_ids`` and ``attention_mask`` of ``texts`` (at most ``max_length`` tokens, default the model's)."""
        if isinstance(texts, str):
            raise TypeError("text must be a list of strings")
        p = self.preprocessing
        enc = self.tokenizer(list(texts), max_length=max_length or p.max_text_len, padding=p.text_padding)
        return ProcessorBatch(input_ids=enc.input_ids, attention_mask=enc.attention_mask)

    def __call__(
        self,
        images: Sequence[ImageLike] | ImageLike | None = None,
        text: Sequence[str] | str | None = None,
        *,
        max_length: int | None = None,
    ) -> ProcessorBatch:
        """Prepare images and/or texts (a single image or string is a batch of one).

        Returns:
            A :class:`ProcessorBatch` with the fields of what was given.
        """
        if images is None and text is None:
            raise ValueError("pass images=..., text=..., or both")
        out = ProcessorBatch()
        if images is not None:
            seq = [images] if isinstance(images, Image.Image | str | PathLike | Tensor) else list(images)
            b = self.images(seq)
            out.pixel_values, out.image_sizes, out.original_sizes = b.pixel_values, b.image_sizes, b.original_sizes
        if text is not None:
            t = self.text([text] if isinstance(text, str) else list(text), max_length=max_length)
            out.input_ids, out.attention_mask = t.input_ids, t.attention_mask
        return out

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        """Token ids -> text (special tokens removed)."""
        ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()


def _has_tokenizer_files(model_dir: Path) -> bool:
    from fiber_models.pretrained import TOKENIZER_FILES

    return any((model_dir / n).is_file() for n in TOKENIZER_FILES)


def tokenizer_location(model_dir: Path) -> Path:
    """The folder of the tokenizer saved with a model (``fiber_data.load_tokenizer`` reads it).

    Raises:
        FileNotFoundError: no tokenizer file in ``model_dir``.
    """
    from fiber_models.pretrained import TOKENIZER_FILES

    if not any((model_dir / n).is_file() for n in TOKENIZER_FILES):
        raise FileNotFoundError(f"{model_dir}: no tokenizer saved with the model (looked for {list(TOKENIZER_FILES)})")
    return model_dir
