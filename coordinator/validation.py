"""Scoring candidates for the release gate on an operator's validation set, off the actor.

``edgeci coordinator --validation FILE.npz`` (arrays ``x`` and ``y``, in the task's input
contract) turns the gate on: every committed candidate is scored against the release by a
worker thread and the result goes back to the core as ``CandidateEvaluated``. The worker
never blocks the protocol; when candidates arrive faster than they can be scored it scores
the newest and lets the older ones be superseded (the gate drops them). A release's score
is computed once and cached.

For classifier tasks (those with ``logits``) the worker also hands the gate the *paired*
counts on the same samples (:func:`coordinator.gate.paired_counts`): which samples only the
candidate gets right and which only the release does — the evidence of the gate's paired
bound. The emulator (``devices.simulator``) computes the same statistic with :func:`score`.
"""

from __future__ import annotations

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
from edge_sdk.tasks.base import Split, Task

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


def load_validation(path: str | Path, task: Task) -> Split:
    """An operator validation set: ``.npz`` with ``x`` (inputs) and ``y`` (integer labels)."""
    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as data:
            x, y = np.asarray(data["x"], dtype=np.float32), np.asarray(data["y"], dtype=np.int64)
    except (OSError, KeyError, ValueError) as exc:
        raise ConfigError(f"--validation {p}: need an .npz with arrays x and y ({exc})") from exc
    expected = tuple(task.data().test.x.shape[1:])
    if x.ndim != len(expected) + 1 or tuple(x.shape[1:]) != expected or len(x) != len(y) or len(x) == 0:
        raise ConfigError(f"--validation {p}: x must be (N, {', '.join(map(str, expected))}) with N labels, got {x.shape} and {y.shape}")
    if not np.isfinite(x).all():
        raise ConfigError(f"--validation {p}: x holds NaN or Inf")
    return Split(x=x, y=y)


def save_validation(path: str | Path, split: Split) -> None:
    np.savez(Path(path), x=split.x, y=split.y)


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
