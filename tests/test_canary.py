"""Issue 10 §3, federated (canary) evaluation by test-then-train, in the cores: the cohort
rule, the gate's decision on pooled paired counts (one lying device cannot decide), hostile
reports (typed, counted, change nothing), and a device that fetches the candidate, scores
its next labels before training on them and reports only counts."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from coordinator.canary import (
    CanaryConfig,
    CanaryRound,
    draw,
    eligible,
    paired_of,
    pick_cohort,
    trimmed,
)
from coordinator.core import (
    CandidateEvaluated,
    CommitVersion,
    CoordinatorConfig,
    CoordinatorCore,
    EvaluateCandidate,
    RecordCanaryRound,
    RecordRelease,
)
from coordinator.gate import Gate, GateConfig
from coordinator.registry import Registry
from coordinator.strategies import make_strategy
from edge_sdk.core.device import DeviceConfig, DeviceCore, Phase
from edge_sdk.core.events import (
    CanaryScored,
    MessageReceived,
    Notify,
    PinCanary,
    Publish,
    ScheduleTimer,
    StartCanary,
    StopCanary,
    TimerFired,
)
from edge_sdk.errors import (
    ConfigError,
    DuplicateReport,
    NotInCohort,
    ReportTooLarge,
    StaleRound,
    UnknownCandidate,
)
from edge_sdk.signing import Signer, verify
from edge_sdk.wire import topics
from edge_sdk.wire.codec import decode, decode_frame, encode
from edge_sdk.wire.messages import Canary, CanaryReport, ModelMsg, Pull, Update
from tests.helpers import SIGNER, SPEC, toy_snapshot

CFG = CanaryConfig(fraction=0.5, samples=20, min_reports=3, deadline_s=100.0, recent_s=1000.0)


def of(actions: Sequence[object], kind: type) -> list:  # type: ignore[type-arg]
    return [a for a in actions if isinstance(a, kind)]


# ---------------------------------------------------------------------- the cohort rule


def test_cohort_is_deterministic_per_candidate_bounded_and_never_too_small() -> None:
    fleet = [f"dev{i}" for i in range(1000)]
    cfg = CanaryConfig(fraction=0.05, min_reports=3, max_cohort=64)
    a = pick_cohort(fleet, 7, cfg)
    assert a == pick_cohort(reversed(fleet), 7, cfg)  # deterministic, order-free
    assert all(draw(d, 7) < 0.05 for d in a) and 30 <= len(a) <= 70  # ≈ 5 % of 1000
    assert set(a) != set(pick_cohort(fleet, 8, cfg))  # a new candidate draws anew
    assert len(pick_cohort(fleet, 7, CanaryConfig(fraction=0.5, min_reports=3, max_cohort=64))) == 64  # capped
    small = pick_cohort(["a", "b", "c", "d"], 7, CanaryConfig(fraction=0.01, min_reports=3))
    assert len(small) == 3  # a small fleet still yields min_reports devices: the lowest draws
    assert set(small) == set(sorted(["a", "b", "c", "d"], key=lambda d: draw(d, 7))[:3])
    presence = {"on": (True, 95.0, 1), "unknown": (None, 90.0, 1), "off": (False, 99.0, 1), "stale": (True, 10.0, 1)}
    assert sorted(eligible(presence, 100.0, 30.0)) == ["on", "unknown"]


@pytest.mark.parametrize("bad", [dict(fraction=0.0), dict(fraction=1.5), dict(min_reports=1), dict(min_reports=2),
                                 dict(trim=2, min_reports=4), dict(trim=-1), dict(trim=17, min_reports=40), dict(samples=0),
                                 dict(samples=20, max_per_device=10), dict(deadline_s=0.0), dict(recent_s=float("inf"))])
def test_canary_config_is_validated(bad: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        CanaryConfig(**bad)  # type: ignore[arg-type]


def test_a_gate_needs_a_source_and_canary_alone_is_one() -> None:
    with pytest.raises(ConfigError):
        GateConfig(validation=False)
    assert GateConfig(validation=False, canary=CFG).canary is CFG


def test_round_checks_every_report() -> None:
    rnd = CanaryRound(candidate=3, release=2, cohort=frozenset({"a", "b"}), deadline=10.0, nonce=77)
    ok = CanaryReport(device="a", candidate=3, release=2, both_right=10, only_candidate=2, only_release=1, both_wrong=7, nonce=77)
    assert rnd.check(ok, 20) == (10, 2, 1, 7)
    rnd.reports["a"] = ok.counts
    for report, error in [
        (ok, DuplicateReport),
        (CanaryReport(device="c", candidate=3, release=2, both_right=1, only_candidate=0, only_release=0, both_wrong=0), NotInCohort),
        (CanaryReport(device="b", candidate=4, release=2, both_right=1, only_candidate=0, only_release=0, both_wrong=0), UnknownCandidate),
        (CanaryReport(device="b", candidate=3, release=1, both_right=1, only_candidate=0, only_release=0, both_wrong=0), UnknownCandidate),
        (CanaryReport(device="b", candidate=3, release=2, both_right=21, only_candidate=0, only_release=0, both_wrong=0), ReportTooLarge),
        (CanaryReport(device="b", candidate=3, release=2, both_right=1, only_candidate=0, only_release=0, both_wrong=0, nonce=76), StaleRound),
    ]:
        with pytest.raises(error):
            rnd.check(report, 20)


# ---------------------------------------------------------------------- the gate's decision

GOOD = (17, 2, 0, 1)  # a candidate as good as the release: agrees on almost every label
BAD = (2, 0, 16, 2)  # a ×1000-scaled candidate: the release right on most labels, the candidate on few


def canary_gate(validation: bool = False, min_reports: int = 3) -> Gate:
    gate = Gate(GateConfig(validation=validation, canary=CanaryConfig(min_reports=min_reports, samples=20)))
    gate.add_candidate(1, 0, ("x",))
    return gate


def test_canary_alone_waits_for_enough_reports_then_decides() -> None:
    gate = canary_gate()
    assert gate.record_canary(1, "a", BAD) is None  # one report never decides
    assert gate.record_canary(1, "b", BAD) is None
    assert gate.record_canary(1, "c", BAD) == "reject"
    gate = canary_gate()
    gate.record_canary(1, "a", GOOD)
    gate.record_canary(1, "b", GOOD)
    assert gate.record_canary(1, "c", GOOD) == "promote"
    assert paired_of([GOOD, BAD]) == (2, 16, 40)
    assert trimmed({"a": GOOD, "b": BAD, "c": (10, 5, 5, 0), "d": (0, 20, 0, 0)}, 1) == [(10, 5, 5, 0), GOOD]


PRAISE = (0, 20, 0, 0)  # a liar: "only the candidate was right, on every label"
BLAME = (0, 0, 20, 0)  # a liar: "only the release was right, on every label"


@pytest.mark.parametrize(("honest", "liar", "expected"), [
    (BAD, PRAISE, "reject"),  # cannot get a bad candidate released, nor stop its rollback
    (GOOD, BLAME, "promote"),  # cannot get a good candidate rolled back, nor block it
    (BAD, BLAME, "reject"),
    (GOOD, PRAISE, "promote"),
])
def test_one_lying_device_can_neither_decide_nor_block(honest: tuple[int, int, int, int], liar: tuple[int, int, int, int],
                                                       expected: str) -> None:
    for order in (["liar", "h1", "h2"], ["h1", "liar", "h2"], ["h1", "h2", "liar"]):
        gate = canary_gate()
        decisions = [gate.record_canary(1, d, liar if d == "liar" else honest) for d in order]
        assert decisions == [None, None, expected], order


def test_colluding_liars_short_of_a_majority_can_at_most_hold() -> None:
    for honest, liar in ((BAD, PRAISE), (GOOD, BLAME)):
        gate = canary_gate()  # trim 1: two liars survive trimming, but half the reports disagree with them
        for d, counts in {"h1": honest, "h2": honest, "l1": liar, "l2": liar}.items():
            gate.pending[1].canary[d] = counts
        assert gate.decide(1) == "hold"
    # a regression milder than BAD (30 points on each honest device's labels): the two praising
    # liars outweigh it in the pooled counts, and only the honest half's own reports hold it
    gate = canary_gate()
    for d, counts in {"h1": (14, 0, 6, 0), "h2": (14, 0, 6, 0), "l1": PRAISE, "l2": PRAISE}.items():
        gate.pending[1].canary[d] = counts
    assert gate.decide(1) == "hold"
    # with trim 2 (min_reports 5) two liars are trimmed and three honest devices decide
    gate = Gate(GateConfig(validation=False, canary=CanaryConfig(trim=2, min_reports=5)))
    gate.add_candidate(1, 0, ())
    for d, counts in {"h1": BAD, "h2": BAD, "h3": BAD, "l1": PRAISE, "l2": PRAISE}.items():
        gate.pending[1].canary[d] = counts
    assert gate.decide(1) == "reject"


MEH = (15, 1, 3, 1)  # slightly worse, within the noise of 20 labels


def test_inconclusive_evidence_waits_for_the_rest_of_the_cohort() -> None:
    gate = canary_gate()
    gate.reset_canary(1, expected=4)
    for d in ("a", "b", "c"):
        assert gate.record_canary(1, d, MEH) is None  # neither promote nor reject: one more to come
    assert gate.record_canary(1, "d", MEH) == "hold"  # everyone asked has spoken
    gate = canary_gate()
    gate.reset_canary(1, expected=5)
    for d in ("a", "b", "c"):
        gate.record_canary(1, d, MEH)
    assert gate.decide(1) is None and gate.close_canary(1) == "hold"  # the deadline ends the wait


def test_validation_and_canary_pool_their_paired_counts() -> None:
    gate = canary_gate(validation=True)
    for d in ("a", "b", "c"):
        gate.record_canary(1, d, GOOD)
    assert gate.decide(1) is None  # waits for the validation score too
    assert gate.record_validation(1, 0.90, 0.90, (2, 2, 200)) == "promote"
    # a clear regression on the validation set rejects at once, without the cohort
    gate = canary_gate(validation=True)
    assert gate.record_validation(1, 0.10, 0.90, (0, 160, 200)) == "reject"
    # validation fine but the cohort sees a regression: the pooled evidence holds it (or rejects)
    gate = canary_gate(validation=True)
    gate.record_validation(1, 0.90, 0.90, (2, 2, 200))
    gate.record_canary(1, "a", BAD)
    gate.record_canary(1, "b", BAD)
    assert gate.record_canary(1, "c", BAD) in ("hold", "reject")
    assert gate.decide(1) != "promote"
    # too few reports by the deadline: the validation set decides alone
    gate = canary_gate(validation=True)
    gate.record_validation(1, 0.90, 0.90, (2, 2, 200))
    gate.record_canary(1, "a", BAD)
    assert gate.close_canary(1) == "promote"
    gate = canary_gate()  # canary alone, too few reports: held
    gate.record_canary(1, "a", GOOD)
    assert gate.close_canary(1) == "hold"


# ---------------------------------------------------------------------- the coordinator core


def core(validation: bool = False, cfg: CanaryConfig = CFG) -> CoordinatorCore:
    config = CoordinatorConfig(region="r1", coordinator_id="c1", spec=SPEC, signer=SIGNER,
                               gate=GateConfig(validation=validation, canary=cfg))
    return CoordinatorCore(config, make_strategy("spin", k=1, timeout_s=None, clip_multiplier=0.0), toy_snapshot(),
                           rng=random.Random(0))


def msg(dev: str, leaf: str, message: object, now: float, signer: Signer | None = None) -> MessageReceived:
    topic = topics.device_topic("r1", dev, leaf)
    return MessageReceived(now=now, topic=topic, payload=encode(message, signer=signer, scope=topics.signing_scope(topic)))  # type: ignore[arg-type, call-arg]


def seen(c: CoordinatorCore, devices: Sequence[str], now: float = 1.0) -> None:
    for i, d in enumerate(devices):  # a serving pull each: recently seen
        c.handle(msg(d, "pull", Pull(device=d, seq=0, model_id="toy", serve=True), now + 0.01 * i))


def candidate(c: CoordinatorCore, value: float, now: float, dev: str = "trainer") -> list[object]:
    base = c.version
    update = Update(device=dev, seq=base + 10, model_id="toy", base_version=base, n_samples=1,
                    weights=np.full(SPEC.size, value, dtype=np.float32))
    return list(c.handle(msg(dev, "update", update, now)))


def invites(actions: Sequence[object]) -> dict[str, Canary]:
    out = {}
    for a in of(actions, Publish):
        if a.topic.endswith("/invite"):
            m = decode(a.payload)
            assert isinstance(m, Canary)
            out[m.device] = m
    return out


def report(dev: str, counts: tuple[int, int, int, int], candidate: int = 1, release: int = 0, now: float = 20.0,
           nonce: int = 0) -> MessageReceived:
    both, cand, rel, neither = counts
    r = CanaryReport(device=dev, candidate=candidate, release=release, both_right=both, only_candidate=cand,
                     only_release=rel, both_wrong=neither, nonce=nonce)
    return msg(dev, "update", r, now)


DEVICES = [f"d{i}" for i in range(8)]


def test_a_commit_opens_a_round_with_signed_requests_to_the_cohort() -> None:
    c = core()
    seen(c, DEVICES)
    acts = candidate(c, 1.0, 5.0)
    assert not of(acts, EvaluateCandidate)  # no validation set: no validation job
    asked = invites(acts)
    # the device whose update built the candidate does not judge it
    assert set(asked) == set(pick_cohort(DEVICES, 1, CFG)) and len(asked) >= CFG.min_reports and "trainer" not in asked
    assert all((m.candidate, m.release, m.samples) == (1, 0, 20) for m in asked.values())
    # devices count their deadline from the request's arrival: they are told less than the round
    # lasts, so a device short of `samples` labels still reports inside the round
    assert all(m.deadline_s == CFG.report_by_s == 90.0 for m in asked.values())
    assert CanaryConfig(deadline_s=3600.0).report_by_s == 3540.0
    # signed by the coordinator's key for the invite topic (a device refuses anything else)
    for a in of(acts, Publish):
        if a.topic.endswith("/invite"):
            sig = decode_frame(a.payload).signature
            assert sig is not None and sig.public_raw == SIGNER.public_raw, a.topic
            assert verify(sig.public_raw, sig.signature, sig.signed_for(topics.signing_scope(a.topic))), a.topic
    wakes = [a.at for a in of(acts, ScheduleTimer)]
    for _ in range(5):  # one timer at a time: the earliest wake first, then the round's deadline
        if 5.0 + CFG.deadline_s in wakes:
            break
        wakes = [a.at for a in of(c.handle(TimerFired(now=wakes[-1])), ScheduleTimer)]
    assert 5.0 + CFG.deadline_s in wakes
    status = c.status().extra["gate"]["canary"]
    assert status["round"]["candidate"] == 1 and status["round"]["cohort"] == len(asked)
    # a second candidate waits: one round at a time
    assert not invites(candidate(c, 2.0, 6.0, dev="t2"))


def test_canary_fetch_serves_the_candidate_to_cohort_members_only() -> None:
    c = core()
    seen(c, DEVICES)
    asked = invites(candidate(c, 1.0, 5.0))
    member = sorted(asked)[0]
    outsider = next(d for d in DEVICES if d not in asked)
    (pub,) = of(c.handle(msg(member, "pull", Pull(device=member, seq=1, model_id="toy", serve=True, canary=1, have_version=0), 6.0)), Publish)
    model = decode(pub.payload)
    assert isinstance(model, ModelMsg) and (model.version, model.release) == (1, 0)
    np.testing.assert_array_equal(model.weights, 1.0)
    acts = c.handle(msg(outsider, "pull", Pull(device=outsider, seq=1, model_id="toy", serve=True, canary=1), 6.1))
    assert not [a for a in of(acts, Publish) if a.topic.endswith("/model")]
    assert c.counters["reject:canary_not_in_cohort"] == 1


def test_a_canary_fetch_for_another_candidate_is_refused_and_serves_nothing() -> None:
    """A cohort member may fetch only the candidate under evaluation: a canary pull naming any
    other version (a newer candidate still waiting, an old one) is refused with an ack, counted,
    and neither serves a model nor moves the round."""
    c = core()
    seen(c, DEVICES)
    member = sorted(invites(candidate(c, 1.0, 5.0)))[0]
    candidate(c, 2.0, 5.5, dev="t2")  # candidate 2 waits for its round
    for seq, wrong in enumerate((2, 0), start=1):
        acts = c.handle(msg(member, "pull", Pull(device=member, seq=seq, model_id="toy", serve=True, canary=wrong), 6.0))
        assert not [a for a in of(acts, Publish) if a.topic.endswith("/model")]
        (ack,) = [decode(a.payload) for a in of(acts, Publish) if a.topic.endswith("/ack")]
        assert (ack.status, ack.reason) == ("rejected", "canary_unknown_candidate")  # type: ignore[union-attr]
    assert c.counters["reject:canary_unknown_candidate"] == 2 and c.counters["canary_fetches"] == 0
    status = c.status().extra["gate"]["canary"]
    assert status["round"]["candidate"] == 1 and status["fetches"] == 0


def test_hostile_reports_are_typed_counted_and_change_nothing() -> None:
    c = core()
    seen(c, DEVICES)
    requests = invites(candidate(c, 1.0, 5.0))
    asked = sorted(requests)
    nonce = requests[asked[0]].nonce
    outsider = next(d for d in DEVICES if d not in asked)
    hostile = [
        (report(outsider, (0, 20, 0, 0)), "canary_not_in_cohort"),
        (report(asked[0], (0, 20, 0, 0), candidate=2), "canary_unknown_candidate"),
        (report(asked[0], (0, 20, 0, 0), release=1), "canary_unknown_candidate"),
        (report(asked[0], (0, 21, 0, 0)), "canary_too_many_labels"),
        (report(asked[0], (0, 20, 0, 0), nonce=nonce % (2**63 - 1) + 1), "canary_stale_round"),  # another round's
    ]
    for event, reason in hostile:
        acts = c.handle(event)
        assert not of(acts, RecordRelease) and not of(acts, CommitVersion) and not of(acts, RecordCanaryRound)
        assert c.counters[f"canary_reject:{reason}"] >= 1
    (rec,) = c.handle(report(asked[0], GOOD, nonce=nonce))  # the first real one is taken: recorded with its round
    assert isinstance(rec, RecordCanaryRound) and rec.round["reports"] == {asked[0]: list(GOOD)} and rec.round["nonce"] == nonce
    assert c.handle(report(asked[0], GOOD, nonce=nonce))[0].data["reason"] == "canary_duplicate"  # type: ignore[attr-defined]
    assert of(c.handle(report(asked[1], GOOD)), RecordCanaryRound)  # without a nonce (an SDK from before them): judged as before
    gate = c.status().extra["gate"]
    assert gate["canary"]["reports"] == 2 and gate["canary"]["rejected"] == 6
    assert gate["canary"]["rejected_by_reason"] == {"not_in_cohort": 1, "unknown_candidate": 2, "too_many_labels": 1, "duplicate": 1,
                                                    "stale_round": 1}
    assert gate["pending"] == [1] and c.release[0] == 0
    assert c.counters["rejected"] == 0  # canary reports are not counted as rejected updates


def test_metrics_count_canary_reports_by_outcome() -> None:
    from coordinator.metrics import CoordinatorMetrics

    c = core()
    seen(c, DEVICES)
    asked = sorted(invites(candidate(c, 1.0, 5.0)))
    c.handle(report(next(d for d in DEVICES if d not in asked), GOOD))
    c.handle(report(asked[0], GOOD))
    metrics = CoordinatorMetrics()
    metrics.publish(c.status())
    text = metrics.exposition().decode()
    assert 'edgeci_canary_reports_total{outcome="accepted"} 1.0' in text
    assert 'edgeci_canary_reports_total{outcome="rejected:not_in_cohort"} 1.0' in text
    assert "edgeci_canary_rounds_total 1.0" in text


def test_canary_evidence_alone_rejects_and_rolls_back_or_promotes() -> None:
    c = core()
    seen(c, DEVICES)
    asked = sorted(invites(candidate(c, 50.0, 5.0)))
    c.handle(report(asked[0], BAD))
    c.handle(report(asked[1], BAD))
    acts = c.handle(report(asked[2], BAD))
    (rec,) = of(acts, RecordRelease)
    assert rec.event["action"] == "reject" and rec.release == 0
    assert rec.event["canary"] == {"reports": 3, "n": 60, "paired": [0, 48, 60], "candidate": 0.1, "release": 0.9}
    (rollback,) = of(acts, CommitVersion)
    assert rollback.metadata["source"] == "rollback"
    np.testing.assert_array_equal(rollback.weights, 0.0)
    assert c.status().extra["gate"]["canary"]["round"] is None
    # the next candidate gets its own round; good reports promote it
    asked = sorted(invites(candidate(c, 1.0, 30.0)))
    v = c.version
    assert asked
    c.handle(report(asked[0], GOOD, candidate=v, now=31.0))
    c.handle(report(asked[1], GOOD, candidate=v, now=31.5))
    acts = c.handle(report(asked[2], GOOD, candidate=v, now=32.0))
    assert of(acts, RecordRelease)[0].event["action"] == "promote" and c.release[0] == v


def test_the_deadline_ends_a_round_and_the_next_candidate_is_canaried() -> None:
    c = core(cfg=CanaryConfig(fraction=0.5, samples=20, min_reports=3, deadline_s=100.0, recent_s=50.0))
    seen(c, DEVICES)
    asked = sorted(invites(candidate(c, 1.0, 5.0)))
    candidate(c, 2.0, 6.0, dev="t2")  # candidate 2 waits
    c.handle(report(asked[0], GOOD))
    acts = c.handle(TimerFired(now=5.0 + CFG.deadline_s))
    assert of(acts, RecordRelease)[0].event["action"] == "hold"  # one report is not enough
    assert c.release[0] == 0 and c.counters["canary_rounds_expired"] == 1
    # devices seen long ago are not asked again; recent ones are (candidate 2's round)
    assert invites(acts) == {} and c.counters["canary_no_cohort"] == 1
    seen(c, DEVICES, now=5.0 + CFG.deadline_s + 1)
    nxt = invites(c.handle(TimerFired(now=5.0 + CFG.deadline_s + 2)))
    assert nxt and all(m.candidate == 2 for m in nxt.values())


def test_a_validation_promotion_waits_for_the_cohort_and_a_validation_reject_does_not() -> None:
    c = core(validation=True)
    seen(c, DEVICES)
    acts = candidate(c, 1.0, 5.0)
    assert of(acts, EvaluateCandidate) and invites(acts)
    asked = sorted(invites(acts))
    assert not of(c.handle(CandidateEvaluated(now=6.0, version=1, candidate_metric=0.9, release_metric=0.9,
                                              release_version=0, paired=(1, 1, 200))), RecordRelease)
    c.handle(report(asked[0], GOOD))
    c.handle(report(asked[1], GOOD))
    acts = c.handle(report(asked[2], GOOD))
    assert of(acts, RecordRelease)[0].event["action"] == "promote"
    event = of(acts, RecordRelease)[0].event
    assert event["paired"] == [1, 1, 200] and event["canary"]["reports"] == 3
    acts = candidate(c, 9.0, 40.0)
    acts = c.handle(CandidateEvaluated(now=41.0, version=c.version, candidate_metric=0.1, release_metric=0.9,
                                       release_version=1, paired=(0, 160, 200)))
    assert of(acts, RecordRelease)[0].event["action"] == "reject"  # no need to wait for the cohort


def test_reports_outlive_a_round_that_ends_before_the_validation_score() -> None:
    """helper-105: a round whose deadline passed before the validation score came in was opened
    again on the same candidate against the same release, which wiped its reports; the devices
    that had reported refuse the same request again (a round they served), so the validation set
    decided alone a full deadline later: a candidate every canary device saw as a clear regression
    was promoted. The reports now wait for the score; no device is asked twice for that round."""
    c = core(validation=True)
    seen(c, DEVICES)
    asked = sorted(invites(candidate(c, 1.0, 5.0)))
    for d in asked:
        c.handle(report(d, BAD))
    seen(c, DEVICES, now=5.0 + CFG.deadline_s - 1)
    acts = c.handle(TimerFired(now=5.0 + CFG.deadline_s))  # the validation worker is slower than the round
    assert not invites(acts) and c.status().extra["gate"]["canary"]["round"] is None
    assert not invites(c.handle(TimerFired(now=5.0 + CFG.deadline_s + 1)))
    acts = c.handle(CandidateEvaluated(now=5.0 + CFG.deadline_s + 5, version=1, candidate_metric=0.9, release_metric=0.9,
                                       release_version=0, paired=(3, 3, 200)))
    (rec,) = of(acts, RecordRelease)
    assert rec.event["action"] != "promote" and rec.event["canary"]["reports"] == len(asked)
    assert c.release[0] == 0


def test_a_device_does_not_judge_its_own_candidate_after_a_restart(tmp_path: Path) -> None:
    """helper-105: the candidate restored undecided is gated again at start, but without the devices
    that built it: after a restart the device whose update made the candidate was asked to judge it
    (cohort of every recent device: before the restart it was left out, after it was in). The
    commit's metadata names them; the snapshot carries them to the new round."""
    cfg = CanaryConfig(fraction=1.0, samples=20, min_reports=3, deadline_s=100.0, recent_s=1000.0)
    registry = Registry(tmp_path, SPEC)
    registry.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    c = core(cfg=cfg)
    seen(c, [*DEVICES, "trainer"])
    acts = candidate(c, 1.0, 5.0)  # built by trainer's update
    for a in of(acts, CommitVersion):
        registry.commit(a)
    assert invites(acts) and "trainer" not in invites(acts)
    registry.close()
    snap = Registry(tmp_path, SPEC).load()
    assert snap is not None and tuple(snap.candidate_devices) == ("trainer",)
    restarted = CoordinatorCore(c.config, make_strategy("spin", k=1, timeout_s=None, clip_multiplier=0.0), snap,
                                rng=random.Random(0))
    restarted.start(30.0)
    seen(restarted, [*DEVICES, "trainer"], now=31.0)
    asked = invites(restarted.handle(TimerFired(now=32.0)))
    assert asked and all(m.candidate == 1 for m in asked.values()) and "trainer" not in asked


def test_a_restarted_coordinator_opens_the_round_once_devices_are_seen_again(tmp_path: Path) -> None:
    """helper-114: the candidate restored undecided is gated again at start, when no device has been
    seen yet (no cohort). The round was tried again only on a timer, which nothing asked for (SPIN
    with an empty buffer wakes no one): over mosquitto, the restarted daemon never opened it while its
    three devices pulled every 2 s. It asks for a wake-up now, and opens the round then."""
    registry = Registry(tmp_path, SPEC)
    registry.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    c = core()
    seen(c, DEVICES)
    for a in of(candidate(c, 1.0, 5.0), CommitVersion):
        registry.commit(a)
    registry.close()
    snap = Registry(tmp_path, SPEC).load()
    assert snap is not None
    restarted = CoordinatorCore(c.config, make_strategy("spin", k=1, timeout_s=None, clip_multiplier=0.0), snap,
                                rng=random.Random(0))
    acts = list(restarted.start(30.0))
    assert not invites(acts) and restarted.counters["canary_no_cohort"] == 1  # nobody seen since the start
    for i, d in enumerate(DEVICES):  # the devices come back (their next pulls), no timer fires meanwhile
        acts += restarted.handle(msg(d, "pull", Pull(device=d, seq=0, model_id="toy", serve=True), 31.0 + 0.01 * i))
    assert not invites(acts)
    wakes = [a.at for a in of(acts, ScheduleTimer)]
    assert wakes and 30.0 < wakes[-1] <= 30.0 + CFG.recent_s  # a wake-up asked for
    asked = invites(restarted.handle(TimerFired(now=wakes[-1])))
    assert asked and all(m.candidate == 1 for m in asked.values())


def test_a_round_whose_candidate_is_superseded_ends_and_the_newest_gets_one() -> None:
    """helper-105: a candidate dropped from the gate as superseded (more than ``max_pending`` newer
    ones) kept its canary round to the deadline: the cohort scored and reported on a candidate no
    report could decide any more, while the newer candidates waited without a round (a canary
    promotion needs one). Its round ends now and the newest candidate's opens."""
    config = CoordinatorConfig(region="r1", coordinator_id="c1", spec=SPEC, signer=SIGNER,
                               gate=GateConfig(validation=False, canary=CFG, max_pending=2))
    c = CoordinatorCore(config, make_strategy("spin", k=1, timeout_s=None, clip_multiplier=0.0), toy_snapshot(),
                        rng=random.Random(0))
    seen(c, DEVICES)
    asked = sorted(invites(candidate(c, 1.0, 5.0)))
    candidate(c, 2.0, 6.0, dev="t2")
    acts = candidate(c, 3.0, 7.0, dev="t3")  # candidate 1 is superseded
    assert c.status().extra["gate"]["pending"] == [2, 3] and c.counters["gate_superseded"] == 1
    assert {m.candidate for m in invites(acts).values()} == {3}
    assert c.status().extra["gate"]["canary"]["round"]["candidate"] == 3
    c.handle(report(asked[0], GOOD, candidate=1, now=8.0))
    assert c.counters["canary_reject:canary_unknown_candidate"] == 1 and c.counters["canary_reports"] == 0


# ---------------------------------------------------------------------- the device core, end to end


def device(dev: str, *, signed: bool = True) -> DeviceCore:
    trusted = {SIGNER.kid: SIGNER.public_raw} if signed else {}
    return DeviceCore(DeviceConfig(device_id=dev, region="r1", spec=SPEC, min_samples=1000, request_timeout_s=5.0,
                                   trusted_keys=trusted, serve_on_start=False), rng=random.Random(0))


def relay(c: CoordinatorCore, d: DeviceCore, actions: Sequence[object], now: float) -> list[object]:
    """Deliver the device's publishes to the coordinator and its replies for this device back."""
    out: list[object] = []
    prefix = topics.device_topic("r1", d.config.device_id, "model")[: -len("model")]
    for a in actions:
        if isinstance(a, Publish) and a.topic.startswith(prefix):
            for r in c.handle(MessageReceived(now=now, topic=a.topic, payload=a.payload)):
                if isinstance(r, Publish) and r.topic.startswith(prefix):
                    out += d.handle(MessageReceived(now=now, topic=r.topic, payload=r.payload))
        out.append(a)
    return out


def test_a_device_fetches_the_candidate_scores_new_labels_and_reports_counts_only() -> None:
    c = core()
    fleet = {name: device(name) for name in DEVICES}
    for i, d in enumerate(fleet.values()):  # each device fetches the release: seen, and holds release 0
        d.state.release_wanted = 0
        relay(c, d, d.start(1.0 + 0.01 * i), 1.0 + 0.01 * i)
        assert d.state.deployed_version == 0 and d.state.phase is Phase.IDLE
    acts = candidate(c, 1.0, 5.0)
    asked = invites(acts)
    reports = []
    for name, ask in sorted(asked.items()):
        d = fleet[name]
        t = topics.device_topic("r1", name, "invite")
        out = relay(c, d, d.handle(MessageReceived(now=6.0, topic=t, payload=encode(ask, signer=SIGNER, scope=topics.device_scope("r1", "invite")))), 6.0)
        (start,) = of(out, StartCanary)
        assert (start.candidate, start.release) == (1, 0) and d.state.phase is Phase.IDLE
        np.testing.assert_array_equal(start.weights, 1.0)
        # a redelivered request changes nothing
        assert d.handle(MessageReceived(now=6.5, topic=t, payload=encode(ask, signer=SIGNER, scope=topics.device_scope("r1", "invite")))) == []
        out = []
        for k in range(20):  # 20 new labels, each scored before training: the candidate right on 3, the release on 19
            out += d.handle(CanaryScored(now=7.0 + k, candidate=1, release=0, candidate_right=k < 3, release_right=k > 0))
        (pub,) = of(out, Publish)
        rep = decode(pub.payload)
        assert isinstance(rep, CanaryReport) and pub.topic == topics.device_topic("r1", name, "update")
        assert rep.counts == (2, 1, 17, 0) and of(out, StopCanary)
        reports.append(pub)
        assert d.handle(CanaryScored(now=30.0, candidate=1, release=0, candidate_right=True, release_right=True)) == []
        # the request replayed after the round ended does not start it again (it did: hostile-input audit)
        assert d.handle(MessageReceived(now=31.0, topic=t, payload=encode(ask, signer=SIGNER, scope=topics.device_scope("r1", "invite")))) == []
        assert d.state.canary is None
    decided = []
    for pub in reports:
        decided += c.handle(MessageReceived(now=40.0, topic=pub.topic, payload=pub.payload))
    assert of(decided, RecordRelease)[0].event["action"] == "reject"


def asks(actions: Sequence[object]) -> dict[str, Publish]:
    """The signed canary requests among ``actions``, by device: as the broker delivers them."""
    return {decode(a.payload).device: a for a in of(actions, Publish) if a.topic.endswith("/invite")}  # type: ignore[union-attr]


def serve(c: CoordinatorCore, d: DeviceCore, ask: Publish, now: float, good: bool = True) -> list[Publish]:
    """The device takes the request, fetches the candidate, scores ``samples`` labels: its report
    (not delivered), or none when it refused the request."""
    out = relay(c, d, d.handle(MessageReceived(now=now, topic=ask.topic, payload=ask.payload)), now)
    if not of(out, StartCanary):
        return []
    samples = d.state.canary.samples  # type: ignore[union-attr]
    scored = [a for k in range(samples) for a in d.handle(CanaryScored(now=now + 1 + k, candidate=1, release=0,
                                                                      candidate_right=good, release_right=True))]
    return [a for a in of(scored, Publish) if a.topic.endswith("/update")]


def test_a_round_reopened_after_a_restart_gets_reports_from_devices_that_reported_before(tmp_path: Path) -> None:
    """helper-114: rounds are not persisted, so a restarted coordinator opens a new round on the
    candidate it gates again, asking the same cohort. A device that had reported to the old round
    refused the new request (it kept the (candidate, release) it served, the same again), so the
    round ended at its deadline short of reports. Each round now has its own nonce: the device
    refuses only a repeat of one it served, and the coordinator takes only reports of its round.
    (Only the commits are made durable here: no round is recorded, as in a state dir from before
    the record, so the restart opens a new round.)"""
    cfg = CanaryConfig(fraction=1.0, samples=4, min_reports=3, deadline_s=100.0, recent_s=1000.0)
    registry = Registry(tmp_path, SPEC)
    registry.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    booted = registry.load()  # the state dir's epoch: the restarted core numbers in the same one
    assert booted is not None and booted.epoch != 0
    config = CoordinatorConfig(region="r1", coordinator_id="c1", spec=SPEC, signer=SIGNER, gate=GateConfig(validation=False, canary=cfg))
    c = CoordinatorCore(config, make_strategy("spin", k=1, timeout_s=None, clip_multiplier=0.0), booted, rng=random.Random(0))
    fleet = {name: device(name) for name in DEVICES[:3]}
    for i, d in enumerate(fleet.values()):  # each fetches release 0: seen, and holds the release
        d.state.release_wanted = 0
        relay(c, d, d.start(1.0 + 0.01 * i), 1.0 + 0.01 * i)
    acts = candidate(c, 1.0, 5.0)
    for a in of(acts, CommitVersion):
        registry.commit(a)
    first = asks(acts)
    assert set(first) == set(fleet)  # the cohort: every device but the trainer
    early = sorted(fleet)[:2]
    old_reports = []
    for name in early:  # two of three report before the restart: the round waits for a third
        (pub,) = serve(c, fleet[name], first[name], 6.0)
        old_reports.append(pub)
        assert not of(c.handle(MessageReceived(now=12.0, topic=pub.topic, payload=pub.payload)), RecordRelease)
    assert c.counters["canary_reports"] == 2 and c.release[0] == 0
    registry.close()
    snap = Registry(tmp_path, SPEC).load()
    assert snap is not None
    restarted = CoordinatorCore(c.config, make_strategy("spin", k=1, timeout_s=None, clip_multiplier=0.0), snap,
                                rng=random.Random(0))
    restarted.start(30.0)
    seen(restarted, list(fleet), now=31.0)
    second = asks(restarted.handle(TimerFired(now=32.0)))
    assert set(second) == set(fleet)  # the same candidate, release and cohort: a new round
    nonces = {decode(a.payload).nonce for a in [*first.values(), *second.values()]}  # type: ignore[union-attr]
    assert len(nonces) == 2 and 0 not in nonces
    for pub in old_reports:  # sent to the old round, delivered after the restart: refused, counted, nothing moves
        acts = restarted.handle(MessageReceived(now=32.5, topic=pub.topic, payload=pub.payload))
        assert [n.data["reason"] for n in of(acts, Notify)] == ["canary_stale_round"]
        assert not of(acts, RecordRelease) and not of(acts, CommitVersion)
        assert [p.topic for p in of(acts, Publish)] in ([], [topics.status_topic("r1")])  # (the counts, in the status)
    canary = restarted.status().extra["gate"]["canary"]
    assert canary["rejected_by_reason"] == {"stale_round": 2} and canary["reports"] == 0 and canary["round"]["reports"] == 0
    assert restarted.release[0] == 0 and restarted.status().extra["gate"]["pending"] == [1]
    d = fleet[early[0]]  # a device refuses a replay of the old round's request: it took that round
    assert d.handle(MessageReceived(now=32.6, topic=first[early[0]].topic, payload=first[early[0]].payload)) == []
    decided: list[object] = []
    for name in sorted(fleet):  # each device serves the new round, the two that reported before too
        (pub,) = serve(restarted, fleet[name], second[name], 33.0)
        decided += restarted.handle(MessageReceived(now=40.0, topic=pub.topic, payload=pub.payload))
    (rec,) = of(decided, RecordRelease)
    assert rec.event["action"] == "promote" and rec.event["canary"]["reports"] == 3
    assert restarted.release[0] == 1


def durable(registry: Registry, actions: Sequence[object]) -> None:
    """What the daemon makes durable of ``actions``, in their order."""
    for a in actions:
        if isinstance(a, CommitVersion):
            registry.commit(a)
        elif isinstance(a, RecordCanaryRound):
            registry.record_canary_round(a.round)
        elif isinstance(a, RecordRelease):
            registry.record_release(a.release, a.pinned, a.event, a.floor)


def restart(c: CoordinatorCore, registry: Registry, tmp_path: Path) -> tuple[CoordinatorCore, Registry]:
    """The coordinator process dies (what was not made durable is lost) and starts on its state dir."""
    registry.close()
    registry = Registry(tmp_path, SPEC)
    snap = registry.load()
    assert snap is not None
    return CoordinatorCore(c.config, make_strategy("spin", k=1, timeout_s=None, clip_multiplier=0.0), snap, rng=random.Random(0)), registry


def opened_round(tmp_path: Path, n: int, cfg: CanaryConfig) -> tuple[CoordinatorCore, Registry, dict[str, DeviceCore], dict[str, Publish]]:
    """A coordinator on a real state dir, ``n`` devices holding release 0, and candidate 1 (built by
    "trainer") under a canary round asking all ``n`` (recorded, as the daemon does)."""
    registry = Registry(tmp_path, SPEC)
    registry.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    booted = registry.load()
    assert booted is not None
    config = CoordinatorConfig(region="r1", coordinator_id="c1", spec=SPEC, signer=SIGNER, gate=GateConfig(validation=False, canary=cfg))
    c = CoordinatorCore(config, make_strategy("spin", k=1, timeout_s=None, clip_multiplier=0.0), booted, rng=random.Random(0))
    fleet = {name: device(name) for name in DEVICES[:n]}
    for i, d in enumerate(fleet.values()):
        d.state.release_wanted = 0
        relay(c, d, d.start(1.0 + 0.01 * i), 1.0 + 0.01 * i)
    acts = candidate(c, 1.0, 5.0)
    durable(registry, acts)
    requests = asks(acts)
    assert set(requests) == set(fleet)
    return c, registry, fleet, requests


def deliver(c: CoordinatorCore, pub: Publish, now: float) -> list[object]:
    return list(c.handle(MessageReceived(now=now, topic=pub.topic, payload=pub.payload)))


def test_a_restarted_coordinator_resumes_the_recorded_round_and_its_cohort_reports_to_it(tmp_path: Path) -> None:
    """helper-114 / helper-120: over MQTT a restarted coordinator drew the new round's cohort among the
    devices seen since the restart (4 devices: a cohort of 2, below min_reports 3: it could only end
    held); the devices still scoring the old round send no pulls, and reported to a round that was
    gone (``canary_stale_round``). The open round is recorded now and resumed: the same nonce, cohort
    and deadline, the report recorded before the restart kept; the cohort's reports count, even those
    the broker hands over before start()."""
    cfg = CanaryConfig(fraction=1.0, samples=4, min_reports=3, deadline_s=100.0, recent_s=1000.0)
    c, registry, fleet, first = opened_round(tmp_path, 4, cfg)
    nonce = decode(first["d0"].payload).nonce  # type: ignore[union-attr]
    (pub,) = serve(c, fleet["d0"], first["d0"], 6.0)
    durable(registry, deliver(c, pub, 11.0))  # d0 reported before the restart
    for name in ("d1", "d2"):  # d1 and d2 took the request, fetched the candidate and score (2 labels of 4 so far)
        out = relay(c, fleet[name], fleet[name].handle(MessageReceived(now=6.0, topic=first[name].topic, payload=first[name].payload)), 6.0)
        assert of(out, StartCanary)
        for k in range(2):
            assert not of(fleet[name].handle(CanaryScored(now=7.0 + k, candidate=1, release=0, candidate_right=True, release_right=True)), Publish)
    # d3 never got its request (offline, or the broker lost it)
    restarted, registry = restart(c, registry, tmp_path)
    # d1 finishes while the coordinator is down: the broker keeps its report and hands it over first
    done1 = [a for k in range(2) for a in fleet["d1"].handle(CanaryScored(now=20.0 + k, candidate=1, release=0,
                                                                          candidate_right=True, release_right=True))]
    (rep1,) = [a for a in of(done1, Publish) if a.topic.endswith("/update")]
    early = deliver(restarted, rep1, 29.0)  # before start(): the recorded round is resumed for it
    assert [n.data.get("reason") for n in of(early, Notify) if n.kind == "rejected"] == []
    assert of(early, RecordCanaryRound) and restarted.counters["canary_resumed"] == 1
    durable(registry, early)
    again = asks(early)  # the members yet to report (at the resume, before d1's report) are asked again: the same round
    assert set(again) == {"d1", "d2", "d3"} and {decode(a.payload).nonce for a in again.values()} == {nonce}  # type: ignore[union-attr]
    assert all(0 < decode(a.payload).deadline_s <= 105.0 - 29.0 for a in again.values())  # type: ignore[union-attr]
    acts = list(restarted.start(30.0))
    assert not asks(acts) and restarted.counters["canary_no_cohort"] == 0 and restarted.counters["canary_rounds"] == 1
    status = restarted.status().extra["gate"]["canary"]
    assert status["round"] == {"candidate": 1, "release": 0, "cohort": 4, "reports": 2, "deadline": 105.0} and status["resumed"] == 1
    assert 105.0 in [a.at for a in of([*early, *acts], ScheduleTimer)]  # its deadline's wake-up
    for name in ("d1", "d2"):  # a round they took already: ignored
        assert fleet[name].handle(MessageReceived(now=31.0, topic=again[name].topic, payload=again[name].payload)) == []
    done2 = [a for k in range(2) for a in fleet["d2"].handle(CanaryScored(now=32.0 + k, candidate=1, release=0,
                                                                          candidate_right=True, release_right=True))]
    (rep2,) = [a for a in of(done2, Publish) if a.topic.endswith("/update")]
    decided = deliver(restarted, rep2, 40.0)
    (rec,) = of(decided, RecordRelease)
    assert rec.event["action"] == "promote" and rec.event["canary"]["reports"] == 3 and rec.event["canary"]["n"] == 12
    assert restarted.release[0] == 1 and restarted.counters["canary_rejected"] == 0


def test_a_report_accepted_but_not_recorded_before_a_crash_counts_once(tmp_path: Path) -> None:
    """The process dies between a report's acceptance and its record: the resumed round lacks it, and
    the broker redelivers it (QoS 1, never acknowledged): taken then, once. A redelivered report that
    was recorded is a duplicate; a report of another round is refused. Each is counted and changes
    nothing, and the decision counts every device once."""
    cfg = CanaryConfig(fraction=1.0, samples=4, min_reports=3, deadline_s=100.0, recent_s=1000.0)
    c, registry, fleet, first = opened_round(tmp_path, 3, cfg)
    nonce = decode(first["d0"].payload).nonce  # type: ignore[union-attr]
    reports = {name: serve(c, fleet[name], first[name], 6.0)[0] for name in ("d0", "d1")}
    durable(registry, deliver(c, reports["d0"], 11.0))
    lost = deliver(c, reports["d1"], 12.0)  # accepted ...
    assert of(lost, RecordCanaryRound) and c.counters["canary_reports"] == 2  # ... and the process dies before the record
    restarted, registry = restart(c, registry, tmp_path)
    acts = list(restarted.start(30.0))
    durable(registry, acts)
    assert restarted.status().extra["gate"]["canary"]["round"]["reports"] == 1
    assert set(asks(acts)) == {"d1", "d2"} and 105.0 in [a.at for a in of(acts, ScheduleTimer)]  # asked again; its deadline's wake-up
    refused = deliver(restarted, reports["d0"], 31.0)  # recorded before the crash: a duplicate now
    assert [n.data["reason"] for n in of(refused, Notify) if n.kind == "rejected"] == ["canary_duplicate"]
    assert not of(refused, RecordCanaryRound) and not of(refused, RecordRelease)
    stale = report("d2", (4, 0, 0, 0), now=31.5, nonce=nonce % (2**63 - 1) + 1)  # of another round
    refused = list(restarted.handle(stale))
    assert [n.data["reason"] for n in of(refused, Notify) if n.kind == "rejected"] == ["canary_stale_round"]
    assert not of(refused, RecordCanaryRound) and not of(refused, RecordRelease)
    taken = deliver(restarted, reports["d1"], 32.0)  # its redelivery: taken, once
    (rec,) = of(taken, RecordCanaryRound)
    assert sorted(rec.round["reports"]) == ["d0", "d1"] and not of(taken, RecordRelease)
    durable(registry, taken)
    assert [n.data["reason"] for n in of(deliver(restarted, reports["d1"], 33.0), Notify) if n.kind == "rejected"] == ["canary_duplicate"]
    (pub,) = serve(restarted, fleet["d2"], first["d2"], 34.0)
    (decision,) = of(deliver(restarted, pub, 40.0), RecordRelease)
    assert decision.event["action"] == "promote" and decision.event["canary"]["reports"] == 3 and decision.event["canary"]["n"] == 12
    status = restarted.status().extra["gate"]["canary"]
    assert status["rejected_by_reason"] == {"duplicate": 2, "stale_round": 1}


def test_a_round_whose_deadline_passed_while_down_ends_at_the_restart(tmp_path: Path) -> None:
    """Resumed past its deadline, the round ends at once with what was recorded (2 reports, fewer than
    min_reports: held, on a canary-only gate); a late report of it is refused and counted."""
    cfg = CanaryConfig(fraction=1.0, samples=4, min_reports=3, deadline_s=100.0, recent_s=1000.0)
    c, registry, fleet, first = opened_round(tmp_path, 3, cfg)
    late = {}
    for name in ("d0", "d1", "d2"):
        (late[name],) = serve(c, fleet[name], first[name], 6.0)
    for name in ("d0", "d1"):
        durable(registry, deliver(c, late[name], 11.0))
    restarted, registry = restart(c, registry, tmp_path)
    acts = list(restarted.start(500.0))  # the deadline was 105
    (rec,) = of(acts, RecordRelease)
    assert rec.event["action"] == "hold" and rec.event["canary"]["reports"] == 2
    assert not asks(acts) and restarted.counters["canary_rounds_expired"] == 1 and restarted.release[0] == 0
    assert restarted.status().extra["gate"]["canary"]["round"] is None
    refused = deliver(restarted, late["d2"], 501.0)
    assert [n.data["reason"] for n in of(refused, Notify) if n.kind == "rejected"] == ["canary_unknown_candidate"]
    assert not of(refused, RecordRelease) and not of(refused, RecordCanaryRound)


def test_a_decision_lost_after_its_report_was_recorded_is_made_at_the_restart(tmp_path: Path) -> None:
    """The process dies after the deciding report's record and before the decision's: the resumed
    round holds enough reports, and the gate decides at the restart (each device once)."""
    cfg = CanaryConfig(fraction=1.0, samples=4, min_reports=3, deadline_s=100.0, recent_s=1000.0)
    c, registry, fleet, first = opened_round(tmp_path, 3, cfg)
    taken: list[object] = []
    for name in sorted(fleet):
        (pub,) = serve(c, fleet[name], first[name], 6.0)
        taken += deliver(c, pub, 11.0)
    assert of(taken, RecordRelease) and c.release[0] == 1  # decided in memory ...
    durable(registry, [a for a in taken if isinstance(a, RecordCanaryRound)])  # ... and lost with the process
    restarted, registry = restart(c, registry, tmp_path)
    acts = list(restarted.start(30.0))
    (rec,) = of(acts, RecordRelease)
    assert rec.event["action"] == "promote" and rec.event["canary"]["reports"] == 3 and rec.event["canary"]["n"] == 12
    assert restarted.release[0] == 1 and not asks(acts) and restarted.status().extra["gate"]["canary"]["round"] is None
    registry.close()


def test_recorded_reports_wait_for_the_validation_score_after_a_restart(tmp_path: Path) -> None:
    """With a validation set: the round resumed past its deadline ends, and its recorded reports wait
    for the score of the candidate gated again, which decides on both (pooled)."""
    cfg = CanaryConfig(fraction=1.0, samples=4, min_reports=3, deadline_s=100.0, recent_s=1000.0)
    registry = Registry(tmp_path, SPEC)
    registry.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    booted = registry.load()
    assert booted is not None
    config = CoordinatorConfig(region="r1", coordinator_id="c1", spec=SPEC, signer=SIGNER, gate=GateConfig(validation=True, canary=cfg))
    c = CoordinatorCore(config, make_strategy("spin", k=1, timeout_s=None, clip_multiplier=0.0), booted, rng=random.Random(0))
    seen(c, DEVICES[:3])
    acts = candidate(c, 1.0, 5.0)
    durable(registry, acts)
    nonce = next(iter(invites(acts).values())).nonce
    taken: list[object] = []
    for name in DEVICES[:3]:
        taken += c.handle(report(name, (4, 0, 0, 0), now=10.0, nonce=nonce))
    durable(registry, taken)
    assert not of(taken, RecordRelease) and c.release[0] == 0  # all 3 in: waiting for the score
    restarted, registry = restart(c, registry, tmp_path)
    acts = list(restarted.start(500.0))
    assert of(acts, EvaluateCandidate) and not of(acts, RecordRelease) and not asks(acts)
    assert restarted.counters["canary_rounds_expired"] == 1 and restarted.status().extra["gate"]["pending"] == [1]
    (rec,) = of(restarted.handle(CandidateEvaluated(now=501.0, version=1, candidate_metric=0.9, release_metric=0.9,
                                                    release_version=0, paired=(2, 2, 200))), RecordRelease)
    assert rec.event["action"] == "promote" and rec.event["canary"]["reports"] == 3 and rec.event["paired"] == [2, 2, 200]
    registry.close()


def test_a_record_of_another_round_is_not_resumed(tmp_path: Path) -> None:
    """A record that does not match the candidate gated again, its release or the state dir's epoch,
    or a damaged file, is not resumed: a new round opens, with a new nonce."""
    cfg = CanaryConfig(fraction=1.0, samples=4, min_reports=3, deadline_s=100.0, recent_s=1000.0)
    c, registry, fleet, first = opened_round(tmp_path, 3, cfg)
    nonce = decode(first["d0"].payload).nonce  # type: ignore[union-attr]
    recorded = json.loads((tmp_path / "canary.json").read_text())
    assert recorded["nonce"] == nonce and recorded["cohort"] == ["d0", "d1", "d2"] and recorded["reports"] == {}
    for changed in ({"epoch": recorded["epoch"] + 1}, {"release": 7}, {"candidate": 9}, None):
        if changed is None:
            (tmp_path / "canary.json").write_bytes(b"{not json")
        else:
            (tmp_path / "canary.json").write_text(json.dumps({**recorded, **changed}))
        restarted, registry = restart(c, registry, tmp_path)
        restarted.start(30.0)
        seen(restarted, list(fleet), now=31.0)
        acts = list(restarted.handle(TimerFired(now=32.0)))
        assert restarted.counters.get("canary_resumed", 0) == 0 and set(asks(acts)) == set(fleet), changed
        assert {decode(a.payload).nonce for a in asks(acts).values()} != {nonce}  # type: ignore[union-attr]
    registry.close()


@pytest.mark.parametrize("damage", [
    {"epoch": 0}, {"nonce": 0}, {"nonce": 2**63}, {"candidate": True}, {"candidate": -1}, {"deadline": float("nan")},
    {"deadline": "soon"}, {"cohort": []}, {"cohort": ["d0", "bad/id"]}, {"cohort": "d0"}, {"reports": {"x": [1, 0, 0, 0]}},
    {"reports": {"d0": [1, 0, 0]}}, {"reports": {"d0": [-1, 0, 0, 0]}}, {"reports": {"d0": [10_001, 0, 0, 0]}},
    {"reports": {"d0": [1.0, 0, 0, 0]}}, {"reports": []}])
def test_a_damaged_round_record_is_refused(damage: dict[str, object]) -> None:
    rnd = CanaryRound(candidate=3, release=2, cohort=frozenset({"d0", "d1"}), deadline=105.0, nonce=77, reports={"d0": (4, 0, 0, 0)})
    record = rnd.record(123)
    again = CanaryRound.from_record(json.loads(json.dumps(record)), 123)
    assert again == rnd and CanaryRound.from_record(record, 124) is None
    assert CanaryRound.from_record({**record, **damage}, 123) is None


def test_a_device_takes_a_new_round_of_what_it_evaluates_and_keeps_its_counts() -> None:
    """helper-114: the coordinator restarted while the device scored: the new round's request (same
    candidate and release, another nonce) keeps the labels scored so far and the report echoes the
    new round. A request without a nonce (a coordinator from before them) is served once, as before."""
    d = device("a")
    d.state.deployed_version = 2
    t = topics.device_topic("r1", "a", "invite")

    def ask(nonce: int, at: float) -> list[object]:
        req = Canary(device="a", candidate=3, release=2, samples=3, deadline_s=50.0, nonce=nonce)
        return d.handle(MessageReceived(now=at, topic=t, payload=encode(req, signer=SIGNER, scope=topics.device_scope("r1", "invite"))))

    ask(11, 1.0)
    model = ModelMsg(model_id="toy", version=3, reply_to=-1, weights=np.ones(SPEC.size, np.float32), release=2)
    assert of(d.handle(MessageReceived(now=2.0, topic=topics.device_topic("r1", "a", "model"),
                                       payload=encode(model, signer=SIGNER, scope=topics.device_scope("r1", "model")))), StartCanary)
    d.handle(CanaryScored(now=3.0, candidate=3, release=2, candidate_right=True, release_right=False))
    out = ask(22, 4.0)  # the restarted coordinator's round
    assert not of(out, Publish) and not of(out, StopCanary) and of(out, Notify)[0].data["scored"] == 1
    assert ask(22, 4.5) == [] and ask(11, 4.6) == []  # a redelivery, a replay of the old round
    out = [a for k in range(2) for a in d.handle(CanaryScored(now=5.0 + k, candidate=3, release=2, candidate_right=True, release_right=True))]
    (pub,) = of(out, Publish)
    rep = decode(pub.payload)
    assert isinstance(rep, CanaryReport) and rep.counts == (2, 1, 0, 0) and rep.nonce == 22
    assert ask(11, 8.0) == [] and ask(22, 8.1) == [] and d.state.canary is None  # both rounds were taken
    assert of(ask(33, 9.0), Publish) and d.state.canary_nonces == (11, 22, 33)  # a third round: taken
    legacy = device("b")
    legacy.state.deployed_version = 2
    req = Canary(device="b", candidate=3, release=2, samples=3, deadline_s=50.0)  # no nonce
    payload = encode(req, signer=SIGNER, scope=topics.device_scope("r1", "invite"))
    bt = topics.device_topic("r1", "b", "invite")
    assert of(legacy.handle(MessageReceived(now=1.0, topic=bt, payload=payload)), Publish)
    legacy.handle(TimerFired(now=60.0))  # nothing scored by the deadline: given up
    assert legacy.state.canary is None and legacy.handle(MessageReceived(now=61.0, topic=bt, payload=payload)) == []


def test_a_canary_round_taken_is_pinned_first_and_refused_after_a_restart() -> None:
    """helper-144: ``canary_last`` / ``canary_nonces`` lived in memory only, so a restarted device
    took a replayed round again and scored it. A round taken is pinned (``PinCanary``, before the
    fetch it causes); a core built with the pins refuses its replay and takes a new round."""
    t = topics.device_topic("r1", "a", "invite")

    def ask(d: DeviceCore, nonce: int, at: float, epoch: int = 0) -> list[object]:
        req = Canary(device="a", candidate=3, release=2, samples=3, deadline_s=50.0, nonce=nonce, epoch=epoch)
        return d.handle(MessageReceived(now=at, topic=t, payload=encode(req, signer=SIGNER, scope=topics.device_scope("r1", "invite"))))

    def restarted(pins: Sequence[PinCanary], epochs: dict[str, int] | None = None) -> DeviceCore:
        return DeviceCore(DeviceConfig(device_id="a", region="r1", spec=SPEC, min_samples=1000, request_timeout_s=5.0,
                                       trusted_keys={SIGNER.kid: SIGNER.public_raw}, serve_on_start=False),
                          rng=random.Random(0), canaries=pins, epochs=epochs)

    first = device("a")
    out = ask(first, 11, 1.0)
    pin = out[0]
    assert pin == PinCanary(region="r1", epoch=0, candidate=3, release=2, nonces=(11,)) and of(out, Publish)
    again = restarted([pin])
    assert (again.state.canary_last, again.state.canary_nonces) == ((3, 2), (11,))
    assert ask(again, 11, 2.0) == [] and again.state.canary is None  # the replay: refused, nothing fetched
    out = ask(again, 22, 3.0)  # a new round (the coordinator restarted): taken, pinned with the one before
    assert of(out, PinCanary) == [PinCanary(region="r1", epoch=0, candidate=3, release=2, nonces=(11, 22))] and of(out, Publish)
    # A pin of the numbering before a reset, or of a region the device does not use, restores nothing.
    old = PinCanary(region="r1", epoch=1, candidate=3, release=2, nonces=(11,))
    assert of(ask(restarted([old], {"r1": 2}), 11, 1.0, epoch=2), Publish)
    assert ask(restarted([PinCanary(region="r1", epoch=2, candidate=3, release=2, nonces=(11,))], {"r1": 2}), 11, 1.0, epoch=2) == []
    assert of(ask(restarted([PinCanary(region="elsewhere", epoch=0, candidate=3, release=2, nonces=(11,))]), 11, 1.0), Publish)
    many = restarted([PinCanary(region="r1", epoch=0, candidate=3, release=2, nonces=tuple(range(1, 21)))])
    assert many.state.canary_nonces == tuple(range(13, 21))  # bounded as in memory: the newest CANARY_NONCES_KEPT


@pytest.mark.parametrize("bad", [{"region": ""}, {"epoch": -1}, {"candidate": True}, {"nonces": ()}, {"nonces": (1, "2")},
                                 {"nonces": [1]}, {"release": 2**63}])
def test_a_malformed_canary_pin_is_a_local_error(bad: dict[str, object]) -> None:
    from edge_sdk.errors import LocalProtocolError

    fields: dict[str, object] = {"region": "r1", "epoch": 0, "candidate": 3, "release": 2, "nonces": (11,), **bad}
    with pytest.raises(LocalProtocolError):
        PinCanary(**fields)  # type: ignore[arg-type]


def test_a_device_reports_what_it_has_at_the_deadline_and_refuses_unsigned_requests() -> None:
    d = device("a")
    ask = Canary(device="a", candidate=3, release=2, samples=20, deadline_s=50.0)
    t = topics.device_topic("r1", "a", "invite")
    unsigned = d.handle(MessageReceived(now=1.0, topic=t, payload=encode(ask)))
    assert of(unsigned, Notify)[0].data["reason"] == "unsigned" and d.state.canary is None
    forged = d.handle(MessageReceived(now=1.0, topic=t, payload=encode(ask, signer=Signer.generate(), scope=topics.device_scope("r1", "invite"))))
    assert of(forged, Notify)[0].data["reason"] == "bad_signature" and d.state.canary is None
    d.state.deployed_version = 2
    (pull,) = [decode(a.payload) for a in of(d.handle(MessageReceived(now=1.0, topic=t, payload=encode(ask, signer=SIGNER, scope=topics.device_scope("r1", "invite")))), Publish)]
    assert isinstance(pull, Pull) and pull.canary == 3 and pull.serve
    model = ModelMsg(model_id="toy", version=3, reply_to=-1, weights=np.ones(SPEC.size, np.float32), release=2)
    out = d.handle(MessageReceived(now=2.0, topic=topics.device_topic("r1", "a", "model"), payload=encode(model, signer=SIGNER, scope=topics.device_scope("r1", "model"))))
    assert of(out, StartCanary)
    d.handle(CanaryScored(now=3.0, candidate=3, release=2, candidate_right=True, release_right=False))
    d.handle(CanaryScored(now=4.0, candidate=3, release=1, candidate_right=True, release_right=True))  # another release: ignored
    out = d.handle(TimerFired(now=60.0))  # past the deadline: report the one label scored
    (pub,) = [a for a in of(out, Publish) if a.topic.endswith("/update")]
    rep = decode(pub.payload)
    assert isinstance(rep, CanaryReport) and rep.counts == (0, 1, 0, 0) and d.state.canary is None


def test_a_canary_request_for_another_device_is_refused() -> None:
    """A canary request names its device: one for another device, genuinely signed but replayed
    onto this device's invite topic, is a typed, counted rejection that starts no evaluation."""
    d = device("a")
    d.state.deployed_version = 2
    ask = Canary(device="b", candidate=3, release=2, samples=5, deadline_s=50.0)
    acts = d.handle(MessageReceived(now=1.0, topic=topics.device_topic("r1", "a", "invite"),
                                    payload=encode(ask, signer=SIGNER, scope=topics.device_scope("r1", "invite"))))
    assert [(n.kind, n.data.get("reason")) for n in of(acts, Notify)] == [("message_rejected", "topic_mismatch")]
    assert not of(acts, Publish) and d.state.counters["rejected:topic_mismatch"] == 1
    assert d.state.canary is None and d.state.phase is Phase.IDLE


def test_an_unanswered_canary_fetch_is_given_up() -> None:
    d = device("a")
    d.state.deployed_version = 2
    ask = Canary(device="a", candidate=3, release=2, samples=5, deadline_s=500.0)
    d.handle(MessageReceived(now=1.0, topic=topics.device_topic("r1", "a", "invite"), payload=encode(ask, signer=SIGNER, scope=topics.device_scope("r1", "invite"))))
    now, out = 1.0, []
    for _ in range(5):
        now += 400.0 if d.state.deadline is None else d.state.deadline - now + 0.1
        out = d.handle(TimerFired(now=min(now, 450.0)))
        if d.state.canary is None:
            break
    assert d.state.canary is None and d.state.phase is Phase.IDLE
    assert any(n.data.get("reason") == "unanswered" for n in of(out, Notify))


@pytest.mark.parametrize(("fraction", "extra"), [(1.5, {}), (-0.1, {}), (0.2, {"canary_min_reports": 1}), (0.2, {"canary_samples": 0})])
def test_the_daemon_refuses_bad_canary_options_before_pretraining(tmp_path: object, fraction: float, extra: dict[str, int]) -> None:
    from pathlib import Path

    from coordinator.daemon import CoordinatorDaemon, CoordinatorOptions

    state = Path(str(tmp_path)) / "coord"
    with pytest.raises(ConfigError):
        CoordinatorDaemon(CoordinatorOptions(broker="mqtt://127.0.0.1:1", region="r1", state_dir=state, canary=fraction,
                                             **extra))  # type: ignore[arg-type]
    assert not any((state / "versions").glob("*"))  # refused before anything was pretrained or committed


def test_edgeci_status_shows_the_gate_and_the_open_canary_round() -> None:
    from coordinator.cli_status import render
    from edge_sdk.wire.codec import status_json

    c = core()
    seen(c, DEVICES)
    asked = sorted(invites(candidate(c, 1.0, 5.0)))
    c.handle(report(asked[0], (10, 5, 3, 2)))
    c.handle(report("d-unknown", (0, 20, 0, 0)))  # refused: not in the cohort
    status = json.loads(status_json(c.status()))
    status.update(alive=True, published_at=20.0)
    text = render(status, 21.0)
    gate_line = next(ln for ln in text.splitlines() if ln.startswith("gate "))
    canary_line = next(ln for ln in text.splitlines() if ln.startswith("canary "))
    assert "pending 1" in gate_line and "promoted 0" in gate_line
    assert f"open: v1 vs release v0, 1/{len(asked)} reports" in canary_line
    assert "reports 1" in canary_line and "rejected 1 (not_in_cohort 1)" in canary_line
