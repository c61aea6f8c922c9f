"""Dataset families, one module each: COCO captions and Karpathy splits (:mod:`~fiber_data.sources.coco_captions`),
CC3M / SBU pair lists (:mod:`~fiber_data.sources.cc_sbu`), Visual Genome regions
(:mod:`~fiber_data.sources.visual_genome`), VQAv2 (:mod:`~fiber_data.sources.vqa`), NLVR2
(:mod:`~fiber_data.sources.nlvr2`), MDETR grounding and referring expressions (:mod:`~fiber_data.sources.grounding`),
Flickr30k Entities (:mod:`~fiber_data.sources.flickr_entities`) and COCO-format detection
(:mod:`~fiber_data.sources.detection`); several caption sources as one: :mod:`~fiber_data.sources.concat`.

The readers of the former ``fiber_data.sources`` module stay importable from here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fiber_data._lazy import lazy_exports

if TYPE_CHECKING:  # imported on first access
    from fiber_data.sources.cc_sbu import read_annot_pairs
    from fiber_data.sources.concat import ConcatImageTextDataset
    from fiber_data.sources.visual_genome import read_visual_genome

__all__ = ["ConcatImageTextDataset", "read_annot_pairs", "read_visual_genome"]

_LAZY = {
    "ConcatImageTextDataset": "fiber_data.sources.concat",
    "read_annot_pairs": "fiber_data.sources.cc_sbu",
    "read_visual_genome": "fiber_data.sources.visual_genome",
}
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
