"""Slow, stalling and cut links (``tests/slow_link.py``: a shaping TCP proxy between a client
and a real mosquitto), on the real transport, devices and coordinator daemon. Models are small and
links and timeouts scaled down alike (a 120 KB message at 20 kB/s takes 6 s, three 2 s keepalives; a
12 MB update at 1 Mbit/s takes 96 s, three of EdgeClient's 30 s keepalives), so each test takes seconds; ``tests/slow_link_measure.py`` runs the same
rig at real sizes (the numbers are in the audit report)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.broker import MosquittoProcess
from coordinator.daemon import CoordinatorDaemon, CoordinatorOptions
from edge_sdk import mqtt
from edge_sdk.client import EdgeClient
from edge_sdk.mqtt import MqttTransport
from edge_sdk.tasks.base import TrainConfig
from tests.helpers import wait_until
from tests.slow_link import SlowLink
from tests.slow_link_measure import PaddedTask

pytestmark = [pytest.mark.broker]


class Inbox:
    """A client straight on the broker (no shaping) that keeps what arrives on ``topic``."""

    def __init__(self, url: str, topic: str, client_id: str) -> None:
        self.got: list[bytes] = []
        self._lock = threading.Lock()
        self.transport = MqttTransport(url, client_id=client_id, subscriptions=[topic], on_message=self._on, clean_session=True)
        self.transport.start()

    def _on(self, topic: str, payload: bytes) -> None:
        with self._lock:
            self.got.append(payload)

    def count(self) -> int:
        with self._lock:
            return len(self.got)


@pytest.fixture
def link(mosquitto: MosquittoProcess) -> Iterator[SlowLink]:
    with SlowLink(mosquitto.port, up_bps=20_000, down_bps=20_000, delay_s=0.05) as shaped:
        yield shaped


def shaped_transport(link: SlowLink, client_id: str, subscriptions: list[str], got: list[bytes], drops: list[float],
                     keepalive: int = 2) -> MqttTransport:
    t = MqttTransport(link.url, client_id=client_id, subscriptions=subscriptions, on_message=lambda _t, p: got.append(p),
                      keepalive=keepalive, on_connection=lambda up: None if up else drops.append(time.monotonic()))
    t.start(timeout=10)
    return t


def test_an_upload_slower_than_two_keepalives_arrives_once_on_one_connection(mosquitto: MosquittoProcess, link: SlowLink) -> None:
    """paho queued its PINGREQ behind the 120 KB PUBLISH it was writing (6 s at 20 kB/s) and, with
    no PINGRESP after a keepalive (2 s), dropped the connection and wrote the message again from its
    first byte after the reconnect, for ever: nothing arrived. Now a moving packet keeps the link alive."""
    inbox = Inbox(mosquitto.url, "edgeci/v1/slow/dev/d1/update", "inbox-up")
    drops: list[float] = []
    sender = shaped_transport(link, "dev-up", [], [], drops)
    try:
        payload = np.random.default_rng(1).bytes(120_000)
        sender.publish("edgeci/v1/slow/dev/d1/update", payload)
        wait_until(lambda: inbox.count() >= 1, 25, "the upload at the broker")
        assert inbox.got == [payload]
        assert drops == [] and link.connections == 1, f"dropped {len(drops)} times, {link.connections} connections"
        assert sender._client.keepalive_extended >= 1  # the case it covers did happen
    finally:
        sender.stop()
        inbox.transport.stop()


def test_a_download_slower_than_two_keepalives_arrives_on_one_connection(mosquitto: MosquittoProcess, link: SlowLink) -> None:
    """The same on the way down: the broker's PINGRESP waits behind the model it is sending."""
    got: list[bytes] = []
    drops: list[float] = []
    receiver = shaped_transport(link, "dev-down", ["edgeci/v1/slow/dev/d2/model"], got, drops)
    sender = MqttTransport(mosquitto.url, client_id="coord-down", subscriptions=[], on_message=lambda _t, _p: None)
    sender.start()
    try:
        payload = np.random.default_rng(2).bytes(120_000)
        sender.publish("edgeci/v1/slow/dev/d2/model", payload)
        wait_until(lambda: len(got) >= 1, 25, "the download at the device")
        assert got == [payload]
        assert drops == [] and link.connections == 1, f"dropped {len(drops)} times, {link.connections} connections"
    finally:
        receiver.stop()
        sender.stop()


@pytest.mark.parametrize("skip", [True, False])
def test_a_copy_of_a_message_still_unacknowledged_is_not_queued_again(mosquitto: MosquittoProcess, link: SlowLink,
                                                                       skip: bool) -> None:
    """``skip_held_copies`` (EdgeClient's transport): the same QoS 1 message published again while
    the first is still going up (2 s at 20 kB/s) is not queued behind it; MQTT delivers the first.
    Off (the default), both go: a caller may send the same bytes twice on purpose."""
    inbox = Inbox(mosquitto.url, "edgeci/v1/slow/dev/d4/update", f"inbox-copy-{skip}")
    drops: list[float] = []
    sender = MqttTransport(link.url, client_id=f"dev-copy-{skip}", subscriptions=[], on_message=lambda _t, _p: None,
                           skip_held_copies=skip, on_connection=lambda up: None if up else drops.append(time.monotonic()))
    sender.start(timeout=10)
    try:
        payload = np.random.default_rng(4).bytes(40_000)
        sender.publish("edgeci/v1/slow/dev/d4/update", payload)
        sender.publish("edgeci/v1/slow/dev/d4/update", payload)
        wait_until(lambda: inbox.count() >= 1, 15, "the first copy at the broker")
        if skip:
            time.sleep(3.0)  # what a second copy takes to follow (2 s at 20 kB/s)
        else:  # it follows: waited for, not given 3 s (a loaded machine's link thread and broker may take longer)
            wait_until(lambda: inbox.count() >= 2, 15, "the second copy at the broker")
        assert inbox.count() == (1 if skip else 2) and sender.resends_skipped == (1 if skip else 0)
        assert drops == []
        sender.publish("edgeci/v1/slow/dev/d4/update", payload)  # acknowledged by now: a retry goes again
        wait_until(lambda: inbox.count() == (2 if skip else 3), 15, "the copy sent after the acknowledgement")
    finally:
        sender.stop()
        inbox.transport.stop()


def test_a_dead_link_is_still_found_by_the_keepalive(mosquitto: MosquittoProcess, link: SlowLink) -> None:
    """What the keepalive is for stays: a link that stops moving mid-transfer is dropped after a
    keepalive without bytes (and then two), not carried for ever."""
    drops: list[float] = []
    sender = shaped_transport(link, "dev-dead", [], [], drops)
    try:
        sender.publish("edgeci/v1/slow/dev/d3/update", bytes(200_000))
        time.sleep(1.0)
        stalled = time.monotonic()
        link.stall(30)
        wait_until(lambda: bool(drops), 15, "the keepalive dropping a stalled link")
        assert drops[0] - stalled < 3 * 2 + 1.5
    finally:
        link.stall(0)
        sender.stop()


class Fleet:
    """A coordinator daemon straight on the broker (k = 1: each update a version) and one
    EdgeClient behind ``link``, on a :class:`PaddedTask` of ``pad`` floats."""

    def __init__(self, broker: MosquittoProcess, link: SlowLink, tmp: Path, *, pad: int, request_timeout_s: float,
                 **device: Any) -> None:
        self.task = PaddedTask(pad)
        self.daemon = CoordinatorDaemon(CoordinatorOptions(
            broker=broker.url, region="slow", state_dir=tmp / "coord", model=self.task.name,
            strategy_params={"k": 1, "timeout_s": None}), task=self.task).start()
        self.acks: list[dict[str, object]] = []
        self.client = EdgeClient(broker=link.url, device_id="d1", region="slow", task=self.task, data_dir=tmp / "d1",
                                 min_samples=4, train=TrainConfig(epochs=1, lr=0.1), request_timeout_s=request_timeout_s,
                                 refresh_s=None, **device)
        self.client.on("update_acked", lambda _kind, data: self.acks.append(data))
        self.failovers: list[dict[str, object]] = []
        self.client.on("failover", lambda _kind, data: self.failovers.append(data))

    def label(self, n: int = 4) -> None:
        pool = self.task.data().pool
        for i in range(n):
            self.client.add_sample(pool.x[i], int(pool.y[i]))

    def counter(self, name: str) -> int:
        return int(self.daemon.core.counters.get(name, 0))

    def close(self) -> None:
        try:
            self.client.stop()
        finally:
            self.daemon.stop()


def test_an_update_retried_while_it_is_still_being_sent_goes_once(mosquitto: MosquittoProcess, tmp_path: Path) -> None:
    """The device's request timeout (here 1 s) ran out while its 100 KB update was still going up
    (5 s at 20 kB/s); each retry queued a whole copy behind it, sent after the ack, each a
    ``duplicate`` at the coordinator: 3 copies up for one update. A copy of a message paho still
    holds unacknowledged is not queued again (MQTT delivers that one, after a reconnect too)."""
    with SlowLink(mosquitto.port, up_bps=20_000, down_bps=2_000_000, delay_s=0.05) as link:
        fleet = Fleet(mosquitto, link, tmp_path, pad=25_000, request_timeout_s=1.0)
        try:
            fleet.client.start(timeout=10)
            assert fleet.client.wait_for_version(0, 10)
            up_before = link.sent_up
            fleet.label()
            wait_until(lambda: bool(fleet.acks), 30, "the update's ack")
            time.sleep(6)  # what a copy queued behind the first would take to arrive
            assert fleet.acks[0]["status"] == "accepted"
            assert fleet.counter("accepted") == 1 and fleet.counter("duplicate") == 0, fleet.daemon.core.counters
            assert link.sent_up - up_before < 1.3 * fleet.task.spec.size * 4, link.sent_up - up_before
            # the retries came due: skipped as copies, or (since the request timeout waits while the
            # update moves) put off
            assert fleet.client.transport.resends_skipped + fleet.client.receiving_holds >= 1
        finally:
            fleet.close()


def test_a_pull_is_not_retried_while_its_model_is_arriving(mosquitto: MosquittoProcess, tmp_path: Path) -> None:
    """A 100 KB model takes 5 s down at 20 kB/s; the device's pull, retried after 1 s and 3 s,
    made the coordinator send it again each time: 3 models down the slow link for one. The request
    timeout now waits while a packet is still arriving."""
    with SlowLink(mosquitto.port, up_bps=2_000_000, down_bps=20_000, delay_s=0.05) as link:
        fleet = Fleet(mosquitto, link, tmp_path, pad=25_000, request_timeout_s=1.0)
        try:
            fleet.client.start(timeout=10)
            assert fleet.client.wait_for_version(0, 30)
            time.sleep(6)  # a second model sent on a retry would be arriving now
            served = fleet.counter("pulls_served") + fleet.counter("pulls_serving")
            assert served == 1, fleet.daemon.core.counters
            assert link.sent_down < 1.3 * fleet.task.spec.size * 4, link.sent_down
            assert fleet.client.receiving_holds >= 1
        finally:
            fleet.close()


def test_a_device_does_not_fail_over_while_its_update_is_still_going_up(mosquitto: MosquittoProcess, tmp_path: Path) -> None:
    """A device with a fallback region moves there after ``failover_after`` request timeouts in a
    row, dropping its unacknowledged update (its samples trained again there). An upload longer than
    those timeouts (defaults: 10 + 20 + 40 s; a 2 MB update at 256 kbit/s takes 62 s, 12 MB at 1 Mbit/s
    96 s) made a device on a slow link leave a coordinator that was fine. Here: 100 KB at 20 kB/s
    (5 s), timeouts of 1 s, failover after 2. The timeout now waits while the update still moves."""
    with SlowLink(mosquitto.port, up_bps=20_000, down_bps=2_000_000, delay_s=0.05) as link:
        fleet = Fleet(mosquitto, link, tmp_path, pad=25_000, request_timeout_s=1.0, regions=["other"], failover_after=2)
        try:
            fleet.client.start(timeout=10)
            assert fleet.client.wait_for_version(0, 10)
            fleet.label()
            wait_until(lambda: bool(fleet.acks) or bool(fleet.failovers), 30, "the update's ack or a failover")
            assert fleet.failovers == [] and fleet.acks[0]["status"] == "accepted", (fleet.failovers, fleet.acks)
            assert fleet.counter("accepted") == 1
        finally:
            fleet.close()


@pytest.mark.parametrize("direction", ["update-down", "model-up"])
def test_a_coordinator_behind_a_slow_link_keeps_its_connection_while_a_large_message_moves(
        mosquitto: MosquittoProcess, tmp_path: Path, direction: str) -> None:
    """The coordinator daemon reads and writes its data packets itself (the fast path, PAHO_FAST_PATHS), not
    through paho's socket calls that the slow-link keepalive watches. Behind a 20 kB/s link with a 2 s
    keepalive: a 100 KB update coming down to it (5 s), or a 100 KB model going up from it, must arrive
    once, on the connection it started on. It does, and did before this test (helper-162, 300 KB in 15 s, 7.5
    keepalives, one connection each way): the fast path's reads keep paho's ``_last_bytes_received``,
    which paho 2.2's own keepalive check honours (a PINGREQ again, no drop, while bytes come in); its
    writes move the kernel's unsent count, which :class:`~edge_sdk.mqtt._Client` watches."""
    slow, fast = 20_000, 2_000_000
    down, up = (slow, fast) if direction == "update-down" else (fast, slow)
    task = PaddedTask(25_000)
    with SlowLink(mosquitto.port, up_bps=up, down_bps=down, delay_s=0.05) as link:
        daemon = CoordinatorDaemon(CoordinatorOptions(broker=link.url, region="slow", state_dir=tmp_path / "coord", model=task.name,
                                                      strategy_params={"k": 1, "timeout_s": None}), task=task)
        daemon.transport._keepalive = 2  # (the scale of the link: 5 s a message, 2.5 keepalives)
        drops: list[float] = []
        daemon.transport._on_connection = lambda connected: None if connected else drops.append(time.monotonic())
        daemon.start(timeout=20)
        assert daemon.transport._fast or not mqtt.PAHO_FAST_PATHS
        client = EdgeClient(broker=mosquitto.url, device_id="d1", region="slow", task=task, data_dir=tmp_path / "d1",
                            min_samples=4, train=TrainConfig(epochs=1, lr=0.1), request_timeout_s=30.0, refresh_s=None)
        acks: list[dict[str, object]] = []
        client.on("update_acked", lambda _kind, data: acks.append(data))
        try:
            client.start(timeout=10)
            assert client.wait_for_version(0, 30)
            pool = task.data().pool
            t_label = time.monotonic()
            for i in range(4):
                client.add_sample(pool.x[i], int(pool.y[i]))
            wait_until(lambda: bool(acks), 40, "the update's ack")
            if direction == "update-down":  # the case happened: the update took 2 keepalives and more to come down
                assert time.monotonic() - t_label >= 2 * 2, time.monotonic() - t_label
            else:  # the PINGRESP waited behind the model going up, and the link counted as alive meanwhile
                assert daemon.transport._client.keepalive_extended >= 1
            assert acks[0]["status"] == "accepted" and daemon.core.counters["accepted"] == 1, (acks, daemon.core.counters)
            assert drops == [] and link.connections == 1, f"dropped {len(drops)} times, {link.connections} connections"
            moved = link.sent_down if direction == "update-down" else link.sent_up
            assert moved >= task.spec.size * 4, moved  # the large message did cross the slow direction
        finally:
            client.stop()
            daemon.stop()
