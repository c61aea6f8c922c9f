"""Adapters that plug the fusion backbone into other detection frameworks (docs/reference/design.md §11, "Plugging the
backbone into other detectors").

- :class:`FiberVisionBackbone` (``vision_only``, torch only): ``images -> {name: NCHW}`` with bindable text and
  the detectron2 / mmdetection / timm feature contract.
- :class:`~fiber_backbones.adapters.torchvision.FiberFPNBackbone` (extra ``torchvision``): backbone + FPN that
  torchvision's ``FCOS``, ``RetinaNet`` and ``FasterRCNN`` accept unchanged. Importable from here lazily.
- ``fiber_backbones.adapters.detectron2`` (needs detectron2): ``FiberD2Backbone`` and the registered builders
  ``build_fiber_backbone`` / ``build_fiber_fpn_backbone``.
- ``fiber_backbones.adapters.mmdet`` (extra ``mmdet``): registers ``FiberFusionBackbone`` into
  ``mmdet.registry.MODELS`` on import (``custom_imports=dict(imports=["fiber_backbones.adapters.mmdet"])``).
- ``text_binding`` (torch only): :class:`~fiber_backbones.adapters.text_binding.DelegatedTextBinding`, the prompt
  binding (``text``, ``bind_text``, ``last_output``) the three framework wrappers share with their vision view.

The framework modules raise an ``ImportError`` naming the missing framework and the install command when the
framework is absent; importing this package never requires them.
"""

from __future__ import annotations

from typing import Any

from fiber_backbones.adapters.vision_only import FiberVisionBackbone, ShapeSpec, broadcast_text, find_vision_backbone

__all__ = ["FiberFPNBackbone", "FiberVisionBackbone", "ShapeSpec", "broadcast_text", "find_vision_backbone"]


def __getattr__(name: str) -> Any:
    # Lazy so that `import fiber_backbones.adapters` works without torchvision installed.
    if name == "FiberFPNBackbone":
        from fiber_backbones.adapters.torchvision import FiberFPNBackbone

        return FiberFPNBackbone
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
