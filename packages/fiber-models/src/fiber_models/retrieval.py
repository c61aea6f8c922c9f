"""Image-text retrieval: ITC dual encoder + ITM re-ranking (docs/reference/training.md §2.5, docs/reference/evaluation.md §4.2).

:class:`RetrievalModel` embeds images and texts (un-fused) and scores pairs with the fused ITM head;
:func:`rerank_candidates` / :func:`reranked_scores` re-rank the dual encoder's top-k with the fused scorer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fiber_backbones import FusionBackbone, TextInputs
from fiber_heads import ContrastiveHead, MatchingHead
from fiber_models.coarse import ImageTextScoring
from fiber_models.downstream import DownstreamModel, set_text_pool
from fiber_models.outputs import StepOutput

__all__ = ["RetrievalModel", "RetrievalModelConfig", "rerank_candidates", "reranked_scores"]


@dataclass(frozen=True)
class RetrievalModelConfig:
    """What rebuilds a :class:`RetrievalModel` around its backbone.

    Args:
        hidden_dim: ``H`` of the fused projection.
        itc_dim: contrastive embedding width ``D``.
        objective: training objective, ``itc`` or ``itm``.
        queue_size / temperature_init: ITC training settings (the queue is never saved).
        text_pool: ``first`` or ``mean``.
    """

    hidden_dim: int
    itc_dim: int
    objective: str = "itc"
    queue_size: int = 0
    temperature_init: float = 0.07
    text_pool: str = "first"


class RetrievalModel(ImageTextScoring, DownstreamModel):
    """Backbone + fused projection + ITC head (``itc``) + ITM head (``itm_score``).

    Args:
        backbone: the fusion backbone.
        hidden_dim: ``H`` of the fused projection.
        itc_dim: contrastive embedding width.
        objective: ``itc`` or ``itm``.
        queue_size / temperature_init: ITC settings.
    """

    def __init__(
        self,
        backbone: FusionBackbone,
        hidden_dim: int,
        itc_dim: int,
        objective: str = "itc",
        queue_size: int = 0,
        temperature_init: float = 0.07,
    ) -> None:
        super().__init__(backbone, hidden_dim)
        self.objective = objective
        self.itc = ContrastiveHead(
            backbone.image_dim, backbone.text_dim, itc_dim, temperature_init=temperature_init, queue_size=queue_size
        )
        self.itm_score = MatchingHead(hidden_dim)
        self._config = RetrievalModelConfig(hidden_dim, itc_dim, objective, queue_size, temperature_init)

    model_type = "retrieval"
    config_class = RetrievalModelConfig

    def get_config(self) -> RetrievalModelConfig:
        """The model's config (text pooling as the poolers currently hold it)."""
        return dataclasses.replace(self._config, objective=self.objective, text_pool=self.projection.text_pool)

    @classmethod
    def from_config(cls, backbone: FusionBackbone, config: RetrievalModelConfig) -> RetrievalModel:
        """A fresh model around ``backbone``."""
        c = config
        model = cls(backbone, c.hidden_dim, c.itc_dim, c.objective, c.queue_size, c.temperature_init)
        set_text_pool(model, c.text_pool)
        return model

    def head_modules(self) -> list[nn.Module]:
        return [self.itm_score]

    def cross_modal_modules(self) -> list[nn.Module]:
        # The temperature stays in the base group, as in coarse pre-training.
        return [self.projection, *[m for n, m in self.itc.named_children()]]

    def forward(self, batch: Any) -> StepOutput:
        """ITC loss on an ``ImageTextBatch`` or ITM loss on an :class:`ITMBatch`, per ``objective``."""
        text = TextInputs(batch.input_ids, batch.attention_mask)
        if self.objective == "itc":
            out = self.itc(self.embed_images(batch.pixel_values), self.embed_texts(text), index=batch.index)
        else:
            cls = self.projection(self.backbone(batch.pixel_values, text, fuse=True)).cls
            out = self.itm_score(cls, batch.labels)
        assert out.loss is not None
        return StepOutput(loss=out.loss, logs=out.logs)


# -------------------------------------------------------------------------------------------- re-ranking


def rerank_candidates(sim: Tensor, k: int) -> Tensor:
    """Which (image, caption) pairs the fused scorer re-ranks.

    Args:
        sim: ``[Ni, Nt]`` dual-encoder similarities.
        k: per image its ``k`` best captions and per caption its ``k`` best images (ties broken by index);
            0 or ``k >= max(Ni, Nt)`` selects every pair.

    Returns:
        ``BoolTensor [Ni, Nt]``, the union of both candidate sets.
    """
    ni, nt = sim.shape
    if k == 0 or (k >= nt and k >= ni):
        return torch.ones(ni, nt, dtype=torch.bool, device=sim.device)
    chosen = torch.zeros(ni, nt, dtype=torch.bool, device=sim.device)
    # stable descending sort: equal scores keep index order (docs/reference/evaluation.md §4.2)
    i2t = torch.sort(sim, dim=1, descending=True, stable=True).indices[:, : min(k, nt)]
    chosen.scatter_(1, i2t, True)
    t2i = torch.sort(sim, dim=0, descending=True, stable=True).indices[: min(k, ni), :]
    chosen.scatter_(0, t2i, True)
    return chosen


def reranked_scores(
    sim: Tensor, k: int, score_pairs: Callable[[Tensor, Tensor], Tensor], batch_size: int = 64
) -> tuple[Tensor, int]:
    """Retrieval scores after fused re-ranking of the top-``k`` candidates.

    Args:
        sim: ``[Ni, Nt]`` dual-encoder similarities.
        k: candidates per image and per caption (0: all pairs, brute force).
        score_pairs: ``(image_rows [P], text_rows [P]) -> scores [P]``, the fused scorer; called with pairs
            sorted by image row, at most ``batch_size`` at a time.
        batch_size: pairs per call.

    Returns:
        ``(scores [Ni, Nt], num_scored)``: the fused score of every candidate pair; every other pair gets its
        similarity shifted below the lowest fused score (so it ranks after all candidates, in ITC order).
    """
    chosen = rerank_candidates(sim, k)
    rows, cols = torch.nonzero(chosen, as_tuple=True)  # row-major: grouped by image
    fused = torch.empty(rows.numel(), dtype=torch.float32)
    for start in range(0, rows.numel(), batch_size):
        sl = slice(start, start + batch_size)
        fused[sl] = score_pairs(rows[sl], cols[sl]).float().cpu()
    out = sim.float().cpu().clone()
    if (~chosen).any():
        offset = fused.min() - out.max() - 1.0
        out = out + offset
    out[rows.cpu(), cols.cpu()] = fused
    return out, int(rows.numel())
