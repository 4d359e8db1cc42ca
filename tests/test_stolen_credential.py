"""Red team (helper-159): an attacker holding ONE valid device certificate and key (taken from
a headset), and separately the operator of ONE peer region's coordinator that turned hostile.

Everything runs on the real objects: mosquitto with the production config (TLS client
certificates, the ACL and CRL made by ``edgeci pki``), a real coordinator daemon, real
EdgeClients for the honest devices, and a raw MQTT client for the attacker. Each attempt
either is blocked by the broker, refused by the coordinator (typed reason, counted, nothing
changes), or is a gap: fixed here, or — where the fix belongs to ``coordinator/core.py`` —
a strict xfail that passes once the proposed change lands.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.daemon import CoordinatorDaemon, CoordinatorOptions
from edge_sdk.client import EdgeClient
from edge_sdk.errors import TransportError
from edge_sdk.mqtt import BrokerAuth, MqttTransport
from edge_sdk.signing import load_or_create_signer
from edge_sdk.tasks import get_task
from edge_sdk.tasks.base import TrainConfig
from edge_sdk.wire import topics
from edge_sdk.wire.codec import decode, encode
from edge_sdk.wire.messages import Ack, PeerMsg, Update
from tests.helpers import wait_until
from tests.secure_broker import SECURE_REGION, SecureBroker

pytestmark = [pytest.mark.broker]
R = SECURE_REGION
ROOT = Path(__file__).resolve().parents[1]


class Raw:
    """A raw MQTT client of one identity: publishes what it likes, records what it receives."""

    def __init__(self, broker: SecureBroker, name: str, role: str = "device", subscriptions: list[str] | None = None,
                 regions: tuple[str, ...] = (R,), auth: BrokerAuth | None = None) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.t = MqttTransport(broker.url, client_id=name, subscriptions=subscriptions or [], on_message=self._on,
                               clean_session=True, auth=auth or BrokerAuth.from_bundle(broker.bundle(name, role, regions)))
        self.t.start(10)

    def _on(self, topic: str, payload: bytes) -> None:
        with self.lock:
            self.messages.append((topic, payload))

    def got(self, topic: str | None = None) -> list[bytes]:
        with self.lock:
            return [p for t, p in self.messages if topic is None or t == topic]

    def close(self) -> None:
        self.t.stop()


# ---------------------------------------------------------------------- 1. what the broker blocks


def test_one_device_certificate_reaches_no_topic_but_its_own(secure_broker: SecureBroker) -> None:
    """devB's stolen certificate tries every topic it has no business on: another device's
    upstream (update, pull, presence: also the only way to fill ``max_devices`` with new ids) and
    downstream (model, ack, invite), the coordinator's topics (status, control, recall, retained
    for the next start), the peer topics, its own name in a region it does not belong to; and
    subscribes to ``#``, ``$SYS/#``, every device's updates and every peer message. The broker
    delivers none of it. A last message on devB's own update topic, on the same connection (QoS 1,
    in order), arrives: so would the earlier ones have, had the ACL let them through."""
    a = {leaf: topics.device_topic(R, "devA", leaf) for leaf in ("update", "pull", "presence", "model", "ack", "invite")}
    own_update = topics.device_topic(R, "devB", "update")
    elsewhere = topics.device_topic("other", "devB", "update")
    coordinator_reads = [topics.device_filter(R, "update"), topics.device_filter(R, "pull"), topics.device_filter(R, "presence"),
                         topics.status_topic(R), topics.control_topic(R), topics.recall_topic(R),
                         topics.peer_filter("coord-sec"), topics.peer_filter("all")]
    coord = Raw(secure_broker, "coord-sec", "coordinator", coordinator_reads)
    other = Raw(secure_broker, "coord-other", "coordinator", [topics.device_filter("other", "update")], regions=("other",))
    dev_a = Raw(secure_broker, "devA", subscriptions=[a["model"], a["ack"], a["invite"]])
    spy = ["#", "$SYS/#", f"{topics.ROOT}/#", topics.device_filter(R, "update"), f"{topics.ROOT}/peer/#"]
    thief = Raw(secure_broker, "devB", subscriptions=spy)
    try:
        forged = [a["update"], a["pull"], a["presence"], a["model"], a["ack"], a["invite"], topics.status_topic(R),
                  topics.control_topic(R), topics.recall_topic(R), topics.peer_topic("coord-sec", "token"),
                  topics.peer_topic("all", "beat"), elsewhere]
        for topic in forged:
            thief.t.publish(topic, b"forged by devB", retain=True)
        thief.t.publish(own_update, b"devB's own")
        wait_until(lambda: coord.got(own_update) == [b"devB's own"], 10, "devB's own update at the coordinator")
        # the honest traffic the thief would like to read
        dev_a.t.publish(a["update"], b"devA's update")
        coord.t.publish(a["model"], b"devA's model")
        coord.t.publish(topics.peer_topic("all", "beat"), b"a peer beat")
        wait_until(lambda: dev_a.got(a["model"]) == [b"devA's model"], 10, "devA's model")
        wait_until(lambda: b"a peer beat" in coord.got(), 10, "the beat, echoed to its sender")
        time.sleep(0.5)
        assert thief.got() == [], thief.messages[:5]
        # (devA's update and the beat come from two connections: the broker may deliver them in either order)
        got = coord.got()
        assert got[:1] == [b"devB's own"] and sorted(got[1:]) == [b"a peer beat", b"devA's update"], coord.messages
        assert dev_a.got() == [b"devA's model"] and other.got() == []
        assert not thief.t.refused_subscriptions  # mosquitto grants every SUBSCRIBE and filters on delivery
    finally:
        for c in (thief, dev_a, other, coord):
            c.close()
    # nothing forged was retained for the next subscriber (a coordinator starting, a device)
    late = Raw(secure_broker, "coord-sec", "coordinator", coordinator_reads)
    try:
        late.t.publish(topics.status_topic(R), b"the real status", retain=True)
        wait_until(lambda: late.got(topics.status_topic(R)) == [b"the real status"], 10, "the coordinator's own status")
        assert [p for p in late.got() if p == b"forged by devB"] == []
    finally:
        late.close()


# ---------------------------------------------------------------------- 2. revocation


def _pki(secure_broker: SecureBroker, *argv: str) -> str:
    """``edgeci pki ARGV --dir PKI`` as an operator runs it; its stdout."""
    done = subprocess.run([sys.executable, "-m", "demos.cli", "pki", *argv, "--dir", str(secure_broker.dir)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _apply(secure_broker: SecureBroker, said: str) -> str:
    """Do to the broker what ``edgeci pki`` told the operator to do: restart it, or reload it."""
    if "restart mosquitto" in said:
        secure_broker.broker.stop()
        secure_broker.broker.start()
        return "restart"
    assert "SIGHUP" in said or "kill -HUP" in said, said
    secure_broker.broker.reload()
    return "reload"


def test_a_stolen_certificate_connected_at_its_revocation_cannot_publish_once_its_name_is_issued_again(
        secure_broker: SecureBroker) -> None:
    """The thief holds a live connection with devB's certificate when the operator revokes devB
    and, following `edgeci pki`, reloads mosquitto. A reload puts the certificate on the CRL for
    its *next* TLS handshake and takes the name out of the ACL, but the connection it holds stays
    open; once the name is issued again for the replacement headset (the documented workflow)
    that connection publishes as devB again, with the revoked certificate (measured before the
    fix: its update reached the coordinator 1 s after the re-issue, and would for as long as the
    connection lasts). `edgeci pki revoke` and `issue` now say to restart mosquitto, which ends it."""
    up_b = topics.device_topic(R, "devB", "update")
    coord = Raw(secure_broker, "coord-sec", "coordinator", [topics.device_filter(R, "update")])
    thief = Raw(secure_broker, "devB")
    try:
        thief.t.publish(up_b, b"before")
        wait_until(lambda: coord.got(up_b) == [b"before"], 10, "the stolen certificate's update before the revocation")
        revoked = _pki(secure_broker, "revoke", "devB")
        how = _apply(secure_broker, revoked)
        reissued = _pki(secure_broker, "issue", "devB", "--role", "device", "--region", R)
        _apply(secure_broker, reissued)
        wait_until(lambda: coord.t.connected, 15, "the coordinator's connection (again, after a restart)")
        with contextlib.suppress(TransportError):  # (a refused reconnect: what matters is what reaches the coordinator)
            thief.t.publish(up_b, b"the revoked certificate, after the re-issue")
        replacement = Raw(secure_broker, "devB", auth=BrokerAuth.from_bundle(secure_broker.pki.bundle_dir("devB")))
        try:
            time.sleep(1.0)  # (the thief's publish went first; the replacement's connect ends its session)
            replacement.t.publish(up_b, b"the replacement")
            wait_until(lambda: b"the replacement" in coord.got(up_b), 10, "the replacement's update")
        finally:
            replacement.close()
        assert b"the revoked certificate, after the re-issue" not in coord.got(up_b), (how, coord.got(up_b))
    finally:
        thief.close()
        coord.close()


# ---------------------------------------------------------------------- 3. one credential, its own updates


def _accuracy(task: Any, weights: Any) -> float:
    return float(task.evaluate(weights, task.data().test)["accuracy"])


@pytest.fixture
def spin_fleet(secure_broker: SecureBroker, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """The daemon's defaults (SPIN, k = 10, timeout 30 s, no gate) over TLS + ACL, and two honest
    headsets that have trained it a little."""
    task = get_task("digits")
    daemon = CoordinatorDaemon(
        CoordinatorOptions(broker=secure_broker.url, region=R, state_dir=tmp_path / "coord", coordinator_id="coord-sec",
                           bundle=secure_broker.bundle("coord-sec", "coordinator")),
        task=task,
    ).start()
    assert daemon.options.strategy == "spin" and dict(daemon.options.strategy_params) == {"k": 10, "timeout_s": 30.0}
    clients = [EdgeClient(broker=secure_broker.url, device_id=name, region=R, task=task, data_dir=tmp_path / name,
                          min_samples=3, train=TrainConfig(epochs=1, lr=0.05, seed=i), request_timeout_s=3.0, seed=i,
                          inference="torch", bundle=secure_broker.bundle(name)).start(15)
               for i, name in enumerate(("devA", "devB"))]
    try:
        yield {"daemon": daemon, "clients": clients, "task": task}
    finally:
        for c in clients:
            c.stop()
        daemon.stop()


def test_one_device_certificate_cannot_fill_a_spin_buffer_with_updates_it_was_never_served_a_model_for(
        secure_broker: SecureBroker, spin_fleet: dict[str, Any]) -> None:
    """Mallory's certificate (a provisioned headset) never pulls: it sends k = 10 updates with
    consecutive seqs, each the current model plus a large step in one fixed direction, and again
    after each version. Measured before the fix (helper-159, this machine): all 1000 accepted in
    6.3 s, 100 versions each made of mallory's updates alone, every one clipped (clip x median)
    but in the same direction, and the deployed model's test accuracy went from 0.81 to 0.04.
    With the release gate (``--validation``) the release held at 0.82, but 980 of 1000 were
    accepted and the training line the honest devices train from was mallory's (0.68): every
    candidate rejected, the release frozen. An update should cost a served training pull (which
    the per-device token bucket rate-limits), as it already does under FedAvg, FedBuff, FedOpt."""
    daemon, task = spin_fleet["daemon"], spin_fleet["task"]
    acks: list[Ack] = []

    def on_ack(topic: str, payload: bytes) -> None:
        msg = decode(payload)
        if isinstance(msg, Ack):
            acks.append(msg)

    mallory = MqttTransport(secure_broker.url, client_id="mallory", subscriptions=[topics.device_topic(R, "mallory", "ack")],
                            on_message=on_ack, clean_session=True, auth=BrokerAuth.from_bundle(secure_broker.bundle("mallory")))
    mallory.start(10)
    try:
        before = _accuracy(task, daemon.core.weights)
        direction = np.random.default_rng(0).standard_normal(task.spec.size).astype(np.float32)
        up = topics.device_topic(R, "mallory", "update")
        seq = 0
        for _ in range(5):
            base, w = daemon.core.version, np.asarray(daemon.core.weights, dtype=np.float32)
            bad = w + 10.0 * direction * (float(np.abs(w).mean()) + 1e-3)
            for _ in range(10):
                seq += 1
                mallory.publish(up, encode(Update(device="mallory", seq=seq, model_id=task.spec.model_id, base_version=base,
                                                  n_samples=20, weights=bad, nonce=seq)))
            wait_until(lambda sent=seq: len(acks) >= sent, 30, "an answer to each of mallory's updates")
        after = _accuracy(task, daemon.core.weights)
    finally:
        mallory.stop()
    statuses = sorted({(a.status, a.reason) for a in acks})
    print(f"mallory: {seq} updates, answers {statuses}; accuracy {before:.3f} -> {after:.3f}")
    assert statuses == [("rejected", "not_selected")], statuses
    assert daemon.core.counters["reject:not_selected"] == seq
    assert after >= before - 0.02


# ---------------------------------------------------------------------- 4. a hostile peer region


@pytest.fixture
def hostile_ring(secure_broker: SecureBroker, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """coord-sec (a real daemon, Spyker peering, release gate on) in a ring with coord-evil, whose
    operator turned hostile: its real bundle (TLS identity, the model-signing key coord-sec trusts)
    in a raw client that sends what it likes."""
    task = get_task("digits")
    evil = secure_broker.bundle("coord-evil", "coordinator", ("evil",))  # before coord-sec starts: its trusted/ has it
    split = task.data().test
    validation = tmp_path / "validation.npz"
    np.savez(validation, x=split.x[:300], y=split.y[:300])
    daemon = CoordinatorDaemon(
        CoordinatorOptions(broker=secure_broker.url, region=R, state_dir=tmp_path / "coord", coordinator_id="coord-sec",
                           bundle=secure_broker.bundle("coord-sec", "coordinator"), peering="spyker",
                           peers=("coord-sec", "coord-evil"), validation=validation,
                           peering_params={"beacon_s": 0.5, "token_timeout_s": 3.0, "h_inter": 10.0}),
        task=task,
    ).start()
    signer, _ = load_or_create_signer(evil / "signing.key")
    heard: list[PeerMsg] = []

    def on_peer(topic: str, payload: bytes) -> None:
        msg = decode(payload)
        if isinstance(msg, PeerMsg) and msg.sender == "coord-sec":
            heard.append(msg)

    raw = MqttTransport(secure_broker.url, client_id="coord-evil", subscriptions=[topics.peer_filter("coord-evil"), topics.peer_filter("all")],
                        on_message=on_peer, clean_session=True, auth=BrokerAuth.from_bundle(evil))
    raw.start(10)

    def send(to: str, kind: str, body: dict[str, Any], weights: Any = None) -> None:
        topic = topics.peer_topic(to, kind)
        raw.publish(topic, encode(PeerMsg(sender="coord-evil", kind=kind, body=body, weights=weights), signer=signer,
                                  scope=topics.signing_scope(topic)))

    try:
        yield {"daemon": daemon, "task": task, "send": send, "raw": raw, "heard": heard, "signer": signer}
    finally:
        raw.stop()
        daemon.stop()


def test_a_hostile_peers_malformed_models_and_bodies_are_refused_typed_and_counted(hostile_ring: dict[str, Any]) -> None:
    daemon, task, send, raw = hostile_ring["daemon"], hostile_ring["task"], hostile_ring["send"], hostile_ring["raw"]
    core, size = daemon.core, task.spec.size
    weights, version = np.array(core.weights, copy=True), core.version
    sid = [0, 0.0, "coord-sec", 0]
    model = {"at": time.time(), "age": 5.0, "clients": 1, "pos": sid, "hold": True, "sid": sid}
    send("coord-sec", "model", model, np.full(size, np.nan, np.float32))
    send("coord-sec", "model", model, np.zeros(size - 1, np.float32))
    send("coord-sec", "model", model, np.full(size, 3e38, np.float32))
    send("all", "beat", {"at": 1e300, "age": 2.0**60, "clients": 2**63 - 1, "pos": [2**63 - 1, 0.0, "x", 0], "hold": True})
    send("all", "beat", {"at": float("nan"), "age": 1.0, "clients": 1, "pos": None, "hold": False})
    topic = topics.peer_topic("coord-sec", "model")
    raw.publish(topic, encode(PeerMsg(sender="coord-evil", kind="model", body=model, weights=weights)))  # unsigned
    raw.publish(topic, encode(PeerMsg(sender="coord-sec", kind="model", body=model, weights=weights),  # in coord-sec's name
                              signer=hostile_ring["signer"], scope=topics.signing_scope(topic)))
    expected = {"reject:non_finite": 1, "reject:shape_mismatch": 1, "reject:out_of_range": 1, "reject:malformed": 2,
                "reject:unsigned": 1, "reject:bad_signature": 1}
    wait_until(lambda: all(core.counters[k] >= n for k, n in expected.items()), 15, "every hostile message refused")
    assert {k: core.counters[k] for k in expected} == expected
    assert core.version == version and np.array_equal(core.weights, weights)
    assert core.peering.age == 0.0 and core.counters["peer_merges"] == 0


def test_a_hostile_peers_age_claim_cannot_inflate_this_regions_age_past_the_cap(hostile_ring: dict[str, Any]) -> None:
    """coord-evil plays Spyker well enough to have its models merged: it beats with an age far
    ahead (the holder then starts a sync) and answers each of coord-sec's syncs, as a member of the
    ring does, with a poisoned model and age 2**53. Before the fix (measured, this fixture): 3
    merges set coord-sec's age from 0 to 7.7e15; the gate rejected each merged candidate and rolled
    the weights back, but not the age, and from then on (by the merge rule) every honest peer's model
    weighs eta_a x sigmoid(-phi) = 0.11 in coord-sec's merges instead of 0.3. Now each merge takes at most
    ``age_cap()`` of the claim, counted (``ages_capped``); the gate still keeps the release."""
    daemon, task, send, heard = hostile_ring["daemon"], hostile_ring["task"], hostile_ring["send"], hostile_ring["heard"]
    core = daemon.core
    release = core.release[0]
    before = _accuracy(task, core.release[1])
    direction = np.random.default_rng(0).standard_normal(task.spec.size).astype(np.float32)
    answered: set[tuple[Any, ...]] = set()
    beat_at = time.time()
    deadline = time.monotonic() + 60
    while len(answered) < 2 and time.monotonic() < deadline:
        beat_at += 0.001
        send("all", "beat", {"at": beat_at, "age": 1e6, "clients": 1, "pos": None, "hold": False})
        for msg in [m for m in list(heard) if m.kind == "model"]:
            sid = tuple(msg.body["sid"])
            if sid not in answered:
                answered.add(sid)
                poisoned = np.asarray(msg.weights, dtype=np.float32) + 3.0 * direction
                send("coord-sec", "model", {"at": time.time(), "age": float(2**53), "clients": 1, "pos": None,
                                            "hold": False, "sid": list(sid)}, poisoned)
        time.sleep(0.3)
    assert len(answered) == 2, "coord-sec started no synchronisation to answer"
    wait_until(lambda: core.peering.counters.merges >= 2, 15, "both poisoned models merged")
    counters, cfg = core.peering.counters, core.peering.config
    bound = counters.merges * cfg.eta_a * (cfg.h_intra + core.peering.h_inter()) + 1e-6
    print(f"coord-evil: {counters.merges} merges of age 2**53; coord-sec's age {core.peering.age:.3g} (bound {bound:.0f})")
    assert core.peering.age <= bound
    assert counters.ages_capped == counters.merges
    wait_until(lambda: core.counters["gate_rejected"] >= 1, 30, "the gate's verdict on a merged candidate")
    assert core.release[0] == release and _accuracy(task, core.release[1]) == before


# ---------------------------------------------------------------------- 5. oversize messages


def test_broker_conf_without_a_model_size_says_what_any_device_certificate_may_then_send(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without --model-bytes the config keeps paho's 256 MiB packets. Measured (helper-159, one device
    certificate, 5 x 200 MiB on its own update topic, the coordinator a separate process): mosquitto
    peaked at 610 MB, the coordinator 620 MB above its resting 777 MB, and an honest device's update
    was accepted 48.5 s after its labels instead of 8.4 s. broker-conf said nothing about it; now it
    says so, and with --model-bytes (the packet limit that refuses it, tests/test_security_broker.py)
    it does not."""
    from coordinator.pki import Pki
    from demos.cli import main

    pki = Pki.init(tmp_path / "pki")
    pki.issue("broker", "broker")
    assert main(["pki", "broker-conf", "--dir", str(pki.root), "--out", str(tmp_path / "a.conf"), "--user", ""]) == 0
    said = capsys.readouterr().out
    assert "max_packet_size 268435455" in (tmp_path / "a.conf").read_text()
    assert "no --model-bytes: max_packet_size is 256 MiB" in said and "pass --model-bytes" in said, said
    assert main(["pki", "broker-conf", "--dir", str(pki.root), "--out", str(tmp_path / "b.conf"), "--user", "",
                 "--model-bytes", str(4 * get_task("digits").spec.size)]) == 0
    said = capsys.readouterr().out
    assert "--model-bytes" not in said and "max_packet_size 268435455" not in (tmp_path / "b.conf").read_text()
