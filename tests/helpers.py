"""Working fakes for core tests: a device core and a coordinator core joined by an
in-memory link with a virtual clock (like h11's ConnectionPair). No mocks of our domain:
messages really are encoded, delivered and decoded; only training is a cheap stand-in."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import numpy as np

from coordinator.core import (
    CommitVersion,
    CoordinatorConfig,
    CoordinatorCore,
    PersistUpdate,
    Snapshot,
)
from coordinator.strategies import Strategy, make_strategy
from devices.engine import Driver, Kind
from edge_sdk.core.device import DeviceConfig, DeviceCore
from edge_sdk.core.events import (
    DeployModel,
    MessageReceived,
    Notify,
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


class Link(Driver):
    """A virtual-clock message bus between one coordinator core and many device cores, run
    by the emulator's event engine (:mod:`devices.engine`: the one loop every fleet uses).
    Endpoint 0 is the coordinator, device ``i`` (in the order added) is ``i + 1``."""

    def __init__(
        self,
        coordinator: CoordinatorCore,
        *,
        latency: float = 0.01,
        train_seconds: float = 1.0,
        duplicate_every: int = 0,
        drop: Callable[[str, bytes], bool] = lambda topic, payload: False,
        delay: Callable[[str], float] = lambda topic: 0.0,
    ) -> None:
        super().__init__()
        self.coordinator = coordinator
        self.latency, self.train_seconds = latency, train_seconds
        self.duplicate_every = duplicate_every
        """Deliver every n-th message twice (QoS 1 redelivery); 0 = never."""
        self.drop = drop
        self.delay = delay
        """Extra seconds for a message on this topic (on top of ``latency``): varying delays."""
        self.devices: dict[str, DeviceCore] = {}
        self._index: dict[str, int] = {}
        self._ids: list[str] = []
        self.commits: list[CommitVersion] = []
        self.persisted: list[PersistUpdate] = []
        self.notes: list[tuple[str, Notify]] = []
        self.deployed: dict[str, int] = {}
        self.retained: dict[str, bytes] = {}
        self._timers: dict[int, float] = {}
        self._published = 0

    @property
    def now(self) -> float:
        return self.clock.now

    def add_device(self, device_id: str, *, min_samples: int = 2, region: str = "r1", seed: int = 0, **config: Any) -> DeviceCore:
        cfg = DeviceConfig(device_id=device_id, region=region, spec=SPEC, min_samples=min_samples, request_timeout_s=5.0, **config)
        core = DeviceCore(cfg, rng=random.Random(seed))
        self.devices[device_id] = core
        self._ids.append(device_id)
        self._index[device_id] = len(self._ids)
        return core

    def add_sample(self, device_id: str, total: int, at: float | None = None) -> None:
        self.push(self.now if at is None else max(at, self.now), Kind.SAMPLE, self._index[device_id], total)

    def run_until(self, until: float, stop: Callable[[Kind], bool] | None = None) -> bool:
        drained = super().run_until(until, stop)
        if drained:  # every event due is done: the clock reaches ``until`` (a stop that fired leaves it)
            self.clock.advance_to(max(self.now, until))
        return drained

    def restart(self, coordinator: CoordinatorCore) -> None:
        """Replace the coordinator (a crash and restart from its snapshot) and start it."""
        self.coordinator = coordinator
        self._timers.pop(0, None)
        self._act(0, coordinator.start(self.now))

    # -------------------------------------------------------------- the engine's events

    def dispatch(self, now: float, kind: Kind, target: int, data: Any) -> None:
        ev: Any
        if kind == Kind.TIMER:
            if self._timers.get(target) != data:
                return  # superseded by a later ScheduleTimer
            del self._timers[target]
            ev = TimerFired(now=now)
        elif kind == Kind.MSG:
            ev = MessageReceived(now=now, topic=data[0], payload=data[1])
        elif kind == Kind.SAMPLE:
            ev = SampleAdded(now=now, total=data)
        elif kind == Kind.TRAINED:
            job_id, weights, n_samples = data
            ev = TrainingFinished(now=now, job_id=job_id, weights=weights, n_samples=n_samples)
        else:
            raise AssertionError(f"unexpected event {kind!r}")
        core = self.coordinator if target == 0 else self.devices[self._ids[target - 1]]
        self._act(target, core.handle(ev))

    def _route(self, action: Publish) -> None:
        if self.drop(action.topic, action.payload):
            return
        self._published += 1
        copies = 2 if self.duplicate_every and self._published % self.duplicate_every == 0 else 1
        if action.retain:
            self.retained[action.topic] = action.payload
        at = self.now + self.latency + self.delay(action.topic)
        for pattern in self.coordinator.subscriptions():
            if topic_matches(pattern, action.topic):
                for _ in range(copies):
                    self.push(at, Kind.MSG, 0, (action.topic, action.payload))
        for i, device_id in enumerate(self._ids, start=1):
            if action.topic in self.devices[device_id].subscriptions():
                for _ in range(copies):
                    self.push(at, Kind.MSG, i, (action.topic, action.payload))

    def _act(self, index: int, actions: Sequence[object]) -> None:
        """Carry out the actions of endpoint ``index`` (0: the coordinator)."""
        who = "coordinator" if index == 0 else self._ids[index - 1]
        for a in actions:
            if isinstance(a, Publish):
                self._route(a)
            elif isinstance(a, ScheduleTimer):
                self._timers[index] = a.at
                self.push(a.at, Kind.TIMER, index, a.at)
            elif isinstance(a, Notify):
                self.notes.append((who, a))
            elif isinstance(a, CommitVersion):
                self.commits.append(a)
            elif isinstance(a, PersistUpdate):
                self.persisted.append(a)
            elif isinstance(a, StartTraining):
                job = a.job
                trained = np.array(job.weights, copy=True) + 1.0  # stand-in for SGD
                self.push(self.now + self.train_seconds, Kind.TRAINED, index, (job.job_id, trained, job.n_samples))
            elif isinstance(a, DeployModel):
                self.deployed[who] = a.version
            # PersistDeviceState: in-memory devices never restart


def make_coordinator(strategy: str | Strategy = "spin", *, snapshot: Snapshot | None = None, seed: int = 0,
                     tickets: Iterator[int] | None = None, **params: object) -> CoordinatorCore:
    strat = make_strategy(strategy, **params) if isinstance(strategy, str) else strategy
    cfg = CoordinatorConfig(region="r1", coordinator_id="c1", spec=SPEC, signer=SIGNER)
    return CoordinatorCore(cfg, strat, snapshot or toy_snapshot(), rng=random.Random(seed), tickets=tickets)


def unstarted_client(data_dir: Path, **kw: Any) -> Any:
    """An EdgeClient (digits, device ``d1`` unless given) that is never started: no broker, and
    what it submits to its actor is collected in ``c.submitted`` for the test to run by hand."""
    from edge_sdk.client import EdgeClient

    kw.setdefault("task", "digits")
    kw.setdefault("device_id", "d1")
    c = EdgeClient(broker="mqtt://127.0.0.1:1", data_dir=data_dir, **kw)
    c.submitted = []
    c.actor.submit = c.submitted.append
    return c


class ThenOnce:
    """Wraps a lock: the first time it is released, ``then`` runs (on this thread, outside the lock).
    Forces another thread's work between two critical sections of the code under test."""

    def __init__(self, lock: Any, then: Callable[[], object]) -> None:
        self.lock, self.then, self.fired = lock, then, False

    def __enter__(self) -> None:
        self.lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self.lock.release()
        if not self.fired:
            self.fired = True
            self.then()


class StopAfter:
    """A stop condition for :func:`edge_sdk.cancellation.stoppable` that turns true the
    ``n``-th time it is asked (a training loop asks before each batch); ``asked`` counts."""

    def __init__(self, n: int) -> None:
        self.n, self.asked = n, 0

    def __call__(self) -> bool:
        self.asked += 1
        return self.asked >= self.n


def close_unstarted(c: Any) -> None:
    """Undo :func:`unstarted_client`: its actor, trainer and store."""
    c.actor.stop()
    c._trainer.shutdown(wait=False)
    c.store.close()
    if c._dir_lock is not None:
        c._dir_lock.close()


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, poll: float = 0.05,
               detail: Callable[[], object] | None = None) -> None:
    """Poll ``predicate`` until it holds; fail naming ``what`` after ``timeout`` seconds, with
    ``detail()`` (what was seen) appended when given (integration tests only: the cores' tests
    never wait)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            seen = "" if detail is None else f": {detail()!r}"
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{seen}")
        time.sleep(poll)


def wait_steady(predicate: Callable[[], bool], timeout: float, what: str, gap: float = 1.0) -> None:
    """As :func:`wait_until`, but ``predicate`` must hold twice, ``gap`` seconds apart (a
    round that starts between two reads is not missed)."""
    def twice() -> bool:
        if not predicate():
            return False
        time.sleep(gap)
        return predicate()

    wait_until(twice, timeout, what)


class ChildProcess:
    """A Python child process of this checkout (``python ARGV``), its output collected in ``lines``;
    the constructor returns once ``ready(lines)`` holds (or fails with its output, the child
    stopped). 120 s: a coordinator's start pretrains the digits model (7-8 CPU seconds, 15-23 s
    beside the suite's other worker and a busy loop)."""

    def __init__(self, argv: Sequence[str], ready: Callable[[list[str]], bool], what: str,
                 env: Mapping[str, str] | None = None, timeout: float = 120.0, wait: bool = True) -> None:
        """``env``: the child's whole environment (default: ours, with this checkout on PYTHONPATH);
        ``wait=False``: return at once (:meth:`wait_ready` waits)."""
        root = Path(__file__).resolve().parents[1]
        self.proc = subprocess.Popen(
            [sys.executable, *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=root,
            env=dict(env) if env is not None else {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"},
        )
        self.lines: list[str] = []
        self._pump = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout or []), daemon=True)
        self._pump.start()
        self._ready, self._what, self._timeout = ready, what, timeout
        if wait:
            self.wait_ready()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_ready(self) -> Self:
        """Wait until it is ready; if it is not (it stopped, or the timeout), it is killed and the
        failure has its output."""
        try:
            wait_until(lambda: self._ready(self.lines) or self.proc.poll() is not None, self._timeout, self._what,
                       detail=lambda: self.output)
            assert self.proc.poll() is None, self.output
        except BaseException:
            self.close(signal.SIGKILL)
            raise
        return self

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

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CoordinatorProcess(ChildProcess):
    """``edgeci coordinator ARGS`` as a child process (:class:`ChildProcess`), ready once it
    printed its "ready" line."""

    def __init__(self, *args: str, env: Mapping[str, str] | None = None, wait: bool = True) -> None:
        super().__init__(["-m", "demos.cli", "coordinator", *args],
                         lambda lines: any(" ready: region " in ln for ln in lines), "coordinator ready", env=env, wait=wait)


def digits_scenario(*, duration_s: int, devices: int, arrival_rate_per_h: float, **extra: Any) -> dict[str, Any]:
    """A small digits scenario for the emulator tests (laptops, Dirichlet α = 1, SPIN k = 4);
    ``extra`` replaces whole top-level sections."""
    raw: dict[str, Any] = {
        "task": "digits",
        "duration_s": duration_s,
        "eval_every_s": 60,
        "seeds": [1],
        "fleet": {"devices": devices, "mix": {"laptop": 1}},
        "data": {"partition": "dirichlet", "alpha": 1.0, "arrival_rate_per_h": arrival_rate_per_h},
        "device": {"min_samples": 4},
        "training": {"epochs": 2, "batch_size": 16, "lr": 0.05},
        "runs": [{"strategy": "spin", "params": {"k": 4, "timeout_s": 10.0}}],
    }
    raw.update(extra)
    return raw


def single_threaded_digits() -> Any:
    """The digits task on the CPU with torch limited to one thread (emulator tests)."""
    from edge_sdk.tasks import get_task
    from edge_sdk.trainer import configure_threads

    configure_threads(1)
    return get_task("digits", device="cpu")
