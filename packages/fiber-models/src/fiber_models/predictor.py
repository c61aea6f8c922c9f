"""Batched grounding / detection inference with a fine FIBER model (docs/reference/training.md §4.7).

:class:`GroundingPredictor` is preprocessing (test resize, BGR x 255 normalisation, tokenisation, positive
maps) + the model's fused forward + the shared post-processing, with boxes mapped back to the original
pixels. Per image the text is either a caption (the whole caption is one phrase), a list of class names (a
detection prompt ``"name. name. ..."``), or a :class:`fiber_data.Prompt` (explicit phrases and their character
spans). All images of a call go through **one** batched forward.

Batch padding (docs/reference/architecture.md §2.3): images are zero-padded bottom/right to a common size (a multiple of 32)
and the padding is real input to the fine backbone (window attention and the t2i branch see it), so the
result for an image depends on the other images of the batch. Pass ``pad_to=(H, W)`` to pad every batch to
the same size: predictions are then independent of the batch composition (equal to batch size 1 at the same
padding up to float rounding). Text padding (``text_padding="longest"``) is masked everywhere and does not
change results beyond rounding.

Example::

    predictor = GroundingPredictor.from_run("runs/fine-20261125-010000")
    dets = predictor.detect(["a.jpg", "b.png"], ["red circle", "blue square"])
    dets[0].boxes, dets[0].scores, dets[0].phrases
    refs = predictor.ground([pil_image], ["the small green triangle"])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from safetensors.torch import load_file
from torch import Tensor

from fiber_backbones import TextInputs
from fiber_data import GroundingTransform, Prompt, build_prompt, chunk_prompts, load_tokenizer
from fiber_data.text.spans import positive_map_from_spans
from fiber_heads.grounding import PostprocessConfig
from fiber_models.grounding import EMA_WEIGHTS, GroundingModel
from fiber_models.pretrained import ModelFormatError, Preprocessing, resolve_model_dir, strict_load
from fiber_models.processor import ImageLike, to_pil

"""A PIL image, an image file path, or a ``[3, H, W]`` RGB tensor (``uint8``, or float in ``[0, 1]``)."""
TextQuery = str | Sequence[str] | Prompt
"""A caption (one phrase: the whole caption), a list of class names, or a :class:`fiber_data.Prompt`."""


@dataclass(frozen=True)
class GroundingPrediction:
    """Predictions for one image.

    Attributes:
        boxes: ``float [D, 4]`` xyxy boxes ("+1" convention) in original-image pixels, by descending score.
        scores: ``float [D]`` ``sqrt(phrase score * sigmoid(centerness))``.
        labels: ``long [D]`` index of the phrase/class of each box in :attr:`label_names`.
        phrases: ``D`` strings, the phrase/class name of each box.
        label_names: the query's phrases/classes, in label order.
        image_size: ``(height, width)`` of the original image.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    phrases: tuple[str, ...]
    label_names: tuple[str, ...]
    image_size: tuple[int, int]

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def boxes_for(self, label: int) -> Tensor:
        """``[K, 4]`` boxes of one phrase/class, best first (the first is the referring-expression answer)."""
        return self.boxes[self.labels == label]


@dataclass(frozen=True)
class _Query:
    names: tuple[str, ...]
    prompts: tuple[Prompt, ...]  # one per forward row (several when a class list is chunked)


class GroundingPredictor:
    """Run a :class:`~fiber_models.grounding.GroundingModel` on images and text queries.

    Args:
        model: the fine model (put in eval mode and moved to ``device``).
        tokenizer: the tokenizer it was trained with (any :class:`fiber_data.Tokenizer`).
        test_size: shorter side of the test resize (800 in the reference).
        max_size: cap on the longer side (1333).
        max_text_len: token budget of a prompt, ``<s>``/``</s>`` included (256). Class lists that do not fit
            are split into several prompts (rows of the same forward); a caption that does not fit is an error.
        text_padding: ``"max_length"`` (reference: always ``max_text_len``) or ``"longest"``.
        size_divisibility: images are padded to a multiple of this (32).
        pad_to: pad every batch to this ``(height, width)`` (rounded up to ``size_divisibility``), making
            results independent of the other images of the batch; ``None`` pads to the batch maximum.
        bgr255: the reference normalisation (BGR x 255); ``False`` for RGB in ``[0, 1]`` with ImageNet stats.
        postprocess: thresholds (detection defaults; see :class:`fiber_heads.grounding.PostprocessConfig`).
        classes_per_prompt: split a class list into prompts of at most this many names even when they fit in
            ``max_text_len`` (LVIS evaluation: 40, docs/reference/evaluation.md §9); post-processing, NMS and the
            ``detections_per_img`` cap then apply per prompt, and the results of all prompts are concatenated.
        device: inference device.
    """

    def __init__(
        self,
        model: GroundingModel,
        tokenizer: Any,
        *,
        test_size: int = 800,
        max_size: int | None = 1333,
        max_text_len: int = 256,
        text_padding: Literal["max_length", "longest"] = "max_length",
        size_divisibility: int = 32,
        pad_to: tuple[int, int] | None = None,
        bgr255: bool = True,
        postprocess: PostprocessConfig | None = None,
        classes_per_prompt: int | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        if max_text_len < 3:
            raise ValueError(f"max_text_len must be >= 3, got {max_text_len}")
        if classes_per_prompt is not None and classes_per_prompt < 1:
            raise ValueError(f"classes_per_prompt must be >= 1 or None, got {classes_per_prompt}")
        self.classes_per_prompt = classes_per_prompt
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.transform = GroundingTransform((test_size,), max_size, 0.0, train=False, bgr255=bgr255)
        self.max_text_len = max_text_len
        self.text_padding: Literal["max_length", "longest"] = text_padding
        self.size_divisibility = size_divisibility
        self.pad_to = pad_to
        self.postprocess = postprocess or PostprocessConfig()
        self._token_cache: dict[str, int] = {}

    @classmethod
    def from_run(
        cls,
        path: str | PathLike[str],
        *,
        use_ema: bool = False,
        device: torch.device | str = "cpu",
        tokenizer: Any = None,
        **overrides: Any,
    ) -> GroundingPredictor:
        """Load the model exported by a finished run (``RUN`` or ``RUN/model``).

        Args:
            path: run directory or model directory.
            use_ema: use the EMA weights (the run must have been trained with ``optim.ema_decay > 0``).
            device: inference device.
            tokenizer: override the tokenizer (default: ``model/tokenizer.json``, else the training config's).
            **overrides: constructor arguments replacing the exported preprocessing settings
                (``test_size``, ``pad_to``, ``postprocess``, ...).

        Raises:
            fiber_models.ModelFormatError: the checkpoint is not a grounding model, or its weights do not fit.
            FileNotFoundError: not an exported model, or no tokenizer found.
        """
        model_dir = resolve_model_dir(Path(path))
        model = GroundingModel.from_pretrained(model_dir)
        if use_ema:
            ema = model_dir / EMA_WEIGHTS
            if not ema.is_file():
                raise ModelFormatError(f"{model_dir}: no {EMA_WEIGHTS} (the run was trained without EMA)")
            strict_load(model, load_file(str(ema)), source=str(ema))
        if tokenizer is None:
            if model.tokenizer_source is None:
                raise FileNotFoundError(f"{model_dir}: no tokenizer saved with the model; pass tokenizer=...")
            tokenizer = load_tokenizer(model.tokenizer_source)
        pre = model.preprocessing or Preprocessing(resize="shorter_side", bgr255=True, text_padding="max_length")
        kwargs: dict[str, Any] = {**pre.grounding_kwargs(), **overrides}
        return cls(model, tokenizer, device=device, **kwargs)

    # ------------------------------------------------------------------------------------------ queries

    def _count_tokens(self, text: str) -> int:
        if text not in self._token_cache:
            enc = self.tokenizer([text], max_length=4096, padding="longest")
            self._token_cache[text] = int(enc.attention_mask[0].sum()) - 2
        return self._token_cache[text]

    def _query(self, text: TextQuery, index: int) -> _Query:
        if isinstance(text, Prompt):
            names = tuple(text.caption[s:e] for s, e in (text.spans[lab] for lab in text.labels))
            relabelled = Prompt(
                text.caption, tuple(range(len(text.labels))), {i: text.spans[lab] for i, lab in enumerate(text.labels)}
            )
            return _Query(names, (relabelled,))
        if isinstance(text, str):
            if not text.strip():
                raise ValueError(f"text of image {index} is an empty caption")
            return _Query((text,), (Prompt(text, (0,), {0: (0, len(text))}),))
        names = tuple(str(n) for n in text)
        if not names:
            raise ValueError(f"text of image {index} is an empty list of class names")
        label_names = dict(enumerate(names))
        full = build_prompt(list(label_names), label_names)
        few = self.classes_per_prompt is None or len(names) <= self.classes_per_prompt
        if few and self._count_tokens(full.caption) <= self.max_text_len - 2:
            return _Query(names, (full,))
        chunks = chunk_prompts(
            list(label_names),
            label_names,
            self._count_tokens,
            max_tokens=self.max_text_len - 2,
            max_labels=self.classes_per_prompt,
        )
        return _Query(names, tuple(chunks))

    # ------------------------------------------------------------------------------------------- images

    def _load(self, image: ImageLike, index: int) -> Image.Image:
        return to_pil(image, index)

    # ---------------------------------------------------------------------------------------- inference

    @torch.no_grad()
    def predict(
        self, images: Sequence[ImageLike], texts: Sequence[TextQuery], *, config: PostprocessConfig | None = None
    ) -> list[GroundingPrediction]:
        """Predictions for every image with its own text query, in one batched forward.

        Args:
            images: ``N`` images (PIL, paths, or ``[3, H, W]`` RGB tensors).
            texts: ``N`` queries: a caption, a list of class names, or a :class:`fiber_data.Prompt`.
            config: post-processing thresholds for this call (default: the predictor's).

        Returns:
            ``N`` :class:`GroundingPrediction` (boxes in each original image's pixels).

        Raises:
            ValueError: ``len(images) != len(texts)``, an empty or bad query, or a phrase with no token within
                ``max_text_len``.
        """
        if len(images) != len(texts):
            raise ValueError(f"got {len(images)} images but {len(texts)} text queries (one per image expected)")
        if not images:
            return []
        queries = [self._query(t, i) for i, t in enumerate(texts)]
        pils = [self._load(im, i) for i, im in enumerate(images)]
        pixels = [self.transform(im, torch.zeros((0, 4)))[0] for im in pils]

        # one forward row per (image, prompt chunk)
        rows = [(i, p) for i, q in enumerate(queries) for p in q.prompts]
        enc = self.tokenizer([p.caption for _, p in rows], max_length=self.max_text_len, padding=self.text_padding)
        length = enc.input_ids.shape[1]
        num_labels = max(len(q.names) for q in queries)
        positive = torch.zeros((len(rows), num_labels, length), dtype=torch.float32)
        for r, (i, p) in enumerate(rows):
            pm = positive_map_from_spans(enc, [[p.spans[lab]] for lab in p.labels], batch_index=r, normalize=False)
            empty = [queries[i].names[lab] for lab, row in zip(p.labels, pm) if not bool(row.any())]
            if empty:
                raise ValueError(
                    f"image {i}: phrase(s) {empty[:3]} have no token within max_text_len={self.max_text_len} "
                    "(caption too long, or a span that covers only white space)"
                )
            # label ids of a prompt are the query's class indices, so chunks land in their own columns
            positive[r, list(p.labels)] = pm

        d = self.size_divisibility
        hp = max(int(pixels[i].shape[1]) for i, _ in rows)
        wp = max(int(pixels[i].shape[2]) for i, _ in rows)
        if self.pad_to is not None:
            if self.pad_to[0] < hp or self.pad_to[1] < wp:
                raise ValueError(f"pad_to={self.pad_to} is smaller than a resized image ({hp} x {wp})")
            hp, wp = self.pad_to
        hp, wp = math.ceil(hp / d) * d, math.ceil(wp / d) * d
        batch = torch.zeros((len(rows), 3, hp, wp), dtype=torch.float32)
        for r, (i, _) in enumerate(rows):
            batch[r, :, : pixels[i].shape[1], : pixels[i].shape[2]] = pixels[i]
        image_sizes = torch.tensor([[pixels[i].shape[1], pixels[i].shape[2]] for i, _ in rows], dtype=torch.long)
        original = torch.tensor([[pils[i].height, pils[i].width] for i, _ in rows], dtype=torch.long)

        dev = self.device
        text = TextInputs(enc.input_ids.to(dev), enc.attention_mask.to(dev))
        dets = self.model.predict(
            batch.to(dev), text, positive.to(dev), image_sizes.to(dev), original.to(dev), config or self.postprocess
        )

        out: list[GroundingPrediction] = []
        for i, q in enumerate(queries):
            mine = [dets[r] for r, (j, _) in enumerate(rows) if j == i]
            boxes = torch.cat([m.boxes for m in mine]).float().cpu()
            scores = torch.cat([m.scores for m in mine]).float().cpu()
            labels = torch.cat([m.labels for m in mine]).long().cpu()
            order = torch.argsort(scores, descending=True, stable=True)
            boxes, scores, labels = boxes[order], scores[order], labels[order]
            out.append(
                GroundingPrediction(
                    boxes=boxes,
                    scores=scores,
                    labels=labels,
                    phrases=tuple(q.names[int(k)] for k in labels),
                    label_names=q.names,
                    image_size=(pils[i].height, pils[i].width),
                )
            )
        return out

    def detect(
        self, images: Sequence[ImageLike], class_names: Sequence[str], *, config: PostprocessConfig | None = None
    ) -> list[GroundingPrediction]:
        """Detect the same classes in every image (prompt ``"name. name. ..."``, labels index ``class_names``)."""
        if isinstance(class_names, str):
            raise TypeError("class_names must be a list of names; use ground() for a caption")
        names = list(class_names)
        return self.predict(images, [names] * len(images), config=config)

    def ground(
        self, images: Sequence[ImageLike], captions: Sequence[str], *, config: PostprocessConfig | None = None
    ) -> list[GroundingPrediction]:
        """Boxes for one caption per image (the whole caption is one phrase; the first box is the answer of a
        referring expression). Use :meth:`predict` with a :class:`fiber_data.Prompt` for several phrases."""
        return self.predict(images, list(captions), config=config)
