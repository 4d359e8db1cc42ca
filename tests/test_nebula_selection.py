"""NebulaFL's reward-guided selection and cost-aware resources (paper 003, eq. 4–9; issue 16
item 4): the maths on hand-worked numbers, the selection frequencies, the resource choice,
config validation, and the emulator's cost model."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from coordinator.methods import make_method
from coordinator.strategies.base import BufferedUpdate, StaticView
from coordinator.strategies.nebula import (
    NebulaConfig,
    NebulaStrategy,
    choose_resource,
    cost_factor,
    curiosity,
    performance_reward,
    performance_rewards,
    selection_probabilities,
    time_factor,
    version_gap,
)
from devices.multiregion import MultiRegionRun, load_multiregion
from devices.report import load_task
from devices.scenario import CostModel, ScenarioError, parse_cost
from edge_sdk.errors import ConfigError
from tests.helpers import SPEC

SCENARIO = Path(__file__).resolve().parents[1] / "demos" / "scenarios" / "multiregion" / "paper-nebula.toml"


# --------------------------------------------------------------------------- the maths


def test_eq4_version_gap() -> None:
    assert version_gap(5.0, 3.0, 1.0) == 1.0
    assert version_gap(2.0, 3.0, -0.5) == -0.5


def test_eq5_performance_reward_prefers_slow_devices_ahead_and_fast_ones_behind() -> None:
    scores = [1.0, 2.0, 4.0]
    assert performance_reward(2.0, scores, 2.0) == pytest.approx(2 / 4 * 2)  # ahead: PSc / max · Δv
    assert performance_reward(1.0, scores, -2.0) == pytest.approx(-2.0)  # behind: (1 − (1 − 1)/4) · −2
    assert performance_reward(4.0, scores, -2.0) == pytest.approx(-3.5)  # (1 − (1 − 4)/4) · −2
    assert performance_reward(4.0, scores, 2.0) > performance_reward(1.0, scores, 2.0)
    assert performance_reward(1.0, scores, -2.0) > performance_reward(4.0, scores, -2.0)


def test_eq6_curiosity() -> None:
    assert curiosity(0) == 1.0
    assert curiosity(3) == pytest.approx(0.5)


def test_eq7_probabilities_and_the_shift_for_negative_totals() -> None:
    assert selection_probabilities([1.0, 0.5], [1.0, 0.5]) == pytest.approx([2 / 3, 1 / 3])
    # totals −1, −2.5, 0.5: shifted by 3 so that the lowest is the lowest curiosity (0.5): 2, 0.5, 3.5
    assert selection_probabilities([-2.0, -3.5, 0.0], [1.0, 1.0, 0.5]) == pytest.approx([2 / 6, 0.5 / 6, 3.5 / 6])


def test_eq8_cost_factor_and_eq9_time_factor() -> None:
    assert cost_factor([3.0, 1.0, 2.0]) == pytest.approx([1 / 3, -1 / 3, 0.0])
    # (t − mean) / max · (−Δv): behind (Δv = −2) the slow resource is penalised
    assert time_factor([1.0, 2.0, 3.0], -2.0) == pytest.approx([-2 / 3, 0.0, 2 / 3])
    assert time_factor([1.0, 2.0, 3.0], 0.0) == pytest.approx([0.0, 0.0, 0.0])


def test_resource_choice_fast_for_a_planet_behind_cheap_for_one_ahead() -> None:
    prices, times = [3.0, 1.0], [1.0, 2.0]  # resource 0 fast and dear, 1 slow and cheap
    # F_cost = [1/3, −1/3]; F_time at Δv = −2: [−0.5, 0.5] → totals [−1/6, 1/6]
    assert choose_resource(prices, times, -2.0) == 0
    assert choose_resource(prices, times, 2.0) == 1
    assert choose_resource(prices, times, 0.0) == 1  # no version pressure: the cheapest


# --------------------------------------------------------------------------- the strategy


def _view(waiting: list[str], now: float = 0.0) -> StaticView:
    return StaticView(spec=SPEC, version=0, weights=np.zeros(SPEC.size, dtype=np.float32),
                      deferred=dict.fromkeys(waiting, now), devices_seen=tuple(waiting))


def _report(s: NebulaStrategy, device: str, seq: int, now: float) -> int:
    """The invited device's update arrives: returns the planet it trained (freed again)."""
    update = BufferedUpdate(device=device, seq=seq, base_version=0, staleness=0, n_samples=10,
                            weights=np.zeros(SPEC.size, dtype=np.float32), arrived_at=now)
    s.on_update(_view([]), update, now)
    return s.fold_into.pop(update.key)


def test_the_sign_of_the_version_offset() -> None:
    for sign, expected in ((-1, -3.0), (1, 1.0), (0, -1.0)):
        s = NebulaStrategy(NebulaConfig(planets=2, selection="reward", offset_sign=sign))
        s.state.versions = [4.0, 6.0]  # planet 0 is 1 behind the mean
        s.state.v_rotation_avg, s.state.v_stellar, s.state.stellar_at = 5.0, 3.0, 1.0  # v_os = 2: this centre is ahead
        assert s.gap(0) == expected
    s.state.stellar_at = None  # nothing received yet: no offset
    assert s.gap(0) == -1.0


def test_selection_none_serves_everyone_and_invites_nobody() -> None:
    s = NebulaStrategy(NebulaConfig())
    assert s.serve_pull(_view([]), "d1", 0.0)
    plan = s.plan(_view(["d1", "d2"]), 0.0, random.Random(0))
    assert plan.invite == () and not plan.aggregate and s.hints_for("d1") == {}


def test_one_invited_device_per_planet_and_its_update_goes_to_that_planet() -> None:
    s = NebulaStrategy(NebulaConfig(planets=2, selection="uniform"))
    waiting = ["a", "b", "c", "d"]
    plan = s.plan(_view(waiting), 0.0, random.Random(1))
    assert len(plan.invite) == 2 and not s.serve_pull(_view([]), "zz", 0.0)
    assert all(s.serve_pull(_view([]), d, 0.0) for d in plan.invite)
    planets = {s.in_flight[d][0] for d in plan.invite}
    assert planets == {0, 1}
    first = plan.invite[0]
    freed = s.in_flight[first][0]
    assert _report(s, first, 1, 0.3) == freed and first not in s.in_flight
    again = s.plan(_view([d for d in waiting if d not in plan.invite[1:]]), 0.3, random.Random(2))
    assert len(again.invite) == 1 and s.in_flight[again.invite[0]][0] == freed  # only the freed planet gets a device


def test_an_invited_device_that_never_reports_is_forgotten_and_its_planet_drawn_for_again() -> None:
    s = NebulaStrategy(NebulaConfig(planets=1, selection="uniform", forget_after_s=30.0))
    first = s.plan(_view(["a", "b"]), 0.0, random.Random(0))
    assert len(first.invite) == 1 and first.wake_at == 30.0  # the core wakes the strategy then
    gone = first.invite[0]
    other = "b" if gone == "a" else "a"
    assert s.plan(_view([other], 10.0), 29.9, random.Random(0)).invite == ()  # the one planet is still busy
    later = s.plan(_view([other], 10.0), 30.0, random.Random(0))
    assert later.invite == (other,) and gone not in s.in_flight and s.describe()["forgotten"] == 1
    assert later.wake_at == 60.0
    # the forgotten device's late update is an uninvited one: not folded into the planet it was given
    update = BufferedUpdate(device=gone, seq=1, base_version=0, staleness=0, n_samples=10,
                            weights=np.zeros(SPEC.size, dtype=np.float32), arrived_at=31.0)
    s.on_update(_view([]), update, 31.0)
    assert update.key not in s.fold_into and other in s.in_flight


def test_without_forget_after_s_an_invited_device_is_waited_for_for_ever() -> None:
    s = NebulaStrategy(NebulaConfig(planets=1, selection="uniform"))
    first = s.plan(_view(["a", "b"]), 0.0, random.Random(0))
    assert first.wake_at is None
    assert s.plan(_view(["a", "b"]), 1e9, random.Random(0)).invite == ()


def test_the_update_is_folded_into_its_planet() -> None:
    s = NebulaStrategy(NebulaConfig(planets=3, selection="uniform"))
    plan = s.plan(_view(["a", "b", "c"]), 0.0, random.Random(0))
    device = plan.invite[2]
    planet = s.in_flight[device][0]
    update = BufferedUpdate(device=device, seq=1, base_version=0, staleness=0, n_samples=10,
                            weights=np.ones(SPEC.size, dtype=np.float32), arrived_at=0.2)
    view = _view([])
    s.on_update(view, update, 0.2)
    s.aggregate(view, [update])
    assert s.state.versions == [1.0 if j == planet else 0.0 for j in range(3)]


def test_curiosity_spreads_the_selection() -> None:
    s = NebulaStrategy(NebulaConfig(planets=1, selection="reward"))
    waiting = [f"d{i}" for i in range(5)]
    rng = random.Random(0)
    chosen: Counter[str] = Counter()
    for k in range(400):
        (device,) = s.plan(_view(waiting, k), float(k), rng).invite
        chosen[device] += 1
        _report(s, device, k, k + 0.5)  # every device equally fast
    assert set(chosen) == set(waiting)
    assert min(chosen.values()) >= 60 and max(chosen.values()) <= 100  # uniform would be 80 each
    # a device picked 99 times against one never picked: curiosity alone (equal scores, Δv = 0)
    s.count = {"a": 99, "b": 0}
    s.score = {"a": (1.0, 1), "b": (1.0, 1)}
    p_a, p_b = s.probabilities(["a", "b"], 0)
    assert p_b / p_a == pytest.approx(10.0)


def test_the_rewards_of_a_whole_selection_are_eq5_per_device_to_the_bit() -> None:
    rng = random.Random(0)
    for _ in range(300):
        scores = [rng.choice([0.0, -1.0, rng.uniform(-2, 5), rng.uniform(0, 1e-9)]) for _ in range(rng.randrange(1, 12))]
        for gap in (rng.uniform(-5, 5), 0.0, -0.0, 3.0, -3.0):
            assert performance_rewards(scores, gap) == [performance_reward(sc, scores, gap) for sc in scores]
    assert performance_rewards([], 1.0) == []


def test_the_probabilities_are_eq7_over_eq5_and_eq6_per_device_to_the_bit() -> None:
    """probabilities() takes the scores and curiosities in passes over the candidates (eq. 6 once per
    distinct count), for speed: the floats must be those of the formulas taken device by device, or
    the draws (rng.choices over them) would change."""
    rng = random.Random(1)
    for case in range(200):
        s = NebulaStrategy(NebulaConfig(planets=3, selection="reward", offset_sign=rng.choice([-1, 0, 1])))
        s.state.versions = [float(rng.randrange(0, 20)) for _ in range(3)]
        s.state.v_rotation_avg, s.state.stellar_at, s.state.v_stellar = rng.uniform(0, 10), 1.0, rng.uniform(0, 10)
        devices = [f"d{i}" for i in range(rng.randrange(1, 30))]
        s.score = {d: (rng.choice([0.0, rng.uniform(0, 50)]), rng.randrange(1, 4)) for d in devices if rng.random() < 0.6}
        s.count = {d: rng.randrange(0, 6) for d in devices if rng.random() < 0.7}
        candidates = rng.sample(devices, rng.randrange(1, len(devices) + 1))
        for planet in range(3):
            gap = s.gap(planet)
            scores = [s.performance_score(d) for d in candidates]
            want = selection_probabilities([performance_reward(sc, scores, gap) for sc in scores],
                                           [curiosity(s.count.get(d, 0)) for d in candidates])
            assert s.probabilities(candidates, planet) == want, (case, planet)


def _many_waiting(s: NebulaStrategy, n: int) -> list[str]:
    """``n`` devices waiting, every other one with a score of its own."""
    waiting = [f"d{i:06d}" for i in range(n)]
    s.score = {d: (1.0 + i % 7, 1) for i, d in enumerate(waiting) if i % 2 == 0}
    s.count = {d: i % 3 for i, d in enumerate(waiting)}
    return waiting


def test_a_reward_selection_among_many_waiting_devices_is_linear() -> None:
    """helper-150: each candidate's eq. 5 took the max and min of every candidate's score, and each
    candidate without a score the mean of every score: a plan with one free planet was O(waiting²)
    (8,000 waiting: 6.7 s; 20,000: 24 s). The same probabilities now take milliseconds."""
    import time

    s = NebulaStrategy(NebulaConfig(planets=1, selection="reward"))
    waiting = _many_waiting(s, 20_000)
    view = _view(waiting)
    started = time.perf_counter()
    plan = s.plan(view, 0.0, random.Random(0))
    took = time.perf_counter() - started
    assert len(plan.invite) == 1 and plan.invite[0] in waiting
    assert took < 2.0, f"a plan over {len(waiting)} waiting devices took {took:.1f} s"


class _CountingDeferred(dict[str, float]):
    """``view.deferred`` that counts the passes over it."""

    passes = 0

    def __iter__(self):  # type: ignore[no-untyped-def]
        type(self).passes += 1
        return super().__iter__()


def test_a_plan_with_every_planet_busy_does_not_go_over_the_waiting_devices() -> None:
    """The core plans after every event: with every planet busy the old plan still sorted every
    waiting device (10,000 waiting: 1.35 ms a pull instead of 0.12), for nothing to invite."""
    s = NebulaStrategy(NebulaConfig(planets=2, selection="reward"))
    waiting = _many_waiting(s, 100)
    deferred = _CountingDeferred(dict.fromkeys(waiting, 0.0))
    view = StaticView(spec=SPEC, version=0, weights=np.zeros(SPEC.size, dtype=np.float32), deferred=deferred,
                      devices_seen=tuple(waiting))
    first = s.plan(view, 0.0, random.Random(0))
    assert len(first.invite) == 2 and _CountingDeferred.passes == 1
    for k in range(1, 6):
        assert s.plan(view, float(k), random.Random(k)).invite == ()
    assert _CountingDeferred.passes == 1


def test_a_planet_behind_prefers_fast_devices_and_one_ahead_slow_ones() -> None:
    s = NebulaStrategy(NebulaConfig(planets=2, selection="reward"))
    s.state.versions = [10.0, 0.0]  # Δv = +5 for planet 0, −5 for planet 1
    s.score = {"fast": (0.1, 1), "slow": (1.0, 1)}
    s.count = {"fast": 3, "slow": 3}
    ahead, behind = s.probabilities(["fast", "slow"], 0), s.probabilities(["fast", "slow"], 1)
    assert ahead[1] > ahead[0] and behind[0] > behind[1]


def test_resource_for_a_low_version_planet_is_fast_and_for_a_high_version_one_cheap() -> None:
    cfg = NebulaConfig(planets=2, selection="reward", resources="cost",
                       resource_speeds=(2.0, 1.0, 0.6), resource_prices=(3.06e-4, 7.8e-5, 3.3e-5))
    s = NebulaStrategy(cfg)
    s.state.versions = [0.0, 10.0]
    assert s.resource_for("d", 0) == 0  # behind by 5: the A100
    assert s.resource_for("d", 1) == 2  # ahead by 5: the 3080
    s.state.versions = [5.0, 5.0]
    assert s.resource_for("d", 0) == 2  # level: the cheapest
    plan = s.plan(_view(["d", "e"]), 0.0, random.Random(0))
    assert {d: s.hints_for(d) for d in plan.invite} == {d: {"resource": 2.0} for d in plan.invite}
    # the hint reaches the device through the peering (the core asks the peering)
    method = make_method("nebula", params={"selection": "uniform", "resources": "cost",
                                           "resource_speeds": [1.0], "resource_prices": [1.0]})
    assert method.peering.hints_for("nobody") == {}


def test_performance_score_is_the_time_per_unit_speed() -> None:
    cfg = NebulaConfig(planets=1, selection="uniform", resources="cost", resource_speeds=(2.0, 1.0), resource_prices=(2.0, 1.0))
    s = NebulaStrategy(cfg)
    assert s.performance_score("new") == 1.0  # nothing seen yet
    s.in_flight["d"] = (0, 10.0, 0)  # invited at 10 s onto resource 0 (speed 2)
    _report(s, "d", 1, 10.5)
    assert s.performance_score("d") == pytest.approx(1.0)  # 0.5 s × speed 2
    assert s.rtime[("d", 0)] == (pytest.approx(0.5), 1)
    assert s.performance_score("other") == pytest.approx(1.0)  # the mean of those seen


@pytest.mark.parametrize("params", [
    {"selection": "best"},
    {"resources": "cheapest"},
    {"resources": "cost"},  # no catalogue
    {"selection": "none", "resources": "cost", "resource_speeds": [1.0], "resource_prices": [1.0]},
    {"selection": "reward", "resource_speeds": [1.0, 2.0], "resource_prices": [1.0]},
    {"selection": "reward", "resource_speeds": [0.0], "resource_prices": [1.0]},
    {"selection": "reward", "resource_speeds": [1.0], "resource_prices": [-1.0]},
    {"selection": "reward", "resource_speeds": [float("nan")], "resource_prices": [1.0]},
    {"selection": "reward", "offset_sign": 2},
    {"selection": "uniform", "forget_after_s": 0.0},
    {"selection": "uniform", "forget_after_s": float("inf")},
])
def test_bad_parameters_are_config_errors(params: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        make_method("nebula", params=params)


# --------------------------------------------------------------------------- the cost model


def test_parse_cost_rows_scalars_and_errors() -> None:
    cost = parse_cost({"resources": ["a", "b"], "speed": [2, 1], "price_per_s": [3.0, 1.0], "transfer_per_gb": 0.5,
                       "default_resource": "b"}, 2, "here")
    assert cost.price_per_s == ((3.0, 1.0), (3.0, 1.0)) and cost.transfer_per_gb == ((0.5, 0.5), (0.5, 0.5))
    assert cost.default_resource == 1 and cost.resource({}) == 1 and cost.resource({"resource": 0.0}) == 0
    assert cost.resource({"resource": 7.0}) == 1 and cost.resource({"resource": 0.5}) == 1  # not a resource: default
    assert cost.compute(0, 0, 2.0) == 6.0 and cost.transfer(0, 0, 10**9) == 0.0 and cost.transfer(0, 1, 2 * 10**9) == 1.0
    for bad in ({"resources": [], "price_per_s": [1.0]}, {"resources": ["a"]}, {"resources": ["a"], "price_per_s": [[1.0]]},
                {"resources": ["a"], "price_per_s": [1.0], "speed": [0]}, {"resources": ["a"], "price_per_s": [1.0], "default_resource": "z"},
                {"resources": ["a"], "price_per_s": [1.0], "transfer_per_gb": -1}, {"resources": ["a"], "price_per_s": [1.0], "colour": 1}):
        with pytest.raises(ScenarioError):
            parse_cost(bad, 2, "here")


def test_the_emulator_charges_what_the_cost_model_says() -> None:
    sc = load_multiregion(SCENARIO, quick=True)
    cost = sc.regions.cost if sc.regions is not None else None
    assert isinstance(cost, CostModel) and cost.resources == ("a100", "rtx4090", "rtx3080")
    task = load_task(sc.settings.task, sc.settings.task_options)
    by = {m.label: m for m in sc.methods}
    # Fixed resource: every job on the RTX 4090 at the device's base time, at its region's price.
    sim = MultiRegionRun(task, sc, by["NebulaFL (uniform, fixed resource)"], 8, 0)
    r = sim.run()
    s = r.summary
    expected = sum(d.trainings * d.plan.train_s * cost.price_per_s[d.plan.region][1] for d in sim.devices if d.plan.train_s)
    assert s["cost_compute"] == pytest.approx(expected) and s["resource_use"] == {"rtx4090": s["trainings"]}
    # devices sit in their coordinator's region: only the rotations cross regions, and they are charged by size
    assert s["bytes_inter_region"] == s["bytes_peer"] > 0
    assert s["cost_transfer"] == pytest.approx(s["bytes_inter_region"] / 1e9 * 0.02)
    assert s["cost_total"] == pytest.approx(s["cost_compute"] + s["cost_transfer"])
    # Cost-aware: the jobs ran on the resources the coordinators chose, each at its speed.
    sim = MultiRegionRun(task, sc, by["NebulaFL (reward + cost)"], 8, 0)
    s = sim.run().summary
    assert sum(s["resource_use"].values()) == s["trainings"] and set(s["resource_use"]) - {"rtx4090"}
    assert s["compute_s"] == pytest.approx(sum(d.train_seconds for d in sim.devices))
    # One server in California: 3 of 4 regions' devices cross regions with every model.
    s = MultiRegionRun(task, sc, by["FedSA-like (1 server, 1 s window)"], 8, 0).run().summary
    assert s["bytes_inter_region"] > 0 and s["bytes_peer"] == 0
    assert s["cost_transfer"] == pytest.approx(s["bytes_inter_region"] / 1e9 * 0.02)


def test_a_scenario_without_a_cost_model_reports_no_cost() -> None:
    sc = load_multiregion(SCENARIO.parent / "digits-4regions.toml", quick=True)
    assert sc.regions is not None and sc.regions.cost is None


# --------------------------------------------------------------------------- bookkeeping bounded


def test_the_planet_of_an_update_lasp_left_out_is_forgotten() -> None:
    """An invited device's update is given its planet at arrival (``fold_into``) and the entry is
    dropped when the update is folded. One the core consumed without handing it to the strategy
    kept its entry for ever: here (LASP T = 12, gradient-inversion) a slow device's whole model,
    parked for conversion at version 11, is released after the fast device made full sync 12,
    and left out of partial version 13 (its head was fit to the old extractor). The old code kept
    one entry per such update: 1, 2, 3 after three cycles; now none."""
    from coordinator.core import ConvertUpdate, CoordinatorConfig, CoordinatorCore, UpdateConverted
    from edge_sdk.core.events import MessageReceived, Publish
    from edge_sdk.wire import topics
    from edge_sdk.wire.codec import decode, encode
    from edge_sdk.wire.messages import Invite, ModelMsg, Pull, Update
    from tests.helpers import toy_snapshot

    method = make_method("nebula", params={"planets": 2, "selection": "uniform", "staleness": "gradient-inversion"})
    strategy = method.strategy
    assert isinstance(strategy, NebulaStrategy)
    cfg = CoordinatorConfig(region="r1", coordinator_id="c1", spec=SPEC, full_sync_every=12, keep_versions=16)
    core = CoordinatorCore(cfg, strategy, toy_snapshot(), rng=random.Random(0), peering=method.peering)
    seqs: Counter[str] = Counter()
    invites: dict[str, Invite] = {}
    clock = [0.0]

    def handle(device: str, msg: Pull | Update) -> list[object]:
        clock[0] += 1.0  # (a pull a second: under the reply rate limit)
        leaf = "update" if isinstance(msg, Update) else "pull"
        acts: list[object] = list(core.handle(MessageReceived(now=clock[0], topic=topics.device_topic("r1", device, leaf),
                                                              payload=encode(msg))))
        for a in acts:
            if isinstance(a, Publish) and a.topic.endswith("/invite"):
                invite = decode(a.payload)
                assert isinstance(invite, Invite)
                invites[topics.parse(a.topic).device] = invite
        return acts

    def pull(device: str, invite_round: int = -1) -> list[object]:
        seqs[device] += 1
        return handle(device, Pull(device=device, seq=seqs[device], model_id="toy", invite_round=invite_round))

    def served(device: str) -> ModelMsg:
        (model,) = [decode(a.payload) for a in pull(device, invites.pop(device).round)
                    if isinstance(a, Publish) and a.topic.endswith("/model")]
        assert isinstance(model, ModelMsg)
        return model

    def send(device: str, whole: bool, value: float, base: int) -> list[object]:
        seqs[device] += 1
        weights = np.full(SPEC.size if whole else SPEC.group_size("classifier"), value, np.float32)
        return handle(device, Update(device=device, seq=seqs[device], model_id="toy", base_version=base,
                                     n_samples=1, weights=weights, group="full" if whole else "classifier"))

    def fast_step() -> None:
        send("fast", served("fast").train_group == "full", 1.0, core.version)
        pull("fast")

    pull("fast")
    sizes = []
    for cycle in range(1, 4):
        while core.version % 12:
            fast_step()
        pull("slow")
        base = served("slow").version  # 12k
        while core.version % 12 != 11:
            fast_step()
        (convert,) = [a for a in send("slow", True, 9.0, base) if isinstance(a, ConvertUpdate)]  # 11 behind
        fast_step()  # the full sync
        core.handle(UpdateConverted(now=clock[0], ticket=convert.ticket, weights=np.full(SPEC.size, 9.0, np.float32),
                                    elapsed_s=0.1))
        assert core.version % 12 == 1 and core.counters["lasp_dropped_stale"] == cycle
        sizes.append(len(strategy.fold_into))
    assert sizes == [0, 0, 0]  # the old code: [1, 2, 3]
    assert core.status().buffered == 0
