"""Regional scenarios from the command line: one coordinator per region (or one server for
all), the Spyker paper's inter-region latencies — the fleet runner of :mod:`devices.simulator`.

    python -m devices.multiregion demos/scenarios/multiregion/digits-4regions.toml
    python -m devices.multiregion demos/scenarios/multiregion/digits-4regions.toml --quick

A regional scenario is an ordinary scenario (:mod:`devices.scenario`) with ``[multiregion]``
(regions, latency matrix, bandwidth, fleet sizes, training time per update) and
``[[methods]]`` (strategy + peering, the coordinators' CPU costs); see
:class:`devices.scenario.Regions` and :class:`devices.simulator.Simulation` for what a run
does. This module runs every method × fleet size × seed (:class:`Sweep`, ``--jobs``
processes; :mod:`devices.paper_spyker` and :mod:`devices.paper_nebula` sweep the same way)
and writes ``time_to_target.md`` (the comparison at the base fleet size and the scaling
multipliers next to the paper's), ``accuracy.png`` (with a scaling panel when there are
several fleet sizes), one JSON per run and ``summary.json`` (tables and plots:
:mod:`devices.report`).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from coordinator.config import bounded
from devices.scenario import (
    KINDS,
    PAPER_LATENCY_MS,
    PAPER_REGIONS,
    Method,
    Scenario,
    ScenarioError,
    Topology,
    check_task_fits,
    load_scenario,
    method_stem,
    parse_scenario,
)
from devices.simulator import RunResult, Simulation, run_regional
from edge_sdk.tasks.base import Task

__all__ = [
    "KINDS",
    "PAPER_LATENCY_MS",
    "PAPER_REGIONS",
    "Method",
    "MultiRegionRun",
    "MultiRegionScenario",
    "Sweep",
    "SweepRun",
    "Topology",
    "load_multiregion",
    "main",
    "parse_multiregion",
    "run_method",
    "run_name",
    "sweep_parser",
]

T = TypeVar("T")

MultiRegionScenario = Scenario
MultiRegionRun = Simulation.regional
run_method = run_regional


class NoStoredRuns(ScenarioError):
    """``--report-only`` (``edgeci emulate --replot``) found no runs to report: what is on disk is
    missing, not the scenario wrong, so the CLI exits 1 (as a one-region ``--replot``), not 2."""

    exit_code = 1


def load_multiregion(path: str | Path, *, quick: bool = False, overrides: Mapping[str, Any] | None = None) -> Scenario:
    """A regional scenario file (``[quick]`` applied with ``quick=True``, then ``overrides``:
    dotted keys such as ``seeds`` or ``duration_s``)."""
    sc = load_scenario(path)
    sc = sc.quick() if quick else sc
    return sc.with_overrides(overrides) if overrides else sc


def parse_multiregion(raw: Mapping[str, object], *, source: str = "<string>") -> Scenario:
    """A regional scenario from its table (``[multiregion]`` may be left out: the defaults)."""
    return parse_scenario({"multiregion": {}, **raw}, source=source)


# --------------------------------------------------------------------------- sweeps


def sweep_parser(prog: str, description: str, out: str) -> argparse.ArgumentParser:
    """The command line of a :class:`Sweep` (``out``: the default output directory, for --help)."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("scenario", type=Path)
    p.add_argument("--methods", default="", help="comma-separated method labels or kinds (default: all)")
    p.add_argument("--devices", default="", help="fleet sizes, e.g. 100,200,300 (default: the scenario's device_counts)")
    p.add_argument("--seeds", default="", help="seeds, e.g. 0,1 or 0-4 (default: the scenario's)")
    p.add_argument("--duration", type=float, help="virtual seconds per run (cap)")
    p.add_argument("--quick", action="store_true", help="the scenario's [quick] variant")
    p.add_argument("--jobs", type=bounded(int, 1), default=1, help="runs in parallel (processes)")
    p.add_argument("--out", type=Path, help=f"output directory (default: {out})")
    p.add_argument("--report-only", action="store_true",
                   help="only rebuild the report from the run JSONs already in --out/runs (e.g. after parallel sweeps)")
    return p


def run_name(label: str, devices: int, seed: int) -> str:
    """A sweep's run file name, without ``.json``."""
    return f"{method_stem(label)}__{devices}__seed{seed}"


_TASKS: dict[str, Task] = {}
"""Tasks by name and options: a process loads each once per sweep (:meth:`SweepRun.start`)."""


@dataclass(frozen=True)
class SweepRun:
    """One run of a :class:`Sweep`, as a worker process needs it: how to load the scenario
    (file, ``--quick``, ``--seeds`` / ``--duration``), the method, fleet size and seed, and
    the folder its JSON goes to."""

    path: str
    quick: bool
    overrides: Mapping[str, Any]
    label: str
    devices: int
    seed: int
    directory: str

    def start(self) -> tuple[Task, Scenario, Method]:
        """Torch on one thread; the task (once per process), the scenario and this run's method."""
        from devices.report import load_task
        from edge_sdk.trainer import configure_threads

        configure_threads(1)
        sc = load_multiregion(self.path, quick=self.quick, overrides=self.overrides)
        method = next(m for m in sc.methods if m.label == self.label)
        key = json.dumps([sc.settings.task, dict(sc.settings.task_options)], sort_keys=True)
        if key not in _TASKS:
            _TASKS[key] = load_task(sc.settings.task, sc.settings.task_options)
        return _TASKS[key], sc, method

    def save(self, data: Mapping[str, Any], *, indent: int | None = None) -> None:
        """``data`` as this run's JSON (:func:`run_name`) in its folder."""
        from devices.report import json_default, write_text_atomic

        path = Path(self.directory) / f"{run_name(self.label, self.devices, self.seed)}.json"
        write_text_atomic(path, json.dumps(data, indent=indent, default=json_default))


@dataclass(frozen=True)
class Sweep:
    """Every method × fleet size × seed of a regional scenario, as a :func:`sweep_parser`
    command line chose them (this module's, :mod:`devices.paper_spyker`'s, :mod:`devices.paper_nebula`'s)."""

    scenario: Scenario
    out: Path
    runs: tuple[SweepRun, ...]

    @classmethod
    def from_args(cls, p: argparse.ArgumentParser, args: argparse.Namespace, default_out: Callable[[Scenario], Path]) -> Sweep:
        """The scenario with the command line's choices, and ``--out`` (made, with ``runs/`` inside)."""
        from devices.report import parse_seeds

        overrides: dict[str, Any] = {}
        if args.seeds:
            overrides["seeds"] = parse_seeds(args.seeds)
        if args.duration is not None:
            overrides["duration_s"] = args.duration
        sc = load_multiregion(args.scenario, quick=args.quick, overrides=overrides)
        if sc.regions is None:
            p.error(f"{args.scenario} has no [multiregion]: run it with `edgeci emulate`")
        if args.methods:
            sc = sc.select(sc.names_in(args.methods))
        if args.devices:
            regions = len(sc.topology.regions)
            try:
                counts = [int(n) for n in args.devices.split(",")]
            except ValueError:
                p.error(f"--devices expects fleet sizes like 100,200, got {args.devices!r}")
            if any(n < regions for n in counts):  # (0 ran the scenario's own fleet, reported as "0 devices")
                p.error(f"--devices: every fleet size must be at least the number of regions ({regions}), got {args.devices}")
            sc = sc.with_device_counts(counts)
        out: Path = args.out or default_out(sc)
        if not args.report_only:  # (a report from nothing makes no folders)
            from devices.report import load_task, output_dir

            s = sc.settings  # what the methods' shared settings ask of the task: before the first run
            check_task_fits(s, lambda: load_task(s.task, s.task_options).data(), str(args.scenario))

            output_dir(out / "runs")
        # Seed by seed: a sweep stopped early holds every method on its first seeds (paired).
        runs = tuple(SweepRun(str(args.scenario), args.quick, overrides, m.label, n, seed, str(out / "runs"))
                     for seed in sc.settings.seeds for n in sc.device_counts for m in sc.methods)
        return cls(sc, out, runs)

    def stored(self) -> list[RunResult]:
        """The runs of this sweep found in ``out/runs`` (a :class:`ScenarioError` when there are none)."""
        from devices.report import load_region_runs

        found = load_region_runs(self.out / "runs", self.scenario)
        if not found:
            raise NoStoredRuns(f"--report-only: {self.out / 'runs'} holds no run of this scenario's methods, sizes and seeds; "
                                "run without it first")
        return found

    def run(self, run: Callable[[SweepRun], T], processes: int = 1) -> list[T]:
        """``run(r)`` for every run, in order (in ``processes`` worker processes when > 1)."""
        print(f"{self.scenario.name}: {len(self.runs)} run(s) → {self.out}", file=sys.stderr)
        _TASKS.clear()  # the task is loaded afresh for each sweep
        if processes > 1:
            with ProcessPoolExecutor(processes) as pool:
                return list(pool.map(run, self.runs))
        return [run(r) for r in self.runs]


def _run(run: SweepRun, *, progress: bool) -> RunResult:
    """One run of ``python -m devices.multiregion``: progress lines, a line when done, its JSON."""
    task, sc, m = run.start()
    n, seed = run.devices, run.seed

    def on_row(now: float, row: Mapping[str, float]) -> None:
        if progress and int(now) % 10 == 0 and now == int(now):
            print(f"  {m.label} · {n} devices · seed {seed}: t={now:.0f}s acc {row['accuracy']:.3f} "
                  f"(min {row['accuracy_min']:.3f}) updates {row['updates']:.0f}", file=sys.stderr)

    r = run_regional(task, sc, m, n, seed, on_row)
    ttt = r.time_to_target
    print(f"{m.label} · {n} devices · seed {seed}: time to target "
          f"{'—' if ttt is None else f'{ttt:.1f} s'}, final {r.summary['final_accuracy']:.3f}, "
          f"wall {r.summary['wall_s']:.0f} s", file=sys.stderr)
    run.save(r.to_json(), indent=1)
    return r


def main(argv: Sequence[str] | None = None) -> int:
    p = sweep_parser("python -m devices.multiregion", (__doc__ or "").split("\n\n")[0], "runs/multiregion/<name>")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    from devices.report import write_region_report

    sweep = Sweep.from_args(p, args, lambda sc: Path("runs") / "multiregion" / sc.name)
    if args.report_only:
        return write_region_report(sweep.scenario, sweep.stored(), sweep.out)
    results = sweep.run(functools.partial(_run, progress=not args.no_progress), args.jobs)
    return write_region_report(sweep.scenario, results, sweep.out)


if __name__ == "__main__":
    from devices.report import command_line

    sys.exit(command_line(main, "python -m devices.multiregion"))
