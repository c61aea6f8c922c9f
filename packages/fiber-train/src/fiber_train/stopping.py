"""Why a run stops early, and SIGTERM outside the training steps (no torch import: the CLI uses these at start-up).

Inside :func:`fiber_train.loop.fit`'s training steps SIGTERM is a flag (checkpoint, then a clean exit); before
and after them :func:`sigterm_raises` turns it into :class:`Terminated`, whose message says what was saved.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["Terminated", "TrainingStopped", "sigterm_raises"]


class TrainingStopped(RuntimeError):
    """Training stopped on purpose (non-finite policy, unusable data, SIGTERM outside the training steps).

    The message is one line naming the cause, the latest complete checkpoint and what to do.
    """


class Terminated(TrainingStopped):
    """SIGTERM arrived while no training step was running (start-up, final export or evaluation)."""


@contextlib.contextmanager
def sigterm_raises(message: str | Callable[[], str]) -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` with ``message`` (instead of killing silently).

    ``message`` may be a callable, evaluated when the signal arrives (the message of the current phase).
    Outside the main thread signals cannot be handled; the block then runs unchanged.
    """

    def _raise(signum: int, frame: Any) -> None:
        raise Terminated(message() if callable(message) else message)

    try:
        previous = signal.signal(signal.SIGTERM, _raise)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
