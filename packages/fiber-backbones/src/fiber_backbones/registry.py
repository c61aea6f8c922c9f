"""Named backbone variants (docs/reference/design.md §3): a local name → config-factory map plus the ``fiber.backbones``
entry-point group for third-party variants.

A registered factory takes no arguments and returns a :class:`~fiber_backbones.config.BackboneConfig`;
:func:`create_backbone` applies the ``variant=`` preset and dotted/nested overrides, builds the
:class:`~fiber_backbones.model.FiberBackbone` and optionally loads weights saved by
:func:`fiber_backbones.weights.save_pretrained`.

Built-in names:

- ``fiber-base``: FIBER-B, Swin-B 384 px + RoBERTa-base, last 6 blocks/layers fused, coarse variant
  (``variant="fine_v2" | "fine_v3" | "default"`` for the others).
- ``fiber-swin-t``: Swin-T geometry (96, (2, 2, 6, 2), (3, 6, 12, 24)) + RoBERTa-base geometry, 6 fused.
- ``fiber-tiny``: 64 px, embed 32, depths (1, 1, 2, 2), head dim 32, 4-layer 64-wide text, 3 fused; for tests
  and CPU demos (``text.vocab_size`` is usually overridden to the offline tokenizer's size).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from fiber_backbones.config import (
    BackboneConfig,
    FusionConfig,
    SwinConfig,
    TextEncoderConfig,
    last_n_schedule,
    variant_overrides,
)
from fiber_backbones.model import FiberBackbone

__all__ = [
    "ENTRY_POINT_GROUP",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BackboneEntry",
    "get_entry",
    "create_backbone",
    "get_config",
    "list_backbones",
    "register_backbone",
]

ENTRY_POINT_GROUP = "fiber.backbones"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ConfigFactory = Callable[[], BackboneConfig]


@dataclass(frozen=True)
class BackboneEntry:
    """A registered variant.

    Attributes:
        name: registry key.
        factory: zero-argument function returning the variant's :class:`BackboneConfig`.
        description: one line shown by ``fiber-backbones list``.
        image_mean: per-channel normalisation mean of the expected pixel values (ImageNet, docs/reference/training.md §1).
        image_std: per-channel normalisation std.
        tokenizer: name of the tokenizer the text tower expects (``roberta-base`` byte-level BPE).
    """

    name: str
    factory: ConfigFactory
    description: str = ""
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD
    tokenizer: str = "roberta-base"


_REGISTRY: dict[str, BackboneEntry] = {}


def register_backbone(
    name: str, *, description: str = "", tokenizer: str = "roberta-base"
) -> Callable[[ConfigFactory], ConfigFactory]:
    """Decorator registering a config factory under ``name``.

    Args:
        name: registry key.
        description: one-line description (default: first line of the factory's docstring).
        tokenizer: tokenizer name the text tower expects.

    Raises:
        ValueError: if ``name`` is already registered.
    """

    def deco(fn: ConfigFactory) -> ConfigFactory:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is already registered")
        doc = description or ((fn.__doc__ or "").strip().splitlines() or [""])[0]
        _REGISTRY[name] = BackboneEntry(name, fn, doc, tokenizer=tokenizer)
        return fn

    return deco


def _load_entry_points() -> None:
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _REGISTRY:
            continue
        try:
            fn = ep.load()
        except Exception as err:  # a broken plugin must not break the built-in variants
            warnings.warn(f"could not load backbone plugin {ep.name!r} ({ep.value}): {err}", stacklevel=3)
            continue
        _REGISTRY[ep.name] = BackboneEntry(ep.name, fn, f"(plugin {ep.value})")


def list_backbones() -> list[BackboneEntry]:
    """All registered variants (built-ins and ``fiber.backbones`` entry points), sorted by name."""
    _load_entry_points()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def get_entry(name: str) -> BackboneEntry:
    """Registry entry of ``name`` (factory plus preprocessing metadata).

    Raises:
        KeyError: unknown name (the message lists the registered ones).
    """
    if name not in _REGISTRY:
        _load_entry_points()
    if name not in _REGISTRY:
        raise KeyError(f"unknown backbone {name!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def get_config(name: str, **overrides: Any) -> BackboneConfig:
    """Config of ``name`` with the ``variant`` preset and overrides applied (see :func:`create_backbone`)."""
    cfg = get_entry(name).factory()
    return cfg.replace(overrides) if overrides else cfg


def create_backbone(name: str, pretrained: str | os.PathLike[str] | None = None, **overrides: Any) -> FiberBackbone:
    """Build a registered backbone.

    Args:
        name: registry key, e.g. ``"fiber-base"``.
        pretrained: directory written by :func:`~fiber_backbones.weights.save_pretrained` whose weights are
            loaded strictly into the built model, or ``None`` for random initialisation.
        **overrides: ``variant="coarse"|"fine_v2"|"fine_v3"|"default"`` (applied first), then config keys,
            dotted (``**{"text.vocab_size": 1000}``) or nested (``text={"vocab_size": 1000}``), plus top-level
            fields such as ``attention_backend="eager"``.

    Returns:
        The model (train mode, like any new ``nn.Module``).

    Raises:
        KeyError: unknown name or config key (the message names it).
    """
    model = FiberBackbone(get_config(name, **overrides))
    if pretrained is not None:
        from fiber_backbones.weights import load_weights

        load_weights(model, pretrained)
    return model


def _with_variant(cfg: BackboneConfig) -> BackboneConfig:
    return cfg.replace(variant_overrides(cfg.variant))


@register_backbone("fiber-base", description="FIBER-B: Swin-B 384 + RoBERTa-base, 6 fused blocks (coarse variant)")
def _fiber_base() -> BackboneConfig:
    return _with_variant(BackboneConfig())


@register_backbone("fiber-swin-t", description="Swin-T geometry + RoBERTa-base geometry, 6 fused (coarse variant)")
def _fiber_swin_t() -> BackboneConfig:
    depths = (2, 2, 6, 2)
    return _with_variant(
        BackboneConfig(
            swin=SwinConfig(img_size=384, embed_dim=96, depths=depths, num_heads=(3, 6, 12, 24)),
            fusion=FusionConfig(schedule=last_n_schedule(depths, 12, 6)),
        )
    )


@register_backbone("fiber-tiny", description="tiny test/demo model: 64 px, embed 32, 4-layer 64-wide text, 3 fused")
def _fiber_tiny() -> BackboneConfig:
    depths = (1, 1, 2, 2)
    return _with_variant(
        BackboneConfig(
            swin=SwinConfig(img_size=64, embed_dim=32, depths=depths, num_heads=(1, 2, 4, 8), window_size=4),
            text=TextEncoderConfig(
                vocab_size=1000,
                hidden_size=64,
                num_layers=4,
                num_heads=2,
                intermediate_size=128,
                max_position_embeddings=130,
            ),
            fusion=FusionConfig(schedule=last_n_schedule(depths, 4, 3)),
        )
    )
