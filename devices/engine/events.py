"""Timed events: what happens (:class:`Kind`), to whom (an endpoint index) and when."""

from __future__ import annotations

import heapq
import itertools
from enum import IntEnum
from typing import Any

__all__ = ["Event", "EventQueue", "Kind"]


class Kind(IntEnum):
    MSG = 0
    """A message delivered to its receiver: data = (topic, payload)."""
    TIMER = 1
    """A core's wake-up: data = the ``at`` it asked for (stale timers are ignored)."""
    SAMPLE = 2
    """A label arrives on a device: data = its new sample total."""
    TRAINED = 3
    """Local training finished: data = the driver's record of the job."""
    TRAIN_FAILED = 4
    EVAL = 5
    """Evaluate the deployed model(s) (target: none)."""
    KICK = 6
    """Start an endpoint (a coordinator's ``start``, a continuously training device)."""
    HOP = 7
    """A message reached the receiver's side of the network (RegionNetwork's downlink queue)."""
    GATE = 8
    """A driver's answer to a coordinator action (data = ``now -> event``), e.g. a validation score."""


Event = tuple[float, int, Kind, int, Any]
"""(time, sequence, kind, target endpoint, data)."""


class EventQueue:
    """A heap of timed events ordered by ``(time, sequence)``: equal times keep their
    scheduling order, so a run is a pure function of its inputs."""

    __slots__ = ("_heap", "_seq")

    def __init__(self) -> None:
        self._heap: list[Event] = []
        self._seq = itertools.count()

    def push(self, at: float, kind: Kind, target: int, data: Any = None) -> None:
        heapq.heappush(self._heap, (at, next(self._seq), kind, target, data))

    def pop(self) -> Event:
        return heapq.heappop(self._heap)

    def next_time(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def __len__(self) -> int:
        return len(self._heap)
