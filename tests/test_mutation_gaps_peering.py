"""Peering behaviours no test checked (helper-187's mutation audit of coordinator/peering/).

Each test kills a mutant of ``coordinator/peering/`` that survived every test covering its line; the
docstrings name it (file:line at the audit's base commit af6b3a9, and the mutation)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from coordinator.peering.hier import HierPeerConfig, HierPeering
from coordinator.peering.nebula import NebulaPeerConfig, NebulaPeering
from coordinator.peering.spyker import (
    MAX_ROUND_JUMP,
    SpykerPeerConfig,
    SpykerPeering,
    SyncSpykerPeering,
    merge_in_order,
    server_merge,
)
from coordinator.strategies.fedavg import FedAvgConfig
from coordinator.strategies.hierfavg import HierEdgeStrategy
from coordinator.strategies.nebula import NebulaConfig, NebulaStrategy
from coordinator.strategies.spyker import SpykerStrategy
from edge_sdk.errors import ConfigError, MalformedMessage
from tests.peering_harness import View, msg_from, spyker_ring, vec

SPY = SpykerPeerConfig(h_inter=3.0, h_intra=10.0, beacon_s=1.0, token_timeout_s=4.0, stagger_s=1.0, sync_timeout_s=3.0)
INTRA = SpykerPeerConfig(h_inter=1e9, h_intra=10.0, beacon_s=1.0, token_timeout_s=4.0, stagger_s=1.0, sync_timeout_s=3.0)
"""Only the intra-server trigger: one sync per trigger."""


def body(at: float, *, age: float = 1.0, pos: list[object] | None = None, hold: bool = False, **extra: object) -> dict[str, object]:
    """A Spyker peer body as an honest sender builds it (``SpykerPeering._base``)."""
    return {"at": at, "age": age, "clients": 1, "pos": pos, "hold": hold, **extra}


# --------------------------------------------------------------------------- Spyker: replies and restarts


def test_a_restarted_coordinator_does_not_answer_the_sync_it_answered_before_its_restart_again() -> None:
    """spyker.py:451 (``sid <= self.answered`` -> ``sid < self.answered`` in ``_was_answered``): after a
    restart the sync id answered last comes back only as ``answered`` (``did_broadcast`` is not
    checkpointed), and a third peer's answer to that sync arriving after the restart made the
    coordinator broadcast its model for it a second time (at most once per sync id, ARCHITECTURE)."""
    ring = spyker_ring(["a", "b", "c"], INTRA)
    ring.local_updates("a", 20)  # a holds the cold ring's token: its intra trigger starts sync 0
    (sid,) = {s for _, s in ring.nodes["a"].broadcasts}
    to_b = next(i for i, e in enumerate(ring.net) if e.to == "b" and e.kind == "model")
    ring.deliver(to_b)  # b answers a's sync and merges: the commit's checkpoint says it answered
    assert ring.nodes["b"].broadcasts == [(0, sid)]
    to_c = next(i for i, e in enumerate(ring.net) if e.to == "c" and e.kind == "model" and e.sender == "a")
    ring.deliver(to_c)  # c answers too: its model for the same sync is on its way to b
    ring.crash("b")
    ring.restart("b")
    merges = ring.nodes["b"].view.version
    c_to_b = next(i for i, e in enumerate(ring.net) if e.to == "b" and e.kind == "model" and e.sender == "c")
    ring.deliver(c_to_b)
    assert ring.nodes["b"].view.version == merges + 1  # c's model is merged (a model b never merged)...
    assert ring.nodes["b"].broadcasts == [(0, sid)]  # ...but b does not answer the sync again


def test_a_peer_model_claiming_too_much_age_is_capped_and_counted() -> None:
    """spyker.py:718 (``self.counters.ages_capped += 1`` deleted): a peer model claiming more age than
    ``age_cap`` has its age bounded, and the status counts it (``ages_capped``), as a hostile claim is."""
    b = SpykerPeering("b", ["a", "b", "c"], SPY, strategy=SpykerStrategy())
    sid = [0, 0.0, "a", 0]
    plan = b.on_message(View(weights=vec(0.0)), msg_from("a", "model", body(1.0, age=1000.0, pos=sid, hold=True, sid=sid), vec(1.0)), 1.0)
    assert plan.merged is not None
    cap = 0.0 + SPY.h_intra + 3.0  # our age + h_intra + h_inter
    assert b.age == pytest.approx(SPY.eta_a * cap)
    assert b.describe()["ages_capped"] == 1
    honest = SpykerPeering("b", ["a", "b", "c"], SPY, strategy=SpykerStrategy())
    honest.on_message(View(weights=vec(0.0)), msg_from("a", "model", body(1.0, age=5.0, pos=sid, hold=True, sid=sid), vec(1.0)), 1.0)
    assert "ages_capped" not in honest.describe()


def test_a_token_relaying_an_age_for_a_coordinator_outside_the_ring_is_taken() -> None:
    """spyker.py:677 (``max_len=len(self.ring) + 1`` -> ``len(self.ring)`` in ``_on_token``) and
    base.py:180 (``len(value) > max_len`` -> ``>=`` in ``body_table``): the fields check allows one
    ``ages`` entry beyond the ring (skipped: not a peer of ours). With the first mutant such a token
    was refused only after its sender was heard (a refused message changes nothing), with the
    second refused outright. It is accepted, the unknown entry ignored."""
    b = SpykerPeering("b", ["a", "b", "c"], SPY, strategy=SpykerStrategy())
    ages = {"a": [2.0, 1.0], "b": [0.0, 1.0], "c": [4.0, 1.0], "gone": [9.0, 1.0]}
    plan = b.on_message(View(weights=vec(0.0)), msg_from("a", "token", body(1.0, age=2.0, pos=[0, 0.0, "a", 1], ages=ages)), 1.5)
    assert b.holding and b.describe()["tokens_accepted"] == 1
    assert b.describe()["ages"] == {"a": 2.0, "c": 4.0}
    assert [s.kind for s in plan.sends][:1] == ["beat"]


def test_a_beat_is_sent_at_exactly_the_time_wake_at_asked_for() -> None:
    """spyker.py:474 (``now >= self.next_beat_at`` -> ``>`` in ``on_timer``): the core arms a timer only
    when ``wake_at`` changes (core.py 1789), so a timer fired at exactly the instant asked for had to
    send the beat; with the mutant it sent nothing, the wake time stayed the same and no timer came
    again until another event."""
    a = SpykerPeering("a", ["a", "b"], SPY, strategy=SpykerStrategy())
    view = View(weights=vec(1.0))
    assert [s.kind for s in a.on_timer(view, 0.0).sends] == ["beat"]  # ring[0] of a cold ring: its token's beat
    assert a.wake_at() == 1.0
    assert [s.kind for s in a.on_timer(view, 1.0).sends] == ["beat"]
    assert a.wake_at() == 2.0


# --------------------------------------------------------------------------- Sync-Spyker


def test_sync_spyker_with_another_strategy_ages_one_unit_per_version_and_joins_at_h_intra() -> None:
    """spyker.py:983 (``self.ledger.age + 1.0`` -> ``+ 0`` in ``SyncSpykerPeering.on_version``): with a
    strategy other than Spyker's, each local version is one unit of age; a server never aged, never
    reached ``h_intra`` and never joined a round."""
    p = SyncSpykerPeering("a", ["a", "b"], SpykerPeerConfig(mode="sync", h_intra=3.0))
    view = View(weights=vec(1.0))
    sends = []
    for v in (1, 2, 3):
        view.version = v
        sends.append(p.on_version(view, float(v)).sends)
    assert p.age == 3.0 and sends[:2] == [(), ()]
    (join,) = sends[2]
    assert join.kind == "model" and join.body == {"round": 1, "age": 3.0} and p.syncing
    np.testing.assert_array_equal(join.weights, vec(1.0))


def test_a_position_a_peers_model_claims_without_holding_it_is_counted_not_learnt() -> None:
    """spyker.py:707 (``self._learn_from(msg.sender, body)`` deleted in ``_on_model``): a model's ``pos``
    is the largest position its sender knows; rule 3 takes it only from the coordinator that held it
    (or passed it on), and counts any other claim (``positions_ignored``). A model claiming a position
    ahead that its sender was never seen holding went uncounted."""
    b = SpykerPeering("b", ["a", "b", "c"], INTRA, strategy=SpykerStrategy())
    view = View(weights=vec(0.0))
    sid = [0, 0.0, "a", 0]
    start = b.on_message(view, msg_from("a", "model", body(1.0, pos=sid, hold=True, sid=sid), vec(1.0)), 1.0)
    assert start.merged is not None and [s.kind for s in start.sends] == ["model"]  # b answers a's sync
    answer = b.on_message(view, msg_from("c", "model", body(1.2, pos=[0, 0.0, "a", 5], sid=sid), vec(2.0)), 1.2)
    assert answer.merged is not None  # c's answer to the same sync is merged...
    assert b.describe()["known_token"] == sid  # ...its claim of a position ahead is not learnt...
    assert b.describe()["positions_ignored"] == 1  # ...and is counted


def test_a_holder_starts_no_sync_within_min_sync_interval_of_its_last() -> None:
    """spyker.py:739 (``or`` -> ``and`` in ``_check_sync``'s ``self.ongoing is not None or now -
    self.last_sync_end < min_sync_interval_s``): a holder whose trigger fired started a sync even
    within ``min_sync_interval_s`` of the end of its last one (no test set the interval)."""
    cfg = SpykerPeerConfig(h_inter=1e9, h_intra=10.0, beacon_s=1.0, token_timeout_s=4.0, stagger_s=1.0,
                           sync_timeout_s=3.0, min_sync_interval_s=30.0)
    a = SpykerPeering("a", ["a", "b"], cfg, strategy=SpykerStrategy())
    view = View(weights=vec(1.0))
    a.on_timer(view, 0.0)  # ring[0] of a cold ring: creates the token
    assert a.holding
    a.ledger.record(1, 20.0)
    view.version = 1
    (start,) = a.on_version(view, 1.0).sends  # the intra trigger: a starts its sync
    assert start.kind == "model" and start.body["sid"] == [0, 0.0, "a", 0]
    plan = a.on_message(view, msg_from("b", "model", body(1.5, sid=start.body["sid"], pos=start.body["sid"]), vec(2.0)), 2.0)
    assert [s.kind for s in plan.sends] == ["token"] and not a.holding  # b answered: the sync ends, the token moves on
    back = a.on_message(view, msg_from("b", "token", body(2.5, pos=[0, 0.0, "a", 2], ages={"b": [1.0, 2.5]})), 3.0)
    assert a.holding and [s.kind for s in back.sends] == ["beat"]
    a.ledger.record(3, a.age + 50.0)  # the trigger fires again, 2 s after the last sync ended
    view.version = 3
    assert [s.kind for s in a.on_version(view, 4.0).sends] == []
    assert a.describe()["syncs_started"] == 1
    later = a.on_message(view, msg_from("b", "beat", body(31.5, pos=[0, 0.0, "a", 2])), 32.5)  # 30.5 s after it
    assert [s.kind for s in later.sends] == ["model"] and a.describe()["syncs_started"] == 2


def test_sync_spyker_caps_a_peers_age_claim_at_the_default_h_inter_of_its_clients() -> None:
    """spyker.py:945 (``5.0 * len(self.ring)`` -> ``6.0 * ...`` in ``SyncSpykerPeering.age_cap``): the
    default h_inter counts this server's clients as every server's share, n_clients / 5n; a claim
    above our age + h_intra + h_inter is merged at that cap."""
    p = SyncSpykerPeering("a", ["a", "b"], SpykerPeerConfig(mode="sync", h_intra=10.0))
    view = View(weights=vec(0.0), devices_seen=tuple(f"d{i}" for i in range(20)))  # h_inter = 20 x 2 / (5 x 2) = 4
    plan = p.on_message(view, msg_from("b", "model", {"round": 1, "age": 1000.0}, vec(1.0)), 1.0)
    assert plan.merged is not None and p.describe()["ages_capped"] == 1
    merged, age = merge_in_order({"a": (0.0, vec(0.0)), "b": (0.0 + 10.0 + 4.0, vec(1.0))}, phi=p.config.phi, eta_a=p.config.eta_a)
    assert plan.meta["age"] == age and p.age == age
    np.testing.assert_array_equal(plan.merged, merged)


def test_sync_spyker_joins_a_round_period_s_after_the_last_even_below_one_second() -> None:
    """spyker.py:956 (``cfg.period_s > 0`` -> ``> 1`` in ``_due``): ``period_s`` starts a round that
    long after the last one; a period of a second or less never did."""
    p = SyncSpykerPeering("a", ["a", "b"], SpykerPeerConfig(mode="sync", period_s=0.5))
    view = View(weights=vec(1.0))
    assert p.wake_at() == 0.5
    assert p.on_timer(view, 0.4).sends == ()
    (join,) = p.on_timer(view, 0.6).sends
    assert join.kind == "model" and join.body["round"] == 1 and p.syncing


def test_sync_spyker_refuses_a_round_one_past_the_jump_bound_and_changes_nothing() -> None:
    """spyker.py:1028 (``self.round + 1 + MAX_ROUND_JUMP`` -> ``self.round + 2 + ...``): the largest
    round a peer's model may name is the next one + 2**22; one above it is refused (malformed), the
    round and the ledger as they were."""
    p = SyncSpykerPeering("a", ["a", "b"], SpykerPeerConfig(mode="sync"))
    view = View(weights=vec(0.0))
    with pytest.raises(MalformedMessage, match="jumps"):
        p.on_message(view, msg_from("b", "model", {"round": 2 + MAX_ROUND_JUMP, "age": 1.0}, vec(1.0)), 1.0)
    assert (p.round, p.syncing, p.models) == (0, False, {})
    plan = p.on_message(view, msg_from("b", "model", {"round": 1 + MAX_ROUND_JUMP, "age": 1.0}, vec(1.0)), 1.0)
    assert plan.merged is not None and p.round == 1 + MAX_ROUND_JUMP  # the bound itself: taken (it catches up)


# --------------------------------------------------------------------------- Spyker: the papers' rules


def test_an_age_growth_of_exactly_h_intra_or_a_spread_of_exactly_h_inter_starts_a_sync() -> None:
    """spyker.py:736 (``self.age - self.age_prev < self.config.h_intra`` -> ``<=`` in ``_check_sync``):
    the paper's triggers are a growth of at least h_intra since the last sync (``A_i - A_i,prev >=
    h_intra``) or a spread of at least h_inter; a growth of exactly h_intra started no sync."""
    a = SpykerPeering("a", ["a", "b"], INTRA, strategy=SpykerStrategy())
    view = View(weights=vec(1.0))
    a.on_timer(view, 0.0)  # ring[0] of a cold ring: holds the token
    a.ledger.record(1, 9.5)
    view.version = 1
    assert a.on_version(view, 1.0).sends == ()  # below h_intra: no sync
    a.ledger.record(2, 10.0)
    view.version = 2
    assert [s.kind for s in a.on_version(view, 2.0).sends] == ["model"] and a.describe()["syncs_started"] == 1
    cfg = SpykerPeerConfig(h_inter=3.0, h_intra=1e9, beacon_s=1.0, token_timeout_s=4.0, stagger_s=1.0, sync_timeout_s=3.0)
    spread = SpykerPeering("a", ["a", "b"], cfg, strategy=SpykerStrategy())
    spread.on_timer(view, 0.0)
    plan = spread.on_message(view, msg_from("b", "beat", body(0.5, age=3.0)), 0.5)  # ages 0 and 3: a spread of h_inter
    assert [s.kind for s in plan.sends] == ["model"] and spread.describe()["syncs_started"] == 1


def test_merge_in_order_starts_from_the_smallest_ids_model_and_age_bit_for_bit() -> None:
    """spyker.py:175 (``ids[1:]`` -> ``ids[0:]`` in ``merge_in_order``): SERVERAGG of the first model into
    itself leaves the weights as they are but not always the age ((1 - s) 3 + s 3 = 2.9999999999999996),
    so servers that fold the same models would commit an age off by rounding from the paper's fold."""
    wa, wb = vec(1.0), vec(2.0)
    merged, age = merge_in_order({"b": (5.0, wb), "a": (3.0, wa)}, phi=1.5, eta_a=0.6)
    want, want_age = server_merge(wa, 3.0, wb, 5.0, phi=1.5, eta_a=0.6)
    assert age == want_age and merged.tobytes() == want.tobytes()
    alone, alone_age = merge_in_order({"a": (3.0, wa)}, phi=1.5, eta_a=0.6)
    assert alone_age == 3.0 and alone.tobytes() == wa.tobytes()


def test_eta_a_of_one_is_in_range() -> None:
    """spyker.py:207 (``0 < self.eta_a <= 1`` -> ``< 1``): eta_a is in (0, 1] (ARCHITECTURE: a merge
    may take the peer's model whole); no test built a config with eta_a = 1, which the mutant refused."""
    for eta_a in (1.0, 0.01):
        cfg = SpykerPeerConfig(eta_a=eta_a)
        merged, age = server_merge(vec(0.0), 10.0, vec(1.0), 10.0, phi=cfg.phi, eta_a=cfg.eta_a)
        assert age == 10.0 and float(merged[0]) == pytest.approx(eta_a * 0.5)  # w = sigmoid(0) = 1/2
    for bad in (0.0, 1.01):
        with pytest.raises(ConfigError, match="eta_a"):
            SpykerPeerConfig(eta_a=bad)


# --------------------------------------------------------------------------- HierFAVG: rollbacks and restarts


def _edge_with_a_replacement() -> tuple[HierEdgeStrategy, HierPeering, dict[str, object]]:
    """An edge (kappa2 = 2) that sent its round-1 model (20 samples: 10 behind version 1, 10 more at 2),
    then rolled back to version 1 while waiting: the replacement it sends, and the edge."""
    s = HierEdgeStrategy(FedAvgConfig(select=5, min_devices=1))
    e1 = HierPeering("e1", ["cloud", "e1"], HierPeerConfig(kappa2=2, sync_timeout_s=60.0), strategy=s)
    s.gate.samples = 10
    assert e1.on_version(View(weights=vec(1.0), version=1), 1.0).sends == ()
    s.gate.samples = 20
    (sent,) = e1.on_version(View(weights=vec(2.0), version=2), 2.0).sends
    assert sent.body == {"round": 1, "samples": 20} and s.gate.waiting
    e1.on_line_replaced(View(weights=vec(1.0), version=3), 2.5, restored=1)  # the gate rejected version 2
    (rep,) = e1.on_timer(View(weights=vec(1.0), version=3), 2.6).sends
    np.testing.assert_array_equal(rep.weights, vec(1.0))
    return s, e1, rep.body


def test_an_edges_replacement_claims_the_samples_behind_the_restored_model() -> None:
    """hier.py:275 (``sends == self.sends - 1`` -> ``- 2`` in ``on_line_replaced``): the replacement of
    a rolled-back model claims the samples behind the model it restores (10: version 1's), not 0;
    the cloud weights the edge by that claim."""
    _, _, rep = _edge_with_a_replacement()
    assert rep == {"round": 1, "samples": 10, "replaces": True}


def test_an_edge_restarted_after_sending_a_replacement_still_waits_and_takes_the_global_that_took_it() -> None:
    """hier.py:480 (``replacing == self.cloud_round`` -> ``!=`` in ``restore``): the checkpoint of an edge
    waiting on a round it sent a replacement for restores as it was (waiting, replacing); the mutant
    refused it (``restore_refused``), so the restarted edge waited no longer and ignored the cloud's
    global that took its replacement."""
    _, e1, _ = _edge_with_a_replacement()
    state = json.loads(json.dumps(e1.checkpoint()))
    assert state["waiting"]["replacing"] == 1
    s2 = HierEdgeStrategy(FedAvgConfig(select=5, min_devices=1))
    again = HierPeering("e1", ["cloud", "e1"], HierPeerConfig(kappa2=2, sync_timeout_s=60.0), strategy=s2)
    again.restore(state)
    assert again.checkpoint() == state and "restore_refused" not in again.describe() and s2.gate.waiting
    plan = again.on_message(View(weights=vec(1.0), version=3), msg_from("cloud", "global", {"round": 1, "replaced": ["e1"]}, vec(1.5)), 3.0)
    assert plan.merged is not None and not s2.gate.waiting


def test_a_rollback_past_a_restart_keeps_the_edge_rounds_at_the_last_model_sent() -> None:
    """hier.py:272 (the default ``(-1, 0, 0)`` -> ``(0, 0, 0)`` for a restored version the edge no longer
    remembers): after a restart (no send counted since) a rollback to a version from before it took the
    unknown version's round count, 0, instead of the count at the last model sent (4 of kappa2 = 2:
    rounds 5 and 6 were rejected); the status and the next checkpoint said 0 edge rounds."""
    s = HierEdgeStrategy(FedAvgConfig(select=5, min_devices=1))
    e1 = HierPeering("e1", ["cloud", "e1"], HierPeerConfig(kappa2=2), strategy=s)
    e1.restore({"edge_rounds": 5, "cloud_round": 2, "closed_round": 0})
    e1.on_line_replaced(View(weights=vec(1.0), version=9), 10.0, restored=3)
    assert e1.describe()["edge_rounds"] == 4 and e1.checkpoint()["edge_rounds"] == 4
    assert e1.on_version(View(weights=vec(1.5), version=10), 11.0).sends == ()
    (sent,) = e1.on_version(View(weights=vec(2.0), version=11), 12.0).sends  # the kappa2-th round since: round 3
    assert sent.body["round"] == 3


# --------------------------------------------------------------------------- NebulaFL


def test_every_rotation_a_coordinator_sends_is_taken_by_its_target() -> None:
    """nebula.py:156 (``"round": self.round - 1`` -> ``self.round - 2`` in the rotation's body): the tests
    built the rotations they delivered by hand; a coordinator naming another round than the one it
    rotated in had every rotation refused by its target (``rotates to another coordinator``)."""
    ring = ["a", "b", "c"]
    strategies = {n: NebulaStrategy(NebulaConfig(planets=2, t_c=10.0)) for n in ring}
    peers = {n: NebulaPeering(n, ring, NebulaPeerConfig(t_c=10.0), strategy=strategies[n]) for n in ring}
    views = {n: View(weights=vec(float(i + 1))) for i, n in enumerate(ring)}
    for t in (0.0, 10.0, 20.0):
        for n, p in peers.items():
            for send in p.on_timer(views[n], t).sends:
                assert send.kind == "rotate" and send.weights is not None
                peers[send.to].on_message(views[send.to], msg_from(n, send.kind, send.body, send.weights), t + 0.5)
    assert {n: p.sent for n, p in peers.items()} == {"a": 2, "b": 2, "c": 2}  # rounds 1, 2 (round 0: to itself)
    assert {n: p.received for n, p in peers.items()} == {"a": 2, "b": 2, "c": 2}
    assert sum(p.ignored for p in peers.values()) == 0
    np.testing.assert_allclose(strategies["a"].state.stellar, 2.0)  # round 2 (t = 20): b (index 1) sends to (1 + 2) % 3 = a
