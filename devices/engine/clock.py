"""Clocks for the engine: virtual time that only jumps forward, or scaled wall time."""

from __future__ import annotations

import time
from collections.abc import Callable

from edge_sdk.errors import LocalProtocolError

__all__ = ["ScaledWallClock", "VirtualClock"]


class VirtualClock:
    """Virtual seconds since the run began; can only jump forward."""

    __slots__ = ("_now",)

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)

    @property
    def now(self) -> float:
        return self._now

    def advance_to(self, t: float) -> None:
        if t < self._now:
            raise LocalProtocolError(f"virtual clock cannot go back from {self._now} to {t}")
        self._now = t


class ScaledWallClock:
    """Virtual seconds that follow the wall clock ``scale`` times faster: ``advance_to``
    sleeps until that virtual time has come (the same loop then runs in real time).
    ``sleep`` may be interruptible, e.g. ``threading.Event().wait``."""

    def __init__(self, scale: float = 1.0, *, monotonic: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], object] = time.sleep) -> None:
        if not scale > 0:
            raise LocalProtocolError("time scale must be > 0")
        self.scale = scale
        self._monotonic, self._sleep = monotonic, sleep
        self._t0 = monotonic()

    @property
    def now(self) -> float:
        return (self._monotonic() - self._t0) * self.scale

    def advance_to(self, t: float) -> None:
        wait = t / self.scale - (self._monotonic() - self._t0)
        if wait > 0:
            self._sleep(wait)
