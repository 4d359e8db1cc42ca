"""Converting very stale updates: the pure half (issue 15, paper 001).

The core parks an update whose staleness policy says :class:`~coordinator.strategies.
staleness.Convert` and asks the driver for the conversion (gradient inversion runs on a
worker: :mod:`coordinator.inversion`); DC-ASGD's first-order compensation is cheap and is
computed here. This module holds what the core decides with, and nothing that does IO:

* :class:`ConversionConfig` — deadline, blending, the switch-back window, DC-ASGD's λ;
* :func:`dc_asgd` — w_t + Δ − (λ/η)·Δ⊙Δ⊙(w_t − w_base) (Zheng et al. 2017, with the
  gradient taken as −Δ/η);
* :class:`SwitchTracker` — the paper's switch back to plain aggregation. Every conversion
  leaves an estimate Δ̂ (the change the device would have made from version t) and the stale
  change Δ_s it replaced. When that device's next update arrives trained from (about) version
  t, its true change Δ is known, so E1 = d(Δ̂, Δ) and E2 = d(Δ_s, Δ) can be measured (L1 and
  cosine distance). Once E1 > E2 for more than half of the last ``window`` devices observed,
  for *both* metrics, conversions are worth less than the stale update itself: the tracker switches,
  blends α Δ̂ + (1 − α) Δ_s with α falling from 1 to 0 over ``blend_versions`` versions, and
  then stops converting (the policy's damped fallback applies).

Changes, not raw weights, are compared: an estimate based on version t and a stale update
based on t − τ differ by the global model's own progress, which says nothing about the
estimate's quality. The switch is global, as in the paper (one switching point for the run).

The window holds one observation per device, its latest (a new one replaces the device's
earlier one and counts as the newest): the device chooses its own next update, so E2 is its
to set (its stale change again: E2 = 0), and three cycles of one device used to switch the
whole region off. Now ``min_observations`` means that many distinct devices, and a device is
one entry of the window however often it is converted. The latest rather than the first: the
switch follows the estimates' quality as training goes on, which a device's newest evidence
says best. The window is not checkpointed (only the switch point is), as before.

The (lower) median over devices of E1 − E2, not the average (the paper's): one device that
chooses its next update to maximise E1 − E2 (its stale change pushed away from the estimate)
outweighed nine honest devices in the average with one observation (cosine E1 − E2 +0.45
against their −0.02 each) and switched. With the median it takes more than half of the window's
devices showing E1 > E2, however large one device makes its own.
"""

from __future__ import annotations

import math
import statistics
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_sdk.errors import ConfigError
from edge_sdk.spec import Vector

__all__ = ["ConversionConfig", "Observation", "SwitchTracker", "dc_asgd", "disparity"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ConversionConfig:
    deadline_s: float = 60.0
    """A conversion not answered within this many seconds falls back to the damped update."""
    blend_versions: int = 5
    """After the switch point, α falls from 1 to 0 over this many versions."""
    window: int = 10
    """The switch decision looks at the latest (E1, E2) observation of each of the last this
    many devices observed."""
    min_observations: int = 3
    """No switch before this many observations (of as many distinct devices)."""
    match_slack: int = 2
    """An update based on version b is compared with the estimate made for version t when |b − t| ≤ this."""
    max_queued: int = 4
    """A device's updates accepted while one of its updates is being converted (held in memory,
    applied in seq order after it); further ones are answered ``deferred`` (the device retries)."""
    max_tracked: int = 256
    """Estimates kept (one per device, the least recent forgotten): memory is 2 × model per entry."""
    max_tracked_bytes: int = 256 << 20
    """...and at most this many bytes of them (a large model keeps fewer)."""
    dc_lambda: float = 0.04
    """DC-ASGD's variance-control parameter λ."""
    default_lr: float = 0.01
    """η for DC-ASGD when the model hints carry no ``lr``."""

    def __post_init__(self) -> None:
        if not (self.deadline_s > 0 and math.isfinite(self.deadline_s)):
            raise ConfigError("conversion deadline_s must be a finite number > 0")
        if self.blend_versions < 0 or self.window < 1 or self.min_observations < 1 or self.match_slack < 0:
            raise ConfigError("need blend_versions >= 0, window >= 1, min_observations >= 1, match_slack >= 0")
        if self.max_tracked < 1 or self.max_queued < 0 or self.max_tracked_bytes < 0:
            raise ConfigError("need max_tracked >= 1, max_tracked_bytes >= 0 and max_queued >= 0")
        if not (self.dc_lambda >= 0 and math.isfinite(self.dc_lambda)):
            raise ConfigError("dc_lambda must be a finite number >= 0")
        if not (self.default_lr > 0 and math.isfinite(self.default_lr)):
            raise ConfigError("default_lr must be a finite number > 0")


def dc_asgd(stale: Vector, base: Vector, current: Vector, *, lr: float, lam: float) -> Vector:
    """DC-ASGD: the stale change Δ = stale − base, compensated to the current model:
    w_t + Δ − (λ/η)·Δ⊙Δ⊙(w_t − base). float32, a new array."""
    delta = np.subtract(stale, base, dtype=np.float32)
    drift = np.subtract(current, base, dtype=np.float32)
    out = np.multiply(delta, delta, dtype=np.float32)
    out *= drift
    out *= np.float32(-lam / lr)
    out += delta
    out += current
    return out


def disparity(a: Vector, b: Vector) -> tuple[float, float]:
    """(mean absolute difference, cosine distance) between two changes (finite ones: the
    changes are built from validated vectors; the BLAS calls' floating-point flags are ignored)."""
    with np.errstate(over="ignore", invalid="ignore"):
        l1 = float(np.mean(np.abs(np.subtract(a, b, dtype=np.float32))))
        na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
        cos = float(np.dot(a.astype(np.float64, copy=False), b.astype(np.float64, copy=False)) / (na * nb)) if na > 0 and nb > 0 else 0.0
    return l1, 1.0 - cos


@dataclass(frozen=True, slots=True)
class Observation:
    device: str
    version: int
    e1_l1: float
    e2_l1: float
    e1_cos: float
    e2_cos: float


class SwitchTracker:
    """When to stop converting (see the module docstring). Pure; the core owns one."""

    def __init__(self, config: ConversionConfig, state: dict[str, Any] | None = None) -> None:
        self.config = config
        self._estimates: OrderedDict[str, tuple[int, Vector, Vector]] = OrderedDict()
        self._window: OrderedDict[str, Observation] = OrderedDict()  # device -> its latest, oldest first
        self._bytes = 0
        state = state or {}
        sv = state.get("switch_version")
        self.switch_version: int | None = int(sv) if isinstance(sv, int) and sv >= 0 else None

    # -- decisions
    def alpha(self, version: int) -> float:
        """Weight of the estimate in what is aggregated: 1 before the switch, falling to 0."""
        if self.switch_version is None:
            return 1.0
        n = self.config.blend_versions
        if n == 0:
            return 0.0
        return max(0.0, 1.0 - (version - self.switch_version) / n)

    def converting(self, version: int) -> bool:
        """Whether a Convert verdict still leads to a conversion at ``version``."""
        return self.alpha(version) > 0.0

    def blend(self, estimate: Vector, stale_delta: Vector, version: int) -> Vector:
        """α Δ̂ + (1 − α) Δ_s (the estimate itself before the switch)."""
        a = self.alpha(version)
        if a >= 1.0:
            return estimate
        out = np.multiply(estimate, np.float32(a), dtype=np.float32)
        out += np.float32(1.0 - a) * stale_delta
        return out

    # -- evidence
    def record(self, device: str, target_version: int, estimate: Vector, stale_delta: Vector) -> None:
        """Remember a conversion's estimated change (made for ``target_version``) and the stale change."""
        self.forget(device)
        self._estimates[device] = (target_version, estimate, stale_delta)
        self._bytes += estimate.nbytes + stale_delta.nbytes
        while self._estimates and (len(self._estimates) > self.config.max_tracked
                                   or self._bytes > self.config.max_tracked_bytes):
            _, (_, est, stale) = self._estimates.popitem(last=False)
            self._bytes -= est.nbytes + stale.nbytes

    def observe(self, device: str, base_version: int, delta: Vector, version: int) -> Observation | None:
        """The device's true change from ``base_version``: compare it with the estimate made for
        about that version (once; the estimate is then forgotten). Switches when due."""
        entry = self._estimates.get(device)
        if entry is None or abs(entry[0] - base_version) > self.config.match_slack:
            return None
        self.forget(device)
        target, estimate, stale_delta = entry
        e1_l1, e1_cos = disparity(estimate, delta)
        e2_l1, e2_cos = disparity(stale_delta, delta)
        obs = Observation(device, target, e1_l1, e2_l1, e1_cos, e2_cos)
        self._window.pop(device, None)  # one per device: its latest, at the newest end
        self._window[device] = obs
        while len(self._window) > self.config.window:
            self._window.popitem(last=False)
        if self.switch_version is None and self.should_switch():
            self.switch_version = version
        return obs

    def should_switch(self) -> bool:
        w = self._window.values()
        if len(w) < self.config.min_observations:
            return False
        # the lower median: > 0 when more than half of the devices have E1 > E2
        return (statistics.median_low(o.e1_l1 - o.e2_l1 for o in w) > 0
                and statistics.median_low(o.e1_cos - o.e2_cos for o in w) > 0)

    def tracking(self, device: str) -> bool:
        """Whether an estimate for ``device`` waits for its true update."""
        return device in self._estimates

    def forget(self, device: str) -> None:
        entry = self._estimates.pop(device, None)
        if entry is not None:
            self._bytes -= entry[1].nbytes + entry[2].nbytes

    # -- reporting / persistence
    def describe(self, version: int) -> dict[str, Any]:
        w = list(self._window.values())
        mean = (lambda f: round(sum(f(o) for o in w) / len(w), 6)) if w else (lambda f: None)
        return {
            "mode": "converting" if self.switch_version is None else ("blending" if self.converting(version) else "switched-off"),
            "switch_version": self.switch_version,
            "alpha": round(self.alpha(version), 4),
            "observations": len(w),
            "e1_l1": mean(lambda o: o.e1_l1), "e2_l1": mean(lambda o: o.e2_l1),
            "e1_cos": mean(lambda o: o.e1_cos), "e2_cos": mean(lambda o: o.e2_cos),
            # what decides (should_switch): devices whose estimate did worse than their stale change,
            # per metric; the switch needs more than half of the window's on both (the means above
            # can say "worse" while the median device does not)
            "worse_l1": sum(o.e1_l1 > o.e2_l1 for o in w), "worse_cos": sum(o.e1_cos > o.e2_cos for o in w),
            "tracked_devices": len(self._estimates),
        }

    def checkpoint(self) -> dict[str, Any]:
        """What survives a restart: the switch point (estimates and the window do not)."""
        return {"switch_version": self.switch_version if self.switch_version is not None else -1}
