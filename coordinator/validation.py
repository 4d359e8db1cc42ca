"""Scoring candidates for the release gate on an operator's validation set, off the actor.

``edgeci coordinator --validation FILE.npz`` turns the gate on: every committed candidate is
scored against the release by a worker thread and the result goes back to the core as
``CandidateEvaluated``. The worker
never blocks the protocol; when candidates arrive faster than they can be scored it scores
the newest and lets the older ones be superseded (the gate drops them). A release's score
is computed once and cached.

For classifier tasks (those with ``logits``) the worker also hands the gate the *paired*
counts on the same samples (:func:`coordinator.gate.paired_counts`): which samples only the
candidate gets right and which only the release does — the evidence of the gate's paired
bound. The emulator (``devices.simulator``) computes the same statistic with :func:`score`.
Tasks without per-sample correctness (detection: mAP50) give the gate their metric alone,
and it decides by the plain margin rule.

The file (:func:`save_validation` writes it; :func:`load_validation` reads it without pickle —
a validation file must never run code — and checks every array):

* classifiers (array and gesture samples): ``x`` ``(N, *input shape)`` numbers in the task's
  input contract and ``y`` ``(N,)`` integer class labels, ``0 <= y < n_classes``;
* frames with boxes (detection): ``x`` ``(N, H, W, 3)`` uint8 RGB frames; ``boxes`` ``(M, 5)``
  rows ``class_id, x1, y1, x2, y2`` (pixels, ``0 <= x1 < x2 <= W``, ``0 <= y1 < y2 <= H``,
  integer class ids below ``n_classes``), every frame's boxes one frame after another; and
  ``box_counts`` ``(N,)`` integers, frame ``i``'s number of boxes (0 to
  :data:`~edge_sdk.tasks.base.MAX_BOXES`, summing to ``M``): frame ``i`` owns the
  ``box_counts[i]`` rows that follow the first ``box_counts[:i].sum()``.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from coordinator.core import CandidateEvaluated, EvaluateCandidate
from coordinator.gate import Paired, paired_counts
from edge_sdk.errors import ConfigError
from edge_sdk.tasks.base import MAX_BOXES, Split, Task
from edge_sdk.tasks.registry import sample_kind_of, task_info

log = logging.getLogger("edgeci.coordinator")

Scored = tuple[float, "npt.NDArray[np.bool_] | None"]
"""A model's metric on the validation set and, for classifiers, which samples it gets right."""


def score(task: Task, weights: Any, split: Split) -> Scored:
    """``(accuracy, per-sample correctness)`` for tasks with ``logits`` (the same accuracy as
    ``task.evaluate``: argmax of the logits); ``(evaluate()["accuracy"], None)`` otherwise."""
    w = np.asarray(weights, dtype=np.float32)
    logits = getattr(task, "logits", None)
    if callable(logits):
        with np.errstate(over="ignore", invalid="ignore"):  # an attacked model's logits may overflow
            right = np.asarray(logits(w, split.x)).argmax(axis=1) == np.asarray(split.y)
        return float(right.mean()), right
    return float(task.evaluate(w, split)["accuracy"]), None


def compare(candidate: Scored, release: Scored) -> Paired | None:
    """The gate's paired counts, when both models said which samples they got right."""
    if candidate[1] is None or release[1] is None:
        return None
    return paired_counts(candidate[1], release[1])


def _evaluated(job: EvaluateCandidate, candidate: Scored, release: Scored, now: float) -> CandidateEvaluated:
    return CandidateEvaluated(now=now, version=job.version, candidate_metric=candidate[0], release_metric=release[0],
                              release_version=job.release_version, paired=compare(candidate, release))


FORMAT = {
    "array": "an .npz with arrays x (inputs) and y (integer class labels)",
    "frame": "an .npz with arrays x (uint8 RGB frames), boxes (every frame's class_id, x1, y1, x2, y2 rows, frame after "
             "frame) and box_counts (each frame's number of boxes); coordinator.validation.save_validation writes one",
}
"""What ``--validation`` needs, by sample kind (gestures are classifier samples: ``"array"``)."""


def load_validation(path: str | Path, task: Task) -> Split:
    """An operator validation set in the task's format (the module docstring), checked: a
    :class:`ConfigError` naming ``--validation`` and what is wrong, never a pickle loaded."""
    p = Path(path)
    frames = sample_kind_of(task) == "frame"
    need = FORMAT["frame" if frames else "array"]
    names = ("x", "boxes", "box_counts") if frames else ("x", "y")
    try:
        loaded = np.load(p, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise ConfigError(f"--validation {p}: need {need} ({exc})") from exc
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ConfigError(f"--validation {p}: need {need}, not a single .npy array")
    with loaded as data:
        missing = [name for name in names if name not in data.files]
        if missing:
            hint = ""
            if frames and "y" in data.files:
                try:
                    y = data["y"]
                except (OSError, ValueError, EOFError):  # an object array: pickle refused
                    hint = (" (its y, one object array of per-frame boxes, could only be read with pickle: write the set "
                            "with coordinator.validation.save_validation)")
                else:  # (helper-182: a classifier's file was said to need pickle)
                    hint = (f" (its y is {y.dtype} {y.shape}: one class label per sample, a classifier's validation set; "
                            "a detector's holds frames with their boxes)")
            raise ConfigError(f"--validation {p}: need {need}; it has no {', '.join(missing)} "
                              f"(arrays: {', '.join(data.files) or 'none'}){hint}")
        try:
            arrays = {name: np.asarray(data[name]) for name in names}
        except (OSError, ValueError, EOFError) as exc:  # an object array (pickle refused), a truncated member
            raise ConfigError(f"--validation {p}: need {need} ({exc})") from exc
    n_classes = int(task.data().n_classes)
    split = _frames(p, arrays, n_classes) if frames else _samples(p, arrays, task, n_classes)
    if len(split) == 0:
        raise ConfigError(f"--validation {p}: holds no samples")
    return split


def _samples(p: Path, arrays: dict[str, npt.NDArray[Any]], task: Task, n_classes: int) -> Split:
    """A classifier's ``x`` and ``y``, checked against the task's input shape and classes."""
    x, y = arrays["x"], arrays["y"]
    if x.dtype.kind not in "iuf" or y.dtype.kind not in "iuf":
        raise ConfigError(f"--validation {p}: x and y must be numeric arrays, got {x.dtype} and {y.dtype}")
    expected = tuple(task.data().test.x.shape[1:])
    if x.ndim != len(expected) + 1 or tuple(x.shape[1:]) != expected or y.ndim != 1 or len(x) != len(y):
        raise ConfigError(f"--validation {p}: x must be (N, {', '.join(map(str, expected))}) with N labels, got {x.shape} and {y.shape}")
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise ConfigError(f"--validation {p}: x holds NaN or Inf")
    info = task_info(task)
    if info is not None and info.contract is not None and info.contract.value_range is not None and x.size:
        lo, hi = info.contract.value_range  # (helper-95: raw 0-16 pixels would score every candidate wrong)
        if not info.contract.rows_within(x).all():
            hint = f" ({info.contract.hint})" if info.contract.hint else ""
            raise ConfigError(f"--validation {p}: x holds values in [{x.min():g}, {x.max():g}]; the task's inputs lie in "
                              f"[{lo:g}, {hi:g}]{hint}")
    if y.size and not (np.isfinite(y).all() and (y == np.round(y)).all() and y.min() >= 0 and y.max() < n_classes):
        raise ConfigError(f"--validation {p}: y must be integer class labels 0 to {n_classes - 1}")
    return Split(x=x, y=y.astype(np.int64))


def _frames(p: Path, arrays: dict[str, npt.NDArray[Any]], n_classes: int) -> Split:
    """Frames and their flattened boxes, checked, as the task's split: ``y`` an object array
    of each frame's ``(k, 5)`` float32 boxes (built here, never unpickled)."""
    x, boxes, counts = arrays["x"], arrays["boxes"], arrays["box_counts"]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[3] != 3 or x.shape[1] < 1 or x.shape[2] < 1:
        raise ConfigError(f"--validation {p}: x must be (N, H, W, 3) uint8 RGB frames, got {x.dtype} {x.shape}")
    if counts.ndim != 1 or len(counts) != len(x) or (counts.size and counts.dtype.kind not in "iu"):
        raise ConfigError(f"--validation {p}: box_counts must be (N,) integers, one per frame of x ({len(x)}), "
                          f"got {counts.dtype} {counts.shape}")
    if counts.size and (counts.min() < 0 or counts.max() > MAX_BOXES):
        raise ConfigError(f"--validation {p}: box_counts must be 0 to {MAX_BOXES} boxes a frame")
    total = int(counts.sum(dtype=np.int64))
    if len(x) and total == 0:  # (helper-182: every candidate was promoted, 0.0 not being worse than 0.0)
        raise ConfigError(f"--validation {p}: its {len(x)} frames hold no boxes: mAP50 is taken over the classes "
                          "boxed there, so every model would score 0 and the gate could not tell a candidate from the "
                          "release; box the objects in them")
    if boxes.ndim != 2 or boxes.shape[1] != 5 or (boxes.size and boxes.dtype.kind not in "iuf") or len(boxes) != total:
        raise ConfigError(f"--validation {p}: boxes must be (M, 5) numbers (class_id, x1, y1, x2, y2) with M = "
                          f"box_counts' sum ({total}), got {boxes.dtype} {boxes.shape}")
    boxes = boxes.astype(np.float32, copy=False)
    if not np.isfinite(boxes).all():
        raise ConfigError(f"--validation {p}: boxes hold NaN or Inf")
    cls, x1, y1, x2, y2 = boxes.T
    if ((cls != np.round(cls)) | (cls < 0) | (cls >= n_classes)).any():
        raise ConfigError(f"--validation {p}: box class ids must be integers 0 to {n_classes - 1}")
    height, width = x.shape[1], x.shape[2]
    bad = np.flatnonzero((x1 < 0) | (y1 < 0) | (x2 <= x1) | (y2 <= y1) | (x2 > width) | (y2 > height))
    if bad.size:  # name the frame: its row's place among the frames' runs of rows
        frame = int(np.searchsorted(np.cumsum(counts), bad[0], side="right"))
        raise ConfigError(f"--validation {p}: frame {frame} has an empty box or one outside its {width}x{height} pixels "
                          "(need 0 <= x1 < x2 <= W and 0 <= y1 < y2 <= H)")
    small = np.flatnonzero((x2.astype(np.float64) - x1 < 1) | (y2.astype(np.float64) - y1 < 1))
    if small.size:  # (helper-182: evaluation drops such boxes; normalised corners left no object to score)
        i = int(small[0])
        frame = int(np.searchsorted(np.cumsum(counts), i, side="right"))
        raise ConfigError(f"--validation {p}: frame {frame} has a box under one pixel ({x2[i] - x1[i]:.3g}x{y2[i] - y1[i]:.3g}): "
                          "boxes are in the frame's pixels, not normalised to [0, 1]")
    y = np.empty(len(x), dtype=object)
    for i, frame_boxes in enumerate(np.split(boxes, np.cumsum(counts)[:-1]) if len(x) else []):
        y[i] = frame_boxes
    return Split(x=x, y=y)


def fingerprint(split: Split) -> str:
    """A hash of the validation samples as loaded (inputs and labels or boxes, with their
    shapes and dtypes): scores are comparable across restarts only on the same fingerprint
    (the gate's best-release floor, ``GateConfig.validation_set``)."""
    digest = hashlib.sha256()
    y = np.asarray(split.y)
    labels = [np.asarray(b, dtype=np.float32).reshape(-1, 5) for b in y] if y.dtype == object else [y]
    for part in (np.asarray(split.x), *labels):
        part = np.ascontiguousarray(part)
        digest.update(f"{part.dtype.str}{part.shape};".encode())
        digest.update(part.tobytes())
    return "sha256:" + digest.hexdigest()


def save_validation(path: str | Path, split: Split) -> None:
    """Write ``split`` in :func:`load_validation`'s format, without pickle: class labels as
    ``y``; a frames split (``y`` an object array of ``(k, 5)`` boxes) as ``boxes`` and
    ``box_counts``."""
    y = np.asarray(split.y)
    if y.dtype != object:
        np.savez(Path(path), x=split.x, y=y, allow_pickle=False)
        return
    per_frame = [np.asarray(b, dtype=np.float32) for b in y]
    for i, b in enumerate(per_frame):
        if b.size and (b.ndim != 2 or b.shape[1] != 5):
            raise ConfigError(f"frame {i}'s boxes must be (k, 5) rows of class_id, x1, y1, x2, y2, got {b.shape}")
    boxes = np.concatenate([b.reshape(-1, 5) for b in per_frame]) if per_frame else np.zeros((0, 5), np.float32)
    counts = np.array([len(b.reshape(-1, 5)) for b in per_frame], dtype=np.int64)
    np.savez(Path(path), x=np.asarray(split.x), boxes=boxes, box_counts=counts, allow_pickle=False)


class Validator:
    """One worker thread: ``submit(EvaluateCandidate)`` → later ``deliver(CandidateEvaluated)``."""

    def __init__(self, task: Task, split: Split, deliver: Callable[[Callable[[float], Any]], None]) -> None:
        self.task, self.split, self._deliver = task, split, deliver
        self._queue: queue.Queue[EvaluateCandidate | None] = queue.Queue()
        self._release_score: tuple[int, Scored] | None = None
        self._thread = threading.Thread(target=self._run, name="gate-validator", daemon=True)
        self.scored = 0

    def start(self) -> Validator:
        self._thread.start()
        return self

    def submit(self, action: EvaluateCandidate) -> None:
        self._queue.put(action)

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(30)

    def score(self, weights: Any) -> Scored:
        return score(self.task, weights, self.split)

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            while True:  # newest first: older candidates are superseded
                try:
                    newer = self._queue.get_nowait()
                except queue.Empty:
                    break
                if newer is None:
                    self._queue.put(None)
                    break
                job = newer
            try:
                if self._release_score is None or self._release_score[0] != job.release_version:
                    self._release_score = (job.release_version, self.score(job.release_weights))
                candidate = self.score(job.weights)
            except Exception:  # a scoring bug must not kill the gate: log it and skip the candidate
                log.exception("validation of candidate %d failed", job.version)
                continue
            self.scored += 1
            release = self._release_score[1]
            log.info("candidate %d scores %.4f on validation (release %d: %.4f; paired %s)", job.version, candidate[0],
                     job.release_version, release[0], compare(candidate, release))
            self._deliver(partial(_evaluated, job, candidate, release))
