"""The coordinator's held PUBACKs against messages that fail it (helper-129's review of the
acknowledgement path): a message whose handling fails in a way that a redelivery repeats must
not make the daemon close and reopen its connection in a loop, nor keep PUBACKs (and so the
broker's in-flight window) for ever. Over a real mosquitto on 127.0.0.1 (plain TCP).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pytest

from coordinator.broker import MosquittoProcess
from coordinator.daemon import CoordinatorDaemon, CoordinatorOptions
from coordinator.strategies.base import BufferedUpdate
from edge_sdk.modelio import save_model
from edge_sdk.tasks import get_task
from edge_sdk.tasks.base import Task
from edge_sdk.wire.messages import Ack, Update
from tests.helpers import wait_until
from tests.test_daemon_acks import Device, Net

pytestmark = [pytest.mark.broker]


@pytest.fixture
def net() -> Iterator[Net]:
    broker = MosquittoProcess().start()
    try:
        yield Net(broker.url, "poison", {}, lambda name: None)
    finally:
        broker.stop()


def update(task: Task, device: str, seq: int) -> Update:
    weights = (task.pretrained(seed=0) + np.random.default_rng(seq).normal(scale=0.01, size=task.spec.size)).astype(np.float32)
    return Update(device=device, seq=seq, model_id=task.spec.model_id, base_version=0, n_samples=20, weights=weights, nonce=seq)


def test_a_message_that_fails_the_batch_end_is_not_redelivered_in_a_loop(net: Net, tmp_path: Path) -> None:
    """The batch end raises for one device's update, and would again on every delivery of it
    (here: the log cannot encode it; any bug after the core, in the flush or a held action, is
    alike). It is handled as if the core had raised: the batch dropped, the core rebuilt, the
    message acknowledged. Before, no PUBACK left and the connection was closed for a redelivery
    that failed the same way, in a loop; the update stayed in the batch's log, so every later
    batch failed too: no other device's update was acknowledged again."""
    task = get_task("digits")
    save_model(tmp_path / "init.npz", task.spec, task.pretrained(seed=0), {"version": 0})
    daemon = CoordinatorDaemon(CoordinatorOptions(
        broker=net.url, region=net.region, state_dir=tmp_path / "coord", init=tmp_path / "init.npz",
        strategy_params={"k": 10, "timeout_s": None}), task=task)
    append = daemon.registry.append_updates
    fails: list[str] = []

    def append_or_fail(updates: Iterable[BufferedUpdate]) -> None:
        updates = list(updates)
        if any(u.device == "poison" for u in updates):
            fails.append("poison")
            raise ValueError("cannot encode this update (test)")
        append(updates)

    daemon.registry.append_updates = append_or_fail  # type: ignore[method-assign]
    devices: list[Device] = []
    try:
        daemon.start()
        devices = [Device(net, "poison"), Device(net, "good")]
        devices[0].send("update", update(task, "poison", 1))
        wait_until(lambda: bool(fails), 15, "the failed batch end")
        time.sleep(3.0)  # long enough for several reconnects (backoff from 0.1 s) if it loops
        devices[1].send("update", update(task, "good", 1))
        wait_until(lambda: bool(devices[1].of(Ack)), 15, "the good device's Ack")
        redeliveries, attempts, core_failures = daemon.transport.redeliveries, len(fails), daemon.core_failures
        accepted = daemon.core.counters.get("accepted", 0)
        good = devices[1].of(Ack)
    finally:
        daemon.stop()
        for d in devices:
            d.transport.stop()
    assert redeliveries == 0 and attempts == 1 and core_failures == 1, (redeliveries, attempts, core_failures)
    assert [(a.status, a.seq) for a in good] == [("accepted", 1)] and accepted == 1, (good, accepted)
