"""The peering interface: how a coordinator exchanges models with other coordinators.

A peering component is sans-IO like the strategies. The coordinator core calls it

* ``on_message`` for each valid :class:`~edge_sdk.wire.messages.PeerMsg` from another
  coordinator (tokens, model broadcasts, rotations),
* ``on_version`` after each new local version (e.g. Spyker's intra-server trigger),
* ``on_timer`` when its ``wake_at`` has passed (token regeneration, rotation periods),

and each returns a :class:`PeerPlan`: messages to send (to one coordinator or to all) and
optionally a merged model that the core commits as a new version. ``checkpoint()`` is
stored with every committed version and handed back to ``restore()`` after a restart.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from coordinator.strategies.base import CoordinatorView
from edge_sdk.spec import Vector
from edge_sdk.wire.messages import PeerMsg

BROADCAST = "all"
"""Recipient id that every coordinator subscribes to (so no coordinator may be named so)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerSend:
    kind: str
    body: dict[str, Any]
    to: str = BROADCAST
    weights: Vector | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerPlan:
    sends: tuple[PeerSend, ...] = ()
    merged: Vector | None = None
    """A new global model to commit (e.g. after merging a peer's model)."""
    meta: Mapping[str, Any] = field(default_factory=dict)


class Peering:
    """No peering: a lone coordinator. Subclasses implement the exchange protocols."""

    name: ClassVar[str] = "none"

    def on_message(self, view: CoordinatorView, msg: PeerMsg, now: float) -> PeerPlan:
        return PeerPlan()

    def on_version(self, view: CoordinatorView, now: float) -> PeerPlan:
        return PeerPlan()

    def on_timer(self, view: CoordinatorView, now: float) -> PeerPlan:
        return PeerPlan()

    def wake_at(self) -> float | None:
        return None

    def checkpoint(self) -> dict[str, Any]:
        return {}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Resume from what ``checkpoint()`` returned at the last committed version."""

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}
