"""Crash-test writer: add samples to a SampleStore forever, acknowledging each on stdout.

Usage: ``python tests/store_crash_writer.py DBPATH``

Sample ``i`` is a pure function of ``i`` (:func:`expected_sample`) and is added with
``timestamp=i``; kinds rotate array, gesture, frame; then meta ``last_i`` is set to ``i``.
Only after both have returned (and so committed), the line ``"<id> <i>"`` is written and
flushed. ``tests/test_store.py`` SIGKILLs this process mid-stream and checks that every
acknowledged sample survived.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_sdk.store import SampleStore

SAMPLE_SHAPE = (1, 8, 8)
GESTURE_SHAPE = (16, 6)
FRAME_SHAPE = (24, 32, 3)
N_CLASSES = 10


def expected_sample(i: int) -> tuple[str, npt.NDArray[Any], int | None, npt.NDArray[np.float32]]:
    """``(kind, data, label, boxes)`` of sample ``i``; label is ``None`` for frames."""
    rng = np.random.default_rng(i)
    label = i % N_CLASSES
    no_boxes = np.zeros((0, 5), dtype=np.float32)
    if i % 3 == 0:
        return "array", rng.standard_normal(SAMPLE_SHAPE).astype(np.float32), label, no_boxes
    if i % 3 == 1:
        return "gesture", rng.standard_normal(GESTURE_SHAPE).astype(np.float32), label, no_boxes
    image = rng.integers(0, 256, FRAME_SHAPE, dtype=np.uint8)
    boxes = np.array([[label, 1, 2, 3 + i % 20, 4 + i % 15]], dtype=np.float32)
    return "frame", image, None, boxes


def open_store(path: str) -> SampleStore:
    return SampleStore.open(
        path,
        sample_shape=SAMPLE_SHAPE,
        gesture_shape=GESTURE_SHAPE,
        n_classes=N_CLASSES,
        quota_bytes=None,
    )


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    with open_store(argv[1]) as store:
        i = 0
        while True:
            kind, data, label, boxes = expected_sample(i)
            if kind == "array":
                assert label is not None
                sid = store.add(data, label, timestamp=float(i))
            elif kind == "gesture":
                assert label is not None
                sid = store.add_gesture(data, label, timestamp=float(i))
            else:
                sid = store.add_frame(data, boxes, timestamp=float(i))
            store.set_meta("last_i", i)
            sys.stdout.write(f"{sid} {i}\n")
            sys.stdout.flush()
            i += 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
