"""A device core's generator built on its first draw (``devices.engine.rng``): the same draws
as the eager ``random.Random`` it replaces, and devices that never label never build one."""

from __future__ import annotations

import copy
import random
from typing import Any

import pytest

from devices import simulator
from devices.engine.rng import SeededOnUse
from tests.test_emulator import simulate, small_scenario


def test_draws_are_those_of_the_seeded_random() -> None:
    lazy, eager = SeededOnUse("7:core:", 42), random.Random("7:core:42")
    assert not lazy.seeded
    # What DeviceCore draws (jitter, nonces), then a method reached through __getattr__.
    draws = [(lazy.random(), eager.random()), (lazy.randrange(1, 2**63), eager.randrange(1, 2**63)),
             (lazy.randrange(10), eager.randrange(10)), (lazy.uniform(2.0, 3.0), eager.uniform(2.0, 3.0))]
    assert lazy.seeded
    assert all(a == b for a, b in draws)
    twin = copy.copy(lazy)  # shares the generator, as a copy of a core would
    assert twin.random() == eager.random()
    with pytest.raises(AttributeError):
        _ = SeededOnUse("x", 1)._missing  # private names never build the generator


def _scenario() -> dict[str, Any]:
    # 4 labels/h over 15 min: about a third of the devices never label.
    return small_scenario(data={"partition": "iid", "arrival_rate_per_h": 4}, device={"min_samples": 1},
                          fleet={"devices": 24, "mix": {"phone": 1, "camera": 1}})


def test_devices_that_never_label_never_build_a_generator() -> None:
    sim = simulate(_scenario())
    idle = [dev.core._rng for dev in sim.devices if not dev.plan.label_times.shape[0]]
    busy = [dev.core._rng for dev in sim.devices if dev.plan.label_times.shape[0]]
    assert idle and busy
    assert all(isinstance(r, SeededOnUse) and not r.seeded for r in idle)
    assert all(type(r) is random.Random for r in busy)  # seeded before the loop: it draws in the loop
    result = sim.run()
    assert result.summary["updates_accepted"] > 0
    assert all(isinstance(r, SeededOnUse) and not r.seeded for r in idle)


def test_results_equal_those_with_eager_generators(monkeypatch: pytest.MonkeyPatch) -> None:
    lazy = simulate(_scenario()).run()
    monkeypatch.setattr(simulator, "SeededOnUse", lambda prefix, index: random.Random(f"{prefix}{index}"))
    eager_sim = simulate(_scenario())
    assert all(type(dev.core._rng) is random.Random for dev in eager_sim.devices)
    eager = eager_sim.run()
    assert lazy.rows == eager.rows
    timing = {"wall_s", "virtual_per_wall"}  # this process's speed, not the run's results
    assert {k: v for k, v in lazy.summary.items() if k not in timing} == {k: v for k, v in eager.summary.items() if k not in timing}
