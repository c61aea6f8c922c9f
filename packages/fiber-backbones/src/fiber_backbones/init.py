"""Reference initialisation shared by the Swin and text towers (docs/reference/architecture.md §2, §3).

Linear weights are drawn from ``N(0, 0.02)`` (truncated at ±2 for Swin, as timm does; plain for the RoBERTa
text tower), Linear biases are zero and LayerNorms are set to weight 1 / bias 0. Each tower adds its own
modules (Swin's relative-position tables, the text embeddings).
"""

from __future__ import annotations

from torch import nn

__all__ = ["init_linear_and_norm"]


def init_linear_and_norm(module: nn.Module, *, truncated: bool = False, std: float = 0.02) -> None:
    """Initialise ``module`` in place when it is an ``nn.Linear`` or ``nn.LayerNorm`` (other modules are left
    as they are); meant for ``model.apply``.

    Args:
        module: the module (its children are not visited).
        truncated: draw Linear weights from the normal truncated to ``[-2, 2]`` (``nn.init.trunc_normal_``).
        std: standard deviation of the Linear weights.
    """
    if isinstance(module, nn.Linear):
        (nn.init.trunc_normal_ if truncated else nn.init.normal_)(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
