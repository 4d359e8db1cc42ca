"""Events and actions shared by the sans-IO cores.

Events are past-tense facts fed *into* a core; actions are commands a core hands back to
its driver, which performs them **in order** (a core may rely on that: e.g. persist an
update before acknowledging it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from edge_sdk.errors import LocalProtocolError
from edge_sdk.fastinit import fast_init
from edge_sdk.spec import FULL, Vector


def _check_time(now: float) -> None:
    if type(now) is float and now - now == 0.0:  # the common case, fast: a finite float (inf - inf and NaN are NaN)
        return
    if not isinstance(now, int | float) or not math.isfinite(now):
        raise LocalProtocolError(f"event time must be a finite number, got {now!r}")


# ---------------------------------------------------------------- events (shared)


@fast_init
@dataclass(frozen=True, slots=True, kw_only=True)
class MessageReceived:
    """Raw bytes arrived on ``topic``. The core decodes and validates them itself."""

    now: float
    topic: str
    payload: bytes
    wall: float | None = None
    """This host's system clock when the message was handled, for comparisons with a time another
    machine stamped (a control command's ``issued_at``); None: ``now``. The drivers' ``now`` never
    goes back (:class:`edge_sdk.runtime.WallClock`): after the system clock is stepped back it runs
    ahead of it, and of every honest clock, by the step until the process restarts."""

    def __post_init__(self) -> None:
        _check_time(self.now)
        if self.wall is not None:
            _check_time(self.wall)


@fast_init
@dataclass(frozen=True, slots=True, kw_only=True)
class TimerFired:
    now: float

    def __post_init__(self) -> None:
        _check_time(self.now)


# ---------------------------------------------------------------- actions (shared)


@fast_init
@dataclass(frozen=True, slots=True, kw_only=True)
class Publish:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False

    def __post_init__(self) -> None:
        if self.qos not in (0, 1, 2):
            raise LocalProtocolError(f"qos must be 0, 1 or 2, got {self.qos}")


@fast_init
@dataclass(frozen=True, slots=True, kw_only=True)
class ScheduleTimer:
    """Deliver ``TimerFired`` at (or after) ``at``. A later ScheduleTimer replaces it."""

    at: float

    def __post_init__(self) -> None:
        _check_time(self.at)


@fast_init
@dataclass(frozen=True, slots=True, kw_only=True)
class Notify:
    """Something an application may want to hear about (drivers route it to callbacks)."""

    kind: str
    data: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- device side


@fast_init
@dataclass(frozen=True, slots=True, kw_only=True)
class SampleAdded:
    """The device's store now holds ``total`` labelled samples (durably)."""

    now: float
    total: int

    def __post_init__(self) -> None:
        _check_time(self.now)
        if self.total < 0:
            raise LocalProtocolError("total must be >= 0")


@fast_init
@dataclass(frozen=True, slots=True, kw_only=True)
class TrainingJob:
    job_id: int
    base_version: int
    weights: Vector
    n_samples: int
    group: str = FULL
    hints: dict[str, float] = field(default_factory=dict)


@fast_init
@dataclass(frozen=True, slots=True, kw_only=True)
class StartTraining:
    """Fine-tune ``job.weights`` on all local samples, then report ``TrainingFinished``."""

    job: TrainingJob


@fast_init
@dataclass(frozen=True, slots=True, kw_only=True)
class TrainingFinished:
    now: float
    job_id: int
    weights: Vector
    n_samples: int
    loss: float = 0.0
    seconds: float = 0.0

    def __post_init__(self) -> None:
        _check_time(self.now)
        if self.n_samples < 1:
            raise LocalProtocolError("a finished training job must have used >= 1 sample")


@fast_init
@dataclass(frozen=True, slots=True, kw_only=True)
class TrainingFailed:
    now: float
    job_id: int
    error: str

    def __post_init__(self) -> None:
        _check_time(self.now)


@fast_init
@dataclass(frozen=True, slots=True, kw_only=True)
class DeployModel:
    """A newer global model arrived: serve it for inference."""

    version: int
    weights: Vector
    group: str = FULL
    kid: str = ""
    """The key id that signed it ("" unsigned: the in-process emulator): a driver that saves
    the model records it, so a later start serves the saved model only while that key is trusted."""
    epoch: int = 0
    """The numbering ``version`` is in (``ModelMsg.epoch``): saved with the model, so a later
    start knows which of the region's numberings the saved version counts in."""


@fast_init
@dataclass(frozen=True, slots=True, kw_only=True)
class PinKey:
    """Trust on first use: durably remember ``region``'s coordinator key before relying on it."""

    region: str
    kid: str
    public_raw: bytes


@fast_init
@dataclass(frozen=True, slots=True, kw_only=True)
class PinEpoch:
    """``region``'s coordinator numbers its versions in ``epoch`` now (its state dir was
    created anew): durably remember it before relying on it, so that after a restart a model
    of an older epoch (a replay of the numbering before) is still refused."""

    region: str
    epoch: int
    previous: int = 0
    """The epoch before (0: the device knew none for the region: its first contact)."""


@fast_init
@dataclass(frozen=True, slots=True, kw_only=True)
class PinCanary:
    """The device took a canary round in ``region``: durably remember the newest request taken
    (``candidate`` against ``release``, numbered in ``epoch``) and its rounds (``nonces``, newest
    last) before acting on it, so that after a restart a replay of one is still refused
    (``DeviceCore(canaries=...)`` restores it). One record per region: each replaces the last."""

    region: str
    epoch: int
    candidate: int
    release: int
    nonces: tuple[int, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.region, str) or not self.region:
            raise LocalProtocolError(f"a canary pin needs a region, got {self.region!r}")
        for name in ("epoch", "candidate", "release"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
                raise LocalProtocolError(f"a canary pin's {name} must be an int >= 0, got {value!r}")
        if not isinstance(self.nonces, tuple) or not self.nonces or any(
                isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < 2**63 for n in self.nonces):
            raise LocalProtocolError(f"a canary pin's nonces must be a non-empty tuple of ints >= 0, got {self.nonces!r}")


@fast_init
@dataclass(frozen=True, slots=True, kw_only=True)
class MarkTraining:
    """Durably record whether a training job is in flight, before it starts and once it ends, so
    that a process killed while training (the OOM killer, a native crash) is seen after the restart:
    ``DeviceCore(training=...)`` restores the last record, and one still ``in_flight`` counts as a
    failed job. ``crashes``: jobs in a row that died in flight (reset by a job that finishes);
    ``failures``: jobs in a row that failed, raised or crashed (the back-off's exponent; reset by a
    job that finishes); ``hold_until``: no training pull before this time (the clock's seconds: a
    wall clock survives the restart; 0: none). One record per device: each replaces the last."""

    in_flight: bool
    crashes: int = 0
    hold_until: float = 0.0
    failures: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.in_flight, bool):
            raise LocalProtocolError(f"a training mark's in_flight must be a bool, got {self.in_flight!r}")
        if isinstance(self.crashes, bool) or not isinstance(self.crashes, int) or not 0 <= self.crashes < 2**31:
            raise LocalProtocolError(f"a training mark's crashes must be an int >= 0, got {self.crashes!r}")
        if isinstance(self.failures, bool) or not isinstance(self.failures, int) or not 0 <= self.failures < 2**31:
            raise LocalProtocolError(f"a training mark's failures must be an int >= 0, got {self.failures!r}")
        if isinstance(self.hold_until, bool) or not isinstance(self.hold_until, int | float) or not (
                math.isfinite(self.hold_until) and self.hold_until >= 0):
            raise LocalProtocolError(f"a training mark's hold_until must be a finite time >= 0, got {self.hold_until!r}")


@fast_init
@dataclass(frozen=True, slots=True, kw_only=True)
class MarkRegionDown:
    """Durably record that the device left ``region`` because its requests there timed out, and the
    stamp (``published_at``) of the newest ``alive: true`` status it had seen from that region's
    coordinator then; ``status_at=None``: the region answered or published a newer status (cleared).
    ``DeviceCore(down=...)`` restores the records: a restarted device (or one whose broker connection
    came back) is sent the same retained status again, which proves nothing about a coordinator that
    stopped answering, and must not take it back there to wait out its timeouts again."""

    region: str
    status_at: float | None

    def __post_init__(self) -> None:
        if not isinstance(self.region, str) or not self.region:
            raise LocalProtocolError(f"a region mark's region must be a region name, got {self.region!r}")
        if self.status_at is not None and (isinstance(self.status_at, bool) or not isinstance(self.status_at, int | float)
                                           or not math.isfinite(self.status_at)):
            raise LocalProtocolError(f"a region mark's status_at must be a finite time or None, got {self.status_at!r}")


@fast_init
@dataclass(frozen=True, slots=True, kw_only=True)
class SwitchRegion:
    """The device now talks to ``region``'s coordinator instead of ``previous``'s (failover,
    or back home). The core already re-addressed its requests and filters replies by region;
    the driver tells the application and may narrow its subscriptions."""

    region: str
    previous: str
    reason: str
    subscribe: tuple[str, ...] = ()
    unsubscribe: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.region == self.previous:
            raise LocalProtocolError(f"a region switch needs two regions, got {self.region!r} twice")


@fast_init
@dataclass(frozen=True, slots=True, kw_only=True)
class PersistDeviceState:
    """Durably store the device's counters before the message that depends on them leaves."""

    next_seq: int
    trained_upto: int
    pending: bytes = b""
    """The encoded update waiting for its ack (b"": none), stored with the counters: a restarted
    device sends it again, same seq and nonce, instead of training its samples into a second update."""
    pending_upto: int = 0
    """``trained_upto`` once that update is acknowledged (the samples its round trained on)."""


# ---------------------------------------------------------------- canary evaluation (device side)


@fast_init
@dataclass(frozen=True, slots=True, kw_only=True)
class CanaryScored:
    """The driver scored one new label with the candidate and the release *before* adding it
    to the training set (test-then-train): whether each model predicted it right."""

    now: float
    candidate: int
    release: int
    candidate_right: bool
    release_right: bool

    def __post_init__(self) -> None:
        _check_time(self.now)


@fast_init
@dataclass(frozen=True, slots=True, kw_only=True)
class StartCanary:
    """Score each new label with ``weights`` (candidate ``candidate``) and with the deployed
    release ``release`` before storing it, and report each as ``CanaryScored``."""

    candidate: int
    release: int
    weights: Vector


@fast_init
@dataclass(frozen=True, slots=True, kw_only=True)
class StopCanary:
    """Stop scoring for ``candidate`` (reported, abandoned or replaced); drop its weights."""

    candidate: int
