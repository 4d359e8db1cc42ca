"""A message that makes the coordinator's core raise, in one batch with messages handled before
it (helper-129): the core is rebuilt, and what the earlier messages changed must not be dropped
with the batch while their PUBACKs go out (a canary report is sent once, with no application
Ack). Over a real mosquitto on 127.0.0.1, plain TCP: the fast path reads the three messages in
one go, so they are one batch (over TLS paho reads one record per wake-up).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.broker import MosquittoProcess
from coordinator.daemon import CoordinatorDaemon, CoordinatorOptions
from edge_sdk.core.events import MessageReceived
from edge_sdk.modelio import save_model
from edge_sdk.tasks import get_task
from edge_sdk.tasks.base import Task
from edge_sdk.wire import topics
from edge_sdk.wire.messages import Canary, ModelMsg, Pull, Update
from tests.helpers import wait_until
from tests.test_daemon_acks import Device, Net, recorded_reports, report

pytestmark = [pytest.mark.broker]
POISON = b"\xc1poison"


def weight(task: Task, seed: int) -> Any:
    return (task.pretrained(seed=0) + np.random.default_rng(seed).normal(scale=0.01, size=task.spec.size)).astype(np.float32)


def test_a_message_the_core_raises_on_does_not_lose_the_batch_handled_before_it(tmp_path: Path) -> None:
    """One batch: dev1's update (accepted: the batch's actions wait for its fsync), dev0's canary
    report (its record held behind that fsync), then a message the core raises on (a bug, here
    injected on every core the daemon builds). Before, the failure dropped the batch's held work
    and every PUBACK of the batch was sent: the report was never recorded, nor delivered again.
    Now what the earlier events held is made durable and performed first (as if the batch had
    ended there): the report is recorded, the bad message handled once, nothing redelivered."""
    broker = MosquittoProcess().start()
    net = Net(broker.url, "raise", {}, lambda name: None)
    task = get_task("digits")
    save_model(tmp_path / "init.npz", task.spec, task.pretrained(seed=0), {"version": 0})
    daemon = CoordinatorDaemon(CoordinatorOptions(  # make_daemon's, with k = 2: dev1's update waits in the buffer
        broker=net.url, region=net.region, state_dir=tmp_path / "coord", init=tmp_path / "init.npz",
        canary=1.0, canary_min_reports=3, canary_deadline_s=300.0, strategy_params={"k": 2, "timeout_s": None},
        **net.options), task=task)
    poisoned: list[float] = []
    build = daemon._build_core

    def build_poisoned(snapshot: Any) -> Any:
        core = build(snapshot)
        handle = core.handle

        def handle_or_raise(event: Any) -> list[Any]:
            if isinstance(event, MessageReceived) and event.payload == POISON:
                poisoned.append(event.now)
                raise RuntimeError("a bug in the core (test)")
            return handle(event)

        core.handle = handle_or_raise  # type: ignore[method-assign]
        return core

    daemon._build_core = build_poisoned  # type: ignore[method-assign]
    daemon.core = build_poisoned(daemon.registry.load())
    devices: list[Device] = []
    try:
        daemon.start()
        cohort = [Device(net, f"dev{i}") for i in range(3)]
        devices = [*cohort, Device(net, "mallory"), Device(net, "eve")]
        for d in cohort:
            d.send("pull", Pull(device=d.device, seq=1, model_id=task.spec.model_id, serve=True))
        wait_until(lambda: all(d.of(ModelMsg) for d in cohort), 15, "the devices' first models")
        for i, d in enumerate(devices[3:]):  # two updates: version 1, the candidate the cohort scores
            d.send("update", Update(device=d.device, seq=1, model_id=task.spec.model_id, base_version=0, n_samples=20,
                                    weights=weight(task, i), nonce=1))
        wait_until(lambda: all(d.of(Canary) for d in cohort), 15, "the canary requests")
        ask = cohort[0].of(Canary)[0]
        paused, resume = threading.Event(), threading.Event()
        daemon.actor.call(lambda: (paused.set(), resume.wait(15)))  # the three are read in one go, one batch
        assert paused.wait(10)
        devices[1].send("update", Update(device="dev1", seq=2, model_id=task.spec.model_id, base_version=1, n_samples=20,
                                         weights=weight(task, 5), nonce=2))
        time.sleep(0.3)  # (three clients: the broker forwards in the order it gets them)
        devices[0].send("update", report(ask))
        time.sleep(0.3)
        devices[3].transport.publish(topics.device_topic(net.region, "mallory", "update"), POISON, qos=1)
        time.sleep(0.5)
        resume.set()
        wait_until(lambda: bool(poisoned), 10, "the bad message")
        wait_until(lambda: recorded_reports(tmp_path) != {}, 20, "the report recorded")
        time.sleep(1.0)  # (a second delivery of the bad message would be handled by now)
        core_failures, redeliveries = daemon.core_failures, daemon.transport.redeliveries
    finally:
        resume.set()
        daemon.stop()
        for d in devices:
            d.transport.stop()
        broker.stop()
    assert recorded_reports(tmp_path) == {"dev0": [10, 0, 0, 0]}
    assert len(poisoned) == 1 and core_failures == 1 and redeliveries == 0, (poisoned, core_failures, redeliveries)
