"""VQAv2: answer normalisation, answer vocabulary, soft scores and the dataset (docs/reference/data-formats.md §6-§7).

- :func:`normalize_word` is the official VQA evaluator's normalisation (§7.1), applied to
  ``multiple_choice_answer`` strings when building the vocabulary;
- :func:`build_answer_vocab` keeps normalised answers seen at least 9 times over train + val, in
  first-occurrence order (§7.2; 3,129 answers for the official files);
- :func:`answer_scores` gives the soft targets 0.3 / 0.6 / 0.9 / 1.0 for 1 / 2 / 3 / >= 4 annotators (§7.3),
  counting the *raw* answer strings (so "Yes" and "yes" are counted apart, as in the reference);
- :class:`VQAv2Dataset` yields one :class:`~fiber_data.types.VQASample` per question; training questions
  without any in-vocabulary answer are removed.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from fiber_data.collate import TextBatchCollator
from fiber_data.errors import AnnotationError
from fiber_data.formats.arrow import ArrowItemDataset, _pyarrow, write_arrow_table
from fiber_data.images.transforms import load_image
from fiber_data.io import check_index, read_json, require
from fiber_data.types import Tokenizer, VQABatch, VQASample

__all__ = [
    "AnswerVocab",
    "ArrowVQADataset",
    "VQACollator",
    "VQAv2Dataset",
    "answer_scores",
    "build_answer_vocab",
    "normalize_word",
    "score_for_count",
    "write_vqa_table",
]

_PUNCTUATION = [
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {
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
_ARTICLES = {"a", "an", "the"}
# The contraction table of the official VQA evaluator (keys are misspellings without apostrophes). Keys with
# capitals never match after lower-casing; they are kept so that the table equals the reference.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip


def normalize_word(text: str) -> str:
    """Normalise an answer string as the official VQA evaluator does (docs/reference/data-formats.md §7.1).

    >>> normalize_word("Two dogs!")
    '2 dogs'
    >>> normalize_word("the 1,000")
    '1000'
    """
    out = text
    has_digit_comma = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for p in _PUNCTUATION:
        if (p + " " in text or " " + p in text) or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD.sub("", out)
    words = []
    for word in out.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words).replace(",", "")


def score_for_count(count: int) -> float:
    """Soft score of an answer given by ``count`` annotators: 0, 0.3, 0.6, 0.9, then 1.0 (§7.3)."""
    return (0.0, 0.3, 0.6, 0.9)[count] if count < 4 else 1.0


@dataclass(frozen=True)
class AnswerVocab:
    """The VQA answer list; row ``i`` of the classifier predicts ``answers[i]``.

    Attributes:
        answers: answer strings in label order.
    """

    answers: tuple[str, ...]
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "answers", tuple(self.answers))
        object.__setattr__(self, "_index", {a: i for i, a in enumerate(self.answers)})
        if len(self._index) != len(self.answers):
            raise ValueError("answer vocabulary has duplicates")

    def __len__(self) -> int:
        return len(self.answers)

    def __contains__(self, answer: object) -> bool:
        return answer in self._index

    def index(self, answer: str) -> int:
        """Label of ``answer`` (``KeyError`` if absent)."""
        return self._index[answer]

    def save(self, path: str | PathLike[str]) -> Path:
        """Write ``{"answers": [...]}`` as JSON."""
        p = Path(path)
        p.write_text(json.dumps({"answers": list(self.answers)}, ensure_ascii=False) + "\n", encoding="utf-8")
        return p

    @classmethod
    def load(cls, path: str | PathLike[str]) -> AnswerVocab:
        """Read a file written by :meth:`save` (or a bare JSON list of answers)."""
        data = read_json(path)
        answers = data.get("answers") if isinstance(data, dict) else data
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise AnnotationError("expected {'answers': [str, ...]} or a list of strings", file=path)
        return cls(tuple(answers))


def _annotations(path: str | PathLike[str]) -> list[dict]:
    data = read_json(path)
    anns = require(data, "annotations", list, file=path, where="top level")
    return anns


def build_answer_vocab(annotation_files: Iterable[str | PathLike[str]], *, min_count: int = 9) -> AnswerVocab:
    """Answers whose normalised ``multiple_choice_answer`` occurs ``>= min_count`` times (§7.2).

    Args:
        annotation_files: VQAv2 annotation files in counting order (train first, then val).
        min_count: frequency threshold (9 in the reference).

    Returns:
        The vocabulary, in first-occurrence order.
    """
    counts: Counter[str] = Counter()
    for path in annotation_files:
        for j, a in enumerate(_annotations(path)):
            counts[normalize_word(require(a, "multiple_choice_answer", str, file=path, where=f"annotations[{j}]"))] += 1
    return AnswerVocab(tuple(a for a, c in counts.items() if c >= min_count))


def answer_scores(raw_answers: Sequence[str], vocab: AnswerVocab) -> tuple[list[int], list[float]]:
    """Soft targets of one question from its raw annotator answers (§7.3).

    Args:
        raw_answers: the (usually 10) ``answers[].answer`` strings, not normalised.
        vocab: the answer vocabulary.

    Returns:
        ``(labels, scores)`` for the in-vocabulary answer strings, in first-occurrence order.
    """
    counts = Counter(raw_answers)
    labels, scores = [], []
    for answer, count in counts.items():
        if answer in vocab:
            labels.append(vocab.index(answer))
            scores.append(score_for_count(count))
    return labels, scores


class VQAv2Dataset(Dataset[VQASample]):
    """One sample per VQAv2 question (docs/reference/data-formats.md §6).

    Args:
        questions_file: ``v2_OpenEnded_mscoco_<subtype>_questions.json``.
        annotations_file: the matching annotation file, or ``None`` for test splits.
        image_root: folder of ``COCO_<subtype>_<12-digit id>.jpg``.
        transform: PIL image → ``FloatTensor [3, H, W]``.
        vocab: the answer vocabulary.
        image_subtype: the ``<subtype>`` in image names; defaults to the questions file's ``data_subtype``
            (``test-dev2015`` images live in ``test2015``, handled automatically).
        image_template: image file name, formatted with ``subtype`` and ``image_id``
            (the synthetic world uses :data:`~fiber_data.synthetic.SYNTHETIC_VQA_TEMPLATE`).
        drop_unanswerable: remove questions without an in-vocabulary answer (train/val, §7.3).

    Storage is columnar (question ids, image ids, question strings, flat label/score arrays with offsets).
    """

    def __init__(
        self,
        questions_file: str | PathLike[str],
        annotations_file: str | PathLike[str] | None,
        image_root: str | PathLike[str],
        transform: Callable[[Image.Image], Tensor],
        vocab: AnswerVocab,
        *,
        image_subtype: str | None = None,
        image_template: str = "COCO_{subtype}_{image_id:012d}.jpg",
        drop_unanswerable: bool = True,
    ) -> None:
        qf = Path(questions_file)
        self.source = str(qf)
        self.transform = transform
        self.vocab = vocab
        data = read_json(qf)
        questions = require(data, "questions", list, file=qf, where="top level")
        subtype = image_subtype or (data.get("data_subtype") if isinstance(data, dict) else None)
        if not isinstance(subtype, str):
            raise AnnotationError("no 'data_subtype'; pass image_subtype= (e.g. 'val2014')", file=qf)
        if subtype.startswith("test-dev"):
            subtype = subtype.replace("test-dev", "test")
        self.image_subtype = subtype
        self.image_template = image_template
        self.image_root = Path(image_root)
        answers: dict[int, tuple[list[int], list[float]]] = {}
        if annotations_file is not None:
            af = Path(annotations_file)
            for j, a in enumerate(_annotations(af)):
                where = f"annotations[{j}]"
                qid = require(a, "question_id", int, file=af, where=where)
                raw = require(a, "answers", list, file=af, where=where)
                strings = [require(r, "answer", str, file=af, where=f"{where}.answers[{k}]") for k, r in enumerate(raw)]
                answers[qid] = answer_scores(strings, vocab)
        qids, iids, texts, records = [], [], [], []
        offsets = [0]
        labels_flat: list[int] = []
        scores_flat: list[float] = []
        for i, q in enumerate(questions):
            where = f"questions[{i}]"
            qid = require(q, "question_id", int, file=qf, where=where)
            iid = require(q, "image_id", int, file=qf, where=where)
            text = require(q, "question", str, file=qf, where=where)
            labels, scores = answers.get(qid, ([], []))
            if annotations_file is not None:
                if qid not in answers:
                    raise AnnotationError(f"question_id {qid} has no annotation", file=qf, record=where)
                if drop_unanswerable and not labels:
                    continue
            qids.append(qid)
            iids.append(iid)
            texts.append(text)
            records.append(where)
            labels_flat.extend(labels)
            scores_flat.extend(scores)
            offsets.append(len(labels_flat))
        self.question_ids = np.asarray(qids, dtype=np.int64)
        self.image_ids = np.asarray(iids, dtype=np.int64)
        self.questions = texts
        self.records = records
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.labels = np.asarray(labels_flat, dtype=np.int64)
        self.scores = np.asarray(scores_flat, dtype=np.float32)

    def __len__(self) -> int:
        return len(self.questions)

    def image_path(self, image_id: int) -> Path:
        """``image_root / image_template`` (default ``COCO_<subtype>_<12-digit id>.jpg``)."""
        return self.image_root / self.image_template.format(subtype=self.image_subtype, image_id=image_id)

    def __getitem__(self, index: int) -> VQASample:
        check_index(index, len(self), "questions")
        iid = int(self.image_ids[index])
        image = load_image(self.image_path(iid), record=f"{self.records[index]} ({Path(self.source).name})")
        lo, hi = self.offsets[index], self.offsets[index + 1]
        return VQASample(
            question_id=int(self.question_ids[index]),
            image_id=iid,
            image=self.transform(image),
            question=self.questions[index],
            answer_labels=torch.from_numpy(self.labels[lo:hi].copy()),
            answer_scores=torch.from_numpy(self.scores[lo:hi].copy()),
            index=index,
        )


class VQACollator(TextBatchCollator[VQASample, VQABatch]):
    """``collate_fn`` for :class:`~fiber_data.types.VQASample` lists (skipped samples: see
    :class:`~fiber_data.collate.TextBatchCollator`).

    Args:
        tokenizer: any :class:`~fiber_data.types.Tokenizer`.
        num_answers: classifier width (``len(vocab)``).
        max_length: question length (padded to exactly this).
    """

    def __init__(self, tokenizer: Tokenizer, num_answers: int, max_length: int = 40) -> None:
        super().__init__(tokenizer, max_length)
        self.num_answers = num_answers

    def text_of(self, sample: VQASample) -> str:
        return sample.question

    def build(
        self, samples: list[VQASample], input_ids: Tensor, attention_mask: Tensor, skipped: tuple[str, ...]
    ) -> VQABatch:
        """:class:`~fiber_data.types.VQABatch`: ``targets [B, num_answers]`` with ``targets[b, label] = score`` for
        every in-vocabulary answer of sample ``b``."""
        targets = torch.zeros((len(samples), self.num_answers), dtype=torch.float32)
        for b, s in enumerate(samples):
            if s.answer_labels.numel():
                targets[b, s.answer_labels.long()] = s.answer_scores.float()
        return VQABatch(
            pixel_values=torch.stack([s.image for s in samples]).float(),
            input_ids=input_ids,
            attention_mask=attention_mask,
            targets=targets,
            question_ids=torch.tensor([s.question_id for s in samples], dtype=torch.long),
            index=torch.tensor([s.index for s in samples], dtype=torch.long),
            questions=tuple(s.question for s in samples),
            skipped=skipped,
        )


# ----------------------------------------------------------------------------------------------------------------
# The same questions stored as Arrow tables (docs/reference/data-formats.md §1.2). ``[arrow]`` extra.


def write_vqa_table(path: str | PathLike[str], rows: Sequence[Mapping[str, Any]], split: str) -> Path:
    """Write a ``vqav2_<split>.arrow`` table (§1.2).

    Args:
        path: output file.
        rows: one mapping per image with ``image`` (bytes), ``image_id`` (int), ``questions``,
            ``question_id`` and, for answered splits, ``answers``, ``answer_labels``, ``answer_scores`` (one
            list per question; omitted = empty lists, as in test tables).
        split: the ``split`` column value.

    Returns:
        The path written.
    """
    pa = _pyarrow()
    n_q = [len(r["questions"]) for r in rows]

    def per_question(key: str) -> list[list[Any]]:
        return [list(r.get(key) or [[] for _ in range(n)]) for r, n in zip(rows, n_q)]

    return write_arrow_table(
        path,
        {
            "image": pa.array([bytes(r["image"]) for r in rows], type=pa.binary()),
            "questions": pa.array([list(r["questions"]) for r in rows], type=pa.list_(pa.string())),
            "answers": pa.array(per_question("answers"), type=pa.list_(pa.list_(pa.string()))),
            "answer_labels": pa.array(per_question("answer_labels"), type=pa.list_(pa.list_(pa.int64()))),
            "answer_scores": pa.array(per_question("answer_scores"), type=pa.list_(pa.list_(pa.float64()))),
            "image_id": pa.array([int(r["image_id"]) for r in rows], type=pa.int64()),
            "question_id": pa.array([list(r["question_id"]) for r in rows], type=pa.list_(pa.int64())),
            "split": pa.array([split] * len(rows), type=pa.string()),
        },
    )


class ArrowVQADataset(ArrowItemDataset[VQASample]):
    """VQAv2 questions from ``vqav2_<split>.arrow`` tables, one sample per (row, question).

    Args:
        paths: ``.arrow`` files (all must exist).
        transform: PIL image → ``FloatTensor [3, H, W]``.
        drop_unanswerable: remove questions whose ``answer_labels`` list is empty (training; keep them for
            test tables, whose answer lists are all empty).

    Raises:
        AnnotationError: a missing table or column, or a row whose per-question lists disagree in length.
    """

    items = "questions"

    def __init__(
        self,
        paths: Sequence[str | PathLike[str]],
        transform: Callable[[Image.Image], Tensor],
        *,
        drop_unanswerable: bool = False,
    ) -> None:
        super().__init__(paths, ("image", "questions", "question_id", "image_id"), transform)
        entries: list[tuple[int, int, int]] = []
        for t, table in enumerate(self.tables):
            questions = table.column("questions").to_pylist()
            qids = table.column("question_id").to_pylist()
            labels = (
                table.column("answer_labels").to_pylist()
                if "answer_labels" in table.column_names
                else [None] * len(questions)
            )
            for r, (qlist, idlist, llist) in enumerate(zip(questions, qids, labels)):
                qlist, idlist = qlist or [], idlist or []
                if len(qlist) != len(idlist) or (llist and len(llist) != len(qlist)):
                    raise AnnotationError(
                        f"{len(qlist)} questions but {len(idlist)} question ids / {len(llist or [])} label lists",
                        file=self.paths[t],
                        record=f"row {r}",
                    )
                for k in range(len(qlist)):
                    if drop_unanswerable and not (llist and llist[k]):
                        continue
                    entries.append((t, r, k))
        self._index(entries)

    def __getitem__(self, index: int) -> VQASample:
        t, r, k = self.locate(index)
        table = self.tables[t]

        def cell(column: str) -> list[Any]:
            if column not in table.column_names:
                return []
            value = table.column(column)[r].as_py()
            return value[k] if value and k < len(value) and value[k] is not None else []

        labels, scores = cell("answer_labels"), cell("answer_scores")
        if len(labels) != len(scores):
            raise AnnotationError(
                f"question {k}: {len(labels)} answer labels but {len(scores)} scores",
                file=self.paths[t],
                record=f"row {r}",
            )
        image = self.image(t, "image", r)
        return VQASample(
            question_id=int(table.column("question_id")[r].as_py()[k]),
            image_id=int(table.column("image_id")[r].as_py()),
            image=self.transform(image),
            question=str(table.column("questions")[r].as_py()[k]),
            answer_labels=torch.tensor(labels, dtype=torch.long),
            answer_scores=torch.tensor(scores, dtype=torch.float32),
            index=index,
        )
