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
* ``summary.json`` — everything in the table, machine-readable.

``--broker mqtt://…`` is the real-MQTT fleet mode (issue 3, item 6): the same scenario
played in real time against a running coordinator. It is delegated to
``devices.mqtt_fleet.run_fleet(scenario, broker=…, time_scale=…, args=…)`` when that exists.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import math
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from devices.scenario import RunSpec, Scenario, ScenarioError, load_scenario
from devices.simulator import RunResult, run_spec, time_to_target
from edge_sdk.errors import ConfigError
from edge_sdk.tasks.base import Task

__all__ = ["add_arguments", "format_table", "load_task", "parse_seeds", "run", "summarise"]

TORCHVISION_DATASETS = {
    "mnist": ("MNIST", ["MNIST/raw/train-images-idx3-ubyte", "MNIST/raw/train-images-idx3-ubyte.gz"]),
    "emnist": ("EMNIST", ["EMNIST/raw/emnist-balanced-train-images-idx3-ubyte", "EMNIST/raw/gzip.zip"]),
    "cifar10": ("CIFAR-10", ["cifar-10-batches-py/data_batch_1", "cifar-10-python.tar.gz"]),
}
DATA_ENV = "EDGECI_DATA"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("scenario", type=Path, help="scenario TOML (see demos/scenarios/)")
    p.add_argument("--strategies", default="", help="comma-separated run labels or strategy names; empty = every run")
    p.add_argument("--seeds", default="", help="seeds, e.g. 0,1,2 or 0-4; empty = the scenario's")
    p.add_argument("--out", type=Path, default=None, help="output directory; None = runs/emulate/<scenario name>")
    p.add_argument("--target", type=float, default=None, help="target accuracy for the tables; None = the scenario's")
    p.add_argument("--duration", type=float, default=None, help="virtual seconds per run; None = the scenario's")
    p.add_argument("--quick", action="store_true", help="the scenario's [quick] variant: shorter, fewer seeds")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--replot", action="store_true",
                   help="do not simulate: rebuild the tables and plots from the runs already in --out (e.g. with another --target)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for local training (1 is fastest for tiny models)")
    p.add_argument("--broker", default=None, help="real-MQTT fleet mode: play the scenario in real time against this broker")
    p.add_argument("--time-scale", type=float, default=1.0, help="real-MQTT mode: virtual seconds per wall second")
    p.add_argument("--region", default="default", help="real-MQTT mode: the coordinator's region")


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` or ``"0-4"`` or a mix (``"0-2,7"``) → list of seeds."""
    seeds: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise ConfigError(f"--seeds: {part!r} is not a seed or a range like 0-4")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise ConfigError(f"--seeds: empty range {part!r}")
        seeds.extend(range(lo, hi + 1))
    return seeds


def load_task(name: str) -> Task:
    """The task for a scenario. Torchvision datasets are used only if their files are
    already on disk (under ``$EDGECI_DATA``); edgeci never downloads datasets."""
    from edge_sdk.tasks import get_task, known_tasks

    if name in known_tasks():
        return get_task(name, device="cpu")
    if name in TORCHVISION_DATASETS:
        title, files = TORCHVISION_DATASETS[name]
        import os

        root = Path(os.environ.get(DATA_ENV, Path.home() / ".cache" / "edgeci" / "data"))
        found = [root / f for f in files if (root / f).exists()]
        if not found:
            raise ConfigError(
                f"task {name!r} needs the {title} files of torchvision under {root} "
                f"(e.g. {root / files[0]}); none found. edgeci never downloads datasets: "
                f"copy them there (or set ${DATA_ENV}) — or use task = \"digits\", which ships with scikit-learn."
            )
        raise ConfigError(
            f"found {title} files at {found[0]}, but no edgeci task {name!r} is registered "
            f"(known: {', '.join(known_tasks())}); add one to edge_sdk.tasks.TASKS."
        )
    raise ConfigError(f"unknown task {name!r}; known: {', '.join(known_tasks())}")


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-") or "run"


def run(args: argparse.Namespace) -> int:
    scenario = load_scenario(args.scenario)
    if args.quick:
        scenario = scenario.quick()
    if args.seeds:
        scenario = scenario.with_seeds(parse_seeds(args.seeds))
    if args.target is not None or args.duration is not None:
        changes = {"target_accuracy": args.target, "duration_s": args.duration}
        scenario = scenario.with_overrides({k: v for k, v in changes.items() if v is not None})
    if args.strategies:
        scenario = scenario.select([s.strip() for s in args.strategies.split(",") if s.strip()])
    if args.broker:
        return _fleet_mode(scenario, args)
    out: Path = args.out or Path("runs") / "emulate" / _slug(scenario.name)
    results: list[RunResult] = []
    seeds = scenario.settings.seeds
    if args.replot:
        results = _load_runs(out / "runs", scenario)
    else:
        # Resolve every task first: a missing dataset fails before any run starts.
        tasks = {name: load_task(name) for name in dict.fromkeys(r.settings.task for r in scenario.runs)}
        from edge_sdk.trainer import configure_threads

        configure_threads(args.threads)
        (out / "runs").mkdir(parents=True, exist_ok=True)
        print(f"scenario {scenario.name}: {len(scenario.runs)} run(s) × {len(seeds)} seed(s) → {out}", file=sys.stderr)
        for spec in scenario.runs:
            task = tasks[spec.settings.task]
            for seed in seeds:
                result = _one(task, spec, seed, quiet=args.no_progress)
                results.append(result)
                _write_run(out / "runs", result)

    summary = summarise(scenario, results)
    table = format_table(scenario, summary)
    (out / "time_to_target.md").write_text(table, encoding="utf-8")
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True, default=_json_default), encoding="utf-8")
    plot_accuracy(scenario, results, out / "accuracy.png")
    plot_staleness(results, out / "staleness.png")
    print(table)
    print(f"wrote {out / 'accuracy.png'}, {out / 'staleness.png'}, {out / 'time_to_target.md'}, {out / 'runs'}/", file=sys.stderr)
    return 0


def _one(task: Task, spec: RunSpec, seed: int, *, quiet: bool) -> RunResult:
    from tqdm import tqdm

    duration = spec.settings.duration_s
    with tqdm(total=round(duration), desc=f"{spec.label} · seed {seed}", unit="vs", disable=quiet,
              bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} virtual s [{elapsed}<{remaining}] {postfix}") as bar:

        def progress(now: float, row: Mapping[str, float]) -> None:
            bar.update(round(now) - bar.n)
            bar.set_postfix_str(f"v{int(row['version'])} acc {row['accuracy']:.3f}", refresh=False)

        result = run_spec(task, spec, seed, progress=progress)
    return result


def _write_run(directory: Path, result: RunResult) -> None:
    stem = f"{_slug(result.label)}__seed{result.seed}"
    (directory / f"{stem}.json").write_text(json.dumps(result.to_json(), indent=1, default=_json_default), encoding="utf-8")
    if result.rows:
        with (directory / f"{stem}.csv").open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(result.rows[0]))
            writer.writeheader()
            writer.writerows(result.rows)


def _load_runs(directory: Path, scenario: Scenario) -> list[RunResult]:
    """The stored runs of ``scenario`` (its run labels and seeds) from an earlier ``--out``."""
    results: list[RunResult] = []
    missing: list[str] = []
    for spec in scenario.runs:
        for seed in scenario.settings.seeds:
            path = directory / f"{_slug(spec.label)}__seed{seed}.json"
            if not path.exists():
                missing.append(path.name)
                continue
            data = json.loads(path.read_text(encoding="utf-8"))
            results.append(RunResult(label=data["label"], strategy=data["strategy"], params=data["params"], seed=data["seed"],
                                     target_accuracy=spec.settings.target_accuracy, rows=data["rows"], summary=data["summary"]))
    if missing:
        raise ConfigError(f"--replot: {directory} lacks {len(missing)} run file(s), e.g. {missing[0]}; run without --replot first")
    return results


def _json_default(value: object) -> object:
    if hasattr(value, "item"):
        return value.item()  # numpy scalars
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# --------------------------------------------------------------------------- summary


def summarise(scenario: Scenario, results: Sequence[RunResult]) -> dict[str, Any]:
    """Per run label: time to target per seed (None = not reached), its mean (censored at
    the duration when a seed never reached it), and mean final metrics."""
    per_run: dict[str, Any] = {}
    for spec in scenario.runs:
        mine = [r for r in results if r.label == spec.label]
        if not mine:
            continue
        duration = spec.settings.duration_s
        ttts = [time_to_target(r.rows, spec.settings.target_accuracy) for r in mine]
        reached = [t for t in ttts if t is not None]
        censored = [t if t is not None else duration for t in ttts]
        sensitivity = {}
        for target in sensitivity_targets(spec.settings.target_accuracy):
            times = [time_to_target(r.rows, target) for r in mine]
            sensitivity[f"{target:.2f}"] = {
                "mean_s": sum(t if t is not None else duration for t in times) / len(times),
                "reached": sum(t is not None for t in times),
                "runs": len(times),
            }

        def mean(key: str, rs: Sequence[RunResult] = mine) -> float | None:
            vals = [r.summary[key] for r in rs if r.summary.get(key) is not None]
            return sum(vals) / len(vals) if vals else None

        per_run[spec.label] = {
            "strategy": spec.strategy,
            "params": dict(spec.params),
            "overrides": dict(spec.overrides),
            "seeds": [r.seed for r in mine],
            "time_to_target_s": ttts,
            "reached": len(reached),
            "mean_time_to_target_s": sum(censored) / len(censored),
            "all_reached": len(reached) == len(ttts),
            "sensitivity": sensitivity,
            "initial_accuracy": mean("initial_accuracy"),
            "final_accuracy": mean("final_accuracy"),
            "best_accuracy": mean("best_accuracy"),
            "versions": mean("versions"),
            "updates": mean("updates_accepted"),
            "label_latency_mean_s": mean("label_latency_mean_s"),
            "mean_staleness": _mean_staleness(mine),
            "bytes_up": mean("bytes_up"),
            "bytes_down": mean("bytes_down"),
            "mean_train_s": mean("mean_train_s"),
            "virtual_per_wall": mean("virtual_per_wall"),
        }
    return {
        "scenario": scenario.name,
        "source": scenario.source,
        "target_accuracy": scenario.settings.target_accuracy,
        "duration_s": scenario.settings.duration_s,
        "seeds": list(scenario.settings.seeds),
        "runs": per_run,
        "ratios": _ratios(per_run),
    }


def sensitivity_targets(target: float) -> list[float]:
    """A few accuracies around the scenario's target: the ranking can flip with the target."""
    return sorted({round(t, 2) for t in (target - 0.05, target, target + 0.03, target + 0.05) if 0 < t <= 1})


def _mean_staleness(results: Sequence[RunResult]) -> float | None:
    total = count = 0
    for r in results:
        for k, v in r.summary.get("staleness_histogram", {}).items():
            total += int(k) * v
            count += v
    return total / count if count else None


def _ratios(per_run: Mapping[str, Any]) -> dict[str, Any]:
    """Time-to-target of each baseline over SPIN's (how many times faster SPIN is). Each
    baseline is paired with the SPIN run that has the same per-run overrides (e.g. the
    same λ), else with the first SPIN run."""
    out: dict[str, Any] = {}
    for label, v in per_run.items():
        spin = _partner(per_run, label)
        if spin is None or v["strategy"] in ("spin", "spin-notimeout"):
            continue
        s = per_run[spin]
        ratio = v["mean_time_to_target_s"] / s["mean_time_to_target_s"] if s["mean_time_to_target_s"] > 0 else None
        # A censored baseline only gives a lower bound; a censored SPIN makes the ratio meaningless.
        kind = "exact" if v["all_reached"] and s["all_reached"] else ("lower_bound" if s["all_reached"] else "undefined")
        out[f"{label} / {spin}"] = {"ratio": ratio, "kind": kind}
    return out


def _partner(per_run: Mapping[str, Any], label: str) -> str | None:
    """The SPIN run a run is compared with: same per-run overrides, else the first SPIN run."""
    spins = [k for k, v in per_run.items() if v["strategy"] == "spin"]
    if not spins:
        return None
    return next((k for k in spins if per_run[k]["overrides"] == per_run[label]["overrides"]), spins[0])


def _fmt_s(t: float | None) -> str:
    return "—" if t is None else f"{t:,.0f}"


def format_table(scenario: Scenario, summary: Mapping[str, Any]) -> str:
    """The markdown time-to-target table (plus the SPIN-vs-baseline ratios)."""
    target = summary["target_accuracy"]
    lines = [
        f"### {scenario.name}: time to {target:.0%} accuracy",
        "",
        f"{scenario.description}".strip(),
        "",
        f"Virtual time in seconds (commit time of the first evaluated model at or above the target); "
        f"seeds {', '.join(map(str, summary['seeds']))}; duration {summary['duration_s']:,.0f} s. "
        f"Mean: never-reached seeds count as the full duration (shown as ≥).",
        "",
        "| run | strategy | time to target per seed (s) | mean (s) | acc. start → end | versions | updates | mean staleness | label→model latency (s) | MB up / down |",
        "|---|---|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for label, v in summary["runs"].items():
        per_seed = ", ".join(_fmt_s(t) for t in v["time_to_target_s"])
        mean = ("" if v["all_reached"] else "≥ ") + _fmt_s(v["mean_time_to_target_s"])
        acc = f"{v['initial_accuracy']:.3f} → {v['final_accuracy']:.3f}" if v["final_accuracy"] is not None else "—"
        stale = "—" if v["mean_staleness"] is None else f"{v['mean_staleness']:.2f}"
        lat = _fmt_s(v["label_latency_mean_s"])
        mb = f"{(v['bytes_up'] or 0) / 1e6:.1f} / {(v['bytes_down'] or 0) / 1e6:.1f}"
        lines.append(
            f"| {label} | {v['strategy']} | {per_seed} | {mean} | {acc} | {v['versions']:.0f} | {v['updates']:.0f} | {stale} | {lat} | {mb} |"
        )
    runs = summary["runs"]
    targets = next(iter(runs.values()))["sensitivity"].keys() if runs else []
    spin = next((k for k, v in runs.items() if v["strategy"] == "spin"), None)
    if targets:
        lines += [
            "",
            "Mean time to other targets (s; ≥ = some seed never reached it"
            + ("; in brackets: ÷ the matching SPIN run, n/a where SPIN itself missed it" if spin else "") + "):",
            "",
            "| run | " + " | ".join(f"{float(t):.0%}" for t in targets) + " |",
            "|---|" + "---:|" * len(targets),
        ]
        for label, v in runs.items():
            partner = _partner(runs, label)
            cells = []
            for t in targets:
                sens = v["sensitivity"][t]
                cell = ("" if sens["reached"] == sens["runs"] else "≥ ") + _fmt_s(sens["mean_s"])
                ref = runs[partner]["sensitivity"][t] if partner is not None and partner != label else None
                if ref is not None and ref["reached"] == ref["runs"] and ref["mean_s"] > 0:
                    bound = "" if sens["reached"] == sens["runs"] else "≥ "
                    cell += f" ({bound}{sens['mean_s'] / ref['mean_s']:.2f}×)"
                elif ref is not None:
                    cell += " (n/a)"
                cells.append(cell)
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if summary["ratios"]:
        lines += ["", "Time to target relative to SPIN (baseline ÷ SPIN; > 1 means SPIN is faster):", ""]
        for name, r in summary["ratios"].items():
            if r["ratio"] is None or r["kind"] == "undefined":
                lines.append(f"- {name}: undefined (SPIN did not reach the target on every seed)")
            else:
                bound = "≥ " if r["kind"] == "lower_bound" else ""
                lines.append(f"- {name}: {bound}{r['ratio']:.2f}×")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- plots


def plot_accuracy(scenario: Scenario, results: Sequence[RunResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=120)
    long = max(spec.settings.duration_s for spec in scenario.runs) >= 3 * 3600
    unit, scale = ("h", 3600.0) if long else ("min", 60.0)
    for spec in scenario.runs:
        mine = [r for r in results if r.label == spec.label and r.rows]
        if not mine:
            continue
        n = min(len(r.rows) for r in mine)
        t = np.array([row["t_s"] for row in mine[0].rows[:n]]) / scale
        acc = np.array([[row["accuracy"] for row in r.rows[:n]] for r in mine])
        (line,) = ax.plot(t, acc.mean(axis=0), label=f"{spec.label} (n={len(mine)})", linewidth=1.8)
        if len(mine) > 1:
            ax.fill_between(t, acc.min(axis=0), acc.max(axis=0), color=line.get_color(), alpha=0.10, linewidth=0)
    target = scenario.settings.target_accuracy
    ax.axhline(target, color="0.3", linestyle="--", linewidth=1, label=f"target {target:.0%}")
    ax.set_xlabel(f"virtual time ({unit})")
    ax.set_ylabel("accuracy of the deployed model on the held-out split")
    ax.set_title(f"{scenario.name}: accuracy vs virtual time (mean over seeds, band = min–max)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_staleness(results: Sequence[RunResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r.label for r in results))
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=120)
    width = 0.8 / max(len(labels), 1)
    for j, label in enumerate(labels):
        hist: dict[int, int] = {}
        for r in results:
            if r.label == label:
                for k, v in r.summary.get("staleness_histogram", {}).items():
                    hist[int(k)] = hist.get(int(k), 0) + v
        total = sum(hist.values())
        if not total:
            continue
        xs = sorted(k for k in hist if k <= 30)
        ax.bar([x + j * width for x in xs], [hist[x] / total for x in xs], width=width, label=label)
    ax.set_xlabel("staleness τ (versions between an update's base and the model it joins; ≤ 30 shown)")
    ax.set_ylabel("fraction of accepted updates")
    ax.set_title("staleness of accepted updates")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------- real-MQTT seam


def _fleet_mode(scenario: Scenario, args: argparse.Namespace) -> int:
    """Real-MQTT fleet mode: hand the validated scenario to ``devices.mqtt_fleet.run_fleet``
    (signature: ``run_fleet(scenario, *, broker, time_scale, args) -> int``). The fleet it
    plays is :func:`devices.scenario.materialise`'s: the same profiles, partitions and
    labelling streams as the virtual-clock run."""
    if not math.isfinite(args.time_scale) or args.time_scale <= 0:
        raise ScenarioError("--time-scale must be > 0")
    try:
        fleet = importlib.import_module("devices.mqtt_fleet")
    except ModuleNotFoundError:
        fleet = None
    runner = getattr(fleet, "run_fleet", None)
    if runner is None:
        raise ConfigError(
            "real-MQTT fleet mode (--broker) is not available in this build "
            "(it needs devices.mqtt_fleet.run_fleet); run without --broker for the virtual-clock emulator"
        )
    return int(runner(scenario, broker=args.broker, time_scale=args.time_scale, args=args))
