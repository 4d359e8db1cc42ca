"""Scenario parsing and report numbers no test checked (helper-198's mutation audit of
``devices/scenario.py`` and ``devices/report.py``).

Each test kills a drawn mutant that survived the fastest tests covering its line: a scenario key
read with the wrong default, a validation that stopped refusing (or started refusing a valid
file), a table or JSON value computed wrong. The docstrings name the mutants (file:line at the
audit's base commit 4899075, and the mutation)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from devices.report import (
    MissingDataset,
    format_region_tables,
    format_table,
    load_task,
    sensitivity_targets,
    summarise,
    summarise_regions,
)
from devices.scenario import Scenario, ScenarioError, Topology, parse_cost, parse_scenario
from devices.simulator import RunResult
from edge_sdk.errors import ConfigError

ONE_REGION: dict[str, Any] = {
    "name": "p", "task": "digits", "duration_s": 600, "seeds": [0],
    "fleet": {"devices": 10, "mix": {"phone": 1.0}},
    "runs": [{"strategy": "spin", "label": "a", "params": {"k": 2, "timeout_s": 10.0}}],
}


def _one(**tables: Any) -> dict[str, Any]:
    raw = copy.deepcopy(ONE_REGION)
    raw.update(tables)
    return raw


# --------------------------------------------------------------------------- scenario.py


def test_a_labels_partition_without_labels_each_gives_each_device_two_classes() -> None:
    """scenario.py:215 (``Settings.labels_each = 2`` -> 3: the documented default of [data] labels_each)."""
    s = parse_scenario(_one(data={"partition": "labels"}), source="x.toml").settings
    assert s.partition == "labels" and s.labels_each == 2


def test_topology_refuses_a_latency_matrix_with_a_row_too_many() -> None:
    """scenario.py:336 (``len(latency_ms) != n or any(len(row) != n ...)``: ``or`` -> ``and``, so a
    3×2 matrix for two regions passed)."""
    with pytest.raises(ConfigError, match=r"latency_ms must be a 2×2 matrix"):
        Topology(regions=("a", "b"), latency_ms=((1.0, 2.0), (2.0, 1.0), (3.0, 3.0)))
    with pytest.raises(ConfigError, match=r"latency_ms must be a 2×2 matrix"):
        Topology(regions=("a", "b"), latency_ms=((1.0, 2.0), (2.0,)))
    assert Topology(regions=("a", "b"), latency_ms=((1.0, 2.0), (2.0, 1.0))).latency_ms[1] == (2.0, 1.0)


def test_a_cost_model_may_be_free_and_transfer_defaults_to_free() -> None:
    """scenario.py:409 (``numbers``: ``x >= 0`` -> ``x > 0`` for prices: a free resource, and the
    default ``transfer_per_gb = 0``, refused)."""
    cost = parse_cost({"resources": ["own", "rented"], "price_per_s": [0.0, 1e-4]}, 2, "c")
    assert cost.price_per_s == ((0.0, 1e-4), (0.0, 1e-4))
    assert cost.transfer_per_gb == ((0.0, 0.0), (0.0, 0.0)) and cost.speed == (1.0, 1.0)
    assert cost.transfer(0, 1, 10**9) == 0.0 and cost.compute(1, 1, 10.0) == pytest.approx(1e-3)
    with pytest.raises(ScenarioError, match=r"c: price_per_s must be finite and >= 0"):
        parse_cost({"resources": ["a"], "price_per_s": [-1.0]}, 1, "c")


# --------------------------------------------------------------------------- report.py: regional tables

REGIONAL: dict[str, Any] = {
    "name": "r", "description": "two regions", "task": "digits", "duration_s": 60, "target_accuracy": 0.8, "seeds": [0, 1],
    "fleet": {"devices": 8},
    "multiregion": {"regions": ["hongkong", "paris"], "latency_ms": [[1.5, 100.0], [100.0, 2.5]], "device_counts": [8, 16],
                    "single_server_region": "paris"},
    "methods": [{"label": "S", "kind": "spyker", "strategy_params": {"eta": 0.6}},
                {"label": "F", "kind": "single", "strategy": "fedasync"}, {"label": "H", "kind": "hierfavg"}],
}


def _regional_run(label: str, devices: int, seed: int, reached_at: float | None, updates: list[float]) -> RunResult:
    """Rows every 10 s; accuracy 0.9 from ``reached_at`` on (0.5 before); ``updates`` per row."""
    rows = [{"t_s": 10.0 * i, "committed_at_s": 10.0 * i, "updates": u,
             "accuracy": 0.9 if reached_at is not None and 10.0 * i >= reached_at else 0.5,
             "accuracy_min": 0.4, "accuracy_max": 0.95} for i, u in enumerate(updates)]
    summary = {"devices": devices, "final_accuracy": rows[-1]["accuracy"], "updates": updates[-1], "bytes_peer": 2e6,
               "bytes_device": 3e6, "coordinator_utilisation": 0.5, "coordinator_queue_mean": 1.0,
               "coordinator_queue_max": 3, "wall_s": 1.0, "coordinators": 2}
    return RunResult(label=label, strategy="x", params={}, seed=seed, target_accuracy=0.8, rows=rows, summary=summary)


def _regional() -> tuple[Scenario, list[RunResult]]:
    sc = parse_scenario(REGIONAL, source="r.toml")
    ups = [0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0]
    results = [
        _regional_run("S", 8, 0, 10.0, ups), _regional_run("S", 8, 1, 20.0, ups),   # mean 15, all reached
        _regional_run("S", 16, 0, 30.0, ups), _regional_run("S", 16, 1, None, ups),  # (30 + 60) / 2 = 45: censored
        _regional_run("F", 8, 0, None, ups), _regional_run("F", 8, 1, 40.0, ups),   # (60 + 40) / 2 = 50: censored
        _regional_run("F", 16, 0, 50.0, ups), _regional_run("F", 16, 1, 50.0, ups),  # 50, all reached
        _regional_run("H", 8, 0, 10.0, ups), _regional_run("H", 8, 1, 10.0, ups),    # no run with 16 devices
    ]
    return sc, results


def test_regional_scaling_is_a_lower_bound_or_undefined_by_which_fleet_missed_the_target() -> None:
    """report.py:219 (the scaling's kind: ``"lower_bound" if b["all_reached"] else "undefined"``
    negated: a base fleet that missed the target gave a "lower bound", printed as a ratio);
    report.py:61 (``PAPER_SCALING``: hierfavg's entry dropped: its paper column "—"); report.py:206
    (``mb_peer``: ``/ 1e6`` -> ``/ 1000001.0``); report.py:240 (the table's ``|---|`` line dropped);
    report.py:255 (``"" if b["all_reached"] else "≥ "`` negated: the censored mean printed as exact);
    report.py:274 (the paper's row for a ``single`` method: ``== "single"`` -> ``!=``)."""
    sc, results = _regional()
    summary = summarise_regions(sc, results)
    s, f = summary["methods"]["S"], summary["methods"]["F"]
    assert s["by_devices"]["8"] == {
        "time_to_target_s": [10.0, 20.0], "mean_time_to_target_s": 15.0, "all_reached": True, "final_accuracy": 0.9,
        "updates": 60.0, "updates_to_target": 15.0, "mb_peer": 2.0, "mb_device": 3.0, "utilisation": 0.5,
        "queue_mean": 1.0, "queue_max": 3.0, "wall_s": 1.0}
    assert s["by_devices"]["16"]["mean_time_to_target_s"] == 45.0
    assert s["by_devices"]["16"]["updates_to_target"] == 45.0  # seed 1 never reached it: its last row's count
    assert s["scaling"]["16"] == {"time": 3.0, "updates": 3.0, "kind": "lower_bound"}
    assert f["by_devices"]["8"]["all_reached"] is False and f["by_devices"]["16"]["all_reached"] is True
    assert f["scaling"]["16"]["kind"] == "undefined"
    lines = format_region_tables(sc, summary).splitlines()
    assert "| F | ≥ 50.0 | 50 | 0.700 | 50% | 1.0 / 3 | 2.0 | 3.0 |" in lines
    assert "| S | ≥ 3.00 (3.00) | 1.21 / 1.43 |" in lines and "| F | — | 2.42 / 5.99 |" in lines and "| H | — | 1.64 / 1.75 |" in lines
    assert lines[lines.index("| S | 15.0 | 15 | 0.900 | 50% | 1.0 / 3 | 2.0 | 3.0 |") - 1] == "|---|---:|---:|---:|---:|---:|---:|---:|"
    assert lines[lines.index("| S | ≥ 3.00 (3.00) | 1.21 / 1.43 |") - 2] == "| method | 16 devices: time (×), updates (×) | paper (200 / 300) |"


def test_the_regional_table_lists_every_latency_of_the_matrix_with_the_diagonal() -> None:
    """report.py:239 (``if j >= i`` -> ``j > i``: the one-way latency line lost each region's own
    latency, the device-to-coordinator hop)."""
    sc, results = _regional()
    table = format_region_tables(sc, summarise_regions(sc, results))
    assert "One-way latency (ms): hongkong–hongkong 1.5, hongkong–paris 100, paris–paris 2.5. Seeds 0, 1;" in table


# --------------------------------------------------------------------------- report.py: one-region tables

TWO_RUNS: dict[str, Any] = {
    "name": "t", "task": "digits", "duration_s": 600, "target_accuracy": 0.9, "seeds": [0, 1],
    "fleet": {"devices": 10},
    "runs": [{"strategy": "spin", "label": "a", "params": {"k": 2, "timeout_s": 10.0}}, {"strategy": "fedasync", "label": "b"},
             {"strategy": "spin-notimeout", "label": "c", "params": {"k": 2}}],
}
CURVES = {("a", 0): [(0, 0.1), (100, 0.9), (300, 0.96)], ("a", 1): [(0, 0.1), (200, 0.9), (400, 0.94)],
          ("b", 0): [(0, 0.1), (300, 0.9)], ("b", 1): [(0, 0.1), (500, 0.86)],
          ("c", 0): [(0, 0.1), (600, 0.95)], ("c", 1): [(0, 0.1), (600, 0.95)]}


def _one_region() -> tuple[Scenario, list[RunResult]]:
    sc = parse_scenario(TWO_RUNS, source="t.toml")
    results = [RunResult(label=label, strategy=sc.select([label]).runs[0].strategy, params={}, seed=seed, target_accuracy=0.9,
                         rows=[{"t_s": t, "committed_at_s": t, "accuracy": acc} for t, acc in curve],
                         summary={"final_accuracy": curve[-1][1], "initial_accuracy": 0.1, "versions": 10, "updates_accepted": 20,
                                  "staleness_histogram": {"0": 3, "2": 1}})
               for (label, seed), curve in CURVES.items()]
    return sc, results


def test_the_time_to_target_table_reads_every_target_around_the_scenarios() -> None:
    """report.py:510 (``sensitivity_targets``: ``round(t, 2)`` -> ``round(t, 0)``: the four targets
    around 0.9 became one, 100 %); report.py:529 (``("spin", "spin-notimeout")`` lost its second
    element: SPIN without its timeout compared with SPIN as a baseline); report.py:557 (``_digits``:
    ``duration_s >= 100`` -> ``>``: a 100 s run's seconds printed with decimals)."""
    assert sensitivity_targets(0.9) == [0.85, 0.9, 0.93, 0.95]
    assert sensitivity_targets(0.97) == [0.92, 0.97, 1.0]  # (none above 100 %)
    sc, results = _one_region()
    summary = summarise(sc, results)
    b = summary["runs"]["b"]
    assert b["time_to_target_s"] == [300.0, None] and b["mean_time_to_target_s"] == 450.0 and b["reached"] == 1
    assert b["sensitivity"] == {"0.85": {"mean_s": 400.0, "reached": 2, "runs": 2}, "0.90": {"mean_s": 450.0, "reached": 1, "runs": 2},
                                "0.93": {"mean_s": 600.0, "reached": 0, "runs": 2}, "0.95": {"mean_s": 600.0, "reached": 0, "runs": 2}}
    assert summary["ratios"] == {"b / a": {"ratio": 3.0, "kind": "lower_bound"}}  # (not SPIN's own variant c)
    assert summary["runs"]["a"]["mean_staleness"] == 0.5
    lines = format_table(sc, summary).splitlines()
    assert "| run | 85% | 90% | 93% | 95% |" in lines
    assert "| b | 400 (2.67×) | ≥ 450 (≥ 3.00×) | ≥ 600 (≥ 1.71×) | ≥ 600 (n/a) |" in lines
    assert "- b / a: ≥ 3.00×" in lines
    assert "Virtual time in seconds" in lines[4] and "; duration 600 s." in lines[4]
    assert "; duration 100 s." in format_table(sc, {**summary, "duration_s": 100.0}).splitlines()[4]
    assert "; duration 99.50 s." in format_table(sc, {**summary, "duration_s": 99.5}).splitlines()[4]


# --------------------------------------------------------------------------- report.py: tasks, seeds


@pytest.mark.parametrize(("task", "title", "first"), [("emnist", "EMNIST", "EMNIST/raw/emnist-balanced-train-images-idx3-ubyte"),
                                                      ("cifar10", "CIFAR-10", "cifar-10-batches-py/data_batch_1")])
def test_a_torchvision_task_names_the_files_it_looks_for(task: str, title: str, first: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """report.py:70-71 (``TORCHVISION_DATASETS``: an element of an entry dropped: cifar10's file list
    (a ValueError at unpacking, not the message), emnist's title). test_emulator checks mnist's."""
    monkeypatch.setenv("EDGECI_DATA", str(tmp_path))
    with pytest.raises(MissingDataset, match=rf"task {task!r} needs the {title} files of torchvision under "):
        load_task(task)
    with pytest.raises(MissingDataset) as missing:
        load_task(task)
    assert f"(e.g. {tmp_path / first}); none found" in str(missing.value)
    (tmp_path / first).parent.mkdir(parents=True)
    (tmp_path / first).write_bytes(b"")
    with pytest.raises(ConfigError, match=rf"found {title} files at {tmp_path / first}, but no edgeci task {task!r}"):
        load_task(task)


# --------------------------------------------------------------------------- report.py: figures


def test_a_plot_legend_moves_beside_the_axes_past_eight_entries() -> None:
    """report.py:671 (``_legend`` returning at once: the accuracy and staleness figures without a legend)."""
    from devices.report import _legend, pyplot

    plt = pyplot()
    for n, loc, widened in ((3, "lower right", False), (9, "upper left", True)):
        fig, ax = plt.subplots(figsize=(9, 5.5))
        for i in range(n):
            ax.plot([0, 1], [i, i], label=f"run {i}")
        _legend(fig, ax, "lower right")
        legend = ax.get_legend()
        assert legend is not None and len(legend.get_texts()) == n
        assert legend._loc == legend.codes[loc]  # (matplotlib keeps the location as its code)
        assert bool(fig.get_size_inches()[0] == 9 + 4.5) is widened
        plt.close(fig)


def test_the_regional_plot_draws_each_method_from_its_own_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """report.py:285 (``plot_regions``: ``r.label == m.label`` -> ``!=``: each method's line drawn from
    another method's run)."""
    import devices.report as report

    figures: list[Any] = []
    monkeypatch.setattr(report, "save_figure", lambda fig, path: figures.append(fig))
    sc, results = _regional()
    results = [r for r in results if r.seed == 0] + [r for r in results if r.seed == 1]  # seed 0 first: drawn
    summary = summarise_regions(sc, results)
    for r in results:  # each method's own accuracy curve
        r.rows = [{**row, "accuracy": {"S": 0.1, "F": 0.2, "H": 0.3}[r.label] + 0.01 * i} for i, row in enumerate(r.rows)]
    report.plot_regions(sc, results, summary, tmp_path / "accuracy.png")
    (fig,) = figures
    ax, bars = fig.axes[:2]
    curves = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines() if not line.get_label().startswith("target")}
    assert curves == {m: [pytest.approx(base + 0.01 * i) for i in range(7)] for m, base in (("S", 0.1), ("F", 0.2), ("H", 0.3))}
    assert [p.get_height() for p in bars.patches][:1] == [3.0]  # S: 45 s at 16 devices over 15 s at 8
    report.pyplot().close(fig)


def test_the_regional_scaling_plot_shows_what_the_table_shows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by helper-198 beside the audit: the scaling bars drew every ratio, so F, whose 8-device
    fleet missed the target (the table's "—"), got a bar of 1.0, and S's lower bound looked exact.
    Now an undefined scaling has no bar (a "—" mark), a lower bound is hatched with a "≥" above it,
    and a method with no run at that size (H) has no bar either."""
    import devices.report as report

    figures: list[Any] = []
    monkeypatch.setattr(report, "save_figure", lambda fig, path: figures.append(fig))
    sc, results = _regional()
    summary = summarise_regions(sc, results)
    report.plot_regions(sc, results, summary, tmp_path / "accuracy.png")
    (fig,) = figures
    bars = fig.axes[1]
    s_bar, f_bar, h_bar = bars.patches[:3]  # S, F, H at 16 devices
    assert s_bar.get_height() == 3.0 and s_bar.get_hatch() == "//"
    assert np.isnan(f_bar.get_height()) and np.isnan(h_bar.get_height())
    marks = {(round(float(t.xy[0]), 3), t.get_text()) for t in bars.texts}
    assert marks == {(round(s_bar.get_x() + s_bar.get_width() / 2, 3), "≥"), (round(f_bar.get_x() + f_bar.get_width() / 2, 3), "—"),
                     (round(h_bar.get_x() + h_bar.get_width() / 2, 3), "—")}
    report.pyplot().close(fig)


def test_a_regional_report_writes_its_table_summary_and_plot_and_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """report.py:328 (``write_region_report``: the "wrote …" line on stderr deleted: the sweep said
    nothing of where its files went)."""
    from devices.report import write_region_report

    sc, results = _regional()
    assert write_region_report(sc, results, tmp_path) == 0
    table = (tmp_path / "time_to_target.md").read_text(encoding="utf-8")
    assert json.loads((tmp_path / "summary.json").read_text(encoding="utf-8")) == summarise_regions(sc, results)
    assert (tmp_path / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out, err = capsys.readouterr()
    assert out == table + "\n"
    assert err == f"wrote {tmp_path / 'time_to_target.md'}, {tmp_path / 'accuracy.png'}, {tmp_path / 'runs'}/\n"
