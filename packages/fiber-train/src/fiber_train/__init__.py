"""fiber-train: Lightning Fabric training for FIBER (coarse and fine pre-training, downstream tasks).

Entry point: the ``fiber-train`` command (:func:`fiber_train.cli.main`). Python API::

    from fiber_train import CoarseConfig, CoarsePretrainTask, fit, load_config

    cfg = load_config(CoarseConfig, "coarse/tiny", ["trainer.max_steps=20"])
    result = fit(CoarsePretrainTask(cfg), "runs/demo")
    print(result.metrics["t2i/R@1"])
"""

from __future__ import annotations

from fiber_train._lazy import lazy_getattr
from fiber_train._version import __version__
from fiber_train.config import CoarseConfig, ConfigError, list_recipes, load_config

__all__ = [
    "__version__",
    "TASKS",
    "CoarseConfig",
    "CoarseModel",
    "CoarsePretrainTask",
    "ConfigError",
    "FitResult",
    "TaskHooks",
    "TrainTask",
    "Trainer",
    "TrainingStopped",
    "fit",
    "list_recipes",
    "load_config",
]

_LAZY = {
    "fit": "fiber_train.loop",
    "FitResult": "fiber_train.loop",
    "TrainingStopped": "fiber_train.loop",
    "Trainer": "fiber_train.loop",
    "TaskHooks": "fiber_train.tasks.base",
    "TrainTask": "fiber_train.tasks.base",
    "TASKS": "fiber_train.tasks",
    "CoarseModel": "fiber_train.tasks",
    "CoarsePretrainTask": "fiber_train.tasks",
}


# the training stack (torch, Fabric, the four sibling packages) loads on first use, so that `fiber-train --help`
# and config handling stay fast
__getattr__ = lazy_getattr(__name__, _LAZY)
