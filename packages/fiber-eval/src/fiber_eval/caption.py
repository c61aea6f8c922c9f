"""Caption metrics with the COCO caption toolkit protocol (docs/reference/evaluation.md §5).

``compute`` tokenises references and candidates with the Stanford PTB tokenizer (Java; punctuation tokens
removed), then scores BLEU-1..4, METEOR 1.5 (Java), ROUGE-L and CIDEr-D with ``pycocoevalcap`` (extra
``fiber-eval[caption]``). Scores are ×100 (CIDEr 1.444 → 144.4). Metrics that cannot run are *reported as
skipped with the reason* (``CaptionEvaluator.skipped``) rather than failing: without Java the tokenizer and
METEOR are unavailable (and BLEU/ROUGE-L/CIDEr then fall back to lower-cased whitespace tokens only when
``allow_simple_tokenizer=True``); SPICE is always skipped because it downloads Stanford CoreNLP on first use.

This module also implements CIDEr-D itself (:func:`cider_d`) so that document frequencies can come from a
*training* corpus and be cached to a JSON file (:func:`compute_document_frequencies`,
:func:`save_document_frequencies`), as self-critical CIDEr optimisation needs (docs/reference/training.md §2.6). With the
evaluated set's own references it equals the toolkit's CIDEr (tested).
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import io
import json
import math
import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fiber_eval._io import PredictionFormatError, load_json, prediction_records, require_keys
from fiber_eval.distributed import gather_items, merge_unique
from fiber_eval.types import AccumulatingEvaluator, Caption, GatherObjects

__all__ = [
    "CaptionEvaluator",
    "DocumentFrequencies",
    "caption_metrics",
    "cider_d",
    "compute_document_frequencies",
    "java_available",
    "load_caption_predictions",
    "load_caption_references",
    "load_document_frequencies",
    "ptb_tokenize",
    "save_document_frequencies",
    "simple_cider",
    "simple_tokenize",
]

# Tokens the toolkit drops after PTB tokenisation.
PTB_PUNCTUATION: frozenset[str] = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)
SPICE_SKIP_REASON = "SPICE needs Stanford CoreNLP 3.6.0 jars that it downloads on first use (offline here)"


@functools.lru_cache(maxsize=1)
def java_available() -> str | None:
    """Returns ``None`` if a Java runtime runs, else the reason it does not."""
    java = shutil.which("java")
    if java is None:
        return "no 'java' executable on PATH (the PTB tokenizer and METEOR need Java >= 8)"
    try:
        subprocess.run([java, "-version"], capture_output=True, check=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        return f"'java -version' failed: {e}"
    return None


def _require_pycocoevalcap() -> None:
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError as e:
        raise ImportError("caption metrics need pycocoevalcap: pip install 'fiber-eval[caption]'") from e


def ptb_tokenize(captions: Mapping[Any, Sequence[str]]) -> dict[Any, list[str]]:
    """Stanford PTB tokenisation (lower-cased, lines preserved, punctuation tokens removed).

    Args:
        captions: id → list of raw captions.

    Returns:
        id → list of space-joined token strings, in the same order.

    Raises:
        ImportError: without ``pycocoevalcap``; RuntimeError: without Java.
    """
    _require_pycocoevalcap()
    reason = java_available()
    if reason is not None:
        raise RuntimeError(f"PTB tokenizer unavailable: {reason}")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    payload = {k: [{"caption": c} for c in caps] for k, caps in captions.items() if caps}
    out = PTBTokenizer().tokenize(payload) if payload else {}
    # captions that tokenise to nothing come back as missing lines at the end of the output
    return {k: list(out.get(k, [])) + [""] * (len(caps) - len(out.get(k, []))) for k, caps in captions.items()}


def simple_tokenize(captions: Mapping[Any, Sequence[str]]) -> dict[Any, list[str]]:
    """Java-free approximation of PTB tokenisation: lower-case, split punctuation off words, drop it.

    Not the official protocol; used only when asked for (``allow_simple_tokenizer=True``) or for CIDEr
    rewards during training where speed matters more than matching the Java tokenizer exactly.
    """
    out = {}
    for k, caps in captions.items():
        toks = []
        for c in caps:
            words = re.findall(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]", c.lower())
            toks.append(" ".join(w for w in words if w not in PTB_PUNCTUATION and w.strip()))
        out[k] = toks
    return out


# --------------------------------------------------------------------------------------------------- CIDEr-D


def _ngrams(tokens: Sequence[str], n: int = 4) -> Counter[tuple[str, ...]]:
    counts: Counter[tuple[str, ...]] = Counter()
    for k in range(1, n + 1):
        for i in range(len(tokens) - k + 1):
            counts[tuple(tokens[i : i + k])] += 1
    return counts


@dataclass(frozen=True)
class DocumentFrequencies:
    """CIDEr document frequencies.

    Attributes:
        df: n-gram (tuple of tokens, n = 1..4) → number of documents (images) whose references contain it.
        num_documents: number of documents; CIDEr uses ``log(num_documents)`` as the reference length.
    """

    df: Mapping[tuple[str, ...], float]
    num_documents: int


def compute_document_frequencies(references: Iterable[Sequence[str]], n: int = 4) -> DocumentFrequencies:
    """Counts, for every n-gram, the documents whose reference set contains it.

    Args:
        references: one entry per image: its *tokenised* reference captions (space-separated tokens).
        n: maximum n-gram order.

    Returns:
        The document frequencies.
    """
    df: Counter[tuple[str, ...]] = Counter()
    num = 0
    for refs in references:
        num += 1
        grams: set[tuple[str, ...]] = set()
        for r in refs:
            grams.update(_ngrams(r.split(), n))
        df.update(grams)
    return DocumentFrequencies(df=dict(df), num_documents=num)


def save_document_frequencies(dfs: DocumentFrequencies, path: str | Path) -> None:
    """Writes document frequencies as JSON (gzip-compressed when the path ends in ``.gz``)."""
    payload = {
        "format": "fiber-cider-df/1",
        "num_documents": dfs.num_documents,
        "df": {" ".join(g): c for g, c in dfs.df.items()},
    }
    data = json.dumps(payload).encode("utf-8")
    path = Path(path)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def load_document_frequencies(path: str | Path) -> DocumentFrequencies:
    """Reads a file written by :func:`save_document_frequencies`.

    Raises:
        PredictionFormatError: if the file is not such a file.
    """
    path = Path(path)
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    try:
        payload = json.loads(raw)
    except json.JSONDecodeError as e:
        raise PredictionFormatError(f"{path}: not a CIDEr document-frequency JSON file: {e.msg}") from e
    if not isinstance(payload, dict) or payload.get("format") != "fiber-cider-df/1":
        raise PredictionFormatError(f"{path}: missing 'format': 'fiber-cider-df/1'")
    return DocumentFrequencies(
        df={tuple(k.split(" ")): float(v) for k, v in payload["df"].items()},
        num_documents=int(payload["num_documents"]),
    )


def _tfidf(
    counts: Counter[tuple[str, ...]], dfs: DocumentFrequencies, log_docs: float, n: int
) -> tuple[list[dict[tuple[str, ...], float]], np.ndarray, int]:
    vec: list[dict[tuple[str, ...], float]] = [{} for _ in range(n)]
    norm = np.zeros(n)
    length = 0
    for gram, tf in counts.items():
        order = len(gram) - 1
        w = float(tf) * (log_docs - math.log(max(1.0, dfs.df.get(gram, 0.0))))
        vec[order][gram] = w
        norm[order] += w * w
        if order == 1:
            # toolkit quirk: the "length" used by the Gaussian penalty counts bigrams, not words
            length += tf
    return vec, np.sqrt(norm), length


def cider_d(
    candidates: Mapping[Any, str],
    references: Mapping[Any, Sequence[str]],
    dfs: DocumentFrequencies | None = None,
    *,
    n: int = 4,
    sigma: float = 6.0,
) -> tuple[float, dict[Any, float]]:
    """CIDEr-D of tokenised captions (raw scale: ×10 included, FIBER's 144.4 is 1.444 here).

    Args:
        candidates: id → one tokenised candidate (space-separated tokens).
        references: id → tokenised references; must have the same ids.
        dfs: document frequencies; ``None`` computes them from ``references`` (the toolkit's evaluation
            behaviour). Pass training-corpus frequencies for CIDEr rewards.
        n: maximum n-gram order.
        sigma: standard deviation of the Gaussian length penalty.

    Returns:
        ``(mean score, id → score)``.

    Raises:
        ValueError: if the id sets differ or an id has no reference.
    """
    if candidates.keys() != references.keys():
        raise ValueError("cider_d: candidates and references must have the same ids")
    if dfs is None:
        dfs = compute_document_frequencies((references[k] for k in references), n)
    log_docs = math.log(float(max(dfs.num_documents, 1)))
    per: dict[Any, float] = {}
    for k, cand in candidates.items():
        refs = references[k]
        if not refs:
            raise ValueError(f"cider_d: image {k!r} has no reference caption")
        vec, norm, length = _tfidf(_ngrams(cand.split(), n), dfs, log_docs, n)
        total = np.zeros(n)
        for ref in refs:
            vec_r, norm_r, length_r = _tfidf(_ngrams(ref.split(), n), dfs, log_docs, n)
            val = np.zeros(n)
            for o in range(n):
                for gram, w in vec[o].items():
                    w_r = vec_r[o].get(gram, 0.0)
                    val[o] += min(w, w_r) * w_r  # clipped n-gram weights (the "-D")
                if norm[o] != 0 and norm_r[o] != 0:
                    val[o] /= norm[o] * norm_r[o]
            total += val * math.exp(-((length - length_r) ** 2) / (2 * sigma**2))
        per[k] = float(np.mean(total) / len(refs) * 10.0)
    mean = float(np.mean(list(per.values()))) if per else 0.0
    return mean, per


def simple_cider(
    captions: Mapping[Any, str], references: Mapping[Any, Sequence[str]]
) -> tuple[float, dict[Any, float]]:
    """CIDEr-D of raw captions on simply tokenised text (:func:`simple_tokenize`, document frequencies of
    ``references``): the Java-free score of the caption fine-tuning evaluation (raw scale, as :func:`cider_d`).

    Args:
        captions: id -> one raw candidate caption.
        references: id -> raw reference captions; the same ids.
    """
    cands = {k: v[0] for k, v in simple_tokenize({k: [c] for k, c in captions.items()}).items()}
    return cider_d(cands, simple_tokenize(references))


# ------------------------------------------------------------------------------------------------ toolkit


def caption_metrics(
    candidates: Mapping[Any, str],
    references: Mapping[Any, Sequence[str]],
    *,
    metrics: Sequence[str] = ("BLEU", "METEOR", "ROUGE-L", "CIDEr", "SPICE"),
    allow_simple_tokenizer: bool = False,
) -> tuple[dict[str, float], dict[str, str]]:
    """Scores raw captions with the COCO caption toolkit protocol.

    Args:
        candidates: image id → generated caption (raw text); must cover exactly the reference ids.
        references: image id → raw reference captions.
        metrics: which of ``BLEU``, ``METEOR``, ``ROUGE-L``, ``CIDEr``, ``SPICE`` to compute.
        allow_simple_tokenizer: without Java, tokenise with :func:`simple_tokenize` instead of skipping
            BLEU / ROUGE-L / CIDEr (the results are then *not* the official protocol; the skip reasons say so).

    Returns:
        ``(scores, skipped)``: scores ×100 (``BLEU-1``..``BLEU-4``, ``METEOR``, ``ROUGE-L``, ``CIDEr``) and
        metric → reason for each metric that could not run.

    Raises:
        ValueError: if the candidate ids are not exactly the reference ids, or a metric name is unknown.
        ImportError: if ``pycocoevalcap`` is not installed.
    """
    unknown = set(metrics) - {"BLEU", "METEOR", "ROUGE-L", "CIDEr", "SPICE"}
    if unknown:
        raise ValueError(f"unknown caption metric(s) {sorted(unknown)}")
    missing = references.keys() - candidates.keys()
    extra = candidates.keys() - references.keys()
    if missing or extra:
        raise ValueError(
            f"captions must cover exactly the ground-truth images: {len(missing)} missing "
            f"(e.g. {list(missing)[:3]}), {len(extra)} not in the ground truth (e.g. {list(extra)[:3]})"
        )
    _require_pycocoevalcap()
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    scores: dict[str, float] = {}
    skipped: dict[str, str] = {}
    if "SPICE" in metrics:
        skipped["SPICE"] = SPICE_SKIP_REASON
    java_reason = java_available()
    if java_reason is None:
        gts = ptb_tokenize(references)
        res = ptb_tokenize({k: [candidates[k]] for k in references})
    elif allow_simple_tokenizer:
        gts = simple_tokenize(references)
        res = simple_tokenize({k: [candidates[k]] for k in references})
        for m in ("BLEU", "ROUGE-L", "CIDEr"):
            if m in metrics:
                skipped[f"{m} (PTB tokenizer)"] = f"{java_reason}; whitespace tokens used instead (not official)"
    else:
        for m in metrics:
            if m != "SPICE":
                skipped[m] = f"PTB tokenizer unavailable: {java_reason}"
        return scores, skipped

    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):
        if "BLEU" in metrics:
            bleu, _ = Bleu(4).compute_score(gts, res)
            for i, b in enumerate(bleu, start=1):
                scores[f"BLEU-{i}"] = 100.0 * float(b)
        if "METEOR" in metrics:
            if java_reason is not None:
                skipped["METEOR"] = java_reason
            else:
                from pycocoevalcap.meteor.meteor import Meteor

                meteor = Meteor()
                try:
                    scores["METEOR"] = 100.0 * float(meteor.compute_score(gts, res)[0])
                finally:
                    with contextlib.suppress(Exception):
                        close = getattr(meteor, "close", None)  # not every pycocoevalcap release has it
                        if close is not None:
                            close()
        if "ROUGE-L" in metrics:
            scores["ROUGE-L"] = 100.0 * float(Rouge().compute_score(gts, res)[0])
        if "CIDEr" in metrics:
            scores["CIDEr"] = 100.0 * float(Cider().compute_score(gts, res)[0])
    return scores, skipped


def load_caption_references(source: str | Path | Mapping[str, Any]) -> dict[Any, list[str]]:
    """Reads a COCO-captions style GT file (``{"annotations": [{"image_id", "caption"}, ...]}``).

    Raises:
        PredictionFormatError: naming the file and annotation index of a malformed record.
    """
    name = str(source) if isinstance(source, (str, Path)) else "<references>"
    data = load_json(source) if isinstance(source, (str, Path)) else source
    if not isinstance(data, Mapping) or not isinstance(data.get("annotations"), list):
        raise PredictionFormatError(f"{name}: expected an object with an 'annotations' list")
    refs: dict[Any, list[str]] = {}
    for i, rec in enumerate(data["annotations"]):
        rec = require_keys(rec, ("image_id", "caption"), f"{name}: annotations[{i}]")
        refs.setdefault(rec["image_id"], []).append(str(rec["caption"]))
    return refs


def load_caption_predictions(path: str | Path) -> list[Caption]:
    """Reads ``[{"image_id": ..., "caption": str}, ...]``.

    Raises:
        PredictionFormatError: naming the file and record index of a malformed record.
    """
    out = []
    for where, rec in prediction_records(path, ("image_id", "caption")):
        if not isinstance(rec["caption"], str):
            raise PredictionFormatError(f"{where} (image_id={rec['image_id']}): caption must be a string")
        out.append(Caption(rec["image_id"], rec["caption"]))
    return out


class CaptionEvaluator(AccumulatingEvaluator[Caption]):
    """Accumulates :class:`~fiber_eval.types.Caption` predictions and computes the toolkit metrics.

    Args:
        references: image id → raw reference captions (the evaluated set, e.g. the 5,000 Karpathy test images).
        metrics: see :func:`caption_metrics`.
        allow_simple_tokenizer: see :func:`caption_metrics`.
        strict: if True (toolkit behaviour) every reference image needs a caption; if False only the captioned
            images are scored (for smoke runs on a subset).

    After ``compute``, ``skipped`` maps each metric that could not run to its reason. Repeated image ids
    (one caption per image is scored) keep the first caption.
    """

    skipped: dict[str, str]

    def __init__(
        self,
        references: Mapping[Any, Sequence[str]],
        *,
        metrics: Sequence[str] = ("BLEU", "METEOR", "ROUGE-L", "CIDEr", "SPICE"),
        allow_simple_tokenizer: bool = False,
        strict: bool = True,
    ) -> None:
        self.references = {k: list(v) for k, v in references.items()}
        self.strict = strict
        self.metrics = tuple(metrics)
        self.allow_simple_tokenizer = allow_simple_tokenizer
        self.reset()

    def reset(self) -> None:
        """Forgets the accumulated captions and the skipped list."""
        super().reset()
        self.skipped = {}

    def check(self, prediction: Caption, index: int) -> None:
        """Raises ``KeyError`` for an image id that is not in the references (the toolkit's loader rejects them)."""
        if prediction.image_id not in self.references:
            raise KeyError(f"caption for image_id {prediction.image_id!r}, which is not in the references")

    def compute(self, gather: GatherObjects | None = None) -> dict[str, float]:
        """Gathers all ranks' captions and scores them (×100); see ``skipped`` for unavailable metrics."""
        by_id, _ = merge_unique(gather_items(self.state(), gather), key=lambda c: c.image_id, what="image_id")
        refs = self.references if self.strict else {k: self.references[k] for k in by_id}
        scores, self.skipped = caption_metrics(
            {k: c.caption for k, c in by_id.items()},
            refs,
            metrics=self.metrics,
            allow_simple_tokenizer=self.allow_simple_tokenizer,
        )
        return scores
