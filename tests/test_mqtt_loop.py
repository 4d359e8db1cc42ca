"""The single-thread network loop (``MqttTransport(own_loop=True)`` driven by ``Actor(io=...)``):
messages are read, handled and answered on the actor's thread, other threads can still
submit and publish, the timer fires without traffic, a broker restart is survived
(reconnect with backoff, re-subscribe) and shutdown leaves no thread or socket behind."""

from __future__ import annotations

import contextlib
import logging
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
        self.client._reset_sockets()  # paho's wake-up socket pair, or the GC may find it unclosed


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


def test_survives_a_broker_restart(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="edgeci.mqtt")
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
        # an operator sees the outage at WARNING, not only the reconnect attempts at INFO
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("lost the connection to broker" in m for m in warned), warned
        assert any("reconnected to broker" in m for m in warned), warned
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


# ---------------------------------------------------------------- the fast path (own_loop, plain TCP, paho 2.2)


def _count_calls(monkeypatch: pytest.MonkeyPatch, cls: Any, name: str) -> list[Any]:
    """The instances whose ``name`` method was called, one entry per call."""
    calls: list[Any] = []
    original = getattr(cls, name)

    def counted(self: Any, *a: Any, **k: Any) -> Any:
        calls.append(self)
        return original(self, *a, **k)

    monkeypatch.setattr(cls, name, counted)
    return calls


def test_fast_path_reads_and_answers_in_order_without_paho_s_packet_code(
    mosquitto: MosquittoProcess, peer: Peer, monkeypatch: pytest.MonkeyPatch
) -> None:
    paho_reads = _count_calls(monkeypatch, paho.Client, "_handle_publish")
    paho_sends = _count_calls(monkeypatch, paho.Client, "publish")
    echo = Echo(mosquitto.url).start()
    try:
        assert echo.transport._fast
        big = bytes(range(256)) * 2000  # 512 KB: read in pieces, joined once
        sent = [(f"in/{i}", big if i % 50 == 7 else f"m{i:04d}".encode(), i % 3 == 0) for i in range(400)]
        for topic, payload, qos0 in sent:
            peer.client.publish(topic, payload, qos=0 if qos0 else 1)
        wait_until(lambda: len(peer.got) == len(sent), 30, f"every answer (got {len(peer.got)})")
        want = {qos0: [("out/" + t.split("/", 1)[1], p[::-1]) for t, p, q in sent if q == qos0] for qos0 in (False, True)}
        qos0_topics = {t for t, _ in want[True]}
        # intact, and in order per QoS (the peer's paho holds QoS 1 messages beyond its in-flight window, not QoS 0)
        assert [m for m in peer.got if m[0] not in qos0_topics] == want[False]
        assert [m for m in peer.got if m[0] in qos0_topics] == want[True]
        wait_until(lambda: not echo.transport._flight, 10, "the broker's PUBACK of every answer")
        ours = echo.transport._client
        assert ours not in paho_reads and ours not in paho_sends  # none of ours went through paho's per-packet code
        assert echo.transport.malformed_packets == 0 and not echo.actor.errors
        assert set(echo.read_on) == {"echo-actor"}
    finally:
        echo.stop()


def test_corked_take_parses_packets_split_anywhere() -> None:
    import select
    import socket

    a, b = socket.socketpair()
    a.setblocking(False)
    corked = _Corked(a)
    got: list[tuple[str, bytes]] = []
    acked: list[int] = []

    def deliver(topic: str, payload: bytes) -> None:
        got.append((topic, payload))

    def ack(mid: int) -> bool:
        acked.append(mid)
        return mid != 99  # 99: "paho's" (take stops before it)

    try:
        big = b"x" * 700_000  # remaining length in 3 bytes; read in pieces
        stream = (b"\x32\x0c\x00\x03a/b\x00\x05hello"  # QoS 1, mid 5
                  + b"\x30\x07\x00\x01cdata"  # QoS 0
                  + b"\x40\x02\x00\x07"  # PUBACK 7
                  + _publish_packet("d", big, None)  # QoS 0, remaining length in 3 bytes
                  + b"\x40\x02\x00\x63")  # PUBACK 99: not ours
        assert stream[28:31] == bytes((0xE3, 0xDC, 0x2A))  # 700,003 = 0x63 + (0x5C << 7) + (0x2A << 14)
        fed = 0
        more = False
        for cut in (1, 3, 8, 14, 20, 24, 26, 27, 28, 30, 29, 60_000, 400_000, len(stream) - 2, len(stream)):
            cut = max(cut, fed)
            writer = threading.Thread(target=b.sendall, args=(stream[fed:cut],))  # more than the socket buffer holds
            writer.start()
            while True:  # what the loop does on each wake-up: take until nothing complete is left
                select.select([a], [], [], 0.05)
                more = corked.take(deliver, ack)
                if more or (not writer.is_alive() and corked.pending() <= 0 and not select.select([a], [], [], 0)[0]):
                    break
            writer.join()
            fed = cut
            if cut < len(stream):
                assert not more and corked.pending() == 0  # starved: the loop waits in select
        assert got == [("a/b", b"hello"), ("c", b"data"), ("d", big)]
        assert acked == [7, 99] and corked.recv(4) == b"\x40\x02\x00\x63"  # paho reads the one it refused
        assert list(corked._out) == [b"\x40\x02\x00\x05"]  # the QoS 1 message's PUBACK, held for the batch's sendmsg
    finally:
        a.close()
        b.close()


class FakeBroker:
    """Just enough of an MQTT 3.1.1 broker to script byte streams: answers CONNECT and
    SUBSCRIBE, then hands each connection to the test."""

    def __init__(self, *, lose_before_suback: frozenset[int] = frozenset()) -> None:
        import queue
        import socket

        self.lose_before_suback = lose_before_suback
        """Connections (1 = the first) closed after their SUBSCRIBE, before the SUBACK."""
        self.accepted = 0
        self.conns: list[Any] = []  # every connection, closed with the broker
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(4)
        self.port = self.server.getsockname()[1]
        self.sessions: queue.Queue[Any] = queue.Queue()
        self.early: list[list[tuple[int, bytes]]] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.conns.append(conn)
            conn.settimeout(10)
            first, _ = read_packet(conn)
            assert first >> 4 == 1  # CONNECT
            conn.sendall(b"\x20\x02\x00\x00")
            early = []  # what the client sends before its SUBSCRIBE (messages it resends at once)
            while True:
                first, body = read_packet(conn)
                if first >> 4 == 8:  # SUBSCRIBE
                    break
                early.append((first, body))
            self.accepted += 1
            if self.accepted in self.lose_before_suback:
                conn.close()
                continue
            conn.sendall(b"\x90\x03" + body[:2] + b"\x01")
            self.early.append(early)
            self.sessions.put(conn)

    def close(self) -> None:
        import socket

        with contextlib.suppress(OSError):
            self.server.shutdown(socket.SHUT_RDWR)  # wakes the accept (close alone does not)
        self.server.close()
        self.thread.join(15)
        for conn in self.conns:  # a client may have reconnected after the test's last look
            conn.close()


def read_packet(conn: Any) -> tuple[int, bytes]:
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    first = exactly(1)[0]
    length, shift = 0, 0
    while True:
        byte = exactly(1)[0]
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    return first, exactly(length)


def _publish_packet(topic: str, payload: bytes, mid: int | None) -> bytes:
    from edge_sdk.mqtt import _publish_header

    return _publish_header(topic, len(payload), 1 if mid else 0, False, mid or 0) + payload


def test_fast_path_acks_after_delivery_and_survives_split_and_malformed_packets() -> None:
    broker = FakeBroker()
    seen_out: list[list[bytes]] = []
    echo = Echo(f"mqtt://127.0.0.1:{broker.port}")
    deliver = echo._on_message

    def on_message(topic: str, payload: bytes) -> None:
        seen_out.append([bytes(x) for x in echo.transport._client.socket()._out])  # what is held when it is delivered
        deliver(topic, payload)

    echo.transport._on_message = on_message
    try:
        echo.start()
        conn = broker.sessions.get(timeout=10)
        packet = _publish_packet("in/split", b"first", 0x0102)
        for i in range(len(packet)):  # one byte per segment (TCP_NODELAY on neither side needed: sendall per byte + pause)
            conn.sendall(packet[i:i + 1])
            threading.Event().wait(0.002)
        first, body = read_packet(conn)
        assert (first, body) == (0x40, b"\x01\x02")  # its PUBACK
        assert seen_out == [[]]  # not held before the message was delivered to the actor
        first, body = read_packet(conn)  # the answer (QoS 1): acknowledge it
        assert first & 0xF6 == 0x32 and body.endswith(b"tsrif")
        conn.sendall(b"\x40\x02" + body[2 + int.from_bytes(body[:2], "big"):][:2])
        wait_until(lambda: not echo.transport._flight, 10, "our answer acknowledged")

        # a malformed packet (QoS 3) after a good one: the good one is handled, the connection dropped
        conn.sendall(_publish_packet("in/ok", b"good", 0x0203) + b"\x36\x05\x00\x01zab")
        with pytest.raises(EOFError):
            while True:
                read_packet(conn)
        conn.close()
        assert echo.transport.malformed_packets == 1
        assert "QoS 3" in str(echo.transport.last_malformed)
        conn = broker.sessions.get(timeout=15)  # it reconnects (backoff) ...
        [(first, body)] = broker.early[-1]  # the answer to in/ok, unacknowledged (sent before the drop or not: DUP or not)
        assert first & 0xF7 == 0x32 and body.endswith(b"doog")
        conn.sendall(_publish_packet("in/again", b"after", 0x0304))  # ... and serves again
        wait_until(lambda: [t for t, *_ in echo.handled] == ["in/split", "in/ok", "in/again"], 10, "every good message")
        assert not echo.actor.errors
        conn.close()
    finally:
        echo.stop()
        broker.close()


@contextlib.contextmanager
def _quiet_session(name: str, broker: FakeBroker | None = None) -> Iterator[tuple[MqttTransport, FakeBroker]]:
    """An own-loop transport (and its actor) that ignores what it receives, started against
    ``broker`` (a new FakeBroker by default); all three stopped afterwards."""
    broker = broker or FakeBroker()
    t = MqttTransport(f"mqtt://127.0.0.1:{broker.port}", name, ["in/#"], on_message=lambda tp, p: None, own_loop=True)
    actor = Actor(f"{name}-actor", lambda e: [], lambda a: None, io=t)
    try:
        actor.start()
        t.start()
        yield t, broker
    finally:
        t.stop()
        actor.stop()
        broker.close()


def test_fast_path_resends_unacknowledged_messages_after_a_reconnect_in_order() -> None:
    with _quiet_session("resend") as (t, broker):
        conn = broker.sessions.get(timeout=10)
        t.publish("out/a", b"A", qos=1)  # from this (non-loop) thread: written at once
        first, body = read_packet(conn)
        assert first == 0x32 and body == b"\x00\x05out/a" + body[7:9] + b"A"
        mid_a = body[7:9]
        conn.close()  # gone without acknowledging A
        wait_until(lambda: not t.connected, 10, "the loss noticed")
        t.publish("out/b", b"B", qos=1)  # while disconnected: waits, in order behind A
        t.publish("out/zero", b"Z", qos=0)  # QoS 0 while disconnected: dropped, as paho does
        conn = broker.sessions.get(timeout=15)
        [(first, body), (first_b, body_b)] = broker.early[-1]  # at once, before the SUBSCRIBE
        assert first == 0x3A and body[7:9] == mid_a and body.endswith(b"A")  # A again, DUP set, same id
        first, body = first_b, body_b
        assert first == 0x32 and body.startswith(b"\x00\x05out/b") and body.endswith(b"B")
        mid_b = body[7:9]
        assert mid_b != mid_a
        conn.sendall(b"\x40\x02" + mid_a + b"\x40\x02" + mid_b)
        wait_until(lambda: not t._flight, 10, "both acknowledged")
        assert t.malformed_packets == 0
        conn.close()


def test_a_tls_transport_stays_on_paho_s_path(secure_broker: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import ssl

    from edge_sdk.mqtt import BrokerAuth
    from edge_sdk.wire import topics
    from tests.secure_broker import SECURE_REGION as R

    paho_reads = _count_calls(monkeypatch, paho.Client, "_handle_publish")
    got: list[bytes] = []
    pull, model = topics.device_topic(R, "devA", "pull"), topics.device_topic(R, "devA", "model")
    coord = MqttTransport(secure_broker.url, "coord-sec", [topics.device_filter(R, "pull")], on_message=lambda tp, p: None,
                          own_loop=True, auth=BrokerAuth.from_bundle(secure_broker.bundle("coord-sec", "coordinator")))

    def answer(topic: str, payload: bytes, now: float) -> list[Any]:
        return [Publish(topic=model, payload=payload[::-1], qos=1)]

    actor = Actor("tls-actor", lambda e: e, lambda a: coord.publish(a.topic, a.payload, qos=a.qos), io=coord)
    coord._on_message = lambda tp, p: actor.submit(partial(answer, tp, p))
    dev = MqttTransport(secure_broker.url, "devA", [model], on_message=lambda tp, p: got.append(p),
                        auth=BrokerAuth.from_bundle(secure_broker.bundle("devA")))
    try:
        actor.start()
        coord.start()
        dev.start()
        assert not coord._fast and isinstance(coord._client.socket(), ssl.SSLSocket)
        for i in range(20):
            dev.publish(pull, f"p{i:02d}".encode(), qos=1)
        wait_until(lambda: len(got) == 20, 20, "every answer over TLS")
        assert got == [f"p{i:02d}".encode()[::-1] for i in range(20)]
        assert paho_reads.count(coord._client) == 20 and paho_reads.count(dev._client) == 20  # both read through paho
        assert not actor.errors
    finally:
        dev.stop()
        coord.stop()
        actor.stop()


def test_fast_path_drops_the_oldest_waiting_message_when_packet_ids_run_short(monkeypatch: pytest.MonkeyPatch) -> None:
    """A broker that stops acknowledging (or a long outage while timers publish): the table of
    unacknowledged QoS 1 messages is bounded below MQTT's 65,535 packet ids. Without the bound
    the publisher spun for ever under the transport's lock looking for a free id."""
    import edge_sdk.mqtt as mqtt

    assert mqtt.FAST_MAX_INFLIGHT < mqtt.FAST_MAX_QUEUED < 65_535
    monkeypatch.setattr(mqtt, "FAST_MAX_QUEUED", 300)
    with _quiet_session("bounded") as (t, broker):
        broker.sessions.get(timeout=10)  # reads nothing, acknowledges nothing (closed with the broker)
        for i in range(400):
            t.publish("out/x", b"%d" % i, qos=1)
        assert t.dropped_messages == 100
        kept = sorted(int(entry[1]) for entry in t._flight.values())
        assert kept == list(range(256)) + list(range(356, 400))  # the sent ones stay; the oldest waiting ones went
        assert t._lock.acquire(timeout=5)  # nobody holds the transport
        t._lock.release()


def _tcp_pair() -> tuple[Any, Any]:
    import socket

    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    peer, _ = server.accept()
    server.close()
    client.setblocking(False)
    return client, peer


def test_the_last_bytes_of_a_half_read_packet_wake_the_loop_below_the_low_water_mark() -> None:
    import select
    import socket

    from edge_sdk.mqtt import RECV_LOW_WATER, _publish_header

    ours, broker = _tcp_pair()
    corked = _Corked(ours)
    got: list[bytes] = []
    try:
        corked.set_low_water(RECV_LOW_WATER)
        assert ours.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == RECV_LOW_WATER
        payload = b"m" * 40_000
        packet = _publish_header("in/x", len(payload), 1, False, 9) + payload
        broker.sendall(packet[:-3])
        while corked._have + len(corked._rbuf) - corked._rpos < len(packet) - 3:  # read all that was sent
            assert select.select([ours], [], [], 5)[0]
            assert corked.take(lambda tp, p: got.append(p), lambda mid: True) is False
        assert got == [] and ours.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1  # part of a packet held
        broker.sendall(packet[-3:])  # 3 bytes: under RECV_LOW_WATER, select would not have woken for them
        assert select.select([ours], [], [], 5)[0], "the loop would wait for its tick"
        corked.take(lambda tp, p: got.append(p), lambda mid: True)
        assert got == [payload]
        assert ours.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == RECV_LOW_WATER  # between packets again
    finally:
        ours.close()
        broker.close()


def test_a_lost_connection_closes_without_waiting_for_held_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A broker that stopped reading: closing the socket (paho, after a keepalive timeout)
    must not stall the actor up to 2 s on writes that cannot go out; our DISCONNECT, at stop,
    is still waited for."""
    import socket
    import threading

    import edge_sdk.mqtt as mqtt

    waits: list[float] = []
    real_wait = mqtt.wait_io

    def recording_wait(r: Any, w: Any, timeout: float | None) -> Any:
        if w:
            waits.append(timeout or 0.0)
        return real_wait(r, w, timeout)

    monkeypatch.setattr(mqtt, "wait_io", recording_wait)
    ours, broker = _tcp_pair()
    try:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32_768)
        corked = _Corked(ours)
        corked.send(b"\x30" + b"x" * 8_000_000)  # more than the kernel takes while nobody reads
        with pytest.raises(BlockingIOError):
            corked.flush()
        corked.close()
        assert waits == [] and not corked._out
    finally:
        ours.close()
        broker.close()

    ours, broker = _tcp_pair()
    corked = _Corked(ours)
    corked.send(b"\x30" + b"y" * 4_000_000)
    corked.send(b"\xe0\x00")  # DISCONNECT last: stop() waits for it to go out
    received = bytearray()

    def drain() -> None:
        while chunk := broker.recv(1 << 20):
            received.extend(chunk)

    with pytest.raises(BlockingIOError):
        corked.flush()
    reader = threading.Thread(target=drain)
    reader.start()
    corked.close()
    reader.join(10)
    broker.close()
    assert bytes(received[-2:]) == b"\xe0\x00" and len(received) == 4_000_003  # all of it, DISCONNECT last


def test_a_connection_lost_before_its_suback_leaves_no_pending_subscription() -> None:
    """Otherwise every later connection waits for that SUBACK for ever: the low-water mark is
    never set again (two wake-ups per pull) and one stale entry is kept per such loss."""
    import socket

    from edge_sdk.mqtt import RECV_LOW_WATER

    def low_water(t: MqttTransport) -> int:
        with t._lock:
            return int(t._client.socket().sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT))

    with _quiet_session("subs", FakeBroker(lose_before_suback=frozenset({2}))) as (t, broker):
        broker.sessions.get(timeout=10).close()  # the first connection: subscribed, then lost
        broker.sessions.get(timeout=30)  # the third (the second was lost before its SUBACK)
        assert broker.accepted == 3
        wait_until(lambda: t.connected and not t._pending_subs and low_water(t) == RECV_LOW_WATER, 10,
                   "subscribed, with the low-water mark")


def test_the_fast_path_is_off_when_paho_lacks_an_internal_it_uses(monkeypatch: pytest.MonkeyPatch) -> None:
    import edge_sdk.mqtt as mqtt

    if mqtt.PAHO_VERSION.split(".")[:2] == ["2", "2"]:
        assert mqtt._paho_has_internals() and mqtt.PAHO_FAST_PATHS  # the release the shortcuts were written for
    monkeypatch.setattr(mqtt, "_PAHO_INTERNALS", (*mqtt._PAHO_INTERNALS, "_renamed_in_a_patch_release"))
    assert not mqtt._paho_has_internals()


def test_a_publish_from_another_thread_that_the_kernel_cannot_take_wakes_the_loop() -> None:
    """What the kernel does not take at once is written by the loop when the socket is
    writable: the publishing thread wakes it (it may be waiting for reads only)."""
    with _quiet_session("wakes") as (t, broker):
        conn = broker.sessions.get(timeout=10)
        wakes: list[float] = []
        wake = t._wake
        t._wake = lambda: (wakes.append(1.0), wake())[1]  # type: ignore[method-assign]
        payload = b"w" * 32_000_000  # more than the kernel's buffers hold while the broker reads nothing
        t.publish("out/big", payload, qos=0)
        assert wakes, "the rest would wait for the loop's next tick"
        conn.settimeout(30)
        first, body = read_packet(conn)  # the loop writes the rest as the broker reads
        assert first == 0x30 and body == b"\x00\x07out/big" + payload


def test_stop_sends_the_messages_waiting_behind_the_unacknowledged_ones_first() -> None:
    """The daemon publishes its final ``alive: false`` status just before it stops; under a
    backlog that message waits behind FAST_MAX_INFLIGHT unacknowledged ones. stop() lets the
    PUBACKs that arrive meanwhile release it before the DISCONNECT (it used to disconnect at
    once, leaving the status unsent and the retained one saying alive)."""
    import edge_sdk.mqtt as mqtt

    n = mqtt.FAST_MAX_INFLIGHT + 4
    with _quiet_session("drain") as (t, broker):
        conn = broker.sessions.get(timeout=10)
        for i in range(n):
            t.publish("out/x", b"%d" % i, qos=1)
        mids = []
        for _ in range(mqtt.FAST_MAX_INFLIGHT):
            first, body = read_packet(conn)
            assert first >> 4 == 3
            mids.append(body[7:9])
        stopper = threading.Thread(target=t.stop)
        stopper.start()
        wait_until(lambda: t._stopping, 5, "stop() to begin")
        conn.sendall(b"".join(b"\x40\x02" + mid for mid in mids))  # the broker catches up
        rest = []
        while True:
            first, body = read_packet(conn)
            if first == 0xE0:  # DISCONNECT
                break
            rest.append(body[9:])
        stopper.join(10)
        assert rest == [b"%d" % i for i in range(mqtt.FAST_MAX_INFLIGHT, n)]  # all of them, in order, before the DISCONNECT


def test_the_loop_serves_sockets_numbered_above_select_s_limit(
        mosquitto: MosquittoProcess, peer: Peer, monkeypatch: pytest.MonkeyPatch) -> None:
    """select() refuses a descriptor >= 1024 (ValueError, which the loop caught, so it spun
    reading only at its keepalive ticks); a process with many open files hands out such
    descriptors. The ticks are pushed out of the test's reach, so only a working wait serves."""
    import os
    import resource
    import select

    import edge_sdk.mqtt as mqtt

    monkeypatch.setattr(mqtt, "MISC_EVERY_S", 3600.0)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        if hard != resource.RLIM_INFINITY and hard < 1200:
            pytest.skip(f"the open-files limit ({hard}) is below 1,200")
        resource.setrlimit(resource.RLIMIT_NOFILE, (1200, hard))
    fillers = []
    try:
        while not fillers or fillers[-1] < 1040:
            fillers.append(os.open(os.devnull, os.O_RDONLY))
        echo = Echo(mosquitto.url)  # the actor's wake-up pair and the broker socket: above 1040
        try:
            echo.start()
            sock = echo.transport._client.socket()
            assert sock.fileno() > 1024 and echo.actor._wake_r.fileno() > 1024
            with pytest.raises(ValueError):
                select.select([sock], [], [], 0)
            for i in range(20):
                peer.client.publish(f"in/{i}", b"m%d" % i, qos=1)
            wait_until(lambda: len(peer.got) == 20, 20, "every answer")
            assert sorted(p for _, p in peer.got) == sorted((b"m%d" % i)[::-1] for i in range(20))
            echo.actor.submit(lambda now: [Publish(topic="out/woken", payload=b"w", qos=1)])  # the wake-up socket works
            wait_until(lambda: ("out/woken", b"w") in peer.got, 10, "the submitted publish")
            assert not echo.actor.errors
        finally:
            echo.stop()
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize("high", [False, True], ids=["select", "poll above select's limit"])
def test_wait_io_reports_like_select(high: bool) -> None:
    """The loop's wait answers as select does, through select and through its poll fallback
    (descriptors >= 1024): data or a hang-up is readable, a socket with room is writable, a
    closed socket raises ValueError (the loop looks again)."""
    import os
    import resource
    import socket

    from edge_sdk.runtime import wait_io

    if high:  # raise the soft limit as far as the hard one allows (the usual soft limit is 1,024)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < 2100:
            if hard != resource.RLIM_INFINITY and hard < 2100:
                pytest.skip(f"the open-files limit ({hard}) is below 2,100")
            resource.setrlimit(resource.RLIMIT_NOFILE, (2100, hard))
    a, b = socket.socketpair()
    if high:
        moved = socket.socket(fileno=os.dup2(a.fileno(), 2000))
        a.close()
        a = moved
        assert a.fileno() == 2000
    try:
        assert wait_io([a], [], 0) == ([], [])
        assert wait_io([a], [a], 0) == ([], [a])
        b.send(b"x")
        assert wait_io([a], [], 1.0) == ([a], [])
        assert wait_io([a], [a], 1.0) == ([a], [a])
        b.close()
        a.recv(1)
        assert wait_io([a], [], 1.0) == ([a], [])  # EOF: the next recv sees it
    finally:
        a.close()
        b.close()
    with pytest.raises(ValueError):
        wait_io([a], [], 0)


@pytest.mark.parametrize("own_loop", [True, False], ids=["fast path", "paho's path"])
def test_a_message_on_a_topic_we_did_not_subscribe_to_is_dropped_counted_and_acknowledged(own_loop: bool) -> None:
    """amqtt 0.12 sends a connecting client the retained messages of other clients' filters: the
    transport drops what matches none of its subscriptions before the actor sees it, counts it
    apart from rejections (``unsubscribed_messages``), and still acknowledges it (QoS 1)."""
    broker = FakeBroker()
    got: list[tuple[str, bytes]] = []
    t = MqttTransport(f"mqtt://127.0.0.1:{broker.port}", "unsub", ["in/#", "edgeci/v1/eu/dev/+/pull"],
                      on_message=lambda tp, p: got.append((tp, p)), own_loop=own_loop)
    actor = Actor("unsub-actor", lambda e: [], lambda a: None, io=t) if own_loop else None
    try:
        if actor is not None:
            actor.start()
        t.start()
        conn = broker.sessions.get(timeout=10)
        stray = [("edgeci/v1/eu/status", 0x0101), ("edgeci/v1/eu/dev/d1/presence", 0x0102), ("input", 0x0103)]
        for topic, mid in [*stray, ("in/ok", 0x0104), ("edgeci/v1/eu/dev/d1/pull", 0x0105)]:
            conn.sendall(_publish_packet(topic, b"x", mid))
        acks = [read_packet(conn) for _ in range(5)]
        assert acks == [(0x40, bytes((1, mid))) for mid in range(1, 6)]  # every one acknowledged, in order
        wait_until(lambda: len(got) >= 2, 10, "the two subscribed messages")
        assert got == [("in/ok", b"x"), ("edgeci/v1/eu/dev/d1/pull", b"x")]
        assert t.unsubscribed_messages == 3 and t.malformed_packets == 0
        conn.close()
    finally:
        t.stop()
        if actor is not None:
            actor.stop()
        broker.close()


def test_subscription_matcher_agrees_with_paho() -> None:
    from edge_sdk.mqtt import subscription_matcher

    filters = ["#", "+", "a/#", "a/+", "a/+/c", "+/b", "/#", "$SYS/#", "+/#", "a", "a/b/c", "a.b/+", "a/+/+"]
    topics = ["a", "a/b", "a/b/c", "a/b/c/d", "/", "a/", "/a", "$SYS/x", "$SYS", "b", "a//c", "x/b", "a.b/c", "axb/c",
              "a\nb/b"]
    for f in filters:
        ours = subscription_matcher([f])
        assert [ours(x) for x in topics] == [paho.topic_matches_sub(f, x) for x in topics], f
    both = subscription_matcher(["a/+", "$SYS/#"])
    assert [both(x) for x in topics] == [paho.topic_matches_sub("a/+", x) or paho.topic_matches_sub("$SYS/#", x) for x in topics]
    assert not subscription_matcher([])("a")


def test_a_refused_tls_handshake_closes_its_socket() -> None:
    """paho left the TLS socket of a failed handshake to the garbage collector — on every refused
    reconnection (a revoked certificate, another CA's broker) — which warned ``unclosed
    <ssl.SSLSocket …>`` when it came; under pytest that failed a revocation test now and then."""
    import gc
    import socket
    import ssl
    import warnings

    from edge_sdk.mqtt import _Client

    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def refuse() -> None:  # accepts and closes: the client's handshake fails
        with contextlib.suppress(OSError):
            conn, _ = server.accept()
            conn.close()

    t = threading.Thread(target=refuse, daemon=True)
    t.start()
    client = _Client(CallbackAPIVersion.VERSION2, client_id="tls", protocol=paho.MQTTv311)
    client.tls_set_context(ssl.create_default_context())
    client._host = "127.0.0.1"
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always", ResourceWarning)
            with pytest.raises(OSError):  # (ssl.SSLError and the connection reset are both OSErrors)
                client._ssl_wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5))
            gc.collect()
        unclosed = [str(w.message) for w in seen if issubclass(w.category, ResourceWarning)]
        assert unclosed == []
    finally:
        t.join(5)
        server.close()
