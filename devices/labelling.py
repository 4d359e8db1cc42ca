"""Human labelling: when each device's user labels a sample, and in which order.

SPIN's devices gain labelled samples sporadically, as people use them. We model each
device's labelling as a Poisson process with rate λ (samples per second, per device; the
SPIN paper's evaluation also draws events from a Poisson process), thinned by the
device's offline windows: nobody labels on a device that is asleep or out of coverage.

The *streaming order* says which of the device's partition samples comes next:

* ``"shuffled"`` — a seeded random order (labels arrive mixed);
* ``"by-class"`` — class by class in a seeded random class order (a user who points the
  camera at one kind of object for a while: the hardest case for a local learner);
* ``"given"`` — the partition's own order.

``labels`` is the pool's ``y`` of any sample kind; frames (box arrays, no one class label
each) stream ``"shuffled"`` or ``"given"``, and ``"by-class"`` is refused for them.

All functions are pure functions of their ``numpy.random.Generator``.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from devices.partition import class_labels
from devices.profiles import OfflineWindows
from edge_sdk.errors import ConfigError

StreamOrder = Literal["shuffled", "by-class", "given"]
STREAM_ORDERS: tuple[str, ...] = ("shuffled", "by-class", "given")

__all__ = ["STREAM_ORDERS", "StreamOrder", "arrival_times", "poisson_arrivals", "stream_order"]


def poisson_arrivals(rate_per_s: float, horizon_s: float, rng: np.random.Generator, *, limit: int | None = None) -> npt.NDArray[np.float64]:
    """Event times of a homogeneous Poisson process of rate ``rate_per_s`` on ``[0, horizon_s)``,
    at most ``limit`` of them (the device's partition runs out)."""
    if not (rate_per_s >= 0 and np.isfinite(rate_per_s)):
        raise ConfigError(f"arrival rate must be a finite number >= 0, got {rate_per_s}")
    if rate_per_s == 0 or horizon_s <= 0 or limit == 0:
        return np.zeros(0, dtype=np.float64)
    times: list[npt.NDArray[np.float64]] = []
    t = 0.0
    count = 0
    chunk = max(16, int(rate_per_s * horizon_s * 1.2) + 16)
    while t < horizon_s and (limit is None or count < limit):
        gaps = rng.exponential(1.0 / rate_per_s, size=chunk)
        block = t + np.cumsum(gaps)
        times.append(block)
        t = float(block[-1])
        count += chunk
    out = np.concatenate(times)
    out = out[out < horizon_s]
    return out if limit is None else out[:limit]


def arrival_times(
    rate_per_s: float,
    horizon_s: float,
    offline: OfflineWindows,
    rng: np.random.Generator,
    *,
    limit: int | None = None,
) -> npt.NDArray[np.float64]:
    """Labelling times of one device: Poisson arrivals that fall while the device is online
    (arrivals inside an offline window are dropped: nobody is there to label)."""
    raw = poisson_arrivals(rate_per_s, horizon_s, rng)
    if len(offline):
        raw = raw[[not offline.offline_at(float(t)) for t in raw]] if raw.size else raw
    return raw if limit is None else raw[:limit]


def stream_order(indices: npt.NDArray[Any], labels: npt.NDArray[Any], order: str, rng: np.random.Generator) -> npt.NDArray[np.int64]:
    """The order in which a device's user labels the pool samples ``indices`` (``labels``:
    the pool's ``y``)."""
    idx = np.asarray(indices, dtype=np.int64)
    if order == "given":
        return idx.copy()
    if order == "shuffled":
        return rng.permutation(idx)
    if order == "by-class":
        y = class_labels(labels)
        if y is None:
            raise ConfigError('[data] order = "by-class" streams samples class by class, but these samples are frames '
                              'with boxes (no one label each): use order = "shuffled" or "given"')
        labels = y
        classes = np.unique(labels[idx]) if idx.size else np.zeros(0, dtype=np.int64)
        parts = [rng.permutation(idx[labels[idx] == c]) for c in rng.permutation(classes)]
        return np.concatenate(parts) if parts else idx.copy()
    raise ConfigError(f"unknown stream order {order!r}; use one of {', '.join(STREAM_ORDERS)}")
