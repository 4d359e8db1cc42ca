"""Spyker's client-update strategy (paper 004): age-damped asynchronous aggregation.

Every coordinator keeps a model **age** ``A_i`` (how many client updates its model
embodies) in an :class:`AgeLedger` that this strategy shares with
:class:`coordinator.peering.spyker.SpykerPeering` (the token ring that merges models
between coordinators; :func:`coordinator.methods.make_method` wires the two). Each client
update is mixed in on arrival, damped by the age gap between the current model and the
model the client trained from::

    w_i ← w_i + η · s(A_i − A_k) · (w_k − w_i),   s: the staleness policy (default
    ``damped``, s(τ) = (τ + 1)^(−a)),   A_i ← A_i + 1

and ``u[k]``, the number of updates per client, drives the learning-rate decay sent to
each device with its model (:meth:`SpykerStrategy.lr_hint`)::

    η_k = η_init                                  while u[k] < ū
    η_k = max(η_min, η_init − β (u[k] − ū))       otherwise

(ū: mean of ``u`` over this coordinator's clients; the paper's Decay() with the
undecayed rate η[u[k]] = η_init, so a client that falls back to the mean trains again).

Under Sync-Spyker (peering ``spyker`` with ``mode = "sync"``) the ledger's ``hold`` is set
while the servers synchronise: client updates are stored, not aggregated, until the merged
model is committed (the paper's §6.1).
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

__all__ = ["AgeLedger", "SpykerConfig", "SpykerStrategy", "decayed_lr"]

_KEEP_AGES = 64


def decayed_lr(lr_init: float, updates: int, mean_updates: float, *, beta: float, lr_min: float) -> float:
    """Spyker's Decay(): η_init while u[k] < ū, else max(η_min, η_init − β (u[k] − ū))."""
    if updates < mean_updates:
        return lr_init
    return max(lr_min, lr_init - beta * (updates - mean_updates))



# --------------------------------------------------------------------------- shared state


class AgeLedger:
    """The model age, the age of recent versions and per-client update counts."""

    def __init__(self) -> None:
        self.age = 0.0
        self.age_at: dict[int, float] = {}
        self.updates: dict[str, int] = {}
        self._total = 0
        """Σ updates (ints, exact): the mean per pull without a pass over every client."""
        self._changed: dict[str, None] = {}
        """Devices counted since the last :meth:`take_changed`, in order (a commit stores only theirs)."""
        self._whole = True
        """The next :meth:`take_changed` is every count: no commit holds this ledger's map yet."""
        self.hold = False
        """Sync-Spyker: a server synchronisation is in progress; client updates wait in the buffer."""
        self._first_seen: int | None = None
        """The first version a view showed since this start or restore (:meth:`see`)."""
        self._merge: tuple[int, float] | None = None
        """A peer merge waiting for its version number: the version it was merged onto, and its age."""

    def record(self, version: int, age: float) -> None:
        self.age = age
        self._keep(version, age)

    def _keep(self, version: int, age: float) -> None:
        self.age_at[version] = age
        if len(self.age_at) > _KEEP_AGES:
            for v in sorted(self.age_at)[: -_KEEP_AGES]:
                del self.age_at[v]

    def see(self, version: int) -> None:
        """The version a coordinator view shows (the strategy and the peering pass it at each call):
        a peer merge waiting for its number (:meth:`record_merge`) gets the first one above the
        version it was merged onto, which is the number the core committed it as."""
        if self._first_seen is None:
            self._first_seen = version
        if self._merge is not None and version > self._merge[0]:
            self._keep(version, self._merge[1])
            self._merge = None

    def record_merge(self, onto: int, age: float) -> None:
        """A peer merge onto version ``onto`` (the view's) with age ``age``, which the core commits
        as its newest version + 1 (``CoordinatorCore._commit``): ``onto + 1`` once a commit was seen
        since this start (a committed version is above any version the registry skipped unread);
        before that a restart may have skipped some, and the number is taken from the next view
        (:meth:`see`). Recording ``onto + 1`` there filed the merge's age under a version that was
        never committed (3 for the commit numbered 6, resumed from 2 with 3-5 unreadable)."""
        self.see(onto)
        if self._first_seen is not None and onto > self._first_seen:
            self.record(onto + 1, age)
        else:
            self.age = age
            self._merge = (onto, age)

    def rolled_back(self, version: int, restored: int) -> None:
        """Version ``version`` holds the weights of version ``restored`` (a rollback, an operator's
        pin): its age is that version's (:meth:`age_of`), not the abandoned line's. helper-161: the
        age stayed where the rejected line had taken it (a hostile peer's merge, a poisoning burst),
        so the restored model claimed updates it does not embody: honest peers' models weighed less
        in its merges, and the claim spread to every peer that merged it."""
        self.record(version, self.age_of(restored, version))

    def age_of(self, version: int, current_version: int) -> float:
        """Age of the model at ``version`` (what a client trained from). Versions older
        than the ledger remembers count one unit of age per version (a lower bound on
        the gap)."""
        if version in self.age_at:
            return self.age_at[version]
        if version >= current_version:
            return self.age
        return max(0.0, self.age - float(current_version - version))

    def count(self, device: str) -> None:
        """One more update from ``device``."""
        self.updates[device] = self.updates.get(device, 0) + 1
        self._total += 1
        self._changed[device] = None

    def mean_updates(self) -> float:
        """Mean updates per client: every pull's lr hint asks (a sum over 100,000 clients took
        347 µs a pull; the running total gives the same float, the sum of ints being exact)."""
        return self._total / len(self.updates) if self.updates else 0.0

    def checkpoint(self, *, counts: bool = True) -> dict[str, Any]:
        """The ages and, with ``counts``, every update count (O(clients): a commit stores the
        counts apart, in O(changed), see :meth:`take_changed`)."""
        recent = sorted(self.age_at)[-8:]
        state: dict[str, Any] = {"age": self.age, "age_at": {str(v): self.age_at[v] for v in recent}}
        if self._merge is not None:  # this commit is the merge: the restored version is its number
            state["merge_age"] = self._merge[1]
        if counts:
            state["updates"] = dict(self.updates)
        return state

    def take_changed(self) -> tuple[dict[str, int], bool]:
        """The counts changed since the last call and False, or every count and True (the
        first call, or the first since a restore that had no counts from the registry)."""
        whole = self._whole
        changed = dict(self.updates) if whole else {d: self.updates[d] for d in self._changed}
        self._changed.clear()
        self._whole = False
        return changed, whole

    def restore(self, state: Mapping[str, Any]) -> None:
        """Undo :meth:`checkpoint`; its counts (older state dirs kept them there) are taken
        too, and stored whole with the next commit."""
        self.age = float(state.get("age", 0.0))
        self.age_at = {int(k): float(v) for k, v in dict(state.get("age_at", {})).items()}
        # A new start: the next view shows the restored version, the number of a merge checkpointed
        # before it had one (the commit it was stored with is that merge).
        self._first_seen = None
        self._merge = (-1, float(state["merge_age"])) if "merge_age" in state else None
        self.restore_counts(dict(state.get("updates", {})))
        self._whole = True

    def restore_counts(self, counts: Mapping[str, Any]) -> None:
        """Every update count at the restored commit (the registry's map): the next commit
        stores only the counts that change after it."""
        self.updates = {str(k): int(v) for k, v in counts.items()}
        self._total = sum(self.updates.values())
        self._changed.clear()
        self._whole = False



# --------------------------------------------------------------------------- client updates


@dataclass(frozen=True, slots=True, kw_only=True)
class SpykerConfig:
    eta: float = 0.6
    """η_i: server learning rate for client updates."""
    a: float = 0.5
    """Staleness exponent of s(τ) = (τ + 1)^(−a) on the age gap τ."""
    lr_init: float = 0.05
    """η_init: the clients' undecayed learning rate (the paper's text uses 0.05)."""
    decay_beta: float = 0.05
    lr_min: float = 1e-6
    staleness: str = "damped"
    """Staleness policy on the age gap (coordinator.strategies.staleness): none | damped | drop-beyond."""
    max_staleness: float | None = None
    """Drop updates whose age gap exceeds this (any policy); None = keep all."""

    def __post_init__(self) -> None:
        make_policy(self.staleness, a=self.a, bound=self.max_staleness)  # validates
        if not 0 < self.eta <= 1:
            raise ConfigError("spyker: eta must be in (0, 1]")
        if not (self.a >= 0 and math.isfinite(self.a)):
            raise ConfigError("spyker: a must be a finite number >= 0")
        if not (0 < self.lr_min <= self.lr_init and math.isfinite(self.lr_init)):
            raise ConfigError("spyker: need 0 < lr_min <= lr_init")
        if not (self.decay_beta >= 0 and math.isfinite(self.decay_beta)):
            raise ConfigError("spyker: decay_beta must be a finite number >= 0")


class SpykerStrategy(Strategy):
    """Age-damped asynchronous aggregation (Spyker Alg. 1). See the module docstring."""

    name: ClassVar[str] = "spyker"

    def __init__(self, config: SpykerConfig | None = None, ledger: AgeLedger | None = None) -> None:
        self.config = config or SpykerConfig()
        self.ledger = ledger or AgeLedger()
        self._next_age: float | None = None
        self.dropped_stale = 0

    def plan(self, view: CoordinatorView, now: float, rng: random.Random) -> Plan:
        self.ledger.see(view.version)  # the number of a peer merge committed since the last call
        return Plan(aggregate=bool(view.buffer) and not self.ledger.hold)

    def on_update(self, view: CoordinatorView, update: BufferedUpdate, now: float) -> None:
        self.ledger.count(update.device)

    def aggregate(self, view: CoordinatorView, updates: Sequence[BufferedUpdate]) -> Vector:
        cfg, ledger = self.config, self.ledger
        ledger.see(view.version)
        out = np.array(view.weights, dtype=np.float32, copy=True)
        age = ledger.age
        policy = make_policy(cfg.staleness, a=cfg.a, bound=cfg.max_staleness)
        for u in updates:
            tau = max(0.0, age - ledger.age_of(u.base_version, view.version))
            factor = staleness_factor(policy, tau)
            if factor is None:
                self.dropped_stale += 1
                continue
            share = np.float32(cfg.eta * factor)
            sl = view.spec.group_slice(u.group)
            out[sl] += share * (u.weights - out[sl])
            age += 1.0
        self._next_age = age
        return out

    def on_aggregated(self, view: CoordinatorView, now: float) -> None:
        if self._next_age is not None:
            self.ledger.record(view.version, self._next_age)
            self._next_age = None

    def on_line_replaced(self, view: CoordinatorView, now: float, *, restored: int) -> None:
        self.ledger.rolled_back(view.version, restored)  # the update counts (lr decay) stay: devices did that work

    def lr_hint(self, device: str) -> Mapping[str, float]:
        """The decayed learning rate for ``device``, or nothing while it is not decayed."""
        cfg, ledger = self.config, self.ledger
        u = ledger.updates.get(device, 0)
        lr = decayed_lr(cfg.lr_init, u, ledger.mean_updates(), beta=cfg.decay_beta, lr_min=cfg.lr_min)
        return {"lr": lr} if lr != cfg.lr_init else {}

    def describe(self) -> dict[str, Any]:
        c = self.config
        return {"name": self.name, "eta": c.eta, "a": c.a, "lr_init": c.lr_init, "decay_beta": c.decay_beta,
                "lr_min": c.lr_min, "staleness": c.staleness, "max_staleness": c.max_staleness,
                "dropped_stale": self.dropped_stale, "age": round(self.ledger.age, 3)}

