"""stop(drain=True) and the coordinator's held PUBACKs (helper-129): the queued messages a
drain handles are acknowledged before the DISCONNECT, so the next start on the state dir does
not get them again from the broker as duplicates. Over a real mosquitto on 127.0.0.1 (plain).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from coordinator.broker import MosquittoProcess
from edge_sdk.core.events import MessageReceived
from edge_sdk.mqtt import STOP_DRAIN_S
from edge_sdk.tasks import get_task
from edge_sdk.wire.messages import Pull
from tests.helpers import wait_until
from tests.test_daemon_acks import (
    Device,
    Net,
    canary_counters,
    make_daemon,
    open_canary_round,
    recorded_reports,
    report,
)

pytestmark = [pytest.mark.broker]


def test_a_drained_stop_acknowledges_what_it_handled(tmp_path: Path) -> None:
    """stop() (drain) while the actor handles a pull for longer than the transport waits for the
    final status's PUBACK (STOP_DRAIN_S; the actor reads it) and dev0's canary report waits in
    its inbox: the drain records the report, and its PUBACK leaves before the DISCONNECT. Before,
    the transport disconnected first (its held PUBACKs void), the drain recorded the report
    anyway, and the next daemon got it again from the broker: refused as a duplicate, a
    ``canary_duplicate`` reject logged and counted for a report the operator's devices sent once."""
    task = get_task("digits")
    broker = MosquittoProcess().start()
    net = Net(broker.url, "drain", {}, lambda name: None)
    daemon = make_daemon(net, tmp_path, task, init=True, max_batch=1)
    devices: list[Device] = []
    paused, resume, inside, go = threading.Event(), threading.Event(), threading.Event(), threading.Event()
    try:
        daemon.start()
        devices, ask = open_canary_round(net, daemon, task)
        handle = daemon.core.handle

        def slow_pull(event: Any) -> list[Any]:
            if isinstance(event, MessageReceived) and event.topic.endswith("/pull") and not inside.is_set():
                inside.set()
                assert go.wait(15)
            return handle(event)

        daemon.core.handle = slow_pull  # type: ignore[method-assign]
        daemon.actor.call(lambda: (paused.set(), resume.wait(15)))  # the actor reads nothing meanwhile
        assert paused.wait(10)
        devices[0].send("pull", Pull(device="dev0", seq=2, model_id=task.spec.model_id, serve=True))
        devices[0].send("update", report(ask))
        time.sleep(0.5)  # both in the daemon's socket
        resume.set()
        assert inside.wait(10), "the pull in hand"
        assert daemon.actor.backlog >= 1, "the report read with the pull, waiting in the inbox"
        stopping = threading.Thread(target=daemon.stop)
        stopping.start()
        time.sleep(STOP_DRAIN_S + 1.0)  # a batch longer than the transport waits for the final status's PUBACK
        go.set()
        stopping.join(20)
        assert recorded_reports(tmp_path) == {"dev0": [10, 0, 0, 0]}, "the drain recorded the report"
        daemon = make_daemon(net, tmp_path, task).start()
        wait_until(lambda: daemon.core.counters.get("canary_resumed", 0) >= 1 or daemon.actor.batches >= 1, 10, "the start")
        time.sleep(2.0)  # a redelivery comes at once on the connect
        counters = canary_counters(daemon)
    finally:
        go.set()
        resume.set()
        daemon.stop()
        for d in devices:
            d.transport.stop()
        broker.stop()
    assert "canary_reject:canary_duplicate" not in counters and "canary_rejected" not in counters, counters
    assert recorded_reports(tmp_path) == {"dev0": [10, 0, 0, 0]}
