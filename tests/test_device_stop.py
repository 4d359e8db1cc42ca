"""How long ``EdgeClient.stop()`` takes where it could wait (helper-151), on a real mosquitto."""

from __future__ import annotations

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
