"""Aggregation of K = 10 ResNet-18-sized updates: fold on arrival vs today's path vs Flower.

    .venv/bin/python benchmarks/aggregation.py [--reps 5] [--k 10]

The new path (SPIN's fold on arrival) is measured against three baselines: today's path
(``fedavg`` at the trigger), Flower's ``aggregate`` and the floor (one ``np.dot``).
Times (medians of ``--reps``, all in this run, on the same data; disk excluded):

(a) new: the K-th update's arrival (``SpinStrategy.on_update``: assessment + fold) plus the
    trigger (``aggregate``) to the new vector; defaults (clipping and sample cap on, windows
    warm) and with the defences off;
(b) today's path: ``coordinator.strategies.aggregate.fedavg`` (the pre-fold
    ``weighted_average``, kept as the reference) over the buffer at the trigger;
(c) Flower's ``aggregate`` over per-layer ndarrays (the list-of-layers representation,
    ResNet-18's 62 parameter tensors), re-implemented here after reading
    ``src/py/flwr/server/strategy/aggregate.py`` at adap/flower commit 00cd859a (Flower 1.x:
    ``layer * num_examples`` per layer and client, ``reduce(np.add, ...)`` per layer, ``/ total``);
    its result is a list of layers (no final concatenation is charged to it);
(d) the floor: ``np.dot(p, M)`` over the (K, N) float32 matrix already in memory.

Latency view (the target): (a) is what stands between the K-th update's arrival and the
committed vector (the first K-1 folds happened earlier, as their updates arrived), while
(b), (c) and (d) do all their work at the trigger. Total-work view: the CPU time (process
time) of all K arrivals (assessment + fold) plus the trigger for (a), against the CPU time of
(c) and (d), so a reader sees what the fold costs in all, not only after the K-th arrival.

Also: median / trimmed-mean (K-th row store + trigger) against Flower's ``aggregate_median``
(``np.median`` per layer) and the float32 vs float64 fold pass behind the accumulator choice.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from functools import reduce
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._cli import positive_int
from coordinator.strategies.aggregate import fedavg
from coordinator.strategies.base import BufferedUpdate, StaticView
from coordinator.strategies.spin import SpinConfig, SpinStrategy
from edge_sdk.spec import ModelSpec, Vector


def resnet18_shapes() -> list[tuple[int, ...]]:
    """torchvision ResNet-18's parameter tensors (conv, BN weight/bias, fc): 11,689,512 floats."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    cin = 64
    for cout in (64, 128, 256, 512):
        for block in range(2):
            stride_in = cin if block == 0 else cout
            shapes += [(cout, stride_in, 3, 3), (cout,), (cout,), (cout, cout, 3, 3), (cout,), (cout,)]
            if block == 0 and stride_in != cout:
                shapes += [(cout, stride_in, 1, 1), (cout,), (cout,)]
        cin = cout
    shapes += [(1000, 512), (1000,)]
    return shapes


SHAPES = resnet18_shapes()
N = sum(int(np.prod(s)) for s in SHAPES)
assert N == 11_689_512, N
SPEC = ModelSpec.build("resnet18", [("flat", (N,), "extractor")])


def flower_aggregate(results: list[tuple[list[np.ndarray], int]]) -> list[np.ndarray]:
    """Flower 1.x ``aggregate``: weighted by num_examples, per layer."""
    total = sum(n for _, n in results)
    weighted = [[layer * n for layer in weights] for weights, n in results]
    return [reduce(np.add, layers) / total for layers in zip(*weighted, strict=True)]


def flower_median(results: list[tuple[list[np.ndarray], int]]) -> list[np.ndarray]:
    """Flower 1.x ``aggregate_median``: ``np.median`` of each layer over clients."""
    return [np.median(np.asarray(layers), axis=0) for layers in zip(*[w for w, _ in results], strict=True)]


def layers_of(vector: np.ndarray) -> list[np.ndarray]:
    out, offset = [], 0
    for shape in SHAPES:
        size = int(np.prod(shape))
        out.append(vector[offset : offset + size].reshape(shape))
        offset += size
    return out


def median_ms(fn: Callable[[], object], reps: int, setup: Callable[[], object] | None = None,
              clock: Callable[[], float] = time.perf_counter) -> float:
    """Median milliseconds of ``fn`` over ``reps`` runs, on ``clock`` (wall time by default;
    ``time.process_time`` for CPU time)."""
    times = []
    for _ in range(reps):
        if setup is not None:
            setup()
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return statistics.median(times) * 1e3


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=positive_int, default=5, help="timed runs of each path; medians are printed (default 5)")
    ap.add_argument("--k", type=positive_int, default=10,
                    help="updates per aggregation, each a ResNet-18-sized vector (47 MB; default 10)")
    args = ap.parse_args(argv)
    k, reps = args.k, args.reps
    rng = np.random.default_rng(0)
    current = rng.standard_normal(N, dtype=np.float32)
    matrix = np.empty((k, N), dtype=np.float32)  # the K updates, one row each (also the dot floor's input)
    for i in range(k):
        np.add(current, rng.standard_normal(N, dtype=np.float32) * np.float32(0.01), out=matrix[i])
    n_samples = [int(x) for x in rng.integers(20, 200, size=k)]
    updates = [
        BufferedUpdate(device=f"d{i}", seq=1, base_version=5, staleness=0, n_samples=n_samples[i], weights=matrix[i])
        for i in range(k)
    ]
    view = StaticView(spec=SPEC, version=5, weights=current)
    print(f"K = {k} updates of N = {N:,} float32 ({N * 4 / 1e6:.1f} MB each), medians of {reps}")

    def new_path(total: bool = True, **params: object) -> tuple[float, float, Vector]:
        strategy = SpinStrategy(SpinConfig(k=k, **params))  # type: ignore[arg-type]
        warm = [
            BufferedUpdate(device=f"w{i}", seq=0, base_version=5, staleness=0, n_samples=n_samples[i], weights=matrix[i])
            for i in range(k)
        ]
        for u in warm:  # one earlier round: the norm and claim windows are warm, clipping active
            strategy.on_update(view, u, 0.0)
        strategy.aggregate(view, warm)
        result: list[Vector] = []

        def first_k_minus_1() -> None:
            for u in updates[:-1]:
                strategy.on_update(view, u, 0.0)

        def kth_and_trigger() -> None:
            strategy.on_update(view, updates[-1], 0.0)
            result.append(strategy.aggregate(view, updates))

        def all_k_and_trigger() -> None:
            for u in updates:
                strategy.on_update(view, u, 0.0)
            result.append(strategy.aggregate(view, updates))

        ms = median_ms(kth_and_trigger, reps, setup=first_k_minus_1)
        total_cpu_ms = median_ms(all_k_and_trigger, reps, clock=time.process_time) if total else float("nan")
        assert strategy.robust.rebuilds == 0
        return ms, total_cpu_ms, result[-1]

    new_ms, new_total, new_out = new_path()
    off_ms, off_total, off_out = new_path(clip_multiplier=0.0, sample_weight_cap=0.0)
    old_out: list[Vector] = []
    old_ms = median_ms(lambda: old_out.append(fedavg(current, updates, SPEC)), reps)
    np.testing.assert_allclose(new_out, old_out[-1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(off_out, old_out[-1], rtol=1e-5, atol=1e-5)
    results = [(layers_of(matrix[i]), n_samples[i]) for i in range(k)]
    flower_out: list[list[np.ndarray]] = []
    flower_ms = median_ms(lambda: flower_out.append(flower_aggregate(results)), reps)
    np.testing.assert_allclose(np.concatenate([x.ravel() for x in flower_out[-1]]), old_out[-1], rtol=1e-4, atol=1e-5)
    p = np.asarray(n_samples, dtype=np.float32) / np.float32(sum(n_samples))
    dot_ms = median_ms(lambda: np.dot(p, matrix), reps)
    flower_cpu = median_ms(lambda: flower_aggregate(results), reps, clock=time.process_time)
    dot_cpu = median_ms(lambda: np.dot(p, matrix), reps, clock=time.process_time)

    print("  latency view (wall time): from the K-th update's arrival to the committed vector")
    print(f"(a) new, fold on arrival (K-th on_update + trigger), defaults   {new_ms:8.1f} ms")
    print(f"(a') new, defences off (clip 0, sample cap 0)                   {off_ms:8.1f} ms")
    print(f"(b) today's path: fedavg / weighted_average at the trigger      {old_ms:8.1f} ms")
    print(f"(c) Flower aggregate (62 ResNet-18 layers, num_examples)        {flower_ms:8.1f} ms")
    print(f"(d) floor: np.dot(p, M) over the (K, N) matrix                  {dot_ms:8.1f} ms")
    print(f"    new vs Flower: {flower_ms / new_ms:5.1f}x faster (target >= 5x); defences off: {flower_ms / off_ms:5.1f}x")
    print(f"    new vs today:  {old_ms / new_ms:5.1f}x faster")
    print(f"    new / floor:   {new_ms / dot_ms:5.2f}  (target <= 2); defences off: {off_ms / dot_ms:5.2f}")
    for combiner in ("median", "trimmed-mean"):
        ms, _, out = new_path(False, combiner=combiner, clip_multiplier=0.0, sample_weight_cap=0.0)
        if combiner == "median":
            np.testing.assert_allclose(out[:100_000], np.median(matrix[:, :100_000], axis=0), rtol=1e-6)
        print(f"    {combiner:13s} (K-th row + trigger)                          {ms:8.1f} ms  ({ms / dot_ms:4.1f}x floor)")
    fmed_ms = median_ms(lambda: flower_median(results), max(1, reps // 2))
    print(f"    Flower aggregate_median (np.median per layer)               {fmed_ms:8.1f} ms")

    acc32 = np.zeros(N, dtype=np.float32)
    acc64 = np.zeros(N, dtype=np.float64)
    scratch = np.empty(N, dtype=np.float32)

    def pass32() -> None:
        np.multiply(matrix[0], np.float32(0.3), out=scratch)
        np.add(acc32, scratch, out=acc32)

    def pass64() -> None:
        np.multiply(matrix[0], np.float32(0.3), out=scratch)
        np.add(acc64, scratch, out=acc64)

    print(f"    one fold pass, float32 accumulator {median_ms(pass32, reps):6.1f} ms vs float64 {median_ms(pass64, reps):6.1f} ms")
    print("  total work (CPU time): all K arrivals of the new path are counted here, its first K-1 folds too (the")
    print("  latency view leaves them out: they ran as their updates arrived); (c) and (d) on the same clock")
    rows = [(f"(a) new, all {k} on_update (assessment + fold) + trigger, defaults", new_total),
            (f"(a') new, all {k} on_update + trigger, defences off", off_total),
            ("(c) Flower aggregate", flower_cpu),
            ("(d) floor: np.dot(p, M)", dot_cpu)]
    for label, ms in rows:
        print(f"{label:64s}{ms:8.1f} ms CPU")
    print(f"    total work, new / Flower: {new_total / flower_cpu:5.2f} (Flower / new {flower_cpu / new_total:4.2f}x); "
          f"defences off: {off_total / flower_cpu:5.2f}")
    print(f"    total work, new / floor:  {new_total / dot_cpu:5.2f}; defences off: {off_total / dot_cpu:5.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
