"""Scoring candidates for the release gate on an operator's validation set, off the actor.

``edgeci coordinator --validation FILE.npz`` (arrays ``x`` and ``y``, in the task's input
contract) turns the gate on: every committed candidate is scored against the release by a
worker thread and the result goes back to the core as ``CandidateEvaluated``. The worker
never blocks the protocol; when candidates arrive faster than they can be scored it scores
the newest and lets the older ones be superseded (the gate drops them). A release's score
is computed once and cached.
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

from coordinator.core import CandidateEvaluated, EvaluateCandidate
from edge_sdk.errors import ConfigError
from edge_sdk.tasks.base import Split, Task

log = logging.getLogger("edgeci.coordinator")


def _evaluated(job: EvaluateCandidate, candidate: float, release: float, now: float) -> CandidateEvaluated:
    return CandidateEvaluated(now=now, version=job.version, candidate_metric=candidate, release_metric=release,
                              release_version=job.release_version)


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
        self._release_score: tuple[int, float] | None = None
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

    def score(self, weights: Any) -> float:
        return float(self.task.evaluate(np.asarray(weights, dtype=np.float32), self.split)["accuracy"])

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
            log.info("candidate %d scores %.4f on validation (release %d: %.4f)", job.version, candidate,
                     job.release_version, release)
            self._deliver(partial(_evaluated, job, candidate, release))
