"""Task pipelines over saved models: batched, device-aware, images as paths / PIL / ``[3, H, W]`` tensors, boxes in
each original image's pixels.

Example::

    from fiber_models import pipeline

    vqa = pipeline("vqa", "runs/vqa/model")
    vqa(["a.jpg"], ["what color is the circle?"], top_k=3)   # [[("red", 0.91), ("blue", 0.05), ...]]

Tasks (:data:`PIPELINES`): ``zero-shot-detection``, ``phrase-grounding``, ``referring-expression`` (grounding
models), ``vqa``, ``captioning``, ``image-text-scoring`` and ``feature-extraction`` (coarse / retrieval models),
and ``retrieval`` (:class:`RetrievalIndex`: embed a folder of images once, query it with text).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from fiber_models.predictor import GroundingPrediction, GroundingPredictor
from fiber_models.pretrained import FiberPreTrainedModel, load
from fiber_models.processor import FiberProcessor, ImageLike

if TYPE_CHECKING:
    from fiber_models.grounding import GroundingModel

__all__ = [
    "PIPELINES",
    "CaptioningPipeline",
    "FeatureExtractionPipeline",
    "GroundingPipeline",
    "ImageTextScore",
    "ImageTextScoringPipeline",
    "RetrievalHit",
    "RetrievalIndex",
    "VQAPipeline",
    "pipeline",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def _model(model: FiberPreTrainedModel | str | os.PathLike[str], device: Any) -> FiberPreTrainedModel:
    m = load(model, device=device) if isinstance(model, str | os.PathLike) else model
    return m.to(device if device is not None else next(m.parameters()).device).eval()


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _batches(n: int, size: int) -> list[slice]:
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


class _Pipeline:
    """Shared setup: the model (loaded when a path is given), its processor, the device and batch size."""

    model_types: tuple[str, ...] = ()

    def __init__(
        self,
        model: FiberPreTrainedModel | str | os.PathLike[str],
        *,
        processor: FiberProcessor | None = None,
        device: torch.device | str | None = None,
        batch_size: int = 16,
    ) -> None:
        self.model = _model(model, device)
        if self.model_types and self.model.model_type not in self.model_types:
            raise ValueError(
                f"{type(self).__name__} needs a model of type {' or '.join(self.model_types)}, "
                f"got {self.model.model_type!r}"
            )
        self.processor = processor or FiberProcessor.for_model(self.model)
        self.device = _device(self.model)
        self.batch_size = batch_size


@dataclass(frozen=True)
class ImageTextScore:
    """Scores of one (image, text) pair: ``itc`` cosine similarity, ``itm`` fused match probability."""

    itc: float
    itm: float


class ImageTextScoringPipeline(_Pipeline):
    """ITC similarity and ITM match probability of (image, text) pairs (coarse and retrieval models)."""

    model_types = ("coarse", "retrieval")

    @torch.no_grad()
    def __call__(self, images: Sequence[ImageLike], texts: Sequence[str]) -> list[ImageTextScore]:
        """One :class:`ImageTextScore` per aligned pair ``(images[i], texts[i])``."""
        if len(images) != len(texts):
            raise ValueError(f"got {len(images)} images but {len(texts)} texts (one per image expected)")
        out: list[ImageTextScore] = []
        m: Any = self.model
        for sl in _batches(len(images), self.batch_size):
            b = self.processor(images=list(images[sl]), text=list(texts[sl])).to(self.device)
            assert b.pixel_values is not None
            itc = (m.embed_images(b.pixel_values).float() * m.embed_texts(b.text).float()).sum(-1)
            logits = m.itm_score.logits(m.projection(m.backbone(b.pixel_values, b.text, fuse=True)).cls)
            itm = logits.float().softmax(-1)[:, 1]
            out += [ImageTextScore(float(c), float(t)) for c, t in zip(itc.cpu().tolist(), itm.cpu().tolist())]
        return out


class FeatureExtractionPipeline(_Pipeline):
    """Normalised ITC embeddings ``[N, D]`` of images or texts (coarse and retrieval models)."""

    model_types = ("coarse", "retrieval")

    @torch.no_grad()
    def images(self, images: Sequence[ImageLike]) -> Tensor:
        """``[N, D]`` float32 image embeddings on the CPU."""
        m: Any = self.model
        parts: list[Tensor] = []
        for sl in _batches(len(images), self.batch_size):
            pixels = self.processor(images=list(images[sl])).pixel_values
            assert pixels is not None  # images were given
            parts.append(m.embed_images(pixels.to(self.device)).float().cpu())
        return torch.cat(parts) if parts else torch.zeros((0, m.itc.embed_dim))

    @torch.no_grad()
    def texts(self, texts: Sequence[str]) -> Tensor:
        """``[N, D]`` float32 text embeddings on the CPU."""
        m: Any = self.model
        parts = [
            m.embed_texts(self.processor(text=list(texts[sl])).to(self.device).text).float().cpu()
            for sl in _batches(len(texts), self.batch_size)
        ]
        return torch.cat(parts) if parts else torch.zeros((0, m.itc.embed_dim))

    def __call__(self, images: Sequence[ImageLike] | None = None, texts: Sequence[str] | None = None) -> Tensor:
        """Embeddings of ``images`` or of ``texts`` (exactly one of them)."""
        if (images is None) == (texts is None):
            raise ValueError("pass images=... or texts=... (one of them)")
        return self.images(images) if images is not None else self.texts(texts or [])


class VQAPipeline(_Pipeline):
    """Top-k answers with their probabilities (sigmoid of the answer logits: the head is trained with BCE)."""

    model_types = ("vqa",)

    @torch.no_grad()
    def __call__(
        self, images: Sequence[ImageLike], questions: Sequence[str], *, top_k: int = 5
    ) -> list[list[tuple[str, float]]]:
        """Per ``(images[i], questions[i])`` the ``top_k`` ``(answer, probability)``, best first.

        Raises:
            ValueError: the model carries no answer list (e.g. a converted checkpoint: set ``model.answers``).
        """
        if len(images) != len(questions):
            raise ValueError(f"got {len(images)} images but {len(questions)} questions (one per image expected)")
        m: Any = self.model
        if not m.answers:
            raise ValueError("this VQA model has no answer list; set model.answers (one string per classifier row)")
        out: list[list[tuple[str, float]]] = []
        for sl in _batches(len(images), self.batch_size):
            b = self.processor(images=list(images[sl]), text=list(questions[sl])).to(self.device)
            probs = m.answer_logits(b.pixel_values, b.text).float().sigmoid().cpu()
            top = torch.topk(probs, min(top_k, probs.shape[1]), dim=1)
            for vals, idx in zip(top.values.tolist(), top.indices.tolist()):
                out.append([(m.answers[i], float(v)) for v, i in zip(vals, idx)])
        return out


class CaptioningPipeline(_Pipeline):
    """Beam-search captions (``beam_size`` 1 decodes greedily)."""

    model_types = ("caption",)

    @torch.no_grad()
    def __call__(self, images: Sequence[ImageLike], *, beam_size: int | None = None) -> list[str]:
        """One caption per image (``beam_size`` default: the model's setting)."""
        m: Any = self.model
        out: list[str] = []
        for sl in _batches(len(images), self.batch_size):
            pixels = self.processor(images=list(images[sl])).pixel_values
            assert pixels is not None  # images were given
            tokens = m.generate(pixels.to(self.device), beam_size=beam_size)
            out += [self.processor.decode(row) for row in tokens.cpu()]
        return out


class GroundingPipeline:
    """Zero-shot detection (class names), phrase grounding and referring expressions with a grounding model,
    through :class:`fiber_models.predictor.GroundingPredictor` (boxes in original image pixels).

    Args:
        model: a grounding model or its directory.
        task: ``zero-shot-detection`` (text: a list of class names per call), ``phrase-grounding`` (a caption
            or a :class:`fiber_data.Prompt` per image) or ``referring-expression`` (one expression per image;
            the best box answers it).
        device / batch_size: where and how many images per forward.
        **predictor_kwargs: :class:`GroundingPredictor` settings (``postprocess``, ``pad_to``, ...).
    """

    def __init__(
        self,
        model: Any,
        task: str = "zero-shot-detection",
        *,
        device: torch.device | str | None = None,
        batch_size: int = 4,
        **predictor_kwargs: Any,
    ) -> None:
        if task not in ("zero-shot-detection", "phrase-grounding", "referring-expression"):
            raise ValueError(f"unknown grounding task {task!r}")
        m = _model(model, device)
        if m.model_type != "grounding":
            raise ValueError(f"{task} needs a grounding model, got {m.model_type!r}")
        processor = FiberProcessor.for_model(m)
        kwargs: dict[str, Any] = {**processor.preprocessing.grounding_kwargs(), **predictor_kwargs}
        self.task = task
        self.batch_size = batch_size
        grounding_model = cast("GroundingModel", m)  # model_type "grounding" (checked above)
        self.predictor = GroundingPredictor(grounding_model, processor.tokenizer, device=_device(m), **kwargs)
        self.model = m

    def __call__(self, images: Sequence[ImageLike], text: Any) -> list[GroundingPrediction]:
        """Detections per image.

        Args:
            images: the images.
            text: detection: the class names (same for every image); grounding / referring: one caption (or
                :class:`fiber_data.Prompt`) per image.
        """
        out: list[GroundingPrediction] = []
        for sl in _batches(len(images), self.batch_size):
            if self.task == "zero-shot-detection":
                out += self.predictor.detect(list(images[sl]), list(text))
            else:
                out += self.predictor.predict(list(images[sl]), list(text[sl]))
        if self.task == "referring-expression":
            out = [
                GroundingPrediction(p.boxes[:1], p.scores[:1], p.labels[:1], p.phrases[:1], p.label_names, p.image_size)
                for p in out
            ]
        return out


@dataclass(frozen=True)
class RetrievalHit:
    """One retrieved image: its path, ITC similarity and (after re-ranking) ITM match probability."""

    path: str
    itc: float
    itm: float | None = None


class RetrievalIndex:
    """Text -> image retrieval over a folder: the images are embedded once (ITC), saved, and queried.

    Args:
        model: a coarse or retrieval model (or its directory).
        device / batch_size: inference settings.
    """

    def __init__(self, model: Any, *, device: torch.device | str | None = None, batch_size: int = 16) -> None:
        self.features = FeatureExtractionPipeline(model, device=device, batch_size=batch_size)
        self.paths: list[str] = []
        self.embeddings = torch.zeros((0, 0))

    def add_folder(self, folder: str | os.PathLike[str]) -> RetrievalIndex:
        """Embed every image file of ``folder`` (sorted by name, recursively); returns ``self``.

        Raises:
            FileNotFoundError: ``folder`` holds no image file.
        """
        root = Path(folder)
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise FileNotFoundError(f"{root}: no image files ({', '.join(IMAGE_SUFFIXES)})")
        emb = self.features.images([str(f) for f in files])
        self.paths += [str(f) for f in files]
        self.embeddings = emb if self.embeddings.numel() == 0 else torch.cat([self.embeddings, emb])
        return self

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``index.safetensors`` (embeddings ``[N, D]``) and ``index.json`` (image paths) into ``path``."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        save_file({"embeddings": self.embeddings.contiguous()}, str(out / "index.safetensors"))
        (out / "index.json").write_text(json.dumps({"paths": self.paths}, indent=1) + "\n")
        return out

    def load(self, path: str | os.PathLike[str]) -> RetrievalIndex:
        """Read an index written by :meth:`save`; returns ``self``.

        Raises:
            ValueError: the index's embedding width differs from the model's.
        """
        src = Path(path)
        emb = load_file(str(src / "index.safetensors"))["embeddings"]
        paths = json.loads((src / "index.json").read_text())["paths"]
        if len(paths) != emb.shape[0]:
            raise ValueError(f"{src}: {len(paths)} paths but {emb.shape[0]} embeddings")
        self.paths, self.embeddings = list(paths), emb
        return self

    @torch.no_grad()
    def search(self, query: str, *, top_k: int = 5, rerank: bool = False) -> list[RetrievalHit]:
        """The ``top_k`` images for ``query`` by ITC similarity; with ``rerank`` the hits are re-ordered by the
        fused ITM match probability."""
        if not self.paths:
            raise ValueError("the index is empty: add_folder() or load() first")
        q = self.features.texts([query])[0]
        sims = self.embeddings.float() @ q
        top = torch.topk(sims, min(top_k, sims.numel()))
        hits = [RetrievalHit(self.paths[i], float(s)) for s, i in zip(top.values.tolist(), top.indices.tolist())]
        if not rerank:
            return hits
        scorer = ImageTextScoringPipeline(self.features.model, processor=self.features.processor)
        scores = scorer([h.path for h in hits], [query] * len(hits))
        ranked = [RetrievalHit(h.path, h.itc, s.itm) for h, s in zip(hits, scores)]
        return sorted(ranked, key=lambda h: -(h.itm or 0.0))


PIPELINES: dict[str, Any] = {
    "zero-shot-detection": GroundingPipeline,
    "phrase-grounding": GroundingPipeline,
    "referring-expression": GroundingPipeline,
    "vqa": VQAPipeline,
    "captioning": CaptioningPipeline,
    "image-text-scoring": ImageTextScoringPipeline,
    "feature-extraction": FeatureExtractionPipeline,
    "retrieval": RetrievalIndex,
}
"""Task name -> pipeline class."""


def pipeline(
    task: str,
    model: FiberPreTrainedModel | str | os.PathLike[str],
    *,
    device: torch.device | str | None = None,
    **kw: Any,
) -> Any:
    """The pipeline of ``task`` (see :data:`PIPELINES`) over ``model`` (a loaded model or a saved directory).

    Raises:
        ValueError: an unknown task or a model of the wrong type.
    """
    if task not in PIPELINES:
        raise ValueError(f"unknown pipeline task {task!r}; known: {sorted(PIPELINES)}")
    cls = PIPELINES[task]
    if cls is GroundingPipeline:
        return cls(model, task, device=device, **kw)
    return cls(model, device=device, **kw)
