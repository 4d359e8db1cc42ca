"""``MqttTransport.redeliver()`` (manual_ack): the PUBACKs released before it reach the broker
before the connection closes, on every path (the fast path; paho's, plain and TLS), and the close
is our own: not taken for an outage or for another client with our id. Over a real mosquitto
(plain, and the production TLS config of ``tests/secure_broker.py``) that the tests pause
(SIGSTOP) so that what the transport writes backs up in its queue, as under a burst of models.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from coordinator.broker import MosquittoProcess
from edge_sdk import mqtt
from edge_sdk.mqtt import BrokerAuth, HeldAck, MqttTransport
from edge_sdk.runtime import Actor
from edge_sdk.wire import topics
from tests.helpers import wait_until
from tests.secure_broker import SECURE_REGION, SecureBroker

pytestmark = [pytest.mark.broker]

HELD = 8
"""Messages whose PUBACKs the holder releases right before its redeliver()."""
FILLER = 16
"""QoS 0 messages of 1 MiB the holder publishes first, to a paused broker: more than the socket
buffers take, so the released PUBACKs queue behind what is left of them."""


@dataclass
class Net:
    url: str
    region: str
    broker: MosquittoProcess
    holder_auth: BrokerAuth | None
    sender_auth: BrokerAuth | None
    watcher_auth: BrokerAuth | None = None
    """Who may read the region's status (TLS + ACL: an operator)."""


@pytest.fixture(params=["fast-path", "paho-path", "tls"])
def net(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Net]:
    if request.param == "paho-path":
        monkeypatch.setattr(mqtt, "PAHO_FAST_PATHS", False)
    if request.param != "tls":
        broker = MosquittoProcess().start()
        try:
            yield Net(broker.url, "flush", broker, None, None)
        finally:
            broker.stop()
        return
    secure = SecureBroker(tmp_path / "pki")
    try:
        yield Net(secure.url, SECURE_REGION, secure.broker, BrokerAuth.from_bundle(secure.bundle("coord-sec", "coordinator")),
                  BrokerAuth.from_bundle(secure.bundle("devA")), BrokerAuth.from_bundle(secure.bundle("ops", "operator")))
    finally:
        secure.stop()


class Holder:
    """An own-loop, manual-ack transport driven by an actor, as the coordinator daemon's: it
    holds the PUBACK of every message it receives (its region's device updates)."""

    def __init__(self, net: Net, will: tuple[str, bytes] | None = None) -> None:
        self.got: list[tuple[bytes, HeldAck | None]] = []
        self.lock = threading.Lock()
        self.connections = 0
        self.transport = MqttTransport(net.url, "coord-sec" if net.holder_auth else "holder",
                                       [topics.device_filter(net.region, "update")], on_message=self._on_message,
                                       own_loop=True, manual_ack=True, auth=net.holder_auth,
                                       on_connection=self._on_connection, will=will)
        self.actor = Actor("holder", lambda event: [], lambda action: None, io=self.transport)
        self.actor.start()
        self.transport.start()

    def _on_connection(self, up: bool) -> None:
        self.connections += up

    def _on_message(self, topic: str, payload: bytes) -> None:
        held = self.transport.hold_ack()
        with self.lock:
            self.got.append((payload, held))

    def payloads(self) -> list[bytes]:
        with self.lock:
            return [p for p, _ in self.got]

    def on_loop(self, fn: Any, timeout: float = 15.0) -> None:
        done = threading.Event()
        self.actor.call(lambda: (fn(), done.set()))
        assert done.wait(timeout)

    def stop(self) -> None:
        self.transport.stop()
        self.actor.stop()


def test_pubacks_released_before_a_redeliver_are_written_before_the_close(net: Net) -> None:
    """The holder has 8 messages in hand. With the broker paused it publishes 16 MiB (QoS 0),
    releases the 8 PUBACKs, and calls redeliver() on its loop's thread (as the daemon does after
    a batch whose storage failed, the PUBACKs of the batch before it still queued behind the
    models it served). The broker resumes 0.5 s later. The 8 were acknowledged: after the
    reconnect none of them comes back. Before, redeliver() closed the connection with what the
    socket had not taken yet (one flush without waiting on the fast path; paho's queue not at
    all): the 8 came back, duplicates."""
    sender = MqttTransport(net.url, "devA", [], on_message=lambda *_: None, clean_session=True, auth=net.sender_auth)
    sender.start()
    holder = Holder(net)
    proc = net.broker._proc
    assert proc is not None
    resume = threading.Timer(0.5, lambda: proc.send_signal(signal.SIGCONT))
    try:
        update = topics.device_topic(net.region, "devA", "update")
        sent = [b"held-%d" % i for i in range(HELD)]
        for payload in sent:
            sender.publish(update, payload, qos=1)
        wait_until(lambda: holder.payloads() == sent, 10, "the held messages")
        filler, chunk = topics.device_topic(net.region, "devA", "model"), bytes(1 << 20)
        held = [h for _, h in holder.got if h is not None]
        assert len(held) == HELD

        def burst_ack_redeliver() -> None:
            for _ in range(FILLER):
                holder.transport.publish(filler, chunk, qos=0)
            holder.transport.ack(held)
            holder.transport.redeliver()

        proc.send_signal(signal.SIGSTOP)
        resume.start()
        holder.on_loop(burst_ack_redeliver)
        resume.join()
        wait_until(lambda: holder.connections == 2, 15, "the reconnect")
        assert holder.transport.redeliveries == 1
        sender.publish(update, b"marker", qos=1)
        wait_until(lambda: b"marker" in holder.payloads(), 15, "the marker, after whatever the broker resent")
        again = [p for p in holder.payloads()[HELD:] if p != b"marker"]
    finally:
        resume.cancel()
        proc.send_signal(signal.SIGCONT)
        holder.stop()
        sender.stop()
    assert again == [], f"{len(again)} acknowledged messages delivered again: {again}"


@pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "paho-path"])
def test_redeliveries_in_a_row_are_not_taken_for_another_client_or_an_outage(
        mosquitto: MosquittoProcess, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, fast: bool) -> None:
    """Three redeliver() in a row, each within a second of the reconnect: each reconnect comes
    after RECONNECT_MIN_S, and no ERROR says another client takes our session. Before, they
    counted as the broker closing short-lived connections: the backoff doubled (1, 2, 4 s) and the
    third one logged that another client with our id was taking the session over."""
    if not fast:
        monkeypatch.setattr(mqtt, "PAHO_FAST_PATHS", False)
    net = Net(mosquitto.url, "again", mosquitto, None, None)
    holder = Holder(net)
    gaps: list[float] = []
    try:
        with caplog.at_level(logging.WARNING, logger="edgeci.mqtt"):
            for n in range(1, 4):
                t0 = time.monotonic()
                holder.on_loop(holder.transport.redeliver)
                wait_until(lambda n=n: holder.connections == n + 1, 15, "the reconnect")
                gaps.append(time.monotonic() - t0)
            redeliveries = holder.transport.redeliveries
    finally:
        holder.stop()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert redeliveries == 3 and errors == [], (redeliveries, errors)
    assert max(gaps) < mqtt.RECONNECT_MIN_S + 0.9, gaps


def test_a_redeliver_gets_the_held_messages_again_without_the_last_will(net: Net) -> None:
    """The holder (with a last will on its region's status topic, as the coordinator daemon has)
    holds 3 messages and calls redeliver(): the broker delivers the 3 again after the reconnect,
    and a watcher on the status topic sees no will. Before, redeliver() shut the socket down
    without an MQTT DISCONNECT: the broker published the will (``alive: false``), which devices
    fail over on and ``edgeci pin`` took for a stop, at every redelivery."""
    status = topics.status_topic(net.region)
    seen: list[bytes] = []
    watcher = MqttTransport(net.url, "ops" if net.watcher_auth else "watcher", [status],
                            on_message=lambda topic, payload: seen.append(payload), clean_session=True, auth=net.watcher_auth)
    watcher.start()
    sender = MqttTransport(net.url, "devA", [], on_message=lambda *_: None, clean_session=True, auth=net.sender_auth)
    sender.start()
    holder = Holder(net, will=(status, b"the holder's last will"))
    try:
        update = topics.device_topic(net.region, "devA", "update")
        sent = [b"held-%d" % i for i in range(3)]
        for payload in sent:
            sender.publish(update, payload, qos=1)
        wait_until(lambda: holder.payloads() == sent, 10, "the held messages")
        holder.on_loop(holder.transport.redeliver)
        wait_until(lambda: holder.connections == 2, 15, "the reconnect")
        wait_until(lambda: holder.payloads() == sent + sent, 15, "the held messages, delivered again")
        time.sleep(1.0)  # (a will is published at once when the broker sees the connection lost)
        holder.transport.publish(status, b"alive", qos=1)  # (the watcher would see the will: it sees this)
        wait_until(lambda: b"alive" in seen, 10, "the holder's status, on the watcher")
    finally:
        holder.stop()
        watcher.stop()
        sender.stop()
    assert holder.transport.redeliveries == 1
    assert b"the holder's last will" not in seen, seen
