"""The one event loop: pop the next due event, move the clock to it, hand it to the driver."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

from devices.engine.clock import VirtualClock
from devices.engine.events import EventQueue, Kind

__all__ = ["Clock", "Driver"]


class Clock(Protocol):
    @property
    def now(self) -> float: ...
    def advance_to(self, t: float) -> None: ...


class Driver:
    """Base of every fleet driver (single region, multi region, live labelling): owns the
    clock and the queue and runs the loop; subclasses say what an event means
    (:meth:`dispatch`). With a :class:`~devices.engine.ScaledWallClock` the same loop runs
    in real time."""

    def __init__(self, clock: Clock | None = None) -> None:
        self.clock: Clock = clock if clock is not None else VirtualClock()
        self.queue = EventQueue()
        self.events = 0
        self.trace: Callable[[float, Kind, int, Any], None] | None = None
        """Optional hook ``(now, kind, target, data)`` called for every event (tests)."""

    def push(self, at: float, kind: Kind, target: int, data: Any = None) -> None:
        self.queue.push(at, kind, target, data)

    def dispatch(self, now: float, kind: Kind, target: int, data: Any) -> None:
        raise NotImplementedError

    def halted(self) -> bool:
        """Checked after each wait for the clock (a live loop's ``stop()``)."""
        return False

    def step(self, until: float = math.inf) -> Kind | None:
        """Handle the next event if it is due by ``until``; return its kind (None: none is,
        or the driver halted while waiting for it)."""
        if not self.queue.due(until):
            return None
        at, _, kind, target, data = self.queue.pop()
        self.clock.advance_to(at)
        if self.halted():
            return None
        self.events += 1
        if self.trace is not None:
            self.trace(at, kind, target, data)
        self.dispatch(at, kind, target, data)
        return kind
