"""HFedMS's chains against failing steps and restarts, through a real core (helper-167).

A chain waits for one device at a time. A step that never came back (its update refused, its device
gone, its invitation lost) stalled the chain for ever: no version, no other device invited. And the
round's state (position, start model, group results) was not kept across a restart: the next round
started from the intermediate chain model the line held."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.core import (
    CoordinatorConfig,
    CoordinatorCore,
    MessageReceived,
    Snapshot,
    TimerFired,
)
from coordinator.strategies import make_strategy
from coordinator.strategies.base import StaticView
from coordinator.strategies.hfedms import HFedMSConfig, HFedMSStrategy
from edge_sdk.core.events import Publish
from edge_sdk.errors import ConfigError
from edge_sdk.wire import topics
from edge_sdk.wire.codec import decode, encode
from edge_sdk.wire.messages import Ack, Update
from tests.helpers import SIGNER, SPEC
from tests.test_restart_state import Node
from tests.test_rollback_state import ChainFleet, vec

FAULTS = ["nan", "too_many_samples", "wrong_shape", "seq_jump", "offline", "invite_lost"]


def chains(**kw: Any) -> tuple[ChainFleet, HFedMSStrategy]:
    """One round of 2 chains of 2 (fixed groups) over devices a-d; an honest step adds 1, so every
    chain makes 2s from the round's 0s and so does the round's mean."""
    s = make_strategy("hfedms", **{"beta": 2, "kappa": 1.0, "population": 4, "regroup_every": 100, "rounds": 1, **kw})
    assert isinstance(s, HFedMSStrategy)
    cfg = CoordinatorConfig(region="r1", coordinator_id="c1", spec=SPEC, signer=SIGNER)
    return ChainFleet(CoordinatorCore(cfg, s, Snapshot(version=0, weights=vec(0.0)), rng=random.Random(0)), "abcd"), s


def fail(fleet: ChainFleet, device: str, fault: str, *, pull_again: bool = True) -> None:
    """``device`` answers its invitation with ``fault`` (and, but offline or not ``pull_again``,
    pulls again: deferred)."""
    if fault == "offline":
        fleet.invite.pop(device)  # gone: never pulls, never sends
        return
    if fault == "invite_lost":
        fleet.invite.pop(device)
        fleet.pull(device)  # its periodic pull, no invitation in it: deferred
        return
    fleet.pull(device)
    base, weights = fleet.held.pop(device)
    w, n, seq = (weights + 1.0).astype(np.float32), 10, fleet.seq[device] + 1
    if fault == "nan":
        w[0] = np.nan
    elif fault == "too_many_samples":
        n = 10**9
    elif fault == "wrong_shape":
        w = w[:-1]
    elif fault == "seq_jump":
        seq += 10**6
    fleet.seq[device] += 1
    acts = fleet._send(device, Update(device=device, seq=seq, model_id="toy", base_version=base, n_samples=n, weights=w))
    (ack,) = [decode(a.payload) for a in acts if isinstance(a, Publish) and a.topic.endswith("/ack")]
    assert isinstance(ack, Ack) and ack.status == "rejected", ack
    if pull_again:
        fleet.pull(device)


def run_until_round_ends(fleet: ChainFleet, s: HFedMSStrategy, bad: str, fault: str, horizon_s: float) -> tuple[float, float] | None:
    """Every minute: each invited device steps at once (``bad`` fails again, the same way, except a
    lost invitation, which was lost once), every waiting device pulls again, timers fire. The virtual
    seconds until the chain's first version and until the round ended, or None if it had not by
    ``horizon_s``."""
    start, before, moved = fleet.now, len(fleet.commits), None
    while fleet.now - start < horizon_s:
        for _ in range(50):
            if not fleet.invite or s.round >= 1:
                break
            device = sorted(fleet.invite)[0]
            if device == bad and fault != "invite_lost":
                fail(fleet, device, fault)
            else:
                fleet.step(device)
            if moved is None and len(fleet.commits) > before:
                moved = fleet.now - start
        if s.round >= 1:
            assert moved is not None
            return moved, fleet.now - start
        fleet.now += 60.0
        fleet.take(fleet.core.handle(TimerFired(now=fleet.now)))
        for device in sorted(fleet.core.deferred):
            fleet.pull(device)  # a deferred device announces its pull again
    return None


@pytest.mark.parametrize("fault", FAULTS)
def test_a_chain_step_that_fails_is_invited_again_then_given_to_another_device(fault: str) -> None:
    """The old code: no version and no invitation in 3 hours after the first step failed, whatever
    the failure (the chain waited for its device for ever). Now a refused step or a lost invitation
    is invited again once, and a step refused again or not back within ``step_timeout_s`` goes to
    another waiting device; the round ends on the honest chains' 2s, nothing applied twice."""
    fleet, s = chains()
    (bad,) = fleet.invite
    fail(fleet, bad, fault)
    before = len(fleet.commits)
    took = run_until_round_ends(fleet, s, bad, fault, horizon_s=3 * 3600.0)
    assert took is not None, f"stalled: {len(fleet.commits) - before} versions, invited {sorted(fleet.invite)}"
    moved, ended = took
    assert float(fleet.commits[-1].weights[0]) == 2.0 and s.chain_breaks == 0
    d = s.describe()
    if fault == "invite_lost":
        assert d["reinvited"] == 1 and "reassigned" not in d and moved < 60.0
    elif fault == "offline":  # the floor, 300 s (steps took 0.2 s): the next minute's timer
        assert d["timed_out"] == 1 and d["reassigned"] == 1 and 300.0 <= moved <= 360.0
    else:
        assert d["reinvited"] == 1 and d["reassigned"] == 1 and "timed_out" not in d and moved < 1.0
    assert ended - moved < 60.0


def test_a_step_back_after_its_timeout_is_not_applied() -> None:
    """The invited device was served, went quiet past the timeout and sends its update after the
    step was given to another device: the core accepts it (it was served), the chain ignores it."""
    fleet, s = chains(step_timeout_s=120.0)
    (bad,) = fleet.invite
    fleet.pull(bad)  # served version 0, then silent
    fleet.now += 121.0
    fleet.take(fleet.core.handle(TimerFired(now=fleet.now)))
    (sub,) = fleet.invite
    assert sub != bad and s.describe()["timed_out"] == 1
    assert fleet.step(sub) == "accepted"
    assert fleet.train(bad) == "accepted"  # late: accepted by the core (it was served), buffered
    while s.round < 1:
        fleet.step(s.expecting)
    # chain 1's first step (sub's), its end (the reset to 0s), chain 2's first step, the round's mean
    # of the chains' 2s: the late 1s + 1 was consumed with chain 1's second step, not applied
    assert [float(c.weights[0]) for c in fleet.commits] == [1.0, 0.0, 1.0, 2.0]
    assert s.ignored == 1 and s.chain_breaks == 0


def test_step_timeout_is_validated_and_defaults_to_a_bound() -> None:
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError):
            HFedMSConfig(step_timeout_s=bad)
    with pytest.raises(ConfigError):
        HFedMSConfig(step_retries=-1)
    s = HFedMSStrategy()
    assert s.step_timeout() == 300.0  # no step seen: the floor
    s._longest_step = 100.0
    assert s.step_timeout() == 1000.0  # 10 x the longest step seen
    assert HFedMSStrategy(HFedMSConfig(step_timeout_s=42.0)).step_timeout() == 42.0


# --------------------------------------------------------------------------- restarts


class DurableFleet(ChainFleet):
    """A :class:`ChainFleet` whose core's actions are made durable by a real registry (``Node``)."""

    def __init__(self, node: Node, devices: str, seq: dict[str, int] | None = None) -> None:
        self.node = node
        self._seq0 = seq or {}
        super().__init__(node.core, devices)

    def pull(self, device: str) -> list[object]:
        if device in self._seq0:  # the devices' counters go on across the coordinator's restart
            self.seq[device] = self._seq0.pop(device)
        return super().pull(device)

    def _send(self, device: str, msg: Any) -> list[object]:
        self.now += 0.1
        leaf = "update" if isinstance(msg, Update) else "pull"
        topic = topics.device_topic("r1", device, leaf)
        return self.take(self.node.handle(MessageReceived(now=self.now, topic=topic, payload=encode(msg))))


@pytest.mark.parametrize("steps_before", [1, 2, 3])
def test_a_restart_mid_round_resumes_the_round(tmp_path: Path, steps_before: int) -> None:
    """1-3 of the round's 4 steps, a restart, the rest. The old code forgot the round: the next
    regrouped (4 chains of 1: the second regroup's M), started from whatever the line held (a chain
    step's 1s, or the reset's 0s with chain 1's 2s lost) and took 4 more steps: 2s, 1s, 2s for 1, 2,
    3 steps before. Now the round resumes where it was: only its remaining steps, its model 2s."""
    cfg = CoordinatorConfig(region="r1", coordinator_id="c1", spec=SPEC, signer=SIGNER)

    def build() -> tuple[Any, Any]:
        return make_strategy("hfedms", beta=2, kappa=1.0, population=4, regroup_every=100, rounds=1), None

    node = Node(tmp_path / "s", cfg, build, init=True)
    node.start(0.0)
    fleet = DurableFleet(node, "abcd")
    s = node.core.strategy
    assert isinstance(s, HFedMSStrategy)
    for _ in range(steps_before):
        assert fleet.step() == "accepted"
    order = [d for chain in s.selected for d in chain]
    node = node.restart()
    s2 = node.core.strategy
    assert isinstance(s2, HFedMSStrategy)
    fleet = DurableFleet(node, "abcd", seq=dict(fleet.seq))  # the devices pull again
    assert s2.in_round and [d for chain in s2.selected for d in chain] == order  # the old code: not in a round
    stepped = []
    while s2.round < 1 and len(stepped) < 8:
        (device,) = fleet.invite
        stepped.append(device)
        assert fleet.step(device) == "accepted"
    assert stepped == order[steps_before:]
    np.testing.assert_array_equal(fleet.commits[-1].weights, vec(2.0))
    assert s2.round == 1 and s2.round_versions == [node.core.version] and s2.chain_breaks == 0
    node.registry.close()


def test_a_round_state_from_disk_that_does_not_fit_is_not_resumed() -> None:
    """A damaged or foreign round state: counted, the round is not resumed (nothing else changes)."""
    good = HFedMSStrategy(HFedMSConfig(beta=2, kappa=1.0, population=4))
    good.restore_state({"round": 3, "regroups": 1, "open": {"selected": [["a"]], "chain": 5, "pos": 0}})
    assert (good.round, good.regroups, good.in_round, good.restore_refused) == (3, 1, False, 1)
    for junk in ({"open": "x"}, {"open": {"selected": [[1]], "chain": 0, "pos": 0, "start": "!!"}}, {"open": None}):
        s = HFedMSStrategy()
        s.restore_state(junk)
        assert not s.in_round


def test_a_checkpointed_round_whose_models_are_not_this_spec_is_not_resumed() -> None:
    s = HFedMSStrategy(HFedMSConfig(beta=2, kappa=1.0, population=2))
    s.restore_state({"round": 0, "regroups": 1, "open": {"selected": [["a", "b"]], "chain": 0, "pos": 1, "chain_samples": 10,
                                                         "start": "AAAAAA==", "results": [], "chain_s": 1.0, "round_parallel_s": 0.0}})
    view = StaticView(spec=SPEC, version=3, weights=vec(1.0), deferred={"a": 0.0, "b": 0.0}, devices_seen=("a", "b"))
    s.plan(view, 1.0, random.Random(0))
    assert s.restore_refused == 1 and s.regroups == 2  # not resumed: a round of its own, regrouped


def test_a_device_gone_before_its_turn_holds_the_chain_up_to_the_timeout() -> None:
    """Round 1's first device sends its update and is gone (no pull after it). Round 2 (same
    groups) starts with it: the old code waited for its pull for ever; now the step goes to
    another device once the step timeout (the 300 s floor) has passed since it became due."""
    fleet, s = chains(rounds=2)
    (gone,) = fleet.invite
    fleet.pull(gone)
    base, weights = fleet.held.pop(gone)
    fleet.seq[gone] += 1
    fleet._send(gone, Update(device=gone, seq=fleet.seq[gone], model_id="toy", base_version=base, n_samples=10,
                             weights=(weights + 1.0).astype(np.float32)))
    while s.round < 1:
        fleet.step()
    due_at = fleet.now
    assert s.selected[0][0] == gone and not fleet.invite
    fleet.now = due_at + 299.0
    fleet.take(fleet.core.handle(TimerFired(now=fleet.now)))
    assert not fleet.invite
    fleet.now = due_at + 301.0
    fleet.take(fleet.core.handle(TimerFired(now=fleet.now)))
    (sub,) = fleet.invite
    assert sub != gone and s.describe()["timed_out"] == 1 and s.describe()["reassigned"] == 1
    while s.round < 2:
        fleet.step()
    assert float(fleet.commits[-1].weights[0]) == 4.0 and s.chain_breaks == 0  # round 2: 2s + 2


# --------------------------------------------------------------------------- a step failing mid-chain (helper-172)


@pytest.mark.parametrize("fault", [*FAULTS, "refused_silent"])
def test_a_chain_step_failing_mid_chain_holds_the_chain_at_most_the_step_timeout(fault: str) -> None:
    """The second step of chain 1 (its device continues the first's model) fails: refused (a seq
    jump, a short vector, NaN, n_samples 1e9), its invitation lost, its device gone, or refused and
    then silent (no pull after the refusal, so never back in the waiting set). The chain moves on
    within 1 s (refused: re-invited once, then reassigned), 60 s (lost invitation) or the step
    timeout (300 s floor, the next minute's timer: gone, or refused and silent); the round's model
    is the honest chains' 2s: the step given away continues the first step's model."""
    fleet, s = chains()
    (first,) = fleet.invite
    assert fleet.step(first) == "accepted"
    (bad,) = fleet.invite
    assert s._pos == 1 and bad == s.selected[0][1]
    if fault == "refused_silent":
        fail(fleet, bad, "seq_jump", pull_again=False)
        assert bad not in fleet.core.deferred
    else:
        fail(fleet, bad, fault)
    took = run_until_round_ends(fleet, s, bad, "offline" if fault == "refused_silent" else fault, horizon_s=3 * 3600.0)
    assert took is not None, f"stalled: invited {sorted(fleet.invite)}"
    moved, _ended = took
    assert float(fleet.commits[-1].weights[0]) == 2.0 and s.chain_breaks == 0 and s.round == 1
    d = s.describe()
    if fault == "invite_lost":
        assert d["reinvited"] == 1 and "reassigned" not in d and moved < 60.0
    elif fault in ("offline", "refused_silent"):
        assert d["timed_out"] == 1 and d["reassigned"] == 1 and 300.0 <= moved <= 360.0
    else:
        assert d["reinvited"] == 1 and d["reassigned"] == 1 and "timed_out" not in d and moved < 1.0


def test_a_refused_chain_step_whose_next_pull_is_rate_limited_waits_for_its_retry() -> None:
    """The chain's second device is refused (a seq jump) and its pull after the ack is dropped by
    the rate limit (one pull per 100 s): it is not in the waiting set, so the chain waits (at most
    the step timeout). Its retry once the bucket refills puts it back: invited again, its step
    taken; the round's model is the honest 2s."""
    s = make_strategy("hfedms", beta=2, kappa=1.0, population=4, regroup_every=100, rounds=1)
    assert isinstance(s, HFedMSStrategy)
    cfg = CoordinatorConfig(region="r1", coordinator_id="c1", spec=SPEC, signer=SIGNER, pull_burst=1.0, pull_refill_s=100.0)
    fleet = ChainFleet(CoordinatorCore(cfg, s, Snapshot(version=0, weights=vec(0.0)), rng=random.Random(0)), "abcd")
    (first,) = fleet.invite
    assert fleet.step(first) == "accepted"  # (its own pull after the ack: dropped too, it has no step left)
    (bad,) = fleet.invite
    fail(fleet, bad, "seq_jump")  # ... and its pull after the refusal
    assert fleet.core.counters["reject:rate_limited"] == 2 and bad not in fleet.core.deferred
    fleet.now += 60.0
    fleet.take(fleet.core.handle(TimerFired(now=fleet.now)))
    assert not fleet.invite and s.expecting == bad  # waiting for it (the step timeout is 300 s)
    fleet.now += 60.0  # 120 s after: the bucket holds a token again
    fleet.pull(bad)
    assert list(fleet.invite) == [bad] and s.describe()["reinvited"] == 1
    while s.round < 1:
        assert fleet.step() == "accepted"
    assert float(fleet.commits[-1].weights[0]) == 2.0 and s.chain_breaks == 0 and "timed_out" not in s.describe()
