"""NLVR2 fine-tuning (docs/reference/training.md §2.4; two-pass forward: docs/reference/architecture.md §8.4; metric: docs/reference/evaluation.md §3).

The sentence is fused once with each image of the pair; ``concat(cls_0, cls_1) [B, 4H]`` feeds the
``nlvr2_classifier`` (2 logits, label 1 = "True"), trained with cross-entropy. Both passes run as one
backbone call on a ``2B`` batch (images ``[left_1..left_B, right_1..right_B]``, the text repeated), which
equals two separate passes because every sample of a batch is processed independently.
Evaluation reports accuracy (and consistency) per split with :func:`fiber_eval.nlvr2_metrics`, beside the
baseline of predicting the split's majority label for every statement (``baseline/nlvr2/<split>/accuracy``,
:func:`fiber_eval.baselines.majority_label_accuracy`, at least 50 %).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from fiber_backbones import TextInputs
from fiber_data import EmptyBatch, NLVR2Batch, NLVR2Collator, NLVR2Dataset
from fiber_eval import NLVR2Evaluator, NLVR2Prediction
from fiber_eval.baselines import majority_label_accuracy
from fiber_models.nlvr2 import NLVR2Model as NLVR2Model
from fiber_train.tasks.base import Fabricish
from fiber_train.tasks.downstream_common import (
    DownstreamConfig,
    DownstreamTaskBase,
    build_backbone,
)

__all__ = ["NLVR2Config", "NLVR2Model", "NLVR2Settings", "NLVR2Task"]


@dataclass(frozen=True)
class NLVR2Settings:
    """Where the NLVR2 files are.

    Args:
        statements: JSON Lines file template relative to ``data.root`` (``{split}``).
        images: image folder template relative to ``data.root`` (``{split}``); train records with a
            ``directory`` field are read from its sub-folders.
        eval_splits: splits evaluated and reported separately (the reference: ``dev`` and ``test1``);
            empty means ``data.eval_split`` only.
        augment: train with the fine-tuning augmentation of docs/reference/training.md §2.1 (RandomResizedCrop, horizontal flip
            with the text unchanged, RandAugment); false trains on the evaluation transform.
    """

    statements: str = "nlvr2/{split}.json"
    images: str = "nlvr2/images/{split}"
    eval_splits: tuple[str, ...] = ()
    augment: bool = True


@dataclass(frozen=True)
class NLVR2Config(DownstreamConfig):
    """Complete configuration of ``fiber-train finetune nlvr2``: the sections of
    :class:`~fiber_train.tasks.downstream_common.DownstreamConfig` and ``nlvr2``."""

    task: str = "nlvr2"
    nlvr2: NLVR2Settings = field(default_factory=NLVR2Settings)


class NLVR2Task(DownstreamTaskBase):
    """``fiber-train finetune nlvr2`` (see :class:`fiber_train.tasks.base.TrainTask`)."""

    name = "nlvr2"
    baseline_name = "the majority label of the split for every statement"

    def eval_splits(self) -> tuple[str, ...]:
        """``nlvr2.eval_splits``, or ``(data.eval_split,)`` when empty."""
        return self.config.nlvr2.eval_splits or (self.data.eval_split,)

    def required_files(self) -> Sequence[Path]:
        s = self.config.nlvr2
        out = []
        for split in (self.data.train_split, *self.eval_splits()):
            out += [self.data_file(s.statements, split), self.data_file(s.images, split)]
        return out

    def data_help(self) -> str:
        return (
            "NLVR2 expects JSON Lines statements at nlvr2.statements and pair images "
            "'<split>-<set>-<pair>-img0.png' under nlvr2.images; `fiber-data synth --out DIR` writes them."
        )

    def _dataset(self, split: str, *, train: bool = False) -> NLVR2Dataset:
        s = self.config.nlvr2
        transform = self.train_transform(s.augment) if train else self.image_transform()
        return NLVR2Dataset(self.data_file(s.statements, split), self.data_file(s.images, split), transform)

    def train_dataset(self, fabric: Fabricish | None = None) -> Dataset:
        return self._dataset(self.data.train_split, train=True)

    def collate_fn(self) -> Callable[[list[Any]], NLVR2Batch | EmptyBatch]:
        return NLVR2Collator(self.tokenizer, max_length=self.data.max_text_len)

    def build_model(self, fabric: Fabricish | None = None) -> NLVR2Model:
        """NLVR2 model, initialised from ``model.pretrained`` when set."""
        cfg = self.config
        model = NLVR2Model(build_backbone(cfg.model, self.tokenizer.vocab_size), cfg.model.hidden_dim)
        self.init_from_pretrained(model)
        return model

    @torch.no_grad()
    def predict(self, model: NLVR2Model, dataset: Dataset, device: Any) -> list[NLVR2Prediction]:
        """One :class:`fiber_eval.NLVR2Prediction` per statement of ``dataset``."""
        out: list[NLVR2Prediction] = []
        for batch in self.eval_loader(dataset, self.collate_fn()):
            batch = batch.to(device)
            pred = model.nlvr2_classifier.predict(
                model.pair_cls(batch.pixel_values, TextInputs(batch.input_ids, batch.attention_mask))
            )
            out += [NLVR2Prediction(i, bool(p)) for i, p in zip(batch.identifiers, pred.tolist())]
        return out

    def evaluate(self, model: nn.Module, fabric: Fabricish) -> dict[str, float]:
        """Accuracy and consistency per evaluation split: ``nlvr2/<split>/accuracy``, ... (percent)."""
        if not self.config.eval.enabled:
            return {}
        assert isinstance(model, NLVR2Model)
        metrics: dict[str, float] = {}
        run_dir = self.run_dir
        for split in self.eval_splits():
            full = self._dataset(split)
            preds = self.predict(model, self.eval_subset(full), fabric.device)
            labels = {i: bool(lab) for i, lab in zip(full.identifiers, full.labels.tolist()) if lab >= 0}
            evaluator = NLVR2Evaluator(labels, strict=not self.config.eval.max_samples)
            evaluator.update(preds)
            metrics.update({f"nlvr2/{split}/{k}": v for k, v in evaluator.compute().items()})
            scored = {p.identifier for p in preds}
            metrics[f"baseline/nlvr2/{split}/accuracy"] = majority_label_accuracy(
                {k: v for k, v in labels.items() if k in scored}
            )
            if run_dir is not None:
                records = [{"identifier": p.identifier, "prediction": str(p.prediction)} for p in preds]
                (Path(run_dir) / f"nlvr2_{split}_predictions.json").write_text(json.dumps(records))
        return metrics
