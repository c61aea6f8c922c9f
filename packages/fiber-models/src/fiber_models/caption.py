"""Captioning: the text tower as a causal decoder over un-fused image tokens (docs/reference/architecture.md §8.3,
docs/reference/training.md §2.6). :meth:`CaptionModel.generate` decodes with beam search (or greedily)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict, cast

import torch
from torch import Tensor, nn

from fiber_backbones import FiberBackbone, FusionBackbone
from fiber_data import ImageTextBatch
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
from fiber_models.downstream import DownstreamModel, set_text_pool
from fiber_models.outputs import StepOutput
from fiber_models.pretrained import config_from_dict

__all__ = ["CaptionModel", "CaptionModelConfig", "CaptionSettings"]


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
        augment: train with the fine-tuning augmentation of docs/reference/training.md §2.1 (RandomResizedCrop, horizontal flip
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


class _SpecialIds(TypedDict):
    """The special token ids that the decoding functions take as keywords."""

    bos_id: int
    eos_id: int
    pad_id: int


@dataclass(frozen=True)
class CaptionModelConfig:
    """What rebuilds a :class:`CaptionModel` around its backbone.

    Args:
        hidden_dim: ``H`` of ``cross_modal_text_transform``.
        vocab_size: output vocabulary ``V``.
        special_ids: ``{"bos", "eos", "pad", "mask"}`` token ids of the tokenizer.
        settings: objective and decoding settings.
        text_pool: ``first`` or ``mean``.
    """

    hidden_dim: int
    vocab_size: int
    special_ids: Mapping[str, int]
    settings: CaptionSettings = field(default_factory=lambda: CaptionSettings())
    text_pool: str = "first"


class CaptionModel(DownstreamModel):
    """The text tower as a causal decoder over un-fused image tokens (docs/reference/architecture.md §8.3).

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
        # the caption decoder reuses FIBER's own text tower and geometry: only a FiberBackbone has them
        cfg = cast(FiberBackbone, backbone).config
        image_dim = backbone.image_dim
        widths = {k: cfg.swin.stage_dim(s) for (s, _), k in backbone.fusion_schedule}
        self.cross_layers: tuple[int, ...] = tuple(sorted(widths))
        self.cross_modal_att_layers = CaptionAdapters(image_dim, {k: w for k, w in widths.items() if w != image_dim})
        self.special_ids = dict(special_ids)
        self.settings = settings
        self.reward_fn: Callable[[Sequence[Any], Tensor], Tensor] | None = None
        self.vocab_size = vocab_size

    model_type = "caption"
    config_class = CaptionModelConfig

    def get_config(self) -> CaptionModelConfig:
        """The model's config."""
        return CaptionModelConfig(
            self.hidden_dim, self.vocab_size, dict(self.special_ids), self.settings, self.projection.text_pool
        )

    @classmethod
    def head_config_from_dict(cls, data: Mapping[str, Any]) -> CaptionModelConfig:
        """The config from its ``config.json`` entry (``settings`` nested)."""
        data = dict(data)
        settings = config_from_dict(CaptionSettings, data.pop("settings", {}))
        return config_from_dict(CaptionModelConfig, {**data, "settings": settings})

    @classmethod
    def from_config(cls, backbone: FusionBackbone, config: CaptionModelConfig) -> CaptionModel:
        """A fresh model around ``backbone``."""
        model = cls(backbone, config.hidden_dim, config.vocab_size, dict(config.special_ids), config.settings)
        set_text_pool(model, config.text_pool)
        return model

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
        text_encoder = cast(FiberBackbone, self.backbone).text_encoder  # a FiberBackbone (see __init__)
        hidden = text_encoder(input_ids, attention_mask, causal=True, cross_inputs=cross)
        return self.mlm_score.logits(self.projection.cross_modal_text_transform(hidden))

    def step_fn(self, memory: Tensor) -> StepFn:
        """The decoding step over ``memory [B, N, C_img]``: ``(tokens [M, t], rows [M]) -> logits [M, V]``.

        Only the causal mask is used during generation (no padding mask), as in the reference.
        """

        def step(tokens: Tensor, rows: Tensor) -> Tensor:
            mask = torch.ones_like(tokens, dtype=torch.bool)
            return self.decode_logits(tokens, mask, memory.index_select(0, rows))[:, -1]

        return step

    def _special(self) -> _SpecialIds:
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
