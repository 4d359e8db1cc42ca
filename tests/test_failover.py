"""Region failover as a rule of DeviceCore: events in, ``SwitchRegion`` out.

The device (home ``r1``, fallbacks ``r2``, ``r3``) moves on after ``failover_after``
request timeouts in a row or when its coordinator's status says ``alive: false`` (the
daemon's last will), and goes home when the home status says ``alive: true`` again. Across
every switch sequence numbers only grow (persisted first), nothing acknowledged is undone,
and replies from regions the device is not using are ignored.
"""

from __future__ import annotations

import json
import random
import signal
from typing import Any, cast

import numpy as np
import pytest

from coordinator.metrics import stamp_status, status_will
from edge_sdk.core.device import MAX_STATUS_BYTES, DeviceConfig, DeviceCore, Phase
from edge_sdk.core.events import (
    MarkRegionDown,
    MarkTraining,
    MessageReceived,
    Notify,
    PersistDeviceState,
    PinKey,
    Publish,
    SampleAdded,
    ScheduleTimer,
    StartTraining,
    SwitchRegion,
    TimerFired,
    TrainingFinished,
)
from edge_sdk.errors import ConfigError, LocalProtocolError
from edge_sdk.signing import Signer
from edge_sdk.wire import topics
from edge_sdk.wire.codec import decode, encode, status_json
from edge_sdk.wire.messages import Ack, Canary, ModelMsg, Pull, Status, Update
from tests.helpers import SIGNER, SPEC, close_unstarted

DEV = "d1"


def core(fallbacks: tuple[str, ...] = ("r2",), *, failover_after: int = 2, failback_after_s: float = 30.0,
         min_samples: int = 1, serve_on_start: bool = False) -> DeviceCore:
    cfg = DeviceConfig(device_id=DEV, region="r1", spec=SPEC, min_samples=min_samples, request_timeout_s=5.0,
                       fallback_regions=fallbacks, failover_after=failover_after, failback_after_s=failback_after_s,
                       serve_on_start=serve_on_start)
    return DeviceCore(cfg, rng=random.Random(0))


def recv(now: float, region: str, leaf: topics.DeviceLeaf, msg: Any, signer: Signer | None = SIGNER) -> MessageReceived:
    sig = signer if isinstance(msg, ModelMsg) else None
    topic = topics.device_topic(region, DEV, leaf)
    return MessageReceived(now=now, topic=topic, payload=encode(msg, signer=sig, scope=topics.signing_scope(topic)))


def status(now: float, region: str, *, alive: bool) -> MessageReceived:
    """What the coordinator daemon really publishes: a stamped status, or its last will."""
    if alive:
        body = status_json(Status(region=region, coordinator=f"c-{region}", version=3, updates_accepted=0,
                                  updates_rejected=0, updates_duplicate=0, devices_seen=1, buffered=0))
        payload = stamp_status(body, alive=True, now=now, heartbeat_s=30.0)
    else:
        payload = status_will(region, f"c-{region}")
    return MessageReceived(now=now, topic=topics.status_topic(region), payload=payload)


def model(version: int, reply_to: int) -> ModelMsg:
    return ModelMsg(model_id="toy", version=version, reply_to=reply_to, weights=np.full(SPEC.size, float(version), np.float32))


def sent(actions: list[Any]) -> list[tuple[str, Any]]:
    """(region, message) for every publish."""
    return [(topics.parse(a.topic).region, decode(a.payload)) for a in actions if isinstance(a, Publish)]


def switches(actions: list[Any]) -> list[SwitchRegion]:
    return [a for a in actions if isinstance(a, SwitchRegion)]


def pending(c: DeviceCore) -> Any:
    """The request the device has in flight."""
    return decode(c.state.pending_payload)


def expire(c: DeviceCore) -> list[Any]:
    """Let the pending request time out."""
    assert c.state.deadline is not None
    return c.handle(TimerFired(now=c.state.deadline))


def test_config_checks_fallback_regions() -> None:
    cfg = DeviceConfig(device_id=DEV, region="r1", spec=SPEC, fallback_regions=("r2", "r1", "r2", "r3"))
    assert cfg.fallback_regions == ("r2", "r3")  # home and repeats dropped, order kept
    with pytest.raises(ConfigError):
        DeviceConfig(device_id=DEV, region="r1", spec=SPEC, fallback_regions=("bad/region",))
    with pytest.raises(ConfigError):
        DeviceConfig(device_id=DEV, region="r1", spec=SPEC, fallback_regions=("r2",), failover_after=0)
    with pytest.raises(LocalProtocolError):
        SwitchRegion(region="r1", previous="r1", reason="x")


def test_a_single_region_device_retries_forever_and_watches_no_status() -> None:
    c = core(fallbacks=())
    assert c.subscriptions() == [*(topics.device_topic("r1", DEV, leaf) for leaf in topics.DOWNSTREAM), topics.recall_topic("r1")]
    c.handle(SampleAdded(now=0.0, total=1))
    for _ in range(6):
        acts = expire(c)
        assert not switches(acts) and {r for r, _ in sent(acts)} == {"r1"}
    assert c.state.region == "r1" and c.state.timeouts == 6


def test_timeouts_move_a_pull_to_the_next_region_under_a_fresh_seq() -> None:
    c = core()
    [(_, pull)] = sent(c.handle(SampleAdded(now=0.0, total=1)))
    assert isinstance(pull, Pull)
    acts = expire(c)  # first timeout: retried in r1, same seq
    assert sent(acts) == [("r1", pull)] and not switches(acts)
    acts = expire(c)  # second: fail over
    [sw] = switches(acts)
    assert (sw.region, sw.previous, sw.reason) == ("r2", "r1", "timeouts")
    assert next(a for a in acts if isinstance(a, Notify) and a.kind == "failover").data["after_timeouts"] == 2
    [(region, pull2)] = sent(acts)
    assert region == "r2" and isinstance(pull2, Pull) and pull2.seq > pull.seq and not pull2.serve
    # the seq counter is durable before the pull that uses it leaves
    persist = [i for i, a in enumerate(acts) if isinstance(a, PersistDeviceState) and a.next_seq > pull2.seq]
    assert persist and persist[0] < next(i for i, a in enumerate(acts) if isinstance(a, Publish))
    assert c.state.region == "r2" and c.state.phase is Phase.PULLING
    # a late answer from r1 is ignored (not trained, not counted as hostile); r2's is used
    assert c.handle(recv(30.0, "r1", "model", model(5, pull.seq))) == []
    assert c.state.counters["ignored:other_region"] == 1 and c.state.rejected_messages == 0
    acts = c.handle(recv(30.0, "r2", "model", model(1, pull2.seq)))
    assert c.state.phase is Phase.TRAINING and any(isinstance(a, StartTraining) for a in acts)


def test_only_timeouts_in_a_row_count() -> None:
    c = core(failover_after=2)
    [(_, pull)] = sent(c.handle(SampleAdded(now=0.0, total=1)))
    expire(c)
    c.handle(recv(20.0, "r1", "model", model(1, pull.seq)))  # r1 answers: the count starts again
    c.handle(TrainingFinished(now=21.0, job_id=c.state.job_id, weights=np.ones(SPEC.size, np.float32), n_samples=1))
    assert not switches(expire(c)) and c.state.region == "r1"
    assert switches(expire(c)) and c.state.region == "r2"


def test_an_unacked_update_is_trained_again_in_the_new_region_and_an_acked_one_is_not() -> None:
    c = core()
    [(_, pull)] = sent(c.handle(SampleAdded(now=0.0, total=1)))
    c.handle(recv(0.1, "r1", "model", model(1, pull.seq)))
    acts = c.handle(TrainingFinished(now=1.0, job_id=c.state.job_id, weights=np.ones(SPEC.size, np.float32), n_samples=1))
    [(_, upd1)] = sent(acts)
    assert isinstance(upd1, Update)
    c.handle(recv(1.1, "r1", "ack", Ack(device=DEV, seq=upd1.seq, status="accepted", version=2, nonce=upd1.nonce)))
    assert c.state.updates_acked == 1 and c.state.trained_upto == 1
    # a second sample: pull, train, push — and r1 goes silent with the update in flight
    [(_, pull2)] = sent(c.handle(SampleAdded(now=2.0, total=2)))
    c.handle(recv(2.1, "r1", "model", model(2, pull2.seq)))
    acts = c.handle(TrainingFinished(now=3.0, job_id=c.state.job_id, weights=np.ones(SPEC.size, np.float32), n_samples=2))
    [(_, upd2)] = sent(acts)
    expire(c)
    acts = expire(c)
    assert switches(acts) and c.state.region == "r2"
    # the first update stays acknowledged; the second's samples are trained again in r2
    assert c.state.updates_acked == 1 and c.state.trained_upto == 1 and c.wants_pull()
    [(region, pull3)] = sent(acts)
    assert region == "r2" and isinstance(pull3, Pull) and not pull3.serve and pull3.seq > upd2.seq
    # r1's late ack for the dropped update changes nothing
    c.handle(recv(40.0, "r1", "ack", Ack(device=DEV, seq=upd2.seq, status="accepted", version=3, nonce=upd2.nonce)))
    assert c.state.updates_acked == 1 and c.state.phase is Phase.PULLING
    c.handle(recv(41.0, "r2", "model", model(7, pull3.seq)))
    assert c.state.job_base_version == 7 and c.state.job_n_samples == 2
    acts = c.handle(TrainingFinished(now=42.0, job_id=c.state.job_id, weights=np.ones(SPEC.size, np.float32), n_samples=2))
    [(region, upd3)] = sent(acts)
    assert region == "r2" and isinstance(upd3, Update) and upd3.seq > pull3.seq and upd3.base_version == 7
    c.handle(recv(42.5, "r2", "ack", Ack(device=DEV, seq=upd3.seq, status="accepted", version=8, nonce=upd3.nonce)))
    assert c.state.updates_acked == 2 and c.state.phase is Phase.IDLE


def test_a_training_job_from_the_old_region_is_dropped() -> None:
    c = core()
    [(_, pull)] = sent(c.handle(SampleAdded(now=0.0, total=1)))
    c.handle(recv(0.1, "r1", "model", model(1, pull.seq)))
    old_job = c.state.job_id
    acts = c.handle(status(0.5, "r1", alive=False))  # r1's coordinator died while we train
    assert switches(acts)[0].reason == "coordinator_offline" and c.state.region == "r2"
    [(_, pull2)] = sent(acts)
    assert isinstance(pull2, Pull) and not pull2.serve  # the samples still need training
    late = c.handle(TrainingFinished(now=1.0, job_id=old_job, weights=np.ones(SPEC.size, np.float32), n_samples=1))
    # ignored, but the job has ended: its in-flight mark is cleared (a kill now is no crash in training)
    assert late == [MarkTraining(in_flight=False, crashes=0)] and c.state.phase is Phase.PULLING


def test_a_dead_coordinator_is_left_at_once_and_a_dead_fallback_is_skipped() -> None:
    c = core(fallbacks=("r2", "r3"), serve_on_start=True)
    assert set(c.subscriptions()) >= {topics.status_topic(r) for r in ("r1", "r2", "r3")}
    c.start(0.0)
    assert c.handle(status(0.1, "r2", alive=False)) == []  # not ours: only remembered
    held = set(c.active_subscriptions())
    acts = c.handle(status(0.2, "r1", alive=False))
    [sw] = switches(acts)
    assert sw.region == "r3" and sw.reason == "coordinator_offline"
    [(region, pull)] = sent(acts)
    assert region == "r3" and isinstance(pull, Pull) and pull.serve  # nothing to train: ask for a model to serve
    # a driver that follows subscribe / unsubscribe ends with what the core needs now
    assert (held - set(sw.unsubscribe)) | set(sw.subscribe) == set(c.active_subscriptions())
    assert set(sw.subscribe) == {*(topics.device_topic("r3", DEV, leaf) for leaf in topics.DOWNSTREAM), topics.recall_topic("r3")}


def test_home_takes_the_device_back_after_the_hold_and_not_mid_round() -> None:
    c = core(failback_after_s=30.0)
    c.handle(SampleAdded(now=0.0, total=1))
    c.handle(status(1.0, "r1", alive=False))
    assert c.state.region == "r2"
    pull = pending(c)
    c.handle(recv(2.0, "r2", "model", model(4, pull.seq)))
    assert c.state.phase is Phase.TRAINING
    assert c.handle(status(10.0, "r1", alive=True)) == []  # too soon, and mid-round
    assert c.handle(status(40.0, "r1", alive=True)) == []  # hold over, but the round is not
    acts = c.handle(TrainingFinished(now=41.0, job_id=c.state.job_id, weights=np.ones(SPEC.size, np.float32), n_samples=1))
    [(region, upd)] = sent(acts)
    assert region == "r2"  # the round ends where it started
    acts = c.handle(recv(41.5, "r2", "ack", Ack(device=DEV, seq=upd.seq, status="accepted", version=5, nonce=upd.nonce)))
    assert c.state.updates_acked == 1
    [sw] = switches(acts)
    assert (sw.region, sw.reason) == ("r1", "home_back") and c.state.region == "r1"
    assert c.state.deployed_version == -1 and c.state.deployed is not None  # r1 numbers its own versions
    assert [r for r, _ in sent(c.handle(SampleAdded(now=42.0, total=2)))] == ["r1"]


def test_after_a_failover_a_device_serves_the_new_region_s_canary_rounds_and_still_refuses_home_replays() -> None:
    """helper-114: the (candidate, release) a device last served was kept across a region switch,
    though the other region numbers its own versions: a device that served candidate 50 at home
    refused every canary request of the fallback region for a lower candidate (its deployed version
    is forgotten on a switch; this was not). It is kept per region now: back home, a replay of a
    home round it took is still refused."""
    cfg = DeviceConfig(device_id=DEV, region="r1", spec=SPEC, min_samples=5, request_timeout_s=5.0, fallback_regions=("r2",),
                       failback_after_s=30.0, serve_on_start=False, trusted_keys={SIGNER.kid: SIGNER.public_raw})
    c = DeviceCore(cfg, rng=random.Random(0))

    def ask(region: str, candidate: int, now: float) -> list[Any]:
        req = Canary(device=DEV, candidate=candidate, release=candidate - 1, samples=3, deadline_s=5.0, nonce=7)
        topic = topics.device_topic(region, DEV, "invite")
        return c.handle(MessageReceived(now=now, topic=topic, payload=encode(req, signer=SIGNER, scope=topics.signing_scope(topic))))

    c.state.deployed_version = 49
    assert [r for r, _ in sent(ask("r1", 50, 0.5))] == ["r1"] and c.state.canary_last == (50, 49)  # its canary pull
    c.handle(status(1.0, "r1", alive=False))
    assert c.state.region == "r2" and c.state.canary is None
    taken = [n.data for n in ask("r2", 10, 2.0) if isinstance(n, Notify) and n.kind == "canary"]
    assert [d["candidate"] for d in taken] == [10] and c.state.canary_last == (10, 9)  # was refused: (10, 9) <= (50, 49)
    c.handle(TimerFired(now=30.0))  # nothing scored by the deadline: given up
    assert [s.region for s in switches(c.handle(status(31.0, "r1", alive=True)))] == ["r1"]  # home again, after the hold
    assert c.state.canary_last == (50, 49) and ask("r1", 50, 41.0) == []  # a home round it took, replayed


def test_an_idle_device_goes_home_on_the_next_sample_after_the_hold() -> None:
    c = core(failback_after_s=30.0, min_samples=5)
    c.handle(SampleAdded(now=0.0, total=1))
    expire_at = c.handle(status(1.0, "r1", alive=False))
    assert c.state.region == "r2" and not any(isinstance(a, Publish) for a in expire_at)  # idle, nothing to ask
    assert c.handle(status(5.0, "r1", alive=True)) == []
    acts = c.handle(SampleAdded(now=31.5, total=2))
    assert [s.region for s in switches(acts)] == ["r1"]


def _left_home_after_timeouts(c: DeviceCore) -> list[Any]:
    """Home's coordinator says it is alive (status stamped 0.5), then answers nothing: the device leaves."""
    assert c.handle(status(0.5, "r1", alive=True)) == []
    c.handle(SampleAdded(now=1.0, total=1))
    expire(c)
    acts = expire(c)
    assert [(sw.region, sw.reason) for sw in switches(acts)] == [("r2", "timeouts")]
    return acts


def test_the_same_retained_status_again_does_not_take_the_device_back_to_a_mute_home() -> None:
    """helper-151: home's coordinator stopped answering but its retained status still says alive. The
    broker sends that status again on every reconnect (and after a restart): the device took it as news,
    went home after failback_after_s and waited out failover_after timeouts there again."""
    c = core(failback_after_s=30.0)
    acts = _left_home_after_timeouts(c)
    assert MarkRegionDown(region="r1", status_at=0.5) in acts
    again = MessageReceived(now=200.0, topic=topics.status_topic("r1"), payload=status(0.5, "r1", alive=True).payload)
    assert not switches(c.handle(again))  # the same status, sent again by the broker (a reconnect)
    assert c.state.region == "r2" and c.state.counters["ignored:status_unchanged"] == 1
    acts = c.handle(status(230.0, "r1", alive=True))  # home publishes again: it is back
    assert MarkRegionDown(region="r1", status_at=None) in acts
    assert [(sw.region, sw.reason) for sw in switches(acts)] == [("r1", "home_back")]


def test_a_restarted_device_moves_on_from_a_home_that_said_nothing_new() -> None:
    """After a restart the device starts at home; home's retained status, no newer than when it left,
    sends it on at once instead of after failover_after timeouts (74 s with the defaults)."""
    cfg = DeviceConfig(device_id=DEV, region="r1", spec=SPEC, min_samples=1, request_timeout_s=5.0, fallback_regions=("r2",))
    c = DeviceCore(cfg, rng=random.Random(0), total=1, down={"r1": 0.5, "r9": 1.0})  # (a region not configured: ignored)
    c.start(300.0)
    acts = c.handle(MessageReceived(now=300.1, topic=topics.status_topic("r1"), payload=status(0.5, "r1", alive=True).payload))
    assert [(sw.region, sw.reason) for sw in switches(acts)] == [("r2", "status_unchanged")]
    assert [r for r, _ in sent(acts)] == ["r2"]
    answer = c.handle(recv(301.0, "r2", "model", model(1, pending(c).seq)))
    assert not any(isinstance(a, MarkRegionDown) for a in answer)  # (r2 was never marked)
    with pytest.raises(ConfigError):
        DeviceCore(cfg, rng=random.Random(0), down={"r1": float("nan")})


def test_an_answer_from_a_region_marked_down_clears_its_mark() -> None:
    cfg = DeviceConfig(device_id=DEV, region="r1", spec=SPEC, min_samples=1, request_timeout_s=5.0, fallback_regions=("r2",))
    c = DeviceCore(cfg, rng=random.Random(0), total=1, down={"r1": 0.5})
    c.start(300.0)
    acts = c.handle(recv(300.5, "r1", "model", model(1, pending(c).seq)))  # home answers after all
    assert acts[0] == MarkRegionDown(region="r1", status_at=None)
    assert not switches(c.handle(status(0.5, "r1", alive=True)))  # the old status is just a status now


def test_the_region_mark_is_kept_in_the_store_across_a_restart(tmp_path: Any) -> None:
    c = _offline_client(tmp_path, region="r1", regions=["r1", "r2"])
    try:
        c._perform(MarkRegionDown(region="r1", status_at=1234.5))
    finally:
        _close(c)
    c = _offline_client(tmp_path, region="r1", regions=["r1", "r2"])
    try:
        c.core.start(2000.0)
        acts = c.core.handle(MessageReceived(now=2000.1, topic=topics.status_topic("r1"),
                                             payload=status(1234.5, "r1", alive=True).payload))
        assert [(sw.region, sw.reason) for sw in switches(acts)] == [("r2", "status_unchanged")]
        c._perform(MarkRegionDown(region="r1", status_at=None))
    finally:
        _close(c)
    c = _offline_client(tmp_path, region="r1", regions=["r1", "r2"])
    try:
        c.core.start(2000.0)
        assert not switches(c.core.handle(status(1234.5, "r1", alive=True)))  # cleared: read back as none
    finally:
        _close(c)


def test_each_region_pins_its_own_coordinator_key() -> None:
    c = core()
    [(_, pull)] = sent(c.handle(SampleAdded(now=0.0, total=1)))
    acts = c.handle(recv(0.1, "r1", "model", model(1, pull.seq)))
    assert [(a.region, a.kid) for a in acts if isinstance(a, PinKey)] == [("r1", SIGNER.kid)]
    c.handle(status(1.0, "r1", alive=False))
    other = Signer.generate()
    pull2 = pending(c)
    acts = c.handle(recv(2.0, "r2", "model", model(1, pull2.seq), signer=other))
    assert [(a.region, a.kid) for a in acts if isinstance(a, PinKey)] == [("r2", other.kid)]
    # r1's key is not r2's: a model for r2 signed by it is refused
    c.handle(TrainingFinished(now=3.0, job_id=c.state.job_id, weights=np.ones(SPEC.size, np.float32), n_samples=1))
    before = c.state.rejected_messages
    c.handle(recv(3.5, "r2", "model", model(9, -1)))
    assert c.state.rejected_messages == before + 1 and c.state.counters["rejected:bad_signature"] == 1


@pytest.mark.parametrize(
    "payload",
    [b"not json", b"[1, 2]", json.dumps({"v": 1, "type": "status", "alive": "no"}).encode(),
     json.dumps({"v": 1, "type": "ack", "alive": False}).encode(), b"{" + b" " * 70_000 + b"}",
     b"[" * 60_000],  # nested past the parser's recursion limit: RecursionError escaped handle()
)
def test_a_hostile_status_is_counted_and_changes_nothing(payload: bytes) -> None:
    c = core()
    c.handle(SampleAdded(now=0.0, total=1))
    acts = c.handle(MessageReceived(now=0.5, topic=topics.status_topic("r1"), payload=payload))
    assert [a.kind for a in acts if isinstance(a, Notify)] == ["message_rejected"]
    assert c.state.region == "r1" and c.state.rejected_messages == 1 and c.state.phase is Phase.PULLING


def test_a_status_over_the_size_cap_is_refused_however_well_formed() -> None:
    """A status is small: one over ``MAX_STATUS_BYTES`` is refused before it is parsed, even a
    well-formed last will (``alive: false``) that would otherwise move the device away."""
    c = core()
    c.handle(SampleAdded(now=0.0, total=1))
    will = json.loads(status_will("r1", "c-r1"))
    padded = json.dumps({**will, "reason": "x" * MAX_STATUS_BYTES}).encode()
    assert len(padded) > MAX_STATUS_BYTES
    acts = c.handle(MessageReceived(now=0.5, topic=topics.status_topic("r1"), payload=padded))
    assert [(a.kind, a.data.get("reason")) for a in acts if isinstance(a, Notify)] == [("message_rejected", "malformed")]
    assert not switches(acts) and not [a for a in acts if isinstance(a, Publish)]
    assert c.state.region == "r1" and c.state.phase is Phase.PULLING and c.state.rejected_messages == 1
    assert switches(c.handle(status(1.0, "r1", alive=False)))  # the same will, unpadded, is taken


def test_topics_of_regions_the_device_does_not_use_are_rejected() -> None:
    c = core()
    for topic in (topics.status_topic("r9"), topics.device_topic("r9", DEV, "model")):
        acts = c.handle(MessageReceived(now=0.0, topic=topic, payload=status_will("r9", "c9")))
        assert [a.kind for a in acts if isinstance(a, Notify)] == ["message_rejected"]
    assert c.state.rejected_messages == 2 and c.state.counters["rejected:topic_mismatch"] == 2


@pytest.mark.parametrize("seed", range(12))
def test_random_outages_keep_seqs_fresh_and_acks_counted_once(seed: int) -> None:
    """Random samples, answers, silences, deaths and returns: every new seq is persisted
    before it leaves and is larger than every earlier one; every ack the device counts
    answers an update it sent to the region it was using; it never talks to two regions
    in one step."""
    rng = random.Random(seed)
    c = core(fallbacks=("r2", "r3"), failback_after_s=5.0)
    now, total, versions = 0.0, 0, {"r1": 0, "r2": 0, "r3": 0}
    highest, persisted, acked = -1, -1, 0
    for _ in range(300):
        now += rng.uniform(0.1, 4.0)
        s = c.state
        roll = rng.random()
        if roll < 0.25:
            total += 1
            acts = c.handle(SampleAdded(now=now, total=total))
        elif roll < 0.35:
            acts = c.handle(status(now, rng.choice(("r1", "r2", "r3")), alive=rng.random() < 0.6))
        elif roll < 0.5 and s.deadline is not None:
            acts = c.handle(TimerFired(now=max(now, s.deadline)))
            now = max(now, s.deadline)
        elif roll < 0.6 and s.phase is Phase.TRAINING:
            acts = c.handle(TrainingFinished(now=now, job_id=s.job_id, weights=np.ones(SPEC.size, np.float32), n_samples=max(1, s.job_n_samples)))
        elif s.pending_seq >= 0 and rng.random() < 0.8:
            region = s.region if rng.random() < 0.85 else rng.choice(("r1", "r2", "r3"))
            if s.phase is Phase.PUSHING and s.pending_update is not None:
                versions[region] += 1
                ack = Ack(device=DEV, seq=s.pending_seq, status="accepted", version=versions[region], nonce=s.pending_update.nonce)
                if region == s.region:
                    acked += 1
                acts = c.handle(recv(now, region, "ack", ack))
            else:
                acts = c.handle(recv(now, region, "model", model(versions[region], s.pending_seq)))
        else:
            continue
        regions = {r for r, _ in sent(acts)}
        assert len(regions) <= 1 and regions <= {c.state.region}
        for a in acts:
            if isinstance(a, PersistDeviceState):
                persisted = max(persisted, a.next_seq)
            elif isinstance(a, Publish):
                seq = cast(Pull | Update, decode(a.payload)).seq
                assert seq < persisted
                if seq > highest:
                    highest = seq
                else:  # a retry re-sends the request in flight, never an older one
                    assert seq == c.state.pending_seq
            elif isinstance(a, ScheduleTimer):
                assert a.at >= now
        assert c.state.updates_acked == acked
    assert c.state.failovers > 0  # the walk did exercise switches


# ---------------------------------------------------------------- the driver, real broker


@pytest.mark.broker
@pytest.mark.slow
def test_an_sdk_device_fails_over_to_a_live_region_and_comes_home(mosquitto: Any, tmp_path: Any) -> None:
    """Two ``edgeci coordinator`` processes (r1 home, r2) on one mosquitto and a real
    ``EdgeClient``: SIGKILL r1 (its last will says ``alive: false``), the device trains in r2;
    restart r1 on its state dir, the device comes home and trains there again. Every acked
    update has a larger seq than the one before, whichever region acked it."""
    import threading

    from edge_sdk.client import EdgeClient
    from edge_sdk.modelio import save_model
    from edge_sdk.tasks import get_task
    from edge_sdk.tasks.base import TrainConfig
    from tests.helpers import CoordinatorProcess, wait_until

    task = get_task("digits")
    init = tmp_path / "deployed.npz"
    save_model(init, task.spec, np.random.default_rng(0).normal(0, 0.1, task.spec.size).astype(np.float32), {"version": 0})

    def coordinator(region: str) -> CoordinatorProcess:
        return CoordinatorProcess("--broker", mosquitto.url, "--region", region, "--id", f"c-{region}", "--state-dir",
                                  str(tmp_path / region), "--model", "digits", "--init", str(init), "--k", "1", "--timeout", "1")

    events: list[tuple[str, dict[str, Any]]] = []
    r2 = coordinator("r2")
    r1 = coordinator("r1")
    client = EdgeClient(broker=mosquitto.url, device_id="sdk-1", region="r1", regions=["r1", "r2"], failover_after=2,
                        failback_after_s=1.0, task=task, data_dir=tmp_path / "dev", min_samples=2,
                        train=TrainConfig(epochs=1, lr=0.05, seed=0), request_timeout_s=1.0, inference="torch")
    client.on("*", lambda kind, data: events.append((kind, {**data, "in": client.region})))
    stop = threading.Event()
    pool = task.data().pool

    def feed() -> None:
        k = 0
        while not stop.is_set():
            client.add_sample(pool.x[k % len(pool)], int(pool.y[k % len(pool)]))
            k += 1
            stop.wait(0.3)

    feeder = threading.Thread(target=feed, daemon=True)
    try:
        client.start()
        feeder.start()

        def acked_in(region: str, after: int = 0) -> bool:
            return any(k == "update_acked" and d["in"] == region for k, d in events[after:])

        def failover_to(region: str, after: int) -> int | None:
            return next((i for i, (k, d) in enumerate(events) if i >= after and k == "failover" and d["to"] == region), None)

        wait_until(lambda: acked_in("r1"), 60, "an update acked at home")
        # (under load, 1 s request timeouts may already have sent the device away and back: only
        # what follows the kill is this test's)
        killed_at = len(events)
        r1.close(signal.SIGKILL)
        wait_until(lambda: failover_to("r2", killed_at) is not None, 30, "failover to r2")
        away = failover_to("r2", killed_at)
        assert away is not None and events[away][1]["reason"] in ("coordinator_offline", "timeouts")
        wait_until(lambda: acked_in("r2", away), 60, "an update acked in r2")
        r1 = coordinator("r1")
        wait_until(lambda: failover_to("r1", away) is not None, 60, "coming home to r1")
        home = failover_to("r1", away)
        assert home is not None and events[home][1]["reason"] == "home_back"
        wait_until(lambda: acked_in("r1", home), 60, "an update acked at home again")
    finally:
        stop.set()
        client.stop()
        r1.close()
        r2.close()
    seqs = [int(d["seq"]) for k, d in events if k == "update_acked"]
    assert seqs == sorted(set(seqs)), seqs


def _offline_client(tmp_path: Any, **kw: Any) -> Any:
    """An EdgeClient that is never started (no broker): its actor's per-event step is driven
    by hand and what it would publish or train is recorded."""
    from edge_sdk.client import EdgeClient

    c = EdgeClient(broker="mqtt://127.0.0.1:1", device_id="d1", data_dir=tmp_path, task="digits", min_samples=1, **kw)
    c.published = []
    c.transport.publish = lambda topic, payload, **_: c.published.append(topic)
    c.started = []
    c._trainer.submit = lambda fn, job: c.started.append(job.job_id)
    return c


def _close(c: Any) -> None:
    close_unstarted(c)


def test_a_restart_after_a_failover_does_not_take_the_other_region_s_version_for_home_s(tmp_path: Any) -> None:
    """deployed.npz saved in the fallback region (which numbers its versions its own way): after
    a restart at home the weights keep serving, but the core holds no version, so home's
    current model is pulled and deployed (it used to refuse home's releases as 'not newer', or
    train on the other region's weights labelled with home's version)."""
    from edge_sdk.core.device import NO_VERSION
    from edge_sdk.modelio import save_model
    from edge_sdk.tasks import get_task

    spec = get_task("digits").spec
    away = np.full(spec.size, 0.5, np.float32)
    save_model(tmp_path / "deployed.npz", spec, away, {"version": 40, "region": "away"})
    c = _offline_client(tmp_path, region="home", regions=["home", "away"])
    try:
        assert c.core.state.region == "home" and c.core.state.deployed_version == NO_VERSION
        np.testing.assert_array_equal(c.core.state.deployed, away)  # still served until home answers
    finally:
        _close(c)
    save_model(tmp_path / "deployed.npz", spec, away, {"version": 40, "region": "home"})
    c = _offline_client(tmp_path, region="home", regions=["home", "away"])
    try:
        assert c.core.state.deployed_version == 40  # home's own numbering: kept
    finally:
        _close(c)


def test_a_model_that_cannot_be_saved_is_still_deployed_and_trained_on(tmp_path: Any, monkeypatch: Any) -> None:
    """A full disk while saving deployed.npz raised out of the DeployModel action and took the
    StartTraining after it down: the device sat in TRAINING with no job and no timer until
    restarted. The model is now served from memory and training starts."""
    import errno

    import edge_sdk.client as client_module
    from edge_sdk.core.events import MessageReceived, SampleAdded
    from edge_sdk.signing import Signer
    from edge_sdk.wire.codec import encode
    from edge_sdk.wire.messages import ModelMsg

    def full_disk(*_: Any, **__: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(client_module, "save_model", full_disk)
    signer = Signer.generate()
    c = _offline_client(tmp_path, trusted_keys={signer.kid: signer.public_raw})
    try:
        c.store.add_sample("array", c.contract.sample(np.zeros(c.contract.shape, np.float32)), 3)
        c.actor._run_one(lambda now: SampleAdded(now=1.0, total=1))
        spec = c.task.spec
        m = ModelMsg(model_id=spec.model_id, version=1, reply_to=-1, weights=np.zeros(spec.size, np.float32))
        payload = encode(m, signer=signer, scope=topics.device_scope("default", "model"))
        c.actor._run_one(lambda now: MessageReceived(now=2.0, topic=topics.device_topic("default", "d1", "model"), payload=payload))
        assert c.actor.error_count == 0 and len(c.started) == 1 and c.version == 1
    finally:
        _close(c)


def test_an_unreadable_saved_model_is_ignored(tmp_path: Any) -> None:
    (tmp_path / "deployed.npz").write_bytes(b"PK\x03\x04 truncated")
    c = _offline_client(tmp_path)
    try:
        assert c.version is None
    finally:
        _close(c)
