"""NebulaFL's client-update strategy (paper 003): planet / stellar / master models.

Each coordinator (a NebulaFL *data centre*) keeps ``K`` **planet** models with versions
``v_1..v_K``, one **stellar** model ``m_s`` with version ``v_s`` (what it last received
from another coordinator), and deploys the **master** model::

    master = Σ_k v_k m_k / Σ_k v_k                         (MasterGen, eq. 3)

:class:`NebulaStrategy` folds every client update into the planet with the lowest version
(the paper's version-balancing selection), then pulls it toward the stellar model::

    m_j ← (w m_trained + d_t m_s) / (w + d_t),   w = max(v_j − v_s, w_min = 5)   (eq. 2)
    v_j ← v_j + 1

where ``d_t`` decays linearly from 1 to 0.5 over ``t_c`` since the stellar model was last
replaced. Adaptation: our devices pull the deployed model (the master), so the planet
receives the device's *progress*, discounted by the staleness policy (default ``damped``,
s(τ) = (τ + 1)^(−a), τ = master versions since the device's base) as in FedAsync::

    m_trained = m_j + s(τ) (w_k − w_base)

The planets live in a :class:`NebulaState` that :class:`coordinator.peering.nebula.NebulaPeering`
(rotation of masters between coordinators) shares; :func:`coordinator.methods.make_method`
wires the two. See the peering module for the rotation and restart rules.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from coordinator.strategies.base import BufferedUpdate, CoordinatorView, Plan, Strategy
from coordinator.strategies.staleness import make_policy, staleness_factor
from edge_sdk.errors import ConfigError
from edge_sdk.spec import Vector

__all__ = ["NebulaConfig", "NebulaState", "NebulaStrategy", "decay_weight", "master_model", "planet_update"]


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
    staleness: str = "damped"
    """Staleness policy on a device's progress: none | damped | drop-beyond."""
    max_staleness: int | None = None
    """Drop updates staler than this many versions (any policy); None = keep all."""

    def __post_init__(self) -> None:
        make_policy(self.staleness, a=self.a, bound=self.max_staleness)  # validates
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
        policy = make_policy(cfg.staleness, a=cfg.a, bound=cfg.max_staleness)
        for u in updates:
            factor = staleness_factor(policy, max(view.version - u.base_version, 0))
            if factor is None:
                continue
            j = min(range(st.k), key=lambda i: (st.versions[i], i))
            base = view.weights_at(u.base_version)
            sl = view.spec.group_slice(u.group)
            reference = (base if base is not None else view.weights)[sl]
            trained = np.array(st.planets[j], dtype=np.float32, copy=True)
            damp = np.float32(factor)
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

