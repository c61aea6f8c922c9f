"""NLVR2 statements over image pairs (docs/reference/data-formats.md §8, docs/reference/training.md §2.4).

One sample per JSON Lines record. Image files are ``<split>-<set>-<pair>-img0.png`` (left) and ``-img1.png``
(right), named from the ``identifier`` without its sentence index; the extension is ``.png`` even when the
bytes are JPEG (PIL detects the format from the content).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from os import PathLike
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from fiber_data.errors import AnnotationError
from fiber_data.io import read_jsonl, require
from fiber_data.robust import split_for_collate
from fiber_data.transforms import load_image
from fiber_data.types import EmptyBatch, NLVR2Batch, NLVR2Sample, SkippedSample, Tokenizer

__all__ = ["NLVR2Collator", "NLVR2Dataset", "pair_identifier"]


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
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} statements")
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


class NLVR2Collator:
    """``collate_fn`` for :class:`~fiber_data.types.NLVR2Sample` lists.

    Args:
        tokenizer: any :class:`~fiber_data.types.Tokenizer`.
        max_length: statement length (padded to exactly this).
    """

    def __init__(self, tokenizer: Tokenizer, max_length: int = 40) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, samples: Sequence[NLVR2Sample | SkippedSample | None]) -> NLVR2Batch | EmptyBatch:
        """Collate into ``pixel_values [B, 2, 3, H, W]`` and ``labels [B]`` (-100 = unknown).

        Skipped / ``None`` samples are dropped and listed in ``batch.skipped``; an
        :class:`~fiber_data.types.EmptyBatch` comes back when all were skipped.
        """
        samples, skipped = split_for_collate(samples)
        if not samples:
            return EmptyBatch(skipped)
        enc = self.tokenizer([s.sentence for s in samples], max_length=self.max_length, padding="max_length")
        return NLVR2Batch(
            pixel_values=torch.stack([torch.stack(s.images) for s in samples]).float(),
            input_ids=enc.input_ids.long(),
            attention_mask=enc.attention_mask.bool(),
            labels=torch.tensor([-100 if s.label is None else int(s.label) for s in samples], dtype=torch.long),
            index=torch.tensor([s.index for s in samples], dtype=torch.long),
            identifiers=tuple(s.identifier for s in samples),
            skipped=skipped,
        )
