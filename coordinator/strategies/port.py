"""PORT (Su & Li, "How asynchronous can federated learning be?", IWQoS 2022), as a baseline.

What the SPIN paper (000, §V-B6) says about it: "FedBuff and PORT randomly select 20
clients to join the training in each round, and use the same minimum number of clients
K = 10 before aggregation … PORT has a different aggregation algorithm, that is, it will
give higher weights to model updates that are similar to the current global model when
aggregating." So PORT here is :class:`~coordinator.strategies.fedbuff.FedBuffStrategy`'s
server-side selection and K-buffer with a staleness- and similarity-aware weighting.

The weighting we use (the form of the PLATO framework's PORT server, in which the SPIN
paper ran its baselines). For buffered update k with sample count n_k, staleness τ_k and
base version b_k, with w the current global model and w_{b_k} the global model it
started from::

    cos_k = cos(w_k − w_{b_k},  w − w_{b_k})        (1 when τ_k = 0 or w_{b_k} is gone)
    r_k   = n_k / Σ n · ( λ_sim · (1 + cos_k) / 2  +  λ_stale · β / (τ_k + β) )
    p_k   = r_k / Σ r                               (uniform if Σ r = 0)
    w'    = Σ p_k w_k

``cos_k`` compares the direction the device moved with the direction the global model
moved since the device's base: an update that agrees with the progress made meanwhile
is "similar to the current model" and weighs more; β/(τ+β) (β = ``staleness_bound``,
default 10) discounts stale updates smoothly. λ_sim = λ_stale = 1 by default. The
global model at the update's base comes from the coordinator's version history
(``CoordinatorConfig.keep_versions``); older than that, the similarity term is neutral.

Not modelled: PORT's server-initiated early push of very slow clients' partial work
(the SPIN paper notes it matters little when few clients are extremely slow).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from coordinator.strategies.base import BufferedUpdate, CoordinatorView
from coordinator.strategies.fedbuff import FedBuffConfig, FedBuffStrategy
from coordinator.strategies.robust import RobustAggregator, UpdateStats
from edge_sdk.errors import ConfigError
from edge_sdk.spec import ModelSpec, Vector

__all__ = ["PortConfig", "PortStrategy", "port_raw_weight", "port_weights", "update_similarity"]


@dataclass(frozen=True, slots=True, kw_only=True)
class PortConfig(FedBuffConfig):
    similarity_weight: float = 1.0
    staleness_weight: float = 1.0
    staleness_bound: float = 10.0

    def __post_init__(self) -> None:
        FedBuffConfig.__post_init__(self)
        if self.similarity_weight < 0 or self.staleness_weight < 0:
            raise ConfigError("similarity_weight and staleness_weight must be >= 0")
        if not self.staleness_bound > 0:
            raise ConfigError("staleness_bound must be > 0")


def update_similarity(update: Vector, base: Vector | None, current: Vector) -> float:
    """cos(update − base, current − base) in [−1, 1]; 1 (neutral-high) without a base or
    when either direction is zero (a fresh update: the model has not moved since)."""
    if base is None:
        return 1.0
    moved = np.asarray(update, np.float64) - base
    progress = np.asarray(current, np.float64) - base
    norm = float(np.linalg.norm(moved) * np.linalg.norm(progress))
    if norm == 0.0 or not np.isfinite(norm):
        return 1.0
    return float(np.clip(np.dot(moved, progress) / norm, -1.0, 1.0))


def port_weights(
    current: Vector,
    current_version: int,
    updates: Sequence[BufferedUpdate],
    bases: Sequence[Vector | None],
    spec: ModelSpec,
    *,
    similarity_weight: float = 1.0,
    staleness_weight: float = 1.0,
    staleness_bound: float = 10.0,
) -> list[float]:
    """Normalised PORT weights p_k (see the module docstring); ``bases[k]`` is the global
    vector at update k's base version, or None if no longer retained."""
    total_n = float(sum(u.n_samples for u in updates))
    raw: list[float] = []
    for u, base in zip(updates, bases, strict=True):
        tau = max(current_version - u.base_version, 0)
        sl = spec.group_slice(u.group)
        cos = 1.0 if tau == 0 else update_similarity(u.weights, None if base is None else base[sl], current[sl])
        share = u.n_samples / total_n if total_n > 0 else 1.0 / len(updates)
        raw.append(share * (similarity_weight * (1.0 + cos) / 2.0 + staleness_weight * staleness_bound / (tau + staleness_bound)))
    total = sum(raw)
    if total <= 0:
        return [1.0 / len(updates)] * len(updates)
    return [r / total for r in raw]


def port_raw_weight(stats: UpdateStats, config: PortConfig) -> float:
    """r_k / share_k·Σn from an update's fold-time stats (``port_weights`` normalises the same
    terms; the Σn factor cancels in the normalisation, so p_k ∝ n_k·(…) is foldable)."""
    cos = 1.0
    norm = math.sqrt(stats.dd) * math.sqrt(stats.gg)
    if stats.staleness > 0 and stats.has_base and norm > 0.0 and math.isfinite(norm):
        cos = min(1.0, max(-1.0, stats.dg / norm))
    tau, beta = stats.staleness, config.staleness_bound
    return stats.n_weight * (config.similarity_weight * (1.0 + cos) / 2.0 + config.staleness_weight * beta / (tau + beta))


class PortStrategy(FedBuffStrategy):
    """FedBuff's selection and K-buffer with PORT's weighting, folded on arrival (the weight
    of an update depends only on it, its base and the current model, all known then)."""

    name: ClassVar[str] = "port"
    config: PortConfig

    def __init__(self, config: PortConfig | None = None) -> None:
        super().__init__(config or PortConfig())

    def _make_robust(self) -> RobustAggregator:
        c = self.config
        return RobustAggregator(
            c, expected=max(c.k, c.select), weigher=lambda stats: port_raw_weight(stats, c), wants_similarity=True
        )

    def aggregate(self, view: CoordinatorView, updates: Sequence[BufferedUpdate]) -> Vector:
        return self.robust.combine(view, updates)

    def describe(self) -> dict[str, Any]:
        c = self.config
        return {
            **super().describe(),
            "similarity_weight": c.similarity_weight,
            "staleness_weight": c.staleness_weight,
            "staleness_bound": c.staleness_bound,
        }
