"""stop(drain=True) and the coordinator's held PUBACKs (helper-129): the queued messages a
drain handles are acknowledged before the DISCONNECT, so the next start on the state dir does
not get them again from the broker as duplicates. Over a real mosquitto on 127.0.0.1 (plain).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from edge_sdk.mqtt import STOP_DRAIN_S
from tests.daemon_rig import Net, Rig
from tests.helpers import wait_until

pytestmark = [pytest.mark.broker]


def test_a_drained_stop_acknowledges_what_it_handled(plain_net: Net, tmp_path: Path) -> None:
    """stop() (drain) while the actor handles a pull for longer than the transport waits for the
    final status's PUBACK (STOP_DRAIN_S; the actor reads it) and dev0's canary report waits in
    its inbox: the drain records the report, and its PUBACK leaves before the DISCONNECT. Before,
    the transport disconnected first (its held PUBACKs void), the drain recorded the report
    anyway, and the next daemon got it again from the broker: refused as a duplicate, a
    ``canary_duplicate`` reject logged and counted for a report the operator's devices sent once."""
    with Rig(plain_net, tmp_path) as rig:
        daemon = rig.make_daemon(init=True, max_batch=1).start()
        go = rig.queue_report_behind_a_pull(rig.open_canary_round())
        stopping = threading.Thread(target=daemon.stop)
        stopping.start()
        time.sleep(STOP_DRAIN_S + 1.0)  # a batch longer than the transport waits for the final status's PUBACK
        go.set()
        stopping.join(20)
        assert rig.recorded_reports() == {"dev0": [10, 0, 0, 0]}, "the drain recorded the report"
        daemon = rig.make_daemon().start()
        wait_until(lambda: daemon.core.counters.get("canary_resumed", 0) >= 1 or daemon.actor.batches >= 1, 10, "the start")
        time.sleep(2.0)  # a redelivery comes at once on the connect
        counters = rig.canary_counters()
    assert "canary_reject:canary_duplicate" not in counters and "canary_rejected" not in counters, counters
    assert rig.recorded_reports() == {"dev0": [10, 0, 0, 0]}
