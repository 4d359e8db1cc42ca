"""YOLOv8n on a device: fine-tuning cost, onnxruntime speed, and what fine-tuning buys.

Prints, on this machine's CPU:

1. seconds (CPU and wall) to fine-tune YOLOv8n on 64 labelled frames × 5 epochs at each
   ``--finetune-imgsz`` (SPIN reports 5–6 min for 128 × 5 on an M1 CPU), with the ratio to
   the first size (the baseline; the smallest by default) measured in the same run;
2. onnxruntime frames per second at 320 and 640 px, network alone and end to end
   (letterbox + network + NMS);
3. unless ``--skip-map``: mAP50 of the deployed (pretrained on the known classes)
   detector on the held-out synthetic split, before and after fine-tuning on 64 frames
   of the new class, for a full update and for a head-only (LASP) update.

Everything is written under ``--data-dir`` (the pretrained model is cached there, so only
the first run pretrains). Usage::

    .venv/bin/python benchmarks/detection_finetune.py --threads 2
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._cli import comma_list, non_negative_int, positive_int


def image_size(text: str) -> int:
    """A YOLO input size: a positive multiple of 32 (the network's largest stride)."""
    value = positive_int(text)
    if value % 32:
        raise argparse.ArgumentTypeError(f"must be a multiple of 32, got {text}")
    return int(value)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=None, help="SDK data dir (default: $EDGECI_HOME or ~/.edgeci)")
    parser.add_argument("--threads", type=positive_int, default=2,
                        help="torch and onnxruntime intra-op threads (default 2)")
    parser.add_argument("--finetune-imgsz", type=comma_list(image_size), default="96,320",
                        help="comma-separated fine-tuning sizes, multiples of 32, the first the baseline of the ratios "
                             "(default 96,320; e.g. 96,320,640)")
    parser.add_argument("--onnx-frames", type=positive_int, default=50,
                        help="timed onnxruntime frames per size and mode (default 50)")
    parser.add_argument("--skip-map", action="store_true", help="skip the mAP50 part (3.)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the frames and the training (default 0)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    parse_args()  # a bad flag exits 2 here, before torch is imported

import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from edge_sdk.tasks._ultralytics import default_data_dir  # noqa: E402
from edge_sdk.tasks.base import TrainConfig  # noqa: E402
from edge_sdk.tasks.detection import (  # noqa: E402
    CLASSIFIER,
    DEFAULT_TRAIN,
    DetectionConfig,
    DetectionTask,
    OnnxDetector,
)
from edge_sdk.tasks.scenes import SceneConfig, make_scenes, new_class_config  # noqa: E402

SAMPLES = 64
EPOCHS = 5


def bench_finetune(task: DetectionTask, sizes: list[int], seed: int) -> None:
    print(
        f"== fine-tune YOLOv8n: {SAMPLES} samples x {EPOCHS} epochs, batch {DEFAULT_TRAIN.batch_size}, "
        f"torch threads {torch.get_num_threads()}"
    )
    baseline = None
    for size in sizes:
        sized = DetectionTask(DetectionConfig(imgsz=size, scene_size=size), data_dir=task.data_dir)
        frames = make_scenes(SAMPLES, seed=seed, config=new_class_config(size))
        config = TrainConfig(
            epochs=EPOCHS, batch_size=DEFAULT_TRAIN.batch_size, lr=DEFAULT_TRAIN.lr, seed=seed
        )
        result = sized.local_update(sized.initial_weights(), frames.images, frames.boxes, config)
        cpu = float(result.extra["cpu_seconds"])
        baseline = baseline or cpu
        print(
            f"  imgsz {size:4d}: {cpu:7.1f} CPU s  {result.seconds:7.1f} wall s  "
            f"{SAMPLES * EPOCHS / result.seconds:6.1f} frames/s  x{cpu / baseline:5.1f} vs imgsz {sizes[0]}"
        )


def bench_onnx(
    task: DetectionTask,
    weights: np.ndarray,
    sizes: list[int],
    threads: int,
    frames_per_size: int,
    out_dir: Path,
) -> None:
    print(f"== onnxruntime CPU, batch 1, intra-op threads {threads}")
    for size in sizes:
        path = task.export_onnx(weights, out_dir / f"bench-{size}.onnx", imgsz=size)
        detector = OnnxDetector(path, conf=0.25, threads=threads)
        frames = make_scenes(8, seed=5, config=SceneConfig(size=size)).images
        x = np.ascontiguousarray(frames[0].transpose(2, 0, 1)[None], dtype=np.float32) / 255.0
        for _ in range(3):  # warm-up: first runs allocate
            detector.raw(x)
        started = time.perf_counter()
        for _ in range(frames_per_size):
            detector.raw(x)
        raw_fps = frames_per_size / (time.perf_counter() - started)
        started = time.perf_counter()
        for i in range(frames_per_size):
            detector.detect(frames[i % len(frames)])
        e2e_fps = frames_per_size / (time.perf_counter() - started)
        print(
            f"  {size:4d} px: {raw_fps:6.1f} fps network, {e2e_fps:6.1f} fps with letterbox + NMS"
        )


def bench_map(task: DetectionTask, seed: int) -> np.ndarray:
    c = task.config
    print(
        f"== mAP50 on the held-out synthetic split ({c.test_scenes} frames, {c.scene_size} px, "
        f"imgsz {c.imgsz}); deployed model pretrained on {c.pretrain_scenes} frames x "
        f"{c.pretrain_epochs} epochs of the known classes"
    )
    started = time.perf_counter()
    deployed = task.pretrained(seed=seed)
    print(f"  pretrained (or loaded from cache) in {time.perf_counter() - started:.1f} s")
    pool = task.scenes().pool[:SAMPLES]
    counts = pool.class_counts(c.n_classes)
    print(
        f"  fine-tune set: {SAMPLES} user frames, objects per class {counts.tolist()} "
        f"(new class: {c.class_names[c.new_class]})"
    )
    rows = [("deployed", deployed, 0.0)]
    for label, group in (("full update", "full"), ("head only (LASP)", CLASSIFIER)):
        config = TrainConfig(
            epochs=EPOCHS,
            batch_size=DEFAULT_TRAIN.batch_size,
            lr=DEFAULT_TRAIN.lr,
            seed=seed,
            group=group,
        )
        result = task.local_update(deployed, pool.images, pool.boxes, config)
        rows.append((label, result.weights, result.seconds))
    print(
        f"  {'model':18s} {'mAP50':>6s} {'known':>6s} {'new':>6s} {'P':>6s} {'R':>6s} {'mAP50-95':>8s} {'train s':>8s}"
    )
    for label, weights, seconds in rows:
        m = task.evaluate(weights)
        print(
            f"  {label:18s} {m['mAP50']:6.3f} {m.get('mAP50_known', 0.0):6.3f} {m.get('ap50_new', 0.0):6.3f} "
            f"{m['precision']:6.3f} {m['recall']:6.3f} {m['mAP50_95']:8.3f} {seconds:8.1f}"
        )
    return deployed


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    data_dir = args.data_dir or default_data_dir()
    task = DetectionTask(DetectionConfig(), data_dir=data_dir)
    print(f"data dir: {task.data_dir}")
    bench_finetune(task, args.finetune_imgsz, args.seed)
    weights = task.initial_weights() if args.skip_map else bench_map(task, args.seed)
    with tempfile.TemporaryDirectory(dir=task.data_dir) as tmp:
        bench_onnx(task, weights, [320, 640], args.threads, args.onnx_frames, Path(tmp))


if __name__ == "__main__":
    main()
