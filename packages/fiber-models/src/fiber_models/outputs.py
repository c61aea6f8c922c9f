"""What a model's training ``forward`` returns to the trainer."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import Tensor

__all__ = ["StepOutput"]


@dataclass
class StepOutput:
    """What a model's training ``forward`` returns to the loop (not frozen: Fabric walks and rebuilds outputs).

    Attributes:
        loss: scalar total loss (weighted sum of the objectives).
        logs: detached scalars to log (each objective's loss, accuracies, temperature...).
    """

    loss: Tensor
    logs: Mapping[str, Tensor] = field(default_factory=dict)
