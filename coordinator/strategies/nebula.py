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

Device selection and resources (§III-B.3, eq. 4–9; ``selection`` / ``resources``)
-------------------------------------------------------------------------------
``selection = "none"`` (the default, the behaviour before issue 16) serves every pull: each
device trains when it wants and its update goes to the lowest-version planet. With
``"reward"`` or ``"uniform"`` the coordinator plays NebulaFL's container manager, mapped on
the defer/invite path FedBuff uses (:mod:`coordinator.strategies.fedbuff`): every pull is
deferred, and each planet is trained by **one device at a time** (Algorithm 1's per-planet
loop, so ``planets`` = the paper's active containers per data centre). When planet ``p`` is
free, a waiting device is drawn for it and invited; its update is folded into planet ``p``
(not the lowest-version one). ``"uniform"`` draws uniformly (the ablation "w RC");
``"reward"`` draws with eq. 7::

    Δv_p = v_p − v_i − v_os,   v_os = v_avg(at the last rotation sent) − v_s     (eq. 4)
    R_p(ct) = PSc/max PSc · Δv_p                      if Δv_p > 0               (eq. 5)
            = (1 − (min PSc − PSc)/max PSc) · Δv_p    otherwise
    R_c(ct) = 1 / sqrt(Cnt(ct) + 1)                                              (eq. 6)
    P(ct)   = (R_p + R_c) / Σ (R_p + R_c)                                        (eq. 7)

Eq. 4 as printed subtracts v_os, so a centre whose planets are ahead of the model it last
received (v_os > 0) sees its planets as *behind* and, with ``resources = "cost"``, gives them
the fast resources, which puts it further ahead (a feedback loop: measured, one centre ran
half its jobs on the A100 while another ran 4 %). ``offset_sign = +1`` adds v_os instead
(the planet's lead over the other centres); the default keeps the printed sign.

Adaptations, each forced by something eq. 4–7 leave open: PSc(ct) (the performance score,
"historical training time") is the mean time from invite to update of the device, divided
by the speed factor of the resource it ran on (so scores on different resources compare);
a device never selected gets the mean score of those seen (1 before any). Cnt + 1 in eq. 6
keeps a never-selected device finite (the paper's 1/sqrt(Cnt) is infinite at 0). Eq. 7 is a
probability only while every R_p + R_c > 0; with Δv_p < 0, R_p is negative and can outweigh
R_c, so the scores are then shifted so that the lowest equals the lowest curiosity among
the candidates (every device keeps a chance; their order is kept).

``resources = "cost"`` is the resource manager (eq. 8–9) over a catalogue given as
``resource_speeds`` (× a reference resource) and ``resource_prices`` (per compute second,
this coordinator's region)::

    F_cost(r)  = (Pr(r) − mean Pr) / max Pr                                       (eq. 8)
    F_time(r)  = (RTime(r) − mean RTime) / max RTime · (−Δv_p)                    (eq. 9, sign flipped)
    r*         = argmin F_cost + F_time

with RTime(r, ct) = the device's mean observed time on r, else PSc(ct) / speed(r). The sign:
eq. 9 as printed multiplies by Δv_p, and minimised that gives a *low*-version planet
(Δv_p < 0) the *slow* resource — the opposite of the paper's stated rule ("assign
high-performance resources to … the planet model with a lower version", §III-B.3), which
the flipped sign implements. The choice reaches the device as the training hint
``resource`` (an index into the catalogue) with its model (:meth:`NebulaStrategy.hints_for`,
sent by the peering's ``hints_for``); a device runtime that has one resource ignores it, the
emulator (:mod:`devices.simulator`, ``[multiregion.cost]``) scales the training time by its
speed and charges its price. ``resources = "fixed"`` sends no hint (the device runs on its
default resource: the ablation "w RR" without randomness). An invited device that never
reports keeps its planet busy until ``forget_after_s`` (as FedBuff's): then its planet is
drawn for again, and an update it still sends is buffered as an uninvited one (into the
lowest-version planet). Off by default (the emulator loses no device); a daemon sets 600 s
unless told otherwise (``coordinator.daemon.DAEMON_FORGET_AFTER_S``).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from coordinator.strategies.base import BufferedUpdate, CoordinatorView, Plan, Strategy
from coordinator.strategies.staleness import make_policy, staleness_factor
from edge_sdk.errors import ConfigError
from edge_sdk.spec import Vector

__all__ = ["NebulaConfig", "NebulaState", "NebulaStrategy", "choose_resource", "cost_factor", "curiosity", "decay_weight",
           "master_model", "performance_reward", "performance_rewards", "planet_update", "selection_probabilities", "time_factor", "version_gap"]


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


def version_gap(v_planet: float, v_mean: float, v_offset: float) -> float:
    """Δv_p = v_p − v_i − v_os (eq. 4)."""
    return v_planet - v_mean - v_offset


def performance_reward(score: float, scores: Sequence[float], gap: float) -> float:
    """R_p (eq. 5): a slower device (higher score) for a planet ahead (Δv_p > 0), a faster one
    for a planet behind."""
    top = max(scores)
    if top <= 0:
        return gap
    if gap > 0:
        return score / top * gap
    return (1.0 - (min(scores) - score) / top) * gap


def performance_rewards(scores: Sequence[float], gap: float) -> list[float]:
    """:func:`performance_reward` of every score in ``scores`` (the same floats), their max and min
    taken once: per score they made a selection O(candidates²) (helper-150: 8,000 waiting devices,
    6.7 s a plan)."""
    if not scores:
        return []
    top = max(scores)
    if top <= 0:
        return [gap for _ in scores]
    if gap > 0:
        return [score / top * gap for score in scores]
    low = min(scores)
    return [(1.0 - (low - score) / top) * gap for score in scores]


def curiosity(count: int) -> float:
    """R_c = 1 / sqrt(Cnt + 1) (eq. 6, finite for a device never selected)."""
    return 1.0 / math.sqrt(count + 1)


def selection_probabilities(rewards: Sequence[float], curiosities: Sequence[float]) -> list[float]:
    """P(ct) ∝ R_p + R_c (eq. 7); if some total is <= 0, all are shifted so that the lowest
    equals the lowest curiosity (see the module docstring)."""
    totals = [r + c for r, c in zip(rewards, curiosities, strict=True)]
    low = min(totals)
    if low <= 0:
        shift = min(curiosities) - low
        totals = [t + shift for t in totals]
    norm = sum(totals)
    return [t / norm for t in totals]


def _centred(xs: Sequence[float]) -> list[float]:
    """(x − mean x) / max x per entry (0 where max x <= 0): eq. 8 and eq. 9's common form."""
    mean, top = sum(xs) / len(xs), max(xs)
    return [(x - mean) / top if top > 0 else 0.0 for x in xs]


def cost_factor(prices: Sequence[float]) -> list[float]:
    """F_cost per resource (eq. 8): (Pr − mean Pr) / max Pr."""
    return _centred(prices)


def time_factor(times: Sequence[float], gap: float) -> list[float]:
    """F_time per resource (eq. 9 with −Δv_p: a planet behind prefers the fast resource)."""
    return [f * -gap for f in _centred(times)]


def choose_resource(prices: Sequence[float], times: Sequence[float], gap: float) -> int:
    """argmin F_cost + F_time (ties: the lower index)."""
    total = [c + t for c, t in zip(cost_factor(prices), time_factor(times, gap), strict=True)]
    return min(range(len(total)), key=lambda r: (total[r], r))


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
        self.v_rotation_avg: float | None = None
        """Mean planet version when this coordinator last sent its master (eq. 4's v_avg)."""

    def ensure(self, master: Vector) -> None:
        """Seed planets and the stellar model from the deployed master (start, restart)."""
        if self.planets is None or self.planets[0].shape != np.shape(master):  # (restored for another model: afresh)
            self.planets = [np.array(master, dtype=np.float32, copy=True) for _ in range(self.k)]
        if self.stellar is None or self.stellar.shape != np.shape(master):
            self.stellar = np.array(master, dtype=np.float32, copy=True)

    def master(self) -> Vector:
        assert self.planets is not None
        return master_model(self.planets, self.versions)

    def mean_version(self) -> float:
        return float(sum(self.versions) / self.k)

    def version_offset(self) -> float:
        """v_os = v_avg − v_s (eq. 4); 0 until a rotation was sent and a stellar model received."""
        if self.v_rotation_avg is None or self.stellar_at is None:
            return 0.0
        return self.v_rotation_avg - self.v_stellar



# --------------------------------------------------------------------------- client updates

SELECTIONS = ("none", "uniform", "reward")


MAX_PLANETS = 1024


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
    selection: str = "none"
    """none (every device trains when it wants) | uniform | reward (eq. 4–7): one invited device per planet."""
    resources: str = "fixed"
    """fixed (no hint: the device's own resource) | cost (eq. 8–9 over the catalogue below)."""
    resource_speeds: tuple[float, ...] = ()
    """Speed of each resource, × the reference one (the catalogue for ``resources = "cost"``)."""
    resource_prices: tuple[float, ...] = ()
    """Price of each resource per compute second in this coordinator's region."""
    forget_after_s: float | None = None
    """With selection on: stop waiting for an invited device after this long and free its
    planet (None = wait for ever, as the emulator's runs do)."""
    offset_sign: int = -1
    """Eq. 4's sign on v_os: −1 as printed (Δv_p = v_p − v_i − v_os); +1 counts a centre ahead of
    the others as ahead (v_p − v_i + v_os: the planet's lead over the other centres); 0 ignores v_os."""

    def __post_init__(self) -> None:
        if self.selection not in SELECTIONS:
            raise ConfigError(f"nebula: selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}")
        if self.forget_after_s is not None and not (isinstance(self.forget_after_s, int | float)
                                                    and math.isfinite(self.forget_after_s) and self.forget_after_s > 0):
            raise ConfigError("nebula: forget_after_s must be a finite number > 0 (or None)")
        if self.offset_sign not in (-1, 0, 1):
            raise ConfigError(f"nebula: offset_sign must be -1, 0 or 1, got {self.offset_sign!r}")
        if self.resources not in ("fixed", "cost"):
            raise ConfigError(f"nebula: resources must be 'fixed' or 'cost', got {self.resources!r}")
        speeds, prices = tuple(self.resource_speeds), tuple(self.resource_prices)
        if len(speeds) != len(prices):
            raise ConfigError("nebula: resource_speeds and resource_prices need one entry per resource")
        if not all(isinstance(x, int | float) and math.isfinite(x) for x in (*speeds, *prices)):
            raise ConfigError("nebula: resource speeds and prices must be finite numbers")
        if any(x <= 0 for x in speeds) or any(x < 0 for x in prices):
            raise ConfigError("nebula: resource speeds must be > 0 and prices >= 0")
        if self.resources == "cost" and (not speeds or self.selection == "none"):
            raise ConfigError("nebula: resources = 'cost' needs selection 'reward' or 'uniform' and a resource catalogue "
                              "(resource_speeds, resource_prices)")
        object.__setattr__(self, "resource_speeds", tuple(float(x) for x in speeds))
        object.__setattr__(self, "resource_prices", tuple(float(x) for x in prices))
        make_policy(self.staleness, a=self.a, bound=self.max_staleness)  # validates
        if not (self.a >= 0 and math.isfinite(self.a)):
            raise ConfigError("nebula: a must be a finite number >= 0")
        if not 1 <= self.planets <= MAX_PLANETS:
            raise ConfigError(f"nebula: planets must be 1-{MAX_PLANETS} (each is a model copy)")
        if not self.t_c > 0:
            raise ConfigError("nebula: t_c must be > 0")
        if not (self.w_min > 0 and 0 < self.d_min <= 1):
            raise ConfigError("nebula: need w_min > 0 and 0 < d_min <= 1")


class NebulaStrategy(Strategy):
    """Version-weighted planets folded into the deployed master; with ``selection`` on, one
    invited device per planet and (``resources = "cost"``) a resource per invitation. See the
    module docstring."""

    name: ClassVar[str] = "nebula"

    def __init__(self, config: NebulaConfig | None = None) -> None:
        self.config = config or NebulaConfig()
        self.state = NebulaState(self.config.planets)
        self.in_flight: dict[str, tuple[int, float, int | None]] = {}
        """Invited device → (its planet, invited at, its resource or None)."""
        self.fold_into: dict[tuple[str, int], int] = {}
        """An arrived update (device, seq) → the planet it trained."""
        self.count: dict[str, int] = {}
        """Cnt(ct): times each device was selected."""
        self.score: dict[str, tuple[float, int]] = {}
        """PSc(ct): (sum, n) of the device's invite-to-update times, ÷ its resource's speed."""
        self.rtime: dict[tuple[str, int], tuple[float, int]] = {}
        """RTime(r, ct): (sum, n) of the device's invite-to-update times on resource r."""
        self.used: dict[int, int] = {}
        """Invitations per resource (reported by describe)."""
        self.forgotten = 0
        """Invited devices given up on after ``forget_after_s``."""
        self._had_models = False
        """The restored checkpoint says planets were kept with it (see :meth:`restore_arrays`)."""

    # ------------------------------------------------------------------ selection

    def serve_pull(self, view: CoordinatorView, device: str, now: float) -> bool:
        return self.config.selection == "none" or device in self.in_flight

    def selects(self) -> bool:
        return self.config.selection != "none"

    def on_update(self, view: CoordinatorView, update: BufferedUpdate, now: float) -> None:
        slot = self.in_flight.pop(update.device, None)
        if slot is None:
            return
        planet, invited_at, resource = slot
        self.fold_into[update.key] = planet
        took = max(now - invited_at, 0.0)
        speed = self.config.resource_speeds[resource] if resource is not None else 1.0
        total, n = self.score.get(update.device, (0.0, 0))
        self.score[update.device] = (total + took * speed, n + 1)
        if resource is not None:
            total, n = self.rtime.get((update.device, resource), (0.0, 0))
            self.rtime[(update.device, resource)] = (total + took, n + 1)

    def hints_for(self, device: str) -> Mapping[str, float]:
        """The resource chosen for an invited device (``resources = "cost"``), else none."""
        slot = self.in_flight.get(device)
        return {"resource": float(slot[2])} if slot is not None and slot[2] is not None else {}

    def performance_score(self, device: str) -> float:
        seen = self.score.get(device)
        return seen[0] / seen[1] if seen is not None else self._unseen_score()

    def _unseen_score(self) -> float:
        """A device without a score of its own: the mean of the known ones (1.0 if none)."""
        known = [t / n for t, n in self.score.values()]
        return sum(known) / len(known) if known else 1.0

    def gap(self, planet: int) -> float:
        st = self.state
        return version_gap(st.versions[planet], st.mean_version(), -self.config.offset_sign * st.version_offset())

    def probabilities(self, candidates: Sequence[str], planet: int) -> list[float]:
        """Eq. 7 over ``candidates`` for ``planet`` (``selection = "reward"``)."""
        gap = self.gap(planet)
        score_of = self.score.get
        seen = [score_of(device) for device in candidates]
        # (the mean over every score: once, not once per candidate without one)
        unseen = self._unseen_score() if None in seen else 0.0
        scores = [unseen if sc is None else sc[0] / sc[1] for sc in seen]
        rewards = performance_rewards(scores, gap)
        # eq. 6 once per distinct count (a few), not once per candidate: the same floats
        count_of = self.count.get
        counts = [count_of(device, 0) for device in candidates]
        of_count = {n: curiosity(n) for n in set(counts)}
        return selection_probabilities(rewards, [of_count[n] for n in counts])

    def resource_for(self, device: str, planet: int) -> int | None:
        """Eq. 8–9 (``resources = "cost"``), else None (no hint)."""
        cfg = self.config
        if cfg.resources != "cost":
            return None
        psc = self.performance_score(device)
        times = []
        for r, speed in enumerate(cfg.resource_speeds):
            seen = self.rtime.get((device, r))
            times.append(seen[0] / seen[1] if seen is not None else psc / speed)
        return choose_resource(cfg.resource_prices, times, self.gap(planet))

    def plan(self, view: CoordinatorView, now: float, rng: random.Random) -> Plan:
        if self.config.selection == "none":
            return Plan(aggregate=bool(view.buffer))
        self.state.ensure(view.weights)
        limit = self.config.forget_after_s
        if limit is not None:  # the same sum as the wake-up below: a wake-up at it always forgets
            for device in [d for d, slot in self.in_flight.items() if slot[1] + limit <= now]:
                del self.in_flight[device]
                self.forgotten += 1
        busy = {slot[0] for slot in self.in_flight.values()}
        free = sorted((j for j in range(self.state.k) if j not in busy), key=lambda j: (self.state.versions[j], j))
        # (every planet busy: no pass over the waiting devices, which a plan after every event made O(waiting) each)
        # Sorted whole, not a top few: each draw ranges over every waiting device, uniform by rank and eq. 7 by the
        # cumulative weights in this order, so the same seed draws the same devices whatever order they deferred in.
        waiting = sorted(d for d in view.deferred if d not in self.in_flight) if free else []
        invite: list[str] = []
        for planet in free:
            if not waiting:
                break
            if self.config.selection == "uniform":
                device = waiting[rng.randrange(len(waiting))]
            else:
                device = rng.choices(waiting, weights=self.probabilities(waiting, planet))[0]
            waiting.remove(device)
            resource = self.resource_for(device, planet)
            self.in_flight[device] = (planet, now, resource)
            self.count[device] = self.count.get(device, 0) + 1
            if resource is not None:
                self.used[resource] = self.used.get(resource, 0) + 1
            invite.append(device)
        wake_at = min(slot[1] for slot in self.in_flight.values()) + limit if limit is not None and self.in_flight else None
        return Plan(aggregate=bool(view.buffer), invite=tuple(invite), wake_at=wake_at)

    # ------------------------------------------------------------------ aggregation

    def aggregate(self, view: CoordinatorView, updates: Sequence[BufferedUpdate]) -> Vector:
        st, cfg = self.state, self.config
        st.ensure(view.weights)
        assert st.planets is not None and st.stellar is not None
        policy = make_policy(cfg.staleness, a=cfg.a, bound=cfg.max_staleness)
        for u in updates:
            assigned = self.fold_into.pop(u.key, None)
            factor = staleness_factor(policy, max(view.version - u.base_version, 0))
            if factor is None:
                continue
            j = assigned if assigned is not None else min(range(st.k), key=lambda i: (st.versions[i], i))
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

    def on_aggregated(self, view: CoordinatorView, now: float) -> None:
        """Forget the planet of every update a commit consumed without handing it to ``aggregate``
        (LASP left it out: e.g. a conversion released after the full sync its base predates; a
        rollback discards the buffer too): its key never comes back (a device's seq only grows),
        and the entry stayed for ever, one per such update. Entries of updates still buffered are
        kept. After an ordinary fold there is nothing to do (``aggregate`` popped every entry)."""
        if self.fold_into:
            buffered = {u.key for u in view.buffer}
            self.fold_into = {key: planet for key, planet in self.fold_into.items() if key in buffered}

    def on_line_replaced(self, view: CoordinatorView, now: float, *, restored: int) -> None:
        """Every planet and the stellar model restart from the restored weights, as after a restart
        (the soft reset that keeps the version weighting, see :mod:`coordinator.peering.nebula`).
        helper-161: the planets kept the rejected line, and the master is made from them alone: the
        first aggregation after a rollback committed the rejected model again (plus the update), and
        the next rotation sent it to a peer."""
        st = self.state
        st.planets = st.stellar = None
        st.ensure(view.weights)

    def checkpoint(self) -> dict[str, Any]:
        """When the stellar model arrived and the mean planet version last sent (the peering keeps
        the versions, ``v_s`` and the rotation clock): ``d_t`` and ``v_os`` go on from them."""
        st = self.state
        return {"stellar_at": st.stellar_at, "v_rotation_avg": st.v_rotation_avg,
                **({"models": True} if st.planets is not None and st.stellar is not None else {})}

    def restore_state(self, state: Mapping[str, Any]) -> None:
        st = self.state
        for key in ("stellar_at", "v_rotation_avg"):
            value = state.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                setattr(st, key, float(value))
        self._had_models = state.get("models") is True

    def checkpoint_arrays(self) -> dict[str, Vector]:
        """The planets and the stellar model (K + 1 model copies), for the registry to keep beside the
        newest version only. helper-169: without them a restart re-seeded every planet from the master
        (the soft reset), and the next 10 versions were 0.015-0.042 away in L2 from an uninterrupted
        run's (9-parameter toy model, restart after version 6; one version's step is ~0.1)."""
        st = self.state
        if st.planets is None or st.stellar is None:
            return {}
        return {**{f"planet{j}": np.array(p, copy=True) for j, p in enumerate(st.planets)}, "stellar": np.array(st.stellar, copy=True)}

    def restore_arrays(self, arrays: Mapping[str, Vector] | None) -> str | None:
        had, self._had_models = self._had_models, False
        st = self.state
        names = [f"planet{j}" for j in range(st.k)] + ["stellar"]
        if arrays is not None and all(n in arrays for n in names):
            got = [np.asarray(arrays[n], dtype=np.float32) for n in names]
            shape = got[0].shape
            if len(shape) == 1 and all(a.shape == shape and bool(np.isfinite(a).all()) for a in got):
                st.planets = [np.array(a, copy=True) for a in got[:-1]]
                st.stellar = np.array(got[-1], copy=True)
                return None
            return f"{self.name}: the kept planets are not {st.k} finite model vectors: they restart from the master"
        if had:
            return f"{self.name}: no planets kept for the restored version: they restart from the master"
        return None

    def describe(self) -> dict[str, Any]:
        st = self.state
        out = {"name": self.name, "planets": st.k, "t_c": self.config.t_c, "versions": list(st.versions),
               "v_stellar": st.v_stellar}
        if self.config.selection != "none":
            out |= {"selection": self.config.selection, "resources": self.config.resources, "selected": sum(self.count.values()),
                    "devices_selected": len(self.count), "resource_use": {str(k): v for k, v in sorted(self.used.items())},
                    "forget_after_s": self.config.forget_after_s, "forgotten": self.forgotten}
        return out
