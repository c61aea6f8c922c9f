"""The coarse FIBER model: fusion backbone + ITC / ITM / MLM heads (docs/reference/architecture.md §8, docs/reference/training.md §1).

:class:`CoarseModel` is what ``fiber-train coarse`` trains and what ``fiber-train convert`` makes of the official
coarse checkpoint. Inference: :meth:`CoarseModel.embed_images` / :meth:`CoarseModel.embed_texts` (ITC dual
encoder) and :meth:`CoarseModel.itm_scores` (fused matching); ``forward(batch)`` is the training step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import Tensor

from fiber_backbones import FusionBackbone, FusionOutput, ImageOutput, PrefixBackbone, TextInputs, TextOutput
from fiber_data import ImageTextBatch
from fiber_heads import (
    ContrastiveHead,
    CrossModalProjection,
    GatherFn,
    MaskedLMHead,
    MatchingHead,
    build_itm_batch_indices,
    sample_hard_negatives,
)
from fiber_models.outputs import StepOutput
from fiber_models.pretrained import FiberPreTrainedModel

__all__ = ["CoarseModel", "CoarseModelConfig", "ImageTextScoring"]


@dataclass(frozen=True)
class CoarseModelConfig:
    """What rebuilds a :class:`CoarseModel` around its backbone.

    Args:
        vocab_size: MLM output size ``V``.
        hidden_dim: width ``H`` of the cross-modal projections.
        itc_dim: contrastive embedding width ``D``.
        loss_weights: ``{"itc", "itm", "mlm"}`` training weights.
        queue_size: ITC queue length (training only; the queue is never saved).
        temperature_init: initial ITC temperature (the learned one is a saved tensor).
        share_prefix: share the uni-modal prefixes across the training passes.
        text_pool: ``first`` or ``mean`` text pooling.
    """

    vocab_size: int
    hidden_dim: int
    itc_dim: int
    loss_weights: Mapping[str, float] = field(default_factory=lambda: {"itc": 1.0, "itm": 1.0, "mlm": 1.0})
    queue_size: int = 0
    temperature_init: float = 0.07
    share_prefix: bool = True
    text_pool: str = "first"


class ImageTextScoring:
    """Inference of a model holding a fusion ``backbone``, a ``projection``
    (:class:`fiber_heads.CrossModalProjection`), an ITC head ``itc`` and an ITM head ``itm_score``: the
    coarse pre-training model and the retrieval model."""

    backbone: FusionBackbone
    projection: CrossModalProjection
    itc: ContrastiveHead
    itm_score: MatchingHead

    def embed_images(self, pixel_values: Tensor) -> Tensor:
        """Normalised ITC image embeddings ``[B, itc_dim]`` (dual-encoder path, never fused)."""
        return self.itc.embed_image(self.backbone.encode_image(pixel_values))

    def embed_texts(self, text: TextInputs) -> Tensor:
        """Normalised ITC text embeddings ``[B, itc_dim]`` (dual-encoder path, never fused)."""
        return self.itc.embed_text(self.backbone.encode_text(text))

    def itm_scores(self, pixel_values: Tensor, text: TextInputs) -> Tensor:
        """Fused image-text matching score ``[B]`` (logit of the "match" class) for aligned pairs."""
        return self.itm_score.score(self.projection(self.backbone(pixel_values, text, fuse=True)).cls)


class CoarseModel(ImageTextScoring, FiberPreTrainedModel):
    """Fusion backbone + the coarse pre-training heads.

    Head attribute names follow the official checkpoint (``itm_score``, ``mlm_score``) so that converted
    official weights map by prefix only.

    Args:
        backbone: any :class:`fiber_backbones.FusionBackbone`.
        vocab_size: MLM output size (the tokenizer's vocabulary).
        hidden_dim: width of the cross-modal projections (``cls`` is ``2 * hidden_dim``).
        itc_dim: contrastive embedding width.
        loss_weights: ``{"itc": w, "itm": w, "mlm": w}``; an objective with weight 0 is not computed.
        queue_size: ITC queue length (0 disables it).
        temperature_init: initial ITC temperature.
        share_prefix: compute the uni-modal prefixes (layers below the first fused one) once per step and
            re-index them for the MLM, ITC and ITM passes, instead of re-running them for every pass. Needs a
            backbone that is also a :class:`fiber_backbones.PrefixBackbone`; any other backbone runs every pass
            from the inputs (same losses, more compute).
        gather: all-gather with gradient across processes (``None`` on one process). Without a queue the ITC
            loss scores this rank's pairs against the gathered batch of all ranks; with a queue the gathered
            features are what gets enqueued.
        rank: this process's rank (locates its positives among the gathered columns).
        text_pool: ``first`` (``<s>``, reference) or ``mean`` text pooling in the ITC and fused poolers.
    """

    def __init__(
        self,
        backbone: FusionBackbone,
        vocab_size: int,
        hidden_dim: int,
        itc_dim: int,
        loss_weights: dict[str, float],
        queue_size: int = 0,
        temperature_init: float = 0.07,
        share_prefix: bool = True,
        gather: GatherFn | None = None,
        rank: int = 0,
        text_pool: str = "first",
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.share_prefix = share_prefix
        self.projection = CrossModalProjection(backbone.image_dim, backbone.text_dim, hidden_dim, text_pool=text_pool)
        self.itc = ContrastiveHead(
            backbone.image_dim,
            backbone.text_dim,
            itc_dim,
            temperature_init=temperature_init,
            queue_size=queue_size,
            gather=gather,
            local_loss=True,
            rank=rank,
            text_pool=text_pool,
        )
        self.itm_score = MatchingHead(hidden_dim)
        self.mlm_score = MaskedLMHead(hidden_dim, vocab_size)
        self.loss_weights = dict(loss_weights)
        self._config = CoarseModelConfig(
            vocab_size, hidden_dim, itc_dim, dict(loss_weights), queue_size, temperature_init, share_prefix, text_pool
        )

    model_type = "coarse"
    config_class = CoarseModelConfig

    def get_config(self) -> CoarseModelConfig:
        """The model's config (text pooling as the poolers currently hold it)."""
        return dataclasses.replace(
            self._config, text_pool=self.projection.text_pool, loss_weights=dict(self.loss_weights)
        )

    @classmethod
    def from_config(cls, backbone: FusionBackbone, config: CoarseModelConfig) -> CoarseModel:
        """A fresh model around ``backbone``."""
        c = config
        return cls(
            backbone, c.vocab_size, c.hidden_dim, c.itc_dim, dict(c.loss_weights), c.queue_size, c.temperature_init,
            c.share_prefix, text_pool=c.text_pool,
        )  # fmt: skip

    # ---------------------------------------------------------------------------------------- training

    def forward(self, batch: ImageTextBatch) -> StepOutput:
        """One training micro-batch; returns the weighted total loss and per-objective logs."""
        w = self.loss_weights
        text = TextInputs(batch.input_ids, batch.attention_mask)
        pixels = batch.pixel_values
        total = pixels.new_zeros(())
        logs: dict[str, Tensor] = {}
        passes = (
            _SharedPasses(self.backbone, pixels, text)
            if self.share_prefix and isinstance(self.backbone, PrefixBackbone)  # else: every pass from the inputs
            else _NaivePasses(self.backbone, pixels, text)
        )

        if w.get("mlm", 0.0) > 0:
            if batch.mlm_input_ids is None or batch.mlm_labels is None:
                raise ValueError("MLM is enabled but the batch carries no masked text (collator mlm_probability=0?)")
            fused = passes.fused_masked(TextInputs(batch.mlm_input_ids, batch.attention_mask))
            out = self.mlm_score(self.projection(fused).text_feats, batch.mlm_labels)
            assert out.loss is not None
            total = total + w["mlm"] * out.loss
            logs.update(out.logs)

        if w.get("itc", 0.0) > 0 or w.get("itm", 0.0) > 0:
            image_emb = self.itc.embed_image(passes.image_only())
            text_emb = self.itc.embed_text(passes.text_only())
            itc = self.itc(image_emb, text_emb, index=batch.index)
            if w.get("itc", 0.0) > 0:
                assert itc.loss is not None
                total = total + w["itc"] * itc.loss
                logs.update(itc.logs)
            if w.get("itm", 0.0) > 0:
                bsz = pixels.shape[0]
                # candidates: this rank's micro-batch (its B columns of the ITC logits)
                first = int(itc.targets[0]) if itc.targets is not None else 0
                text_neg, image_neg = sample_hard_negatives(
                    itc.logits["i2t"][:, first : first + bsz].detach(),
                    itc.logits["t2i"][:, first : first + bsz].detach(),
                )
                rows = build_itm_batch_indices(text_neg, image_neg)
                fused = passes.fused_pairs(rows.image_columns, rows.text_columns)
                out = self.itm_score(self.projection(fused).cls, rows.labels)
                assert out.loss is not None
                total = total + w["itm"] * out.loss
                logs.update(out.logs)
        return StepOutput(loss=total, logs=logs)


class _SharedPasses:
    """The step's backbone passes with the uni-modal prefixes computed once per image / text and re-indexed
    (gradients flow through the shared prefix)."""

    def __init__(self, backbone: PrefixBackbone, pixels: Tensor, text: TextInputs) -> None:
        self.backbone = backbone
        self.image = backbone.image_prefix(pixels)
        self.text = backbone.text_prefix(text)

    def fused_masked(self, masked: TextInputs) -> FusionOutput:
        return self.backbone.forward_from_prefixes(self.image, self.backbone.text_prefix(masked), fuse=True)

    def image_only(self) -> ImageOutput:
        return self.backbone.forward_from_prefixes(self.image, None, fuse=False, path_norms=True).image

    def text_only(self) -> TextOutput:
        return self.backbone.encode_text_from_prefix(self.text)

    def fused_pairs(self, image_rows: Tensor, text_rows: Tensor) -> FusionOutput:
        return self.backbone.forward_from_prefixes(
            self.image.index_select(image_rows), self.text.index_select(text_rows), fuse=True
        )


class _NaivePasses:
    """The reference's way: every pass runs both towers from the inputs (``model.share_prefix=false``)."""

    def __init__(self, backbone: FusionBackbone, pixels: Tensor, text: TextInputs) -> None:
        self.backbone, self.pixels, self.text = backbone, pixels, text

    def fused_masked(self, masked: TextInputs) -> FusionOutput:
        return self.backbone(self.pixels, masked, fuse=True)

    def image_only(self) -> ImageOutput:
        return self.backbone.encode_image(self.pixels)

    def text_only(self) -> TextOutput:
        return self.backbone.encode_text(self.text)

    def fused_pairs(self, image_rows: Tensor, text_rows: Tensor) -> FusionOutput:
        return self.backbone(self.pixels[image_rows], self.text.index_select(text_rows), fuse=True)
