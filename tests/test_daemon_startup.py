"""What a restarted coordinator daemon does with the messages its broker kept while it was down.

The daemon's session is persistent: mosquitto hands over the QoS 1 messages it queued for it as
soon as it connects, while ``CoordinatorDaemon.start`` still waits for its SUBACK — before it
has started the core (``CoordinatorCore.start``: status, recall, timers, what the restore left to
record, the regate that resumes a recorded canary round). Over a real mosquitto on 127.0.0.1:
devices publish while the coordinator is stopped, the coordinator starts again on its state dir.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from coordinator.daemon import CoordinatorDaemon
from edge_sdk.core.events import MessageReceived
from edge_sdk.mqtt import MqttTransport
from edge_sdk.signing import load_or_create_signer
from edge_sdk.wire import topics
from edge_sdk.wire.codec import encode
from edge_sdk.wire.messages import Ack, Control, ModelMsg, Pull
from tests.daemon_rig import Net, Rig, report, update
from tests.helpers import wait_until

pytestmark = [pytest.mark.broker]


def record_order(daemon: CoordinatorDaemon) -> list[str]:
    """What the daemon's core is asked, in order: ``start`` and each message's topic leaf (the
    core's own methods, wrapped on this instance only: it still does all its work)."""
    order: list[str] = []
    core = daemon.core
    start, handle = core.start, core.handle

    def started(now: float) -> list[Any]:
        order.append("start")
        return start(now)

    def handled(event: Any) -> list[Any]:
        if isinstance(event, MessageReceived):
            order.append(event.topic.rsplit("/", 1)[-1])
        return handle(event)

    core.start = started  # type: ignore[method-assign]
    core.handle = handled  # type: ignore[method-assign]
    return order


def test_updates_sent_while_the_coordinator_is_down_are_applied_once_and_acked_after_it_started(
        plain_net: Net, tmp_path: Path) -> None:
    """4 devices send 2 updates each (QoS 1) while the coordinator is stopped; once it is back,
    the core has started before it sees any of them, each is acknowledged ``accepted`` exactly
    once, none is refused, and all 8 are applied once, by one aggregation (k = 8)."""
    options = {"canary_round": False, "strategy_params": {"k": 8, "timeout_s": None}}
    with Rig(plain_net, tmp_path) as rig:
        task = rig.task
        daemon = rig.make_daemon(init=True, **options).start()
        devices = [rig.device(f"dev{i}") for i in range(4)]
        daemon.stop()
        for seq in (1, 2):
            for i, d in enumerate(devices):
                d.send("update", update(task, d.device, seq, seed=10 * i + seq, nonce=100 * i + seq))
        daemon = rig.make_daemon(**options)
        order = record_order(daemon)
        daemon.start()
        wait_until(lambda: daemon.core.version == 1, 30, "the 8 updates aggregated")
        wait_until(lambda: all(len(d.of(Ack)) >= 2 for d in devices), 15, "every update acknowledged")
        status = daemon.core.status()
    assert order[0] == "start" and order.count("start") == 1 and order.count("update") == 8, order
    for d in devices:
        assert sorted((a.seq, a.status) for a in d.of(Ack)) == [(1, "accepted"), (2, "accepted")], (d.device, d.of(Ack))
    assert (status.updates_accepted, status.updates_rejected, status.updates_duplicate) == (8, 0, 0)
    assert status.extra["messages_rejected"] == 0 and status.extra["aggregations"] == 1 and status.buffered == 0
    assert daemon.core.applied_upto == {d.device: 2 for d in devices}


def test_a_canary_fetch_sent_while_the_coordinator_is_down_is_served_from_the_resumed_round(
        plain_net: Net, tmp_path: Path) -> None:
    """A cohort member's canary fetch that the broker kept during the downtime reached the core
    before start() had resumed the recorded round: refused (``unknown_candidate``, answered
    ``Ack(rejected)``; the device tried again later). Now start() runs first: it is served."""
    with Rig(plain_net, tmp_path) as rig:
        task = rig.task
        daemon = rig.make_daemon(init=True).start()
        rig.open_canary_round()  # (seen: a cohort is drawn among recent devices)
        wait_until(lambda: daemon.core.status().extra["gate"]["canary"]["round"] is not None, 15, "candidate 1's canary round")
        assert daemon.core.status().extra["gate"]["canary"]["round"]["cohort"] == 3
        daemon.stop()
        fetcher = rig.devices[0]
        fetcher.send("pull", Pull(device=fetcher.device, seq=2, model_id=task.spec.model_id, have_version=0, serve=True, canary=1))
        daemon = rig.make_daemon()
        order = record_order(daemon)
        daemon.start()
        wait_until(lambda: any(m.version == 1 for m in fetcher.of(ModelMsg)) or bool(fetcher.of(Ack)), 15, "an answer to the fetch")
        status = daemon.core.status()
    assert order[0] == "start" and order.count("pull") == 1, order
    assert fetcher.of(Ack) == [], fetcher.of(Ack)
    (reply,) = [m for m in fetcher.of(ModelMsg) if m.version == 1]  # the candidate (the release is 0): the fetch's answer
    assert reply.release == 0
    canary = status.extra["gate"]["canary"]
    assert canary["resumed"] == 1 and canary["fetches"] == 1
    assert status.extra["messages_rejected"] == 0 and status.extra["rejected_by_reason"] == {}


def test_an_operator_command_sent_while_the_coordinator_is_down_runs_after_it_started(
        plain_net: Net, tmp_path: Path) -> None:
    """An operator's ``pin`` (signed with the coordinator's own key, in its name) and a device's
    serving pull, both kept by the broker during the downtime: the core has started before it
    sees either; the pin runs (release 2, a copy of version 0, pinned) and the pull is served."""
    options = {"canary_round": False, "strategy_params": {"k": 1, "timeout_s": None}}
    operator = MqttTransport(plain_net.url, client_id="operator", subscriptions=[], on_message=lambda *_: None, clean_session=True)
    operator.start()
    try:
        with Rig(plain_net, tmp_path) as rig:
            task = rig.task
            daemon = rig.make_daemon(init=True, **options).start()
            device = rig.device("dev0")
            device.send("update", update(task, "dev0", 1, seed=1, nonce=1))
            wait_until(lambda: daemon.core.version == 1, 15, "version 1")
            daemon.stop()
            signer, created = load_or_create_signer(tmp_path / "coord" / "signing.key")
            assert not created
            topic = topics.control_topic(plain_net.region)
            pin = Control(command="pin", operator=daemon.coordinator_id, issued_at=time.time(), nonce=7, version=0)
            operator.publish(topic, encode(pin, signer=signer, scope=topics.signing_scope(topic)))
            device.send("pull", Pull(device="dev0", seq=2, model_id=task.spec.model_id, serve=True))
            daemon = rig.make_daemon(**options)
            order = record_order(daemon)
            daemon.start()
            wait_until(lambda: daemon.core.status().extra["pinned"], 15, "the pin")
            wait_until(lambda: bool(device.of(ModelMsg)), 15, "the serving pull's answer")
            status = daemon.core.status()
    finally:
        operator.stop()
    assert order[0] == "start" and order.count("start") == 1 and sorted(order[1:3]) == ["control", "pull"], order
    assert status.extra["release"] == status.version == 2 and status.extra["recent_versions"][-1]["action"] == "pin"
    assert status.extra["control_refused"] is None and status.extra["messages_rejected"] == 0


def test_a_canary_reports_puback_leaves_only_after_the_round_is_recorded(plain_net: Net, tmp_path: Path) -> None:
    """Persist-before-ack for canary reports (plain TCP, the transport's fast path): while the
    daemon writes canary.json with a report, the connection is cut (as by a crash of the
    process at that moment). The broker never got the report's PUBACK: it delivers the report
    again on the reconnect, where it is a duplicate of the recorded one (refused, counted). A
    PUBACK sent on delivery, before the record, would have left the report lost on a crash."""
    with Rig(plain_net, tmp_path) as rig:
        daemon = rig.make_daemon(init=True).start()
        ask = rig.open_canary_round()
        writing, cut = rig.hold_report_records()
        rig.devices[0].send("update", report(ask))
        assert writing.wait(15), "the report's record"
        rig.cut_connection()
        cut.set()
        wait_until(lambda: daemon.core.counters["canary_rejected"] >= 1, 30, "the broker's redelivery")
        counters = dict(daemon.core.counters)
    assert counters["canary_reports"] == 1 and counters["canary_reject:canary_duplicate"] == 1, \
        {k: v for k, v in counters.items() if k.startswith("canary")}
