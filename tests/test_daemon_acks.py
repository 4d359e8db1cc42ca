"""When the coordinator daemon acknowledges (PUBACK) a QoS 1 message to its broker: only once
it has handled the message and what the message's batch changed is durable, on every path
(plain TCP, the transport's fast path; TLS, paho's path), and never for a message whose
handling was dropped (a storage failure, a stop without drain): the broker delivers those
again (the daemon's session is persistent). A canary report matters most: a device sends it
once and gets no application-level Ack. Over a real mosquitto on 127.0.0.1 (plain, and the
production TLS config of ``tests/secure_broker.py``); the scaffolding is ``tests/daemon_rig.py``.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from tests.daemon_rig import Net, Rig, report
from tests.helpers import wait_until

pytestmark = [pytest.mark.broker]


def test_a_report_whose_connection_dies_while_it_is_recorded_is_delivered_again(any_net: Net, tmp_path: Path) -> None:
    """While the daemon writes canary.json with dev0's report, its connection is cut (as a
    crash of the process at that moment leaves it). The broker has no PUBACK for the report
    yet: it delivers it again on the reconnect, where it is a duplicate of the recorded one
    (refused, counted): applied once. Over TLS paho acknowledged on receipt, before the record."""
    with Rig(any_net, tmp_path) as rig:
        daemon = rig.make_daemon(init=True).start()
        ask = rig.open_canary_round()
        writing, cut = rig.hold_report_records()
        rig.devices[0].send("update", report(ask))
        assert writing.wait(15), "the report's record"
        rig.cut_connection()
        cut.set()
        wait_until(lambda: daemon.core.counters["canary_rejected"] >= 1, 20, "the broker's redelivery")
        counters = rig.canary_counters()
    assert counters["canary_reports"] == 1 and counters["canary_reject:canary_duplicate"] == 1, counters
    assert rig.recorded_reports() == {"dev0": [10, 0, 0, 0]}


def test_a_report_dropped_by_a_storage_failure_is_delivered_again_after_recovery(any_net: Net, tmp_path: Path) -> None:
    """Recording dev0's report fails (ENOSPC): the daemon drops the batch and rebuilds its core,
    which refuses canary reports while storage fails (the recorded round is resumed only once
    it works). The report's PUBACK is withheld throughout: the broker delivers it again, and
    once storage works again (the probe) the recovered core records it, once."""
    with Rig(any_net, tmp_path) as rig:
        daemon = rig.make_daemon(init=True, storage_probe_s=0.5).start()
        ask = rig.open_canary_round()
        failed = rig.fail_first_report_record()
        rig.devices[0].send("update", report(ask))
        wait_until(lambda: bool(failed), 15, "the failed record")
        wait_until(lambda: rig.recorded_reports() != {}, 30, "the report recorded after the recovery")
        time.sleep(1.0)  # (a second delivery would be refused as a duplicate by now)
        counters = rig.canary_counters()
        storage_failures, redeliveries = daemon.storage_failures, daemon.transport.redeliveries
    assert storage_failures == 1 and redeliveries >= 1
    assert counters.get("canary_reports") == 1, counters
    assert rig.recorded_reports() == {"dev0": [10, 0, 0, 0]}


def test_a_stop_without_drain_acknowledges_no_message_it_did_not_handle(plain_net: Net, tmp_path: Path) -> None:
    """SIGTERM (``stop(drain=False)``) while the actor handles a pull and dev0's report waits in
    its inbox, read from the same segment: the report is abandoned, so its PUBACK must not go
    out with the final status and the DISCONNECT. The next daemon on the state dir gets it from
    the broker and records it. (Plain TCP: over TLS paho reads one record per wake-up, so the
    report would still be unread in the socket.)"""
    with Rig(plain_net, tmp_path) as rig:
        daemon = rig.make_daemon(init=True, max_batch=1).start()
        go = rig.queue_report_behind_a_pull(rig.open_canary_round())
        stopping = threading.Thread(target=daemon.stop, kwargs={"drain": False})
        stopping.start()
        wait_until(lambda: not daemon.transport.connected, 15, "the disconnect")
        go.set()
        stopping.join(15)
        assert rig.recorded_reports() == {}, "the report was abandoned, not handled"
        rig.make_daemon().start()
        wait_until(lambda: rig.recorded_reports() != {}, 15, "the report, delivered to the next daemon")
        counters = rig.canary_counters()
    assert counters.get("canary_reports") == 1, counters
    assert rig.recorded_reports() == {"dev0": [10, 0, 0, 0]}
