"""The strategy interface: small, injected, pure.

A strategy sees the coordinator's state through a read-only :class:`CoordinatorView` and
answers three questions after every event:

* ``serve_pull`` — answer this pull with the current model now, or defer it (server-driven
  strategies later *invite* deferred devices);
* ``plan`` — aggregate now? which deferred devices to invite? when to be woken up?
* ``aggregate`` — the new global vector from the current one and the buffered updates.

It never samples with the global random, sleeps, waits or touches the network: the rng and
the time arrive as arguments. Aggregation always consumes the whole buffer, which keeps
per-device idempotency watermarks exact (see ``coordinator.core``).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from edge_sdk.spec import FULL, ModelSpec, Vector


@dataclass(frozen=True, slots=True, kw_only=True)
class BufferedUpdate:
    """An accepted update waiting for aggregation (durable before it was acknowledged)."""

    device: str
    seq: int
    base_version: int
    staleness: int
    n_samples: int
    weights: Vector
    group: str = FULL
    arrived_at: float = 0.0
    loss: float = 0.0

    @property
    def key(self) -> tuple[str, int]:
        return (self.device, self.seq)


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    aggregate: bool = False
    wake_at: float | None = None
    invite: tuple[str, ...] = ()


class CoordinatorView(Protocol):
    """What a strategy may read. Never mutate through it."""

    @property
    def spec(self) -> ModelSpec: ...
    @property
    def version(self) -> int: ...
    @property
    def weights(self) -> Vector: ...
    @property
    def buffer(self) -> Sequence[BufferedUpdate]: ...
    @property
    def last_aggregation_at(self) -> float: ...
    @property
    def first_buffered_at(self) -> float | None: ...
    @property
    def devices_seen(self) -> Sequence[str]: ...
    @property
    def deferred(self) -> Mapping[str, float]:
        """Devices waiting for an invite, with the time their pull arrived."""
        ...

    def weights_at(self, version: int) -> Vector | None:
        """An older global vector if still retained (staleness-aware strategies), else None."""
        ...


class Strategy:
    """Base class with SPIN-like defaults: serve every pull, never invite, never wake."""

    name: ClassVar[str] = "base"

    def serve_pull(self, view: CoordinatorView, device: str, now: float) -> bool:
        return True

    def plan(self, view: CoordinatorView, now: float, rng: random.Random) -> Plan:
        return Plan()

    def aggregate(self, view: CoordinatorView, updates: Sequence[BufferedUpdate]) -> Vector:
        raise NotImplementedError

    def on_update(self, view: CoordinatorView, update: BufferedUpdate, now: float) -> None:
        """Bookkeeping hook (e.g. an invited device finished)."""

    def on_aggregated(self, view: CoordinatorView, now: float) -> None:
        """Bookkeeping hook after a new version is committed."""

    def describe(self) -> dict[str, Any]:
        """Parameters for status and logs."""
        return {"name": self.name}
