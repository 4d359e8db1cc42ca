"""The coordinator's held PUBACKs against messages that fail it (helper-129's review of the
acknowledgement path): a message whose handling fails in a way that a redelivery repeats must
not make the daemon close and reopen its connection in a loop, nor keep PUBACKs (and so the
broker's in-flight window) for ever. Over a real mosquitto on 127.0.0.1 (plain TCP).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path

import pytest

from coordinator.daemon import OUTAGE_HELD_ACKS
from coordinator.strategies.base import BufferedUpdate
from edge_sdk.wire import topics
from edge_sdk.wire.messages import Ack, Canary
from tests.daemon_rig import Net, Rig, report, update
from tests.helpers import wait_until

pytestmark = [pytest.mark.broker]


def test_a_message_that_fails_the_batch_end_is_not_redelivered_in_a_loop(plain_net: Net, tmp_path: Path) -> None:
    """The batch end raises for one device's update, and would again on every delivery of it
    (here: the log cannot encode it; any bug after the core, in the flush or a held action, is
    alike). It is handled as if the core had raised: the batch dropped, the core rebuilt, the
    message acknowledged. Before, no PUBACK left and the connection was closed for a redelivery
    that failed the same way, in a loop; the update stayed in the batch's log, so every later
    batch failed too: no other device's update was acknowledged again."""
    with Rig(plain_net, tmp_path) as rig:
        daemon = rig.make_daemon(init=True, canary_round=False, strategy_params={"k": 10, "timeout_s": None})
        append = daemon.registry.append_updates
        fails: list[str] = []

        def append_or_fail(updates: Iterable[BufferedUpdate]) -> None:
            updates = list(updates)
            if any(u.device == "poison" for u in updates):
                fails.append("poison")
                raise ValueError("cannot encode this update (test)")
            append(updates)

        daemon.registry.append_updates = append_or_fail  # type: ignore[method-assign]
        daemon.start()
        poison, good = rig.device("poison"), rig.device("good")
        poison.send("update", update(rig.task, "poison", 1, seed=1, nonce=1))
        wait_until(lambda: bool(fails), 15, "the failed batch end")
        time.sleep(3.0)  # long enough for several reconnects (backoff from 0.1 s) if it loops
        good.send("update", update(rig.task, "good", 1, seed=1, nonce=1))
        wait_until(lambda: bool(good.of(Ack)), 15, "the good device's Ack")
        redeliveries, attempts, core_failures = daemon.transport.redeliveries, len(fails), daemon.core_failures
        accepted = daemon.core.counters.get("accepted", 0)
        acks = good.of(Ack)
    assert redeliveries == 0 and attempts == 1 and core_failures == 1, (redeliveries, attempts, core_failures)
    assert [(a.status, a.seq) for a in acks] == [("accepted", 1)] and accepted == 1, (acks, accepted)


def test_a_flood_during_a_storage_outage_does_not_take_the_reports_withheld_place(plain_net: Net, tmp_path: Path) -> None:
    """While storage fails, the daemon withholds the PUBACKs of up to OUTAGE_HELD_ACKS refused
    messages so that a canary report (refused only because the recorded round is not resumed in
    an outage) reaches the recovered core. Anyone on the trial broker can send messages that are
    refused for good (malformed bytes): those must not take the report's place. dev1's report
    starts the outage (its record fails), OUTAGE_HELD_ACKS + 1 malformed updates follow, then
    dev0's report; once storage works again both reports are recorded. Before, the malformed
    messages took the places and dev0's report was acknowledged and refused: lost."""
    with Rig(plain_net, tmp_path) as rig:
        daemon = rig.make_daemon(init=True, storage_probe_s=0.2)
        healthy = rig.fail_probes()
        daemon.start()
        ask = rig.open_canary_round()
        failed = rig.fail_first_report_record()
        devices = rig.devices
        asks = {d.device: d.of(Canary)[0] for d in devices[:3]}
        devices[1].send("update", report(asks["dev1"], "dev1"))
        wait_until(lambda: bool(failed) and daemon.core.counters.get("canary_reject:canary_unknown_candidate", 0) >= 1, 15,
                   "the outage, dev1's report refused in it")
        mallory = devices[3]
        for _ in range(OUTAGE_HELD_ACKS + 1):
            mallory.transport.publish(topics.device_topic(plain_net.region, "mallory", "update"), b"\x93not an update", qos=1)
        wait_until(lambda: daemon.core.counters.get("reject:malformed", 0) >= OUTAGE_HELD_ACKS + 1, 15, "the flood refused")
        devices[0].send("update", report(ask))
        wait_until(lambda: daemon.core.counters.get("canary_reject:canary_unknown_candidate", 0) >= 2, 15, "dev0's report refused")
        healthy.set()
        wait_until(lambda: len(rig.recorded_reports()) >= 2, 20, "both reports recorded after the recovery")
        recorded = rig.recorded_reports()
    assert recorded == {"dev0": [10, 0, 0, 0], "dev1": [10, 0, 0, 0]}, recorded


def test_a_reconnect_during_an_outage_does_not_void_a_withheld_report(
        plain_net: Net, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A PUBACK withheld in an outage is void once the connection ends (a network blip): the
    broker delivers the report again, refused again. The void one must not keep its place
    (OUTAGE_HELD_ACKS is 1 here: one reconnect is enough; at 16, sixteen were): the report is
    withheld again and recorded after the recovery. Before, the void place was counted, the
    report's new PUBACK sent at once (refused, lost)."""
    monkeypatch.setattr("coordinator.daemon.OUTAGE_HELD_ACKS", 1)
    with Rig(plain_net, tmp_path) as rig:
        daemon = rig.make_daemon(init=True, storage_probe_s=0.2)
        healthy = rig.fail_probes()

        def refused() -> int:
            return int(daemon.core.counters.get("canary_reject:canary_unknown_candidate", 0))

        daemon.start()
        ask = rig.open_canary_round()
        failed = rig.fail_first_report_record()
        rig.devices[0].send("update", report(ask))
        wait_until(lambda: bool(failed) and refused() >= 1, 15, "the outage, dev0's report refused in it")
        rig.cut_connection()  # the blip
        wait_until(lambda: refused() >= 2, 30, "the report delivered again after the reconnect, refused again")
        healthy.set()
        wait_until(lambda: rig.recorded_reports() != {}, 20, "the report recorded after the recovery")
        recorded = rig.recorded_reports()
    assert recorded == {"dev0": [10, 0, 0, 0]}, recorded
