"""A coordinator daemon over a real broker (plain mosquitto, or the production TLS + ACL config
of ``tests/secure_broker.py``), its devices, and the canary round they open: the scaffolding of
the daemon acknowledgement tests (``test_daemon_acks*.py``, ``test_daemon_startup.py``).

A test takes a :class:`Net` (the ``plain_net`` / ``any_net`` fixtures of ``conftest.py``) and
runs inside ``with Rig(net, tmp_path) as rig:``; what it asserts about the state after the
daemon stopped it asserts after the ``with``. The rig's hooks (``hold_report_records``,
``fail_first_report_record``, ...) wrap the daemon's own registry and core methods on that one
instance: they still do all their work, at a moment the test picks.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from coordinator.broker import MosquittoProcess
from coordinator.daemon import CoordinatorDaemon, CoordinatorOptions
from edge_sdk.core.events import MessageReceived
from edge_sdk.modelio import save_model
from edge_sdk.mqtt import BrokerAuth, MqttTransport
from edge_sdk.tasks import get_task
from edge_sdk.tasks.base import Task
from edge_sdk.wire import topics
from edge_sdk.wire.codec import decode, encode
from edge_sdk.wire.messages import Canary, CanaryReport, Message, ModelMsg, Pull, Update
from tests.helpers import wait_until
from tests.secure_broker import SECURE_REGION, SecureBroker

CANARY_ROUND: Mapping[str, Any] = {"canary": 1.0, "canary_min_reports": 3, "canary_deadline_s": 300.0,
                                   "strategy_params": {"k": 1, "timeout_s": None}}
"""make_daemon's defaults: canary rounds of 3 reports, k = 1 (each update a candidate)."""
MALLORY: Mapping[str, int] = {"mallory": 1}
"""open_canary_round's one author (k = 1) and the seed of its update's weights."""


def enospc() -> OSError:
    return OSError(28, "No space left on device (test)")


@dataclass
class Net:
    """A broker, plain or TLS, and what a daemon and a device need to use it."""

    url: str
    region: str
    options: dict[str, Any]
    bundle: Callable[[str], Path | None]

    @classmethod
    def plain(cls, broker: MosquittoProcess, region: str = "acks") -> Net:
        return cls(broker.url, region, {}, lambda name: None)

    @classmethod
    def tls(cls, secure: SecureBroker) -> Net:
        """The daemon as ``coord-sec`` with its bundle; each device with its own (issued on first use)."""
        return cls(secure.url, SECURE_REGION, {"coordinator_id": "coord-sec", "bundle": secure.bundle("coord-sec", "coordinator")},
                   secure.bundle)


class Device:
    """A device's own MQTT client (raw messages, no SDK): publishes on its topics, keeps what
    the coordinator sends to its ack, model and invite topics. It stays connected across the
    coordinator's restarts, as a device does."""

    def __init__(self, net: Net, device: str) -> None:
        self.device, self.region = device, net.region
        self.received: list[Message] = []
        self._lock = threading.Lock()
        bundle = net.bundle(device)
        self.transport = MqttTransport(
            net.url, client_id=device, on_message=self._on_message, clean_session=True,
            subscriptions=[topics.device_topic(net.region, device, leaf) for leaf in ("ack", "model", "invite")],
            auth=BrokerAuth.from_bundle(bundle) if bundle is not None else None)
        self.transport.start()

    def _on_message(self, topic: str, payload: bytes) -> None:
        with self._lock:
            self.received.append(decode(payload))

    def send(self, leaf: str, message: Message) -> None:
        self.transport.publish(topics.device_topic(self.region, self.device, leaf), encode(message), qos=1)  # type: ignore[arg-type]

    def of(self, kind: type[Any]) -> list[Any]:
        with self._lock:
            return [m for m in self.received if isinstance(m, kind)]


def weights(task: Task, seed: int) -> np.ndarray:
    """The pretrained model nudged by noise from ``seed``: an update the gate and the robust strategies accept."""
    return (task.pretrained(seed=0) + np.random.default_rng(seed).normal(scale=0.01, size=task.spec.size)).astype(np.float32)


def update(task: Task, device: str, seq: int, *, seed: int, nonce: int, base_version: int = 0) -> Update:
    return Update(device=device, seq=seq, model_id=task.spec.model_id, base_version=base_version, n_samples=20,
                  weights=weights(task, seed), nonce=nonce)


def report(ask: Canary, device: str = "dev0") -> CanaryReport:
    """``device``'s canary report on ``ask``: 10 labels both models got right."""
    return CanaryReport(device=device, candidate=ask.candidate, release=ask.release, both_right=10, only_candidate=0,
                        only_release=0, both_wrong=0, nonce=ask.nonce)


def recorded_reports(state_root: Path) -> dict[str, Any]:
    """The reports canary.json holds (the daemons' state dir is ``state_root / "coord"``)."""
    return dict(json.loads((state_root / "coord" / "canary.json").read_text())["reports"])


class Rig:
    """One test's daemon (the latest :meth:`make_daemon`: a later one is a restart on the same
    state dir) and devices, over ``net``. Leaving the ``with`` sets every gate the rig made (a
    daemon thread held on one goes on), stops the daemon, then the devices."""

    def __init__(self, net: Net, tmp_path: Path, task: Task | None = None) -> None:
        self.net, self.tmp_path = net, tmp_path
        self.task = task if task is not None else get_task("digits")
        self.daemon: CoordinatorDaemon | None = None
        self.devices: list[Device] = []
        self._gates: list[threading.Event] = []

    def __enter__(self) -> Rig:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for gate in self._gates:
            gate.set()
        try:
            if self.daemon is not None:
                self.daemon.stop()
        finally:
            for d in self.devices:
                d.transport.stop()

    @property
    def _daemon(self) -> CoordinatorDaemon:
        assert self.daemon is not None, "make_daemon first"
        return self.daemon

    def gate(self) -> threading.Event:
        """An event the rig sets on exit, whatever the test did."""
        event = threading.Event()
        self._gates.append(event)
        return event

    def make_daemon(self, *, init: bool = False, canary_round: bool = True, **options: Any) -> CoordinatorDaemon:
        """A daemon on the test's state dir (not started): :data:`CANARY_ROUND`'s options unless
        not ``canary_round``, then ``options``; ``init``: from the pretrained model (the first start)."""
        if init:
            save_model(self.tmp_path / "init.npz", self.task.spec, self.task.pretrained(seed=0), {"version": 0})
        self.daemon = CoordinatorDaemon(CoordinatorOptions(require_pull=False,
            broker=self.net.url, region=self.net.region, state_dir=self.tmp_path / "coord",
            init=self.tmp_path / "init.npz" if init else None,
            **{**(CANARY_ROUND if canary_round else {}), **self.net.options, **options}), task=self.task)
        return self.daemon

    def device(self, name: str) -> Device:
        device = Device(self.net, name)
        self.devices.append(device)
        return device

    def open_canary_round(self, authors: Mapping[str, int] = MALLORY) -> Canary:
        """Three devices pull (the cohort), then ``authors`` (name: weights' seed) send an update
        each, which make version 1 (k = their number), the candidate: the three are asked to score
        it. The devices are ``devices[:3 + len(authors)]`` (dev0-2, the authors); dev0's request."""
        cohort = [self.device(f"dev{i}") for i in range(3)]
        writers = [self.device(name) for name in authors]
        for d in cohort:
            d.send("pull", Pull(device=d.device, seq=1, model_id=self.task.spec.model_id, serve=True))
        wait_until(lambda: all(d.of(ModelMsg) for d in cohort), 15, "the devices' first models")
        for d in writers:
            d.send("update", update(self.task, d.device, 1, seed=authors[d.device], nonce=1))
        wait_until(lambda: all(d.of(Canary) for d in cohort), 15, "the canary requests")
        ask: Canary = cohort[0].of(Canary)[0]
        return ask

    def recorded_reports(self) -> dict[str, Any]:
        return recorded_reports(self.tmp_path)

    def canary_counters(self) -> dict[str, int]:
        return {k: v for k, v in self._daemon.core.counters.items() if k.startswith("canary") and v}

    def pause_actor(self) -> threading.Event:
        """Hold the daemon's actor (it reads and handles nothing) until the returned gate is set."""
        paused, resume = threading.Event(), self.gate()
        self._daemon.actor.call(lambda: (paused.set(), resume.wait(15)))
        assert paused.wait(10)
        return resume

    def cut_connection(self) -> None:
        """Shut the daemon's broker connection down, as the process dying would leave it."""
        sock: Any = self._daemon.transport._client._sock
        getattr(sock, "sock", sock).shutdown(socket.SHUT_RDWR)  # (an SSLSocket is the socket itself)

    def hold_report_records(self) -> tuple[threading.Event, threading.Event]:
        """Each record of the round with a report in it (not its opening record) is written, then
        sets ``writing`` and waits for ``cut`` (a gate) before it returns: (writing, cut)."""
        writing, cut = threading.Event(), self.gate()
        record = self._daemon.registry.record_canary_round

        def record_then_wait(round_: Mapping[str, Any]) -> None:
            record(round_)
            if round_["reports"]:
                writing.set()
                assert cut.wait(10)

        self._daemon.registry.record_canary_round = record_then_wait  # type: ignore[method-assign,assignment]
        return writing, cut

    def fail_first_report_record(self) -> list[Mapping[str, Any]]:
        """The first record of the round with a report in it raises ENOSPC (unwritten); the
        returned list holds that round once it has."""
        failed: list[Mapping[str, Any]] = []
        record = self._daemon.registry.record_canary_round

        def record_or_fail(round_: Mapping[str, Any]) -> None:
            if round_["reports"] and not failed:
                failed.append(round_)
                raise enospc()
            record(round_)

        self._daemon.registry.record_canary_round = record_or_fail  # type: ignore[method-assign,assignment]
        return failed

    def fail_probes(self) -> threading.Event:
        """The storage probe raises ENOSPC until the returned gate (``healthy``) is set."""
        healthy, probe = self.gate(), self._daemon.registry.probe

        def probe_until_healthy(size: int) -> None:
            if not healthy.is_set():
                raise enospc()
            probe(size)

        self._daemon.registry.probe = probe_until_healthy  # type: ignore[method-assign]
        return healthy

    def queue_report_behind_a_pull(self, ask: Canary) -> threading.Event:
        """dev0's pull, then its report on ``ask``, read in one go (a daemon with max_batch=1): the
        actor stays inside the pull's handling until the returned gate (``go``) is set, the report
        waits in its inbox."""
        daemon, inside, go = self._daemon, threading.Event(), self.gate()
        handle = daemon.core.handle

        def slow_pull(event: Any) -> list[Any]:
            if isinstance(event, MessageReceived) and event.topic.endswith("/pull") and not inside.is_set():
                inside.set()
                assert go.wait(15)
            return handle(event)

        daemon.core.handle = slow_pull  # type: ignore[method-assign]
        resume = self.pause_actor()  # the actor reads nothing meanwhile
        self.devices[0].send("pull", Pull(device="dev0", seq=2, model_id=self.task.spec.model_id, serve=True))
        self.devices[0].send("update", report(ask))
        time.sleep(0.5)  # both in the daemon's socket
        resume.set()
        assert inside.wait(10), "the pull in hand"
        assert daemon.actor.backlog >= 1, "the report read with the pull, waiting in the inbox"
        return go
