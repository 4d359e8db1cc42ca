"""Canary (federated, test-then-train) evaluation in the emulator (issue 10): the scenario keys,
cohort devices scoring each new label with the release and the candidate before storing it,
their reports reaching the gate, and a ×1000 attacker's candidate rejected on canary evidence
alone — no validation set at the coordinator."""

from __future__ import annotations

import json
from typing import Any

import pytest

from coordinator.strategies import make_strategy
from devices.scenario import ScenarioError, gate_config, parse_scenario
from devices.simulator import Simulation
from tests.helpers import digits_scenario, single_threaded_digits


@pytest.fixture(scope="module")
def digits() -> Any:
    return single_threaded_digits()


def small(**extra: Any) -> dict[str, Any]:
    return digits_scenario(**{"duration_s": 420, "devices": 12, "arrival_rate_per_h": 600, **extra})


CANARY = {"gate": True, "canary": 0.3, "canary_samples": 8, "canary_min_reports": 3, "canary_deadline_s": 60.0}
NO_DEFENCE = {"k": 4, "timeout_s": 10.0, "clip_multiplier": 0, "sample_weight_cap": 0, "combiner": "mean"}


def test_canary_keys_build_the_gate() -> None:
    s = parse_scenario(small(coordinator={**CANARY, "gate_z": 1.5, "validation_size": 40})).settings
    g = gate_config(s)
    assert g.validation and g.paired_z == 1.5
    assert g.canary is not None
    assert (g.canary.fraction, g.canary.samples, g.canary.min_reports, g.canary.deadline_s) == (0.3, 8, 3, 60.0)
    # canary alone is evidence enough: no validation set needed
    alone = gate_config(parse_scenario(small(coordinator=CANARY)).settings)
    assert not alone.validation and alone.canary is not None
    # off by default: the gate exactly as before
    plain = gate_config(parse_scenario(small(coordinator={"gate": True, "validation_size": 40})).settings)
    assert plain.canary is None and plain.validation and plain.paired_z == 1.0


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"gate": True, "canary": 0}, "validation_size"),
        ({"gate": True, "canary": 1.5}, "canary"),
        ({"gate": True, "canary": 0.2, "canary_min_reports": 1}, "canary_min_reports"),
        ({"gate": True, "canary": 0.2, "canary_samples": 20_000}, "samples"),
        ({"gate": True, "canary": 0.2, "canary_deadline_s": 0}, "canary_deadline_s"),
        ({"gate": True, "validation_size": 40, "gate_z": -1}, "gate_z"),
        ({"gate": True, "canary": 0.2, "canary_sample": 3}, "canary_sample"),
    ],
)
def test_bad_canary_keys_fail_at_load(patch: dict[str, Any], message: str) -> None:
    with pytest.raises(ScenarioError, match=message):
        parse_scenario(small(coordinator=patch))


def _run(digits: Any, raw: dict[str, Any], params: dict[str, Any]) -> tuple[Simulation, Any]:
    sc = parse_scenario(raw)
    sim = Simulation(digits, sc.settings, make_strategy("spin", **params), seed=1)
    return sim, sim.run()


def test_scaled_attacker_is_rejected_on_canary_evidence_alone(digits: Any) -> None:
    raw = small(coordinator=CANARY, attack={"scale": 0.25, "scale_factor": 1000.0})
    sim, result = _run(digits, raw, NO_DEFENCE)
    assert sim.validation is None  # nothing at the coordinator: only the devices' labels judge
    canary = result.summary["canary"]
    assert canary["canary_rounds"] >= 2 and canary["canary_invited"] >= 3
    assert canary["canary_fetches"] >= 3 and canary["canary_reports"] >= 3
    assert canary["labels_scored"] >= canary["canary_reports"]
    rejected = [d for d in sim.releases if d["action"] == "reject"]
    assert rejected and result.summary["gate"]["gate_rejected"] == len(rejected)
    for d in rejected:
        c = d["canary"]
        assert c["reports"] >= 3 and c["paired"][1] > c["paired"][0]  # the release right far more often
    # the release never took the attacked candidates: it stays at the start
    start = result.rows[0]["release_accuracy"]
    assert min(r["release_accuracy"] for r in result.rows) >= start - 0.02
    # deterministic for a seed
    again, result2 = _run(digits, raw, NO_DEFENCE)
    assert again.releases == sim.releases
    assert json.dumps(result2.rows) == json.dumps(result.rows)  # (nan losses: compared as text)
    assert result2.summary["canary"] == canary


def test_honest_fleet_is_promoted_on_canary_evidence(digits: Any) -> None:
    sim, result = _run(digits, small(coordinator=CANARY), {"k": 4, "timeout_s": 10.0})
    promoted = [d for d in sim.releases if d["action"] == "promote"]
    assert promoted and any(d.get("canary") and d["canary"]["reports"] >= 3 for d in promoted)
    assert result.rows[-1]["release_version"] >= 1
    assert result.rows[-1]["release_accuracy"] > result.rows[0]["release_accuracy"]


def test_canary_off_changes_nothing(digits: Any) -> None:
    # canary = 0 (the default) builds the very gate the scenario had before the keys existed
    raw = small(coordinator={"gate": True, "validation_size": 60, "canary_samples": 5, "canary_deadline_s": 30.0})
    sim, result = _run(digits, raw, {"k": 4, "timeout_s": 10.0})
    assert "canary" not in result.summary
    assert all(d.get("canary") is None for d in sim.releases)
    assert sim.canary_scored == 0


def test_attacks_scenario_has_the_canary_run() -> None:
    from pathlib import Path

    from devices.scenario import load_scenario

    sc = load_scenario(Path(__file__).resolve().parents[1] / "demos" / "scenarios" / "attacks.toml")
    by = {r.label: r for r in sc.runs}
    run = by["attacked: clipping + gate + canary"]
    plain = by["attacked: clipping + gate"]
    assert run.params == plain.params and "combine" not in run.params  # SPIN's default combine = "models"
    assert run.settings.attack == plain.settings.attack and run.settings.validation_size == plain.settings.validation_size
    g = gate_config(run.settings)
    assert g.canary is not None and 0 < g.canary.fraction <= 1 and g.validation
    assert gate_config(plain.settings).canary is None


def test_partial_reports_at_the_deadline_reach_the_gate(digits: Any) -> None:
    # 60 labels/h per device: nobody scores 20 new labels within 60 s; each reports what it has at its deadline
    raw = small(duration_s=300, data={"partition": "dirichlet", "alpha": 1.0, "arrival_rate_per_h": 120},
                coordinator={**CANARY, "canary_samples": 20, "validation_size": 60})
    _, result = _run(digits, raw, {"k": 4, "timeout_s": 10.0})
    canary = result.summary["canary"]
    assert canary["labels_scored"] >= 1 and canary["canary_rounds"] >= 1
    assert canary.get("canary_reports", 0) >= 1
