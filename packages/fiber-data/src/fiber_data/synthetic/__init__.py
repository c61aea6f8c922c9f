"""A seeded synthetic "world" of coloured shapes, written to disk in the real dataset formats.

Used for smoke runs and tests of the whole pipeline without downloads; every loader of this package reads it
unchanged. :func:`~fiber_data.synthetic.world.generate_world` (the driver, with the layout written) draws each
image (:mod:`~fiber_data.synthetic.scene`) and its captions (:mod:`~fiber_data.synthetic.language`) and hands it
to one generator per task and format: COCO captions and Karpathy (:mod:`~fiber_data.synthetic.captions`), COCO
detection (:mod:`~fiber_data.synthetic.detection`), MDETR grounding and referring expressions
(:mod:`~fiber_data.synthetic.grounding`), VQAv2 (:mod:`~fiber_data.synthetic.vqa`), NLVR2
(:mod:`~fiber_data.synthetic.nlvr2`) and the tokenizer (:mod:`~fiber_data.synthetic.tokenizer`). What is drawn: :class:`~fiber_data.synthetic.config.SyntheticWorldConfig`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fiber_data._lazy import lazy_exports

if TYPE_CHECKING:  # imported on first access: `fiber-data --help` loads neither numpy nor Pillow
    from fiber_data.synthetic.config import PALETTE, POSITIONS, SHAPES, SYNTHETIC_VQA_TEMPLATE, SyntheticWorldConfig
    from fiber_data.synthetic.world import generate_world, load_world_manifest

__all__ = [
    "PALETTE",
    "POSITIONS",
    "SHAPES",
    "SYNTHETIC_VQA_TEMPLATE",
    "SyntheticWorldConfig",
    "generate_world",
    "load_world_manifest",
]

_LAZY = {
    "PALETTE": "fiber_data.synthetic.config",
    "POSITIONS": "fiber_data.synthetic.config",
    "SHAPES": "fiber_data.synthetic.config",
    "SYNTHETIC_VQA_TEMPLATE": "fiber_data.synthetic.config",
    "SyntheticWorldConfig": "fiber_data.synthetic.config",
    "generate_world": "fiber_data.synthetic.world",
    "load_world_manifest": "fiber_data.synthetic.world",
}
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
