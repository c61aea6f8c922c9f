"""VQAv2 accuracy, exactly as the current official evaluator (docs/reference/evaluation.md §2, docs/reference/data-formats.md §6).

For one question with human answers ``g_1..g_n`` (n = 10 in VQAv2) and prediction ``r``:

1. ``clean``: replace ``\\n`` and ``\\t`` by spaces and strip, on every answer and on ``r``;
2. only if the cleaned answers are **not** all identical, normalise every answer and ``r`` with
   :func:`process_punctuation` then :func:`process_digit_article` (the unanimous case is compared raw, so
   ``"Yes"`` against ten ``"yes"`` scores 0);
3. ``acc = (1/n) · Σ_i min(1, #{j ≠ i : g_j == r} / 3)`` (the mean over the n leave-one-out subsets).

Overall and per answer-type / question-type accuracies are means of the per-question values over the subset,
times 100. The older copies of the official script (19-character punctuation list, prediction always
normalised, per-type numbers from the last subset) are *not* reproduced.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fiber_eval._io import (
    PredictionFormatError,
    load_json,
    prediction_records,
    require_keys,
    require_predictions,
)
from fiber_eval.distributed import gather_items, merge_unique
from fiber_eval.types import AccumulatingEvaluator, GatherObjects, VQAAnswer

__all__ = [
    "VQAAnnotation",
    "VQAEvaluator",
    "clean_answer",
    "load_vqa_annotations",
    "load_vqa_results",
    "normalize_answer",
    "process_digit_article",
    "process_punctuation",
    "vqa_accuracy",
    "write_vqa_submission",
]

# The 21 characters of the current official list (":" and "'" are NOT in it).
PUNCTUATION: tuple[str, ...] = tuple(';/[]"{}()=+\\_-><@`,?!')
ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})
NUMBER_WORDS: dict[str, str] = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
# Contraction table of the official evaluator, entries kept verbatim (including the capitalised keys, which
# can never match after lower-casing, and "somebody'd" -> "somebodyd").
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll",
    "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll",
    "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip

_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# The official pattern "(?!<=\d)(\.)(?!\d)" has a malformed look-behind (it is a look-ahead for "<=digit",
# always true before a "."), so it means "a period not followed by a digit".
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"(?!<=\d)(\.)(?!\d)")
# The official call passes re.UNICODE (= 32) in the position of ``count``: at most 32 periods are removed.
_OFFICIAL_PERIOD_COUNT = int(re.UNICODE)


def clean_answer(text: str) -> str:
    """Replaces newlines and tabs by spaces and strips surrounding whitespace."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
    """Official ``processPunctuation``: deletes or blanks the 21 punctuation marks, then stray periods.

    A mark is deleted when the *original* text has it next to a space or contains a digit-comma-digit
    pattern, otherwise it is replaced by a space. Then up to 32 periods not followed by a digit are removed.
    """
    out = text
    has_digit_comma = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for p in PUNCTUATION:
        if p + " " in text or " " + p in text or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_OFFICIAL_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """Official ``processDigitArticle``: lower-case, number words to digits, drop articles, fix contractions."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
    return " ".join(words)


def normalize_answer(text: str) -> str:
    """Both normalisation steps (applied only when the human answers disagree)."""
    return process_digit_article(process_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Accuracy of one prediction against the human answers, in ``[0, 1]``.

    Args:
        prediction: the predicted answer string.
        answers: the raw human answers (10 in VQAv2).

    Returns:
        The mean over leave-one-out subsets of ``min(1, matches / 3)``; with n matching answers out of ten
        this is 0, 0.3, 0.6, 0.9, 1.0 for n = 0, 1, 2, 3, ≥ 4.

    Raises:
        ValueError: if ``answers`` is empty.
    """
    if not answers:
        raise ValueError("vqa_accuracy: a question needs at least one ground-truth answer")
    gts = [clean_answer(a) for a in answers]
    pred = clean_answer(prediction)
    if len(set(gts)) > 1:
        gts = [normalize_answer(a) for a in gts]
        pred = normalize_answer(pred)
    n_match = sum(g == pred for g in gts)
    # leaving out answer i removes one match exactly when g_i itself matches
    total = sum(min(1.0, (n_match - (g == pred)) / 3.0) for g in gts)
    return total / len(gts)


@dataclass(frozen=True)
class VQAAnnotation:
    """Ground truth of one VQAv2 question.

    Attributes:
        question_id: the question id.
        answers: the raw human answers (10 in VQAv2).
        answer_type: ``yes/no``, ``number`` or ``other``.
        question_type: the question prefix (``"what color is the"`` ...).
    """

    question_id: int
    answers: tuple[str, ...]
    answer_type: str = ""
    question_type: str = ""


def load_vqa_annotations(source: str | Path | Mapping[str, Any]) -> list[VQAAnnotation]:
    """Reads a ``v2_mscoco_*_annotations.json`` file (or its decoded dict).

    Raises:
        PredictionFormatError: naming the file and annotation index of a malformed record.
    """
    name = str(source) if isinstance(source, (str, Path)) else "<annotations>"
    data = load_json(source) if isinstance(source, (str, Path)) else source
    if not isinstance(data, Mapping) or not isinstance(data.get("annotations"), list):
        raise PredictionFormatError(f"{name}: expected an object with an 'annotations' list")
    out = []
    for i, rec in enumerate(data["annotations"]):
        where = f"{name}: annotations[{i}]"
        rec = require_keys(rec, ("question_id", "answers"), where)
        answers = rec["answers"]
        if not isinstance(answers, list) or not answers:
            raise PredictionFormatError(f"{where}: 'answers' must be a non-empty list")
        try:
            texts = tuple(str(a["answer"]) if isinstance(a, Mapping) else str(a) for a in answers)
        except KeyError as e:
            raise PredictionFormatError(f"{where}: an entry of 'answers' has no 'answer' key") from e
        out.append(
            VQAAnnotation(
                question_id=int(rec["question_id"]),
                answers=texts,
                answer_type=str(rec.get("answer_type", "")),
                question_type=str(rec.get("question_type", "")),
            )
        )
    return out


def load_vqa_results(source: str | Path | Sequence[Any]) -> list[VQAAnswer]:
    """Reads a results file ``[{"question_id": int, "answer": str}, ...]``.

    Raises:
        PredictionFormatError: naming the file and record index of a malformed record.
    """
    out = []
    for where, rec in prediction_records(source, ("question_id", "answer")):
        if not isinstance(rec["answer"], str):
            raise PredictionFormatError(f"{where} (question_id={rec['question_id']}): 'answer' must be a string")
        try:
            qid = int(rec["question_id"])
        except (TypeError, ValueError) as e:
            raise PredictionFormatError(f"{where}: question_id {rec['question_id']!r} is not an integer") from e
        out.append(VQAAnswer(question_id=qid, answer=rec["answer"]))
    return out


def write_vqa_submission(
    answers: Iterable[VQAAnswer], path: str | Path, *, question_ids: Iterable[int] | None = None
) -> int:
    """Writes the official result file ``[{"question_id": int, "answer": str}, ...]``.

    Args:
        answers: predicted answers; repeats of a question id (sampler padding) keep the first.
        path: output file.
        question_ids: when given (e.g. every test2015 question), the answers must cover exactly these ids.

    Returns:
        The number of records written.

    Raises:
        ValueError: if ``question_ids`` is given and some are unanswered or extra ids are present.
    """
    by_id, _ = merge_unique(answers, key=lambda a: a.question_id, what="question_id")
    if question_ids is not None:
        wanted = {int(q) for q in question_ids}
        missing = wanted - by_id.keys()
        extra = by_id.keys() - wanted
        if missing or extra:
            raise ValueError(
                f"submission must answer exactly the given questions: {len(missing)} missing "
                f"(e.g. {sorted(missing)[:5]}), {len(extra)} unexpected (e.g. {sorted(extra)[:5]})"
            )
    records = [{"question_id": int(q), "answer": a.answer} for q, a in by_id.items()]
    Path(path).write_text(json.dumps(records), encoding="utf-8")
    return len(records)


class VQAEvaluator(AccumulatingEvaluator[VQAAnswer]):
    """Official VQAv2 accuracy over accumulated :class:`~fiber_eval.types.VQAAnswer` predictions.

    Args:
        annotations: ground truth (see :func:`load_vqa_annotations`).
        strict: if True (official behaviour), every annotated question must be answered; if False, only the
            answered questions are scored (``num_questions`` says how many).

    ``compute`` returns ``accuracy``, ``answer_type/<type>``, ``question_type/<type>`` (percent, unrounded;
    the official tool prints them rounded to 2 decimals) and ``num_questions``.
    """

    per_question: dict[int, float]

    def __init__(self, annotations: Sequence[VQAAnnotation], *, strict: bool = True) -> None:
        self.annotations = {a.question_id: a for a in annotations}
        if len(self.annotations) != len(annotations):
            raise ValueError("VQA annotations contain a repeated question_id")
        self.strict = strict
        self.reset()

    def reset(self) -> None:
        """Forgets the accumulated answers and the per-question scores."""
        super().reset()
        self.per_question = {}

    def check(self, prediction: VQAAnswer, index: int) -> None:
        """Raises ``KeyError`` for a question id that is not in the annotations."""
        if prediction.question_id not in self.annotations:
            raise KeyError(f"VQA prediction for question_id {prediction.question_id}, which is not in the annotations")

    def compute(self, gather: GatherObjects | None = None) -> dict[str, float]:
        """Gathers the answers of all ranks and scores them.

        Raises:
            MissingPredictionsError: (a ValueError) if no answer was given, or (``strict``) some annotated
                questions are unanswered.
        """
        by_id, _ = merge_unique(gather_items(self.state(), gather), key=lambda a: a.question_id, what="question_id")
        require_predictions(
            self.annotations, by_id, strict=self.strict, what="annotated question(s)", nothing="the VQA questions"
        )
        per_ans: dict[str, list[float]] = defaultdict(list)
        per_q: dict[str, list[float]] = defaultdict(list)
        self.per_question = {}
        for qid, pred in by_id.items():
            gt = self.annotations[qid]
            acc = vqa_accuracy(pred.answer, gt.answers)
            self.per_question[qid] = acc
            per_ans[gt.answer_type].append(acc)
            per_q[gt.question_type].append(acc)
        accs = list(self.per_question.values())
        out = {"accuracy": 100.0 * sum(accs) / len(accs)}
        for t, v in sorted(per_ans.items()):
            out[f"answer_type/{t}"] = 100.0 * sum(v) / len(v)
        for t, v in sorted(per_q.items()):
            out[f"question_type/{t}"] = 100.0 * sum(v) / len(v)
        out["num_questions"] = float(len(accs))
        return out
