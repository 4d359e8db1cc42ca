"""Engine, fleet-driver and gradient-inversion behaviours no test checked (helper-194's mutation
audit of ``devices/engine/``, ``devices/simulator.py`` and ``coordinator/inversion.py``).

Most tests kill a drawn mutant that survived the tests run on its line; the rest pin engine behaviour
that only a slow end-to-end test checked (the scaled clock, the queue's order, the loop's counts). The
docstrings name the mutants (file:line at the audit's base commit 24576d7, and the mutation)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from devices.engine import (
    Driver,
    EventQueue,
    Kind,
    RegionNetwork,
    ScaledWallClock,
    VirtualClock,
    job_seed,
)
from edge_sdk.errors import LocalProtocolError

# --------------------------------------------------------------------------- clocks


class FakeTime:
    """A monotonic clock that moves only when ``sleep`` is called (or by hand)."""

    def __init__(self, t: float = 100.0) -> None:
        self.t = t
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.t += s


def test_scaled_wall_clock_reads_and_sleeps_in_scaled_time() -> None:
    """clock.py:38 (``if not scale > 0``: the check negated / 0 -> 1), clock.py:50 (``wait > 0``
    flipped: a past time slept for, a future one not waited for)."""
    fake = FakeTime()
    clock = ScaledWallClock(4.0, monotonic=fake.monotonic, sleep=fake.sleep)
    assert clock.now == 0.0
    fake.t += 0.5
    assert clock.now == pytest.approx(2.0)  # 0.5 s of wall time is 2 virtual seconds
    clock.advance_to(6.0)  # 1.5 virtual seconds later: 0.25 s of wall time still to wait
    assert fake.sleeps == [pytest.approx(1.0)] and clock.now == pytest.approx(6.0)
    clock.advance_to(5.0)  # already past: no sleep
    clock.advance_to(6.0)  # exactly now: no sleep
    assert len(fake.sleeps) == 1
    ScaledWallClock(0.5, monotonic=fake.monotonic, sleep=fake.sleep)  # a slowed-down clock is fine
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(LocalProtocolError, match="scale"):
            ScaledWallClock(bad, monotonic=fake.monotonic, sleep=fake.sleep)


def test_virtual_clock_starts_where_told_and_refuses_to_go_back() -> None:
    """clock.py:18-28: the start time and the backwards check (``t < now`` made ``t <= now``
    would refuse a second event at the same instant)."""
    clock = VirtualClock(10.0)
    assert clock.now == 10.0
    with pytest.raises(LocalProtocolError):
        clock.advance_to(9.0)
    clock.advance_to(10.0)  # equal times: many events share an instant
    clock.advance_to(12.5)
    assert clock.now == 12.5


# --------------------------------------------------------------------------- events and the loop


def test_event_kinds_are_distinct() -> None:
    """events.py:14-30 (one kind's number changed to another's: the IntEnum makes it an alias,
    and a TIMER would be dispatched as, say, a SAMPLE)."""
    assert len({k.value for k in Kind}) == len(Kind.__members__) == 9
    assert len(set(Kind)) == 9


def test_event_queue_orders_by_time_then_push_order() -> None:
    """events.py:46-57: ``(time, sequence)`` order, ties in the order pushed."""
    q = EventQueue()
    assert q.next_time() is None and len(q) == 0
    q.push(2.0, Kind.MSG, 1, "b")
    q.push(1.0, Kind.TIMER, 5, "a")
    q.push(2.0, Kind.SAMPLE, 0, "c")
    q.push(2.0, Kind.MSG, 0, "d")
    assert q.next_time() == 1.0 and len(q) == 4
    assert [q.pop()[4] for _ in range(4)] == ["a", "b", "c", "d"]


class Recorder(Driver):
    def __init__(self, clock: Any = None) -> None:
        super().__init__(clock)
        self.seen: list[tuple[float, Kind, int, Any]] = []

    def dispatch(self, now: float, kind: Kind, target: int, data: Any) -> None:
        self.seen.append((now, kind, target, data))


def test_the_loop_counts_traces_and_moves_the_clock_for_every_event() -> None:
    """loop.py:100-109: each event advances the clock to its time, is counted, traced and dispatched
    (the trace's ``is not None`` flipped, the count's ``+= 1`` changed)."""
    d = Recorder()
    traced: list[float] = []
    d.trace = lambda now, kind, target, data: traced.append(now)
    for at in (3.0, 1.0, 2.0):
        d.push(at, Kind.TIMER, 0, at)
    assert d.run_until(10.0) is True
    assert [x[0] for x in d.seen] == [1.0, 2.0, 3.0] == traced
    assert d.events == 3 and d.clock.now == 3.0
    d.push(1.0, Kind.TIMER, 0, "late")  # scheduled in the past: the virtual clock refuses
    with pytest.raises(LocalProtocolError):
        d.run_until(10.0)


def test_the_loop_runs_on_a_scaled_wall_clock() -> None:
    """loop.py:100-103: with another clock the loop calls its ``advance_to`` (the inlined
    virtual-clock branch taken for every clock: a live loop that never waits)."""
    fake = FakeTime()
    d = Recorder(ScaledWallClock(10.0, monotonic=fake.monotonic, sleep=fake.sleep))
    d.push(5.0, Kind.TIMER, 0, None)
    d.push(20.0, Kind.TIMER, 0, None)
    d.run_until(30.0)
    assert fake.sleeps == [pytest.approx(0.5), pytest.approx(1.5)]
    assert [x[0] for x in d.seen] == [5.0, 20.0]


def test_preloaded_events_past_the_horizon_wait_for_the_next_run() -> None:
    """loop.py:90-95: the preload cursor (``i < n_pre``, ``i += 1``) across two ``run_until`` calls."""
    d = Recorder()
    d.preload(Kind.SAMPLE, [1.0, 3.0, 2.0], [0, 1, 2], ["a", "c", "b"])
    assert d.run_until(2.0) is True
    assert [x[3] for x in d.seen] == ["a", "b"]
    d.push(2.5, Kind.MSG, 9, "heap")
    assert d.run_until(10.0) is True
    assert [x[3] for x in d.seen] == ["a", "b", "heap", "c"] and d.events == 4
    assert [x[2] for x in d.seen] == [0, 2, 9, 1] and d.seen[-1][1] == Kind.SAMPLE


def test_a_halted_loop_counts_only_the_events_it_handled() -> None:
    """loop.py:104-106 (the halt check swapped with ``self.events += 1``: the event popped when the
    driver halts, never handled, counted all the same: a live run reports one event too many)."""

    class Halting(Recorder):
        def halted(self) -> bool:
            return len(self.seen) >= 2

    d = Halting()
    for at in (1.0, 2.0, 3.0, 4.0):
        d.push(at, Kind.TIMER, 0, at)
    assert d.run_until(10.0) is False
    assert len(d.seen) == 2 and d.events == 2


# --------------------------------------------------------------------------- the region network


def test_region_network_charges_uplink_matrix_latency_and_downlink_in_arrival_order() -> None:
    """network.py:130-152: ``size × 8 / bandwidth`` on the sender's uplink (FIFO, per
    subscriber), the latency of ``[sender's region][receiver's region]`` (an asymmetric matrix
    shows a transposed lookup), the sender never its own receiver, the downlink served in
    arrival order; no subscriber, no message."""
    # endpoints 0, 1 in region 0; 2 in region 1. 8 Mbit/s: 1,000 bytes take 1 ms.
    net = RegionNetwork([0, 0, 1], [[2.0, 100.0], [300.0, 5.0]], bandwidth_bps=8e6)
    assert net.latency_s(0, 2) == pytest.approx(0.1) and net.latency_s(2, 0) == pytest.approx(0.3)
    net.subscribe("t", [0, 1, 2])
    out = net.send(0, "t", 1000, now=1.0)  # to 1 and 2, not back to 0; one uplink slot after another
    assert [r for r, _ in out] == [1, 2]
    assert out[0][1] == pytest.approx(1.001 + 0.002)
    assert out[1][1] == pytest.approx(1.002 + 0.1)
    assert net.messages == 2
    late = net.send(0, "t", 1000, now=1.0)  # the uplink is busy until 1.002
    assert late[0][1] == pytest.approx(1.003 + 0.002)
    assert net.send(0, "nobody", 1000, now=1.0) == [] and net.messages == 4
    # The downlink: the first to arrive is served first; a later one queues behind it.
    assert net.arrive(2, 2000, now=5.0) == pytest.approx(5.002)
    assert net.arrive(2, 1000, now=5.001) == pytest.approx(5.003)
    assert net.arrive(1, 1000, now=7.0) == pytest.approx(7.001)  # another receiver's downlink is free
    with pytest.raises(LocalProtocolError):
        RegionNetwork([0], [[0.0]], bandwidth_bps=0.0)


# --------------------------------------------------------------------------- seeds


def test_job_seeds_are_distinct_per_run_device_and_job_and_fit_31_bits() -> None:
    """training.py:13 (the run seed's factor 1,000,003 made 0: every run trains with the same
    seeds; the modulus 2**31 changed)."""
    seeds = {job_seed(run, dev, job) for run in range(5) for dev in range(5) for job in range(5)}
    assert len(seeds) == 125
    big = [job_seed(run, dev, job) for run in (2**40, 10**12 + 7) for dev in (0, 99_999) for job in (0, 12_345)]
    assert all(0 <= s < 2**31 for s in big)


# --------------------------------------------------------------------------- the fleet driver


@pytest.fixture(scope="module")
def small_run() -> tuple[Any, Any]:
    from tests.test_emulator import simulate, small_scenario

    sim = simulate(small_scenario())
    return sim, sim.run()


def test_label_latency_summary_is_that_of_the_recorded_latencies(small_run: tuple[Any, Any]) -> None:
    """simulator.py:1103-1105 (the p90's 90 made 0: the summary's tail latency is its minimum)."""
    sim, result = small_run
    lat = np.array(sim.latencies)
    s = result.summary
    assert lat.size > 10 and (lat >= 0).all() and lat.min() < lat.max()
    assert s["labels_integrated"] == lat.size <= s["labels"]
    assert s["label_latency_mean_s"] == pytest.approx(float(lat.mean()))
    assert s["label_latency_p50_s"] == pytest.approx(float(np.percentile(lat, 50)))
    assert s["label_latency_p90_s"] == pytest.approx(float(np.percentile(lat, 90)))
    assert s["label_latency_p50_s"] <= s["label_latency_p90_s"]


def test_rows_score_the_version_the_coordinator_deployed(small_run: tuple[Any, Any]) -> None:
    """simulator.py:634 (``source in (rollback, operator) or strategy.candidate(...)`` made ``and``:
    every aggregation counted as off the line, and the rows kept scoring version 0)."""
    sim, result = small_run
    assert result.summary["versions"] > 0
    assert result.rows[-1]["version"] == result.summary["versions"] == sim.coordinator.version
    assert [r["version"] for r in result.rows] == sorted(r["version"] for r in result.rows)
    assert result.rows[-1]["committed_at_s"] == sim.commit_times[sim.coordinator.version] > 0


def test_device_notes_count_each_notification_once(small_run: tuple[Any, Any]) -> None:
    """simulator.py:805 (``device_notes[kind] += 1`` made ``+= 2``): a device is told of each
    accepted update once, so the acks it noted cannot outnumber the coordinator's acceptances."""
    _, result = small_run
    acked = result.summary["device_notes"].get("update_acked", 0)
    assert 0 < acked <= result.summary["updates_accepted"]


def test_target_time_and_best_accuracy_come_from_the_rows(small_run: tuple[Any, Any]) -> None:
    """simulator.py:958 (``accuracy >= target`` flipped: ``done_at``, where a regional run stops,
    set by the first row *below* the target) and simulator.py:1092 (``max(accs) if accs`` negated:
    no best accuracy reported)."""
    sim, result = small_run
    accs = [r["accuracy"] for r in result.rows]
    assert result.summary["best_accuracy"] == max(accs)
    target = sim.settings.target_accuracy
    assert min(accs) < target <= max(accs)  # the case where the two differ
    assert sim.done_at == next(r["t_s"] for r in result.rows if r["accuracy"] >= target)


def test_a_continuous_device_retrains_after_each_answer_to_its_update() -> None:
    """simulator.py:806 (``a.kind in ("update_acked", "update_rejected")`` made ``not in``: a
    continuous device pulls again on every other notification instead of after its update's answer)."""
    from tests.test_emulator import simulate, small_scenario

    sim = simulate(small_scenario(device={"min_samples": 1, "continuous": True}))
    samples: list[int] = []
    sim.trace = lambda now, kind, target, data: samples.append(target) if kind == Kind.SAMPLE else None
    result = sim.run()
    notes = result.summary["device_notes"]
    answered = notes.get("update_acked", 0) + notes.get("update_rejected", 0)
    holding = sum(1 for dev in sim.devices if dev.y.shape[0])  # one SAMPLE each at its start
    assert answered > 0 and len(samples) == holding + answered


# --------------------------------------------------------------------------- gradient inversion


@pytest.fixture(scope="module")
def case() -> Any:
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    from tests.test_inversion import Case

    return Case()


def test_epoch_steps_scales_the_step_by_the_minibatches_per_epoch(case: Any) -> None:
    """inversion.py:291-294 (``epoch_steps``: never run by a test; ``batch >= 1`` made ``> 1``
    leaves a batch of one unscaled). With ``epoch_steps`` a conversion equals one without it at
    ``min(max_step_lr, lr × ceil(n / batch_size))``; without a batch size it changes nothing."""

    def run(hints: dict[str, float], **config: Any) -> tuple[float, float]:
        result = case.inverter(iterations=2, **config).convert(case.request(hints=hints))
        return result.l1_before, result.l1_after

    n = 32  # the request's n_samples
    assert run({"epochs": 5.0, "lr": 0.01, "batch_size": 1.0}, epoch_steps=True) == run({"epochs": 5.0, "lr": min(0.5, 0.01 * n)})
    assert run({"epochs": 5.0, "lr": 0.001, "batch_size": 8.0}, epoch_steps=True) == run({"epochs": 5.0, "lr": 0.001 * 4})
    capped = run({"epochs": 5.0, "lr": 0.01, "batch_size": 1.0}, epoch_steps=True, max_step_lr=0.05)
    assert capped == run({"epochs": 5.0, "lr": 0.05})
    plain = run({"epochs": 5.0, "lr": 0.01})
    assert run({"epochs": 5.0, "lr": 0.01}, epoch_steps=True) == plain  # no batch size: nothing to scale by
    assert run({"epochs": 5.0, "lr": 0.01, "batch_size": 1.0}) == plain  # off by default


def test_a_task_without_a_sample_range_starts_its_inputs_in_minus_one_to_one() -> None:
    """inversion.py:331 (``2.0 * fresh_x - 1.0`` made ``- 0``: a task whose input contract is only a
    guard (gestures) started D_rec in [0, 2] instead of around zero)."""
    pytest.importorskip("torch")
    from coordinator.core import ConvertUpdate
    from coordinator.inversion import GradientInverter, InversionConfig
    from edge_sdk.tasks import get_task

    task = get_task("gestures")
    inverter = GradientInverter(task, task.spec, InversionConfig(iterations=0, max_samples=64))  # type: ignore[arg-type]
    base = task.spec.zeros()
    stale = base + np.float32(0.01)
    inverter.convert(ConvertUpdate(ticket=1, device="g", kind="gradient-inversion", stale_weights=stale, base_version=1,
                                   base_weights=base, target_version=5, target_weights=base, n_samples=128, staleness=4,
                                   hints={"epochs": 1.0, "lr": 0.01}, deadline=100.0))
    kept = inverter._state_for_tests("g")
    assert kept is not None
    x = kept[0].numpy()
    assert x.shape[0] == 64 and -1.0 <= x.min() < -0.9 and 0.9 < x.max() <= 1.0


def test_a_cold_start_steps_at_the_inversion_lr(case: Any) -> None:
    """inversion.py:363 (the cold start's factor 1.0 made 2.0: Adam's first steps twice
    ``inversion_lr``). Adam's first step moves each input by at most its step size (about that
    much where the gradient is not tiny); a warm start by ``inversion_lr × warm_lr_factor``."""
    before = case.inverter(iterations=0)
    before.convert(case.request())
    after = case.inverter(iterations=1, inversion_lr=0.1)
    result = after.convert(case.request())
    assert result.l1_after < result.l1_before  # the stepped set is the one kept
    x0, x1 = before._state_for_tests("dev-1")[0], after._state_for_tests("dev-1")[0]
    moved = float((x1 - x0).abs().max())
    assert 0.09 < moved <= 0.1 + 1e-5
    warm = after.convert(case.request())  # from the kept set, at 0.1 × 0.3
    assert warm.warm
    x2 = after._state_for_tests("dev-1")[0]
    assert 0.025 < float((x2 - x1).abs().max()) <= 0.03 + 1e-5


def test_a_canary_label_is_scored_only_against_the_release_the_device_holds() -> None:
    """simulator.py ``_canary_score`` (helper-194's survivor, left then): ``dev.deployed_version !=
    release`` dropped, a device holding another release than the request names scored its label with
    that other release, as no real device does (``EdgeClient._canary_score`` returns). With the check,
    such a label is not scored; a device on the named release scores it, both predictions, once."""
    from types import SimpleNamespace

    from devices.simulator import Simulation
    from edge_sdk.core.events import CanaryScored
    from edge_sdk.tasks import get_task

    task = get_task("digits")
    weights = task.pretrained(seed=0)
    data = task.data().pool
    handled: list[Any] = []
    sim = SimpleNamespace(task=task, canary_scored=0, _device_actions=lambda dev, actions, now: None)
    core = SimpleNamespace(handle=lambda event: handled.append(event) or [])
    dev = SimpleNamespace(canary=(5, 3, weights), deployed_weights=weights, deployed_version=2, x=data.x[:4], y=data.y[:4],
                          core=core)
    Simulation._canary_score(sim, dev, 0, 10.0)  # type: ignore[arg-type]
    assert sim.canary_scored == 0 and handled == []  # it holds release 2; the request names release 3
    dev.deployed_version = 3
    Simulation._canary_score(sim, dev, 1, 11.0)  # type: ignore[arg-type]
    (event,) = handled
    right = int(np.argmax(task.logits(weights, data.x[1:2]), axis=1)[0]) == int(data.y[1])
    assert sim.canary_scored == 1 and isinstance(event, CanaryScored)
    assert (event.candidate, event.release, event.candidate_right, event.release_right) == (5, 3, right, right)
