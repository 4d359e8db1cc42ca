"""Milliseconds per local update (SPIN: E epochs over a device's samples), per task.

For the digits and gestures tasks, :meth:`Task.local_update` (cached per-thread module bound
zero-copy to the vector, index-sliced batches) against the baseline, a naive update run in
the same process (build the module, load a state dict, DataLoader, copy the weights back),
on the first ``--samples`` samples of the task's pool; calls interleaved, medians of
``--repeats``; the ratio naive / ours is printed.

    .venv/bin/python benchmarks/local_update_speed.py [--samples 50] [--epochs 2] [--repeats 200]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._cli import positive_int, usage_error


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=positive_int, default=50,
                        help="the device's samples: the first N of each task's pool (default 50)")
    parser.add_argument("--epochs", type=positive_int, default=2, help="local epochs per update (default 2)")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="minibatch size (default 16)")
    parser.add_argument("--repeats", type=positive_int, default=200,
                        help="timed updates of each kind; medians are printed (default 200)")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch intra-op threads (default 1)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    parse_args()  # a bad flag exits 2 here, before torch is imported

from collections.abc import Callable  # noqa: E402
from time import perf_counter  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from edge_sdk.tasks import get_task  # noqa: E402
from edge_sdk.tasks.base import TrainConfig  # noqa: E402
from edge_sdk.torchbridge import module_to_vector  # noqa: E402
from edge_sdk.trainer import ClassifierTask  # noqa: E402


def naive_update(
    task: ClassifierTask, weights: np.ndarray, x: np.ndarray, y: np.ndarray, config: TrainConfig
) -> np.ndarray:
    """What a straightforward implementation does on every call."""
    module = task.build_module()
    state = {
        p.name: torch.from_numpy(task.spec.view(weights, p.name).copy()) for p in task.spec.params
    }
    module.load_state_dict(state)
    loader = DataLoader(
        TensorDataset(torch.from_numpy(x), torch.from_numpy(y)),
        batch_size=config.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(config.seed),
    )
    optimizer = torch.optim.SGD(module.parameters(), lr=config.lr)
    module.train()
    for _ in range(config.epochs):
        for xb, yb in loader:
            optimizer.zero_grad()
            F.cross_entropy(module(xb), yb).backward()  # type: ignore[no-untyped-call]
            optimizer.step()
    return module_to_vector(module, task.spec)


def interleaved_ms(fns: dict[str, Callable[[int], object]], repeats: int) -> dict[str, float]:
    """Median ms per call of each function, calls alternating so that load from other
    processes drifts over all of them alike (the ratio is what is meant to be read)."""
    for i in range(min(10, repeats)):  # warm-up: allocator, caches, lazy init
        for fn in fns.values():
            fn(i)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(repeats):
        for name, fn in fns.items():
            started = perf_counter()
            fn(i)
            samples[name].append(perf_counter() - started)
    return {name: float(np.median(s) * 1e3) for name, s in samples.items()}


def bench_task(task: ClassifierTask, args: argparse.Namespace) -> None:
    name, pool = task.name, task.data().pool
    x, y = pool.x[: args.samples], pool.y[: args.samples]
    weights = task.pretrained(seed=0)

    def config(i: int) -> TrainConfig:
        return TrainConfig(epochs=args.epochs, batch_size=args.batch_size, seed=i)

    ms = interleaved_ms(
        {
            "ours": lambda i: task.local_update(weights, x, y, config(i)),
            "naive": lambda i: naive_update(task, weights, x, y, config(i)),
        },
        args.repeats,
    )
    ours_ms, naive_ms = ms["ours"], ms["naive"]
    print(
        f"{name:9s} ({task.spec.size:6d} params): local_update {ours_ms:6.2f} ms, "
        f"naive {naive_ms:6.2f} ms, naive/ours = {naive_ms / ours_ms:4.2f}x"
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    tasks = [get_task(name, device="cpu") for name in ("digits", "gestures")]
    for task in tasks:  # every pool checked before any measurement
        assert isinstance(task, ClassifierTask)
        if args.samples > len(task.data().pool.y):
            usage_error(f"--samples {args.samples}: the {task.name} pool has only {len(task.data().pool.y)} samples")
    print(
        f"{args.samples} samples x {args.epochs} epochs, batch {args.batch_size}, "
        f"{args.threads} thread(s), median of {args.repeats}"
    )
    for task in tasks:
        assert isinstance(task, ClassifierTask)
        bench_task(task, args)


if __name__ == "__main__":
    main()
