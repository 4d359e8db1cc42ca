"""The coordinator daemon's PUBACKs leave in the order its broker sent the messages (MQTT 3.1.1
[MQTT-4.6.0-2]), those of messages with nothing to make durable (the region's status topic)
included (helper-131). Over a real mosquitto on 127.0.0.1 (plain, ``log_type all``): the order is
read off the broker's log.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from coordinator.broker import MosquittoProcess
from edge_sdk.wire import topics
from edge_sdk.wire.messages import Update
from tests.daemon_rig import Net, Rig
from tests.helpers import wait_until

pytestmark = [pytest.mark.broker]


def sent_to_coordinator(log: str, topic: str, size: str) -> list[tuple[str, int]]:
    """(client id, packet id) of each QoS 1 PUBLISH on ``topic`` the broker sent, its size matching ``size`` (a regex)."""
    pattern = rf"Sending PUBLISH to (\S+) \(d\d, q1, r\d, m(\d+), '{re.escape(topic)}', \.\.\. \({size} bytes\)\)"
    return [(client, int(mid)) for client, mid in re.findall(pattern, log)]


def pubacks_from(log: str, client: str) -> list[int]:
    """The packet ids of the PUBACKs the broker received from ``client``, in order."""
    return [int(mid) for mid in re.findall(rf"Received PUBACK from {re.escape(client)} \(Mid: (\d+)", log)]


def test_a_status_messages_puback_does_not_overtake_the_held_puback_of_an_earlier_update(tmp_path: Path) -> None:
    """While the actor is busy, dev0's update and then a message on the region's status topic
    (another process's status: nothing to make durable) reach the daemon. The update's PUBACK
    waits for its batch's fsync; the status's must wait for it too. Before, it left at once,
    ahead of the update's: mosquitto 2.0.11 then let a message that had just arrived overtake
    those it had queued for the daemon (a device's older updates came after a newer one and were
    refused as duplicates: the 1597 of 1600 of helper-129's update-stream benchmark)."""
    broker = MosquittoProcess(extra_conf="log_type all").start()
    net = Net.plain(broker)
    update_topic, status_topic = topics.device_topic(net.region, "dev0", "update"), topics.status_topic(net.region)
    try:
        with Rig(net, tmp_path) as rig:
            task = rig.task
            daemon = rig.make_daemon(init=True).start()
            dev0 = rig.device("dev0")
            resume = rig.pause_actor()  # the actor handles nothing meanwhile
            dev0.send("update", Update(device="dev0", seq=1, model_id=task.spec.model_id, base_version=0, n_samples=20,
                                       weights=(task.pretrained(seed=0) + np.float32(1e-3)).astype(np.float32), nonce=1))
            wait_until(lambda: bool(sent_to_coordinator(broker.log_text(), update_topic, r"\d+")), 10, "the update sent to the daemon")
            dev0.transport.publish(status_topic, b"{}", qos=1)  # (not a status: _seen_status ignores it)
            wait_until(lambda: bool(sent_to_coordinator(broker.log_text(), status_topic, "2")), 10, "the status sent to the daemon")
            resume.set()
            wait_until(lambda: daemon.core.counters["accepted"] == 1, 15, "the update handled")
            [(client, update_mid)] = sent_to_coordinator(broker.log_text(), update_topic, r"\d+")
            [(_, status_mid)] = sent_to_coordinator(broker.log_text(), status_topic, "2")
            wait_until(lambda: {update_mid, status_mid} <= set(pubacks_from(broker.log_text(), client)), 10, "both PUBACKs")
            acks = [mid for mid in pubacks_from(broker.log_text(), client) if mid in (update_mid, status_mid)]
    finally:
        broker.stop()
    assert update_mid < status_mid, "sent in this order"
    assert acks == [update_mid, status_mid], f"PUBACKs in the order of the PUBLISHes (MQTT-4.6.0-2), got {acks}"
