"""Attacks and defences in the emulator (issue 10, part 5): attacker devices, the release
gate driven on the virtual clock, the validation hold-out, and the attacks scenario's
quick form — without defences the release collapses, with robust aggregation + the gate it
never falls more than 2 points below its start."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.strategies import make_strategy
from demos import emulate
from devices.attacks import Attack, AttackPlan, assign, flip_labels
from devices.release_report import (
    format_release_table,
    release_figure,
    release_summary,
    release_time_to,
    target_of,
)
from devices.scenario import ScenarioError, holdout, load_scenario, materialise, parse_scenario
from devices.simulator import RunResult, Simulation
from edge_sdk.tasks.base import TrainResult
from tests.helpers import digits_scenario, single_threaded_digits

SCENARIO = Path(__file__).resolve().parents[1] / "demos" / "scenarios" / "attacks.toml"


@pytest.fixture(scope="module")
def digits() -> Any:
    return single_threaded_digits()


def small(**extra: Any) -> dict[str, Any]:
    return digits_scenario(**{"duration_s": 600, "devices": 16, "arrival_rate_per_h": 90, **extra})


# ------------------------------------------------------------------ attackers


def test_assign_is_disjoint_sized_and_a_function_of_the_seed() -> None:
    plan = AttackPlan(label_flip=0.1, scale=0.1, huge_samples=0.05)
    a = assign(plan, 100, 10, seed=3)
    kinds = [x.kind for x in a.values()]
    assert (kinds.count("flip"), kinds.count("scale"), kinds.count("claim")) == (10, 10, 5)
    assert a == assign(plan, 100, 10, seed=3)
    assert set(assign(plan, 100, 10, seed=4)) != set(a)
    # the flippers are the same devices whatever else attacks: the seed alone decides who
    assert {i for i, x in a.items() if x.kind == "flip"} == set(
        assign(AttackPlan(label_flip=0.1), 100, 10, seed=3)
    )


def test_flip_maps_are_derangements() -> None:
    import random

    assert flip_labels(4, "shift", random.Random(0)) == (1, 2, 3, 0)
    for seed in range(20):
        perm = flip_labels(10, "permutation", random.Random(seed))
        assert sorted(perm) == list(range(10)) and all(p != c for c, p in enumerate(perm))
    attack = Attack(kind="flip", permutation=(1, 2, 0))
    assert attack.labels(np.array([0, 1, 2, 2], dtype=np.int64)).tolist() == [1, 2, 0, 0]


def test_scaled_and_claiming_results() -> None:
    base = np.array([1.0, -2.0, 0.5], dtype=np.float32)
    honest = TrainResult(
        weights=np.array([1.5, -2.0, 0.25], dtype=np.float32), n_samples=7, loss=0.3, seconds=0.1
    )
    scaled = Attack(kind="scale", scale_factor=1000.0).result(base, honest)
    np.testing.assert_allclose(scaled.weights, [501.0, -2.0, -249.5])
    assert scaled.n_samples == 7 and np.isfinite(scaled.weights).all()
    claim = Attack(kind="claim", claimed_samples=2**62).result(base, honest)
    assert claim.n_samples == 2**62 and claim.weights is honest.weights
    assert Attack(kind="flip", permutation=(1, 0)).result(base, honest) is honest


# ------------------------------------------------------------------ scenario keys


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"coordinator": {"gate": True}}, "validation_size"),
        ({"coordinator": {"gate": 1, "validation_size": 50}}, "gate must be"),
        (
            {
                "coordinator": {
                    "gate": True,
                    "validation_size": 50,
                    "gate_margin": 0.2,
                    "rollback_margin": 0.1,
                }
            },
            "rollback_margin",
        ),
        ({"attack": {"label_flip": 0.6, "scale": 0.5}}, "<= 1"),
        ({"attack": {"flip": "reverse"}}, "flip must be"),
        ({"attack": {"scale_factor": float("inf")}}, "finite"),
        ({"attack": {"claimed": 5}}, "claimed_samples"),
        ({"reference": "nobody"}, "reference"),
    ],
)
def test_bad_attack_and_gate_keys_fail_at_load(patch: dict[str, Any], message: str) -> None:
    with pytest.raises(ScenarioError, match=message):
        parse_scenario(small(**patch))


def test_attacks_scenario_parses_with_its_runs() -> None:
    sc = load_scenario(SCENARIO)
    by = {r.label: r for r in sc.runs}
    assert sc.reference == "honest"
    assert not by["honest"].settings.attack.active
    attacked = by["attacked: no defence"].settings
    assert (attacked.attack.label_flip, attacked.attack.scale, attacked.attack.scale_factor) == (
        0.1,
        0.1,
        1000.0,
    )
    assert by["attacked: robust + gate"].settings.gate and not attacked.gate
    trimmed = by["attacked: trimmed + gate"]
    assert trimmed.settings.gate and trimmed.params["combiner"] == "trimmed-mean"
    assert trimmed.settings.attack == attacked.attack
    # the recommended defence, and "honest + gate" is that very coordinator without attackers
    chosen = by["attacked: clipping + deltas + gate"]
    assert chosen.settings.gate and chosen.settings.attack == attacked.attack
    assert (chosen.params["combine"], chosen.params["combiner"], chosen.params["clip_multiplier"]) == (
        "deltas",
        "mean",
        2.0,
    )
    looser = by["attacked: clipping 3x + deltas + gate"]
    assert looser.params == {**chosen.params, "clip_multiplier": 3.0} and looser.settings == chosen.settings
    cost = by["honest + gate"]
    assert cost.params == chosen.params and cost.settings.gate and not cost.settings.attack.active
    assert 0 in sc.settings.seeds and len(sc.settings.seeds) >= 5
    quick = sc.quick()
    assert quick.settings.duration_s < sc.settings.duration_s and quick.reference == "honest"


def test_validation_holdout_is_never_labelled(digits: Any) -> None:
    pool_y = digits.data().pool.y
    s = parse_scenario(small(coordinator={"validation_size": 120})).settings
    val, labelled = holdout(s, 1, len(pool_y))
    assert len(val) == 120 and len(labelled) == len(pool_y) - 120
    assert not set(val.tolist()) & set(labelled.tolist())
    used = np.concatenate([p.samples for p in materialise(s, 1, pool_y)])
    assert used.size > 0 and not set(used.tolist()) & set(val.tolist())
    # without a hold-out the whole pool is partitioned, exactly as before
    plain = parse_scenario(small()).settings
    assert np.array_equal(holdout(plain, 1, len(pool_y))[1], np.arange(len(pool_y)))
    with pytest.raises(ScenarioError, match="quarter"):
        holdout(
            parse_scenario(small(coordinator={"validation_size": 1000})).settings, 1, len(pool_y)
        )


# ------------------------------------------------------------------ the simulator


def test_gate_scores_after_the_virtual_delay_and_tracks_the_release(digits: Any) -> None:
    sc = parse_scenario(
        small(coordinator={"validation_size": 100, "gate": True, "gate_delay_s": 25.0})
    )
    sim = Simulation(digits, sc.settings, make_strategy("spin", k=4, timeout_s=10.0), seed=1)
    result = sim.run()
    decisions = sim.releases
    assert decisions, "the gate must decide something"
    for d in decisions:
        assert d["t_s"] >= sim.commit_times[d["version"]] + 25.0 - 1e-9
        # paired counts on the same 100 validation samples, as the daemon's validator hands them
        better, worse, n = d["paired"]
        assert n == 100 and better + worse <= n
        assert round(d["candidate_metric"] - d["release_metric"], 4) == round((better - worse) / n, 4)
    gate = result.summary["gate"]
    assert gate["gate_promoted"] >= 1
    # the release is a promoted version (or the start), and the rows report it
    promoted = {0} | {d["version"] for d in decisions if d["action"] == "promote"}
    assert {int(r["release_version"]) for r in result.rows} <= promoted
    assert result.rows[-1]["version"] > result.rows[-1]["release_version"] or gate["gate_held"] == 0


def test_a_delayed_gate_refuses_updates_trained_from_a_rejected_candidate(digits: Any) -> None:
    """F11 in the fleet: with the verdict 25 virtual s after each commit, devices pull and train
    from a candidate that is then rejected. Their updates are refused (base_rejected) instead of
    becoming the next version under combine="models", and each such device trains its samples
    again from the rolled-back line."""
    sc = parse_scenario(small(coordinator={"validation_size": 100, "gate": True, "gate_delay_s": 25.0},
                              attack={"scale": 0.25, "scale_factor": 1000.0}))
    strategy = make_strategy("spin", k=4, timeout_s=10.0, clip_multiplier=0, sample_weight_cap=0)
    sim = Simulation(digits, sc.settings, strategy, seed=1)
    result = sim.run()
    refused = result.summary["rejected_by_reason"].get("base_rejected", 0)
    retrained = sum(d.core.state.counters.get("retrain:base_rejected", 0) for d in sim.devices)
    assert result.summary["gate"]["gate_rejected"] >= 1 and refused >= 1, result.summary
    assert 1 <= retrained <= refused


def test_huge_sample_claims_are_capped_or_clamped(digits: Any) -> None:
    # 2^62: the core's hard cap rejects every such update; the honest fleet goes on
    sc = parse_scenario(small(attack={"huge_samples": 0.25, "claimed_samples": 2**62}))
    result = Simulation(
        digits, sc.settings, make_strategy("spin", k=4, timeout_s=10.0), seed=1
    ).run()
    assert result.summary["attackers"]["claim"] == 4
    assert result.summary["rejected_by_reason"].get("n_samples", 0) >= 4
    assert (
        result.summary["versions"] >= 5
        and result.summary["final_release_accuracy"] > result.summary["initial_release_accuracy"]
    )
    # 10^6: at the cap, accepted — and clamped by the robust sample-weight cap
    sc = parse_scenario(small(attack={"huge_samples": 0.25, "claimed_samples": 10**6}))
    result = Simulation(
        digits, sc.settings, make_strategy("spin", k=4, timeout_s=10.0), seed=1
    ).run()
    assert "n_samples" not in result.summary["rejected_by_reason"]
    assert result.summary["strategy"]["robust"]["counts"].get("samples_clamped", 0) >= 4


def test_release_report_helpers() -> None:
    rows = [
        {"t_s": 0.0, "accuracy": 0.5, "release_accuracy": 0.5},
        {"t_s": 60.0, "accuracy": 0.9, "release_accuracy": 0.7},
        {"t_s": 120.0, "accuracy": 0.9, "release_accuracy": 0.8},
    ]
    assert target_of(rows, 150.0) == 0.8 and target_of(rows, 100.0) == 0.7
    assert release_time_to(rows, 0.7) == 60.0 and release_time_to(rows, 0.95) is None


def _release_run(label: str, release: Sequence[float], *, seed: int = 0) -> RunResult:
    """A run's evaluation rows, one a minute (release = training line), without simulating."""
    rows = [{"t_s": 60.0 * i, "accuracy": a, "release_accuracy": a} for i, a in enumerate(release)]
    return RunResult(label=label, strategy="spin", params={}, seed=seed, target_accuracy=0.85, rows=rows)


RISING = [0.70 + 0.01 * i for i in range(16)]
"""Release accuracy over the quick attacks scenario's 15 min; the reference's target is at 12 min."""


def test_release_plot_draws_the_reference_above_runs_it_coincides_with() -> None:
    """Every run starts from the same model, so release lines coincide with the reference's
    (here all the way): the reference, dashed grey, is drawn above the others in both panels,
    thinner than the runs' release lines so their colour still shows either side of its dashes."""
    import matplotlib.pyplot as plt

    sc = load_scenario(SCENARIO).quick().select(["honest", "attacked: no defence", "attacked: robust + gate"])
    fig = release_figure(sc, [_release_run(spec.label, RISING) for spec in sc.runs])
    try:
        assert len(fig.axes) == 2  # ungated (honest, no defence) and gated (robust + gate)
        for ax in fig.axes:
            lines = ax.get_lines()
            ref = [ln for ln in lines if str(ln.get_label()).startswith("honest:")]
            others = [ln for ln in lines if ln not in ref]
            assert len(ref) == 1 and others, ax.get_title()
            assert ref[0].get_linestyle() == "--" and ref[0].get_visible()
            assert ref[0].get_zorder() > max(ln.get_zorder() for ln in others), ax.get_title()
            releases = [ln for ln in others if ln.get_linestyle() == "-"]
            assert releases and ref[0].get_linewidth() < min(ln.get_linewidth() for ln in releases)
    finally:
        plt.close(fig)


def test_release_report_without_the_reference_says_what_it_cannot_compute() -> None:
    """``--strategies`` without the reference run: there is no target, so time to target, ratio
    and reached are n/a in release.md, None in release.json, and release.png says there is no
    reference line — not "never" and "0/1 reached", which read as runs that missed the target."""
    import matplotlib.pyplot as plt

    full = load_scenario(SCENARIO).quick()
    chosen = ["attacked: no defence", "attacked: robust + gate"]
    sc = full.select(chosen)
    results = [_release_run(label, RISING) for label in chosen]
    summary = release_summary(sc, results)
    table = format_release_table(summary)
    assert "never" not in table and "0/1" not in table, table
    rows = [line for line in table.splitlines() if line.startswith("| attacked")]
    assert len(rows) == 2 and all("| n/a | n/a |" in row for row in rows), table
    assert "the reference run 'honest' is not among these runs" in table
    for label in chosen:
        run = summary["runs"][label]
        assert run["reached"] is None and run["worst_ratio"] is None
        assert run["worst_drop_points"] == 0.0 and run["mean_final"] == pytest.approx(0.85)
        assert all(s["target"] is None and s["time_to_target_s"] is None for s in run["seeds"])
    assert summary["reference"] == "honest" and summary["reference_in_runs"] is False
    assert summary["not_computed"] == ["target", "time_to_target_s", "reference_time_s", "ratio", "worst_ratio", "reached"]
    fig = release_figure(sc, results)
    try:
        assert "reference 'honest' not among these runs" in fig.get_suptitle()
        assert not [ln for ax in fig.axes for ln in ax.get_lines() if str(ln.get_label()).startswith("honest")]
    finally:
        plt.close(fig)
    # with the reference: its target (85.0 % at 12 min), reached by both, no note
    summary = release_summary(full.select(["honest", *chosen]), [_release_run(label, RISING) for label in ["honest", *chosen]])
    table = format_release_table(summary)
    assert summary["reference_in_runs"] is True and "not_computed" not in summary
    assert all(run["reached"] == 1 and run["worst_ratio"] == 1.0 for run in summary["runs"].values())
    assert "not among these runs" not in table and "n/a" not in table


def test_quick_attacks_scenario_defences_hold_and_no_defence_collapses(tmp_path: Path) -> None:
    """``edgeci emulate demos/scenarios/attacks.toml --quick`` (four of its runs, same seed)."""
    chosen = ["honest", "attacked: no defence", "attacked: robust + gate", "attacked: clipping + deltas + gate"]
    p = argparse.ArgumentParser()
    emulate.add_arguments(p)
    args = p.parse_args(
        [
            str(SCENARIO),
            "--quick",
            "--no-progress",
            "--out",
            str(tmp_path),
            "--strategies",
            ",".join(chosen),
        ]
    )
    assert emulate.run(args) == 0
    summary = json.loads((tmp_path / "release.json").read_text(encoding="utf-8"))
    table = (tmp_path / "release.md").read_text(encoding="utf-8")
    assert (tmp_path / "release.png").stat().st_size > 10_000
    runs = summary["runs"]
    assert set(runs) == set(chosen)
    none = runs["attacked: no defence"]
    assert none["seeds"][0]["attackers"] == {"flip": 3, "scale": 3, "claim": 0}
    assert runs["honest"]["seeds"][0]["attackers"] == {"flip": 0, "scale": 0, "claim": 0}
    # without defences the release collapses; behind the gate (median or clipping + deltas) it holds
    assert none["worst_drop_points"] > 10, table
    assert none["reached"] == 0, table
    for label in ("attacked: robust + gate", "attacked: clipping + deltas + gate"):
        gated = runs[label]
        assert gated["worst_drop_points"] <= 2, table
        assert all(s["gate"]["gate_promoted"] >= 1 for s in gated["seeds"]), table
        # ... and still learns: the quick run is short, so ask for progress, not the target
        assert all(s["final"] >= s["start"] + 0.05 for s in gated["seeds"]), table


def test_runs_of_one_seed_share_fleet_data_and_validation(digits: Any) -> None:
    """Only the defences differ between the attacks scenario's runs on one seed."""
    sc = load_scenario(SCENARIO).quick()
    sims = {
        r.label: Simulation(digits, r.settings, make_strategy("spin", k=10, timeout_s=16.0), seed=0)
        for r in sc.runs
    }
    honest, attacked = sims["honest"], sims["attacked: robust + gate"]
    for a, b in zip(honest.plans, attacked.plans, strict=True):
        assert np.array_equal(a.samples, b.samples) and np.array_equal(a.label_times, b.label_times)
    assert honest.validation is not None and attacked.validation is not None
    assert np.array_equal(honest.validation.y, attacked.validation.y)
    assert not honest.attacks and attacked.attacks == sims["attacked: no defence"].attacks
    flipped = [i for i, a in attacked.attacks.items() if a.kind == "flip"]
    assert flipped
    for i in flipped:  # a flipper trains on y + 1 mod 10, the honest twin on y
        assert np.array_equal(attacked.devices[i].y, (honest.devices[i].y + 1) % 10)
