"""A ring of sans-IO peering objects on an in-memory network (for tests).

Each node is a peering component with a minimal coordinator view (weights, version,
devices) that commits merged models the way :class:`~coordinator.core.CoordinatorCore`
does, including ``checkpoint()`` and ``take_tallies()`` with every commit. The network holds messages until the
test delivers, drops, duplicates or reorders them; every message really crosses the wire
codec (msgpack) and every checkpoint really crosses JSON, as with the daemon's registry.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from coordinator.peering.base import BROADCAST, Peering, PeerPlan
from coordinator.peering.spyker import SpykerPeerConfig, SpykerPeering
from coordinator.strategies.spyker import SpykerStrategy
from edge_sdk.spec import ModelSpec, Vector
from edge_sdk.wire.codec import decode, encode
from edge_sdk.wire.messages import PeerMsg

SPEC = ModelSpec.build("toy", [("body.w", (6,), "extractor"), ("head.w", (3,), "classifier")])


def vec(value: float) -> np.ndarray:
    """A model of SPEC's size, every weight ``value``."""
    return np.full(SPEC.size, value, dtype=np.float32)


def msg_from(sender: str, kind: str, body: dict[str, object], weights: np.ndarray | None = None) -> PeerMsg:
    """A peer message as the receiver gets it: through the wire codec."""
    m = decode(encode(PeerMsg(sender=sender, kind=kind, body=body, weights=weights)))
    assert isinstance(m, PeerMsg)
    return m


@dataclass
class View:
    """What a peering reads from its coordinator."""

    weights: Vector
    version: int = 0
    devices_seen: tuple[str, ...] = ()
    spec: ModelSpec = SPEC
    buffer: tuple[Any, ...] = ()

    def weights_at(self, version: int) -> Vector | None:
        return None


@dataclass
class Envelope:
    sender: str
    to: str
    kind: str
    payload: bytes
    recipients: list[str]


@dataclass
class Node:
    name: str
    peering: Peering
    view: View
    alive: bool = True
    checkpoint: str = "{}"
    tallies: dict[str, int] | None = None
    """The peering's per-device counts, accumulated from each commit's changes (as the registry does)."""
    incarnation: int = 0
    broadcasts: list[tuple[int, tuple[Any, ...]]] = field(default_factory=list)
    """(incarnation, sync id) of every model this node broadcast."""


class Ring:
    """Nodes, a clock and a network of in-flight messages."""

    def __init__(self, names: Sequence[str], make: Callable[[str], Peering], *, seed: int = 0, persistent: bool = False) -> None:
        self.make = make
        self.persistent = persistent
        """MQTT persistent sessions: messages for a dead coordinator wait for its restart."""
        self.now = 0.0
        rng = np.random.default_rng(seed)
        self.nodes: dict[str, Node] = {}
        for name in names:
            w = rng.normal(size=SPEC.size).astype(np.float32)
            self.nodes[name] = Node(name, make(name), View(weights=w, devices_seen=tuple(f"{name}-d{i}" for i in range(5))))
        self.net: list[Envelope] = []
        self.commits = 0
        for node in self.nodes.values():
            self._apply(node, node.peering.on_timer(node.view, self.now))

    # ------------------------------------------------------------------ plumbing

    def _apply(self, node: Node, plan: PeerPlan) -> None:
        for send in plan.sends:
            msg = PeerMsg(sender=node.name, kind=send.kind, body=send.body, weights=send.weights)
            if send.to == BROADCAST:
                recipients = [n for n in self.nodes if n != node.name]
            else:
                recipients = [send.to]
            if send.kind == "model":
                sid = tuple(send.body["sid"])
                node.broadcasts.append((node.incarnation, sid))
            for r in recipients:
                self.net.append(Envelope(node.name, r, send.kind, encode(msg), [r]))
        if plan.merged is not None:
            self._commit(node, plan.merged)

    def _commit(self, node: Node, weights: Vector) -> None:
        node.view.weights = np.asarray(weights, dtype=np.float32)
        node.view.version += 1
        node.checkpoint = json.dumps(node.peering.checkpoint())
        tallies = node.peering.take_tallies()
        if tallies is None:
            node.tallies = None
        else:
            node.tallies = {**(node.tallies if node.tallies is not None and not tallies.whole else {}), **tallies.changed}
        self.commits += 1

    def deliver(self, index: int) -> None:
        node = self.nodes[self.net[index].to]
        if not node.alive and self.persistent:
            return  # waits at the broker
        env = self.net.pop(index)
        if not node.alive:
            return  # lost with the dead coordinator
        msg = decode(env.payload)
        assert isinstance(msg, PeerMsg)
        self._apply(node, node.peering.on_message(node.view, msg, self.now))

    def deliver_all(self, limit: int = 10_000) -> None:
        for _ in range(limit):
            ready = [i for i, env in enumerate(self.net) if self.nodes[env.to].alive or not self.persistent]
            if not ready:
                return
            self.deliver(ready[0])
        raise AssertionError("messages keep coming: a storm?")

    def tick(self, dt: float) -> None:
        self.now += dt
        for node in self.nodes.values():
            if node.alive:
                wake = node.peering.wake_at()
                if wake is not None and self.now >= wake:
                    self._apply(node, node.peering.on_timer(node.view, self.now))

    def local_updates(self, name: str, k: int) -> None:
        """``k`` client updates aggregated at ``name`` (ages grow, a version is committed)."""
        node = self.nodes[name]
        if not node.alive:
            return
        p = node.peering
        assert isinstance(p, SpykerPeering)
        if p.strategy is not None:
            p.ledger.record(node.view.version + 1, p.ledger.age + k)
        self._commit(node, node.view.weights + np.float32(0.01 * k))
        self._apply(node, p.on_version(node.view, self.now))

    def crash(self, name: str) -> None:
        self.nodes[name].alive = False

    def restart(self, name: str) -> None:
        node = self.nodes[name]
        if node.alive:
            return
        node.peering = self.make(name)
        node.peering.restore(json.loads(node.checkpoint))
        if node.tallies is not None:
            node.peering.restore_tallies(dict(node.tallies))
        node.incarnation += 1
        node.alive = True
        self._apply(node, node.peering.on_timer(node.view, self.now))

    # ------------------------------------------------------------------ observations

    def holders(self) -> list[str]:
        return [n.name for n in self.nodes.values() if n.alive and getattr(n.peering, "holding", False)]

    def live(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.alive]


def spyker_ring(names: Sequence[str], config: SpykerPeerConfig | None = None, seed: int = 0, persistent: bool = False) -> Ring:
    cfg = config or SpykerPeerConfig(h_inter=3.0, h_intra=10.0, beacon_s=1.0, token_timeout_s=4.0, stagger_s=1.0, sync_timeout_s=3.0)

    def make(name: str) -> Peering:
        return SpykerPeering(name, names, cfg, strategy=SpykerStrategy())

    return Ring(names, make, seed=seed, persistent=persistent)


def settle(ring: Ring, seconds: float, step: float = 0.25) -> None:
    """Quiet network: every message delivered in order, time advancing in small steps."""
    for _ in range(math.ceil(seconds / step)):
        ring.tick(step)
        ring.deliver_all()
