"""What a compromised ring peer can do with the claims its (signed) messages carry (helper-134).

Each test first shows the effect a claim had (the attack as a peer would send it) and then what
the receiver does now: a claim bounded by what the receiver can know, refused with a typed error
or capped and counted, the honest case unchanged."""

from __future__ import annotations

import random

import numpy as np
import pytest

from coordinator.peering import make_peering
from coordinator.peering.hier import HierPeerConfig, HierPeering, capped_shares, weighted_mean
from coordinator.peering.spyker import (
    MAX_CLOCK_AHEAD_S,
    MAX_ROUND_JUMP,
    SpykerPeerConfig,
    SpykerPeering,
    SyncSpykerPeering,
    merge_weight,
)
from coordinator.strategies.fedavg import FedAvgConfig
from coordinator.strategies.hierfavg import HierEdgeStrategy
from coordinator.strategies.spyker import SpykerStrategy
from edge_sdk.errors import ConfigError, MalformedMessage
from edge_sdk.wire.codec import encode
from edge_sdk.wire.messages import PeerMsg
from tests.peering_harness import Envelope, View, msg_from, settle, spyker_ring, vec

# --------------------------------------------------------------------------- HierFAVG: samples


def hier_round(samples: dict[str, int], models: dict[str, float], config: HierPeerConfig) -> tuple[HierPeering, np.ndarray]:
    """One cloud round at ``cloud``: every edge's model and samples claim; the committed average."""
    ring = sorted(models)
    strategy = HierEdgeStrategy(FedAvgConfig(select=5, min_devices=1))
    cloud = HierPeering("cloud", ring, config, strategy=strategy)
    strategy.gate.samples = samples["cloud"]
    assert cloud.on_version(View(weights=vec(models["cloud"])), 1.0).merged is None
    merged = None
    for n, edge in enumerate(e for e in ring if e != "cloud"):
        plan = cloud.on_message(View(weights=vec(models["cloud"])),
                                msg_from(edge, "edge", {"round": 1, "samples": samples[edge]}, vec(models[edge])), 2.0 + n)
        merged = plan.merged
    assert merged is not None
    return cloud, np.asarray(merged)


def test_an_edge_claiming_huge_samples_no_longer_makes_the_cloud_average_its_model() -> None:
    """The cloud weights each edge by the samples it claims (up to 2**63 - 1): one compromised edge
    claiming 10**12 made the average its own model (to float32), every edge committing it. No
    edge's share is above max_share (default 1/2: none outweighs all the others together)."""
    models = {"cloud": 1.0, "e1": 2.0, "e2": 3.0, "evil": 100.0}
    samples = {"cloud": 40, "e1": 50, "e2": 60, "evil": 10**12}
    _, plain = hier_round(samples, models, HierPeerConfig(kappa2=1, max_share=1.0))  # the old weighting
    np.testing.assert_allclose(plain, 100.0)  # the attacker's model, exactly
    cloud, merged = hier_round(samples, models, HierPeerConfig(kappa2=1))
    # evil gets 1/2; the others share the other half by their samples (40:50:60)
    np.testing.assert_allclose(merged, 0.5 * 100.0 + 0.5 * (40 * 1 + 50 * 2 + 60 * 3) / 150, rtol=1e-6)
    assert cloud.capped == 1 and cloud.describe()["capped"] == 1
    honest = {"cloud": 40, "e1": 50, "e2": 60, "evil": 70}  # shares below 1/2: the plain weighted mean, to the bit
    c2, m2 = hier_round(honest, models, HierPeerConfig(kappa2=1))
    assert c2.capped == 0 and "capped" not in c2.describe()
    assert m2.tobytes() == weighted_mean([vec(models[e]) for e in sorted(models)], [honest[e] for e in sorted(models)]).tobytes()


def test_a_cloud_round_closed_on_the_clouds_model_alone_is_not_counted_as_capped() -> None:
    strategy = HierEdgeStrategy(FedAvgConfig(select=5, min_devices=1))
    cloud = HierPeering("cloud", ["cloud", "e1"], HierPeerConfig(kappa2=1, sync_timeout_s=5.0), strategy=strategy)
    strategy.gate.samples = 40
    cloud.on_version(View(weights=vec(3.0)), 1.0)
    plan = cloud.on_timer(View(weights=vec(3.0)), 6.0)  # e1 silent: the cloud's own model, unchanged
    assert plan.merged is not None and plan.merged.tobytes() == vec(3.0).tobytes()
    assert cloud.timeouts == 1 and cloud.capped == 0 and "capped" not in cloud.describe()


def test_capped_shares_water_fill_and_keep_the_order() -> None:
    np.testing.assert_allclose(capped_shares([10, 30], 0.5), [0.5, 0.5])
    np.testing.assert_allclose(capped_shares([1, 1, 98], 0.5), [0.25, 0.25, 0.5])
    np.testing.assert_allclose(capped_shares([1, 2, 1000, 1000], 0.3), [0.4 / 3, 0.8 / 3, 0.3, 0.3])
    np.testing.assert_allclose(capped_shares([0, 0, 5], 0.5), [0.25, 0.25, 0.5])  # the rest: equal among zeros
    np.testing.assert_allclose(capped_shares([1, 2, 3], 0.2), [1 / 3] * 3)  # below 1/edges: equal weights
    np.testing.assert_allclose(capped_shares([0, 0], 0.5), [0.5, 0.5])
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 6)
        w = [rng.choice([0, 1, rng.randint(1, 10**6), 10**12]) for _ in range(n)]
        cap = rng.uniform(0.05, 1.0)
        s = capped_shares(w, cap)
        assert abs(float(s.sum()) - 1.0) < 1e-9
        if cap * n >= 1 and sum(w) > 0:
            assert float(s.max()) <= cap + 1e-12
            order = sorted(range(n), key=lambda i: w[i])
            assert all(s[order[i]] <= s[order[i + 1]] + 1e-12 for i in range(n - 1))


def test_max_share_is_checked() -> None:
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="max_share"):
            HierPeerConfig(max_share=bad)


# --------------------------------------------------------------------------- Spyker: sync ids

SPY = SpykerPeerConfig(h_inter=1e9, h_intra=10.0, beacon_s=1.0, token_timeout_s=4.0, stagger_s=1.0, sync_timeout_s=3.0)
"""Only the intra-server trigger (the receiver starts no sync of its own in these tests)."""


def spyker_body(sid: list[object], at: float, *, hold: bool = True, pos: list[object] | None = None) -> dict[str, object]:
    return {"at": at, "age": 1.0, "clients": 1, "pos": sid if pos is None else pos, "hold": hold, "sid": sid}


def test_a_peer_inventing_sync_ids_gets_one_merge_per_pass_of_the_token_not_one_per_message() -> None:
    """helper-121's open attack: a ring peer stepped the hop by one per model, each 'the start of its
    sync' (hold, pos = sid), and every one was merged (share η_a w ≥ 0.3 each) and committed: 50
    messages made b's model the attacker's. Rule 6: a coordinator holds the next position only once
    the token moved on through another one (or it regenerated, token_timeout_s later)."""
    b = SpykerPeering("b", ["a", "b", "c"], SPY, strategy=SpykerStrategy())
    view = View(weights=vec(0.0))
    b.on_timer(view, 0.0)
    merges = 0
    for hop in range(50):
        sid = [0, 0.0, "a", hop]
        plan = b.on_message(view, msg_from("a", "model", spyker_body(sid, 1.0 + 0.01 * hop), vec(100.0)), 1.0 + 0.01 * hop)
        if plan.merged is not None:
            merges += 1
            view.weights, view.version = np.asarray(plan.merged), view.version + 1
        else:
            assert plan.counted and plan.sends == ()  # ignored, counted (the status shows it), nothing sent
    assert merges == 1 and b.counters.merges == 1  # the old code: 50, and b's model 100.0 to float32
    assert b.counters.models_unexplained == 49 and b.describe()["models_unexplained"] == 49
    np.testing.assert_allclose(view.weights, 100.0 * 0.6 * merge_weight(0.0, 1.0, 1.5), rtol=1e-6)  # one merge
    assert b.known == (0, 0.0, "a", 0)  # an ignored model taught nothing (its position was not learnt)
    # c holds the next position (its beat): the token moved on, a may hold a later one again
    b.on_message(view, msg_from("c", "beat", {"at": 2.0, "age": 1.0, "clients": 1, "pos": [0, 0.0, "a", 1], "hold": True}), 2.0)
    plan = b.on_message(view, msg_from("a", "model", spyker_body([0, 0.0, "a", 2], 3.0), vec(100.0)), 3.0)
    assert plan.merged is not None
    # c's sync at its position: an answer to it from a is explained too (c was seen holding it)
    plan = b.on_message(view, msg_from("a", "model", spyker_body([0, 0.0, "a", 1], 3.5, hold=False, pos=[0, 0.0, "a", 2]),
                                       vec(100.0)), 3.5)
    assert plan.merged is not None and b.counters.models_unexplained == 49
    # a peer stamping its clock ahead (each claim token_timeout_s after the last) gets at most
    # MAX_CLOCK_AHEAD_S / token_timeout_s of them in advance, then one per token_timeout_s
    merges, now = b.counters.merges, 4.0
    for k in range(1, 40):
        sid = [0, 0.0, "a", 100 + k]
        b.on_message(view, msg_from("a", "model", spyker_body(sid, now + k * SPY.token_timeout_s), vec(100.0)), now)
    assert b.counters.merges - merges == MAX_CLOCK_AHEAD_S // SPY.token_timeout_s  # 15 of the 39


def test_an_answer_to_a_sync_no_holder_explains_is_ignored_and_a_regeneration_is_taken() -> None:
    b = SpykerPeering("b", ["a", "b", "c"], SPY, strategy=SpykerStrategy())
    view = View(weights=vec(0.0))
    b.on_timer(view, 0.0)
    # "an answer" (no hold) to a sync at a position nobody was seen holding: ignored
    plan = b.on_message(view, msg_from("a", "model", spyker_body([0, 0.0, "c", 7], 1.0, hold=False), vec(9.0)), 1.0)
    assert plan.merged is None and plan.counted and b.counters.models_unexplained == 1 and b.known is None
    assert b.on_message(view, msg_from("a", "model", spyker_body([0, 0.0, "a", 0], 2.0), vec(9.0)), 2.0).merged is not None
    # a second start by a with nothing in between: only once a heard no one for token_timeout_s
    # (it regenerated, or passed the token to itself), by its clock, at most 60 s ahead of b's
    early = spyker_body([1, 2.5, "a", 0], 2.5)
    assert b.on_message(view, msg_from("a", "model", early, vec(9.0)), 2.5).merged is None
    far_ahead = spyker_body([1, 3.0, "a", 0], 3.0 + MAX_CLOCK_AHEAD_S + 0.5)
    assert b.on_message(view, msg_from("a", "model", far_ahead, vec(9.0)), 3.0).merged is None
    assert b.counters.models_unexplained == 3
    late = spyker_body([1, 6.5, "a", 0], 6.5)
    assert b.on_message(view, msg_from("a", "model", late, vec(9.0)), 6.5).merged is not None
    # a beat claiming a hold the token cannot explain is not a holder either (and is counted)
    beat = {"at": 7.5, "age": 1.0, "clients": 1, "pos": [1, 6.5, "a", 1], "hold": True}
    assert b.on_message(view, msg_from("a", "beat", beat), 7.5).counted and b.counters.holds_ignored == 1
    plan = b.on_message(view, msg_from("a", "model", spyker_body([1, 6.5, "a", 1], 8.0), vec(9.0)), 8.0)
    assert plan.merged is None and b.counters.models_unexplained == 4


def test_an_honest_ring_leaves_no_model_unexplained() -> None:
    """Rule 6 costs an honest ring nothing: every sync of a busy ring is merged everywhere."""
    names = ["a", "b", "c", "d"]
    ring = spyker_ring(names)
    settle(ring, 5)
    rng = random.Random(1)
    for _ in range(60):
        ring.local_updates(rng.choice(names), rng.randint(1, 12))
        settle(ring, rng.choice([0.25, 1.0, 3.0]))
    peers = [node.peering for node in ring.nodes.values()]
    assert all(isinstance(p, SpykerPeering) for p in peers)
    spykers = [p for p in peers if isinstance(p, SpykerPeering)]
    assert sum(p.counters.syncs_started for p in spykers) >= 20
    assert [(p.counters.models_unexplained, p.counters.holds_ignored) for p in spykers] == [(0, 0)] * 4
    broadcasts = [sorted(sid for _, sid in node.broadcasts) for node in ring.nodes.values()]
    assert all(b == broadcasts[0] for b in broadcasts)  # every sync id answered by every coordinator


@pytest.mark.parametrize("ahead", [1, 10**6])
def test_a_peers_beats_claiming_the_token_moved_on_no_longer_drop_holders_or_force_regenerations(ahead: int) -> None:
    """helper-134: d's beats (one a second, 100 s, not holding) claimed the token ``ahead`` hops past
    the largest position known: each holder that learnt it dropped its token (rule 3) and the real
    holder's beats, below the known position, were no evidence, so the ring regenerated every
    token_timeout_s: 21 regenerations at a, b and c instead of 1, 630 merges instead of 927. A
    position is now learnt from its holder only (a hold rule 6 believes, or the position after it:
    the pass), and ``ahead`` = 1 shows the next position is not enough from anyone else."""
    names = ["a", "b", "c", "d"]
    ring = spyker_ring(names)
    settle(ring, 5)
    rng = random.Random(0)
    at = 1000.0
    honest = [p for p in (ring.nodes[n].peering for n in "abc") if isinstance(p, SpykerPeering)]
    for step in range(400):
        if step % 4 == 0:
            ring.local_updates(rng.choice(names[:3]), rng.randint(1, 6))
            epoch, created, origin, hop = max(p.known for p in honest if p.known is not None)
            at += 1.0
            beat = {"at": at, "age": 0.0, "clients": 5, "pos": [epoch, created, origin, hop + ahead], "hold": False}
            for r in "abc":
                ring.net.append(Envelope("d", r, "beat", encode(PeerMsg(sender="d", kind="beat", body=beat)), [r]))
        settle(ring, 0.25)
    assert sum(p.counters.regenerations for p in honest) <= 2  # the old code: 21 (1: ring[0]'s first token)
    assert sum(p.counters.tokens_dropped for p in honest) == 0  # the old code: 1 (the others never held long)
    assert sum(p.counters.tokens_passed for p in honest) >= 100  # the old code: 60
    assert all(p.describe()["positions_ignored"] >= 90 for p in honest)  # d's claims, counted


# --------------------------------------------------------------------------- Sync-Spyker: rounds


def sync_servers(ring: list[str]) -> dict[str, SyncSpykerPeering]:
    out = {}
    for name in ring:
        p = make_peering("spyker", coordinator_id=name, ring=ring, strategy=SpykerStrategy(),
                         params={"mode": "sync", "h_intra": 3.0, "sync_timeout_s": 2.0})
        assert isinstance(p, SyncSpykerPeering)
        out[name] = p
    return out


def test_a_sync_spyker_round_far_ahead_is_refused_so_the_ring_cannot_be_pushed_past_the_round_cap() -> None:
    """One model for round 2**63 - 1 made b catch up (round 2**63 - 2) and join that round; its
    next round, 2**63, is past what a peer reads (``body_int``): c refused it, and so every round
    after it, for good. A round may exceed the next one by at most MAX_ROUND_JUMP."""
    servers = sync_servers(["a", "b", "c"])
    b, c = servers["b"], servers["c"]
    view = View(weights=vec(0.0))
    far = {"round": 2**63 - 1, "age": 1.0}
    with pytest.raises(MalformedMessage, match="jumps more than"):
        b.on_message(view, msg_from("a", "model", far, vec(9.0)), 1.0)
    assert b.round == 0 and not b.syncing and b.models == {} and b.describe()["syncs"] == 0  # changed nothing
    ahead = {"round": 1 + MAX_ROUND_JUMP, "age": 1.0}  # the bound itself: an honest catch-up
    plan = b.on_message(view, msg_from("a", "model", ahead, vec(9.0)), 2.0)
    assert b.round == MAX_ROUND_JUMP and b.syncing and [s.body["round"] for s in plan.sends] == [1 + MAX_ROUND_JUMP]
    # what the old code did with `far`: b's round after closing it, and c reading b's next one
    with pytest.raises(MalformedMessage, match="'round' must be an int"):
        c.on_message(view, msg_from("b", "model", {"round": 2**63, "age": 1.0}, vec(1.0)), 3.0)


# --------------------------------------------------------------------------- Spyker: clients


def test_a_peer_claiming_huge_client_counts_no_longer_switches_off_the_age_spread_trigger() -> None:
    """The default h_inter is the ring's client count / 5n, each peer's count its own claim (up to
    2**63 - 1): one claim of 2**62 made h_inter ~3e17, so no age spread ever started a sync (only
    h_intra's 350 updates did). A peer's claim counts for at most all the others' together (ours
    included): one coordinator's word is never the larger part of the ring's count."""
    b = SpykerPeering("b", ["a", "b", "c"], SpykerPeerConfig(h_intra=1e9, beacon_s=1.0, token_timeout_s=4.0),
                      strategy=SpykerStrategy())
    view = View(weights=vec(0.0), devices_seen=tuple(f"d{i}" for i in range(30)))
    b.on_timer(view, 0.0)
    base = {"age": 0.0, "hold": False, "pos": None}
    b.on_message(view, msg_from("c", "beat", {**base, "at": 1.0, "clients": 30}), 1.0)
    b.on_message(view, msg_from("a", "beat", {**base, "at": 1.0, "clients": 30}), 1.0)
    assert b.h_inter() == 90 / 15  # honest: (30 + 30 + 30) / (5 * 3)
    b.on_message(view, msg_from("a", "beat", {**base, "at": 2.0, "clients": 2**62}), 2.0)
    assert b.h_inter() == (30 + 30 + 60) / 15  # a's claim counts for 60, what b and c have together
    assert b.describe()["clients_capped"] == ["a"]
    # b takes a token and its age runs 100 ahead of the others: the age-spread trigger fires
    token = {"at": 3.0, "age": 0.0, "clients": 2**62, "hold": False, "pos": [0, 0.0, "a", 1], "ages": {}}
    b.on_message(view, msg_from("a", "token", token), 3.0)
    b.ledger.record(1, 100.0)
    view.version = 1
    plan = b.on_version(view, 3.5)
    assert [s.kind for s in plan.sends] == ["model"] and b.counters.syncs_started == 1  # the old code: none (h_inter 3e17)
    b.on_message(view, msg_from("a", "beat", {**base, "at": 4.0, "clients": 45}), 4.0)
    assert b.h_inter() == (30 + 30 + 45) / 15 and "clients_capped" not in b.describe()  # an honest larger region


def test_a_hostile_sync_spyker_peers_age_claim_cannot_inflate_this_servers_age_past_the_cap() -> None:
    """Sync-Spyker merged every server's claimed age without the per-merge cap async Spyker got
    (helper-159, ``age_cap``): one round with b claiming 2**53 set a's age to ~5e15, and it stayed
    there (each later round starts from it), so every honest model then weighs eta_a x sigmoid(-phi)
    in a's merges. Now a claim counts for at most a's age + h_intra + h_inter (counted, ages_capped);
    the honest round after it is merged as before."""
    ring = ["a", "b", "c"]
    a = make_peering("spyker", coordinator_id="a", ring=ring, strategy=SpykerStrategy(),
                     params={"mode": "sync", "h_intra": 3.0, "h_inter": 2.0, "sync_timeout_s": 2.0})
    assert isinstance(a, SyncSpykerPeering)
    view = View(weights=vec(0.0))
    cap = 0.0 + 3.0 + 2.0  # a's age + h_intra + h_inter
    a.on_message(view, msg_from("b", "model", {"round": 1, "age": 2.0**53}, vec(1.0)), 1.0)
    plan = a.on_message(view, msg_from("c", "model", {"round": 1, "age": 2.0}, vec(1.0)), 1.5)
    assert plan.merged is not None and a.round == 1
    assert a.age <= cap  # the old code: 5.4e15
    assert a.describe().get("ages_capped") == 1
    # the next round, all honest: nothing more capped, a's age where the honest claims put it
    a.ledger.record(1, a.age + 4.0)
    view.version = 1
    assert a.on_version(view, 2.0).sends  # a's own trigger (h_intra 3): it joins round 2
    a.on_message(view, msg_from("b", "model", {"round": 2, "age": a.age + 1.0}, vec(1.0)), 2.5)
    a.on_message(view, msg_from("c", "model", {"round": 2, "age": a.age + 2.0}, vec(1.0)), 2.6)
    assert a.round == 2 and a.age < cap + 6.0 and a.describe().get("ages_capped") == 1
