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

**Push-pull for slow clients** (``request_update``, on by default as in PLATO's PORT
config). The SPIN paper: PORT's "related 'timeout' mechanism … not measured by time, but by
the training state of the stale clients … assists clients with extremely slow training
speeds in shortening their training time … and prevents overly stale model updates from
being aggregated." PLATO's rule (``servers/base.py: should_request_update``): when the
server aggregates, every selected client still training whose staleness (rounds since it
started) exceeds ``staleness_bound`` gets an *urgent update request* and answers at once
with its model as of its last completed local epoch. Here: after each aggregation, every
in-flight device whose base is more than ``staleness_bound`` versions old is put on the
request list once; a driver that can cut a device's training short drains it with
:meth:`PortStrategy.take_update_requests` (the fleet emulator does: the device sends the
epochs it has completed, at least one). Difference from PLATO: its server holds the
aggregation until the requested clients answer; ours lets their partial updates join the
next buffer (so a daemon whose devices cannot be interrupted never stalls on a request).
The MQTT protocol has no urgent-request message yet, so a real daemon ignores the list.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from coordinator.strategies.base import BufferedUpdate, CoordinatorView, Plan
from coordinator.strategies.fedbuff import FedBuffConfig, FedBuffStrategy
from coordinator.strategies.robust import RobustAggregator, UpdateStats
from coordinator.strategies.rounds import count, device_list
from edge_sdk.errors import ConfigError
from edge_sdk.spec import ModelSpec, Vector

__all__ = ["PortConfig", "PortStrategy", "port_raw_weight", "port_weights", "update_similarity"]


@dataclass(frozen=True, slots=True, kw_only=True)
class PortConfig(FedBuffConfig):
    similarity_weight: float = 1.0
    staleness_weight: float = 1.0
    staleness_bound: float = 10.0
    request_update: bool = True
    """Push-pull: ask in-flight devices more than ``staleness_bound`` versions behind for
    the work they have done so far (see the module docstring)."""

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
    with np.errstate(over="ignore", invalid="ignore"):  # a non-finite norm is neutral below (and BLAS's spurious flags)
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
        self.started_version: dict[str, int] = {}
        """In-flight devices: the global version they were let in at (their base)."""
        self.requested: set[str] = set()
        self._requests: list[str] = []
        self.update_requests = 0

    # ------------------------------------------------------------------ push-pull

    def serve_pull(self, view: CoordinatorView, device: str, now: float) -> bool:
        served = super().serve_pull(view, device, now)
        if served:
            self.started_version.setdefault(device, view.version)
        return served

    def plan(self, view: CoordinatorView, now: float, rng: random.Random) -> Plan:
        plan = super().plan(view, now, rng)
        for device in plan.invite:
            self.started_version[device] = view.version
        return plan

    def on_update(self, view: CoordinatorView, update: BufferedUpdate, now: float) -> None:
        super().on_update(view, update, now)
        self.started_version.pop(update.device, None)
        self.requested.discard(update.device)

    def on_restore(self, view: CoordinatorView, update: BufferedUpdate) -> None:
        super().on_restore(view, update)
        self.started_version.pop(update.device, None)
        self.requested.discard(update.device)

    def round_checkpoint(self) -> dict[str, Any]:
        """FedBuff's round, and the versions the devices in flight started from (their base: which
        of them to ask for their work), those asked and not yet answered, and the requests counted."""
        return {**super().round_checkpoint(), "started": [[d, v] for d, v in self.started_version.items()],
                "requested": sorted(self.requested),
                "pending_requests": list(self._requests), "update_requests": self.update_requests}

    def restore_round(self, state: Mapping[str, Any]) -> None:
        super().restore_round(state)
        if "started" not in state:
            return
        started = state.get("started")
        ok = isinstance(started, list) and all(isinstance(r, list) and len(r) == 2 and isinstance(r[0], str) and count(r[1]) is not None
                                                  for r in started)
        requested, pending, asked = device_list(state.get("requested")), device_list(state.get("pending_requests")), count(state.get("update_requests"))
        if not ok or requested is None or pending is None or asked is None:
            self.restore_refused += 1
            return
        assert isinstance(started, list)
        self.started_version = {str(d): int(v) for d, v in started}
        self.requested, self._requests, self.update_requests = set(requested), pending, asked

    def on_aggregated(self, view: CoordinatorView, now: float) -> None:
        super().on_aggregated(view, now)
        # Only devices in flight are kept: one FedBuff forgot (it came back later and was taken for
        # the old version's straggler) and a request no driver takes (a daemon: the protocol has
        # no message for it) used to stay for the process's life.
        if len(self.started_version) > len(self.in_flight):
            self.started_version = {d: v for d, v in self.started_version.items() if d in self.in_flight}
        if self.requested:
            self.requested.intersection_update(self.in_flight)
        if self._requests:
            self._requests = [d for d in self._requests if d in self.in_flight]
        if not self.config.request_update:
            return
        bound = self.config.staleness_bound
        for device in self.in_flight:  # insertion order: deterministic
            started = self.started_version.get(device, view.version)
            if device not in self.requested and view.version - started > bound:
                self.requested.add(device)
                self._requests.append(device)
                self.update_requests += 1

    def take_update_requests(self) -> tuple[str, ...]:
        """Devices to ask for their work so far (each once per local update); drained."""
        out, self._requests = tuple(self._requests), []
        return out

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
            "request_update": c.request_update,
            "update_requests": self.update_requests,
        }
