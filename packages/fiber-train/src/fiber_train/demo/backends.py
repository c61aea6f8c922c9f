"""The demo's task backends live in :mod:`fiber_models.backends` (shared with ``fiber-train predict``, no trainer
imported); this module re-exports its public names (``fiber_models.backends.__all__``)."""

from __future__ import annotations

from fiber_models.backends import *  # noqa: F403
from fiber_models.backends import __all__ as __all__
