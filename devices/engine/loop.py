"""The one event loop: pop the next due event, move the clock to it, hand it to the driver."""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from devices.engine.clock import VirtualClock
from devices.engine.events import EventQueue, Kind
from edge_sdk.errors import LocalProtocolError

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
        # Events known before the run (preload): sorted lists and a cursor, not heap entries.
        self._pre_at: list[float] = []
        self._pre_target: list[int] = []
        self._pre_data: list[Any] = []
        self._pre_kind = Kind.SAMPLE
        self._pre_next = 0

    def push(self, at: float, kind: Kind, target: int, data: Any = None) -> None:
        queue = self.queue  # EventQueue.push, inlined (the hot path)
        heapq.heappush(queue._heap, (at, next(queue._seq), kind, target, data))

    def preload(self, kind: Kind, at: Sequence[float], targets: Sequence[int], data: Sequence[Any]) -> None:
        """Schedule events of one ``kind`` that are known before the run starts (labels at
        their drawn times), as if each were pushed, in the given order, before anything else:
        at equal times they come first, and among themselves in the given order. They are kept
        as one sorted list with a cursor, so the heap holds only what the run schedules and a
        step costs O(log events in flight), not O(log of the whole fleet's labels)."""
        if self.events or self._pre_at or not len(at) == len(targets) == len(data):
            raise LocalProtocolError("preload once, before the run, with one target and one datum per time")
        order = np.argsort(np.asarray(at, dtype=np.float64), kind="stable").tolist()
        self._pre_at = [float(at[i]) for i in order]
        self._pre_target = [int(targets[i]) for i in order]
        self._pre_data = [data[i] for i in order]
        self._pre_kind = kind
        self._pre_next = 0

    def dispatch(self, now: float, kind: Kind, target: int, data: Any) -> None:
        raise NotImplementedError

    def halted(self) -> bool:
        """Checked after each wait for the clock (a live loop's ``stop()``)."""
        return False

    def halt_check(self) -> Callable[[], bool] | None:
        """What :meth:`run_until` calls after each wait: :meth:`halted`, or None for a driver
        that cannot halt during this run (no call per event)."""
        return self.halted

    def run_until(self, until: float, stop: Callable[[Kind], bool] | None = None) -> bool:
        """Handle every event due by ``until`` in (time, sequence) order; ``stop(kind)``, called
        after each, ends the loop when true. True when the loop ran out of events due by ``until``;
        False when ``stop`` or the driver's halt ended it, even if nothing due was left."""
        pre_at, pre_target, pre_data, pre_kind = self._pre_at, self._pre_target, self._pre_data, self._pre_kind
        n_pre = len(pre_at)
        heap = self.queue._heap
        heappop = heapq.heappop
        clock = self.clock
        advance = clock.advance_to
        virtual = type(clock) is VirtualClock  # its advance_to inlined: the same check, the same error
        halted = self.halt_check()
        dispatch = self.dispatch
        i = self._pre_next
        while True:
            pre = pre_at[i] if i < n_pre else None
            top = heap[0][0] if heap else None
            if pre is not None and pre <= until and (top is None or pre <= top):  # a preloaded event wins a tie
                at, kind, target, data = pre, pre_kind, pre_target[i], pre_data[i]
                i += 1
                self._pre_next = i
            elif top is not None and top <= until:
                at, _, kind, target, data = heappop(heap)
            else:
                return True
            if virtual and at >= clock._now:  # type: ignore[attr-defined]
                clock._now = at  # type: ignore[attr-defined]
            else:
                advance(at)
            if halted is not None and halted():
                return False
            self.events += 1
            if self.trace is not None:
                self.trace(at, kind, target, data)
            dispatch(at, kind, target, data)
            if stop is not None and stop(kind):
                return False

    def step(self, until: float = math.inf) -> Kind | None:
        """Handle the next event if it is due by ``until``; return its kind (None: none is,
        or the driver halted while waiting for it)."""
        handled: list[Kind] = []

        def first(kind: Kind) -> bool:
            handled.append(kind)
            return True

        Driver.run_until(self, until, first)  # the loop itself, not a subclass's wrapper around it
        return handled[0] if handled else None
