"""A researcher's mistakes in a scenario TOML (helper-184's audit of ``edgeci emulate``): each
is refused when the file is loaded, by a :class:`ScenarioError` that names the file, the key
and what is allowed — never a Python ``TypeError`` / ``ValueError`` (a traceback from the
CLI), never silently ignored or read as something else — and ``edgeci emulate`` exits 2."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from devices.scenario import ScenarioError, parse_scenario

NAN, INF = float("nan"), float("inf")

ONE_REGION: dict[str, Any] = {
    "name": "p", "task": "digits", "duration_s": 600, "seeds": [0],
    "fleet": {"devices": 10, "mix": {"phone": 1.0}},
    "runs": [{"strategy": "spin", "label": "a", "params": {"k": 2, "timeout_s": 10.0}},
             {"strategy": "spin", "label": "b", "params": {"k": 3, "timeout_s": 10.0}}],
}
REGIONAL: dict[str, Any] = {
    "name": "r", "task": "digits", "duration_s": 60, "seeds": [0],
    "fleet": {"devices": 8}, "data": {"partition": "labels", "labels_each": 2},
    "multiregion": {"regions": ["hongkong", "paris"], "latency_ms": [[1.0, 100.0], [100.0, 1.0]], "bandwidth_mbps": 100,
                    "device_counts": [8], "single_server_region": "paris", "train_delay_s": {"mean": 0.15, "sd": 0.01}},
    "methods": [{"label": "S", "kind": "spyker", "strategy_params": {"eta": 0.6}, "peering_params": {"beacon_s": 1.0},
                 "service_ms": 2},
                {"label": "F", "kind": "single", "strategy": "fedasync"}],
}


def _with(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """``base`` with ``value`` at ``path`` ("a/b/0/c": tables by key, lists by index)."""
    raw = copy.deepcopy(base)
    *parents, last = path.split("/")
    node: Any = raw
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    node[int(last) if isinstance(node, list) else last] = value
    return raw


def test_the_two_bases_are_valid() -> None:
    assert [r.label for r in parse_scenario(ONE_REGION, source="x.toml").runs] == ["a", "b"]
    sc = parse_scenario(REGIONAL, source="x.toml")
    assert [m.label for m in sc.runs] == ["S", "F"] and sc.regions is not None and sc.regions.stop_at_target


# (path, value, what the message says after the file name)
ONE_REGION_MISTAKES = [
    ("seeds", [0, 0], r"seeds: seed 0 given more than once"),
    ("seeds", [1, 2, 1, 2], r"seeds: seeds 1, 2 given more than once"),
    # A run's settings: keys that are the scenario's (every run shares its seeds, name, ...)
    ("runs/0/overrides", {"seeds": [1, 2]}, r"\[\[runs\]\] #1: overrides: 'seeds' is the scenario's, not a run's"),
    ("runs/0/overrides", {"name": "other"}, r"\[\[runs\]\] #1: overrides: 'name' is the scenario's"),
    ("runs/0/overrides", {"description": "x"}, r"'description' is the scenario's"),
    ("runs/0/overrides", {"reference": "b"}, r"'reference' is the scenario's"),
    ("runs/0/overrides", {"multiregion.regions": ["paris"]}, r"'multiregion.regions' is the scenario's"),
    # [[methods]] or [multiregion] beside [[runs]]: one of them was silently ignored
    ("methods", [{"kind": "single"}], r"has both \[\[runs\]\] and \[\[methods\]\]"),
    # a profile part's base that names nothing fell back to the profile's own part
    ("profiles/phone/compute", {"base": "phonee", "spread": 0.1}, r"\[profiles.phone\] compute: unknown base 'phonee'; known: "),
    # a part's value of the wrong type: the key, not "'>' not supported between 'str' and 'int'"
    ("profiles/phone/compute", {"sample_epoch_s": "1"}, r"\[profiles.phone\] compute: sample_epoch_s must be a finite number, got '1'"),
    ("profiles/phone/link", {"up_bps": "1e6"}, r"\[profiles.phone\] link: up_bps must be a finite number, got '1e6'"),
    ("profiles/phone/availability", {"start_h": "x"}, r"availability: start_h must be a finite number, got 'x'"),
    ("profiles/phone/availability", {"dropout_every_s": True}, r"availability: dropout_every_s must be a finite number, got True"),
    # NaN and infinity (TOML's nan, inf) in a part
    ("profiles/phone/compute", {"overhead_s": INF}, r"compute: overhead_s must be a finite number, got inf"),
    ("profiles/phone/availability", {"dropout_every_s": 60.0, "dropout_mean_s": NAN}, r"dropout_mean_s must be a finite number, got nan"),
    ("profiles/phone/link", {"down_bps": INF}, r"link: down_bps must be a finite number, got inf"),
    # no labels ever: the run measured a fleet without data (λ = 0 is for devices that hold their data)
    ("data/arrival_rate_per_h", 0, r"\[data\]: arrival_rate_per_h = 0 with no initial_samples and no \[device\] continuous: "
                                   r"no device would ever hold a sample"),
    # more delayed devices than the fleet has: refused only when the first run started
    ("delay", {"devices": 20, "report_versions": [5]}, r"\[delay\]: devices = 20 but \[fleet\] devices = 10"),
    ("runs/1/overrides", {"fleet.devices": 4, "delay.devices": 5, "delay.report_versions": [5]},
     r"\[\[runs\]\] #2 \(with overrides\): \[delay\]: devices = 5 but \[fleet\] devices = 4"),
]


@pytest.mark.parametrize(("path", "value", "message"), ONE_REGION_MISTAKES, ids=[f"{p}={v!r}" for p, v, _ in ONE_REGION_MISTAKES])
def test_a_one_region_mistake_is_a_scenario_error_that_names_the_key(path: str, value: Any, message: str) -> None:
    with pytest.raises(ScenarioError, match=r"^x\.toml.*" + message):
        parse_scenario(_with(ONE_REGION, path, value), source="x.toml")


REGIONAL_MISTAKES = [
    # [multiregion]: types read with float() / int() / bool() accepted strings, floats and anything
    ("multiregion/latency_ms", [["1", "2"], ["3", "4"]], r"\[multiregion\]: latency_ms must be a 2×2 matrix of numbers"),
    ("multiregion/latency_ms", "x", r"\[multiregion\]: latency_ms must be a 2×2 matrix of numbers"),
    ("multiregion/bandwidth_mbps", "100", r"\[multiregion\]: bandwidth_mbps must be a finite number, got '100'"),
    ("multiregion/bandwidth_mbps", INF, r"\[multiregion\]: bandwidth_mbps must be a finite number, got inf"),
    ("multiregion/bandwidth_mbps", [100], r"\[multiregion\]: bandwidth_mbps must be a finite number"),
    ("multiregion/regions", "paris", r"\[multiregion\]: regions must be a non-empty list of region names"),
    ("multiregion/regions", [], r"\[multiregion\]: regions must be a non-empty list of region names, got \[\]"),
    ("multiregion/device_counts", 8, r"\[multiregion\]: device_counts must be a list of fleet sizes"),
    ("multiregion/device_counts", ["8"], r"\[multiregion\]: device_counts must be a list of fleet sizes"),
    ("multiregion/device_counts", [8.7], r"\[multiregion\]: device_counts must be a list of fleet sizes"),
    ("multiregion/device_counts", [8, 8], r"\[multiregion\]: device_counts: 8 given more than once"),
    ("multiregion/device_counts", [1], r"\[multiregion\]: device_counts must each be >= the number of regions \(2\), got \[1\]"),
    ("multiregion/single_server_region", 3, r"\[multiregion\]: single_server_region must be one of hongkong, paris, got 3"),
    ("multiregion/train_delay_s", {"mean": 0.15, "sdd": 0.5}, r"\[multiregion\] train_delay_s: unknown key 'sdd'; did you mean 'sd'\?"),
    ("multiregion/train_delay_s", {"mean": 0.15, "sd": NAN}, r"\[multiregion\] train_delay_s: sd must be a finite number, got nan"),
    ("multiregion/train_delay_s", {"mean": INF}, r"\[multiregion\] train_delay_s: mean must be a finite number, got inf"),
    ("multiregion/train_delay_s", {"mean": "x"}, r"\[multiregion\] train_delay_s: mean must be a finite number, got 'x'"),
    ("multiregion/train_delay_s", 0.15, r"\[multiregion\]: train_delay_s must be a table \{ mean = …, sd = … \}"),
    ("multiregion/stop_at_target", "false", r"\[multiregion\]: stop_at_target must be true or false, got 'false'"),
    ("multiregion/stop_at_target", 0, r"\[multiregion\]: stop_at_target must be true or false, got 0"),
    ("multiregion/cost", {"resources": ["a"], "price_per_s": 1e-4, "speed": "2"}, r"\[multiregion.cost\]: speed must be numbers"),
    ("multiregion/cost", {"resources": ["a"], "price_per_s": 1e-4, "transfer_per_gb": True}, r"\[multiregion.cost\]: transfer_per_gb must be numbers"),
    # [[methods]]
    ("methods/0/strategy_params", [1], r"\[\[methods\]\] #1: strategy_params must be a table"),
    ("methods/0/strategy_params", "x", r"\[\[methods\]\] #1: strategy_params must be a table"),
    ("methods/0/peering_params", [[1, 2]], r"\[\[methods\]\] #1: peering_params must be a table"),
    ("methods/0/service_ms", -1, r"\[\[methods\]\] #1: service_ms must be >= 0, got -1"),
    ("methods/0/service_ms", NAN, r"\[\[methods\]\] #1: service_ms must be a finite number, got nan"),
    ("methods/0/service_ms", "2", r"\[\[methods\]\] #1: service_ms must be a finite number, got '2'"),
    ("methods/0/msg_ms", [1], r"\[\[methods\]\] #1: msg_ms must be a finite number, got \[1\]"),
    ("methods/0/label", 3, r"\[\[methods\]\] #1: label must be a non-empty string"),
    ("methods/0/label", "", r"\[\[methods\]\] #1: label must be a non-empty string"),
    ("methods/1/strategy", 3, r"\[\[methods\]\] #2: strategy must be a strategy name"),
    ("methods/0/kind", "spikers", r"\[\[methods\]\] #1: kind must be one of spyker, nebula, hierfavg, single, got 'spikers'"),
    ("methods/0/strategy_param", {}, r"\[\[methods\]\] #1: unknown key 'strategy_param'; did you mean 'strategy_params'\?"),
    # what a regional scenario does not read
    ("runs", [{"strategy": "spin"}], r"has both \[\[runs\]\] and \[\[methods\]\]"),
    ("reference", "S", r"reference is for \[\[runs\]\] scenarios"),
    ("name", 3, r"name and description must be strings"),
    # its [quick] is checked when the file is loaded, as a one-region scenario's
    ("quick", {"multiregion.device_count": [2]}, r"\[quick\].*unknown key 'device_count'"),
]


@pytest.mark.parametrize(("path", "value", "message"), REGIONAL_MISTAKES, ids=[f"{p}={v!r}" for p, v, _ in REGIONAL_MISTAKES])
def test_a_regional_mistake_is_a_scenario_error_that_names_the_key(path: str, value: Any, message: str) -> None:
    with pytest.raises(ScenarioError, match=r"^x\.toml.*" + message):
        parse_scenario(_with(REGIONAL, path, value), source="x.toml")


def test_a_scenario_mistake_is_one_line_and_exit_status_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Exit 2 as argparse's usage errors and ``python -m devices.multiregion`` (every retry fails
    the same way); the message names the file and the key; no traceback."""
    from demos.cli import main

    typo = tmp_path / "typo.toml"
    typo.write_text('task = "digits"\n[data]\naplha = 0.5\n[[runs]]\nstrategy = "spin"\n')
    assert main(["emulate", str(typo), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err == f"edgeci emulate: error: {typo}: [data]: unknown key 'aplha'; did you mean 'alpha'?\n", err
    task = tmp_path / "task.toml"
    task.write_text('task = "digitz"\n[[runs]]\nstrategy = "spin"\n')
    assert main(["emulate", str(task), "--out", str(tmp_path / "o")]) == 2
    assert f"{task}: unknown task 'digitz'; known: " in capsys.readouterr().err
    regional = tmp_path / "regional.toml"
    regional.write_text('[multiregion]\nbandwidth_mbps = "100"\n[[methods]]\nkind = "single"\n')
    assert main(["emulate", str(regional), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == (f"edgeci emulate: error: {regional}: [multiregion]: bandwidth_mbps must be a finite "
                                       "number, got '100'\n")
    assert not (tmp_path / "o").exists()


def test_emulate_help_says_quick_full_outputs_and_replot(capsys: pytest.CaptureFixture[str]) -> None:
    from demos.cli import main

    with pytest.raises(SystemExit):
        main(["emulate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for needle in ("[quick] table", "without one, --quick runs the full scenario",
                   "runs/emulate/<scenario name>", "time_to_target.md", "summary.json", "accuracy.png", "runs/<label>__seed<k>.csv",
                   "release.md", "--replot", "the same --quick, --seeds and --strategies",
                   "[multiregion]", "exit status 2"):
        assert needle in text, (needle, text)


def test_a_dataset_not_on_disk_is_exit_1_not_a_scenario_mistake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """The scenario is right; the machine lacks the files (copy them, run again): exit 1."""
    from demos.cli import main
    from devices.report import DATA_ENV

    monkeypatch.setenv(DATA_ENV, str(tmp_path / "data"))
    mnist = tmp_path / "mnist.toml"
    mnist.write_text('task = "mnist"\n[[runs]]\nstrategy = "spin"\n')
    assert main(["emulate", str(mnist), "--out", str(tmp_path / "o")]) == 1
    assert f"error: {mnist}: task 'mnist' needs the MNIST files of torchvision under {tmp_path / 'data'}" in capsys.readouterr().err


@pytest.mark.parametrize(("table", "message"), [
    ('[data]\npartition = "labels"\nlabels_each = 11\n', "run 'b': [data] labels_each = 11 but task 'digits' has 10 classes"),
    ("[delay]\ndevices = 2\nclass = 10\nreport_versions = [3]\n", "run 'b': [delay] class = 10 but task 'digits' has classes 0 to 9"),
    ("[coordinator]\nvalidation_size = 900\n", "run 'b': [coordinator] validation_size = 900 is over a quarter of task 'digits'"),
])
def test_what_the_task_cannot_do_is_refused_before_the_first_run(table: str, message: str, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """labels_each above the task's classes, or a [delay] class it does not have, was refused only
    when a run reached it (after the runs before it, a traceback-free exit 1 with no file named)."""
    from demos.cli import main

    path = tmp_path / "s.toml"
    fine = table.replace("11", "2").replace("class = 10", "class = 3")
    fine = fine.replace("900", "20")
    key, value = next(kv for kv in (("data.labels_each", 11), ("delay.class", 10), ("coordinator.validation_size", 900))
                      if kv[0].split(".")[1] in table)  # run b's override: the mistake
    path.write_text(f'task = "digits"\nduration_s = 60\n[fleet]\ndevices = 4\n{fine}'
                    '[[runs]]\nstrategy = "spin"\nlabel = "a"\nparams = { k = 2 }\n'
                    f'[[runs]]\nstrategy = "spin"\nlabel = "b"\nparams = {{ k = 2 }}\noverrides = {{ "{key}" = {value} }}\n')
    assert main(["emulate", str(path), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"edgeci emulate: error: {path}: {message}" in err and "run(s)" not in err, err
    assert not (tmp_path / "o").exists()


def test_labels_whose_run_files_would_have_one_name_are_refused() -> None:
    """Labels that differ only where a file name cannot (non-ASCII, punctuation): the second
    run's files overwrote the first's, and --replot read one file for both runs."""
    raw = _with(_with(ONE_REGION, "runs/0/label", "β = 1"), "runs/1/label", "α = 1")
    with pytest.raises(ScenarioError, match=r"^x\.toml: \[\[runs\]\] #2: labels 'β = 1' and 'α = 1' both name their run files "
                                            r"'1__seed<k>' \(in runs/\): make them differ in a letter or digit"):
        parse_scenario(raw, source="x.toml")
    regional = _with(_with(REGIONAL, "methods/0/label", "S 1"), "methods/1/label", "S/1")
    with pytest.raises(ScenarioError, match=r"^x\.toml: \[\[methods\]\] #2: labels 'S 1' and 'S/1' both name their run files "
                                            r"'S-1__<devices>__seed<k>'"):
        parse_scenario(regional, source="x.toml")


@pytest.mark.parametrize(("change", "message"), [
    ({"runs": [{"strategy": "spin"}]}, r"a \[stream\] scenario has no \[\[runs\]\]"),
    ({"methods": [{"kind": "single"}]}, r"a \[stream\] scenario has no \[\[methods\]\]"),
    ({"reference": "x"}, r"a \[stream\] scenario has no reference"),
    ({"quick": {"stream.round": 3}}, r"\[quick\]: \[stream\]: unknown key 'round'; did you mean 'rounds'\?"),
    ({"quick": {"stream.rounds": 0}}, r"\[quick\]: \[stream\]: rounds must be >= 1, got 0"),
])
def test_a_stream_scenario_refuses_what_it_would_ignore_and_checks_its_quick_form(change: dict[str, Any], message: str) -> None:
    from devices.scc_fleet import parse_scc_scenario
    from devices.scenario import read_toml

    raw = {**read_toml(Path(__file__).resolve().parents[1] / "demos" / "scenarios" / "scc-stream.toml"), **change}
    with pytest.raises(ScenarioError, match=r"^x\.toml.*" + message):
        parse_scc_scenario(raw, source="x.toml")


def test_a_regional_labels_each_above_the_task_classes_is_refused_before_the_first_run(tmp_path: Path,
                                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from demos.cli import main

    path = tmp_path / "r.toml"
    path.write_text('task = "digits"\nduration_s = 2\n[data]\npartition = "labels"\nlabels_each = 11\n[multiregion]\n'
                    'regions = ["hongkong", "paris"]\nlatency_ms = [[1.0, 100.0], [100.0, 1.0]]\ndevice_counts = [4]\n'
                    '[[methods]]\nlabel = "F"\nkind = "single"\n')
    assert main(["emulate", str(path), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert capsys.readouterr().err == f"edgeci emulate: error: {path}: [data] labels_each = 11 but task 'digits' has 10 classes\n"
    assert not (tmp_path / "o").exists()
