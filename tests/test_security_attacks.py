"""Issue 9's attacks, tried over the production broker config (mosquitto, TLS client
certificates, the ACL made by ``edgeci pki``) against a real coordinator and real devices.

The attacker ("mallory") is a provisioned device — the ACL confines it to its own topics,
so what it can still try is what the protocol must survive: a seq far above its watermark,
an absurd sample count, a forged invitation, a pull flood. A forged model needs write access
to a device's model topic, which only coordinator identities have: the test uses the
coordinator's own TLS identity with a signing key that is not the coordinator's (a stolen
certificate, or a misconfigured broker) and shows the signature check holds. Every test
also shows honest devices being served, so a coordinator that ignores everything cannot pass.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.daemon import CoordinatorDaemon, CoordinatorOptions
from edge_sdk.client import EdgeClient
from edge_sdk.mqtt import BrokerAuth, MqttTransport
from edge_sdk.signing import Signer
from edge_sdk.tasks import get_task
from edge_sdk.tasks.base import TrainConfig
from edge_sdk.wire import topics
from edge_sdk.wire.codec import decode, encode, parse_status_json
from edge_sdk.wire.messages import Ack, ModelMsg, Pull, Update
from tests.helpers import CoordinatorProcess, wait_until
from tests.secure_broker import SECURE_REGION, SecureBroker

pytestmark = [pytest.mark.broker]
R = SECURE_REGION
ROOT = Path(__file__).resolve().parents[1]



class Raw:
    """A raw MQTT client with one identity's certificate: publishes what it likes, records
    what it receives."""

    def __init__(self, broker: SecureBroker, name: str, role: str = "device", subscriptions: list[str] | None = None) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.t = MqttTransport(broker.url, client_id=f"raw-{name}-{os.getpid()}", subscriptions=subscriptions or [],
                               on_message=self._on, clean_session=True, auth=BrokerAuth.from_bundle(broker.bundle(name, role)))
        self.t.start(10)

    def _on(self, topic: str, payload: bytes) -> None:
        with self.lock:
            self.messages.append((topic, payload))

    def acks(self) -> list[Ack]:
        with self.lock:
            out = [decode(p) for t, p in self.messages if t.endswith("/ack")]
        return [a for a in out if isinstance(a, Ack)]

    def close(self) -> None:
        self.t.stop()


def update(device: str, seq: int, *, n: int = 4, base: int = 0, value: float = 0.0) -> bytes:
    spec = get_task("digits").spec
    w = np.full(spec.size, value, dtype=np.float32)
    return encode(Update(device=device, seq=seq, model_id=spec.model_id, base_version=base, n_samples=n, weights=w, nonce=seq + 1))


@pytest.fixture
def fleet(secure_broker: SecureBroker, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A coordinator daemon (its bundle) and two honest devices (theirs) over TLS + ACL."""
    task = get_task("digits")
    daemon = CoordinatorDaemon(
        CoordinatorOptions(require_pull=False, broker=secure_broker.url, region=R, state_dir=tmp_path / "coord", coordinator_id="coord-sec",
                           strategy_params={"k": 2, "timeout_s": 1.0}, bundle=secure_broker.bundle("coord-sec", "coordinator")),
        task=task,
    ).start()
    clients = [
        EdgeClient(broker=secure_broker.url, device_id=name, region=R, task=task, data_dir=tmp_path / name, min_samples=3,
                   train=TrainConfig(epochs=1, lr=0.05, seed=i), request_timeout_s=3.0, seed=i, inference="torch",
                   bundle=secure_broker.bundle(name)).start(15)
        for i, name in enumerate(("devA", "devB"))
    ]
    try:
        yield {"daemon": daemon, "clients": clients, "task": task}
    finally:
        for c in clients:
            c.stop()
        daemon.stop()


def label(clients: list[EdgeClient], task: Any, start: int, n: int) -> None:
    pool = task.data().pool
    for c in clients:
        for k in range(start, start + n):
            c.add_sample(pool.x[k % len(pool.y)], int(pool.y[k % len(pool.y)]))


def test_forged_models_are_not_deployed_and_are_counted(secure_broker: SecureBroker, fleet: dict[str, Any]) -> None:
    daemon, (dev_a, dev_b), task = fleet["daemon"], fleet["clients"], fleet["task"]
    wait_until(lambda: dev_a.ready and dev_b.ready, 30, "devices to hold the release (serving request at start)")
    rejected: list[dict[str, Any]] = []
    dev_a.on("message_rejected", lambda kind, data: rejected.append(data))
    notes: list[Any] = []
    dev_a.on("*", lambda kind, data: notes.append((time.time(), kind, data)))
    before = dev_a.version
    assert before is not None
    # the coordinator's TLS identity (the ACL lets it write model topics), without its signing key
    rogue = Raw(secure_broker, "coord-sec", "coordinator")
    try:
        spec = task.spec
        forged = ModelMsg(model_id=spec.model_id, version=10**9, reply_to=-1,
                          weights=np.random.default_rng(0).normal(size=spec.size).astype(np.float32), release=10**9)
        topic = topics.device_topic(R, "devA", "model")
        rogue.t.publish(topic, encode(forged, signer=Signer.generate(), scope=topics.signing_scope(topic)))  # a key devA does not trust
        rogue.t.publish(topic, encode(forged))  # unsigned
        wait_until(lambda: len(rejected) >= 2, 15, "devA to reject both forged models")
    finally:
        rogue.close()
    assert sorted(r["reason"] for r in rejected) == ["bad_signature", "unsigned"]
    assert dev_a.version == before  # never deployed
    counters = dev_a.core.state.counters
    assert counters["rejected:bad_signature"] == 1 and counters["rejected:unsigned"] == 1
    # and the genuine protocol goes on: devA's updates are applied, a real version arrives
    v = daemon.core.version
    label([dev_a, dev_b], task, 0, 6)
    wait_until(lambda: daemon.core.version > v, 60, "a version from the devices' updates")
    label([dev_a], task, 6, 1)  # its next label pulls: the reply is the new release
    wait_until(lambda: (dev_a.version or 0) > before, 60, "devA to deploy a genuine new version")
    assert not [n for n in notes if n[1] == "message_rejected" and n[0] > 0][2:], notes
    assert (dev_a.version or 0) < 10**9


def test_seq_jump_and_sample_count_attacks_fail(secure_broker: SecureBroker, fleet: dict[str, Any]) -> None:
    daemon, clients, task = fleet["daemon"], fleet["clients"], fleet["task"]
    mallory = Raw(secure_broker, "mallory", subscriptions=[topics.device_topic(R, "mallory", "ack")])
    try:  # (Raw returns once the broker has acknowledged its subscriptions)
        up = topics.device_topic(R, "mallory", "update")
        mallory.t.publish(up, update("mallory", 1))  # a normal first update: accepted
        wait_until(lambda: len(mallory.acks()) == 1, 15, "mallory's first ack")
        mallory.t.publish(up, update("mallory", 10**15))  # poison the watermark
        mallory.t.publish(up, update("mallory", 2, n=2**62))  # outweigh the fleet
        wait_until(lambda: len(mallory.acks()) == 3, 15, "acks for both attacks")
        statuses = [(a.seq, a.status, a.reason) for a in mallory.acks()]
        assert statuses == [(1, "accepted", ""), (10**15, "rejected", "seq_jump"), (2, "rejected", "n_samples")]
        # the watermark did not move: mallory's next genuine seq is still accepted
        mallory.t.publish(up, update("mallory", 2))
        wait_until(lambda: len(mallory.acks()) == 4, 15, "the next genuine update's ack")
        assert mallory.acks()[-1].status == "accepted"
    finally:
        mallory.close()
    assert daemon.core.counters["reject:seq_jump"] == 1 and daemon.core.counters["reject:n_samples"] == 1
    # honest devices' updates keep being applied
    v = daemon.core.version
    label(clients, task, 0, 6)
    wait_until(lambda: daemon.core.version > v and {"devA", "devB"} <= set(daemon.core.applied_upto), 60,
               "a version with both honest devices' updates")
    assert daemon.core.applied_upto.get("mallory", -1) <= 2  # the watermark never jumped


def test_forged_invitation_does_not_bypass_fedbuff_selection(secure_broker: SecureBroker, tmp_path: Path) -> None:
    daemon = CoordinatorDaemon(
        CoordinatorOptions(require_pull=False, broker=secure_broker.url, region=R, state_dir=tmp_path / "coord", coordinator_id="coord-sec",
                           strategy="fedbuff", strategy_params={"k": 2, "select": 1, "population": 50},
                           bundle=secure_broker.bundle("coord-sec", "coordinator")),
    ).start()
    mallory = Raw(secure_broker, "mallory", subscriptions=[topics.device_topic(R, "mallory", leaf) for leaf in ("model", "ack")])
    try:
        spec = daemon.task.spec
        for seq in range(5):  # five pulls, each naming an invitation that was never sent
            pull = Pull(device="mallory", seq=seq, model_id=spec.model_id, invite_round=100 + seq)
            mallory.t.publish(topics.device_topic(R, "mallory", "pull"), encode(pull))
        wait_until(lambda: daemon.core.counters["invite_unknown"] >= 5, 15, "the forged invitations to be counted")
        time.sleep(0.5)
        with mallory.lock:
            models = [t for t, _ in mallory.messages if t.endswith("/model")]
        assert models == [], "a forged invitation was served a model"
        assert daemon.core.counters["pulls_served"] == 0
    finally:
        mallory.close()
        daemon.stop()


def rss_mb(pid: int, key: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {key} for {pid}")


@pytest.mark.slow
def test_pull_flood_leaves_memory_bounded_and_honest_devices_served(secure_broker: SecureBroker, tmp_path: Path) -> None:
    task = get_task("digits")
    watcher = Raw(secure_broker, "ops", "operator", subscriptions=[topics.status_topic(R)])
    coord = CoordinatorProcess("--broker", secure_broker.url, "--region", R, "--id", "coord-sec",
                               "--bundle", str(secure_broker.bundle("coord-sec", "coordinator")),
                               "--state-dir", str(tmp_path / "coord"), "--k", "2", "--timeout", "1", "--status-interval", "1")
    try:
        with EdgeClient(broker=secure_broker.url, device_id="devA", region=R, task=task, data_dir=tmp_path / "devA",
                        min_samples=2, train=TrainConfig(epochs=1), request_timeout_s=3.0, inference="torch",
                        bundle=secure_broker.bundle("devA")) as honest:
            wait_until(lambda: honest.ready, 30, "the honest device's first model")
            time.sleep(1.0)
            before = rss_mb(coord.pid)
            mallory = Raw(secure_broker, "mallory")
            pull = encode(Pull(device="mallory", seq=1, model_id=task.spec.model_id))
            topic = topics.device_topic(R, "mallory", "pull")
            t0 = time.monotonic()
            for _ in range(20_000):
                mallory.t.publish(topic, pull, qos=0)
            flood_s = time.monotonic() - t0
            # while the flood drains, the honest device labels, pulls, trains and gets its update accepted
            pool = task.data().pool
            acked: list[dict[str, Any]] = []
            honest.on("update_acked", lambda kind, data: acked.append(data))
            t1 = time.monotonic()
            for k in range(4):
                honest.add_sample(pool.x[k], int(pool.y[k]))
            wait_until(lambda: any(a["status"] == "accepted" for a in acked), 90, "the honest device's update accepted during the flood")
            served_s = time.monotonic() - t1

            def rate_limited() -> int:
                with watcher.lock:
                    last = [p for t, p in watcher.messages if t.endswith("/status")][-1:]
                extra = parse_status_json(last[0]).get("extra", {}) if last else {}
                return int(extra.get("rejected_by_reason", {}).get("rate_limited", 0))

            wait_until(lambda: rate_limited() >= 19_000, 120, "the coordinator to drop the flood (rate_limited)")
            after, peak = rss_mb(coord.pid), rss_mb(coord.pid, "VmHWM")
            mallory.close()
        print(f"flood of 20,000 pulls sent in {flood_s:.2f} s; coordinator RSS {before:.0f} → {after:.0f} MB "
              f"(peak {peak:.0f}); the honest device's update was accepted {served_s:.1f} s after labelling")
        assert after - before < 150, f"coordinator memory grew by {after - before:.0f} MB under the flood"
    finally:
        watcher.close()
        coord.close()
