"""Reference initialisation of the coarse heads (docs/reference/architecture.md §7, "coarse heads").

Linear weights are drawn from ``N(0, 0.02)`` with zero biases, LayerNorms are set to weight 1 / bias 0.
"""

from __future__ import annotations

from torch import nn


def init_head_weights(module: nn.Module, std: float = 0.02) -> None:
    """Initialise every ``nn.Linear`` / ``nn.LayerNorm`` inside ``module`` in place.

    Args:
        module: module whose sub-modules (itself included) are re-initialised.
        std: standard deviation of the normal initialisation of Linear weights.
    """
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
