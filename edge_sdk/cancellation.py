"""Cooperative cancellation of local training.

``EdgeClient.stop()`` used to wait for a training job in progress to finish — a minute of
epochs on a phone, whose OS kills an app that takes that long to shut down — and then threw
its result away. A training loop calls :func:`checkpoint` between batches; inside
:func:`stoppable` (what the client's trainer thread runs a job in), it raises
:class:`~edge_sdk.errors.TrainingCancelled` once the client is stopping. Outside it (the
emulator, benchmarks, a task called directly) :func:`checkpoint` does nothing. A task of the
app's own that never calls it is simply waited for.

The stop condition lives in a context variable: each trainer thread sees only the one its own
job was started with.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from edge_sdk.errors import TrainingCancelled

_STOPPED: ContextVar[Callable[[], bool] | None] = ContextVar("edgeci_training_stopped", default=None)


@contextmanager
def stoppable(stopped: Callable[[], bool]) -> Iterator[None]:
    """Run the block's training so that :func:`checkpoint` raises once ``stopped()`` is true."""
    token = _STOPPED.set(stopped)
    try:
        yield
    finally:
        _STOPPED.reset(token)


def checkpoint() -> None:
    """Between two batches of a training loop: raise :class:`TrainingCancelled` if the
    training's client is stopping (see :func:`stoppable`)."""
    stopped = _STOPPED.get()
    if stopped is not None and stopped():
        raise TrainingCancelled("local training cancelled: the client is stopping")
