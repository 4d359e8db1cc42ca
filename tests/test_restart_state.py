"""State a coordinator keeps across a restart, checked on the real path: the core's actions made
durable by a real :class:`~coordinator.registry.Registry` as the daemon makes them, the process
"dies" (the registry is closed: what was not written is lost) and a new core is built from
``Registry.load()``, as the daemon's start and its rebuild after a storage failure do. (Probes
by helper-141: each of these resumed something one version behind, or not at all.)"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.core import (
    CommitVersion,
    CoordinatorConfig,
    CoordinatorCore,
    MessageReceived,
    PersistUpdate,
    Publish,
    RecordRelease,
    TimerFired,
)
from coordinator.methods import make_method
from coordinator.registry import Registry
from coordinator.strategies import make_strategy
from edge_sdk.wire import topics
from edge_sdk.wire.codec import decode, encode
from edge_sdk.wire.messages import Invite, Pull, Update
from tests.helpers import SIGNER, SPEC

Build = Callable[[], tuple[Any, Any]]
"""A fresh (strategy, peering or None), as the daemon builds them at each start."""


class Node:
    """One coordinator process on the state dir ``root``."""

    def __init__(self, root: Path, config: CoordinatorConfig, build: Build, *, init: bool = False) -> None:
        self.root, self.config, self.build = root, config, build
        self.registry = Registry(root, SPEC)
        if init:
            self.registry.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
        snap = self.registry.load()
        assert snap is not None
        self.snapshot = snap
        strategy, peering = build()
        self.core = CoordinatorCore(config, strategy, snap, rng=random.Random(0), peering=peering)

    def durable(self, actions: Sequence[object]) -> list[object]:
        for a in actions:  # what CoordinatorDaemon._do writes, in order
            if isinstance(a, PersistUpdate):
                self.registry.append_updates([a.update])
            elif isinstance(a, CommitVersion):
                self.registry.commit(a)
            elif isinstance(a, RecordRelease):
                self.registry.record_release(a.release, a.pinned, a.event, a.floor)
        return list(actions)

    def handle(self, event: Any) -> list[object]:
        return self.durable(self.core.handle(event))

    def start(self, now: float) -> list[object]:
        return self.durable(self.core.start(now))

    def restart(self, build: Build | None = None) -> Node:
        self.registry.close()
        return Node(self.root, self.config, build or self.build)


def received(region: str, msg: Any, leaf: str, now: float) -> MessageReceived:
    return MessageReceived(now=now, topic=topics.device_topic(region, msg.device, leaf), payload=encode(msg))  # type: ignore[arg-type]


def update(region: str, device: str, seq: int, base: int, now: float, value: float = 1.0) -> MessageReceived:
    weights = np.full(SPEC.size, value, np.float32)
    return received(region, Update(device=device, seq=seq, model_id="toy", base_version=base, n_samples=4, weights=weights),
                    "update", now)


def test_hierfavg_resumes_the_edge_rounds_of_its_last_version_and_starts_the_cloud_round_due(tmp_path: Path) -> None:
    """The commit took the peering's checkpoint before on_version counted the version: a restart
    resumed one edge round behind (2 → 1), and with κ2 = 3 the cloud round due at version 3 was
    never started after restarts at versions 2 and 3."""
    cfg = CoordinatorConfig(region="r1", coordinator_id="edge1", spec=SPEC, signer=SIGNER)

    def build() -> tuple[Any, Any]:
        m = make_method("hierfavg", peering="hierfavg", coordinator_id="edge1", ring=("cloud", "edge1"),
                        strategy_params={"select": 1, "min_devices": 1}, peering_params={"kappa2": 3, "sync_timeout_s": 1000.0})
        return m.strategy, m.peering

    def one_round(node: Node, seq: int, now: float) -> None:  # d1 pulls, is invited, pulls again, sends: one version
        acts = node.handle(received("r1", Pull(device="d1", seq=seq, model_id="toy", n_samples=5), "pull", now))
        acts += node.handle(TimerFired(now=now + 0.1))
        (invite,) = [decode(a.payload) for a in acts if isinstance(a, Publish) and a.topic.endswith("/invite")]
        assert isinstance(invite, Invite)
        node.handle(received("r1", Pull(device="d1", seq=seq + 1, model_id="toy", n_samples=5, invite_round=invite.round),
                             "pull", now + 0.2))
        node.handle(update("r1", "d1", seq + 2, node.core.version, now + 0.3))

    node = Node(tmp_path / "s", cfg, build, init=True)
    node.start(0.0)
    for i in range(2):
        one_round(node, 3 * i, 1.0 + i)
    assert node.core.version == 2 and node.core.peering.edge_rounds == 2
    node = node.restart()
    assert (node.core.peering.edge_rounds, node.core.peering.cloud_round) == (2, 0)
    one_round(node, 6, 3.0)  # version 3: the third edge round starts cloud round 1
    assert node.core.version == 3 and node.core.peering.cloud_round == 1
    node = node.restart()
    assert (node.core.peering.edge_rounds, node.core.peering.cloud_round) == (3, 1)
    node.registry.close()


def test_spyker_under_another_strategy_resumes_the_age_of_its_last_version(tmp_path: Path) -> None:
    cfg = CoordinatorConfig(region="ra", coordinator_id="a", spec=SPEC, signer=SIGNER)

    def build() -> tuple[Any, Any]:
        m = make_method("spin", peering="spyker", coordinator_id="a", ring=("a", "b"), strategy_params={"k": 1, "timeout_s": None})
        return m.strategy, m.peering

    node = Node(tmp_path / "s", cfg, build, init=True)
    node.start(0.0)
    for seq in range(4):
        node.handle(update("ra", "d1", seq, node.core.version, 1.0 + seq))
    live = node.core.peering.describe()["age"]
    assert node.core.version == 4 and live == 4.0
    node = node.restart()
    assert node.core.peering.describe()["age"] == live  # was 3.0
    node.registry.close()


def test_the_conversion_switch_point_is_kept_through_a_run_under_a_policy_that_does_not_convert(tmp_path: Path) -> None:
    """README: the switch point is kept for the state dir's life. A commit carried it only while the
    policy converted: one run under ``damped`` lost it, and the next converting run converted again."""
    cfg = CoordinatorConfig(region="r1", coordinator_id="c1", spec=SPEC, signer=SIGNER)

    def policy(name: str) -> Build:
        return lambda: (make_strategy("spin", k=2, timeout_s=None, clip_multiplier=0, sample_weight_cap=0, staleness=name,
                                      convert_beyond=2), None)

    node = Node(tmp_path / "s", cfg, policy("gradient-inversion"), init=True)
    node.start(0.0)
    node.core._switch.switch_version = 1  # the tracker's decision (observe() makes it from many devices' estimates)
    seq, now = 0, 1.0

    def versions(node: Node, n: int) -> None:
        nonlocal seq, now
        for _ in range(n):
            node.handle(update("r1", "a", seq, node.core.version, now))
            node.handle(update("r1", "b", seq, node.core.version, now))
            seq, now = seq + 1, now + 1.0

    versions(node, 3)
    node = node.restart(policy("damped"))
    versions(node, 2)
    node = node.restart(policy("gradient-inversion"))
    assert dict(node.snapshot.conversion_state) == {"switch_version": 1}
    assert node.core.status().extra["conversion"]["switch_version"] == 1
    node.registry.close()


def test_the_staleness_histogram_comes_back_with_the_counters(tmp_path: Path) -> None:
    cfg = CoordinatorConfig(region="r1", coordinator_id="c1", spec=SPEC, signer=SIGNER)
    node = Node(tmp_path / "s", cfg, lambda: (make_strategy("spin", k=2, timeout_s=None), None), init=True)
    node.start(0.0)
    for seq in range(3):
        node.handle(update("r1", "a", seq, node.core.version, 1.0 + seq))
        node.handle(update("r1", "b", seq, 0, 1.5 + seq))  # b always trains from version 0
    hist = node.core.status().extra["staleness_histogram"]
    assert hist == {"0": 4, "1": 1, "2": 1} and node.core.counters["accepted"] == 6
    node = node.restart()
    assert node.core.status().extra["staleness_histogram"] == hist  # was {}
    assert node.core.counters["accepted"] == 6
    node.registry.close()


def test_a_dead_spyker_peers_beats_captured_before_the_last_commit_stay_replays_after_a_restart(tmp_path: Path) -> None:
    """Beats carry their sender's clock; one not newer than the sender's last is a replay (helper-115).
    That last beat was in memory only, so after a restart a dead peer's captured beats, replayed in
    order, kept it alive again (the token passed to it and lost). The commit now carries each peer's
    newest beat. (Beats after the last commit are not covered: an idle region commits nothing.)"""
    from edge_sdk.signing import Signer
    from edge_sdk.wire.messages import PeerMsg

    b_key = Signer.generate()
    cfg = CoordinatorConfig(region="ra", coordinator_id="a", spec=SPEC, signer=SIGNER,
                            peer_keys={"b": b_key.public_raw, "c": Signer.generate().public_raw})
    pp = {"h_inter": 1e9, "beacon_s": 1.0, "token_timeout_s": 4.0, "stagger_s": 1.0, "sync_timeout_s": 3.0}

    def build() -> tuple[Any, Any]:
        m = make_method("spin", peering="spyker", coordinator_id="a", ring=("a", "b", "c"),
                        strategy_params={"k": 1, "timeout_s": None}, peering_params=pp)
        return m.strategy, m.peering

    def beat(at: float, now: float) -> MessageReceived:
        topic = topics.peer_topic("a", "beat")
        msg = PeerMsg(sender="b", kind="beat", body={"at": at, "age": 0.0, "clients": 1, "pos": None, "hold": False})
        return MessageReceived(now=now, topic=topic, payload=encode(msg, signer=b_key, scope=topics.signing_scope(topic)))

    node = Node(tmp_path / "s", cfg, build, init=True)
    node.start(0.0)
    for t in range(1, 11):  # b's beats over 10 s; then b dies
        node.handle(beat(float(t), float(t)))
    node.handle(update("ra", "d1", 0, node.core.version, 11.0))  # a version: the commit carries b's newest beat
    assert node.core.version == 1
    node = node.restart()
    node.start(200.0)  # peers count as alive for token_timeout_s (4 s) after a start
    alive = []
    for t in range(1, 11):  # the captured beats, replayed in order once that has passed
        node.handle(beat(float(t), 204.0 + t))
        alive.append(node.core.peering.alive("b", 204.5 + t))
    assert node.core.peering.describe().get("beats_ignored", 0) == 10 and not any(alive)  # were 0 and all True
    node.registry.close()
