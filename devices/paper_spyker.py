"""Spyker as in its paper (paper 004, issue 16 §5): every method × fleet size × seed of a
regional scenario, with the servers' update queues, per-seed times and wins.

    python -m devices.paper_spyker demos/scenarios/multiregion/paper-spyker.toml --seeds 0-4 --jobs 2
    python -m devices.paper_spyker demos/scenarios/multiregion/paper-spyker.toml --quick   # seconds

The runs are :func:`devices.simulator.Simulation.regional` runs (the scenario's
``task_options`` are honoured). What this command adds is the paper's *server queue*
(Fig. 9). In the emulator (:class:`devices.engine.RegionNetwork`) every endpoint has a
100 Mbps uplink and downlink on which messages wait in order, and a coordinator's CPU spends
``msg_ms`` per event plus ``service_ms`` per commit. Per coordinator this command counts the
model-sized messages (> 50 kB: client updates, models sent to clients, peer models) waiting
on or crossing its **downlink** (updates coming in) and its **uplink** (models going out),
exactly (time-weighted mean, maximum), by watching the network's ``arrive`` and ``send``;
the simulator reports the CPU queue. The table (``paper_spyker.md``) gives, per method and
fleet size, time to target per seed, mean ± std, the three queues, and each line's per-seed
wins over the baseline line (default: the single-server FedAsync).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from coordinator.strategies.params import did_you_mean
from devices.multiregion import Sweep, SweepRun, sweep_parser

__all__ = ["LinkQueue", "format_table", "main", "mean_sd", "parser", "run_one", "summarise", "sweep", "time_to"]

MODEL_SIZED = 50_000
"""Bytes from which a message counts as a model (an update or a peer model): LeNet-5 is ~247 kB,
a pull or a token is < 1 kB."""


class LinkQueue:
    """Model-sized messages waiting on (or crossing) each watched endpoint's downlink."""

    def __init__(self, endpoints: Sequence[int]) -> None:
        self.q: dict[int, deque[float]] = {e: deque() for e in endpoints}
        self.t = dict.fromkeys(endpoints, 0.0)
        self.area = dict.fromkeys(endpoints, 0.0)
        self.max = dict.fromkeys(endpoints, 0)

    def _advance(self, e: int, now: float) -> None:
        q, t = self.q[e], self.t[e]
        while q and q[0] <= now:
            done = q.popleft()
            self.area[e] += (len(q) + 1) * (done - t)
            t = done
        self.area[e] += len(q) * (now - t)
        self.t[e] = now

    def arrived(self, e: int, now: float, delivered_at: float) -> None:
        if e not in self.q:
            return
        self._advance(e, now)
        self.q[e].append(delivered_at)
        self.max[e] = max(self.max[e], len(self.q[e]))

    def stats(self, now: float) -> tuple[float, int]:
        """(mean over endpoints of the time-weighted queue length, the largest queue seen)."""
        for e in self.q:
            self._advance(e, now)
        mean = sum(self.area.values()) / len(self.area) / now if now > 0 else 0.0
        return mean, max(self.max.values(), default=0)


def run_one(run: SweepRun) -> dict[str, Any]:
    """One run; returns ``RunResult.to_json()`` with ``link_queue_mean`` / ``link_queue_max`` in
    its summary (also written to the run's folder as soon as it is done)."""
    from devices.simulator import Simulation

    task, sc, method = run.start()
    label, n, seed = run.label, run.devices, run.seed
    sim = Simulation.regional(task, sc, method, n, seed)
    network = sim.network
    assert network is not None
    servers = range(sim.n, sim.n + len(sim.coords))
    down, up = LinkQueue(servers), LinkQueue(servers)
    arrive, send = network.arrive, network.send

    def arrived(receiver: int, size: int, now: float) -> float:
        at = arrive(receiver, size, now)
        if size >= MODEL_SIZED:
            down.arrived(receiver, now, at)
        return at

    def sent(sender: int, topic: str, size: int, now: float) -> list[tuple[int, float]]:
        out = send(sender, topic, size, now)
        if size >= MODEL_SIZED:
            for receiver, at in out:
                up.arrived(sender, now, at - network.latency_s(sender, receiver))
        return out

    network.arrive = arrived  # type: ignore[method-assign]
    network.send = sent  # type: ignore[method-assign]
    result = sim.run()
    (down_mean, down_max), (up_mean, up_max) = down.stats(sim.clock.now), up.stats(sim.clock.now)
    out = result.to_json()
    out["summary"] |= {"link_queue_mean": down_mean, "link_queue_max": down_max,
                       "uplink_queue_mean": up_mean, "uplink_queue_max": up_max, "devices": n}
    print(f"{label} · {n} devices · seed {seed}: time to target "
          f"{'—' if result.time_to_target is None else f'{result.time_to_target:.1f} s'}, "
          f"server downlink queue {down_mean:.1f} / {down_max}, uplink queue {up_mean:.1f} / {up_max}, "
          f"CPU queue {out['summary']['coordinator_queue_mean']:.1f} / "
          f"{out['summary']['coordinator_queue_max']:.0f}, wall {out['summary']['wall_s']:.0f} s", file=sys.stderr, flush=True)
    run.save(out)
    return out


def mean_sd(xs: Sequence[float]) -> tuple[float, float]:
    mean = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return mean, sd


def time_to(rows: Sequence[Mapping[str, Any]], accuracy: float) -> float | None:
    """Commit time of the first evaluated model at ``accuracy`` or more (None: never)."""
    return next((float(r["committed_at_s"]) for r in rows if r["accuracy"] >= accuracy), None)


def summarise(runs: Sequence[Mapping[str, Any]], duration: float, baseline: str,
              also: Sequence[float] = ()) -> dict[str, Any]:
    """Per method and fleet size: times per seed (None: not reached), mean ± std (a miss counts
    as the run's duration), queues; per line its per-seed wins over ``baseline``; for each
    accuracy in ``also`` the mean ± std time to it (a run stops soon after the target, so
    only accuracies below the target are meaningful)."""
    by: dict[str, dict[int, dict[int, Mapping[str, Any]]]] = {}
    for r in runs:
        by.setdefault(r["label"], {}).setdefault(int(r["summary"]["devices"]), {})[int(r["seed"])] = r
    out: dict[str, Any] = {"baseline": baseline, "duration_s": duration, "methods": {}}
    for label, sizes in by.items():
        entry: dict[str, Any] = {}
        for n, seeds in sorted(sizes.items()):
            times = {s: seeds[s]["time_to_target_s"] for s in sorted(seeds)}
            vals = [t if t is not None else duration for t in times.values()]
            mean, sd = mean_sd(vals)
            summ = [seeds[s]["summary"] for s in sorted(seeds)]
            row: dict[str, Any] = {
                "times": times, "mean": mean, "sd": sd, "all_reached": all(t is not None for t in times.values()),
                "link_queue_mean": mean_sd([x["link_queue_mean"] for x in summ])[0],
                "link_queue_max": max(x["link_queue_max"] for x in summ),
                "uplink_queue_mean": mean_sd([x["uplink_queue_mean"] for x in summ])[0],
                "uplink_queue_max": max(x["uplink_queue_max"] for x in summ),
                "cpu_queue_mean": mean_sd([x["coordinator_queue_mean"] for x in summ])[0],
                "cpu_queue_max": max(x["coordinator_queue_max"] for x in summ),
                "cpu_busy": mean_sd([x["coordinator_utilisation"] for x in summ])[0],
                "updates": mean_sd([float(x["updates"]) for x in summ])[0],
                "final_accuracy": mean_sd([float(x["final_accuracy"]) for x in summ])[0],
            }
            base = by.get(baseline, {}).get(n)
            if base is not None and label != baseline:
                common = [s for s in seeds if s in base]
                b = {s: base[s]["time_to_target_s"] for s in common}
                mine = {s: times[s] for s in common}
                row["wins"] = sum(1 for s in common if mine[s] is not None and (b[s] is None or mine[s] < b[s]))
                row["paired"] = len(common)
                savings = [1 - (mine[s] if mine[s] is not None else duration) / (b[s] if b[s] is not None else duration)
                           for s in common]
                row["saving_mean"], row["saving_sd"] = mean_sd(savings) if savings else (math.nan, math.nan)
                row["saving_bound"] = saving_bound(any(mine[s] is None for s in common), any(b[s] is None for s in common))
            for acc in also:
                at = [time_to(seeds[s].get("rows", ()), acc) for s in sorted(seeds)]
                m, d = mean_sd([t if t is not None else duration for t in at])
                row.setdefault("also", {})[f"{acc:g}"] = {"mean": m, "sd": d, "all_reached": None not in at}
            entry[str(n)] = row
        out["methods"][label] = entry
    return out


def saving_bound(mine_missed: bool, base_missed: bool) -> str:
    """How a mean saving reads when runs missed the target (a miss counts as the run's duration,
    or its total cost: less than it would take): a missed baseline makes the saving a lower bound,
    a missed own run an upper bound, misses on both sides neither (helper-101: the quick form
    printed "-109 ± 0 %" for a Spyker run that never reached the target)."""
    return {(False, False): "", (False, True): "≥ ", (True, False): "≤ "}.get((mine_missed, base_missed), "? ")


def format_saving(row: Mapping[str, Any]) -> str:
    """The saving cell: mean ± std in %, marked as a bound where misses make it one."""
    if "saving_mean" not in row:
        return "—"
    return f"{row.get('saving_bound', '')}{100 * row['saving_mean']:+.0f} ± {100 * row['saving_sd']:.0f} %"


SAVING_NOTE = ("Savings: ≥ / ≤ = a lower / upper bound (some baseline / own runs missed the target and count at the run's "
               "duration or total cost); ? = misses on both sides, no bound.")


def _t(t: float | None, duration: float) -> str:
    return f"≥ {duration:g}" if t is None else f"{t:.1f}"


def table_lines(summary: Mapping[str, Any]) -> tuple[list[str], Iterator[tuple[str, int, Mapping[str, Any]]]]:
    """The ``also`` accuracies of a summary's lines, and its (method, fleet size, line) by fleet size, then method."""
    also = sorted({a for e in summary["methods"].values() for row in e.values() for a in row.get("also", {})}, key=float)
    sizes = sorted({int(n) for e in summary["methods"].values() for n in e})
    return also, ((label, n, e[str(n)]) for n in sizes for label, e in summary["methods"].items() if str(n) in e)


def wins(row: Mapping[str, Any]) -> str:
    return f"{row['wins']}/{row['paired']}" if "wins" in row else "—"


def time_cells(row: Mapping[str, Any], duration: float, also: Sequence[str]) -> str:
    """A line's time columns: per seed, mean ± std, saving and wins over the baseline, then the time to each ``also``."""
    mean = f"{'' if row['all_reached'] else '≥ '}{row['mean']:.1f} ± {row['sd']:.1f}"
    extra = "".join(f"{'' if row['also'][a]['all_reached'] else '≥ '}{row['also'][a]['mean']:.1f} ± {row['also'][a]['sd']:.1f} | "
                    for a in also)
    return f"{', '.join(_t(t, duration) for t in row['times'].values())} | {mean} | {format_saving(row)} | {wins(row)} | {extra}"


def format_table(summary: Mapping[str, Any]) -> str:
    duration, baseline = summary["duration_s"], summary["baseline"]
    also, rows = table_lines(summary)
    lines = [
        f"| method | devices | time to target per seed (s) | mean ± std (s) | saving vs {baseline} (mean ± std) | wins | "
        + "".join(f"time to {float(a):.0%}, mean ± std (s) | " for a in also) +
        "queue in: updates on the server downlink, mean / max | queue out: models on the server uplink, mean / max | "
        "CPU queue mean / max | CPU busy | updates | final acc. |",
        "|---|---:|---|---:|---:|---:|" + "---:|" * (len(also) + 6),
    ]
    for label, n, row in rows:
        lines.append(
            f"| {label} | {n} | {time_cells(row, duration, also)}{row['link_queue_mean']:.1f} / {row['link_queue_max']} | "
            f"{row['uplink_queue_mean']:.1f} / {row['uplink_queue_max']} | "
            f"{row['cpu_queue_mean']:.1f} / {row['cpu_queue_max']:.0f} | {100 * row['cpu_busy']:.0f}% | {row['updates']:,.0f} | "
            f"{row['final_accuracy']:.3f} |")
    if any(row.get("saving_bound") for e in summary["methods"].values() for row in e.values()):
        lines += ["", SAVING_NOTE]
    return "\n".join(lines) + "\n"


def parser(prog: str, description: str, baseline: str, also: str = "0.85") -> argparse.ArgumentParser:
    """The sweep's command line (:func:`devices.multiregion.sweep_parser`, shared with
    :mod:`devices.paper_nebula`) with the baseline and the lower accuracies."""
    p = sweep_parser(prog, description, "runs/<command>/<name>")
    p.add_argument("--baseline", default=baseline, help="the label wins are counted against")
    p.add_argument("--also", default=also, help="lower accuracies to report the time to, e.g. 0.8,0.85 ('' for none)")
    # devices.multiregion's sweep takes it (scripts pass it to every sweep); these print no progress lines anyway
    p.add_argument("--no-progress", action="store_true", help="no per-step progress lines (these sweeps print none: "
                   "accepted as python -m devices.multiregion accepts it)")
    return p


def sweep(p: argparse.ArgumentParser, argv: Sequence[str] | None, out_root: str,
          report: Callable[[Sequence[Mapping[str, Any]], float, str, Sequence[float]], tuple[dict[str, Any], str]],
          table_name: str, needs_cost: bool = False) -> int:
    """Run every method × fleet size × seed (:class:`devices.multiregion.Sweep` of :func:`run_one`),
    then write ``report(runs, duration, baseline, also)``'s summary and table under ``--out``
    (``needs_cost``: the report reads the scenario's ``[multiregion.cost]``: checked first)."""
    from devices.report import json_default, write_text_atomic

    args = p.parse_args(argv)
    plan = Sweep.from_args(p, args, lambda sc: Path("runs") / out_root / (sc.name + ("-quick" if args.quick else "")))
    sc, out = plan.scenario, plan.out
    if needs_cost and (sc.regions is None or sc.regions.cost is None):
        p.error(f"{args.scenario} has no [multiregion.cost]: this report compares costs (see paper-nebula.toml)")
    labels = [m.label for m in sc.methods]
    if args.baseline not in labels:  # (a typo gave a table of "time saving vs nope" and "—" in every cell)
        p.error(f"--baseline {args.baseline!r} is not one of the methods run{did_you_mean(args.baseline, labels)}: "
                f"{', '.join(labels)}")
    if not args.report_only:
        plan.run(run_one, args.jobs)
    order = {m.label: i for i, m in enumerate(sc.methods)}
    runs = sorted((r.to_json() for r in plan.stored()), key=lambda r: (order[r["label"]], int(r["summary"]["devices"]), int(r["seed"])))
    also = [float(a) for a in args.also.split(",") if a.strip()]
    # The runs' own targets: --report-only may read runs made under another target than the
    # scenario's now (an edited scenario, or full runs read with --quick and --out).
    target = min({float(r["target_accuracy"]) for r in runs if "target_accuracy" in r} or {sc.settings.target_accuracy})
    if sc.regions is not None and sc.regions.stop_at_target and any(a >= target for a in also):
        # A run stops soon after its target: a higher accuracy's column would read "≥ duration" on every
        # line (the quick forms' targets, 65 and 75 %, lie below the default 85 %).
        print(f"note: --also {', '.join(f'{a:g}' for a in also if a >= target)} left out: not below the target "
              f"{target:g}, and each run stops soon after reaching it", file=sys.stderr)
        also = [a for a in also if a < target]
    summary, table = report(runs, sc.settings.duration_s, args.baseline, also)
    write_text_atomic(out / table_name, table)
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=1, default=json_default))
    print(table)
    return 0


def _report(runs: Sequence[Mapping[str, Any]], duration: float, baseline: str, also: Sequence[float]) -> tuple[dict[str, Any], str]:
    summary = summarise(runs, duration, baseline, also)
    return summary, format_table(summary)


def main(argv: Sequence[str] | None = None) -> int:
    p = parser("python -m devices.paper_spyker", (__doc__ or "").split("\n\n")[0], "FedAsync (1 server)")
    return sweep(p, argv, "paper-spyker", _report, "paper_spyker.md")


if __name__ == "__main__":
    from devices.report import command_line

    sys.exit(command_line(main, "python -m devices.paper_spyker"))
