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


def test_a_status_stamped_alive_before_stop_never_follows_the_final_one(plain_net: Net, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """helper-146: the actor stamped a status ``alive: true`` (the beat's, or a batch's), stop()
    on the signal's thread then published the final ``alive: false`` ("stopped"), and the actor's
    publish went out after it. Retained, the broker kept ``alive: true`` for a coordinator that had
    stopped cleanly (no last will): devices that fail over on ``alive: false`` stayed, and
    ``edgeci status`` said live until the heartbeat ran out."""
    import json

    from coordinator import daemon as daemon_module
    from edge_sdk.core.events import Publish
    from edge_sdk.mqtt import MqttTransport
    from edge_sdk.wire import topics
    from edge_sdk.wire.codec import status_json

    with Rig(plain_net, tmp_path) as rig:
        daemon = rig.make_daemon(init=True, canary_round=False).start()
        settled = threading.Event()
        daemon.actor.call(settled.set)  # after the start's batches (their status included)
        assert settled.wait(10)
        time.sleep(0.2)
        stamped, final_sent, late_sent = threading.Event(), threading.Event(), threading.Event()
        real_stamp = daemon_module.stamp_status

        def stamp(payload: bytes, **kw: object) -> bytes:
            out = real_stamp(payload, **kw)  # type: ignore[arg-type]
            if daemon.actor.on_thread and kw.get("alive") and not stamped.is_set():
                stamped.set()
                final_sent.wait(3.0)  # stop() runs now, on its own thread (its final status waits for this one now)
            return out

        real_publish = daemon.transport.publish

        def publish(topic: str, payload: bytes, **kw: object) -> None:
            real_publish(topic, payload, **kw)  # type: ignore[arg-type]
            if topic == daemon._status_topic and b'"reason": "stopped"' in payload and not final_sent.is_set():
                final_sent.set()
                late_sent.wait(2.0)  # (the old code: the actor's alive status goes out now, before the disconnect)
            elif topic == daemon._status_topic and final_sent.is_set():
                late_sent.set()

        monkeypatch.setattr(daemon_module, "stamp_status", stamp)
        monkeypatch.setattr(daemon.transport, "publish", publish)
        daemon.actor.call(lambda: daemon._perform(Publish(topic=daemon._status_topic,  # as the beat does
                                                          payload=status_json(daemon.core.status()), qos=1, retain=True)))
        assert stamped.wait(10)
        daemon.stop(drain=False)
        retained: list[bytes] = []
        reader = MqttTransport(plain_net.url, client_id="status-reader", clean_session=True,
                               subscriptions=[topics.status_topic(plain_net.region)],
                               on_message=lambda topic, payload: retained.append(payload))
        reader.start()
        try:
            wait_until(lambda: bool(retained), 10, "the retained status")
        finally:
            reader.stop()
    status = json.loads(retained[-1])
    assert status["alive"] is False and status.get("reason") == "stopped", status
