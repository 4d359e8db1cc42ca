"""Regional scenarios from the command line: one coordinator per region (or one server for
all), the Spyker paper's inter-region latencies — the fleet runner of :mod:`devices.simulator`.

    python -m devices.multiregion demos/scenarios/multiregion/digits-4regions.toml
    python -m devices.multiregion demos/scenarios/multiregion/digits-4regions.toml --quick

A regional scenario is an ordinary scenario (:mod:`devices.scenario`) with ``[multiregion]``
(regions, latency matrix, bandwidth, fleet sizes, training time per update) and
``[[methods]]`` (strategy + peering, the coordinators' CPU costs); see
:class:`devices.scenario.Regions` and :class:`devices.simulator.Simulation` for what a run
does. This module runs every method × fleet size × seed and writes ``time_to_target.md``
(the comparison at the base fleet size and the scaling multipliers next to the paper's),
``accuracy.png``, ``scaling.png``, one JSON per run and ``summary.json`` (tables and plots:
:mod:`devices.report`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from devices.scenario import (
    KINDS,
    PAPER_LATENCY_MS,
    PAPER_REGIONS,
    Method,
    Scenario,
    Topology,
    load_scenario,
    parse_scenario,
)
from devices.simulator import RunResult, Simulation, run_regional

__all__ = [
    "KINDS",
    "PAPER_LATENCY_MS",
    "PAPER_REGIONS",
    "Method",
    "MultiRegionRun",
    "MultiRegionScenario",
    "Topology",
    "load_multiregion",
    "main",
    "parse_multiregion",
    "run_method",
]

MultiRegionScenario = Scenario
MultiRegionRun = Simulation.regional
run_method = run_regional


def load_multiregion(path: str | Path, *, quick: bool = False) -> Scenario:
    """A regional scenario file (``[quick]`` applied with ``quick=True``)."""
    sc = load_scenario(path)
    return sc.quick() if quick else sc


def parse_multiregion(raw: Mapping[str, object], *, source: str = "<string>") -> Scenario:
    """A regional scenario from its table (``[multiregion]`` may be left out: the defaults)."""
    return parse_scenario({"multiregion": {}, **raw}, source=source)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m devices.multiregion", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("scenario", type=Path)
    p.add_argument("--methods", default="", help="comma-separated method labels or kinds (default: all)")
    p.add_argument("--devices", default="", help="fleet sizes, e.g. 100,200,300 (default: the scenario's device_counts)")
    p.add_argument("--seeds", default="", help="seeds, e.g. 0,1 or 0-4 (default: the scenario's)")
    p.add_argument("--duration", type=float, help="virtual seconds per run (cap)")
    p.add_argument("--quick", action="store_true", help="the scenario's [quick] variant")
    p.add_argument("--out", type=Path, help="output directory (default: runs/multiregion/<name>)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--report-only", action="store_true",
                   help="only rebuild the table and plots from the run JSONs already in --out/runs (e.g. after parallel sweeps)")
    args = p.parse_args(argv)
    from devices.report import (
        json_default,
        load_region_runs,
        load_task,
        parse_seeds,
        write_region_report,
    )
    from edge_sdk.trainer import configure_threads

    sc = load_multiregion(args.scenario, quick=args.quick)
    if sc.regions is None:
        p.error(f"{args.scenario} has no [multiregion]: run it with `edgeci emulate`")
    changes = {"seeds": parse_seeds(args.seeds) if args.seeds else None, "duration_s": args.duration}
    if any(v is not None for v in changes.values()):
        sc = sc.with_overrides({k: v for k, v in changes.items() if v is not None})
    if args.methods:
        sc = sc.select(sc.names_in(args.methods))
    if args.devices:
        sc = sc.with_device_counts([int(n) for n in args.devices.split(",")])
    out: Path = args.out or Path("runs") / "multiregion" / sc.name
    (out / "runs").mkdir(parents=True, exist_ok=True)
    if args.report_only:
        return write_region_report(sc, load_region_runs(out / "runs", sc), out)
    configure_threads(1)
    task = load_task(sc.settings.task, sc.settings.task_options)
    results: list[RunResult] = []
    total = len(sc.methods) * len(sc.device_counts) * len(sc.settings.seeds)
    print(f"{sc.name}: {total} run(s) → {out}", file=sys.stderr)
    for n in sc.device_counts:
        for m in sc.methods:
            for seed in sc.settings.seeds:
                def progress(now: float, row: Mapping[str, float], m: Method = m, n: int = n, seed: int = seed) -> None:
                    if not args.no_progress and int(now) % 10 == 0 and now == int(now):
                        print(f"  {m.label} · {n} devices · seed {seed}: t={now:.0f}s acc {row['accuracy']:.3f} "
                              f"(min {row['accuracy_min']:.3f}) updates {row['updates']:.0f}", file=sys.stderr)

                r = run_regional(task, sc, m, n, seed, progress)
                results.append(r)
                ttt = r.time_to_target
                print(f"{m.label} · {n} devices · seed {seed}: time to target "
                      f"{'—' if ttt is None else f'{ttt:.1f} s'}, final {r.summary['final_accuracy']:.3f}, "
                      f"wall {r.summary['wall_s']:.0f} s", file=sys.stderr)
                slug = f"{m.label}__{n}__seed{seed}".replace(" ", "-").replace("/", "-")
                (out / "runs" / f"{slug}.json").write_text(json.dumps(r.to_json(), indent=1, default=json_default), encoding="utf-8")
    return write_region_report(sc, results, out)


if __name__ == "__main__":
    from devices.report import command_line

    sys.exit(command_line(main, "python -m devices.multiregion"))
