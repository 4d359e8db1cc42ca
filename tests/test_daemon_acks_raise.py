"""A message that makes the coordinator's core raise, in one batch with messages handled before
it (helper-129): the core is rebuilt, and what the earlier messages changed must not be dropped
with the batch while their PUBACKs go out (a canary report is sent once, with no application
Ack). Over a real mosquitto on 127.0.0.1, plain TCP: the fast path reads the three messages in
one go, so they are one batch (over TLS paho reads one record per wake-up).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from edge_sdk.core.events import MessageReceived
from edge_sdk.wire import topics
from tests.daemon_rig import Net, Rig, report, update
from tests.helpers import wait_until

pytestmark = [pytest.mark.broker]
POISON = b"\xc1poison"


def test_a_message_the_core_raises_on_does_not_lose_the_batch_handled_before_it(plain_net: Net, tmp_path: Path) -> None:
    """One batch: dev1's update (accepted: the batch's actions wait for its fsync), dev0's canary
    report (its record held behind that fsync), then a message the core raises on (a bug, here
    injected on every core the daemon builds). Before, the failure dropped the batch's held work
    and every PUBACK of the batch was sent: the report was never recorded, nor delivered again.
    Now what the earlier events held is made durable and performed first (as if the batch had
    ended there): the report is recorded, the bad message handled once, nothing redelivered."""
    with Rig(plain_net, tmp_path) as rig:
        # make_daemon's, with k = 2: dev1's update waits in the buffer
        daemon = rig.make_daemon(init=True, strategy_params={"k": 2, "timeout_s": None})
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
        daemon.start()
        ask = rig.open_canary_round({"mallory": 0, "eve": 1})
        devices = rig.devices
        resume = rig.pause_actor()  # the three are read in one go, one batch
        devices[1].send("update", update(rig.task, "dev1", 2, seed=5, nonce=2, base_version=1))
        time.sleep(0.3)  # (three clients: the broker forwards in the order it gets them)
        devices[0].send("update", report(ask))
        time.sleep(0.3)
        devices[3].transport.publish(topics.device_topic(plain_net.region, "mallory", "update"), POISON, qos=1)
        time.sleep(0.5)
        resume.set()
        wait_until(lambda: bool(poisoned), 10, "the bad message")
        wait_until(lambda: rig.recorded_reports() != {}, 20, "the report recorded")
        time.sleep(1.0)  # (a second delivery of the bad message would be handled by now)
        core_failures, redeliveries = daemon.core_failures, daemon.transport.redeliveries
    assert rig.recorded_reports() == {"dev0": [10, 0, 0, 0]}
    assert len(poisoned) == 1 and core_failures == 1 and redeliveries == 0, (poisoned, core_failures, redeliveries)
