"""How much faster is the fleet emulator now than at an older commit? Both trees, one workload,
one session, interleaved.

Issue 13 asks for 100,000 active devices (stub training) at ≥ 100× real time with peak RSS
≤ 2 GB. When it was filed (commit e32e12d) the emulator ran that fleet at 20× real time: the
target is 5× the filing speed. This pool's hosts differ by up to 2.2× in speed between
sessions, so a speed measured in one session says little against one measured in another;
this script measures the old tree and this one in the same session, alternating, and prints
the ratio, which the host's speed cancels out of.

**The workload** is ``benchmarks/emulator_speed.py``'s fleet scale: the digits task,
``--devices`` devices (headset 0.5 / phone 0.3 / camera 0.2), IID partition of a synthetic
pool, ``--rate`` labels per device per hour in the given order, D_min = 1, epochs 1, batch 16,
lr 0.05, SPIN K = 10, π = 16 s, evaluation every 30 virtual s, ``--duration`` virtual s, seed
``--seed``, local training stubbed (the update is a copy of the received model), one torch
thread. What is timed is the CPU time of the event loop (``Simulation.run``), evaluation
included (also printed on its own); setup (drawing the fleet, building the cores) is not.

**The trees.** The old revision (``--baseline``, default e32e12d) is extracted with
``git archive`` into a temporary folder (no worktree, no change to the repository's git
state) and run there with ``PYTHONPATH`` set to it, by a small adapter this script writes
into that folder: it builds the same scenario with the old API (``make_strategy`` +
``Simulation(...).run()``, which always encodes and decodes every message with the codec).
This tree runs ``benchmarks/emulator_speed.py --one N --transport T`` (``--transport``,
default ``carried``: the in-process transport, what ``edgeci emulate`` uses; ``codec``: every
message encoded and decoded, as the old emulator always did). Each measurement is a fresh
subprocess (peak RSS is its own); ``--runs`` pairs alternate which tree goes first.

**The table**: per tree the run with the median loop CPU (of an even count the slower middle
one) and the range over runs; virtual seconds per CPU second; µs of loop CPU per event and per
label; peak RSS (the largest over runs); events, labels, versions, accepted updates. Then the
ratio now/then of virtual-per-CPU (the speed-up), and of the cost per label (then/now). The two
trees can count different events for the same fleet (a newer simulator drops timers that
would do nothing), so µs per event is not comparable between them; the labels, trainings and
versions are the work the fleet asks for, and the µs-per-label ratio is printed beside the
speed ratio. Finally: what the speed-up means against the issue's 5× (20× → 100× real time).

    .venv/bin/python benchmarks/emulator_then_now.py [--devices 100000] [--runs 3] [--baseline e32e12d]
        [--duration 1800] [--rate 2] [--seed 0] [--transport carried]

At 100,000 devices one run of e32e12d takes minutes and about 6 GB of memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._cli import git_commit, non_negative_int, one_of, positive_float, positive_int  # noqa: E402

DEFAULT_BASELINE = "e32e12d"
FILING_SPEED = 20.0
"""Real-time factor of 100,000 devices at e32e12d on the host of the day the issue was filed."""
GOAL_SPEED = 100.0
GOAL_RSS_MB = 2048.0

ADAPTER = '''"""Written by benchmarks/emulator_then_now.py: the fleet-scale workload of emulator_speed.py
on the e32e12d-era simulator API. argv: devices duration_s rate_per_h seed settings (the JSON of
emulator_speed.fleet_settings: the scenario, from this tree). Prints one JSON line."""
import json, resource, sys, time
import numpy as np
from coordinator.strategies import make_strategy
from devices.scenario import parse_scenario
from devices.simulator import Simulation
from edge_sdk.tasks import Split, TaskData, TrainResult, get_task
from edge_sdk.trainer import configure_threads

devices, duration_s, rate_per_h, seed = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
settings = json.loads(sys.argv[5])


class NoTraining:  # as benchmarks/emulator_speed.py's: synthetic pool, the update a copy of the model
    def __init__(self, task, pool_size):
        self._task, self.name, self.spec = task, task.name, task.spec
        data = task.data()
        n = data.n_classes
        y = np.tile(np.arange(n, dtype=np.int64), pool_size // n + 1)[:pool_size]
        self._data = TaskData(pretrain=data.pretrain, pool=Split(x=np.zeros((pool_size, 1), np.uint8), y=y),
                              test=data.test, n_classes=n)

    def data(self):
        return self._data

    def pretrained(self, *, seed=0):
        return self._task.pretrained(seed=seed)

    def local_update(self, weights, x, y, config):
        copy = np.frombuffer(np.ascontiguousarray(weights, dtype=np.float32).tobytes(), dtype=np.float32)
        return TrainResult(weights=copy, n_samples=int(y.shape[0]), loss=0.0, seconds=0.0)

    def evaluate(self, weights, split=None):
        return self._task.evaluate(weights, split)


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


configure_threads(1)
spec = parse_scenario(settings).runs[0]
per_device = int(rate_per_h * duration_s / 3600.0 * 2 + 8)
task = NoTraining(get_task("digits", device="cpu"), pool_size=devices * per_device)
task.pretrained(seed=seed)
started = time.perf_counter()
sim = Simulation(task, spec.settings, make_strategy(spec.strategy, **spec.params), seed=seed, label=spec.label,
                 params=spec.params)
setup_s = time.perf_counter() - started
eval_cpu = [0.0]
evaluate = sim._evaluate


def timed_evaluate(now):
    t0 = time.process_time()
    evaluate(now)
    eval_cpu[0] += time.process_time() - t0


sim._evaluate = timed_evaluate
cpu0 = time.process_time()
result = sim.run()
cpu = time.process_time() - cpu0
s = result.summary
print(json.dumps({"devices": devices, "events": int(s["events"]), "wall_s": float(s["wall_s"]), "cpu_s": cpu,
                  "setup_s": setup_s, "eval_cpu_s": eval_cpu[0], "peak_rss_mb": peak_rss_mb(),
                  "labels": int(s["labels"]), "trainings": int(s["trainings"]), "versions": int(s["versions"]),
                  "updates_accepted": int(s["updates_accepted"])}))
'''


def revision(root: Path) -> Callable[[str], str]:
    """A commit of the checkout at ``root`` (full hash); a copy without git history is its own error."""
    as_commit = git_commit(root)

    def parse(text: str) -> str:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--git-dir"], capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise argparse.ArgumentTypeError(f"{root} has no git history (not a git checkout): cannot extract {text!r}; "
                                             "run this from a clone")
        return as_commit(text)

    return parse


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", type=revision(ROOT), default=DEFAULT_BASELINE,
                   help=f"the older commit, extracted with git archive (default {DEFAULT_BASELINE}: the tree issue 13 was filed "
                        "against; the adapter drives its simulator API)")
    p.add_argument("--devices", type=positive_int, default=100_000, help="fleet size (default 100000, where the goals are defined)")
    p.add_argument("--runs", type=positive_int, default=3, help="measurements per tree, old and new alternating (default 3)")
    p.add_argument("--duration", type=positive_float, default=1800.0, help="virtual seconds per run (default 1800)")
    p.add_argument("--rate", type=positive_float, default=2.0, help="labels per device per hour (default 2)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the scenario (default 0)")
    p.add_argument("--transport", type=one_of("carried", "codec"), default="carried",
                   help="this tree's transport (default carried: the in-process transport the emulator uses; codec: every "
                        "message encoded and decoded, as the old tree always does)")
    return p.parse_args(argv)


def extract(commit: str, into: Path) -> Path:
    """``commit``'s files (git archive), untouched git state; with the adapter written beside them."""
    tree = into / "tree"
    tree.mkdir()
    archive = into / "tree.tar"
    out = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", "-o", str(archive), commit],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"git archive of {commit} failed: {out.stderr.strip()}")
    out = subprocess.run(["tar", "-x", "-f", str(archive), "-C", str(tree)], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"extracting the archive of {commit} failed: {out.stderr.strip()}")
    archive.unlink()
    (into / "then_one_size.py").write_text(ADAPTER, encoding="utf-8")
    return tree


def measure(cmd: list[str], cwd: Path, env: dict[str, str], what: str) -> dict[str, Any]:
    """One run in a fresh subprocess; its last stdout line is the JSON of its measurements."""
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        raise SystemExit(f"the {what} run failed (exit {out.returncode}): {' '.join(cmd)}\n{out.stderr[-3000:]}")
    row: dict[str, Any] = json.loads(lines[-1])
    return row


def median_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median loop CPU (of an even count the slower middle one), with the largest peak RSS."""
    row = sorted(runs, key=lambda r: float(r["cpu_s"]))[len(runs) // 2]
    return {**row, "peak_rss_mb": max(float(r["peak_rss_mb"]) for r in runs)}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    n, duration = args.devices, args.duration
    from benchmarks.emulator_speed import fleet_settings  # (after the flags: it imports torch)

    # The old tree runs the scenario this tree's fleet_scenario builds: one settings dict for both.
    common = [str(n), str(duration), str(args.rate), str(args.seed), json.dumps(fleet_settings(n, duration, args.rate))]
    with tempfile.TemporaryDirectory(prefix="edgeci-then-") as tmp:
        old_tree = extract(args.baseline, Path(tmp))
        old_env = {**os.environ, "PYTHONPATH": str(old_tree)}
        new_env = {**os.environ, "PYTHONPATH": str(ROOT)}
        then_cmd = [sys.executable, str(Path(tmp) / "then_one_size.py"), *common]
        now_cmd = [sys.executable, str(ROOT / "benchmarks" / "emulator_speed.py"), "--one", str(n), "--duration", str(duration),
                   "--rate", str(args.rate), "--seed", str(args.seed), "--transport", args.transport]
        trees = {"then": (then_cmd, old_tree, old_env), "now": (now_cmd, ROOT, new_env)}
        runs: dict[str, list[dict[str, Any]]] = {"then": [], "now": []}
        loads: list[float] = []
        for i in range(args.runs):
            order = ["then", "now"] if i % 2 == 0 else ["now", "then"]
            for which in order:
                cmd, cwd, env = trees[which]
                started = time.perf_counter()
                row = measure(cmd, cwd, env, which)
                runs[which].append(row)
                loads.append(os.getloadavg()[0])
                print(f"run {i + 1}/{args.runs} {which:4s}: {n:,} devices, loop CPU {row['cpu_s']:.2f} s "
                      f"({duration / row['cpu_s']:.0f}× real time), peak RSS {row['peak_rss_mb']:,.0f} MB, "
                      f"{row['events']:,} events, {time.perf_counter() - started:.0f} s in all; "
                      f"load average {loads[-1]:.2f}", file=sys.stderr, flush=True)

    names = {"then": f"then ({args.baseline[:7]}, codec)", "now": f"now (this tree, {args.transport})"}
    print(f"fleet emulator then vs now: {n:,} devices, stub training, {args.rate:g} labels/h per device, {duration:,.0f} "
          f"virtual s, SPIN K=10 π=16 s, seed {args.seed}; {args.runs} run(s) per tree, alternating, one subprocess each")
    print(f"  (rows: the run with the median loop CPU{' (of an even count the slower middle one)' if args.runs % 2 == 0 else ''};"
          f" range over runs in brackets; peak RSS the largest; 1-minute load average after the runs "
          f"{min(loads):.2f}–{max(loads):.2f})")
    print(f"  {'tree':26} {'loop CPU s':>10} {'[range]':>15} {'eval CPU s':>10} {'virtual/CPU':>11} {'µs/event':>9} "
          f"{'µs/label':>9} {'peak RSS MB':>11} {'events':>10} {'labels':>9} {'trainings':>9} {'versions':>8} {'accepted':>9}")
    med = {k: median_row(v) for k, v in runs.items()}
    for which in ("then", "now"):
        r = med[which]
        cpus = [float(x["cpu_s"]) for x in runs[which]]
        print(f"  {names[which]:26} {r['cpu_s']:>10.2f} {f'[{min(cpus):.2f}–{max(cpus):.2f}]':>15} {r['eval_cpu_s']:>10.2f} "
              f"{duration / r['cpu_s']:>10.1f}× {r['cpu_s'] / r['events'] * 1e6:>9.1f} "
              f"{r['cpu_s'] / max(1, r['labels']) * 1e6:>9.1f} {r['peak_rss_mb']:>11,.0f} {r['events']:>10,} "
              f"{r['labels']:>9,} {r['trainings']:>9,} {r['versions']:>8,} {r['updates_accepted']:>9,}")
    then, now = med["then"], med["now"]
    speedup = float(then["cpu_s"]) / float(now["cpu_s"])  # = (virtual/CPU now) / (virtual/CPU then): same duration
    per_label = (float(then["cpu_s"]) / max(1, then["labels"])) / (float(now["cpu_s"]) / max(1, now["labels"]))
    same_work = all(then[k] == now[k] for k in ("labels", "trainings"))
    print(f"  speed-up now/then (virtual s per CPU s): {speedup:.2f}×; cost per label then/now: {per_label:.2f}× "
          f"({'the same labels and trainings in both trees' if same_work else 'the trees drew different work: prefer the per-label ratio'};"
          f" events {then['events']:,} then vs {now['events']:,} now)")
    pairs = sorted(float(a["cpu_s"]) / float(b["cpu_s"]) for a, b in zip(runs["then"], runs["now"], strict=True))
    if len(pairs) > 1:  # the machine's speed drifts: how far the ratio moves between the alternating pairs
        print(f"  speed-up of each pair (run k of then over run k of now): {', '.join(f'{r:.2f}×' for r in pairs)}")
    target = GOAL_SPEED / FILING_SPEED
    verdict = "meets" if speedup >= target else "MISSES"
    if not args.baseline.startswith(DEFAULT_BASELINE) or n != 100_000:
        why = (f"the baseline is not {DEFAULT_BASELINE}, the tree whose speed the issue was filed with"
               if not args.baseline.startswith(DEFAULT_BASELINE) else f"the issue's goals are defined at 100,000 devices, this run has {n:,}")
        print(f"  issue 13's target (≥ {GOAL_SPEED:.0f}× real time, {GOAL_SPEED / FILING_SPEED:.0f}× the filing speed) is not judged: {why}."
              f" On this host: {duration / float(now['cpu_s']):.0f}× now ({duration / float(then['cpu_s']):.0f}× then)")
        return 0
    print(f"  against issue 13: the target ≥ {GOAL_SPEED:.0f}× real time is {target:.0f}× the filing speed ({FILING_SPEED:.0f}× at "
          f"{DEFAULT_BASELINE}); this speed-up {verdict} it: on a host where the old tree runs at {FILING_SPEED:.0f}×, this tree "
          f"would run at about {FILING_SPEED * speedup:.0f}×. On this host: {duration / float(now['cpu_s']):.0f}× now "
          f"({duration / float(then['cpu_s']):.0f}× then); peak RSS {float(now['peak_rss_mb']):,.0f} MB now "
          f"({'meets' if float(now['peak_rss_mb']) <= GOAL_RSS_MB else 'MISSES'} ≤ {GOAL_RSS_MB:,.0f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
