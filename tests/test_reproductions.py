"""The SPIN paper's baselines as the paper ran them (issue 16): FedBuff and PORT wait for K,
PORT's push-pull reaches slow clients, the ``paper`` fleet preset, and the quick form of
``demos/scenarios/paper-spin.toml`` end to end."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.core import CommitVersion
from coordinator.methods import make_method
from coordinator.strategies.base import BufferedUpdate
from coordinator.strategies.fedbuff import FedBuffConfig
from coordinator.strategies.port import PortConfig, PortStrategy
from devices.profiles import COMPUTE, PROFILES, ComputeProfile, DeviceProfile, measure_compute
from devices.scenario import Settings, load_scenario, materialise
from devices.simulator import Simulation
from edge_sdk.tasks.base import Task
from tests.helpers import Link, make_coordinator

SCENARIOS = Path(__file__).resolve().parent.parent / "demos" / "scenarios"
PAPER_SPIN = SCENARIOS / "paper-spin.toml"


class CommitLog(Simulation):
    """A simulation that records, per commit, the devices whose updates it consumed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commits: list[tuple[float, list[str]]] = []

    def _coordinator_actions(self, actions: Sequence[object]) -> None:
        for a in actions:
            if isinstance(a, CommitVersion):
                self.commits.append((self.clock.now, [device for device, _seq in a.consumed]))
        super()._coordinator_actions(actions)


@pytest.fixture(scope="module")
def digits() -> Task:
    from edge_sdk.tasks import get_task

    return get_task("digits", device="cpu")


@pytest.fixture(scope="module")
def isolated_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGECI_HOME", str(tmp_path_factory.mktemp("edgeci-home")))
        yield


# ------------------------------------------------------------------ strict K


def test_fedbuff_and_port_wait_for_k_by_default() -> None:
    assert FedBuffConfig().strict_k is True and PortConfig().strict_k is True
    assert make_method("fedbuff").strategy.describe()["strict_k"] is True


@pytest.mark.parametrize("strategy", ["fedbuff", "port"])
def test_strict_k_never_aggregates_fewer_than_k_updates(strategy: str) -> None:
    link = Link(coordinator=make_coordinator(strategy, k=4, select=6))
    for i in range(3):  # fewer than K devices ever get data: the model must not move
        link.add_device(f"d{i}", min_samples=1, seed=i)
        link.add_sample(f"d{i}", 1, at=0.1 * i)
    link.run_until(2_000.0)
    assert not link.commits, "strict K: no aggregation below K updates"
    assert len(link.coordinator.buffer) == 3, "the short rounds' updates wait in the buffer"
    link.add_device("d3", min_samples=1, seed=3)
    link.add_sample("d3", 1, at=2_001.0)
    link.run_until(6_000.0)
    assert link.commits and all(c.metadata["n_updates"] >= 4 for c in link.commits)


def test_the_old_round_closing_is_kept_as_strict_k_false() -> None:
    link = Link(coordinator=make_coordinator("fedbuff", k=4, select=6, strict_k=False))
    for i in range(3):
        link.add_device(f"d{i}", min_samples=1, seed=i)
        link.add_sample(f"d{i}", 1, at=0.1 * i)
    link.run_until(2_000.0)
    assert link.commits and sum(c.metadata["n_updates"] for c in link.commits) == 3


# ------------------------------------------------------------------ PORT push-pull


class _View:
    def __init__(self, version: int, devices: Sequence[str], deferred: dict[str, float]) -> None:
        self.version = version
        self.devices_seen = tuple(devices)
        self.deferred = deferred
        self.buffer: tuple[BufferedUpdate, ...] = ()


def test_port_requests_an_update_from_a_device_beyond_the_staleness_bound_once() -> None:
    strategy = PortStrategy(PortConfig(k=1, select=2, staleness_bound=3))
    view = _View(0, ["slow", "fast"], {"slow": 0.0, "fast": 0.0})
    plan = strategy.plan(view, 0.0, random.Random(0))  # type: ignore[arg-type]
    assert set(plan.invite) == {"slow", "fast"}
    asked: list[str] = []
    for version in range(1, 7):  # 'fast' reports every version and is redrawn; 'slow' never does
        del strategy.in_flight["fast"]  # its update arrived (the fold itself is not under test)
        view.version = version
        strategy.on_aggregated(view, float(version))  # type: ignore[arg-type]
        asked.extend(strategy.take_update_requests())
        strategy.in_flight["fast"] = float(version)
        strategy.started_version["fast"] = version
    assert asked == ["slow"], "asked once, when its base fell more than 3 versions behind"
    assert strategy.describe()["update_requests"] == 1
    off = PortStrategy(PortConfig(k=1, select=2, staleness_bound=3, request_update=False))
    off.in_flight["slow"], off.started_version["slow"] = 0.0, 0
    off.on_aggregated(_View(9, ["slow"], {}), 9.0)  # type: ignore[arg-type]
    assert off.take_update_requests() == ()


def test_port_keeps_requests_and_start_versions_only_for_devices_in_flight() -> None:
    """helper-142: a daemon has no message for PORT's request (nothing drains the list), and a
    device FedBuff forgets kept its start version: 5,000 stale jobs of one device left 5,000
    requests for the process's life; a forgotten device that came back was taken for the old
    version's straggler."""
    strategy = PortStrategy(PortConfig(k=1, select=1, staleness_bound=3))
    view = _View(0, ["slow"], {"slow": 0.0})
    for job in range(50):  # never drained, as on a daemon
        view.deferred = {"slow": 0.0}
        assert strategy.plan(view, float(job), random.Random(0)).invite == ("slow",)  # type: ignore[arg-type]
        view.version += 4  # others' versions commit meanwhile: its base is more than 3 behind
        strategy.on_aggregated(view, float(job))  # type: ignore[arg-type]
        del strategy.in_flight["slow"]  # its update arrived (on_update's bookkeeping, the fold not under test)
        strategy.requested.discard("slow")
        strategy.started_version.pop("slow")
    strategy.on_aggregated(view, 99.0)  # type: ignore[arg-type]
    assert strategy.update_requests == 50 and strategy.take_update_requests() == ()
    strategy.in_flight["gone"], strategy.started_version["gone"] = 0.0, 0
    strategy.on_aggregated(view, 100.0)  # type: ignore[arg-type]
    assert strategy.take_update_requests() == ("gone",)
    del strategy.in_flight["gone"]  # forgotten (FedBuff's forget_after_s)
    strategy.on_aggregated(view, 101.0)  # type: ignore[arg-type]
    assert "gone" not in strategy.started_version and "gone" not in strategy.requested


def _slow_fleet(duration_s: float) -> Settings:
    fast = DeviceProfile(name="fast", compute=ComputeProfile(name="fast", sample_epoch_s=0.2, overhead_s=0.5, spread=0.0),
                         link=PROFILES["paper"].link)
    slow = DeviceProfile(name="slow", compute=ComputeProfile(name="slow", sample_epoch_s=5.0, overhead_s=0.0, spread=0.0),
                         link=PROFILES["paper"].link)
    return Settings(task="digits", duration_s=duration_s, eval_every_s=duration_s, devices=8, mix={"fast": 7, "slow": 1},
                    profiles={**PROFILES, "fast": fast, "slow": slow}, partition="iid", initial_samples=8,
                    arrival_rate_per_h=1800.0, min_samples=4, epochs=5)


@pytest.mark.parametrize("push_pull", [True, False])
def test_port_push_pull_reaches_a_slow_device_in_the_emulator(digits: Task, push_pull: bool) -> None:
    # The slow device needs 8 samples × 5 epochs × 5 s = 200 s; the run lasts 150 s.
    settings = _slow_fleet(150.0)
    strategy = PortStrategy(PortConfig(k=3, select=8, staleness_bound=2, request_update=push_pull))
    sim = CommitLog(digits, settings, strategy, seed=0)
    slow = next(p.device_id for p in sim.plans if p.instance.profile.name == "slow")
    result = sim.run()
    in_commits = [t for t, devices in sim.commits if slow in devices]
    served = result.summary["update_requests_served"]
    if push_pull:
        assert served >= 1 and in_commits, "the slow device's partial work reached a version"
        assert in_commits[0] < 200.0
    else:
        assert served == 0 and not in_commits, "without push-pull the slow device never reports in time"


# ------------------------------------------------------------------ the paper preset


def test_paper_preset_is_a_uniform_always_on_lan_fleet() -> None:
    scenario = load_scenario(PAPER_SPIN)
    s = scenario.settings
    assert dict(s.mix) == {"paper": 1.0} and s.devices == 100 and s.alpha == 1.0 and s.partition == "dirichlet"
    assert s.profiles["paper"].compute == COMPUTE["paper"]
    assert s.target_accuracy == 0.96 and s.epochs == 5 and len(s.seeds) >= 5
    spin = next(r for r in scenario.runs if r.strategy == "spin")
    assert spin.params["k"] == 10
    for run in scenario.runs:
        if run.strategy in ("fedbuff", "port"):
            assert run.params["k"] == 10 and run.params["select"] == 20 and run.params.get("strict_k", True)
    labels = np.repeat(np.arange(10), 600).astype(np.int64)
    plans = materialise(s, 0, labels)
    assert {p.instance.profile.name for p in plans} == {"paper"}
    assert all(len(p.instance.offline) == 0 for p in plans)
    factors = np.log([p.instance.speed_factor for p in plans])
    assert float(np.std(factors)) < 0.2, "uniform devices: only the measured run-to-run jitter"
    held = [int((p.label_times == 0.0).sum()) for p in plans]
    assert min(held) == s.initial_samples or min(held) == min(len(p.samples) for p in plans)


def test_measure_compute_fits_the_real_trainer() -> None:
    measured = measure_compute("digits", sizes=(8, 64), epochs=2, repeats=2)
    assert measured.name == "measured-digits"
    assert measured.sample_epoch_s > 0 and measured.overhead_s >= 0 and measured.spread >= 0


def test_measure_compute_recovers_a_known_cost_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a fake clock where a local update of n samples × E epochs takes 0.25 + 0.002 n E
    seconds (× a fixed jitter per repeat), the fit returns those numbers (the real-trainer test
    above can only check signs)."""
    import time

    import edge_sdk.tasks as tasks

    real = tasks.get_task("digits")
    now = [0.0]
    jitter = {0: 1.0, 1: 1.1}

    class Timed:
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def local_update(self, weights: Any, x: Any, y: Any, config: Any) -> None:
            now[0] += (0.25 + 0.002 * len(y) * config.epochs) * jitter[config.seed]

    monkeypatch.setattr(tasks, "get_task", lambda name, **kw: Timed())
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    fit = measure_compute("digits", sizes=(10, 40, 160), epochs=3, repeats=2)
    # the mean over the two jitters is 1.05: slope and intercept scale by it, exactly
    assert fit.sample_epoch_s == pytest.approx(0.002 * 1.05) and fit.overhead_s == pytest.approx(0.25 * 1.05)
    assert fit.spread == pytest.approx(float(np.std(np.log([1.0, 1.1]))))


# ------------------------------------------------------------------ the quick form of paper-spin


def test_paper_spin_quick_runs_with_strict_k_baselines(isolated_home: None) -> None:
    from devices.report import load_task

    scenario = load_scenario(PAPER_SPIN).quick()
    task = load_task(scenario.settings.task, scenario.settings.task_options)
    results = {}
    for run in scenario.runs:
        method = make_method(run.strategy, params=run.params)
        sim = CommitLog(task, run.settings, method.strategy, seed=0, label=run.label)
        result = sim.run()
        results[run.strategy] = (result, sim)
        assert result.summary["versions"] >= 3, run.label
        assert result.summary["best_accuracy"] > result.summary["initial_accuracy"] + 0.05, run.label
        if run.strategy in ("fedbuff", "port"):
            assert all(len(devices) >= 10 for _t, devices in sim.commits), f"{run.label}: aggregated below K"
    assert results["spin"][0].summary["pulls_deferred"] == 0, "SPIN serves every pull"
    assert results["fedbuff"][0].summary["pulls_deferred"] > 0, "FedBuff serves only the devices it drew"
    assert isinstance(results["port"][0].summary["strategy"]["update_requests"], int)


def test_profiles_module_explains_itself() -> None:
    """`python -m devices.profiles --help` printed nothing and exited 0 (README trial)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    shown = subprocess.run([sys.executable, "-m", "devices.profiles", "--help"], capture_output=True, text=True, cwd=root, timeout=60)
    assert shown.returncode == 0 and "--measure" in shown.stdout and "--task" in shown.stdout
    assert "without options, the built-in names" in " ".join(shown.stdout.split())
    bare = subprocess.run([sys.executable, "-m", "devices.profiles"], capture_output=True, text=True, cwd=root, timeout=60)
    assert bare.returncode == 0 and bare.stdout.startswith("device profiles ([fleet] mix") and "  night-flaky " in bare.stdout
