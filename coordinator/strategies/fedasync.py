"""FedAsync (Xie, Koyejo & Gupta, 2019): every update is mixed in on arrival.

Every pull is served at once (as in SPIN); every accepted update immediately makes a new
version::

    w ← (1 − α_τ) w + α_τ w_k,   α_τ = α · s(τ),   s(τ) = (τ + 1)^(−a)

(s is the staleness policy, ``damped`` by default; ``none`` mixes at α, ``drop-beyond``
skips updates staler than ``max_staleness``.)

where τ = current version − the update's base version (its staleness). The paper's
polynomial staleness function with a = 0.5 is the default; α = 0.6 is one of its settings.
If several updates are buffered at once (after a restart), they are mixed in one after
the other in arrival order, each one's τ counted against the version it is mixed into.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from coordinator.strategies.aggregate import mix
from coordinator.strategies.base import BufferedUpdate, CoordinatorView, Plan, Strategy
from coordinator.strategies.staleness import Damped, StalenessPolicy, make_policy, staleness_factor
from edge_sdk.errors import ConfigError
from edge_sdk.spec import ModelSpec, Vector

__all__ = ["FedAsyncConfig", "FedAsyncStrategy", "fedasync_mix", "mixing_weight"]


@dataclass(frozen=True, slots=True, kw_only=True)
class FedAsyncConfig:
    alpha: float = 0.6
    """Base mixing weight α ∈ (0, 1]."""
    a: float = 0.5
    """Exponent of the staleness function s(τ) = (τ + 1)^(−a); 0 ignores staleness."""
    staleness: str = "damped"
    """Staleness policy (coordinator.strategies.staleness): none | damped | drop-beyond."""
    max_staleness: int | None = None
    """Skip updates staler than this many versions (any policy); None = keep all."""

    def __post_init__(self) -> None:
        make_policy(self.staleness, a=self.a, bound=self.max_staleness)  # validates
        if not 0 < self.alpha <= 1:
            raise ConfigError("alpha must be in (0, 1]")
        if not (self.a >= 0 and np.isfinite(self.a)):
            raise ConfigError("a must be a finite number >= 0")


def mixing_weight(staleness: int, alpha: float, a: float, policy: StalenessPolicy | None = None) -> float | None:
    """α · s(τ) (default s(τ) = (τ + 1)^(−a)); None when the policy drops the update."""
    factor = staleness_factor(policy if policy is not None else Damped(a), staleness)
    return None if factor is None else alpha * factor


def fedasync_mix(
    current: Vector,
    current_version: int,
    updates: Sequence[BufferedUpdate],
    spec: ModelSpec,
    *,
    alpha: float,
    a: float,
    policy: StalenessPolicy | None = None,
) -> Vector:
    """Mix ``updates`` into ``current`` one by one; the i-th is mixed into version
    ``current_version + i``, so its staleness is that minus its base version."""
    out = current
    applied = 0
    for u in updates:
        tau = current_version + applied - u.base_version
        weight = mixing_weight(tau, alpha, a, policy)
        if weight is not None:
            out = mix(out, u, weight, spec)
            applied += 1
    return np.array(out, dtype=np.float32, copy=True) if out is current else out


class FedAsyncStrategy(Strategy):
    """Aggregate every update as soon as it is buffered. See the module docstring."""

    name: ClassVar[str] = "fedasync"

    def __init__(self, config: FedAsyncConfig | None = None) -> None:
        self.config = config or FedAsyncConfig()

    def plan(self, view: CoordinatorView, now: float, rng: random.Random) -> Plan:
        return Plan(aggregate=bool(view.buffer))

    def aggregate(self, view: CoordinatorView, updates: Sequence[BufferedUpdate]) -> Vector:
        c = self.config
        policy = make_policy(c.staleness, a=c.a, bound=c.max_staleness)
        return fedasync_mix(view.weights, view.version, updates, view.spec, alpha=c.alpha, a=c.a, policy=policy)

    def describe(self) -> dict[str, Any]:
        c = self.config
        return {"name": self.name, "alpha": c.alpha, "a": c.a, "staleness": c.staleness, "max_staleness": c.max_staleness}
