"""The release gate: a candidate version becomes the release only if it is not worse.

Like CI, the coordinator keeps two lines. SPIN aggregates into the *training line* (what
training pulls get); devices predict with the *release*. Every committed training version
is a *candidate*. With a gate configured, a candidate is promoted only on evidence that it
is not worse than the release by more than ``margin``:

* **validation** — the driver scores candidate and release on an operator-provided
  validation set (``--validation PATH``) and reports both metrics (``CandidateEvaluated``),
  and — for classifiers — the *paired* counts on the same samples: how many the candidate
  gets right that the release gets wrong (``better``), the reverse (``worse``), and ``n``.

With paired counts the rule is a one-sided bound on the accuracy difference d = (better −
worse) / n, whose standard error sqrt(((better + worse)/n − d²)/n) is small when the two
models mostly agree (an incremental step) and large when they disagree on many samples (a
damaged or very different model): promote when d − z·se ≥ −margin (``paired_z`` = z; not
worse than the margin, with that confidence), reject when d + z·se < −rollback_margin
(worse than the rollback margin, with that confidence), hold in between. Without paired
counts (a task that cannot say which samples it got right) the point estimate is used,
which is the same rule with z = 0.

A candidate must also come within ``margin`` of the best release score seen so far (reset by
an operator's rollback or pin), so that releases cannot ratchet down one margin at a time.
That floor is durable (:meth:`Gate.floor`, kept in the release record) together with the
fingerprint of the validation set it was scored on (``GateConfig.validation_set``): a restart
restores it only on the same set (:meth:`Gate.restore_floor`), else starts without one — a
score on other samples is no floor. A canary-only gate has no floor: each round scores on
different devices' new labels, so its accuracies are not comparable from round to round.
A candidate that shows a clear regression (worse than the release by more than
``rollback_margin``) is *rejected*: the coordinator rolls the training line back to the
release (as a new version number), drops the candidates built on the bad one, and from then
on refuses updates trained from any of them (``base_rejected``; the core keeps those versions,
see :mod:`coordinator.core`). One in
between is *held*: not released, but the training line goes on — on a small validation
set a slightly worse score is mostly noise, and rolling back on noise would throw away the
fleet's progress. Candidates superseded before any evidence arrived are simply skipped. This module
holds the decision rule and the evidence only: pure, no IO, no clock.

* **canary** (``GateConfig.canary``, see :mod:`coordinator.canary`) — a cohort of devices
  scores candidate and release on their next new labels before training on them
  (test-then-train) and reports the four paired counts per device (``record_canary``).

With both sources the paired counts are pooled. Canary evidence decides once at least
``min_reports`` devices reported (or, at the round's deadline, with what came in: fewer
reports than that leave the decision to the validation set, or hold the candidate). The
``trim`` most favourable and most unfavourable reports are dropped before pooling (a trimmed
mean over devices): one lying device can neither promote, reject nor block a candidate. And
enough reports must agree: no promotion while half the devices or more see a clear regression
(worse than ``rollback_margin``) on their own labels, no rejection unless more than half see
one (worse than ``margin``) — colluding liars short of a majority can at most hold a candidate.
Each report is capped in size (``CanaryConfig.max_per_device``). Split evidence ("hold") waits for the rest of the cohort
or the deadline before it holds the candidate. A clear regression on the validation set rejects at once,
without waiting for the cohort.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt

from coordinator.canary import CanaryConfig, Counts, accuracies, paired_of, trimmed
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
    paired_z: float = 1.0
    """With paired counts: the one-sided bound's z (1.0 ≈ 84 % confidence; 0 = point estimate)."""
    best_floor: bool = True
    """Also require candidate ≥ best release score so far − margin (point estimates)."""
    canary: CanaryConfig | None = None
    """Federated evaluation by a canary cohort (None: off)."""
    validation_set: str = ""
    """Fingerprint of the validation samples (:func:`coordinator.validation.fingerprint`): the
    best-release floor persisted with it is restored after a restart only for the same set
    ("": unknown, never restored)."""

    def __post_init__(self) -> None:
        if not 0 <= self.margin < 1 or not self.margin <= self.rollback_margin < 1:
            raise ConfigError("need 0 <= margin <= rollback_margin < 1")
        if not (math.isfinite(self.paired_z) and 0 <= self.paired_z <= 10):
            raise ConfigError("paired_z must be in [0, 10]")
        if not self.validation and self.canary is None:
            raise ConfigError("the gate needs an evidence source: a validation set, a canary cohort, or both")
        if self.max_pending < 1:
            raise ConfigError("max_pending must be >= 1")


Paired = tuple[int, int, int]
"""(better, worse, n): samples only the candidate / only the release gets right, of n."""


@dataclass(slots=True)
class Evidence:
    version: int
    release: int
    devices: tuple[str, ...] = ()
    candidate_metric: float | None = None
    release_metric: float | None = None
    paired: Paired | None = None
    canary: dict[str, Counts] = field(default_factory=dict)
    """Accepted canary reports by device (the core validates them: :meth:`CanaryRound.check`)."""
    canary_closed: bool = False
    """The canary round ended (deadline): decide with what came in."""
    canary_expected: int = 0
    """Devices asked: while the pooled evidence says "hold", wait for all of them (or the deadline)."""

    def canary_summary(self) -> dict[str, object]:
        """What the history records of the canary evidence: reports, labels, pooled counts, accuracies."""
        cand, rel, n = accuracies(self.canary.values())
        return {"reports": len(self.canary), "n": n, "paired": list(paired_of(self.canary.values())),
                "candidate": round(cand, 5), "release": round(rel, 5)}


def _rule(paired: Paired, z: float, margin: float, rollback_margin: float) -> Decision:
    """The paired rule on pooled counts (see the module doc): promote / hold / reject."""
    _, lower, upper = difference_bounds(paired, z)
    if lower >= -margin - 1e-12:
        return "promote"
    return "reject" if upper < -rollback_margin else "hold"


def _pool(*parts: Paired | None) -> Paired | None:
    present = [p for p in parts if p is not None]
    if not present or sum(p[2] for p in present) == 0:
        return None
    return (sum(p[0] for p in present), sum(p[1] for p in present), sum(p[2] for p in present))


def paired_counts(candidate_right: npt.ArrayLike, release_right: npt.ArrayLike) -> Paired:
    """``(better, worse, n)`` from per-sample correctness of candidate and release on the
    same samples (boolean arrays of equal length)."""
    cand = np.asarray(candidate_right, dtype=bool).ravel()
    rel = np.asarray(release_right, dtype=bool).ravel()
    if cand.shape != rel.shape or cand.size == 0:
        raise ValueError(f"paired correctness needs two equal, non-empty arrays, got {cand.shape} and {rel.shape}")
    return int((cand & ~rel).sum()), int((~cand & rel).sum()), int(cand.size)


def valid_paired(paired: object) -> Paired | None:
    """The counts if they are three integers with better + worse <= n, n >= 1; else None."""
    if not isinstance(paired, tuple) or len(paired) != 3:
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in paired):
        return None
    better, worse, n = paired
    return (better, worse, n) if n >= 1 and better >= 0 and worse >= 0 and better + worse <= n else None


def difference_bounds(paired: Paired, z: float) -> tuple[float, float, float]:
    """``(d, lower, upper)``: the paired accuracy difference (candidate − release) and its
    one-sided z bounds (normal approximation on the per-sample differences in {−1, 0, 1})."""
    better, worse, n = paired
    d = (better - worse) / n
    var = max(0.0, (better + worse) / n - d * d)
    se = math.sqrt(var / n)
    return d, d - z * se, d + z * se


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

    def record_validation(self, version: int, candidate: float, release: float,
                          paired: Paired | None = None) -> Decision | None:
        """Evidence for ``version``; ``paired`` counts that are malformed are ignored (the
        point estimates decide)."""
        ev = self.pending.get(version)
        if ev is None:
            return None  # superseded or already decided
        ev.candidate_metric, ev.release_metric = float(candidate), float(release)
        ev.paired = valid_paired(paired) if paired is not None else None
        return self.decide(version)

    def record_canary(self, version: int, device: str, counts: Counts) -> Decision | None:
        """One device's accepted canary report for ``version`` (validated by the caller)."""
        ev = self.pending.get(version)
        if ev is None:
            return None
        ev.canary[device] = counts
        return self.decide(version)

    def close_canary(self, version: int) -> Decision | None:
        """The canary round on ``version`` is over: decide with what came in."""
        ev = self.pending.get(version)
        if ev is None:
            return None
        ev.canary_closed = True
        return self.decide(version)

    def reset_canary(self, version: int, expected: int = 0) -> None:
        """A canary round on ``version`` opens, asking ``expected`` devices: forget any earlier
        canary evidence (it was against a release that has moved on)."""
        ev = self.pending.get(version)
        if ev is not None:
            ev.canary, ev.canary_closed, ev.canary_expected = {}, False, expected

    def decide(self, version: int) -> Decision | None:
        ev = self.pending.get(version)
        if ev is None:
            return None
        cfg = self.config
        scored = ev.candidate_metric is not None and ev.release_metric is not None
        if cfg.validation and not scored:
            return None
        validation = self._validation_decision(ev) if scored else None
        if validation is not None and (cfg.canary is None or validation == "reject"):
            return validation  # a clear regression on the validation set needs no cohort
        canary = cfg.canary
        assert canary is not None
        if len(ev.canary) < canary.min_reports:
            if not ev.canary_closed:
                return None  # wait for the cohort
            return validation or "hold"
        # Pooled evidence: validation's paired counts and the trimmed canary reports.
        pooled = _pool(ev.paired, paired_of(trimmed(ev.canary, canary.trim)))
        assert pooled is not None
        verdict = _rule(pooled, cfg.paired_z, cfg.margin, cfg.rollback_margin)
        # ... and enough reports must agree: no release while half the devices see a clear
        # regression on their own labels, no rollback unless most of them see one.
        own = [(c[1] - c[2]) / max(1, sum(c)) for c in ev.canary.values()]
        if verdict == "promote" and 2 * sum(d < -cfg.rollback_margin for d in own) >= len(own):
            verdict = "hold"
        if verdict == "reject" and 2 * sum(d < -cfg.margin for d in own) <= len(own):
            verdict = "hold"
        verdicts: set[Decision] = {verdict}
        if validation is not None and ev.paired is None:  # a point-estimate validation score decides alongside
            verdicts.add(validation)
        if verdicts == {"promote"} and (not scored or self._floor_ok(ev)):
            return "promote"
        if verdicts == {"reject"}:
            return "reject"
        if not ev.canary_closed and len(ev.canary) < ev.canary_expected:
            return None  # split evidence: wait for the rest of the cohort (or the deadline)
        return "hold"

    def _floor_ok(self, ev: Evidence) -> bool:
        cfg = self.config
        return (not cfg.best_floor or self.best is None or ev.candidate_metric is None
                or ev.candidate_metric >= self.best - cfg.margin - 1e-12)

    def _validation_decision(self, ev: Evidence) -> Decision:
        """The validation set's own verdict (paired bound, or the point estimate)."""
        cfg = self.config
        assert ev.candidate_metric is not None and ev.release_metric is not None
        if ev.paired is not None:
            _, lower, upper = difference_bounds(ev.paired, cfg.paired_z)
        else:
            lower = upper = ev.candidate_metric - ev.release_metric
        if lower >= -cfg.margin - 1e-12 and self._floor_ok(ev):
            return "promote"
        return "reject" if upper < -cfg.rollback_margin else "hold"

    def take(self, version: int) -> Evidence | None:
        ev = self.pending.pop(version, None)
        if ev is not None and ev.release_metric is not None:  # the release as scored: a floor for later ones
            self.best = max(self.best if self.best is not None else ev.release_metric, ev.release_metric)
        return ev

    def promoted(self, score: float) -> None:
        """A candidate with this validation score became the release."""
        self.best = score if self.best is None else max(self.best, score)

    def floor(self) -> dict[str, object] | None:
        """The best-release floor as the release record keeps it, with the validation set it
        was scored on; None when there is none (no score yet, a canary-only gate, a reset)."""
        if self.best is None or not self.config.validation:
            return None
        return {"best": self.best, "validation_set": self.config.validation_set}

    def restore_floor(self, stored: object) -> dict[str, object] | None:
        """Take a persisted :meth:`floor` back when it was scored on this validation set.
        Returns what was dropped instead (with the reason), None when nothing was."""
        if not isinstance(stored, Mapping):
            return None
        best, scored_on = stored.get("best"), stored.get("validation_set")
        if isinstance(best, bool) or not isinstance(best, int | float) or not math.isfinite(best):
            return None  # not a floor we wrote
        mine = self.config.validation_set
        if not self.config.validation:
            why = "this gate has no validation set (canary only)"
        elif not mine or scored_on != mine:
            why = "the validation set differs from the one it was scored on"
        else:
            self.best = float(best)
            return None
        return {"best": float(best), "was": scored_on, "now": mine if self.config.validation else None, "why": why}

    def drop_above(self, version: int) -> list[int]:
        """Forget every candidate newer than ``version`` (after a rollback): returns them."""
        gone = sorted(v for v in self.pending if v > version)
        for v in gone:
            del self.pending[v]
        return gone
