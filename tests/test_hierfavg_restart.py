"""HierFAVG through a restart (helper-175): what the edge and the cloud keep with each commit.

Sans-IO, as tests/test_peering.py: a restart is the checkpoint through JSON into a fresh strategy
and peering (the core restores the peering first, then the strategy). An edge restarted while it
waits for the cloud waits still and takes the cloud's answer; a cloud restarted while collecting
puts its own model back and asks the edges for theirs again (helper-177, ``resend``: an edge still
waiting sends its model once more); the samples claimed and the edge's draws go on. A selection round
drawn after the last commit is kept by the core's round record (``RecordSelectionRound``):
tests/test_restart_transparency.py's ``hierfavg`` cases restart it through a real registry."""

from __future__ import annotations

import json
import math
import random
from typing import Any

import numpy as np
import pytest

from coordinator.peering.hier import HierPeerConfig, HierPeering
from coordinator.strategies.base import BufferedUpdate, StaticView
from coordinator.strategies.fedavg import FedAvgConfig
from coordinator.strategies.hierfavg import HierEdgeStrategy
from edge_sdk.errors import MalformedMessage
from edge_sdk.wire.messages import PeerMsg
from tests.peering_harness import SPEC, View, msg_from, vec

RING = ["cloud", "e1"]
CFG = HierPeerConfig(kappa2=1, sync_timeout_s=30.0, max_share=1.0)


def _node(name: str) -> tuple[HierEdgeStrategy, HierPeering]:
    s = HierEdgeStrategy(FedAvgConfig(select=5, min_devices=1))
    return s, HierPeering(name, RING, CFG, strategy=s)


def _restarted(name: str, strategy: HierEdgeStrategy, peering: HierPeering) -> tuple[HierEdgeStrategy, HierPeering]:
    s, p = _node(name) if peering.ring == tuple(RING) else _node3(name)
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


RING3 = ["cloud", "e1", "e2"]


def _node3(name: str) -> tuple[HierEdgeStrategy, HierPeering]:
    s = HierEdgeStrategy(FedAvgConfig(select=5, min_devices=1))
    return s, HierPeering(name, RING3, CFG, strategy=s)


def _relay(plan: Any, sender: str) -> list[PeerMsg]:
    return [msg_from(sender, send.kind, send.body, send.weights) for send in plan.sends]


def test_a_restarted_cloud_asks_the_edges_for_the_open_rounds_models() -> None:
    """helper-177: the restarted cloud had lost e1's model of the open round (only its own went back): the
    round waited for e1's until its deadline and closed on the cloud's and e2's, (10·1 + 50·5) / 60 = 4.33,
    where the run without the restart averaged (10·1 + 30·3 + 50·5) / 90 = 3.89. Now it asks for them
    (``resend``) and e1, still waiting, sends its model again: the round as without the restart."""
    def cloud_round(restart: bool) -> tuple[Any, HierPeering, HierPeering, list[PeerMsg]]:
        cs, cloud = _node3("cloud")
        es, e1 = _node3("e1")
        cs.gate.samples, es.gate.samples = 10, 30
        cview, eview = View(weights=vec(1.0), version=3), View(weights=vec(3.0), version=7)
        cloud.on_version(cview, 1.0)
        (sent,) = _relay(e1.on_version(eview, 1.5), "e1")
        assert cloud.on_message(cview, sent, 2.0).merged is None  # e2's to come
        asked: list[PeerMsg] = []
        if restart:
            cs, cloud = _restarted("cloud", cs, cloud)
            asked = _relay(cloud.on_timer(cview, 4.0), "cloud")  # (the core's first timer after the start)
            for ask in asked:
                for again in _relay(e1.on_message(eview, ask, 4.5), "e1"):
                    assert cloud.on_message(cview, again, 5.0).merged is None
        plan = cloud.on_message(cview, msg_from("e2", "edge", {"round": 1, "samples": 50}, vec(5.0)), 6.0)
        if plan.merged is None:
            plan = cloud.on_timer(cview, 60.0)  # (the old code: e1's model never came)
        return plan, cloud, e1, asked

    (straight, _, _, _), (restarted, cloud, e1, asked) = cloud_round(False), cloud_round(True)
    assert straight.merged is not None and restarted.merged is not None
    np.testing.assert_array_equal(restarted.merged, straight.merged)  # (10·1 + 30·3 + 50·5) / 90
    assert restarted.sends[0].body == {"round": 1} and cloud.describe()["resends"] == 1 and cloud.timeouts == 0
    (ask,) = asked
    assert ask.kind == "resend" and ask.body == {"round": 1, "at": 4.0} and ask.weights is None
    assert e1.resends == 1 and e1.wait_started == 4.5  # e1 waits sync_timeout_s from the request
    eview = View(weights=vec(3.0), version=7)
    assert e1.on_message(eview, ask, 4.6).counted and e1.ignored == 1  # the same request again: not answered
    back = e1.on_message(eview, _relay(restarted, "cloud")[0], 6.5)
    assert back.merged is not None and e1.ignored == 1  # e1 takes the round's answer
    eview = View(weights=vec(3.8), version=8)
    for late in (_relay(restarted, "cloud")[0], msg_from("cloud", "resend", {"round": 1, "at": 9.0})):
        plan = e1.on_message(eview, late, 7.0)  # nothing taken twice, nothing sent again
        assert plan.merged is None and plan.sends == ()


def test_an_edge_that_gave_up_on_the_round_does_not_answer_and_the_round_closes_at_its_deadline() -> None:
    cs, cloud = _node3("cloud")
    es, e1 = _node3("e1")
    cview, eview = View(weights=vec(1.0), version=3), View(weights=vec(3.0), version=7)
    cloud.on_version(cview, 1.0)
    e1.on_version(eview, 1.5)
    cs, cloud = _restarted("cloud", cs, cloud)
    e1.on_timer(eview, 1.5 + CFG.sync_timeout_s)  # the cloud was down for longer than e1 waits
    (ask,) = _relay(cloud.on_timer(cview, 40.0), "cloud")
    assert e1.on_message(eview, ask, 40.5).sends == () and not es.gate.waiting
    assert cloud.on_timer(cview, 69.0).merged is None
    closed = cloud.on_timer(cview, 70.0)
    assert closed.merged is not None and cloud.timeouts == 1 and not cs.gate.waiting
    np.testing.assert_array_equal(closed.merged, vec(1.0))


def test_a_resend_request_is_the_clouds_and_carries_no_model() -> None:
    es, e1 = _node3("e1")
    eview = View(weights=vec(3.0), version=7)
    e1.on_version(eview, 1.5)
    for msg in (msg_from("e2", "resend", {"round": 1, "at": 2.0}), msg_from("cloud", "resend", {"round": 1, "at": 2.0}, vec(0.0)),
                msg_from("cloud", "resend", {"round": 1, "at": float("nan")}), msg_from("cloud", "resend", {"round": 0, "at": 2.0})):
        with pytest.raises(MalformedMessage):
            e1.on_message(eview, msg, 2.0)
    assert e1.resends == 0 and e1.resent_at == -math.inf and es.gate.waiting and e1.wait_started == 1.5
    assert not e1.on_message(eview, msg_from("cloud", "resend", {"round": 2, "at": 2.0}), 2.0).sends  # not the round it waits on


def test_a_cloud_restarted_with_nothing_open_asks_for_its_next_round_and_a_first_start_asks_nothing() -> None:
    """An edge's model for the cloud's next round (in before the cloud's own) was lost with the process too."""
    cs, cloud = _node3("cloud")
    _, e1 = _node3("e1")
    eview = View(weights=vec(3.0), version=7)
    (sent,) = _relay(e1.on_version(eview, 1.0), "e1")
    cloud.on_message(View(weights=vec(1.0), version=3), sent, 1.5)
    assert sorted(cloud.collected) == ["e1"]
    cs, cloud = _restarted("cloud", cs, cloud)
    (ask,) = _relay(cloud.on_timer(View(weights=vec(1.0), version=3), 2.0), "cloud")
    assert ask.body["round"] == 1
    (again,) = _relay(e1.on_message(eview, ask, 2.5), "e1")
    cloud.on_message(View(weights=vec(1.0), version=3), again, 3.0)
    assert sorted(cloud.collected) == ["e1"]
    _, fresh = _node3("cloud")
    fresh.restore({})  # the first start: the core restores an empty state
    assert fresh.wake_at() is None and fresh.on_timer(View(weights=vec(1.0)), 0.0).sends == ()

