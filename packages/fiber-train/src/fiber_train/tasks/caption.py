"""Image captioning fine-tuning (docs/reference/training.md §2.6; decoder path: docs/reference/architecture.md §8.3; metrics: docs/reference/evaluation.md §5).

The text tower runs as a left-to-right decoder over **un-fused** image features: the image tower without
fusion (and, for coarse variants, without its final norm) gives ``[B, N, C_img]``; every decoder layer with a
t2i branch cross-attends to those tokens, through a caption adapter ``cross_modal_att_layers[k]`` when the
layer's key width differs from ``C_img``. Next-token logits are ``mlm_score(cross_modal_text_transform(h))``.

Objectives (``caption.objective``):

- ``mle``: mean token cross-entropy of teacher forcing;
- ``cider``: ``mle_weight * MLE + rl_weight * RL`` where RL is the policy gradient of ``num_samples``
  ancestral samples per pair, rewarded by CIDEr-D against all ground-truth captions of the image (document
  frequencies of the training captions, cached), with a **greedy-decoding baseline** (self-critical) by
  default or the reference's fixed baseline CIDEr = 1 (``caption.baseline: fixed``).

Evaluation decodes every image of ``data.eval_split`` with beam search (beam 5, length normalisation,
``<mask>`` banned) and reports CIDEr-D (``caption/CIDEr``, x100) computed by :func:`fiber_eval.cider_d` on
simply tokenised text (the Java PTB tokenizer is not required; the official toolkit scores are added when
``pycocoevalcap`` is installed), beside the baseline of giving every image the most common training caption
(``baseline/caption/CIDEr``, :func:`fiber_eval.baselines.constant_caption_cider`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fiber_data import CocoCaptionsDataset, EmptyBatch, ImageTextBatch, ImageTextCollator, load_retrieval_corpus
from fiber_eval import (
    DocumentFrequencies,
    cider_d,
    compute_document_frequencies,
    load_document_frequencies,
    save_document_frequencies,
)
from fiber_eval.baselines import constant_caption_cider, most_common_caption
from fiber_eval.caption import simple_cider
from fiber_models.caption import CaptionModel as CaptionModel
from fiber_models.caption import CaptionSettings as CaptionSettings
from fiber_train.tasks.base import Fabricish
from fiber_train.tasks.downstream_common import (
    CaptionPairsTask,
    DownstreamConfig,
    build_backbone,
)

__all__ = [
    "CaptionConfig",
    "CaptionModel",
    "CaptionSettings",
    "CaptionTask",
    "CiderReward",
    "normalize_for_reward",
]


@dataclass(frozen=True)
class CaptionConfig(DownstreamConfig):
    """Complete configuration of ``fiber-train finetune caption``: the sections of
    :class:`~fiber_train.tasks.downstream_common.DownstreamConfig` and ``caption``."""

    task: str = "caption"
    caption: CaptionSettings = field(default_factory=CaptionSettings)


# ------------------------------------------------------------------------------------------------- rewards


def normalize_for_reward(text: str) -> str:
    """The reward's text normalisation (docs/reference/training.md §2.6): strip, drop one trailing period, append ``<eos>``."""
    text = text.strip()
    if text.endswith("."):
        text = text[:-1]
    return f"{text} <eos>"


class CiderReward:
    """CIDEr-D rewards of generated captions against all references of their image.

    Args:
        references: image id -> raw reference captions (the training captions).
        dfs: document frequencies; ``None`` computes them from ``references`` (normalised as the candidates).
    """

    def __init__(self, references: dict[Any, list[str]], dfs: DocumentFrequencies | None = None) -> None:
        self.references = {k: [normalize_for_reward(r) for r in v] for k, v in references.items()}
        self.dfs = dfs if dfs is not None else compute_document_frequencies(self.references.values())

    def __call__(self, image_ids: Sequence[Any], captions: Sequence[str]) -> Tensor:
        """``[N]`` raw CIDEr-D (1.0 = 100) of ``captions[n]`` against the references of ``image_ids[n]``."""
        cands = {n: normalize_for_reward(c) for n, c in enumerate(captions)}
        refs = {n: self.references[i] for n, i in enumerate(image_ids)}
        _, per = cider_d(cands, refs, self.dfs)
        return torch.tensor([per[n] for n in range(len(captions))], dtype=torch.float32)


# --------------------------------------------------------------------------------------------------- model


# ---------------------------------------------------------------------------------------------------- task


class CaptionTask(CaptionPairsTask):
    """``fiber-train finetune caption`` (see :class:`fiber_train.tasks.base.TrainTask`)."""

    name = "caption"
    title = "Captioning"
    baseline_name = "the most common training caption for every image"

    def __init__(self, config: CaptionConfig) -> None:
        super().__init__(config)
        self._reward: CiderReward | None = None
        self._constant: str | None = None

    def collate_fn(self) -> Callable[[list[Any]], ImageTextBatch | EmptyBatch]:
        return ImageTextCollator(self.tokenizer, max_length=self.data.max_text_len, mlm_probability=0.0)

    def special_ids(self) -> dict[str, int]:
        """``{"bos", "eos", "pad", "mask"}`` ids of the tokenizer."""
        tok = self.tokenizer
        return {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id, "mask": tok.mask_token_id}

    def reward(self) -> CiderReward:
        """CIDEr-D reward over the training captions; document frequencies cached in ``caption.cider_df``."""
        if self._reward is None:
            ds = self.train_dataset()
            assert isinstance(ds, CocoCaptionsDataset)
            refs: dict[Any, list[str]] = {}
            for i in range(len(ds)):
                refs.setdefault(ds.image_id(i), []).append(ds.caption(i))
            cache = Path(self.config.caption.cider_df) if self.config.caption.cider_df else None
            dfs = load_document_frequencies(cache) if cache is not None and cache.is_file() else None
            self._reward = CiderReward(refs, dfs)
            if cache is not None and dfs is None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                save_document_frequencies(self._reward.dfs, cache)
        return self._reward

    def constant_caption(self) -> str:
        """The most common caption of ``data.train_split``: the baseline's caption for every image."""
        if self._constant is None:
            s, split = self.config.caption, self.data.train_split
            corpus = load_retrieval_corpus(self.data_file(s.annotations, split), self.data_file(s.images, split))
            self._constant = most_common_caption(corpus.texts)
        return self._constant

    def decode(self, tokens: Tensor) -> list[str]:
        """Token rows -> caption strings (special tokens removed)."""
        return [self.tokenizer.decode(row.tolist(), skip_special_tokens=True).strip() for row in tokens.cpu()]

    def build_model(self, fabric: Fabricish | None = None) -> CaptionModel:
        """Caption model, initialised from ``model.pretrained``; CIDEr rewards attached for ``cider``."""
        cfg = self.config
        model = CaptionModel(
            build_backbone(cfg.model, self.tokenizer.vocab_size),
            cfg.model.hidden_dim,
            self.tokenizer.vocab_size,
            self.special_ids(),
            cfg.caption,
        )
        self.init_from_pretrained(model)
        if cfg.caption.objective == "cider":
            reward = self.reward()
            model.reward_fn = lambda image_ids, tokens: reward(image_ids, self.decode(tokens))
        return model

    @torch.no_grad()
    def evaluate(self, model: nn.Module, fabric: Fabricish) -> dict[str, float]:
        """Beam-search every evaluation image; CIDEr-D (x100) against its references (``caption/CIDEr``)."""
        if not self.config.eval.enabled:
            return {}
        assert isinstance(model, CaptionModel)
        s = self.config.caption
        split = self.data.eval_split
        corpus = load_retrieval_corpus(self.data_file(s.annotations, split), self.data_file(s.images, split))
        images = corpus.image_dataset(self.image_transform())
        captions: dict[Any, str] = {}
        for pix, rows in self.eval_loader(self.eval_subset(images)):
            texts = self.decode(model.generate(pix.to(fabric.device)))
            for r, text in zip(rows.tolist(), texts):
                image_id = corpus.image_ids[r]
                captions[image_id.item() if hasattr(image_id, "item") else image_id] = text
        refs: dict[Any, list[str]] = {k: [] for k in captions}
        for t, r in enumerate(corpus.text_to_image.tolist()):
            iid = corpus.image_ids[r]
            key = iid.item() if hasattr(iid, "item") else iid
            if key in refs:
                refs[key].append(corpus.texts[t])
        cider, _ = simple_cider(captions, refs)
        metrics = {"caption/CIDEr": 100.0 * cider, "caption/num_images": float(len(captions))}
        metrics["baseline/caption/CIDEr"] = constant_caption_cider(self.constant_caption(), refs)
        metrics["caption/mean_length"] = sum(len(c.split()) for c in captions.values()) / max(len(captions), 1)
        if s.toolkit_metrics:
            metrics.update(_toolkit_scores(captions, refs))
        run_dir = self.run_dir
        if run_dir is not None:
            records = [{"image_id": k, "caption": v} for k, v in captions.items()]
            (Path(run_dir) / f"captions_{split}_predictions.json").write_text(json.dumps(records))
        return metrics


def _toolkit_scores(captions: dict[Any, str], refs: dict[Any, list[str]]) -> dict[str, float]:
    """BLEU-1..4 / ROUGE-L / CIDEr of the COCO toolkit as ``caption/toolkit/*``; empty without ``pycocoevalcap``."""
    from fiber_eval import caption_metrics

    try:
        scores, _ = caption_metrics(captions, refs, metrics=("BLEU", "ROUGE-L", "CIDEr"), allow_simple_tokenizer=True)
    except ImportError:  # pycocoevalcap is an optional extra of fiber-eval
        return {}
    return {f"caption/toolkit/{k}": v for k, v in scores.items()}
