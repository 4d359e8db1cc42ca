"""``MqttTransport(manual_ack=True)``: a QoS 1 message's PUBACK leaves when its owner calls
``ack``, never when the connection ends first (the broker then delivers it again: persistent
session) and never after ``redeliver``; one that ``on_message`` does not take is acknowledged
at once. On both paths (the fast path, and paho's, which TLS and other paho releases use),
over a real mosquitto."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from coordinator.broker import MosquittoProcess
from edge_sdk import mqtt
from edge_sdk.mqtt import HeldAck, MqttTransport
from edge_sdk.runtime import Actor
from tests.helpers import wait_until

pytestmark = [pytest.mark.broker]


class Holder:
    """An own-loop transport driven by an actor, as the daemon's; ``on_message`` holds the
    PUBACK of every message but those on ``in/free``."""

    def __init__(self, url: str) -> None:
        self.got: list[tuple[str, HeldAck | None]] = []
        self.lock = threading.Lock()
        self.transport = MqttTransport(url, "holder", ["in/#"], on_message=self._on_message, own_loop=True, manual_ack=True)
        self.actor = Actor("holder", lambda event: [], lambda action: None, io=self.transport)
        self.actor.start()
        self.transport.start()

    def _on_message(self, topic: str, payload: bytes) -> None:
        held = None if topic == "in/free" else self.transport.hold_ack()
        with self.lock:
            self.got.append((topic, held))

    def topics(self) -> list[str]:
        with self.lock:
            return [t for t, _ in self.got]

    def held(self, topic: str) -> HeldAck:
        with self.lock:
            held = [h for t, h in self.got if t == topic][-1]
        assert held is not None
        return held

    def ack_on_loop(self, held: HeldAck) -> None:
        """As the daemon does: on the actor's thread (written before it next waits)."""
        done = threading.Event()
        self.actor.call(lambda: (self.transport.ack([held]), done.set()))
        assert done.wait(10)

    def stop(self) -> None:
        self.transport.stop()
        self.actor.stop()


@pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "paho-path"])
def test_only_acknowledged_messages_are_forgotten_by_the_broker(mosquitto: MosquittoProcess, monkeypatch: pytest.MonkeyPatch,
                                                                 fast: bool) -> None:
    if not fast:
        monkeypatch.setattr(mqtt, "PAHO_FAST_PATHS", False)
    sender = MqttTransport(mosquitto.url, "sender", [], on_message=lambda *_: None, clean_session=True)
    sender.start()
    holder = Holder(mosquitto.url)
    holders: list[Any] = [holder]
    try:
        assert holder.transport._fast is fast
        for topic in ("in/held", "in/free", "in/acked"):
            sender.publish(topic, b"x", qos=1)
        wait_until(lambda: len(holder.topics()) == 3, 10, "the three messages")
        assert holder.held("in/acked")[1:] != holder.held("in/held")[1:]
        holder.ack_on_loop(holder.held("in/acked"))
        holder.stop()  # in/held's PUBACK is still held: never sent

        holder = Holder(mosquitto.url)  # the same client id: the broker resumes the session
        holders.append(holder)
        wait_until(lambda: holder.topics() == ["in/held"], 10, "in/held delivered again (and nothing else)")
        holder.transport.redeliver()  # its PUBACK withheld on purpose: the broker sends it again
        wait_until(lambda: holder.topics() == ["in/held", "in/held"], 15, "in/held after redeliver()")
        assert holder.transport.redeliveries == 1
        holder.ack_on_loop(holder.held("in/held"))
        sender.publish("in/marker", b"x", qos=1)
        wait_until(lambda: holder.topics()[-1:] == ["in/marker"], 10, "the marker")
        holder.ack_on_loop(holder.held("in/marker"))
        holder.stop()

        holder = Holder(mosquitto.url)
        holders.append(holder)
        sender.publish("in/marker2", b"x", qos=1)
        wait_until(lambda: holder.topics() == ["in/marker2"], 10, "only the new message: every other one was acknowledged")
    finally:
        for h in holders:
            h.stop()
        sender.stop()
