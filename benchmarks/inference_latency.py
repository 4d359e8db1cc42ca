"""onnxruntime vs torch inference latency, and the cost of a version swap, per task.

For the digits and gestures tasks, in one process (compare the ratios):

* inference: :class:`~edge_sdk.inference.InferenceEngine` (onnxruntime) against the baseline,
  torch eager (``no_grad`` on a ready module), for one sample and for a batch of ``--batch``,
  calls interleaved, medians of ``--repeats`` (``--repeats`` / 5 for the batch);
* version swap: patching the new weights into the engine's initializers against the baseline,
  a full torch re-export to ONNX plus a new onnxruntime session, medians of ``--swaps``
  (``--swaps`` / 20 re-exports).

    .venv/bin/python benchmarks/inference_latency.py [--batch 256] [--repeats 500]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._cli import positive_int


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=positive_int, default=256, help="samples in the batch case (default 256)")
    parser.add_argument("--repeats", type=positive_int, default=500,
                        help="timed calls for one sample; the batch case gets a fifth of them, at least 1 (default 500)")
    parser.add_argument("--swaps", type=positive_int, default=60,
                        help="timed swaps by patching; the re-export baseline gets a twentieth, at least 1 (default 60)")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="torch and onnxruntime intra-op threads (default 1)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    parse_args()  # a bad flag exits 2 here, before torch is imported

from collections.abc import Callable  # noqa: E402
from functools import partial  # noqa: E402
from time import perf_counter  # noqa: E402

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from edge_sdk.inference import InferenceEngine, export_onnx  # noqa: E402
from edge_sdk.tasks import get_task  # noqa: E402
from edge_sdk.trainer import ClassifierTask  # noqa: E402


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
        (f"batch {args.batch}", batch, max(1, args.repeats // 5)),
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


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{args.threads} thread(s), medians")
    for name in ("digits", "gestures"):
        bench_task(name, args)


if __name__ == "__main__":
    main()
