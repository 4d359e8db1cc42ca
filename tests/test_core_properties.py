"""Hypothesis properties over device cores + a coordinator core on an in-memory link:
whatever the arrivals, duplicates, drops and crashes —

* versions only grow, by one per commit;
* every accepted update lands in exactly one aggregation (none lost, none applied twice),
  across coordinator restarts from the last checkpoint;
* an aggregation never happens on an empty buffer (the timeout never fires on nothing).
"""

from __future__ import annotations

import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.core import Snapshot
from edge_sdk.spec import FULL
from tests.helpers import Link, make_coordinator, toy_snapshot

scenario = st.fixed_dictionaries(
    {
        "n_devices": st.integers(1, 6),
        "k": st.integers(1, 5),
        "timeout": st.sampled_from([None, 0.5, 3.0]),
        "arrivals": st.lists(st.tuples(st.integers(0, 5), st.floats(0, 40)), min_size=1, max_size=40),
        "duplicate_every": st.sampled_from([0, 2, 3]),
        "drop_seed": st.integers(0, 1000),
        "drop_rate": st.sampled_from([0.0, 0.1, 0.3]),
        "crash_at": st.lists(st.floats(1, 60), max_size=3),
    }
)


@settings(max_examples=120, deadline=None)
@given(scenario)
def test_versions_grow_and_every_accepted_update_is_applied_exactly_once(sc: dict) -> None:  # type: ignore[type-arg]
    drop_rng = random.Random(sc["drop_seed"])
    params = {"k": sc["k"], "timeout_s": sc["timeout"]}
    link = Link(
        coordinator=make_coordinator("spin", **params),
        duplicate_every=sc["duplicate_every"],
        drop=lambda topic, payload: not topic.endswith("/status") and drop_rng.random() < sc["drop_rate"],
    )
    n = sc["n_devices"]
    for i in range(n):
        link.add_device(f"d{i}", min_samples=2, seed=i)
    totals = Counter[str]()
    for dev, t in sorted(sc["arrivals"], key=lambda a: a[1]):
        name = f"d{dev % n}"
        totals[name] += 1
        link.add_sample(name, totals[name], at=t)

    for crash in sorted(sc["crash_at"]):
        link.run_until(crash)
        # Crash + restart from what the registry would hold: last commit + persisted files.
        last = link.commits[-1] if link.commits else None
        applied: dict[str, int] = {}  # what the registry keeps: every commit's changed watermarks
        for c in link.commits:
            applied.update(c.applied_changed)
        snap = Snapshot(
            version=last.version if last else 0,
            weights=last.weights if last else toy_snapshot().weights,
            applied_upto=applied,
            buffer=[p.update for p in link.persisted],
            last_aggregation_at=link.now,
        )
        link.restart(make_coordinator("spin", snapshot=snap, **params))
    link.run_until(10_000.0)

    versions = [c.version for c in link.commits]
    assert versions == list(range(1, len(versions) + 1))
    assert all(c.metadata["n_updates"] >= 1 for c in link.commits)
    consumed = Counter(key for c in link.commits for key in c.consumed)
    assert all(v == 1 for v in consumed.values()), "an update was applied twice"
    accepted = {p.update.key for p in link.persisted}
    pending = {u.key for u in link.coordinator.buffer}
    assert set(consumed) | pending == accepted, "an accepted update was lost"
    assert not (set(consumed) & pending)
    if sc["timeout"] is not None:
        assert not pending  # with a timeout every accepted update is eventually aggregated
    assert all(u.group == FULL for u in link.coordinator.buffer)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 8), st.integers(1, 4))
def test_lossless_link_every_device_trains_on_all_its_samples(n_devices: int, per_device: int) -> None:
    link = Link(coordinator=make_coordinator("spin", k=2, timeout_s=1.0))
    for i in range(n_devices):
        link.add_device(f"d{i}", min_samples=1, seed=i)
        for s in range(per_device):
            link.add_sample(f"d{i}", s + 1, at=0.1 * s)
    link.run_until(1000.0)
    for core in link.devices.values():
        assert core.state.trained_upto == per_device
        assert core.state.phase.value == "idle"
    assert link.coordinator.counters["accepted"] >= n_devices
    assert not link.coordinator.buffer
