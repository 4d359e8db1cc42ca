"""How long ``EdgeClient.stop()`` takes where it could wait (helper-151), on a real mosquitto."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from coordinator.broker import MosquittoProcess
from edge_sdk.client import EdgeClient


@pytest.mark.broker
def test_stop_with_the_broker_gone_does_not_wait_for_pahos_reconnect_sleep(tmp_path: Path) -> None:
    """The broker went away (refusing connections): paho's network thread sleeps between reconnects
    in slices of a second, and stop() joined it, so it took up to a second (1.0 s measured when called
    as the connection dropped). The wait now ends when stop() disconnects."""
    broker = MosquittoProcess().start()
    client = EdgeClient(broker=broker.url, device_id="stopper", region="st", task="digits", data_dir=tmp_path, refresh_s=None)
    lost = threading.Event()

    def on_connection(kind: str, info: dict[str, Any]) -> None:
        if not info["connected"]:
            lost.set()

    client.on("connection", on_connection)
    client.start()
    try:
        broker.stop()
        assert lost.wait(10)  # paho's thread is now in its first wait before a reconnect (1 s)
    finally:
        started = time.monotonic()
        client.stop()
        took = time.monotonic() - started
    assert took < 0.5, f"stop() took {took:.2f} s"


def _blackhole(port: int) -> list[socket.socket]:
    """Make ``port`` drop every SYN, as a broker behind a network that went away: a listener whose
    accept queue is full. Checked: a connect to it times out."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(0)
    held = [listener]
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        held.append(filler)
    with socket.socket() as probe, pytest.raises(TimeoutError):
        probe.settimeout(0.3)
        probe.connect(("127.0.0.1", port))
    return held


@pytest.mark.broker
def test_stop_while_reconnecting_to_an_unreachable_broker_aborts_the_connect(tmp_path: Path) -> None:
    """The broker's packets are dropped (a phone that lost its network): paho's thread sat in ``connect``
    for its 5 s connect timeout and stop() joined it (3.5 s measured). stop() now aborts the connect."""
    broker = MosquittoProcess().start()
    client = EdgeClient(broker=broker.url, device_id="stopper", region="st", task="digits", data_dir=tmp_path, refresh_s=None)
    lost = threading.Event()
    client.on("connection", lambda kind, info: None if info["connected"] else lost.set())
    client.start()
    held: list[socket.socket] = []
    try:
        broker.stop()
        held = _blackhole(broker.port)
        assert lost.wait(10)
        time.sleep(1.8)  # paho waits 1 s, then tries again: now inside connect (for up to 5 s)
    finally:
        started = time.monotonic()
        client.stop()
        took = time.monotonic() - started
        for s in held:
            s.close()
    assert took < 0.5, f"stop() took {took:.2f} s"


def test_a_callback_that_holds_the_client_thread_past_stops_wait_is_said(tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    """An app callback that blocks holds the client's thread: stop() waits 10 s for it (11.0 s measured)
    and then closes the store under it; before, it said nothing of why it took that long."""
    client = EdgeClient(broker="mqtt://127.0.0.1:1", device_id="stopper", region="st", task="digits", data_dir=tmp_path,
                        refresh_s=None)
    entered, release = threading.Event(), threading.Event()

    def blocking(kind: str, data: dict[str, Any]) -> None:
        entered.set()
        release.wait(10)

    client.on("canary", blocking)
    client.actor.start()  # (no broker: the thread alone)
    client.actor.call(lambda: client._emit("canary", {}))
    assert entered.wait(10)
    stop_actor = client.actor.stop
    client.actor.stop = lambda: stop_actor(timeout=0.2)  # type: ignore[method-assign]  # (its 10 s, shortened)
    try:
        with caplog.at_level("WARNING", logger="edgeci.device"):
            client.stop()
    finally:
        release.set()
    assert any("still busy after 10 s" in r.getMessage() and "callback" in r.getMessage() for r in caplog.records)
