"""VQAv2 and NLVR2 Arrow tables of the coarse stage (docs/reference/data-formats.md §1.2): readers and writers. ``[arrow]`` extra.

- ``vqav2_<split>.arrow``: one row per image; ``questions: list<string>``, ``question_id: list<int64>``,
  ``answers: list<list<string>>``, ``answer_labels: list<list<int64>>``, ``answer_scores:
  list<list<double>>``, ``image_id: int64``, ``split``. :class:`ArrowVQADataset` gives one
  :class:`~fiber_data.types.VQASample` per (row, question); test tables have empty answer lists.
- ``nlvr2_<split>.arrow``: one row per image pair; ``image_0``, ``image_1: binary``, ``questions:
  list<string>``, ``answers: list<string>`` (``"True"`` / ``"False"``), ``identifier``
  (``<split>-<set>-<pair>``). :class:`ArrowNLVR2Dataset` gives one :class:`~fiber_data.types.NLVR2Sample` per
  (row, sentence) with identifier ``<pair>-<sentence index>``.

Duplicates are kept (§1.1: only caption tables de-duplicate). Tables are memory-mapped; the index holds only
integers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from fiber_data.arrow import _pyarrow, read_arrow_table
from fiber_data.errors import AnnotationError, ImageLoadError
from fiber_data.transforms import load_image_bytes
from fiber_data.types import NLVR2Sample, VQASample

__all__ = ["ArrowNLVR2Dataset", "ArrowVQADataset", "write_nlvr2_table", "write_vqa_table"]


def _write(path: str | PathLike[str], columns: Mapping[str, Any]) -> Path:
    pa = _pyarrow()
    table = pa.table(dict(columns))
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with pa.OSFile(str(p), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return p


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

    return _write(
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


def write_nlvr2_table(path: str | PathLike[str], rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write an ``nlvr2_<split>.arrow`` table (§1.2).

    Args:
        path: output file.
        rows: one mapping per image pair with ``image_0``, ``image_1`` (bytes), ``questions`` (sentences),
            ``answers`` (``"True"`` / ``"False"`` per sentence) and ``identifier`` (``<split>-<set>-<pair>``).
    """
    pa = _pyarrow()
    return _write(
        path,
        {
            "image_0": pa.array([bytes(r["image_0"]) for r in rows], type=pa.binary()),
            "image_1": pa.array([bytes(r["image_1"]) for r in rows], type=pa.binary()),
            "questions": pa.array([list(r["questions"]) for r in rows], type=pa.list_(pa.string())),
            "answers": pa.array([list(r["answers"]) for r in rows], type=pa.list_(pa.string())),
            "identifier": pa.array([str(r["identifier"]) for r in rows], type=pa.string()),
        },
    )


def _open_tables(paths: Sequence[str | PathLike[str]], required: Sequence[str]) -> tuple[list[str], list[Any]]:
    files = [Path(p) for p in paths]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise AnnotationError(f"{len(missing)} Arrow table(s) not found: {', '.join(missing)}")
    tables = []
    for path in files:
        table = read_arrow_table(path)
        absent = [c for c in required if c not in table.column_names]
        if absent:
            raise AnnotationError(f"missing column(s) {absent} (columns: {table.column_names})", file=path)
        tables.append(table)
    return [str(p) for p in files], tables


def _image(table: Any, column: str, row: int, source: str) -> Image.Image:
    data = table.column(column)[row].as_py()
    if data is None:
        raise ImageLoadError(f"{column} is null", file=source, record=f"row {row}")
    return load_image_bytes(data, source=source, record=f"row {row}")


class ArrowVQADataset(Dataset[VQASample]):
    """VQAv2 questions from ``vqav2_<split>.arrow`` tables, one sample per (row, question).

    Args:
        paths: ``.arrow`` files (all must exist).
        transform: PIL image → ``FloatTensor [3, H, W]``.
        drop_unanswerable: remove questions whose ``answer_labels`` list is empty (training; keep them for
            test tables, whose answer lists are all empty).

    Raises:
        AnnotationError: a missing table or column, or a row whose per-question lists disagree in length.
    """

    def __init__(
        self,
        paths: Sequence[str | PathLike[str]],
        transform: Callable[[Image.Image], Tensor],
        *,
        drop_unanswerable: bool = False,
    ) -> None:
        self.paths, self.tables = _open_tables(paths, ("image", "questions", "question_id", "image_id"))
        self.transform = transform
        tab, rows, qs = [], [], []
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
                    tab.append(t)
                    rows.append(r)
                    qs.append(k)
        self._table = np.asarray(tab, dtype=np.int32)
        self._row = np.asarray(rows, dtype=np.int64)
        self._q = np.asarray(qs, dtype=np.int32)

    def __len__(self) -> int:
        return len(self._row)

    def __getitem__(self, index: int) -> VQASample:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} questions")
        t, r, k = int(self._table[index]), int(self._row[index]), int(self._q[index])
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
        image = _image(table, "image", r, self.paths[t])
        return VQASample(
            question_id=int(table.column("question_id")[r].as_py()[k]),
            image_id=int(table.column("image_id")[r].as_py()),
            image=self.transform(image),
            question=str(table.column("questions")[r].as_py()[k]),
            answer_labels=torch.tensor(labels, dtype=torch.long),
            answer_scores=torch.tensor(scores, dtype=torch.float32),
            index=index,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(questions={len(self)}, tables={len(self.tables)})"


class ArrowNLVR2Dataset(Dataset[NLVR2Sample]):
    """NLVR2 statements from ``nlvr2_<split>.arrow`` tables, one sample per (row, sentence).

    Args:
        paths: ``.arrow`` files (all must exist).
        transform: PIL image → ``FloatTensor [3, H, W]``, applied to both images.

    Raises:
        AnnotationError: a missing table or column, a row whose ``answers`` do not align with ``questions``, or
            an answer other than ``"True"`` / ``"False"``.
    """

    def __init__(self, paths: Sequence[str | PathLike[str]], transform: Callable[[Image.Image], Tensor]) -> None:
        self.paths, self.tables = _open_tables(paths, ("image_0", "image_1", "questions", "answers", "identifier"))
        self.transform = transform
        tab, rows, qs, labels = [], [], [], []
        for t, table in enumerate(self.tables):
            for r, (qlist, alist) in enumerate(
                zip(table.column("questions").to_pylist(), table.column("answers").to_pylist())
            ):
                qlist, alist = qlist or [], alist or []
                if len(alist) not in (0, len(qlist)):
                    raise AnnotationError(
                        f"{len(qlist)} sentences but {len(alist)} answers", file=self.paths[t], record=f"row {r}"
                    )
                for k in range(len(qlist)):
                    answer = alist[k] if alist else None
                    if answer not in (None, "True", "False"):
                        raise AnnotationError(
                            f"answer {k} should be 'True' or 'False', got {answer!r:.40}",
                            file=self.paths[t],
                            record=f"row {r}",
                        )
                    tab.append(t)
                    rows.append(r)
                    qs.append(k)
                    labels.append(-100 if answer is None else int(answer == "True"))
        self._table = np.asarray(tab, dtype=np.int32)
        self._row = np.asarray(rows, dtype=np.int64)
        self._q = np.asarray(qs, dtype=np.int32)
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._row)

    def __getitem__(self, index: int) -> NLVR2Sample:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} statements")
        t, r, k = int(self._table[index]), int(self._row[index]), int(self._q[index])
        table = self.tables[t]
        left = self.transform(_image(table, "image_0", r, self.paths[t]))
        right = self.transform(_image(table, "image_1", r, self.paths[t]))
        label = int(self.labels[index])
        return NLVR2Sample(
            identifier=f"{table.column('identifier')[r].as_py()}-{k}",
            images=(left, right),
            sentence=str(table.column("questions")[r].as_py()[k]),
            label=None if label < 0 else bool(label),
            index=index,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(statements={len(self)}, tables={len(self.tables)})"
