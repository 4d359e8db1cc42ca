"""Table-driven transition tests for DeviceCore (events in, actions out)."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest

from edge_sdk.core.device import DeviceConfig, DeviceCore, Phase
from edge_sdk.core.events import (
    DeployModel,
    MessageReceived,
    Notify,
    PersistDeviceState,
    Publish,
    SampleAdded,
    ScheduleTimer,
    StartTraining,
    TimerFired,
    TrainingFailed,
    TrainingFinished,
)
from edge_sdk.errors import ConfigError, LocalProtocolError
from edge_sdk.wire import topics
from edge_sdk.wire.codec import decode, encode
from edge_sdk.wire.messages import Ack, Invite, ModelMsg, Pull, Update
from tests.helpers import SIGNER, SPEC

DEV = "d1"


def core(min_samples: int = 3) -> DeviceCore:
    cfg = DeviceConfig(device_id=DEV, region="r1", spec=SPEC, min_samples=min_samples, request_timeout_s=5.0)
    return DeviceCore(cfg, rng=random.Random(0))


def recv(now: float, leaf: str, msg: object) -> MessageReceived:
    signer = SIGNER if isinstance(msg, ModelMsg) else None  # the coordinator signs every model
    topic = topics.device_topic("r1", DEV, leaf)  # type: ignore[arg-type]
    return MessageReceived(now=now, topic=topic, payload=encode(msg, signer=signer, scope=topics.signing_scope(topic)))  # type: ignore[arg-type]


def model(version: int, reply_to: int, group: str = "full") -> ModelMsg:
    n = SPEC.group_size(group)
    return ModelMsg(model_id="toy", version=version, reply_to=reply_to, weights=np.full(n, float(version), dtype=np.float32), group=group)


def kinds(actions: list[object]) -> list[str]:
    return [type(a).__name__ for a in actions]


def published(actions: list[object]) -> list[object]:
    return [decode(a.payload) for a in actions if isinstance(a, Publish)]


def to_training(c: DeviceCore, total: int = 3) -> int:
    acts = c.handle(SampleAdded(now=0.0, total=total))
    pull = published(acts)[0]
    assert isinstance(pull, Pull)
    acts = c.handle(recv(0.1, "model", model(1, pull.seq)))
    assert c.state.phase is Phase.TRAINING
    return next(a for a in acts if isinstance(a, StartTraining)).job.job_id


@pytest.mark.parametrize(
    ("totals", "expect_pull"),
    [([1], False), ([1, 2], False), ([1, 2, 3], True), ([5], True)],
)
def test_threshold_before_first_pull(totals: list[int], expect_pull: bool) -> None:
    c = core(min_samples=3)
    acts: list[object] = []
    for t in totals:
        acts = c.handle(SampleAdded(now=float(t), total=t))  # type: ignore[assignment]
    assert (c.state.phase is Phase.PULLING) == expect_pull
    assert any(isinstance(m, Pull) for m in published(acts)) == expect_pull


def test_full_cycle_and_every_new_sample_pulls_after_first() -> None:
    c = core()
    job = to_training(c)
    acts = c.handle(TrainingFinished(now=2.0, job_id=job, weights=np.ones(SPEC.size, np.float32), n_samples=3, loss=0.3))
    assert kinds(acts)[:4] == ["MarkTraining", "PersistDeviceState", "Publish", "ScheduleTimer"]  # the job's mark cleared first
    upd = published(acts)[0]
    assert isinstance(upd, Update) and upd.base_version == 1 and upd.n_samples == 3
    acts = c.handle(recv(2.1, "ack", Ack(device=DEV, seq=upd.seq, status="accepted", version=1)))
    assert c.state.phase is Phase.IDLE and c.state.updates_acked == 1
    assert not any(isinstance(a, Publish) for a in acts)  # no new samples: stay idle
    acts = c.handle(SampleAdded(now=3.0, total=4))  # one new sample is enough now
    assert c.state.phase is Phase.PULLING
    assert isinstance(published(acts)[0], Pull)


def test_samples_during_training_queue_next_pull() -> None:
    c = core()
    job = to_training(c)
    assert c.handle(SampleAdded(now=1.0, total=4)) == []  # training: just counted
    acts = c.handle(TrainingFinished(now=2.0, job_id=job, weights=np.ones(SPEC.size, np.float32), n_samples=3))
    upd = published(acts)[0]
    acts = c.handle(recv(2.1, "ack", Ack(device=DEV, seq=upd.seq, status="accepted", version=2)))
    pulls = [m for m in published(acts) if isinstance(m, Pull)]
    assert len(pulls) == 1 and pulls[0].n_samples == 4


def test_pull_retry_reuses_seq_with_backoff() -> None:
    c = core()
    acts = c.handle(SampleAdded(now=0.0, total=3))
    first = published(acts)[0]
    t1 = next(a for a in acts if isinstance(a, ScheduleTimer)).at
    assert c.handle(TimerFired(now=t1 - 0.01)) == [ScheduleTimer(at=t1)]  # early wake-up: re-arm only
    acts = c.handle(TimerFired(now=t1))
    again = published(acts)[0]
    assert isinstance(again, Pull) and isinstance(first, Pull) and again.seq == first.seq
    t2 = next(a for a in acts if isinstance(a, ScheduleTimer)).at
    assert t2 - t1 > (t1 - 0.0) * 1.5  # exponential backoff


def test_update_retry_and_duplicate_ack() -> None:
    c = core()
    job = to_training(c)
    acts = c.handle(TrainingFinished(now=2.0, job_id=job, weights=np.ones(SPEC.size, np.float32), n_samples=3))
    upd = published(acts)[0]
    t = next(a for a in acts if isinstance(a, ScheduleTimer)).at
    acts = c.handle(TimerFired(now=t))
    again = published(acts)[0]
    assert isinstance(again, Update) and isinstance(upd, Update) and again.seq == upd.seq
    c.handle(recv(t + 1, "ack", Ack(device=DEV, seq=upd.seq, status="duplicate", version=1)))
    assert c.state.phase is Phase.IDLE and c.state.updates_acked == 1


def test_stale_replies_are_ignored_but_newer_model_deploys() -> None:
    c = core()
    c.handle(SampleAdded(now=0.0, total=3))
    acts = c.handle(recv(0.1, "model", model(5, reply_to=999)))
    assert c.state.phase is Phase.PULLING  # not our pull: no training
    assert [a.version for a in acts if isinstance(a, DeployModel)] == [5]
    acts = c.handle(recv(0.2, "model", model(4, reply_to=999)))
    assert not any(isinstance(a, DeployModel) for a in acts)  # older: ignored
    assert c.handle(recv(0.3, "ack", Ack(device=DEV, seq=12345, status="accepted", version=1))) == []
    # an answer to a seq the device is not waiting for changes nothing, even one that would
    # end this pull (deferred, rejected) had it carried the pending seq
    pending = c.state.pending_seq
    for status in ("deferred", "rejected"):
        assert c.handle(recv(0.4, "ack", Ack(device=DEV, seq=pending + 7, status=status, version=1))) == []
        assert c.state.phase is Phase.PULLING and c.state.pending_seq == pending


def test_deferred_then_invite() -> None:
    c = core()
    acts = c.handle(SampleAdded(now=0.0, total=3))
    pull = published(acts)[0]
    assert isinstance(pull, Pull)
    acts = c.handle(recv(0.1, "ack", Ack(device=DEV, seq=pull.seq, status="deferred", version=0)))
    assert c.state.phase is Phase.DEFERRED
    acts = c.handle(recv(5.0, "invite", Invite(device=DEV, round=7, version=0)))
    again = published(acts)[0]
    assert isinstance(again, Pull) and again.invite_round == 7 and again.seq > pull.seq


def test_an_invitation_is_taken_only_while_deferred() -> None:
    """An invitation answers a deferred pull: one that arrives while the device trains, pushes or
    idles (a late or replayed one) sends no pull and leaves the round as it was."""
    c = core()
    invite = recv(0.0, "invite", Invite(device=DEV, round=7, version=0))
    assert c.handle(invite) == [] and c.state.phase is Phase.IDLE  # idle: nothing to pull for
    job = to_training(c)
    seq = c.state.next_seq
    assert c.handle(invite) == [] and c.state.phase is Phase.TRAINING and c.state.next_seq == seq
    upd = published(c.handle(TrainingFinished(now=2.0, job_id=job, weights=np.ones(SPEC.size, np.float32), n_samples=3)))[0]
    assert isinstance(upd, Update)
    assert c.handle(invite) == [] and c.state.phase is Phase.PUSHING and c.state.pending_seq == upd.seq
    c.handle(recv(2.1, "ack", Ack(device=DEV, seq=upd.seq, status="accepted", version=1)))
    assert c.state.phase is Phase.IDLE and c.state.updates_acked == 1  # the round ended as if no invitation came


def test_a_refused_pull_is_said_and_retried_as_before() -> None:
    """helper-92: a device of another task only timed out and retried. The coordinator answers a
    refused pull now; the device says so (pull_rejected) and changes nothing else — acks are
    unsigned, so a forged refusal cannot stop it pulling: the same pull goes again at its timeout."""
    c = core()
    pull = published(c.handle(SampleAdded(now=0.0, total=3)))[0]
    assert isinstance(pull, Pull)
    deadline = c.state.deadline
    acts = c.handle(recv(0.1, "ack", Ack(device=DEV, seq=pull.seq, status="rejected", version=4, reason="unknown_model")))
    assert [(a.kind, a.data["reason"]) for a in acts if isinstance(a, Notify)] == [("pull_rejected", "unknown_model")]
    assert not [a for a in acts if isinstance(a, Publish)]
    assert c.state.phase is Phase.PULLING and c.state.deadline == deadline
    assert c.state.counters["pull_rejected:unknown_model"] == 1
    again = published(c.handle(TimerFired(now=deadline)))
    assert len(again) == 1 and isinstance(again[0], Pull)
    for i in range(40):  # forged acks with ever new reasons (helper-95): the counters stay bounded
        c.handle(recv(9.0, "ack", Ack(device=DEV, seq=again[0].seq, status="rejected", version=4, reason=f"r{i}" + "x" * 200)))
    keys = [k for k in c.state.counters if k.startswith("pull_rejected:")]
    assert len(keys) == 17 and "pull_rejected:other" in keys and max(map(len, keys)) <= len("pull_rejected:") + 64


def test_training_failure_retries_on_next_sample() -> None:
    c = core()
    job = to_training(c)
    acts = c.handle(TrainingFailed(now=1.0, job_id=job, error="boom"))
    assert c.state.phase is Phase.IDLE and any(isinstance(a, Notify) and a.kind == "training_failed" for a in acts)
    assert c.wants_pull()  # the samples were never learned


def test_a_stale_training_failure_does_not_end_the_current_round() -> None:
    """A failure names its job: a late one for an earlier job (or for this job once it finished)
    neither drops the training in flight nor backs the device off."""
    c = core()
    old = to_training(c)
    upd = published(c.handle(TrainingFinished(now=1.0, job_id=old, weights=np.ones(SPEC.size, np.float32), n_samples=3)))[0]
    assert isinstance(upd, Update)
    c.handle(recv(1.1, "ack", Ack(device=DEV, seq=upd.seq, status="accepted", version=1)))
    pull = published(c.handle(SampleAdded(now=2.0, total=4)))[0]
    assert isinstance(pull, Pull)
    acts = c.handle(recv(2.1, "model", model(1, pull.seq)))
    job = next(a for a in acts if isinstance(a, StartTraining)).job.job_id
    assert job != old
    assert c.handle(TrainingFailed(now=3.0, job_id=old, error="late")) == []
    assert c.state.phase is Phase.TRAINING
    acts = c.handle(TrainingFinished(now=4.0, job_id=job, weights=np.ones(SPEC.size, np.float32), n_samples=4))
    (again,) = published(acts)
    assert isinstance(again, Update) and again.n_samples == 4 and c.state.phase is Phase.PUSHING
    assert c.handle(TrainingFailed(now=5.0, job_id=job, error="late")) == []  # its job finished: pushing goes on
    assert c.state.phase is Phase.PUSHING and c.state.pending_seq == again.seq


def test_partial_model_patches_deployed_copy() -> None:
    c = core()
    to_training(c)  # deployed v1 = all ones
    acts = c.handle(recv(1.0, "model", model(2, reply_to=999, group="classifier")))
    dep = next(a for a in acts if isinstance(a, DeployModel))
    np.testing.assert_array_equal(dep.weights[SPEC.group_slice("extractor")], 1.0)
    np.testing.assert_array_equal(dep.weights[SPEC.group_slice("classifier")], 2.0)


def _part(version: int, full_sync: int = -1, value: float = 0.5) -> ModelMsg:
    head = np.full(SPEC.group_size("classifier"), value, dtype=np.float32)
    return ModelMsg(model_id="toy", version=version, reply_to=-1, weights=head, group="classifier", full_sync=full_sync)


def _holding(version: int, value: float = 7.0) -> DeviceCore:
    """A device that deployed ``version`` (every weight ``value``) and sits idle."""
    c = core()
    whole = ModelMsg(model_id="toy", version=version, reply_to=-1, weights=np.full(SPEC.size, value, np.float32))
    assert "DeployModel" in kinds(c.handle(recv(0.0, "model", whole))) and c.state.phase is Phase.IDLE
    return c


def test_a_head_built_on_a_later_full_sync_is_refused_not_patched_onto_an_older_extractor() -> None:
    """helper-127's probe: a signed head-only reply is valid region-wide, and a device holding version 1
    patched version 4's head (built on full sync 3's extractor) onto version 1's extractor and deployed
    v4 as [7 x 6, 0.5 x 3], a model no coordinator built (replayed from the broker, or misrouted). The
    coordinator names the full sync a part builds on (``full_sync``): a device holding a version
    before it refuses the part, counted, and nothing changes."""
    c = _holding(1)
    acts = c.handle(recv(1.0, "model", _part(4, full_sync=3)))
    assert [a.weights.tolist() for a in acts if isinstance(a, DeployModel)] == []  # the old code: [7.0 x 6, 0.5 x 3]
    assert kinds(acts) == ["Notify"] and acts[0].kind == "message_rejected"  # type: ignore[attr-defined]
    assert acts[0].data["reason"] == "extractor_mismatch"  # type: ignore[attr-defined]
    assert c.state.counters["rejected:extractor_mismatch"] == 1 and c.state.rejected_messages == 1
    assert c.state.deployed_version == 1 and c.state.phase is Phase.IDLE
    np.testing.assert_array_equal(c.state.deployed, 7.0)
    # The same part on a device holding that full sync, then the next on it holding version 4 (the
    # same extractor): patched.
    c = _holding(3)
    for version, head in ((4, 0.5), (5, 0.25)):
        acts = c.handle(recv(1.0, "model", _part(version, full_sync=3, value=head)))
        dep = next(a for a in acts if isinstance(a, DeployModel))
        assert dep.version == version and c.state.rejected_messages == 0
        np.testing.assert_array_equal(dep.weights[SPEC.group_slice("extractor")], 7.0)
        np.testing.assert_array_equal(dep.weights[SPEC.group_slice("classifier")], head)


def test_a_refused_head_leaves_the_pull_waiting_for_its_answer() -> None:
    """A replayed part reaching a device whose pull is in flight is refused like any other; the pull
    stays pending (the same seq, retried at its deadline) and the coordinator's answer — the whole
    model, since the device's extractor predates the full sync — is trained from."""
    c = _holding(1)
    pull = published(c.handle(SampleAdded(now=1.0, total=3)))[0]
    assert isinstance(pull, Pull) and pull.have_version == 1 and c.state.phase is Phase.PULLING
    acts = c.handle(recv(1.5, "model", _part(4, full_sync=3)))
    assert kinds(acts) == ["Notify"] and c.state.phase is Phase.PULLING and c.state.pending_seq == pull.seq
    answer = ModelMsg(model_id="toy", version=4, reply_to=-1, weights=np.full(SPEC.size, 3.0, np.float32), train_group="classifier")
    job = next(a for a in c.handle(recv(2.0, "model", answer)) if isinstance(a, StartTraining)).job
    assert job.base_version == 4 and job.group == "classifier"
    np.testing.assert_array_equal(job.weights, 3.0)


def test_a_head_without_full_sync_is_patched_as_before() -> None:
    """A coordinator from before ``full_sync`` sends parts without it: a device patches them onto the
    weights it holds, as it always did (refusing them would leave such a device no model to train
    between full syncs: every pull answered with the same part)."""
    c = _holding(1)
    acts = c.handle(recv(1.0, "model", _part(4)))
    dep = next(a for a in acts if isinstance(a, DeployModel))
    np.testing.assert_array_equal(dep.weights[SPEC.group_slice("extractor")], 7.0)
    np.testing.assert_array_equal(dep.weights[SPEC.group_slice("classifier")], 0.5)


def test_garbage_and_foreign_messages_are_counted_not_fatal() -> None:
    c = core()
    acts = c.handle(MessageReceived(now=0.0, topic=topics.device_topic("r1", DEV, "model"), payload=b"\xc1garbage"))
    assert c.state.rejected_messages == 1 and isinstance(acts[0], Notify)
    acts = c.handle(recv(0.0, "model", ModelMsg(model_id="other", version=1, reply_to=0, weights=np.zeros(SPEC.size, np.float32))))
    assert c.state.rejected_messages == 2
    wrong = ModelMsg(model_id="toy", version=1, reply_to=0, weights=np.zeros(3, np.float32))
    c.handle(recv(0.0, "model", wrong))
    assert c.state.rejected_messages == 3 and c.state.deployed is None


def test_persist_precedes_every_publish_that_uses_a_new_seq() -> None:
    c = core()
    acts = c.handle(SampleAdded(now=0.0, total=3))
    assert isinstance(acts[0], PersistDeviceState) and acts[0].next_seq == 1
    assert isinstance(acts[1], Publish)
    # every request the device publishes carries a seq below the next_seq already persisted
    # (a crash right after the publish must not hand the same seq to other data): the first
    # pull, the update after training, and the resend under a new seq after a seq conflict
    durable, sent = 0, []

    def check(actions: list[object]) -> None:
        nonlocal durable
        for a in actions:
            if isinstance(a, PersistDeviceState):
                durable = a.next_seq
            elif isinstance(a, Publish):
                msg = decode(a.payload)
                assert isinstance(msg, Pull | Update) and msg.seq < durable, (msg, durable)
                sent.append(msg.seq)

    check(acts)
    (pull,) = published(acts)
    acts = c.handle(recv(0.1, "model", model(1, pull.seq)))
    check(acts)
    job = next(a for a in acts if isinstance(a, StartTraining)).job.job_id
    acts = c.handle(TrainingFinished(now=1.0, job_id=job, weights=np.ones(SPEC.size, np.float32), n_samples=3))
    check(acts)
    (upd,) = published(acts)
    assert isinstance(upd, Update)
    # another update holds this seq at the coordinator (a reinstall's): sent again above its watermark
    acts = c.handle(recv(1.1, "ack", Ack(device=DEV, seq=upd.seq, status="duplicate", version=1, nonce=0, watermark=40)))
    check(acts)
    assert sent == [pull.seq, upd.seq, 41]


def test_api_misuse_is_local_error() -> None:
    c = core()
    c.handle(SampleAdded(now=0.0, total=5))
    with pytest.raises(LocalProtocolError):
        c.handle(SampleAdded(now=1.0, total=4))
    with pytest.raises(LocalProtocolError):
        TimerFired(now=float("nan"))


def test_lasp_trains_and_sends_only_the_requested_group() -> None:
    c = core()
    acts = c.handle(SampleAdded(now=0.0, total=3))
    pull = published(acts)[0]
    assert isinstance(pull, Pull)
    msg = ModelMsg(model_id="toy", version=4, reply_to=pull.seq, weights=np.zeros(SPEC.size, np.float32), train_group="classifier")
    acts = c.handle(recv(0.1, "model", msg))
    job = next(a for a in acts if isinstance(a, StartTraining)).job
    assert job.group == "classifier" and job.weights.shape == (SPEC.size,)
    acts = c.handle(TrainingFinished(now=1.0, job_id=job.job_id, weights=np.full(SPEC.size, 2.0, np.float32), n_samples=3))
    upd = published(acts)[0]
    assert isinstance(upd, Update) and upd.group == "classifier"
    np.testing.assert_array_equal(upd.weights, np.full(SPEC.group_size("classifier"), 2.0))


def test_the_finite_proofs_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the most recent ``FINITE_PROOFS`` proofs are kept: no growth, no callback per array."""
    from edge_sdk import spec as spec_module

    monkeypatch.setattr(spec_module, "FINITE_PROOFS", 3)
    arrays = [np.frombuffer(np.full(SPEC.size, i, np.float32).tobytes(), dtype=np.float32) for i in range(5)]
    for a in arrays:
        SPEC.check(a)
    assert [spec_module._proven_finite(a) for a in arrays] == [False, False, True, True, True]
    assert len(spec_module._FINITE_ORDER) == 3


def test_a_check_s_finiteness_pass_is_skipped_only_for_the_same_immutable_array() -> None:
    """``ModelSpec.check``: shape and dtype are checked every time; the finiteness pass is
    skipped only for the very same read-only array over ``bytes`` that passed it before (one
    carried model frame handed to many devices, an update checked by its device and by the
    coordinator); an array that can change, or changed shape, is checked again."""
    from edge_sdk import spec as spec_module
    from edge_sdk.errors import NonFiniteWeights, ShapeMismatch

    good = np.frombuffer(np.ones(SPEC.size, np.float32).tobytes(), dtype=np.float32)
    assert not spec_module._proven_finite(good)
    SPEC.check(good, "full")
    assert spec_module._proven_finite(good)
    SPEC.check(good, "full")  # the same object: proven
    with pytest.raises(ShapeMismatch):
        SPEC.check(good, "classifier")  # another group: the shape is still checked
    nan = np.frombuffer(np.full(SPEC.size, np.nan, np.float32).tobytes(), dtype=np.float32)
    with pytest.raises(NonFiniteWeights):
        SPEC.check(nan, "full")
    assert not spec_module._proven_finite(nan)
    good.shape = (1, SPEC.size)  # the same object, reshaped in place: checked again
    assert not spec_module._proven_finite(good)
    with pytest.raises(ShapeMismatch):
        SPEC.check(good, "full")
    del good  # its proof stays behind, dead: an array that takes its id is not proven
    fresh = np.frombuffer(np.ones(SPEC.size, np.float32).tobytes(), dtype=np.float32)
    assert not spec_module._proven_finite(fresh)
    mutable = np.ones(SPEC.size, np.float32)
    SPEC.check(mutable, "full")
    assert not spec_module._proven_finite(mutable)
    mutable[0] = np.inf
    with pytest.raises(NonFiniteWeights):
        SPEC.check(mutable, "full")


def _pushing(c: DeviceCore) -> Update:
    job = to_training(c)
    upd = published(c.handle(TrainingFinished(now=2.0, job_id=job, weights=np.ones(SPEC.size, np.float32), n_samples=3)))[0]
    assert isinstance(upd, Update) and c.state.phase is Phase.PUSHING
    return upd


def test_another_device_s_ack_replayed_onto_ours_is_refused() -> None:
    """Acks are unsigned and name their device: another device's (genuine) ack for the same
    seq, replayed by the broker onto our topic, made the device drop its pending update as
    acknowledged although the coordinator never had it."""
    c = core()
    upd = _pushing(c)
    acts = c.handle(recv(3.0, "ack", Ack(device="someone-else", seq=upd.seq, status="duplicate", version=1)))
    assert c.state.phase is Phase.PUSHING and c.state.pending_update is not None and c.state.updates_acked == 0
    assert c.state.counters["rejected:topic_mismatch"] == 1 and kinds(acts) == ["Notify"]
    c.handle(recv(4.0, "ack", Ack(device=DEV, seq=upd.seq, status="accepted", version=1)))
    assert c.state.phase is Phase.IDLE and c.state.updates_acked == 1


def test_a_duplicate_ack_cannot_move_the_seq_beyond_what_a_coordinator_accepts() -> None:
    """A forged duplicate ack with a watermark of 2^62 moved (and persisted) next_seq there:
    every later request was then a seq_jump at the coordinator, for ever."""
    from edge_sdk.core.device import MAX_WATERMARK_JUMP

    c = core()
    upd = _pushing(c)
    forged = Ack(device=DEV, seq=upd.seq, status="duplicate", version=1, nonce=12345, watermark=2**62)
    (said,) = c.handle(recv(3.0, "ack", forged))  # ignored, and said (the client logs it once per watermark)
    assert isinstance(said, Notify) and said.kind == "seq_behind" and said.data["watermark"] == 2**62
    assert c.state.next_seq == upd.seq + 1 and c.state.phase is Phase.PUSHING
    assert c.state.counters["ignored:watermark_jump"] == 1
    near = Ack(device=DEV, seq=upd.seq, status="duplicate", version=1, nonce=12345, watermark=upd.seq + MAX_WATERMARK_JUMP)
    resent = published(c.handle(recv(4.0, "ack", near)))  # a real conflict: sent again above the watermark
    assert isinstance(resent[0], Update) and resent[0].seq == upd.seq + MAX_WATERMARK_JUMP + 1


def test_a_model_naming_a_group_the_device_lacks_is_refused_before_training() -> None:
    """The unknown train_group raised ShapeMismatch out of handle() when training finished,
    leaving the core in TRAINING with no timer: dead to the protocol."""
    c = core()
    pull = published(c.handle(SampleAdded(now=0.0, total=3)))[0]
    assert isinstance(pull, Pull)
    m = ModelMsg(model_id="toy", version=1, reply_to=pull.seq, weights=np.ones(SPEC.size, np.float32), train_group="classifier_v2")
    acts = c.handle(recv(0.1, "model", m))
    assert not any(isinstance(a, StartTraining) for a in acts) and c.state.phase is Phase.PULLING
    assert c.state.counters["rejected:shape_mismatch"] == 1


def test_a_model_of_another_layout_under_the_same_id_is_refused() -> None:
    """The coordinator sends its spec's fingerprint; a device of another task version (same
    model id and size, parameters laid out differently) deployed it silently."""
    c = core()
    pull = published(c.handle(SampleAdded(now=0.0, total=3)))[0]
    assert isinstance(pull, Pull)
    other = ModelMsg(model_id="toy", version=1, reply_to=pull.seq, weights=np.ones(SPEC.size, np.float32), spec_fingerprint="0" * 16)
    acts = c.handle(recv(0.1, "model", other))
    assert not any(isinstance(a, (DeployModel, StartTraining)) for a in acts) and c.state.counters["rejected:shape_mismatch"] == 1
    same = ModelMsg(model_id="toy", version=1, reply_to=pull.seq, weights=np.ones(SPEC.size, np.float32), spec_fingerprint=SPEC.fingerprint)
    assert any(isinstance(a, StartTraining) for a in c.handle(recv(0.2, "model", same)))


def test_a_round_s_samples_stay_untrained_on_disk_until_its_update_is_acknowledged() -> None:
    """trained_upto was made durable when training started: a crash or stop while training
    or pushing restarted with the samples counted as trained, and they reached no update
    (until the user labelled again, or never). Now the durable watermark moves at the ack."""
    c = core()
    durable: list[int] = []

    def run(actions: list[object]) -> list[object]:
        durable.extend(a.trained_upto for a in actions if isinstance(a, PersistDeviceState))
        return actions

    pull = published(run(c.handle(SampleAdded(now=0.0, total=3))))[0]
    assert isinstance(pull, Pull)
    acts = run(c.handle(recv(0.1, "model", model(1, pull.seq))))
    job = next(a for a in acts if isinstance(a, StartTraining)).job.job_id
    assert durable[-1] == 0  # training: on disk the samples are not trained yet
    upd = published(run(c.handle(TrainingFinished(now=2.0, job_id=job, weights=np.ones(SPEC.size, np.float32), n_samples=3))))[0]
    assert isinstance(upd, Update) and durable[-1] == 0  # pushing: nor yet
    restarted = DeviceCore(c.config, rng=random.Random(1), next_seq=c.state.next_seq, trained_upto=durable[-1], total=3)
    assert isinstance(published(restarted.handle(SampleAdded(now=9.0, total=3)))[0], Pull)  # trains them again
    run(c.handle(recv(3.0, "ack", Ack(device=DEV, seq=upd.seq, status="accepted", version=1))))
    assert durable[-1] == 3 and c.state.phase is Phase.IDLE


@pytest.mark.parametrize(("reason", "trained_again"), [("base_rejected", True), ("out_of_range", False)])
def test_an_update_refused_for_its_abandoned_base_is_trained_again(reason: str, trained_again: bool) -> None:
    """F11: the coordinator refuses an update trained from a version a rollback abandoned (the
    gate rejected that candidate). Its samples are in no model the coordinator keeps: the device
    pulls the current training line and trains the same samples again, and the durable watermark
    says they are untrained. Other refusals end the round as before."""
    c = core()
    upd = _pushing(c)
    acts = c.handle(recv(3.0, "ack", Ack(device=DEV, seq=upd.seq, status="rejected", version=5, reason=reason)))
    persisted = [a.trained_upto for a in acts if isinstance(a, PersistDeviceState)]
    pulls = [m for m in published(acts) if isinstance(m, Pull)]
    assert c.state.updates_acked == 0
    if not trained_again:
        assert persisted == [3] and not pulls and c.state.phase is Phase.IDLE
        return
    assert set(persisted) == {0} and c.state.trained_upto == 0  # durable too: the samples are untrained
    assert kinds(acts).index("PersistDeviceState") < kinds(acts).index("Publish")
    assert c.state.counters["retrain:base_rejected"] == 1
    (pull,) = pulls
    assert pull.seq > upd.seq and not pull.serve and c.state.phase is Phase.PULLING
    acts = c.handle(recv(3.1, "model", model(7, pull.seq)))  # the current training line
    (start,) = [a for a in acts if isinstance(a, StartTraining)]
    assert (start.job.base_version, start.job.n_samples) == (7, 3)  # the same three samples, from the new line
    again = published(c.handle(TrainingFinished(now=4.0, job_id=start.job.job_id, weights=np.ones(SPEC.size, np.float32), n_samples=3)))
    assert isinstance(again[0], Update) and again[0].base_version == 7 and again[0].seq > pull.seq


# ---------------------------------------------------------------- refresh (idle devices)


def refreshing(refresh_s: float = 100.0, min_samples: int = 3) -> DeviceCore:
    cfg = DeviceConfig(device_id=DEV, region="r1", spec=SPEC, min_samples=min_samples, request_timeout_s=5.0, refresh_s=refresh_s)
    return DeviceCore(cfg, rng=random.Random(0))


def release(version: int, *, unchanged: bool = False) -> ModelMsg:
    """The coordinator's answer to a serving pull: release ``version`` (no weights when the
    device said it holds it)."""
    if unchanged:
        return ModelMsg(model_id="toy", version=version, reply_to=-1, weights=np.zeros(0, np.float32), group="unchanged",
                        release=version)
    return ModelMsg(model_id="toy", version=version, reply_to=-1, weights=np.full(SPEC.size, float(version), np.float32),
                    release=version)


def timers(actions: list[object]) -> list[float]:
    return [a.at for a in actions if isinstance(a, ScheduleTimer)]


def test_an_idle_device_asks_for_the_release_again_after_refresh_s_without_a_pull() -> None:
    """A device whose user labels nothing learns of releases only by asking: every
    ``refresh_s`` (±10 %) without a pull it sends a serving pull; the answer deploys a newer
    release, or holds no weights when it has that release already."""
    c = refreshing(100.0)
    pull = published(c.start(0.0))[0]
    assert isinstance(pull, Pull) and pull.serve and pull.have_version == -1
    acts = c.handle(recv(1.0, "model", release(1)))
    assert any(isinstance(a, DeployModel) and a.version == 1 for a in acts) and c.state.phase is Phase.IDLE
    [at] = timers(acts)  # idle: the driver's timer is set for the refresh
    assert 1.0 + 90.0 <= at <= 1.0 + 110.0 and c.state.refresh_at == at
    assert c.handle(TimerFired(now=at - 1.0)) == [ScheduleTimer(at=at)]  # early (a driver's rounding): set again
    acts = c.handle(TimerFired(now=at))
    [again] = published(acts)
    assert isinstance(again, Pull) and again.serve and again.have_version == 1 and again.seq == pull.seq + 1
    assert c.state.phase is Phase.PULLING and c.state.counters["refresh_pulls"] == 1
    acts = c.handle(recv(at + 1.0, "model", release(1, unchanged=True)))  # it has release 1: a few bytes, nothing deployed
    assert not any(isinstance(a, DeployModel) for a in acts) and c.state.phase is Phase.IDLE
    [at2] = timers(acts)
    assert at + 1.0 + 90.0 <= at2 <= at + 1.0 + 110.0
    acts = c.handle(TimerFired(now=at2))
    assert isinstance(published(acts)[0], Pull)
    acts = c.handle(recv(at2 + 1.0, "model", release(4)))  # released meanwhile: deployed
    assert any(isinstance(a, DeployModel) and a.version == 4 for a in acts)
    assert c.state.deployed_version == 4


def test_refresh_counts_from_the_last_pull_and_never_displaces_a_request_s_deadline() -> None:
    c = refreshing(100.0)
    acts = c.handle(recv(0.5, "model", release(1)))  # an unrequested signed release: deployed, device still idle
    [first] = timers(acts)
    assert 90.5 <= first <= 110.5
    assert timers(c.handle(SampleAdded(now=1.0, total=1))) == []  # below D_min: no pull; the timer stays set
    acts = c.handle(SampleAdded(now=50.0, total=3))  # D_min: a training pull; its deadline is the one timer now
    assert c.state.phase is Phase.PULLING and c.state.refresh_at is None
    assert timers(acts) == [c.state.deadline]
    pull = next(m for m in published(acts) if isinstance(m, Pull))
    [retry] = published(c.handle(TimerFired(now=first)))  # the refresh is void: the pull's deadline is what fires
    assert isinstance(retry, Pull) and retry.seq == pull.seq and not retry.serve and "refresh_pulls" not in c.state.counters
    c.handle(recv(51.0, "model", model(2, pull.seq)))
    assert c.state.phase is Phase.TRAINING
    job = c.state.job_id
    acts = c.handle(TrainingFinished(now=52.0, job_id=job, weights=np.ones(SPEC.size, np.float32), n_samples=3, loss=0.1))
    upd = published(acts)[0]
    acts = c.handle(recv(53.0, "ack", Ack(device=DEV, seq=upd.seq, status="accepted", version=2)))
    assert c.state.phase is Phase.IDLE
    [at] = timers(acts)  # idle again: the refresh counts from here, not from the first wait
    assert 53.0 + 90.0 <= at <= 53.0 + 110.0


def test_refresh_is_off_by_default_and_checked() -> None:
    c = core()
    acts = c.start(0.0)
    c.handle(recv(1.0, "model", model(1, published(acts)[0].seq)))
    assert c.state.phase is Phase.IDLE and c.timer_is_idle()
    assert c.handle(TimerFired(now=10_000.0)) == []  # no refresh without refresh_s
    for bad in (0, -1.0, float("nan"), float("inf"), True, "60"):
        with pytest.raises(ConfigError, match="refresh_s"):
            DeviceConfig(device_id=DEV, region="r1", spec=SPEC, refresh_s=bad)  # type: ignore[arg-type]


def test_events_are_dispatched_by_class_and_subclasses_as_their_base() -> None:
    """DeviceCore.handle looks the handler up by the event's class; a subclass of an event
    class is handled as that class, and anything else is refused with LocalProtocolError."""

    class LabelledAdded(SampleAdded):  # a driver's own event type, extending one of the core's
        __slots__ = ()

    c = core(min_samples=1)
    acts = c.handle(LabelledAdded(now=1.0, total=1))
    assert c.state.phase is Phase.PULLING and c.state.total == 1
    assert [type(m) for m in published(acts)] == [Pull]

    class EarlyTimer(TimerFired):  # with refresh_s, a fired timer is re-armed whatever its class
        __slots__ = ()

    for cls in (TimerFired, EarlyTimer):
        r = refreshing(100.0)
        r.start(0.0)
        [at] = timers(r.handle(recv(1.0, "model", release(1))))
        assert timers(r.handle(cls(now=at - 1.0))) == [at]

    class Counting(DeviceCore):  # a subclass's override of a handler is the one called
        seen = 0

        def _on_sample(self, ev: SampleAdded) -> list[Any]:
            Counting.seen += 1
            return super()._on_sample(ev)

    counting = Counting(DeviceConfig(device_id=DEV, region="r1", spec=SPEC, min_samples=5), rng=random.Random(0))
    counting.handle(SampleAdded(now=1.0, total=1))
    counting.handle(LabelledAdded(now=2.0, total=2))
    assert Counting.seen == 2 and counting.state.total == 2

    class Unrelated:
        now = 2.0

    with pytest.raises(LocalProtocolError, match="cannot handle Unrelated"):
        c.handle(Unrelated())  # type: ignore[arg-type]
    assert c.state.phase is Phase.PULLING and c.state.total == 1


@pytest.mark.parametrize(("strategy", "config", "jitter"), [
    (("spin", {"k": 1, "timeout_s": 1.0}), {}, False),
    (("spin", {"k": 1, "timeout_s": 1.0}), {"pull_burst": 1.0}, False),  # a bucket of 1: it waited for 1.25 tokens for ever
    (("spin", {"k": 1, "timeout_s": 1.0}), {"pull_burst": 1.2}, False),
    (("spin", {"k": 1, "timeout_s": 1.0}), {}, True),  # half the pulls delayed 0.25 s more: the coordinator counts arrivals
    (("fedbuff", {"k": 1}), {}, False),  # deferred pull, then an invitation's pull moments later
    (("spin", {"k": 1, "timeout_s": 1.0}), {"pull_refill_s": 0.0}, False),  # the ablation: pacing off
], ids=["spin", "burst-1", "burst-1.2", "jitter", "fedbuff-invites", "unpaced"])
def test_a_device_that_labels_fast_paces_its_pulls_to_the_coordinators_limit(strategy: tuple[str, dict[str, Any]],
                                                                             config: dict[str, Any], jitter: bool) -> None:
    """A device labelling 10 samples/s that trains in 10 ms pulled about once per label, emptied
    the coordinator's bucket (8 at once, then one per 0.5 s), and each dropped pull cost it a
    request timeout while its labels piled up. It now holds a pull until the bucket has a token,
    counting refill from the coordinator's answer (which took the token on arrival); the pull
    an invitation asks for is answered whatever the bucket. Pacing off is what happened before."""
    from tests.helpers import Link, make_coordinator

    rng = random.Random(7)
    delay = (lambda topic: 0.25 * (rng.random() < 0.5) if topic.endswith("/pull") else 0.0) if jitter else (lambda topic: 0.0)
    name, params = strategy
    link = Link(coordinator=make_coordinator(name, **params), latency=0.01, train_seconds=0.01, delay=delay)
    dev = link.add_device("fast", min_samples=1, **config)
    link.run_until(0.0)
    for i in range(1, 201):
        link.add_sample("fast", i, at=0.1 * i)
    link.run_until(60.0)
    dropped = link.coordinator.counters["reject:rate_limited"]
    retries = [n for _, n in link.notes if n.kind == "retry"]
    if config.get("pull_refill_s") == 0.0:
        assert dropped > 0 and retries
    else:
        assert dropped == 0 and not retries
        assert dev.state.counters["pulls_paced"] > 5
        assert dev.state.trained_upto == 200  # every label trained by the end


def test_refresh_pulls_are_paced_too() -> None:
    """A refresh period below the bucket's refill (refresh_s 0.05 s) drained the bucket; a
    refresh now waits for a token as every pull does."""
    from tests.helpers import Link, make_coordinator

    link = Link(coordinator=make_coordinator("spin", k=1, timeout_s=1.0), latency=0.01)
    dev = link.add_device("idle", min_samples=100, refresh_s=0.05)
    link.add_sample("idle", 1, at=0.0)  # (an event: the idle core arms its refresh timer)
    link.run_until(30.0)
    assert link.coordinator.counters["reject:rate_limited"] == 0
    assert not [n for _, n in link.notes if n.kind == "retry"]
    assert 40 <= dev.state.counters["refresh_pulls"] <= 70  # about one per 0.5 s (paced), not one per 0.05 s
