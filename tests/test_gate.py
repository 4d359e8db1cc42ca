"""Issue 10 in the cores: training line and release, the validation gate, rollback on a
rejected candidate, and signed operator control (rollback / pin / unpin)."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from coordinator.core import (
    CandidateEvaluated,
    CommitVersion,
    CoordinatorConfig,
    CoordinatorCore,
    EvaluateCandidate,
    LoadVersion,
    PersistUpdate,
    RecordRelease,
    Snapshot,
    StorageChanged,
    VersionLoaded,
)
from coordinator.gate import Gate, GateConfig, difference_bounds, paired_counts, valid_paired
from coordinator.registry import Registry, read_release_record
from coordinator.strategies import make_strategy
from coordinator.validation import compare
from coordinator.validation import score as validation_score
from edge_sdk.core.device import DeviceConfig, DeviceCore
from edge_sdk.core.events import (
    DeployModel,
    MessageReceived,
    Notify,
    Publish,
    SampleAdded,
    StartTraining,
    TrainingFinished,
)
from edge_sdk.errors import ConfigError
from edge_sdk.signing import Signer
from edge_sdk.tasks.base import Split
from edge_sdk.wire import topics
from edge_sdk.wire.codec import decode, encode
from edge_sdk.wire.messages import Control, ModelMsg, Pull, Recall, Update
from tests.helpers import SIGNER, SPEC, toy_snapshot

OPERATOR = Signer.generate()


def gated(k: int = 1, snapshot: Snapshot | None = None, **cfg: object) -> CoordinatorCore:
    cfg.setdefault("operators", {"alice": OPERATOR.public_raw})
    config = CoordinatorConfig(region="r1", coordinator_id="c1", spec=SPEC, signer=SIGNER, gate=GateConfig(margin=0.02),
                               **cfg)  # type: ignore[arg-type]
    return CoordinatorCore(config, make_strategy("spin", k=k, timeout_s=None, clip_multiplier=0.0), snapshot or toy_snapshot(),
                           rng=random.Random(0))


def update(dev: str, seq: int, value: float, base: int = 0) -> MessageReceived:
    msg = Update(device=dev, seq=seq, model_id="toy", base_version=base, n_samples=1,
                 weights=np.full(SPEC.size, value, dtype=np.float32))
    return MessageReceived(now=float(seq), topic=topics.device_topic("r1", dev, "update"), payload=encode(msg))


def pull(dev: str, seq: int, *, serve: bool = False, have: int = -1) -> MessageReceived:
    msg = Pull(device=dev, seq=seq, model_id="toy", serve=serve, have_version=have)
    return MessageReceived(now=100.0 + seq, topic=topics.device_topic("r1", dev, "pull"), payload=encode(msg))


def reply(actions: Sequence[object]) -> ModelMsg:
    (msg,) = [decode(a.payload) for a in actions if isinstance(a, Publish) and a.topic.endswith("/model")]
    assert isinstance(msg, ModelMsg)
    return msg


def of(actions: Sequence[object], kind: type) -> list:  # type: ignore[type-arg]
    return [a for a in actions if isinstance(a, kind)]


def control(command: str, version: int = -1, *, signer: Signer | None = OPERATOR, at: float = 50.0, nonce: int = 1,
            operator: str = "alice", force: bool = False) -> MessageReceived:
    msg = Control(command=command, operator=operator, issued_at=at, nonce=nonce, version=version, force=force)
    topic = topics.control_topic("r1")
    return MessageReceived(now=50.0, topic=topic, payload=encode(msg, signer=signer, scope=topics.signing_scope(topic)))


def test_without_a_gate_every_version_is_the_release() -> None:
    c = CoordinatorCore(CoordinatorConfig(region="r1", coordinator_id="c1", spec=SPEC, signer=SIGNER),
                        make_strategy("spin", k=1, timeout_s=None), toy_snapshot(), rng=random.Random(0))
    acts = c.handle(update("d1", 0, 1.0))
    assert of(acts, CommitVersion) and not of(acts, EvaluateCandidate)
    assert c.status().extra["release"] == 1 == c.version


def test_a_candidate_is_served_to_training_only_until_it_passes() -> None:
    c = gated()
    acts = c.handle(update("d1", 0, 1.0))
    (ev,) = of(acts, EvaluateCandidate)
    assert ev.version == 1 and ev.release_version == 0
    np.testing.assert_array_equal(ev.release_weights, 0.0)
    training, serving = reply(c.handle(pull("d2", 0))), reply(c.handle(pull("d3", 0, serve=True)))
    assert (training.version, training.release) == (1, 0) and (serving.version, serving.release) == (0, 0)
    acts = c.handle(CandidateEvaluated(now=2.0, version=1, candidate_metric=0.9, release_metric=0.8, release_version=0))
    (rec,) = of(acts, RecordRelease)
    assert rec.release == 1 and rec.event["action"] == "promote"
    served = reply(c.handle(pull("d4", 0, serve=True)))
    assert served.version == served.release == 1
    np.testing.assert_array_equal(served.weights, 1.0)


def test_a_regressing_candidate_is_rejected_and_the_training_line_rolls_back() -> None:
    c = gated(k=1)
    c.handle(update("bad", 0, 50.0))  # candidate 1
    acts = c.handle(update("d2", 0, 2.0, base=1))  # candidate 2, built on 1
    assert [e.version for e in of(acts, EvaluateCandidate)] == [2]
    c.handle(update("d3", 0, 3.0, base=2))  # candidate 3
    c.handle(update("d4", 0, 4.0, base=3))  # buffered? k=1: candidate 4
    acts = c.handle(CandidateEvaluated(now=9.0, version=2, candidate_metric=0.3, release_metric=0.8, release_version=0))
    (rec,) = of(acts, RecordRelease)
    assert rec.event["action"] == "reject" and rec.release == 0
    (rollback,) = of(acts, CommitVersion)
    assert rollback.version == 5 and rollback.metadata["source"] == "rollback"
    np.testing.assert_array_equal(rollback.weights, 0.0)  # the release's weights, under a new number
    assert c.status().extra["gate"]["pending"] == [1]  # 3 and 4 were built on 2: gone; 1 is older
    assert c.counters["gate_rejected"] == 1 and c.counters["rejected_devices"] == 1
    # a late pass for the dropped lineage changes nothing
    assert not of(c.handle(CandidateEvaluated(now=10.0, version=3, candidate_metric=1.0, release_metric=0.8,
                                              release_version=0)), RecordRelease)
    assert reply(c.handle(pull("d9", 0, serve=True))).version == 0


@pytest.mark.parametrize("command", ["pin", "rollback"])
def test_releasing_a_version_the_gate_rejected_needs_force_and_survives_a_restart(command: str) -> None:
    """Operator trial, finding 1: `edgeci pin 3` released a version the gate had rejected
    (0.583 against 0.728) without a word, and devices were served it."""
    c = gated(k=1)
    c.handle(update("bad", 0, 50.0))  # candidate 1
    acts = c.handle(CandidateEvaluated(now=9.0, version=1, candidate_metric=0.583, release_metric=0.728, release_version=0))
    assert of(acts, RecordRelease)[0].event["action"] == "reject"
    assert not of(c.handle(control(command, 1)), LoadVersion)
    assert c.counters["control_refused:gate_rejected"] == 1 and c.counters["reject:gate_rejected"] == 0
    refused = c.status().extra["control_refused"]
    assert refused["reason"] == "gate_rejected" and "0.583 against the release's 0.728" in refused["detail"]
    assert "--force" in refused["detail"]
    (load,) = of(c.handle(control(command, 1, nonce=2, force=True)), LoadVersion)
    assert load.version == 1
    # the verdict comes back from the release record after a restart
    history = [of(acts, RecordRelease)[0].event]
    again = gated(k=1, snapshot=Snapshot(version=2, weights=np.zeros(SPEC.size, np.float32), release_version=0,
                                         release_weights=np.zeros(SPEC.size, np.float32), gate_history=history))
    assert not of(again.handle(control(command, 1, nonce=3)), LoadVersion)
    assert of(again.handle(control(command, 0, nonce=4)), LoadVersion)  # a version it did not reject: as before


def test_the_rejected_versions_remembered_for_force_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import coordinator.core as core_module

    monkeypatch.setattr(core_module, "GATE_REJECTED_KEPT", 2)
    c = gated(k=1)
    for v in (1, 2, 3):
        c._record(float(v), "reject", v)
    assert sorted(c._gate_rejected) == [2, 3]  # the oldest went
    history = [{"action": "reject", "version": v, "release": 0} for v in (1, 2, 3)]
    restarted = gated(k=1, snapshot=Snapshot(version=3, weights=np.zeros(SPEC.size, np.float32), release_version=0,
                                             release_weights=np.zeros(SPEC.size, np.float32), gate_history=history))
    assert sorted(restarted._gate_rejected) == [2, 3]  # and from a release record holding more


def test_the_rollback_after_a_rejection_comes_before_its_record() -> None:
    """A driver writes a release record at once but a commit only with the batch's fsync: the
    rollback must come first, so that a failed commit leaves no "reject" beside a training line
    still on the rejected version (durability audit)."""
    c = gated(k=1)
    c.handle(update("bad", 0, 50.0))
    acts = c.handle(CandidateEvaluated(now=9.0, version=1, candidate_metric=0.3, release_metric=0.8, release_version=0))
    assert [type(a) for a in acts if isinstance(a, CommitVersion | RecordRelease)] == [CommitVersion, RecordRelease]


def test_an_undecided_candidate_restored_as_the_training_line_is_gated_again() -> None:
    """Restored on a candidate no decision was recorded for (the process died first, or the
    rollback after its rejection failed to write): start() gates it again — once, not while
    storage fails, not a decided one, not a rollback's own version (the release's weights)."""
    snap = Snapshot(version=3, weights=np.full(SPEC.size, 5.0, np.float32), release_version=0,
                    release_weights=np.zeros(SPEC.size, np.float32))
    c = gated(snapshot=snap)
    (ev,) = of(c.start(10.0), EvaluateCandidate)
    assert (ev.version, ev.release_version) == (3, 0) and c.counters["gate_resubmitted"] == 1
    assert not of(c.start(11.0), EvaluateCandidate)
    acts = c.handle(CandidateEvaluated(now=12.0, version=3, candidate_metric=0.3, release_metric=0.8, release_version=0))
    assert of(acts, RecordRelease)[0].event["action"] == "reject" and of(acts, CommitVersion)[0].metadata["source"] == "rollback"
    assert c.handle(update("late", 0, 1.0, base=3)) and c.counters["reject:base_rejected"] == 1
    decided = dataclasses.replace(snap, gate_history=[{"action": "hold", "version": 3, "release": 0}])
    assert not of(gated(snapshot=decided).start(10.0), EvaluateCandidate)
    rolled_back = dataclasses.replace(snap, weights=np.zeros(SPEC.size, np.float32))
    assert not of(gated(snapshot=rolled_back).start(10.0), EvaluateCandidate)
    assert not of(gated(snapshot=dataclasses.replace(snap, pinned=True)).start(10.0), EvaluateCandidate)
    failing = gated(snapshot=snap)
    failing.handle(StorageChanged(now=1.0, ok=False, detail="No space left on device"))
    assert not of(failing.start(10.0), EvaluateCandidate)
    (ev,) = of(failing.handle(StorageChanged(now=11.0, ok=True)), EvaluateCandidate)
    assert ev.version == 3


def test_a_reconnected_coordinator_announces_its_status_and_recall_again() -> None:
    """After a broker restart (no persistence) the retained recall is gone, and an offline
    device would keep serving an abandoned version: reannounce() gives both again."""
    c = gated(k=1)
    assert [a.topic for a in c.reannounce(1.0) if isinstance(a, Publish)] == [topics.status_topic("r1")]  # nothing recalled yet
    c.handle(update("bad", 0, 50.0))
    c.handle(CandidateEvaluated(now=9.0, version=1, candidate_metric=0.3, release_metric=0.8, release_version=0))
    again = [a for a in c.reannounce(10.0) if isinstance(a, Publish)]
    assert [a.topic for a in again] == [topics.status_topic("r1"), topics.recall_topic("r1")] and all(a.retain for a in again)
    recall = decode(again[1].payload)
    assert isinstance(recall, Recall) and recall.covers(1) and recall.release == 0


def test_a_reconnected_idle_device_asks_for_the_model_and_a_busy_one_waits() -> None:
    d = DeviceCore(DeviceConfig(device_id="d1", region="r1", spec=SPEC, min_samples=10**6, trusted_keys={SIGNER.kid: SIGNER.public_raw}),
                   rng=random.Random(0))
    (pull,) = [decode(a.payload) for a in d.start(0.0) if isinstance(a, Publish)]
    assert isinstance(pull, Pull) and pull.serve
    assert d.reconnected(1.0) == []  # its start's pull is still out: its own retries carry on
    d.handle(MessageReceived(now=2.0, topic=topics.device_topic("r1", "d1", "model"), payload=encode(
        ModelMsg(model_id="toy", version=0, reply_to=pull.seq, weights=np.zeros(SPEC.size, np.float32), release=0),
        signer=SIGNER, scope=topics.device_scope("r1", "model"))))
    (again,) = [decode(a.payload) for a in d.reconnected(3.0) if isinstance(a, Publish)]
    assert isinstance(again, Pull) and again.serve and again.have_version == 0


def test_evidence_against_an_old_release_is_asked_again() -> None:
    c = gated(k=1)
    c.handle(update("d1", 0, 1.0))
    c.handle(update("d2", 0, 2.0, base=1))
    c.handle(CandidateEvaluated(now=3.0, version=2, candidate_metric=0.9, release_metric=0.5, release_version=0))
    acts = c.handle(CandidateEvaluated(now=4.0, version=1, candidate_metric=0.9, release_metric=0.5, release_version=0))
    assert not of(acts, EvaluateCandidate) and c.status().extra["release"] == 2  # 1 was superseded by 2
    # a candidate newer than the release, scored against a release that has moved on: judged again
    c = gated(k=1)
    c.handle(update("d1", 0, 1.0))
    c.handle(update("d2", 0, 2.0, base=1))
    c.handle(CandidateEvaluated(now=3.0, version=1, candidate_metric=0.9, release_metric=0.5, release_version=0))
    assert c.status().extra["release"] == 1
    acts = c.handle(CandidateEvaluated(now=4.0, version=2, candidate_metric=0.9, release_metric=0.5, release_version=0))
    (again,) = of(acts, EvaluateCandidate)
    assert (again.version, again.release_version) == (2, 1) and not of(acts, RecordRelease)
    np.testing.assert_array_equal(again.release_weights, c.release[1])
    assert c.status().extra["release"] == 1  # the stale evidence decided nothing


def test_device_predicts_with_the_release_and_fetches_a_newer_one() -> None:
    c = gated()
    d = DeviceCore(DeviceConfig(device_id="d1", region="r1", spec=SPEC, min_samples=1, request_timeout_s=5.0),
                   rng=random.Random(0))
    now = [1.0]

    def exchange(actions: Sequence[object]) -> list[object]:
        """Deliver the device's publishes to the coordinator and the replies back."""
        out: list[object] = []
        for a in actions:
            if isinstance(a, Publish) and "/dev/d1/" in a.topic:
                now[0] += 0.1
                for r in c.handle(MessageReceived(now=now[0], topic=a.topic, payload=a.payload)):
                    if isinstance(r, Publish) and r.topic.startswith(topics.device_topic("r1", "d1", "model")[:-5]):
                        out += d.handle(MessageReceived(now=now[0], topic=r.topic, payload=r.payload))
        return out

    c.handle(update("x", 0, 1.0))  # candidate 1; the release is still 0
    acts = exchange(d.handle(SampleAdded(now=0.0, total=1)))
    (start,) = of(acts, StartTraining)
    assert start.job.base_version == 1 and not of(acts, DeployModel)  # trains from the candidate, never serves it
    assert d.state.release_wanted == 0  # it heard of release 0 and holds nothing
    done = d.handle(TrainingFinished(now=2.0, job_id=start.job.job_id, weights=start.job.weights + 1, n_samples=1))
    acts = exchange(exchange(done))  # update → ack → serving pull → release
    assert [a.version for a in of(acts, DeployModel)] == [0]
    c.handle(CandidateEvaluated(now=3.0, version=1, candidate_metric=0.9, release_metric=0.8, release_version=0))
    acts = exchange(d.handle(SampleAdded(now=4.0, total=2)))  # the next training pull announces release 1
    assert d.state.release_wanted == 1
    (start,) = of(acts, StartTraining)
    done = d.handle(TrainingFinished(now=5.0, job_id=start.job.job_id, weights=start.job.weights + 1, n_samples=2))
    acts = exchange(exchange(done))
    assert [a.version for a in of(acts, DeployModel)] == [1]
    np.testing.assert_array_equal(d.state.deployed, 1.0)


def _deliver(c: CoordinatorCore, d: DeviceCore, actions: Sequence[object], now: float) -> list[object]:
    """The device's publishes to the coordinator, the coordinator's replies on d1's topics back."""
    out: list[object] = []
    for a in actions:
        if isinstance(a, Publish) and "/dev/d1/" in a.topic:
            for r in c.handle(MessageReceived(now=now, topic=a.topic, payload=a.payload)):
                if isinstance(r, Publish) and "/dev/d1/" in r.topic:
                    out += d.handle(MessageReceived(now=now, topic=r.topic, payload=r.payload))
    return out


def test_an_operator_rollback_recalls_the_abandoned_release_from_a_device_that_no_longer_pulls() -> None:
    """Review hA #2: devices heard of a new release only in answer to their own pulls, so after
    `edgeci rollback` a device with nothing new to label kept predicting with the version the
    operator rolled back. The coordinator announces what it abandoned on the region's retained
    recall topic; a device serving one of those versions fetches the release at once."""
    c = gated(k=1)
    d = DeviceCore(DeviceConfig(device_id="d1", region="r1", spec=SPEC, min_samples=100, request_timeout_s=5.0),
                   rng=random.Random(0))
    assert topics.recall_topic("r1") in d.subscriptions()
    c.handle(update("x", 0, 1.0))
    c.handle(CandidateEvaluated(now=2.0, version=1, candidate_metric=0.9, release_metric=0.8, release_version=0))
    acts = _deliver(c, d, d.start(3.0), 3.0)  # its serving pull: release 1; then it labels nothing more
    assert [a.version for a in of(acts, DeployModel)] == [1]
    (load,) = of(c.handle(control("rollback", 0)), LoadVersion)
    acts = c.handle(VersionLoaded(now=51.0, version=0, weights=np.zeros(SPEC.size, np.float32), command="rollback",
                                  operator=load.operator, nonce=load.nonce))
    (recall,) = [a for a in acts if isinstance(a, Publish) and a.topic == topics.recall_topic("r1")]
    assert recall.retain and acts.index(recall) > acts.index(of(acts, CommitVersion)[0])  # after the commit
    msg = decode(recall.payload)
    assert isinstance(msg, Recall) and (msg.release, msg.abandoned) == (2, (1, 1))
    out = d.handle(MessageReceived(now=52.0, topic=recall.topic, payload=recall.payload))
    assert [n.kind for n in of(out, Notify)] == ["recalled"]
    acts = _deliver(c, d, out, 52.0)  # the serving pull gets release 2 (version 0's weights)
    assert [a.version for a in of(acts, DeployModel)] == [2]
    np.testing.assert_array_equal(d.state.deployed, 0.0)
    # the retained recall again (every reconnect delivers it): nothing to do
    assert d.handle(MessageReceived(now=60.0, topic=recall.topic, payload=recall.payload)) == []
    # the same abandoned ranges are not announced again; a restarted coordinator announces them
    assert not [a for a in c.handle(update("y", 0, 3.0, base=2)) if isinstance(a, Publish) and a.topic == recall.topic]
    assert [a.topic for a in c.start(70.0) if isinstance(a, Publish) and a.retain].count(recall.topic) == 1
    # a recall signed by another key, or another region's replayed here, changes nothing and is counted
    forged = encode(Recall(model_id=SPEC.model_id, release=9, abandoned=(0, 5)), signer=Signer.generate(),
                    scope=topics.signing_scope(recall.topic))
    replayed = encode(msg, signer=SIGNER, scope=topics.signing_scope(topics.recall_topic("r2")))
    for payload in (forged, replayed):
        out = d.handle(MessageReceived(now=61.0, topic=recall.topic, payload=payload))
        assert [n.data["reason"] for n in of(out, Notify)] == ["bad_signature"] and not of(out, Publish)
    assert d.state.deployed_version == 2


def test_control_must_be_signed_fresh_and_new() -> None:
    c = gated()
    for bad, reason in [
        (control("pin", 0, signer=None), "unsigned"),
        (control("pin", 0, signer=Signer.generate()), "bad_signature"),
        (control("pin", 0, at=50.0 - 3600), "replayed"),
    ]:
        assert not of(c.handle(bad), LoadVersion)
        assert c.counters[f"reject:{reason}"] == 1
    assert of(c.handle(control("pin", 0, nonce=7)), LoadVersion)
    assert not of(c.handle(control("pin", 0, nonce=7)), LoadVersion)  # the same command again
    assert c.counters["reject:replayed"] == 2
    assert of(c.handle(control("pin", 0, signer=SIGNER, nonce=8, operator="c1")), LoadVersion)  # the coordinator's own key


def test_a_future_dated_command_runs_once_and_a_refused_one_is_not_counted() -> None:
    """Issued up to max_age (300 s) ahead of the coordinator's clock, a command is accepted until
    300 s after its issue time, so it is remembered that long: it was forgotten 300 s after it
    ran and then ran again (hostile-input audit). A command for a version that does not exist is
    refused without being counted as run or using up its nonce."""
    c = gated()
    ahead = control("pin", 0, at=300.0, nonce=21)  # at now = 50: 250 s ahead, inside the window
    assert of(c.handle(ahead), LoadVersion)
    for now in (351.0, 599.0):  # past 50 + 300, still within 300 + 300 of its issue time
        again = dataclasses.replace(ahead, now=now)
        assert not of(c.handle(again), LoadVersion)
    assert c.counters["reject:replayed"] == 2 and c.counters["control:pin"] == 1
    c2 = gated()
    assert not of(c2.handle(control("rollback", 10**6, nonce=5)), LoadVersion)
    assert c2.counters["control_refused:unknown_version"] == 1 and c2.counters["control:rollback"] == 0
    assert c2.counters["messages_rejected"] == 0 and c2.status().extra["control_refused_by_reason"] == {"unknown_version": 1}
    assert of(c2.handle(control("rollback", 0, nonce=5)), LoadVersion)  # the nonce was not used up


def test_an_operator_cannot_sign_a_command_in_another_operators_name() -> None:
    """The operator name is recorded in the release history and the status; it was whatever the
    command said, so alice's key could pin a version as "bob". The name is now the one the
    coordinator knows the signing key by (``operators/<name>.pub``; its own key: its own id)."""
    bob = Signer.generate()
    c = gated(k=1, operators={"alice": OPERATOR.public_raw, "bob": bob.public_raw})
    c.handle(update("d1", 0, 1.0))
    c.handle(CandidateEvaluated(now=2.0, version=1, candidate_metric=0.9, release_metric=0.8, release_version=0))
    before = (c.version, c.status().extra["release"], c.status().extra["pinned"], c.status().extra["recent_versions"])
    for forged in (control("pin", 0, operator="bob"),  # alice's key, bob's name
                   control("pin", 0, signer=SIGNER, operator="bob"),  # the coordinator's own key, bob's name
                   control("unpin", operator="c1")):  # alice's key, the coordinator's name
        acts = c.handle(forged)
        assert not of(acts, LoadVersion) and not of(acts, RecordRelease) and not of(acts, CommitVersion)
    assert c.counters["reject:operator_mismatch"] == 3
    assert (c.version, c.status().extra["release"], c.status().extra["pinned"], c.status().extra["recent_versions"]) == before
    # bob's own command with the same nonce still runs (the forgery did not use it up), and the record says which key
    (load,) = of(c.handle(control("pin", 0, signer=bob, operator="bob")), LoadVersion)
    assert (load.operator, load.kid) == ("bob", bob.kid)
    (rec,) = of(c.handle(VersionLoaded(now=51.0, version=0, weights=np.zeros(SPEC.size, np.float32), command="pin",
                                       operator=load.operator, nonce=load.nonce, kid=load.kid)), RecordRelease)
    assert (rec.event["operator"], rec.event["kid"]) == ("bob", bob.kid)
    (rec,) = of(c.handle(control("unpin", nonce=2)), RecordRelease)
    assert (rec.event["operator"], rec.event["kid"]) == ("alice", OPERATOR.kid)


def test_operator_names_come_from_the_key_files(tmp_path: Path) -> None:
    """``operators/<name>.pub`` (what ``edgeci pki`` puts in a coordinator's bundle) names each key."""
    from edge_sdk.signing import load_named_keys, load_trusted_keys, save_public_key

    save_public_key(OPERATOR.public_raw, tmp_path / "alice.pub")
    assert load_named_keys(tmp_path) == {"alice": OPERATOR.public_raw}
    assert load_trusted_keys(tmp_path) == {OPERATOR.kid: OPERATOR.public_raw}


def test_the_cli_commands_in_the_name_its_key_belongs_to(tmp_path: Path) -> None:
    """``edgeci rollback/pin/unpin`` without ``--operator`` said "operator", which no key is
    named; now: an operator bundle's identity, the coordinator's id for its own key, else the
    key file's name (``alice.key`` beside the coordinator's ``operators/alice.pub``)."""
    from coordinator.cli_control import default_operator
    from coordinator.pki import Pki
    from edge_sdk.signing import load_signer

    pki = Pki.init(tmp_path / "pki")
    bundle = pki.issue("ops-1", "operator")
    ops = load_signer(bundle / "signing.key")
    status = {"coordinator": "c1", "extra": {"signing_key": SIGNER.kid}}
    assert default_operator(bundle / "signing.key", ops, status) == "ops-1"
    assert default_operator(tmp_path / "state" / "signing.key", SIGNER, status) == "c1"
    assert default_operator(tmp_path / "alice.key", OPERATOR, status) == "alice"


def test_release_records_without_a_key_id_still_load() -> None:
    """State dirs written before the key id was recorded: their operator commands still count as executed."""
    old = [{"at": 50.0, "action": "pin", "version": 2, "release": 2, "of": 0, "operator": "alice", "nonce": 7}]
    snap = Snapshot(version=2, weights=np.zeros(SPEC.size, np.float32), release_version=2,
                    release_weights=np.zeros(SPEC.size, np.float32), pinned=True, gate_history=old)
    c = gated(k=1, snapshot=snap)
    assert c.status().extra["recent_versions"] == old
    assert not of(c.handle(control("pin", 0, nonce=7)), LoadVersion) and c.counters["reject:replayed"] == 1


def test_a_command_signed_for_another_regions_control_topic_is_refused() -> None:
    """An operator key commands every region; a command is signed for one region's control
    topic, so the same bytes replayed onto another region's do not run there."""
    c = gated()
    msg = Control(command="pin", operator="alice", issued_at=50.0, nonce=3, version=0)
    for_r2 = encode(msg, signer=OPERATOR, scope=topics.signing_scope(topics.control_topic("r2")))
    assert not of(c.handle(MessageReceived(now=50.0, topic=topics.control_topic("r1"), payload=for_r2)), LoadVersion)
    assert c.counters["reject:bad_signature"] == 1
    for_r1 = encode(msg, signer=OPERATOR, scope=topics.signing_scope(topics.control_topic("r1")))
    assert of(c.handle(MessageReceived(now=50.0, topic=topics.control_topic("r1"), payload=for_r1)), LoadVersion)


def test_a_message_other_than_a_command_on_the_control_topic_is_refused() -> None:
    """Only a ``Control`` belongs on the control topic: any other message there, even one signed
    by an operator's key for that topic, is a typed rejection, counted and shown in the status,
    that loads no version."""
    c = gated(k=1)
    c.handle(update("d1", 0, 1.0))  # version 1
    topic = topics.control_topic("r1")
    for other in (Recall(model_id="toy", release=0, abandoned=(1, 1)), Pull(device="alice", seq=1, model_id="toy")):
        acts = c.handle(MessageReceived(now=50.0, topic=topic, payload=encode(other, signer=OPERATOR, scope=topics.signing_scope(topic))))
        assert [n.data["reason"] for n in of(acts, Notify)] == ["topic_mismatch"]
        assert not of(acts, LoadVersion) and not of(acts, CommitVersion) and not of(acts, RecordRelease)
    assert c.counters["reject:topic_mismatch"] == 2 and c.version == 1
    assert c.status().extra["control_refused"]["reason"] == "topic_mismatch"
    assert of(c.handle(control("rollback", 0)), LoadVersion)  # a real command still runs


def test_rollback_and_pin_make_an_old_version_the_release_under_a_new_number() -> None:
    c = gated(k=1)
    c.handle(update("d1", 0, 1.0))
    c.handle(CandidateEvaluated(now=2.0, version=1, candidate_metric=0.9, release_metric=0.8, release_version=0))
    (load,) = of(c.handle(control("pin", 0)), LoadVersion)
    assert load.version == 0 and load.command == "pin"
    acts = c.handle(VersionLoaded(now=51.0, version=0, weights=np.zeros(SPEC.size, np.float32), command="pin"))
    (commit,) = of(acts, CommitVersion)
    assert commit.version == 2 and c.status().extra["release"] == 2 and c.status().extra["pinned"]
    # pinned: a passing candidate is recorded, not promoted
    c.handle(update("d2", 0, 3.0, base=2))
    acts = c.handle(CandidateEvaluated(now=60.0, version=3, candidate_metric=0.99, release_metric=0.8, release_version=2))
    assert of(acts, RecordRelease)[0].event["action"] == "passed" and c.status().extra["release"] == 2
    c.handle(control("unpin", nonce=2))
    assert not c.status().extra["pinned"]
    with pytest.raises(ConfigError):
        GateConfig(validation=False)


def test_pinning_the_pinned_release_again_makes_no_new_version() -> None:
    """A retried ``pin 0`` (or ``pin`` of the pinned copy itself) with nothing trained since: no
    new number for the same weights (every device would pull it again), the command is confirmed."""
    c = gated(k=1)
    c.handle(control("pin", 0))
    (commit,) = of(c.handle(VersionLoaded(now=51.0, version=0, weights=np.zeros(SPEC.size, np.float32), command="pin")),
                   CommitVersion)
    assert commit.version == 1
    for nonce, version in ((2, 0), (3, 1)):
        acts = c.handle(control("pin", version, nonce=nonce))
        assert not of(acts, LoadVersion) and not of(acts, CommitVersion)
        (rec,) = of(acts, RecordRelease)
        assert rec.event["unchanged"] and rec.event["nonce"] == nonce and rec.event["version"] == 1
        assert c.version == 1 and c.status().extra["release"] == 1 and c.status().extra["pinned"]
    # once the training line moved on, pin rolls it back again (a new version)
    c.handle(update("d1", 0, 3.0, base=1))
    assert c.version == 2
    (load,) = of(c.handle(control("pin", 0, nonce=4)), LoadVersion)
    assert load.version == 0
    # unpinned, the same command is a real pin
    c.handle(VersionLoaded(now=52.0, version=0, weights=np.zeros(SPEC.size, np.float32), command="pin"))
    c.handle(control("unpin", nonce=5))
    assert of(c.handle(control("pin", 3, nonce=6)), LoadVersion)


def test_release_survives_a_restart() -> None:
    snap = Snapshot(version=7, weights=np.full(SPEC.size, 7.0, np.float32), release_version=5,
                    release_weights=np.full(SPEC.size, 5.0, np.float32), pinned=True)
    c = gated(snapshot=snap)
    served = reply(c.handle(pull("d1", 0, serve=True)))
    assert served.version == 5 and c.status().extra["pinned"]
    np.testing.assert_array_equal(served.weights, 5.0)
    assert reply(c.handle(pull("d2", 0))).version == 7


def test_a_slightly_worse_candidate_is_held_not_rolled_back() -> None:
    c = gated(k=1)
    c.handle(update("d1", 0, 1.0))
    acts = c.handle(CandidateEvaluated(now=2.0, version=1, candidate_metric=0.75, release_metric=0.8, release_version=0))
    assert [r.event["action"] for r in of(acts, RecordRelease)] == ["hold"] and not of(acts, CommitVersion)
    assert c.version == 1 and c.status().extra["release"] == 0 and c.counters["gate_held"] == 1


def test_releases_cannot_ratchet_down_one_margin_at_a_time() -> None:
    c = gated(k=1)
    for seq in range(3):
        c.handle(update("d1", seq, float(seq + 1), base=seq))
    decide = [("promote", 1, 0.90, 0.80, 0), ("promote", 2, 0.885, 0.90, 1), ("hold", 3, 0.87, 0.885, 2)]
    for expected, version, cand, rel, rel_version in decide:
        acts = c.handle(CandidateEvaluated(now=10.0 + version, version=version, candidate_metric=cand,
                                           release_metric=rel, release_version=rel_version))
        assert [r.event["action"] for r in of(acts, RecordRelease)] == [expected], version
    # 0.87 is within the margin of release 2 (0.885) but not of the best release so far (0.90)
    assert c.status().extra["release"] == 2


SET_A, SET_B = "sha256:" + "a" * 64, "sha256:" + "b" * 64


def durable(c: CoordinatorCore, registry: Registry) -> CoordinatorCore:
    """``c`` with the registry's half of the driver: commits and release records are written."""
    real = c.handle

    def handle(event: object) -> list[object]:
        actions = real(event)  # type: ignore[arg-type]
        for a in actions:
            if isinstance(a, CommitVersion):
                registry.commit(a)
            elif isinstance(a, RecordRelease):
                registry.record_release(a.release, a.pinned, a.event, a.floor)
        return actions

    c.handle = handle  # type: ignore[method-assign]
    return c


def gated_on(validation_set: str, snapshot: Snapshot | None = None) -> CoordinatorCore:
    config = CoordinatorConfig(region="r1", coordinator_id="c1", spec=SPEC, signer=SIGNER,
                               gate=GateConfig(margin=0.02, validation_set=validation_set))
    return CoordinatorCore(config, make_strategy("spin", k=1, timeout_s=None, clip_multiplier=0.0), snapshot or toy_snapshot(),
                           rng=random.Random(0))


@pytest.mark.parametrize(("after_restart", "expected"), [(SET_A, "hold"), (SET_B, "promote")])
def test_the_best_release_floor_survives_a_restart_on_the_same_validation_set(
        tmp_path: Path, after_restart: str, expected: str) -> None:
    """helper-110: the floor (best release 0.90) lived in memory only. Candidate 0.87 against
    release 2 (0.885) was held; after a restart the same score was promoted, so each restart let
    the release step down one more margin. The floor is in the release record now, with the
    validation set it was scored on: restored on that set, dropped (and said once) on another."""
    registry = Registry(tmp_path, SPEC)
    registry.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    c = durable(gated_on(SET_A), registry)
    for seq in range(3):
        c.handle(update("d1", seq, float(seq + 1), base=seq))
    for expected_before, version, cand, rel, rel_version in [("promote", 1, 0.90, 0.80, 0), ("promote", 2, 0.885, 0.90, 1),
                                                            ("hold", 3, 0.87, 0.885, 2)]:
        acts = c.handle(CandidateEvaluated(now=10.0 + version, version=version, candidate_metric=cand,
                                           release_metric=rel, release_version=rel_version))
        assert [r.event["action"] for r in of(acts, RecordRelease)] == [expected_before], version
    registry.close()

    snap = Registry(tmp_path, SPEC).load()
    assert snap is not None and snap.release_version == 2 and snap.gate_floor == {"best": 0.90, "validation_set": SET_A}
    restarted = gated_on(after_restart, snap)
    dropped = of(restarted.start(20.0), Notify)
    assert [n.data["best"] for n in dropped if n.kind == "gate_floor_dropped"] == ([] if expected == "hold" else [0.90])
    restarted.handle(update("d1", 3, 4.0, base=3))  # candidate 4: the same score against the same release
    acts = restarted.handle(CandidateEvaluated(now=30.0, version=4, candidate_metric=0.87, release_metric=0.885,
                                               release_version=2))
    assert [r.event["action"] for r in of(acts, RecordRelease)] == [expected]
    assert restarted.status().extra["release"] == (2 if expected == "hold" else 4)
    assert all(n.kind != "gate_floor_dropped" for n in of(restarted.start(40.0), Notify))  # said once


def test_the_floor_is_not_restored_for_an_unknown_set_or_a_canary_only_gate() -> None:
    stored = {"best": 0.9, "validation_set": SET_A}
    for config in (GateConfig(), GateConfig(validation_set=SET_B)):
        g = Gate(config)
        assert g.restore_floor(stored) is not None and g.best is None
    g = Gate(GateConfig(validation_set=SET_A))
    assert g.restore_floor(stored) is None and g.best == 0.9 and g.floor() == stored
    for junk in (None, {}, {"best": "0.9", "validation_set": SET_A}, {"best": float("nan"), "validation_set": SET_A},
                 {"best": True, "validation_set": SET_A}):
        g = Gate(GateConfig(validation_set=SET_A))
        assert g.restore_floor(junk) is None and g.best is None, junk
    # Canary only: each round scores other devices' new labels, so no score is a floor for later ones.
    from coordinator.canary import CanaryConfig
    g = Gate(GateConfig(validation=False, canary=CanaryConfig(), validation_set=SET_A))
    assert g.restore_floor(stored) is not None and g.best is None and g.floor() is None


# ------------------------------------------------------------------ paired evidence


def paired_gate(**cfg: object) -> Gate:
    return Gate(GateConfig(margin=0.02, rollback_margin=0.10, **cfg))  # type: ignore[arg-type]


def test_paired_counts_come_from_per_sample_correctness() -> None:
    cand = np.array([1, 1, 0, 0, 1, 0], dtype=bool)
    rel = np.array([1, 0, 1, 0, 0, 0], dtype=bool)
    assert paired_counts(cand, rel) == (2, 1, 6)
    with pytest.raises(ValueError, match="equal"):
        paired_counts(cand, rel[:5])
    d, lower, upper = difference_bounds((2, 1, 6), 1.0)
    assert d == pytest.approx(cand.mean() - rel.mean())
    diffs = cand.astype(float) - rel.astype(float)  # the bound is the normal one on the differences
    assert upper - d == pytest.approx(d - lower) == pytest.approx(diffs.std() / np.sqrt(len(diffs)))


def test_the_same_score_gap_promotes_on_agreement_and_holds_on_disagreement() -> None:
    # candidate 0.79 vs release 0.80 on 200 samples: within the 2-point margin either way, but
    # a model that differs from the release on 78 samples may well be much worse
    for paired, expected in [((0, 2, 200), "promote"), ((38, 40, 200), "hold"), (None, "promote")]:
        g = paired_gate()
        g.add_candidate(1, 0, ())
        assert g.record_validation(1, 0.79, 0.80, paired) == expected, paired


def test_rejection_needs_a_confident_regression() -> None:
    g = paired_gate()
    for version, cand, paired, expected in [
        (1, 0.68, (40, 64, 200), "hold"),  # 12 points worse, but the bound reaches −7
        (2, 0.65, (0, 30, 200), "reject"),  # 15 points worse on 30 samples, none better
        (3, 0.68, None, "reject"),  # no paired counts: the point estimate decides
    ]:
        g.add_candidate(version, 0, ())
        assert g.record_validation(version, cand, 0.80, paired) == expected, version


def test_malformed_paired_counts_fall_back_to_the_point_estimate() -> None:
    for bad in [(150, 60, 200), (-1, 0, 200), (1, 1, 0), (True, 0, 2), (1, 2)]:
        assert valid_paired(bad) is None, bad
        g = paired_gate()
        g.add_candidate(1, 0, ())
        assert g.record_validation(1, 0.79, 0.80, bad) == "promote"  # type: ignore[arg-type]
        assert g.take(1) is not None and g.best == 0.80
    assert valid_paired((3, 4, 10)) == (3, 4, 10)


def test_z_zero_is_the_fixed_margin_and_the_floor_can_be_turned_off() -> None:
    g = paired_gate(paired_z=0.0)
    g.add_candidate(1, 0, ())
    assert g.record_validation(1, 0.79, 0.80, (38, 40, 200)) == "promote"
    g = paired_gate(best_floor=False)
    g.best = 0.95
    g.add_candidate(1, 0, ())
    assert g.record_validation(1, 0.80, 0.80, (0, 0, 200)) == "promote"
    g = paired_gate()
    g.best = 0.95
    g.add_candidate(1, 0, ())
    assert g.record_validation(1, 0.80, 0.80, (0, 0, 200)) == "hold"
    with pytest.raises(ConfigError):
        GateConfig(paired_z=-1.0)


def test_the_core_hands_paired_counts_to_the_gate_and_records_them() -> None:
    c = gated(k=1)
    c.handle(update("d1", 0, 1.0))
    acts = c.handle(CandidateEvaluated(now=2.0, version=1, candidate_metric=0.79, release_metric=0.80,
                                       release_version=0, paired=(38, 40, 200)))
    (rec,) = of(acts, RecordRelease)
    assert rec.event["action"] == "hold" and rec.event["paired"] == [38, 40, 200] and rec.release == 0
    c.handle(update("d1", 1, 2.0, base=1))
    acts = c.handle(CandidateEvaluated(now=3.0, version=2, candidate_metric=0.79, release_metric=0.80,
                                       release_version=0, paired=(0, 2, 200)))
    assert of(acts, RecordRelease)[0].event["action"] == "promote" and c.status().extra["release"] == 2


class _Logits:
    """A classifier whose logits pick class ``weights[i] mod 3`` for sample i."""

    def logits(self, weights: np.ndarray, x: np.ndarray) -> np.ndarray:
        out = np.zeros((len(x), 3), np.float32)
        out[np.arange(len(x)), weights[: len(x)].astype(int) % 3] = 1.0
        return out


class _NoLogits:
    def evaluate(self, weights: np.ndarray, split: Split) -> dict[str, float]:
        return {"accuracy": float(weights[0])}


def test_validation_scores_per_sample_and_pairs_them() -> None:
    split = Split(x=np.zeros((4, 2), np.float32), y=np.array([0, 1, 2, 0]))
    cand = validation_score(_Logits(), np.array([0, 1, 0, 0], np.float32), split)  # type: ignore[arg-type]
    rel = validation_score(_Logits(), np.array([1, 1, 2, 1], np.float32), split)  # type: ignore[arg-type]
    assert cand[0] == 0.75 and rel[0] == 0.5
    assert compare(cand, rel) == (2, 1, 4)
    plain = validation_score(_NoLogits(), np.array([0.6], np.float32), split)  # type: ignore[arg-type]
    assert plain[0] == pytest.approx(0.6) and plain[1] is None and compare(cand, plain) is None


def test_an_operator_command_replayed_after_a_restart_is_refused() -> None:
    """Executed commands were remembered in memory only: after a restart (or a rebuilt core)
    the same signed pin, replayed within its 300 s, pinned the old model again. They are in the
    release record now (what the registry stores and a restart reads back)."""
    import json

    from coordinator.core import LoadVersion, RecordRelease, VersionLoaded

    c = gated(k=1)
    c.handle(update("d1", 0, 1.0))
    pin = control("pin", 0, nonce=7)
    (load,) = of(c.handle(pin), LoadVersion)
    records = of(c.handle(VersionLoaded(now=51.0, version=0, weights=np.zeros(SPEC.size, np.float32), command="pin",
                                        operator=load.operator, nonce=load.nonce)), RecordRelease)
    records += of(c.handle(control("unpin", nonce=8)), RecordRelease)
    assert not c.status().extra["pinned"]
    history = json.loads(json.dumps([r.event for r in records]))  # as release.json holds them
    snap = Snapshot(version=c.version, weights=c.weights.copy(), release_version=c.status().extra["release"],
                    release_weights=c.weights.copy(), pinned=False, gate_history=history)
    restarted = gated(k=1, snapshot=snap)
    acts = restarted.handle(pin)  # the same bytes again
    assert not of(acts, LoadVersion) and restarted.counters["reject:replayed"] == 1
    assert not of(restarted.handle(control("unpin", nonce=8)), RecordRelease)
    assert of(restarted.handle(control("pin", 0, nonce=9)), LoadVersion)  # a new command still runs


def test_a_command_outlives_a_busy_gate_in_the_release_record(tmp_path: Path) -> None:
    """release.json keeps the newest 200 events: a busy gate writes that many decisions well
    inside a command's replay window, which dropped the command's nonce, and the same signed
    pin replayed after a restart ran again (durability audit). Older commands are kept."""
    from coordinator.core import LoadVersion, VersionLoaded

    reg = Registry(tmp_path, SPEC)
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    c = gated(k=1)
    pin = control("pin", 0, nonce=7)
    (load,) = of(c.handle(pin), LoadVersion)
    for r in of(c.handle(VersionLoaded(now=51.0, version=0, weights=np.zeros(SPEC.size, np.float32), command="pin",
                                       operator=load.operator, nonce=load.nonce)), RecordRelease):
        reg.record_release(0, r.pinned, r.event)  # (this registry holds version 0 only)
    for v in range(1, 251):  # 250 gate decisions after it
        reg.record_release(0, True, {"action": "passed", "version": v, "release": 0, "at": 52.0 + v})
    snap = reg.load()
    assert snap is not None and len(snap.gate_history) == 201 and snap.gate_history[0]["nonce"] == 7
    restarted = gated(k=1, snapshot=snap)
    assert not of(restarted.handle(pin), LoadVersion) and restarted.counters["reject:replayed"] == 1


def test_a_rejection_outlives_a_busy_gate_in_the_release_record(tmp_path: Path) -> None:
    """The core remembers 200 rejections for ``--force``, but a restart took them only from the
    release record's newest 200 events: after 250 other decisions, `edgeci pin` of the rejected
    version ran without --force once the coordinator had restarted, and was refused before it.
    Older rejections are kept in the record like older commands."""
    import dataclasses

    from coordinator.core import LoadVersion

    reg = Registry(tmp_path, SPEC)
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    c = gated(k=1)
    c.handle(update("bad", 0, 50.0))  # candidate 1
    acts = c.handle(CandidateEvaluated(now=9.0, version=1, candidate_metric=0.3, release_metric=0.8, release_version=0))
    (reject,) = of(acts, RecordRelease)
    assert reject.event["action"] == "reject"
    reg.record_release(0, False, reject.event)  # (this registry holds version 0 only: the release)
    for v in range(3, 253):  # 250 gate decisions after it
        reg.record_release(0, False, {"action": "hold", "version": v, "release": 0, "at": 10.0 + v})
    snap = reg.load()
    assert snap is not None
    restarted = gated(k=1, snapshot=dataclasses.replace(snap, version=252))
    assert not of(restarted.handle(control("pin", 1)), LoadVersion)
    assert restarted.counters["control_refused:gate_rejected"] == 1
    assert of(restarted.handle(control("pin", 1, nonce=2, force=True)), LoadVersion)
    assert len(snap.gate_history) == 201  # the rejection, then the newest 200 events


def _ack(actions: Sequence[object]) -> tuple[str, str]:
    (ack,) = [decode(a.payload) for a in actions if isinstance(a, Publish) and a.topic.endswith("/ack")]
    return ack.status, ack.reason


def rejected_lineage(c: CoordinatorCore) -> tuple[int, int, np.ndarray]:
    """Release 1; candidate 2 (bad), candidate 3 built on it; 2 rejected, the line rolled back
    (version 4). Returns (the rejected candidate, the one dropped with it, its weights)."""
    c.handle(update("h", 0, 0.05))
    c.handle(CandidateEvaluated(now=1.0, version=1, candidate_metric=0.9, release_metric=0.8, release_version=0))
    c.handle(update("bad", 0, 80.0, base=1))
    bad, bad_weights = c.version, c.weights.copy()
    c.handle(update("d2", 0, 81.0, base=bad))
    built_on_bad = c.version
    acts = c.handle(CandidateEvaluated(now=9.0, version=bad, candidate_metric=0.1, release_metric=0.9, release_version=1))
    assert [r.event["action"] for r in of(acts, RecordRelease)] == ["reject"] and c.version == 4
    return bad, built_on_bad, bad_weights


def test_an_update_trained_from_a_rejected_candidate_is_refused() -> None:
    """F11: after the gate rejected a candidate and rolled the training line back, an update
    whose base was that candidate (a device that pulled it before the verdict) was accepted, and
    with the default combine="models" the next training version *was* its weights: the rejected
    model plus a step (repro: rejected candidate mean 0.080, after the rollback 0.050, then
    version 8 at 0.081). Clipping measures the change from the update's own base, so it cannot
    see it. Such an update, and one based on a candidate dropped with it, is refused now
    (base_rejected), counted, and changes nothing; updates from the release are taken."""
    c = CoordinatorCore(CoordinatorConfig(region="r1", coordinator_id="c1", spec=SPEC, signer=SIGNER, gate=GateConfig(margin=0.02)),
                        make_strategy("spin", k=1, timeout_s=None), toy_snapshot(), rng=random.Random(0))  # default clipping
    bad, built_on_bad, bad_weights = rejected_lineage(c)
    line, line_weights = c.version, c.weights.copy()
    for dev, base in (("d7", bad), ("d8", built_on_bad)):
        acts = c.handle(update(dev, 0, float(bad_weights.mean()) + 0.001, base=base))
        assert _ack(acts) == ("rejected", "base_rejected")
        assert not of(acts, PersistUpdate) and not of(acts, CommitVersion)
    assert c.version == line and not c.buffer
    np.testing.assert_array_equal(c.weights, line_weights)  # still the release's weights
    assert c.counters["reject:base_rejected"] == 2 and c.counters["accepted"] == 3
    assert c.status().extra["gate"]["abandoned"] == [[bad, line - 1]]
    assert _ack(c.handle(update("d7", 0, 1.0, base=bad))) == ("rejected", "base_rejected")  # its retry: the same answer
    assert _ack(c.handle(update("d7", 1, 0.06, base=line))) == ("accepted", "")  # trained again from the line
    assert _ack(c.handle(update("d9", 0, 0.06, base=1))) == ("accepted", "")  # the release is no abandoned base


def test_an_operator_rollback_abandons_the_versions_after_the_one_it_restores() -> None:
    c = gated(k=1)
    c.handle(update("d1", 0, 1.0))
    c.handle(update("d2", 0, 2.0, base=1))
    (load,) = of(c.handle(control("rollback", 1)), LoadVersion)
    (commit,) = of(c.handle(VersionLoaded(now=51.0, version=1, weights=np.ones(SPEC.size, np.float32), command="rollback",
                                          operator=load.operator, nonce=load.nonce)), CommitVersion)
    assert commit.version == 3 and commit.metadata["abandoned"] == [[2, 2]]
    assert _ack(c.handle(update("d3", 0, 2.5, base=2))) == ("rejected", "base_rejected")
    assert _ack(c.handle(update("d4", 0, 1.5, base=1))) == ("accepted", "")  # the restored version itself is fine


def test_releasing_a_version_built_on_a_rejected_candidate_needs_force_too() -> None:
    """helper-105: `rollback N` / `pin N` of a version built on a candidate the gate rejected (dropped
    with it, never scored: the rejected model plus a step) ran without --force or a word, while the
    rejected version itself was refused. The lineage is refused now, naming the rejected version,
    also after a restart (the reject record says how far it reached)."""
    c = gated(k=1)
    bad, built_on_bad, _ = rejected_lineage(c)
    acts = c.handle(control("rollback", built_on_bad))
    assert not of(acts, LoadVersion) and c.counters["control_refused:gate_rejected"] == 1
    detail = c.status().extra["control_refused"]["detail"]
    assert detail.startswith(f"version {built_on_bad} was built on a rejected candidate: the release gate rejected version {bad}: ")
    assert "--force" in detail
    assert of(c.handle(control("pin", built_on_bad, nonce=2, force=True)), LoadVersion)
    assert of(c.handle(control("rollback", 1, nonce=3)), LoadVersion)  # the release before it: as before
    restarted = gated(k=1, snapshot=Snapshot(version=c.version, weights=c.weights.copy(), release_version=1,
                                             release_weights=c.weights.copy(), gate_history=c._gate_history))
    assert not of(restarted.handle(control("pin", built_on_bad, nonce=4)), LoadVersion)
    assert of(restarted.handle(control("pin", c.version, nonce=5)), LoadVersion)  # the rollback's own copy is fine


def test_the_refusal_survives_a_restart(tmp_path: Path) -> None:
    """The abandoned versions ride in the rollback commit's metadata (durable with it, and in
    every later commit's): a core rebuilt from the state dir still refuses them."""
    registry = Registry(tmp_path, SPEC)
    registry.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    c = gated(k=1)
    real = c.handle

    def handle(event: object) -> list[object]:  # the registry's half of the driver
        actions = real(event)  # type: ignore[arg-type]
        for a in actions:
            if isinstance(a, CommitVersion):
                registry.commit(a)
            elif isinstance(a, RecordRelease):
                registry.record_release(a.release, a.pinned, a.event)
        return actions

    c.handle = handle  # type: ignore[method-assign]
    bad, built_on_bad, _ = rejected_lineage(c)
    c.handle(update("d9", 0, 0.06, base=c.version))  # one more commit after the rollback
    registry.close()
    snap = Registry(tmp_path, SPEC).load()
    assert snap is not None and snap.version == c.version == 5 and snap.release_version == 1
    restarted = gated(k=1, snapshot=snap)
    for dev, base in (("d7", bad), ("d8", built_on_bad)):
        assert _ack(restarted.handle(update(dev, 0, 80.0, base=base))) == ("rejected", "base_rejected")
    assert restarted.version == 5 and restarted.counters["reject:base_rejected"] == 2


def _unreadable(root: Path, version: int) -> None:
    """Media damage to ``version``, the newest commit: its directory's files read back as garbage, and
    so does a byte of its log record (the log's last: a log copy would win over the directory)."""
    for f in (root / "versions" / f"{version:09d}").iterdir():
        f.write_bytes(b"\0garbage")
    for segment in sorted(root.rglob("*.log")):
        data = bytearray(segment.read_bytes())
        data[-5] ^= 0xFF
        segment.write_bytes(bytes(data))


def _restarted(root: Path, now: float) -> tuple[Registry, CoordinatorCore, list[object]]:
    """A new process on ``root``: its registry, its core (durable) and what start() did (made durable)."""
    registry = Registry(root, SPEC)
    c = durable(gated(k=1, snapshot=registry.load()), registry)
    start: list[object] = list(c.start(now))
    for a in start:
        if isinstance(a, CommitVersion):
            registry.commit(a)
        elif isinstance(a, RecordRelease):
            registry.record_release(a.release, a.pinned, a.event, a.floor)
    return registry, c, start


def test_a_rejected_candidate_does_not_come_back_when_its_rollback_is_unreadable(tmp_path: Path) -> None:
    """helper-141 (G2): the gate rejected candidate 1 and rolled the line back (version 2; the reject
    in release.json). Media damage made version 2 unreadable, and the restart resumed from version 1 --
    the rejected model -- as the training line: not rolled back, not gated again (it was decided), and
    an update trained from it was accepted and built version 3 on it. The reject record's range is
    abandoned again and start() rolls the line back to the release, as the rollback had."""
    registry = Registry(tmp_path, SPEC)
    registry.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    c = durable(gated(k=1, snapshot=registry.load()), registry)
    c.handle(update("bad", 0, 50.0))  # candidate 1
    acts = c.handle(CandidateEvaluated(now=9.0, version=1, candidate_metric=0.3, release_metric=0.8, release_version=0))
    assert [a.version for a in of(acts, CommitVersion)] == [2] and [r.event["action"] for r in of(acts, RecordRelease)] == ["reject"]
    registry.close()
    _unreadable(tmp_path, 2)
    registry, restarted, start = _restarted(tmp_path, 10.0)
    assert restarted.status().extra["recovered_from"][0].startswith("2: version 2 is unreadable")
    (commit,) = of(start, CommitVersion)
    assert (commit.version, commit.metadata["source"], commit.metadata["of"], commit.metadata["rejected"]) == (3, "rollback", 0, 1)
    assert restarted.version == 3 and restarted.release[0] == 0 and not restarted.weights.any()  # the release's weights
    assert not of(start, EvaluateCandidate) and restarted.abandoned(1) and not restarted.abandoned(0)
    acts = restarted.handle(update("bad2", 0, 60.0, base=1))  # trained from the rejected candidate
    assert _ack(acts) == ("rejected", "base_rejected") and restarted.version == 3 and not of(acts, PersistUpdate)
    assert _ack(restarted.handle(update("d1", 0, 0.5, base=3))) == ("accepted", "") and restarted.version == 4
    registry.close()
    registry, again, start = _restarted(tmp_path, 20.0)  # the rollback is durable: no second one
    assert again.version == 4 and again.abandoned(1) and not of(start, CommitVersion) and of(start, EvaluateCandidate)


def test_an_operators_abandoned_versions_do_not_come_back_when_the_rollback_is_unreadable(tmp_path: Path) -> None:
    """The same for an operator's rollback (release 1, candidates 2 and 3 held, `rollback 1` commits
    version 4): version 4 unreadable, the restart resumed training from version 3, which the rollback
    had abandoned, and took updates trained from it. The release falls back to 1 (the release
    before 4); the line goes back to it."""
    registry = Registry(tmp_path, SPEC)
    registry.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    c = durable(gated(k=1, snapshot=registry.load()), registry)
    for v, (value, metric) in enumerate(((1.0, 0.9), (2.0, 0.85), (3.0, 0.85)), start=1):
        c.handle(update(f"d{v}", 0, value, base=v - 1))
        c.handle(CandidateEvaluated(now=float(v), version=v, candidate_metric=metric, release_metric=0.9,
                                    release_version=c.release[0]))
    assert [e["action"] for e in c.status().extra["recent_versions"]] == ["promote", "hold", "hold"]
    (load,) = of(c.handle(control("rollback", 1)), LoadVersion)
    acts = c.handle(VersionLoaded(now=51.0, version=1, weights=registry.read_version(1)[0], command="rollback",
                                  operator=load.operator, nonce=load.nonce))
    assert [a.version for a in of(acts, CommitVersion)] == [4] and c.abandoned(3) and c.release[0] == 4
    registry.close()
    _unreadable(tmp_path, 4)
    registry, restarted, start = _restarted(tmp_path, 60.0)
    assert restarted.release[0] == 1 and restarted.abandoned(2) and restarted.abandoned(3)
    (commit,) = of(start, CommitVersion)
    assert commit.version == 5 and commit.metadata["source"] == "rollback" and "rejected" not in commit.metadata
    np.testing.assert_array_equal(restarted.weights, np.full(SPEC.size, 1.0, np.float32))
    assert _ack(restarted.handle(update("d9", 0, 3.5, base=3))) == ("rejected", "base_rejected")
    assert restarted.version == 5


def test_a_release_the_lost_rollback_abandoned_is_not_the_release_again(tmp_path: Path) -> None:
    """helper-143: releases 1 and 2 promoted, candidate 3 held, `rollback 1` commits version 4 (the
    release; 2 and 3 abandoned); version 4 unreadable. The registry fell back to the release before
    4 in the history, 2 — one the rollback abandoned — so the line and the release stayed on what the
    operator had rolled back. It skips abandoned releases now: 1, and the line goes back to it."""
    registry = Registry(tmp_path, SPEC)
    registry.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    c = durable(gated(k=1, snapshot=registry.load()), registry)
    for v, (value, metric) in enumerate(((1.0, 0.9), (2.0, 0.9), (3.0, 0.85)), start=1):
        c.handle(update(f"d{v}", 0, value, base=v - 1))
        c.handle(CandidateEvaluated(now=float(v), version=v, candidate_metric=metric, release_metric=0.9,
                                    release_version=c.release[0]))
    assert [e["action"] for e in c.status().extra["recent_versions"]] == ["promote", "promote", "hold"]
    (load,) = of(c.handle(control("rollback", 1)), LoadVersion)
    acts = c.handle(VersionLoaded(now=51.0, version=1, weights=registry.read_version(1)[0], command="rollback",
                                  operator=load.operator, nonce=load.nonce))
    assert [a.version for a in of(acts, CommitVersion)] == [4] and c.abandoned(2) and c.release[0] == 4
    registry.close()
    _unreadable(tmp_path, 4)
    registry, restarted, start = _restarted(tmp_path, 60.0)
    assert restarted.release[0] == 1 and restarted.abandoned(2) and restarted.abandoned(3)  # was release 2, nothing abandoned
    (commit,) = of(start, CommitVersion)
    assert commit.version == 5 and commit.metadata["source"] == "rollback"
    np.testing.assert_array_equal(restarted.weights, np.full(SPEC.size, 1.0, np.float32))
    assert _ack(restarted.handle(update("d9", 0, 2.5, base=2))) == ("rejected", "base_rejected")


@pytest.mark.parametrize("command", ["rollback", "pin"])
def test_an_operator_command_whose_release_record_is_lost_keeps_its_release(tmp_path: Path, command: str) -> None:
    """helper-105: the operator's commit is durable before its release record; a storage failure
    writing release.json (ENOSPC: the daemon rebuilds its core from the state dir) or a crash
    between the two left a commit whose metadata named the *old* release and pin. Restored, the
    release was the version the rollback had just abandoned (2, recalled by its own coordinator),
    the pin was gone, and the operator's copy went to the gate as a candidate (a real daemon
    promoted it and every candidate after it, pinned or not). The commit records the release and
    the pin it leaves now."""
    registry = Registry(tmp_path, SPEC)
    registry.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    c = gated(k=1)
    for v, value in ((1, 1.0), (2, 2.0)):  # releases 1 and 2
        for a in c.handle(update(f"d{v}", 0, value, base=v - 1)):
            if isinstance(a, CommitVersion):
                registry.commit(a)
        for r in of(c.handle(CandidateEvaluated(now=float(v), version=v, candidate_metric=0.9, release_metric=0.9,
                                                release_version=v - 1)), RecordRelease):
            registry.record_release(r.release, r.pinned, r.event, r.floor)
    assert read_release_record(tmp_path)["gate_floor"] == {"best": 0.9, "validation_set": ""}
    (load,) = of(c.handle(control(command, 1)), LoadVersion)
    acts = c.handle(VersionLoaded(now=51.0, version=1, weights=np.ones(SPEC.size, np.float32), command=command,
                                  operator=load.operator, nonce=load.nonce))
    (commit,) = of(acts, CommitVersion)
    registry.commit(commit)  # ... and the process dies before the release record
    registry.close()
    snap = Registry(tmp_path, SPEC).load()
    assert snap is not None and (snap.version, snap.release_version, snap.pinned) == (3, 3, command == "pin")
    assert snap.gate_floor is None  # the operator's release is the new bar: the recorded floor was the old one's
    restarted = gated(k=1, snapshot=snap)
    assert restarted.release[0] == 3 and not restarted.abandoned(3) and restarted.abandoned(2)
    assert not of(restarted.start(60.0), EvaluateCandidate)  # the operator's choice is no candidate
    assert reply(restarted.handle(pull("d9", 0, serve=True))).version == 3


@pytest.mark.parametrize("command", ["rollback", "pin"])
def test_an_operator_command_whose_release_record_is_lost_is_not_run_again(tmp_path: Path, command: str) -> None:
    """helper-119: the replay protection of operator commands is seeded from the release record; a
    crash (or a failed write of release.json) after the command's commit lost it, and the same signed
    command, replayed within its window, ran again after the restart (another commit, the versions
    trained since abandoned). The commit names the command now; the restart takes it back and
    records it again."""
    registry = Registry(tmp_path, SPEC)
    registry.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    c = gated(k=1)
    for a in of(c.handle(update("d1", 0, 1.0)), CommitVersion):
        registry.commit(a)
    (load,) = of(c.handle(control(command, 1)), LoadVersion)
    acts = c.handle(VersionLoaded(now=51.0, version=1, weights=np.ones(SPEC.size, np.float32), command=command,
                                  operator=load.operator, nonce=load.nonce))
    for a in of(acts, CommitVersion):
        registry.commit(a)  # ... and the process dies before the release record
    registry.close()
    registry = Registry(tmp_path, SPEC)
    restarted = gated(k=1, snapshot=registry.load())
    (record,) = of(restarted.start(60.0), RecordRelease)
    assert (record.event["action"], record.event["nonce"], record.event["operator"]) == (command, 1, "alice")
    assert any(e.get("nonce") == 1 for e in restarted.status().extra["recent_versions"])  # the CLI's confirmation
    assert not of(restarted.handle(control(command, 1)), LoadVersion)
    assert restarted.counters["reject:replayed"] == 1
    registry.record_release(record.release, record.pinned, record.event, record.floor)
    for a in of(restarted.handle(update("d2", 0, 2.0, base=restarted.version)), CommitVersion):
        registry.commit(a)  # the newest commit no longer names the command
    registry.close()
    again = gated(k=1, snapshot=Registry(tmp_path, SPEC).load())
    assert not of(again.start(61.0), RecordRelease)  # recorded once
    replayed = again.counters["reject:replayed"]  # (the counters come back from the commit)
    assert not of(again.handle(control(command, 1)), LoadVersion) and again.counters["reject:replayed"] == replayed + 1


def test_a_rejection_whose_record_is_lost_still_needs_force(tmp_path: Path) -> None:
    """helper-105: the rollback after a rejection is durable before the "reject" record; a crash (or a
    failed write of release.json) between the two lost the verdict, and `rollback 1` of the rejected
    candidate then ran without --force. The rollback commit names the candidate it undid (and the
    versions up to it), which a restart takes as the verdict."""
    registry = Registry(tmp_path, SPEC)
    registry.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    c = gated(k=1)
    for value, base in ((50.0, 0), (51.0, 1)):  # candidate 1 (bad), candidate 2 built on it
        for a in of(c.handle(update(f"d{base}", 0, value, base=base)), CommitVersion):
            registry.commit(a)
    acts = c.handle(CandidateEvaluated(now=9.0, version=1, candidate_metric=0.1, release_metric=0.8, release_version=0))
    for a in of(acts, CommitVersion):
        registry.commit(a)  # ... and the process dies before the release record
    registry.close()
    snap = Registry(tmp_path, SPEC).load()
    assert snap is not None and snap.version == 3 and snap.release_version == 0
    restarted = gated(k=1, snapshot=snap)
    for nonce, version in ((1, 1), (2, 2)):
        assert not of(restarted.handle(control("rollback", version, nonce=nonce)), LoadVersion)
    assert restarted.counters["control_refused:gate_rejected"] == 2
    assert of(restarted.handle(control("rollback", 1, nonce=3, force=True)), LoadVersion)


def test_a_rejection_whose_record_is_lost_is_recorded_at_the_restart(tmp_path: Path) -> None:
    """helper-119: the verdict taken from the rollback commit (d11336a) lived in memory only; once the
    next version was committed the newest commit no longer named it, and after a second restart
    `rollback 1` of the rejected candidate ran without --force. start() records it now."""
    registry = Registry(tmp_path, SPEC)
    registry.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    c = gated(k=1)
    for value, base in ((50.0, 0), (51.0, 1)):  # candidate 1 (bad), candidate 2 built on it
        for a in of(c.handle(update(f"d{base}", 0, value, base=base)), CommitVersion):
            registry.commit(a)
    for a in of(c.handle(CandidateEvaluated(now=9.0, version=1, candidate_metric=0.1, release_metric=0.8, release_version=0)),
                CommitVersion):
        registry.commit(a)  # ... and the process dies before the release record

    def run(actions: Sequence[object]) -> None:
        for a in of(actions, CommitVersion):
            registry.commit(a)
        for a in of(actions, RecordRelease):
            registry.record_release(a.release, a.pinned, a.event, a.floor)

    registry.close()
    registry = Registry(tmp_path, SPEC)
    first = gated(k=1, snapshot=registry.load())
    run(first.start(10.0))
    run(first.handle(update("d5", 0, 0.5, base=first.version)))  # the line goes on: version 4
    assert first.version == 4
    registry.close()
    again = gated(k=1, snapshot=Registry(tmp_path, SPEC).load())
    assert not of(again.start(30.0), RecordRelease)  # recorded once
    for nonce, version in ((1, 1), (2, 2)):
        assert not of(again.handle(control("rollback", version, nonce=nonce)), LoadVersion)
    assert again.counters["control_refused:gate_rejected"] == 2


def test_abandoned_ranges_merge_and_stay_bounded() -> None:
    from coordinator.core import ABANDONED_RANGES, abandon

    assert abandon([(2, 4)], 5, 7) == [(2, 7)] and abandon([(2, 4)], 9, 8) == [(2, 4)]
    assert abandon([[9, 12]], 2, 3) == [(2, 3), (9, 12)]  # as JSON metadata holds them
    ranges: list[tuple[int, int]] = []
    for v in range(0, 3 * ABANDONED_RANGES, 3):
        ranges = abandon(ranges, v, v + 1)
    assert len(ranges) == ABANDONED_RANGES and ranges[-1] == (3 * ABANDONED_RANGES - 3, 3 * ABANDONED_RANGES - 2)
    c = gated(snapshot=Snapshot(version=20, weights=np.zeros(SPEC.size, np.float32), abandoned=[[3, 5], [9, 9]]))
    assert [v for v in range(12) if c.abandoned(v)] == [3, 4, 5, 9]


def test_a_refused_command_replayed_is_a_rejected_message_not_another_refusal() -> None:
    """A verified command that was refused was not remembered: anyone reading the control topic could
    replay it, each copy counted as an operator refusal with a WARNING (helper-87). The same signed
    command again is now `replayed` (a rejection); another command with the same nonce still runs."""
    c = gated()
    refused = control("rollback", 10**6, nonce=5)
    assert not of(c.handle(refused), LoadVersion) and c.counters["control_refused:unknown_version"] == 1
    for _ in range(3):
        assert not of(c.handle(refused), LoadVersion)
    assert c.counters["control_refused:unknown_version"] == 1 and c.counters["reject:replayed"] == 3
    assert c.status().extra["control_refused"]["reason"] == "replayed"
    assert of(c.handle(control("rollback", 0, nonce=5)), LoadVersion)


def _drive(registry: Registry, c: CoordinatorCore, actions: Sequence[object], now: float) -> list[object]:
    """The registry's half of the daemon (``CoordinatorDaemon._do``) for ``actions``: commits, records,
    and an operator's ``LoadVersion`` read from the registry and answered (its actions driven too)."""
    from coordinator.core import RecordRefusal
    from coordinator.registry import RegistryError

    done = list(actions)
    for a in actions:
        if isinstance(a, CommitVersion):
            registry.commit(a)
        elif isinstance(a, RecordRelease):
            registry.record_release(a.release, a.pinned, a.event, a.floor)
        elif isinstance(a, RecordRefusal):
            registry.record_refusal(a.event)
        elif isinstance(a, LoadVersion):
            try:
                weights, detail = registry.read_version(a.version)[0], ""
            except RegistryError as exc:
                weights, detail = None, str(exc)
            done += _drive(registry, c, c.handle(VersionLoaded(now=now, version=a.version, weights=weights, detail=detail,
                                                               command=a.command, operator=a.operator, nonce=a.nonce,
                                                               kid=a.kid)), now)
    return done


def _notes(actions: Sequence[object]) -> list[str]:
    return [a.kind for a in of(actions, Notify) if a.kind != "status"]


def test_a_refused_or_failed_command_replayed_after_a_restart_is_refused(tmp_path: Path) -> None:
    """helper-141 (G3): a verified command that did not run -- `rollback 3` while the newest version was
    2 (refused: unknown_version), `pin 1` while version 1 could not be read (failed) -- was remembered in
    memory only. Replayed to the same core it was refused as a replay; replayed within its window after
    a restart (training had reached version 3 meanwhile) the same signed bytes ran: rollback 3 committed
    and released a copy of 3, pin 1 pinned version 1. They are recorded (refused.json) and seeded now."""
    registry = Registry(tmp_path, SPEC)
    registry.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    c = gated(k=1, snapshot=registry.load())
    for seq in range(2):
        _drive(registry, c, c.handle(update("d1", seq, 1.0 + seq, base=seq)), 1.0)
    assert c.version == 2
    rollback3, pin1 = control("rollback", 3, nonce=11), control("pin", 1, nonce=12)
    assert _notes(_drive(registry, c, c.handle(rollback3), 50.0)) == ["control_refused"]
    aside = tmp_path / "v1-aside"
    (tmp_path / "versions" / f"{1:09d}").rename(aside)  # version 1 unreadable for a moment
    assert _notes(_drive(registry, c, c.handle(pin1), 50.0)) == ["control", "control_failed"]
    aside.rename(tmp_path / "versions" / f"{1:09d}")
    for replay in (rollback3, pin1):  # the same core: replays
        assert not of(_drive(registry, c, c.handle(replay), 50.0), LoadVersion)
    assert c.counters["reject:replayed"] == 2
    _drive(registry, c, c.handle(update("d1", 2, 3.0, base=2)), 50.0)  # training goes on: version 3 exists now
    assert c.version == 3 and not c.status().extra["pinned"]
    registry.close()
    registry = Registry(tmp_path, SPEC)
    restarted = gated(k=1, snapshot=registry.load())
    _drive(registry, restarted, restarted.start(50.0), 50.0)
    replayed = restarted.counters["reject:replayed"]  # (the counters come back from the commit)
    for replay in (rollback3, pin1):  # the same signed bytes, within their window, after the restart
        acts = _drive(registry, restarted, restarted.handle(replay), 50.0)
        assert not of(acts, LoadVersion) and not of(acts, CommitVersion) and not of(acts, RecordRelease)
    assert restarted.counters["reject:replayed"] == replayed + 2 and restarted.version == 3
    assert restarted.release[0] == 0 and not restarted.status().extra["pinned"]
    acts = _drive(registry, restarted, restarted.handle(control("rollback", 3, nonce=13)), 50.0)  # a new command runs
    assert [a.version for a in of(acts, CommitVersion)] == [4] and restarted.release[0] == 4


def test_refused_commands_are_kept_apart_and_bounded(tmp_path: Path) -> None:
    """A flood of refused commands (a verified operator's script gone wrong) is kept in refused.json,
    the newest REFUSALS_KEPT: release.json (the gate's decisions, the executed commands) is untouched."""
    from coordinator.registry import REFUSALS_KEPT, read_refusals

    registry = Registry(tmp_path, SPEC)
    registry.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    c = gated(k=1, snapshot=registry.load())
    _drive(registry, c, c.handle(update("d1", 0, 1.0)), 1.0)
    _drive(registry, c, c.handle(CandidateEvaluated(now=2.0, version=1, candidate_metric=0.9, release_metric=0.8,
                                                    release_version=0)), 2.0)
    before = (tmp_path / "release.json").read_bytes()
    for nonce in range(REFUSALS_KEPT + 44):
        _drive(registry, c, c.handle(control("rollback", 99, nonce=nonce)), 50.0)
    assert c.counters["control_refused:unknown_version"] == REFUSALS_KEPT + 44
    assert (tmp_path / "release.json").read_bytes() == before
    kept = read_refusals(tmp_path)
    assert len(kept) == REFUSALS_KEPT and [e["nonce"] for e in kept] == list(range(44, REFUSALS_KEPT + 44))
    registry.close()
    restarted = gated(k=1, snapshot=Registry(tmp_path, SPEC).load())
    counts = restarted.counters.copy()  # (as of the last commit)

    def grew() -> dict[str, int]:
        return {k: n for k, n in (restarted.counters - counts).items() if k.startswith(("reject:", "control_refused:"))}

    restarted.handle(control("rollback", 99, nonce=REFUSALS_KEPT + 43))  # the newest: a replay
    assert grew() == {"reject:replayed": 1}
    restarted.handle(control("rollback", 99, nonce=0))  # the oldest was forgotten: refused again, as before it was kept
    assert grew() == {"reject:replayed": 1, "control_refused:unknown_version": 1}


def test_a_damaged_refusal_record_forgets_only_the_refusals(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    registry = Registry(tmp_path, SPEC)
    registry.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    c = gated(k=1, snapshot=registry.load())
    _drive(registry, c, c.handle(control("rollback", 99, nonce=1)), 50.0)
    registry.close()
    refused = tmp_path / "refused.json"
    good = refused.read_bytes()
    refused.write_bytes(good[: len(good) // 2])  # torn
    snap = Registry(tmp_path, SPEC).load()
    assert snap is not None and snap.control_refused == [] and "refused.json is unreadable" in caplog.text
    refused.write_text('[{"operator": "alice", "nonce": "1"}, 7, {"outcome": "refused", "at": 50.0, "operator": "alice", '
                       '"nonce": 2, "command": "rollback", "version": 99, "force": false}]')  # one damaged entry, one good
    restarted = gated(k=1, snapshot=Registry(tmp_path, SPEC).load())
    restarted.handle(control("rollback", 99, nonce=2))
    restarted.handle(control("rollback", 99, nonce=1))
    assert restarted.counters["reject:replayed"] == 1 and restarted.counters["control_refused:unknown_version"] == 1
