"""Reporting for every emulation driver (above the engine, below ``demos/``): seed parsing,
task loading for a scenario, the accuracy-timeline plot, and the multi-region tables,
plots and run JSONs.

``demos/emulate.py`` (the CLI), ``devices/multiregion.py`` and ``devices/mqtt_fleet.py``
use these; nothing here runs a fleet.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

from devices.scenario import Scenario, slug
from devices.simulator import RunResult, time_to_target
from edge_sdk.errors import ConfigError, EdgeciError
from edge_sdk.tasks.base import Task

if TYPE_CHECKING:
    from devices.multiregion import MultiRegionScenario

__all__ = [
    "DATA_ENV",
    "PAPER_SCALING",
    "TORCHVISION_DATASETS",
    "command_line",
    "format_region_tables",
    "format_table",
    "json_default",
    "load_region_runs",
    "load_runs",
    "load_task",
    "parse_seeds",
    "plot_accuracy",
    "plot_regions",
    "plot_staleness",
    "plot_timeline",
    "read_run",
    "replacing",
    "seeds_arg",
    "slug",
    "summarise",
    "summarise_regions",
    "write_region_report",
    "write_run",
    "write_text_atomic",
    "writing_outputs",
]

PAPER_SCALING = {
    "spyker": (1.21, 1.43),
    "fedasync": (2.42, 5.99),
    "hierfavg": (1.64, 1.75),
}
"""Spyker's Table 5: time to 90 % with 200 and 300 clients over 100 clients (MNIST)."""

TORCHVISION_DATASETS = {
    "mnist": ("MNIST", ["MNIST/raw/train-images-idx3-ubyte", "MNIST/raw/train-images-idx3-ubyte.gz"]),
    "emnist": ("EMNIST", ["EMNIST/raw/emnist-balanced-train-images-idx3-ubyte", "EMNIST/raw/gzip.zip"]),
    "cifar10": ("CIFAR-10", ["cifar-10-batches-py/data_batch_1", "cifar-10-python.tar.gz"]),
}
DATA_ENV = "EDGECI_DATA"


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
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:  # a seed twice would count its run twice in every mean and n
        raise ConfigError(f"--seeds: seed{'s' if len(repeated) > 1 else ''} {', '.join(map(str, repeated))} given more than once")
    return seeds


def seeds_arg(text: str) -> str:
    """An argparse ``type`` for ``--seeds``: a typo is a usage error at parse time (exit 2,
    like every other flag's bad value), not a runtime failure. Kept as given ("" = the
    scenario's seeds)."""
    try:
        parse_seeds(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--seeds: ")) from None
    return text


class MissingDataset(ConfigError):
    """A task's dataset is not on this machine (edgeci never downloads one): the scenario is right,
    the files are missing, so the CLI exits 1, not 2 as for a mistake in the scenario."""


def load_task(name: str, options: Mapping[str, Any] | None = None) -> Task:
    """The task for a scenario (``options``: its ``task_options``, keyword arguments of the
    task). Torchvision datasets are used only if their files are already on disk (under
    ``$EDGECI_DATA``); edgeci never downloads datasets."""
    from edge_sdk.tasks import entry_point_task, get_task, known_tasks, task_factory

    if name in known_tasks():
        try:
            return get_task(name, device="cpu", **dict(options or {}))
        except TypeError as exc:
            raise ConfigError(f"task {name!r}: bad task_options {dict(options or {})!r}: {exc}") from None
    if ":" in name or entry_point_task(name) is not None:  # an app's own task (edge_sdk.tasks.resolve_task)
        import inspect

        kwargs = dict(options or {})
        try:
            params = inspect.signature(task_factory(name)).parameters
        except (TypeError, ValueError):  # (a builtin or extension callable without a signature)
            params = MappingProxyType({})
        if "device" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            kwargs.setdefault("device", "cpu")  # (on the CPU, as the built-in tasks, when its factory takes device=)
        try:
            return get_task(name, **kwargs)
        except TypeError as exc:
            raise ConfigError(f"task {name!r}: bad task_options {dict(options or {})!r}: {exc}") from None
    if name in TORCHVISION_DATASETS:
        title, files = TORCHVISION_DATASETS[name]
        import os

        root = Path(os.environ.get(DATA_ENV, Path.home() / ".cache" / "edgeci" / "data"))
        found = [root / f for f in files if (root / f).exists()]
        if not found:
            raise MissingDataset(
                f"task {name!r} needs the {title} files of torchvision under {root} "
                f"(e.g. {root / files[0]}); none found. edgeci never downloads datasets: "
                f"copy them there (or set ${DATA_ENV}) — or use task = \"digits\", which ships with scikit-learn."
            )
        raise ConfigError(
            f"found {title} files at {found[0]}, but no edgeci task {name!r} is registered "
            f"(known: {', '.join(known_tasks())}); add one to edge_sdk.tasks.registry.TASK_INFO."
        )
    raise ConfigError(f"unknown task {name!r}; known: {', '.join(known_tasks())}")


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend (imported when a plot is drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> None:
    """Lay ``fig`` out, write it to ``path`` (atomically, :func:`replacing`) and close it."""
    fig.tight_layout()
    with replacing(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or None)  # (the format from the name, not from .tmp)
    pyplot().close(fig)


def plot_timeline(points: Sequence[tuple[float, int, float]], path: Path, title: str, *, xlabel: str = "wall time (s)") -> None:
    """Step plot of ``(seconds, version, accuracy)`` points (accuracy in [0, 1])."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.step([p[0] for p in points], [100 * p[2] for p in points], where="post", label="held-out accuracy of the newest model")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    save_figure(fig, path)


# --------------------------------------------------------------------------- multi-region reports


def summarise_regions(sc: MultiRegionScenario, results: Sequence[RunResult]) -> dict[str, Any]:
    duration = sc.settings.duration_s
    base = sc.device_counts[0]
    out: dict[str, Any] = {"scenario": sc.name, "target_accuracy": sc.settings.target_accuracy, "duration_s": duration,
                           "device_counts": list(sc.device_counts), "seeds": list(sc.settings.seeds), "methods": {}}
    for m in sc.methods:
        entry: dict[str, Any] = {"kind": m.kind, "by_devices": {}}
        for n in sc.device_counts:
            mine = [r for r in results if r.label == m.label and r.summary["devices"] == n]
            if not mine:
                continue
            ttts = [r.time_to_target for r in mine]
            entry["by_devices"][str(n)] = {
                "time_to_target_s": ttts,
                "mean_time_to_target_s": float(np.mean([t if t is not None else duration for t in ttts])),
                "all_reached": all(t is not None for t in ttts),
                "final_accuracy": float(np.mean([r.summary["final_accuracy"] for r in mine])),
                "updates": float(np.mean([r.summary["updates"] for r in mine])),
                "updates_to_target": float(np.mean([_updates_at(r) for r in mine])),
                "mb_peer": float(np.mean([r.summary["bytes_peer"] for r in mine])) / 1e6,
                "mb_device": float(np.mean([r.summary["bytes_device"] for r in mine])) / 1e6,
                "utilisation": float(np.mean([r.summary["coordinator_utilisation"] or 0 for r in mine])),
                "queue_mean": float(np.mean([r.summary.get("coordinator_queue_mean") or 0 for r in mine])),
                "queue_max": float(max(r.summary.get("coordinator_queue_max") or 0 for r in mine)),
                "wall_s": float(np.mean([r.summary["wall_s"] for r in mine])),
            }
        b = entry["by_devices"].get(str(base))
        entry["scaling"] = {}
        if b is not None:
            for n in sc.device_counts[1:]:
                e = entry["by_devices"].get(str(n))
                if e is not None and b["mean_time_to_target_s"] > 0:
                    kind = "exact" if e["all_reached"] and b["all_reached"] else ("lower_bound" if b["all_reached"] else "undefined")
                    entry["scaling"][str(n)] = {"time": e["mean_time_to_target_s"] / b["mean_time_to_target_s"],
                                                "updates": e["updates_to_target"] / b["updates_to_target"] if b["updates_to_target"] else None,
                                                "kind": kind}
        out["methods"][m.label] = entry
    return out


def _updates_at(r: RunResult) -> float:
    t = r.time_to_target
    for row in r.rows:
        if t is not None and row["committed_at_s"] >= t and row["accuracy"] >= r.target_accuracy:
            return row["updates"]
    return r.rows[-1]["updates"] if r.rows else 0.0


def format_region_tables(sc: MultiRegionScenario, summary: Mapping[str, Any]) -> str:
    target = summary["target_accuracy"]
    base = sc.device_counts[0]
    lat = ", ".join(f"{a}–{b} {sc.topology.latency_ms[i][j]:g}" for i, a in enumerate(sc.topology.regions)
                    for j, b in enumerate(sc.topology.regions) if j >= i)
    lines = [
        f"### {sc.name}: time to {target:.0%} accuracy, {len(sc.topology.regions)} regions",
        "",
        sc.description.strip(),
        "",
        f"One-way latency (ms): {lat}. Seeds {', '.join(map(str, summary['seeds']))}; "
        f"virtual seconds; a run that never reached the target counts as its duration ({summary['duration_s']:,.0f} s, shown as ≥).",
        "",
        f"| method | time to {target:.0%} at {base} devices (s) | updates to target | final acc. | coordinator CPU | CPU queue mean / max | MB between coordinators | MB devices |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, m in summary["methods"].items():
        b = m["by_devices"].get(str(base))
        if b is None:
            continue
        ttt = ("" if b["all_reached"] else "≥ ") + f"{b['mean_time_to_target_s']:.1f}"
        lines.append(f"| {label} | {ttt} | {b['updates_to_target']:,.0f} | {b['final_accuracy']:.3f} | {b['utilisation']:.0%} | "
                     f"{b.get('queue_mean', 0):.1f} / {b.get('queue_max', 0):.0f} | {b['mb_peer']:.1f} | {b['mb_device']:.1f} |")
    others = sc.device_counts[1:]
    if others:
        head = " | ".join(f"{n} devices: time (×), updates (×)" for n in others)
        lines += ["", f"Scaling: time to {target:.0%} with more devices over the same method's time at {base} devices "
                      f"(paper, Spyker Table 5, MNIST: Spyker 1.21 / 1.43, HierFAVG 1.64 / 1.75, FedAsync 2.42 / 5.99 for 200 / 300).",
                  "", f"| method | {head} | paper (200 / 300) |", "|---|" + "---:|" * len(others) + "---|"]
        for label, m in summary["methods"].items():
            cells = []
            for n in others:
                s = m["scaling"].get(str(n))
                if s is None or s["kind"] == "undefined":
                    cells.append("—")
                else:
                    bound = "≥ " if s["kind"] == "lower_bound" else ""
                    upd = f"{s['updates']:.2f}" if s["updates"] else "—"
                    cells.append(f"{bound}{s['time']:.2f} ({upd})")
            paper = PAPER_SCALING.get("fedasync" if m["kind"] == "single" else m["kind"])
            lines.append(f"| {label} | {' | '.join(cells)} | {f'{paper[0]} / {paper[1]}' if paper else '—'} |")
    return "\n".join(lines) + "\n"


def plot_regions(sc: MultiRegionScenario, results: Sequence[RunResult], summary: Mapping[str, Any], out: Path) -> None:
    plt = pyplot()
    base = sc.device_counts[0]
    fig, axes = plt.subplots(1, 2 if len(sc.device_counts) > 1 else 1, figsize=(13, 5), dpi=120, squeeze=False)
    ax = axes[0][0]
    for m in sc.methods:
        mine = [r for r in results if r.label == m.label and r.summary["devices"] == base and r.rows]
        if not mine:
            continue
        r = mine[0]
        t = [row["t_s"] for row in r.rows]
        (line,) = ax.plot(t, [row["accuracy"] for row in r.rows], label=f"{m.label}", linewidth=1.8)
        if r.summary["coordinators"] > 1:
            ax.fill_between(t, [row["accuracy_min"] for row in r.rows], [row["accuracy_max"] for row in r.rows],
                            color=line.get_color(), alpha=0.15, linewidth=0)
    ax.axhline(sc.settings.target_accuracy, color="0.3", linestyle="--", linewidth=1, label=f"target {sc.settings.target_accuracy:.0%}")
    ax.set_xlabel("virtual time (s)")
    ax.set_ylabel("held-out accuracy (mean over coordinators)")
    ax.set_title(f"{base} devices, {len(sc.topology.regions)} regions, seed {results[0].seed if results else 0} (band: min–max over coordinators)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    if len(sc.device_counts) > 1:
        ax2 = axes[0][1]
        labels = list(summary["methods"])
        width = 0.8 / max(len(sc.device_counts) - 1, 1)
        for j, n in enumerate(sc.device_counts[1:]):
            # as the table: an undefined scaling (the base fleet missed the target) has no bar; a lower
            # bound (the larger fleet missed it) is hatched and marked "≥"
            scaling = [summary["methods"][lab]["scaling"].get(str(n), {"kind": "undefined"}) for lab in labels]
            vals = [np.nan if s["kind"] == "undefined" else s["time"] for s in scaling]
            xs = [i + j * width for i in range(len(labels))]
            bars = ax2.bar(xs, vals, width=width, label=f"{n} vs {base} devices")
            for x, bar, s in zip(xs, bars, scaling, strict=True):
                if s["kind"] == "lower_bound":
                    bar.set_hatch("//")
                    ax2.annotate("≥", (x, s["time"]), ha="center", va="bottom", fontsize=9)
                elif s["kind"] == "undefined":
                    ax2.annotate("—", (x, 0.0), ha="center", va="bottom", fontsize=9, color="0.4")
        for j in range(min(len(sc.device_counts) - 1, 2)):
            paper = [PAPER_SCALING.get("fedasync" if summary["methods"][lab]["kind"] == "single" else summary["methods"][lab]["kind"], (np.nan, np.nan))[j]
                     for lab in labels]
            ax2.scatter([i + j * width for i in range(len(labels))], paper, marker="x", color="k", zorder=3,
                        label="paper (Table 5)" if j == 0 else None)
        ax2.set_xticks([i + width * (len(sc.device_counts) - 2) / 2 for i in range(len(labels))], labels, rotation=15, fontsize=8)
        ax2.axhline(1.0, color="0.5", linewidth=0.8)
        ax2.set_ylabel(f"time to {sc.settings.target_accuracy:.0%} ÷ time at {base} devices")
        ax2.set_title("scaling with the number of devices (lower is better; ≥ hatched: the larger fleet missed the "
                      "target; —: no ratio, the smaller fleet missed it or did not run)", fontsize=9)
        ax2.legend(fontsize=8)
        ax2.grid(True, axis="y", alpha=0.3)
    save_figure(fig, out)


def write_region_report(sc: MultiRegionScenario, results: Sequence[RunResult], out: Path) -> int:
    summary = summarise_regions(sc, results)
    table = format_region_tables(sc, summary)
    write_text_atomic(out / "time_to_target.md", table)
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2, default=json_default))
    plot_regions(sc, results, summary, out / "accuracy.png")
    print(table)
    print(f"wrote {out / 'time_to_target.md'}, {out / 'accuracy.png'}, {out / 'runs'}/", file=sys.stderr)
    return 0


def load_region_runs(directory: Path, sc: MultiRegionScenario) -> list[RunResult]:
    """The runs of ``sc``'s methods, fleet sizes and seeds found in ``directory``."""
    labels = {m.label for m in sc.methods}
    runs = (read_run(path) for path in sorted(directory.glob("*.json")))
    return [r for r in runs if r.label in labels and r.summary["devices"] in sc.device_counts and r.seed in sc.settings.seeds]


def read_run(path: Path, target_accuracy: float | None = None) -> RunResult:
    """A run's JSON (:meth:`RunResult.to_json`); ``target_accuracy`` replaces the stored one."""
    d = json.loads(path.read_text(encoding="utf-8"))
    return RunResult(label=d["label"], strategy=d["strategy"], params=d["params"], seed=d["seed"],
                     target_accuracy=d["target_accuracy"] if target_accuracy is None else target_accuracy,
                     rows=d["rows"], summary=d["summary"])


def json_default(value: object) -> object:
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# --------------------------------------------------------------------------- single-region reports


def output_dir(path: Path, flag: str = "--out") -> Path:
    """Make ``path`` (and its parents) the folder for a command's outputs, before any work is
    done: a path that cannot be one (an existing file, a read-only place) is a ConfigError that
    names ``flag``, not a traceback after the runs."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot make it a folder for the outputs ({exc.strerror or exc})") from None
    return path


@contextmanager
def writing_outputs(out: Path, flag: str = "--out") -> Iterator[None]:
    """Around the writes of a command's results: an OSError there (the disk filled up during
    the runs, a file in the way) is one ConfigError line naming ``flag`` and the file, not a
    traceback."""
    try:
        yield
    except BrokenPipeError:  # our stdout's reader went away (`| head`): the CLI's to handle
        raise
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        raise ConfigError(f"cannot write {flag} {out}: {exc.strerror or exc}{where}") from exc


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary file beside ``path`` for the block to write, renamed over ``path`` when the
    block ends. A write that fails (a full disk) leaves what was there before, or nothing: not a
    0-byte or half-written result, and no temporary. Its OSError names ``path`` (write() names no
    file, and the temporary's name means nothing to the user)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as exc:
        with suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and (exc.filename is None or str(exc.filename) == str(tmp)):
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """``path.write_text(text)`` through :func:`replacing` (UTF-8)."""
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_run(directory: Path, result: RunResult) -> None:
    """The run's ``.json`` and (with rows) ``.csv`` in ``directory``, each written atomically."""
    stem = f"{slug(result.label)}__seed{result.seed}"
    write_text_atomic(directory / f"{stem}.json", json.dumps(result.to_json(), indent=1, default=json_default))
    if result.rows:
        with replacing(directory / f"{stem}.csv") as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(result.rows[0]))
            writer.writeheader()
            writer.writerows(result.rows)


def load_runs(directory: Path, scenario: Scenario) -> list[RunResult]:
    """The stored runs of ``scenario`` (its run labels and seeds) from an earlier ``--out``."""
    results: list[RunResult] = []
    missing: list[str] = []
    for spec in scenario.runs:
        for seed in scenario.settings.seeds:
            path = directory / f"{slug(spec.label)}__seed{seed}.json"
            if not path.exists():
                missing.append(path.name)
                continue
            run = read_run(path, spec.settings.target_accuracy)
            stored = run.summary.get("virtual_s")
            if scenario.regions is None and isinstance(stored, int | float) and stored != spec.settings.duration_s:
                # (a regional run's virtual_s is where it stopped; a one-region run's is its duration)
                raise ConfigError(f"--replot: {path.name} is a {stored:g} s run, but this command's {spec.label!r} lasts "
                                  f"{spec.settings.duration_s:g} s: those files come from other options (--quick?). "
                                  "--replot reads what the same command without it wrote")
            results.append(run)
    if missing:
        raise ConfigError(f"--replot: {directory} lacks {len(missing)} run file(s) of these runs and seeds, e.g. {missing[0]}; "
                          "--replot reads what the same command without it wrote (the same --quick, --seeds and --strategies)")
    return results


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
        "evaluated_after_start": evaluated_after_start(results),
    }


def evaluated_after_start(results: Sequence[RunResult]) -> bool:
    """Whether any run has an evaluation row after t = 0 (a [delay] run may stop at a version count
    before the first one: its times and accuracies then say nothing)."""
    return any(len(r.rows) > 1 for r in results)


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
        # A censored baseline only gives a lower bound; a censored SPIN makes the ratio meaningless,
        # and so does a SPIN that met the target at t = 0 (the starting model already reaches it).
        kind = "exact" if v["all_reached"] and s["all_reached"] else ("lower_bound" if s["all_reached"] else "undefined")
        if s["all_reached"] and not s["mean_time_to_target_s"] > 0:
            kind = "at_start"
        out[f"{label} / {spin}"] = {"ratio": ratio, "kind": kind}
    return out


def _partner(per_run: Mapping[str, Any], label: str) -> str | None:
    """The SPIN run a run is compared with: same per-run overrides, else the first SPIN run."""
    spins = [k for k, v in per_run.items() if v["strategy"] == "spin"]
    if not spins:
        return None
    return next((k for k in spins if per_run[k]["overrides"] == per_run[label]["overrides"]), spins[0])


def _fmt_s(t: float | None, digits: int = 0) -> str:
    return "—" if t is None else f"{t:,.{digits}f}"


def _digits(duration_s: float) -> int:
    """Decimals for the tables' seconds: whole seconds for runs of 100 s or more; shorter runs
    (paper-spin's 12 s, the 1 s --quick forms) keep two, or 0.4 s printed as "0" (helper-101)."""
    return 0 if duration_s >= 100 else 2


def format_table(scenario: Scenario, summary: Mapping[str, Any]) -> str:
    """The markdown time-to-target table (plus the SPIN-vs-baseline ratios)."""
    target = summary["target_accuracy"]
    digits = _digits(summary["duration_s"])
    lines = [
        f"### {scenario.name}: time to {target:.0%} accuracy",
        "",
        f"{scenario.description}".strip(),
        "",
        f"Virtual time in seconds (commit time of the first evaluated model at or above the target); "
        f"seeds {', '.join(map(str, summary['seeds']))}; duration {summary['duration_s']:,.{digits}f} s. "
        f"Mean: never-reached seeds count as the full duration (shown as ≥).",
        *([] if summary.get("evaluated_after_start", True) else [
            "",
            f"**No run was evaluated after t = 0**: they ended before the first evaluation (every "
            f"{scenario.settings.eval_every_s:g} s; e.g. a [delay] run stops at its last report version), so the times and "
            f"accuracies below say nothing; the experiment's own report (staleness.md) has its results."]),
        "",
        "| run | strategy | time to target per seed (s) | mean (s) | acc. start → end | versions | updates | mean staleness | label→model latency (s) | MB up / down |",
        "|---|---|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for label, v in summary["runs"].items():
        per_seed = ", ".join(_fmt_s(t, digits) for t in v["time_to_target_s"])
        mean = ("" if v["all_reached"] else "≥ ") + _fmt_s(v["mean_time_to_target_s"], digits)
        acc = f"{v['initial_accuracy']:.3f} → {v['final_accuracy']:.3f}" if v["final_accuracy"] is not None else "—"
        stale = "—" if v["mean_staleness"] is None else f"{v['mean_staleness']:.2f}"
        lat = _fmt_s(v["label_latency_mean_s"], digits)
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
            + ("; in brackets: ÷ the SPIN run with the same overrides (a SPIN variant: ÷ the first SPIN run), n/a where "
               "that run missed it or met it at t = 0" if spin else "") + "):",
            "",
            "| run | " + " | ".join(f"{float(t):.0%}" for t in targets) + " |",
            "|---|" + "---:|" * len(targets),
        ]
        for label, v in runs.items():
            partner = _partner(runs, label)
            if v["strategy"] == "spin" and partner != spin:
                # A SPIN variant is compared with the scenario's first SPIN run only: the first SPIN run
                # that shares its overrides is another variant (attacks.toml printed "attacked: robust +
                # gate" ÷ "attacked: gate only" as "(0.61×)" under "÷ the matching SPIN run"; helper-101).
                partner = None
            cells = []
            for t in targets:
                sens = v["sensitivity"][t]
                cell = ("" if sens["reached"] == sens["runs"] else "≥ ") + _fmt_s(sens["mean_s"], digits)
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
            if r["kind"] == "at_start":
                lines.append(f"- {name}: undefined (SPIN met the target at t = 0: the starting model already reaches "
                             f"{target:.0%}; set a higher target_accuracy)")
            elif r["ratio"] is None or r["kind"] == "undefined":
                lines.append(f"- {name}: undefined (SPIN did not reach the target on every seed)")
            else:
                bound = "≥ " if r["kind"] == "lower_bound" else ""
                lines.append(f"- {name}: {bound}{r['ratio']:.2f}×")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- plots


def plot_accuracy(scenario: Scenario, results: Sequence[RunResult], path: Path) -> None:
    plt = pyplot()
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
    if not evaluated_after_start(results):
        ax.set_xlim(0, max(spec.settings.duration_s for spec in scenario.runs) / scale)
        ax.text(0.5, 0.5, f"no evaluation after t = 0: the runs ended before the first one (eval_every_s = "
                f"{scenario.settings.eval_every_s:g} s)", transform=ax.transAxes, ha="center", va="center", fontsize=9)
    _legend(fig, ax, "lower right")
    save_figure(fig, path)


def _legend(fig: Any, ax: Any, loc: str) -> None:
    """The legend at ``loc``; with more than 8 entries beside the axes (the figure widened), not over the data."""
    n = len(ax.get_legend_handles_labels()[1])
    if n > 8:
        width, height = fig.get_size_inches()
        fig.set_size_inches(width + 4.5, max(height, 0.19 * n + 1.0))
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, borderaxespad=0)
    else:
        ax.legend(loc=loc, fontsize=8)


def plot_staleness(results: Sequence[RunResult], path: Path) -> None:
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    labels = list(dict.fromkeys(r.label for r in results))
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=120)
    width = 0.8 / max(len(labels), 1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # staleness is a whole number of versions
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
        offset = (j - (len(labels) - 1) / 2) * width  # each τ's bars centred on its tick
        ax.bar([x + offset for x in xs], [hist[x] / total for x in xs], width=width, label=label)
    ax.set_xlabel("staleness τ (versions between an update's base and the model it joins; ≤ 30 shown)")
    ax.set_ylabel("fraction of accepted updates")
    ax.set_title("staleness of accepted updates")
    _legend(fig, ax, "upper right")
    ax.grid(True, axis="y", alpha=0.3)
    save_figure(fig, path)


def command_line(main: Callable[[], int], prog: str) -> int:
    """Run a ``python -m devices.…`` entry point: a user's mistake (a missing scenario file, an
    unknown method, bad seeds) is one line on stderr and exit status 2, as from ``edgeci``."""
    try:
        return main()
    except EdgeciError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
