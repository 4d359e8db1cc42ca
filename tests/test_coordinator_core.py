"""CoordinatorCore with the SPIN strategy: buffering, timeout, idempotency, rejection, restart."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from coordinator.core import (
    CommitVersion,
    ConvertUpdate,
    CoordinatorConfig,
    CoordinatorCore,
    PersistUpdate,
    Snapshot,
)
from coordinator.peering.base import Peering, PeerPlan
from coordinator.strategies import make_strategy
from edge_sdk.core.events import MessageReceived, Notify, Publish, ScheduleTimer, TimerFired
from edge_sdk.errors import ConfigError
from edge_sdk.wire import topics
from edge_sdk.wire.codec import decode, encode, parse_status_json
from edge_sdk.wire.messages import Ack, ModelMsg, Pull, Update
from tests.helpers import SPEC, make_coordinator


def upd(device: str, seq: int, value: float = 1.0, *, base: int = 0, n: int = 1, **kw: object) -> MessageReceived:
    weights = kw.pop("weights", np.full(SPEC.size, value, dtype=np.float32))
    model_id = str(kw.pop("model_id", "toy"))
    msg = Update(device=device, seq=seq, model_id=model_id, base_version=base, n_samples=n, weights=weights)  # type: ignore[arg-type]
    return MessageReceived(now=float(kw.get("now", 0.0)), topic=topics.device_topic("r1", device, "update"), payload=encode(msg))


def acks(actions: Sequence[object]) -> list[Ack]:
    out = []
    for a in actions:
        if isinstance(a, Publish) and a.topic.endswith("/ack"):
            m = decode(a.payload)
            assert isinstance(m, Ack)
            out.append(m)
    return out


def commits(actions: list[object]) -> list[CommitVersion]:
    return [a for a in actions if isinstance(a, CommitVersion)]


def test_pull_is_answered_immediately_with_current_model() -> None:
    c = make_coordinator(k=3, timeout_s=10)
    pull = Pull(device="d1", seq=4, model_id="toy")
    acts = c.handle(MessageReceived(now=0.0, topic=topics.device_topic("r1", "d1", "pull"), payload=encode(pull)))
    reply = decode(next(a for a in acts if isinstance(a, Publish) and a.topic.endswith("/model")).payload)
    assert isinstance(reply, ModelMsg) and reply.version == 0 and reply.reply_to == -1  # "answers your pull"
    assert reply.spec_fingerprint == SPEC.fingerprint
    # every device asking for the same model gets the very same signed bytes (encoded once)
    again = c.handle(MessageReceived(now=0.1, topic=topics.device_topic("r1", "d2", "pull"), payload=encode(Pull(device="d2", seq=9, model_id="toy"))))
    first = next(a for a in acts if isinstance(a, Publish) and a.topic.endswith("/model")).payload
    assert next(a for a in again if isinstance(a, Publish) and a.topic.endswith("/model")).payload is first


def test_aggregates_at_k_with_sample_weights() -> None:
    c = make_coordinator(k=2, timeout_s=None)
    a1 = c.handle(upd("d1", 0, 1.0, n=1))
    assert isinstance(a1[0], PersistUpdate) and acks(a1)[0].status == "accepted"
    assert not commits(a1)
    a2 = c.handle(upd("d2", 0, 4.0, n=3))
    (commit,) = commits(a2)
    assert commit.version == 1 and c.version == 1
    np.testing.assert_allclose(commit.weights, (1 * 1.0 + 3 * 4.0) / 4)
    assert set(commit.consumed) == {("d1", 0), ("d2", 0)}
    assert dict(commit.applied_changed) == {"d1": 0, "d2": 0}
    status = parse_status_json(next(a for a in a2 if isinstance(a, Publish) and a.retain).payload)
    assert status["version"] == 1 and status["updates_accepted"] == 2 and status["buffered"] == 0


def test_timeout_fires_only_with_a_buffered_update() -> None:
    c = make_coordinator(k=10, timeout_s=5.0)
    assert not [a for a in c.start(0.0) if isinstance(a, ScheduleTimer)]  # empty buffer: no timer
    acts = c.handle(upd("d1", 0, 2.0, now=1.0))
    (timer,) = [a for a in acts if isinstance(a, ScheduleTimer)]
    assert timer.at == pytest.approx(6.0)
    assert not commits(c.handle(TimerFired(now=5.9)))
    (commit,) = commits(c.handle(TimerFired(now=6.0)))
    np.testing.assert_allclose(commit.weights, 2.0)
    assert not commits(c.handle(TimerFired(now=20.0)))  # empty buffer: nothing to do


def test_duplicate_update_is_acked_but_applied_once() -> None:
    c = make_coordinator(k=2, timeout_s=None)
    c.handle(upd("d1", 5, 1.0))
    dup = c.handle(upd("d1", 5, 1.0))
    assert [a.status for a in acks(dup)] == ["duplicate"]
    assert not any(isinstance(a, PersistUpdate) for a in dup)
    assert len(c.buffer) == 1 and c.counters["duplicate"] == 1
    older = c.handle(upd("d1", 3, 9.0))
    assert [a.status for a in acks(older)] == ["duplicate"]


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        (MessageReceived(now=0.0, topic=topics.device_topic("r1", "d1", "update"), payload=b"\x00garbage"), "malformed"),
        (upd("d1", 0, weights=np.zeros(SPEC.size - 1, np.float32)), "shape_mismatch"),
        (upd("d1", 0, weights=np.full(SPEC.size, np.nan, np.float32)), "non_finite"),
        (upd("d1", 0, weights=np.full(SPEC.size, 3e38, np.float32)), "out_of_range"),  # finite, but sums overflow
        (upd("d1", 0, base=7), "unknown_version"),
        (upd("d1", 0, model_id="other"), "unknown_model"),  # same layout, another model: not averaged in
        (MessageReceived(now=0.0, topic=topics.device_topic("r1", "d2", "update"), payload=upd("d1", 0).payload), "topic_mismatch"),
    ],
)
def test_bad_updates_are_rejected_counted_and_never_applied(event: MessageReceived, reason: str) -> None:
    c = make_coordinator(k=1, timeout_s=None)
    before = c.weights.copy()
    acts = c.handle(event)
    assert c.counters["rejected"] == 1 and c.counters[f"reject:{reason}"] == 1
    assert not commits(acts) and not any(isinstance(a, PersistUpdate) for a in acts)
    assert c.version == 0 and not c.buffer
    np.testing.assert_array_equal(c.weights, before)
    if reason != "malformed":
        assert [a.status for a in acks(acts)] == ["rejected"]
    # the coordinator keeps working afterwards
    assert commits(c.handle(upd("d9", 0, 3.0)))


def test_a_message_on_another_regions_device_topic_is_refused_and_changes_nothing() -> None:
    """A coordinator serves its own region's device topics only: an update or pull published
    under r2's prefix (a wildcard subscription, a misrouted bridge) is neither applied nor answered."""
    c = make_coordinator(k=1, timeout_s=None)
    before = c.weights.copy()
    for leaf, msg in (("update", upd("d1", 0, 5.0).payload), ("pull", encode(Pull(device="d1", seq=0, model_id="toy")))):
        acts = c.handle(MessageReceived(now=0.0, topic=topics.device_topic("r2", "d1", leaf), payload=msg))  # type: ignore[arg-type]
        assert [a.data["reason"] for a in acts if isinstance(a, Notify)] == ["topic_mismatch"]
        assert not [a for a in acts if isinstance(a, Publish) and not a.retain]  # no model, no ack (the status may go)
        assert not commits(acts) and not any(isinstance(a, PersistUpdate) for a in acts)
    assert c.counters["reject:topic_mismatch"] == 2 and c.counters["accepted"] == 0
    assert c.version == 0 and not c.buffer
    np.testing.assert_array_equal(c.weights, before)
    assert commits(c.handle(upd("d1", 0, 5.0)))  # the same update on r1's topic is taken


def test_restart_drops_applied_and_keeps_pending() -> None:
    c = make_coordinator(k=2, timeout_s=None)
    persisted = []
    for ev in (upd("d1", 0, 1.0), upd("d2", 0, 1.0), upd("d3", 0, 5.0)):
        persisted += [a.update for a in c.handle(ev) if isinstance(a, PersistUpdate)]
    assert c.version == 1 and len(c.buffer) == 1
    # crash: the registry still holds all three update files (cleanup never ran)
    snap = Snapshot(version=1, weights=c.weights.copy(), applied_upto=c.applied_upto, buffer=persisted)
    r = make_coordinator(k=2, timeout_s=None, snapshot=snap)
    assert [u.key for u in r.buffer] == [("d3", 0)]
    assert [a.status for a in acks(r.handle(upd("d1", 0)))] == ["duplicate"]
    assert [a.status for a in acks(r.handle(upd("d3", 0)))] == ["duplicate"]
    (commit,) = commits(r.handle(upd("d4", 0, 5.0)))
    assert commit.version == 2
    np.testing.assert_allclose(commit.weights, 5.0)


def test_unknown_strategy_and_bad_params() -> None:
    with pytest.raises(ConfigError, match="known: "):
        make_strategy("nope")
    with pytest.raises(ConfigError):
        make_strategy("spin", k=0)
    with pytest.raises(ConfigError):
        make_strategy("spin", bogus=1)


def _pull(c: object, device: str, seq: int, have: int) -> ModelMsg:
    acts = c.handle(MessageReceived(now=0.0, topic=topics.device_topic("r1", device, "pull"),  # type: ignore[attr-defined]
                                    payload=encode(Pull(device=device, seq=seq, model_id="toy", have_version=have))))
    reply = decode(next(a for a in acts if isinstance(a, Publish) and a.topic.endswith("/model")).payload)
    assert isinstance(reply, ModelMsg)
    return reply


def test_lasp_partial_versions_change_only_the_classifier() -> None:
    import random

    from coordinator.core import CoordinatorConfig, CoordinatorCore
    from tests.helpers import toy_snapshot

    cfg = CoordinatorConfig(region="r1", coordinator_id="c1", spec=SPEC, full_sync_every=3)
    c = CoordinatorCore(cfg, make_strategy("spin", k=1, timeout_s=None), toy_snapshot(), rng=random.Random(0))
    first = _pull(c, "d1", 0, have=-1)
    assert (first.group, first.train_group) == ("full", "classifier")  # old extractor: full model, train the head
    second = _pull(c, "d1", 1, have=0)
    assert (second.group, second.train_group) == ("unchanged", "classifier")  # this very version: nothing travels
    ext, head = SPEC.group_slice("extractor"), SPEC.group_slice("classifier")
    # a full update during a partial round contributes only its classifier slice
    (commit,) = commits(c.handle(upd("d1", 2, 5.0)))
    assert commit.version == 1 and not commit.metadata["full_sync"]
    np.testing.assert_array_equal(commit.weights[ext], 0.0)
    np.testing.assert_array_equal(commit.weights[head], 5.0)
    # a classifier-only update is accepted and applied
    head_only = Update(device="d2", seq=0, model_id="toy", base_version=1, n_samples=1, weights=np.full(3, 2.0, np.float32), group="classifier")
    (commit,) = commits(c.handle(MessageReceived(now=0.0, topic=topics.device_topic("r1", "d2", "update"), payload=encode(head_only))))
    assert commit.version == 2
    np.testing.assert_array_equal(commit.weights[head], 2.0)
    # version 3 is a full sync: devices train the whole model, the extractor moves; one holding the
    # current extractor is sent only the head (the rest would be the bytes it holds), one without it all
    third = _pull(c, "d3", 0, have=1)
    assert (third.group, third.train_group) == ("classifier", "full")
    assert (_pull(c, "d5", 0, have=-1).group, _pull(c, "d6", 0, have=-1).train_group) == ("full", "full")
    # a device already holding the current version gets no weights, only the instructions
    same = _pull(c, "d4", 0, have=2)
    assert (same.group, same.train_group, same.weights.size) == ("unchanged", "full", 0)
    (commit,) = commits(c.handle(upd("d3", 1, 9.0, base=2)))
    assert commit.version == 3 and commit.metadata["full_sync"]
    np.testing.assert_array_equal(commit.weights, 9.0)
    assert c.last_full_version == 3
    assert _pull(c, "d1", 9, have=1).group == "full"  # its extractor predates the full sync
    assert c.counters["bytes_out"] > 0
    # a part names the full sync whose extractor it goes onto; whole models and "unchanged" do not
    assert (first.full_sync, second.full_sync, third.full_sync, same.full_sync) == (-1, -1, 0, -1)
    (commit,) = commits(c.handle(upd("d3", 2, 4.0, base=3)))
    assert commit.version == 4 and not commit.metadata["full_sync"]
    fourth = _pull(c, "d7", 0, have=3)
    assert (fourth.version, fourth.group, fourth.full_sync) == (4, "classifier", 3)


def test_lasp_a_captured_part_replayed_to_a_device_on_an_older_extractor_is_refused() -> None:
    """helper-127: a signed head-only reply is valid region-wide (its scope names the region, not the
    device): captured from the broker and replayed to a device holding a version before the last full
    sync, it was patched onto that device's older extractor and deployed. The reply names its full
    sync; that device refuses it, and one holding the full sync patches it into the coordinator's
    very version."""
    import random

    from edge_sdk.core.device import DeviceConfig, DeviceCore
    from edge_sdk.core.events import DeployModel
    from tests.helpers import SIGNER, toy_snapshot

    cfg = CoordinatorConfig(region="r1", coordinator_id="c1", spec=SPEC, full_sync_every=3, signer=SIGNER)
    c = CoordinatorCore(cfg, make_strategy("spin", k=1, timeout_s=None), toy_snapshot(), rng=random.Random(0))

    def reply(device: str, seq: int, have: int, serve: bool = False) -> bytes:
        pull = Pull(device=device, seq=seq, model_id="toy", have_version=have, serve=serve)
        acts = c.handle(MessageReceived(now=0.0, topic=topics.device_topic("r1", device, "pull"), payload=encode(pull)))
        return next(a.payload for a in acts if isinstance(a, Publish) and a.topic.endswith("/model"))

    def device(name: str, payload: bytes) -> DeviceCore:
        d = DeviceCore(DeviceConfig(device_id=name, region="r1", spec=SPEC, min_samples=3), rng=random.Random(0))
        d.handle(MessageReceived(now=0.0, topic=topics.device_topic("r1", name, "model"), payload=payload))
        return d

    old = device("old", reply("old", 0, have=-1, serve=True))  # holds version 0
    for seq, value in enumerate((1.0, 2.0, 9.0), start=1):  # versions 1, 2 (head only), 3 (the full sync)
        c.handle(upd("d1", seq, value, base=c.version))
    holder = device("holder", reply("holder", 0, have=-1, serve=True))  # holds version 3
    c.handle(upd("d1", 4, 4.0, base=3))
    assert (c.version, c.last_full_version, old.state.deployed_version, holder.state.deployed_version) == (4, 3, 0, 3)
    assert not np.array_equal(c.weights[SPEC.group_slice("extractor")], old.state.deployed[SPEC.group_slice("extractor")])  # type: ignore[index]
    part = reply("d3", 0, have=3)  # for a device holding full sync 3
    decoded = decode(part)
    assert isinstance(decoded, ModelMsg) and (decoded.version, decoded.group, decoded.full_sync) == (4, "classifier", 3)
    acts = old.handle(MessageReceived(now=1.0, topic=topics.device_topic("r1", "old", "model"), payload=part))
    assert [a.weights.tolist() for a in acts if isinstance(a, DeployModel)] == []  # before: v4's head on v0's extractor
    assert old.state.deployed_version == 0 and old.state.counters["rejected:extractor_mismatch"] == 1
    np.testing.assert_array_equal(old.state.deployed, 0.0)  # type: ignore[arg-type]
    acts = holder.handle(MessageReceived(now=1.0, topic=topics.device_topic("r1", "holder", "model"), payload=part))
    (deployed,) = [a for a in acts if isinstance(a, DeployModel)]
    assert deployed.version == 4 and holder.state.rejected_messages == 0
    np.testing.assert_array_equal(deployed.weights, c.weights)  # the coordinator's version 4, exactly


@pytest.mark.parametrize("strategy", ["spin", "spyker", "nebula"])
def test_lasp_refuses_an_update_of_another_group(strategy: str) -> None:
    """Hostile-device audit (helper-116): between full syncs LASP slices each buffered update to the
    classifier; an extractor-only update sliced to nothing, and FedAsync, Spyker and Nebula raised
    ValueError out of handle() (the daemon rebuilt its core per such message), SPIN accepted it. Now
    a typed rejection, counted, that changes nothing; an honest head-only update still commits.
    (FedAsync with LASP is refused at configuration since: test_lasp_strategies.)"""
    import random

    from coordinator.core import CoordinatorConfig, CoordinatorCore
    from tests.helpers import toy_snapshot

    cfg = CoordinatorConfig(region="r1", coordinator_id="c1", spec=SPEC, full_sync_every=3)
    c = CoordinatorCore(cfg, make_strategy(strategy), toy_snapshot(), rng=random.Random(0))

    def update(device: str, group: str, size: int, value: float) -> list[object]:
        _pull(c, device, 0, have=-1)
        msg = Update(device=device, seq=1, model_id="toy", base_version=0, n_samples=1,
                     weights=np.full(size, value, np.float32), group=group)
        return c.handle(MessageReceived(now=0.0, topic=topics.device_topic("r1", device, "update"), payload=encode(msg)))

    acts = update("evil", "extractor", SPEC.group_size("extractor"), 7.0)
    (ack,) = acks(acts)
    assert (ack.status, ack.reason) == ("rejected", "shape_mismatch")
    assert c.counters["reject:shape_mismatch"] == 1 and c.counters["accepted"] == 0
    assert not commits(acts) and c.status().buffered == 0 and c.status().version == 0
    acts = update("d1", "classifier", SPEC.group_size("classifier"), 2.0) + c.handle(TimerFired(now=1e6))
    assert acks(acts)[0].status == "accepted" and c.counters["accepted"] == 1
    assert all(not commit.weights[SPEC.group_slice("extractor")].any() for commit in commits(acts))


def test_lasp_refuses_a_head_trained_on_the_extractor_before_the_last_full_sync() -> None:
    """helper-116: a classifier-only update trained from a version before the last full sync (a
    straggler's head, fit to the old extractor) was applied to the new extractor's head."""
    import random

    from coordinator.core import CoordinatorConfig, CoordinatorCore
    from tests.helpers import toy_snapshot

    cfg = CoordinatorConfig(region="r1", coordinator_id="c1", spec=SPEC, full_sync_every=2)
    c = CoordinatorCore(cfg, make_strategy("spin", k=1, timeout_s=None), toy_snapshot(), rng=random.Random(0))
    _pull(c, "late", 0, have=-1)
    _pull(c, "d1", 0, have=-1)
    assert [x.version for x in commits(c.handle(upd("d1", 1, 3.0, base=0)))] == [1]  # partial
    _pull(c, "d1", 2, have=1)
    assert [x.version for x in commits(c.handle(upd("d1", 3, 5.0, base=1)))] == [2]  # the full sync
    assert c.last_full_version == 2
    head = SPEC.group_size("classifier")
    stale_head = Update(device="late", seq=1, model_id="toy", base_version=1, n_samples=1,
                        weights=np.full(head, 9.0, np.float32), group="classifier")
    acts = c.handle(MessageReceived(now=0.0, topic=topics.device_topic("r1", "late", "update"), payload=encode(stale_head)))
    (ack,) = acks(acts)
    assert (ack.status, ack.reason) == ("rejected", "base_rejected") and not commits(acts)
    assert c.counters["reject:base_rejected"] == 1 and c.status().version == 2
    fresh = Update(device="late", seq=2, model_id="toy", base_version=2, n_samples=1,
                   weights=np.full(head, 9.0, np.float32), group="classifier")
    (commit,) = commits(c.handle(MessageReceived(now=0.0, topic=topics.device_topic("r1", "late", "update"), payload=encode(fresh))))
    np.testing.assert_array_equal(commit.weights[SPEC.group_slice("classifier")], 9.0)  # from the current extractor: taken


def _lasp_core(t: int, strategy: str = "spin", **params: object) -> CoordinatorCore:
    import random

    from tests.helpers import toy_snapshot

    cfg = CoordinatorConfig(region="r1", coordinator_id="c1", spec=SPEC, full_sync_every=t)
    return CoordinatorCore(cfg, make_strategy(strategy, **params), toy_snapshot(), rng=random.Random(0))


def test_lasp_refuses_a_whole_model_trained_before_the_last_full_sync_at_a_partial_version() -> None:
    """The whole-model twin of the test above: a straggler sent the whole model to train for a full
    sync that others completed first; its update, from before that sync, reached a partial version
    and its head slice (fit to the extractor the sync replaced) became the head: all 9s. Refused
    there (the device trains again, from the current version); at a full version it is still
    merged whole, as any stale update of the strategy (the extractor it was fit to comes with it)."""
    c = _lasp_core(2, "spin", k=1, timeout_s=None)
    _pull(c, "d1", 0, have=-1)
    assert [x.version for x in commits(c.handle(upd("d1", 1, 3.0, base=0)))] == [1]  # partial
    assert _pull(c, "late", 0, have=1).train_group == "full"  # version 2 is a full sync
    assert _pull(c, "later", 0, have=1).train_group == "full"
    _pull(c, "d1", 2, have=1)
    assert [x.version for x in commits(c.handle(upd("d1", 3, 5.0, base=1)))] == [2]  # the full sync, before them
    assert c.last_full_version == 2 and not c.next_version_is_full()
    head, ext = SPEC.group_slice("classifier"), SPEC.group_slice("extractor")
    acts = c.handle(upd("late", 1, 9.0, base=1))
    (ack,) = acks(acts)
    assert (ack.status, ack.reason) == ("rejected", "base_rejected") and not commits(acts)
    assert c.counters["reject:base_rejected"] == 1 and c.counters["accepted"] == 2
    assert c.status().version == 2 and c.status().buffered == 0
    # trained again from the current version (its extractor: the one the head is fit to) it is taken
    assert _pull(c, "late", 2, have=1).version == 2
    (commit,) = commits(c.handle(upd("late", 3, 9.0, base=2)))
    assert commit.version == 3 and not commit.metadata["full_sync"]
    np.testing.assert_array_equal(commit.weights[head], 9.0)
    np.testing.assert_array_equal(commit.weights[ext], 5.0)
    # at the full sync (version 4) a whole model from before the last one (2) is merged whole
    (commit,) = commits(c.handle(upd("later", 1, 7.0, base=1)))
    assert commit.version == 4 and commit.metadata["full_sync"]
    np.testing.assert_array_equal(commit.weights, 7.0)
    assert c.counters["reject:base_rejected"] == 1


class _MergeAt(Peering):
    """A peering that commits ``model`` at ``at`` (a peer merge, e.g. Spyker's on its token):
    a full sync that does not consume the core's buffer."""

    name = "merge-at"

    def __init__(self, at: float, value: float) -> None:
        self.at: float | None = at
        self.value = value

    def wake_at(self) -> float | None:
        return self.at

    def on_timer(self, view: object, now: float) -> PeerPlan:
        self.at = None
        return PeerPlan(merged=np.full(SPEC.size, self.value, np.float32))


def _head_update(device: str, seq: int, value: float, base: int) -> MessageReceived:
    msg = Update(device=device, seq=seq, model_id="toy", base_version=base, n_samples=1,
                 weights=np.full(SPEC.group_size("classifier"), value, np.float32), group="classifier")
    return MessageReceived(now=0.0, topic=topics.device_topic("r1", device, "update"), payload=encode(msg))


@pytest.mark.parametrize("whole", [False, True])
def test_lasp_leaves_out_an_update_a_peer_merge_overtook_in_the_buffer(whole: bool) -> None:
    """A peer merge is a full sync (a new extractor) that leaves the buffer in place: an update
    accepted before it (a head fit to the extractor it replaced; or a whole model, when the merge
    made the next version partial) reached the next partial version: its head became the head
    (all 9s). Left out of that version, consumed by it, counted; the one from after the merge is
    taken. Without a merge in between nothing is left out (the test's second half)."""
    import random

    from tests.helpers import toy_snapshot

    cfg = CoordinatorConfig(region="r1", coordinator_id="c1", spec=SPEC, full_sync_every=3)
    merge = _MergeAt(at=10.0, value=5.0)
    # from version 2 the next is a full sync (devices train the whole model for it); from 0 a partial one
    c = CoordinatorCore(cfg, make_strategy("spin", k=2, timeout_s=None), toy_snapshot(2 if whole else 0),
                        rng=random.Random(0), peering=merge)
    head, ext = SPEC.group_slice("classifier"), SPEC.group_slice("extractor")
    base = c.status().version
    assert _pull(c, "old", 0, have=base).train_group == ("full" if whole else "classifier")
    acts = c.handle(upd("old", 1, 9.0, base=base) if whole else _head_update("old", 1, 9.0, base=base))
    assert acks(acts)[0].status == "accepted" and c.status().buffered == 1
    (merged,) = commits(c.handle(TimerFired(now=10.0)))  # the peer merge: a full sync
    assert merged.version == base + 1 and c.last_full_version == base + 1 and not c.next_version_is_full()
    assert _pull(c, "new", 0, have=base + 1).train_group == "classifier"
    (commit,) = commits(c.handle(_head_update("new", 1, 2.0, base=base + 1)))
    assert commit.version == base + 2 and not commit.metadata["full_sync"]
    np.testing.assert_array_equal(commit.weights[head], 2.0)  # the old code: 5.5 (the mean with 9)
    np.testing.assert_array_equal(commit.weights[ext], 5.0)
    assert set(commit.consumed) == {("old", 1), ("new", 1)} and commit.applied_changed == {"old": 1, "new": 1}
    assert c.counters["lasp_dropped_stale"] == 1 and commit.metadata["lasp_dropped"] == 1
    assert commit.metadata["n_updates"] == 1 and commit.metadata["devices"] == ["new"]
    # the same two updates with no merge between them: both taken (at a partial version: a head is
    # refused at a full round, so past one with whole models first)
    v = c.status().version
    if c.next_version_is_full():
        c.handle(upd("old", 2, 5.0, base=v))
        c.handle(upd("new", 2, 5.0, base=v))
        v = c.status().version
    assert not c.next_version_is_full()
    _pull(c, "old", 3, have=v)
    _pull(c, "new", 3, have=v)
    c.handle(_head_update("old", 4, 9.0, base=v))
    (commit,) = commits(c.handle(_head_update("new", 4, 2.0, base=v)))
    np.testing.assert_array_equal(commit.weights[head], 5.5)
    assert c.counters["lasp_dropped_stale"] == 1 and "lasp_dropped" not in commit.metadata


@pytest.mark.parametrize("combine", ["models", "deltas"])
def test_lasp_a_head_trained_for_a_partial_version_is_refused_at_the_full_sync_after_it(combine: str) -> None:
    """helper-138's probe (T = 2, SPIN K = 2): a straggler's head, trained from version 0 for partial
    version 1, reached the buffer of full sync 2 with a whole model: version 2 was extractor 5 with
    the straggler's head 9 (models: a slice overwrites the whole models' mean) or 14 (deltas: both
    mean changes added), a head fit to the extractor that very sync replaced. Now refused at
    receipt (base_rejected): the device trains the whole model for the full sync, and is taken."""
    c = _lasp_core(2, "spin", k=2, timeout_s=None, combine=combine, clip_multiplier=0.0)
    for device in ("d0", "d1", "slow"):
        assert _pull(c, device, 1, have=-1).train_group == "classifier"  # version 1 is partial
    c.handle(_head_update("d0", 2, 1.0, base=0))
    (v1,) = commits(c.handle(_head_update("d1", 2, 1.0, base=0)))
    assert v1.version == 1 and not v1.metadata["full_sync"] and c.next_version_is_full()
    assert _pull(c, "d3", 1, have=-1).train_group == "full"
    assert not commits(c.handle(upd("d3", 2, 5.0, base=1)))
    acts = c.handle(_head_update("slow", 2, 9.0, base=0))
    (ack,) = acks(acts)
    assert (ack.status, ack.reason) == ("rejected", "base_rejected") and not commits(acts)  # old: accepted
    assert c.counters["reject:base_rejected"] == 1 and c.status().buffered == 1 and c.version == 1
    again = _pull(c, "slow", 3, have=1)
    assert (again.version, again.train_group) == (1, "full")
    (v2,) = commits(c.handle(upd("slow", 4, 7.0, base=1)))
    assert v2.version == 2 and v2.metadata["full_sync"]
    np.testing.assert_array_equal(v2.weights, 6.0)  # the whole models' mean: extractor and head
    assert "lasp_dropped" not in v2.metadata


@pytest.mark.parametrize("combine", ["models", "deltas"])
@pytest.mark.parametrize("case", ["lasp-off", "restart"])
def test_a_full_version_with_whole_models_leaves_out_a_head_only_update(combine: str, case: str) -> None:
    """What the receipt check cannot see: a head-only update taken from the extractor the coordinator
    holds (base = the current version) and a whole model in the buffer of one full version. With
    LASP off (T = 0, a device told to train the head before a restart) or after a restart under
    another T that makes the next version full (T = 3 -> 5: 5 is full), the version was extractor 5
    with the head 9 (models) or 1 + 4 + 8 = 13 (deltas): the head fit to the extractor this version
    replaces. Left out, consumed and counted (lasp_dropped_stale); the version is the whole model."""
    import random

    from coordinator.strategies.base import BufferedUpdate

    held = BufferedUpdate(device="d1", seq=1, base_version=4, staleness=0, n_samples=1,
                          weights=np.full(SPEC.group_size("classifier"), 9.0, np.float32), group="classifier")
    restart = case == "restart"
    snap = Snapshot(version=4, weights=np.full(SPEC.size, 1.0, np.float32), last_full_version=3 if restart else 4,
                    buffer=(held,) if restart else ())
    cfg = CoordinatorConfig(region="r1", coordinator_id="c1", spec=SPEC, full_sync_every=5 if restart else 0)
    c = CoordinatorCore(cfg, make_strategy("spin", k=2, timeout_s=None, combine=combine, clip_multiplier=0.0),
                        snap, rng=random.Random(0))
    assert c.next_version_is_full()
    if not restart:
        (ack,) = acks(c.handle(_head_update("d1", 1, 9.0, base=4)))
        assert ack.status == "accepted"  # T = 0: a head from the current extractor is taken at receipt
    assert c.status().buffered == 1
    (commit,) = commits(c.handle(upd("d2", 1, 5.0, base=4)))
    assert commit.version == 5 and commit.metadata["full_sync"]
    np.testing.assert_array_equal(commit.weights, 5.0)  # old: head 9 (models) / 13 (deltas)
    assert set(commit.consumed) == {("d1", 1), ("d2", 1)} and commit.applied_changed == {"d1": 1, "d2": 1}
    assert c.counters["lasp_dropped_stale"] == 1 and commit.metadata["lasp_dropped"] == 1
    assert commit.metadata["n_updates"] == 1 and commit.metadata["devices"] == ["d2"]
    # a head alone at a full version keeps the extractor it was fit to: taken (T = 0)
    if not restart:
        (commit,) = commits(c.handle(_head_update("d1", 2, 2.0, base=5)) + c.handle(_head_update("d3", 1, 4.0, base=5)))
        np.testing.assert_array_equal(commit.weights[SPEC.group_slice("classifier")], 3.0)
        np.testing.assert_array_equal(commit.weights[SPEC.group_slice("extractor")], 5.0)
        assert c.counters["lasp_dropped_stale"] == 1


def test_lasp_a_version_whose_every_update_predates_the_extractor_changes_nothing() -> None:
    """All of the buffer left out (a peer merge overtook it, then the timeout closed the round):
    a version with the current weights consumes it (durably: the registry drops its files)."""
    import random

    from tests.helpers import toy_snapshot

    cfg = CoordinatorConfig(region="r1", coordinator_id="c1", spec=SPEC, full_sync_every=3)
    c = CoordinatorCore(cfg, make_strategy("spin", k=2, timeout_s=30.0), toy_snapshot(), rng=random.Random(0),
                        peering=_MergeAt(at=10.0, value=5.0))
    c.handle(_head_update("old", 1, 9.0, base=0))
    (merged,) = commits(c.handle(TimerFired(now=10.0)))
    (commit,) = commits(c.handle(TimerFired(now=30.0)))
    assert commit.version == merged.version + 1 and not commit.metadata["full_sync"]
    np.testing.assert_array_equal(commit.weights, merged.weights)
    assert commit.consumed == (("old", 1),) and commit.metadata["lasp_dropped"] == 1 and commit.metadata["n_updates"] == 0
    assert c.status().buffered == 0 and c.status().extra["lasp_dropped_stale"] == 1


def test_lasp_leaves_out_a_conversion_a_full_sync_overtook() -> None:
    """A whole model parked for conversion at a full round, converted to the version before the
    full sync that others' updates committed meanwhile: at the next (partial) version only its
    head was taken, fit to the old extractor. Left out, consumed, counted."""
    import random

    from coordinator.core import UpdateConverted
    from tests.helpers import toy_snapshot

    cfg = CoordinatorConfig(region="r1", coordinator_id="c1", spec=SPEC, full_sync_every=4)
    strategy = make_strategy("spin", k=2, timeout_s=None, clip_multiplier=0, sample_weight_cap=0,
                             staleness="gradient-inversion", convert_beyond=2)
    c = CoordinatorCore(cfg, strategy, toy_snapshot(), rng=random.Random(0))
    for seq in range(3):  # partial versions 1-3
        c.handle(_head_update("f1", seq, 1.0, base=c.version))
        c.handle(_head_update("f2", seq, 1.0, base=c.version))
    assert c.version == 3 and c.next_version_is_full()
    (req,) = [a for a in c.handle(upd("slow", 0, 9.0, base=0)) if isinstance(a, ConvertUpdate)]  # staleness 3 > 2
    assert req.target_version == 3
    c.handle(upd("a", 0, 4.0, base=3))
    (full,) = commits(c.handle(upd("b", 0, 4.0, base=3)))
    assert full.version == 4 and full.metadata["full_sync"] and c.last_full_version == 4
    c.handle(UpdateConverted(now=1.0, ticket=req.ticket, weights=np.full(SPEC.size, 9.0, np.float32), elapsed_s=1.0))
    assert [(u.device, u.base_version) for u in c.buffer] == [("slow", 3)]
    (commit,) = commits(c.handle(_head_update("c", 0, 2.0, base=4)))
    assert commit.version == 5 and not commit.metadata["full_sync"]
    np.testing.assert_array_equal(commit.weights[SPEC.group_slice("classifier")], 2.0)
    np.testing.assert_array_equal(commit.weights[SPEC.group_slice("extractor")], 4.0)
    assert ("slow", 0) in commit.consumed and c.counters["lasp_dropped_stale"] == 1


def test_lasp_a_restart_under_another_schedule_leaves_out_what_the_new_one_makes_partial() -> None:
    """A whole model from before the last full sync, accepted for a full version (T = 2: 4) and
    persisted; the coordinator restarts with T = 5, where version 4 is partial: its head alone
    was taken. Left out, consumed; the update from the current extractor is taken."""
    import random

    from coordinator.strategies.base import BufferedUpdate

    held = BufferedUpdate(device="old", seq=1, base_version=1, staleness=2, n_samples=1,
                          weights=np.full(SPEC.size, 9.0, np.float32))
    snap = Snapshot(version=3, weights=np.full(SPEC.size, 5.0, np.float32), last_full_version=2, buffer=(held,))
    cfg = CoordinatorConfig(region="r1", coordinator_id="c1", spec=SPEC, full_sync_every=5)
    c = CoordinatorCore(cfg, make_strategy("spin", k=2, timeout_s=None), snap, rng=random.Random(0))
    assert c.status().buffered == 1 and not c.next_version_is_full()
    (commit,) = commits(c.handle(_head_update("new", 1, 2.0, base=3)))
    assert commit.version == 4 and not commit.metadata["full_sync"]
    np.testing.assert_array_equal(commit.weights[SPEC.group_slice("classifier")], 2.0)  # the old code: 5.5
    np.testing.assert_array_equal(commit.weights[SPEC.group_slice("extractor")], 5.0)
    assert set(commit.consumed) == {("old", 1), ("new", 1)} and c.counters["lasp_dropped_stale"] == 1


def test_a_restart_without_lasp_still_refuses_a_head_trained_before_the_last_full_sync() -> None:
    """LASP switched off at a restart (T = 3 → 0): a device told to train the head before it still
    sends a classifier-only update. Every version is a full sync now; one from the extractor the
    coordinator holds is taken as before, one from before a later version's extractor overwrote
    the new head (all 9s) and is refused (base_rejected), as with LASP on."""
    import random

    snap = Snapshot(version=3, weights=np.full(SPEC.size, 5.0, np.float32), last_full_version=2)
    cfg = CoordinatorConfig(region="r1", coordinator_id="c1", spec=SPEC, full_sync_every=0)
    c = CoordinatorCore(cfg, make_strategy("spin", k=1, timeout_s=None), snap, rng=random.Random(0))
    (commit,) = commits(c.handle(_head_update("d1", 1, 2.0, base=2)))  # partial version 3 kept extractor 2
    assert commit.version == 4 and commit.metadata["full_sync"] and c.last_full_version == 4
    np.testing.assert_array_equal(commit.weights[SPEC.group_slice("classifier")], 2.0)
    (commit,) = commits(c.handle(upd("d2", 1, 4.0, base=4)))
    assert commit.version == 5
    acts = c.handle(_head_update("d3", 1, 9.0, base=3))
    (ack,) = acks(acts)
    assert (ack.status, ack.reason) == ("rejected", "base_rejected") and not commits(acts)
    assert c.status().version == 5 and c.counters["reject:base_rejected"] == 1


def test_lasp_a_restart_past_unreadable_versions_leaves_out_a_head_trained_on_one_of_them() -> None:
    """The registry could not read versions 3-4 (full sync 3 among them) and resumed from 2: a
    head accepted from version 4, fit to full sync 3's extractor (lost), was restored into the
    buffer and put onto version 2's extractor (all 9s over the head). Its extractor is unknown
    here: left out, consumed, counted; the whole model from version 2 gives the head of version 5,
    a partial version (T = 3: the number the commit gets, above the skipped ones, decides)."""
    import random

    from coordinator.strategies.base import BufferedUpdate

    held = BufferedUpdate(device="old", seq=1, base_version=4, staleness=0, n_samples=1,
                          weights=np.full(SPEC.group_size("classifier"), 9.0, np.float32), group="classifier")
    snap = Snapshot(version=2, weights=np.full(SPEC.size, 5.0, np.float32), last_full_version=0, version_floor=4,
                    buffer=(held,))
    cfg = CoordinatorConfig(region="r1", coordinator_id="c1", spec=SPEC, full_sync_every=3)
    c = CoordinatorCore(cfg, make_strategy("spin", k=2, timeout_s=None), snap, rng=random.Random(0))
    assert c.status().buffered == 1
    (commit,) = commits(c.handle(upd("new", 1, 3.0, base=2)))
    assert commit.version == 5 and not commit.metadata["full_sync"]
    np.testing.assert_array_equal(commit.weights[SPEC.group_slice("classifier")], 3.0)  # 939c318: not the held head 9
    np.testing.assert_array_equal(commit.weights[SPEC.group_slice("extractor")], 5.0)  # version 5 was merged whole (3) before the schedule fix
    assert set(commit.consumed) == {("old", 1), ("new", 1)} and c.counters["lasp_dropped_stale"] == 1


@pytest.mark.parametrize(("restored", "floor", "due_full"), [(3, 5, True), (5, 6, False)])
def test_lasp_the_schedule_after_unreadable_versions_is_the_number_the_commit_gets(
        restored: int, floor: int, due_full: bool) -> None:
    """The registry resumed from ``restored`` past unreadable versions up to ``floor``: the next
    commit is numbered floor + 1 (never reusing one), and whether it is a full sync is that
    number's (T = 3: 6 full, 7 partial), not restored + 1's. The old code published version 6 (from
    3) as a partial version (the extractor kept, devices told to train the head) where a full sync
    was due, and version 7 (from 5) as a full sync where a partial one was: the train group sent,
    the merge and last_full_version followed restored + 1 (4: partial; 6: full)."""
    import random

    snap = Snapshot(version=restored, weights=np.full(SPEC.size, 5.0, np.float32), last_full_version=3,
                    version_floor=floor)
    cfg = CoordinatorConfig(region="r1", coordinator_id="c1", spec=SPEC, full_sync_every=3)
    c = CoordinatorCore(cfg, make_strategy("spin", k=1, timeout_s=None), snap, rng=random.Random(0))
    assert _pull(c, "d1", 0, have=-1).train_group == ("full" if due_full else "classifier")
    (commit,) = commits(c.handle(upd("d1", 1, 2.0, base=restored)))
    assert commit.version == floor + 1 and commit.metadata["full_sync"] is due_full
    head, ext = SPEC.group_slice("classifier"), SPEC.group_slice("extractor")
    np.testing.assert_array_equal(commit.weights[head], 2.0)
    np.testing.assert_array_equal(commit.weights[ext], 2.0 if due_full else 5.0)
    assert c.last_full_version == (floor + 1 if due_full else 3)


def test_an_early_timer_wake_up_re_arms_the_same_deadline() -> None:
    c = make_coordinator(k=10, timeout_s=5.0)
    (timer,) = [a for a in c.handle(upd("d1", 0, 2.0, now=1.0)) if isinstance(a, ScheduleTimer)]
    early = c.handle(TimerFired(now=timer.at - 0.001))  # the driver's wait returned a hair early
    assert [a.at for a in early if isinstance(a, ScheduleTimer)] == [timer.at]
    assert commits(c.handle(TimerFired(now=timer.at)))


def test_an_update_is_checked_for_its_norm_in_the_same_pass_as_for_nan() -> None:
    """check_update: NaN and Inf are NonFiniteWeights (as from check), a finite vector whose
    norm exceeds MAX_UPDATE_NORM is WeightsOutOfRange, anything a model really holds passes."""
    from edge_sdk.errors import NonFiniteWeights, WeightsOutOfRange
    from edge_sdk.spec import MAX_UPDATE_NORM

    ok = np.full(SPEC.size, 1e3, np.float32)
    assert SPEC.check_update(ok) is ok
    for bad in (np.nan, np.inf, -np.inf):
        w = ok.copy()
        w[7] = bad
        with pytest.raises(NonFiniteWeights):
            SPEC.check_update(w)
    at_limit = np.zeros(SPEC.size, np.float32)
    at_limit[0] = MAX_UPDATE_NORM * 0.999
    SPEC.check_update(at_limit)
    at_limit[1] = MAX_UPDATE_NORM * 0.1
    with pytest.raises(WeightsOutOfRange, match="exceeds"):
        SPEC.check_update(at_limit)
    with pytest.raises(WeightsOutOfRange, match="overflows float32"):
        SPEC.check_update(np.full(SPEC.size, 3e38, np.float32))


def test_a_refused_message_shows_its_device_seen_but_not_the_version_it_claims() -> None:
    """Presence: a refused pull (another model) still says the device is alive, but the
    version it claims to run is taken only from a message the coordinator accepted (the
    status used to show whatever a refused message claimed: hostile-input audit)."""
    c = make_coordinator("spin", k=2, timeout_s=5.0)
    topic = topics.device_topic("r1", "d1", "pull")
    acts = c.handle(MessageReceived(now=1.0, topic=topic, payload=encode(Pull(device="d1", seq=0, model_id="other", have_version=10**6))))
    assert c.counters["reject:unknown_model"] == 1
    (answer,) = [decode(a.payload) for a in acts if isinstance(a, Publish) and a.topic == topics.device_topic("r1", "d1", "ack")]  # answered (helper-92), not left to time out
    assert isinstance(answer, Ack) and (answer.device, answer.seq, answer.status, answer.reason) == ("d1", 0, "rejected", "unknown_model")
    assert c.presence["d1"] == (None, 1.0, -1)  # seen at 1.0; no version claimed by an accepted message
    c.handle(MessageReceived(now=2.0, topic=topic, payload=encode(Pull(device="d1", seq=1, model_id="toy", have_version=0))))
    assert c.presence["d1"] == (None, 2.0, 0)
    c.handle(MessageReceived(now=3.0, topic=topic, payload=encode(Pull(device="d1", seq=2, model_id="other", have_version=7))))
    assert c.presence["d1"] == (None, 3.0, 0)


def test_retained_presence_at_start_is_no_sighting() -> None:
    """After a restart (or a reconnect: helper-87) every device's retained presence arrives at once:
    status showed every stopped device "last seen" then (helper-85). A first presence leaves last
    seen unknown, a repeat changes nothing; a change of a device already known, or any message
    from it, is a sighting."""
    c = make_coordinator("spin", k=2, timeout_s=5.0)
    presence = topics.device_topic("r1", "d1", "presence")
    c.handle(MessageReceived(now=100.0, topic=presence, payload=b"offline"))  # retained, delivered at (re)start
    assert c.presence["d1"] == (False, None, -1)
    (row,) = c.status().extra["devices"]
    assert row["last_seen"] is None and row["online"] is False
    c.handle(MessageReceived(now=130.0, topic=presence, payload=b"online"))  # heard live: it connected now
    assert c.presence["d1"] == (True, 130.0, -1)
    c.handle(MessageReceived(now=5000.0, topic=presence, payload=b"online"))  # the same again: a reconnect's retained copy
    assert c.presence["d1"] == (True, 130.0, -1)
    c.handle(MessageReceived(now=131.0, topic=topics.device_topic("r1", "d1", "pull"),
                             payload=encode(Pull(device="d1", seq=0, model_id="toy", have_version=0))))
    assert c.presence["d1"] == (True, 131.0, 0)


def test_a_state_dir_restarted_under_another_peering_says_so_and_does_not_read_its_state(tmp_path: Path) -> None:
    """helper-88: a state dir made with spyker restarted with --peering nebula resumed silently,
    handing Spyker's checkpoint (its 'round', …) to NebulaFL's restore. Commits now record the
    peering's name; another one's state is not restored, and the start says so once."""
    import random

    from coordinator.core import CoordinatorConfig, CoordinatorCore, Notify

    cfg = CoordinatorConfig(region="r1", coordinator_id="c1", spec=SPEC)

    def core(peer_name: str | None) -> CoordinatorCore:
        snap = Snapshot(version=3, weights=np.zeros(SPEC.size, np.float32), peer_state={"round": 7}, peer_name=peer_name)
        return CoordinatorCore(cfg, make_strategy("spin", k=1, timeout_s=None), snap, rng=random.Random(0))

    def changed(c: CoordinatorCore, now: float) -> list[dict[str, object]]:
        return [dict(a.data) for a in c.start(now) if isinstance(a, Notify) and a.kind == "peering_changed"]

    other = core("spyker")
    assert changed(other, 0.0) == [{"was": "spyker", "now": "none"}] and changed(other, 1.0) == []
    assert changed(core("none"), 0.0) == [] and changed(core(None), 0.0) == []  # the same, or a state dir from before
    (commit,) = commits(other.handle(upd("d1", 0, 1.0, base=3)))
    assert commit.metadata["peering_name"] == "none"
    from coordinator.registry import Registry  # and the registry gives it back at the next start

    reg = Registry(tmp_path / "s", SPEC)
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    reg.commit(CommitVersion(version=1, weights=np.ones(SPEC.size, np.float32), applied_changed={}, consumed=(),
                             metadata={"peering": {"round": 2}, "peering_name": "spyker"}))
    loaded = reg.load()
    reg.close()
    assert loaded is not None and loaded.peer_name == "spyker" and loaded.peer_state == {"round": 2}


def test_lasp_a_rollback_is_a_full_sync_even_when_the_extractor_is_unchanged() -> None:
    """Pins a conservative choice (see _commit): the gate rejects partial version 2 and rolls back
    to release 1 as version 3; the extractor is the one of full sync 0 throughout, yet version 3
    counts as a full sync, so a head trained from the release (not abandoned, fit to that very
    extractor) is refused and trained again. It refuses more than it must; it never makes a
    model no coordinator built. A head from the rollback itself is taken."""
    import random

    from coordinator.core import CandidateEvaluated
    from coordinator.gate import GateConfig
    from tests.helpers import toy_snapshot

    cfg = CoordinatorConfig(region="r1", coordinator_id="c1", spec=SPEC, full_sync_every=5, gate=GateConfig(paired_z=0.0))
    c = CoordinatorCore(cfg, make_strategy("spin", k=1, timeout_s=None), toy_snapshot(), rng=random.Random(0))
    c.start(0.0)
    assert [x.version for x in commits(c.handle(_head_update("a", 1, 1.0, base=0)))] == [1]
    c.handle(CandidateEvaluated(now=1.0, version=1, candidate_metric=0.9, release_metric=0.5, release_version=0))
    assert [x.version for x in commits(c.handle(_head_update("b", 1, 9.0, base=1)))] == [2]
    (rollback,) = commits(c.handle(CandidateEvaluated(now=2.0, version=2, candidate_metric=0.1, release_metric=0.9,
                                                      release_version=1)))
    ext = SPEC.group_slice("extractor")
    assert rollback.version == 3 and rollback.metadata["source"] == "rollback"
    np.testing.assert_array_equal(rollback.weights[ext], 0.0)  # the extractor of full sync 0, unchanged
    assert c.last_full_version == 3
    (ack,) = acks(c.handle(_head_update("c", 1, 2.0, base=1)))
    assert (ack.status, ack.reason) == ("rejected", "base_rejected")
    (commit,) = commits(c.handle(_head_update("c", 2, 2.0, base=3)))
    assert commit.version == 4 and not commit.metadata["full_sync"]
    np.testing.assert_array_equal(commit.weights[SPEC.group_slice("classifier")], 2.0)


@pytest.mark.parametrize(("leaf", "payload", "reason"), [
    ("presence", b"garbage", "malformed"),
    ("update", b"x" * 2_000_000, "too_large"),
    ("pull", b"\x00junk", "malformed"),
])
def test_a_rejected_message_names_the_device_its_topic_names(leaf: str, payload: bytes, reason: str) -> None:
    """A presence payload that is neither online nor offline, an update over the size cap and bytes
    that do not decode were rejected with ``device: None`` (the device was taken from the decoded
    message's topic only after decoding): the daemon's log could not say whose message it was, and
    grouped every such rejection under its detail text."""
    c = make_coordinator("fedavg", select=1, min_devices=1)
    c.start(0.0)
    actions = c.handle(MessageReceived(now=1.0, topic=topics.device_topic("r1", "d7", leaf), payload=payload))
    (rejected,) = [a.data for a in actions if isinstance(a, Notify) and a.kind == "rejected"]
    assert rejected["reason"] == reason and rejected["device"] == "d7", rejected
    assert not [a for a in actions if isinstance(a, Publish) and a.topic.endswith("/ack")]  # its seq is unknown: no ack
