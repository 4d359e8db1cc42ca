"""Runs the core's :class:`~coordinator.core.ConvertUpdate` requests off the actor thread.

Gradient inversion takes seconds; the coordinator's actor must keep serving pulls and
acknowledging updates meanwhile. One worker thread (on a 2-core machine one conversion at a
time is the most that helps) takes requests from a bounded queue, runs the converter and
hands :class:`~coordinator.core.UpdateConverted` back to the actor. A request that cannot be
queued, that is already past its deadline when its turn comes, or whose conversion raises is
answered with ``weights=None`` — the core then applies the stale update damped (counted).
A late answer is harmless: the core has fallen back already and ignores it.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

import numpy as np

from coordinator.core import ConvertUpdate, UpdateConverted
from edge_sdk.spec import Vector

log = logging.getLogger("edgeci.coordinator")

__all__ = ["ConversionWorker", "Converter"]

STOP_WAIT_S = 2.0
"""How long :meth:`ConversionWorker.stop` waits for a conversion that is already running."""


class Converter(Protocol):
    """What the worker runs: ``coordinator.inversion.GradientInverter`` (or a test's stand-in)."""

    def convert(self, request: ConvertUpdate) -> Any: ...

    # Optional: ``cancel() -> None`` ends a running ``convert`` early, for good (the worker's stop).


def _answer(request: ConvertUpdate, weights: Vector | None, elapsed: float, detail: str, now: float) -> UpdateConverted:
    return UpdateConverted(now=now, ticket=request.ticket, weights=weights, elapsed_s=elapsed, detail=detail)


class ConversionWorker:
    """``submit(ConvertUpdate)`` → later ``deliver(callable(now) -> UpdateConverted)``."""

    def __init__(self, converter: Converter, deliver: Callable[[Callable[[float], Any]], None],
                 now: Callable[[], float], *, max_queue: int = 8) -> None:
        self.converter, self._deliver, self._now = converter, deliver, now
        self._queue: queue.Queue[ConvertUpdate | None] = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._run, name="staleness-converter", daemon=True)
        self.done = 0
        self._failed_queued = 0
        """Requests answered without converting by :meth:`submit` (the driver's thread)."""
        self._failed_run = 0
        """... and by the worker's thread: two counters, each written by one thread (a shared
        ``+=`` from both could lose a count)."""
        self.busy_s = 0.0
        self._stopping = False
        self._refused = 0
        """Requests refused since the queue was last found with room (one warning per spell)."""

    @property
    def failed(self) -> int:
        """Requests answered without a converted update (queue full, deadline passed, no estimate)."""
        return self._failed_queued + self._failed_run

    def start(self) -> ConversionWorker:
        self._thread.start()
        return self

    def submit(self, request: ConvertUpdate) -> None:
        try:
            self._queue.put_nowait(request)
        except queue.Full:
            self._failed_queued += 1
            self._refused += 1
            if self._refused == 1:  # once per spell: a device sending stale updates logged a line each
                log.warning("conversion queue full (%d waiting): device %s's update (staleness %d) is applied damped; "
                            "more while it stays full are counted, not logged", self._queue.maxsize, request.device, request.staleness)
            self._deliver(partial(_answer, request, None, 0.0, "conversion queue full"))
            return
        if self._refused:
            log.warning("conversion queue has room again: %d update(s) were applied damped while it was full", self._refused)
            self._refused = 0

    def stop(self, timeout: float = STOP_WAIT_S) -> None:
        """Stop without converting what is still queued: those updates are durable and
        acknowledged, and a restart buffers them again (so a SIGTERM is not held up by up to
        ``max_queue`` conversions of seconds each). A conversion already running may finish
        within ``timeout``; after that the thread (a daemon thread) is left to end by itself."""
        self._stopping = True
        cancel = getattr(self.converter, "cancel", None)
        if callable(cancel):  # a conversion still running at exit aborted the process (torch in a daemon thread)
            cancel()
        dropped = 0
        with contextlib.suppress(queue.Empty):
            while True:
                dropped += self._queue.get_nowait() is not None
        if dropped:
            log.info("stopping: %d queued conversions not run (their updates are durable and are buffered again at the next start)", dropped)
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("stopping: a conversion still running after %.0f s is abandoned", timeout)

    def _run(self) -> None:
        while (request := self._queue.get()) is not None:
            if self._stopping:
                continue
            if self._now() >= request.deadline:
                self._failed_run += 1
                self._deliver(partial(_answer, request, None, 0.0, "deadline passed while queued"))
                continue
            t0 = time.perf_counter()
            try:
                result = self.converter.convert(request)
                weights = getattr(result, "weights", result)
                weights = None if weights is None else np.asarray(weights, dtype=np.float32)
                detail = "" if weights is not None else "cancelled: stopping" if self._stopping else "no usable estimate"
            except Exception as exc:  # a converter bug must not kill the worker: fall back, logged
                log.exception("converting device %s's update failed", request.device)
                weights, detail = None, f"{type(exc).__name__}: {exc}"[:200]
            elapsed = time.perf_counter() - t0
            self.busy_s += elapsed
            if weights is None:
                self._failed_run += 1
            else:
                self.done += 1
            log.info("converted device %s's update (staleness %d → version %d) in %.2f s%s", request.device,
                     request.staleness, request.target_version, elapsed, f" [{detail}]" if detail else "")
            self._deliver(partial(_answer, request, weights, elapsed, detail))
