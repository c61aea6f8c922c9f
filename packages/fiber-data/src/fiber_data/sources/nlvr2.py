"""NLVR2 statements over image pairs (docs/reference/data-formats.md §8, docs/reference/training.md §2.4).

One sample per JSON Lines record. Image files are ``<split>-<set>-<pair>-img0.png`` (left) and ``-img1.png``
(right), named from the ``identifier`` without its sentence index; the extension is ``.png`` even when the
bytes are JPEG (PIL detects the format from the content).
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

from fiber_data.collate import TextBatchCollator
from fiber_data.errors import AnnotationError
from fiber_data.formats.arrow import ArrowItemDataset, _pyarrow, write_arrow_table
from fiber_data.images.transforms import load_image
from fiber_data.io import check_index, read_jsonl, require
from fiber_data.types import NLVR2Batch, NLVR2Sample, Tokenizer

__all__ = [
    "ArrowNLVR2Dataset",
    "NLVR2Collator",
    "NLVR2Dataset",
    "pair_identifier",
    "write_nlvr2_table",
]


def pair_identifier(identifier: str) -> str:
    """``"dev-117-3-0"`` → ``"dev-117-3"`` (the image pair of a statement)."""
    parts = identifier.split("-")
    if len(parts) < 4:
        raise ValueError(f"NLVR2 identifier {identifier!r} is not <split>-<set>-<pair>-<sentence>")
    return "-".join(parts[:-1])


class NLVR2Dataset(Dataset[NLVR2Sample]):
    """NLVR2 statements from a JSON Lines file.

    Args:
        jsonl_file: ``train.json`` / ``dev.json`` / ``test1.json`` (JSON Lines despite the extension).
        image_root: the split's image folder; train records with a ``directory`` field are read from
            ``image_root/<directory>/`` (the official ``images/train/<n>/`` layout), others from ``image_root/``.
        transform: PIL image → ``FloatTensor [3, H, W]``, applied to both images.
    """

    def __init__(
        self,
        jsonl_file: str | PathLike[str],
        image_root: str | PathLike[str],
        transform: Callable[[Image.Image], Tensor],
    ) -> None:
        f = Path(jsonl_file)
        self.source = str(f)
        self.transform = transform
        root = Path(image_root)
        self.identifiers: list[str] = []
        self.sentences: list[str] = []
        self.left: list[str] = []
        self.right: list[str] = []
        labels: list[int] = []
        for k, rec in enumerate(read_jsonl(f)):
            where = f"record {k}"
            ident = require(rec, "identifier", str, file=f, where=where)
            sentence = require(rec, "sentence", str, file=f, where=where)
            label = rec.get("label")
            if label not in (None, "True", "False", True, False):
                raise AnnotationError(f"label should be 'True' or 'False', got {label!r}", file=f, record=where)
            try:
                pair = pair_identifier(ident)
            except ValueError as exc:
                raise AnnotationError(str(exc), file=f, record=where) from exc
            folder = root / str(rec["directory"]) if "directory" in rec else root
            self.identifiers.append(ident)
            self.sentences.append(sentence)
            self.left.append(str(folder / f"{pair}-img0.png"))
            self.right.append(str(folder / f"{pair}-img1.png"))
            labels.append(-100 if label is None else int(label in ("True", True)))
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.sentences)

    def __getitem__(self, index: int) -> NLVR2Sample:
        check_index(index, len(self), "statements")
        record = f"{self.identifiers[index]} ({Path(self.source).name})"
        left = self.transform(load_image(self.left[index], record=record))
        right = self.transform(load_image(self.right[index], record=record))
        label = int(self.labels[index])
        return NLVR2Sample(
            identifier=self.identifiers[index],
            images=(left, right),
            sentence=self.sentences[index],
            label=None if label < 0 else bool(label),
            index=index,
        )


class NLVR2Collator(TextBatchCollator[NLVR2Sample, NLVR2Batch]):
    """``collate_fn`` for :class:`~fiber_data.types.NLVR2Sample` lists (skipped samples: see
    :class:`~fiber_data.collate.TextBatchCollator`).

    Args:
        tokenizer: any :class:`~fiber_data.types.Tokenizer`.
        max_length: statement length (padded to exactly this).
    """

    def __init__(self, tokenizer: Tokenizer, max_length: int = 40) -> None:
        super().__init__(tokenizer, max_length)

    def text_of(self, sample: NLVR2Sample) -> str:
        return sample.sentence

    def build(
        self, samples: list[NLVR2Sample], input_ids: Tensor, attention_mask: Tensor, skipped: tuple[str, ...]
    ) -> NLVR2Batch:
        """:class:`~fiber_data.types.NLVR2Batch` with ``pixel_values [B, 2, 3, H, W]`` and ``labels [B]``
        (-100 = unknown)."""
        return NLVR2Batch(
            pixel_values=torch.stack([torch.stack(s.images) for s in samples]).float(),
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=torch.tensor([-100 if s.label is None else int(s.label) for s in samples], dtype=torch.long),
            index=torch.tensor([s.index for s in samples], dtype=torch.long),
            identifiers=tuple(s.identifier for s in samples),
            skipped=skipped,
        )


# ----------------------------------------------------------------------------------------------------------------
# The same questions stored as Arrow tables (docs/reference/data-formats.md §1.2). ``[arrow]`` extra.


def write_nlvr2_table(path: str | PathLike[str], rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write an ``nlvr2_<split>.arrow`` table (§1.2).

    Args:
        path: output file.
        rows: one mapping per image pair with ``image_0``, ``image_1`` (bytes), ``questions`` (sentences),
            ``answers`` (``"True"`` / ``"False"`` per sentence) and ``identifier`` (``<split>-<set>-<pair>``).
    """
    pa = _pyarrow()
    return write_arrow_table(
        path,
        {
            "image_0": pa.array([bytes(r["image_0"]) for r in rows], type=pa.binary()),
            "image_1": pa.array([bytes(r["image_1"]) for r in rows], type=pa.binary()),
            "questions": pa.array([list(r["questions"]) for r in rows], type=pa.list_(pa.string())),
            "answers": pa.array([list(r["answers"]) for r in rows], type=pa.list_(pa.string())),
            "identifier": pa.array([str(r["identifier"]) for r in rows], type=pa.string()),
        },
    )


class ArrowNLVR2Dataset(ArrowItemDataset[NLVR2Sample]):
    """NLVR2 statements from ``nlvr2_<split>.arrow`` tables, one sample per (row, sentence).

    Args:
        paths: ``.arrow`` files (all must exist).
        transform: PIL image → ``FloatTensor [3, H, W]``, applied to both images.

    Raises:
        AnnotationError: a missing table or column, a row whose ``answers`` do not align with ``questions``, or
            an answer other than ``"True"`` / ``"False"``.
    """

    items = "statements"

    def __init__(self, paths: Sequence[str | PathLike[str]], transform: Callable[[Image.Image], Tensor]) -> None:
        super().__init__(paths, ("image_0", "image_1", "questions", "answers", "identifier"), transform)
        entries: list[tuple[int, int, int]] = []
        labels: list[int] = []
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
                    entries.append((t, r, k))
                    labels.append(-100 if answer is None else int(answer == "True"))
        self._index(entries)
        self.labels = np.asarray(labels, dtype=np.int64)

    def __getitem__(self, index: int) -> NLVR2Sample:
        t, r, k = self.locate(index)
        table = self.tables[t]
        left = self.transform(self.image(t, "image_0", r))
        right = self.transform(self.image(t, "image_1", r))
        label = int(self.labels[index])
        return NLVR2Sample(
            identifier=f"{table.column('identifier')[r].as_py()}-{k}",
            images=(left, right),
            sentence=str(table.column("questions")[r].as_py()[k]),
            label=None if label < 0 else bool(label),
            index=index,
        )
