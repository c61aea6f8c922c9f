"""Import guards of the framework shims: a missing framework gives an ImportError that says what to install.

The frameworks are hidden through ``sys.modules`` (a ``None`` entry makes ``import`` fail), so these tests run
whether or not detectron2 / mmdetection / torchvision are installed.
"""

from __future__ import annotations

import importlib
import sys

import pytest

import fiber_backbones


def _hide(monkeypatch: pytest.MonkeyPatch, framework: str) -> None:
    for name in [n for n in sys.modules if n == framework or n.startswith(framework + ".")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, framework, None)


@pytest.mark.parametrize(
    ("module", "framework", "match"),
    [
        ("fiber_backbones.adapters.detectron2", "detectron2", r"needs detectron2.*facebookresearch/detectron2"),
        ("fiber_backbones.adapters.mmdet", "mmdet", r"needs mmdetection.*fiber-backbones\[mmdet\]"),
        ("fiber_backbones.adapters.mmdet", "mmengine", r"needs mmdetection.*fiber-backbones\[mmdet\]"),
        ("fiber_backbones.adapters.torchvision", "torchvision", r"needs torchvision.*fiber-backbones\[torchvision\]"),
    ],
)
def test_missing_framework_error_names_the_install(
    monkeypatch: pytest.MonkeyPatch, module: str, framework: str, match: str
) -> None:
    _hide(monkeypatch, framework)
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(ImportError, match=match) as info:
        importlib.import_module(module)
    assert isinstance(info.value.__cause__, ImportError)  # the original error is chained, not swallowed


def test_adapters_package_imports_without_torchvision(monkeypatch: pytest.MonkeyPatch) -> None:
    """``fiber_backbones.adapters`` needs only torch; FiberFPNBackbone is resolved lazily."""
    _hide(monkeypatch, "torchvision")
    monkeypatch.setattr(fiber_backbones, "adapters", importlib.import_module("fiber_backbones.adapters"))
    for name in (
        "fiber_backbones.adapters",
        "fiber_backbones.adapters.vision_only",
        "fiber_backbones.adapters.torchvision",
    ):
        monkeypatch.delitem(sys.modules, name, raising=False)
    adapters = importlib.import_module("fiber_backbones.adapters")
    assert adapters.FiberVisionBackbone.__name__ == "FiberVisionBackbone"
    with pytest.raises(ImportError, match="needs torchvision"):
        adapters.FiberFPNBackbone  # noqa: B018
    with pytest.raises(AttributeError, match="NoSuchThing"):
        adapters.NoSuchThing  # noqa: B018
