"""Working fakes for core tests: a device core and a coordinator core joined by an
in-memory link with a virtual clock (like h11's ConnectionPair). No mocks of our domain:
messages really are encoded, delivered and decoded; only training is a cheap stand-in."""

from __future__ import annotations

import heapq
import itertools
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from coordinator.core import (
    CommitVersion,
    CoordinatorConfig,
    CoordinatorCore,
    PersistUpdate,
    Snapshot,
)
from coordinator.strategies import Strategy, make_strategy
from edge_sdk.core.device import DeviceConfig, DeviceCore
from edge_sdk.core.events import (
    DeployModel,
    MessageReceived,
    Notify,
    PersistDeviceState,
    Publish,
    SampleAdded,
    ScheduleTimer,
    StartTraining,
    TimerFired,
    TrainingFinished,
)
from edge_sdk.signing import Signer
from edge_sdk.spec import ModelSpec

SPEC = ModelSpec.build("toy", [("body.w", (6,), "extractor"), ("head.w", (3,), "classifier")])
SIGNER = Signer.generate()
"""The test coordinator's model-signing key; devices pin it on first use."""


def toy_snapshot(version: int = 0) -> Snapshot:
    return Snapshot(version=version, weights=np.zeros(SPEC.size, dtype=np.float32))


def topic_matches(pattern: str, topic: str) -> bool:
    p, t = pattern.split("/"), topic.split("/")
    if len(p) != len(t):
        return False
    return all(a in ("+", b) for a, b in zip(p, t))


@dataclass
class Link:
    """A virtual-clock message bus between one coordinator core and many device cores."""

    coordinator: CoordinatorCore
    latency: float = 0.01
    train_seconds: float = 1.0
    duplicate_every: int = 0
    """Deliver every n-th message twice (QoS 1 redelivery); 0 = never."""
    drop: Callable[[str, bytes], bool] = lambda topic, payload: False
    now: float = 0.0
    devices: dict[str, DeviceCore] = field(default_factory=dict)
    commits: list[CommitVersion] = field(default_factory=list)
    persisted: list[PersistUpdate] = field(default_factory=list)
    notes: list[tuple[str, Notify]] = field(default_factory=list)
    deployed: dict[str, int] = field(default_factory=dict)
    retained: dict[str, bytes] = field(default_factory=dict)
    _queue: list[tuple[float, int, str, object]] = field(default_factory=list)
    _seq: itertools.count[int] = field(default_factory=itertools.count)
    _timers: dict[str, float] = field(default_factory=dict)
    _published: int = 0

    def add_device(self, device_id: str, *, min_samples: int = 2, region: str = "r1", seed: int = 0) -> DeviceCore:
        cfg = DeviceConfig(device_id=device_id, region=region, spec=SPEC, min_samples=min_samples, request_timeout_s=5.0)
        core = DeviceCore(cfg, rng=random.Random(seed))
        self.devices[device_id] = core
        return core

    # -------------------------------------------------------------- scheduling

    def _push(self, at: float, target: str, item: object) -> None:
        heapq.heappush(self._queue, (at, next(self._seq), target, item))

    def add_sample(self, device_id: str, total: int, at: float | None = None) -> None:
        self._push(self.now if at is None else at, device_id, SampleAdded(now=0.0, total=total))

    def run_until(self, t_end: float) -> None:
        while self._queue and self._queue[0][0] <= t_end:
            at, _, target, item = heapq.heappop(self._queue)
            self.now = at
            self._deliver(target, item)
        self.now = max(self.now, t_end)

    def _deliver(self, target: str, item: object) -> None:
        now = self.now
        if target == "coordinator":
            if isinstance(item, TimerFired):
                if self._timers.get(target) != item.now:
                    return
                del self._timers[target]
                ev: object = TimerFired(now=now)
            else:
                ev = item
            self._run_coordinator(self.coordinator.handle(ev))  # type: ignore[arg-type]
            return
        core = self.devices[target]
        if isinstance(item, SampleAdded):
            ev = SampleAdded(now=now, total=item.total)
        elif isinstance(item, TimerFired):
            if self._timers.get(target) != item.now:
                return
            del self._timers[target]
            ev = TimerFired(now=now)
        elif isinstance(item, TrainingFinished):
            ev = TrainingFinished(now=now, job_id=item.job_id, weights=item.weights, n_samples=item.n_samples)
        else:
            ev = item
        self._run_device(target, core.handle(ev))  # type: ignore[arg-type]

    def _route(self, action: Publish) -> None:
        if self.drop(action.topic, action.payload):
            return
        self._published += 1
        copies = 2 if self.duplicate_every and self._published % self.duplicate_every == 0 else 1
        if action.retain:
            self.retained[action.topic] = action.payload
        for pattern in self.coordinator.subscriptions():
            if topic_matches(pattern, action.topic):
                for _ in range(copies):
                    self._push(self.now + self.latency, "coordinator", MessageReceived(now=self.now + self.latency, topic=action.topic, payload=action.payload))
        for device_id, core in self.devices.items():
            if action.topic in core.subscriptions():
                for _ in range(copies):
                    self._push(self.now + self.latency, device_id, MessageReceived(now=self.now + self.latency, topic=action.topic, payload=action.payload))

    def _run_coordinator(self, actions: list[object]) -> None:
        for a in actions:
            if isinstance(a, Publish):
                self._route(a)
            elif isinstance(a, ScheduleTimer):
                self._timers["coordinator"] = a.at
                self._push(a.at, "coordinator", TimerFired(now=a.at))
            elif isinstance(a, CommitVersion):
                self.commits.append(a)
            elif isinstance(a, PersistUpdate):
                self.persisted.append(a)
            elif isinstance(a, Notify):
                self.notes.append(("coordinator", a))

    def _run_device(self, device_id: str, actions: list[object]) -> None:
        for a in actions:
            if isinstance(a, Publish):
                self._route(a)
            elif isinstance(a, ScheduleTimer):
                self._timers[device_id] = a.at
                self._push(a.at, device_id, TimerFired(now=a.at))
            elif isinstance(a, StartTraining):
                job = a.job
                trained = np.array(job.weights, copy=True) + 1.0  # stand-in for SGD
                self._push(
                    self.now + self.train_seconds,
                    device_id,
                    TrainingFinished(now=0.0, job_id=job.job_id, weights=trained, n_samples=job.n_samples),
                )
            elif isinstance(a, DeployModel):
                self.deployed[device_id] = a.version
            elif isinstance(a, Notify):
                self.notes.append((device_id, a))
            elif isinstance(a, PersistDeviceState):
                pass


def make_coordinator(strategy: str | Strategy = "spin", *, snapshot: Snapshot | None = None, seed: int = 0, **params: object) -> CoordinatorCore:
    strat = make_strategy(strategy, **params) if isinstance(strategy, str) else strategy
    cfg = CoordinatorConfig(region="r1", coordinator_id="c1", spec=SPEC, signer=SIGNER)
    return CoordinatorCore(cfg, strat, snapshot or toy_snapshot(), rng=random.Random(seed))


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, poll: float = 0.05) -> None:
    """Poll ``predicate`` until it holds; fail naming ``what`` after ``timeout`` seconds
    (integration tests only: the cores' tests never wait)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


class CoordinatorProcess:
    """``edgeci coordinator ARGS`` as a child process, its output collected in ``lines``;
    the constructor returns once it printed "ready" (or fails with its output)."""

    def __init__(self, *args: str) -> None:
        root = Path(__file__).resolve().parents[1]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "demos.cli", "coordinator", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, cwd=root, env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"},
        )
        self.lines: list[str] = []
        self._pump = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout or []), daemon=True)
        self._pump.start()
        try:
            wait_until(lambda: any("ready" in ln for ln in self.lines) or self.proc.poll() is not None, 120, "coordinator ready")
            assert self.proc.poll() is None, "".join(self.lines)
        except BaseException:
            self.close()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def close(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal it (if still running) and wait; kill it after ``timeout``. Its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._pump.join(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return int(self.proc.returncode)

    def __enter__(self) -> CoordinatorProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
