"""Drivers' plumbing: an injectable clock and the actor that owns a sans-IO core.

The actor is the only thread that touches its core. Network callbacks, app threads and the
trainer hand it work through a queue (:meth:`Actor.submit`); the core's single timer is
the queue's ``get`` timeout, so there is no polling loop and no timer thread.

Batches: after waking, the actor drains what has already arrived (up to ``max_batch``
items), handles each in order, and then calls ``on_batch_end`` once. A driver that holds
back some actions until they are durable (the coordinator's group commit) flushes there.
Without ``on_batch_end`` every action is performed as soon as its event is handled, as before.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from edge_sdk.core.events import ScheduleTimer, TimerFired

log = logging.getLogger(__name__)


class Clock(Protocol):
    def now(self) -> float: ...


class WallClock:
    """Seconds since the epoch: survives restarts, so checkpointed times stay meaningful."""

    def now(self) -> float:
        return time.time()


_STOP = object()


class Actor:
    """Runs ``handle(event) -> actions`` on one thread; ``perform(action)`` does the IO.

    Work is submitted as a factory ``now -> event`` so that the event is stamped with the
    time it is *handled*, keeping the core's notion of time monotonic.
    """

    def __init__(
        self,
        name: str,
        handle: Callable[[Any], list[Any]],
        perform: Callable[[Any], None],
        *,
        clock: Clock | None = None,
        on_batch_end: Callable[[], None] | None = None,
        max_batch: int = 256,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.name = name
        self._handle = handle
        self._perform = perform
        self._on_batch_end = on_batch_end
        self.max_batch = max_batch
        self.clock: Clock = clock or WallClock()
        self._inbox: queue.Queue[Any] = queue.Queue()
        self._deadline: float | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._abandon = threading.Event()
        self.errors: list[BaseException] = []
        self.batches = 0
        """Batches handled so far (for tests and metrics)."""

    def start(self) -> None:
        self._thread.start()

    def submit(self, make_event: Callable[[float], Any]) -> None:
        self._inbox.put(make_event)

    def call(self, fn: Callable[[], Any]) -> None:
        """Run ``fn`` on the actor thread (e.g. to read core state consistently)."""
        self._inbox.put(("call", fn))

    def stop(self, timeout: float = 10.0, *, drain: bool = True) -> None:
        """Stop after the queued work (``drain``) or after the batch in hand (``drain=False``:
        queued events are abandoned, e.g. on SIGTERM under a backlog; the batch being handled
        still ends with ``on_batch_end``)."""
        if not drain:
            self._abandon.set()
        self._inbox.put(_STOP)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def backlog(self) -> int:
        """Items waiting in the inbox (approximate)."""
        return self._inbox.qsize()

    def run_actions(self, actions: list[Any]) -> None:
        for action in actions:
            if isinstance(action, ScheduleTimer):
                self._deadline = action.at
            else:
                self._perform(action)

    def _next_batch(self) -> list[Any]:
        timeout = None if self._deadline is None else max(0.0, self._deadline - self.clock.now())
        try:
            first = self._inbox.get(timeout=timeout)
        except queue.Empty:
            self._deadline = None
            first = TimerFired
        batch = [first]
        while len(batch) < self.max_batch and first is not _STOP and batch[-1] is not _STOP:
            try:
                batch.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        return batch

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            stop = False
            handled = 0
            try:
                for item in batch:
                    if item is _STOP or self._abandon.is_set():
                        stop = True
                        break
                    handled += 1
                    self._run_one(item)
            finally:
                self.batches += 1 if handled else 0
                if self._on_batch_end is not None and handled:
                    try:
                        self._on_batch_end()
                    except Exception as exc:
                        log.exception("%s: error at the end of a batch", self.name)
                        self.errors.append(exc)
            if stop:
                return

    def _run_one(self, item: Any) -> None:
        try:
            if isinstance(item, tuple) and item and item[0] == "call":
                item[1]()
                return
            event = TimerFired(now=self.clock.now()) if item is TimerFired else item(self.clock.now())
            self.run_actions(self._handle(event))
        except Exception as exc:  # a driver must survive one bad event; record it loudly
            log.exception("%s: error while handling an event", self.name)
            self.errors.append(exc)
