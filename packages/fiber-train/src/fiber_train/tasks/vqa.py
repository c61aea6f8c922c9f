"""VQAv2 fine-tuning (docs/reference/training.md §2.3; heads: docs/reference/architecture.md §8.5; metric: docs/reference/evaluation.md §2).

Fused forward of (image, question) -> ``cls [B, 2H]`` -> ``vqa_classifier`` -> ``[B, A]`` answer logits,
trained with the soft-score BCE of the reference (``A * mean BCE``). Evaluation predicts the argmax answer
string per question and scores it with the official VQA accuracy (:class:`fiber_eval.VQAEvaluator`); it
also reports the training-time "VQA score" (soft target at the argmax). Predictions are written in the
official submission format ``[{"question_id", "answer"}]``. Beside the accuracy it reports the baseline of
answering every question with the most frequent training answer (``baseline/vqa/accuracy``,
:func:`fiber_eval.baselines.constant_answer_accuracy`).

Data: VQAv2-format question/annotation files under ``data.root`` (paths are templates with ``{split}``);
the synthetic world ships them (``annotations/vqa_{questions,annotations}_{split}.json``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import ConcatDataset, Dataset

from fiber_backbones import TextInputs
from fiber_data import (
    SYNTHETIC_VQA_TEMPLATE,
    AnswerVocab,
    EmptyBatch,
    VQABatch,
    VQACollator,
    VQAv2Dataset,
    build_answer_vocab,
)
from fiber_eval import VQAAnswer, VQAEvaluator, load_vqa_annotations, write_vqa_submission
from fiber_eval.baselines import constant_answer_accuracy, most_frequent_answer
from fiber_models.pretrained import ModelFormatError, read_model_config
from fiber_models.vqa import VQAModel as VQAModel
from fiber_train.tasks.base import Fabricish
from fiber_train.tasks.downstream_common import (
    DownstreamConfig,
    DownstreamTaskBase,
    build_backbone,
)

__all__ = ["VQAConfig", "VQAModel", "VQASettings", "VQATask"]


@dataclass(frozen=True)
class VQASettings:
    """Where the VQAv2 files are and how the answer vocabulary is built.

    Args:
        train_splits: splits concatenated for training (the reference trains on ``train2014`` + ``val2014``).
        questions / annotations: file templates relative to ``data.root``, formatted with ``split``.
        images: image folder template relative to ``data.root``.
        image_template: image file name template (``subtype``, ``image_id``), see :class:`fiber_data.VQAv2Dataset`.
        answer_min_count: keep normalised answers seen at least this often over ``train_splits`` (9 in the
            reference, giving 3,129 answers).
        answers_file: a saved answer list (``AnswerVocab.save``); overrides ``answer_min_count``.
        test_split: an unlabelled split (e.g. ``test2015``) to write a submission for; empty: none.
        augment: train with the fine-tuning augmentation of docs/reference/training.md §2.1 (RandomResizedCrop, horizontal flip
            with the text unchanged, RandAugment); false trains on the evaluation transform.
    """

    train_splits: tuple[str, ...] = ("train",)
    questions: str = "annotations/vqa_questions_{split}.json"
    annotations: str = "annotations/vqa_annotations_{split}.json"
    images: str = "images/{split}"
    image_template: str = SYNTHETIC_VQA_TEMPLATE
    answer_min_count: int = 9
    answers_file: str = ""
    test_split: str = ""
    augment: bool = True


@dataclass(frozen=True)
class VQAConfig(DownstreamConfig):
    """Complete configuration of ``fiber-train finetune vqa``: the sections of
    :class:`~fiber_train.tasks.downstream_common.DownstreamConfig` and ``vqa``."""

    task: str = "vqa"
    vqa: VQASettings = field(default_factory=VQASettings)


class VQATask(DownstreamTaskBase):
    """``fiber-train finetune vqa`` (see :class:`fiber_train.tasks.base.TrainTask`)."""

    name = "vqa"

    baseline_name = "the most frequent training answer for every question"

    def __init__(self, config: VQAConfig) -> None:
        super().__init__(config)
        self._vocab: AnswerVocab | None = None
        self._majority: str | None = None

    # ------------------------------------------------------------------------------------------- data

    def required_files(self) -> Sequence[Path]:
        s = self.config.vqa
        out = []
        for split in (*s.train_splits, self.data.eval_split):
            out += [
                self.data_file(s.questions, split),
                self.data_file(s.annotations, split),
                self.data_file(s.images, split),
            ]
        if s.test_split:
            out += [self.data_file(s.questions, s.test_split), self.data_file(s.images, s.test_split)]
        return out

    def data_help(self) -> str:
        return (
            "VQA expects VQAv2 question/annotation JSON files at vqa.questions / vqa.annotations (templates with "
            "{split}) and images under vqa.images; `fiber-data synth --out DIR` writes them."
        )

    @property
    def vocab(self) -> AnswerVocab:
        """The answer vocabulary: ``vqa.answers_file``, the pretrained VQA model's answers (its ``config.json``, or
        ``answers.json`` of an earlier export), or built from the training annotations."""
        if self._vocab is None:
            s = self.config.vqa
            saved = saved_answers(self.config.model.pretrained)
            if s.answers_file:
                self._vocab = AnswerVocab.load(s.answers_file)
            elif saved:
                self._vocab = AnswerVocab(saved)
            else:
                files = [self.data_file(s.annotations, sp) for sp in s.train_splits]
                self._vocab = build_answer_vocab(files, min_count=s.answer_min_count)
            if len(self._vocab) == 0:
                raise ValueError(
                    f"empty VQA answer vocabulary (vqa.answer_min_count={s.answer_min_count} over "
                    f"{list(s.train_splits)}): lower vqa.answer_min_count"
                )
        return self._vocab

    def _dataset(
        self, split: str, *, labelled: bool = True, drop_unanswerable: bool = True, train: bool = False
    ) -> VQAv2Dataset:
        s = self.config.vqa
        return VQAv2Dataset(
            self.data_file(s.questions, split),
            self.data_file(s.annotations, split) if labelled else None,
            self.data_file(s.images, split),
            self.train_transform(s.augment) if train else self.image_transform(),
            self.vocab,
            image_subtype=split,
            image_template=s.image_template,
            drop_unanswerable=drop_unanswerable,
        )

    def majority_answer(self) -> str:
        """The most frequent answer of the training annotations (``vqa.train_splits``): the baseline's answer."""
        if self._majority is None:
            s = self.config.vqa
            self._majority = most_frequent_answer(
                a for sp in s.train_splits for a in load_vqa_annotations(self.data_file(s.annotations, sp))
            )
        return self._majority

    def train_dataset(self, fabric: Fabricish | None = None) -> Dataset:
        parts = [self._dataset(sp, train=True) for sp in self.config.vqa.train_splits]
        return parts[0] if len(parts) == 1 else ConcatDataset(parts)

    def collate_fn(self) -> Callable[[list[Any]], VQABatch | EmptyBatch]:
        return VQACollator(self.tokenizer, num_answers=len(self.vocab), max_length=self.data.max_text_len)

    # ------------------------------------------------------------------------------------------ model

    def build_model(self, fabric: Fabricish | None = None) -> VQAModel:
        """VQA model with one output per answer, initialised from ``model.pretrained`` when set."""
        cfg = self.config
        model = VQAModel(build_backbone(cfg.model, self.tokenizer.vocab_size), cfg.model.hidden_dim, len(self.vocab))
        model.answers = tuple(self.vocab.answers)
        self.init_from_pretrained(model)
        return model

    # ----------------------------------------------------------------------------------------- evaluate

    @torch.no_grad()
    def predict(self, model: VQAModel, dataset: Dataset, device: Any) -> tuple[list[VQAAnswer], list[float]]:
        """Argmax answers of every question of ``dataset``.

        Returns:
            ``(answers, soft_scores)``: one :class:`fiber_eval.VQAAnswer` per question and, per question, the
            soft target at the predicted class (0 for unlabelled questions).
        """
        answers: list[VQAAnswer] = []
        scores: list[float] = []
        for batch in self.eval_loader(dataset, self.collate_fn()):
            batch = batch.to(device)
            logits = model.answer_logits(batch.pixel_values, TextInputs(batch.input_ids, batch.attention_mask))
            pred = logits.argmax(dim=1)
            scores += batch.targets.gather(1, pred[:, None]).squeeze(1).float().cpu().tolist()
            for qid, p in zip(batch.question_ids.tolist(), pred.tolist()):
                answers.append(VQAAnswer(question_id=int(qid), answer=self.vocab.answers[p]))
        return answers, scores

    def evaluate(self, model: nn.Module, fabric: Fabricish) -> dict[str, float]:
        """Official VQA accuracy and the "VQA score" on ``data.eval_split`` (every question, answerable or not).

        With ``task.run_dir`` set, writes the predictions as ``vqa_{split}_predictions.json`` (official
        submission format) and, with ``vqa.test_split`` set, predicts that split too (e.g. ``test2015`` for the
        evaluation server).
        """
        if not self.config.eval.enabled:
            return {}
        assert isinstance(model, VQAModel)
        split = self.data.eval_split
        dataset = self.eval_subset(self._dataset(split, drop_unanswerable=False))
        answers, soft = self.predict(model, dataset, fabric.device)
        annotations = load_vqa_annotations(self.data_file(self.config.vqa.annotations, split))
        evaluator = VQAEvaluator(annotations, strict=not self.config.eval.max_samples)
        evaluator.update(answers)
        result = evaluator.compute()
        metrics = {"vqa/accuracy": result["accuracy"], "vqa/score": 100.0 * sum(soft) / max(len(soft), 1)}
        scored = {a.question_id for a in answers}
        metrics["baseline/vqa/accuracy"] = constant_answer_accuracy(
            [a for a in annotations if a.question_id in scored], self.majority_answer()
        )
        metrics.update({f"vqa/{k}": v for k, v in result.items() if k.startswith("answer_type/")})
        metrics["vqa/num_questions"] = float(len(answers))
        run_dir = self.run_dir
        if run_dir is not None:
            write_vqa_submission(answers, Path(run_dir) / f"vqa_{split}_predictions.json")
        test = self.config.vqa.test_split
        if test and run_dir is not None:
            dataset = self._dataset(test, labelled=False, drop_unanswerable=False)
            test_answers, _ = self.predict(model, dataset, fabric.device)
            write_vqa_submission(test_answers, Path(run_dir) / f"vqa_{test}_predictions.json")
        return metrics


def saved_answers(pretrained: str | None) -> tuple[str, ...]:
    """The answer list of a saved VQA model at ``pretrained`` (empty when it is not one or has none)."""
    if not pretrained:
        return ()
    try:
        config = read_model_config(pretrained)
    except (FileNotFoundError, ModelFormatError):
        return ()
    if config.get("model_type") != "vqa":
        return ()
    return tuple(config["head"].get("answers", ()))
