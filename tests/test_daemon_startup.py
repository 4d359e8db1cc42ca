"""What a restarted coordinator daemon does with the messages its broker kept while it was down.

The daemon's session is persistent: mosquitto hands over the QoS 1 messages it queued for it as
soon as it connects, while ``CoordinatorDaemon.start`` still waits for its SUBACK — before it
has started the core (``CoordinatorCore.start``: status, recall, timers, what the restore left to
record, the regate that resumes a recorded canary round). Over a real mosquitto on 127.0.0.1:
devices publish while the coordinator is stopped, the coordinator starts again on its state dir.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.broker import MosquittoProcess
from coordinator.daemon import CoordinatorDaemon, CoordinatorOptions
from edge_sdk.core.events import MessageReceived
from edge_sdk.modelio import save_model
from edge_sdk.mqtt import MqttTransport
from edge_sdk.signing import load_or_create_signer
from edge_sdk.tasks import get_task
from edge_sdk.tasks.base import Task
from edge_sdk.wire import topics
from edge_sdk.wire.codec import decode, encode
from edge_sdk.wire.messages import (
    Ack,
    Canary,
    CanaryReport,
    Control,
    Message,
    ModelMsg,
    Pull,
    Update,
)
from tests.helpers import wait_until

pytestmark = [pytest.mark.broker]
REGION = "boot"


class Device:
    """A device's own MQTT client (raw messages, no SDK): publishes on its topics, keeps what
    the coordinator sends to its ack and model topics. It stays connected across the
    coordinator's restart, as a device does."""

    def __init__(self, url: str, device: str) -> None:
        self.device = device
        self.received: list[Message] = []
        self._lock = threading.Lock()
        self.transport = MqttTransport(
            url, client_id=device, subscriptions=[topics.device_topic(REGION, device, leaf) for leaf in ("ack", "model", "invite")],
            on_message=self._on_message, clean_session=True)
        self.transport.start()

    def _on_message(self, topic: str, payload: bytes) -> None:
        with self._lock:
            self.received.append(decode(payload))

    def send(self, leaf: str, message: Message) -> None:
        self.transport.publish(topics.device_topic(REGION, self.device, leaf), encode(message), qos=1)  # type: ignore[arg-type]

    def acks(self) -> list[Ack]:
        with self._lock:
            return [m for m in self.received if isinstance(m, Ack)]

    def models(self) -> list[ModelMsg]:
        with self._lock:
            return [m for m in self.received if isinstance(m, ModelMsg)]

    def canaries(self) -> list[Canary]:
        with self._lock:
            return [m for m in self.received if isinstance(m, Canary)]


def record_order(daemon: CoordinatorDaemon) -> list[str]:
    """What the daemon's core is asked, in order: ``start`` and each message's topic leaf (the
    core's own methods, wrapped on this instance only: it still does all its work)."""
    order: list[str] = []
    core = daemon.core
    start, handle = core.start, core.handle

    def started(now: float) -> list[Any]:
        order.append("start")
        return start(now)

    def handled(event: Any) -> list[Any]:
        if isinstance(event, MessageReceived):
            order.append(event.topic.rsplit("/", 1)[-1])
        return handle(event)

    core.start = started  # type: ignore[method-assign]
    core.handle = handled  # type: ignore[method-assign]
    return order


def daemon_factory(mosquitto: MosquittoProcess, tmp_path: Path, task: Task, **options: Any) -> Callable[..., CoordinatorDaemon]:
    """A daemon on the test's state dir (not started); ``init`` the first time only."""
    def make(init: Path | None = None) -> CoordinatorDaemon:
        return CoordinatorDaemon(
            CoordinatorOptions(broker=mosquitto.url, region=REGION, state_dir=tmp_path / "coord", init=init, **options), task=task)
    return make


def weights(task: Task, seed: int) -> np.ndarray:
    return (task.pretrained(seed=0) + np.random.default_rng(seed).normal(scale=0.01, size=task.spec.size)).astype(np.float32)


def test_updates_sent_while_the_coordinator_is_down_are_applied_once_and_acked_after_it_started(
        mosquitto: MosquittoProcess, tmp_path: Path) -> None:
    """4 devices send 2 updates each (QoS 1) while the coordinator is stopped; once it is back,
    the core has started before it sees any of them, each is acknowledged ``accepted`` exactly
    once, none is refused, and all 8 are applied once, by one aggregation (k = 8)."""
    task = get_task("digits")
    save_model(tmp_path / "init.npz", task.spec, task.pretrained(seed=0), {"version": 0})
    make = daemon_factory(mosquitto, tmp_path, task, strategy_params={"k": 8, "timeout_s": None})
    daemon = make(init=tmp_path / "init.npz").start()
    devices = [Device(mosquitto.url, f"dev{i}") for i in range(4)]
    try:
        daemon.stop()
        for seq in (1, 2):
            for i, d in enumerate(devices):
                d.send("update", Update(device=d.device, seq=seq, model_id=task.spec.model_id, base_version=0, n_samples=20,
                                        weights=weights(task, 10 * i + seq), nonce=100 * i + seq))
        daemon = make()
        order = record_order(daemon)
        daemon.start()
        wait_until(lambda: daemon.core.version == 1, 30, "the 8 updates aggregated")
        wait_until(lambda: all(len(d.acks()) >= 2 for d in devices), 15, "every update acknowledged")
        status = daemon.core.status()
    finally:
        daemon.stop()
        for d in devices:
            d.transport.stop()
    assert order[0] == "start" and order.count("start") == 1 and order.count("update") == 8, order
    for d in devices:
        assert sorted((a.seq, a.status) for a in d.acks()) == [(1, "accepted"), (2, "accepted")], (d.device, d.acks())
    assert (status.updates_accepted, status.updates_rejected, status.updates_duplicate) == (8, 0, 0)
    assert status.extra["messages_rejected"] == 0 and status.extra["aggregations"] == 1 and status.buffered == 0
    assert daemon.core.applied_upto == {d.device: 2 for d in devices}


def test_a_canary_fetch_sent_while_the_coordinator_is_down_is_served_from_the_resumed_round(
        mosquitto: MosquittoProcess, tmp_path: Path) -> None:
    """A cohort member's canary fetch that the broker kept during the downtime reached the core
    before start() had resumed the recorded round: refused (``unknown_candidate``, answered
    ``Ack(rejected)``; the device tried again later). Now start() runs first: it is served."""
    task = get_task("digits")
    save_model(tmp_path / "init.npz", task.spec, task.pretrained(seed=0), {"version": 0})
    make = daemon_factory(mosquitto, tmp_path, task, canary=1.0, canary_min_reports=3, canary_deadline_s=300.0,
                          strategy_params={"k": 1, "timeout_s": None})
    daemon = make(init=tmp_path / "init.npz").start()
    devices = [Device(mosquitto.url, f"dev{i}") for i in range(3)]
    mallory = Device(mosquitto.url, "mallory")
    try:
        for d in devices:  # seen: a cohort is drawn among recent devices
            d.send("pull", Pull(device=d.device, seq=1, model_id=task.spec.model_id, serve=True))
        wait_until(lambda: all(d.models() for d in devices), 15, "the devices' first models")
        mallory.send("update", Update(device="mallory", seq=1, model_id=task.spec.model_id, base_version=0, n_samples=20,
                                      weights=weights(task, 1), nonce=1))
        wait_until(lambda: daemon.core.status().extra["gate"]["canary"]["round"] is not None, 15, "candidate 1's canary round")
        assert daemon.core.status().extra["gate"]["canary"]["round"]["cohort"] == 3
        daemon.stop()
        fetcher = devices[0]
        fetcher.send("pull", Pull(device=fetcher.device, seq=2, model_id=task.spec.model_id, have_version=0, serve=True, canary=1))
        daemon = make()
        order = record_order(daemon)
        daemon.start()
        wait_until(lambda: any(m.version == 1 for m in fetcher.models()) or bool(fetcher.acks()), 15, "an answer to the fetch")
        status = daemon.core.status()
    finally:
        daemon.stop()
        for d in (*devices, mallory):
            d.transport.stop()
    assert order[0] == "start" and order.count("pull") == 1, order
    assert fetcher.acks() == [], fetcher.acks()
    (reply,) = [m for m in fetcher.models() if m.version == 1]  # the candidate (the release is 0): the fetch's answer
    assert reply.release == 0
    canary = status.extra["gate"]["canary"]
    assert canary["resumed"] == 1 and canary["fetches"] == 1
    assert status.extra["messages_rejected"] == 0 and status.extra["rejected_by_reason"] == {}


def test_an_operator_command_sent_while_the_coordinator_is_down_runs_after_it_started(
        mosquitto: MosquittoProcess, tmp_path: Path) -> None:
    """An operator's ``pin`` (signed with the coordinator's own key, in its name) and a device's
    serving pull, both kept by the broker during the downtime: the core has started before it
    sees either; the pin runs (release 2, a copy of version 0, pinned) and the pull is served."""
    task = get_task("digits")
    save_model(tmp_path / "init.npz", task.spec, task.pretrained(seed=0), {"version": 0})
    make = daemon_factory(mosquitto, tmp_path, task, strategy_params={"k": 1, "timeout_s": None})
    daemon = make(init=tmp_path / "init.npz").start()
    device = Device(mosquitto.url, "dev0")
    operator = MqttTransport(mosquitto.url, client_id="operator", subscriptions=[], on_message=lambda *_: None, clean_session=True)
    operator.start()
    try:
        device.send("update", Update(device="dev0", seq=1, model_id=task.spec.model_id, base_version=0, n_samples=20,
                                     weights=weights(task, 1), nonce=1))
        wait_until(lambda: daemon.core.version == 1, 15, "version 1")
        daemon.stop()
        signer, created = load_or_create_signer(tmp_path / "coord" / "signing.key")
        assert not created
        topic = topics.control_topic(REGION)
        pin = Control(command="pin", operator=daemon.coordinator_id, issued_at=time.time(), nonce=7, version=0)
        operator.publish(topic, encode(pin, signer=signer, scope=topics.signing_scope(topic)))
        device.send("pull", Pull(device="dev0", seq=2, model_id=task.spec.model_id, serve=True))
        daemon = make()
        order = record_order(daemon)
        daemon.start()
        wait_until(lambda: daemon.core.status().extra["pinned"], 15, "the pin")
        wait_until(lambda: bool(device.models()), 15, "the serving pull's answer")
        status = daemon.core.status()
    finally:
        daemon.stop()
        device.transport.stop()
        operator.stop()
    assert order[0] == "start" and order.count("start") == 1 and sorted(order[1:3]) == ["control", "pull"], order
    assert status.extra["release"] == status.version == 2 and status.extra["recent_versions"][-1]["action"] == "pin"
    assert status.extra["control_refused"] is None and status.extra["messages_rejected"] == 0


def test_a_canary_reports_puback_leaves_only_after_the_round_is_recorded(mosquitto: MosquittoProcess, tmp_path: Path) -> None:
    """Persist-before-ack for canary reports (plain TCP, the transport's fast path): while the
    daemon writes canary.json with a report, the connection is cut (as by a crash of the
    process at that moment). The broker never got the report's PUBACK: it delivers the report
    again on the reconnect, where it is a duplicate of the recorded one (refused, counted). A
    PUBACK sent on delivery, before the record, would have left the report lost on a crash."""
    task = get_task("digits")
    save_model(tmp_path / "init.npz", task.spec, task.pretrained(seed=0), {"version": 0})
    make = daemon_factory(mosquitto, tmp_path, task, canary=1.0, canary_min_reports=3, canary_deadline_s=300.0,
                          strategy_params={"k": 1, "timeout_s": None})
    daemon = make(init=tmp_path / "init.npz").start()
    devices = [Device(mosquitto.url, f"dev{i}") for i in range(3)]
    mallory = Device(mosquitto.url, "mallory")
    writing, cut = threading.Event(), threading.Event()
    record = daemon.registry.record_canary_round

    def record_then_wait(round_: Mapping[str, Any]) -> None:
        record(round_)
        if round_["reports"]:  # (not the round's opening record)
            writing.set()
            assert cut.wait(10)

    try:
        for d in devices:
            d.send("pull", Pull(device=d.device, seq=1, model_id=task.spec.model_id, serve=True))
        wait_until(lambda: all(d.models() for d in devices), 15, "the devices' first models")
        mallory.send("update", Update(device="mallory", seq=1, model_id=task.spec.model_id, base_version=0, n_samples=20,
                                      weights=weights(task, 1), nonce=1))
        wait_until(lambda: all(d.canaries() for d in devices), 15, "the canary requests")
        ask = devices[0].canaries()[0]
        daemon.registry.record_canary_round = record_then_wait  # type: ignore[method-assign,assignment]
        devices[0].send("update", CanaryReport(device="dev0", candidate=ask.candidate, release=ask.release, both_right=10,
                                               only_candidate=0, only_release=0, both_wrong=0, nonce=ask.nonce))
        assert writing.wait(15), "the report's record"
        sock: Any = daemon.transport._client._sock  # the connection, as the process dying would leave it
        getattr(sock, "sock", sock).shutdown(socket.SHUT_RDWR)
        cut.set()
        wait_until(lambda: daemon.core.counters["canary_rejected"] >= 1, 30, "the broker's redelivery")
        counters = dict(daemon.core.counters)
    finally:
        cut.set()
        daemon.stop()
        for d in (*devices, mallory):
            d.transport.stop()
    assert counters["canary_reports"] == 1 and counters["canary_reject:canary_duplicate"] == 1, \
        {k: v for k, v in counters.items() if k.startswith("canary")}
