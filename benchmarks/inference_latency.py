"""onnxruntime vs torch inference latency, and the cost of a version swap, per task.

All numbers come from one process, so compare the ratios: torch eager (``no_grad`` on a
ready module) against :class:`~edge_sdk.inference.InferenceEngine` for one sample and for
a batch, and a swap by patching initializers against a full torch re-export.

    .venv/bin/python benchmarks/inference_latency.py [--batch 256] [--repeats 500]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import partial
from time import perf_counter

import numpy as np
import onnxruntime as ort
import torch

from edge_sdk.inference import InferenceEngine, export_onnx
from edge_sdk.tasks import get_task
from edge_sdk.trainer import ClassifierTask


def time_ms(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(min(20, repeats)):
        fn()
    samples = []
    for _ in range(repeats):
        started = perf_counter()
        fn()
        samples.append(perf_counter() - started)
    return float(np.median(samples) * 1e3)


def interleaved_ms(
    a: Callable[[], object], b: Callable[[], object], repeats: int
) -> tuple[float, float]:
    """Median ms per call of ``a`` and ``b``, calls alternating so that load from other
    processes drifts over both alike (the ratio is what is meant to be read)."""
    for _ in range(min(20, repeats)):
        a()
        b()
    samples_a, samples_b = [], []
    for _ in range(repeats):
        started = perf_counter()
        a()
        samples_a.append(perf_counter() - started)
        started = perf_counter()
        b()
        samples_b.append(perf_counter() - started)
    return float(np.median(samples_a) * 1e3), float(np.median(samples_b) * 1e3)


def bench_task(name: str, args: argparse.Namespace) -> None:
    task = get_task(name, device="cpu")
    assert isinstance(task, ClassifierTask)
    weights = task.pretrained(seed=0)
    x = task.data().test.x
    batch = np.ascontiguousarray(np.resize(x, (args.batch, *x.shape[1:])))
    one = batch[:1]
    module = task.module_for(weights)
    engine = InferenceEngine(task, weights, threads=args.threads)

    def torch_run(inputs: np.ndarray) -> object:
        with torch.no_grad():
            return module(torch.from_numpy(inputs)).numpy()

    print(f"{name} ({task.spec.size} params)")
    for label, inputs, repeats in (
        ("1 sample", one, args.repeats),
        (f"batch {args.batch}", batch, args.repeats // 5),
    ):
        t_ms, o_ms = interleaved_ms(
            partial(torch_run, inputs), partial(engine.predict, inputs), repeats
        )
        print(
            f"  {label:10s}: torch {t_ms:8.3f} ms, onnxruntime {o_ms:8.3f} ms, torch/ort = {t_ms / o_ms:5.2f}x"
        )

    version = iter(range(1, 1_000_000))
    swap_ms = time_ms(lambda: engine.swap(next(version), weights), args.swaps)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads

    def reexport() -> object:
        proto = export_onnx(task, weights).SerializeToString()
        return ort.InferenceSession(proto, options, providers=["CPUExecutionProvider"])

    export_ms = time_ms(reexport, max(1, args.swaps // 20))
    print(
        f"  swap      : patch {swap_ms:8.3f} ms, torch re-export {export_ms:8.1f} ms, "
        f"re-export/patch = {export_ms / swap_ms:6.0f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=500)
    parser.add_argument("--swaps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.threads} thread(s), medians")
    for name in ("digits", "gestures"):
        bench_task(name, args)


if __name__ == "__main__":
    main()
