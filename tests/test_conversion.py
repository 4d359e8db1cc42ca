"""Converting very stale updates (issue 15): the core's park / convert / fall back rules,
DC-ASGD, and the switch back to plain aggregation (E1 vs E2, α blending)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import coordinator.daemon as daemon_module
from coordinator.conversion import ConversionConfig, SwitchTracker, dc_asgd, disparity
from coordinator.core import (
    CommitVersion,
    ConvertUpdate,
    CoordinatorCore,
    PersistUpdate,
    Snapshot,
    UpdateConverted,
)
from coordinator.daemon import CoordinatorDaemon, CoordinatorOptions
from edge_sdk.core.events import MessageReceived, Publish, ScheduleTimer, TimerFired
from edge_sdk.errors import ConfigError
from edge_sdk.tasks import get_task
from edge_sdk.wire import topics
from edge_sdk.wire.codec import encode, parse_status_json
from edge_sdk.wire.messages import Update
from tests.helpers import SPEC, make_coordinator, wait_until
from tests.test_coordinator_core import acks


def upd(device: str, seq: int, value: float, *, base: int, now: float = 0.0) -> MessageReceived:
    msg = Update(device=device, seq=seq, model_id="toy", base_version=base, n_samples=4,
                 weights=np.full(SPEC.size, value, dtype=np.float32))
    return MessageReceived(now=now, topic=topics.device_topic("r1", device, "update"), payload=encode(msg))


def converting_core(policy: str = "gradient-inversion", *, snapshot: Snapshot | None = None,
                    tickets: Iterator[int] | None = None) -> CoordinatorCore:
    """A SPIN core (no clipping) whose staleness policy converts updates staler than 2."""
    c = make_coordinator(k=2, timeout_s=None, snapshot=snapshot, clip_multiplier=0, sample_weight_cap=0,
                         staleness=policy, convert_beyond=2, tickets=tickets)
    start = c.version
    for i in range(4):  # four versions from two fresh devices
        c.handle(upd("fresh", 2 * i, 1.0 + i, base=c.version))
        c.handle(upd("fresh2", 2 * i, 1.0 + i, base=c.version))
    assert c.version == start + 4
    return c


def test_a_very_stale_update_is_made_durable_acked_and_parked_until_converted() -> None:
    c = converting_core()
    acts = c.handle(upd("slow", 0, 9.0, base=0, now=10.0))  # staleness 4 > 2
    kinds = [type(a).__name__ for a in acts]
    assert kinds.index("PersistUpdate") < kinds.index("Publish")  # durable before the ack
    assert [a.status for a in acks(acts)] == ["accepted"]
    (req,) = [a for a in acts if isinstance(a, ConvertUpdate)]
    assert (req.device, req.kind, req.base_version, req.target_version, req.staleness) == ("slow", "gradient-inversion", 0, 4, 4)
    np.testing.assert_array_equal(req.target_weights, c.weights)
    np.testing.assert_array_equal(req.stale_weights, 9.0)
    assert not c.buffer  # parked, not aggregated
    assert any(isinstance(a, ScheduleTimer) and a.at == pytest.approx(10.0 + 60.0) for a in acts)  # deadline armed
    # a retransmission of the parked update is a duplicate (not converted twice)
    assert [a.status for a in acks(c.handle(upd("slow", 0, 9.0, base=0, now=11.0)))] == ["duplicate"]

    converted = np.full(SPEC.size, 5.0, dtype=np.float32)
    c.handle(UpdateConverted(now=12.0, ticket=req.ticket, weights=converted, elapsed_s=2.0))
    (u,) = c.buffer
    assert (u.device, u.seq, u.base_version, u.staleness) == ("slow", 0, 4, 0)  # based on the target version now
    np.testing.assert_allclose(u.weights, 5.0)
    status = c.status().extra["conversion"]
    assert status["policy"] == "gradient-inversion" and status["requested"] == 1 and status["applied"] == 1
    assert status["mode"] == "converting" and status["parked"] == 0


def test_a_conversion_past_its_deadline_falls_back_to_the_damped_update_and_a_late_answer_is_ignored() -> None:
    c = converting_core()
    (req,) = [a for a in c.handle(upd("slow", 0, 9.0, base=0, now=10.0)) if isinstance(a, ConvertUpdate)]
    c.handle(TimerFired(now=69.0))
    assert not c.buffer
    c.handle(TimerFired(now=70.0))  # the deadline: the stale update itself, damped by the strategy
    (u,) = c.buffer
    assert (u.base_version, u.staleness) == (0, 4)
    np.testing.assert_allclose(u.weights, 9.0)
    assert c.counters["conversion_late"] == 1
    c.handle(UpdateConverted(now=71.0, ticket=req.ticket, weights=np.zeros(SPEC.size, dtype=np.float32)))
    assert c.counters["conversion_late_answers"] == 1 and len(c.buffer) == 1  # applied once, not twice


@pytest.mark.parametrize("bad", [None, np.full(SPEC.size, np.nan, dtype=np.float32), np.zeros(3, dtype=np.float32)])
def test_a_failed_or_invalid_conversion_falls_back(bad: object) -> None:
    c = converting_core()
    (req,) = [a for a in c.handle(upd("slow", 0, 9.0, base=0)) if isinstance(a, ConvertUpdate)]
    c.handle(UpdateConverted(now=1.0, ticket=req.ticket, weights=bad))  # type: ignore[arg-type]
    (u,) = c.buffer
    np.testing.assert_allclose(u.weights, 9.0)
    assert c.counters["conversion_failed"] == 1


def test_a_devices_later_updates_queue_behind_its_parked_one_in_seq_order() -> None:
    c = converting_core()  # K = 2: the two released updates make the next version together
    (req,) = [a for a in c.handle(upd("slow", 0, 9.0, base=0)) if isinstance(a, ConvertUpdate)]
    later = c.handle(upd("slow", 1, 7.0, base=4))  # fresh, but must not overtake seq 0
    assert [a.status for a in acks(later)] == ["accepted"] and any(isinstance(a, PersistUpdate) for a in later)
    assert not c.buffer and not [a for a in later if isinstance(a, CommitVersion)]
    acts = c.handle(UpdateConverted(now=1.0, ticket=req.ticket, weights=np.full(SPEC.size, 5.0, dtype=np.float32)))
    (commit,) = [a for a in acts if isinstance(a, CommitVersion)]
    assert commit.consumed == (("slow", 0), ("slow", 1)) and commit.applied_changed["slow"] == 1
    np.testing.assert_allclose(commit.weights, 6.0)  # (5 + 7) / 2: the converted update, then the queued one


def test_an_answer_to_a_rebuilt_cores_ticket_is_not_applied_to_another_devices_update() -> None:
    # The daemon rebuilds its core (storage failure, core error) while the worker converts the
    # old core's request: that answer must not match the new core's own first request. The
    # daemon gives every core it builds one ticket source (the next test).
    tickets = itertools.count(1)
    old = converting_core(tickets=tickets)
    (req_a,) = [a for a in old.handle(upd("devA", 0, 9.0, base=0)) if isinstance(a, ConvertUpdate)]
    new = converting_core(tickets=tickets)
    (req_b,) = [a for a in new.handle(upd("devB", 0, -3.0, base=0)) if isinstance(a, ConvertUpdate)]
    assert req_b.ticket != req_a.ticket
    new.handle(UpdateConverted(now=1.0, ticket=req_a.ticket, weights=np.full(SPEC.size, 5.0, dtype=np.float32)))
    assert not new.buffer and new.counters["conversion_late_answers"] == 1  # devB's update still waits for its own
    new.handle(UpdateConverted(now=2.0, ticket=req_b.ticket, weights=np.full(SPEC.size, -1.0, dtype=np.float32)))
    (u,) = new.buffer
    assert u.device == "devB"
    np.testing.assert_allclose(u.weights, -1.0)


def test_every_core_a_daemon_builds_draws_tickets_from_one_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[dict[str, Any]] = []

    def spy(*args: Any, **kwargs: Any) -> CoordinatorCore:
        built.append(kwargs)
        return CoordinatorCore(*args, **kwargs)

    monkeypatch.setattr(daemon_module, "CoordinatorCore", spy)
    d = CoordinatorDaemon(CoordinatorOptions(broker="mqtt://127.0.0.1:1", region="r", state_dir=tmp_path / "state",
                                             strategy_params={"staleness": "dc-asgd", "convert_beyond": 2}),
                          task=get_task("digits"))
    try:
        snapshot = d.registry.load()
        assert snapshot is not None
        d._build_core(snapshot)  # what a rebuild after a storage failure or a core error calls
    finally:
        d.registry.close()
    assert len(built) == 2 and built[0]["tickets"] is not None and built[0]["tickets"] is built[1]["tickets"]


def test_a_device_flooding_updates_behind_a_conversion_is_deferred_not_buffered() -> None:
    c = converting_core()
    (req,) = [a for a in c.handle(upd("slow", 0, 9.0, base=0)) if isinstance(a, ConvertUpdate)]
    for seq in range(1, 5):  # max_queued = 4 accepted and held behind the parked update
        assert [a.status for a in acks(c.handle(upd("slow", seq, 7.0, base=4)))] == ["accepted"]
    flood = c.handle(upd("slow", 5, 7.0, base=4))
    assert [(a.status, a.reason) for a in acks(flood)] == [("deferred", "converting")]
    assert not any(isinstance(a, PersistUpdate) for a in flood) and c.counters["deferred_converting"] == 1
    c.handle(UpdateConverted(now=1.0, ticket=req.ticket, weights=np.full(SPEC.size, 5.0, dtype=np.float32)))
    assert [a.status for a in acks(c.handle(upd("slow", 5, 7.0, base=4)))] == ["accepted"]  # the retry


def test_a_rollback_takes_parked_updates_with_the_buffer() -> None:
    c = converting_core()
    (req,) = [a for a in c.handle(upd("slow", 0, 9.0, base=0)) if isinstance(a, ConvertUpdate)]
    c._abandon_conversions()
    assert [u.seq for u in c.buffer] == [0] and not c.status().extra["conversion"]["parked"]
    c.handle(UpdateConverted(now=1.0, ticket=req.ticket, weights=np.zeros(SPEC.size, dtype=np.float32)))
    assert len(c.buffer) == 1 and c.counters["conversion_late_answers"] == 1


def test_dc_asgd_is_computed_by_the_core_without_asking_the_driver() -> None:
    c = converting_core("dc-asgd")
    acts = c.handle(upd("slow", 0, 9.0, base=0))
    assert not [a for a in acts if isinstance(a, ConvertUpdate)]
    (u,) = c.buffer
    base, current = np.full(SPEC.size, 0.0, np.float32), c.weights
    assert u.base_version == c.version and u.staleness == 0
    np.testing.assert_allclose(u.weights, dc_asgd(np.full(SPEC.size, 9.0, np.float32), base, current, lr=0.01, lam=0.04), rtol=1e-6)


@pytest.mark.parametrize("policy", ["gradient-inversion", "dc-asgd"])
def test_a_staleness_bound_drops_beyond_it_and_converts_below_it(policy: str) -> None:
    # max_staleness wraps the policy in drop-beyond; the conversion was off altogether then
    # (the wrapper is not asynchronous): every stale update got the damped fallback.
    c = make_coordinator(k=3, timeout_s=None, clip_multiplier=0, sample_weight_cap=0, staleness=policy,
                         convert_beyond=2, max_staleness=5)
    for i in range(6):
        c.handle(upd("fresh", 3 * i, 1.0 + i, base=c.version))
        c.handle(upd("fresh2", 3 * i, 1.0 + i, base=c.version))
        c.handle(upd("fresh3", 3 * i, 1.0 + i, base=c.version))
    assert c.version == 6 and c.conversion_policy == policy
    assert c.status().extra["conversion"]["policy"] == policy
    c.handle(upd("slow", 0, 9.0, base=3))  # staleness 3: converted
    c.handle(upd("old", 0, 9.0, base=0))  # staleness 6 > 5: dropped by the strategy, not converted
    assert c.counters["conversion_requested" if policy == "gradient-inversion" else "conversion_applied"] == 1


def test_a_dc_asgd_conversion_beyond_the_update_norm_bound_falls_back() -> None:
    # DC-ASGD's Δ⊙Δ term squares a change: an admissible update (norm below MAX_UPDATE_NORM) came
    # out with weights of 1e30, past the bound the aggregation's finite arithmetic relies on
    # (unclipped, it made the next version so large every honest update was then out of range).
    from edge_sdk.spec import MAX_UPDATE_NORM

    c = converting_core("dc-asgd")
    value = 0.9 * MAX_UPDATE_NORM / np.sqrt(SPEC.size)
    c.handle(upd("evil", 0, value, base=0))
    assert c.counters["conversion_failed"] == 1 and c.counters["conversion_applied"] == 0
    (u,) = c.buffer
    assert u.base_version == 0 and float(np.linalg.norm(u.weights.astype(np.float64))) <= MAX_UPDATE_NORM  # its own weights, damped


def test_dc_asgd_formula() -> None:
    stale, base, current = (np.array(v, dtype=np.float32) for v in ([1.0, 2.0], [0.5, 1.0], [0.7, 1.5]))
    delta, drift = stale - base, current - base
    expect = current + delta - (0.04 / 0.1) * delta * delta * drift
    np.testing.assert_allclose(dc_asgd(stale, base, current, lr=0.1, lam=0.04), expect, rtol=1e-6)
    np.testing.assert_allclose(dc_asgd(stale, base, base, lr=0.1, lam=0.04), stale)  # no drift: the update as is


def test_updates_below_the_bound_and_partial_groups_are_not_converted() -> None:
    c = converting_core()
    acts = c.handle(upd("ok", 0, 3.0, base=2))  # staleness 2: damped, not converted
    assert not [a for a in acts if isinstance(a, ConvertUpdate)] and len(c.buffer) == 1


def vec(*xs: float) -> np.ndarray:
    return np.array(xs, dtype=np.float32)


def test_the_tracker_switches_when_the_estimate_is_worse_than_the_stale_update_and_blends_down() -> None:
    t = SwitchTracker(ConversionConfig(min_observations=2, window=4, blend_versions=4))
    truth = vec(1.0, 0.0, 0.0)
    # First: estimates closer to the truth than the stale change (E1 < E2): keep converting.
    for i, dev in enumerate(("a", "b")):
        t.record(dev, 10, estimate=vec(0.9, 0.1, 0.0), stale_delta=vec(0.0, 1.0, 0.0))
        assert t.tracking(dev)
        obs = t.observe(dev, 11, truth, version=12 + i)  # based on 11: within the slack of 10
        assert obs is not None and obs.e1_l1 < obs.e2_l1 and obs.e1_cos < obs.e2_cos
        assert not t.tracking(dev)
    assert t.switch_version is None and t.converting(20) and t.alpha(20) == 1.0
    # Then: estimates worse than the stale change, enough to flip both averages over the window.
    for i, dev in enumerate(("c", "d", "e")):
        t.record(dev, 20, estimate=vec(-1.0, 0.0, 1.0), stale_delta=vec(0.95, 0.05, 0.0))
        t.observe(dev, 20, truth, version=30 + i)
    assert t.switch_version is not None
    sv = t.switch_version
    assert [t.alpha(sv + k) for k in range(6)] == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    assert t.converting(sv + 3) and not t.converting(sv + 4)
    np.testing.assert_allclose(t.blend(vec(1.0, 1.0), vec(0.0, 2.0), sv + 1), [0.75, 1.25])
    assert t.describe(sv + 1)["mode"] == "blending" and t.describe(sv + 9)["mode"] == "switched-off"
    restored = SwitchTracker(t.config, t.checkpoint())
    assert restored.switch_version == sv and not restored.converting(sv + 4)


def test_one_device_repeating_its_evidence_is_one_observation_in_the_switch_window() -> None:
    # The device sets its own next update, so E2 is its to choose: its stale change again
    # (E2 = 0 < E1). It used to fill the window alone and switch the region off.
    truth_is_stale = vec(1.0, 0.0, 0.0)
    t = SwitchTracker(ConversionConfig())  # window 10, at least 3
    for cycle in range(10):
        t.record("evil", 10 + cycle, estimate=vec(0.0, 1.0, 0.0), stale_delta=truth_is_stale)
        obs = t.observe("evil", 10 + cycle, truth_is_stale, version=11 + cycle)
        assert obs is not None and obs.e1_l1 > obs.e2_l1 == 0.0 and obs.e1_cos > obs.e2_cos == 0.0
    assert t.switch_version is None and t.describe(30)["observations"] == 1
    # the same evidence from 3 distinct devices still switches
    for i, dev in enumerate(("b", "c")):
        t.record(dev, 30, estimate=vec(0.0, 1.0, 0.0), stale_delta=truth_is_stale)
        t.observe(dev, 30, truth_is_stale, version=31 + i)
    assert t.switch_version == 32
    # a device's latest observation replaces its earlier one, and the window keeps the last `window` devices
    w = SwitchTracker(ConversionConfig(window=2, min_observations=2))
    for dev, e1 in (("a", vec(0.0, 1.0, 0.0)), ("b", vec(1.0, 0.0, 0.0)), ("a", vec(1.0, 0.0, 0.0))):
        w.record(dev, 5, estimate=e1, stale_delta=vec(0.0, 0.0, 1.0))
        w.observe(dev, 5, vec(1.0, 0.0, 0.0), version=6)
    assert w.describe(6)["observations"] == 2 and w.describe(6)["e1_cos"] == 0.0  # a's first (e1_cos 1) is gone
    w.record("c", 5, estimate=vec(1.0, 0.0, 0.0), stale_delta=vec(0.0, 0.0, 1.0))
    w.observe("c", 5, vec(1.0, 0.0, 0.0), version=7)
    assert w.describe(7)["observations"] == 2  # b, the least recent device, left


def test_one_device_choosing_its_next_update_cannot_outweigh_honest_devices() -> None:
    # With one observation per device, a device can still pick the next update that maximises
    # E1 - E2 (its stale change pushed away from the estimate): on an average, that one
    # observation outweighed two honest devices whose estimates beat the stale change.
    t = SwitchTracker(ConversionConfig())
    truth = vec(1.0, 0.0, 0.0)
    for i, dev in enumerate(("h1", "h2")):
        t.record(dev, 10, estimate=vec(0.9, 0.1, 0.0), stale_delta=vec(0.8, 0.3, 0.0))
        t.observe(dev, 10, truth, version=11 + i)
    stale, estimate = vec(0.0, 2.0, 0.0), vec(0.0, 1.6, 0.8)  # inverted at cosine 0.89 to its stale change
    t.record("evil", 12, estimate=estimate, stale_delta=stale)
    obs = t.observe("evil", 12, stale + 10.0 * (stale - estimate), version=13)
    assert obs is not None and obs.e1_cos - obs.e2_cos > 0.1 and obs.e1_l1 > obs.e2_l1
    d = t.describe(13)
    assert d["e1_l1"] > d["e2_l1"] and d["e1_cos"] > d["e2_cos"]  # the averages say switch ...
    assert (d["worse_l1"], d["worse_cos"], d["observations"]) == (1, 1, 3)  # (what the status shows decides)
    assert t.switch_version is None  # ... the median device does not
    for i, dev in enumerate(("evil2", "evil3")):  # a majority of the window's devices does
        t.record(dev, 12, estimate=estimate, stale_delta=stale)
        t.observe(dev, 12, stale + 10.0 * (stale - estimate), version=14 + i)
    assert t.switch_version == 15


def crafted_cycles(c: CoordinatorCore, devices: list[str]) -> None:
    """Each device in turn: a very stale update, converted to an estimate unlike its stale change,
    then its next update, based on the conversion's target, equal to that target plus the stale
    change (E2 = 0 < E1)."""
    for i, dev in enumerate(devices):
        base = c.version - 4  # staleness 4 > convert_beyond 2
        stale_change = np.zeros(SPEC.size, dtype=np.float32)
        stale_change[0] = 1.0
        base_weights = c._history.get(base)
        assert base_weights is not None
        msg = Update(device=dev, seq=2 * i, model_id="toy", base_version=base, n_samples=4, weights=base_weights + stale_change)
        acts = c.handle(MessageReceived(now=float(i), topic=topics.device_topic("r1", dev, "update"), payload=encode(msg)))
        (req,) = [a for a in acts if isinstance(a, ConvertUpdate)]
        estimate = np.zeros(SPEC.size, dtype=np.float32)
        estimate[1] = 1.0
        c.handle(UpdateConverted(now=float(i), ticket=req.ticket, weights=req.target_weights + estimate))
        nxt = Update(device=dev, seq=2 * i + 1, model_id="toy", base_version=req.target_version, n_samples=4,
                     weights=req.target_weights + stale_change)
        acts = c.handle(MessageReceived(now=float(i), topic=topics.device_topic("r1", dev, "update"), payload=encode(nxt)))
        assert [a.status for a in acks(acts)] == ["accepted"]
        assert any(isinstance(a, CommitVersion) for a in acts)  # K = 2: the converted update and this one


def test_one_device_cannot_switch_conversions_off_for_the_region_three_distinct_devices_can() -> None:
    c = converting_core()
    crafted_cycles(c, ["evil"] * 5)  # helper-106's attack: 3 cycles switched the region off
    conv = c.status().extra["conversion"]
    assert conv["mode"] == "converting" and conv["observations"] == 1
    # the next device's very stale update is still converted
    assert [a for a in c.handle(upd("honest", 0, 9.0, base=c.version - 4)) if isinstance(a, ConvertUpdate)]
    three = converting_core()
    crafted_cycles(three, ["d1", "d2", "d3"])
    conv = three.status().extra["conversion"]
    assert conv["mode"] == "blending" and conv["switch_version"] == three.version - 1 and conv["observations"] == 3


def test_the_tracker_ignores_updates_far_from_the_estimates_version_and_bounds_its_memory() -> None:
    t = SwitchTracker(ConversionConfig(max_tracked=2))
    t.record("a", 10, vec(1.0), vec(1.0))
    assert t.observe("a", 20, vec(1.0), version=21) is None and t.tracking("a")  # too far from 10
    t.record("b", 10, vec(1.0), vec(1.0))
    t.record("c", 10, vec(1.0), vec(1.0))
    assert not t.tracking("a") and t.tracking("b") and t.tracking("c")
    small = SwitchTracker(ConversionConfig(max_tracked_bytes=12))  # an entry: 2 vectors of one float32 = 8 bytes
    small.record("a", 10, vec(1.0), vec(1.0))
    small.record("b", 10, vec(1.0), vec(1.0))
    assert not small.tracking("a") and small.tracking("b")  # 8 + 8 bytes would exceed 12
    small.forget("b")
    small.record("c", 10, vec(1.0), vec(1.0))
    assert small.tracking("c")  # forgetting released b's bytes


def test_disparity_and_config_validation() -> None:
    l1, cos = disparity(vec(1.0, 0.0), vec(0.0, 1.0))
    assert l1 == pytest.approx(1.0) and cos == pytest.approx(1.0)
    assert disparity(vec(2.0, 2.0), vec(1.0, 1.0))[1] == pytest.approx(0.0, abs=1e-7)
    for bad in ({"deadline_s": 0}, {"window": 0}, {"dc_lambda": float("nan")}, {"max_tracked": 0}, {"max_queued": -1}):
        with pytest.raises(ConfigError):
            ConversionConfig(**bad)


def test_the_switch_point_survives_a_commit_and_restart() -> None:
    c = converting_core()
    c._switch.switch_version = 3
    c.handle(upd("fresh", 100, 2.0, base=c.version))
    acts = c.handle(upd("fresh2", 100, 2.0, base=c.version))
    (commit,) = [a for a in acts if isinstance(a, CommitVersion)]
    assert commit.metadata["conversion"] == {"switch_version": 3}
    status = parse_status_json(next(a for a in acts if isinstance(a, Publish) and a.retain).payload)
    assert status["extra"]["conversion"]["switch_version"] == 3
    # restarted from that commit: switched off (3 + 5 blend versions < 9), the update is not converted
    again = converting_core(snapshot=Snapshot(version=commit.version, weights=commit.weights,
                                               conversion_state=commit.metadata["conversion"]))
    assert again.status().extra["conversion"]["mode"] == "switched-off"
    assert not [a for a in again.handle(upd("slow", 0, 9.0, base=0)) if isinstance(a, ConvertUpdate)]
    assert again.counters["conversion_switched_off"] == 1


def test_the_worker_stops_without_running_the_queued_conversions() -> None:
    """SIGTERM must not wait for every queued gradient inversion (seconds each; 8 queued took
    8 s at 1 s each, up to 35 s at the default budget, past systemd's TimeoutStopSec=30).
    Queued updates are durable and acknowledged: the next start buffers them again."""
    import threading
    import time
    import types

    from coordinator.conversion_worker import ConversionWorker

    started = threading.Event()
    release = threading.Event()
    runs: list[int] = []

    class Slow:
        def convert(self, request: Any) -> None:
            runs.append(request.ticket)
            started.set()
            release.wait(10)

    delivered: list[object] = []
    worker = ConversionWorker(Slow(), delivered.append, time.time).start()
    for i in range(8):
        worker.submit(types.SimpleNamespace(ticket=i, device=f"d{i}", staleness=5, target_version=9, deadline=time.time() + 60))
    assert started.wait(10)  # the first one runs; 7 wait in the queue
    stopper = threading.Thread(target=worker.stop)
    stopper.start()
    wait_until(lambda: worker._stopping, 10, "stop() to begin")  # then no queued request may start
    release.set()  # the running conversion ends
    stopper.join(10)
    assert not stopper.is_alive() and not worker._thread.is_alive()
    assert runs == [0]  # none of the queued ones ran


@pytest.mark.parametrize(("params", "kept"), [({"staleness": "dc-asgd", "convert_beyond": 2}, 29), ({}, 7)])
def test_a_restarted_converting_coordinator_gets_back_the_versions_it_converts_from(
        tmp_path: Path, params: dict[str, Any], kept: int) -> None:
    """A converting staleness policy keeps conversion_history versions (here 30) to convert stale
    updates from their base; a restart handed its core the registry's 7 (the daemon's default core
    keeps 8), and every update staler than that fell back to the damped update until 30 new
    versions were made. Now it gets back as many as it keeps; another strategy as before."""
    from coordinator.core import CommitVersion

    task = get_task("digits")
    state = tmp_path / "state"
    d = CoordinatorDaemon(CoordinatorOptions(broker="mqtt://127.0.0.1:1", region="r", state_dir=state, conversion_history=30,
                                             strategy_params=params), task=task)
    try:
        snapshot = d.registry.load()
        assert snapshot is not None
        for v in range(1, 41):
            d.registry.commit(CommitVersion(version=v, weights=np.full(task.spec.size, v, np.float32), applied_changed={},
                                            consumed=(), metadata={"strategy": "spin"}))
        core = d._build_core(d.registry.load())  # type: ignore[arg-type]
    finally:
        d.registry.close()
    held = sorted(v for v in range(41) if core.weights_at(v) is not None)
    assert held == list(range(40 - kept, 41))
    assert float(core.weights_at(40 - kept)[0]) == 40 - kept  # type: ignore[index]
