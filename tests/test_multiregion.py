"""The multi-region emulator (devices/multiregion.py): tiny fleets, a few virtual seconds."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from devices.engine import Kind
from devices.multiregion import (
    PAPER_LATENCY_MS,
    PAPER_REGIONS,
    MultiRegionRun,
    load_multiregion,
    main,
    parse_multiregion,
)
from devices.report import format_region_tables, summarise_regions
from devices.scenario import ScenarioError
from edge_sdk.core.events import Publish
from edge_sdk.tasks import get_task
from edge_sdk.wire import topics

ROOT = Path(__file__).resolve().parents[1]
SCENARIO = ROOT / "demos" / "scenarios" / "multiregion" / "digits-4regions.toml"


def tiny(**mr: Any) -> dict[str, Any]:
    return {
        "name": "tiny",
        "task": "digits",
        "duration_s": 1.5,
        "eval_every_s": 0.5,
        "target_accuracy": 0.99,
        "seeds": [0],
        "data": {"partition": "labels", "labels_each": 2},
        "training": {"epochs": 1, "batch_size": 16, "lr": 0.05},
        "multiregion": {"device_counts": [8], "single_server_region": "california", **mr},
        "quick": {},
        "methods": [
            {"label": "S", "kind": "spyker", "peering_params": {"beacon_s": 0.5, "token_timeout_s": 2.0}},
            {"label": "N", "kind": "nebula", "strategy_params": {"planets": 2, "t_c": 0.5}, "peering_params": {"t_c": 0.5}},
            {"label": "F", "kind": "single", "strategy": "fedasync"},
            {"label": "H", "kind": "hierfavg", "peering_params": {"cloud": "california", "kappa2": 1}, "service_ms": 15},
        ],
    }


def test_the_shipped_scenario_is_valid() -> None:
    sc = load_multiregion(SCENARIO)
    assert sc.topology.regions == PAPER_REGIONS and sc.topology.latency_ms == PAPER_LATENCY_MS
    assert sc.device_counts == (100, 200, 300)
    assert {m.kind for m in sc.methods} == {"spyker", "nebula", "single", "hierfavg"}
    quick = load_multiregion(SCENARIO, quick=True)
    assert quick.device_counts == (100,) and quick.settings.duration_s <= sc.settings.duration_s


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"multiregion": {"latency_ms": [[1.0]]}}, "matrix"),
        ({"multiregion": {"single_server_region": "mars"}}, "single_server_region"),
        ({"multiregion": {"typo": 1}}, "unknown key 'typo'"),
        ({"methods": [{"kind": "gossip"}]}, "kind must be"),
        ({"methods": [{"kind": "spyker", "peering_params": {"h_intr": 3}}]}, "known parameters"),
        ({"methods": [{"kind": "nebula", "strategy": "spin"}]}, "needs strategy 'nebula'"),
    ],
)
def test_bad_scenarios_fail_fast(change: dict[str, Any], match: str) -> None:
    raw = tiny()
    for key, value in change.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) else value
    with pytest.raises(ScenarioError, match=match):
        parse_multiregion(raw)


def test_methods_are_selected_by_label_or_kind() -> None:
    sc = parse_multiregion(tiny())
    assert [m.label for m in sc.select(["spyker", "F"]).methods] == ["S", "F"]
    with pytest.raises(ScenarioError, match="no method"):
        sc.select(["gossip"])


def test_every_method_runs_and_peers_exchange() -> None:
    sc = parse_multiregion(tiny())
    task = get_task("digits", device="cpu")
    results = {}
    for m in sc.methods:
        run = MultiRegionRun(task, sc, m, 8, 0)
        r = run.run()
        results[m.label] = (r, run)
        assert r.summary["updates"] > 0 and r.rows[0]["t_s"] == 0.0
        assert r.summary["coordinators"] == (1 if m.kind == "single" else 4)
    spyker = results["S"][1]
    assert all(c.core.peering.describe()["merges"] > 0 for c in spyker.coords)
    assert sum(c.core.peering.describe()["holds_token"] for c in spyker.coords) <= 1
    assert results["S"][0].summary["bytes_peer"] > 0 and results["F"][0].summary["bytes_peer"] == 0
    assert all(c.core.peering.describe()["sent"] >= 1 for c in results["N"][1].coords)
    hier = results["H"][1]
    cloud = hier.coords[3].core.peering.describe()  # california is the cloud
    assert cloud["cloud_syncs"] >= 1
    # Synchronous: no edge runs a cloud round ahead of another (kappa2 = 1, no timeouts).
    rounds = [c.core.peering.describe()["cloud_round"] for c in hier.coords]
    assert max(rounds) - min(rounds) <= 1 and min(rounds) >= 1
    summary = summarise_regions(sc, [r for r, _ in results.values()])
    for label, (r, _) in results.items():
        row = summary["methods"][label]["by_devices"]["8"]
        assert row["updates"] == r.summary["updates"] and row["final_accuracy"] == pytest.approx(r.summary["final_accuracy"])
    table = format_region_tables(sc, summary)
    lines = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ") and "---" not in line}
    assert {"S", "N", "F", "H"} <= set(lines)
    assert f"{summary['methods']['S']['by_devices']['8']['final_accuracy']:.3f}" in lines["S"]


def test_a_local_message_does_not_queue_behind_one_crossing_an_ocean() -> None:
    sc = parse_multiregion(tiny())
    run = MultiRegionRun(get_task("digits", device="cpu"), sc, sc.methods[0], 8, 0)
    n = run.n
    big = b"x" * 100_000
    # paris' coordinator sends to hongkong's (195 ms), then a hongkong device pulls (1.4 ms)
    run.publish(n + 1, Publish(topic=topics.peer_topic("hongkong", "beat"), payload=big), 0.0)
    run.publish(0, Publish(topic=topics.device_topic("hongkong", "d0000", "pull"), payload=b"y" * 100), 0.0)
    arrivals: list[tuple[float, str]] = []
    run.trace = lambda now, kind, target, data: arrivals.append((now, data[0].rsplit("/", 1)[-1])) \
        if kind == Kind.MSG and target == n else None
    while len(arrivals) < 2 and run.step(until=1.0) is not None:
        pass
    (t_pull, first), (t_beat, second) = arrivals[:2]
    assert (first, second) == ("pull", "beat")
    assert t_pull < 0.01, "the local pull waited behind the long-haul beat"
    # the beat: 0.8 Mbit at 100 Mbit/s up, 194.9 ms, 0.8 Mbit down
    assert t_beat == pytest.approx(0.008 + 0.1949 + 0.008)


def test_the_command_writes_a_table_and_plots(tmp_path: Path) -> None:
    import tomllib

    raw = tomllib.loads(SCENARIO.read_text())
    raw["duration_s"] = 1.0
    raw["multiregion"]["device_counts"] = [8, 12]
    spyker = next(m for m in raw["methods"] if m["kind"] == "spyker")
    raw["methods"] = [spyker, *(m for m in raw["methods"] if m["kind"] == "single")]
    path = tmp_path / "s.toml"
    import json

    path.write_text(_toml(raw))
    assert main([str(path), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    table = (tmp_path / "out" / "time_to_target.md").read_text()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    # The scaling table reports the measured ratio of 12 over 8 devices for each method.
    scaling = summary["methods"][spyker["label"]]["scaling"]["12"]
    row = [line for line in table.splitlines() if line.startswith(f"| {spyker['label']} |")][-1]
    cell = row.split("|")[2].strip()
    assert cell == "—" if scaling["kind"] == "undefined" else cell.lstrip("≥ ").startswith(f"{scaling['time']:.2f}")
    assert "12 devices" in table
    assert (tmp_path / "out" / "accuracy.png").stat().st_size > 10_000
    assert set(summary["methods"]) == {spyker["label"], "FedAsync (1 server)"}
    assert dataclasses.is_dataclass(load_multiregion(path))


def _toml(raw: dict[str, Any]) -> str:
    """Just enough TOML for the scenario's shapes (no writer in the standard library)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ") + '"'
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f'"{k}" = {value(x)}' for k, x in v.items()) + " }"
        return repr(v)

    lines = []
    tables = []
    for k, v in raw.items():
        if isinstance(v, dict) and k not in ("quick",):
            tables.append((k, v))
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            continue
        elif k != "quick":
            lines.append(f"{k} = {value(v)}")
    for k, v in tables:
        lines.append(f"[{k}]")
        lines += [f'"{kk}" = {value(vv)}' for kk, vv in v.items()]
    for m in raw.get("methods", []):
        lines.append("[[methods]]")
        lines += [f"{kk} = {value(vv)}" for kk, vv in m.items()]
    return "\n".join(lines) + "\n"


def test_regional_and_single_region_scenarios_share_one_schema() -> None:
    from devices.scenario import RunSpec, load_scenario
    from devices.simulator import run_spec

    sc = load_scenario(SCENARIO)  # the one loader reads [[methods]] as it reads [[runs]]
    assert sc.regions is not None and all(isinstance(m, RunSpec) and m.regional for m in sc.runs)
    assert {m.kind: m.strategy for m in sc.methods}["single"] == "fedasync"
    assert sc.with_seeds([3, 4]).settings.seeds == (3, 4) and sc.with_seeds([3]).device_counts == sc.device_counts
    with pytest.raises(ScenarioError, match="regional method"):
        run_spec(get_task("digits", device="cpu"), sc.runs[0], 0)
    plain = load_scenario(ROOT / "demos" / "scenarios" / "digits-headline.toml")
    assert plain.regions is None and not any(r.regional for r in plain.runs)
    with pytest.raises(ScenarioError, match="not a regional scenario"):
        _ = plain.topology


def test_a_single_region_without_peering_is_one_coordinator_on_the_region_matrix() -> None:
    sc = parse_multiregion({**tiny(regions=["solo"], latency_ms=[[5.0]], single_server_region="solo"),
                            "methods": [{"label": "one", "kind": "single", "strategy": "spin", "strategy_params": {"k": 2}}]})
    run = MultiRegionRun(get_task("digits", device="cpu"), sc, sc.methods[0], 5, 0)
    r = run.run()
    assert len(run.coords) == 1 and r.summary["bytes_peer"] == 0 and r.summary["updates"] >= 2
    # A pull, its model and the update each cross the 5 ms one-way latency (plus ~150 ms of training).
    assert min(t for t in run.coords[0].commit_times.values() if t > 0) > 0.015 + 0.1


def test_the_coordinators_pull_limits_come_from_the_scenario() -> None:
    raw = {**tiny(), "coordinator": {"pull_refill_s": 0.0, "pull_burst": 3}}
    sc = parse_multiregion(raw)
    run = MultiRegionRun(get_task("digits", device="cpu"), sc, sc.methods[0], 8, 0)
    assert all((c.core.config.pull_refill_s, c.core.config.pull_burst) == (0.0, 3.0) for c in run.coords)
    default = MultiRegionRun(get_task("digits", device="cpu"), parse_multiregion(tiny()), sc.methods[0], 8, 0)
    assert default.coords[0].core.config.pull_refill_s > 0, "unset: the coordinator's own limit"
    with pytest.raises(ScenarioError, match="pull_burst must be >= 1"):
        parse_multiregion({**tiny(), "coordinator": {"pull_burst": 0}})


def test_the_command_loads_the_task_with_the_scenarios_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # paper-spyker.toml asks for procdigits at 6,000 / 1,000; the command once ignored task_options and
    # built the full 60,000-image set.
    import devices.report

    seen: list[tuple[str, Any]] = []

    class Stop(Exception):
        pass

    def record(name: str, options: Any = None) -> Any:
        seen.append((name, options))
        raise Stop

    monkeypatch.setattr(devices.report, "load_task", record)
    scenario = ROOT / "demos" / "scenarios" / "multiregion" / "paper-spyker.toml"
    with pytest.raises(Stop):
        main([str(scenario), "--out", str(tmp_path / "out"), "--no-progress"])
    assert seen == [("procdigits", {"size": [6000, 1000]})]


@pytest.mark.parametrize("module", ["multiregion", "paper_spyker", "paper_nebula"])
def test_module_entry_points_report_a_user_mistake_in_one_line(module: str, tmp_path: Path) -> None:
    """``python -m devices.<module>`` with a missing scenario: one line and exit status 2, no traceback."""
    proc = subprocess.run([sys.executable, "-m", f"devices.{module}", str(tmp_path / "nosuch.toml")],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"python -m devices.{module}: error: scenario file not found: {tmp_path / 'nosuch.toml'}"]


def test_edgeci_emulate_runs_a_regional_scenario(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`edgeci emulate` hands a [multiregion] scenario to the regional sweep (it used to
    stop at the first method with "run it with python -m devices.multiregion"), its
    choices passed on; options that mean nothing there are refused before anything runs."""
    import json

    from demos.cli import main as edgeci
    from devices.multiregion import run_name

    raw = tiny()
    raw["methods"] = [m for m in raw["methods"] if m["kind"] in ("spyker", "single")]
    path = tmp_path / "regional.toml"
    path.write_text(_toml(raw))
    out = tmp_path / "out"
    assert edgeci(["emulate", str(path), "--out", str(out), "--no-progress", "--strategies", "S", "--duration", "1.0", "--seeds", "0"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["methods"]) == {"S"}
    assert sorted(p.name for p in (out / "runs").glob("*.json")) == [run_name("S", 8, 0) + ".json"]
    run = json.loads((out / "runs" / (run_name("S", 8, 0) + ".json")).read_text())
    assert run["rows"][-1]["t_s"] <= 1.0 and "| S |" in (out / "time_to_target.md").read_text()
    capsys.readouterr()
    assert edgeci(["emulate", str(path), "--out", str(tmp_path / "empty"), "--replot"]) == 1  # nothing stored to report
    assert "holds no run of this scenario" in capsys.readouterr().err and not (tmp_path / "empty").exists()
    for refused in (["--target", "0.5"], ["--broker", "mqtt://127.0.0.1:1"], ["--threads", "2"], ["--transport", "codec"]):
        capsys.readouterr()
        assert edgeci(["emulate", str(path), "--out", str(tmp_path / "refused"), *refused]) == 2  # a usage error (exit 2, as a bad option)
        assert "error: a [multiregion] scenario takes --strategies" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()


@pytest.mark.parametrize("module, argv, needle", [
    ("devices.multiregion", ["digits-4regions.toml", "--devices", "0"], "every fleet size must be at least the number of regions (4)"),
    ("devices.multiregion", ["digits-4regions.toml", "--jobs", "0"], "argument --jobs: must be at least 1, got 0"),
    ("devices.paper_nebula", ["paper-spyker.toml"], "has no [multiregion.cost]"),
    ("devices.paper_nebula", ["paper-nebula.toml", "--baseline", "nope"], "--baseline 'nope' is not one of the methods run"),
    ("devices.paper_spyker", ["paper-spyker.toml", "--baseline", "FedAsync (1 servr)"], "(did you mean 'FedAsync (1 server)'?)"),
])
def test_sweep_command_lines_refuse_what_would_mislabel_or_crash_a_report(module: str, argv: list[str], needle: str,
                                                                          tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """helper-88: --devices 0 ran the scenario's own fleet reported as "0 devices"; paper_nebula ran
    every method before a traceback on a scenario without costs; a mistyped --baseline gave a table
    of "—"; --jobs 0 was taken. Each is a usage error before any run."""
    import importlib

    main = importlib.import_module(module).main
    scenario = str(ROOT / "demos" / "scenarios" / "multiregion" / argv[0])
    with pytest.raises(SystemExit) as exit_:
        main([scenario, *argv[1:], "--quick", "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2 and needle in capsys.readouterr().err
