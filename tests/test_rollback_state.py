"""What strategies and peerings keep across a rollback (helper-161).

A rollback (the gate rejecting a candidate, an operator's ``rollback`` / ``pin``) restores the
release's weights as a new version; the strategy and the peering were told nothing, and kept what
they had built from the abandoned line. Where that steers the next versions, the hook
``on_line_replaced`` puts it back: FedAdam's moments (they kept stepping in the rejected
direction), Spyker's age (the restored model claimed the rejected line's updates), NebulaFL's
planets (the master is made from them: the rejected model came straight back), Sync-Spyker's own
model in an open round and the HierFAVG cloud's in a collecting round (merged back at the close).

The hooks are tested here directly, and through a real core (``CoordinatorCore._commit`` calls
them for a rollback or an operator's version, before the commit's checkpoint): the whole path,
rollback included."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import cast

import numpy as np
import pytest

from coordinator.core import (
    CandidateEvaluated,
    CommitVersion,
    CoordinatorConfig,
    CoordinatorCore,
    EvaluateCandidate,
    Snapshot,
)
from coordinator.gate import GateConfig
from coordinator.methods import make_method
from coordinator.peering import make_peering
from coordinator.peering.hier import HierPeerConfig, HierPeering
from coordinator.peering.spyker import SyncSpykerPeering
from coordinator.strategies import make_strategy
from coordinator.strategies.base import BufferedUpdate, StaticView, Strategy
from coordinator.strategies.fedavg import FedAvgConfig
from coordinator.strategies.fedopt import FedOptConfig, FedOptStrategy
from coordinator.strategies.hfedms import HFedMSStrategy
from coordinator.strategies.hierfavg import HierEdgeStrategy
from coordinator.strategies.nebula import NebulaConfig, NebulaStrategy
from coordinator.strategies.spyker import SpykerStrategy
from edge_sdk.core.events import MessageReceived, Publish
from edge_sdk.errors import MalformedMessage
from edge_sdk.wire import topics
from edge_sdk.wire.codec import decode, encode
from edge_sdk.wire.messages import Ack, Invite, ModelMsg, PeerMsg, Pull, Update
from tests.helpers import SIGNER, SPEC

TARGET = np.linspace(-1.0, 1.0, SPEC.size).astype(np.float32)


def vec(value: float) -> np.ndarray:
    return np.full(SPEC.size, value, dtype=np.float32)


def buffered(device: str, weights: np.ndarray, base: int = 0, seq: int = 0) -> BufferedUpdate:
    return BufferedUpdate(device=device, seq=seq, base_version=base, staleness=0, n_samples=10, weights=weights)


def gated_core(strategy: Strategy) -> CoordinatorCore:
    cfg = CoordinatorConfig(region="r1", coordinator_id="c1", spec=SPEC, signer=SIGNER, gate=GateConfig(margin=0.02))
    return CoordinatorCore(cfg, strategy, Snapshot(version=0, weights=vec(0.0)), rng=random.Random(0))


def send_update(c: CoordinatorCore, dev: str, seq: int, weights: np.ndarray, now: float) -> list[object]:
    msg = Update(device=dev, seq=seq, model_id="toy", base_version=c.version, n_samples=10, weights=weights)
    return _handle(c, topics.device_topic("r1", dev, "update"), encode(msg), now)


def send_pull(c: CoordinatorCore, dev: str, seq: int, now: float) -> list[object]:
    return _handle(c, topics.device_topic("r1", dev, "pull"), encode(Pull(device=dev, seq=seq, model_id="toy")), now)


def _handle(c: CoordinatorCore, topic: str, payload: bytes, now: float) -> list[object]:
    return list(c.handle(MessageReceived(now=now, topic=topic, payload=payload)))


def decide(c: CoordinatorCore, version: int, candidate: float, release: float, now: float, of: int = 0) -> list[object]:
    """The gate's answer on candidate ``version`` against release ``of``."""
    return list(c.handle(CandidateEvaluated(now=now, version=version, candidate_metric=candidate, release_metric=release,
                                            release_version=of)))


def commits(actions: Sequence[object]) -> list[CommitVersion]:
    return [a for a in actions if isinstance(a, CommitVersion)]


# --------------------------------------------------------------------------- FedAdam


def fedadam_rounds(s: FedOptStrategy, w: np.ndarray, rounds: int, rng: np.random.Generator) -> np.ndarray:
    """Honest rounds of 3 devices, each half way from the model to TARGET (plus noise)."""
    for _ in range(rounds):
        ups = [buffered(f"d{i}", (w + 0.5 * (TARGET - w) + 0.02 * rng.normal(size=w.shape)).astype(np.float32))
               for i in range(3)]
        w = s.aggregate(StaticView(spec=SPEC, version=0, weights=w), ups)
    return w


def test_fedadams_moments_start_afresh_when_the_line_is_replaced() -> None:
    """One poisoned round (the gate rejects it): with the moments it left, the steps after the
    rollback went on in the poisoned direction, away from where honest devices pull."""
    s = FedOptStrategy(FedOptConfig(server_opt="adam", server_lr=0.01, select=3))
    rng = np.random.default_rng(0)
    release = fedadam_rounds(s, vec(0.0), 20, rng)
    poison = [buffered("evil", (release - 20.0 * (TARGET - release)).astype(np.float32)) for _ in range(3)]
    s.aggregate(StaticView(spec=SPEC, version=0, weights=release), poison)  # candidate 21: rejected
    s.on_line_replaced(StaticView(spec=SPEC, version=22, weights=release), 1.0, restored=20)
    after = fedadam_rounds(s, release.copy(), 5, rng)
    # the old code (moments kept): 5 rounds later further from TARGET than the release was
    assert np.linalg.norm(TARGET - after) < np.linalg.norm(TARGET - release) - 0.1


def test_after_a_rejected_fedadam_round_the_next_candidate_moves_toward_the_honest_devices() -> None:
    s = FedOptStrategy(FedOptConfig(server_opt="adam", server_lr=0.05, select=1))
    c = gated_core(s)
    now, seq = 1.0, 0

    def one_round(weights_of: object) -> list[object]:
        nonlocal now, seq
        send_pull(c, "d1", seq, now)  # deferred, then invited (select = 1)
        send_pull(c, "d1", seq + 1, now + 0.5)  # served: a participant
        acts = send_update(c, "d1", seq, weights_of(c.weights), now + 1.0)  # type: ignore[operator]
        now, seq = now + 10.0, seq + 2
        return acts

    for _ in range(6):
        one_round(lambda w: (w + 0.5 * (TARGET - w)).astype(np.float32))
    release_version = c.version
    decide(c, release_version, 0.9, 0.5, now)  # promoted: the release
    release = c.weights.copy()
    (poisoned,) = commits(one_round(lambda w: (w - 20.0 * (TARGET - w)).astype(np.float32)))
    (rollback,) = commits(decide(c, poisoned.version, 0.1, 0.9, now, of=release_version))
    np.testing.assert_array_equal(rollback.weights, release)
    (nxt,) = commits(one_round(lambda w: (w + 0.5 * (TARGET - w)).astype(np.float32)))
    # the old code: the poisoned moments carry it away from TARGET (further than the release)
    assert np.linalg.norm(TARGET - nxt.weights) < np.linalg.norm(TARGET - release)


# --------------------------------------------------------------------------- Spyker's age


def test_spykers_age_goes_back_to_the_restored_versions() -> None:
    s = SpykerStrategy()
    led = s.ledger
    for v in range(1, 6):
        led.record(v, float(10 * v))
    s.on_line_replaced(StaticView(spec=SPEC, version=6, weights=vec(0.0)), 1.0, restored=2)
    assert led.age == 20.0 and led.age_at[6] == 20.0
    assert led.age_of(6, 6) == 20.0  # an update trained from the rollback is 0 behind it
    led.age_at.pop(1)
    s.on_line_replaced(StaticView(spec=SPEC, version=7, weights=vec(0.0)), 2.0, restored=1)  # no longer remembered
    assert led.age == 20.0 - 6.0  # age_of's lower bound: one unit per version


def test_a_spyker_coordinators_age_is_the_releases_after_a_rejection() -> None:
    """Three updates make versions 1-3 (age 3); the gate rejects 1: the line goes back to version
    0's weights, and its age to version 0's (the old code: 3, updates it no longer embodies)."""
    s = cast(SpykerStrategy, make_strategy("spyker"))
    c = gated_core(s)
    for i in range(3):
        send_pull(c, f"d{i}", 0, float(i))
        send_update(c, f"d{i}", 0, vec(1.0), float(i) + 0.5)
    assert c.version == 3 and s.ledger.age == 3.0
    (rollback,) = commits(decide(c, 1, 0.1, 0.9, 10.0))
    assert s.ledger.age == 0.0 and s.ledger.age_at[rollback.version] == 0.0
    assert rollback.metadata["strategy_state"] == s.checkpoint()


# --------------------------------------------------------------------------- NebulaFL's planets


def test_nebulas_planets_restart_from_the_restored_weights() -> None:
    s = NebulaStrategy(NebulaConfig(planets=2))
    view = StaticView(spec=SPEC, version=0, weights=vec(0.0))
    s.aggregate(view, [buffered("evil", vec(50.0))])  # candidate 1: rejected
    s.on_line_replaced(StaticView(spec=SPEC, version=2, weights=vec(0.0)), 1.0, restored=0)
    np.testing.assert_array_equal(s.state.master(), vec(0.0))  # the old code: 45.45, the rejected planet's weight
    out = s.aggregate(StaticView(spec=SPEC, version=2, weights=vec(0.0)), [buffered("d1", vec(1.0), base=2, seq=1)])
    assert float(np.max(np.abs(out))) <= 1.0


def test_after_a_rejection_nebulas_next_candidate_is_not_the_rejected_model_again() -> None:
    c = gated_core(make_strategy("nebula", planets=2))
    send_pull(c, "evil", 0, 0.0)
    (bad,) = commits(send_update(c, "evil", 0, vec(50.0), 0.5))
    assert float(np.max(bad.weights)) > 10.0
    (rollback,) = commits(decide(c, bad.version, 0.1, 0.9, 5.0))
    np.testing.assert_array_equal(rollback.weights, vec(0.0))
    send_pull(c, "d1", 0, 6.0)
    (nxt,) = commits(send_update(c, "d1", 0, vec(1.0), 6.5))
    assert float(np.max(np.abs(nxt.weights))) <= 1.0  # the old code: 23.18, the rejected planet back in the master


# --------------------------------------------------------------------------- merges still open


def test_a_sync_spyker_round_open_at_a_rollback_merges_the_restored_model_not_the_rejected_one() -> None:
    ring = ["a", "b"]
    a = make_peering("spyker", coordinator_id="a", ring=ring, strategy=SpykerStrategy(),
                     params={"mode": "sync", "h_intra": 3.0, "sync_timeout_s": 2.0})
    assert isinstance(a, SyncSpykerPeering)
    rejected = StaticView(spec=SPEC, version=4, weights=vec(9.0))
    a.ledger.record(4, 5.0)
    assert a.on_version(rejected, 1.0).sends  # a joins round 1 with the (later rejected) version 4
    a.ledger.record(5, a.ledger.age)
    a.on_line_replaced(StaticView(spec=SPEC, version=5, weights=vec(0.0)), 1.5, restored=0)
    msg = decode(encode(PeerMsg(sender="b", kind="model", body={"round": 1, "age": 1.0}, weights=vec(0.0))))
    assert isinstance(msg, PeerMsg)
    plan = a.on_message(StaticView(spec=SPEC, version=5, weights=vec(0.0)), msg, 1.6)
    assert plan.merged is not None
    np.testing.assert_array_equal(plan.merged, vec(0.0))  # the old code: 7.75 (a's rejected 9s, merged first)


def test_a_hierfavg_cloud_round_open_at_a_rollback_averages_the_restored_model() -> None:
    strategy = HierEdgeStrategy(FedAvgConfig(select=5, min_devices=1))
    cloud = HierPeering("cloud", ["cloud", "e1"], HierPeerConfig(kappa2=1, sync_timeout_s=5.0), strategy=strategy)
    strategy.gate.samples = 10
    cloud.on_version(StaticView(spec=SPEC, version=3, weights=vec(9.0)), 1.0)  # the cloud's own (later rejected) model
    cloud.on_line_replaced(StaticView(spec=SPEC, version=4, weights=vec(0.0)), 1.5, restored=0)
    msg = decode(encode(PeerMsg(sender="e1", kind="edge", body={"round": 1, "samples": 10}, weights=vec(0.0))))
    assert isinstance(msg, PeerMsg)
    plan = cloud.on_message(StaticView(spec=SPEC, version=4, weights=vec(0.0)), msg, 2.0)
    assert plan.merged is not None
    np.testing.assert_array_equal(plan.merged, vec(0.0))  # the old code: 4.5, half the rejected model


# --------------------------------------------------------------------------- HFedMS's open round


class ChainFleet:
    """Devices that pull, take their invitation, train (the served model + ``step``) and pull again,
    against a real gated core: what an HFedMS chain needs (the core serves only invited pulls)."""

    def __init__(self, core: CoordinatorCore, devices: str) -> None:
        self.core, self.now = core, 0.0
        self.seq = dict.fromkeys(devices, 0)
        self.invite: dict[str, int] = {}
        self.held: dict[str, tuple[int, np.ndarray]] = {}
        self.commits: list[CommitVersion] = []
        self.peer_out: list[Publish] = []
        self.evaluations: list[int] = []
        """The versions the core asked the gate to judge (``EvaluateCandidate``)."""
        for d in devices:
            self.pull(d)

    def take(self, actions: Sequence[object]) -> list[object]:
        for a in actions:
            if isinstance(a, CommitVersion):
                self.commits.append(a)
            elif isinstance(a, EvaluateCandidate):
                self.evaluations.append(a.version)
            elif isinstance(a, Publish) and "/peer/" in a.topic:
                self.peer_out.append(a)
            elif isinstance(a, Publish) and a.topic.endswith("/invite"):
                msg = decode(a.payload)
                assert isinstance(msg, Invite)
                self.invite[topics.parse(a.topic).device] = msg.round
        return list(actions)

    def _send(self, device: str, msg: Pull | Update) -> list[object]:
        self.now += 0.1
        leaf = "update" if isinstance(msg, Update) else "pull"
        return self.take(_handle(self.core, topics.device_topic("r1", device, leaf), encode(msg), self.now))

    def pull(self, device: str) -> list[object]:
        self.seq[device] += 1
        pull = Pull(device=device, seq=self.seq[device], model_id="toy", invite_round=self.invite.pop(device, -1))
        acts = self._send(device, pull)
        for a in acts:
            if isinstance(a, Publish) and a.topic.endswith("/model"):
                model = decode(a.payload)
                assert isinstance(model, ModelMsg)
                self.held[device] = (model.version, np.array(model.weights))
        return acts

    def train(self, device: str, step: float = 1.0) -> str:
        """Send the update trained from what ``device`` was served; the ack's status (and reason)."""
        base, weights = self.held.pop(device)
        self.seq[device] += 1
        acts = self._send(device, Update(device=device, seq=self.seq[device], model_id="toy", base_version=base,
                                         n_samples=10, weights=(weights + step).astype(np.float32)))
        (ack,) = [decode(a.payload) for a in acts if isinstance(a, Publish) and a.topic.endswith("/ack")]
        assert isinstance(ack, Ack)
        self.pull(device)  # deferred: waits for its next invitation
        return f"{ack.status} {ack.reason}".strip()

    def step(self, device: str | None = None, step: float = 1.0) -> str:
        """The invited device (the only one, unless named) pulls, trains and sends its update."""
        if device is None:
            (device,) = self.invite
        self.pull(device)
        return self.train(device, step)

    def decide(self, version: int, *, reject: bool, of: int = 0) -> list[object]:
        """The gate's answer on candidate ``version`` against release ``of``."""
        self.now += 0.1
        return self.take(decide(self.core, version, 0.1 if reject else 0.9, 0.5, self.now, of=of))


def hfedms_fleet() -> tuple[ChainFleet, HFedMSStrategy]:
    """Round 1 (2 chains of 2, fixed groups): the last device poisons (+50), so the round's model,
    version 4, is 26.5s; the release is version 0 (0s). Round 2 starts from version 4."""
    s = make_strategy("hfedms", beta=2, kappa=1.0, population=4, regroup_every=100)
    assert isinstance(s, HFedMSStrategy)
    fleet = ChainFleet(gated_core(s), "abcd")
    for i in range(4):
        fleet.step(step=50.0 if i == 3 else 1.0)
    assert [float(c.weights[0]) for c in fleet.commits] == [1.0, 0.0, 1.0, 26.5] and s.in_round
    return fleet, s


@pytest.mark.parametrize("when", ["before round 2's first step", "after round 2's first chain"])
def test_an_hfedms_round_open_at_a_rollback_starts_again_from_the_restored_model(when: str) -> None:
    """The gate rejects round 1's model while round 2 (started from it) is open. The old code: the
    chain's end reset the line to the round's start, the rejected 26.5s (version 7), and the round's
    mean took the rejected line's group result (15.25s); now both chains run from the rollback's 0s
    and the round's model is what the honest steps made of it, 2s."""
    fleet, s = hfedms_fleet()
    if when != "before round 2's first step":
        assert [fleet.step(), fleet.step()] == ["accepted", "accepted"]  # chain 1: 26.5 -> 28.5, line reset to 26.5
    (rollback,) = commits(fleet.decide(4, reject=True))
    np.testing.assert_array_equal(rollback.weights, vec(0.0))
    if when != "before round 2's first step":
        (stale,) = set(fleet.invite) - {s.selected[0][0]}  # invited for chain 2 before the rollback
        assert fleet.step(stale) == "accepted"  # served the restored model, but not its turn: ignored
    for _ in range(4):
        assert fleet.step(s.expecting) == "accepted"
    after = [float(c.weights[0]) for c in fleet.commits[fleet.commits.index(rollback) + 1:]]
    assert after == [1.0, 0.0, 1.0, 2.0]  # the old code: [1.0, 26.5, 27.5, 15.25] (first variant)
    assert s.round == 2 and s.round_versions[-1] == fleet.commits[-1].version and s.chain_breaks == 0
    assert s.describe()["restarts"] == 1 and s.ignored == (0 if when == "before round 2's first step" else 1)


def test_a_gated_hfedms_round_submits_only_its_model_to_the_gate() -> None:
    """A round of 2 chains of 2 devices commits 4 versions: a chain step, the reset to the round's
    start, a chain step, the round's model. The gate was asked to judge all 4 (a chain step
    promoted would be served to every device; one rejected restarts the round); only the round's
    model is one to release."""
    s = make_strategy("hfedms", beta=2, kappa=1.0, population=4, regroup_every=100)
    assert isinstance(s, HFedMSStrategy)
    fleet = ChainFleet(gated_core(s), "abcd")
    for _ in range(4):
        fleet.step()
    assert s.round_versions == [4] and [s.candidate(StaticView(spec=SPEC, version=v, weights=vec(0.0))) for v in (3, 4)] == [False, True]
    assert fleet.evaluations == [4]  # today: [1, 2, 3, 4]


def test_an_ungated_hfedms_releases_only_its_round_models() -> None:
    """Without a gate every commit became the release: each chain step (one device's continuation
    of another's) and the chain's reset were what every device predicts with (a serving pull got
    them), where the paper's global model is the round's only. The chain's next device still
    trains from the step (the training line); the release stays the round's model."""
    s = make_strategy("hfedms", beta=2, kappa=1.0, population=4, regroup_every=100)
    assert isinstance(s, HFedMSStrategy)
    cfg = CoordinatorConfig(region="r1", coordinator_id="c1", spec=SPEC, signer=SIGNER)
    core = CoordinatorCore(cfg, s, Snapshot(version=0, weights=vec(0.0)), rng=random.Random(0))
    fleet = ChainFleet(core, "abcd")
    releases, served = [], []
    for _ in range(4):
        fleet.step(step=1.0)
        releases.append(core.release[0])
        fleet.seq["e"] = fleet.seq.get("e", 0) + 1  # a device outside the round asks what to predict with
        for a in fleet._send("e", Pull(device="e", seq=fleet.seq["e"], model_id="toy", serve=True)):
            if isinstance(a, Publish) and a.topic.endswith("/model"):
                model = decode(a.payload)
                assert isinstance(model, ModelMsg)
                served.append((model.version, float(model.weights[0])))
    assert [c.version for c in fleet.commits] == [1, 2, 3, 4] and s.round_versions == [4]
    assert releases == [0, 0, 0, 4]  # today: [1, 2, 3, 4]
    assert served == [(0, 0.0), (0, 0.0), (0, 0.0), (4, 2.0)]  # today: the chain steps' 1s first


def test_an_hfedms_step_served_the_rejected_line_is_invited_again() -> None:
    """Round 2's first device was served version 4 when the gate rejected it: its update is refused
    (base_rejected) and it pulls again. The old code kept waiting for that step: nobody was invited
    again and the chain stalled for ever (no commit after the rollback)."""
    fleet, s = hfedms_fleet()
    (first,) = fleet.invite
    fleet.pull(first)
    assert fleet.held[first][0] == 4
    (rollback,) = commits(fleet.decide(4, reject=True))
    assert fleet.train(first) == "rejected base_rejected"
    assert list(fleet.invite) == [first]  # the old code: [] (s.expecting still `first`: waiting for ever)
    for _ in range(4):
        assert fleet.step() == "accepted"
    after = [float(c.weights[0]) for c in fleet.commits[fleet.commits.index(rollback) + 1:]]
    assert after == [1.0, 0.0, 1.0, 2.0] and s.round == 2 and s.chain_breaks == 0


# --------------------------------------------------------------------------- HierFAVG's samples and sent model


def hier_fleet(me: str, ring: Sequence[str], kappa2: int) -> tuple[ChainFleet, HierPeering]:
    """A gated HierFAVG coordinator (FedAvg rounds of one device, ``d``, 10 samples an update)."""
    method = make_method("hierfavg", coordinator_id=me, ring=ring, strategy_params={"select": 1},
                         peering_params={"kappa2": kappa2, "sync_timeout_s": 100.0, "max_share": 1.0})
    cfg = CoordinatorConfig(region="r1", coordinator_id=me, spec=SPEC, signer=SIGNER, gate=GateConfig(margin=0.02))
    core = CoordinatorCore(cfg, method.strategy, Snapshot(version=0, weights=vec(0.0)), rng=random.Random(0),
                           peering=method.peering)
    assert isinstance(method.peering, HierPeering)
    return ChainFleet(core, "d"), method.peering


def deliver(sender: ChainFleet, receiver: ChainFleet) -> list[PeerMsg]:
    """Hand ``sender``'s peer messages sent so far to ``receiver``; the messages."""
    sent, sender.peer_out = sender.peer_out, []
    out = []
    for pub in sent:
        receiver.now += 0.1
        receiver.take(_handle(receiver.core, pub.topic, pub.payload, receiver.now))
        msg = decode(pub.payload)
        assert isinstance(msg, PeerMsg)
        out.append(msg)
    return out


def test_a_hierfavg_edges_samples_and_rounds_go_back_with_the_rolled_back_rounds() -> None:
    """kappa2 = 3: round 1 (released), round 2 (rejected: back to round 1's model), rounds 3 and 4.
    helper-166: the samples claimed counted the rejected round's 10 too. helper-172: so did the
    rounds toward kappa2 (Liu et al.: the cloud averages after kappa2 edge aggregations): the edge
    sent after round 3 a model of 2 rounds (1 and 3) where the other edges send 3. Now it sends
    after round 4: 3 rounds, 30 samples."""
    edge, peering = hier_fleet("e1", ["cloud", "e1", "e2"], kappa2=3)
    edge.step()
    edge.decide(1, reject=False)
    edge.step(step=50.0)
    assert peering.gate.samples == 20 and peering.edge_rounds == 2
    (rollback,) = commits(edge.decide(2, reject=True, of=1))
    np.testing.assert_array_equal(rollback.weights, vec(1.0))
    assert peering.gate.samples == 10 and peering.edge_rounds == 1  # before: 20 samples (helper-166), 2 rounds
    edge.step()
    assert edge.peer_out == []  # the old code sent here: rounds 1 and 3, 20 samples
    edge.step()
    (pub,) = edge.peer_out
    sent = decode(pub.payload)
    assert isinstance(sent, PeerMsg) and sent.kind == "edge"
    np.testing.assert_array_equal(sent.weights, vec(3.0))  # round 1's 1s + rounds 3 and 4
    assert sent.body["samples"] == 30 and peering.edge_rounds == 3
    assert edge.commits[-1].metadata["peering"]["edge_rounds"] == 3


def test_a_hierfavg_edge_rolled_back_to_the_global_counts_rounds_from_there() -> None:
    """kappa2 = 2: rounds 1-2 sent, the global merged (version 3), round 3 (version 4) rejected:
    the line goes back to the global. The old code counted round 3 (the next send after one more
    round, a model of one round); now the next send comes after two rounds from the global."""
    s = HierEdgeStrategy(FedAvgConfig())
    e1 = HierPeering("e1", ["cloud", "e1"], HierPeerConfig(kappa2=2), strategy=s)

    def view(version: int) -> StaticView:
        return StaticView(spec=SPEC, version=version, weights=vec(float(version)))

    sends = []
    for v in (1, 2):
        sends += e1.on_version(view(v), float(v)).sends
    assert len(sends) == 1 and s.gate.waiting
    glob = decode(encode(PeerMsg(sender="cloud", kind="global", body={"round": 1}, weights=vec(3.0))))
    assert isinstance(glob, PeerMsg) and e1.on_message(view(2), glob, 2.5).merged is not None  # committed as version 3
    assert not e1.on_version(view(4), 4.0).sends and e1.edge_rounds == 3
    e1.on_line_replaced(view(5), 5.0, restored=3)  # round 3 rejected: back to the global
    assert e1.edge_rounds == 2  # the old code: 3
    assert not e1.on_version(view(6), 6.0).sends  # the old code sent here
    assert [p.kind for p in e1.on_version(view(7), 7.0).sends] == ["edge"] and e1.cloud_round == 2


def two_tier() -> tuple[ChainFleet, ChainFleet, HierPeering, HierPeering]:
    """The cloud and one edge (kappa2 = 1): the edge's round makes 50s and goes to the cloud."""
    ring = ["cloud", "e1"]
    (cloud, cp), (edge, ep) = hier_fleet("cloud", ring, 1), hier_fleet("e1", ring, 1)
    edge.step(step=50.0)
    (sent,) = deliver(edge, cloud)
    assert sent.kind == "edge" and float(sent.weights[0]) == 50.0 and "e1" in cp.collected
    return cloud, edge, cp, ep


def test_a_hierfavg_edges_rejected_model_is_replaced_in_the_open_cloud_round() -> None:
    """The edge's gate rejects the model it sent while the cloud still collects: it sends the
    restored model for that round instead, and the global model is the cloud's 1s. The old code:
    the cloud averaged the rejected 50s with its 1s and the edge committed 25.5s."""
    cloud, edge, cp, ep = two_tier()
    (rollback,) = commits(edge.decide(1, reject=True))
    np.testing.assert_array_equal(rollback.weights, vec(0.0))
    (replacement,) = deliver(edge, cloud)  # the old code: nothing sent
    assert replacement.body == {"round": 1, "samples": 0, "replaces": True}
    cloud.step()  # the cloud's own round (1s) closes the cloud round
    (glob,) = deliver(cloud, edge)
    assert glob.body == {"round": 1, "replaced": ["e1"]}
    np.testing.assert_array_equal(edge.commits[-1].weights, vec(1.0))  # the old code: 25.5s
    assert cp.describe()["replaced"] == 1 and ep.describe()["replaced"] == 1 and not ep.gate.waiting


def test_a_hierfavg_edge_ignores_a_global_model_made_with_its_rejected_one() -> None:
    """The cloud closed the round (its global holds the edge's 50s) before the edge's gate rejected
    them: the replacement comes too late (ignored, counted), and the edge ignores that global
    (counted) and goes on from its restored line. The old code committed the global, 25.5s."""
    cloud, edge, cp, ep = two_tier()
    cloud.step()
    assert float(cloud.commits[-1].weights[0]) == 25.5  # the cloud's global (its own gate judges it)
    glob_out, cloud.peer_out = cloud.peer_out, []
    (rollback,) = commits(edge.decide(1, reject=True))
    deliver(edge, cloud)
    assert cp.ignored == 1 and "e1" not in cp.collected  # the old code: nothing sent
    cloud.peer_out = glob_out
    (glob,) = deliver(cloud, edge)
    assert glob.body == {"round": 1} and float(glob.weights[0]) == 25.5
    assert edge.commits[-1] is rollback  # the old code: a new version of 25.5s
    assert ep.ignored == 1 and not ep.gate.waiting
    assert edge.step() == "accepted" and float(edge.commits[-1].weights[0]) == 1.0  # rounds go on from 0s


def test_hierfavgs_replacement_fields_from_a_peer_are_checked() -> None:
    """A ``replaces`` that is not a boolean, or a ``replaced`` that is not a short list of ids, is
    a typed error (the core counts it as a refused peer message) and changes nothing."""
    strategy = HierEdgeStrategy(FedAvgConfig(select=5, min_devices=1))
    cloud = HierPeering("cloud", ["cloud", "e1"], HierPeerConfig(kappa2=1), strategy=strategy)
    view = StaticView(spec=SPEC, version=1, weights=vec(0.0))
    bad_edge = PeerMsg(sender="e1", kind="edge", body={"round": 1, "samples": 1, "replaces": "yes"}, weights=vec(9.0))
    with pytest.raises(MalformedMessage, match="replaces"):
        cloud.on_message(view, bad_edge, 1.0)
    assert cloud.collected == {} and cloud.replaced == 0
    late = PeerMsg(sender="e1", kind="edge", body={"round": 1, "samples": 1, "replaces": True}, weights=vec(9.0))
    assert cloud.on_message(view, late, 1.0).counted and cloud.collected == {} and cloud.ignored == 1
    edge_strategy = HierEdgeStrategy(FedAvgConfig(select=5, min_devices=1))
    edge = HierPeering("e1", ["cloud", "e1"], HierPeerConfig(kappa2=1), strategy=edge_strategy)
    edge.on_version(view, 1.0)
    for replaced in (5, ["cloud", "e1", "e2"], [7], ["no/such id"]):
        glob = PeerMsg(sender="cloud", kind="global", body={"round": 1, "replaced": replaced}, weights=vec(9.0))
        with pytest.raises(MalformedMessage):
            edge.on_message(view, glob, 2.0)
        assert edge.gate.waiting and edge.ignored == 0
