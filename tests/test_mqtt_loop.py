"""The single-thread network loop (``MqttTransport(own_loop=True)`` driven by ``Actor(io=...)``):
messages are read, handled and answered on the actor's thread, other threads can still
submit and publish, the timer fires without traffic, a broker restart is survived
(reconnect with backoff, re-subscribe) and shutdown leaves no thread or socket behind."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from functools import partial
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from coordinator.broker import MosquittoProcess
from edge_sdk.core.events import MessageReceived, Publish, ScheduleTimer, TimerFired
from edge_sdk.mqtt import MqttTransport, _Corked
from edge_sdk.runtime import Actor
from tests.helpers import wait_until


class Echo:
    """An actor + own-loop transport that answers every message on ``in/#`` with the payload
    reversed on ``out/<rest>``, recording the thread each message was read and handled on."""

    def __init__(self, url: str, *, name: str = "echo-actor") -> None:
        self.handled: list[tuple[str, bytes, str]] = []
        self.read_on: list[str] = []
        self.timers = 0
        self.transport = MqttTransport(url, "echo-loop", ["in/#"], on_message=self._on_message, own_loop=True)
        self.actor = Actor(name, self._handle, self._perform, io=self.transport)

    def _on_message(self, topic: str, payload: bytes) -> None:
        self.read_on.append(threading.current_thread().name)
        self.actor.submit(partial(_received, topic, payload))

    def _handle(self, event: Any) -> list[Any]:
        if isinstance(event, TimerFired):
            self.timers += 1
            return []
        if isinstance(event, MessageReceived):
            self.handled.append((event.topic, event.payload, threading.current_thread().name))
            return [Publish(topic="out/" + event.topic.split("/", 1)[1], payload=event.payload[::-1], qos=1)]
        return list(event) if isinstance(event, list) else []

    def _perform(self, action: Any) -> None:
        self.transport.publish(action.topic, action.payload, qos=action.qos, retain=action.retain)

    def start(self) -> Echo:
        self.actor.start()
        self.transport.start()
        return self

    def stop(self) -> None:
        self.transport.stop()
        self.actor.stop()


def _received(topic: str, payload: bytes, now: float) -> MessageReceived:
    return MessageReceived(now=now, topic=topic, payload=payload)


class Peer:
    """A plain paho client (its own network thread) that records what arrives on ``out/#``."""

    def __init__(self, url_port: int) -> None:
        self.got: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="echo-peer")
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_: c.subscribe("out/#", qos=1)
        self.client.connect("127.0.0.1", url_port)
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self.lock:
            self.got.append((msg.topic, bytes(msg.payload)))

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def peer(mosquitto: MosquittoProcess) -> Iterator[Peer]:
    p = Peer(mosquitto.port)
    try:
        wait_until(lambda: p.client.is_connected(), 10, "the peer to connect")
        yield p
    finally:
        p.stop()


def test_one_thread_reads_handles_and_answers_in_order(mosquitto: MosquittoProcess, peer: Peer) -> None:
    echo = Echo(mosquitto.url).start()
    try:
        assert not any(t.name.startswith("paho-mqtt-client-echo-loop") for t in threading.enumerate())
        assert isinstance(echo.transport._client.socket(), _Corked)  # plain TCP: read ahead, writes held per batch
        n = 300
        for i in range(n):
            peer.client.publish(f"in/{i}", f"m{i:04d}".encode(), qos=1)
        wait_until(lambda: len(peer.got) == n, 30, "every answer")
        assert [t for t, _ in peer.got] == [f"out/{i}" for i in range(n)]  # one publisher, one subscriber: in order
        assert [p for _, p in peer.got] == [f"m{i:04d}".encode()[::-1] for i in range(n)]
        assert {name for *_, name in echo.handled} == {"echo-actor"}
        assert set(echo.read_on) == {"echo-actor"}  # paho's callbacks ran on the actor's thread
        assert echo.actor.batches < n  # messages read together are handled as one batch
        assert not echo.actor.errors
    finally:
        echo.stop()


def test_other_threads_submit_and_publish_and_the_timer_fires(mosquitto: MosquittoProcess, peer: Peer) -> None:
    echo = Echo(mosquitto.url).start()
    try:
        # a submission from another thread wakes the actor out of select
        echo.actor.submit(lambda now: [Publish(topic="out/from-thread", payload=b"x", qos=1)])
        wait_until(lambda: ("out/from-thread", b"x") in peer.got, 10, "the submitted publish")
        # a publish straight from a foreign thread (the daemon's final status does this)
        threading.Thread(target=lambda: echo.transport.publish("out/direct", b"y")).start()
        wait_until(lambda: ("out/direct", b"y") in peer.got, 10, "the foreign thread's publish")
        # the core's timer with no traffic at all
        echo.actor.call(lambda: echo.actor.run_actions([ScheduleTimer(at=echo.actor.clock.now() + 0.05)]))
        wait_until(lambda: echo.timers >= 1, 10, "the timer")
        assert not echo.actor.errors
    finally:
        echo.stop()


def test_survives_a_broker_restart() -> None:
    broker = MosquittoProcess().start()
    port = broker.port
    echo = Echo(broker.url).start()
    peer: Peer | None = None
    try:
        broker.stop()
        wait_until(lambda: not echo.transport.connected, 20, "the loss to be noticed")
        broker = MosquittoProcess(port=port).start()
        wait_until(lambda: echo.transport.connected, 30, "the reconnection")
        peer = Peer(port)
        wait_until(lambda: peer is not None and peer.client.is_connected(), 10, "the peer to connect")
        wait_until(lambda: echo.transport.refused_subscriptions == set() and echo.transport.connected, 5, "resubscription")
        peer.client.publish("in/after", b"again", qos=1)
        wait_until(lambda: peer is not None and ("out/after", b"niaga") in peer.got, 20, "an answer after the restart")
        assert not echo.actor.errors
    finally:
        if peer is not None:
            peer.stop()
        echo.stop()
        broker.stop()


def test_stop_leaves_no_thread_or_socket(mosquitto: MosquittoProcess, peer: Peer) -> None:
    before = set(threading.enumerate())
    echo = Echo(mosquitto.url, name="echo-stopping").start()
    echo.transport.publish("out/last", b"bye")  # from this thread, just before stopping (the daemon's last status)
    echo.stop()
    wait_until(lambda: ("out/last", b"bye") in peer.got, 10, "the last publish before stop")
    assert not echo.actor.alive
    assert not echo.transport.connected
    assert echo.transport._client.socket() is None
    assert echo.actor._wake_r is None and echo.actor._wake_w is None  # closed with the thread
    assert set(threading.enumerate()) <= before
    echo.actor.wake()  # harmless after the end
    echo.actor.submit(lambda now: [])  # nothing runs it, nothing breaks


def test_an_unstarted_own_loop_actor_holds_no_socket() -> None:
    transport = MqttTransport("mqtt://127.0.0.1:1", "nobody", [], on_message=lambda t, p: None, own_loop=True)
    actor = Actor("idle", lambda e: [], lambda a: None, io=transport)
    assert actor._wake_r is None
    actor.stop()
    transport.stop()  # never connected: nothing to do


def test_a_threaded_transport_cannot_be_an_actors_io() -> None:
    transport = MqttTransport("mqtt://127.0.0.1:1", "threaded", [], on_message=lambda t, p: None)
    with pytest.raises(ValueError, match="own network thread"):
        Actor("x", lambda e: [], lambda a: None, io=transport)


def test_the_puback_shortcut_does_paho_s_bookkeeping() -> None:
    import struct

    from paho.mqtt.exception import MalformedPacket

    from edge_sdk.mqtt import _Client

    client = _Client(CallbackAPIVersion.VERSION2, client_id="puback", protocol=paho.MQTTv311)
    info = client.publish("t", b"x", qos=1)  # not connected: queued, waiting for its PUBACK
    assert info.mid in client._out_messages and not info._published
    client._in_packet["packet"] = bytearray(struct.pack("!H", info.mid))
    assert client._handle_pubackcomp("PUBACK") == paho.MQTT_ERR_SUCCESS
    assert info.mid not in client._out_messages and info._published
    assert client._handle_pubackcomp("PUBACK") == paho.MQTT_ERR_SUCCESS  # a duplicate: nothing to do
    client._in_packet["packet"] = bytearray(b"\x00\x01\x00")
    with pytest.raises(MalformedPacket):
        client._handle_pubackcomp("PUBACK")


def test_corked_socket_reads_ahead_and_writes_everything_in_order() -> None:
    import select
    import socket

    a, b = socket.socketpair()
    a.setblocking(False)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # the kernel takes little at a time
    corked = _Corked(a)
    try:
        chunks = [bytes([i % 251]) * (1000 + 37 * i) for i in range(300)]
        for c in chunks:
            assert corked.send(c) == len(c)
        assert corked.unflushed
        want = b"".join(chunks)
        got = bytearray()

        def read() -> None:
            while len(got) < len(want):
                got.extend(b.recv(1 << 16))

        reader = threading.Thread(target=read)
        reader.start()
        while corked.unflushed:
            try:
                corked.flush()
            except BlockingIOError:
                select.select([], [a], [], 1.0)
        reader.join(10)
        assert bytes(got) == want

        b.sendall(b"\x40\x02\x00\x07\x30\x03\x00\x01x")  # a PUBACK and a small PUBLISH in one segment
        select.select([a], [], [], 5.0)
        assert corked.recv(1) == b"\x40" and corked.pending() == 8
        assert corked.recv(1) == b"\x02" and corked.recv(2) == b"\x00\x07"
        assert corked.recv(100) == b"\x30\x03\x00\x01x"  # a short read: what was read ahead
        assert corked.pending() == 0
        with pytest.raises(BlockingIOError):
            corked.recv(1)
        corked.send(b"held")
        corked.close()  # writes what it holds, then closes
        assert b.recv(16) == b"held" and b.recv(16) == b""
    finally:
        b.close()
        a.close()


def test_corked_socket_drops_held_writes_when_the_connection_is_gone() -> None:
    import socket

    a, b = socket.socketpair()
    a.setblocking(False)
    corked = _Corked(a)
    b.close()
    corked.send(b"x" * 100)
    corked.flush()  # EPIPE: dropped (QoS 1 stays in flight in paho and is resent after reconnecting)
    assert not corked.unflushed
    assert corked.recv(1) == b""  # shut down: paho's next read sees the loss
    corked.close()


def test_another_paho_release_runs_paho_s_own_socket_and_puback_code(
    mosquitto: MosquittoProcess, peer: Peer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The shortcuts lean on paho 2.2's internals; any other release must still serve, through paho's own code.
    import edge_sdk.mqtt

    monkeypatch.setattr(edge_sdk.mqtt, "PAHO_FAST_PATHS", False)
    calls: list[tuple[object, str]] = []
    original = paho.Client._handle_pubackcomp
    def counted(self: paho.Client, cmd: str) -> Any:
        calls.append((self, cmd))
        return original(self, cmd)

    monkeypatch.setattr(paho.Client, "_handle_pubackcomp", counted)
    echo = Echo(mosquitto.url).start()
    try:
        assert not isinstance(echo.transport._client.socket(), _Corked)
        for i in range(50):
            peer.client.publish(f"in/{i}", f"m{i:04d}".encode(), qos=1)
        wait_until(lambda: len(peer.got) == 50, 30, "every answer")
        assert [p for _, p in peer.got] == [f"m{i:04d}".encode()[::-1] for i in range(50)]
        ours = (echo.transport._client, "PUBACK")  # (the peer's own PUBACKs go through paho too)
        wait_until(lambda: calls.count(ours) == 50, 10, f"paho's own handling of the 50 answers' PUBACKs (saw {calls.count(ours)})")
        assert not echo.actor.errors
    finally:
        echo.stop()


def test_an_actor_that_survives_a_repeating_fault_keeps_a_bounded_record() -> None:
    from edge_sdk.runtime import MAX_KEPT_ERRORS

    def broken(event: Any) -> list[Any]:
        raise RuntimeError("handler fault")

    actor = Actor("faulty", broken, lambda action: None)
    actor.start()
    try:
        for _ in range(MAX_KEPT_ERRORS + 50):
            actor.submit(lambda now: now)
        wait_until(lambda: actor.error_count == MAX_KEPT_ERRORS + 50, 10, "every fault counted")
        assert len(actor.errors) == MAX_KEPT_ERRORS
        assert all(isinstance(e, RuntimeError) for e in actor.errors)
    finally:
        actor.stop()
