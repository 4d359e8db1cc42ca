"""Central training check for the procedural MNIST-size digits: does LeNet-5 land where it
lands on MNIST (~99 % test accuracy)?

Builds (or loads from ``$EDGECI_HOME/data``) the 60,000 + 10,000 set and reports the build
time, the weak deployed model's accuracy (``ProcDigitsTask.pretrained``: 10 samples per
class), and the test accuracy after each epoch of central SGD on the whole training set
(CPU, one thread by default), starting from the same initialisation.

    .venv/bin/python benchmarks/procdigits_central.py [--epochs 4] [--quick] [--mnist DIR]
"""

from __future__ import annotations

import argparse
from time import perf_counter

import numpy as np
import torch

from edge_sdk.tasks.base import TrainConfig
from edge_sdk.tasks.procdigits import ProcDigitsTask
from edge_sdk.tasks.procdigits_data import FULL_SIZE, QUICK_SIZE, cache_path, load
from edge_sdk.trainer import fit

MNIST_LENET5 = (0.988, 0.992)
"""LeNet-5 on MNIST without augmentation (LeCun et al. 1998: 0.95 % error; typical
PyTorch re-implementations 98.8–99.2 % after a few epochs)."""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick", action="store_true", help=f"{QUICK_SIZE[0]:,} + {QUICK_SIZE[1]:,} images"
    )
    parser.add_argument(
        "--mnist", metavar="DIR", help="real MNIST/EMNIST IDX files instead (never downloaded)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    size = QUICK_SIZE if args.quick else FULL_SIZE

    if args.mnist is None:
        started = perf_counter()
        _, built = load(*size, seed=args.seed, workers=2)
        print(
            f"data: {size[0]:,} + {size[1]:,} procedural images "
            f"{'built' if built else 'loaded from cache'} in {perf_counter() - started:.1f} s "
            f"(2 workers) — {cache_path(*size, seed=args.seed)}"
        )
    task = ProcDigitsTask(device="cpu", size=size, seed=args.seed, mnist_dir=args.mnist)
    data = task.data()
    print(
        f"splits: pretrain {len(data.pretrain)}, pool {len(data.pool):,}, test {len(data.test):,}; "
        f"pixel mean {float(data.test.x.mean()):.3f}"
    )

    started = perf_counter()
    deployed = task.pretrained(seed=args.seed)
    print(
        f"deployed model (10 per class): test accuracy {task.evaluate(deployed)['accuracy']:.4f} "
        f"({perf_counter() - started:.1f} s)"
    )

    # Central training on everything the devices could label: pretrain + pool.
    x = np.concatenate([data.pretrain.x, data.pool.x])
    y = np.concatenate([data.pretrain.y, data.pool.y])
    weights = task.initial_weights(seed=args.seed)
    module = task.build_module()
    total = 0.0
    accuracy = 0.0
    for epoch in range(args.epochs):
        lr = args.lr * (0.5 ** max(0, epoch - args.epochs + 2))  # halve for the last epoch
        config = TrainConfig(epochs=1, batch_size=args.batch_size, lr=lr, seed=args.seed + epoch)
        result = fit(module, task.spec, weights, x, y, config, device="cpu", momentum=0.9)
        weights = result.weights
        total += result.seconds
        accuracy = task.evaluate(weights)["accuracy"]
        print(
            f"epoch {epoch + 1}: loss {result.loss:.4f}, test accuracy {accuracy:.4f} "
            f"({result.seconds:.1f} s, lr {lr:g})"
        )
    low, high = MNIST_LENET5
    where = "inside" if low <= accuracy <= high else ("above" if accuracy > high else "below")
    print(
        f"central LeNet-5: {accuracy:.4f} after {args.epochs} epochs, {total:.0f} s training on "
        f"{args.threads} thread(s); MNIST's LeNet-5 range {low:.1%}–{high:.1%}: {where} it"
    )


if __name__ == "__main__":
    main()
