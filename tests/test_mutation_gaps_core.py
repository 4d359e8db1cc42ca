"""Behaviours of CoordinatorCore that no test checked (helper-158's mutation audit).

Each test here kills a mutant of coordinator/core.py that survived every unit test covering its
line; the docstrings name it (file:line at the audit's commit, and the mutation)."""

from __future__ import annotations

import numpy as np

from coordinator.core import CoordinatorCore, Snapshot
from tests.helpers import SPEC, make_coordinator
from tests.test_coordinator_core import acks, upd


def _outcomes(c: CoordinatorCore, bases: range) -> dict[int, tuple[str, str]]:
    out = {}
    for base in bases:
        (ack,) = acks(c.handle(upd(f"d{base}", 0, base=base)))
        out[base] = (ack.status, ack.reason)
    return out


def test_a_recorded_rejection_abandons_every_version_built_on_the_candidate_after_a_restart() -> None:
    """core.py:558 ``type(through) is int`` -> ``is not``: the restored range shrank to the
    candidate alone, and updates trained from versions 6 and 7 (built on rejected 5) were taken."""
    w = np.zeros(SPEC.size, np.float32)
    snap = Snapshot(version=8, weights=w, release_version=4, release_weights=w + 1,
                    gate_history=[{"action": "reject", "version": 5, "through": 7}])
    c = make_coordinator(k=10, timeout_s=None, snapshot=snap)
    c.start(0.0)
    refused = ("rejected", "base_rejected")
    assert _outcomes(c, range(4, 9)) == {4: ("accepted", ""), 5: refused, 6: refused, 7: refused,
                                         8: ("accepted", "")}
    assert c.counters["reject:base_rejected"] == 3


def test_a_recorded_range_that_holds_the_release_abandons_nothing() -> None:
    """core.py:629 ``span[0]`` -> ``span[1]``: a decision whose range holds the restored release
    (here an operator's rollback from 1 that abandoned 2..5, the release restored as 3) must not
    make updates from those versions refused; the mutant refused 2..4."""
    w = np.zeros(SPEC.size, np.float32)
    snap = Snapshot(version=6, weights=w, release_version=3, release_weights=w + 1,
                    gate_history=[{"action": "rollback", "version": 6, "of": 1}])
    c = make_coordinator(k=10, timeout_s=None, snapshot=snap)
    c.start(0.0)
    assert {b: o[0] for b, o in _outcomes(c, range(1, 7)).items()} == dict.fromkeys(range(1, 7), "accepted")
