"""Log messages of the project: console set-up for command-line entry points and a ``run.log`` per run.

Library code logs through :mod:`logging` (loggers ``fiber_train.*``, ``fiber_data.*``, ...) and never prints;
the ``fiber-train`` command calls :func:`configure_logging` (messages on stderr; command results stay on
stdout), and :func:`fiber_train.loop.fit` appends the messages of a run to ``<run>/run.log``
(:func:`run_log`). In a multi-process run, rank 0 speaks; warnings and errors of every rank reach the console.
This module imports neither torch nor Lightning (``fiber-train --help`` and ``--print-config`` stay light).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["LOGGER_NAMES", "configure_logging", "run_log"]

#: Top-level loggers of the project's packages (what ``run.log`` and :func:`configure_logging` cover).
LOGGER_NAMES = ("fiber_train", "fiber_data", "fiber_backbones", "fiber_heads", "fiber_eval", "fiber_models")
_FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s [rank %(rank)s]: %(message)s"


def _global_rank() -> int:
    """The Fabric global rank of this process (0 when Lightning was never loaded: a single process)."""
    mod = sys.modules.get("lightning_fabric.utilities.rank_zero")
    return int(getattr(getattr(mod, "rank_zero_only", None), "rank", 0) or 0) if mod is not None else 0


class _ConsoleFormatter(logging.Formatter):
    """``message`` for INFO and below, ``LEVEL: message`` for warnings and errors."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno <= logging.INFO else f"{record.levelname.lower()}: {text}"


class _RankFilter(logging.Filter):
    """Adds ``record.rank`` (the Fabric global rank); keeps records of rank 0, and of every rank from
    ``min_level_other_ranks`` up."""

    def __init__(self, min_level_other_ranks: int = logging.CRITICAL + 1) -> None:
        super().__init__()
        self.min_level_other_ranks = min_level_other_ranks

    def filter(self, record: logging.LogRecord) -> bool:
        rank = _global_rank()
        record.rank = rank
        return rank == 0 or record.levelno >= self.min_level_other_ranks


class _StderrHandler(logging.StreamHandler):
    """A stream handler writing to whatever ``sys.stderr`` is at the time of each message (so that a replaced
    stderr, as in tests or notebooks, receives the messages)."""

    _fiber_console = False  # True on the handlers that configure_logging installs (replaced on the next call)

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def configure_logging(level: int | str = logging.INFO) -> None:
    """Send the project's log messages to the console (stderr) at ``level``; for command-line entry points.

    Messages of global rank 0 are shown, and warnings and errors of every rank. Idempotent: a second call
    replaces the handler of the first. Libraries importing ``fiber_*`` and configuring :mod:`logging`
    themselves need not call it.
    """
    for name in LOGGER_NAMES:
        logger = logging.getLogger(name)
        for h in [h for h in logger.handlers if getattr(h, "_fiber_console", False)]:
            logger.removeHandler(h)
        handler = _StderrHandler()
        handler.setFormatter(_ConsoleFormatter("%(message)s"))
        handler.addFilter(_RankFilter(min_level_other_ranks=logging.WARNING))
        handler._fiber_console = True
        logger.addHandler(handler)
        logger.setLevel(level)


@contextlib.contextmanager
def run_log(run_dir: str | os.PathLike[str], level: int = logging.INFO) -> Iterator[Path]:
    """Append the project's log messages (rank 0) to ``<run_dir>/run.log`` while the block runs.

    Loggers whose level was never set are raised to ``level`` for the block (so that ``run.log`` holds the
    INFO messages even when the caller configured nothing) and put back afterwards. The file is opened at
    the first message, so the run directory may be created inside the block.
    """
    path = Path(run_dir) / "run.log"
    handler = logging.FileHandler(path, mode="a", encoding="utf-8", delay=True)
    handler.setFormatter(logging.Formatter(_FILE_FORMAT))
    handler.setLevel(level)
    handler.addFilter(_RankFilter())
    changed: list[logging.Logger] = []
    for name in LOGGER_NAMES:
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        if logger.level == logging.NOTSET:
            logger.setLevel(level)
            changed.append(logger)
    try:
        yield path
    finally:
        for name in LOGGER_NAMES:
            logging.getLogger(name).removeHandler(handler)
        for logger in changed:
            logger.setLevel(logging.NOTSET)
        handler.close()
