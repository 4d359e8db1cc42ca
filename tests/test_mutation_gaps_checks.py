"""Tests that kill mutants of the checks beside the core — ``coordinator/validation.py`` (the
operator's validation set), ``coordinator/canary.py`` (canary rounds and their records),
``coordinator/conversion.py`` (converting staleness policies) — and of the core's parked-conversion
paths that helper-158 left unexamined, which every covering test let through (helper-188's mutation
audit; each docstring names the line at the audit's base commit, af6b3a9, and the mutation).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.canary import CanaryConfig, CanaryRound
from coordinator.conversion import ConversionConfig, SwitchTracker, disparity
from coordinator.core import CommitVersion, ConvertUpdate, UpdateConverted
from coordinator.validation import load_validation
from edge_sdk.errors import ConfigError
from edge_sdk.wire.codec import decode
from tests.helpers import SPEC
from tests.test_canary import (
    DEVICES,
    MEH,
    asks,
    candidate,
    durable,
    invites,
    opened_round,
    restart,
    seen,
)
from tests.test_canary import core as canary_core
from tests.test_canary import report as canary_report
from tests.test_conversion import converting_core, upd
from tests.test_validation_file import BOX, FrameTask, write


def _applied(actions: list[Any], core: Any) -> list[tuple[str, int]]:
    """Every (device, seq) the commits in ``actions`` consumed, then what the core still buffers."""
    keys = [k for a in actions if isinstance(a, CommitVersion) for k in a.consumed]
    return keys + [u.key for u in core.buffer]


def test_an_update_queued_behind_a_conversion_that_is_parked_again_keeps_the_rest_behind_it() -> None:
    """core.py:1732-1733 (``_release_device``): ``self._parked_devices[update.device].extend(queue)``
    deleted (the updates queued behind a re-parked one are dropped: accepted, acknowledged, never
    applied), or its ``break`` deleted (they are applied at once, ahead of the re-parked one, and again
    after it). No test queued a second very stale update behind a parked one. slow's seq 0 and 1 are
    both staler than the bound, seq 2 is fresh: each is applied once, in seq order."""
    c = converting_core()  # K = 2, converts updates staler than 2; at version 4
    (req0,) = [a for a in c.handle(upd("slow", 0, 9.0, base=0)) if isinstance(a, ConvertUpdate)]
    actions: list[Any] = []
    actions += c.handle(upd("slow", 1, 8.0, base=0))  # stale too: queued behind seq 0
    actions += c.handle(upd("slow", 2, 7.0, base=4))  # fresh: queued behind both
    assert not [a for a in actions if isinstance(a, ConvertUpdate)] and not c.buffer
    acts = c.handle(UpdateConverted(now=1.0, ticket=req0.ticket, weights=np.full(SPEC.size, 5.0, dtype=np.float32)))
    (req1,) = [a for a in acts if isinstance(a, ConvertUpdate)]  # seq 1 parked in its turn
    assert req1.device == "slow" and [u.key for u in c.buffer] == [("slow", 0)]
    actions += acts
    actions += c.handle(UpdateConverted(now=2.0, ticket=req1.ticket, weights=np.full(SPEC.size, 6.0, dtype=np.float32)))
    assert _applied(actions, c) == [("slow", 0), ("slow", 1), ("slow", 2)]


def test_a_rollback_takes_the_updates_queued_behind_a_parked_one_with_the_buffer() -> None:
    """core.py:1748-1749 (``_abandon_conversions``): ``self._buffer.extend(queue)`` deleted — the updates
    queued behind a parked one vanished at a rollback (accepted and acknowledged, never applied nor
    counted as consumed). test_conversion's rollback test parks one update and queues none. Called
    directly, as that test does (a rollback needs a signed operator command)."""
    c = converting_core()
    c.handle(upd("slow", 0, 9.0, base=0))
    c.handle(upd("slow", 1, 7.0, base=4))  # queued behind the parked one
    c._abandon_conversions()
    assert [u.key for u in c.buffer] == [("slow", 0), ("slow", 1)]
    assert not c.status().extra["conversion"]["parked"]


# ---------------------------------------------------------------------- coordinator/validation.py


def test_frames_without_height_are_refused_as_frames_not_for_their_boxes(tmp_path: Path) -> None:
    """validation.py:154 ``x.shape[1] < 1`` -> ``x.shape[2] < 1`` (frames 0 pixels high passed the
    shape check, then every box was refused as outside its frame: an error about the boxes, not the
    frames). test_validation_file's bad-frames cases vary the dtype and channels, never a zero side."""
    x = np.zeros((2, 0, 48, 3), np.uint8)
    with pytest.raises(ConfigError, match=r"x must be \(N, H, W, 3\) uint8 RGB frames"):
        load_validation(write(tmp_path / "val.npz", x=x, boxes=[BOX], box_counts=[1, 0]), FrameTask())  # type: ignore[arg-type]


# ---------------------------------------------------------------------- coordinator/canary.py


@pytest.mark.parametrize("field", ["candidate", "release", "nonce"])
def test_a_round_record_s_numbers_are_taken_up_to_2_63_minus_1_and_refused_beyond(field: str) -> None:
    """canary.py:206 (``CanaryRound.from_record``): the upper bound ``2**63 - 1`` of the candidate, the
    release or the nonce made ``2**63 - 2`` (a record at the bound, as the wire's int64 allows, refused:
    its round opened anew instead of resumed) or ``3**63 - 1`` (a foreign record beyond it resumed).
    test_canary's damaged-record cases go past the nonce's bound only."""
    rnd = CanaryRound(candidate=3, release=2, cohort=frozenset({"d0", "d1"}), deadline=105.0, nonce=77, reports={"d0": (4, 0, 0, 0)})
    record = json.loads(json.dumps(rnd.record(123)))
    top = CanaryRound.from_record({**record, field: 2**63 - 1}, 123)
    assert top is not None and getattr(top, field) == 2**63 - 1
    assert CanaryRound.from_record({**record, field: 2**63}, 123) is None


# ---------------------------------------------------------------------- coordinator/conversion.py


def test_the_cosine_distance_to_a_zero_change_is_one_not_nan() -> None:
    """conversion.py:112 (``disparity``) ``na > 0 and nb > 0`` -> ``or``: a zero change against a
    non-zero one divided 0 by 0 (a NaN cosine distance, which no median compares above 0: that
    device's observation could never count for the switch). A device whose update equals its base
    (no samples changed it) sends one; test_conversion compares only non-zero changes."""
    zero, ones = np.zeros(8, np.float32), np.ones(8, np.float32)
    assert disparity(zero, ones) == (1.0, 1.0)
    assert disparity(ones, zero) == (1.0, 1.0)
    assert disparity(zero, zero) == (0.0, 1.0)


def test_an_estimate_that_fills_the_byte_bound_exactly_is_kept() -> None:
    """conversion.py:133 (``SwitchTracker.__init__``) ``self._bytes = 0`` -> ``1``: the tracker's count
    of the bytes it holds started one byte high, so an estimate filling ``max_tracked_bytes``
    exactly was forgotten at once. test_conversion bounds the memory far from the edge."""
    est, stale = np.ones(8, np.float32), np.zeros(8, np.float32)
    tracker = SwitchTracker(ConversionConfig(max_tracked_bytes=est.nbytes + stale.nbytes))
    tracker.record("d0", 4, est, stale)
    assert tracker.tracking("d0")
    tracker.record("d1", 4, est, stale)  # one more does not fit: the least recent goes
    assert tracker.tracking("d1") and not tracker.tracking("d0")


# ---------------------------------------------------------------------- the canary counts' reset (core.py)


def test_a_round_s_split_reports_wait_for_the_rest_of_its_cohort() -> None:
    """core.py:2084 (``_canary_start``) ``gate.reset_canary(version, expected=len(cohort))`` deleted: the
    gate never learnt how many devices were asked (0), so three inconclusive reports of a cohort of five
    were held at once instead of waiting for the other two (test_canary's waiting test sets the gate's
    count itself). The core, a cohort of 5: no decision after 3 such reports, held after the fifth."""
    c = canary_core()
    seen(c, DEVICES)
    asked = invites(candidate(c, 1.0, 5.0))
    assert len(asked) == 5
    names = sorted(asked)
    for d in names[:3]:
        c.handle(canary_report(d, MEH, nonce=asked[d].nonce))
    assert c.counters["gate_held"] == 0 and c.status().extra["gate"]["canary"]["round"]["reports"] == 3
    for d in names[3:]:
        c.handle(canary_report(d, MEH, nonce=asked[d].nonce))
    assert c.counters["gate_held"] == 1


def test_a_resumed_round_s_split_reports_wait_for_the_rest_of_its_cohort(tmp_path: Path) -> None:
    """core.py:2115 (``_canary_resumed``) ``gate.reset_canary(rnd.candidate, expected=len(rnd.cohort))``
    deleted: after a restart the gate did not know the cohort's size, so the recorded reports alone
    decided (held at the resume) however many of the cohort had yet to report. Five asked, three split
    reports recorded, a restart: the round is resumed and still open, the other two asked again."""
    cfg = CanaryConfig(fraction=1.0, samples=20, min_reports=3, deadline_s=100.0, recent_s=1000.0)
    c, registry, _fleet, first = opened_round(tmp_path, 5, cfg)
    for d in ("d0", "d1", "d2"):
        nonce = decode(first[d].payload).nonce  # type: ignore[union-attr]
        durable(registry, c.handle(canary_report(d, MEH, nonce=nonce, now=10.0)))
    assert c.counters["gate_held"] == 0
    restarted, registry = restart(c, registry, tmp_path)
    try:
        acts = list(restarted.start(30.0))
        assert restarted.counters["canary_resumed"] == 1 and restarted.counters["gate_held"] == 0
        assert restarted.status().extra["gate"]["canary"]["round"]["reports"] == 3
        assert set(asks(acts)) == {"d3", "d4"}
    finally:
        registry.close()
