"""The release report: what devices would see, run by run, against a reference run.

For scenarios with ``reference = "<run label>"`` (e.g. ``demos/scenarios/attacks.toml``),
``edgeci emulate`` adds, per run and seed, from the evaluation rows' ``release_accuracy``
(the release — what devices predict with — on the task's held-out split):

* **start** — the release's accuracy at t = 0, and its **worst drop** below that start
  (points; 0 when it never fell below);
* **target** — per seed, the release accuracy the reference run has at ``target_at`` (80 %)
  of the run; **time to target** — the first evaluation at which the release reaches it,
  and its ratio to the reference run's time on the same seed;
* the gate's decisions and the robust aggregator's counters.

Without the reference run among the results (``--strategies`` left it out) there is no target:
the report says so (md note, ``reference_in_runs: false`` and ``not_computed`` in the json, the
png's title) and the target columns are n/a / None, not "never".

``release.md`` (table with per-seed values), ``release.json`` and ``release.png`` (release
accuracy over virtual time, mean over seeds, band = min–max; the training line dotted;
ungated runs left (0–100 %, no bands), gated runs right (50–100 %), the reference dashed grey
in both, drawn above the other lines so it shows where they coincide).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from devices.scenario import Scenario
from devices.simulator import RunResult

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["TARGET_AT", "format_release_table", "plot_release", "release_figure", "release_summary", "target_of"]

TARGET_AT = 0.8
"""The reference's target is its release accuracy at this fraction of the run."""

_NOT_COMPUTED_WITHOUT_REFERENCE = (
    "target", "time_to_target_s", "reference_time_s", "ratio", "worst_ratio", "reached"
)
"""The summary's keys that need the reference run's target (None without it)."""

_REFERENCE_ZORDER = 3
"""The reference's release line is drawn above the runs' lines (matplotlib's default: 2)."""


def _release(row: Mapping[str, Any]) -> float:
    return float(row.get("release_accuracy", row["accuracy"]))


def _has_reference(scenario: Scenario, results: Sequence[RunResult]) -> bool:
    """Whether the reference run is among the results (``--strategies`` may leave it out)."""
    return any(r.label == scenario.reference and r.rows for r in results)


def target_of(
    rows: Sequence[Mapping[str, Any]], duration_s: float, at: float = TARGET_AT
) -> float | None:
    """The release accuracy of the last evaluation at or before ``at × duration_s``."""
    before = [r for r in rows if float(r["t_s"]) <= at * duration_s + 1e-9]
    return _release(before[-1]) if before else None


def release_time_to(rows: Sequence[Mapping[str, Any]], target: float) -> float | None:
    """Virtual time of the first evaluation at which the release reaches ``target``."""
    for row in rows:
        if _release(row) >= target - 1e-12:
            return float(row["t_s"])
    return None


def release_summary(
    scenario: Scenario, results: Sequence[RunResult], *, target_at: float = TARGET_AT
) -> dict[str, Any]:
    """Per run label: per-seed start, worst drop, final, time to the reference's target and
    its ratio to the reference's time; worst values over seeds. Without the reference run among
    ``results`` those are None, listed under ``not_computed``."""
    reference = scenario.reference
    refs = {r.seed: r for r in results if r.label == reference}
    targets: dict[int, tuple[float, float | None]] = {}
    for seed, ref in refs.items():
        duration = next(s.settings.duration_s for s in scenario.runs if s.label == reference)
        target = target_of(ref.rows, duration, target_at)
        if target is not None:
            targets[seed] = (target, release_time_to(ref.rows, target))
    in_runs = _has_reference(scenario, results)
    out: dict[str, Any] = {"reference": reference, "reference_in_runs": in_runs, "target_at": target_at, "runs": {}}
    if not in_runs:
        out["not_computed"] = list(_NOT_COMPUTED_WITHOUT_REFERENCE)
    for spec in scenario.runs:
        mine = sorted(
            (r for r in results if r.label == spec.label and r.rows), key=lambda r: r.seed
        )
        if not mine:
            continue
        seeds: list[dict[str, Any]] = []
        for r in mine:
            rel = [_release(row) for row in r.rows]
            start = rel[0]
            target, ref_time = targets.get(r.seed, (math.nan, None))
            ttt = release_time_to(r.rows, target) if not math.isnan(target) else None
            summary = r.summary
            robust = (summary.get("strategy") or {}).get("robust") or {}
            seeds.append(
                {
                    "seed": r.seed,
                    "start": start,
                    "min": min(rel),
                    "drop_points": round(100 * max(0.0, start - min(rel)), 2),
                    "final": rel[-1],
                    "final_training": float(r.rows[-1]["accuracy"]),
                    "target": None if math.isnan(target) else target,
                    "time_to_target_s": ttt,
                    "reference_time_s": ref_time,
                    "ratio": (ttt / ref_time) if ttt is not None and ref_time else None,
                    "gate": summary.get("gate"),
                    "robust_counts": robust.get("counts", {}),
                    "rejected_by_reason": summary.get("rejected_by_reason", {}),
                    "attackers": summary.get("attackers", {}),
                }
            )
        ratios = [s["ratio"] for s in seeds]
        out["runs"][spec.label] = {
            "seeds": seeds,
            "worst_drop_points": max(s["drop_points"] for s in seeds),
            "worst_ratio": None if any(x is None for x in ratios) else max(ratios),
            "reached": sum(s["time_to_target_s"] is not None for s in seeds) if in_runs else None,
            "mean_final": sum(s["final"] for s in seeds) / len(seeds),
        }
    return out


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def _minutes(x: float | None) -> str:
    return "never" if x is None else f"{x / 60:.1f}"


_WHY_NO_REFERENCE = "left out by --strategies, or without an evaluation"
"""Why a reference run can be missing: not run, or run without a single evaluation row."""

_NA = "n/a"
"""A cell that needs the reference's target when the reference run is not among the runs."""


def format_release_table(summary: Mapping[str, Any]) -> str:
    """Markdown: one line per run (worst over seeds, then per-seed values)."""
    runs = summary["runs"]
    lines = [
        f"Release accuracy (% on the held-out split; reference = {summary['reference']!r}, target = its release "
        f"accuracy at {summary['target_at']:.0%} of the run, per seed)",
        "",
        "| run | worst drop below start (points) | time to target / reference (worst) | reached | final release (mean) "
        "| per seed: start → min → final, time to target (min), ratio | gate promoted/held/rejected | clipped |",
        "|---|---:|---:|---:|---:|---|---|---:|",
    ]
    in_runs = summary.get("reference_in_runs", True)  # (a summary from before the key: the reference ran)
    if not in_runs:  # said before the table: "never" / "0/1" would read as a missed target
        lines[1:1] = [
            "",
            f"**No target:** the reference run {summary['reference']!r} is not among these runs ({_WHY_NO_REFERENCE}), "
            "so time to target, its ratio and reached are n/a; run it too for them.",
        ]
    for label, run in runs.items():
        per_seed = "; ".join(
            f"s{s['seed']}: {_pct(s['start'])} → {_pct(s['min'])} → {_pct(s['final'])}, "
            f"{_NA if s['target'] is None else _minutes(s['time_to_target_s'])}"
            + (f" ({s['ratio']:.2f}×)" if s["ratio"] is not None else "")
            for s in run["seeds"]
        )
        gates = [s["gate"] for s in run["seeds"] if s["gate"]]
        gate = (
            "—"
            if not gates
            else ", ".join(
                f"{g['gate_promoted']}/{g['gate_held']}/{g['gate_rejected']}" for g in gates
            )
        )
        clipped = sum(int(s["robust_counts"].get("clipped", 0)) for s in run["seeds"])
        ratio = _NA if not in_runs else "—" if run["worst_ratio"] is None else f"{run['worst_ratio']:.2f}×"
        reached = _NA if not in_runs else f"{run['reached']}/{len(run['seeds'])}"
        lines.append(
            f"| {label} | {run['worst_drop_points']:.1f} | {ratio} | {reached} "
            f"| {_pct(run['mean_final'])} | {per_seed} | {gate} | {clipped} |"
        )
    return "\n".join(lines) + "\n"


def plot_release(scenario: Scenario, results: Sequence[RunResult], path: Path) -> None:
    """Write :func:`release_figure` to ``path``."""
    import matplotlib.pyplot as plt

    from devices.report import replacing

    fig = release_figure(scenario, results)
    with replacing(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or None)
    plt.close(fig)


def release_figure(scenario: Scenario, results: Sequence[RunResult]) -> Figure:
    """Release accuracy (solid) and training-line accuracy (dotted) vs virtual time: ungated
    runs on the left, gated runs on the right (the reference run, dashed grey, in both and on
    top). The caller closes it (``plt.close``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = [("without the gate", [s for s in scenario.runs if not s.settings.gate]),
              ("with the release gate", [s for s in scenario.runs if s.settings.gate])]
    panels = [(title, specs) for title, specs in panels if specs]
    fig, axes = plt.subplots(1, len(panels), figsize=(7.5 * len(panels), 5.5), dpi=120, squeeze=False)
    for ax, (title, specs) in zip(axes[0], panels, strict=True):
        gated = any(s.settings.gate for s in specs)
        if scenario.reference and all(s.label != scenario.reference for s in specs):
            specs = [*(s for s in scenario.runs if s.label == scenario.reference), *specs]
        for spec in specs:
            mine = [r for r in results if r.label == spec.label and r.rows]
            if not mine:
                continue
            n = min(len(r.rows) for r in mine)
            t = np.array([row["t_s"] for row in mine[0].rows[:n]]) / 60.0
            rel = 100 * np.array([[_release(row) for row in r.rows[:n]] for r in mine])
            train = 100 * np.array([[float(row["accuracy"]) for row in r.rows[:n]] for r in mine])
            ref = spec.label == scenario.reference
            # Every run starts from the same model, so release lines often coincide with the
            # reference's: it goes on top (zorder above the default 2 of lines), thinner than the
            # runs' lines, so their colour shows either side of its dashes and in the gaps.
            (line,) = ax.step(
                t,
                rel.mean(axis=0),
                where="post",
                label=f"{spec.label}: release (n={len(mine)})",
                linewidth=1.2 if ref else 1.8,
                linestyle="--" if ref else "-",
                color="0.3" if ref else None,
                zorder=_REFERENCE_ZORDER if ref else None,
            )
            if not ref:
                ax.plot(
                    t, train.mean(axis=0), color=line.get_color(), linestyle=":", linewidth=1.0, alpha=0.8
                )
            if len(mine) > 1 and gated:  # ungated attacked runs span 10–90 %: bands would hide the means
                ax.fill_between(
                    t,
                    rel.min(axis=0),
                    rel.max(axis=0),
                    step="post",
                    color=line.get_color(),
                    alpha=0.06 if ref else 0.10,
                    linewidth=0,
                )
        ax.set_xlabel("virtual time (min)")
        ax.set_ylabel("accuracy on the held-out split (%)")
        ax.set_ylim(50 if gated else 0, 100)
        band = ", band = min–max over seeds" if gated else ""
        ax.set_title(f"{title}: release (solid; dotted = training line), mean{band}", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right", fontsize=7)
    title = f"{scenario.name}: release accuracy vs virtual time"
    if scenario.reference and not _has_reference(scenario, results):
        title += f"\nreference {scenario.reference!r} not among these runs ({_WHY_NO_REFERENCE}): no reference line"
    fig.suptitle(title)
    fig.tight_layout()
    return fig
