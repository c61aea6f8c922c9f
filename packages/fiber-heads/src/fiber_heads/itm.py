"""Image-text matching head and hard-negative mining (docs/reference/architecture.md §8.5, docs/reference/training.md §1.5).

``MatchingHead`` is the official ``itm_score`` (a single Linear ``fc`` from ``cls [B, 2H]`` to 2 classes,
label 1 = matched). ITM retrieval scores a pair by the class-1 logit of this head; the official
``rank_output`` copy is deliberately not reproduced (docs/reference/architecture.md §10 item 9).

Hard negatives are drawn from the ITC logits over ``[local batch ; queue]``: for each image a caption
``~ softmax(s_i2t)`` and for each caption an image ``~ softmax(s_t2i)``, the positive excluded.
:func:`build_itm_batch_indices` turns the draws into the 3B (image, text, label) triples of the fused batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fiber_heads._classifier import classification_output
from fiber_heads.init import init_head_weights
from fiber_heads.types import HeadOutput


@torch.no_grad()
def sample_hard_negatives(
    sim_i2t: Tensor,
    sim_t2i: Tensor,
    *,
    num_valid: int | None = None,
    positives: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Draw one hard-negative caption per image and one hard-negative image per caption.

    Per docs/reference/training.md §1.5: ``W = softmax(sim[:, :num_valid])`` (no gradient), ``+1e-9``, the positive's weight
    set to 0, then one multinomial draw per row. The official code adds the ``1e-9`` floor *after* zeroing the
    positive, so when the softmax underflows to the positive alone it can draw the positive as its
    "negative"; applying the floor first keeps every other column drawable and the positive never drawn.

    Args:
        sim_i2t: ``[R, K]`` image-to-text logits (``ContrastiveOutput.logits["i2t"]``): row ``i`` scores image
            ``i`` against the ``K`` candidate captions (local batch then queue).
        sim_t2i: ``[R, K]`` text-to-image logits, row ``j`` scores caption ``j`` against the candidate images.
        num_valid: number of leading columns that may be drawn (``ContrastiveOutput.num_valid``); all when
            ``None``.
        positives: ``LongTensor [R]`` column of each row's positive (``ContrastiveOutput.targets``); the
            diagonal ``arange(R)`` when ``None``.
        generator: optional RNG for the draws (must live on the logits' device).

    Returns:
        ``(text_neg, image_neg)``, two ``LongTensor [R]`` of column indices in ``[0, num_valid)``.

    Raises:
        ValueError: on mismatched shapes, fewer than 2 valid columns, or a ``num_valid`` outside the columns.
    """
    if sim_i2t.dim() != 2 or sim_i2t.shape != sim_t2i.shape:
        raise ValueError(
            f"sample_hard_negatives: sim_i2t and sim_t2i must be [R, K] of one shape, got "
            f"{tuple(sim_i2t.shape)} and {tuple(sim_t2i.shape)}"
        )
    rows, cols = sim_i2t.shape
    n_valid = cols if num_valid is None else num_valid
    if not 2 <= n_valid <= cols:
        raise ValueError(f"sample_hard_negatives: num_valid={n_valid} outside [2, {cols}] (need a non-positive column)")
    if positives is None:
        if rows > n_valid:
            raise ValueError(f"sample_hard_negatives: {rows} rows but only {n_valid} valid columns for the diagonal")
        positives = torch.arange(rows, device=sim_i2t.device)
    elif tuple(positives.shape) != (rows,):
        raise ValueError(f"sample_hard_negatives: positives must be [{rows}], got {tuple(positives.shape)}")

    def draw(sim: Tensor) -> Tensor:
        weights = F.softmax(sim[:, :n_valid].float(), dim=1) + 1e-9
        # Zero the positive of each row *after* the 1e-9 floor (scatter: positives may lie anywhere).
        weights = weights.scatter(1, positives.view(-1, 1).to(weights.device), 0.0)
        return torch.multinomial(weights, 1, generator=generator).squeeze(1)

    return draw(sim_i2t), draw(sim_t2i)


@dataclass(frozen=True)
class ITMBatchIndices:
    """Row layout of the 3B fused ITM batch (docs/reference/training.md §1.5).

    Column indices refer to the ITC logit columns: ``[0, B)`` the local batch, ``>= B`` queue entries (look
    them up in ``ContrastiveOutput.column_index`` to get dataset indices to re-fetch).

    Attributes:
        image_columns: ``LongTensor [3B]`` = ``[0..B-1, 0..B-1, image_neg]``.
        text_columns: ``LongTensor [3B]`` = ``[0..B-1, text_neg, 0..B-1]``.
        labels: ``LongTensor [3B]`` = ``[1]*B + [0]*2B``.
        batch_size: ``B``.
    """

    image_columns: Tensor
    text_columns: Tensor
    labels: Tensor
    batch_size: int

    @property
    def image_is_local(self) -> Tensor:
        """``BoolTensor [3B]``: the image of the row is in the local batch (else it comes from the queue)."""
        return self.image_columns < self.batch_size

    @property
    def text_is_local(self) -> Tensor:
        """``BoolTensor [3B]``: the caption of the row is in the local batch (else it comes from the queue)."""
        return self.text_columns < self.batch_size


def build_itm_batch_indices(text_neg: Tensor, image_neg: Tensor) -> ITMBatchIndices:
    """Assemble the 3B ITM rows from the sampled negatives.

    Args:
        text_neg: ``LongTensor [B]`` negative caption column per image (from :func:`sample_hard_negatives`).
        image_neg: ``LongTensor [B]`` negative image column per caption.

    Returns:
        :class:`ITMBatchIndices`; rows ``[0, B)`` are positives, ``[B, 2B)`` pair image ``i`` with
        ``text_neg[i]``, ``[2B, 3B)`` pair ``image_neg[j]`` with caption ``j``.
    """
    if text_neg.dim() != 1 or text_neg.shape != image_neg.shape:
        raise ValueError(
            f"build_itm_batch_indices: text_neg and image_neg must be [B], got {tuple(text_neg.shape)} and "
            f"{tuple(image_neg.shape)}"
        )
    batch = text_neg.shape[0]
    device = text_neg.device
    local = torch.arange(batch, device=device)
    image_columns = torch.cat([local, local, image_neg.long()])
    text_columns = torch.cat([local, text_neg.long(), local])
    labels = torch.cat(
        [torch.ones(batch, dtype=torch.long, device=device), torch.zeros(2 * batch, dtype=torch.long, device=device)]
    )
    return ITMBatchIndices(image_columns, text_columns, labels, batch)


class MatchingHead(nn.Module):
    """ITM classifier ``fc: Linear(2H -> 2)`` on the fused ``cls`` (official key ``itm_score.fc``).

    Args:
        hidden_dim: ``H``; ``cls`` has ``2H`` features.
    """

    sample_hard_negatives = staticmethod(sample_hard_negatives)
    build_batch_indices = staticmethod(build_itm_batch_indices)

    def __init__(self, hidden_dim: int) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.fc = nn.Linear(2 * hidden_dim, 2)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Reference initialisation: ``N(0, 0.02)`` weight, zero bias."""
        init_head_weights(self)

    def logits(self, cls: Tensor) -> Tensor:
        """``[B, 2H] -> [B, 2]`` match logits (class 1 = matched)."""
        if cls.dim() != 2 or cls.shape[-1] != 2 * self.hidden_dim:
            raise ValueError(f"MatchingHead: cls must be [B, {2 * self.hidden_dim}], got {tuple(cls.shape)}")
        return self.fc(cls)

    def forward(self, cls: Tensor, labels: Tensor | None = None) -> HeadOutput:
        """ITM logits and, with labels, the mean cross-entropy.

        Args:
            cls: ``[B, 2H]`` fused pooled features.
            labels: optional ``LongTensor [B]``, 1 for matched pairs, 0 otherwise.

        Returns:
            :func:`~fiber_heads._classifier.classification_output` ``"itm"``: logits ``[B, 2]``, with labels
            the loss and logs ``itm/loss``, ``itm/acc``.
        """
        return classification_output("itm", "MatchingHead", self.logits(cls), labels)

    def score(self, cls: Tensor) -> Tensor:
        """ITM retrieval score: the class-1 logit, ``[B, 2H] -> [B]``."""
        return self.logits(cls)[:, 1]
