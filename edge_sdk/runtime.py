"""Drivers' plumbing: an injectable clock and the actor that owns a sans-IO core.

The actor is the only thread that touches its core. Network callbacks, app threads and the
trainer hand it work through a queue (:meth:`Actor.submit`); the core's single timer is
the queue's ``get`` timeout, so there is no polling loop and no timer thread.
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
    ) -> None:
        self.name = name
        self._handle = handle
        self._perform = perform
        self.clock: Clock = clock or WallClock()
        self._inbox: queue.Queue[Any] = queue.Queue()
        self._deadline: float | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.errors: list[BaseException] = []

    def start(self) -> None:
        self._thread.start()

    def submit(self, make_event: Callable[[float], Any]) -> None:
        self._inbox.put(make_event)

    def call(self, fn: Callable[[], Any]) -> None:
        """Run ``fn`` on the actor thread (e.g. to read core state consistently)."""
        self._inbox.put(("call", fn))

    def stop(self, timeout: float = 10.0) -> None:
        self._inbox.put(_STOP)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def run_actions(self, actions: list[Any]) -> None:
        for action in actions:
            if isinstance(action, ScheduleTimer):
                self._deadline = action.at
            else:
                self._perform(action)

    def _run(self) -> None:
        while True:
            timeout = None if self._deadline is None else max(0.0, self._deadline - self.clock.now())
            try:
                item = self._inbox.get(timeout=timeout)
            except queue.Empty:
                self._deadline = None
                item = TimerFired
            if item is _STOP:
                return
            try:
                if isinstance(item, tuple) and item and item[0] == "call":
                    item[1]()
                    continue
                event = TimerFired(now=self.clock.now()) if item is TimerFired else item(self.clock.now())
                self.run_actions(self._handle(event))
            except Exception as exc:  # a driver must survive one bad event; record it loudly
                log.exception("%s: error while handling an event", self.name)
                self.errors.append(exc)
