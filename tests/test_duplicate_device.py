"""Two devices on one device id (a cloned SD card or VM image: the same id and a copy of one data
dir, so the same sequence numbers). Measured on main (tests/duplicate_measure.py, 60 s, real
mosquitto): the broker hands the id's session to whichever connected last, 42 swaps each, every
connection 0.5-1.0 s. Here: the transport's side, ``MqttTransport.yield_session``."""

from __future__ import annotations

import threading
import time

import pytest

from coordinator.broker import MosquittoProcess
from edge_sdk.mqtt import MqttTransport

# ------------------------------------------------------------------ the transport, real mosquitto


def _ignore(topic: str, payload: bytes) -> None:
    del topic, payload


class Watch:
    """A transport's connections: when each began and how long it lasted."""

    def __init__(self) -> None:
        self.lasted: list[float] = []
        self.up_at: float | None = None
        self.closing = False  # set before stop(): the connection it ends is not a takeover
        self.lock = threading.Lock()

    def __call__(self, up: bool) -> None:
        with self.lock:
            now = time.monotonic()
            if self.closing:
                return
            if up:
                self.up_at = now
            elif self.up_at is not None:
                self.lasted.append(now - self.up_at)
                self.up_at = None


def two_on_one_id(url: str, seconds: float, wait_s: float | None) -> list[list[float]]:
    """Two transports with one client id for ``seconds``; each yields the session for ``wait_s`` if given."""
    watches = [Watch(), Watch()]
    transports = [MqttTransport(url, client_id="dev-dup-twin", subscriptions=[], on_message=_ignore, on_connection=w) for w in watches]
    try:
        for t in transports:
            if wait_s is not None:
                t.yield_session(wait_s)
            t.start()
        time.sleep(seconds)
    finally:
        for w in watches:
            with w.lock:
                w.closing = True
        for t in transports:
            t.stop()
    # (the first one's first connection was ended by the other's start(), which came at once)
    return [watches[0].lasted[1:], watches[1].lasted]


@pytest.mark.broker
def test_a_transport_that_yields_leaves_the_session_to_the_other_client_for_a_stretch(mosquitto: MosquittoProcess) -> None:
    """Main: two clients with one id swap the session every second for ever (paho's back-off resets at
    every CONNACK). After ``yield_session(4)`` a takeover is followed by a wait of 2-4 s (jittered), so
    every connection lasts at least the other's wait, and the swaps are a few, not one a second."""
    plain = two_on_one_id(mosquitto.url, 4.0, None)
    taken = [s for lasted in plain for s in lasted]
    assert len(taken) >= 3 and max(taken) < 1.5, plain  # the premise: the ping-pong, about 1 s a turn
    yielded = two_on_one_id(mosquitto.url, 9.0, 4.0)
    taken = [s for lasted in yielded for s in lasted]
    assert taken and min(taken) >= 1.8 and len(taken) <= 4, yielded


def test_yield_session_refuses_a_wait_that_is_not_positive() -> None:
    t = MqttTransport("mqtt://127.0.0.1:1", client_id="x", subscriptions=[], on_message=_ignore)
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(Exception, match="wait_s"):
            t.yield_session(bad)
