"""Strategies: the maths (table-driven, pure) and the plan decisions, through CoordinatorCore."""

from __future__ import annotations

import argparse
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from coordinator.methods import make_method
from coordinator.peering.spyker import SpykerPeering
from coordinator.strategies import make_strategy, strategy_names
from coordinator.strategies.base import BufferedUpdate, Plan, ReadOnlyView
from coordinator.strategies.fedasync import fedasync_mix, mixing_weight
from coordinator.strategies.fedavg import FedAvgConfig, FedAvgStrategy
from coordinator.strategies.fedbuff import FedBuffConfig, FedBuffStrategy, draw_round
from coordinator.strategies.port import PortStrategy, port_weights, update_similarity
from coordinator.strategies.staleness import (
    Convert,
    Damp,
    Drop,
    Use,
    make_policy,
    needs_driver,
    policy_of,
    staleness_factor,
)
from edge_sdk.core.events import MessageReceived, Publish
from edge_sdk.errors import ConfigError
from edge_sdk.spec import ModelSpec, Vector
from edge_sdk.wire import topics
from edge_sdk.wire.codec import decode, encode
from edge_sdk.wire.messages import Ack, Invite, ModelMsg, Pull, Update
from tests.helpers import SPEC, Link, make_coordinator


def upd(device: str, value: float | Vector, *, base: int = 0, n: int = 1, seq: int = 0, version: int | None = None) -> BufferedUpdate:
    weights = value if isinstance(value, np.ndarray) else np.full(SPEC.size, value, dtype=np.float32)
    stale = 0 if version is None else version - base
    return BufferedUpdate(device=device, seq=seq, base_version=base, staleness=stale, n_samples=n, weights=weights)


@dataclass
class FakeView:
    """A working CoordinatorView for direct plan/aggregate tests (what CoordinatorCore exposes)."""

    version: int = 0
    weights: Vector = field(default_factory=lambda: np.zeros(SPEC.size, dtype=np.float32))
    buffer: Sequence[BufferedUpdate] = ()
    devices_seen: Sequence[str] = ()
    deferred: Mapping[str, float] = field(default_factory=dict)
    last_aggregation_at: float = 0.0
    first_buffered_at: float | None = None
    history: dict[int, Vector] = field(default_factory=dict)
    spec: ModelSpec = SPEC

    def weights_at(self, version: int) -> Vector | None:
        return self.history.get(version)


def pull_event(device: str, seq: int, now: float = 0.0, invite_round: int = -1) -> MessageReceived:
    msg = Pull(device=device, seq=seq, model_id="toy", n_samples=3, invite_round=invite_round)
    return MessageReceived(now=now, topic=topics.device_topic("r1", device, "pull"), payload=encode(msg))


def update_event(device: str, seq: int, value: float, *, base: int = 0, n: int = 1, now: float = 0.0) -> MessageReceived:
    msg = Update(device=device, seq=seq, model_id="toy", base_version=base, n_samples=n, weights=np.full(SPEC.size, value, dtype=np.float32))
    return MessageReceived(now=now, topic=topics.device_topic("r1", device, "update"), payload=encode(msg))


def sent(actions: Sequence[object], leaf: str) -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    for a in actions:
        if isinstance(a, Publish) and a.topic.endswith("/" + leaf):
            out.append((topics.parse(a.topic).device, decode(a.payload)))
    return out


# ------------------------------------------------------------------ registry


def test_every_strategy_is_registered_and_validates_its_parameters() -> None:
    assert {"spin", "spin-notimeout", "fedbuff", "port", "fedasync", "fedavg"} <= set(strategy_names())
    for name in strategy_names():
        assert make_strategy(name).name == name
    bad_params: list[tuple[str, dict[str, Any]]] = [("fedbuff", {"k": 0}), ("fedasync", {"alpha": 1.5}), ("port", {"staleness_bound": 0}),
                      ("fedavg", {"select": 0}), ("fedbuff", {"nonsense": 1})]
    for name, bad in bad_params:
        with pytest.raises(ConfigError):
            make_strategy(name, **bad)


# ------------------------------------------------------------------ FedAsync


@pytest.mark.parametrize(("tau", "alpha", "a", "expected"), [
    (0, 0.6, 0.5, 0.6),
    (3, 0.6, 0.5, 0.3),
    (8, 1.0, 0.5, 1 / 3),
    (5, 0.4, 0.0, 0.4),
    (-2, 0.5, 0.5, 0.5),  # a negative staleness is treated as fresh
])
def test_fedasync_mixing_weight(tau: int, alpha: float, a: float, expected: float) -> None:
    assert mixing_weight(tau, alpha, a) == pytest.approx(expected)


def test_fedasync_mixes_sequentially_with_growing_staleness() -> None:
    current = np.zeros(SPEC.size, dtype=np.float32)
    out = fedasync_mix(current, 4, [upd("a", 1.0, base=4), upd("b", 1.0, base=4)], SPEC, alpha=0.5, a=0.5)
    first = 0.5  # τ = 0
    w2 = 0.5 * 2**-0.5  # mixed into version 5 → τ = 1
    np.testing.assert_allclose(out, first + w2 * (1 - first), rtol=1e-6)
    assert current.max() == 0.0, "the current vector is never modified"


def test_fedasync_makes_a_version_per_update_through_the_core() -> None:
    c = make_coordinator("fedasync", alpha=0.5, a=0.5)
    c.handle(update_event("d1", 0, 1.0, base=0))
    assert c.version == 1
    np.testing.assert_allclose(c.weights, 0.5)
    c.handle(update_event("d2", 0, 1.0, base=0))  # started from version 0: τ = 1
    assert c.version == 2
    np.testing.assert_allclose(c.weights, 0.5 + 0.5 * 2**-0.5 * 0.5, rtol=1e-6)
    assert dict(c.staleness_hist) == {0: 1, 1: 1}


def test_the_staleness_histogram_stays_small_whatever_the_bases() -> None:
    # Observed: one device sending 5,000 updates, each from another old version, made 5,001
    # histogram keys and a 56.8 KB retained status (devices refuse one over 64 KiB).
    from edge_sdk.core.device import MAX_STATUS_BYTES
    from edge_sdk.wire.codec import status_json

    c = make_coordinator(k=1, timeout_s=None)
    for i in range(1300):
        c.handle(update_event("honest", i, 0.0, base=c.version))
    for i in range(1200):  # staleness 100 + 2i: every one different
        c.handle(update_event("evil", i, 0.0, base=1200 - i))
    assert len(c.staleness_hist) <= 1001
    assert c.staleness_hist[1000] == 750  # 1,000 or more versions behind
    assert len(status_json(c.status())) < MAX_STATUS_BYTES // 4  # at most 1,001 keys


# ------------------------------------------------------------------ PORT


@pytest.mark.parametrize(("update", "base", "current", "expected"), [
    ([2.0, 0.0], [1.0, 0.0], [3.0, 0.0], 1.0),   # moved the way the global model moved
    ([0.0, 0.0], [1.0, 0.0], [3.0, 0.0], -1.0),  # moved against it
    ([1.0, 1.0], [1.0, 0.0], [3.0, 0.0], 0.0),   # orthogonal
    ([1.0, 0.0], [1.0, 0.0], [3.0, 0.0], 1.0),   # did not move: neutral
    ([5.0, 5.0], None, [3.0, 0.0], 1.0),         # base no longer retained: neutral
])
def test_port_similarity(update: list[float], base: list[float] | None, current: list[float], expected: float) -> None:
    def arr(v: list[float]) -> Vector:
        return np.array(v, dtype=np.float32)

    assert update_similarity(arr(update), None if base is None else arr(base), arr(current)) == pytest.approx(expected)


def test_port_weights_favour_fresh_and_similar_updates() -> None:
    base = np.zeros(SPEC.size, dtype=np.float32)
    current = np.ones(SPEC.size, dtype=np.float32)  # the global model moved by +1 since version 0
    fresh = [upd("a", 1.0, base=3, n=1), upd("b", 1.0, base=3, n=3)]
    assert port_weights(current, 3, fresh, [None, None], SPEC) == pytest.approx([0.25, 0.75])  # fresh: ∝ n
    aligned, opposed = upd("a", 2.0, base=0), upd("b", -1.0, base=0)
    p = port_weights(current, 3, [aligned, opposed], [base, base], SPEC)
    # raw: (1+1)/2 + 10/13 vs (1−1)/2 + 10/13
    r1, r2 = 1.0 + 10 / 13, 10 / 13
    assert p == pytest.approx([r1 / (r1 + r2), r2 / (r1 + r2)])
    staler = port_weights(current, 30, [upd("a", 2.0, base=29), upd("b", 2.0, base=0)], [None, None], SPEC)
    assert staler[0] > staler[1]


def test_port_aggregates_through_the_core_with_the_version_history() -> None:
    strategy = PortStrategy()
    view = FakeView(version=2, weights=np.ones(SPEC.size, dtype=np.float32), history={0: np.zeros(SPEC.size, dtype=np.float32)})
    out = strategy.aggregate(view, [upd("a", 2.0, base=0, version=2), upd("b", -1.0, base=0, version=2)])
    r1, r2 = 1.0 + 10 / 12, 10 / 12
    np.testing.assert_allclose(out, (2.0 * r1 - 1.0 * r2) / (r1 + r2), rtol=1e-6)


# ------------------------------------------------------------------ FedBuff


@pytest.mark.parametrize(("candidates", "population", "slots", "max_drawn"), [
    (["a", "b", "c"], 100, 20, 3),
    (["a", "b", "c"], 3, 2, 2),
    (["a", "b"], 1, 5, 2),   # population below the devices seen: the seen ones count
    ([], 100, 20, 0),
])
def test_draw_round(candidates: list[str], population: int, slots: int, max_drawn: int) -> None:
    for seed in range(20):
        drawn = draw_round(candidates, population, slots, random.Random(seed))
        assert len(set(drawn)) == len(drawn) <= max_drawn
        assert set(drawn) <= set(candidates)
    if population <= len(candidates):
        assert len(draw_round(candidates, population, slots, random.Random(0))) == min(slots, len(candidates))


def test_draw_round_selects_about_s_over_n_of_the_known_devices() -> None:
    rng = random.Random(1)
    hits = sum(len(draw_round(["a"], 100, 20, rng)) for _ in range(4000))
    assert 0.17 < hits / 4000 < 0.23


@pytest.mark.parametrize(("k", "buffered", "in_flight", "aggregate"), [
    (3, 3, 1, True),    # K reached
    (3, 2, 1, False),   # waiting for the device still training
    (3, 1, 0, True),    # strict_k=False: fewer than K had data, nobody left training: close the round
    (3, 0, 0, False),   # nothing to aggregate
])
def test_fedbuff_aggregation_decision(k: int, buffered: int, in_flight: int, aggregate: bool) -> None:
    strategy = FedBuffStrategy(FedBuffConfig(k=k, select=5, strict_k=False))
    strategy.in_flight = {f"t{i}": 0.0 for i in range(in_flight)}
    view = FakeView(buffer=[upd(f"d{i}", 1.0) for i in range(buffered)], devices_seen=[f"d{i}" for i in range(5)])
    assert strategy.plan(view, 1.0, random.Random(0)).aggregate is aggregate


def test_fedbuff_defers_pulls_and_invites_only_deferred_devices() -> None:
    c = make_coordinator("fedbuff", k=2, select=3)
    invited: list[str] = []
    deferred_before: set[str] = set()
    for i in range(6):
        deferred_before |= set(c.deferred)
        actions = c.handle(pull_event(f"d{i}", 0, now=float(i)))
        for _device, ack in sent(actions, "ack"):
            assert isinstance(ack, Ack) and ack.status == "deferred"
        for device, msg in sent(actions, "invite"):
            assert isinstance(msg, Invite)
            assert device in deferred_before | {f"d{i}"}, "invited a device that is not waiting"
            invited.append(device)
        assert not sent(actions, "model"), "FedBuff never serves an unselected pull"
    assert 1 <= len(invited) <= 3 and len(set(invited)) == len(invited)
    # An invited device pulls again with its invite round and is always served.
    served = c.handle(pull_event(invited[0], 1, now=10.0, invite_round=1))
    ((device, model),) = sent(served, "model")
    # (replies are shared bytes: reply_to = -1 "answers your pull", see CoordinatorCore._model_reply)
    assert device == invited[0] and isinstance(model, ModelMsg) and model.version == c.version


def test_fedbuff_serves_a_retried_pull_of_a_device_in_flight() -> None:
    """The invitation is used up by the first pull it answers; a device whose model reply was lost
    sends the same pull again (same seq, same invite round) and is served again, then its update is
    accepted. Without that the retry was deferred, and a strict-K round waited on it for good
    (prior review: no test covered FedBuffStrategy.serve_pull's in-flight branch)."""
    c = make_coordinator("fedbuff", k=2, select=1, population=2)
    invited: list[str] = []
    for i in range(2):
        invited += [device for device, _ in sent(c.handle(pull_event(f"d{i}", 0, now=float(i))), "invite")]
    (device,) = invited
    other = "d1" if device == "d0" else "d0"
    first = c.handle(pull_event(device, 1, now=5.0, invite_round=1))
    assert [d for d, _ in sent(first, "model")] == [device]
    retried = c.handle(pull_event(device, 1, now=10.0, invite_round=1))  # the reply was lost: the same pull again
    assert [d for d, _ in sent(retried, "model")] == [device] and not sent(retried, "ack")
    assert c.counters["pulls_served"] == 2
    (ack,) = [m for _, m in sent(c.handle(pull_event(other, 1, now=11.0)), "ack")]
    assert isinstance(ack, Ack) and ack.status == "deferred"  # a device not in flight still waits for a draw
    (ack,) = [m for _, m in sent(c.handle(update_event(device, 2, 1.0, now=12.0)), "ack")]
    assert isinstance(ack, Ack) and ack.status == "accepted"


def test_fedbuff_with_population_counts_unseen_devices_as_drawn_without_data() -> None:
    # One known device in a population of 1000: it is drawn (and invited) about 1 time in 1000.
    invited = 0
    for seed in range(300):
        strategy = FedBuffStrategy(FedBuffConfig(k=2, select=1, population=1000))
        invited += len(strategy.plan(FakeView(devices_seen=["a"], deferred={"a": 5.0}), 5.0, random.Random(seed)).invite)
    assert invited <= 3
    # An empty round is redrawn only when a device asks after the draw.
    strategy2 = FedBuffStrategy(FedBuffConfig(k=2, select=1, population=10**6))
    rng = random.Random(0)
    first = strategy2.plan(FakeView(devices_seen=["a"], deferred={"a": 1.0}), 1.0, rng)
    assert first == Plan() and strategy2.round == 1
    strategy2.plan(FakeView(devices_seen=["a"], deferred={"a": 1.0}), 2.0, rng)
    assert strategy2.round == 1, "no new pull, no redraw"
    view = FakeView(devices_seen=["a"], deferred={"a": 3.0})
    assert not strategy2.serve_pull(view, "a", 3.0)  # the pull the core then defers (at 3.0), as it asks first
    strategy2.plan(view, 3.0, rng)
    assert strategy2.round == 2


def test_fedbuff_strict_k_carries_a_short_round_into_the_next_draw() -> None:
    strategy = FedBuffStrategy(FedBuffConfig(k=3, select=1, strict_k=True))
    rng = random.Random(0)
    plan = strategy.plan(FakeView(devices_seen=["a", "b"], deferred={"a": 0.0, "b": 0.0}), 0.0, rng)
    (first,) = plan.invite
    update = upd(first, 1.0)
    strategy.on_update(FakeView(), update, 5.0)
    nxt = strategy.plan(FakeView(devices_seen=["a", "b"], buffer=[update], deferred={"b": 0.0} if first == "a" else {"a": 0.0}), 5.0, rng)
    assert not nxt.aggregate and strategy.round == 2, "strict K: no aggregation below K, a new draw instead"


@pytest.mark.parametrize("strategy", ["fedbuff", "port"])
def test_fedbuff_never_deadlocks_when_fewer_than_k_selected_devices_have_data(strategy: str) -> None:
    # strict_k=False (the pre-issue-16 default); strict K waits for K by design (tests/test_reproductions.py)
    link = Link(coordinator=make_coordinator(strategy, k=10, select=20, strict_k=False))
    for i in range(3):
        link.add_device(f"d{i}", min_samples=1, seed=i)
        link.add_sample(f"d{i}", 1, at=0.1 * i)
    link.run_until(5_000.0)
    assert link.commits, "a round with fewer than K participants must still aggregate"
    assert sum(c.metadata["n_updates"] for c in link.commits) == 3
    assert not link.coordinator.buffer
    for core in link.devices.values():
        assert core.state.trained_upto == 1 and core.state.phase.value == "idle"


@pytest.mark.parametrize(("late_join", "joins"), [(True, True), (False, False)])
def test_fedbuff_a_drawn_device_without_data_joins_only_with_late_join(late_join: bool, joins: bool) -> None:
    strategy = FedBuffStrategy(FedBuffConfig(k=5, select=2, late_join=late_join))
    rng = random.Random(0)
    # Both known devices are drawn (select = population = 2); only "a" is waiting with data.
    plan = strategy.plan(FakeView(devices_seen=["a", "b"], deferred={"a": 0.0}), 0.0, rng)
    assert plan.invite == ("a",) and set(strategy.in_flight) == {"a"}
    # "b" gets data mid-round and pulls: served only with late_join; never invited later.
    assert strategy.serve_pull(FakeView(), "b", 1.0) is joins
    later = strategy.plan(FakeView(devices_seen=["a", "b"], deferred={} if joins else {"b": 1.0}), 1.0, rng)
    assert later.invite == ()
    assert ("b" in strategy.in_flight) is joins
    assert strategy.serve_pull(FakeView(), "c", 1.0) is False


def test_fedbuff_forgets_a_vanished_device_when_configured() -> None:
    strategy = FedBuffStrategy(FedBuffConfig(k=3, select=3, forget_after_s=100.0, strict_k=False))
    view = FakeView(devices_seen=["a", "b"], deferred={"a": 0.0, "b": 0.0})
    plan = strategy.plan(view, 0.0, random.Random(0))
    assert set(plan.invite) == {"a", "b"} and plan.wake_at == 100.0
    after = FakeView(devices_seen=["a", "b"], buffer=[upd("a", 1.0)])
    strategy.on_update(after, after.buffer[0], 50.0)
    assert strategy.plan(after, 60.0, random.Random(0)).aggregate is False
    assert strategy.plan(after, 100.0, random.Random(0)).aggregate is True


# ------------------------------------------------------------------ FedAvg


def test_fedavg_round_table() -> None:
    s = FedAvgStrategy(FedAvgConfig(select=2, min_devices=2))
    rng = random.Random(0)
    assert s.plan(FakeView(deferred={"a": 0.0}), 0.0, rng) == Plan()  # too few waiting
    p = s.plan(FakeView(deferred={"a": 0.0, "b": 0.0, "c": 0.0}), 1.0, rng)
    assert len(p.invite) == 2 and set(p.invite) == s.participants and s.round == 1
    first, second = sorted(p.invite)
    assert s.serve_pull(FakeView(), first, 2.0) and not s.serve_pull(FakeView(), "zzz", 2.0)
    s.on_update(FakeView(), upd(first, 1.0), 3.0)
    assert s.plan(FakeView(buffer=[upd(first, 1.0)]), 3.0, rng) == Plan()  # still waiting for one
    s.on_update(FakeView(), upd(second, 1.0), 4.0)
    assert s.plan(FakeView(buffer=[upd(first, 1.0), upd(second, 1.0)]), 4.0, rng).aggregate


def test_fedavg_rounds_are_synchronous_through_the_core() -> None:
    link = Link(coordinator=make_coordinator("fedavg", select=3))
    for i in range(6):
        link.add_device(f"d{i}", min_samples=1, seed=i)
        link.add_sample(f"d{i}", 1, at=0.5 * i)
        link.add_sample(f"d{i}", 2, at=30.0 + i)
    link.run_until(10_000.0)
    assert link.commits
    assert all(u.staleness == 0 for u in link.coordinator.buffer)
    assert set(link.coordinator.staleness_hist) == {0}, "synchronous rounds never produce stale updates"
    assert all(c.metadata["n_updates"] <= 3 for c in link.commits)
    assert sum(c.metadata["n_updates"] for c in link.commits) == link.coordinator.counters["accepted"]
    for core in link.devices.values():
        assert core.state.trained_upto == 2


# ------------------------------------------------------------------ fold on arrival, through the core


@pytest.mark.parametrize(("name", "params"), [
    ("spin", {"k": 3, "timeout_s": 5.0}),
    ("fedbuff", {"k": 3, "select": 4}),
    ("port", {"k": 3, "select": 4}),
    ("fedavg", {"select": 3}),
])
def test_averaging_strategies_fold_on_arrival_and_match_the_reference(name: str, params: dict[str, Any]) -> None:
    from coordinator.strategies.aggregate import fedavg

    link = Link(coordinator=make_coordinator(name, clip_multiplier=0.0, sample_weight_cap=0.0, **params))
    for i in range(6):
        link.add_device(f"d{i}", min_samples=1, seed=i)
        link.add_sample(f"d{i}", 1, at=0.3 * i)
        link.add_sample(f"d{i}", 2, at=20.0 + i)
    link.run_until(5_000.0)
    robust = getattr(link.coordinator.strategy, "robust")  # noqa: B009
    assert len(link.commits) >= 2
    assert robust.rebuilds == 0, "every trigger used the fold built as the updates arrived"
    if name == "port":
        return  # PORT's weights need the version history; tests/test_robust.py compares them
    persisted = {p.update.key: p.update for p in link.persisted}
    previous = np.zeros(SPEC.size, dtype=np.float32)
    for commit in link.commits:
        used = [persisted[key] for key in commit.consumed]
        np.testing.assert_allclose(commit.weights, fedavg(previous, used, SPEC), rtol=2e-6, atol=1e-7)
        previous = commit.weights


# ------------------------------------------------------------------ staleness policies


@pytest.mark.parametrize(
    ("name", "params", "tau", "factor"),
    [
        ("none", {}, 7, 1.0),
        ("damped", {"a": 0.5}, 3, 0.5),
        ("damped", {"a": 1.0}, 0, 1.0),
        ("drop-beyond", {"bound": 2}, 2, 1.0),
        ("drop-beyond", {"bound": 2}, 3, None),
        ("damped", {"a": 0.5, "bound": 2}, 3, None),  # a bound wraps any policy
    ],
)
def test_staleness_policies_by_name(name: str, params: dict[str, Any], tau: int, factor: float | None) -> None:
    assert staleness_factor(make_policy(name, **params), tau) == factor


def test_staleness_policies_reject_bad_names_and_unconverted_updates_fall_back_to_damping() -> None:
    with pytest.raises(ConfigError, match=re.escape("unknown staleness policy 'gradient-inversions' (did you mean 'gradient-inversion'?); known")):
        make_policy("gradient-inversions")
    with pytest.raises(ConfigError, match="needs a bound"):
        make_policy("drop-beyond")
    with pytest.raises(ConfigError, match="convert_beyond"):
        make_policy("gradient-inversion", convert_beyond=-1)
    gi = make_policy("gradient-inversion", convert_beyond=4, a=0.5)
    assert needs_driver(gi) and not needs_driver(make_policy("damped"))
    assert gi.judge(4) == Damp(5 ** -0.5)  # at the bound: damped, not converted
    assert gi.judge(8) == Convert("gradient-inversion", 9 ** -0.5)
    # An update that reaches a strategy unconverted (deadline missed, restart) is damped.
    assert staleness_factor(gi, 8) == pytest.approx(1 / 3)
    bounded = make_policy("dc-asgd", convert_beyond=2, bound=6)
    assert staleness_factor(bounded, 7) is None and bounded.judge(3) == Convert("dc-asgd", 0.5)


def test_every_damping_strategy_obeys_its_staleness_policy() -> None:
    """Same stale update, policy none vs drop-beyond: dropped means the model is unchanged."""
    current = np.zeros(SPEC.size, dtype=np.float32)
    stale = [upd("a", 1.0, base=0)]
    for name in ("fedasync", "spin", "nebula"):
        kept = make_strategy(name, staleness="none")
        dropped = make_strategy(name, staleness="drop-beyond", max_staleness=1)
        view = FakeView(version=5, weights=current)
        assert not np.allclose(_aggregate(kept, view, stale), current), name
        np.testing.assert_array_equal(_aggregate(dropped, view, stale), current, err_msg=name)
    # damped sits between: FedAsync with α = 1 moves by exactly s(5) = 6^-0.5 of the gap
    out = _aggregate(make_strategy("fedasync", alpha=1.0, staleness="damped", a=0.5), FakeView(version=5, weights=current), stale)
    np.testing.assert_allclose(out, np.full(SPEC.size, 6 ** -0.5), rtol=1e-6)


def _aggregate(strategy: Any, view: Any, updates: Sequence[BufferedUpdate]) -> Vector:
    for u in updates:
        strategy.on_update(view, u, 0.0)
    return np.asarray(strategy.aggregate(view, updates))


# ------------------------------------------------------------------ methods


def test_a_strategy_that_shares_state_always_gets_its_peering() -> None:
    lone = make_method("spyker", coordinator_id="a")
    assert isinstance(lone.peering, SpykerPeering) and lone.peering.ledger is lone.strategy.ledger  # type: ignore[attr-defined]
    # The lr decay reaches devices and the age ledger is checkpointed without --peering.
    for _ in range(5):
        lone.strategy.on_update(FakeView(version=0, weights=np.zeros(SPEC.size, np.float32)), upd("busy", 0.0), 0.0)
    lone.strategy.on_update(FakeView(version=0, weights=np.zeros(SPEC.size, np.float32)), upd("idle", 0.0), 0.0)
    assert lone.peering.hints_for("busy")["lr"] < 0.05 and lone.peering.hints_for("idle") == {}
    tallies = lone.peering.take_tallies()  # stored with the next commit (the checkpoint holds the ages)
    assert tallies is not None and dict(tallies.changed) == {"busy": 5, "idle": 1}
    with pytest.raises(ConfigError, match="shares its state with peering 'spyker'"):
        make_method("spyker", peering="nebula")
    with pytest.raises(ConfigError, match="needs strategy 'nebula'"):
        make_method("spin", peering="nebula")
    assert make_method(peering="hierfavg").strategy.name == "hierfavg"


def test_method_params_go_to_the_side_that_knows_them() -> None:
    m = make_method("nebula", params={"planets": 2, "t_c": 5.0})
    assert m.strategy.config.t_c == 5.0 and m.peering.config.t_c == 5.0  # type: ignore[attr-defined]
    m = make_method("spyker", params={"eta": 0.3, "phi": 2.0})
    assert m.strategy.config.eta == 0.3 and m.peering.config.phi == 2.0  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match=r"known parameters: .*timeout_s"):
        make_method("spin", params={"phi": 2.0})


def test_generic_param_flags_reach_strategy_and_peering(tmp_path: Any) -> None:
    from coordinator import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--state-dir", str(tmp_path), "--strategy", "spyker", "--param", "eta=0.3",
                              "--param", "phi=2", "--param", "h_inter=none", "--eta-a", "0.5"])
    opts = cli.options_from(args)
    assert opts.peering == "spyker", "--strategy spyker brings its peering"
    assert opts.strategy_params["eta"] == 0.3 and opts.peering_params == {"eta_a": 0.5, "phi": 2, "h_inter": None}
    assert cli.parse_params(["k=10", "timeout_s=1.5", "combine=deltas", "x=true"]) == {
        "k": 10, "timeout_s": 1.5, "combine": "deltas", "x": True}
    with pytest.raises(ConfigError, match="NAME=VALUE"):
        cli.parse_params(["k"])
    bad = parser.parse_args(["--state-dir", str(tmp_path), "--strategy", "spyker", "--peering", "nebula"])
    with pytest.raises(ConfigError, match="shares its state"):
        cli.options_from(bad)


def test_the_read_only_view_hands_out_nothing_writable() -> None:
    core = make_coordinator("spin", k=2)
    view = ReadOnlyView(core)
    assert view.version == core.version and view.spec is core.spec
    with pytest.raises(ValueError, match="read-only"):
        view.weights[0] = 1.0
    assert not hasattr(view, "handle") and not hasattr(view, "strategy")
    assert isinstance(view.buffer, tuple) and isinstance(view.deferred, Mapping)
    with pytest.raises(TypeError):
        view.deferred["d"] = 0.0  # type: ignore[index]  # read-only, not a copy (helper-111)


def test_the_core_can_ask_any_strategy_for_its_staleness_policy() -> None:
    assert policy_of(make_strategy("fedasync", a=1.0)).judge(3) == Damp(0.25)
    assert policy_of(make_strategy("spin", max_staleness=2)).judge(3) == Drop("stale")
    assert policy_of(make_strategy("fedbuff")).judge(50) == Use()
    assert policy_of(object()).judge(50) == Use()


def test_fedbuff_forgets_a_straggler_at_the_wake_up_it_asked_for() -> None:
    """`now - since >= limit` can be false at `now = since + limit` in floating point, which
    asked for the same wake-up forever; the straggler must be gone at that very time."""
    strategy = make_strategy("fedbuff", k=2, select=2, forget_after_s=30.0)
    since = 4072.33431645668  # (since + 30) - since < 30 in floating point
    assert (since + 30.0) - since < 30.0
    strategy.in_flight["slow"] = since
    wake = strategy._forget_stragglers(since + 1.0)
    assert wake == since + 30.0 and "slow" in strategy.in_flight
    assert strategy._forget_stragglers(wake) is None and not strategy.in_flight


def test_strategies_name_the_devices_a_round_waits_for() -> None:
    """fedadam / fedopt with their default select = 20 and fewer devices never made a version."""
    assert make_strategy("fedadam").devices_per_round() == (20, "select")
    assert make_strategy("fedopt", select=5, population=8).devices_per_round() == (8, "population")
    assert make_strategy("fedavg").devices_per_round() is None  # min_devices 1: a round starts with one
    assert make_strategy("fedavg", min_devices=4).devices_per_round() == (4, "min_devices")
    assert make_strategy("hfedms", population=12).devices_per_round() == (12, "population")
    assert make_strategy("hfedms").devices_per_round() is None
    for name in ("spin", "fedbuff", "fedasync", "port"):  # a timeout, or a buffer carried across draws
        assert make_strategy(name).devices_per_round() is None


def test_a_device_in_flight_across_a_fedbuff_restart_trains_its_samples_again_and_gets_through() -> None:
    """The restarted coordinator did not serve it (``not_selected``): its samples are trained
    again once it is drawn, not dropped."""
    link = Link(coordinator=make_coordinator("fedbuff", k=1, select=1, population=1), train_seconds=5.0)
    link.add_device("d0", min_samples=1)
    link.add_sample("d0", 1, at=0.0)
    link.run_until(2.0)  # invited, served, training
    assert link.devices["d0"].state.phase.name == "TRAINING" and not link.commits
    link.restart(make_coordinator("fedbuff", k=1, select=1, population=1))
    link.run_until(200.0)
    core = link.devices["d0"]
    assert core.state.counters.get("retrain:not_selected") == 1
    assert link.coordinator.counters["reject:not_selected"] == 1 and len(link.commits) == 1
    assert core.state.trained_upto == 1 and core.state.updates_acked == 1
