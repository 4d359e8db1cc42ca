"""What converting one stale update by gradient inversion costs (paper 001, issue 15).

For each task of ``--tasks`` (``digits``: the 8×8 digits CNN; ``procdigits``: LeNet-5 on
28×28 procedural digits, its quick 2,000-image set; also ``gestures``), one device with
``--samples`` real samples trains LocalUpdate′ (5 full-batch SGD steps, lr 0.01, momentum
0.5) from the model of version 0; the coordinator converts it to the model of version 1,
then the device's next update (from version 1) to version 2. Printed per task:

* iterations/s and seconds per conversion under an iteration budget (``--iterations``),
  1 torch thread, as a multiple of one plain local update (the baseline, same run);
* L1 disparity after the same budget for the second update: warm (from the device's kept
  D_rec) against cold (a fresh inverter), and the empty-set disparity ``‖Δ_stale‖₁``;
* iterations reached under the default 10 s wall-time budget (full run only);
* the direction of the warm-converted second update against the true fresh one (cosine),
  beside the stale update's change re-applied and the stale model aggregated as it is.

``--quick`` is 32 samples, 20 iterations and no 10 s run; an explicit ``--samples`` or
``--iterations`` wins over it. Progress goes to stderr (the full run takes minutes).

    .venv/bin/python benchmarks/inversion_cost.py [--quick] [--samples 100] [--iterations 100]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._cli import comma_list, one_of, positive_int, usage_error

QUICK = {"samples": 32, "iterations": 20}
FULL = {"samples": 100, "iterations": 100}
TASKS = ("digits", "gestures", "procdigits")
"""The classifier tasks (procdigits: its quick 2,000-image set)."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK['samples']} samples, {QUICK['iterations']} iterations, no 10 s run "
                             "(an explicit --samples or --iterations wins)")
    parser.add_argument("--samples", type=positive_int, default=None,
                        help=f"the device's real samples (|D_rec| = half; default {FULL['samples']})")
    parser.add_argument("--iterations", type=positive_int, default=None,
                        help=f"inversion iterations per conversion (default {FULL['iterations']})")
    parser.add_argument("--tasks", type=comma_list(one_of(*TASKS)), default="digits,procdigits",
                        help=f"comma-separated tasks, of {', '.join(TASKS)} (default digits,procdigits)")
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    args.samples = defaults["samples"] if args.samples is None else args.samples
    args.iterations = defaults["iterations"] if args.iterations is None else args.iterations
    return args


if __name__ == "__main__":
    parse_args()  # a bad flag exits 2 here, before torch is imported

from dataclasses import dataclass  # noqa: E402
from time import perf_counter  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from coordinator.core import ConvertUpdate  # noqa: E402
from coordinator.inversion import GradientInverter, InversionConfig  # noqa: E402
from edge_sdk.tasks import get_task  # noqa: E402
from edge_sdk.tasks.base import TrainConfig  # noqa: E402
from edge_sdk.trainer import ClassifierTask, fit  # noqa: E402

STARTED = perf_counter()


def progress(message: str) -> None:
    """A progress line on stderr (the tables on stdout stay clean)."""
    print(f"[{perf_counter() - STARTED:6.1f} s] {message}", file=sys.stderr, flush=True)

HINTS = {"epochs": 5.0, "lr": 0.01}


@dataclass
class Row:
    task: str
    params: int
    rec: int
    it_s: float
    conv_s: float
    update_ms: float
    cold_l1: float
    warm_l1: float
    zero_l1: float
    budget_its: int | None
    cos_warm: float
    cos_stale_delta: float
    cos_stale_model: float


def make_task(name: str) -> ClassifierTask:
    kwargs: dict[str, Any] = {}
    if name == "procdigits":
        from edge_sdk.tasks.procdigits_data import QUICK_SIZE

        kwargs = {"size": QUICK_SIZE, "workers": 1}
    task = get_task(name, **kwargs)
    assert isinstance(task, ClassifierTask)
    return task


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def request(ticket: int, stale: np.ndarray, base: np.ndarray, target: np.ndarray, n: int) -> ConvertUpdate:
    return ConvertUpdate(
        ticket=ticket, device="bench-device", kind="gradient-inversion", stale_weights=stale, base_version=ticket - 1,
        base_weights=base, target_version=ticket, target_weights=target, n_samples=n, staleness=1, hints=HINTS,
        deadline=0.0,
    )


def measure(name: str, n: int, iterations: int, *, budget_run: bool) -> Row:
    progress(f"{name}: loading the task and its data")
    task = make_task(name)
    pool = task.data().pool
    if len(pool.y) < n + 900:  # the device's n samples, then 3 × 300 that move the model between versions
        usage_error(f"--samples {n}: the {name} pool has {len(pool.y)} samples, this needs --samples + 900")
    x, y = pool.x[:n], pool.y[:n]
    module = task.build_module()
    recipe = TrainConfig(epochs=5, batch_size=n, lr=0.01, seed=1)
    moved = TrainConfig(epochs=1, batch_size=16, lr=0.05, seed=2)

    def local(w: np.ndarray) -> np.ndarray:
        return fit(module, task.spec, w, x, y, recipe, momentum=0.5).weights

    progress(f"{name}: training the models of versions 0-2 and the device's stale updates")
    v0 = task.initial_weights(seed=0)
    v0 = fit(module, task.spec, v0, pool.x[n : n + 300], pool.y[n : n + 300], moved).weights
    v1 = fit(module, task.spec, v0, pool.x[n + 300 : n + 600], pool.y[n + 300 : n + 600], moved).weights
    v2 = fit(module, task.spec, v1, pool.x[n + 600 : n + 900], pool.y[n + 600 : n + 900], moved).weights
    first, second = request(1, local(v0), v0, v1, n), request(2, local(v1), v1, v2, n)

    torch.set_num_threads(1)
    progress(f"{name}: timing one plain local update (the baseline)")
    local(v0)  # warm-up
    started = perf_counter()
    repeats = 5
    for _ in range(repeats):
        local(v0)
    update_ms = 1000 * (perf_counter() - started) / repeats

    config = InversionConfig(iterations=iterations, time_budget_s=1e6)
    inverter = GradientInverter(task, task.spec, config)
    progress(f"{name}: converting the first update ({iterations} iterations, cold)")
    cold_first = inverter.convert(first)
    progress(f"{name}: converting the second update, warm then cold")
    warm = inverter.convert(second)
    cold = GradientInverter(task, task.spec, config).convert(second)
    assert warm.warm and not cold.warm and not cold_first.warm
    assert warm.weights is not None
    fresh_change = local(v2) - v2  # what the device would have sent from version 2
    budget_its = None
    if budget_run:
        progress(f"{name}: converting under the default 10 s wall-time budget")
        budget_its = GradientInverter(task, task.spec, InversionConfig()).convert(first).iterations
    return Row(
        task=f"{name} ({task.model_id})",
        params=task.spec.size,
        rec=max(1, min(config.max_samples, round(config.samples_fraction * n))),
        it_s=cold_first.iterations / cold_first.elapsed_s,
        conv_s=cold_first.elapsed_s,
        update_ms=update_ms,
        cold_l1=cold.l1_after,
        warm_l1=warm.l1_after,
        zero_l1=float(np.abs(second.stale_weights - second.base_weights).sum()),
        budget_its=budget_its,
        cos_warm=cosine(warm.weights - v2, fresh_change),
        cos_stale_delta=cosine(second.stale_weights - v1, fresh_change),
        cos_stale_model=cosine(second.stale_weights - v2, fresh_change),
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    n, iterations = args.samples, args.iterations
    rows = [measure(name, n, iterations, budget_run=not args.quick) for name in args.tasks]
    progress("done")
    print(f"\n{n} device samples, |D_rec| = {rows[0].rec}, E = 5, {iterations} iterations, 1 torch thread\n")
    print("| task | params | it/s | s / conversion | × one local update | L1 empty set | L1 cold | L1 warm "
          "| warm / cold | its in 10 s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        its = "-" if r.budget_its is None else str(r.budget_its)
        print(f"| {r.task} | {r.params:,} | {r.it_s:.1f} | {r.conv_s:.2f} | {1000 * r.conv_s / r.update_ms:,.0f} "
              f"({r.update_ms:.1f} ms) | {r.zero_l1:.3f} | {r.cold_l1:.3f} | {r.warm_l1:.3f} | "
              f"{r.warm_l1 / r.cold_l1:.2f} | {its} |")
    print("\nDirection of the second update (cosine to the true fresh change LocalUpdate′(v2; D) − v2):\n")
    print("| task | converted (warm) | stale delta re-applied | stale model aggregated |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r.task} | {r.cos_warm:.3f} | {r.cos_stale_delta:.3f} | {r.cos_stale_model:.3f} |")


if __name__ == "__main__":
    main()
