"""NebulaFL's peering (paper 003): model rotation between coordinators. The planets, the
stellar model and the client-update rule are the strategy :mod:`coordinator.strategies.nebula`.

Theory of operation
-------------------
Each coordinator (a NebulaFL *data centre*) keeps ``K`` **planet** models with versions
``v_1..v_K``, one **stellar** model ``m_s`` with version ``v_s`` (what it last received
from another coordinator), and deploys the **master** model::

    master = Σ_k v_k m_k / Σ_k v_k                         (MasterGen, eq. 3)

:class:`NebulaStrategy` (strategy ``"nebula"``) folds every client update into the planet
with the lowest version (the paper's version-balancing selection, which gives a
low-version model the next training slot), then pulls it toward the stellar model::

    m_j ← (w m_trained + d_t m_s) / (w + d_t),   w = max(v_j − v_s, w_min = 5)   (eq. 2)
    v_j ← v_j + 1

where ``d_t`` decays linearly from 1 to 0.5 over ``t_c`` since the stellar model was last
replaced. Adaptation: in NebulaFL a container trains the planet itself; our devices pull
the deployed model (the master), so the planet receives the device's *progress*,
damped by its staleness τ (master versions since the device's base) as in FedAsync::

    m_trained = m_j + s(τ) (w_k − w_base),   s(τ) = (τ + 1)^(−a)

with ``w_base`` the master version the device started from (or, if no longer retained,
the current master). Without the damping, a burst of updates from the same stale base
piles up on one planet (a planet is not retrained between them as in NebulaFL) and
overshoots; replacing the planet by the device's model instead would make the master the
mean of the last K client models — noisy with non-IID clients.

:class:`NebulaPeering` rotates: in round ``r`` (every ``t_c`` seconds from the first
start), coordinator ``i`` of the ring sends its master and mean planet version to
coordinator ``(i + r) mod |C|``, which replaces its stellar model with it (``r ≡ 0``: its
own master). Rotation sends one model per coordinator per round and never waits.

Restart: planet *versions*, ``v_s`` and the rotation clock are checkpointed with every
version (the strategy's checkpoint adds when the stellar model arrived and the mean version
last sent). The planet and stellar *weights* (K + 1 model copies) are not in any commit's
metadata: the strategy hands them over as ``checkpoint_arrays`` for the registry to keep
beside the newest version only. Where none are kept for the restored version (a registry
without that support, a missing or damaged file) every planet and the stellar model restart
from the deployed master — a soft reset that keeps the version weighting — and the strategy
says so.

The paper's reward-guided container selection and cost-aware resource assignment
(eq. 4–9) are the strategy's ``selection`` / ``resources`` parameters (off by default: then
edge devices choose themselves when to train). The peering's part: it records the mean
planet version when it sends its master (eq. 4's v_avg, for the version offset v_os), and
hands the strategy's per-device resource choice to the core as a training hint
(:meth:`NebulaPeering.hints_for`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from coordinator.peering.base import (
    Peering,
    PeerPlan,
    PeerSend,
    body_count,
    body_int,
    check_ring,
    check_sender,
)
from coordinator.strategies.base import CoordinatorView, Strategy
from coordinator.strategies.nebula import NebulaStrategy
from edge_sdk.errors import ConfigError, MalformedMessage, other_protocol
from edge_sdk.wire.messages import PeerMsg

__all__ = ["NebulaPeerConfig", "NebulaPeering", "rotation_target"]


# --------------------------------------------------------------------------- maths


def rotation_target(index: int, round_: int, n: int) -> int:
    """In round r coordinator i sends its master to (i + r) mod |C|."""
    return (index + round_) % n


# --------------------------------------------------------------------------- rotation


@dataclass(frozen=True, slots=True, kw_only=True)
class NebulaPeerConfig:
    t_c: float = 60.0

    def __post_init__(self) -> None:
        if not self.t_c > 0:
            raise ConfigError("nebula: t_c must be > 0")


class NebulaPeering(Peering):
    """Rotation of masters around the ring every t_c. See the module docstring."""

    name: ClassVar[str] = "nebula"

    def __init__(self, coordinator_id: str, ring: Sequence[str], config: NebulaPeerConfig | None = None,
                 *, strategy: Strategy | None = None) -> None:
        self.me = coordinator_id
        self.ring = check_ring(coordinator_id, tuple(ring))
        self.index = self.ring.index(coordinator_id)
        self.config = config or NebulaPeerConfig()
        if not isinstance(strategy, NebulaStrategy):
            raise ConfigError("peering 'nebula' needs strategy 'nebula' (planets live in the strategy)")
        self.strategy = strategy
        self.state = strategy.state
        self.t0: float | None = None
        self.round = 0
        self.received = 0
        self.sent = 0
        self.ignored = 0
        self.rotations_from: dict[str, int] = {}
        """The newest rotation round accepted from each peer (an older or equal one is ignored)."""
        self._restored = False
        self.re_anchored = 0
        """Restarts whose clock was behind the checkpointed rotation clock (see :meth:`on_timer`)."""

    def wake_at(self) -> float | None:
        if self.t0 is None or self._restored:
            return -math.inf  # (restored: on_timer checks the rotation clock against the restart's clock first)
        return self.t0 + self.round * self.config.t_c

    def on_timer(self, view: CoordinatorView, now: float) -> PeerPlan:
        st = self.state
        t_c = self.config.t_c
        if self.t0 is None:
            self.t0 = now
        elif self._restored and self.t0 + self.round * t_c > now + t_c:
            # Restarted with a clock behind the last process's (stepped back; a box without a
            # battery-backed clock before NTP): the next rotation, due at most t_c after the last
            # one by that clock, was as far away as the clock went back. Due in t_c now; rounds
            # still only grow (peers refuse an older one).
            self.t0 = now + t_c - self.round * t_c
            self.re_anchored += 1
        self._restored = False
        st.ensure(view.weights)
        if now < self.t0 + self.round * t_c:
            return PeerPlan()
        self.round = max(self.round, int((now - self.t0) // t_c))  # rounds missed while down are skipped
        target = self.ring[rotation_target(self.index, self.round, len(self.ring))]
        self.round += 1
        master, mean_v = st.master(), st.mean_version()
        st.v_rotation_avg = mean_v
        if target == self.me:
            st.stellar, st.v_stellar, st.stellar_at = master, mean_v, now
            return PeerPlan()
        self.sent += 1
        body = {"round": self.round - 1, "version": mean_v}
        return PeerPlan(sends=(PeerSend(kind="rotate", to=target, body=body, weights=master),))

    def ignores(self, msg: PeerMsg, now: float) -> bool:
        """A rotation from a sender for a round at or below the newest taken from it (a replay)."""
        round_ = msg.body.get("round")
        if msg.kind != "rotate" or type(round_) is not int or not 0 <= round_ <= self.rotations_from.get(msg.sender, -1):
            return False
        self.ignored += 1
        return True

    def on_message(self, view: CoordinatorView, msg: PeerMsg, now: float) -> PeerPlan:
        if msg.kind != "rotate":
            raise other_protocol("nebula", msg.sender, msg.kind)
        if msg.weights is None:
            raise MalformedMessage("nebula: a rotation carries a master model")
        check_sender("nebula", self.me, self.ring, msg.sender)
        version = body_count(msg.body, "version", "nebula: a rotation's version must be")
        round_ = body_int(msg.body, "round")
        sender = self.ring.index(msg.sender)
        if self.ring[rotation_target(sender, round_, len(self.ring))] != self.me:
            raise MalformedMessage(f"nebula: in round {round_} {msg.sender} rotates to another coordinator")
        if round_ <= self.rotations_from.get(msg.sender, -1):
            self.ignored += 1  # a replay, or a redelivered rotation: the stellar model moved on since
            return PeerPlan(counted=True)
        self.rotations_from[msg.sender] = round_
        st = self.state
        st.ensure(view.weights)
        st.stellar = np.array(msg.weights, dtype=np.float32, copy=True)
        st.v_stellar, st.stellar_at = version, now
        self.received += 1
        return PeerPlan()

    def hints_for(self, device: str) -> Mapping[str, float]:
        return self.strategy.hints_for(device)

    def checkpoint(self) -> dict[str, Any]:
        st = self.state
        return {"t0": self.t0, "round": self.round, "versions": list(st.versions), "v_stellar": st.v_stellar,
                "rotations_from": dict(self.rotations_from)}

    def restore(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        t0 = state.get("t0")
        self.t0 = float(t0) if t0 is not None else None
        self._restored = self.t0 is not None
        self.round = int(state.get("round", 0))
        versions = [float(v) for v in state.get("versions", [])]
        if len(versions) == self.state.k:
            self.state.versions = versions
        self.state.v_stellar = float(state.get("v_stellar", 0.0))
        self.rotations_from = {str(p): int(r) for p, r in dict(state.get("rotations_from", {})).items() if p in self.ring}

    def expected_peers(self) -> tuple[tuple[str, ...], float | None]:
        """A peer's rotation reaches this coordinator about once every n − 1 rounds of ``t_c``:
        three times that without one is not normal."""
        peers = tuple(c for c in self.ring if c != self.me)
        return peers, 3.0 * max(1, len(peers)) * self.config.t_c

    def describe(self) -> dict[str, Any]:
        st = self.state
        return {"name": self.name, "ring": list(self.ring), "t_c": self.config.t_c, "round": self.round,
                "sent": self.sent, "received": self.received, "versions": list(st.versions), "v_stellar": st.v_stellar,
                # only once it happens: the status (and the emulator's message sizes) stay as they were
                **({"ignored": self.ignored} if self.ignored else {}), **({"re_anchored": self.re_anchored} if self.re_anchored else {})}
