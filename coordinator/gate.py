"""The release gate: a candidate version becomes the release only if it is not worse.

Like CI, the coordinator keeps two lines. SPIN aggregates into the *training line* (what
training pulls get); devices predict with the *release*. Every committed training version
is a *candidate*. With a gate configured, a candidate is promoted only on evidence that it
is not worse than the release by more than ``margin``:

* **validation** — the driver scores candidate and release on an operator-provided
  validation set (``--validation PATH``) and reports both metrics (``CandidateEvaluated``).

A candidate must also come within ``margin`` of the best release score seen so far (reset by
an operator's rollback or pin), so that releases cannot ratchet down one margin at a time.
A candidate that shows a clear regression (worse than the release by more than
``rollback_margin``) is *rejected*: the coordinator rolls the training line back to the
release (as a new version number) and drops the candidates built on the bad one. One in
between is *held*: not released, but the training line goes on — on a small validation
set a slightly worse score is mostly noise, and rolling back on noise would throw away the
fleet's progress. Candidates superseded before any evidence arrived are simply skipped. This module
holds the decision rule and the evidence only: pure, no IO, no clock.

Federated evaluation by a canary cohort of devices (test-then-train on their new labels) is
the planned second evidence source; it is not implemented yet.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from edge_sdk.errors import ConfigError

Decision = Literal["promote", "hold", "reject"]


@dataclass(frozen=True, slots=True, kw_only=True)
class GateConfig:
    margin: float = 0.02
    """Promote when candidate ≥ release − margin (metrics in [0, 1], e.g. accuracy)."""
    rollback_margin: float = 0.10
    """Reject and roll back when candidate < release − rollback_margin; hold in between."""
    validation: bool = True
    """Require a validation score from the driver for every candidate."""
    max_pending: int = 32
    """Candidates waiting for evidence at once; older ones are dropped as superseded."""

    def __post_init__(self) -> None:
        if not 0 <= self.margin < 1 or not self.margin <= self.rollback_margin < 1:
            raise ConfigError("need 0 <= margin <= rollback_margin < 1")
        if not self.validation:
            raise ConfigError("the gate needs an evidence source: validation (canary evaluation is not implemented yet)")
        if self.max_pending < 1:
            raise ConfigError("max_pending must be >= 1")


@dataclass(slots=True)
class Evidence:
    version: int
    release: int
    devices: tuple[str, ...] = ()
    candidate_metric: float | None = None
    release_metric: float | None = None


@dataclass(slots=True)
class Gate:
    """Evidence per candidate and the decision rule. The core owns the release itself."""

    config: GateConfig
    pending: dict[int, Evidence] = field(default_factory=dict)
    best: float | None = None
    """The best validation score of any release so far: a candidate must also come within
    ``margin`` of it, so releases cannot ratchet down one margin at a time."""

    def add_candidate(self, version: int, release: int, devices: tuple[str, ...]) -> list[int]:
        """Register a candidate; returns versions dropped because too many were pending."""
        self.pending[version] = Evidence(version=version, release=release, devices=devices)
        dropped = []
        while len(self.pending) > self.config.max_pending:
            oldest = min(self.pending)
            del self.pending[oldest]
            dropped.append(oldest)
        return dropped

    def record_validation(self, version: int, candidate: float, release: float) -> Decision | None:
        ev = self.pending.get(version)
        if ev is None:
            return None  # superseded or already decided
        ev.candidate_metric, ev.release_metric = float(candidate), float(release)
        return self.decide(version)

    def decide(self, version: int) -> Decision | None:
        ev = self.pending.get(version)
        if ev is None or ev.candidate_metric is None or ev.release_metric is None:
            return None
        bar = max(ev.release_metric, self.best if self.best is not None else ev.release_metric)
        if ev.candidate_metric >= bar - self.config.margin:
            return "promote"
        return "hold" if ev.candidate_metric >= ev.release_metric - self.config.rollback_margin else "reject"

    def take(self, version: int) -> Evidence | None:
        ev = self.pending.pop(version, None)
        if ev is not None and ev.release_metric is not None:  # the release as scored: a floor for later ones
            self.best = max(self.best if self.best is not None else ev.release_metric, ev.release_metric)
        return ev

    def promoted(self, score: float) -> None:
        """A candidate with this validation score became the release."""
        self.best = score if self.best is None else max(self.best, score)

    def drop_above(self, version: int) -> list[int]:
        """Forget every candidate newer than ``version`` (after a rollback): returns them."""
        gone = sorted(v for v in self.pending if v > version)
        for v in gone:
            del self.pending[v]
        return gone
