"""The staleness-policy report (issue 15): policy × τ × α → class-c accuracy at fixed
versions, time to a class-c target, per-seed wins against ``damped``; and the plot.

A scenario with a ``[delay]`` table (:mod:`devices.stragglers`) runs one ``[[runs]]`` line
per (policy, τ, α): the policy is the run's ``staleness`` parameter (``none`` when unset),
τ its ``delay.versions`` and α its ``data.alpha`` (after overrides). ``edgeci emulate``
calls :func:`write_staleness_report`; to rebuild the report from stored runs (also a
partial grid, e.g. while seeds are still running)::

    python -m devices.staleness_report demos/scenarios/staleness-gi.toml --out runs/emulate/staleness-gi
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from devices.scenario import RunSpec, Scenario, load_scenario
from devices.simulator import RunResult

__all__ = ["REFERENCE", "format_staleness_table", "load_partial", "plot_class_accuracy", "staleness_summary", "write_staleness_report"]

REFERENCE = "damped"
"""The policy every other one is compared with, per seed."""
POLICY_ORDER = ("none", "damped", "drop-beyond", "dc-asgd", "gradient-inversion")


def policy_of(spec: RunSpec) -> str:
    return str(spec.params.get("staleness", "none"))


def cell_of(spec: RunSpec) -> tuple[str, int, float]:
    """(policy, τ, α) of a run line."""
    return policy_of(spec), spec.settings.delay.versions, spec.settings.alpha


def _delayed_runs(scenario: Scenario, results: Sequence[RunResult]) -> Iterator[tuple[RunResult, RunSpec, Mapping[str, Any]]]:
    """Each result of one of the scenario's runs that recorded its delayed devices, with its
    run line and its ``stragglers`` summary."""
    specs = {spec.label: spec for spec in scenario.runs}
    for r in results:
        spec = specs.get(r.label)
        st = r.summary.get("stragglers")
        if spec is not None and st:
            yield r, spec, st


def _at(per_version: Sequence[Mapping[str, float]], version: int, key: str) -> float | None:
    """``key`` (class-c or overall accuracy) of ``version`` (None: the run never committed it, or has no ``key``)."""
    return next((float(row[key]) for row in per_version if int(row["version"]) == version and key in row), None)


def _class_window(per_version: Sequence[Mapping[str, float]], first: int, last: int) -> float | None:
    """Mean class-c accuracy over versions ``first..last`` (one version's is noisy)."""
    vals = [float(r["class_accuracy"]) for r in per_version if first <= int(r["version"]) <= last]
    return sum(vals) / len(vals) if vals else None


def _mean(xs: Sequence[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return sum(vals) / len(vals) if vals else None


def staleness_summary(scenario: Scenario, results: Sequence[RunResult], *, class_target: float | None = None) -> dict[str, Any]:
    """Per (α, τ, policy): per-seed class-c accuracy at the report versions, overall
    accuracy at the last one, time to the class-c target (the scenario's, or ``class_target``),
    conversions; and wins vs damped."""
    target = scenario.settings.delay.class_target if class_target is None else class_target
    cells: dict[tuple[float, int, str], dict[int, dict[str, Any]]] = {}
    for r, spec, st in _delayed_runs(scenario, results):
        policy, tau, alpha = cell_of(spec)
        pv = st["per_version"]
        versions = list(spec.settings.delay.report_versions)
        counters = r.summary.get("conversion_counters", {})
        conversions = r.summary.get("conversions", [])
        cells.setdefault((alpha, tau, policy), {})[r.seed] = {
            "class_acc": {v: _at(pv, v, "class_accuracy") for v in versions},
            "class_window": _class_window(pv, versions[0], versions[-1]) if versions else None,
            "overall_last": _at(pv, versions[-1], "accuracy") if versions else None,
            "time_to_class_target_s": next((float(row["t_s"]) for row in pv if row["class_accuracy"] >= target), None),
            "reached_version": int(pv[-1]["version"]) if pv else 0,
            "end_s": float(pv[-1]["t_s"]) if pv else 0.0,
            "released_staleness": st.get("released_staleness", []),
            "delayed_class_share": st.get("delayed_class_share"),
            "conversions_applied": int(counters.get("conversion_applied", 0)),
            "conversions_requested": int(counters.get("conversion_requested", 0)),
            "conversions_late": int(counters.get("conversion_late", 0)),
            "conversion_cpu_s": sum(float(c.get("elapsed_s", 0.0)) for c in conversions),
        }
    rows: list[dict[str, Any]] = []
    for (alpha, tau, policy), seeds in sorted(cells.items(), key=lambda kv: (-kv[0][0], kv[0][1], _order(kv[0][2]))):
        ref = cells.get((alpha, tau, REFERENCE), {})
        versions = sorted({v for s in seeds.values() for v in s["class_acc"]})
        acc_wins = time_wins = compared = 0
        per_seed = []
        for seed, s in sorted(seeds.items()):
            mine_acc = s["class_window"]
            ref_s = ref.get(seed)
            entry = {"seed": seed, **s}
            if ref_s is not None and policy != REFERENCE:
                compared += 1
                ref_acc = ref_s["class_window"]
                if mine_acc is not None and ref_acc is not None and mine_acc > ref_acc:
                    acc_wins += 1
                t_mine, t_ref = s["time_to_class_target_s"], ref_s["time_to_class_target_s"]
                if t_mine is not None and (t_ref is None or t_mine < t_ref):
                    time_wins += 1
                entry["vs_damped_acc"] = None if mine_acc is None or ref_acc is None else mine_acc - ref_acc
                entry["vs_damped_time"] = t_mine / t_ref if t_mine is not None and t_ref else None
            per_seed.append(entry)
        times = [s["time_to_class_target_s"] for s in seeds.values()]
        rows.append({
            "alpha": alpha, "tau": tau, "policy": policy, "seeds": len(seeds),
            "class_acc": {v: _mean([s["class_acc"].get(v) for s in seeds.values()]) for v in versions},
            "class_window": _mean([s["class_window"] for s in seeds.values()]),
            "overall_last": _mean([s["overall_last"] for s in seeds.values()]),
            "time_to_class_target_s": _mean(times), "reached": sum(t is not None for t in times),
            "acc_wins": acc_wins, "time_wins": time_wins, "compared": compared,
            "conversions_applied": sum(s["conversions_applied"] for s in seeds.values()),
            "conversions_late": sum(s["conversions_late"] for s in seeds.values()),
            "conversion_cpu_s": sum(s["conversion_cpu_s"] for s in seeds.values()),
            "per_seed": per_seed,
        })
    return {"class": scenario.settings.delay.target_class, "class_target": target,
            "reference": REFERENCE, "rows": rows}


def _order(policy: str) -> int:
    return POLICY_ORDER.index(policy) if policy in POLICY_ORDER else len(POLICY_ORDER)


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x:.1%}"


def format_staleness_table(summary: Mapping[str, Any]) -> str:
    """Markdown: one line per (α, τ, policy), then the per-seed lines."""
    c, target = summary["class"], summary["class_target"]
    lines = [
        f"### Class {c} (held mostly by the delayed devices): accuracy at fixed versions, time to {target:.0%}",
        "",
        "| α | τ | policy | seeds | class-c acc @ versions (mean) | class-c acc, mean over those versions | overall @ last "
        "| time to class-c target (mean s, reached) | wins vs damped: window acc / time | conversions (applied / late, CPU s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary["rows"]:
        accs = ", ".join(f"v{v}: {_pct(a)}" for v, a in row["class_acc"].items())
        ttt = "—" if row["time_to_class_target_s"] is None else f"{row['time_to_class_target_s']:.0f} s"
        wins = "—" if row["policy"] == REFERENCE or not row["compared"] else f"{row['acc_wins']}/{row['compared']} · {row['time_wins']}/{row['compared']}"
        conv = "—" if not (row["conversions_applied"] or row["conversions_late"]) else (
            f"{row['conversions_applied']} / {row['conversions_late']}, {row['conversion_cpu_s']:.0f} s")
        lines.append(f"| {row['alpha']:g} | {row['tau']} | {row['policy']} | {row['seeds']} | {accs} | {_pct(row['class_window'])} | {_pct(row['overall_last'])} "
                     f"| {ttt} ({row['reached']}/{row['seeds']}) | {wins} | {conv} |")
    lines += ["", "Per seed (class-c accuracy: at the last report version, and its mean from the first to the last "
              "report version; Δ = that mean minus damped's, in percentage points; time to the class-c target):", "",
              "| α | τ | policy | seed | class-c acc @ last | window mean | Δ vs damped (pp) | time to target | released staleness |",
              "|---|---|---|---|---|---|---|---|---|"]
    for row in summary["rows"]:
        last = max(row["class_acc"]) if row["class_acc"] else None
        for s in row["per_seed"]:
            acc = s["class_acc"].get(last) if last is not None else None
            delta = s.get("vs_damped_acc")
            t = s["time_to_class_target_s"]
            stale = s["released_staleness"]
            lines.append(f"| {row['alpha']:g} | {row['tau']} | {row['policy']} | {s['seed']} | {_pct(acc)} | {_pct(s['class_window'])} "
                         f"| {'—' if delta is None else f'{100 * delta:+.1f} pp'} | {'—' if t is None else f'{t:.0f} s'} "
                         f"| {min(stale) if stale else '—'}–{max(stale) if stale else '—'} ({len(stale)}) |")
    return "\n".join(lines) + "\n"


def plot_class_accuracy(scenario: Scenario, results: Sequence[RunResult], path: Path) -> None:
    """Class-c accuracy vs version, one panel per (α, τ), one line per policy (mean over seeds)."""
    from devices.report import pyplot, save_figure

    plt = pyplot()
    series: dict[tuple[float, int], dict[str, list[dict[int, float]]]] = {}
    for _, spec, st in _delayed_runs(scenario, results):
        policy, tau, alpha = cell_of(spec)
        curve = {int(row["version"]): float(row["class_accuracy"]) for row in st["per_version"]}
        series.setdefault((alpha, tau), {}).setdefault(policy, []).append(curve)
    panels = sorted(series, key=lambda k: (-k[0], k[1]))
    if not panels:
        return
    cols = len({tau for _, tau in panels})
    alphas = sorted({a for a, _ in panels}, reverse=True)
    taus = sorted({t for _, t in panels})
    fig, axes = plt.subplots(len(alphas), cols, figsize=(4.2 * cols, 3.4 * len(alphas)), dpi=110, squeeze=False)
    for (alpha, tau), by_policy in series.items():
        ax = axes[alphas.index(alpha)][taus.index(tau)]
        for policy in sorted(by_policy, key=_order):
            curves = by_policy[policy]
            top = min(max(c) for c in curves)
            xs = list(range(top + 1))
            ys = [_mean([c.get(v) for c in curves]) for v in xs]
            ax.plot(xs, [math.nan if y is None else y for y in ys], label=f"{policy} (n={len(curves)})", linewidth=1.4)
        ax.axvline(tau, color="0.6", linestyle=":", linewidth=1)
        ax.set_title(f"α = {alpha:g}, τ = {tau}", fontsize=9)
        ax.set_xlabel("version")
        ax.set_ylabel(f"class-{scenario.settings.delay.target_class} accuracy")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6, loc="upper left")
    fig.suptitle(f"{scenario.name}: class-{scenario.settings.delay.target_class} accuracy vs version (mean over seeds)", fontsize=10)
    save_figure(fig, path)


def write_staleness_report(scenario: Scenario, results: Sequence[RunResult], out: Path, *, class_target: float | None = None) -> str:
    """Write ``staleness.md``, ``staleness.json`` and ``class_accuracy.png`` under ``out``;
    return the table."""
    from devices.report import json_default, write_text_atomic

    summary = staleness_summary(scenario, results, class_target=class_target)
    table = format_staleness_table(summary)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "staleness.md", table)
    write_text_atomic(out / "staleness.json", json.dumps(summary, indent=1, sort_keys=True, default=json_default))
    plot_class_accuracy(scenario, results, out / "class_accuracy.png")
    return table


def load_partial(directory: Path, scenario: Scenario) -> list[RunResult]:
    """The stored runs of ``scenario`` that exist under ``directory`` (a partial grid is fine)."""
    from devices.report import read_run, slug

    results = []
    for spec in scenario.runs:
        for path in sorted(directory.glob(f"{slug(spec.label)}__seed*.json")):
            run = read_run(path, spec.settings.target_accuracy)
            if run.label == spec.label:  # not another label with the same slug
                results.append(run)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenario", type=Path)
    p.add_argument("--out", type=Path, required=True, help="the emulate --out directory (runs/ inside)")
    p.add_argument("--quick", action="store_true", help="the scenario's [quick] variant")
    p.add_argument("--class-target", type=float, default=None, help="class-c accuracy target; None = the scenario's")
    args = p.parse_args(argv)
    scenario = load_scenario(args.scenario)
    if args.quick:
        scenario = scenario.quick()
    print(write_staleness_report(scenario, load_partial(args.out / "runs", scenario), args.out, class_target=args.class_target))
    return 0


if __name__ == "__main__":
    from devices.report import command_line

    raise SystemExit(command_line(main, "python -m devices.staleness_report"))
