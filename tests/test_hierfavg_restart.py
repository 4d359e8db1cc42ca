"""HierFAVG through a restart (helper-175): what the edge and the cloud keep with each commit.

Sans-IO, as tests/test_peering.py: a restart is the checkpoint through JSON into a fresh strategy
and peering (the core restores the peering first, then the strategy). An edge restarted while it
waits for the cloud waits still and takes the cloud's answer; a cloud restarted while collecting
puts its own model back and closes the round with the edges' models; the samples claimed and the
edge's draws go on. A selection round drawn after the last commit is kept by the core's round record
(``RecordSelectionRound``): tests/test_restart_transparency.py's ``hierfavg`` cases restart it through a
real registry."""

from __future__ import annotations

import json
import random
from typing import Any

import numpy as np
import pytest

from coordinator.peering.hier import HierPeerConfig, HierPeering
from coordinator.strategies.base import BufferedUpdate, StaticView
from coordinator.strategies.fedavg import FedAvgConfig
from coordinator.strategies.hierfavg import HierEdgeStrategy
from tests.peering_harness import SPEC, View, msg_from, vec

RING = ["cloud", "e1"]
CFG = HierPeerConfig(kappa2=1, sync_timeout_s=30.0, max_share=1.0)


def _node(name: str) -> tuple[HierEdgeStrategy, HierPeering]:
    s = HierEdgeStrategy(FedAvgConfig(select=5, min_devices=1))
    return s, HierPeering(name, RING, CFG, strategy=s)


def _restarted(name: str, strategy: HierEdgeStrategy, peering: HierPeering) -> tuple[HierEdgeStrategy, HierPeering]:
    s, p = _node(name)
    p.restore(json.loads(json.dumps(peering.checkpoint())))
    s.restore_state(json.loads(json.dumps(strategy.checkpoint())))
    return s, p


def test_an_edge_restarted_while_it_waits_for_the_cloud_waits_still_and_takes_its_answer() -> None:
    """The old restart forgot it waited: it drew a round at once and ignored the global as late."""
    s, p = _node("e1")
    s.gate.samples = 30
    sent = p.on_version(View(weights=vec(3.0), version=4), 2.0)
    assert sent.sends and s.gate.waiting
    s, p = _restarted("e1", s, p)
    assert s.gate.waiting and p.wake_at() == 32.0 and p.cloud_round == 1
    view = View(weights=vec(3.0), version=4)
    assert s.plan(view, 3.0, random.Random(0)).invite == ()  # no edge round while it waits
    back = p.on_message(view, msg_from("cloud", "global", {"round": 1}, vec(2.0)), 5.0)
    assert back.merged is not None and not s.gate.waiting and p.ignored == 0
    np.testing.assert_array_equal(back.merged, vec(2.0))


def test_a_cloud_restarted_while_collecting_closes_the_round_with_its_own_model() -> None:
    """The old restart lost its own model from the collection: the edge's waited for the cloud's
    next round and was averaged with that round's model. Now the round closes as it would have."""
    def cloud_round(restart: bool) -> Any:
        s, p = _node("cloud")
        s.gate.samples = 10
        assert p.on_version(View(weights=vec(1.0), version=3), 1.0).merged is None and s.gate.waiting
        if restart:
            s, p = _restarted("cloud", s, p)
        return p.on_message(View(weights=vec(1.0), version=3), msg_from("e1", "edge", {"round": 1, "samples": 30}, vec(3.0)), 2.5)

    straight, restarted = cloud_round(False), cloud_round(True)
    assert straight.merged is not None and restarted.merged is not None
    np.testing.assert_array_equal(restarted.merged, straight.merged)  # (10·1 + 30·3) / 40
    assert restarted.sends[0].body == {"round": 1}


def test_a_cloud_restarted_onto_another_head_waits_no_longer() -> None:
    s, p = _node("cloud")
    p.on_version(View(weights=vec(1.0), version=3), 1.0)
    s, p = _restarted("cloud", s, p)
    p.on_timer(View(weights=vec(0.0), version=5), 2.0)  # (a rollback since: not the model it put in)
    assert not s.gate.waiting and "cloud" not in p.collected


def test_the_samples_claimed_and_the_edge_draws_go_on_after_a_restart() -> None:
    """The old restart claimed 0 samples with the next model sent, counted rounds from 0 and drew
    from ``random.Random(seed)`` again (the run's first draws)."""
    s, p = _node("e1")
    s.gate.samples = 25
    rng = random.Random(4)
    view = StaticView(spec=SPEC, version=2, weights=vec(0.0), deferred=dict.fromkeys("abcdefg", 0.0))
    drawn = s.plan(view, 1.0, rng).invite
    assert len(drawn) == 5 and s.round == 1
    s2, p2 = _restarted("e1", s, p)
    assert s2.gate.samples == 25 and s2.round == 1  # were 0 and 0
    assert s2.draws.rng(random.Random(4)).random() == s.draws.rng(rng).random()
    assert s2.describe() == s.describe() and "restore_refused" not in p2.describe()
    sent = p2.on_version(View(weights=vec(1.0), version=3), 2.0).sends
    assert sent[0].body == {"round": 1, "samples": 25}


def test_an_open_edge_round_in_a_checkpoint_resumes_without_the_devices_replayed() -> None:
    """What a record of the round as drawn (the proposed RecordSelectionRound) gives the strategy:
    its participants and start; a replayed update's device no longer waited for. A commit never
    holds one (it closes the round). Damaged: counted, not resumed."""
    s, _ = _node("e1")
    view = StaticView(spec=SPEC, version=2, weights=vec(0.0), deferred=dict.fromkeys("abc", 0.0))
    drawn = s.plan(view, 1.0, random.Random(1)).invite
    state = json.loads(json.dumps(s.checkpoint()))
    resumed, _ = _node("e1")
    resumed.restore_state(state)
    assert resumed.participants == set(drawn) and resumed.round_started_at == 1.0 and resumed.restore_refused == 0
    resumed.on_restore(view, BufferedUpdate(device=drawn[0], seq=1, base_version=2, staleness=0, n_samples=1, weights=vec(0.0)))
    assert resumed.participants == set(drawn[1:])
    damaged, _ = _node("e1")
    damaged.restore_state({**state, "started_at": "x"})
    assert damaged.round_started_at is None and not damaged.participants and damaged.restore_refused == 1


@pytest.mark.parametrize("junk", [{"samples": -5}, {"waiting": "x"}, {"waiting": {"version": -1, "since": 1.0}},
                                  {"waiting": {"version": 4, "since": float("inf")}}, {"waiting": {"version": 4, "since": 1.0, "claim": "9"}}])
def test_a_damaged_hierfavg_peering_state_is_counted_and_changes_nothing(junk: dict[str, Any]) -> None:
    s, p = _node("e1")
    p.restore({"edge_rounds": 3, "cloud_round": 2, **junk})
    assert p.restore_refused == 1 and p.describe()["restore_refused"] == 1
    assert (p.edge_rounds, p.cloud_round, s.gate.waiting, s.gate.samples) == (3, 2, False, 0)
