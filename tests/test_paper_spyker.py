"""Spyker as in the paper (issue 16 §5): the scenario's parameters, its quick form, and the
single server's CPU queue in the regional summary."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from devices.multiregion import PAPER_LATENCY_MS, MultiRegionRun, load_multiregion
from devices.report import format_region_tables, load_task, summarise_regions
from devices.scenario import Scenario
from devices.simulator import RunResult

SCENARIO = Path(__file__).resolve().parents[1] / "demos" / "scenarios" / "multiregion" / "paper-spyker.toml"


def test_the_scenario_has_the_papers_parameters() -> None:
    sc = load_multiregion(SCENARIO)
    assert sc.device_counts == (100, 200, 300) and sc.settings.target_accuracy == 0.90
    assert sc.settings.task == "procdigits" and sc.settings.labels_each == 2
    assert [list(r) for r in sc.topology.latency_ms] == [list(r) for r in PAPER_LATENCY_MS]
    by = {m.label: m for m in sc.methods}
    spyker = by["Spyker (η_init = 0.5)"]
    assert spyker.kind == "spyker" and spyker.params["lr_init"] == 0.5 and spyker.params["decay_beta"] == 0.05
    fedasync, fedavg = by["FedAsync (1 server)"], by["FedAvg (1 server)"]
    assert (fedasync.kind, fedasync.strategy, fedasync.service_ms) == ("single", "fedasync", 2.0)
    assert (fedavg.kind, fedavg.strategy, fedavg.service_ms) == ("single", "fedavg", 15.0)
    assert all(m.msg_ms == 0.4 for m in sc.methods)
    quick = load_multiregion(SCENARIO, quick=True)
    assert quick.device_counts == (8,) and quick.settings.duration_s <= 2


def _run(sc: Scenario, label: str, n: int) -> RunResult:
    m = next(m for m in sc.methods if m.label == label)
    return MultiRegionRun(load_task(sc.settings.task, sc.settings.task_options), sc, m, n, 0).run()


def test_the_quick_form_runs_and_reports_the_single_servers_queue() -> None:
    sc = load_multiregion(SCENARIO, quick=True)
    results = [_run(sc, label, 8) for label in ("Spyker (η_init = 0.5)", "FedAsync (1 server)")]
    for r in results:
        assert r.summary["updates"] > 0
        assert 0 <= r.summary["coordinator_queue_mean"] <= r.summary["coordinator_queue_max"]
    summary = summarise_regions(sc, results)
    row = summary["methods"]["FedAsync (1 server)"]["by_devices"]["8"]
    assert row["queue_max"] == results[1].summary["coordinator_queue_max"]
    line = next(x for x in format_region_tables(sc, summary).splitlines() if x.startswith("| FedAsync (1 server) |"))
    assert f"{row['queue_mean']:.1f} / {row['queue_max']:.0f}" in line


@pytest.mark.parametrize("service_ms", [0.0, 60.0])
def test_a_slow_server_queues_and_a_free_one_does_not(service_ms: float) -> None:
    sc = load_multiregion(SCENARIO, quick=True)
    methods = tuple(dataclasses.replace(m, service_ms=service_ms, msg_ms=0.0) if m.label == "FedAsync (1 server)" else m
                    for m in sc.methods)
    sc = dataclasses.replace(sc, runs=methods)
    r = _run(sc, "FedAsync (1 server)", 8)
    if service_ms == 0.0:  # no CPU cost: nothing ever waits
        assert r.summary["coordinator_queue_max"] == 0 and r.summary["coordinator_queue_mean"] == 0
    else:  # 60 ms per commit with 8 devices updating every ~0.45 s: the server is saturated and updates wait
        assert r.summary["coordinator_utilisation"] > 0.5
        assert r.summary["coordinator_queue_max"] >= 2 and r.summary["coordinator_queue_mean"] > 0.3
