"""Image-text retrieval fine-tuning and evaluation (docs/reference/training.md §2.5, docs/reference/evaluation.md §4).

Training objective (``retrieval.objective``):

- ``itc``: the contrastive loss of docs/reference/training.md §1.4 on the dual encoder (optional queue, learnable
  temperature);
- ``itm``: the fused matching loss with *random* negatives (§1.5, last paragraph): per batch, half of the
  rows (in random order) keep their caption but get the image of another, randomly drawn dataset pair.

Evaluation embeds every image and caption of the split **once** with the un-fused dual encoder and scores all
pairs by cosine similarity (ITC retrieval). With ``retrieval.eval_itm`` the fused ITM score (class-1 logit)
then re-ranks, per image, its top-``k`` captions and, per caption, its top-``k`` images
(:func:`rerank_candidates`); every candidate pair is scored once, in batches grouped by image. Pairs outside
the candidate sets rank below every re-ranked pair, in ITC order. ``rerank_k = 0`` scores every pair: the
brute-force protocol of the official code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn

from fiber_backbones import TextInputs
from fiber_data import (
    ImageTextBatch,
    ImageTextCollator,
    ImageTextSample,
    RetrievalCorpus,
    Tokenizer,
    load_retrieval_corpus,
)
from fiber_eval import recall_at_k
from fiber_models.retrieval import RetrievalModel as RetrievalModel
from fiber_models.retrieval import rerank_candidates as rerank_candidates
from fiber_models.retrieval import reranked_scores as reranked_scores
from fiber_train.tasks.base import Fabricish
from fiber_train.tasks.downstream_common import (
    CaptionPairsTask,
    DownstreamConfig,
    build_backbone,
)

__all__ = [
    "ITMBatch",
    "RandomNegativeCollator",
    "RetrievalConfig",
    "RetrievalModel",
    "RetrievalSettings",
    "RetrievalTask",
    "rerank_candidates",
    "reranked_scores",
]


@dataclass(frozen=True)
class RetrievalSettings:
    """Objective and evaluation protocol of retrieval fine-tuning.

    Args:
        objective: ``itc`` (contrastive, dual encoder) or ``itm`` (fused matching, random negatives).
        queue_size: ITC queue length (4096 in the reference; 0 disables it).
        temperature_init: initial ITC temperature.
        eval_itm: also evaluate with fused ITM re-ranking (reported under ``itm/``; ``itc/`` is always reported).
        rerank_k: candidates re-ranked per image and per caption; 0 scores every pair (brute force).
        itm_batch_size: (image, caption) pairs per fused forward during re-ranking.
        augment: train with the fine-tuning augmentation of docs/reference/training.md §2.1 (RandomResizedCrop, horizontal flip
            with the text unchanged, RandAugment); false trains on the evaluation transform.
        annotations / images: COCO-captions file and image folder templates relative to ``data.root``
            (``{split}``).
    """

    objective: str = "itc"
    queue_size: int = 0
    temperature_init: float = 0.07
    eval_itm: bool = False
    rerank_k: int = 16
    itm_batch_size: int = 64
    augment: bool = True
    annotations: str = "annotations/captions_{split}.json"
    images: str = "images/{split}"

    def __post_init__(self) -> None:
        if self.objective not in ("itc", "itm"):
            raise ValueError(f"retrieval.objective must be 'itc' or 'itm', got {self.objective!r}")
        if self.rerank_k < 0:
            raise ValueError(f"retrieval.rerank_k must be >= 0 (0 = all pairs), got {self.rerank_k}")


@dataclass(frozen=True)
class RetrievalConfig(DownstreamConfig):
    """Complete configuration of ``fiber-train finetune retrieval``: the sections of
    :class:`~fiber_train.tasks.downstream_common.DownstreamConfig` and ``retrieval``."""

    task: str = "retrieval"
    retrieval: RetrievalSettings = field(default_factory=RetrievalSettings)


# ----------------------------------------------------------------------------------------------- batches


@dataclass(frozen=True)
class ITMBatch:
    """A batch of (image, caption, matched?) rows for ITM fine-tuning.

    Attributes:
        pixel_values: ``FloatTensor [B, 3, H, W]`` (the pair's own image, or a random other image).
        input_ids: ``LongTensor [B, L]``.
        attention_mask: ``BoolTensor [B, L]``.
        labels: ``LongTensor [B]``, 1 = the image is the caption's own.
        index: ``LongTensor [B]`` dataset positions of the captions.
    """

    pixel_values: Tensor
    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    index: Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ITMBatch:
        """Copy every tensor to ``device``."""
        return replace(
            self, **{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)}
        )

    def __len__(self) -> int:
        return int(self.pixel_values.shape[0])


class RandomNegativeCollator:
    """Collates image-text samples into an :class:`ITMBatch` with random negatives (docs/reference/training.md §1.5).

    Labels are ``ceil(B/2)`` ones and ``floor(B/2)`` zeros in random order; a label-0 row keeps its caption
    and takes the image of a random dataset pair showing another image (up to 10 draws; the torch global RNG,
    seeded per micro-batch by the loop, makes it reproducible).

    Args:
        dataset: the training dataset (``image_id(i)`` and ``__getitem__`` as :class:`fiber_data.ImageTextDataset`).
        tokenizer: the tokenizer.
        max_length: text length ``L``.
    """

    def __init__(self, dataset: Any, tokenizer: Tokenizer, max_length: int) -> None:
        self.dataset = dataset
        self.text = ImageTextCollator(tokenizer, max_length=max_length, mlm_probability=0.0)

    def __call__(self, samples: Sequence[ImageTextSample]) -> ITMBatch:
        """Collate ``B`` samples into an :class:`ITMBatch` (``pixel_values [B, 3, H, W]``, ``labels [B]``)."""
        base = cast(ImageTextBatch, self.text(samples))  # real samples only: never an EmptyBatch
        b = len(samples)
        labels = torch.ones(b, dtype=torch.long)
        labels[torch.randperm(b)[: b // 2]] = 0
        pixels = base.pixel_values.clone()
        n = len(self.dataset)
        for row in torch.nonzero(labels == 0).flatten().tolist():
            own = samples[row].image_id
            j = int(torch.randint(n, ()).item())
            for _ in range(10):
                if self.dataset.image_id(j) != own:
                    break
                j = int(torch.randint(n, ()).item())
            pixels[row] = self.dataset[j].image
        return ITMBatch(pixels, base.input_ids, base.attention_mask, labels, base.index)


# ------------------------------------------------------------------------------------------------- model


# -------------------------------------------------------------------------------------------------- task


class RetrievalTask(CaptionPairsTask):
    """``fiber-train finetune retrieval`` (see :class:`fiber_train.tasks.base.TrainTask`)."""

    name = "retrieval"
    title = "Retrieval"
    start_metrics = ("itc/t2i/R@1", "itc/i2t/R@1", "itm/t2i/R@1")
    baseline_name = "its starting point, the model before fine-tuning"

    def collate_fn(self) -> Callable[[list[Any]], Any]:
        """:class:`RandomNegativeCollator` for ``itm``, a plain image-text collator for ``itc``."""
        if self.config.retrieval.objective == "itm":
            return RandomNegativeCollator(self.train_dataset(), self.tokenizer, self.data.max_text_len)
        return ImageTextCollator(self.tokenizer, max_length=self.data.max_text_len, mlm_probability=0.0)

    def build_model(self, fabric: Fabricish | None = None) -> RetrievalModel:
        """Retrieval model, initialised from ``model.pretrained`` when set."""
        cfg = self.config
        s = cfg.retrieval
        model = RetrievalModel(
            build_backbone(cfg.model, self.tokenizer.vocab_size),
            cfg.model.hidden_dim,
            cfg.model.itc_dim,
            objective=s.objective,
            queue_size=s.queue_size,
            temperature_init=s.temperature_init,
        )
        self.init_from_pretrained(model)
        return model

    # ----------------------------------------------------------------------------------------- evaluate

    def corpus(self) -> RetrievalCorpus:
        """Images and captions of ``data.eval_split`` (all captions kept)."""
        s = self.config.retrieval
        split = self.data.eval_split
        return load_retrieval_corpus(self.data_file(s.annotations, split), self.data_file(s.images, split))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, fabric: Fabricish) -> dict[str, float]:
        """ITC retrieval (``itc/i2t/R@K``, ``itc/t2i/R@K``) and, with ``retrieval.eval_itm``, re-ranked ITM
        retrieval (``itm/...``, plus ``itm/num_scored_pairs``)."""
        if not self.config.eval.enabled:
            return {}
        assert isinstance(model, RetrievalModel)
        device = fabric.device
        corpus = self.corpus()
        images = corpus.image_dataset(self.image_transform())
        bs = self.config.eval.batch_size
        image_emb = torch.cat([model.embed_images(pix.to(device)).float() for pix, _ in self.eval_loader(images)])
        enc = self.tokenizer(list(corpus.texts), max_length=self.data.max_text_len)
        ids, mask = enc.input_ids, enc.attention_mask
        text_emb = torch.cat(
            [
                model.embed_texts(TextInputs(ids[i : i + bs].to(device), mask[i : i + bs].to(device))).float()
                for i in range(0, len(corpus.texts), bs)
            ]
        )
        sim = image_emb @ text_emb.t()
        t2i = np.asarray(corpus.text_to_image)
        metrics = {f"itc/{k}": v for k, v in recall_at_k(sim.cpu().numpy(), t2i).items()}
        metrics["num_images"] = float(sim.shape[0])
        metrics["num_texts"] = float(sim.shape[1])
        s = self.config.retrieval
        if s.eval_itm:
            cache: dict[int, Tensor] = {}

            def score_pairs(rows: Tensor, cols: Tensor) -> Tensor:
                # Pairs arrive grouped by image: keep only the images of the current chunk in memory.
                needed = set(rows.tolist())
                for key in [key for key in cache if key not in needed]:
                    del cache[key]
                for r in needed - cache.keys():
                    cache[r] = images[r][0]
                pix = torch.stack([cache[r] for r in rows.tolist()]).to(device)
                text = TextInputs(ids[cols].to(device), mask[cols].to(device))
                return model.itm_scores(pix, text)

            scores, scored = reranked_scores(sim.cpu(), s.rerank_k, score_pairs, s.itm_batch_size)
            metrics.update({f"itm/{k}": v for k, v in recall_at_k(scores.numpy(), t2i).items()})
            metrics["itm/num_scored_pairs"] = float(scored)
        return metrics
