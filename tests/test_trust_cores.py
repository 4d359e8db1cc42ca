"""Issue 9 in the sans-IO cores: signed models and pinned keys, and a protocol that a hostile
client cannot break — without TLS (the broker tests add TLS + ACL on top).

Each attack from the issue is a test: a forged model is not deployed and is counted; a seq
far above the watermark is refused and moves nothing; someone else's message under a
device's next seq cannot make the device drop its update; a forged invitation does not
bypass selection; an absurd sample count is refused; a pull flood is answered at a bounded
rate while an honest device is served; storage failure defers instead of losing updates.
"""

from __future__ import annotations

import random
import tracemalloc
from typing import Any

import numpy as np
import pytest

from coordinator.core import CoordinatorConfig, CoordinatorCore, PersistUpdate, StorageChanged
from coordinator.methods import make_method
from coordinator.strategies import make_strategy
from edge_sdk.core.device import DeviceConfig, DeviceCore, Phase
from edge_sdk.core.events import (
    DeployModel,
    MessageReceived,
    Notify,
    PinKey,
    Publish,
    SampleAdded,
    ScheduleTimer,
    StartTraining,
    TimerFired,
    TrainingFinished,
)
from edge_sdk.errors import ConfigError, MalformedMessage
from edge_sdk.signing import Signer
from edge_sdk.wire import topics
from edge_sdk.wire.codec import decode, encode
from edge_sdk.wire.messages import Ack, Invite, ModelMsg, PeerMsg, Pull, Recall, Update
from tests.helpers import SIGNER, SPEC, make_coordinator, toy_snapshot

DEV = "d1"


def device(**kw: object) -> DeviceCore:
    cfg = DeviceConfig(device_id=DEV, region="r1", spec=SPEC, min_samples=2, request_timeout_s=5.0, **kw)  # type: ignore[arg-type]
    return DeviceCore(cfg, rng=random.Random(0))


def to_dev(now: float, leaf: str, payload: bytes, dev: str = DEV) -> MessageReceived:
    return MessageReceived(now=now, topic=topics.device_topic("r1", dev, leaf), payload=payload)


def to_coord(now: float, dev: str, leaf: str, msg: object) -> MessageReceived:
    return MessageReceived(now=now, topic=topics.device_topic("r1", dev, leaf), payload=encode(msg))  # type: ignore[arg-type]


def model(version: int, reply_to: int = -1, value: float | None = None, signer: Signer | None = SIGNER) -> bytes:
    w = np.full(SPEC.size, float(version if value is None else value), dtype=np.float32)
    return encode(ModelMsg(model_id="toy", version=version, reply_to=reply_to, weights=w), signer=signer,
                  scope=topics.device_scope("r1", "model"))


def published(actions: list[object], leaf: str = "") -> list[object]:
    return [decode(a.payload) for a in actions if isinstance(a, Publish) and a.topic.endswith(leaf)]


def notes(actions: list[object], kind: str) -> list[Notify]:
    return [a for a in actions if isinstance(a, Notify) and a.kind == kind]


def update(dev: str, seq: int, *, n: int = 1, nonce: int = 0, value: float = 1.0, base: int = 0) -> Update:
    w = np.full(SPEC.size, value, dtype=np.float32)
    return Update(device=dev, seq=seq, model_id="toy", base_version=base, n_samples=n, weights=w, nonce=nonce)


def train_and_push(d: DeviceCore, now: float = 0.0) -> Update:
    """Drive a fresh device (serving pull, samples, pull, training) to its first update."""
    d.handle(SampleAdded(now=now, total=2))
    pull = published(d.handle(TimerFired(now=now)) or [], "pull")  # nothing pending: no-op
    assert not pull
    seq = d.state.pending_seq
    acts = d.handle(to_dev(now, "model", model(0, seq)))
    job = next(a for a in acts if isinstance(a, StartTraining)).job
    acts = d.handle(TrainingFinished(now=now + 1, job_id=job.job_id, weights=job.weights + 1, n_samples=2))
    (upd,) = published(acts, "update")
    assert isinstance(upd, Update)
    return upd


# ------------------------------------------------------------------ signed models


def test_forged_unsigned_model_is_refused_counted_and_never_deployed() -> None:
    d = device()
    acts = d.handle(to_dev(0.0, "model", model(10**9, value=0.0, signer=None)))
    assert not [a for a in acts if isinstance(a, DeployModel)]
    assert notes(acts, "message_rejected")[0].data["reason"] == "unsigned"
    assert d.state.deployed is None and d.state.counters["rejected:unsigned"] == 1


def test_first_key_is_pinned_durably_and_another_key_is_refused() -> None:
    d = device()
    acts = d.handle(to_dev(0.0, "model", model(3)))
    pins = [a for a in acts if isinstance(a, PinKey)]
    assert pins and pins[0].kid == SIGNER.kid
    assert acts.index(pins[0]) < next(i for i, a in enumerate(acts) if isinstance(a, DeployModel))  # pin is durable first
    attacker = Signer.generate()
    acts = d.handle(to_dev(1.0, "model", model(10**9, value=0.0, signer=attacker)))
    assert notes(acts, "message_rejected")[0].data["reason"] == "bad_signature"
    assert d.state.deployed_version == 3
    np.testing.assert_array_equal(d.state.deployed, 3.0)


def test_a_model_the_device_refuses_pins_no_key() -> None:
    """First-use pinning pins the key of an accepted model only: a well-signed model for another
    model id, or with NaN weights, once pinned its signer and the genuine coordinator's models
    were then refused as bad_signature (hostile-input audit)."""
    attacker = Signer.generate()
    other = encode(ModelMsg(model_id="other", version=5, reply_to=-1, weights=np.zeros(SPEC.size, np.float32)),
                   signer=attacker, scope=topics.device_scope("r1", "model"))
    nan = np.full(SPEC.size, np.nan, dtype=np.float32)
    poisoned = encode(ModelMsg(model_id="toy", version=5, reply_to=-1, weights=nan), signer=attacker,
                      scope=topics.device_scope("r1", "model"))
    d = device()
    for payload, reason in ((other, "unknown_model"), (poisoned, "non_finite")):
        acts = d.handle(to_dev(0.0, "model", payload))
        assert notes(acts, "message_rejected")[0].data["reason"] == reason
        assert not [a for a in acts if isinstance(a, PinKey)] and not d.state.pins
    acts = d.handle(to_dev(1.0, "model", model(3)))
    assert [a.kid for a in acts if isinstance(a, PinKey)] == [SIGNER.kid]
    assert [a.version for a in acts if isinstance(a, DeployModel)] == [3] and d.state.pins == {SIGNER.kid: SIGNER.public_raw}


def test_provisioned_keys_are_the_only_ones_trusted() -> None:
    d = device(trusted_keys={SIGNER.kid: SIGNER.public_raw})
    acts = d.handle(to_dev(0.0, "model", model(5, signer=Signer.generate())))  # no first-use pinning
    assert notes(acts, "message_rejected")[0].data["reason"] == "bad_signature"
    assert not [a for a in acts if isinstance(a, PinKey)]
    assert [a.version for a in d.handle(to_dev(1.0, "model", model(5))) if isinstance(a, DeployModel)] == [5]
    with pytest.raises(ConfigError):
        device(trusted_keys={"0" * 16: SIGNER.public_raw})


def test_a_tampered_signed_model_is_refused() -> None:
    d = device()
    d.handle(to_dev(0.0, "model", model(1)))
    good = bytearray(model(7))
    good[-64 - 8] ^= 0x40  # a weight byte inside the signed tail
    acts = d.handle(to_dev(1.0, "model", bytes(good)))
    assert notes(acts, "message_rejected")[0].data["reason"] == "bad_signature"
    assert d.state.deployed_version == 1


def test_a_model_signed_for_another_region_or_leaf_is_refused_and_pins_nothing() -> None:
    """A coordinator's genuine model replayed where it was not published (review finding F2):
    region r0's v50 on a region-r1 device's topic was deployed, after which the device refused
    r1's own releases as "not newer" and could not train until r1 numbered past 50."""
    def signed_for(scope: str) -> bytes:
        w = np.full(SPEC.size, 50.0, dtype=np.float32)
        return encode(ModelMsg(model_id="toy", version=50, reply_to=-1, weights=w), signer=SIGNER, scope=scope)

    for trusted in ({}, {SIGNER.kid: SIGNER.public_raw}):  # first-use pinning, provisioned keys
        d = device(trusted_keys=trusted)
        for payload in (signed_for(topics.device_scope("r0", "model")), signed_for(topics.device_scope("r1", "invite"))):
            acts = d.handle(to_dev(0.0, "model", payload))
            assert notes(acts, "message_rejected")[0].data["reason"] == "bad_signature"
            assert not [a for a in acts if isinstance(a, DeployModel | PinKey)]
        assert d.state.deployed is None and not d.state.pins and d.state.counters["rejected:bad_signature"] == 2
        assert [a.version for a in d.handle(to_dev(1.0, "model", model(3))) if isinstance(a, DeployModel)] == [3]


def test_unsolicited_signed_model_deploys_only_if_newer() -> None:
    d = device()
    d.handle(to_dev(0.0, "model", model(4)))
    assert not [a for a in d.handle(to_dev(1.0, "model", model(2))) if isinstance(a, DeployModel)]
    assert [a.version for a in d.handle(to_dev(2.0, "model", model(6))) if isinstance(a, DeployModel)] == [6]
    assert d.state.phase is Phase.IDLE  # an unsolicited model never starts training


def test_serving_pull_on_start_deploys_without_training() -> None:
    d = device()
    (pull,) = published(d.start(0.0), "pull")
    assert isinstance(pull, Pull) and pull.serve
    c = make_coordinator(k=5, timeout_s=None)
    reply = [a for a in c.handle(to_coord(0.1, DEV, "pull", pull)) if isinstance(a, Publish) and a.topic.endswith("/model")]
    acts = d.handle(to_dev(0.2, "model", reply[0].payload))
    assert [a.version for a in acts if isinstance(a, DeployModel)] == [0]
    assert not [a for a in acts if isinstance(a, StartTraining)]
    assert d.state.phase is Phase.IDLE and c.counters["pulls_serving"] == 1 and c.counters["pulls_served"] == 0


def test_device_holding_the_current_version_trains_from_its_own_copy() -> None:
    c = make_coordinator(k=5, timeout_s=None)
    d = device()
    d.handle(to_dev(0.0, "model", model(0, value=0.0)))  # holds version 0
    (pull,) = published(d.handle(SampleAdded(now=1.0, total=2)), "pull")
    (reply,) = [a for a in c.handle(to_coord(1.0, DEV, "pull", pull)) if isinstance(a, Publish) and a.topic.endswith("/model")]
    msg = decode(reply.payload)
    assert isinstance(msg, ModelMsg) and msg.group == "unchanged" and msg.weights.size == 0
    assert len(reply.payload) < 400  # no weights travelled
    acts = d.handle(to_dev(1.1, "model", reply.payload))
    (start,) = [a for a in acts if isinstance(a, StartTraining)]
    np.testing.assert_array_equal(start.job.weights, 0.0)


# ------------------------------------------------------------------ the coordinator under attack


def test_seq_jump_is_rejected_and_does_not_move_the_watermark() -> None:
    c = make_coordinator(k=10, timeout_s=None)
    c.handle(to_coord(0.0, DEV, "update", update(DEV, 3)))
    acts = c.handle(to_coord(0.1, DEV, "update", update(DEV, 10**15)))
    (ack,) = published(acts, "ack")
    assert isinstance(ack, Ack) and ack.status == "rejected" and ack.reason == "seq_jump"
    assert c.applied_upto == {} and c.counters["reject:seq_jump"] == 1
    (ack,) = published(c.handle(to_coord(0.2, DEV, "update", update(DEV, 4))), "ack")
    assert isinstance(ack, Ack) and ack.status == "accepted"


def test_a_reinstalled_device_starting_again_at_seq_0_is_not_told_its_updates_were_applied() -> None:
    """A device that lost its store (reinstall, new EDGECI_HOME) numbers from 0 again, below the
    watermark its earlier install left: every update was answered ``duplicate`` with nonce 0 and
    the device took that as success — a partition discarded while logged as acked (helper-83)."""
    c = make_coordinator(k=10, timeout_s=None)
    for seq in (3, 9, 40):  # the first install's accepted updates
        c.handle(to_coord(0.1 * seq, DEV, "update", update(DEV, seq, nonce=1000 + seq)))
    d = device()  # the reinstall: next_seq 0
    fresh = train_and_push(d, now=10.0)
    assert fresh.seq < 40
    (dup,) = published(c.handle(to_coord(11.0, DEV, "update", fresh)), "ack")
    assert isinstance(dup, Ack) and dup.status == "duplicate" and dup.nonce == 0 and dup.watermark == 40
    acts = d.handle(to_dev(11.1, "ack", encode(dup)))
    assert notes(acts, "seq_conflict") and not notes(acts, "update_acked") and d.state.updates_acked == 0
    (again,) = published(acts, "update")
    assert isinstance(again, Update) and again.seq == 41
    np.testing.assert_array_equal(again.weights, fresh.weights)
    accepted = c.counters["accepted"]
    (ack,) = published(c.handle(to_coord(11.2, DEV, "update", again)), "ack")
    assert isinstance(ack, Ack) and ack.status == "accepted" and c.counters["accepted"] == accepted + 1
    assert notes(d.handle(to_dev(11.3, "ack", encode(ack))), "update_acked") and d.state.updates_acked == 1


def test_a_reinstall_far_below_its_old_watermark_is_said_not_taken_as_applied() -> None:
    """The watermark an ack may move a device's seq to is bounded (MAX_WATERMARK_JUMP: acks are not
    signed); a reinstalled id whose old install sent more requests than that cannot get past it on
    its own. It keeps its update (retried, never taken as applied) and says why (helper-87)."""
    c = make_coordinator(k=10, timeout_s=None)
    c.handle(to_coord(0.0, DEV, "pull", Pull(device=DEV, seq=149_990, model_id="toy")))
    c.handle(to_coord(0.1, DEV, "update", update(DEV, 150_000, nonce=77)))  # the old install's last update
    d = device()
    fresh = train_and_push(d, now=10.0)
    (dup,) = published(c.handle(to_coord(11.0, DEV, "update", fresh)), "ack")
    assert isinstance(dup, Ack) and dup.status == "duplicate" and dup.watermark == 150_000
    acts = d.handle(to_dev(11.1, "ack", encode(dup)))
    assert notes(acts, "seq_behind") and not notes(acts, "update_acked") and d.state.updates_acked == 0
    assert d.state.pending_update is not None  # still pending: sent again at its timeout


def test_a_retry_answered_without_a_nonce_at_its_own_seq_is_success() -> None:
    """After a coordinator restart it no longer knows the nonce of a device's last accepted
    update: a retry of that seq (watermark == seq) is the device's own update, acknowledged."""
    d = device()
    pending = train_and_push(d)
    dup = Ack(device=DEV, seq=pending.seq, status="duplicate", version=1, nonce=0, watermark=pending.seq)
    acts = d.handle(to_dev(2.0, "ack", encode(dup)))
    assert notes(acts, "update_acked") and not published(acts, "update") and d.state.updates_acked == 1


def test_a_new_device_cannot_be_poisoned_beyond_its_last_pull() -> None:
    c = make_coordinator(k=10, timeout_s=None)
    c.handle(to_coord(0.0, DEV, "pull", Pull(device=DEV, seq=7, model_id="toy")))
    (ack,) = published(c.handle(to_coord(0.1, DEV, "update", update(DEV, 7 + 100_001))), "ack")
    assert isinstance(ack, Ack) and ack.reason == "seq_jump"
    # nor through a forged pull far above its last: refused, the reference for updates unmoved
    (ack,) = published(c.handle(to_coord(0.2, DEV, "pull", Pull(device=DEV, seq=7 + 100_001, model_id="toy"))), "ack")
    assert isinstance(ack, Ack) and (ack.status, ack.reason) == ("rejected", "seq_jump")
    (ack,) = published(c.handle(to_coord(0.3, DEV, "update", update(DEV, 7 + 100_001))), "ack")
    assert isinstance(ack, Ack) and ack.reason == "seq_jump" and c.counters["reject:seq_jump"] == 3


def test_forged_update_under_the_devices_next_seq_cannot_make_it_drop_its_own() -> None:
    c = make_coordinator(k=10, timeout_s=None)
    d = device()
    honest = train_and_push(d)
    # The attacker got there first with the same seq and its own nonce.
    c.handle(to_coord(0.5, DEV, "update", update(DEV, honest.seq, nonce=12345, value=-50.0)))
    (dup,) = published(c.handle(to_coord(1.0, DEV, "update", honest)), "ack")
    assert isinstance(dup, Ack) and dup.status == "duplicate" and dup.nonce == 12345
    acts = d.handle(to_dev(1.1, "ack", encode(dup)))
    assert notes(acts, "seq_conflict") and not notes(acts, "update_acked")
    (again,) = published(acts, "update")
    assert isinstance(again, Update) and again.seq > honest.seq and again.nonce != honest.nonce
    np.testing.assert_array_equal(again.weights, honest.weights)
    (ack,) = published(c.handle(to_coord(1.2, DEV, "update", again)), "ack")
    assert isinstance(ack, Ack) and ack.status == "accepted"
    acts = d.handle(to_dev(1.3, "ack", encode(ack)))
    assert notes(acts, "update_acked") and d.state.updates_acked == 1
    # its own retry (QoS 1 redelivery) is still recognised as its own
    (dup,) = published(c.handle(to_coord(1.4, DEV, "update", again)), "ack")
    assert isinstance(dup, Ack) and dup.nonce == again.nonce


def test_forged_invitation_does_not_bypass_selection() -> None:
    c = make_coordinator("fedbuff", k=2, select=1, population=3)
    acts = c.handle(to_coord(0.0, DEV, "pull", Pull(device=DEV, seq=0, model_id="toy", invite_round=5)))
    (ack,) = published(acts, "ack")
    assert isinstance(ack, Ack) and ack.status == "deferred"
    assert c.counters["invite_unknown"] == 1 and not published(acts, "model")


def test_a_real_invitation_is_served_once() -> None:
    c = make_coordinator("fedbuff", k=2, select=1, population=1)
    acts = c.handle(to_coord(0.0, DEV, "pull", Pull(device=DEV, seq=0, model_id="toy")))
    invites = published(acts, "invite")
    assert invites, "a population of one draws its only device"
    rnd = invites[0].round  # type: ignore[attr-defined]
    served = published(c.handle(to_coord(0.1, DEV, "pull", Pull(device=DEV, seq=1, model_id="toy", invite_round=rnd))), "model")
    assert len(served) == 1
    c.strategy.in_flight.clear()  # type: ignore[attr-defined]  # round over: a replay must not be served
    replay = c.handle(to_coord(0.2, DEV, "pull", Pull(device=DEV, seq=2, model_id="toy", invite_round=rnd)))
    assert not published(replay, "model") and c.counters["invite_unknown"] == 1


@pytest.mark.parametrize("strategy, params", [("fedbuff", {"k": 2, "select": 1, "population": 3}),
                                              ("fedavg", {"select": 1, "min_devices": 1})])
def test_updates_from_a_device_never_selected_are_refused(strategy: str, params: dict[str, Any]) -> None:
    """Updates need no invitation on the wire: before, a device never drawn sent K updates
    (FedBuff) or one (FedAvg) and they were aggregated, the model becoming its weights."""
    c = make_coordinator(strategy, **params)
    for seq in range(1, 4):
        (ack,) = published(c.handle(to_coord(0.1 * seq, "mallory", "update", update("mallory", seq, value=9.0))), "ack")
        assert isinstance(ack, Ack) and (ack.status, ack.reason) == ("rejected", "not_selected")
    assert not c.buffer and c.version == 0 and c.counters["reject:not_selected"] == 3


def test_a_selected_device_sends_one_update_per_training_model_served() -> None:
    c = make_coordinator("fedbuff", k=3, select=1, population=1)
    (invite,) = published(c.handle(to_coord(0.0, DEV, "pull", Pull(device=DEV, seq=0, model_id="toy"))), "invite")
    pull = Pull(device=DEV, seq=1, model_id="toy", invite_round=invite.round)  # type: ignore[attr-defined]
    assert published(c.handle(to_coord(0.1, DEV, "pull", pull)), "model")
    (ack,) = published(c.handle(to_coord(0.2, DEV, "update", update(DEV, 2))), "ack")
    assert isinstance(ack, Ack) and ack.status == "accepted"
    (ack,) = published(c.handle(to_coord(0.3, DEV, "update", update(DEV, 3))), "ack")  # a second, unserved
    assert isinstance(ack, Ack) and (ack.status, ack.reason) == ("rejected", "not_selected")
    assert len(c.buffer) == 1


def test_a_device_refused_as_not_selected_trains_its_samples_again() -> None:
    d = device()
    upd = train_and_push(d)
    before = d.state.counters.get("retrain:not_selected", 0)
    ack = Ack(device=DEV, seq=upd.seq, status="rejected", version=0, reason="not_selected")
    acts = d.handle(to_dev(2.0, "ack", encode(ack)))
    assert d.state.counters["retrain:not_selected"] == before + 1
    assert published(acts, "pull"), "it pulls again with the same samples"


def test_huge_sample_count_is_refused() -> None:
    c = make_coordinator(k=2, timeout_s=None)
    (ack,) = published(c.handle(to_coord(0.0, DEV, "update", update(DEV, 0, n=2**62))), "ack")
    assert isinstance(ack, Ack) and ack.status == "rejected" and ack.reason == "n_samples"
    assert not c.buffer


def test_pull_flood_from_one_client_is_bounded_and_an_honest_device_is_served() -> None:
    c = make_coordinator(k=10, timeout_s=None)
    pull = encode(Pull(device="mallory", seq=1, model_id="toy"))
    topic = topics.device_topic("r1", "mallory", "pull")
    tracemalloc.start()
    replies = 0
    notes: list[dict[str, Any]] = []
    for i in range(20_000):  # 20,000 pulls in 0.4 s of virtual time
        acts = c.handle(MessageReceived(now=i * 0.00002, topic=topic, payload=pull))
        replies += sum(isinstance(a, Publish) and a.topic.endswith("/model") for a in acts)
        notes += [a.data for a in acts if isinstance(a, Notify) and a.kind == "rate_limited"]
        if i == 1000:
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    burst, refill = c.config.pull_burst, c.config.pull_refill_s
    assert replies <= burst + 0.4 / refill + 1
    assert c.counters["reject:rate_limited"] >= 20_000 - replies
    assert peak < 1_000_000, f"memory grew by {peak} bytes under the flood"
    honest = c.handle(to_coord(0.5, "honest", "pull", Pull(device="honest", seq=0, model_id="toy")))
    assert len(published(honest, "model")) == 1
    # said once (the operator trial's coordinator logged nothing while it dropped stock devices' pulls),
    # then at most once a minute with the count in between: a flood is not a flood of log lines
    assert len(notes) == 1 and notes[0]["device"] == "mallory" and "pulls faster" in notes[0]["detail"]
    later = c.handle(MessageReceived(now=61.0, topic=topic, payload=pull))
    later += c.handle(MessageReceived(now=61.0, topic=topic, payload=pull))
    assert [a.data["dropped_before"] for a in later if isinstance(a, Notify) and a.kind == "rate_limited"] == []  # refilled
    for _ in range(20):
        later = c.handle(MessageReceived(now=61.0, topic=topic, payload=pull))
        if any(isinstance(a, Notify) for a in later):
            break
    (note,) = [a.data for a in later if isinstance(a, Notify) and a.kind == "rate_limited"]
    assert note["dropped_before"] == c.counters["reject:rate_limited"] - 2  # every drop but the two noted


def test_new_device_ids_beyond_the_cap_are_refused() -> None:
    cfg = CoordinatorConfig(region="r1", coordinator_id="c1", spec=SPEC, signer=SIGNER, max_devices=3)
    c = CoordinatorCore(cfg, make_strategy("spin", k=10, timeout_s=None), toy_snapshot(), rng=random.Random(0))
    for i in range(10):
        c.handle(to_coord(float(i), f"x{i}", "pull", Pull(device=f"x{i}", seq=0, model_id="toy")))
    assert len(c.devices_seen) == 3 and c.counters["reject:too_many_devices"] == 7


def test_a_device_id_refused_for_room_is_not_seen() -> None:
    """helper-111: an id refused with ``too_many_devices`` was tracked first: it took one of the
    presence rows (pushing out a tracked device's), was listed in the status as seen now and was
    eligible for a canary cohort. A refused message changes nothing but the counters."""
    cfg = CoordinatorConfig(region="r1", coordinator_id="c1", spec=SPEC, signer=SIGNER, max_devices=3)
    c = CoordinatorCore(cfg, make_strategy("spin", k=10, timeout_s=None), toy_snapshot(), rng=random.Random(0))
    for i in range(3):
        c.handle(to_coord(float(i), f"x{i}", "pull", Pull(device=f"x{i}", seq=0, model_id="toy")))
    before = (c.presence, c.status().extra["devices"])
    for i in range(10):
        acts = c.handle(to_coord(10.0 + i, f"y{i}", "pull", Pull(device=f"y{i}", seq=0, model_id="toy")))
        (ack,) = published(acts, "ack")
        assert isinstance(ack, Ack) and ack.status == "rejected" and ack.reason == "too_many_devices"
    assert (c.presence, c.status().extra["devices"]) == before and list(c.presence) == ["x0", "x1", "x2"]
    assert c.counters["reject:too_many_devices"] == 10


def test_new_device_ids_that_only_push_updates_are_capped_too() -> None:
    """helper-111: the cap counted devices that *pulled*; an update from an id that never pulled
    passed it and left a watermark (and a nonce) behind for good. On a plain broker 2,000 such
    ids under ``max_devices=10`` left 2,000 watermarks (100,000: 33 MB of heap and rising)."""
    cfg = CoordinatorConfig(region="r1", coordinator_id="c1", spec=SPEC, signer=SIGNER, max_devices=3)
    c = CoordinatorCore(cfg, make_strategy("spin", k=2, timeout_s=None), toy_snapshot(), rng=random.Random(0))
    for i in range(10):
        acts = c.handle(to_coord(float(i), f"x{i}", "update", update(f"x{i}", 1, base=c.version)))
        if i >= 3:  # refused, answered, counted; nothing of it kept
            (ack,) = published(acts, "ack")
            assert isinstance(ack, Ack) and ack.status == "rejected" and ack.reason == "too_many_devices"
            assert not [a for a in acts if isinstance(a, PersistUpdate)]
    assert sorted(c.applied_upto) == ["x0", "x1"] and len(c.buffer) == 1  # x2's waits for a second one
    assert c._accepted_upto.keys() == c._last_nonce.keys() == {"x0", "x1", "x2"}
    assert c.counters["accepted"] == 3 and c.counters["reject:too_many_devices"] == 7
    # a device already holding a watermark goes on being served, and its next update is taken
    acts = c.handle(to_coord(20.0, "x0", "update", update("x0", 2, base=c.version)))
    assert [a for a in acts if isinstance(a, PersistUpdate)] and c.applied_upto["x0"] == 2


def test_an_id_refused_for_watermark_room_is_not_seen() -> None:
    """helper-119: the watermark cap refused an update from a new id only after _on_message had
    tracked it: the refused ids took presence rows, showed in the status as seen now and were
    eligible for a canary cohort (bd56bdd fixed this for the pull cap only)."""
    cfg = CoordinatorConfig(region="r1", coordinator_id="c1", spec=SPEC, signer=SIGNER, max_devices=3)
    c = CoordinatorCore(cfg, make_strategy("spin", k=2, timeout_s=None), toy_snapshot(), rng=random.Random(0))
    for i in range(3):
        c.handle(to_coord(float(i), f"x{i}", "update", update(f"x{i}", 1, base=c.version)))
    before = (c.presence, c.status().extra["devices"])
    for i in range(3, 10):
        acts = c.handle(to_coord(float(i), f"x{i}", "update", update(f"x{i}", 1, base=c.version)))
        (ack,) = published(acts, "ack")
        assert isinstance(ack, Ack) and ack.status == "rejected" and ack.reason == "too_many_devices"
    assert (c.presence, c.status().extra["devices"]) == before and list(c.presence) == ["x0", "x1", "x2"]
    assert c.counters["reject:too_many_devices"] == 7


def test_an_id_refused_for_room_is_not_seen_by_its_presence_either() -> None:
    """helper-119: the presence topic (a device's retained online/offline) bypassed the device cap:
    with max_devices reached, new ids' presence took presence rows, showed in the status, counted
    online and made the ids eligible for a canary cohort, where their fetches are refused for room."""
    cfg = CoordinatorConfig(region="r1", coordinator_id="c1", spec=SPEC, signer=SIGNER, max_devices=3)
    c = CoordinatorCore(cfg, make_strategy("spin", k=10, timeout_s=None), toy_snapshot(), rng=random.Random(0))
    for i in range(3):
        c.handle(to_coord(float(i), f"x{i}", "pull", Pull(device=f"x{i}", seq=0, model_id="toy")))
    c.handle(MessageReceived(now=5.0, topic=topics.device_topic("r1", "x0", "presence"), payload=b"online"))  # tracked: taken
    before = (c.presence, c.status().extra["devices"], c.status().extra["devices_online"])
    for i in range(10):
        for t, payload in ((10.0, b"online"), (20.0, b"offline"), (30.0, b"online")):
            c.handle(MessageReceived(now=t + i, topic=topics.device_topic("r1", f"y{i}", "presence"), payload=payload))
    assert (c.presence, c.status().extra["devices"], c.status().extra["devices_online"]) == before
    assert list(c.presence) == ["x1", "x2", "x0"] and before[2] == 1
    assert c.counters["reject:too_many_devices"] == 30


def test_a_message_costs_no_copy_of_the_devices_waiting_under_fedbuff() -> None:
    """helper-111: FedBuff plans after every event and read ``view.deferred``, which copied the
    core's map of waiting devices twice: 20,000 distinct ids, one pull each, took 0.49 ms a pull
    (5,000: 0.16 ms), and each pull allocated ~210 KB with 5,000 waiting. Now a read-only view."""
    c = make_coordinator("fedbuff")
    for i in range(5_000):
        c.handle(to_coord(1.0, f"x{i}", "pull", Pull(device=f"x{i}", seq=0, model_id="toy")))
    assert len(c.deferred) >= 4_990
    c.handle(to_coord(2.0, "warm", "pull", Pull(device="warm", seq=0, model_id="toy")))
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        acts = c.handle(to_coord(2.0, "late", "pull", Pull(device="late", seq=0, model_id="toy")))
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    (ack,) = published(acts, "ack")
    assert isinstance(ack, Ack) and ack.status == "deferred" and "late" in c.deferred
    assert peak < 50_000, f"one pull allocated {peak} bytes with {len(c.deferred)} devices waiting"
    with pytest.raises(TypeError):
        c.deferred["x0"] = 0.0  # type: ignore[index]  # read-only: a strategy cannot change it


# ------------------------------------------------------------------ storage failure and training failure


def test_storage_failure_defers_updates_and_the_device_retries_later() -> None:
    c = make_coordinator(k=1, timeout_s=None)
    d = device()
    c.handle(StorageChanged(now=0.0, ok=False, detail="ENOSPC"))
    upd = train_and_push(d)
    acts = c.handle(to_coord(1.0, DEV, "update", upd))
    assert not [a for a in acts if isinstance(a, PersistUpdate)]
    (ack,) = published(acts, "ack")
    assert isinstance(ack, Ack) and ack.status == "deferred" and ack.reason == "storage"
    assert c.status().extra["storage_ok"] is False and c.applied_upto == {} and not c.buffer
    dev_acts = d.handle(to_dev(1.1, "ack", encode(ack)))
    assert d.state.phase is Phase.PUSHING and d.state.updates_acked == 0
    (timer,) = [a for a in dev_acts if isinstance(a, ScheduleTimer)]
    c.handle(StorageChanged(now=2.0, ok=True))
    (retry,) = published(d.handle(TimerFired(now=timer.at)), "update")
    assert isinstance(retry, Update) and retry.seq == upd.seq
    acts = c.handle(to_coord(timer.at, DEV, "update", retry))
    assert [a for a in acts if isinstance(a, PersistUpdate)] and c.version == 1


def test_nan_training_returns_the_device_to_idle_with_a_back_off() -> None:
    d = device()
    d.handle(SampleAdded(now=0.0, total=2))
    acts = d.handle(to_dev(0.1, "model", model(1, d.state.pending_seq)))
    job = next(a for a in acts if isinstance(a, StartTraining)).job
    bad = np.full(SPEC.size, np.nan, dtype=np.float32)
    acts = d.handle(TrainingFinished(now=1.0, job_id=job.job_id, weights=bad, n_samples=2))
    assert d.state.phase is Phase.IDLE and notes(acts, "training_failed")
    assert not published(acts, "update")
    (timer,) = [a for a in acts if isinstance(a, ScheduleTimer)]
    assert timer.at > 1.0
    assert not published(d.handle(SampleAdded(now=1.5, total=3)), "pull")  # still backing off
    assert published(d.handle(TimerFired(now=timer.at)), "pull")  # then it tries again


# ------------------------------------------------------------------ peers


def _peer(sender: str, signer: Signer | None) -> MessageReceived:
    msg = PeerMsg(sender=sender, kind="beat", body={"age": 1})
    topic = topics.peer_topic("c1", "beat")
    return MessageReceived(now=0.0, topic=topic, payload=encode(msg, signer=signer, scope=topics.signing_scope(topic)))


def test_peer_messages_must_be_signed_by_a_provisioned_or_pinned_key() -> None:
    peer_key = Signer.generate()
    cfg = CoordinatorConfig(region="r1", coordinator_id="c1", spec=SPEC, signer=SIGNER,
                            peer_keys={"c2": peer_key.public_raw})
    c = CoordinatorCore(cfg, make_strategy("spin", k=10, timeout_s=None), toy_snapshot(), rng=random.Random(0))
    c.handle(_peer("c2", None))
    c.handle(_peer("c2", Signer.generate()))
    assert c.counters["reject:unsigned"] == 1 and c.counters["reject:bad_signature"] == 1
    c.handle(_peer("c2", peer_key))
    assert c.counters["peer_messages"] == 1
    # without provisioned peer keys: the first key a peer signs with is pinned for that peer
    tofu = make_coordinator(k=10, timeout_s=None)
    tofu.handle(_peer("c2", peer_key))
    refused = tofu.handle(_peer("c2", Signer.generate()))
    assert tofu.counters["peer_messages"] == 1 and tofu.counters["reject:bad_signature"] == 1
    # helper-96: a peer with a new key on purpose (a new state dir) was refused for good, without a way out
    assert "restart this coordinator to pin again" in repr(refused) and "edgeci pki" in repr(refused)


def test_a_provisioned_peer_key_speaks_only_for_its_own_coordinator() -> None:
    """Peer keys are trusted by name (``trusted/<id>.pub``): c3's key, provisioned, signing a
    message that claims to come from c2 is refused (it was accepted: any provisioned key for any
    sender, so c3 could hold c2's Spyker token or send c2's edge model) and changes nothing."""
    c2_key, c3_key = Signer.generate(), Signer.generate()
    cfg = CoordinatorConfig(region="r1", coordinator_id="c1", spec=SPEC, signer=SIGNER,
                            peer_keys={"c2": c2_key.public_raw, "c3": c3_key.public_raw})
    c = CoordinatorCore(cfg, make_strategy("spin", k=10, timeout_s=None), toy_snapshot(), rng=random.Random(0))
    c.handle(_peer("c2", c3_key))
    c.handle(_peer("c9", c3_key))  # a name with no provisioned key
    assert c.counters["reject:bad_signature"] == 2 and c.counters["peer_messages"] == 0
    c.handle(_peer("c3", c3_key))
    c.handle(_peer("c2", c2_key))
    assert c.counters["peer_messages"] == 2


def test_a_peer_message_re_routed_to_another_coordinator_or_kind_is_refused() -> None:
    """Peer messages are signed for their topic: one meant for c3, or for another kind,
    delivered to c1 does not verify (review finding F13: a Spyker token re-routed to a third
    coordinator gave two holders the same position)."""
    peer_key = Signer.generate()
    cfg = CoordinatorConfig(region="r1", coordinator_id="c1", spec=SPEC, signer=SIGNER,
                            peer_keys={"c2": peer_key.public_raw})
    c = CoordinatorCore(cfg, make_strategy("spin", k=10, timeout_s=None), toy_snapshot(), rng=random.Random(0))
    msg = PeerMsg(sender="c2", kind="beat", body={"age": 1})
    for wrong in (topics.peer_topic("c3", "beat"), topics.peer_topic("c1", "token"), topics.peer_topic("all", "beat")):
        c.handle(MessageReceived(now=0.0, topic=topics.peer_topic("c1", "beat"),
                                 payload=encode(msg, signer=peer_key, scope=topics.signing_scope(wrong))))
    assert c.counters["reject:bad_signature"] == 3 and c.counters["peer_messages"] == 0
    c.handle(_peer("c2", peer_key))
    assert c.counters["peer_messages"] == 1


def test_a_message_other_than_a_peer_message_on_a_peer_topic_is_refused() -> None:
    """Only a ``PeerMsg`` belongs on a peer topic: another message there (signed for the topic)
    is a typed rejection, counted, that neither reaches the peering nor pins the key it bears."""
    c = make_coordinator(k=10, timeout_s=None)
    topic = topics.peer_topic("c1", "beat")
    stray = Update(device="c2", seq=0, model_id="toy", base_version=0, n_samples=1, weights=np.ones(SPEC.size, np.float32))
    acts = c.handle(MessageReceived(now=0.0, topic=topic, payload=encode(stray, signer=Signer.generate(), scope=topics.signing_scope(topic))))
    assert [n.data["reason"] for n in notes(acts, "rejected")] == ["topic_mismatch"]
    assert c.counters["reject:topic_mismatch"] == 1 and c.counters["peer_messages"] == 0 and c.counters["accepted"] == 0
    assert c.version == 0 and not c.buffer
    c.handle(_peer("c2", Signer.generate()))  # c2's own key is the first pinned for c2
    assert c.counters["peer_messages"] == 1 and c.counters["reject:bad_signature"] == 0


def test_a_message_on_another_devices_topic_is_refused_and_not_deployed() -> None:
    """A device acts on its own downstream topics only: a signed model published on another
    device's model topic (a wildcard subscription, a misrouted bridge) is refused and counted.
    Model signatures leave the device id out, so the signature alone would not catch it."""
    d = device()
    d.handle(to_dev(0.0, "model", model(1)))  # serving v1, the coordinator's key pinned
    acts = d.handle(to_dev(1.0, "model", model(2), dev="d2"))
    assert [(a.kind, a.data.get("reason")) for a in acts if isinstance(a, Notify)] == [("message_rejected", "topic_mismatch")]
    assert not [a for a in acts if isinstance(a, (DeployModel, Publish, PinKey))]
    assert d.state.deployed_version == 1 and d.state.counters["rejected:topic_mismatch"] == 1
    assert [a.version for a in d.handle(to_dev(2.0, "model", model(2))) if isinstance(a, DeployModel)] == [2]


def test_a_replayed_older_model_is_not_taken_as_the_answer_to_a_pull() -> None:
    d = device()
    d.handle(to_dev(0.0, "model", model(5)))  # holds version 5
    d.handle(SampleAdded(now=1.0, total=2))
    assert d.state.phase is Phase.PULLING
    acts = d.handle(to_dev(1.1, "model", model(3)))  # a captured reply of an older version
    assert not [a for a in acts if isinstance(a, StartTraining)] and d.state.phase is Phase.PULLING
    # not silence: the app hears that the answer is older than what it holds (a reset coordinator looks the same)
    assert [n.data for n in notes(acts, "model_older")] == [{"version": 3, "held": 5}]
    assert d.state.counters["ignored:older_model"] == 1
    acts = d.handle(to_dev(1.2, "model", model(5)))  # the coordinator's answer (reply_to = -1)
    assert [a for a in acts if isinstance(a, StartTraining)]


def test_an_invitation_for_another_device_is_refused() -> None:
    """An invitation names its device, as an ack does: another device's, replayed onto our
    topic, is a topic mismatch (it sent a pull with that round: hostile-input audit)."""
    d = device()
    acts = d.handle(to_dev(0.0, "invite", encode(Invite(device="OTHER", round=3, version=0))))
    assert notes(acts, "message_rejected")[0].data["reason"] == "topic_mismatch"
    assert not published(acts) and d.state.counters["rejected:topic_mismatch"] == 1


@pytest.mark.parametrize("field", ["loss", "train_seconds"])
def test_float_fields_refuse_a_bool(field: str) -> None:
    with pytest.raises(MalformedMessage, match=field):
        Update(device=DEV, seq=1, model_id="toy", base_version=0, n_samples=1, weights=np.ones(SPEC.size, np.float32),
               **{field: True})  # type: ignore[arg-type]


def test_a_peer_message_the_peering_refuses_pins_no_key() -> None:
    """Without provisioned peer keys the first key a ring member signs with is pinned, but only
    for a message the peering accepts: a refused one (a name outside the ring, an unknown kind)
    pinned its key, so one forged message named "c2" locked the real c2 out (hostile-input audit)."""
    method = make_method("spyker", coordinator_id="c1", ring=("c1", "c2"))
    cfg = CoordinatorConfig(region="r1", coordinator_id="c1", spec=SPEC, signer=SIGNER)
    c = CoordinatorCore(cfg, method.strategy, toy_snapshot(), rng=random.Random(0), peering=method.peering)
    attacker, real_c2 = Signer.generate(), Signer.generate()

    def peer(sender: str, kind: str, signer: Signer, at: float = 0.0) -> MessageReceived:
        topic = topics.peer_topic("c1", "beat")
        msg = PeerMsg(sender=sender, kind=kind, body={"at": at, "age": 1.0, "clients": 0, "hold": False})
        return MessageReceived(now=0.0, topic=topic, payload=encode(msg, signer=signer, scope=topics.signing_scope(topic)))

    for forged in (peer("c9", "beat", attacker), peer("c2", "bogus", attacker)):
        c.handle(forged)
    assert c.counters["reject:unknown_peer"] == 1 and c.counters["reject:ring_mismatch"] == 1  # named since helper-96
    assert c.counters["peer_messages"] == 0
    c.handle(peer("c2", "beat", real_c2))  # the real c2 is not refused as signed by the wrong key
    assert c.counters["reject:bad_signature"] == 0 and c.counters["peer_messages"] == 1
    c.handle(peer("c2", "beat", attacker, at=1.0))  # and now c2's key is pinned (a newer beat: not a replay)
    assert c.counters["reject:bad_signature"] == 1


def test_a_recalled_version_replayed_after_the_recall_is_not_deployed() -> None:
    """A captured, genuinely signed model of a version the coordinator abandoned (rollback, pin)
    was deployed when replayed after the recall: it was newer than what the device held. The
    device keeps the region's newest recall and deploys none of its versions (hostile-input audit)."""
    d = device()
    d.handle(to_dev(0.0, "model", model(3)))  # serving v3 (its key pinned)
    topic = topics.recall_topic("r1")
    recall = encode(Recall(model_id="toy", release=6, abandoned=(4, 5)), signer=SIGNER, scope=topics.signing_scope(topic))
    assert d.handle(MessageReceived(now=1.0, topic=topic, payload=recall)) == []  # not serving an abandoned one
    for v in (4, 5):
        acts = d.handle(to_dev(2.0, "model", model(v)))
        assert not [a for a in acts if isinstance(a, DeployModel)] and d.state.deployed_version == 3
    assert d.state.counters["ignored:recalled_model"] == 2
    assert [a.version for a in d.handle(to_dev(3.0, "model", model(6))) if isinstance(a, DeployModel)] == [6]


def test_a_message_other_than_a_recall_on_the_recall_topic_is_refused() -> None:
    """Only a ``Recall`` belongs on the recall topic: a model (even one signed for that topic) or
    an ack published there is a typed rejection, counted, that deploys and fetches nothing."""
    d = device()
    d.handle(to_dev(0.0, "model", model(3)))  # serving v3, the coordinator's key pinned
    topic = topics.recall_topic("r1")
    signed_model = encode(ModelMsg(model_id="toy", version=9, reply_to=-1, weights=np.full(SPEC.size, 9.0, np.float32)),
                          signer=SIGNER, scope=topics.signing_scope(topic))
    for payload in (signed_model, encode(Ack(device=DEV, seq=0, status="accepted", version=9))):
        acts = d.handle(MessageReceived(now=1.0, topic=topic, payload=payload))
        assert [(a.kind, a.data.get("reason")) for a in acts if isinstance(a, Notify)] == [("message_rejected", "topic_mismatch")]
        assert not [a for a in acts if isinstance(a, (DeployModel, Publish))]
    assert d.state.counters["rejected:topic_mismatch"] == 2 and d.state.deployed_version == 3
    assert d.state.recall is None and d.state.release_wanted == -1


def test_a_recall_of_another_model_is_refused_and_recalls_nothing() -> None:
    """A recall names its model: another model's (signed by the region's coordinator, for the
    region's recall topic) is refused and counted, and neither recalls the version this device
    serves nor keeps the device from deploying the versions it lists."""
    d = device()
    d.handle(to_dev(0.0, "model", model(3)))  # serving v3, the coordinator's key pinned
    topic = topics.recall_topic("r1")
    other = encode(Recall(model_id="other", release=6, abandoned=(3, 5)), signer=SIGNER, scope=topics.signing_scope(topic))
    acts = d.handle(MessageReceived(now=1.0, topic=topic, payload=other))
    assert [(a.kind, a.data.get("reason")) for a in acts if isinstance(a, Notify)] == [("message_rejected", "unknown_model")]
    assert not [a for a in acts if isinstance(a, Publish)]
    assert d.state.counters["rejected:unknown_model"] == 1 and "recalled" not in d.state.counters
    assert d.state.recall is None and d.state.release_wanted == -1
    assert [a.version for a in d.handle(to_dev(2.0, "model", model(4))) if isinstance(a, DeployModel)] == [4]


def test_a_peer_without_a_provisioned_key_is_refused_as_such() -> None:
    """helper-96: a peer with no ``trusted/<id>.pub`` at all was refused as "signed with key …,
    which is not the key provisioned for 'c2'" — read as c2 using a wrong key, when the bundle
    only lacked c2's (``edgeci pki trust`` not run). The rejection now says which."""
    c2_key = Signer.generate()
    cfg = CoordinatorConfig(region="r1", coordinator_id="c1", spec=SPEC, signer=SIGNER,
                            peer_keys={"c3": Signer.generate().public_raw})
    c = CoordinatorCore(cfg, make_strategy("spin", k=10, timeout_s=None), toy_snapshot(), rng=random.Random(0))
    detail = notes(c.handle(_peer("c2", c2_key)), "rejected")[0].data["detail"]
    assert "no key is provisioned for 'c2'" in detail and "c2.pub" in detail and "pki trust" in detail
    assert c.counters["reject:bad_signature"] == 1 and c.counters["peer_messages"] == 0


def _pull_core(version: int = 0) -> CoordinatorCore:
    cfg = CoordinatorConfig(region="r1", coordinator_id="c1", spec=SPEC, signer=SIGNER, require_pull=True)
    return CoordinatorCore(cfg, make_strategy("spin", k=1, timeout_s=None), toy_snapshot(version), rng=random.Random(0))


def _answer(c: CoordinatorCore, now: float, msg: Update) -> tuple[str, str]:
    (ack,) = published(c.handle(to_coord(now, msg.device, "update", msg)), "/ack")
    assert isinstance(ack, Ack)
    return ack.status, ack.reason


def test_with_require_pull_an_update_costs_a_served_training_pull_under_spin() -> None:
    """helper-159: under SPIN (which selects no one) the core took any number of updates from a
    device that never pulled, so one stolen certificate filled every buffer alone. With
    ``require_pull`` (the daemon's default) an update is taken only after a training model was
    served to its device, once per pull; refused ones are counted and change nothing."""
    c = _pull_core()
    assert _answer(c, 1.0, update("m", 1, nonce=1)) == ("rejected", "not_selected")
    assert c.version == 0 and c.counters["reject:not_selected"] == 1
    c.handle(to_coord(2.0, "m", "pull", Pull(device="m", seq=2, model_id="toy")))
    assert _answer(c, 3.0, update("m", 3, nonce=3)) == ("accepted", "")
    assert c.version == 1
    assert _answer(c, 4.0, update("m", 4, nonce=4, base=1)) == ("rejected", "not_selected")  # one per pull
    assert c.version == 1 and c.counters["reject:not_selected"] == 2
    # the strategy's own default (no require_pull): taken as before
    free = make_coordinator("spin", k=1, timeout_s=None)
    assert _answer(free, 1.0, update("m", 1, nonce=1)) == ("accepted", "")


def test_with_require_pull_an_update_in_flight_across_a_restart_is_taken_once() -> None:
    """The served set is not kept: after a restart at version 5 a device's update trained from a
    version up to 5 (pulled from the last process) is taken, once; a second one, one trained from
    a version the restart did not have, and (a core started at version 0) any are refused."""
    c = _pull_core(version=5)
    assert _answer(c, 1.0, update("d", 1, nonce=1, base=4)) == ("accepted", "")
    assert _answer(c, 2.0, update("d", 2, nonce=2, base=6)) == ("rejected", "not_selected")  # (version 6 is after it)
    assert _answer(c, 3.0, update("d", 3, nonce=3, base=5)) == ("rejected", "not_selected")  # its one is taken
    assert _answer(c, 4.0, update("e", 1, nonce=1, base=5)) == ("accepted", "")  # another device's
    fresh = _pull_core(version=0)
    assert _answer(fresh, 1.0, update("d", 1, nonce=1)) == ("rejected", "not_selected")


def test_with_require_pull_the_restart_grace_survives_a_deferral() -> None:
    """The restart grace was used up when the update passed the pull check, before the checks
    after it: an update in flight across a restart that met a storage outage was deferred
    ("retry later"), and its retry was then refused ``not_selected`` — the device's training
    wasted. It is used up when the update is accepted."""
    c = _pull_core(version=5)
    c.handle(StorageChanged(now=0.0, ok=False, detail="ENOSPC"))
    assert _answer(c, 1.0, update("d", 1, nonce=1, base=4)) == ("deferred", "storage")
    c.handle(StorageChanged(now=2.0, ok=True))
    assert _answer(c, 3.0, update("d", 1, nonce=1, base=4)) == ("accepted", "")
    assert c.version == 6 and "reject:not_selected" not in c.counters
    assert _answer(c, 4.0, update("d", 2, nonce=2, base=5)) == ("rejected", "not_selected")  # once
