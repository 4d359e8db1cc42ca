"""Central training check for the procedural MNIST-size digits: does LeNet-5 land where it
lands on MNIST (~99 % test accuracy)?

Builds (or loads from ``$EDGECI_HOME/data``) the 60,000 + 10,000 set and reports the build
time, the weak deployed model's accuracy (``ProcDigitsTask.pretrained``: 10 samples per
class), and the test accuracy after each epoch of central SGD on the whole training set
(CPU, one thread by default), starting from the same initialisation. The reference it is
judged against is LeNet-5's published range on real MNIST (98.8-99.2 %, no augmentation).

    .venv/bin/python benchmarks/procdigits_central.py [--epochs 4] [--quick] [--mnist DIR]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (procdigits_data imports numpy, not torch: the --quick help names its sizes)
from benchmarks._cli import existing_dir, non_negative_int, positive_float, positive_int
from edge_sdk.tasks.procdigits_data import FULL_SIZE, QUICK_SIZE, cache_path, load


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=positive_int, default=4,
                        help="epochs of central SGD (momentum 0.9; the last one at half the lr; default 4)")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="minibatch size (default 64)")
    parser.add_argument("--lr", type=positive_float, default=0.05, help="learning rate (default 0.05)")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--seed", type=non_negative_int, default=0,
                        help="seed of the data set, the initialisation and the batches (default 0)")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_SIZE[0]:,} + {QUICK_SIZE[1]:,} images instead of {FULL_SIZE[0]:,} + {FULL_SIZE[1]:,}")
    parser.add_argument("--mnist", metavar="DIR", type=existing_dir,
                        help="a directory of real MNIST/EMNIST IDX files to use instead (never downloaded)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    parse_args()  # a bad flag exits 2 here, before torch is imported

from time import perf_counter  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from edge_sdk.tasks.base import TrainConfig  # noqa: E402
from edge_sdk.tasks.procdigits import ProcDigitsTask  # noqa: E402
from edge_sdk.trainer import fit  # noqa: E402

MNIST_LENET5 = (0.988, 0.992)
"""LeNet-5 on MNIST without augmentation (LeCun et al. 1998: 0.95 % error; typical
PyTorch re-implementations 98.8–99.2 % after a few epochs)."""


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
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
