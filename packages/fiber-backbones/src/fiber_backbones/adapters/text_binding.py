"""Text binding shared by the detector-framework wrappers (torchvision, detectron2, mmdetection).

Each wrapper holds a :class:`~fiber_backbones.adapters.vision_only.FiberVisionBackbone` (the one owner of the
bound prompt) and exposes its prompt binding unchanged through :class:`DelegatedTextBinding`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar, Self

from fiber_backbones.adapters.vision_only import FiberVisionBackbone
from fiber_backbones.types import FusionOutput, TextInputs

__all__ = ["DelegatedTextBinding"]


class DelegatedTextBinding:
    """Mixin: ``text`` / ``clear_text`` / ``bind_text`` / ``last_output`` of the wrapped vision backbone.

    Attributes:
        vision_attr: name of the attribute holding the :class:`FiberVisionBackbone` (``"view"``; the torchvision
            FPN backbone calls it ``"body"``).
    """

    vision_attr: ClassVar[str] = "view"

    @property
    def vision_backbone(self) -> FiberVisionBackbone:
        """The wrapped :class:`FiberVisionBackbone`."""
        return getattr(self, self.vision_attr)

    @property
    def text(self) -> TextInputs | None:
        """The bound prompt (see :attr:`FiberVisionBackbone.text`)."""
        return self.vision_backbone.text

    @text.setter
    def text(self, value: TextInputs | None) -> None:
        self.vision_backbone.text = value

    def clear_text(self) -> None:
        """Unbind the prompt."""
        self.vision_backbone.clear_text()

    @contextmanager
    def bind_text(self, text: TextInputs | None) -> Iterator[Self]:
        """Bind ``text`` (1 or ``B`` rows) for the forwards inside the block (see
        :meth:`FiberVisionBackbone.bind_text`)."""
        with self.vision_backbone.bind_text(text):
            yield self

    @property
    def last_output(self) -> FusionOutput | None:
        """The backbone's :class:`FusionOutput` of the last forward (``.text`` holds ``[B, L, C_txt]`` features)."""
        return self.vision_backbone.last_output
