"""NebulaFL (paper 003): planet / stellar / master models with version weighting, and model
rotation between coordinators.

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
version; the planet *weights* are not (K model copies per commit would multiply the
registry's size), so after a restart every planet and the stellar model restart from the
deployed master — a soft reset that keeps the version weighting.

The paper's reward-guided container selection and cost-aware resource assignment
(eq. 4–9) schedule cloud containers; edge devices here choose themselves when to train,
so they are not part of this adaptation.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from coordinator.peering.base import Peering, PeerPlan, PeerSend, body_float, check_ring
from coordinator.strategies.base import BufferedUpdate, CoordinatorView, Plan, Strategy
from edge_sdk.errors import ConfigError, MalformedMessage
from edge_sdk.spec import Vector
from edge_sdk.wire.messages import PeerMsg

__all__ = [
    "NebulaConfig",
    "NebulaPeerConfig",
    "NebulaPeering",
    "NebulaState",
    "NebulaStrategy",
    "decay_weight",
    "master_model",
    "planet_update",
    "rotation_target",
]


# --------------------------------------------------------------------------- maths


def master_model(planets: Sequence[Vector], versions: Sequence[float]) -> Vector:
    """MasterGen: Σ v_k m_k / Σ v_k (the plain mean while every version is 0)."""
    v = np.asarray(versions, dtype=np.float64)
    if v.sum() <= 0:
        v = np.ones_like(v)
    acc = np.zeros(np.asarray(planets[0]).shape, dtype=np.float64)
    for m, vk in zip(planets, v, strict=True):
        acc += float(vk) * np.asarray(m, dtype=np.float64)
    out: Vector = (acc / float(v.sum())).astype(np.float32)
    return out


def planet_update(trained: Vector, stellar: Vector, v_planet: float, v_stellar: float, d_t: float, w_min: float = 5.0) -> Vector:
    """PlanetUpdate: (w m + d_t m_s) / (w + d_t) with w = max(v_j − v_s, w_min)."""
    w = max(v_planet - v_stellar, w_min)
    out = (w * np.asarray(trained, dtype=np.float64) + d_t * np.asarray(stellar, dtype=np.float64)) / (w + d_t)
    return out.astype(np.float32)


def decay_weight(since_rotation_s: float, t_c: float, lo: float = 0.5) -> float:
    """d_t: 1 right after the stellar model was replaced, down to ``lo`` after t_c."""
    frac = min(max(since_rotation_s / t_c, 0.0), 1.0)
    return 1.0 - (1.0 - lo) * frac


def rotation_target(index: int, round_: int, n: int) -> int:
    """In round r coordinator i sends its master to (i + r) mod |C|."""
    return (index + round_) % n


# --------------------------------------------------------------------------- shared state


class NebulaState:
    """Planets, their versions and the stellar model (shared by strategy and peering)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.planets: list[Vector] | None = None
        self.versions: list[float] = [0.0] * k
        self.stellar: Vector | None = None
        self.v_stellar = 0.0
        self.stellar_at: float | None = None

    def ensure(self, master: Vector) -> None:
        """Seed planets and the stellar model from the deployed master (start, restart)."""
        if self.planets is None:
            self.planets = [np.array(master, dtype=np.float32, copy=True) for _ in range(self.k)]
        if self.stellar is None:
            self.stellar = np.array(master, dtype=np.float32, copy=True)

    def master(self) -> Vector:
        assert self.planets is not None
        return master_model(self.planets, self.versions)

    def mean_version(self) -> float:
        return float(sum(self.versions) / self.k)


# --------------------------------------------------------------------------- client updates


@dataclass(frozen=True, slots=True, kw_only=True)
class NebulaConfig:
    planets: int = 4
    """K: planet models per coordinator."""
    t_c: float = 60.0
    """Rotation interval (for d_t's decay; the peering uses its own t_c, normally the same)."""
    w_min: float = 5.0
    d_min: float = 0.5
    a: float = 0.5
    """Staleness exponent for a device's progress (our adaptation; 0 = undamped)."""

    def __post_init__(self) -> None:
        if not (self.a >= 0 and math.isfinite(self.a)):
            raise ConfigError("nebula: a must be a finite number >= 0")
        if self.planets < 1:
            raise ConfigError("nebula: planets must be >= 1")
        if not self.t_c > 0:
            raise ConfigError("nebula: t_c must be > 0")
        if not (self.w_min > 0 and 0 < self.d_min <= 1):
            raise ConfigError("nebula: need w_min > 0 and 0 < d_min <= 1")


class NebulaStrategy(Strategy):
    """Version-weighted planets folded into the deployed master. See the module docstring."""

    name: ClassVar[str] = "nebula"

    def __init__(self, config: NebulaConfig | None = None) -> None:
        self.config = config or NebulaConfig()
        self.state = NebulaState(self.config.planets)

    def plan(self, view: CoordinatorView, now: float, rng: random.Random) -> Plan:
        return Plan(aggregate=bool(view.buffer))

    def aggregate(self, view: CoordinatorView, updates: Sequence[BufferedUpdate]) -> Vector:
        st, cfg = self.state, self.config
        st.ensure(view.weights)
        assert st.planets is not None and st.stellar is not None
        for u in updates:
            j = min(range(st.k), key=lambda i: (st.versions[i], i))
            base = view.weights_at(u.base_version)
            sl = view.spec.group_slice(u.group)
            reference = (base if base is not None else view.weights)[sl]
            trained = np.array(st.planets[j], dtype=np.float32, copy=True)
            damp = np.float32((max(view.version - u.base_version, 0) + 1.0) ** (-cfg.a))
            trained[sl] += damp * (u.weights - reference)  # the device's progress, applied to the planet
            since = u.arrived_at - st.stellar_at if st.stellar_at is not None else cfg.t_c
            d_t = decay_weight(since, cfg.t_c, cfg.d_min)
            st.planets[j] = planet_update(trained, st.stellar, st.versions[j], st.v_stellar, d_t, cfg.w_min)
            st.versions[j] += 1.0
        return st.master()

    def describe(self) -> dict[str, Any]:
        st = self.state
        return {"name": self.name, "planets": st.k, "t_c": self.config.t_c, "versions": list(st.versions),
                "v_stellar": st.v_stellar}


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

    def wake_at(self) -> float | None:
        if self.t0 is None:
            return -math.inf
        return self.t0 + self.round * self.config.t_c

    def on_timer(self, view: CoordinatorView, now: float) -> PeerPlan:
        st = self.state
        if self.t0 is None:
            self.t0 = now
        st.ensure(view.weights)
        t_c = self.config.t_c
        if now < self.t0 + self.round * t_c:
            return PeerPlan()
        self.round = max(self.round, int((now - self.t0) // t_c))  # rounds missed while down are skipped
        target = self.ring[rotation_target(self.index, self.round, len(self.ring))]
        self.round += 1
        master, mean_v = st.master(), st.mean_version()
        if target == self.me:
            st.stellar, st.v_stellar, st.stellar_at = master, mean_v, now
            return PeerPlan()
        self.sent += 1
        body = {"round": self.round - 1, "version": mean_v}
        return PeerPlan(sends=(PeerSend(kind="rotate", to=target, body=body, weights=master),))

    def on_message(self, view: CoordinatorView, msg: PeerMsg, now: float) -> PeerPlan:
        if msg.kind != "rotate":
            raise MalformedMessage(f"nebula: unknown peer message kind {msg.kind!r}")
        if msg.weights is None:
            raise MalformedMessage("nebula: a rotation carries a master model")
        version = body_float(msg.body, "version")
        if version < 0:
            raise MalformedMessage("nebula: negative version")
        st = self.state
        st.ensure(view.weights)
        st.stellar = np.array(msg.weights, dtype=np.float32, copy=True)
        st.v_stellar, st.stellar_at = version, now
        self.received += 1
        return PeerPlan()

    def checkpoint(self) -> dict[str, Any]:
        st = self.state
        return {"t0": self.t0, "round": self.round, "versions": list(st.versions), "v_stellar": st.v_stellar}

    def restore(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        t0 = state.get("t0")
        self.t0 = float(t0) if t0 is not None else None
        self.round = int(state.get("round", 0))
        versions = [float(v) for v in state.get("versions", [])]
        if len(versions) == self.state.k:
            self.state.versions = versions
        self.state.v_stellar = float(state.get("v_stellar", 0.0))

    def describe(self) -> dict[str, Any]:
        st = self.state
        return {"name": self.name, "ring": list(self.ring), "t_c": self.config.t_c, "round": self.round,
                "sent": self.sent, "received": self.received, "versions": list(st.versions), "v_stellar": st.v_stellar}
