"""How fast does the fleet emulator run? Virtual seconds per wall second.

100 devices, one simulated hour of the digits headline scenario (``demos/scenarios/
digits-headline.toml``), SPIN K = 10 and FedAsync (one version per update, the most
aggregation work), with real local training on one torch thread. Goal: ≥ 100× real time
on 2 cores.

The in-process baseline is the same SPIN run with local training replaced by a no-op
(the update is the received model): it measures the simulator and the two cores alone,
so the ratio says how much of the wall time real training takes.

    .venv/bin/python benchmarks/emulator_speed.py [--duration 3600] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from devices.scenario import RunSpec, load_scenario  # noqa: E402
from devices.simulator import RunResult, run_spec  # noqa: E402
from edge_sdk.spec import Vector  # noqa: E402
from edge_sdk.tasks import Split, Task, TaskData, TrainConfig, TrainResult, get_task  # noqa: E402
from edge_sdk.trainer import configure_threads  # noqa: E402

GOAL = 100.0


class NoTraining:
    """The digits task with local training replaced by returning the received model."""

    def __init__(self, task: Task) -> None:
        self._task = task
        self.name = task.name
        self.spec = task.spec

    def data(self) -> TaskData:
        return self._task.data()

    def pretrained(self, *, seed: int = 0) -> Vector:
        return self._task.pretrained(seed=seed)

    def local_update(self, weights: Vector, x: npt.NDArray[Any], y: npt.NDArray[np.int64], config: TrainConfig) -> TrainResult:
        return TrainResult(weights=np.array(weights, dtype=np.float32, copy=True), n_samples=int(y.shape[0]), loss=0.0, seconds=0.0)

    def evaluate(self, weights: Vector, split: Split | None = None) -> dict[str, float]:
        return self._task.evaluate(weights, split)


def timed(task: Task, spec: RunSpec, seed: int) -> tuple[RunResult, float]:
    started = time.perf_counter()
    result = run_spec(task, spec, seed)
    return result, time.perf_counter() - started


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=3600.0, help="virtual seconds per run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="print the top of a cProfile of the SPIN run")
    args = p.parse_args()
    configure_threads(1)

    scenario = load_scenario(ROOT / "demos" / "scenarios" / "digits-headline.toml").with_overrides({"duration_s": args.duration})
    by_strategy = {r.strategy: r for r in scenario.runs}
    task = get_task("digits", device="cpu")
    task.pretrained(seed=args.seed)  # pretraining is a one-off, not part of the emulation

    print(f"emulator speed: {scenario.settings.devices} devices, {args.duration:,.0f} virtual s of {scenario.name}, torch threads = 1")
    base, base_wall = timed(NoTraining(task), by_strategy["spin"], args.seed)
    base_speed = args.duration / base_wall
    print(f"  baseline (no local training) spin : {base_wall:6.2f} wall s  {base_speed:8.0f} virtual s / wall s  "
          f"({base.summary['events']:,} events, {base.summary['trainings']:,} jobs)")
    speeds: dict[str, float] = {}
    for name in ("spin", "fedasync"):
        if args.profile and name == "spin":
            prof = cProfile.Profile()
            prof.enable()
        result, wall = timed(task, by_strategy[name], args.seed)
        if args.profile and name == "spin":
            prof.disable()
        speeds[name] = args.duration / wall
        s = result.summary
        print(f"  {name:8s} with real training      : {wall:6.2f} wall s  {speeds[name]:8.0f} virtual s / wall s  "
              f"({s['events']:,} events, {s['trainings']:,} local updates, {s['versions']} versions, "
              f"accuracy {s['initial_accuracy']:.3f} → {s['final_accuracy']:.3f})  "
              f"= {speeds[name] / base_speed:.2f}× the no-training baseline")
    worst = min(speeds.values())
    verdict = "meets" if worst >= GOAL else "MISSES"
    print(f"  slowest: {worst:.0f}× real time — {verdict} the goal of ≥ {GOAL:.0f}× real time")
    if args.profile:
        pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
    return 0 if worst >= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
