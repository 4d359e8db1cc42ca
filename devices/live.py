"""Real-time labelling: emulated users who label samples from their partition over time.

Used by ``edgeci device`` (one headless device) and ``edgeci run`` (a fleet of in-process
devices on real MQTT). Arrivals are a Poisson process per device (rate λ samples/s); one
scheduler thread serves the whole fleet from a heap of next-arrival times.
"""

from __future__ import annotations

import heapq
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from edge_sdk.tasks.base import Split


def device_index(device_id: str, fleet_size: int) -> int:
    """A stable partition index for a device id: its trailing number, else a CRC hash."""
    digits = ""
    for ch in reversed(device_id):
        if not ch.isdigit():
            break
        digits = ch + digits
    if digits:
        return int(digits) % fleet_size
    return zlib.crc32(device_id.encode()) % fleet_size


@dataclass
class LabellingUser:
    """One device's user: labels ``stream`` items in order at Poisson times."""

    name: str
    stream: Split
    add: Callable[[npt.NDArray[np.float32], int], object]
    rate: float
    times: npt.NDArray[np.float64] | None = None
    """Explicit label times (seconds from start, before time scaling) instead of Poisson."""
    next_at: float = 0.0
    position: int = 0

    @property
    def exhausted(self) -> bool:
        limit = len(self.stream) if self.times is None else min(len(self.stream), len(self.times))
        return self.position >= limit


class LabellingLoop:
    """Drives many users from one thread until ``stop()`` or every stream is exhausted."""

    def __init__(self, users: Sequence[LabellingUser], *, seed: int = 0, time_scale: float = 1.0) -> None:
        self.users = list(users)
        self._rng = np.random.default_rng(seed)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="labelling", daemon=True)
        self.time_scale = time_scale
        self.labelled = 0
        self.errors: list[BaseException] = []

    def start(self) -> LabellingLoop:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def _gap(self, rate: float) -> float:
        return float(self._rng.exponential(1.0 / rate)) / self.time_scale

    def _run(self) -> None:
        t0 = time.monotonic()
        heap: list[tuple[float, int]] = []
        for i, u in enumerate(self.users):
            if u.exhausted:
                continue
            if u.times is not None:
                heapq.heappush(heap, (float(u.times[0]) / self.time_scale, i))
            elif u.rate > 0:
                heapq.heappush(heap, (self._gap(u.rate), i))
        while heap and not self._stop.is_set():
            at, i = heapq.heappop(heap)
            if self._stop.wait(max(0.0, at - (time.monotonic() - t0))):
                return
            u = self.users[i]
            try:
                u.add(u.stream.x[u.position], int(u.stream.y[u.position]))
                self.labelled += 1
            except Exception as exc:  # a failing device must not stop the others
                self.errors.append(exc)
            u.position += 1
            if u.exhausted:
                continue
            if u.times is not None:
                heapq.heappush(heap, (float(u.times[u.position]) / self.time_scale, i))
            else:
                heapq.heappush(heap, (at + self._gap(u.rate), i))
