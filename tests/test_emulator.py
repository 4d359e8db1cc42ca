"""The fleet emulator: determinism, a forward-only clock, exact byte accounting, offline
windows honoured, scenario validation, the CLI, and real learning on the digits task.

Most tests use a tiny numpy softmax-regression task (a working stand-in implementing the
Task protocol) so they stay fast; one runs SPIN on the real digits CNN.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from coordinator.strategies import make_strategy
from demos import emulate
from devices.engine import Driver, Kind, LinkNetwork, VirtualClock
from devices.profiles import LinkProfile
from devices.scc_fleet import parse_scc_scenario
from devices.scenario import ScenarioError, load_scenario, materialise, parse_scenario, read_toml
from devices.simulator import REGION, Simulation, run_spec
from edge_sdk.core.device import DeviceCore
from edge_sdk.errors import ConfigError, LocalProtocolError, TransportError
from edge_sdk.spec import ModelSpec, Vector
from edge_sdk.tasks.base import Split, TaskData, TrainConfig, TrainResult

SCENARIOS = Path(__file__).resolve().parents[1] / "demos" / "scenarios"


class BlobTask:
    """Softmax regression on Gaussian blobs: the Task protocol in a few lines of numpy."""

    name = "blobs"

    def __init__(self, n_classes: int = 4, dim: int = 6) -> None:
        self.n_classes, self.dim = n_classes, dim
        self.spec = ModelSpec.build("blobs", [("w", (dim, n_classes), "extractor"), ("b", (n_classes,), "classifier")])
        rng = np.random.default_rng(0)
        centers = rng.normal(0.0, 1.5, (n_classes, dim))
        y = rng.integers(0, n_classes, 1000).astype(np.int64)
        x = (centers[y] + rng.normal(0.0, 1.5, (1000, dim))).astype(np.float32)
        def split(a: int, b: int) -> Split:
            return Split(x=x[a:b], y=y[a:b])

        self._data = TaskData(pretrain=split(0, 20), pool=split(20, 700), test=split(700, 1000), n_classes=n_classes)

    def data(self) -> TaskData:
        return self._data

    def _fit(self, weights: Vector, x: npt.NDArray[Any], y: npt.NDArray[np.int64], epochs: int, lr: float, seed: int, batch: int) -> tuple[Vector, float]:
        w = weights.astype(np.float64).copy()
        rng = np.random.default_rng(seed)
        loss = 0.0
        for _ in range(epochs):
            order = rng.permutation(y.shape[0])
            for s in range(0, y.shape[0], batch):
                idx = order[s : s + batch]
                W, b = w[: self.dim * self.n_classes].reshape(self.dim, self.n_classes), w[self.dim * self.n_classes :]
                logits = x[idx] @ W + b
                p = np.exp(logits - logits.max(axis=1, keepdims=True))
                p /= p.sum(axis=1, keepdims=True)
                loss = float(-np.log(p[np.arange(idx.shape[0]), y[idx]] + 1e-12).mean())
                p[np.arange(idx.shape[0]), y[idx]] -= 1.0
                grad_w = x[idx].T @ p / idx.shape[0]
                w[: self.dim * self.n_classes] -= lr * grad_w.ravel()
                w[self.dim * self.n_classes :] -= lr * p.mean(axis=0)
        return w.astype(np.float32), loss

    def pretrained(self, *, seed: int = 0) -> Vector:
        d = self._data.pretrain
        return self._fit(self.spec.zeros(), d.x, d.y, 3, 0.05, seed, 8)[0]

    def local_update(self, weights: Vector, x: npt.NDArray[Any], y: npt.NDArray[np.int64], config: TrainConfig) -> TrainResult:
        w, loss = self._fit(weights, x, y, config.epochs, config.lr, config.seed, config.batch_size)
        return TrainResult(weights=w, n_samples=int(y.shape[0]), loss=loss, seconds=0.0)

    def evaluate(self, weights: Vector, split: Split | None = None) -> dict[str, float]:
        s = split or self._data.test
        W, b = weights[: self.dim * self.n_classes].reshape(self.dim, self.n_classes), weights[self.dim * self.n_classes :]
        return {"accuracy": float(((s.x @ W + b).argmax(axis=1) == s.y).mean())}


def small_scenario(**extra: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "name": "small",
        "task": "blobs",
        "duration_s": 900,
        "eval_every_s": 60,
        "target_accuracy": 0.8,
        "seeds": [3],
        "fleet": {"devices": 12, "mix": {"phone": 1, "camera": 1, "sensor": 1}},
        "data": {"partition": "dirichlet", "alpha": 1.0, "arrival_rate_per_h": 120},
        "device": {"min_samples": 3},
        "training": {"epochs": 2, "batch_size": 8, "lr": 0.1},
        "runs": [{"strategy": "spin", "params": {"k": 3, "timeout_s": 10.0}}],
    }
    raw.update(extra)
    return raw


def simulate(raw: dict[str, Any], strategy: str = "spin", **params: Any) -> Simulation:
    sc = parse_scenario(raw)
    return Simulation(BlobTask(), sc.settings, make_strategy(strategy, **params), seed=sc.settings.seeds[0])


# ------------------------------------------------------------------ determinism & clock


@pytest.mark.parametrize(("strategy", "params"), [("spin", {"k": 3, "timeout_s": 10.0}), ("fedbuff", {"k": 3, "select": 4, "population": 12})])
def test_same_scenario_and_seed_give_identical_metrics(strategy: str, params: dict[str, Any]) -> None:
    runs = []
    for _ in range(2):
        result = simulate(small_scenario(), strategy, **params).run()
        summary = {k: v for k, v in result.summary.items() if k not in ("wall_s", "virtual_per_wall")}
        runs.append((result.rows, summary))
    assert runs[0] == runs[1]
    assert runs[0][1]["updates_accepted"] > 5, "the run must actually do something"
    other = simulate(small_scenario(seeds=[4]), strategy, **params).run()
    assert other.rows != runs[0][0], "a different seed is a different run"


@pytest.mark.parametrize(("strategy", "params"), [("spin", {"k": 3, "timeout_s": 10.0}), ("fedbuff", {"k": 3, "select": 4, "population": 12})])
def test_dropping_dead_device_timers_changes_only_the_event_count(strategy: str, params: dict[str, Any],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulation._compact_timers: dead device timers (replaced, or on an idle core) leave the
    heap without firing; every other event keeps its time and order, so the metrics and the
    non-timer event stream are those of a run that lets them all fire."""
    import devices.simulator as simulator

    def run(compact_at: int) -> tuple[list[dict[str, float]], dict[str, Any], list[tuple[float, int, int]], int]:
        monkeypatch.setattr(simulator, "COMPACT_MIN", compact_at)
        sim = simulate(small_scenario(), strategy, **params)
        seen: list[tuple[float, int, int]] = []
        timers = [0]

        def trace(at: float, kind: Kind, target: int, data: Any) -> None:
            if kind == Kind.TIMER:
                timers[0] += 1
            else:
                seen.append((at, int(kind), target))

        sim.trace = trace
        result = sim.run()
        summary = {k: v for k, v in result.summary.items() if k not in ("wall_s", "virtual_per_wall", "events")}
        return result.rows, summary, seen, timers[0]

    never = run(10**9)  # the heap never reaches it: every timer fires
    often = run(4)  # compacted whenever the heap doubles from 4 entries
    assert often[:3] == never[:3]
    assert often[3] < never[3], "dead timers were dropped"


def test_virtual_clock_only_moves_forward() -> None:
    clock = VirtualClock()
    clock.advance_to(5.0)
    clock.advance_to(5.0)
    with pytest.raises(LocalProtocolError):
        clock.advance_to(4.999)
    sim = simulate(small_scenario())
    seen: list[float] = []
    sim.trace = lambda now, kind, target, data: seen.append(now)
    sim.run()
    assert len(seen) > 100
    assert all(a <= b for a, b in itertools.pairwise(seen))
    assert seen[-1] <= sim.settings.duration_s


# ------------------------------------------------------------------ bytes


def test_broker_delay_is_latency_plus_size_over_bandwidth_per_link_in_fifo_order() -> None:
    slow = LinkProfile(name="slow", latency_s=0.1, up_bps=1e6, down_bps=2e6)
    fast = LinkProfile(name="fast", latency_s=0.01, up_bps=8e9, down_bps=8e9)
    broker = LinkNetwork(["a"], [slow], region=REGION, coordinator_link=fast)
    up = "edgeci/v1/sim/dev/a/update"
    receiver, at = broker.route(0, up, b"x" * 125_000, now=0.0)  # type: ignore[misc]
    # 1 Mbit up = 1 s, + 0.1 s latency, + 1 Mbit at 8 Gbit/s, + 0.01 s
    assert receiver == broker.coordinator and at == pytest.approx(1.0 + 0.1 + 125e-6 + 0.01)
    _, second = broker.route(0, up, b"x" * 125_000, now=0.5)  # type: ignore[misc]
    assert second == pytest.approx(at + 1.0), "the uplink carries one message at a time"
    _, down = broker.route(broker.coordinator, "edgeci/v1/sim/dev/a/model", b"y" * 250_000, now=0.0)  # type: ignore[misc]
    assert down == pytest.approx(2e6 / 8e9 + 0.01 + 1.0 + 0.1)  # 2 Mbit at 2 Mbit/s down
    assert broker.route(broker.coordinator, "edgeci/v1/sim/status", b"{}", now=0.0) is None, "nobody subscribes here"
    assert (broker.device_bytes_up, broker.in_flight_up) == (250_000, 250_000)
    assert (broker.coordinator_sent, broker.in_flight_down, broker.messages) == (250_000, 250_000, 3)
    broker.delivered(0, 250_000)
    assert (broker.in_flight_down, broker.device_bytes_down) == (0, 250_000)


def test_bytes_accounting_matches_payload_sizes() -> None:
    sim = simulate(small_scenario())
    delivered: list[tuple[int, int]] = []
    sim.trace = lambda now, kind, target, data: delivered.append((target, len(data[1]))) if kind == Kind.MSG else None
    result = sim.run()
    b, coord, c = sim.broker, sim.broker.coordinator, sim.coordinator.counters
    devices_sent = b.device_bytes_up
    assert devices_sent == result.summary["bytes_up"] > 0
    assert devices_sent == c["bytes_in"] + b.in_flight_up, "every device byte reached the coordinator or is in flight"
    assert b.coordinator_sent == c["bytes_out"] == result.summary["bytes_down"] + b.in_flight_down
    assert sum(size for target, size in delivered if target == coord) == c["bytes_in"]
    assert sum(size for target, size in delivered if target != coord) == result.summary["bytes_down"]
    # A model reply costs about 4 bytes per parameter plus a small msgpack header.
    model_bytes = c["bytes_out"] / max(c["pulls_served"], 1)
    assert 4 * sim.task.spec.size < model_bytes < 4 * sim.task.spec.size + 400


# ------------------------------------------------------------------ availability


def test_offline_devices_neither_label_nor_act() -> None:
    raw = small_scenario(profiles={"flaky": {"base": "phone", "availability": {"dropout_every_s": 60.0, "dropout_mean_s": 45.0}}},
                         fleet={"devices": 10, "mix": {"flaky": 1}})
    sim = simulate(raw)
    windows = {p.index: p.instance.offline for p in sim.plans}
    assert all(len(w) > 3 for w in windows.values())
    handled: list[tuple[float, int]] = []
    index = {p.device_id: p.index for p in sim.plans}

    class Spy(DeviceCore):  # (a slotted core takes no per-instance method: the spy is its class)
        __slots__ = ()

        def handle(self, event: Any) -> Any:
            handled.append((event.now, index[self.config.device_id]))
            return super().handle(event)

    for dev in sim.devices:
        dev.core.__class__ = Spy
    popped: list[tuple[float, int, int]] = []
    sim.trace = lambda now, kind, target, data: popped.append((now, kind, target)) if target != sim.broker.coordinator else None
    result = sim.run()
    assert len(handled) > 50 and result.summary["updates_accepted"] > 0
    offline = [(t, i) for t, i in handled if windows[i].offline_at(t)]
    assert not offline, f"a device core got events while offline: {offline[:5]}"
    # Events due while a device was offline existed and were held until it came back.
    held = [(t, i) for t, kind, i in popped if kind in (Kind.MSG, Kind.TIMER) and windows[i].offline_at(t)]
    assert held
    assert all(not windows[i].offline_at(t) for t, kind, i in popped if kind in (Kind.SAMPLE, Kind.TRAINED))


# ------------------------------------------------------------------ scenarios


def test_materialise_is_deterministic_and_covers_the_pool() -> None:
    sc = parse_scenario(small_scenario())
    labels = BlobTask().data().pool.y
    a, b = materialise(sc.settings, 3, labels), materialise(sc.settings, 3, labels)
    assert [p.instance.speed_factor for p in a] == [p.instance.speed_factor for p in b]
    assert all(np.array_equal(p.label_times, q.label_times) for p, q in zip(a, b))
    assert sorted(np.concatenate([p.samples for p in a]).tolist()) == list(range(labels.shape[0]))
    assert all(len(p.label_times) <= len(p.samples) for p in a)
    assert {p.instance.profile.name for p in a} == {"phone", "camera", "sensor"}


@pytest.mark.parametrize(("patch", "message"), [
    ({"fleet": {"devics": 3}}, "did you mean 'devices'"),
    ({"fleet": {"devices": 0}}, "devices must be >= 1"),
    ({"fleet": {"mix": {"toaster": 1}}}, "unknown profile 'toaster'"),
    ({"data": {"partition": "zipf"}}, "partition must be one of"),
    ({"training": {"lr": -1}}, "lr must be >"),
    ({"seeds": []}, "seeds must be a non-empty list"),
    ({"runs": [{"strategy": "spinn"}]}, "unknown strategy 'spinn' (did you mean 'spin'?)"),
    ({"runs": [{"strategy": "spin", "params": {"k": 0}}]}, "k must be >= 1"),
    ({"runs": [{"strategy": "spin"}, {"strategy": "spin"}]}, "duplicate label"),
    ({"runs": [{"strategy": "spin", "overrides": {"data.alpha": -2}}]}, "alpha must be >"),
    # a misspelled top-level key in a run's overrides or in [quick] (even without --quick): the arm
    # was silently the reference experiment (researcher trial, findings 1 and 2)
    ({"runs": [{"strategy": "spin", "overrides": {"duraton_s": 50}}]}, "did you mean 'duration_s'"),
    ({"quick": {"duraton_s": 50}}, "[quick]: top level: unknown key 'duraton_s'"),
    ({"runs": []}, "at least one [[runs]]"),
    ({"profiles": {"x": {"link": "wifi"}}}, "needs compute and link"),
    # fedadam's default select = 20 with 12 devices ran to the end with 0 versions, 0 updates
    ({"runs": [{"strategy": "fedadam"}]}, "fedadam starts a round only once 20 devices wait with new data (select = 20), "
                                          "but the coordinator serves 12: it would never make a version; set params.select to at most 12"),
    ({"runs": [{"strategy": "fedopt", "params": {"select": 5}, "overrides": {"fleet.devices": 4}}]}, "set params.select to at most 4"),
])
def test_scenario_errors_say_where_and_what(patch: dict[str, Any], message: str) -> None:
    with pytest.raises(ScenarioError, match=None) as info:
        parse_scenario(small_scenario(**patch), source="s.toml")
    assert message in str(info.value) and "s.toml" in str(info.value)


def test_a_strategy_waiting_for_more_devices_than_the_run_has_is_refused() -> None:
    sc = parse_scenario(small_scenario(runs=[{"strategy": "fedadam", "params": {"select": 12}}]))  # as many as there are
    with pytest.raises(ScenarioError, match="but coordinator serves 6: it would never make a version"):
        Simulation(BlobTask(), dataclasses.replace(sc.settings, devices=6), make_strategy("fedadam", select=12), seed=3)  # (--devices)


def test_overrides_quick_and_selection() -> None:
    raw = small_scenario(quick={"duration_s": 120, "seeds": [0]}, runs=[
        {"strategy": "spin", "label": "slow", "params": {"k": 3}},
        {"strategy": "spin", "label": "fast", "params": {"k": 3}, "overrides": {"data.arrival_rate_per_h": 600, "device": {"min_samples": 2}}},
    ])
    sc = parse_scenario(raw)
    slow, fast = sc.runs
    assert slow.settings.arrival_rate_per_h == 120 and fast.settings.arrival_rate_per_h == 600
    assert fast.settings.min_samples == 2 and slow.settings.min_samples == 3
    quick = sc.quick()
    assert quick.settings.duration_s == 120 and quick.runs[1].settings.duration_s == 120
    # a quick form says so: its description was written for the full run
    assert parse_scenario({**raw, "description": "3 seeds × 1 h"}).quick().description == \
        "Quick form (duration_s = 120; seeds = [0]) of this scenario; the rest describes the full run:\n3 seeds × 1 h"
    assert parse_scenario({**raw, "description": "full", "quick": {"seeds": [0], "description": "one seed"}}).quick().description == "one seed"
    assert [r.label for r in sc.select(["fast"]).runs] == ["fast"]
    assert sc.with_seeds([5, 6]).settings.seeds == (5, 6)
    with pytest.raises(ScenarioError, match="no run named"):
        sc.select(["nope"])


def test_run_labels_holding_commas_can_be_selected_from_the_command_line() -> None:
    sc = load_scenario(SCENARIOS / "digits-headline.toml")
    labels = [r.label for r in sc.runs]
    commas = [lab for lab in labels if "," in lab]
    assert len(commas) >= 2  # "SPIN, average of models (paper)", "FedAsync (α=0.6, a=0.5)"
    text = ",".join([commas[1], "fedbuff", commas[0]])
    assert sc.names_in(text) == [commas[1], "fedbuff", commas[0]]
    chosen = [r.label for r in sc.select(sc.names_in(text)).runs]
    assert chosen[0] == commas[1] and chosen[-1] == commas[0] and len(chosen) == 2 + sum(r.strategy == "fedbuff" for r in sc.runs)
    assert sc.names_in(" spin , nope,") == ["spin", "nope"]  # an unknown name stays whole for select() to name
    with pytest.raises(ScenarioError, match="no run named 'nope'"):
        sc.select(sc.names_in("spin,nope"))


def test_shipped_scenarios_are_valid(tmp_path: Path) -> None:
    files = sorted(SCENARIOS.rglob("*.toml"))  # multiregion/ too: its stricter reading must accept them
    assert len(files) >= 5
    for f in files:
        raw = read_toml(f)
        if "stream" in raw:  # the SCC stream experiment has its own fleet and schema
            scc = parse_scc_scenario(raw, source=str(f))
            assert scc.stream.arms and scc.quick().stream.rounds <= scc.stream.rounds
            continue
        sc = load_scenario(f)
        assert sc.runs and sc.quick().settings.duration_s <= sc.settings.duration_s
    bad = tmp_path / "bad.toml"
    bad.write_text("duration_s = [", encoding="utf-8")
    with pytest.raises(ScenarioError, match="not valid TOML"):
        load_scenario(bad)
    with pytest.raises(ScenarioError, match="not found"):
        load_scenario(tmp_path / "missing.toml")


def test_torchvision_tasks_are_never_downloaded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(emulate.DATA_ENV, str(tmp_path))
    with pytest.raises(ConfigError, match="never downloads"):
        emulate.load_task("mnist")
    (tmp_path / "MNIST" / "raw").mkdir(parents=True)
    (tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(b"")
    with pytest.raises(ConfigError, match="no edgeci task 'mnist'"):
        emulate.load_task("mnist")


def test_parse_seeds() -> None:
    assert emulate.parse_seeds("0-2,7") == [0, 1, 2, 7]
    with pytest.raises(ConfigError):
        emulate.parse_seeds("a")


# ------------------------------------------------------------------ real task, CLI


def test_small_spin_run_on_digits_improves_accuracy() -> None:
    from edge_sdk.tasks import get_task

    raw = small_scenario(task="digits", duration_s=600, fleet={"devices": 20, "mix": {"laptop": 1}},
                         data={"partition": "iid", "arrival_rate_per_h": 120}, device={"min_samples": 6},
                         training={"epochs": 2, "batch_size": 16, "lr": 0.05}, seeds=[0],
                         runs=[{"strategy": "spin", "params": {"k": 5, "timeout_s": 10.0}}])
    sc = parse_scenario(raw)
    result = run_spec(get_task("digits", device="cpu"), sc.runs[0], 0)
    s = result.summary
    assert s["updates_rejected"] == 0 and s["messages_rejected"] == 0
    assert s["versions"] >= 10
    assert s["final_accuracy"] > s["initial_accuracy"] + 0.05, s


def test_digits_runs_are_reproducible_too() -> None:
    from edge_sdk.tasks import get_task

    raw = small_scenario(task="digits", duration_s=300, fleet={"devices": 8, "mix": {"laptop": 1, "sensor": 1}},
                         data={"arrival_rate_per_h": 300}, device={"min_samples": 2}, training={"epochs": 1},
                         runs=[{"strategy": "fedasync"}])
    spec = parse_scenario(raw).runs[0]
    task = get_task("digits", device="cpu")
    first, second = run_spec(task, spec, 1), run_spec(task, spec, 1)
    assert first.summary["versions"] > 3
    assert first.rows == second.rows


def test_emulate_cli_writes_metrics_plots_and_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(
        """
name = "tiny"
task = "digits"
duration_s = 300
eval_every_s = 60
target_accuracy = 0.5
seeds = [0, 1]
[fleet]
devices = 8
mix = { laptop = 1 }
[data]
arrival_rate_per_h = 300
[device]
min_samples = 2
[training]
epochs = 1
[[runs]]
strategy = "spin"
params = { k = 2, timeout_s = 5.0 }
[[runs]]
strategy = "fedbuff"
params = { k = 2, select = 4 }
""",
        encoding="utf-8",
    )
    parser = argparse.ArgumentParser()
    emulate.add_arguments(parser)
    out = tmp_path / "out"
    assert emulate.run(parser.parse_args([str(scenario), "--out", str(out), "--no-progress", "--seeds", "0"])) == 0
    table = (out / "time_to_target.md").read_text(encoding="utf-8")
    assert "| spin |" in table and "fedbuff / spin" in table
    assert "time to 50% accuracy" in capsys.readouterr().out
    for png in ("accuracy.png", "staleness.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for label in ("spin", "fedbuff"):
        data = json.loads((out / "runs" / f"{label}__seed0.json").read_text(encoding="utf-8"))
        assert data["rows"][0]["t_s"] == 0.0 and data["rows"][-1]["t_s"] == 300.0
        assert {"accuracy", "version", "bytes_up", "bytes_down"} <= set(data["rows"][0])
        assert "staleness_histogram" in data["summary"]
        header = (out / "runs" / f"{label}__seed0.csv").read_text(encoding="utf-8").splitlines()[0]
        assert header.startswith("t_s,version,committed_at_s,accuracy")
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert set(summary["runs"]) == {"spin", "fedbuff"} and summary["seeds"] == [0]
    # Re-tabulate the stored runs for another target without simulating again.
    assert emulate.run(parser.parse_args([str(scenario), "--out", str(out), "--seeds", "0", "--replot", "--target", "0.6"])) == 0
    assert "time to 60% accuracy" in (out / "time_to_target.md").read_text(encoding="utf-8")
    with pytest.raises(ConfigError, match="lacks"):
        emulate.run(parser.parse_args([str(scenario), "--out", str(out), "--seeds", "7", "--replot"]))
    # Runs of other options (a --quick run replotted as the full one: helper-89) are refused, not relabelled.
    with pytest.raises(ConfigError, match=r"spin__seed0.json is a 300 s run, but this command's 'spin' lasts 600 s"):
        emulate.run(parser.parse_args([str(scenario), "--out", str(out), "--seeds", "0", "--replot", "--duration", "600"]))
    with pytest.raises(TransportError, match="cannot reach broker"):
        emulate.run(parser.parse_args([str(scenario), "--out", str(out), "--broker", "mqtt://127.0.0.1:1"]))


# ------------------------------------------------------------------ live mode (same queue, wall clock)


def test_the_live_labelling_loop_runs_the_engine_queue_on_the_wall_clock() -> None:
    from devices.live import LabellingLoop, LabellingUser

    stream = Split(x=np.zeros((3, 2), dtype=np.float32), y=np.array([0, 1, 2], dtype=np.int64))
    got: list[tuple[str, int, float]] = []
    t0 = time.monotonic()
    users = [
        LabellingUser(name=name, stream=stream, add=lambda x, y, n=name: got.append((n, y, time.monotonic() - t0)),
                      rate=0.0, times=np.array(times))
        for name, times in (("late", [0.06, 0.08, 0.10]), ("early", [0.0, 0.02, 0.04]))
    ]
    loop = LabellingLoop(users, time_scale=1.0).start()
    deadline = time.monotonic() + 5.0
    while loop.labelled < 6 and time.monotonic() < deadline:
        time.sleep(0.01)
    loop.stop()
    assert [(n, y) for n, y, _ in got] == [("early", 0), ("early", 1), ("early", 2), ("late", 0), ("late", 1), ("late", 2)]
    assert got[-1][2] >= 0.10, "the loop waited for each label's wall time"
    stopped = LabellingLoop([LabellingUser(name="slow", stream=stream, add=lambda x, y: None, rate=0.0,
                                           times=np.array([30.0, 31.0, 32.0]))]).start()
    started = time.monotonic()
    stopped.stop()
    assert time.monotonic() - started < 5.0 and stopped.labelled == 0, "stop() interrupts the wall-clock wait"


# ------------------------------------------------------------------ fleet scale (issue 13)


def test_preloaded_events_merge_with_the_heap_in_time_order_and_win_ties() -> None:
    class Recorder(Driver):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[tuple[float, Kind, int, Any]] = []

        def dispatch(self, now: float, kind: Kind, target: int, data: Any) -> None:
            self.seen.append((now, kind, target, data))
            if kind == Kind.SAMPLE and data == "b1":
                self.push(now, Kind.TIMER, 9, "pushed at 2.0 while running")

    d = Recorder()
    d.preload(Kind.SAMPLE, [2.0, 1.0, 2.0, 5.0], [1, 0, 2, 1], ["b1", "a", "c", "b2"])
    d.push(2.0, Kind.MSG, 7, "heap at 2.0")
    d.push(0.5, Kind.EVAL, 8, "heap at 0.5")
    d.push(6.0, Kind.EVAL, 8, "after the horizon")
    while d.step(5.0) is not None:
        pass
    assert [x[3] for x in d.seen] == ["heap at 0.5", "a", "b1", "c", "heap at 2.0", "pushed at 2.0 while running", "b2"]
    assert d.events == 7 and d.queue.next_time() == 6.0
    with pytest.raises(LocalProtocolError):
        d.preload(Kind.SAMPLE, [1.0], [0], [1])


def test_run_until_says_whether_it_drained_what_was_due() -> None:
    class Counter(Driver):
        def dispatch(self, now: float, kind: Kind, target: int, data: Any) -> None:
            pass

    d = Counter()
    for at in (1.0, 2.0, 3.0):
        d.push(at, Kind.TIMER, 0, None)
    assert d.run_until(2.5, lambda kind: False) is True and d.events == 2  # a stop that never fires
    assert d.run_until(10.0, lambda kind: True) is False and d.events == 3  # the stop fired on the last one
    assert d.run_until(10.0) is True and d.events == 3  # nothing left


def test_the_test_link_moves_its_clock_to_the_horizon_only_when_nothing_stopped_it() -> None:
    from tests.helpers import Link, make_coordinator

    link = Link(coordinator=make_coordinator("spin", k=2, timeout_s=30.0))
    link.add_device("d0", min_samples=2)
    link.add_sample("d0", 1, at=1.0)
    link.add_sample("d0", 2, at=2.0)
    assert link.run_until(50.0, lambda kind: kind == Kind.SAMPLE) is False and link.now == 1.0  # stopped: the clock stays
    assert link.run_until(50.0, lambda kind: False) is True and link.now == 50.0  # given, never fired: drained


def test_evaluation_rows_count_online_devices_and_trainings_like_a_scan_of_the_fleet() -> None:
    raw = small_scenario(profiles={"flaky": {"base": "phone", "availability": {"dropout_every_s": 60.0, "dropout_mean_s": 45.0}}},
                         fleet={"devices": 10, "mix": {"flaky": 1, "phone": 1}}, eval_every_s=7)
    sim = simulate(raw)
    online_by_scan: list[float] = []
    trainings_by_scan: list[float] = []
    evaluate = sim._evaluate

    def scan_then_evaluate(now: float) -> None:
        online_by_scan.append(float(sum(not d.plan.instance.offline.offline_at(now) for d in sim.devices)))
        trainings_by_scan.append(float(sum(d.trainings for d in sim.devices)))
        evaluate(now)

    sim._evaluate = scan_then_evaluate  # type: ignore[method-assign]
    result = sim.run()
    assert [r["devices_online"] for r in result.rows] == online_by_scan
    assert [r["trainings"] for r in result.rows] == trainings_by_scan
    assert len(set(online_by_scan)) > 2 and trainings_by_scan[-1] > 10, "devices went offline and trained"


def test_devices_holding_the_same_version_share_one_decoded_array() -> None:
    sim = simulate(small_scenario(fleet={"devices": 16, "mix": {"phone": 1}}, duration_s=600))
    sim.run()
    by_version: dict[int, list[npt.NDArray[Any]]] = {}
    for dev in sim.devices:
        st = dev.core.state
        if st.deployed is not None:
            by_version.setdefault(st.deployed_version, []).append(st.deployed)
    shared = {v: arrays for v, arrays in by_version.items() if len(arrays) > 1}
    assert shared, f"no version is held by two devices: {sorted((v, len(a)) for v, a in by_version.items())}"
    for arrays in shared.values():
        assert all(np.shares_memory(arrays[0], a) for a in arrays[1:]), "each device decoded its own copy"
        assert not arrays[0].flags.writeable, "a shared model must be read-only"


def test_status_is_not_built_per_event_and_only_on_demand_in_the_emulator() -> None:
    def play(payload: bool) -> tuple[Simulation, int, int, int]:
        sim = simulate(small_scenario(fleet={"devices": 24, "mix": {"phone": 1}}))
        core = sim.coordinator
        core.config = dataclasses.replace(core.config, status_interval_s=60.0, status_payload=payload)
        built, handled, published = [0], [0], [0]
        status, handle, publish = core.status, core.handle, sim._publish

        def counting_status() -> Any:
            built[0] += 1
            return status()

        def counting_handle(event: Any) -> Any:
            handled[0] += 1
            return handle(event)

        def counting_publish(sender: int, action: Any, now: float) -> None:
            published[0] += bool(action.retain)
            publish(sender, action, now)

        core.status = counting_status  # type: ignore[method-assign]
        core.handle = counting_handle  # type: ignore[method-assign]
        sim._publish = counting_publish  # type: ignore[method-assign]
        sim.run()
        return sim, built[0], handled[0], published[0]

    eager, built, handled, published = play(True)
    versions, duration = eager.coordinator.version, eager.settings.duration_s
    assert handled > 200 and versions > 5
    assert built == published, "a status is built only for a retained status publish"
    # At most one per interval, plus one per new version (announced at once), plus the start.
    assert built <= versions + duration / 60.0 + 2
    assert built < handled / 2, f"status built {built} times for {handled} coordinator events"
    lazy, built_lazy, _, published_lazy = play(False)
    assert built_lazy == published_lazy == 0, "the emulator never builds the status on its own"
    assert lazy.coord_notes["status"] == published, "the same schedule, announced without a payload"
    assert lazy.rows == eager.rows and lazy.events == eager.events
    assert lazy.coordinator.status().version == lazy.coordinator.version


def test_a_target_met_at_the_start_is_reported_as_such_not_as_missed() -> None:
    """Researcher trial, finding 3: with the starting model already above the target, SPIN's
    time was 0 and the report said "SPIN did not reach the target on every seed" (n/a in
    every cell) while summary.json said all_reached."""
    import types

    from devices.report import _ratios, format_table

    def run(strategy: str, t: float) -> dict[str, Any]:
        return {"strategy": strategy, "overrides": {}, "time_to_target_s": [t], "mean_time_to_target_s": t, "all_reached": True,
                "initial_accuracy": 0.81, "final_accuracy": 0.9, "mean_staleness": None, "label_latency_mean_s": None,
                "bytes_up": 0, "bytes_down": 0, "versions": 3, "updates": 9,
                "sensitivity": {"0.8": {"reached": 1, "runs": 1, "mean_s": t}}}

    runs = {"spin": run("spin", 0.0), "fedasync": run("fedasync", 0.0)}
    ratios = _ratios(runs)
    assert ratios == {"fedasync / spin": {"ratio": None, "kind": "at_start"}}
    summary = {"target_accuracy": 0.8, "seeds": [0], "duration_s": 300.0, "runs": runs, "ratios": ratios}
    table = format_table(types.SimpleNamespace(name="s", description=""), summary)  # type: ignore[arg-type]
    assert "SPIN met the target at t = 0: the starting model already reaches 80%" in table
    assert "did not reach" not in table
    runs["spin"] = run("spin", 60.0)  # met later: an exact ratio, as before
    assert _ratios(runs) == {"fedasync / spin": {"ratio": 0.0, "kind": "exact"}}


def test_a_short_run_prints_its_seconds_with_decimals() -> None:
    """helper-101: paper-spin --quick (1 s) printed SPIN's 0.4 s as "0" next to FedBuff's "0 (0.84×)",
    and its full run (12 s) whole seconds where the README quotes 7.77 s; runs of 100 s or more keep
    whole seconds (the README's tables)."""
    import types

    from devices.report import _ratios, format_table

    def run(strategy: str, t: float) -> dict[str, Any]:
        return {"strategy": strategy, "overrides": {}, "time_to_target_s": [t], "mean_time_to_target_s": t, "all_reached": True,
                "initial_accuracy": 0.6, "final_accuracy": 0.9, "mean_staleness": None, "label_latency_mean_s": 0.25,
                "bytes_up": 0, "bytes_down": 0, "versions": 3, "updates": 9,
                "sensitivity": {"0.8": {"reached": 1, "runs": 1, "mean_s": t}}}

    runs = {"spin": run("spin", 0.4), "fedbuff": run("fedbuff", 0.336)}
    summary = {"target_accuracy": 0.8, "seeds": [0], "duration_s": 1.0, "runs": runs, "ratios": _ratios(runs)}
    table = format_table(types.SimpleNamespace(name="s", description=""), summary)  # type: ignore[arg-type]
    assert "| spin | spin | 0.40 | 0.40 |" in table and "| fedbuff | 0.34 (0.84×) |" in table and "duration 1.00 s" in table
    summary["duration_s"] = 300.0
    assert "| spin | spin | 0 | 0 |" in format_table(types.SimpleNamespace(name="s", description=""), summary)  # type: ignore[arg-type]


def test_a_spin_variant_is_divided_by_the_first_spin_run_only() -> None:
    """helper-101: in attacks.toml (every run SPIN) "attacked: robust + gate" printed "(0.61×)": ÷
    "attacked: gate only", the first SPIN run with the same overrides, under "÷ the matching SPIN
    run". A SPIN variant is now compared with the scenario's first SPIN run or not at all; a
    baseline keeps the SPIN run of its overrides, and a variant of the first run keeps its ratio."""
    import types

    from devices.report import _ratios, format_table

    def run(strategy: str, t: float, overrides: dict[str, Any]) -> dict[str, Any]:
        return {"strategy": strategy, "overrides": overrides, "time_to_target_s": [t], "mean_time_to_target_s": t,
                "all_reached": True, "initial_accuracy": 0.6, "final_accuracy": 0.9, "mean_staleness": None,
                "label_latency_mean_s": None, "bytes_up": 0, "bytes_down": 0, "versions": 3, "updates": 9,
                "sensitivity": {"0.8": {"reached": 1, "runs": 1, "mean_s": t}}}

    runs = {"honest": run("spin", 200.0, {"attack": 0}), "honest deltas": run("spin", 100.0, {"attack": 0}),
            "gate only": run("spin", 800.0, {}), "robust + gate": run("spin", 500.0, {}), "fedbuff": run("fedbuff", 600.0, {})}
    summary = {"target_accuracy": 0.8, "seeds": [0], "duration_s": 900.0, "runs": runs, "ratios": _ratios(runs)}
    table = format_table(types.SimpleNamespace(name="s", description=""), summary)  # type: ignore[arg-type]
    assert "| robust + gate | 500 |" in table and "| gate only | 800 |" in table  # no bracket: not ÷ each other
    assert "| honest deltas | 100 (0.50×) |" in table and "| fedbuff | 600 (0.75×) |" in table


def test_quick_on_a_scenario_without_a_quick_table_says_it_runs_the_full_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Researcher trial, finding 7: --quick silently ran a 5-seed scenario in full."""
    scenario = tmp_path / "noquick.toml"
    scenario.write_text('task = "digits"\n[[runs]]\nstrategy = "spin"\n', encoding="utf-8")
    parser = argparse.ArgumentParser()
    emulate.add_arguments(parser)
    with pytest.raises(ScenarioError, match="target"):  # (stops before running anything)
        emulate.run(parser.parse_args([str(scenario), "--quick", "--target", "1.5", "--out", str(tmp_path / "o")]))
    assert "has no [quick] table: --quick runs the full scenario" in capsys.readouterr().err


def test_the_profile_catalogue_names_every_built_in_preset() -> None:
    """Researcher trial, finding 8: the names a scenario may use were listed nowhere."""
    from devices.profiles import AVAILABILITY, COMPUTE, LINKS, PROFILES, catalogue

    text = catalogue()
    for name in [*PROFILES, *COMPUTE, *LINKS, *AVAILABILITY]:
        assert f"  {name} " in text, name
    assert "night-flaky asleep 8 h from 23:00, online ~1800 s, then offline ~300 s" in text


def test_scenario_mistakes_a_user_made_are_one_line_naming_file_and_key(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """helper-89's trial: a seed given twice was counted twice in every mean; an unknown task's
    error did not name the file; a typo inside a [profiles.X] compute table leaked Python's
    `__init__() got an unexpected keyword argument`."""
    from demos.cli import main

    with pytest.raises(ConfigError, match="seed 0 given more than once"):
        emulate.parse_seeds("0,0-2")
    runs = '[[runs]]\nstrategy = "spin"\n'
    with pytest.raises(ScenarioError, match=r"\[profiles.headset\] compute: unknown key 'sample_epoch_sx' "
                                            r"\(did you mean 'sample_epoch_s'\?\); known: sample_epoch_s"):
        parse_scenario(read_toml_text(tmp_path, 'task = "digits"\n[profiles.headset]\ncompute = { sample_epoch_sx = 0.4 }\n' + runs))
    bad_task = tmp_path / "bad.toml"
    bad_task.write_text('task = "digitz"\n' + runs)
    assert main(["emulate", str(bad_task), "--quick", "--out", str(tmp_path / "out")]) == 2  # a mistake in the scenario: exit 2, as for a bad option
    assert f"{bad_task}: unknown task 'digitz'; known: " in capsys.readouterr().err


def read_toml_text(tmp_path: Path, text: str) -> dict[str, Any]:
    path = tmp_path / "s.toml"
    path.write_text(text)
    return read_toml(path)


def test_runs_never_evaluated_after_the_start_are_said_so_in_the_table_and_plot(tmp_path: Path) -> None:
    """helper-89: staleness-gi's quick runs stop at a version count before the first evaluation;
    the table showed "0.664 → 0.664" and "≥ 1,200 s" for every run as if they meant something,
    and the accuracy plot was an empty axis from -0.04 to 0.04 min under a legend of 30 entries."""
    from devices.report import format_table, plot_accuracy, plot_staleness, summarise
    from devices.simulator import RunResult

    runs = "".join(f'[[runs]]\nstrategy = "spin"\nlabel = "r{i}"\n' for i in range(12))
    sc = parse_scenario(read_toml_text(tmp_path, 'task = "digits"\nduration_s = 600\neval_every_s = 60\n' + runs))
    results = [RunResult(label=f"r{i}", strategy="spin", params={}, seed=0, target_accuracy=0.9,
                         rows=[{"t_s": 0.0, "accuracy": 0.66, "committed_at_s": 0.0, "version": 0.0}],
                         summary={"staleness_histogram": {"0": 3, "1": 2}, "initial_accuracy": 0.66, "final_accuracy": 0.66,
                                  "best_accuracy": 0.66, "versions": 25, "updates_accepted": 125, "label_latency_mean_s": 9.0,
                                  "bytes_up": 1e6, "bytes_down": 1e6}) for i in range(12)]
    summary = summarise(sc, results)
    assert summary["evaluated_after_start"] is False
    assert "**No run was evaluated after t = 0**" in format_table(sc, summary)
    plot_accuracy(sc, results, tmp_path / "a.png")
    plot_staleness(results, tmp_path / "s.png")
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    results[0].rows.append({"t_s": 60.0, "accuracy": 0.7, "committed_at_s": 30.0, "version": 1.0})
    assert "No run was evaluated" not in format_table(sc, summarise(sc, results))


def test_the_gestures_scenario_trains_the_gesture_classifier(tmp_path: Path) -> None:
    """demos/scenarios/gestures-headline.toml (the README's gestures table), shortened: the
    devices' gesture updates are aggregated and the deployed classifier improves."""
    sc = load_scenario(SCENARIOS / "gestures-headline.toml")
    spec = next(r for r in sc.runs if r.strategy == "spin")
    spec = dataclasses.replace(spec, settings=dataclasses.replace(spec.settings, duration_s=900.0))
    result = run_spec(emulate.load_task(sc.settings.task), spec, 0)
    s = result.summary
    assert s["updates_accepted"] >= 100 and s["versions"] >= 20  # 273 and 57 when written
    assert result.rows[-1]["accuracy"] > result.rows[0]["accuracy"] + 0.03, (result.rows[0], result.rows[-1])
