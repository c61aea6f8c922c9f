"""Task backends of the web demo and of ``fiber-train predict``: one small object per task,
``(image, text) -> JSON-ready dict``, over saved models (no trainer is imported).

The demo (issue 13) shows five tasks of the reference system: phrase grounding and detection with class names
(docs/reference/training.md §4.7, through :class:`fiber_models.predictor.GroundingPredictor`), VQA (docs/reference/training.md §2.3), captioning
(docs/reference/training.md §2.6, beam search) and image-text scoring (ITM probability and ITC cosine of the coarse model,
docs/reference/training.md §1). Each task is served by a :class:`TaskBackend`; a task whose model or head is not in the given
checkpoints is an :class:`UnavailableBackend` that answers with a clear "not available in this checkpoint" message.

:func:`load_backends` reads saved model directories (``RUN/model`` of any ``fiber-train`` run, or a converted
checkpoint), looks at the ``model_type`` of their ``config.json`` and builds the backends that model can serve.
"""

from __future__ import annotations

import io
import re
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

__all__ = [
    "TASK_LABELS",
    "TASK_ORDER",
    "BackendSet",
    "CaptionBackend",
    "DemoInputError",
    "GroundingBackend",
    "ScoringBackend",
    "TaskBackend",
    "TaskUnavailableError",
    "UnavailableBackend",
    "VQABackend",
    "decode_image",
    "discover_model_dirs",
    "load_backends",
    "parse_class_names",
    "parse_phrases",
]

TASK_ORDER: tuple[str, ...] = ("grounding", "detection", "vqa", "caption", "scoring")
"""Demo task names, in the order the page lists them."""

TASK_LABELS: dict[str, str] = {
    "grounding": "Phrase grounding",
    "detection": "Detection (class names)",
    "vqa": "Visual question answering",
    "caption": "Captioning",
    "scoring": "Image-text scoring",
}
"""Human-readable task names."""

# Which ``model_type`` (config.json) serves which demo tasks, and what to train when it is missing (used in the
# "not available" message).
_SERVES: dict[str, tuple[str, ...]] = {
    "grounding": ("grounding", "detection"),
    "coarse": ("scoring",),
    "retrieval": ("scoring",),
    "vqa": ("vqa",),
    "caption": ("caption",),
}
_NEEDS: dict[str, str] = {
    "grounding": "a grounding head (a `fiber-train fine` or `fiber-train finetune refexp|grounding|detection` run)",
    "detection": "a grounding head (a `fiber-train fine` or `fiber-train finetune refexp|grounding|detection` run)",
    "vqa": "a VQA classifier (a `fiber-train finetune vqa` run)",
    "caption": "a captioning decoder (a `fiber-train finetune caption` run)",
    "scoring": "ITM/ITC heads (a `fiber-train coarse` run)",
}


class DemoInputError(ValueError):
    """Bad user input (not an image, too large, empty text); shown on the page, HTTP 4xx.

    Attributes:
        status: the HTTP status the server answers with (400 bad request, 413 too large).
    """

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class TaskUnavailableError(RuntimeError):
    """The task's model or head is not in the loaded checkpoints (HTTP 409)."""


class TaskBackend(Protocol):
    """One demo task: an image and a text in, a JSON-ready result out.

    Attributes:
        task: the demo task name (one of :data:`TASK_ORDER`).
        source: where the model comes from (model directory), shown on the page.
        available: whether :meth:`run` can answer.
        text_required: whether the task needs a non-empty text.
    """

    task: str
    source: str
    available: bool
    text_required: bool

    def run(self, image: Image.Image, text: str) -> dict[str, Any]:
        """Run the task on one RGB image and the user's text; returns a JSON-serialisable dict."""
        ...


# ---------------------------------------------------------------------------------------------- input


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int, name: str = "upload") -> Image.Image:
    """Decode uploaded bytes into an RGB image, refusing non-images and oversized images.

    The pixel count is read from the header before decoding, so a decompression bomb is refused without
    allocating its pixels.

    Args:
        data: the encoded file.
        max_bytes: largest accepted file size.
        max_pixels: largest accepted ``width * height``.
        name: the file name, used in error messages.

    Returns:
        The fully decoded RGB image.

    Raises:
        DemoInputError: empty, too large (status 413), or not a decodable image (status 400).
    """
    if not data:
        raise DemoInputError(f"{name}: the file is empty")
    if len(data) > max_bytes:
        raise DemoInputError(
            f"{name}: the file is {millions(len(data))} MB; the limit is {millions(max_bytes)} MB", status=413
        )
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
            fmt = probe.format
    except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, SyntaxError...
        raise DemoInputError(f"{name}: not an image (expected PNG, JPEG, WebP, ...)") from exc
    if width * height > max_pixels:
        raise DemoInputError(
            f"{name}: the image is {width} x {height} = {millions(width * height)} MP; the limit is "
            f"{millions(max_pixels)} MP",
            status=413,
        )
    if width < 1 or height < 1:
        raise DemoInputError(f"{name}: the image has no pixels ({width} x {height})")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return im.convert("RGB")
    except Exception as exc:
        raise DemoInputError(f"{name}: cannot decode the {fmt or 'image'} data ({type(exc).__name__}: {exc})") from exc


def millions(n: float) -> str:
    """``n / 1e6`` for messages: one decimal from 1 up, two significant digits below (``0.052``)."""
    v = n / 1e6
    return f"{v:.1f}" if v >= 1 else f"{v:.2g}"


def parse_class_names(text: str) -> list[str]:
    """Class names from the detection text box: separated by commas, periods or new lines; duplicates removed.

    Raises:
        DemoInputError: no class name in ``text``.
    """
    names: list[str] = []
    for part in text.replace("\n", ",").replace(".", ",").split(","):
        name = " ".join(part.split())
        if name and name not in names:
            names.append(name)
    if not names:
        raise DemoInputError("enter at least one class name (e.g. 'red circle, blue square')")
    return names


def parse_phrases(text: str) -> tuple[str, list[tuple[int, int]]]:
    """A grounding caption whose phrases are marked with square brackets.

    ``"[a red circle] left of [the blue square]"`` -> ``("a red circle left of the blue square", [(0, 12),
    (21, 36)])``: the caption without brackets and the character span of every bracketed phrase. Without
    brackets the whole caption is the one phrase. White space is collapsed, and dropped just inside brackets.

    Raises:
        DemoInputError: empty caption, unbalanced or nested brackets, or an empty ``[]`` phrase.
    """
    text = re.sub(r"\s+\]", "]", re.sub(r"\[\s+", "[", _require_text(text, "caption")))
    if "[" not in text and "]" not in text:
        return text, [(0, len(text))]
    caption: list[str] = []
    spans: list[tuple[int, int]] = []
    start: int | None = None
    length = 0
    for ch in text:
        if ch == "[":
            if start is not None:
                raise DemoInputError(f"nested '[' in the caption {text!r}: mark phrases as [a phrase]")
            start = length
        elif ch == "]":
            if start is None:
                raise DemoInputError(f"unmatched ']' in the caption {text!r}")
            if length == start:
                raise DemoInputError(f"an empty [] phrase in the caption {text!r}")
            spans.append((start, length))
            start = None
        else:
            caption.append(ch)
            length += 1
    if start is not None:
        raise DemoInputError(f"unmatched '[' in the caption {text!r}")
    return "".join(caption), spans


def _require_text(text: str, what: str) -> str:
    text = " ".join(text.split())
    if not text:
        raise DemoInputError(f"the {what} is empty: type one in the text box")
    return text


def _round(x: float, nd: int = 4) -> float:
    return float(round(float(x), nd))


# ------------------------------------------------------------------------------------------- backends


@dataclass
class UnavailableBackend:
    """A task that the loaded checkpoints cannot serve; :meth:`run` raises with the reason."""

    task: str
    reason: str
    source: str = ""
    available: bool = False
    text_required: bool = False

    def run(self, image: Image.Image, text: str) -> dict[str, Any]:
        label = TASK_LABELS.get(self.task, self.task)
        raise TaskUnavailableError(f"{label} is not available in this checkpoint: {self.reason}")


class GroundingBackend:
    """Phrase grounding (``task="grounding"``: the whole caption is one phrase, or the phrases marked with
    ``[...]``, see :func:`parse_phrases`) or detection with class names (``task="detection"``), through
    :class:`fiber_models.predictor.GroundingPredictor`.

    Args:
        predictor: a loaded predictor.
        task: ``"grounding"`` or ``"detection"``.
        source: the model directory (shown on the page).
        lock: serialises forwards shared with the other task of the same model.
    """

    text_required = True
    available = True

    def __init__(self, predictor: Any, task: str, source: str = "", lock: threading.Lock | None = None) -> None:
        from fiber_heads.grounding import PostprocessConfig

        if task not in ("grounding", "detection"):
            raise ValueError(f"task must be 'grounding' or 'detection', got {task!r}")
        self.predictor = predictor
        self.task = task
        self.source = source
        self._lock = lock or threading.Lock()
        # grounding = referring-expression settings (threshold 0: the best box always exists, docs/reference/training.md §4.4);
        # detection = the predictor's detection thresholds
        self.postprocess = PostprocessConfig.referring_expressions() if task == "grounding" else predictor.postprocess

    def run(self, image: Image.Image, text: str) -> dict[str, Any]:
        """Boxes ``[x0, y0, x1, y1]`` in image pixels with scores and phrases, best first."""
        if self.task == "grounding":
            from fiber_data import Prompt

            caption, spans = parse_phrases(text)
            query: Any = caption
            prompt = Prompt(caption, tuple(range(len(spans))), dict(enumerate(spans)))
            with self._lock:
                pred = self.predictor.predict([image], [prompt], config=self.postprocess)[0]
        else:
            query = parse_class_names(text)
            with self._lock:
                pred = self.predictor.detect([image], query, config=self.postprocess)[0]
        boxes = [
            {
                "box": [_round(v, 2) for v in b],
                "score": _round(s),
                "label": int(lab),
                "phrase": phrase,
            }
            for b, s, lab, phrase in zip(pred.boxes.tolist(), pred.scores.tolist(), pred.labels.tolist(), pred.phrases)
        ]
        return {
            "boxes": boxes,
            "label_names": list(pred.label_names),
            "query": query,
            "postprocess": {
                "pre_nms_thresh": self.postprocess.pre_nms_thresh,
                "nms_thresh": self.postprocess.nms_thresh,
            },
        }


class VQABackend:
    """Top answers of a VQA model (sigmoid of the answer logits: the head is trained with BCE), through
    :class:`fiber_models.pipelines.VQAPipeline`.

    Args:
        pipeline: the VQA pipeline (its model carries the answer list).
        top_k: answers returned.
        source: the model directory.
    """

    task = "vqa"
    text_required = True
    available = True

    def __init__(self, pipeline: Any, top_k: int = 5, source: str = "") -> None:
        self.pipeline = pipeline
        self.top_k = top_k
        self.source = source
        self._lock = threading.Lock()

    def run(self, image: Image.Image, text: str) -> dict[str, Any]:
        """``{"answers": [{"answer", "score"}], "question"}``, best first."""
        question = _require_text(text, "question")
        with self._lock:
            (top,) = self.pipeline([image], [question], top_k=self.top_k)
        return {"answers": [{"answer": a, "score": _round(p)} for a, p in top], "question": question}


class CaptionBackend:
    """Beam-search captions of a caption model, through :class:`fiber_models.pipelines.CaptioningPipeline`.

    Args:
        pipeline: the captioning pipeline.
        beam_size: beam width (``None``: the model's setting).
        source: the model directory.
    """

    task = "caption"
    text_required = False
    available = True

    def __init__(self, pipeline: Any, beam_size: int | None = None, source: str = "") -> None:
        self.pipeline = pipeline
        self.beam_size = beam_size
        self.source = source
        self._lock = threading.Lock()

    def run(self, image: Image.Image, text: str = "") -> dict[str, Any]:
        """``{"caption": str, "beam_size": int}`` (the text is ignored)."""
        with self._lock:
            (caption,) = self.pipeline([image], beam_size=self.beam_size)
        beam = self.beam_size if self.beam_size is not None else self.pipeline.model.settings.beam_size
        return {"caption": caption, "beam_size": int(beam)}


class ScoringBackend:
    """Image-text scores of a coarse (or retrieval) model for one or more captions (one per line), through
    :class:`fiber_models.pipelines.ImageTextScoringPipeline`.

    ``itm`` is the fused matching probability ``softmax(itm_logits)[1]``; ``itc`` the cosine similarity of the
    dual-encoder embeddings (docs/reference/training.md §1).

    Args:
        pipeline: the scoring pipeline.
        source: the model directory.
        max_captions: most captions scored in one call.
    """

    task = "scoring"
    text_required = True
    available = True

    def __init__(self, pipeline: Any, source: str = "", max_captions: int = 32) -> None:
        self.pipeline = pipeline
        self.source = source
        self.max_captions = max_captions
        self._lock = threading.Lock()

    def run(self, image: Image.Image, text: str) -> dict[str, Any]:
        """``{"captions": [{"text", "itm", "itc"}]}`` in input order, plus the index of the best ITM match."""
        captions = [" ".join(line.split()) for line in text.splitlines()]
        captions = [c for c in captions if c]
        if not captions:
            raise DemoInputError("the caption is empty: type one caption per line")
        if len(captions) > self.max_captions:
            raise DemoInputError(f"{len(captions)} captions; at most {self.max_captions} are scored at once")
        with self._lock:
            scores = self.pipeline([image] * len(captions), captions)
        rows = [{"text": c, "itm": _round(s.itm), "itc": _round(s.itc)} for c, s in zip(captions, scores)]
        best = max(range(len(scores)), key=lambda i: scores[i].itm)
        return {"captions": rows, "best": int(best)}


# -------------------------------------------------------------------------------------------- loading


@dataclass
class BackendSet:
    """The backends of every demo task (available or not) and what was loaded.

    Attributes:
        backends: task name -> backend, for every task of :data:`TASK_ORDER`.
        models: ``[{"path", "task", "serves"}]`` of the loaded model directories.
        samples: example images the page offers (file paths).
    """

    backends: dict[str, TaskBackend]
    models: list[dict[str, Any]] = field(default_factory=list)
    samples: list[Path] = field(default_factory=list)

    def run(self, task: str, image: Image.Image, text: str) -> dict[str, Any]:
        """Run ``task`` and wrap its result with the task, model and timing.

        Raises:
            DemoInputError: unknown task or bad input.
            TaskUnavailableError: the task has no model in the loaded checkpoints.
        """
        if task not in self.backends:
            raise DemoInputError(f"unknown task {task!r}; choose one of {', '.join(TASK_ORDER)}")
        backend = self.backends[task]
        start = time.perf_counter()
        result = backend.run(image, text)
        return {
            "task": task,
            "model": backend.source,
            "image": {"width": image.width, "height": image.height},
            "seconds": _round(time.perf_counter() - start, 3),
            **result,
        }

    def info(self) -> list[dict[str, Any]]:
        """Per task: name, label, availability, reason and whether it needs text (for the page)."""
        out = []
        for name in TASK_ORDER:
            b = self.backends[name]
            out.append(
                {
                    "task": name,
                    "label": TASK_LABELS[name],
                    "available": bool(b.available),
                    "reason": getattr(b, "reason", ""),
                    "source": b.source,
                    "text_required": bool(b.text_required),
                }
            )
        return out


def discover_model_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Saved model directories under ``paths``.

    Each path may be a model directory, a run directory (``RUN/model``), or a folder of run directories (every
    child that is one of the former, sorted by name).

    Raises:
        FileNotFoundError: a path does not exist or holds no saved model.
    """
    from fiber_models.legacy import is_legacy_model
    from fiber_models.pretrained import is_saved_model

    def is_model(p: Path) -> bool:
        return is_saved_model(p) or is_legacy_model(p)

    found: list[Path] = []
    for raw in paths:
        p = Path(raw).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"--checkpoint {p}: no such file or directory")
        if is_model(p):
            found.append(p)
        elif is_model(p / "model"):
            found.append(p / "model")
        else:
            children = [c for c in sorted(p.iterdir()) if c.is_dir()] if p.is_dir() else []
            sub = [c / "model" if is_model(c / "model") else c for c in children]
            sub = [c for c in sub if is_model(c)]
            if not sub:
                raise FileNotFoundError(
                    f"--checkpoint {p}: not a saved FIBER model (no config.json of a saved model in it, in "
                    f"{p / 'model'}, or in its sub-directories); pass a finished run directory or its model/ folder"
                )
            found.extend(sub)
    return found


def _load_vqa(model_dir: Path, device: str) -> VQABackend:
    from fiber_models.pipelines import VQAPipeline

    pipe = VQAPipeline(model_dir, device=device)
    if not pipe.model.answers:
        raise ValueError(f"{model_dir}: the VQA model has no answer list (config.json head.answers is empty)")
    return VQABackend(pipe, source=str(model_dir))


def _load_caption(model_dir: Path, device: str) -> CaptionBackend:
    from fiber_models.pipelines import CaptioningPipeline

    return CaptionBackend(CaptioningPipeline(model_dir, device=device), source=str(model_dir))


def _load_scoring(model_dir: Path, device: str) -> ScoringBackend:
    from fiber_models.pipelines import ImageTextScoringPipeline

    return ScoringBackend(ImageTextScoringPipeline(model_dir, device=device, batch_size=32), source=str(model_dir))


def _load_grounding(model_dir: Path, device: str) -> tuple[GroundingBackend, GroundingBackend]:
    from fiber_models.predictor import GroundingPredictor

    predictor = GroundingPredictor.from_run(model_dir, device=device)
    lock = threading.Lock()
    return (
        GroundingBackend(predictor, "grounding", str(model_dir), lock),
        GroundingBackend(predictor, "detection", str(model_dir), lock),
    )


def load_backends(
    checkpoints: Iterable[str | Path], *, device: str = "cpu", samples: Sequence[Path] = ()
) -> BackendSet:
    """Build the demo backends from exported models.

    Args:
        checkpoints: run directories, model directories, or folders of run directories
            (see :func:`discover_model_dirs`).
        device: inference device.
        samples: example image files offered on the page.

    Returns:
        A :class:`BackendSet` with one backend per task; tasks no checkpoint serves, and checkpoints that
        fail to load, become :class:`UnavailableBackend` with the reason. The first checkpoint serving a task
        wins.

    Raises:
        FileNotFoundError: a path holds no exported model.
    """
    from fiber_models.pretrained import read_model_config

    dirs = discover_model_dirs(checkpoints)
    backends: dict[str, TaskBackend] = {}
    failures: dict[str, str] = {}
    models: list[dict[str, Any]] = []
    for model_dir in dirs:
        kind = "?"
        serves: tuple[str, ...] = ()
        try:
            config = read_model_config(model_dir)
            kind = str(config["model_type"])
            task = str(config.get("info", {}).get("task", kind))
            serves = tuple(t for t in _SERVES.get(kind, ()) if t not in backends)
            models.append({"path": str(model_dir), "task": task, "model_type": kind, "serves": list(serves)})
        except Exception as exc:  # an unreadable config disables this directory, the others still work
            models.append({"path": str(model_dir), "task": kind, "serves": [], "error": f"{type(exc).__name__}: {exc}"})
            continue
        if not serves:
            continue
        try:
            if kind == "grounding":
                for b in _load_grounding(model_dir, device):
                    backends.setdefault(b.task, b)
            elif kind == "vqa":
                backends["vqa"] = _load_vqa(model_dir, device)
            elif kind == "caption":
                backends["caption"] = _load_caption(model_dir, device)
            elif kind in ("coarse", "retrieval"):
                backends["scoring"] = _load_scoring(model_dir, device)
        except Exception as exc:  # a broken checkpoint disables its tasks, the others still work
            for t in serves:
                failures[t] = f"loading {model_dir} failed: {type(exc).__name__}: {exc}"
            models[-1]["error"] = f"{type(exc).__name__}: {exc}"
    loaded = ", ".join(f"{m['task']} ({m['path']})" for m in models) or "none"
    for t in TASK_ORDER:
        if t not in backends:
            reason = failures.get(t) or f"it needs {_NEEDS[t]}; loaded: {loaded}"
            backends[t] = UnavailableBackend(t, reason, text_required=t != "caption")
    return BackendSet(backends, models, list(samples))
