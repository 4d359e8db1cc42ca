"""Scale-out on an existing distributed broker: a two-node RabbitMQ cluster (MQTT plugin,
started by the test on 127.0.0.1, ``tests/rabbitmq.py``) carries the main flow with the
coordinator on node 1 and the devices on node 2.

What this measures about RabbitMQ 3.10 (Debian 12), stated in docs/deployment.md:

* **QoS 1 across nodes** works: every message published at QoS 1 on node 2 reaches a
  ``clean_session=False`` subscriber on node 1 exactly once and in order (the subscriber's queue
  lives on the node it connected to; RabbitMQ routes to it over the cluster link).
* **Retained messages are node-local**: the MQTT plugin keeps them in a per-node store
  (``mqtt.retained_message_store``, DETS by default), not replicated. The coordinator's retained
  status (published on node 1) is delivered to a new subscriber on node 1 but *not* to one on
  node 2; a subscriber on node 2 sees only statuses published while it is subscribed (after
  every accepted update, and every ``status_interval_s``). The same holds for the region's
  retained recall, which devices do read (the epoch; the versions a rollback or pin abandoned).
  The main flow does not rely on a retained message (models and acks are addressed QoS 1
  messages), so it is unaffected; point ``edgeci status`` (and anything else reading retained
  topics) at the coordinator's node.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from coordinator.daemon import CoordinatorDaemon, CoordinatorOptions
from coordinator.registry import Registry
from edge_sdk.client import EdgeClient
from edge_sdk.core.device import Phase
from edge_sdk.mqtt import MqttTransport
from edge_sdk.tasks import get_task
from edge_sdk.tasks.base import TrainConfig
from edge_sdk.wire import topics
from edge_sdk.wire.codec import parse_status_json
from tests.helpers import wait_until
from tests.rabbitmq import RabbitMqCluster

pytestmark = [pytest.mark.broker, pytest.mark.slow]
REGION = "rmq"
DEVICES = 4



class Listener:
    """A raw MQTT client that records (topic, payload) in arrival order."""

    def __init__(self, url: str, client_id: str, subscriptions: list[str], *, clean_session: bool = True) -> None:
        self.got: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self.t = MqttTransport(url, client_id=client_id, subscriptions=subscriptions, on_message=self._on,
                               clean_session=clean_session)
        self.t.start()

    def _on(self, topic: str, payload: bytes) -> None:
        with self._lock:
            self.got.append((topic, payload))

    def payloads(self) -> list[bytes]:
        with self._lock:
            return [p for _, p in self.got]

    def clear(self) -> None:
        with self._lock:
            self.got.clear()

    def close(self) -> None:
        self.t.stop()


def retained(url: str, client_id: str, topic: str, wait_s: float) -> bytes | None:
    """Subscribe afresh to ``topic``: the retained message, or None within ``wait_s``."""
    listener = Listener(url, client_id, [topic])
    try:
        deadline = time.monotonic() + wait_s
        while not listener.payloads() and time.monotonic() < deadline:
            time.sleep(0.05)
        got = listener.payloads()
        return got[0] if got else None
    finally:
        listener.close()


def test_main_flow_across_a_two_node_rabbitmq_cluster(rabbitmq_cluster: RabbitMqCluster, tmp_path: Path) -> None:
    cluster = rabbitmq_cluster
    node1, node2 = (n.url for n in cluster.nodes)
    assert node1 != node2
    assert cluster.running_nodes() == ["rabbit1@localhost", "rabbit2@localhost"]
    print(f"\nRabbitMQ cluster up in {cluster.timings['start_s']:.1f} s "
          f"(boot {cluster.timings['boot_s']:.1f} s, join {cluster.timings['join_s']:.1f} s)")

    # -- QoS 1 across nodes: published on node 2, subscribed (persistent session) on node 1
    probe_topic = topics.peer_topic("probe", "qos1")
    sink = Listener(node1, "qos1-sink", [probe_topic], clean_session=False)
    source = MqttTransport(node2, client_id="qos1-source", subscriptions=[], on_message=lambda t, p: None, clean_session=True)
    source.start()
    try:
        # SUBACK is asynchronous: publish a marker until one arrives, then the numbered run
        deadline = time.monotonic() + 20
        while not sink.payloads():
            assert time.monotonic() < deadline, "the node 1 subscription never received from node 2"
            source.publish(probe_topic, b"marker")
            time.sleep(0.1)
        time.sleep(0.3)
        sink.clear()
        n_probe = 300
        t0 = time.monotonic()
        for i in range(n_probe):
            source.publish(probe_topic, i.to_bytes(4, "big") + bytes(1000))
        big = bytes(range(256)) * 1200  # ~300 KB in one message, across the cluster link
        source.publish(probe_topic, big)
        wait_until(lambda: len([p for p in sink.payloads() if p != b"marker"]) >= n_probe + 1, 30, "QoS 1 messages from node 2 on node 1")
        cross_s = time.monotonic() - t0
        time.sleep(0.5)  # a duplicate would arrive now
        got = [p for p in sink.payloads() if p != b"marker"]
        assert [int.from_bytes(p[:4], "big") for p in got[:n_probe]] == list(range(n_probe)), "lost, duplicated or reordered"
        assert got[n_probe:] == [big]
        print(f"QoS 1 node 2 -> node 1: {n_probe} x 1 KB + 1 x {len(big) // 1000} KB in {cross_s:.2f} s, "
              "each exactly once, in order")

        # -- retained messages: kept by the node they were published on
        kept_topic = topics.peer_topic("probe", "retained")
        source.publish(kept_topic, b"kept-on-node-2", retain=True)
        wait_until(lambda: retained(node2, "kept-n2", kept_topic, 1.0) == b"kept-on-node-2", 10, "the retained probe on node 2")
        from_node1 = retained(node1, "kept-n1", kept_topic, 3.0)
        print(f"retained probe (published on node 2): node 2 yes, node 1 {'yes' if from_node1 is not None else 'no'}")
        assert from_node1 is None, "retained messages are replicated now: update docs/deployment.md"
    finally:
        source.stop()
        sink.close()

    task = get_task("digits")
    pool = task.data().pool
    daemon = CoordinatorDaemon(
        CoordinatorOptions(broker=node1, region=REGION, state_dir=tmp_path / "coord",
                           strategy_params={"k": 2, "timeout_s": 1.5}),
        task=task,
    )
    with daemon:
        # -- retained messages are per node: the coordinator's status (retained, on node 1)
        status_topic = topics.status_topic(REGION)
        wait_until(lambda: retained(node1, "status-n1", status_topic, 2.0) is not None, 20, "the retained status on node 1")
        assert parse_status_json(retained(node1, "status-n1", status_topic, 5.0) or b"")["region"] == REGION
        on_node2 = retained(node2, "status-n2", status_topic, 3.0)
        print(f"retained status (published on node 1): new subscriber on node 1 gets it, on node 2 "
              f"{'gets it' if on_node2 is not None else 'gets nothing'}")
        assert on_node2 is None, (
            "a retained message published on node 1 reached a new subscriber on node 2: RabbitMQ now replicates "
            "retained messages; update docs/deployment.md and this test")
        # devices do read one retained topic: the region's recall (the epoch, and the versions a rollback or
        # pin abandoned), announced at start; a device subscribing on node 2 does not get it either
        recall_topic = topics.recall_topic(REGION)
        wait_until(lambda: retained(node1, "recall-n1", recall_topic, 2.0) is not None, 20, "the retained recall on node 1")
        recall_on_node2 = retained(node2, "recall-n2", recall_topic, 3.0)
        print(f"retained recall (published on node 1): new subscriber on node 2 "
              f"{'gets it' if recall_on_node2 is not None else 'gets nothing'}")
        assert recall_on_node2 is None, "the recall reached node 2: update docs/deployment.md and this test"
        live = Listener(node2, "status-live-n2", [topics.status_topic(REGION)])  # live statuses do cross nodes

        accepted: list[tuple[str, int]] = []
        lock = threading.Lock()
        clients: list[EdgeClient] = []
        try:
            for i in range(DEVICES):
                name = f"dev{i}"
                c = EdgeClient(broker=node2, device_id=name, region=REGION, task=task, data_dir=tmp_path / name,
                               min_samples=3, train=TrainConfig(epochs=1, seed=i), request_timeout_s=3.0, seed=i,
                               inference="torch")

                def acked(kind: str, data: dict[str, Any], name: str = name) -> None:
                    if data["status"] == "accepted":
                        with lock:
                            accepted.append((name, int(data["seq"])))

                c.on("update_acked", acked)
                clients.append(c.start())

            # devices label samples on node 2; the coordinator on node 1 aggregates
            t0 = time.monotonic()
            sample = 0
            while daemon.core.version < 3 or len(accepted) < 6:
                assert time.monotonic() - t0 < 40, f"only version {daemon.core.version}, {len(accepted)} accepted"
                for c in clients:
                    c.add_sample(pool.x[sample], int(pool.y[sample]))
                    sample += 1
                time.sleep(0.15)
            # quiet: no device mid-round, nothing buffered, the last timeout fired
            wait_until(lambda: all(c.core.state.phase is Phase.IDLE for c in clients) and daemon.core.status().buffered == 0,
                       20, "devices idle and the coordinator's buffer empty")
            flow_s = time.monotonic() - t0
            latest = daemon.core.version
            # devices receive the new version on their next pull (one more label each)
            for c in clients:
                c.add_sample(pool.x[sample], int(pool.y[sample]))
                sample += 1
            for c in clients:
                assert c.wait_for_version(latest, timeout=20), f"{c.core.config.device_id} never received version {latest}"
            wait_until(lambda: all(c.core.state.phase is Phase.IDLE for c in clients) and daemon.core.status().buffered == 0,
                       20, "the last round to settle")
            wait_until(lambda: any(parse_status_json(p)["version"] >= latest for p in live.payloads()), 10,
                       "a live status on node 2")
        finally:
            for c in clients:
                c.stop()
            live.close()
        counters = dict(daemon.core.counters)  # a Counter: absent keys are 0

    # -- the registry: versions without gaps, every accepted update applied exactly once
    reg = Registry(tmp_path / "coord", task.spec)
    versions = reg.versions()
    assert versions == list(range(0, versions[-1] + 1)) and versions[-1] >= 3, versions
    consumed: list[tuple[str, int]] = []
    for v in versions[1:]:
        consumed += [(d, int(s)) for d, s in reg.read_version(v)[1].get("consumed", [])]
    assert len(consumed) == len(set(consumed)), "an update was applied twice"
    missing = sorted(set(accepted) - set(consumed))
    assert not missing, f"acked as accepted but never applied: {missing}"
    applied_upto = reg.read_version(versions[-1])[1]["applied_upto"]
    for device, seq in accepted:
        assert applied_upto.get(device, -1) >= seq, (device, seq, applied_upto)
    assert {d for d, _ in accepted} == {f"dev{i}" for i in range(DEVICES)}
    assert counters.get("rejected", 0) == 0 and counters.get("accepted", 0) == len(accepted), counters
    print(f"main flow: {len(accepted)} updates accepted and applied over versions 1..{versions[-1]} in {flow_s:.1f} s; "
          f"{DEVICES} devices on node 2 received version {latest}")
