"""Real-time labelling: emulated users who label samples from their partition over time.

Used by ``edgeci device`` (one headless device) and ``edgeci run`` (a fleet of in-process
devices on real MQTT). Arrivals are a Poisson process per device (rate λ samples/s); one
scheduler thread serves the whole fleet: the engine's event queue on a wall clock
(:class:`devices.engine.ScaledWallClock`).
"""

from __future__ import annotations

import math
import threading
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from devices.engine import Driver, Kind, ScaledWallClock
from edge_sdk.tasks.base import Split
from edge_sdk.tasks.registry import sample_kind_of


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
    position: int = 0

    @property
    def exhausted(self) -> bool:
        limit = len(self.stream) if self.times is None else min(len(self.stream), len(self.times))
        return self.position >= limit


def labelling_stream(task: Any, pool: Split, idx: npt.NDArray[np.int64], client: Any) -> tuple[Split, Callable[[Any, int], object]]:
    """What a :class:`LabellingUser` labels (the pool's ``idx``) and the call that
    stores one label: ``add_sample`` for classifiers, ``add_frame`` with its boxes for frames.
    The labelling loop hands ``add`` an integer label, so a frame's stream carries its position
    in ``idx`` as its label and ``add`` looks its boxes up. ``client``: an :class:`~edge_sdk.client.EdgeClient`."""
    if sample_kind_of(task) != "frame":
        return Split(x=pool.x[idx], y=pool.y[idx]), client.add_sample
    boxes = pool.y[idx]
    return Split(x=pool.x[idx], y=np.arange(len(idx))), lambda frame, i: client.add_frame(frame, boxes[i])


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
        """The engine's loop on a wall clock: label events in time order, sleeping between
        them (interrupted by ``stop()``)."""
        driver = _LabelDriver(self)
        for i, u in enumerate(self.users):
            if u.exhausted:
                continue
            if u.times is not None:
                driver.push(float(u.times[0]) / self.time_scale, Kind.SAMPLE, i)
            elif u.rate > 0:
                driver.push(self._gap(u.rate), Kind.SAMPLE, i)
        driver.run_until(math.inf)


class _LabelDriver(Driver):
    def __init__(self, loop: LabellingLoop) -> None:
        super().__init__(ScaledWallClock(1.0, sleep=loop._stop.wait))
        self.loop = loop

    def halted(self) -> bool:
        return self.loop._stop.is_set()

    def dispatch(self, now: float, kind: Kind, target: int, data: Any) -> None:
        loop, u = self.loop, self.loop.users[target]
        try:
            u.add(u.stream.x[u.position], int(u.stream.y[u.position]))
            loop.labelled += 1
        except Exception as exc:  # a failing device must not stop the others
            loop.errors.append(exc)
        u.position += 1
        if u.exhausted:
            return
        if u.times is not None:
            self.push(float(u.times[u.position]) / loop.time_scale, Kind.SAMPLE, target)
        else:
            self.push(now + loop._gap(u.rate), Kind.SAMPLE, target)
