"""``edgeci emulate SCENARIO.toml`` — compare strategies on a virtual-clock fleet.

Runs every ``[[runs]]`` line of the scenario (or those named by ``--strategies``) on the
same seeds through :mod:`devices.simulator` — the real device and coordinator cores on a
virtual clock — with a progress bar per run, then writes to ``--out``:

* ``runs/<label>__seed<k>.csv`` — one row per evaluation: virtual time, version, its
  commit time, accuracy, loss, bytes up/down, updates, aggregations, mean staleness, …
* ``runs/<label>__seed<k>.json`` — the same rows plus the run's summary (staleness
  histogram, label-to-model latency, wall time, virtual seconds per wall second);
* ``accuracy.png`` — accuracy vs virtual time, one line per run (mean over seeds, band =
  min–max), the target accuracy dashed;
* ``staleness.png`` — staleness histogram per run;
* ``time_to_target.md`` — the table (also printed), with SPIN vs FedBuff as a ratio;
* ``summary.json`` — everything in the table, machine-readable;
* with ``reference = "<run label>"`` in the scenario: ``release.md`` / ``release.json`` /
  ``release.png`` — the release's accuracy (what devices predict with) per run and seed:
  worst drop below its start, time to the reference run's target
  (:mod:`devices.release_report`).

A regional scenario (``[multiregion]`` and ``[[methods]]``, ``demos/scenarios/multiregion/``) runs
as ``python -m devices.multiregion`` does (:mod:`devices.multiregion`), its outputs under ``--out``.
A scenario with a ``[stream]`` table (``demos/scenarios/scc-stream.toml``) is the SCC stream
experiment instead: EdgeClient devices with SCC on the same engine (:mod:`devices.scc_fleet`),
reported as a per-seed and a mean ± std table of its arms.

``--broker mqtt://…`` is the real-MQTT fleet mode (issue 3, item 6): the same scenario
played in real time against a running coordinator. It is delegated to
``devices.mqtt_fleet.run_fleet(scenario, broker=…, time_scale=…, args=…)``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from coordinator.config import bounded
from devices.report import (
    DATA_ENV,
    TORCHVISION_DATASETS,
    MissingDataset,
    format_table,
    json_default,
    load_runs,
    load_task,
    output_dir,
    parse_seeds,
    plot_accuracy,
    plot_staleness,
    seeds_arg,
    slug,
    summarise,
    write_run,
    write_text_atomic,
    writing_outputs,
)
from devices.scenario import (
    RunSpec,
    Scenario,
    ScenarioError,
    check_task_fits,
    load_scenario,
    read_toml,
)
from devices.simulator import TRANSPORTS, RunResult, run_spec
from edge_sdk.errors import BadOption, ConfigError
from edge_sdk.tasks.base import Task

__all__ = ["DATA_ENV", "TORCHVISION_DATASETS", "add_arguments", "format_table", "load_task", "parse_seeds", "run", "summarise"]

CONFIG_LAYERS = "env"
ENV_OPTIONS = ("threads",)
"""``EDGECI_THREADS`` sets ``--threads`` (torch's thread count for the emulated devices' training)."""

HELP = """\
Runs every [[runs]] line of the scenario (or those --strategies names) on each of its seeds, on the
same fleet, data and labelling times per seed. The full run is the scenario as written (e.g. 5 seeds
x 1 virtual hour: minutes to hours of wall time); --quick runs its [quick] table instead (shorter,
fewer devices or seeds: a smoke test); without one, --quick runs the full scenario (and says so).

Outputs go to --out (default runs/emulate/<scenario name>): runs/<label>__seed<k>.csv and .json
(one row per evaluation, and the run's summary), time_to_target.md (the table, also printed),
summary.json, accuracy.png, staleness.png; with reference = "<label>" in the scenario also
release.md, release.json and release.png; with [delay] devices > 0 the staleness report.

--replot rebuilds the tables and plots from the runs already in --out without simulating (e.g. with
another --target); give it the same --quick, --seeds and --strategies as the run that wrote them.

A scenario with [multiregion] and [[methods]] (demos/scenarios/multiregion/) runs as
`python -m devices.multiregion` does; one with [stream] is the SCC stream experiment. The scenario is
checked completely before anything runs: a mistake in it (a misspelled key, a value out of range, an
unknown strategy, profile or task) is one line naming the file and the key, and exit status 2."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from demos.cli import HelpFormatter

    class EmulateHelp(HelpFormatter):
        """Keeps the blank lines between the description's paragraphs (each is wrapped on its own)."""

        def _fill_text(self, text: str, width: int, indent: str) -> str:
            return "\n\n".join(super(EmulateHelp, self)._fill_text(part, width, indent) for part in text.split("\n\n"))

    p.formatter_class = EmulateHelp
    p.description = f"{p.description}.\n\n{HELP}"
    p.add_argument("scenario", type=Path, help="scenario TOML (see demos/scenarios/; `python -m devices.profiles` lists the "
                                               "device, compute, link and availability names it may use)")
    p.add_argument("--strategies", default="", help="comma-separated run labels or strategy names; empty = every run")
    p.add_argument("--seeds", type=seeds_arg, default="", help="seeds, e.g. 0,1,2 or 0-4; empty = the scenario's")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: runs/emulate/<scenario name>)")
    p.add_argument("--target", type=float, default=None, help="target accuracy for the tables (default: the scenario's)")
    p.add_argument("--duration", type=float, default=None, help="virtual seconds per run (default: the scenario's)")
    p.add_argument("--quick", action="store_true", help="the scenario's [quick] variant: shorter, fewer seeds")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--replot", action="store_true",
                   help="do not simulate: rebuild the tables and plots from the runs already in --out (e.g. with another --target)")
    p.add_argument("--threads", type=bounded(int, 1), default=1, help="torch threads for local training (1 is fastest for tiny models; another count sums in "
                        "another order, and over a run's many rounds the results drift apart by more than rounding: compare runs "
                        "made with the same count; the README's use 1). A classifier's deployed model is the same under any "
                        "count (its pretraining uses one thread)")
    p.add_argument("--transport", choices=TRANSPORTS, default="in-process",
                   help="how frames travel between the emulated devices and coordinator: in-process (default: exact sizes, "
                        "the receiver gets the message the sender validated) or codec (every frame built and parsed, as between "
                        "processes; slower, the same results)")
    p.add_argument("--broker", default=None, help="real-MQTT fleet mode: play the scenario in real time against this broker")
    p.add_argument("--time-scale", type=bounded(float, 0, strict=True, finite=True), default=1.0, help="real-MQTT mode: virtual seconds per wall second")
    p.add_argument("--region", default="default", help="real-MQTT mode: the coordinator's region")


def run(args: argparse.Namespace) -> int:
    raw = read_toml(args.scenario)
    if "stream" in raw:  # the SCC stream experiment: its own fleet
        return _stream_mode(args)
    if "multiregion" in raw or "methods" in raw:  # regions: the regional sweep
        return _regions_mode(args, raw)
    scenario = load_scenario(args.scenario)
    if args.quick:
        if "quick" not in scenario.raw:  # said, not silently the full run
            print(f"note: {args.scenario} has no [quick] table: --quick runs the full scenario", file=sys.stderr)
        scenario = scenario.quick()
    if args.seeds:
        scenario = scenario.with_seeds(parse_seeds(args.seeds))
    if args.target is not None or args.duration is not None:
        changes = {"target_accuracy": args.target, "duration_s": args.duration}
        scenario = scenario.with_overrides({k: v for k, v in changes.items() if v is not None})
    if args.strategies:
        scenario = scenario.select(scenario.names_in(args.strategies))
    if args.broker:
        if args.transport != "in-process":
            raise BadOption("--transport is the emulator's; with --broker every message crosses the real broker")
        return _fleet_mode(scenario, args)
    out: Path = args.out or Path("runs") / "emulate" / slug(scenario.name)
    results: list[RunResult] = []
    seeds = scenario.settings.seeds
    if args.replot:
        results = load_runs(out / "runs", scenario)
    else:
        # Resolve every task first: a missing dataset fails before any run starts.
        try:
            tasks = {_task_key(r): load_task(r.settings.task, r.settings.task_options) for r in scenario.runs}
        except ScenarioError:
            raise
        except ConfigError as exc:  # say which file (the key is in the message: task, task_options)
            raise (MissingDataset if isinstance(exc, MissingDataset) else ScenarioError)(f"{args.scenario}: {exc}") from None
        for spec in scenario.runs:  # (what a run asks of its task's classes: not when that run starts)
            check_task_fits(spec.settings, tasks[_task_key(spec)].data, f"{args.scenario}: run {spec.label!r}")
        from edge_sdk.trainer import configure_threads

        configure_threads(args.threads)
        output_dir(out / "runs")
        total = len(scenario.runs) * len(seeds)
        print(f"scenario {scenario.name}: {len(scenario.runs)} run(s) × {len(seeds)} seed(s) → {out}", file=sys.stderr)
        try:
            for spec in scenario.runs:
                task = tasks[_task_key(spec)]
                for seed in seeds:
                    result = _one(task, spec, seed, quiet=args.no_progress, transport=args.transport)
                    results.append(result)
                    with writing_outputs(out):
                        write_run(out / "runs", result)
        except KeyboardInterrupt:  # (Ctrl-C) say what is on disk; the CLI exits 130
            raise KeyboardInterrupt(f"{len(results)} of {total} run(s) finished, kept in {out / 'runs'}; "
                                    "no tables or plots written") from None

    with writing_outputs(out):  # (a disk that filled up during the runs: one line, not a traceback)
        summary = summarise(scenario, results)
        table = format_table(scenario, summary)
        write_text_atomic(out / "time_to_target.md", table)
        write_text_atomic(out / "summary.json", json.dumps(summary, indent=2, sort_keys=True, default=json_default))
        plot_accuracy(scenario, results, out / "accuracy.png")
        plot_staleness(results, out / "staleness.png")
        print(table)
        if scenario.reference:  # the release report (e.g. attacks.toml): what devices would see
            from devices.release_report import format_release_table, plot_release, release_summary

            release = release_summary(scenario, results)
            release_table = format_release_table(release)
            write_text_atomic(out / "release.md", release_table)
            write_text_atomic(out / "release.json", json.dumps(release, indent=2, sort_keys=True, default=json_default))
            plot_release(scenario, results, out / "release.png")
            print(release_table)
            print(f"wrote {out / 'release.png'}, {out / 'release.md'}, {out / 'release.json'}", file=sys.stderr)
        if scenario.settings.delay.active:  # delayed devices (issue 15): policy × τ × α, class-c accuracy
            from devices.staleness_report import write_staleness_report

            print(write_staleness_report(scenario, results, out))
        print(f"wrote {out / 'accuracy.png'}, {out / 'staleness.png'}, {out / 'time_to_target.md'}, {out / 'summary.json'}, "
              f"{out / 'runs'}/", file=sys.stderr)
    return 0


def _task_key(spec: RunSpec) -> str:
    """Runs share a task object when name and ``task_options`` agree."""
    return json.dumps([spec.settings.task, dict(spec.settings.task_options)], sort_keys=True)


def _one(task: Task, spec: RunSpec, seed: int, *, quiet: bool, transport: str) -> RunResult:
    from tqdm import tqdm

    duration = spec.settings.duration_s
    with tqdm(total=round(duration), desc=f"{spec.label} · seed {seed}", unit="vs", disable=quiet,
              bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} virtual s [{elapsed}<{remaining}] {postfix}") as bar:

        def progress(now: float, row: Mapping[str, float]) -> None:
            bar.update(round(now) - bar.n)
            bar.set_postfix_str(f"v{int(row['version'])} acc {row['accuracy']:.3f}", refresh=False)

        result = run_spec(task, spec, seed, progress=progress, transport=transport)
    return result


def _stream_mode(args: argparse.Namespace) -> int:
    """A scenario with a ``[stream]`` table: the SCC experiment (``devices.scc_fleet``)."""
    from devices.scc_fleet import parse_scc_scenario, run_cli
    from edge_sdk.trainer import configure_threads

    if (args.broker or args.replot or args.strategies or args.target is not None or args.duration is not None
            or args.transport != "in-process"):
        raise ScenarioError("a [stream] scenario takes --quick, --seeds, --out, --threads and --no-progress only")
    sc = parse_scc_scenario(read_toml(args.scenario), source=str(args.scenario))
    sc = sc.quick() if args.quick else sc
    sc = sc.with_seeds(parse_seeds(args.seeds)) if args.seeds else sc
    configure_threads(args.threads)
    return run_cli(sc, args.out or Path("runs") / "emulate" / slug(sc.name), quiet=args.no_progress)


def _regions_mode(args: argparse.Namespace, raw: Mapping[str, object]) -> int:
    """A scenario with ``[multiregion]`` / ``[[methods]]``: ``python -m devices.multiregion``'s
    sweep, its outputs under ``--out`` (default ``runs/emulate/<name>``)."""
    from devices.multiregion import main as sweep_regions

    if args.broker or args.target is not None or args.threads != 1 or args.transport != "in-process":
        raise ScenarioError("a [multiregion] scenario takes --strategies, --seeds, --duration, --quick, --out, --replot "
                            "and --no-progress only (one torch thread per run; `python -m devices.multiregion --jobs N` runs N at once)")
    if args.quick and "quick" not in raw:  # (the sweep loads and checks the scenario itself)
        print(f"note: {args.scenario} has no [quick] table: --quick runs the full scenario", file=sys.stderr)
    argv = [str(args.scenario), f"--out={args.out or Path('runs') / 'emulate' / slug(str(raw['name']))}"]
    argv += [f"--methods={args.strategies}"] if args.strategies else []
    argv += [f"--seeds={args.seeds}"] if args.seeds else []
    argv += [f"--duration={args.duration!r}"] if args.duration is not None else []
    argv += [flag for flag, on in (("--quick", args.quick), ("--report-only", args.replot), ("--no-progress", args.no_progress)) if on]
    return sweep_regions(argv)


# --------------------------------------------------------------------------- real-MQTT seam


def _fleet_mode(scenario: Scenario, args: argparse.Namespace) -> int:
    """Real-MQTT fleet mode: hand the validated scenario to ``devices.mqtt_fleet.run_fleet``
    (signature: ``run_fleet(scenario, *, broker, time_scale, args) -> int``). The fleet it
    plays is :func:`devices.scenario.materialise`'s: the same profiles, partitions and
    labelling streams as the virtual-clock run."""
    from devices.mqtt_fleet import run_fleet  # lazy: paho and the MQTT client only for this mode

    return int(run_fleet(scenario, broker=args.broker, time_scale=args.time_scale, args=args))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m demos.emulate ARGS`` is ``edgeci emulate ARGS`` (the same error handling and logging)."""
    from demos.cli import main as cli_main

    return cli_main(["emulate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
