"""Image captioning fine-tuning (training.md §2.6; decoder path: architecture.md §8.3; metrics: evaluation.md §5).

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
``pycocoevalcap`` is installed).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from fiber_backbones import FusionBackbone
from fiber_data import CocoCaptionsDataset, ImageTextBatch, ImageTextCollator, load_retrieval_corpus
from fiber_eval import (
    DocumentFrequencies,
    cider_d,
    compute_document_frequencies,
    load_document_frequencies,
    save_document_frequencies,
)
from fiber_eval.caption import simple_tokenize
from fiber_heads import MaskedLMHead
from fiber_heads.captioning import (
    CaptionAdapters,
    StepFn,
    beam_search,
    caption_mle_loss,
    greedy_decode,
    sample_decode,
    self_critical_loss,
    sequence_mean_logprob,
)
from fiber_train.config import CONFIG_VERSION, DataConfig, ModelConfig, OptimConfig, TrainerConfig
from fiber_train.tasks.base import Fabricish, StepOutput
from fiber_train.tasks.downstream_common import (
    DownstreamEvalConfig,
    DownstreamModel,
    DownstreamTaskBase,
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
class CaptionSettings:
    """Captioning objective and decoding.

    Args:
        objective: ``mle`` or ``cider`` (CIDEr optimisation).
        beam_size: evaluation beam width (5).
        max_decode_len: maximal length of generated sequences including ``<s>`` (50).
        length_normalize: rank beams by mean instead of summed log-probability (reference: True).
        dedupe_beams: forbid the reference's duplicate finished beams (False = reference parity).
        num_samples: sampled captions per training pair in CIDEr optimisation (5).
        baseline: ``greedy`` (self-critical: the greedy caption's reward) or ``fixed`` (reference: CIDEr 1.0).
        mle_weight / rl_weight: loss mix of CIDEr optimisation (0.3 / 0.7).
        toolkit_metrics: also report the COCO caption toolkit's BLEU / ROUGE-L / CIDEr when ``pycocoevalcap``
            is installed (PTB tokenisation needs Java; without it whitespace tokens are used, flagged unofficial).
        cider_df: cache file of the training captions' CIDEr document frequencies (``.json`` or ``.json.gz``);
            computed and written when absent; empty keeps them in memory only.
        augment: train with the fine-tuning augmentation of training.md §2.1 (RandomResizedCrop, horizontal flip
            with the text unchanged, RandAugment); false trains on the evaluation transform.
        annotations / images: COCO-captions file and image folder templates relative to ``data.root``.
    """

    objective: str = "mle"
    beam_size: int = 5
    max_decode_len: int = 50
    length_normalize: bool = True
    dedupe_beams: bool = False
    num_samples: int = 5
    baseline: str = "greedy"
    mle_weight: float = 0.3
    rl_weight: float = 0.7
    toolkit_metrics: bool = True
    cider_df: str = ""
    augment: bool = True
    annotations: str = "annotations/captions_{split}.json"
    images: str = "images/{split}"

    def __post_init__(self) -> None:
        if self.objective not in ("mle", "cider"):
            raise ValueError(f"caption.objective must be 'mle' or 'cider', got {self.objective!r}")
        if self.baseline not in ("greedy", "fixed"):
            raise ValueError(f"caption.baseline must be 'greedy' or 'fixed', got {self.baseline!r}")
        if self.beam_size < 1 or self.num_samples < 1 or self.max_decode_len < 2:
            raise ValueError("caption.beam_size and caption.num_samples must be >= 1, max_decode_len >= 2")


@dataclass(frozen=True)
class CaptionConfig:
    """Complete configuration of ``fiber-train finetune caption``."""

    version: int = CONFIG_VERSION
    task: str = "caption"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(max_text_len=50))
    caption: CaptionSettings = field(default_factory=CaptionSettings)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: DownstreamEvalConfig = field(default_factory=DownstreamEvalConfig)


# ------------------------------------------------------------------------------------------------- rewards


def normalize_for_reward(text: str) -> str:
    """The reward's text normalisation (training.md §2.6): strip, drop one trailing period, append ``<eos>``."""
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


class CaptionModel(DownstreamModel):
    """The text tower as a causal decoder over un-fused image tokens (architecture.md §8.3).

    Args:
        backbone: the fusion backbone (its ``text_encoder`` runs with ``causal=True``).
        hidden_dim: ``H`` of ``cross_modal_text_transform``.
        vocab_size: output vocabulary ``V`` of ``mlm_score``.
        special_ids: ``{"bos", "eos", "pad", "mask"}`` token ids.
        settings: objective and decoding settings.
    """

    def __init__(
        self,
        backbone: FusionBackbone,
        hidden_dim: int,
        vocab_size: int,
        special_ids: dict[str, int],
        settings: CaptionSettings,
    ) -> None:
        super().__init__(backbone, hidden_dim)
        self.mlm_score = MaskedLMHead(hidden_dim, vocab_size)
        cfg = backbone.config  # type: ignore[attr-defined]
        image_dim = backbone.image_dim
        widths = {k: cfg.swin.stage_dim(s) for (s, _), k in backbone.fusion_schedule}  # type: ignore[attr-defined]
        self.cross_layers: tuple[int, ...] = tuple(sorted(widths))
        self.cross_modal_att_layers = CaptionAdapters(image_dim, {k: w for k, w in widths.items() if w != image_dim})
        self.special_ids = dict(special_ids)
        self.settings = settings
        self.reward_fn: Callable[[Sequence[Any], Tensor], Tensor] | None = None

    def head_modules(self) -> list[nn.Module]:
        return [self.mlm_score]

    def cross_modal_modules(self) -> list[nn.Module]:
        return [self.projection, self.cross_modal_att_layers]

    @property
    def banned_ids(self) -> tuple[int, ...]:
        """Ids never generated (``<mask>``, whose logit the reference sets to -10000)."""
        return (self.special_ids["mask"],)

    def image_memory(self, pixel_values: Tensor) -> Tensor:
        """Un-fused last-stage image tokens ``[B, N, C_img]`` (coarse variants: no final norm)."""
        return self.backbone(pixel_values, None, fuse=False).image.tokens

    def decode_logits(self, input_ids: Tensor, attention_mask: Tensor, memory: Tensor) -> Tensor:
        """Teacher-forced next-token logits.

        Args:
            input_ids: ``[B, L]``.
            attention_mask: ``BoolTensor [B, L]`` (combined with the causal mask).
            memory: ``[B, N, C_img]`` from :meth:`image_memory`.

        Returns:
            ``[B, L, V]``; position ``t`` predicts token ``t + 1``.
        """
        cross = self.cross_modal_att_layers.adapt(memory, self.cross_layers)
        hidden = self.backbone.text_encoder(  # type: ignore[attr-defined]
            input_ids, attention_mask, causal=True, cross_inputs=cross
        )
        return self.mlm_score.logits(self.projection.cross_modal_text_transform(hidden))

    def step_fn(self, memory: Tensor) -> StepFn:
        """The decoding step over ``memory [B, N, C_img]``: ``(tokens [M, t], rows [M]) -> logits [M, V]``.

        Only the causal mask is used during generation (no padding mask), as in the reference.
        """

        def step(tokens: Tensor, rows: Tensor) -> Tensor:
            mask = torch.ones_like(tokens, dtype=torch.bool)
            return self.decode_logits(tokens, mask, memory.index_select(0, rows))[:, -1]

        return step

    def _special(self) -> dict[str, int]:
        s = self.special_ids
        return {"bos_id": s["bos"], "eos_id": s["eos"], "pad_id": s["pad"]}

    @torch.no_grad()
    def generate(self, pixel_values: Tensor, *, beam_size: int | None = None) -> Tensor:
        """Beam-search captions ``LongTensor [B, T]`` (the best beam; ``beam_size`` 1 decodes greedily)."""
        st = self.settings
        k = st.beam_size if beam_size is None else beam_size
        memory = self.image_memory(pixel_values)
        b = memory.shape[0]
        if k == 1:
            return greedy_decode(
                self.step_fn(memory), b, max_length=st.max_decode_len, banned_ids=self.banned_ids,
                device=memory.device, **self._special(),
            )  # fmt: skip
        return beam_search(
            self.step_fn(memory), b, beam_size=k, max_length=st.max_decode_len, banned_ids=self.banned_ids,
            length_normalize=st.length_normalize, dedupe_finished=st.dedupe_beams, device=memory.device,
            **self._special(),
        ).best  # fmt: skip

    def forward(self, batch: ImageTextBatch) -> StepOutput:
        """MLE (and, for ``cider``, the policy-gradient term) on one batch of (image, caption) pairs."""
        pad = self.special_ids["pad"]
        memory = self.image_memory(batch.pixel_values)
        logits = self.decode_logits(batch.input_ids, batch.attention_mask, memory)
        mle = caption_mle_loss(logits, batch.input_ids, pad)
        logs: dict[str, Tensor] = {"caption/mle": mle.detach()}
        if self.settings.objective == "mle":
            return StepOutput(loss=mle, logs=logs)
        if self.reward_fn is None:
            raise RuntimeError("CaptionModel: objective 'cider' needs reward_fn (set by CaptionTask.build_model)")
        st = self.settings
        b = memory.shape[0]
        with torch.no_grad():
            samples, rows = sample_decode(
                self.step_fn(memory.detach()), b, st.num_samples, max_length=st.max_decode_len,
                banned_ids=self.banned_ids, device=memory.device, **self._special(),
            )  # fmt: skip
        image_ids = [batch.image_ids[r] for r in rows.tolist()]
        reward = self.reward_fn(image_ids, samples).to(memory.device)
        if st.baseline == "greedy":
            with torch.no_grad():
                greedy = greedy_decode(
                    self.step_fn(memory.detach()), b, max_length=st.max_decode_len, banned_ids=self.banned_ids,
                    device=memory.device, **self._special(),
                )  # fmt: skip
            baseline = self.reward_fn(list(batch.image_ids), greedy).to(memory.device)[rows]
        else:
            baseline = torch.ones_like(reward)
        sample_logits = self.decode_logits(samples, samples != pad, memory.index_select(0, rows))
        mean_logp = sequence_mean_logprob(sample_logits, samples, pad)
        rl = self_critical_loss(mean_logp, reward, baseline, b)
        logs.update({"caption/rl": rl.detach(), "caption/reward": reward.mean(), "caption/baseline": baseline.mean()})
        return StepOutput(loss=st.mle_weight * mle + st.rl_weight * rl, logs=logs)


# ---------------------------------------------------------------------------------------------------- task


class CaptionTask(DownstreamTaskBase):
    """``fiber-train finetune caption`` (see :class:`fiber_train.tasks.base.TrainTask`)."""

    name = "caption"

    def __init__(self, config: CaptionConfig) -> None:
        super().__init__(config)
        self._train: CocoCaptionsDataset | None = None
        self._reward: CiderReward | None = None

    def _file(self, template: str, split: str) -> Path:
        return Path(self.data.root) / template.format(split=split)

    def required_files(self) -> Sequence[Path]:
        s = self.config.caption
        return [
            self._file(t, sp) for sp in (self.data.train_split, self.data.eval_split) for t in (s.annotations, s.images)
        ]

    def data_help(self) -> str:
        return (
            "Captioning expects a COCO-captions file at caption.annotations and images under caption.images "
            "(templates with {split}); `fiber-data synth --out DIR` writes them."
        )

    def train_dataset(self) -> Dataset:
        """(image, caption) pairs of ``data.train_split`` (an image with k captions is visited k times)."""
        if self._train is None:
            s = self.config.caption
            split = self.data.train_split
            self._train = CocoCaptionsDataset(
                self._file(s.annotations, split), self._file(s.images, split), transform=self.train_transform(s.augment)
            )
        return self._train

    def collate_fn(self) -> Callable[[list[Any]], ImageTextBatch]:
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

    def decode(self, tokens: Tensor) -> list[str]:
        """Token rows -> caption strings (special tokens removed)."""
        return [self.tokenizer.decode(row.tolist(), skip_special_tokens=True).strip() for row in tokens.cpu()]

    def build_model(self) -> CaptionModel:
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
        corpus = load_retrieval_corpus(self._file(s.annotations, split), self._file(s.images, split))
        images = corpus.image_dataset(self.image_transform())
        limit = self.config.eval.max_samples
        n = min(limit, len(images)) if limit else len(images)
        loader = DataLoader(
            torch.utils.data.Subset(images, range(n)),
            batch_size=self.config.eval.batch_size,
            num_workers=self.data.num_workers,
        )
        captions: dict[Any, str] = {}
        for pix, rows in loader:
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
        cands = {k: v[0] for k, v in simple_tokenize({k: [c] for k, c in captions.items()}).items()}
        cider, _ = cider_d(cands, simple_tokenize(refs))
        metrics = {"caption/CIDEr": 100.0 * cider, "caption/num_images": float(len(captions))}
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
