"""The coordinator's MQTT fast path parses the broker's bytes itself (``_Corked.take``): the
same fuzz invariant as the wire codec. Any byte stream, cut anywhere, either parses or
raises :class:`MalformedPacketError` (which drops the connection) — nothing else, no hang —
and a stream of valid PUBLISH / PUBACK packets, cut anywhere, is delivered exactly, in order,
with each QoS 1 message's PUBACK queued after it."""

from __future__ import annotations

import itertools
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_sdk.mqtt import MalformedPacketError, _Corked, _publish_header

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@dataclass(frozen=True)
class Pub:
    topic: str
    payload: bytes
    mid: int  # 0: QoS 0

    def packet(self) -> bytes:
        return _publish_header(self.topic, len(self.payload), 1 if self.mid else 0, False, self.mid) + self.payload


@dataclass(frozen=True)
class PubAck:
    mid: int

    def packet(self) -> bytes:
        return bytes((0x40, 2, self.mid >> 8, self.mid & 0xFF))


topics = st.text(min_size=1, max_size=40).filter(lambda t: "+" not in t and "#" not in t and len(t.encode()) <= 65535)
publishes = st.builds(Pub, topic=topics, payload=st.binary(max_size=3000), mid=st.one_of(st.just(0), st.integers(1, 65535)))
pubacks = st.builds(PubAck, mid=st.integers(0, 65535))
streams = st.lists(st.one_of(publishes, pubacks), max_size=25)


class Reader:
    """A fast-path socket over a socketpair: the test writes the broker's side."""

    def __init__(self) -> None:
        self.ours, self.broker = socket.socketpair()
        self.ours.setblocking(False)
        self.corked = _Corked(self.ours)
        self.delivered: list[tuple[str, bytes]] = []
        self.acked: list[int] = []

    def deliver(self, topic: str, payload: bytes) -> None:
        self.delivered.append((topic, payload))

    def ack(self, mid: int) -> bool:
        self.acked.append(mid)
        return True

    def feed(self, data: bytes) -> bool:
        """Write ``data`` and take what is complete: True when paho must read next."""
        if data:
            self.broker.sendall(data)
        return self.corked.take(self.deliver, self.ack)

    def close(self) -> None:
        self.ours.close()
        self.broker.close()


@pytest.fixture
def reader() -> Iterator[Reader]:
    r = Reader()
    yield r
    r.close()


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@FUZZ
@given(packets=streams, cuts=st.lists(st.integers(0, 80_000), max_size=12))
def test_valid_packets_cut_anywhere_are_delivered_exactly_in_order(packets: list[Pub | PubAck], cuts: list[int]) -> None:
    r = Reader()
    try:
        stream = b"".join(p.packet() for p in packets)
        for piece in pieces(stream, cuts) or [b""]:
            assert r.feed(piece) is False  # nothing here is paho's, and nothing is lost
        assert r.corked.pending() <= 0  # every byte consumed
        assert r.delivered == [(p.topic, p.payload) for p in packets if isinstance(p, Pub)]
        assert r.acked == [p.mid for p in packets if isinstance(p, PubAck)]
        assert list(r.corked._out) == [PubAck(p.mid).packet() for p in packets if isinstance(p, Pub) and p.mid]
    finally:
        r.close()


@FUZZ
@given(prefix=streams, garbage=st.binary(min_size=1, max_size=4000), cuts=st.lists(st.integers(0, 90_000), max_size=12))
def test_any_bytes_parse_or_raise_malformed_and_what_came_before_is_delivered(
    prefix: list[Pub | PubAck], garbage: bytes, cuts: list[int]
) -> None:
    r = Reader()
    try:
        valid = b"".join(p.packet() for p in prefix)
        outcome = "starved"
        for piece in pieces(valid + garbage, cuts):
            try:
                if r.feed(piece):
                    outcome = "paho"  # a packet of another kind (or one paho may refuse): paho reads it
                    break
            except MalformedPacketError:
                outcome = "malformed"
                break
        assert outcome in ("starved", "paho", "malformed")
        # Every valid packet before the garbage went through, in order, before anything else.
        expected = [(p.topic, p.payload) for p in prefix if isinstance(p, Pub)]
        assert r.delivered[: len(expected)] == expected
        assert r.acked[: sum(isinstance(p, PubAck) for p in prefix)] == [p.mid for p in prefix if isinstance(p, PubAck)]
    finally:
        r.close()


@pytest.mark.parametrize(
    ("packet", "why"),
    [
        (b"\x36\x05\x00\x01a\x00\x01", "QoS 3"),
        (b"\x32\x03\x00\x01a", "shorter than its topic and packet id"),
        (b"\x32\x05\x00\x01a\x00\x00", "packet id 0"),
        (b"\x30\x03\x00\x01\xff", "not UTF-8"),
        (b"\x41\x02\x00\x01", "PUBACK"),
        (b"\x40\x03\x00\x01\x00", "PUBACK"),
        (b"\x00\x00", "reserved packet type 0"),
        (b"\xf0\x00", "reserved packet type 15"),
        (b"\x30\xff\xff\xff\xff\x01", "longer than 4 bytes"),
    ],
)
def test_each_malformed_packet_has_its_reason(reader: Reader, packet: bytes, why: str) -> None:
    with pytest.raises(MalformedPacketError, match=why):
        reader.feed(packet)
    assert reader.delivered == [] and reader.acked == []
