"""Federated (canary) evaluation for the release gate, by test-then-train. Pure, no IO, no clock.

Theory of operation
-------------------
With ``--canary FRACTION`` the coordinator runs one *canary round* at a time, on the newest
pending candidate: it picks a cohort of recently seen devices (deterministically, by a hash
of device id and candidate version) and asks each (a :class:`~edge_sdk.wire.messages.Canary`
on its ``invite`` topic) to score the candidate against the release on its next
``samples`` new labels. A device fetches the candidate with a canary pull, then, for each new
label and *before* that label joins its training set, predicts it with both models (test
then train: no label is held back from training) and finally sends a
:class:`~edge_sdk.wire.messages.CanaryReport` with four counts — both right, only the
candidate, only the release, neither — never data.

The coordinator accepts a report only for the round's candidate and release, of that round
(its ``nonce``, echoed; a report without one comes from an SDK that predates nonces and is
judged as before), from a cohort member, once per device, with at most ``max_per_device``
labels; anything else raises a
typed :class:`~edge_sdk.errors.BadCanaryReport`, is counted by reason and changes nothing.
The gate (:mod:`coordinator.gate`) waits for at least ``min_reports`` devices, drops the
``trim`` most favourable and the ``trim`` most unfavourable reports (by only-candidate minus
only-release), and pools the rest with the validation set's paired counts — so ``trim`` lying
devices can neither promote, reject nor block a candidate: whatever they claim, their reports
are trimmed, or they sit between honest ones. A decision also needs the devices to agree
(promotion: fewer than half see a clear regression on their own labels; rejection: more than
half see one), so colluding liars short of a majority can at most hold a candidate.
A round ends with the gate's decision, at its deadline, or when the release moves on.

The open round is durable: the core asks the driver to record it (:meth:`CanaryRound.record`,
the registry's ``canary.json``) when it opens, before its requests go out, and again with each
accepted report, before the decision that report may bring. A restarted coordinator that gates the
same candidate against the same release again (in the same epoch) *resumes* that round — its nonce,
cohort, deadline and the reports recorded — instead of drawing a cohort among the devices seen since
the restart; it asks the cohort members that have not reported again (a device ignores a request of
a round it took), and a round whose deadline passed while it was down ends at once, as the deadline
rule says. A report accepted but not yet recorded when the process died is taken again if the broker
redelivers it (once: the round keeps one report per device). Without a record (a state dir from
before it, a record of another candidate) a restarted coordinator opens a new round. Each round
has its own ``nonce`` (:func:`round_nonce`), so a device that served an old round takes the new one
(it refuses only a repeat of a round it took) and a report of another round is refused
(``canary_stale_round``). The nonce names the round; it is no secret (the request carrying it is
signed, the report comes on the device's own topic).

Cohort rule: among the devices seen within ``recent_s`` (and not known offline), rank by
``h(device, version)`` — the first 8 bytes of SHA-256 as a number in [0, 1) — and take those
below ``fraction``, but at least ``min_reports`` (the lowest-ranked, when the fleet is small)
and at most ``max_cohort``. The same candidate always gets the same cohort, a new one a
fresh draw, and no device can choose to be in it. Devices whose updates built the candidate
are left out of its cohort (unless fewer than ``min_reports`` others are around): a device
does not judge its own work.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from edge_sdk.errors import (
    ConfigError,
    DuplicateReport,
    NotInCohort,
    ReportTooLarge,
    StaleRound,
    UnknownCandidate,
)
from edge_sdk.wire import topics
from edge_sdk.wire.messages import MAX_CANARY_SAMPLES, CanaryReport

Counts = tuple[int, int, int, int]
"""(both right, only the candidate right, only the release right, both wrong)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CanaryConfig:
    fraction: float = 0.1
    """Share of recently seen devices asked to evaluate each candidate."""
    samples: int = 20
    """New labels each canary device scores per candidate."""
    max_per_device: int = 0
    """Most labels one device's report may count (0: ``samples``): bounds any device's weight."""
    min_reports: int = 3
    """Devices whose reports must be in before the canary evidence decides (>= 2·trim + 1)."""
    trim: int = 1
    """Reports dropped from each end before pooling: the number of lying devices tolerated."""
    deadline_s: float = 600.0
    """A round lasts at most this long; then what came in decides (or the candidate is held).
    Devices are told :attr:`report_by_s` (a tenth less), counted from when the request reaches
    them, so a device that scored fewer than ``samples`` labels reports inside the round."""
    recent_s: float = 600.0
    """Only devices seen within this long are asked."""
    max_cohort: int = 64

    def __post_init__(self) -> None:
        if not (math.isfinite(self.fraction) and 0 < self.fraction <= 1):
            raise ConfigError("canary fraction must be in (0, 1]")
        if not 1 <= self.samples <= MAX_CANARY_SAMPLES:
            raise ConfigError(f"canary samples must be in [1, {MAX_CANARY_SAMPLES}]")
        if not (self.max_per_device == 0 or self.samples <= self.max_per_device <= MAX_CANARY_SAMPLES):
            raise ConfigError("canary max_per_device must be 0 (= samples) or in [samples, 10000]")
        if not 0 <= self.trim <= 16:
            raise ConfigError("canary trim must be in [0, 16]")
        if not max(2, 2 * self.trim + 1) <= self.min_reports <= self.max_cohort:
            raise ConfigError("canary min_reports must be >= 2·trim + 1 (and >= 2: one device must never decide) and <= max_cohort")
        for name in ("deadline_s", "recent_s"):
            v = getattr(self, name)
            if not (math.isfinite(v) and 0 < v <= 86_400):
                raise ConfigError(f"canary {name} must be in (0, 86400]")

    @property
    def cap(self) -> int:
        return self.max_per_device or self.samples

    @property
    def report_by_s(self) -> float:
        """The deadline a cohort device is given: ``deadline_s`` less a tenth (at most 60 s) for
        the request's and the report's way over the network."""
        return self.deadline_s - min(0.1 * self.deadline_s, 60.0)


def check_canary_task(task: Any, fraction: float) -> None:
    """ConfigError when canary evaluation (``fraction`` > 0) is asked of a task whose devices send
    no reports: frames with boxes have no one label to score (``EdgeClient`` skips the request), so
    every candidate waited out ``--canary-deadline`` and was held (helper-182, over mosquitto)."""
    from edge_sdk.tasks.registry import sample_kind_of

    if fraction > 0 and sample_kind_of(task) == "frame":
        raise ConfigError(f"--canary {fraction:g}: {getattr(task, 'name', task)}'s devices send no canary reports (a frame "
                          "with boxes has no one label to score), so every candidate would wait --canary-deadline and then "
                          "be held; gate a detector with --validation (mAP50 on the operator's frames) instead")


def draw(device: str, version: int) -> float:
    """The device's deterministic draw in [0, 1) for candidate ``version``."""
    digest = hashlib.sha256(f"edgeci-canary/{version}/{device}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def round_nonce(coordinator: str, epoch: int, candidate: int, release: int, opened_at: float, rounds: int) -> int:
    """A round's nonce in [1, 2**63): from when it opened, so a coordinator that restarted (the
    same seed, so the same random draws) still names its new round on the same candidate anew;
    ``rounds`` (opened so far by this core) tells apart rounds opened at one instant."""
    digest = hashlib.sha256(f"edgeci-canary-round/{coordinator}/{epoch}/{candidate}/{release}/{opened_at!r}/{rounds}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (2**63 - 1) + 1


def pick_cohort(devices: Iterable[str], version: int, config: CanaryConfig) -> tuple[str, ...]:
    """The cohort for candidate ``version`` among the eligible ``devices`` (see the module doc)."""
    ranked = sorted((draw(d, version), d) for d in set(devices))
    chosen = [d for h, d in ranked if h < config.fraction]
    if len(chosen) < config.min_reports:
        chosen = [d for _, d in ranked[: config.min_reports]]
    return tuple(sorted(chosen[: config.max_cohort]))


def eligible(presence: Mapping[str, tuple[bool | None, float | None, int]], now: float, recent_s: float) -> list[str]:
    """Devices seen within ``recent_s`` and not known to be offline (presence: online, last seen
    or None when not known, version)."""
    return [d for d, (online, seen, _) in presence.items() if online is not False and seen is not None and now - seen <= recent_s]


@dataclass(slots=True)
class CanaryRound:
    """One candidate under canary evaluation: who was asked, until when, what came back."""

    candidate: int
    release: int
    cohort: frozenset[str]
    deadline: float
    nonce: int = 0
    """This round's :func:`round_nonce`, sent with each request and echoed in each report."""
    reports: dict[str, Counts] = field(default_factory=dict)

    def check(self, report: CanaryReport, cap: int) -> Counts:
        """The report's counts if the round may take them; else a typed ``BadCanaryReport``."""
        if report.candidate != self.candidate or report.release != self.release:
            raise UnknownCandidate(f"no canary round for candidate {report.candidate} vs release {report.release} "
                                   f"(the round is {self.candidate} vs {self.release})")
        if report.nonce and report.nonce != self.nonce:  # (none: an SDK from before round nonces, judged as before)
            raise StaleRound(f"a report of round {report.nonce:x} on candidate {self.candidate}; the open round is "
                             f"{self.nonce:x} (opened since: the coordinator restarted)")
        if report.device not in self.cohort:
            raise NotInCohort(f"{report.device} was not asked to evaluate candidate {self.candidate}")
        if report.device in self.reports:
            raise DuplicateReport(f"{report.device} already reported on candidate {self.candidate}")
        if report.n > cap:
            raise ReportTooLarge(f"{report.n} labels reported; a device may count at most {cap}")
        return report.counts

    def record(self, epoch: int) -> dict[str, Any]:
        """The round as the registry keeps it (``canary.json``; JSON-ready), in numbering ``epoch``."""
        return {"candidate": self.candidate, "release": self.release, "epoch": epoch, "nonce": self.nonce,
                "deadline": self.deadline, "cohort": sorted(self.cohort),
                "reports": {d: list(c) for d, c in sorted(self.reports.items())}}

    @classmethod
    def from_record(cls, record: object, epoch: int) -> CanaryRound | None:
        """The round :meth:`record` wrote, if it is one of numbering ``epoch``; None for anything else
        (another epoch, a damaged or foreign file: a new round is opened instead)."""
        if not isinstance(record, Mapping) or record.get("epoch") != epoch:
            return None
        candidate, release, nonce, deadline = (record.get(k) for k in ("candidate", "release", "nonce", "deadline"))
        cohort, reports = record.get("cohort"), record.get("reports")
        if not (_int(candidate, 0, 2**63 - 1) and _int(release, 0, 2**63 - 1) and _int(nonce, 1, 2**63 - 1)
                and isinstance(deadline, int | float) and not isinstance(deadline, bool) and math.isfinite(deadline)
                and isinstance(cohort, list) and 0 < len(cohort) <= MAX_RECORDED_COHORT
                and all(topics.is_id(d) for d in cohort) and isinstance(reports, Mapping)):
            return None
        members = frozenset(cohort)
        counts: dict[str, Counts] = {}
        for device, c in reports.items():
            if device not in members or not (isinstance(c, list) and len(c) == 4 and all(_int(v, 0, MAX_CANARY_SAMPLES) for v in c)):
                return None
            counts[device] = (c[0], c[1], c[2], c[3])
        assert isinstance(candidate, int) and isinstance(release, int) and isinstance(nonce, int)
        return cls(candidate=candidate, release=release, cohort=members, deadline=float(deadline), nonce=nonce, reports=counts)


MAX_RECORDED_COHORT = 10_000
"""A recorded cohort larger than this is no record of ours (a core tracks at most 10,000 devices' presence)."""


def _int(value: object, lo: int, hi: int) -> bool:
    return type(value) is int and lo <= value <= hi


def trimmed(reports: Mapping[str, Counts], trim: int) -> list[Counts]:
    """The reports left after dropping the ``trim`` most favourable and most unfavourable to
    the candidate (only-candidate minus only-release; ties by device id, deterministic)."""
    ranked = sorted(reports.items(), key=lambda kv: (kv[1][1] - kv[1][2], kv[0]))
    return [c for _, c in ranked[trim: len(ranked) - trim]]


def paired_of(counts: Iterable[Counts]) -> tuple[int, int, int]:
    """Pooled ``(better, worse, n)`` for the gate: only the candidate right, only the release, all."""
    better = worse = n = 0
    for both, cand, rel, neither in counts:
        better += cand
        worse += rel
        n += both + cand + rel + neither
    return better, worse, n


def accuracies(counts: Iterable[Counts]) -> tuple[float, float, int]:
    """(candidate accuracy, release accuracy, labels) over pooled counts (0, 0, 0 when empty)."""
    both = cand = rel = n = 0
    for b, c, r, w in counts:
        both, cand, rel, n = both + b, cand + c, rel + r, n + b + c + r + w
    return ((both + cand) / n, (both + rel) / n, n) if n else (0.0, 0.0, 0)
