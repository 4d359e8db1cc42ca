"""What an operator asks of /metrics (docs/guide.md, Monitoring: the questions and the series that
answer them), and that no device can add a time series (helper-171)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from coordinator.core import CoordinatorCore, MessageReceived, StorageChanged
from coordinator.metrics import CoordinatorMetrics
from edge_sdk.errors import RemoteProtocolError
from edge_sdk.wire import topics
from edge_sdk.wire.codec import encode
from edge_sdk.wire.messages import Pull, Status, Update
from tests.helpers import SPEC, make_coordinator

Series = set[tuple[str, tuple[tuple[str, str], ...]]]


def series(m: CoordinatorMetrics) -> Series:
    return {(s.name, tuple(sorted(s.labels.items()))) for fam in text_string_to_metric_families(m.exposition().decode())
            for s in fam.samples}


def values(m: CoordinatorMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(m.exposition().decode()) for s in fam.samples}


def _reasons() -> set[str]:
    """Every ``reason`` the error tree can give (a class attribute each, never text from the wire)."""
    out, todo = set(), [RemoteProtocolError]
    while todo:
        cls = todo.pop()
        out.add(cls.reason)
        todo += cls.__subclasses__()
    return out


def hostile(c: CoordinatorCore, device: str, now: float, rng: random.Random) -> None:
    """One round of what a hostile device sends, all of it under its own (new) id."""
    def send(leaf: str, payload: bytes) -> None:
        c.handle(MessageReceived(now=now, topic=topics.device_topic("r1", device, leaf), payload=payload))

    w = np.zeros(SPEC.size, np.float32)
    nan = w.copy()
    nan[0] = np.nan
    send("update", b"\x93garbage " + device.encode())
    send("update", encode(Update(device=device, seq=1, model_id=f"evil-{device}", base_version=0, n_samples=1, weights=w)))
    send("update", encode(Update(device=device, seq=2, model_id=SPEC.model_id, base_version=0, n_samples=1, weights=nan)))
    send("update", encode(Update(device=f"not-{device}", seq=3, model_id=SPEC.model_id, base_version=0, n_samples=1, weights=w)))
    send("update", encode(Update(device=device, seq=4, model_id=SPEC.model_id, base_version=10**6, n_samples=1, weights=w)))
    send("update", encode(Update(device=device, seq=5, model_id=SPEC.model_id, base_version=0, n_samples=10**12 + rng.randint(1, 9),
                                 weights=w)))
    for seq in range(10, 40):  # a pull flood: rate-limited
        send("pull", encode(Pull(device=device, seq=seq, model_id=SPEC.model_id)))
    send("presence", b"\x00" + device.encode())
    send("presence", b"online")


def test_a_hostile_fleet_cannot_create_time_series() -> None:
    """Rejections are labelled by the error's reason (a fixed set), never by device id, version or
    text from the wire: after every kind of hostile message has been seen once, 200 more devices
    sending them under new ids leave the number of series where it was."""
    rng = random.Random(171)
    c = make_coordinator("spin", k=2, timeout_s=5.0)
    m = CoordinatorMetrics()
    m.count_from(c.status())
    for i in range(3):  # every kind once: the reasons they give appear (each a series, from a fixed set)
        hostile(c, f"warm-{i}", float(i), rng)
    m.publish(c.status())
    before = series(m)
    rejected_before = values(m)[("edgeci_messages_rejected_total", ())] + values(m)[("edgeci_updates_total", (("outcome", "rejected"),))]
    ids = [f"mallory-{rng.getrandbits(64):016x}-{i}" for i in range(200)]
    for i, device in enumerate(ids):
        hostile(c, device, 10.0 + i, rng)
    m.publish(c.status())
    after = series(m)
    got = values(m)
    assert after == before, sorted(after ^ before)
    # ... and it was all counted: the test is not vacuous
    assert got[("edgeci_messages_rejected_total", ())] + got[("edgeci_updates_total", (("outcome", "rejected"),))] \
        >= rejected_before + 200 * 6
    reasons = {dict(labels)["reason"] for name, labels in after if name == "edgeci_rejections_total"}
    assert {"malformed", "unknown_model", "topic_mismatch", "rate_limited"} <= reasons <= _reasons()
    labels = {v for _, ls in after for _, v in ls}
    assert not any(device in v or "evil" in v for device in ids for v in labels)
    assert c.version == 0  # and nothing changed


def status(**extra: object) -> Status:
    return Status(region="r1", coordinator="c1", version=4, updates_accepted=9, updates_rejected=2, updates_duplicate=1,
                  devices_seen=3, buffered=2, extra=dict(extra))


def test_peers_last_aggregation_deferred_updates_and_disk_are_exported(tmp_path: Path) -> None:
    """The operator's questions /metrics did not answer (helper-171): is each configured peer heard
    (``edgeci status`` said it, /metrics did not), how long since the last aggregation, how many
    updates were told to retry later, and how full the state dir's disk is."""
    m = CoordinatorMetrics(state_dir=tmp_path)
    m.count_from(status(conversion={"deferred": 2}))
    m.publish(status(peers_heard={"eu": 1_700_000_100.5, "us": None}, last_aggregation_at=1_700_000_050.0,
                     conversion={"deferred": 7}))
    got = values(m)
    assert got[("edgeci_peer_heard", (("peer", "eu"),))] == 1 and got[("edgeci_peer_heard", (("peer", "us"),))] == 0
    assert got[("edgeci_peer_last_heard_timestamp_seconds", (("peer", "eu"),))] == 1_700_000_100.5
    assert ("edgeci_peer_last_heard_timestamp_seconds", (("peer", "us"),)) not in got  # not since this start
    assert got[("edgeci_last_aggregation_timestamp_seconds", ())] == 1_700_000_050.0
    assert got[("edgeci_updates_deferred_total", (("reason", "converting"),))] == 5  # from this process's start
    st = os.statvfs(tmp_path)
    assert got[("edgeci_state_dir_size_bytes", ())] == st.f_blocks * st.f_frsize
    assert 0 < got[("edgeci_state_dir_free_bytes", ())] <= got[("edgeci_state_dir_size_bytes", ())]
    assert got[("edgeci_buffered_updates", ())] == 2
    assert got.get(("process_start_time_seconds", ()), 0) > 0  # restarts and crash loops (Linux /proc)
    quiet = CoordinatorMetrics(state_dir=tmp_path / "gone")  # no peers, no aggregation yet, an unreadable state dir
    quiet.publish(status(last_aggregation_at=0.0))
    names = {name for name, _ in series(quiet)}
    assert not {"edgeci_peer_heard", "edgeci_last_aggregation_timestamp_seconds", "edgeci_updates_deferred_total",
                "edgeci_state_dir_free_bytes"} & names


def test_updates_deferred_by_a_storage_outage_are_counted() -> None:
    c = make_coordinator("spin", k=5, timeout_s=None)
    m = CoordinatorMetrics()
    m.count_from(c.status())
    c.handle(StorageChanged(now=1.0, ok=False, detail="ENOSPC"))
    w = np.zeros(SPEC.size, np.float32)
    for seq, device in enumerate(("d1", "d2", "d3"), start=1):
        c.handle(MessageReceived(now=2.0, topic=topics.device_topic("r1", device, "pull"),
                                 payload=encode(Pull(device=device, seq=seq, model_id=SPEC.model_id))))
        c.handle(MessageReceived(now=3.0, topic=topics.device_topic("r1", device, "update"), payload=encode(
            Update(device=device, seq=seq + 10, model_id=SPEC.model_id, base_version=0, n_samples=1, weights=w))))
    assert c.counters["deferred_storage"] == 3  # the core counts them ...
    m.publish(c.status())
    assert values(m)[("edgeci_updates_deferred_total", (("reason", "storage"),))] == 3  # ... /metrics cannot say so yet


def test_status_says_when_the_last_aggregation_was() -> None:
    """Is training advancing: `edgeci status` showed the number of aggregations, not when the last
    one was (only --json had last_aggregation_at)."""
    from coordinator.cli_status import render

    base = {"type": "status", "region": "r1", "coordinator": "c1", "alive": True, "published_at": 1000.0, "heartbeat_s": 5.0,
            "version": 3, "updates_accepted": 4}
    text = render({**base, "extra": {"aggregations": 2, "last_aggregation_at": 1000.0 - 300}}, 1001.0)
    assert "aggregations 2 (last 5 min ago) · traffic" in text
    assert "(last" not in render({**base, "extra": {"aggregations": 0, "last_aggregation_at": 0.0}}, 1001.0)
    # A fresh state dir: last_aggregation_at is when version 0 was made (SPIN's π clock starts there), and no
    # aggregation has happened yet: "aggregations 0 (last 48 s ago)" said one had (helper-190).
    fresh = render({**base, "version": 0, "extra": {"aggregations": 0, "last_aggregation_at": 1000.0 - 48}}, 1001.0)
    assert "aggregations 0 · traffic" in fresh and "(last" not in fresh


def test_peer_series_are_the_configured_peers_whatever_else_speaks_on_the_peer_topic() -> None:
    """edgeci_peer_heard{peer} is one series per configured peer: senders outside --peers (signed
    with their own keys, copying a real peer's message) are rejected, counted, and add none."""
    from coordinator.core import CoordinatorConfig, Snapshot
    from coordinator.peering import make_peering
    from coordinator.strategies import make_strategy
    from edge_sdk.core.events import Publish, TimerFired
    from edge_sdk.signing import Signer
    from edge_sdk.wire.codec import decode
    from edge_sdk.wire.messages import PeerMsg

    ring = ["a", "b", "c"]

    def core(name: str) -> CoordinatorCore:
        strat = make_strategy("spyker")
        cfg = CoordinatorConfig(region=f"r-{name}", coordinator_id=name, spec=SPEC, hints={"lr": 0.05}, signer=Signer.generate())
        peering = make_peering("spyker", coordinator_id=name, ring=ring, strategy=strat, params={})
        c = CoordinatorCore(cfg, strat, Snapshot(version=0, weights=np.zeros(SPEC.size, np.float32)), rng=random.Random(0),
                            peering=peering)
        c.start(0.0)
        return c

    a, b = core("a"), core("b")
    beats = [p for p in b.handle(TimerFired(now=50.0)) if isinstance(p, Publish) and "/peer/" in p.topic]
    assert beats
    for p in beats:
        a.handle(MessageReceived(now=50.0, topic=p.topic, payload=p.payload))
    m = CoordinatorMetrics()
    m.count_from(a.status())
    m.publish(a.status())
    got = values(m)
    assert got[("edgeci_peer_heard", (("peer", "b"),))] == 1 and got[("edgeci_peer_heard", (("peer", "c"),))] == 0
    assert got[("edgeci_peer_last_heard_timestamp_seconds", (("peer", "b"),))] == 50.0
    def forge(sender: str, now: float) -> None:
        for p in beats:
            real = decode(p.payload)
            assert isinstance(real, PeerMsg)
            forged = PeerMsg(sender=sender, kind=real.kind, body=dict(real.body), weights=real.weights)
            payload = encode(forged, signer=Signer.generate(), scope=topics.signing_scope(p.topic))
            a.handle(MessageReceived(now=now, topic=p.topic, payload=payload))

    forge("warm", 55.0)  # its reason (unknown_peer) is a series from then on, from the fixed set
    m.publish(a.status())
    before = series(m)
    rejected = a.counters["messages_rejected"]
    for i in range(100):
        forge(f"mallory-{i}", 60.0 + i)
    m.publish(a.status())
    assert series(m) == before and {dict(ls)["peer"] for n, ls in series(m) if n == "edgeci_peer_heard"} == {"b", "c"}
    assert a.counters["messages_rejected"] >= rejected + 100  # refused and counted, not silently dropped
    assert values(m)[("edgeci_peer_last_heard_timestamp_seconds", (("peer", "b"),))] == 50.0
