"""When the coordinator daemon acknowledges (PUBACK) a QoS 1 message to its broker: only once
it has handled the message and what the message's batch changed is durable, on every path
(plain TCP, the transport's fast path; TLS, paho's path), and never for a message whose
handling was dropped (a storage failure, a stop without drain): the broker delivers those
again (the daemon's session is persistent). A canary report matters most: a device sends it
once and gets no application-level Ack. Over a real mosquitto on 127.0.0.1 (plain, and the
production TLS config of ``tests/secure_broker.py``).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

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

pytestmark = [pytest.mark.broker]


@dataclass
class Net:
    """A broker, plain or TLS, and what a daemon and a device need to use it."""

    url: str
    region: str
    options: dict[str, Any]
    bundle: Callable[[str], Path | None]


@pytest.fixture(params=["plain", "tls"])
def net(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Net]:
    if request.param == "plain":
        broker = MosquittoProcess().start()
        try:
            yield Net(broker.url, "acks", {}, lambda name: None)
        finally:
            broker.stop()
        return
    secure = SecureBroker(tmp_path / "pki")
    try:
        yield Net(secure.url, SECURE_REGION, {"coordinator_id": "coord-sec", "bundle": secure.bundle("coord-sec", "coordinator")},
                  secure.bundle)
    finally:
        secure.stop()


class Device:
    """A device's own MQTT client (raw messages, no SDK): publishes on its topics, keeps what
    the coordinator sends to its ack, model and invite topics."""

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


def make_daemon(net: Net, tmp_path: Path, task: Task, *, init: bool = False, **options: Any) -> CoordinatorDaemon:
    """A daemon on the test's state dir (not started): canary rounds of 3 reports, k = 1."""
    if init:
        save_model(tmp_path / "init.npz", task.spec, task.pretrained(seed=0), {"version": 0})
    return CoordinatorDaemon(CoordinatorOptions(
        broker=net.url, region=net.region, state_dir=tmp_path / "coord", init=tmp_path / "init.npz" if init else None,
        canary=1.0, canary_min_reports=3, canary_deadline_s=300.0, strategy_params={"k": 1, "timeout_s": None},
        **net.options, **options), task=task)


def open_canary_round(net: Net, daemon: CoordinatorDaemon, task: Task) -> tuple[list[Device], Canary]:
    """Three devices pull (the cohort), a fourth's update makes version 1, the candidate: the
    three are asked to score it. The devices (all four) and dev0's request."""
    devices = [Device(net, f"dev{i}") for i in range(3)]
    mallory = Device(net, "mallory")
    for d in devices:
        d.send("pull", Pull(device=d.device, seq=1, model_id=task.spec.model_id, serve=True))
    wait_until(lambda: all(d.of(ModelMsg) for d in devices), 15, "the devices' first models")
    weights = (task.pretrained(seed=0) + np.random.default_rng(1).normal(scale=0.01, size=task.spec.size)).astype(np.float32)
    mallory.send("update", Update(device="mallory", seq=1, model_id=task.spec.model_id, base_version=0, n_samples=20,
                                  weights=weights, nonce=1))
    wait_until(lambda: all(d.of(Canary) for d in devices), 15, "the canary requests")
    return [*devices, mallory], devices[0].of(Canary)[0]


def report(ask: Canary) -> CanaryReport:
    return CanaryReport(device="dev0", candidate=ask.candidate, release=ask.release, both_right=10, only_candidate=0,
                        only_release=0, both_wrong=0, nonce=ask.nonce)


def recorded_reports(tmp_path: Path) -> dict[str, Any]:
    return dict(json.loads((tmp_path / "coord" / "canary.json").read_text())["reports"])


def canary_counters(daemon: CoordinatorDaemon) -> dict[str, int]:
    return {k: v for k, v in daemon.core.counters.items() if k.startswith("canary") and v}


def test_a_report_whose_connection_dies_while_it_is_recorded_is_delivered_again(net: Net, tmp_path: Path) -> None:
    """While the daemon writes canary.json with dev0's report, its connection is cut (as a
    crash of the process at that moment leaves it). The broker has no PUBACK for the report
    yet: it delivers it again on the reconnect, where it is a duplicate of the recorded one
    (refused, counted): applied once. Over TLS paho acknowledged on receipt, before the record."""
    task = get_task("digits")
    daemon = make_daemon(net, tmp_path, task, init=True).start()
    writing, cut = threading.Event(), threading.Event()
    devices: list[Device] = []
    record = daemon.registry.record_canary_round

    def record_then_wait(round_: Mapping[str, Any]) -> None:
        record(round_)
        if round_["reports"]:  # (not the round's opening record)
            writing.set()
            assert cut.wait(10)

    try:
        devices, ask = open_canary_round(net, daemon, task)
        daemon.registry.record_canary_round = record_then_wait  # type: ignore[method-assign,assignment]
        devices[0].send("update", report(ask))
        assert writing.wait(15), "the report's record"
        sock: Any = daemon.transport._client._sock  # the connection, as the process dying would leave it
        getattr(sock, "sock", sock).shutdown(socket.SHUT_RDWR)  # (an SSLSocket is the socket itself)
        cut.set()
        wait_until(lambda: daemon.core.counters["canary_rejected"] >= 1, 20, "the broker's redelivery")
        counters = canary_counters(daemon)
    finally:
        cut.set()
        daemon.stop()
        for d in devices:
            d.transport.stop()
    assert counters["canary_reports"] == 1 and counters["canary_reject:canary_duplicate"] == 1, counters
    assert recorded_reports(tmp_path) == {"dev0": [10, 0, 0, 0]}


def test_a_report_dropped_by_a_storage_failure_is_delivered_again_after_recovery(net: Net, tmp_path: Path) -> None:
    """Recording dev0's report fails (ENOSPC): the daemon drops the batch and rebuilds its core,
    which refuses canary reports while storage fails (the recorded round is resumed only once
    it works). The report's PUBACK is withheld throughout: the broker delivers it again, and
    once storage works again (the probe) the recovered core records it, once."""
    task = get_task("digits")
    daemon = make_daemon(net, tmp_path, task, init=True, storage_probe_s=0.5).start()
    devices: list[Device] = []
    record = daemon.registry.record_canary_round
    failed: list[Mapping[str, Any]] = []

    def record_or_fail(round_: Mapping[str, Any]) -> None:
        if round_["reports"] and not failed:
            failed.append(round_)
            raise OSError(28, "No space left on device (test)")
        record(round_)

    try:
        devices, ask = open_canary_round(net, daemon, task)
        daemon.registry.record_canary_round = record_or_fail  # type: ignore[method-assign,assignment]
        devices[0].send("update", report(ask))
        wait_until(lambda: bool(failed), 15, "the failed record")
        wait_until(lambda: recorded_reports(tmp_path) != {}, 30, "the report recorded after the recovery")
        time.sleep(1.0)  # (a second delivery would be refused as a duplicate by now)
        counters = canary_counters(daemon)
        storage_failures, redeliveries = daemon.storage_failures, daemon.transport.redeliveries
    finally:
        daemon.stop()
        for d in devices:
            d.transport.stop()
    assert storage_failures == 1 and redeliveries >= 1
    assert counters.get("canary_reports") == 1, counters
    assert recorded_reports(tmp_path) == {"dev0": [10, 0, 0, 0]}


def test_a_stop_without_drain_acknowledges_no_message_it_did_not_handle(tmp_path: Path) -> None:
    """SIGTERM (``stop(drain=False)``) while the actor handles a pull and dev0's report waits in
    its inbox, read from the same segment: the report is abandoned, so its PUBACK must not go
    out with the final status and the DISCONNECT. The next daemon on the state dir gets it from
    the broker and records it. (Plain TCP: over TLS paho reads one record per wake-up, so the
    report would still be unread in the socket.)"""
    task = get_task("digits")
    broker = MosquittoProcess().start()
    net = Net(broker.url, "acks", {}, lambda name: None)
    daemon = make_daemon(net, tmp_path, task, init=True, max_batch=1)
    devices: list[Device] = []
    paused, resume, inside, go = threading.Event(), threading.Event(), threading.Event(), threading.Event()
    try:
        daemon.start()
        devices, ask = open_canary_round(net, daemon, task)
        handle = daemon.core.handle

        def slow_pull(event: Any) -> list[Any]:
            if isinstance(event, MessageReceived) and event.topic.endswith("/pull") and not inside.is_set():
                inside.set()
                assert go.wait(15)
            return handle(event)

        daemon.core.handle = slow_pull  # type: ignore[method-assign]
        daemon.actor.call(lambda: (paused.set(), resume.wait(15)))  # the actor reads nothing meanwhile
        assert paused.wait(10)
        devices[0].send("pull", Pull(device="dev0", seq=2, model_id=task.spec.model_id, serve=True))
        devices[0].send("update", report(ask))
        time.sleep(0.5)  # both in the daemon's socket
        resume.set()
        assert inside.wait(10), "the pull in hand"
        assert daemon.actor.backlog >= 1, "the report read with the pull, waiting in the inbox"
        stopping = threading.Thread(target=daemon.stop, kwargs={"drain": False})
        stopping.start()
        wait_until(lambda: not daemon.transport.connected, 15, "the disconnect")
        go.set()
        stopping.join(15)
        assert recorded_reports(tmp_path) == {}, "the report was abandoned, not handled"
        daemon = make_daemon(net, tmp_path, task).start()
        wait_until(lambda: recorded_reports(tmp_path) != {}, 15, "the report, delivered to the next daemon")
        counters = canary_counters(daemon)
    finally:
        go.set()
        resume.set()
        daemon.stop()
        for d in devices:
            d.transport.stop()
        broker.stop()
    assert counters.get("canary_reports") == 1, counters
    assert recorded_reports(tmp_path) == {"dev0": [10, 0, 0, 0]}
