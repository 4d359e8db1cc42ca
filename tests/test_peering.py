"""Peering between coordinators: Spyker, NebulaFL and the HierFAVG baseline, sans-IO.

The maths are checked against the formulas of ARCHITECTURE.md; the token protocol by
table-style tests and by Hypothesis over message orders, losses, duplicates, crashes and
restarts (tests/peering_harness.py), ending in a quiet period after which exactly one
token must be live.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from coordinator.core import CommitVersion, CoordinatorConfig, CoordinatorCore, Snapshot
from coordinator.peering import PEERINGS, make_peering
from coordinator.peering.base import Peering, PeerPlan
from coordinator.peering.hier import MAX_ROUND_GAP, HierPeerConfig, HierPeering, weighted_mean
from coordinator.peering.nebula import NebulaPeerConfig, NebulaPeering, rotation_target
from coordinator.peering.spyker import (
    SpykerPeerConfig,
    SpykerPeering,
    SyncSpykerPeering,
    merge_in_order,
    merge_weight,
    server_merge,
)
from coordinator.strategies import make_strategy
from coordinator.strategies.base import BufferedUpdate
from coordinator.strategies.fedavg import FedAvgConfig
from coordinator.strategies.hierfavg import HierEdgeStrategy
from coordinator.strategies.nebula import (
    NebulaConfig,
    NebulaStrategy,
    decay_weight,
    master_model,
    planet_update,
)
from coordinator.strategies.spyker import AgeLedger, SpykerConfig, SpykerStrategy, decayed_lr
from edge_sdk.core.events import MessageReceived, Notify, Publish, TimerFired
from edge_sdk.errors import ConfigError, MalformedMessage, RingMismatch, UnknownPeer
from edge_sdk.signing import Signer
from edge_sdk.wire import topics
from edge_sdk.wire.codec import decode, encode, parse_status_json, status_json
from edge_sdk.wire.messages import ModelMsg, PeerMsg, Pull, Update
from tests.peering_harness import SPEC, Ring, View, msg_from, settle, spyker_ring, vec

ROOT = Path(__file__).resolve().parents[1]
CFG = SpykerPeerConfig(h_inter=3.0, h_intra=10.0, beacon_s=1.0, token_timeout_s=4.0, stagger_s=1.0, sync_timeout_s=3.0)
INTRA_ONLY = SpykerPeerConfig(h_inter=1e9, h_intra=10.0, beacon_s=1.0, token_timeout_s=4.0, stagger_s=1.0, sync_timeout_s=3.0)
"""Only the intra-server trigger: one sync per trigger, so the token's path is predictable."""


def update(device: str, seq: int, base: int, weights: np.ndarray, n: int = 4) -> BufferedUpdate:
    return BufferedUpdate(device=device, seq=seq, base_version=base, staleness=0, n_samples=n, weights=weights)


# --------------------------------------------------------------------------- Spyker maths


def test_merge_weight_is_the_sigmoid_of_the_relative_age_gap() -> None:
    assert merge_weight(100, 100, 1.5) == pytest.approx(0.5)
    assert merge_weight(100, 200, 1.5) == pytest.approx(1 / (1 + math.exp(-1.5)))
    assert merge_weight(100, 0, 1.5) == pytest.approx(1 / (1 + math.exp(1.5)))
    assert merge_weight(0, 10, 1.5) == pytest.approx(1 / (1 + math.exp(-15)))  # A_i clamped to 1
    assert 0.0 <= merge_weight(1, 1e9, 1.5) <= 1.0 and 0.0 <= merge_weight(1e9, 0, 1.5) <= 1.0


@settings(deadline=None)  # as every other property test here: a stalled CI worker is not a failure
@given(
    st.floats(0, 1e4), st.floats(0, 1e4), st.floats(-5, 5), st.floats(-5, 5),
    st.floats(0.1, 3), st.floats(0.05, 1),
)
def test_server_merge_matches_the_formula(a_i: float, a_j: float, wi: float, wj: float, phi: float, eta_a: float) -> None:
    merged, age = server_merge(vec(wi), a_i, vec(wj), a_j, phi=phi, eta_a=eta_a)
    share = eta_a * merge_weight(a_i, a_j, phi)
    np.testing.assert_allclose(merged, np.float32(wi) + np.float32(share) * (np.float32(wj) - np.float32(wi)), rtol=1e-5, atol=1e-5)
    assert age == pytest.approx((1 - share) * a_i + share * a_j)
    assert min(a_i, a_j) - 1e-9 <= age <= max(a_i, a_j) + 1e-9  # a merged age lies between the two


def test_lr_decay_is_the_papers_decay_function() -> None:
    assert decayed_lr(0.05, 3, 5.0, beta=0.05, lr_min=1e-6) == 0.05  # below the mean: unchanged
    assert decayed_lr(0.5, 7, 5.0, beta=0.05, lr_min=1e-6) == pytest.approx(0.4)
    assert decayed_lr(0.05, 9, 5.0, beta=0.05, lr_min=1e-6) == 1e-6  # floored at η_min
    assert decayed_lr(0.05, 5, 5.0, beta=0.05, lr_min=1e-6) == 0.05


def test_spyker_strategy_damps_updates_by_the_age_gap() -> None:
    strategy = make_strategy("spyker", eta=0.6, a=0.5)
    assert isinstance(strategy, SpykerStrategy)
    view = View(weights=vec(0.0), version=3)
    strategy.ledger.record(1, 10.0)
    strategy.ledger.record(3, 13.0)
    fresh = strategy.aggregate(view, [update("d1", 0, 3, vec(1.0))])
    np.testing.assert_allclose(fresh, 0.6)  # τ = 0: η
    stale = strategy.aggregate(view, [update("d1", 0, 1, vec(1.0))])
    np.testing.assert_allclose(stale, 0.6 * (3 + 1) ** -0.5, rtol=1e-6)  # τ = 13 − 10
    two = strategy.aggregate(view, [update("d1", 0, 3, vec(1.0)), update("d2", 0, 3, vec(1.0))])
    # the second update meets a model one unit older than the one it trained from
    np.testing.assert_allclose(two, 0.6 + 0.4 * 0.6 * 2**-0.5, rtol=1e-6)
    view.version = 4
    strategy.on_aggregated(view, 0.0)
    assert strategy.ledger.age == 15.0 and strategy.ledger.age_at[4] == 15.0


def test_spyker_strategy_counts_updates_and_decays_fast_clients() -> None:
    strategy = SpykerStrategy(SpykerConfig(lr_init=0.5, decay_beta=0.05))
    view = View(weights=vec(0.0))
    for device, n in (("fast", 9), ("slow", 1), ("mid", 5)):
        for _ in range(n):
            strategy.on_update(view, update(device, 0, 0, vec(0.0)), 0.0)  # type: ignore[arg-type]
    assert strategy.ledger.mean_updates() == 5.0
    assert strategy.lr_hint("slow") == {} and strategy.lr_hint("mid") == {}
    assert strategy.lr_hint("fast") == {"lr": pytest.approx(0.5 - 0.05 * 4)}


def test_the_ledgers_mean_is_exact_through_counts_and_a_restore() -> None:
    ledger = AgeLedger()
    counts = {f"d{i}": 1 + (i * 7) % 13 for i in range(1_000)}
    for device, n in counts.items():
        for _ in range(n):
            ledger.count(device)
    exact = sum(counts.values()) / len(counts)
    assert ledger.mean_updates() == exact and ledger.updates == counts
    again = AgeLedger()
    again.restore(ledger.checkpoint())  # a restart: the running total comes back with the counts
    assert again.mean_updates() == exact
    again.count("new")
    assert again.mean_updates() == (sum(counts.values()) + 1) / (len(counts) + 1)


def test_age_ledger_falls_back_to_one_unit_per_version() -> None:
    ledger = AgeLedger()
    ledger.record(10, 50.0)
    assert ledger.age_of(10, 10) == 50.0
    assert ledger.age_of(7, 10) == 47.0
    assert ledger.age_of(11, 10) == 50.0
    for v in range(11, 200):
        ledger.record(v, float(v))
    assert len(ledger.age_at) <= 64


def test_a_merge_is_aged_under_the_version_it_is_committed_as() -> None:
    """A merge onto the version a start resumed from waits for its number (a restart may have
    skipped unreadable versions): the next view's version, or the restored one when the checkpoint
    was taken before (it is stored with the merge's commit). Once a commit was seen since the
    start, a merge is the next version at once."""
    ledger = AgeLedger()
    ledger.see(2)  # resumed from 2; the registry skipped 3-5
    ledger.record_merge(2, 30.0)
    assert ledger.age == 30.0 and ledger.age_at == {}
    state = json.loads(json.dumps(ledger.checkpoint(counts=False)))
    ledger.see(6)
    assert ledger.age_at == {6: 30.0}
    ledger.record_merge(6, 31.0)
    assert ledger.age_at == {6: 30.0, 7: 31.0} and "merge_age" not in ledger.checkpoint()
    restored = AgeLedger()
    restored.restore(state)  # restarted from the merge's commit, 6
    assert restored.age == 30.0 and restored.age_at == {}
    restored.see(6)
    assert restored.age_at == {6: 30.0}
    assert restored.age_of(6, 9) == 30.0  # not the fallback, 30 - 3


def test_default_h_inter_is_clients_over_five_n() -> None:
    p = SpykerPeering("a", ["a", "b", "c", "d"], SpykerPeerConfig(n_clients=100))
    assert p.h_inter() == 5.0
    q = SpykerPeering("a", ["a", "b", "c", "d"])
    q.clients_here = 25
    for info in q.info.values():
        info.clients = 25
    assert q.h_inter() == 5.0
    assert SpykerPeering("a", ["a", "b"], SpykerPeerConfig(h_inter=7.0)).h_inter() == 7.0


# --------------------------------------------------------------------------- Spyker protocol


def test_a_cold_ring_gets_one_token_from_ring0() -> None:
    ring = spyker_ring(["a", "b", "c"])
    assert ring.holders() == ["a"]  # fresh state dirs: ring[0] bootstraps the token
    settle(ring, 20)
    assert ring.holders() == ["a"]  # no trigger, no sync: the token stays put


def test_a_restarted_ring_regenerates_after_the_timeout_from_ring0() -> None:
    ring = spyker_ring(["a", "b", "c"], INTRA_ONLY)
    settle(ring, 2)
    for name in "abc":
        ring.local_updates(name, 1)  # a commit each: every state dir holds a checkpoint
        ring.crash(name)
    for name in "cba":
        ring.restart(name)  # nobody bootstraps, nobody holds
    assert ring.holders() == []
    settle(ring, CFG.token_timeout_s - 0.5)
    assert ring.holders() == []
    settle(ring, 1.0)
    assert ring.holders() == ["a"]


def test_intra_trigger_starts_a_sync_and_every_coordinator_answers_once() -> None:
    ring = spyker_ring(["a", "b", "c"])
    settle(ring, 5)
    assert ring.holders() == ["a"]
    ring.local_updates("a", 11)  # A_a − A_a,prev ≥ h_intra = 10
    ring.deliver_all()
    sids = {n: [sid for _, sid in node.broadcasts] for n, node in ring.nodes.items()}
    first = sids["a"][0]
    assert first[2:] == ("a", 0)  # a's token, its first holding period
    # the merges left an age spread ≥ h_inter, so the next holders synchronised again:
    # every sync id was answered by every coordinator, exactly once
    assert len(set(sids["a"])) == len(sids["a"]) and sorted(sids["b"]) == sorted(sids["a"]) == sorted(sids["c"])
    a, b, c = (ring.nodes[n].peering for n in "abc")
    assert isinstance(a, SpykerPeering) and isinstance(b, SpykerPeering) and isinstance(c, SpykerPeering)
    assert a.counters.merges == b.counters.merges == c.counters.merges == 2 * len(sids["a"])
    assert ring.nodes["b"].view.version == 2 * len(sids["a"])  # every merge committed
    assert a.counters.syncs_started + b.counters.syncs_started + c.counters.syncs_started == len(sids["a"])
    assert len(ring.holders()) == 1


def test_a_non_holder_pushes_its_age_and_the_holder_starts_the_sync() -> None:
    ring = spyker_ring(["a", "b", "c"])
    settle(ring, 5)
    ring.local_updates("c", 4)  # spread 4 ≥ h_inter = 3, but c does not hold the token
    c = ring.nodes["c"].peering
    assert isinstance(c, SpykerPeering) and c.counters.age_pushes == 1
    ring.deliver_all()
    a = ring.nodes["a"].peering
    assert isinstance(a, SpykerPeering) and a.counters.syncs_started == 1


def test_each_coordinator_broadcasts_at_most_once_per_sync_id() -> None:
    p = SpykerPeering("b", ["a", "b", "c"], CFG, strategy=SpykerStrategy())
    view = View(weights=vec(0.0))
    p.on_timer(view, 0.0)
    sid = [0, 0.0, "a", 3]
    body = {"at": 1.0, "age": 5.0, "clients": 3, "pos": sid, "hold": True, "sid": sid}
    first = p.on_message(view, msg_from("a", "model", body, vec(1.0)), 1.0)
    assert [s.kind for s in first.sends] == ["model"] and first.merged is not None
    again = p.on_message(view, msg_from("c", "model", {**body, "hold": False}, vec(2.0)), 1.1)
    assert again.sends == () and again.merged is not None  # merged, not answered twice
    dup = p.on_message(view, msg_from("a", "model", body, vec(1.0)), 1.2)
    assert dup.sends == ()


def test_a_holder_passes_the_token_when_a_live_peer_never_answers_its_sync() -> None:
    """Spyker's sync timeout: c beats (so it counts as alive) but never sends its model for a's
    sync; a merges b's, waits ``sync_timeout_s`` and passes the token on rather than hold it for good."""
    a = SpykerPeering("a", ["a", "b", "c"], INTRA_ONLY, strategy=SpykerStrategy())
    view = View(weights=vec(0.0))
    a.on_timer(view, 0.0)
    assert a.holding

    def beat(sender: str, now: float) -> None:
        a.on_message(view, msg_from(sender, "beat", {"at": now, "age": 0.0, "clients": 1, "pos": None, "hold": False}), now)

    a.ledger.record(1, 11.0)  # A − A_prev ≥ h_intra = 10: a starts a sync
    view.version = 1
    (model,) = a.on_version(view, 0.5).sends
    sid = model.body["sid"]
    assert model.kind == "model" and a.ongoing is not None
    answer = {"at": 0.6, "age": 0.0, "clients": 1, "pos": sid, "hold": False, "sid": sid}
    assert a.on_message(view, msg_from("b", "model", answer, vec(1.0)), 0.6).merged is not None
    for t in (1.0, 2.0, 3.0):
        beat("b", t)
        beat("c", t)
        assert not [s for s in a.on_timer(view, t).sends if s.kind == "token"]
    assert a.holding and a.ongoing is not None and a.wake_at() <= 0.5 + INTRA_ONLY.sync_timeout_s
    tokens = [s for s in a.on_timer(view, 0.5 + INTRA_ONLY.sync_timeout_s).sends if s.kind == "token"]
    assert [t.to for t in tokens] == ["b"] and not a.holding and a.ongoing is None
    assert a.counters.syncs_timed_out == 1 and a.describe()["syncs_timed_out"] == 1


def test_spyker_memory_is_bounded_under_a_flood_of_sync_ids() -> None:
    """A peer sending models for ever new sync ids leaves at most _KEEP_SIDS of them remembered per
    peer (merged) and answered (did_broadcast, then a watermark); a model for a sync older than all
    kept ones is ignored and counted, not merged again. (Each a sync id rule 6 lets a peer start
    with no other holder in between: a regeneration of its own, token_timeout_s after the last.)"""
    from coordinator.peering.spyker import _KEEP_SIDS

    b = SpykerPeering("b", ["a", "b"], CFG, strategy=SpykerStrategy())
    view = View(weights=vec(0.0))
    b.on_timer(view, 0.0)
    n = 4 * _KEEP_SIDS
    for epoch in range(n):
        sid, at = [epoch, 0.0, "a", 0], epoch * CFG.token_timeout_s
        body = {"at": at, "age": 1.0, "clients": 1, "pos": sid, "hold": True, "sid": sid}
        plan = b.on_message(view, msg_from("a", "model", body, vec(1.0)), at)
        assert plan.merged is not None and [s.kind for s in plan.sends] == ["model"]  # answered once, merged
    assert len(b.merged["a"]) == _KEEP_SIDS and len(b.did_broadcast) == _KEEP_SIDS
    assert b.answered == (n - _KEEP_SIDS - 1, 0.0, "a", 0)
    old = [0, 0.0, "a", 0]
    plan = b.on_message(view, msg_from("a", "model", {"at": 1e4, "age": 1.0, "clients": 1, "pos": old, "hold": True,
                                                     "sid": old}, vec(5.0)), 1e4)
    assert plan.merged is None and plan.sends == () and b.counters.models_ignored == 1
    assert b.counters.merges == n
    state = json.loads(json.dumps(b.checkpoint()))
    assert len(state["merged"]["a"]) == _KEEP_SIDS


def test_a_dead_peers_replayed_beats_neither_keep_it_alive_nor_its_token() -> None:
    """helper-115 (over mosquitto: any client of a plain broker, any coordinator of a TLS one): b's
    captured beat, replayed every second after b died, kept b alive in a's view, so a passed the
    token to it; a dead holder's replayed beat (hold) kept its token's evidence fresh, so nobody
    regenerated. A beat not newer (by its sender's clock) than the sender's last is ignored, counted."""
    a = SpykerPeering("a", ["a", "b", "c"], INTRA_ONLY, strategy=SpykerStrategy())
    view = View(weights=vec(0.0))
    a.on_timer(view, 0.0)
    a.holding = False  # b holds the token: a regenerates if b goes silent
    pos = list(a.known) if a.known is not None else None
    b_beat = {"at": 0.5, "age": 0.0, "clients": 1, "pos": pos, "hold": True}
    assert not a.on_message(view, msg_from("b", "beat", b_beat), 0.5).counted  # b's last real beat; then b dies
    assert a.last_holder == "b" and a.evidence_at == 0.5
    for t in range(1, 30):
        assert a.on_message(view, msg_from("b", "beat", b_beat), float(t)).counted  # replayed: the status shows it
        assert not a.on_message(view, msg_from("c", "beat", {**b_beat, "at": float(t), "hold": False}), float(t)).counted
        a.on_timer(view, float(t))
    assert not a.alive("b", 29.0) and a._successor("a", 29.0) == "c"
    assert a.holding and a.counters.regenerations == 2  # the bootstrap at 0, then b's silence
    assert a.describe()["beats_ignored"] == 29


def test_token_duplicates_and_stale_tokens_are_rejected_and_a_larger_position_drops_ours() -> None:
    p = SpykerPeering("b", ["a", "b", "c"], CFG)
    view = View(weights=vec(0.0))
    p.on_timer(view, 0.0)
    base = {"at": 1.0, "age": 0.0, "clients": 0, "hold": False, "ages": {}}
    assert not p.on_message(view, msg_from("a", "token", {**base, "pos": [1, 5.0, "a", 4]}), 1.0).counted
    assert p.holding and p.counters.tokens_accepted == 1
    # (counted: the core publishes the status that shows tokens_rejected)
    assert p.on_message(view, msg_from("a", "token", {**base, "pos": [1, 5.0, "a", 4]}), 1.1).counted  # QoS 1 duplicate
    assert p.on_message(view, msg_from("c", "token", {**base, "pos": [0, 9.0, "c", 40]}), 1.2).counted  # older epoch
    assert p.counters.tokens_rejected == 2 and p.holding
    # any message carrying a larger position makes the holder drop its token
    p.on_message(view, msg_from("c", "beat", {**base, "pos": [2, 7.0, "c", 0], "hold": True}), 1.3)
    assert not p.holding and p.counters.tokens_dropped == 1 and p.last_holder == "c"


def test_the_successor_of_a_silent_holder_regenerates_first_with_a_higher_epoch() -> None:
    ring = spyker_ring(["a", "b", "c", "d"])
    settle(ring, 5)
    ring.local_updates("a", 11)
    settle(ring, 20)
    names = list(ring.nodes)
    [holder] = ring.holders()
    successor = names[(names.index(holder) + 1) % len(names)]
    old = ring.nodes[holder].peering
    assert isinstance(old, SpykerPeering) and old.known is not None
    ring.crash(holder)
    settle(ring, CFG.token_timeout_s + 0.5)
    assert ring.holders() == [successor]  # one timeout after the holder's last beat
    c = ring.nodes[successor].peering
    assert isinstance(c, SpykerPeering) and c.known is not None
    assert c.known[0] == old.known[0] + 1 and c.counters.regenerations == 1
    settle(ring, 20)
    assert ring.holders() == [successor]
    assert all(isinstance(n.peering, SpykerPeering) and n.peering.known == c.known for n in ring.live())


def test_a_dead_successor_is_skipped_when_passing_and_when_regenerating() -> None:
    ring = spyker_ring(["a", "b", "c", "d"], INTRA_ONLY)
    settle(ring, 5)
    ring.crash("b")
    settle(ring, CFG.token_timeout_s + 1)  # everyone now knows b is silent
    ring.local_updates("a", 11)
    settle(ring, CFG.sync_timeout_s)
    assert ring.holders() == ["c"]  # a passed over the dead b
    ring.crash("c")
    settle(ring, CFG.token_timeout_s + CFG.stagger_s + 1)
    assert ring.holders() == ["d"]  # c's successor b is dead too: d, one stagger later


def test_a_restarted_coordinator_resumes_its_ages_but_never_the_token() -> None:
    ring = spyker_ring(["a", "b", "c"])
    settle(ring, 5)
    for _ in range(3):
        ring.local_updates("a", 11)
        settle(ring, 2)
    holder = ring.holders()[0]
    before = ring.nodes[holder].peering
    assert isinstance(before, SpykerPeering)
    ring.crash(holder)
    ring.restart(holder)
    after = ring.nodes[holder].peering
    assert isinstance(after, SpykerPeering) and not after.holding
    assert after.age > 0 and after.known is not None
    settle(ring, 30)
    assert len(ring.holders()) == 1


def test_a_checkpointed_position_past_the_cap_is_forgotten_not_a_coordinator_that_cannot_start() -> None:
    """helper-115: a ring peer's token at epoch (or hop) 2**62 - 1 made an honest coordinator
    derive 2**62 (regeneration: epoch + 1; a pass: hop + 1) and checkpoint it; its restore then
    refused its own checkpoint (MalformedMessage: bad epoch), so the coordinator could not start."""
    p = SpykerPeering("a", ["a", "b"], CFG)
    good = [1, 2.0, "b", 3]
    p.restore({"age_prev": 4.0, "known": [2**62, 5.0, "a", 0], "accepted": good, "answered": [1, 2.0, "b", 2**62],
               "merged": {"b": [[2**62, 5.0, "a", 0], good]}})
    assert p.known is None and p.answered is None and p.accepted == (1, 2.0, "b", 3)
    assert p.merged == {"b": {(1, 2.0, "b", 3)}} and p.age_prev == 4.0 and not p.holding
    assert p.counters.positions_forgotten == 3 and p.describe()["positions_forgotten"] == 3
    fresh = SpykerPeering("a", ["a", "b"], CFG)
    fresh.restore({"known": good})
    assert "positions_forgotten" not in fresh.describe()  # the status says so only once it happened


def test_a_position_whose_epoch_jumps_past_the_bound_is_refused_so_the_ring_can_still_regenerate() -> None:
    """helper-115: one beat (or token, or model) at epoch 2**62 - 1 was learnt, and no honest
    coordinator could regenerate a token after it (epoch + 1 is past the cap): the ring stalled
    for good. An epoch may exceed the known one (0 for a coordinator that knows none) by at most
    MAX_EPOCH_JUMP (``malformed``, nothing learnt), so the cap is 2**40 messages away."""
    from coordinator.peering.spyker import MAX_EPOCH_JUMP

    view = View(weights=vec(0.0))
    b = SpykerPeering("b", ["a", "b"], CFG)
    b.on_timer(view, 0.0)
    fresh = SpykerPeering("b", ["a", "b"], CFG)  # knows no position at all
    base = {"at": 1.0, "age": 0.0, "clients": 1, "hold": True}
    b.on_message(view, msg_from("a", "beat", {**base, "pos": [3, 0.5, "a", 7]}), 1.0)
    assert b.known == (3, 0.5, "a", 7)
    for n, (kind, extra) in enumerate((("beat", {}), ("token", {"ages": {}}), ("model", {"hold": False}))):
        far = [3 + MAX_EPOCH_JUMP + 1, 0.0, "a", 0]
        body = {**base, "at": 2.0 + n, "pos": far, "sid": far, **extra}
        for p in (b, fresh):
            with pytest.raises(MalformedMessage, match="jumps more than"):
                p.on_message(view, msg_from("a", kind, body, vec(1.0) if kind == "model" else None), 2.0 + n)
    with pytest.raises(MalformedMessage, match="jumps more than"):  # a model's sync id likewise
        b.on_message(view, msg_from("a", "model", {**base, "at": 9.0, "pos": None, "sid": [2**62 - 1, 0.0, "a", 0]},
                                    vec(1.0)), 9.0)
    assert b.known == (3, 0.5, "a", 7) and fresh.known is None and b.counters.merges == 0 and not b.holding
    b.on_message(view, msg_from("a", "beat", {**base, "at": 10.0, "pos": [3 + MAX_EPOCH_JUMP, 0.0, "a", 0]}), 10.0)
    assert b.known == (3 + MAX_EPOCH_JUMP, 0.0, "a", 0)  # a jump of the bound itself is taken
    b.on_message(view, msg_from("a", "beat", {**base, "at": 11.0, "hold": False, "pos": None}), 11.0)
    b.on_timer(view, 11.0 + CFG.token_timeout_s)  # a fell silent (as holder): b regenerates past it
    assert b.holding and b.known is not None and b.known[0] == 4 + MAX_EPOCH_JUMP
    fresh.on_message(view, msg_from("a", "beat", {**base, "at": 12.0, "pos": [5, 0.0, "a", 2**61]}), 12.0)
    assert fresh.known == (5, 0.0, "a", 2**61)  # a late joiner takes any hop (honest tokens pass for ever)


def test_a_relayed_age_stamped_far_in_the_future_does_not_freeze_a_third_peers_age() -> None:
    """helper-115: a token's ``ages`` entry for c stamped ``at`` = 1e300 was newer than every report
    c itself would ever send, so b kept the forged age for c for good (its h_inter trigger saw it).
    An entry stamped more than MAX_CLOCK_AHEAD_S past b's clock is skipped and counted."""
    from coordinator.peering.spyker import MAX_CLOCK_AHEAD_S

    b = SpykerPeering("b", ["a", "b", "c"], INTRA_ONLY)
    view = View(weights=vec(0.0))
    b.on_timer(view, 0.0)
    base = {"at": 1.0, "age": 0.0, "clients": 1, "hold": False}
    token = {**base, "pos": [1, 0.5, "a", 1], "ages": {"a": [0.0, 1.0], "c": [100.0, 1e300]}}
    assert b.on_message(view, msg_from("a", "token", token), 1.0).counted  # the status shows ages_ignored
    assert b.holding and b.info["c"].age == 0.0 and b.describe()["ages_ignored"] == 1
    b.on_message(view, msg_from("c", "beat", {**base, "at": 2.0, "age": 7.0, "pos": [1, 0.5, "a", 1]}), 2.0)
    assert b.info["c"].age == 7.0  # c's own report is taken
    skewed = {**token, "at": 3.0, "pos": [1, 0.5, "a", 3], "ages": {"c": [9.0, 3.0 + MAX_CLOCK_AHEAD_S]}}
    assert not b.on_message(view, msg_from("a", "token", skewed), 3.0).counted  # within the clock-skew allowance: taken
    assert b.info["c"].age == 9.0 and b.counters.ages_ignored == 1


def test_spyker_peer_bodies_from_other_processes_are_validated() -> None:
    p = SpykerPeering("b", ["a", "b"], CFG)
    view = View(weights=vec(0.0))
    p.on_timer(view, 0.0)
    good = {"at": 1.0, "age": 0.0, "clients": 0, "hold": False, "pos": None}
    bad_bodies = [
        {**good, "at": "now"},
        {**good, "age": float("nan")},
        {**good, "clients": -1},
        {**good, "pos": [0, 1.0, "x/y", 0]},
        {**good, "pos": [0, 1.0]},
        {**good, "hold": "yes"},
    ]
    for body in bad_bodies:
        with pytest.raises(MalformedMessage):
            p.on_message(view, msg_from("a", "beat", body), 1.0)
    # each field of a token position is checked (a bool is no int, a created_at must be finite)
    for pos, field in [([-1, 1.0, "a", 0], "epoch"), ([True, 1.0, "a", 0], "epoch"), ([2**62, 1.0, "a", 0], "epoch"),
                       ([0, float("inf"), "a", 0], "created_at"), ([0, "x", "a", 0], "created_at"), ([0, False, "a", 0], "created_at"),
                       ([0, 1.0, "a", -1], "hop"), ([0, 1.0, "a", 2**62], "hop"), ([0, 1.0, "a", 1.5], "hop")]:
        with pytest.raises(MalformedMessage, match=f"bad {field} in token position"):
            p.on_message(view, msg_from("a", "beat", {**good, "pos": pos}), 1.0)
    with pytest.raises(MalformedMessage):
        p.on_message(view, msg_from("a", "gossip", good), 1.0)
    with pytest.raises(MalformedMessage):
        p.on_message(view, msg_from("a", "model", {**good, "sid": [0, 0.0, "a", 0]}), 1.0)  # no weights
    with pytest.raises(UnknownPeer):  # (as HierFAVG and NebulaFL say it)
        p.on_message(view, msg_from("z", "beat", good), 1.0)  # not in our ring


ops = st.lists(
    st.one_of(
        st.tuples(st.just("tick"), st.sampled_from([0.1, 0.5, 1.0, 2.5, 6.0])),
        st.tuples(st.just("deliver"), st.integers(0, 1000)),
        st.tuples(st.just("drop"), st.integers(0, 1000)),
        st.tuples(st.just("dup"), st.integers(0, 1000)),
        st.tuples(st.just("crash"), st.integers(0, 3)),
        st.tuples(st.just("crash_holder")),
        st.tuples(st.just("lose_all")),
        st.tuples(st.just("restart"), st.integers(0, 3)),
        st.tuples(st.just("updates"), st.integers(0, 3), st.integers(1, 12)),
    ),
    min_size=10,
    max_size=150,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops, stay_dead=st.sets(st.integers(0, 3), max_size=3), n=st.integers(2, 4), seed=st.integers(0, 3), persistent=st.booleans())
def test_token_ring_survives_any_order_loss_duplicate_or_crash(
    ops: list[tuple[object, ...]], stay_dead: set[int], n: int, seed: int, persistent: bool
) -> None:
    names = ["a", "b", "c", "d"][:n]
    ring = spyker_ring(names, CFG, seed=seed, persistent=persistent)
    for op in ops:
        kind = op[0]
        if kind == "tick":
            ring.tick(float(op[1]))  # type: ignore[arg-type]
        elif kind in ("deliver", "drop", "dup") and ring.net:
            i = int(op[1]) % len(ring.net)  # type: ignore[call-overload]
            if kind == "deliver":
                ring.deliver(i)
            elif kind == "drop":
                ring.net.pop(i)
            else:
                ring.net.append(ring.net[i])
        elif kind == "crash":
            ring.crash(names[int(op[1]) % n])  # type: ignore[call-overload]
        elif kind == "crash_holder":
            for h in ring.holders():
                ring.crash(h)
        elif kind == "lose_all":
            ring.net.clear()
        elif kind == "restart":
            ring.restart(names[int(op[1]) % n])  # type: ignore[call-overload]
        elif kind == "updates":
            ring.local_updates(names[int(op[1]) % n], int(op[2]))  # type: ignore[call-overload]
        ring.tick(0.25)  # time always moves: beats, timeouts and regenerations happen mid-chaos
        # Safety at every step: one position is never held twice.
        positions = [ring.nodes[h].peering.known for h in ring.holders()]  # type: ignore[attr-defined]
        assert len(positions) == len(set(positions))
    # Quiet period: some coordinators stay dead, the others are (re)started, nothing is lost.
    dead = {names[i % n] for i in stay_dead}
    if len(dead) == n:
        dead.discard(names[0])
    for name in names:
        if name not in dead:
            ring.restart(name)
        else:
            ring.crash(name)
    settle(ring, CFG.token_timeout_s + n * CFG.stagger_s + 3 * CFG.sync_timeout_s + 10)
    holders = ring.holders()
    assert len(holders) == 1, f"live tokens at {holders}"
    token = ring.nodes[holders[0]].peering.known  # type: ignore[attr-defined]
    assert all(node.peering.known == token for node in ring.live())  # type: ignore[attr-defined]
    # At most one model broadcast per sync id per coordinator incarnation.
    for node in ring.nodes.values():
        assert len(node.broadcasts) == len(set(node.broadcasts)), node.name
    peers = [node.peering for node in ring.nodes.values()]
    event(f"token epoch {min(token[0], 3)}{'+' if token[0] >= 3 else ''}")
    event(f"tokens dropped: {min(sum(p.counters.tokens_dropped for p in peers), 2)}+")  # type: ignore[attr-defined]
    event(f"dead at the end: {len(dead)}")


@settings(max_examples=40, deadline=None)
@given(script=st.lists(st.tuples(st.integers(0, 2), st.integers(1, 20)), min_size=5, max_size=60))
def test_ages_converge_when_coordinators_sync(script: list[tuple[int, int]]) -> None:
    names = ["a", "b", "c"]
    ring = spyker_ring(names)
    settle(ring, 5)
    for who, k in script:
        ring.local_updates(names[who], k)
        settle(ring, 0.5)
    settle(ring, 30)
    ages = [n.peering.age for n in ring.nodes.values()]  # type: ignore[attr-defined]
    total = sum(k for _, k in script)
    assert max(ages) - min(ages) < CFG.h_inter + 1e-6 or total < CFG.h_inter
    # merged ages never exceed the largest local count, never fall below zero
    assert all(0 <= a <= total for a in ages)


# --------------------------------------------------------------------------- real cores


class Bus:
    """Three real CoordinatorCores joined by an instant in-memory broker."""

    def __init__(self, names: list[str], strategy: str = "spyker", peering: str = "spyker",
                 snapshots: dict[str, Snapshot] | None = None, **peer: object) -> None:
        self.now = 0.0
        self.cores: dict[str, CoordinatorCore] = {}
        self.commits: dict[str, list[CommitVersion]] = {n: [] for n in names}
        self.queue: list[tuple[str, Publish]] = []
        self.timers: dict[str, float] = {}
        for n in names:
            strat = make_strategy(strategy)
            cfg = CoordinatorConfig(region=f"r-{n}", coordinator_id=n, spec=SPEC, hints={"lr": 0.05}, signer=Signer.generate())
            p = make_peering(peering, coordinator_id=n, ring=names, strategy=strat, params=peer)
            snap = (snapshots or {}).get(n) or Snapshot(version=0, weights=vec(0.0))
            self.cores[n] = CoordinatorCore(cfg, strat, snap, rng=random.Random(0), peering=p)
        for n, core in self.cores.items():
            self.run(n, core.start(self.now))

    def run(self, name: str, actions: list[object]) -> None:
        for a in actions:
            if isinstance(a, Publish):
                self.queue.append((name, a))
            elif isinstance(a, CommitVersion):
                self.commits[name].append(a)
            elif hasattr(a, "at"):
                self.timers[name] = a.at  # type: ignore[attr-defined]

    def pump(self) -> list[tuple[str, Publish]]:
        out = []
        while self.queue:
            sender, pub = self.queue.pop(0)
            out.append((sender, pub))
            parsed = topics.parse(pub.topic)
            if parsed.kind != "peer":
                continue
            for n, core in self.cores.items():
                if parsed.coordinator in (n, "all"):
                    self.run(n, core.handle(MessageReceived(now=self.now, topic=pub.topic, payload=pub.payload)))
        return out

    def advance(self, dt: float) -> None:
        self.now += dt
        for n, core in self.cores.items():
            if self.timers.get(n, math.inf) <= self.now:
                del self.timers[n]
                self.run(n, core.handle(TimerFired(now=self.now)))
        self.pump()

    def send_update(self, name: str, device: str, seq: int, value: float) -> list[tuple[str, Publish]]:
        core = self.cores[name]
        region = core.config.region
        upd = Update(device=device, seq=seq, model_id=SPEC.model_id, base_version=core.version, n_samples=5, weights=vec(value))
        self.run(name, core.handle(MessageReceived(now=self.now, topic=topics.device_topic(region, device, "update"), payload=encode(upd))))
        return self.pump()


def test_three_real_cores_exchange_models_and_commit_merges() -> None:
    bus = Bus(["a", "b", "c"], h_inter=3.0, h_intra=10.0, beacon_s=1.0, token_timeout_s=4.0)
    for _ in range(10):
        bus.advance(0.5)
    holder = [n for n, c in bus.cores.items() if c.peering.describe()["holds_token"]]
    assert holder == ["a"]
    for seq in range(12):
        bus.send_update("a", "dev-a", seq, 1.0)
    for _ in range(10):
        bus.advance(0.5)
    for n in bus.cores:
        sources = [c.metadata["source"] for c in bus.commits[n]]
        assert "peer" in sources, n
        assert all(c.metadata["peering"]["ledger"]["age"] >= 0 for c in bus.commits[n])
    ages = [core.peering.describe()["age"] for core in bus.cores.values()]
    assert max(ages) - min(ages) < 12
    assert float(bus.cores["b"].weights.mean()) > 0  # a's devices reached b's model
    status = parse_status_json(status_json(bus.cores["a"].status()))  # what the retained status carries
    assert status["extra"]["peering"]["name"] == "spyker" and status["extra"]["peering"]["merges"] >= 1
    assert status["extra"]["peering"]["known_token"] is not None


def test_hierfavg_a_restarted_cloud_core_gets_the_waiting_edges_models_again() -> None:
    """helper-177, through real cores (signed peer messages, the core's first timer): a cloud restarted
    while its round 1 was open, the edges waiting on it. The cloud's ``resend`` (no model) reaches both
    edges, each sends its model again, the round closes at once and every coordinator commits the average."""
    waiting = {"edge_rounds": 1, "cloud_round": 1}
    snaps = {n: Snapshot(version=3, weights=vec(w), peer_state={**waiting, "waiting": {"version": 3, "since": 0.5, "claim": 10}},
                         peer_name="hierfavg") for n, w in (("cloud", 1.0), ("e1", 3.0), ("e2", 5.0))}
    bus = Bus(["cloud", "e1", "e2"], strategy="hierfavg", peering="hierfavg", snapshots=snaps, kappa2=1, sync_timeout_s=30.0)
    kinds = [(sender, topics.parse(pub.topic).leaf) for sender, pub in bus.pump()]
    assert ("cloud", "resend") in kinds and ("e1", "edge") in kinds and ("e2", "edge") in kinds
    for n in ("cloud", "e1", "e2"):
        (commit,) = bus.commits[n]
        assert commit.metadata["source"] == "peer" and commit.metadata["cloud_round"] == 1
        np.testing.assert_allclose(commit.weights, 3.0)  # (1 + 3 + 5) / 3, 10 samples each
    assert bus.cores["cloud"].peering.describe()["resends"] == 1 and bus.cores["e1"].peering.describe()["resends"] == 1


def test_hierfavg_the_cloud_sends_its_global_only_after_the_merge_that_makes_it() -> None:
    """A driver holds what follows a commit until the commit is durable (the daemon's group commit). The
    cloud's ``global`` came before its merge's commit: the daemon sent it at once and made the version
    durable after, so a crash in between left the edges on a global the restarted cloud did not have
    (it reopened the round: helper-177). Now the commit comes first, at every coordinator."""
    order: dict[str, list[str]] = {}

    class Logged(Bus):
        def run(self, name: str, actions: list[object]) -> None:
            order.setdefault(name, []).extend(
                "commit" if isinstance(a, CommitVersion) else topics.parse(a.topic).leaf
                for a in actions if isinstance(a, CommitVersion) or (isinstance(a, Publish) and topics.parse(a.topic).kind == "peer"))
            super().run(name, actions)

    waiting = {"edge_rounds": 1, "cloud_round": 1}
    snaps = {n: Snapshot(version=3, weights=vec(w), peer_state={**waiting, "waiting": {"version": 3, "since": 0.5, "claim": 10}},
                         peer_name="hierfavg") for n, w in (("cloud", 1.0), ("e1", 3.0), ("e2", 5.0))}
    Logged(["cloud", "e1", "e2"], strategy="hierfavg", peering="hierfavg", snapshots=snaps, kappa2=1, sync_timeout_s=30.0).pump()
    assert "global" in order["cloud"]
    assert order["cloud"].index("commit") < order["cloud"].index("global"), order["cloud"]


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_a_merge_after_a_restart_past_unreadable_versions_is_aged_under_its_committed_version(mode: str) -> None:
    """a resumes from version 2 with 3-5 unreadable (the registry skips them: the next commit is 6)
    and its first commit is a merge of b's model. Its age belongs to version 6, the number the core
    gives it; the old code filed it under version + 1 = 3, a version never committed (and version
    6, asked for by every device trained from it, was aged by the fallback, one unit per version)."""
    floor = Snapshot(version=2, weights=vec(0.0), version_floor=5)
    bus = Bus(["b", "a"], snapshots={"a": floor}, mode=mode, h_inter=3.0, h_intra=10.0, beacon_s=1.0, token_timeout_s=4.0)
    for _ in range(4):
        bus.advance(0.5)
    for seq in range(12):
        bus.send_update("b", "dev-b", seq, 1.0)
    for _ in range(10):
        bus.advance(0.5)
    merges = [c for c in bus.commits["a"] if c.metadata["source"] == "peer"]
    assert merges and bus.commits["a"][0] is merges[0] and merges[0].version == 6
    ledger = cast(SpykerStrategy, bus.cores["a"].strategy).ledger
    age = merges[0].metadata["age"]
    assert age > 0 and ledger.age_at.get(6) == age
    assert 3 not in ledger.age_at  # the old code: {3: age}, and no entry for 6
    later = [c.version for c in bus.commits["a"][1:]]  # each later merge is numbered version + 1 at once
    assert all(ledger.age_at.get(v) == c.metadata["age"] for v, c in zip(later, bus.commits["a"][1:], strict=True))


def test_a_token_re_routed_to_a_third_coordinator_gives_no_second_holder() -> None:
    """A token a passed to b, re-delivered by the broker on c's topic, made c a holder of the
    same position too (review finding F13). It is signed for b's topic: c refuses it."""
    bus = Bus(["a", "b", "c"], h_inter=3.0, h_intra=10.0, beacon_s=1.0, token_timeout_s=4.0)
    tokens: list[Publish] = []
    pump = bus.pump

    def recording_pump() -> Any:
        out = pump()
        tokens.extend(pub for _, pub in out if pub.topic.endswith("/token"))
        return out

    bus.pump = recording_pump  # type: ignore[method-assign]
    for _ in range(10):
        bus.advance(0.5)
    for seq in range(12):
        bus.send_update("a", "dev-a", seq, 1.0)
    for _ in range(4):
        bus.advance(0.5)
    assert tokens, "no token was passed"
    token = tokens[-1]
    to = topics.parse(token.topic).coordinator
    holders = [n for n, c in bus.cores.items() if c.peering.describe()["holds_token"]]
    assert holders == [to]
    third = next(n for n in bus.cores if n != to and n != "a")
    core = bus.cores[third]
    before = core.counters["reject:bad_signature"]
    bus.run(third, core.handle(MessageReceived(now=bus.now, topic=topics.peer_topic(third, "token"), payload=token.payload)))
    assert core.counters["reject:bad_signature"] == before + 1
    assert [n for n, c in bus.cores.items() if c.peering.describe()["holds_token"]] == [to]


def test_a_replayed_or_redelivered_peer_model_is_not_merged_again() -> None:
    """A peer's model message for a sync it was merged for (a replay, a QoS 1 redelivery) used
    to be merged and committed again each time, dragging the model back toward the peer's old
    weights; it is ignored and counted, across a restart too."""
    from edge_sdk.core.events import MessageReceived

    bus = Bus(["a", "b", "c"], h_inter=3.0, h_intra=10.0, beacon_s=1.0, token_timeout_s=4.0)
    for _ in range(10):
        bus.advance(0.5)
    captured: list[Any] = []
    pump = bus.pump

    def recording_pump() -> Any:
        out = pump()
        captured.extend(pub for sender, pub in out if sender == "b" and pub.topic.endswith("/model"))
        return out

    bus.pump = recording_pump  # type: ignore[method-assign]
    for seq in range(12):
        bus.send_update("a", "dev-a", seq, 1.0)
    for _ in range(10):
        bus.advance(0.5)
    assert captured, "b sent no model"
    core = bus.cores["a"]
    version, weights, merges = core.version, core.weights.copy(), core.peering.describe()["merges"]
    status_topic = topics.status_topic(core.config.region)
    for n in range(1, 4):
        bus.now += 60.0
        actions = core.handle(MessageReceived(now=bus.now, topic=captured[0].topic, payload=captured[0].payload))
        # the count reaches the retained status now, as a rejected device message's does (it
        # waited for whatever published the status next: a commit, a device's message)
        [status] = [a for a in actions if isinstance(a, Publish) and a.topic == status_topic]
        assert parse_status_json(status.payload)["extra"]["peering"]["models_ignored"] == n
        bus.run("a", actions)
    assert core.version == version and core.peering.describe()["merges"] == merges
    np.testing.assert_array_equal(core.weights, weights)
    assert core.peering.describe()["models_ignored"] == 3
    restored = type(core.peering)("a", ["a", "b", "c"], core.peering.config)
    restored.restore(core.peering.checkpoint())
    assert restored.merged == core.peering.merged and restored.merged["b"]


def test_decayed_learning_rate_reaches_the_device_in_the_model_hints() -> None:
    bus = Bus(["a", "b"])
    core = bus.cores["a"]
    for seq in range(6):
        bus.send_update("a", "fast", seq, 0.1)
    bus.send_update("a", "slow", 0, 0.1)
    pull = Pull(device="fast", seq=100, model_id=SPEC.model_id)
    actions = core.handle(MessageReceived(now=1.0, topic=topics.device_topic("r-a", "fast", "pull"), payload=encode(pull)))
    models = [decode(a.payload) for a in actions if isinstance(a, Publish) and a.topic.endswith("/model")]
    assert len(models) == 1 and isinstance(models[0], ModelMsg)
    assert models[0].hints["lr"] == pytest.approx(1e-6)  # u = 6 ≥ ū = 3.5: decayed to the floor
    pull = Pull(device="slow", seq=100, model_id=SPEC.model_id)
    actions = core.handle(MessageReceived(now=1.0, topic=topics.device_topic("r-a", "slow", "pull"), payload=encode(pull)))
    slow = [decode(a.payload) for a in actions if isinstance(a, Publish) and a.topic.endswith("/model")]
    assert isinstance(slow[0], ModelMsg) and slow[0].hints["lr"] == 0.05  # the coordinator's hint


def test_a_malformed_peer_body_is_rejected_by_the_core_not_fatal() -> None:
    bus = Bus(["a", "b"])
    core = bus.cores["a"]
    b_signer = bus.cores["b"].config.signer
    topic = topics.peer_topic("all", "beat")
    bad = encode(PeerMsg(sender="b", kind="beat", body={"at": "x"}), signer=b_signer, scope=topics.signing_scope(topic))
    core.handle(MessageReceived(now=0.0, topic=topic, payload=bad))
    assert core.counters["messages_rejected"] == 1
    assert core.counters["reject:malformed"] == 1


def test_a_peer_model_of_finite_float32_max_values_is_refused_and_changes_nothing() -> None:
    """helper-115: peer weights were checked for NaN and Inf only. A peer model of 3e38s was merged
    and committed (a version of 9e37s), and a second one of -3e38s overflowed in the merge: refused
    only at the commit, after Spyker had counted and recorded the merge. Peer models are bounded as
    device updates are (MAX_UPDATE_NORM, ``out_of_range``)."""
    bus = Bus(["a", "b"])
    core, b_signer = bus.cores["a"], bus.cores["b"].config.signer
    topic = topics.peer_topic("a", "model")
    version, weights = core.version, core.weights.copy()
    for sign, hop in ((1.0, 0), (-1.0, 1)):
        body = {"at": 1.0, "age": 5.0, "clients": 1, "pos": None, "hold": False, "sid": [9, 0.0, "b", hop]}
        payload = encode(PeerMsg(sender="b", kind="model", body=body, weights=vec(sign * 3e38)), signer=b_signer,
                         scope=topics.signing_scope(topic))
        (note,) = [a for a in core.handle(MessageReceived(now=1.0, topic=topic, payload=payload)) if isinstance(a, Notify)]
        assert note.data["reason"] == "out_of_range"
    assert core.counters["reject:out_of_range"] == 2 and core.counters["peer_merges"] == 0
    assert core.version == version and core.peering.describe()["merges"] == 0
    np.testing.assert_array_equal(core.weights, weights)


# --------------------------------------------------------------------------- NebulaFL


def test_nebula_maths() -> None:
    planets = [vec(1.0), vec(3.0)]
    np.testing.assert_allclose(master_model(planets, [1, 3]), 2.5)
    np.testing.assert_allclose(master_model(planets, [0, 0]), 2.0)  # plain mean before any version
    np.testing.assert_allclose(planet_update(vec(1.0), vec(0.0), 20, 2, 1.0), 18 / 19)  # w = 18
    np.testing.assert_allclose(planet_update(vec(1.0), vec(0.0), 3, 2, 0.5), 5 / 5.5)  # w floored at 5
    assert decay_weight(0, 60) == 1.0 and decay_weight(30, 60) == 0.75 and decay_weight(600, 60) == 0.5
    assert [rotation_target(1, r, 4) for r in range(5)] == [1, 2, 3, 0, 1]


def test_nebula_strategy_feeds_the_lowest_version_planet() -> None:
    strategy = NebulaStrategy(NebulaConfig(planets=3, t_c=10.0))
    view = View(weights=vec(0.0))
    master = strategy.aggregate(view, [update("d", 0, 0, vec(6.0))])
    st_ = strategy.state
    assert st_.versions == [1.0, 0.0, 0.0]
    # planet 0 pulled toward the (initial) stellar model: (5·6 + 0.5·0) / 5.5 with d_t = 0.5 (no rotation yet)
    assert st_.planets is not None
    np.testing.assert_allclose(st_.planets[0], 30 / 5.5, rtol=1e-6)
    np.testing.assert_allclose(master, 30 / 5.5, rtol=1e-6)  # versions [1, 0, 0]
    strategy.aggregate(view, [update("d", 1, 0, vec(6.0)), update("e", 0, 0, vec(6.0))])
    assert st_.versions == [1.0, 1.0, 1.0]


def test_nebula_rotation_sends_to_i_plus_r_and_replaces_the_stellar_model() -> None:
    ring = ["a", "b", "c", "d"]
    strategies = {n: NebulaStrategy(NebulaConfig(planets=2, t_c=10.0)) for n in ring}
    peers = {n: NebulaPeering(n, ring, NebulaPeerConfig(t_c=10.0), strategy=strategies[n]) for n in ring}
    view = View(weights=vec(1.0))
    targets: dict[str, list[str]] = {n: [] for n in ring}
    for t in (0.0, 10.0, 20.0, 30.0, 40.0):
        for n, p in peers.items():
            plan = p.on_timer(view, t)
            targets[n].append(plan.sends[0].to if plan.sends else n)
    assert targets["b"] == ["b", "c", "d", "a", "b"]
    assert targets["d"] == ["d", "a", "b", "c", "d"]
    assert peers["a"].wake_at() == 50.0
    msg = msg_from("b", "rotate", {"round": 3, "version": 7.5}, vec(9.0))
    assert peers["a"].on_message(view, msg, 41.0).merged is None
    st_ = strategies["a"].state
    assert st_.v_stellar == 7.5 and st_.stellar_at == 41.0 and st_.stellar is not None
    np.testing.assert_allclose(st_.stellar, 9.0)
    with pytest.raises(MalformedMessage):
        peers["a"].on_message(view, msg_from("b", "rotate", {"round": 3, "version": "x"}, vec(9.0)), 41.0)


def test_nebula_refuses_a_rotation_without_weights_and_changes_nothing() -> None:
    """A rotation must carry the sender's master: one without weights would have replaced the
    stellar model by nothing (np.array(None) is a 0-d NaN)."""
    ring = ["a", "b"]
    strategy = NebulaStrategy(NebulaConfig(planets=2, t_c=10.0))
    peer = NebulaPeering("a", ring, NebulaPeerConfig(t_c=10.0), strategy=strategy)
    view = View(weights=vec(1.0))
    peer.on_timer(view, 0.0)
    st_ = strategy.state
    assert st_.stellar is not None
    stellar, v_stellar = st_.stellar.copy(), st_.v_stellar
    with pytest.raises(MalformedMessage, match="carries a master model"):
        peer.on_message(view, msg_from("b", "rotate", {"round": 1, "version": 3.0}), 1.0)
    np.testing.assert_array_equal(st_.stellar, stellar)
    assert st_.v_stellar == v_stellar and peer.rotations_from == {} and peer.received == 0
    assert peer.on_message(view, msg_from("b", "rotate", {"round": 1, "version": 3.0}, vec(2.0)), 2.0).merged is None
    assert peer.received == 1 and st_.v_stellar == 3.0  # the same rotation with its master is taken


def test_nebula_refuses_an_absurd_rotation_version_and_its_selection_keeps_working() -> None:
    """helper-115: a rotation claiming version 1.7e308 was taken as v_s; with ``selection = "reward"``
    every device's weight became 0 and each plan raised ValueError (``rng.choices``)."""
    strategy = NebulaStrategy(NebulaConfig(planets=2, t_c=10.0, selection="reward"))
    peer = NebulaPeering("a", ["a", "b"], NebulaPeerConfig(t_c=10.0), strategy=strategy)
    view = View(weights=vec(0.0))
    peer.on_timer(view, 0.0)
    peer.on_timer(view, 10.0)
    for claim in (1.7e308, 2.0**60):
        with pytest.raises(MalformedMessage, match="version must be in"):
            peer.on_message(view, msg_from("b", "rotate", {"round": 1, "version": claim}, vec(1.0)), 11.0)
    assert strategy.state.v_stellar == 0.0 and peer.received == 0 and peer.rotations_from == {}
    strategy.score = {"d1": (1.0, 1), "d2": (3.0, 1), "d3": (2.0, 1)}
    assert sum(strategy.probabilities(["d1", "d2", "d3"], 0)) == pytest.approx(1.0)


def test_nebula_takes_a_rotation_only_from_the_ring_member_due_to_send_it_and_only_once() -> None:
    """Any sender's rotate used to replace the stellar model: one from outside the ring, one
    the round does not send here, and an old one replayed (also after a restart)."""
    from edge_sdk.errors import UnknownPeer

    ring = ["a", "b", "c", "d"]
    strategy = NebulaStrategy(NebulaConfig(planets=2, t_c=10.0))
    peer = NebulaPeering("a", ring, NebulaPeerConfig(t_c=10.0), strategy=strategy)
    view = View(weights=vec(1.0))
    with pytest.raises(UnknownPeer):
        peer.on_message(view, msg_from("mallory", "rotate", {"round": 3, "version": 1e300}, vec(50.0)), 41.0)
    with pytest.raises(MalformedMessage, match="rotates to another"):  # in round 2, b sends to d
        peer.on_message(view, msg_from("b", "rotate", {"round": 2, "version": 7.0}, vec(50.0)), 41.0)
    assert strategy.state.stellar is None and peer.received == 0
    peer.on_message(view, msg_from("b", "rotate", {"round": 3, "version": 7.5}, vec(9.0)), 41.0)
    peer.on_message(view, msg_from("c", "rotate", {"round": 2, "version": 8.0}, vec(8.0)), 51.0)
    restored = NebulaPeering("a", ring, NebulaPeerConfig(t_c=10.0), strategy=strategy)
    restored.restore(json.loads(json.dumps(peer.checkpoint())))
    for p in (peer, restored):
        assert p.on_message(view, msg_from("b", "rotate", {"round": 3, "version": 7.5}, vec(9.0)), 90.0).counted  # replayed
        assert p.ignored == 1
    assert strategy.state.v_stellar == 8.0 and peer.received == 2
    np.testing.assert_allclose(strategy.state.stellar, 8.0)


def test_hierfavg_refuses_a_sender_outside_the_ring() -> None:
    """An outsider's edge model counted toward the cloud's quorum and was averaged in."""
    from edge_sdk.errors import UnknownPeer

    ring = ["cloud", "e1", "e2"]
    strategy = HierEdgeStrategy(FedAvgConfig(select=5, min_devices=1))
    cloud = HierPeering("cloud", ring, HierPeerConfig(kappa2=1, sync_timeout_s=30.0), strategy=strategy)
    view = View(weights=vec(1.0))
    strategy.gate.samples = 10
    cloud.on_version(view, 1.0)
    with pytest.raises(UnknownPeer):
        cloud.on_message(view, msg_from("x", "edge", {"round": 1, "samples": 10**6}, vec(100.0)), 2.0)
    assert sorted(cloud.collected) == ["cloud"]
    assert cloud.on_message(view, msg_from("e1", "edge", {"round": 1, "samples": 10}, vec(3.0)), 3.0).merged is None  # e2 missing


def test_nebula_restart_keeps_versions_and_the_rotation_clock() -> None:
    ring = ["a", "b"]
    s1 = NebulaStrategy(NebulaConfig(planets=2))
    p1 = NebulaPeering("a", ring, NebulaPeerConfig(t_c=10.0), strategy=s1)
    view = View(weights=vec(0.0))
    p1.on_timer(view, 100.0)
    s1.aggregate(view, [update("d", 0, 0, vec(1.0))])
    state = json.loads(json.dumps(p1.checkpoint()))
    s2 = NebulaStrategy(NebulaConfig(planets=2))
    p2 = NebulaPeering("a", ring, NebulaPeerConfig(t_c=10.0), strategy=s2)
    p2.restore(state)
    # (restored, it asks for on_timer at once: the rotation clock is checked against the restart's clock)
    assert s2.state.versions == [1.0, 0.0] and p2.wake_at() == -math.inf
    assert p2.on_timer(view, 105.0).sends == () and p2.wake_at() == 110.0  # an honest restart keeps the clock
    plan = p2.on_timer(view, 135.0)  # rounds missed while down are skipped, not replayed
    assert len(plan.sends) <= 1 and p2.wake_at() == 140.0


# --------------------------------------------------------------------------- HierFAVG


def test_hierfavg_edges_wait_for_the_cloud_average() -> None:
    ring = ["cloud", "e1"]
    strategies = {n: HierEdgeStrategy(FedAvgConfig(select=5, min_devices=1)) for n in ring}
    cfg = HierPeerConfig(kappa2=1, sync_timeout_s=30.0, max_share=1.0)  # plain sample weights (e1 has 3/4)
    peers = {n: HierPeering(n, ring, cfg, strategy=strategies[n]) for n in ring}
    v_cloud, v_e1 = View(weights=vec(1.0)), View(weights=vec(3.0))
    strategies["cloud"].gate.samples, strategies["e1"].gate.samples = 10, 30
    assert peers["cloud"].on_version(v_cloud, 1.0).merged is None  # waits for e1
    assert strategies["cloud"].gate.waiting
    assert strategies["cloud"].plan(v_cloud, 1.5, random.Random(0)).invite == ()  # no new round while waiting
    edge_plan = peers["e1"].on_version(v_e1, 2.0)
    assert [s.to for s in edge_plan.sends] == ["cloud"] and strategies["e1"].gate.waiting
    send = edge_plan.sends[0]
    plan = peers["cloud"].on_message(v_cloud, msg_from("e1", send.kind, send.body, send.weights), 2.5)
    assert plan.merged is not None
    np.testing.assert_allclose(plan.merged, (10 * 1 + 30 * 3) / 40)
    assert not strategies["cloud"].gate.waiting
    glob = plan.sends[0]
    back = peers["e1"].on_message(v_e1, msg_from("cloud", glob.kind, glob.body, glob.weights), 3.0)
    assert back.merged is not None and not strategies["e1"].gate.waiting
    np.testing.assert_allclose(weighted_mean([vec(1.0), vec(2.0)], [0, 0]), 1.5)


def test_hierfavg_edge_gives_up_on_a_silent_cloud() -> None:
    ring = ["cloud", "e1"]
    s = HierEdgeStrategy(FedAvgConfig())
    p = HierPeering("e1", ring, HierPeerConfig(kappa2=1, sync_timeout_s=5.0), strategy=s)
    p.on_version(View(weights=vec(0.0)), 10.0)
    assert s.gate.waiting and p.wake_at() == 15.0
    p.on_timer(View(weights=vec(0.0)), 15.0)
    assert not s.gate.waiting and p.timeouts == 1


def test_hierfavg_takes_the_global_model_only_from_the_cloud() -> None:
    """helper-115: an edge's "global" message was committed verbatim by every other edge (any
    ring member passed), so one compromised edge set every edge's model. Only the cloud answers."""
    ring = ["cloud", "e1", "e2"]
    s = HierEdgeStrategy(FedAvgConfig(select=5, min_devices=1))
    e1 = HierPeering("e1", ring, HierPeerConfig(kappa2=1, sync_timeout_s=30.0), strategy=s)
    view = View(weights=vec(1.0))
    e1.on_version(view, 1.0)
    with pytest.raises(MalformedMessage, match="not the cloud"):
        e1.on_message(view, msg_from("e2", "global", {"round": 1}, vec(666.0)), 2.0)
    assert s.gate.waiting and e1.cloud_round == 1  # still waiting for the cloud's answer
    plan = e1.on_message(view, msg_from("cloud", "global", {"round": 1}, vec(2.0)), 3.0)
    assert plan.merged is not None and float(plan.merged[0]) == 2.0 and not s.gate.waiting


def test_hierfavg_edge_ignores_and_counts_a_late_global_answer() -> None:
    """The cloud's answer to a round the edge gave up on (it timed out and resumed alone), or to a
    round before the one it waits for, is not committed: it would undo the edge's own rounds since."""
    ring = ["cloud", "e1"]
    s = HierEdgeStrategy(FedAvgConfig())
    e1 = HierPeering("e1", ring, HierPeerConfig(kappa2=1, sync_timeout_s=5.0), strategy=s)
    view = View(weights=vec(0.0))
    e1.on_version(view, 10.0)
    e1.on_timer(view, 15.0)  # round 1: the cloud is silent, the edge resumes alone
    assert not s.gate.waiting and e1.timeouts == 1
    late = e1.on_message(view, msg_from("cloud", "global", {"round": 1}, vec(9.0)), 16.0)
    assert late.merged is None and late.counted  # counted: the core publishes the status with it
    e1.on_version(view, 17.0)  # round 2: waiting again
    assert s.gate.waiting and e1.cloud_round == 2
    late = e1.on_message(view, msg_from("cloud", "global", {"round": 1}, vec(9.0)), 18.0)  # round 1's, late
    assert late.merged is None and late.counted
    assert s.gate.waiting and e1.describe()["ignored"] == 2
    answer = e1.on_message(view, msg_from("cloud", "global", {"round": 2}, vec(3.0)), 19.0)
    assert answer.merged is not None and not answer.counted


def test_hierfavg_cloud_drops_an_edge_model_for_a_round_it_closed() -> None:
    """Liu et al.'s cloud averages the edge models of one cloud round. The cloud closed round 1 at
    its timeout without e2; e2's round-1 model (9s) then came in before the cloud's own round 2
    began: the old code kept it and averaged it into round 2 (the global 5s, a stale model at half
    weight, and e2's round-2 model never asked for). Now it is dropped, counted (``ignored``), and
    round 2 averages round 2's models."""
    ring = ["cloud", "e2"]
    s = HierEdgeStrategy(FedAvgConfig())
    cloud = HierPeering("cloud", ring, HierPeerConfig(kappa2=1, sync_timeout_s=5.0, max_share=1.0), strategy=s)
    cloud.on_version(View(weights=vec(1.0)), 10.0)  # round 1: the cloud's own model
    closed = cloud.on_timer(View(weights=vec(1.0)), 15.0)  # e2 silent: round 1 closes on the cloud's model
    assert closed.merged is not None and cloud.timeouts == 1 and cloud.cloud_syncs == 1
    late = cloud.on_message(View(weights=vec(1.0)), msg_from("e2", "edge", {"round": 1, "samples": 10}, vec(9.0)), 16.0)
    assert late.merged is None and late.counted and cloud.describe()["ignored"] == 1
    assert cloud.collected == {} and cloud.wake_at() is None  # the old code: e2's 9s kept (and a wake-up for it)
    s.gate.samples = 10
    assert cloud.on_version(View(weights=vec(1.0)), 20.0).merged is None  # round 2: waits for e2's round-2 model
    plan = cloud.on_message(View(weights=vec(1.0)), msg_from("e2", "edge", {"round": 2, "samples": 10}, vec(3.0)), 21.0)
    assert plan.merged is not None
    np.testing.assert_allclose(plan.merged, 2.0)  # (1 + 3) / 2; the old code closed at 20.0 on (1 + 9) / 2 = 5
    assert plan.sends[0].body == {"round": 2}
    again = HierPeering("cloud", ring, HierPeerConfig(kappa2=1, sync_timeout_s=5.0), strategy=HierEdgeStrategy(FedAvgConfig()))
    again.restore(cloud.checkpoint())  # a restart keeps the round it closed
    assert again.on_message(View(weights=vec(1.0)), msg_from("e2", "edge", {"round": 2, "samples": 10}, vec(9.0)), 22.0).counted
    assert again.collected == {}


def test_hierfavg_samples_taken_while_waiting_go_with_the_model_that_holds_them() -> None:
    """The samples count is not reset at the global merge, on purpose: an update accepted while
    the edge waits for the cloud (a late participant) stays buffered and is aggregated in the
    first edge round after the merge, so its samples belong to the next model sent, not the
    one already sent (reset at the send) nor nowhere (a reset at the merge would drop them)."""
    s = HierEdgeStrategy(FedAvgConfig(select=5, min_devices=1))
    e1 = HierPeering("e1", ["cloud", "e1"], HierPeerConfig(kappa2=1), strategy=s)
    s.gate.samples = 10
    (sent,) = e1.on_version(View(weights=vec(1.0)), 1.0).sends
    assert sent.body["samples"] == 10 and s.gate.samples == 0
    late = BufferedUpdate(device="d9", seq=1, base_version=0, staleness=1, n_samples=7, weights=vec(1.5))
    view = View(weights=vec(1.0), buffer=(late,))
    s.on_update(view, late, 1.5)
    assert not s.plan(view, 1.6, random.Random(0)).aggregate  # waiting: no edge round
    assert e1.on_message(view, msg_from("cloud", "global", {"round": 1}, vec(2.0)), 2.0).merged is not None
    assert s.gate.samples == 7
    assert s.plan(View(weights=vec(2.0), buffer=(late,)), 2.1, random.Random(0)).aggregate  # the first round after it
    (nxt,) = e1.on_version(View(weights=vec(2.0)), 2.2).sends
    assert nxt.body == {"round": 2, "samples": 7}


def _hier(name: str, ring: list[str], timeout: float = 5.0) -> tuple[HierEdgeStrategy, HierPeering]:
    s = HierEdgeStrategy(FedAvgConfig(select=5, min_devices=1))
    return s, HierPeering(name, ring, HierPeerConfig(kappa2=1, sync_timeout_s=timeout, max_share=1.0), strategy=s)


def test_hierfavg_cloud_averages_only_the_open_rounds_models() -> None:
    """helper-177: the collection was one model per edge, whatever its round. e1 timed out on round 1
    and sent its round-2 model (5s) while round 1 was open: it replaced e1's round-1 model (3s) and round 1
    closed on (1 + 5 + 2) / 3. Now round 1 averages round 1's models; e1's round-2 model waits for round 2."""
    ring = ["cloud", "e1", "e2"]
    cs, cloud = _hier("cloud", ring)
    view = View(weights=vec(1.0), version=1)
    cs.gate.samples = 10
    assert cloud.on_version(view, 1.0).merged is None  # round 1: the cloud's own model
    assert cloud.on_message(view, msg_from("e1", "edge", {"round": 1, "samples": 10}, vec(3.0)), 1.5).merged is None
    assert cloud.on_message(view, msg_from("e1", "edge", {"round": 2, "samples": 10}, vec(5.0)), 2.0).merged is None
    plan = cloud.on_message(view, msg_from("e2", "edge", {"round": 1, "samples": 10}, vec(2.0)), 2.5)
    assert plan.merged is not None and plan.sends[0].body == {"round": 1}
    np.testing.assert_allclose(plan.merged, 2.0)  # (1 + 3 + 2) / 3; the old code: (1 + 5 + 2) / 3
    assert sorted(cloud.collected) == ["e1"] and cloud.ahead == {}  # round 2 is the one it collects now
    view = View(weights=vec(2.0), version=3)
    cs.gate.samples = 10
    assert cloud.on_version(view, 3.0).merged is None  # round 2: e1's model is in, e2's to come
    assert sorted(cloud.collected) == ["cloud", "e1"]
    plan = cloud.on_message(view, msg_from("e2", "edge", {"round": 2, "samples": 10}, vec(8.0)), 3.5)
    assert plan.merged is not None and plan.sends[0].body == {"round": 2}
    np.testing.assert_allclose(plan.merged, 5.0)  # (2 + 5 + 8) / 3
    assert "ignored" not in cloud.describe()


def test_hierfavg_an_edge_sending_twice_in_a_round_is_averaged_once() -> None:
    """A QoS-1 duplicate, or an edge that restarted and sent again: its newest model, once (checked, not a fix:
    the old code passes)."""
    ring = ["cloud", "e1"]
    cs, cloud = _hier("cloud", ring)
    view = View(weights=vec(1.0), version=1)
    cs.gate.samples = 10
    cloud.on_message(view, msg_from("e1", "edge", {"round": 1, "samples": 10}, vec(7.0)), 0.5)
    cloud.on_message(view, msg_from("e1", "edge", {"round": 1, "samples": 10}, vec(3.0)), 0.6)
    plan = cloud.on_version(view, 1.0)
    assert plan.merged is not None
    np.testing.assert_allclose(plan.merged, 2.0)  # (1 + 3) / 2


def test_hierfavg_an_edge_that_outran_a_silent_cloud_takes_its_answers_again() -> None:
    """helper-177: e1 timed out on 4 cloud rounds while the cloud was down; back, the cloud averaged e1's
    model for round 5 into its round 1 and answered "round 1", which e1 (waiting on 5) ignored as late;
    each round the same, one behind e1's: e1 never took a global again (old code: 0 of 5 taken, 5
    ignored). Now the cloud, with no model for its next round, opens the round e1 is at."""
    ring = ["cloud", "e1"]
    _, cloud = _hier("cloud", ring)
    es, e1 = _hier("e1", ring)
    cv, ev = View(weights=vec(1.0), version=0), View(weights=vec(3.0), version=0)
    t = 0.0
    for _ in range(4):  # the cloud is down: e1's models are lost, it gives up on each round
        t += 1.0
        ev.version += 1
        assert e1.on_version(ev, t).sends
        t += 5.0
        e1.on_timer(ev, t)
    assert e1.timeouts == 4 and e1.cloud_round == 4 and not es.gate.waiting
    taken = 0
    for _ in range(5):  # the cloud is back: each round e1 sends its model, then the cloud's own round is due
        t += 1.0
        ev.version += 1
        (send,) = e1.on_version(ev, t).sends
        cloud.on_message(cv, msg_from("e1", send.kind, send.body, send.weights), t + 0.1)
        cv.version += 1
        plan = cloud.on_version(cv, t + 0.2)
        assert plan.merged is not None  # every model of the round is in: it closes at once
        (glob,) = plan.sends
        back = e1.on_message(ev, msg_from("cloud", glob.kind, glob.body, glob.weights), t + 0.3)
        taken += back.merged is not None
        if back.merged is None:
            t += 5.0
            e1.on_timer(ev, t)
    assert taken == 5 and e1.ignored == 0 and e1.timeouts == 4
    assert cloud.cloud_round == e1.cloud_round == 9 and "ignored" not in cloud.describe()


def test_hierfavg_the_open_round_does_not_wait_for_an_edge_that_went_on() -> None:
    """An edge whose model is for a later round sends none for the open one: the round closes without it
    (the old code took its later model into this round)."""
    ring = ["cloud", "e1", "e2"]
    cs, cloud = _hier("cloud", ring)
    view = View(weights=vec(1.0), version=1)
    cs.gate.samples = 10
    cloud.on_version(view, 1.0)
    cloud.on_message(view, msg_from("e1", "edge", {"round": 1, "samples": 10}, vec(3.0)), 1.1)
    plan = cloud.on_message(view, msg_from("e2", "edge", {"round": 4, "samples": 10}, vec(9.0)), 1.2)
    assert plan.merged is not None and plan.sends[0].body == {"round": 1}
    np.testing.assert_allclose(plan.merged, 2.0)  # (1 + 3) / 2: e2's round-4 model waits for round 4
    assert cloud.ahead["e2"][0] == 4


def test_hierfavg_hostile_edge_models_are_refused_and_change_nothing() -> None:
    """A round too far ahead (it would move every edge's round counter), NaN, a wrong size, an unknown
    sender, a round already closed: a typed error or counted (``ignored``); the collection as it was."""
    from edge_sdk.errors import NonFiniteWeights, ShapeMismatch

    ring = ["cloud", "e1", "e2"]
    _, cloud = _hier("cloud", ring)
    view = View(weights=vec(1.0), version=1)
    cloud.on_version(view, 1.0)
    cloud.on_message(view, msg_from("e1", "edge", {"round": 1, "samples": 10}, vec(3.0)), 1.1)
    before = (sorted(cloud.collected), dict(cloud.ahead), cloud.cloud_round, cloud.closed_round)
    nan = vec(1.0)
    nan[2] = np.nan
    bad: list[tuple[PeerMsg, type[Exception]]] = [
        (msg_from("e2", "edge", {"round": 1 + MAX_ROUND_GAP + 1, "samples": 10}, vec(2.0)), MalformedMessage),
        (PeerMsg(sender="e2", kind="edge", body={"round": 1, "samples": 10}, weights=nan), NonFiniteWeights),
        (PeerMsg(sender="e2", kind="edge", body={"round": 1, "samples": 10}, weights=vec(1.0)[:-1]), ShapeMismatch),
        (msg_from("x9", "edge", {"round": 1, "samples": 10}, vec(2.0)), UnknownPeer),
        (msg_from("e2", "edge", {"round": 0, "samples": 10}, vec(2.0)), MalformedMessage),
        (msg_from("e2", "resend", {"round": 1, "at": 2.0}), MalformedMessage),  # only the cloud asks
    ]
    for msg, error in bad:
        with pytest.raises(error):
            cloud.on_message(view, msg, 2.0)
        assert (sorted(cloud.collected), dict(cloud.ahead), cloud.cloud_round, cloud.closed_round) == before
    assert not cloud.on_message(view, msg_from("e2", "edge", {"round": 1 + MAX_ROUND_GAP, "samples": 1}, vec(2.0)), 2.0).counted
    assert cloud.ahead["e2"][0] == 1 + MAX_ROUND_GAP  # (the largest gap taken: refused one above it)


_CLOUD_OPS = st.lists(st.one_of(
    # an edge model for the cloud's open round, plus -1 (late) to 2 (ahead)
    st.tuples(st.just("edge"), st.sampled_from(["e1", "e2"]), st.integers(-1, 2)),
    st.tuples(st.just("own"), st.just(""), st.just(0)),  # the cloud's own edge round
    st.tuples(st.just("tick"), st.just(""), st.integers(1, 40)),  # seconds pass (deadlines)
    st.tuples(st.just("restart"), st.just(""), st.just(0)),  # from the last commit's checkpoint
), min_size=8, max_size=50)


@settings(max_examples=200, deadline=None)
@given(ops=_CLOUD_OPS)
def test_hierfavg_a_cloud_round_averages_only_its_own_rounds_models_each_once(ops: list[tuple[str, str, int]]) -> None:
    """helper-177: whatever edge models come (any round, late, ahead, twice), whenever its own rounds and
    deadlines fall and however often it restarts, every global the cloud sends averages the cloud's model
    and edge models sent for that very round, and no edge model is in two globals. An edge's model for
    round r is r at its own position (e1: 1, e2: 2), zeros elsewhere, 1 sample each: a global is decoded
    from its values."""
    ring, positions = ["cloud", "e1", "e2"], {"e1": 1, "e2": 2}
    cs, cloud = _hier("cloud", ring, timeout=30.0)
    view = View(weights=np.zeros(SPEC.size, dtype=np.float32), version=1)
    checkpoint, now, averaged = "{}", 0.0, set()

    def edge_model(edge: str, round_: int) -> np.ndarray:
        w = np.zeros(SPEC.size, dtype=np.float32)
        w[positions[edge]] = round_
        return w

    def check(plan: PeerPlan) -> None:
        nonlocal checkpoint
        for send in plan.sends:
            if send.kind != "global":
                continue
            round_, merged = send.body["round"], np.asarray(send.weights, dtype=np.float64)
            inside = [e for e, i in positions.items() if merged[i] != 0]
            for e in inside:  # (1 + len(inside)) models at 1 sample each: r / n at e's position
                assert round(merged[positions[e]] * (1 + len(inside))) == round_, (e, merged, round_)
                assert (e, round_) not in averaged
                averaged.add((e, round_))
        if plan.merged is not None:  # committed: the checkpoint a restart resumes from
            view.version += 1
            checkpoint = json.dumps(cloud.checkpoint())

    for op, edge, n in ops:
        if op == "edge":
            round_ = max(1, cloud.open_round() + n)
            check(cloud.on_message(view, msg_from(edge, "edge", {"round": round_, "samples": 1}, edge_model(edge, round_)), now))
        elif op == "own" and not cs.gate.waiting:
            cs.gate.samples = 1
            view.version += 1
            plan = cloud.on_version(view, now)
            checkpoint = json.dumps(cloud.checkpoint())  # (the core commits the version, then the merge if any)
            check(plan)
        elif op == "tick":
            now += n
            wake = cloud.wake_at()
            if wake is not None and now >= wake:
                check(cloud.on_timer(view, now))
        elif op == "restart":
            cs, cloud = _hier("cloud", ring, timeout=30.0)
            cloud.restore(json.loads(checkpoint))
            check(cloud.on_timer(view, now))
    event(f"edge models averaged: {min(len(averaged), 3)}")


# --------------------------------------------------------------------------- construction


def test_make_peering_validates_names_params_and_pairings() -> None:
    assert set(PEERINGS) == {"none", "spyker", "nebula", "hierfavg"}
    assert type(make_peering("none", coordinator_id="a")) is Peering
    with pytest.raises(ConfigError, match="unknown peering"):
        make_peering("gossip", coordinator_id="a")
    with pytest.raises(ConfigError, match="known parameters"):
        make_peering("spyker", coordinator_id="a", ring=["a", "b"], params={"h_intr": 3})
    with pytest.raises(ConfigError, match="not in its peer ring"):
        make_peering("spyker", coordinator_id="a", ring=["b", "c"])
    with pytest.raises(ConfigError, match="twice"):
        make_peering("spyker", coordinator_id="a", ring=["a", "a"])
    with pytest.raises(ConfigError, match="needs strategy 'nebula'"):
        make_peering("nebula", coordinator_id="a", ring=["a", "b"], strategy=make_strategy("spin"))
    with pytest.raises(ConfigError):
        make_peering("spyker", coordinator_id="a", ring=["a", "b"], params={"beacon_s": 10.0, "token_timeout_s": 5.0})
    for params, needle in [({"phi": 0.0}, "phi must be > 0"), ({"eta_a": 0.0}, "eta_a must be in"), ({"eta_a": 1.5}, "eta_a must be in"),
                           ({"h_inter": 0.0}, "h_inter must be > 0"), ({"h_intra": 0.0}, "h_intra must be > 0"),
                           ({"stagger_s": -1.0}, "stagger_s"), ({"sync_timeout_s": 0.0}, "sync_timeout_s > 0"),
                           ({"min_sync_interval_s": -1.0}, "min_sync_interval_s"), ({"n_clients": 0}, "n_clients must be >= 1")]:
        with pytest.raises(ConfigError, match=f"spyker: .*{needle}"):
            make_peering("spyker", coordinator_id="a", ring=["a", "b"], params=params)
    for params, needle in [({"kappa2": 0}, "kappa2 >= 1"), ({"sync_timeout_s": 0.0}, "sync_timeout_s > 0"), ({"cloud": "zz"}, "not in the ring")]:
        with pytest.raises(ConfigError, match=f"hierfavg: .*{needle}"):
            make_peering("hierfavg", coordinator_id="a", ring=["a", "b"], params=params, strategy=make_strategy("hierfavg"))
    lone = make_peering("spyker", coordinator_id="a", strategy=make_strategy("spyker"))
    assert isinstance(lone, SpykerPeering) and lone.peers == ()
    with pytest.raises(ConfigError):
        make_strategy("spyker", eta=0)


def test_spyker_peering_with_another_strategy_counts_one_age_per_version() -> None:
    p = make_peering("spyker", coordinator_id="a", ring=["a", "b"], strategy=make_strategy("fedasync"))
    assert isinstance(p, SpykerPeering) and p.strategy is None
    view = View(weights=vec(0.0))
    p.on_timer(view, 0.0)
    view.version = 1
    p.on_version(view, 1.0)
    view.version = 2
    p.on_version(view, 2.0)
    assert p.age == 2.0 and p.hints_for("d") == {}


def test_harness_ring_is_a_working_fake() -> None:
    ring = Ring(["x"], lambda name: make_peering("spyker", coordinator_id=name))
    settle(ring, 10)
    assert ring.holders() == [] and ring.net == []  # a lone coordinator never needs a token


# --------------------------------------------------------------------------- Sync-Spyker (the paper's baseline)


def sync_server(name: str, ring: list[str], **params: object) -> tuple[SyncSpykerPeering, SpykerStrategy, View]:
    strat = SpykerStrategy(SpykerConfig())
    p = make_peering("spyker", coordinator_id=name, ring=ring, strategy=strat,
                     params={"mode": "sync", "h_intra": 3.0, "sync_timeout_s": 2.0, **params})
    assert isinstance(p, SyncSpykerPeering)
    return p, strat, View(weights=vec(0.0))


def test_merge_in_order_is_serveragg_in_id_order_whatever_the_arrival_order() -> None:
    models = {"c": (30.0, vec(3.0)), "a": (10.0, vec(1.0)), "b": (20.0, vec(2.0))}
    w, age = merge_in_order(models, phi=1.5, eta_a=0.6)
    w1, a1 = server_merge(vec(1.0), 10.0, vec(2.0), 20.0, phi=1.5, eta_a=0.6)
    w2, a2 = server_merge(w1, a1, vec(3.0), 30.0, phi=1.5, eta_a=0.6)
    np.testing.assert_allclose(w, w2)
    assert age == pytest.approx(a2)
    w_rev, age_rev = merge_in_order(dict(reversed(list(models.items()))), phi=1.5, eta_a=0.6)
    np.testing.assert_array_equal(w, w_rev)
    assert age == age_rev


def test_sync_spyker_holds_client_updates_until_every_servers_model_is_merged() -> None:
    a, strat, view = sync_server("a", ["a", "b", "c"])
    rng = random.Random(0)
    for seq in range(3):  # three client updates: age 3 ≥ h_intra
        strat.on_update(view, update("d1", seq, 0, vec(1.0)), 0.1)
        view.weights = strat.aggregate(view, [update("d1", seq, view.version, vec(1.0))])
        view.version += 1
        strat.on_aggregated(view, 0.1)
        plan = a.on_version(view, 0.1)
    assert [s.kind for s in plan.sends] == ["model"] and plan.sends[0].body == {"round": 1, "age": 3.0}
    assert a.syncing and a.wake_at() == pytest.approx(2.1)
    view.buffer = (update("d1", 9, view.version, vec(5.0)),)
    assert not strat.plan(view, 0.2, rng).aggregate  # stored, not processed, while the servers sync
    assert a.on_version(view, 0.2).sends == ()  # no second broadcast for the round
    plan = a.on_message(view, msg_from("c", "model", {"round": 1, "age": 2.0}, vec(2.0)), 0.3)
    assert plan.merged is None and plan.sends == () and a.syncing
    plan = a.on_message(view, msg_from("b", "model", {"round": 1, "age": 4.0}, vec(3.0)), 0.4)
    expect, age = merge_in_order({"a": (3.0, view.weights), "b": (4.0, vec(3.0)), "c": (2.0, vec(2.0))}, phi=1.5, eta_a=0.6)
    assert plan.merged is not None
    np.testing.assert_array_equal(plan.merged, expect)
    assert plan.meta["round"] == 1 and plan.meta["models"] == ["a", "b", "c"]
    assert not a.syncing and strat.plan(view, 0.4, rng).aggregate  # the stored update is processed now
    assert strat.ledger.age_of(view.version + 1, view.version + 1) == pytest.approx(age) and a.age_prev == pytest.approx(age)
    assert a.describe()["syncs"] == 1


def test_a_sync_spyker_server_joins_on_a_peers_model_and_all_end_with_one_model() -> None:
    servers = {n: sync_server(n, ["a", "b", "c"]) for n in "abc"}
    for n, (_, _, view) in servers.items():
        view.weights = vec({"a": 1.0, "b": 2.0, "c": 4.0}[n])
    pa, sa, va = servers["a"]
    sa.ledger.record(0, 5.0)
    sends = list(pa.on_version(va, 1.0).sends)
    merged: dict[str, np.ndarray] = {}
    inbox = [("a", s) for s in sends]
    while inbox:
        sender, send = inbox.pop(0)
        for n, (p, _, view) in servers.items():
            if n == sender:
                continue
            plan = p.on_message(view, msg_from(sender, send.kind, send.body, send.weights), 1.1)
            inbox += [(n, s) for s in plan.sends]
            if plan.merged is not None:
                merged[n] = plan.merged
    assert sorted(merged) == ["a", "b", "c"]
    np.testing.assert_array_equal(merged["a"], merged["b"])
    np.testing.assert_array_equal(merged["a"], merged["c"])
    assert all(not p.syncing and p.round == 1 for p, _, _ in servers.values())


def test_sync_spyker_times_out_on_a_silent_server_and_ignores_its_late_model() -> None:
    a, _, view = sync_server("a", ["a", "b", "c"], period_s=5.0)
    assert a.wake_at() == 5.0 and a.on_timer(view, 4.0).sends == ()
    plan = a.on_timer(view, 5.0)  # the period elapsed: a synchronisation starts without h_intra
    assert [s.kind for s in plan.sends] == ["model"] and a.syncing
    a.on_message(view, msg_from("b", "model", {"round": 1, "age": 1.0}, vec(1.0)), 5.5)
    assert a.on_timer(view, 6.9).merged is None
    plan = a.on_timer(view, 7.0)  # c silent for sync_timeout_s: merge what arrived
    assert plan.merged is not None and plan.meta["models"] == ["a", "b"] and not a.syncing
    assert a.describe()["timeouts"] == 1 and a.wake_at() == 12.0
    late = a.on_message(view, msg_from("c", "model", {"round": 1, "age": 1.0}, vec(1.0)), 7.5)
    assert late.merged is None and late.sends == () and a.describe()["ignored"] == 1
    plan = a.on_message(view, msg_from("c", "model", {"round": 3, "age": 1.0}, vec(1.0)), 8.0)  # c is ahead: catch up
    assert [s.body["round"] for s in plan.sends] == [3] and a.syncing and a.round == 2


def test_sync_spyker_config_and_bodies_are_checked() -> None:
    with pytest.raises(ConfigError, match="mode"):
        make_peering("spyker", coordinator_id="a", ring=["a", "b"], params={"mode": "lockstep"})
    with pytest.raises(ConfigError, match="period_s"):
        SpykerPeerConfig(mode="sync", period_s=-1.0)
    assert isinstance(make_peering("spyker", coordinator_id="a", ring=["a", "b"]), SpykerPeering)
    a, _, view = sync_server("a", ["a", "b"])
    with pytest.raises(UnknownPeer, match="sync-spyker: 'z' is not another coordinator of the ring"):  # (as async Spyker)
        a.on_message(view, msg_from("z", "model", {"round": 1, "age": 1.0}, vec(1.0)), 0.0)
    with pytest.raises(UnknownPeer):  # itself: a replay of its own broadcast
        a.on_message(view, msg_from("a", "model", {"round": 1, "age": 1.0}, vec(1.0)), 0.0)
    with pytest.raises(MalformedMessage):
        a.on_message(view, msg_from("b", "model", {"round": 1, "age": 1.0}), 0.0)
    with pytest.raises(MalformedMessage):
        a.on_message(view, msg_from("b", "token", {"round": 1}, vec(1.0)), 0.0)
    with pytest.raises(MalformedMessage):
        a.on_message(view, msg_from("b", "model", {"round": 0, "age": 1.0}, vec(1.0)), 0.0)


def test_sync_spyker_restarts_from_its_checkpoint_without_holding() -> None:
    a, strat, view = sync_server("a", ["a", "b"])
    strat.ledger.record(0, 4.0)
    a.on_version(view, 0.0)
    assert a.syncing
    a.on_message(view, msg_from("b", "model", {"round": 1, "age": 2.0}, vec(1.0)), 0.1)
    state = json.loads(json.dumps(a.checkpoint()))
    b, strat2, _ = sync_server("a", ["a", "b"])
    b.restore(state)
    assert b.round == 1 and not b.syncing and strat2.ledger.age == pytest.approx(a.age)


def test_sync_spyker_on_real_cores_commits_one_model_everywhere() -> None:
    bus = Bus(["a", "b", "c"], mode="sync", h_intra=3.0, sync_timeout_s=5.0)
    for seq in range(3):
        bus.send_update("a", "dev-a", seq, 1.0)
    for _ in range(4):
        bus.advance(0.5)
    peer_commits = {n: [c for c in bus.commits[n] if c.metadata["source"] == "peer"] for n in bus.cores}
    assert all(len(v) == 1 for v in peer_commits.values())
    np.testing.assert_array_equal(bus.cores["a"].weights, bus.cores["b"].weights)
    np.testing.assert_array_equal(bus.cores["b"].weights, bus.cores["c"].weights)
    assert float(bus.cores["c"].weights.mean()) > 0  # a's devices reached c's model
    assert bus.cores["b"].peering.describe()["mode"] == "sync"


def test_spyker_hears_nothing_from_a_message_it_refuses() -> None:
    """A beat with a bad field, or a message of an unknown kind, changed the sender's recorded age
    and time before it was refused (hostile-input audit): fields are read first, kinds checked first."""
    from coordinator.methods import make_method
    from coordinator.strategies.base import CoordinatorView
    from edge_sdk.errors import MalformedMessage
    from edge_sdk.wire.messages import PeerMsg

    peering = make_method("spyker", coordinator_id="c1", ring=("c1", "c2")).peering
    view = cast(CoordinatorView, SimpleNamespace(devices_seen=()))
    before = dataclasses.asdict(peering.info["c2"])  # type: ignore[attr-defined]
    for kind, body in (("beat", {"at": 5.0, "age": 9.0, "clients": -1, "hold": False}),
                       ("bogus", {"at": 5.0, "age": 9.0, "clients": 1, "hold": False})):
        with pytest.raises(MalformedMessage):
            peering.on_message(view, PeerMsg(sender="c2", kind=kind, body=body), 1.0)
        assert dataclasses.asdict(peering.info["c2"]) == before  # type: ignore[attr-defined]


def test_spyker_refuses_absurd_age_claims_and_changes_nothing() -> None:
    """helper-115: any finite age was taken. A peer model claiming age 1e300 was merged with the
    full share and moved the receiver's age to 6e299 (its own updates then no longer count:
    A + 1 == A); negative ages pulled it down. Ages are in [0, 2**53] now (``malformed``)."""
    bus = Bus(["a", "b"])
    core, b_signer = bus.cores["a"], bus.cores["b"].config.signer
    peering = cast(SpykerPeering, core.peering)
    version, age, info, known = core.version, peering.age, dataclasses.asdict(peering.info["b"]), peering.known
    token_ages = {"a": [1.0, 1.0], "b": [1e300, 1.0]}
    for kind, age_claim, extra in (("model", 1e300, {"sid": [9, 0.0, "b", 0]}), ("model", -1.0, {"sid": [9, 0.0, "b", 1]}),
                                   ("beat", 2.0**60, {}), ("token", 1.0, {"pos": [9, 0.0, "b", 0], "ages": token_ages})):
        topic = topics.peer_topic("a", kind)
        body = {"at": 1.0, "age": age_claim, "clients": 1, "pos": None, "hold": False, **extra}
        payload = encode(PeerMsg(sender="b", kind=kind, body=body, weights=vec(1.0) if kind == "model" else None),
                         signer=b_signer, scope=topics.signing_scope(topic))
        (note,) = [a for a in core.handle(MessageReceived(now=1.0, topic=topic, payload=payload)) if isinstance(a, Notify)]
        assert note.data["reason"] == "malformed" and "must be an age" in note.data["detail"], kind
    assert core.version == version and peering.age == age and peering.known == known
    assert dataclasses.asdict(peering.info["b"]) == info


def test_a_refused_spyker_message_is_not_heard_and_its_position_not_learnt() -> None:
    """helper-115: a model without weights (or a beat without ``hold``) was refused only after its
    sender's age was recorded and its position learnt, which made a token holder drop its token."""
    peering = SpykerPeering("a", ["a", "b"], CFG)
    view = View(weights=vec(0.0))
    peering.on_timer(view, 0.0)
    assert peering.holding  # ring[0] of a fresh ring
    before, known = dataclasses.asdict(peering.info["b"]), peering.known
    big = [99, 0.0, "b", 0]
    for kind, body, weights in (("model", {"sid": big}, None), ("beat", {}, None), ("token", {"ages": {"b": [5.0]}}, None)):
        with pytest.raises(MalformedMessage):
            peering.on_message(view, msg_from("b", kind, {"at": 5.0, "age": 9.0, "clients": 1, "pos": big, **body}, weights), 1.0)
    assert peering.holding and peering.known == known and peering.counters.tokens_dropped == 0
    assert dataclasses.asdict(peering.info["b"]) == before


def test_a_peer_message_forged_in_the_receivers_own_name_is_counted() -> None:
    """helper-115: a frame claiming to come from the receiving coordinator itself was dropped as
    the broker's echo of its own broadcast, uncounted, whoever signed it (or nobody)."""
    bus = Bus(["a", "b"])
    core = bus.cores["a"]
    topic = topics.peer_topic("all", "beat")
    body = {"at": 1.0, "age": 0.0, "clients": 1, "pos": None, "hold": False}
    for signer in (Signer.generate(), None):
        msg = PeerMsg(sender="a", kind="beat", body=body)
        payload = encode(msg, signer=signer, scope=topics.signing_scope(topic)) if signer else encode(msg)
        (note,) = [x for x in core.handle(MessageReceived(now=1.0, topic=topic, payload=payload)) if isinstance(x, Notify)]
        assert note.data["reason"] == "bad_signature"
    assert core.counters["reject:bad_signature"] == 2
    own = encode(PeerMsg(sender="a", kind="beat", body=body), signer=core.config.signer, scope=topics.signing_scope(topic))
    assert not [x for x in core.handle(MessageReceived(now=1.5, topic=topic, payload=own)) if isinstance(x, Notify)]
    assert core.counters["reject:bad_signature"] == 2  # its own echo: dropped, not counted


def test_a_refused_peer_message_names_its_sender() -> None:
    """helper-88: a peer running another model logged `shape_mismatch: digits-cnn/full: expected 9802
    values, got 11416` and one on another peering `unknown peer message kind 'beat'`, neither saying
    which peer sent it."""
    bus = Bus(["a", "b"])
    core = bus.cores["a"]
    b_signer = bus.cores["b"].config.signer
    topic = topics.peer_topic("all", "beat")
    wrong = encode(PeerMsg(sender="b", kind="beat", body={"age": 1}, weights=np.zeros(SPEC.size + 3, np.float32)),
                   signer=b_signer, scope=topics.signing_scope(topic))
    (note,) = [a for a in core.handle(MessageReceived(now=0.0, topic=topic, payload=wrong)) if isinstance(a, Notify)]
    assert note.data["reason"] == "shape_mismatch" and note.data["detail"].startswith("from peer 'b' (beat): ")


def test_rejected_messages_are_logged_once_a_minute_per_reason_and_sender() -> None:
    """helper-88: a peer with a new key gave 136 `bad_signature` WARNINGs in 70 s. One per (reason,
    sender) a minute now, the next one saying how many were not logged (all are counted)."""
    from coordinator.daemon import RejectedLog

    said: list[str] = []
    rejected, now = RejectedLog(), 1000.0
    ap = {"reason": "bad_signature", "detail": "from peer 'ap' (beat): signed with another key", "device": None}
    for _ in range(5):
        said += rejected.note(ap, now)
    said += rejected.note({**ap, "detail": "from peer 'us' (beat): signed with another key"}, now)
    said += rejected.note(ap, now + 61.0)
    assert len(said) == 3 and "'ap'" in said[0] and "'us'" in said[1] and "4 more of these since it was last logged" in said[2]


def test_rejected_messages_from_ever_new_senders_are_logged_at_most_a_budget_a_minute(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Noticed in stop 36: on a plain broker a client that claims a new device id per message got
    one WARNING per message (the limit was per sender). At most REJECTED_LOG_BUDGET a minute over
    all senders now, the configured peers apart (helper-93: a flood hid a real peer's rejections);
    once the minute is over the daemon's flush says how many were not logged, by reason."""
    import logging
    import types

    from coordinator import daemon as daemon_module
    from coordinator.daemon import REJECTED_LOG_BUDGET, CoordinatorDaemon, RejectedLog

    rejected, said = RejectedLog(exempt=("eu", "ap")), []
    peer = {"reason": "bad_signature", "detail": "from peer 'ap' (beat): signed with another key", "device": None}
    forged_peer = {"reason": "bad_signature", "detail": "from peer 'zz9' (beat): unknown peer", "device": None}
    for i in range(500):
        now = 1000.0 + i * 0.1
        said += rejected.note({"reason": "bad_signature", "device": f"d{i}", "detail": "unsigned"}, now)
        if i in (100, 300):
            said += rejected.note(peer, now)  # the real peer, after the budget is spent
            said += rejected.note({**forged_peer, "detail": f"from peer 'x{i}' (beat): unknown peer"}, now)
    devices = [line for line in said if "'device': 'd" in line]
    assert len(devices) == REJECTED_LOG_BUDGET and all(line.startswith("rejected a message") for line in devices)
    assert sum("from peer 'ap'" in line for line in said) == 1  # once a minute, despite the flood
    assert not any("from peer 'x" in line for line in said)  # a name outside --peers shares the budget
    assert rejected.flush(1000.0 + 30.0) == []  # the minute is not over
    clock = [1000.0 + 61.0]
    monkeypatch.setattr(daemon_module.time, "monotonic", lambda: clock[0])
    stub = types.SimpleNamespace(_rejected=rejected)
    with caplog.at_level(logging.WARNING, logger="edgeci"):
        CoordinatorDaemon._flush_rejected(stub)  # type: ignore[arg-type]  # what the daemon's beat calls every second
        clock[0] += 1.0
        CoordinatorDaemon._log_rejected(stub, {"reason": "bad_signature", "device": "d9999", "detail": "unsigned"})  # type: ignore[arg-type]
    logged = [r.getMessage() for r in caplog.records]
    held = 500 - REJECTED_LOG_BUDGET + 2  # the devices over the budget and the two names outside --peers
    assert logged[0].startswith(f"{held} more rejected message(s) (bad_signature {held}) from {held} (reason, sender) "
                                "pair(s) were not logged"), logged
    assert len(logged) == 2 and "'d9999'" in logged[1]  # a new minute's budget
    assert rejected.flush(clock[0] + 61.0) == []  # nothing held since: no summary


def test_status_says_when_each_peer_was_last_heard() -> None:
    """helper-96: a peer that was down, mistyped in --peers or on an unbridged broker was never
    reported; the status now lists each expected peer's last accepted message."""
    from coordinator.cli_status import render

    bus = Bus(["a", "b", "c"])
    core = bus.cores["a"]
    assert core.status().extra["peers_heard"] == {"b": None, "c": None}
    bus.queue.clear()  # (what the three sent at start)
    bus.now = 50.0
    sent = [a for a in bus.cores["b"].handle(TimerFired(now=50.0)) if isinstance(a, Publish) and "/peer/" in a.topic]
    assert sent  # b beats: a hears it; c stays silent
    for pub in sent:
        core.handle(MessageReceived(now=50.0, topic=pub.topic, payload=pub.payload))
    status = json.loads(status_json(core.status()))
    assert status["extra"]["peers_heard"] == {"b": 50.0, "c": None}
    assert "peers     b heard 7 s ago · c not heard since the start" in render(status, 57.0)
    assert SpykerPeering("a", ["a", "b"]).expected_peers() == (("b",), 30.0)
    assert NebulaPeering("a", ["a", "b", "c"], NebulaPeerConfig(t_c=10.0), strategy=make_strategy("nebula")).expected_peers() \
        == (("b", "c"), 60.0)  # a rotation from each about every n - 1 rounds: three times that
    assert Peering().expected_peers() == ((), None)  # no peering, and HierFAVG's edges: no expectation


def test_a_silent_peer_is_warned_about_once_and_its_return_said() -> None:
    from coordinator.daemon import PeerWatch

    watch, started = PeerWatch(), 1000.0
    assert watch.check({"b": None}, None, started, started + 999) == []  # a peering without expectations
    assert watch.check({"b": None, "c": 1010.0}, 30.0, started, started + 20) == []
    (warning,) = watch.check({"b": None, "c": 1010.0}, 30.0, started, started + 35)
    assert warning[0] == logging.WARNING and "peer 'b': nothing since this coordinator started" in warning[1]
    assert watch.check({"b": None, "c": 1010.0}, 30.0, started, started + 36) == []  # said once
    (late,) = watch.check({"b": None, "c": 1010.0}, 30.0, started, started + 41)
    assert "peer 'c': nothing for 31 s" in late[1]
    (back,) = watch.check({"b": 1050.0, "c": 1010.0}, 30.0, started, started + 51)
    assert back[0] == logging.INFO and "peer 'b' is heard again, after 51 s" in back[1]


def test_a_peer_of_another_protocol_or_ring_is_refused_as_such() -> None:
    """helper-96: another --peering was logged as `malformed: unknown peer message kind`, and a
    coordinator of another ring on the same broker as `malformed`. Each is named now."""
    bus = Bus(["a", "b", "c"])
    core, b_signer = bus.cores["a"], bus.cores["b"].config.signer
    sent = [a for a in bus.cores["b"].handle(TimerFired(now=5.0)) if isinstance(a, Publish) and a.topic.endswith("/beat")]
    beat = decode(sent[0].payload)
    assert isinstance(beat, PeerMsg)

    def deliver(body: dict[str, object], kind: str = "beat", sender: str = "b") -> str:
        topic = topics.peer_topic("all", kind)
        payload = encode(PeerMsg(sender=sender, kind=kind, body=body), signer=b_signer, scope=topics.signing_scope(topic))
        notes = [a for a in core.handle(MessageReceived(now=6.0, topic=topic, payload=payload)) if isinstance(a, Notify)]
        return f"{notes[0].data['reason']}: {notes[0].data['detail']}" if notes else ""

    assert deliver(dict(beat.body)) == ""  # a member of this ring: heard
    said = deliver({"round": 0, "version": 1.0}, kind="rotate")
    assert said.startswith("ring_mismatch") and "--peering must be the same" in said
    assert deliver(dict(beat.body), sender="zz").startswith("unknown_peer")
    # NebulaFL and HierFAVG name another protocol too: Spyker's beat reaching them (with a model)
    nebula = NebulaPeering("a", ["a", "b"], NebulaPeerConfig(t_c=10.0), strategy=NebulaStrategy(NebulaConfig(planets=2)))
    hier = HierPeering("a", ["a", "b"], HierPeerConfig(kappa2=1), strategy=HierEdgeStrategy(FedAvgConfig()))
    for peering in (nebula, hier):
        with pytest.raises(RingMismatch, match="--peering must be the same"):
            peering.on_message(View(weights=vec(1.0)), msg_from("b", "beat", {**beat.body, "round": 1}, vec(1.0)), 6.0)
