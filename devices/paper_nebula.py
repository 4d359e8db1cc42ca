"""NebulaFL's selection and resources against a FedSA-like baseline, in time *and cost* (paper 003,
§III-B.3 eq. 4–9, §IV-B3 Table II, §IV-D Table III; issue 16 item 4).

    python -m devices.paper_nebula demos/scenarios/multiregion/paper-nebula.toml --seeds 0-4 --jobs 2
    python -m devices.paper_nebula demos/scenarios/multiregion/paper-nebula.toml --quick   # seconds

The same sweep as :mod:`devices.paper_spyker` (every method × fleet size × seed, one JSON per
run, ``--jobs`` processes, ``--report-only``), on a scenario with a cost model
(``[multiregion.cost]``, :class:`devices.scenario.CostModel`): each run's summary then carries
its compute cost (training seconds on the resource each job ran on × that resource's price in
the device's region), its transfer cost (bytes of every message between two regions × the
price per GB) and the cost accrued when the target was first seen (``cost_to_target``). This
command's table (``paper_nebula.md``) gives per method: time to target per seed, mean ± std,
per-seed wins over the baseline line (default: the FedSA-like server); the same for the cost
to target; bytes moved between regions by then; the resources the jobs ran on; final accuracy.
A run that misses the target counts with its duration and its total cost (shown as ≥).
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from devices.paper_spyker import (
    SAVING_NOTE,
    format_saving,
    mean_sd,
    parser,
    saving_bound,
    summarise,
    sweep,
    table_lines,
    time_cells,
    wins,
)

__all__ = ["cost_summary", "format_table", "main", "report"]

BASELINE = "FedSA-like (1 server, 1 s window)"


def _cost(run: Mapping[str, Any]) -> tuple[float, bool]:
    """(cost to target, reached); a miss: the run's total cost."""
    s = run["summary"]
    hit = s.get("cost_to_target")
    return (float(hit), True) if hit is not None else (float(s["cost_total"]), False)


def cost_summary(runs: Sequence[Mapping[str, Any]], baseline: str) -> dict[str, dict[str, Any]]:
    """Per method and fleet size: cost to target per seed, mean ± std, per-seed wins and
    saving over ``baseline``, inter-region bytes to target, compute share, resources used."""
    by: dict[str, dict[int, dict[int, Mapping[str, Any]]]] = {}
    for r in runs:
        if "cost_total" not in r["summary"]:
            raise ValueError(f"{r['label']}: the run has no cost (its scenario has no [multiregion.cost])")
        by.setdefault(r["label"], {}).setdefault(int(r["summary"]["devices"]), {})[int(r["seed"])] = r
    out: dict[str, dict[str, Any]] = {}
    for label, sizes in by.items():
        for n, seeds in sorted(sizes.items()):
            order = sorted(seeds)
            costs = {s: _cost(seeds[s]) for s in order}
            summ = [seeds[s]["summary"] for s in order]
            inter = [x["bytes_inter_region_to_target"] if x["bytes_inter_region_to_target"] is not None else x["bytes_inter_region"]
                     for x in summ]
            used: Counter[str] = Counter()
            for x in summ:
                used.update(x.get("resource_use", {}))
            mean, sd = mean_sd([c for c, _ in costs.values()])
            row: dict[str, Any] = {
                "costs": {s: c for s, (c, _) in costs.items()}, "reached": {s: ok for s, (_, ok) in costs.items()},
                "mean": mean, "sd": sd,
                "inter_region_mb_to_target": mean_sd([b / 1e6 for b in inter])[0],
                "compute_share": mean_sd([x["cost_compute"] / x["cost_total"] if x["cost_total"] else 0.0 for x in summ])[0],
                "resource_use": {k: v / sum(used.values()) for k, v in sorted(used.items())},
            }
            base = by.get(baseline, {}).get(n)
            if base is not None and label != baseline:
                common = [s for s in order if s in base]
                mine = {s: costs[s] for s in common}
                theirs = {s: _cost(base[s]) for s in common}
                row["wins"] = sum(1 for s in common if mine[s][1] and (not theirs[s][1] or mine[s][0] < theirs[s][0]))
                row["paired"] = len(common)
                counted = [s for s in common if theirs[s][0] > 0]
                savings = [1 - mine[s][0] / theirs[s][0] for s in counted]
                row["saving_mean"], row["saving_sd"] = mean_sd(savings) if savings else (math.nan, math.nan)
                row["saving_bound"] = saving_bound(any(not mine[s][1] for s in counted), any(not theirs[s][1] for s in counted))
            out.setdefault(label, {})[str(n)] = row
    return out


def report(runs: Sequence[Mapping[str, Any]], duration: float, baseline: str,
           also: Sequence[float]) -> tuple[dict[str, Any], str]:
    summary = summarise(runs, duration, baseline, also)
    summary["cost"] = cost_summary(runs, baseline)
    return summary, format_table(summary)


def format_table(summary: Mapping[str, Any]) -> str:
    """Time and cost to target (costs in milli-dollars), per method and fleet size."""
    duration, baseline = summary["duration_s"], summary["baseline"]
    also, rows = table_lines(summary)
    lines = [
        f"| method | devices | time to target per seed (s) | mean ± std (s) | time saving vs {baseline} | wins (time) | "
        + "".join(f"time to {float(a):.0%} (s) | " for a in also)
        + f"cost to target per seed (m$) | mean ± std (m$) | cost saving vs {baseline} | wins (cost) | "
        "MB between regions to target | compute share of cost | jobs per resource | updates | final acc. |",
        "|---|---:|---|---:|---:|---:|" + "---:|" * len(also) + "---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for label, n, row in rows:
        cost = summary["cost"].get(label, {}).get(str(n))
        if cost is None:
            continue
        costs = ", ".join(f"{'' if cost['reached'][s] else '≥ '}{1000 * c:.2f}" for s, c in cost["costs"].items())
        c_mean = f"{'' if all(cost['reached'].values()) else '≥ '}{1000 * cost['mean']:.2f} ± {1000 * cost['sd']:.2f}"
        use = ", ".join(f"{k} {100 * v:.0f}%" for k, v in cost["resource_use"].items())
        lines.append(
            f"| {label} | {n} | {time_cells(row, duration, also)}{costs} | {c_mean} | {format_saving(cost)} | {wins(cost)} | "
            f"{cost['inter_region_mb_to_target']:.1f} | {100 * cost['compute_share']:.0f}% | {use} | {row['updates']:,.0f} | "
            f"{row['final_accuracy']:.3f} |")
    every_row = [*(r for e in summary["methods"].values() for r in e.values()), *(r for e in summary["cost"].values() for r in e.values())]
    if any(r.get("saving_bound") for r in every_row):
        lines += ["", SAVING_NOTE]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = parser("python -m devices.paper_nebula", (__doc__ or "").split("\n\n")[0], BASELINE)
    return sweep(p, argv, "paper-nebula", report, "paper_nebula.md", needs_cost=True)


if __name__ == "__main__":
    from devices.report import command_line

    sys.exit(command_line(main, "python -m devices.paper_nebula"))
