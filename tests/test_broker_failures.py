"""The broker fails under a live fleet (helper-157's audit): a real mosquitto on 127.0.0.1,
a coordinator daemon and SDK devices, with :class:`~tests.tcp_proxy.TcpProxy` between a
client and the broker where the test needs to cut, refuse or silence one client's link.

What the audit found correct (no acknowledged update lost, none applied twice, versions
contiguous, both sides back on their own) is covered by ``test_integration_mqtt.py`` and
``test_failover.py``; the tests here are the cases that were not."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.broker import MosquittoProcess
from coordinator.daemon import CoordinatorDaemon, CoordinatorOptions
from edge_sdk.client import EdgeClient
from edge_sdk.core.device import DeviceConfig, DeviceCore, Phase
from edge_sdk.core.events import MessageReceived, Publish, SampleAdded
from edge_sdk.tasks import get_task
from edge_sdk.tasks.base import TrainConfig
from edge_sdk.wire import topics
from edge_sdk.wire.codec import decode, encode
from edge_sdk.wire.messages import Ack, ModelMsg, Pull
from tests.helpers import SIGNER, SPEC, make_coordinator, wait_until
from tests.tcp_proxy import TcpProxy

REGION = "bf"


def deferred_device(**config: Any) -> tuple[DeviceCore, Pull]:
    """A device core that has its model and is waiting, deferred, with the pull it was deferred on."""
    d = DeviceCore(DeviceConfig(device_id="d1", region="r1", spec=SPEC, min_samples=2, trusted_keys={SIGNER.kid: SIGNER.public_raw},
                                **config), rng=random.Random(0))
    (serve,) = [decode(a.payload) for a in d.start(0.0) if isinstance(a, Publish)]
    d.handle(MessageReceived(now=1.0, topic=topics.device_topic("r1", "d1", "model"), payload=encode(
        ModelMsg(model_id=SPEC.model_id, version=0, reply_to=serve.seq, weights=np.zeros(SPEC.size, np.float32), release=0),
        signer=SIGNER, scope=topics.device_scope("r1", "model"))))
    (pull,) = [decode(a.payload) for a in d.handle(SampleAdded(now=2.0, total=2)) if isinstance(a, Publish)]
    assert isinstance(pull, Pull) and not pull.serve
    d.handle(MessageReceived(now=3.0, topic=topics.device_topic("r1", "d1", "ack"),
                             payload=encode(Ack(device="d1", seq=pull.seq, status="deferred", version=0))))
    assert d.state.phase is Phase.DEFERRED
    return d, pull


def test_a_deferred_device_sends_its_pull_again_when_the_broker_connection_comes_back() -> None:
    d, pull = deferred_device()
    (again,) = [decode(a.payload) for a in d.reconnected(4.0) if isinstance(a, Publish)]
    assert isinstance(again, Pull) and again.seq == pull.seq and again.invite_round == pull.invite_round == -1
    assert d.state.phase is Phase.PULLING


def test_a_deferred_device_without_a_token_for_its_pull_leaves_it_to_the_reannounce_timer() -> None:
    d, _ = deferred_device(pull_burst=3.0, pull_refill_s=60.0)  # its last whole token went on the deferred pull
    assert d.reconnected(4.0) == []
    assert d.state.phase is Phase.DEFERRED


@pytest.fixture
def task() -> Any:
    return get_task("digits")


@pytest.fixture
def broker() -> Iterator[MosquittoProcess]:
    """A mosquitto the test may restart on the same port (``restart``: without persistence)."""
    b = MosquittoProcess().start()
    try:
        yield b
    finally:
        b.stop()


def restart(broker: MosquittoProcess) -> None:
    """Stop mosquitto and start it again on the same port, empty: no sessions, no retained messages."""
    broker.stop()
    broker.start()


def client(url: str, name: str, tmp: Path, task: Any, **kw: Any) -> EdgeClient:
    return EdgeClient(broker=url, device_id=name, region=REGION, task=task, data_dir=tmp / name, min_samples=2,
                      train=TrainConfig(epochs=1), request_timeout_s=2.0, inference="torch", **kw)


def label(c: EdgeClient, task: Any, n: int = 2) -> None:
    pool = task.data().pool
    for i in range(n):
        c.add_sample(pool.x[i], int(pool.y[i]))


@pytest.mark.broker
def test_a_deferred_device_whose_invite_the_restarted_broker_lost_asks_again_when_it_reconnects(
        broker: MosquittoProcess, task: Any, tmp_path: Path) -> None:
    """FedAvg: device A is deferred (waiting for an invitation). mosquitto restarts without
    persistence and A's network stays down a little longer than the coordinator's: the round
    that B's pull starts invites A while A has no session on the new broker, and the invitation
    is dropped. A used to wait in DEFERRED for its re-announce timer (``reannounce_s``, 600 s)
    and the round, which has no timeout, with it; now a deferred device sends its pull again
    (same seq) as soon as it reconnects, and the coordinator, which counts it in the round,
    serves it."""
    proxy = TcpProxy(broker.port)
    daemon = CoordinatorDaemon(CoordinatorOptions(broker=broker.url, region=REGION, state_dir=tmp_path / "c", strategy="fedavg",
                                                  strategy_params={"select": 2, "min_devices": 2}), task=task).start()
    a = client(proxy.url, "a", tmp_path, task).start()
    b = client(broker.url, "b", tmp_path, task).start()
    try:
        label(a, task)
        wait_until(lambda: a.core.state.phase is Phase.DEFERRED, 20, "A to be deferred")
        proxy.accepting = False  # A's network is down across the restart
        restart(broker)
        wait_until(lambda: daemon.transport.connected and b.connected, 30, "the coordinator and B to reconnect")
        assert not a.connected
        label(b, task)  # two devices waiting: the round invites both
        # (B's invitation, served: B trains 2 samples in milliseconds, so its phase may be idle again by the next look)
        wait_until(lambda: daemon.core.counters.get("pulls_served", 0) >= 1, 20, "B's invitation")
        proxy.accepting = True
        wait_until(lambda: a.connected, 30, "A to reconnect")
        wait_until(lambda: daemon.core.version >= 1, 30, "the round to close with A's update (A was left waiting for an invite)")
        assert a.core.state.phase is not Phase.DEFERRED
    finally:
        a.stop()
        b.stop()
        daemon.stop()
        proxy.close()


def test_an_invited_device_s_retried_pull_is_not_counted_as_a_forged_invitation() -> None:
    """A broker restarted without persistence loses the model that answered an invited device's
    pull; the device sends the same pull again (same seq, same invite round) at its timeout.
    The coordinator serves it (the device is still in the round), but counted it in
    ``invite_unknown``, the counter of forged or replayed invitations: each broker restart
    raised a security counter."""
    c = make_coordinator("fedavg", select=1, min_devices=1)
    c.start(0.0)

    def pull(now: float, seq: int, invite_round: int = -1) -> list[object]:
        msg = Pull(device="d1", seq=seq, model_id=SPEC.model_id, invite_round=invite_round)
        return c.handle(MessageReceived(now=now, topic=topics.device_topic("r1", "d1", "pull"), payload=encode(msg)))

    invites = [decode(a.payload) for a in pull(1.0, 0) if isinstance(a, Publish) and a.topic.endswith("/invite")]
    assert len(invites) == 1
    served = pull(2.0, 1, invites[0].round)
    assert any(isinstance(a, Publish) and a.topic.endswith("/model") for a in served)
    again = pull(12.0, 1, invites[0].round)  # the model was lost with the broker: the same pull at its timeout
    assert any(isinstance(a, Publish) and a.topic.endswith("/model") for a in again), "a participant is served again"
    assert c.counters["invite_unknown"] == 0
    pull(13.0, 2, invites[0].round)  # that round again with another pull: not a retry of the served one
    assert c.counters["invite_unknown"] == 1


@pytest.mark.broker
def test_a_silently_dropped_coordinator_link_is_noticed_by_keepalive_and_nothing_is_lost_or_applied_twice(
        broker: MosquittoProcess, task: Any, tmp_path: Path) -> None:
    """Half-open: a NAT drops the coordinator's connection without a FIN (the proxy stops carrying
    bytes either way). The coordinator drops the connection after two keepalives without a packet
    (its PINGREQ unanswered), reconnects, and the device's pull and update sent meanwhile
    (delivered by the broker into the void, unacknowledged) come again: answered, applied once.
    Keepalive 2 s here; in production (30 s) helper-157 measured 60.3 s to notice, 61.4 s to be
    back, and mosquitto's last will for the coordinator after 45.8 s."""
    import time

    from coordinator.registry import Registry

    proxy = TcpProxy(broker.port)
    daemon = CoordinatorDaemon(CoordinatorOptions(broker=proxy.url, region=REGION, state_dir=tmp_path / "c",
                                                  strategy_params={"k": 1, "timeout_s": None}), task=task)
    daemon.transport._keepalive = 2
    daemon.start()
    dev = client(broker.url, "d", tmp_path, task).start()
    try:
        label(dev, task)
        wait_until(lambda: daemon.core.version >= 1 and dev.core.state.phase is Phase.IDLE, 30, "version 1")
        cut = time.monotonic()
        proxy.silence()
        label(dev, task, 4)  # a new round: its pull (and then its update) reach the broker, not the coordinator
        wait_until(lambda: not daemon.transport.connected, 15, "the coordinator to notice")
        noticed = time.monotonic() - cut
        wait_until(lambda: daemon.transport.connected, 15, "the coordinator to reconnect")
        wait_until(lambda: daemon.core.version >= 2 and dev.core.state.phase is Phase.IDLE, 30, "the device's second update applied")
        assert 2.0 <= noticed <= 8.0, noticed  # two keepalives without a PINGRESP (paho 2.2): not at once, not never
        registry = Registry(tmp_path / "c", task.spec)
        consumed = [tuple(c) for v in registry.versions() for c in registry.read_version(v)[1].get("consumed", [])]
        assert len(consumed) == len(set(consumed)) == 2, consumed
    finally:
        dev.stop()
        daemon.stop()
        proxy.close()
