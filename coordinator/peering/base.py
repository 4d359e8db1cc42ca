"""The peering interface: how a coordinator exchanges models with other coordinators.

A peering component is sans-IO like the strategies. The coordinator core calls it

* ``on_message`` for each valid :class:`~edge_sdk.wire.messages.PeerMsg` from another
  coordinator (tokens, model broadcasts, rotations),
* ``on_version`` after each new local version (e.g. Spyker's intra-server trigger),
* ``on_timer`` when its ``wake_at`` has passed (token regeneration, rotation periods),

and each returns a :class:`PeerPlan`: messages to send (to one coordinator or to all) and
optionally a merged model that the core commits as a new version. ``checkpoint()`` is
stored with every committed version and handed back to ``restore()`` after a restart.
Per-device counts (Spyker's update counts) are not in it: they grow with the fleet, so each
commit hands the registry only those that changed (``take_tallies()``, :class:`Tallies`) and
a restart gets the whole map back from the registry (``restore_tallies()``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from coordinator.strategies.base import CoordinatorView
from edge_sdk.errors import ConfigError, MalformedMessage, UnknownPeer
from edge_sdk.spec import Vector
from edge_sdk.wire import topics
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
    counted: bool = False
    """The peering counted the message as one it ignores (a replayed beat, a model merged already,
    a late round, a stale token): :meth:`Peering.describe` shows the count in the status, so the
    core asks for a status publish (throttled) as it does for a device message it rejects."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Tallies:
    """Per-device counts a peering keeps, as one commit hands them to the registry: the new
    value of each count changed since the previous commit, or with ``whole`` every count (the
    registry's map starts afresh: a new peering, or one restored without the registry's map)."""

    changed: Mapping[str, int]
    whole: bool = False


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

    def ignores(self, msg: PeerMsg, now: float) -> bool:
        """True (and counted, as :meth:`on_message` counts it) when ``on_message`` would ignore
        ``msg`` whoever signed it: a replay of what this peering took already (a beat no newer than
        the sender's newest, a round it closed or took). The core may then drop it before checking
        its signature, which is most of what a peer message costs (helper-161: ~200 us of ~360 us
        a beat; a replayed frame costs its sender nothing to send again). Read from state the
        message cannot change: a forged one is dropped exactly as its genuine original would be."""
        return False

    def on_line_replaced(self, view: CoordinatorView, now: float, *, restored: int) -> None:
        """The training line was replaced by the weights of version ``restored`` (a rollback or an
        operator's pin: :meth:`coordinator.strategies.base.Strategy.on_line_replaced`): what this
        peering keeps of the abandoned versions (its own model in a merge still open, an age)
        goes back to them. Messages already sent are not recalled."""

    def checkpoint(self) -> dict[str, Any]:
        return {}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Resume from what ``checkpoint()`` returned at the last committed version."""

    def take_tallies(self) -> Tallies | None:
        """The per-device counts changed since the previous call (once per commit, stored with
        it in O(changed) instead of O(devices)); None: this peering keeps none."""
        return None

    def restore_tallies(self, counts: Mapping[str, int]) -> None:
        """After ``restore()``: every count at the restored version (the registry's map)."""

    def hints_for(self, device: str) -> Mapping[str, float]:
        """Training hints for ``device`` that override the coordinator's (default: none)."""
        return {}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}

    def expected_peers(self) -> tuple[tuple[str, ...], float | None]:
        """The coordinators this one should hear from, and how long a silence from one of them
        is normal (None: no expectation, e.g. HierFAVG's edges never hear from each other).
        A longer silence is reported (``edgeci status``, a WARNING): a peer that is down, or
        whose ``--peers`` or broker differ, was never said anywhere."""
        return (), None


# ---------------------------------------------------------------- reading peer bodies


def body_int(body: Mapping[str, Any], key: str, lo: int = 0) -> int:
    value = body.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value < 2**63:
        raise MalformedMessage(f"peer body: {key!r} must be an int >= {lo}")
    return value


def body_float(body: Mapping[str, Any], key: str) -> float:
    value = body.get(key)
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise MalformedMessage(f"peer body: {key!r} must be a finite number")
    return float(value)


MAX_COUNT = 2.0**53
"""The largest count a peer may claim as a float (Spyker's age, NebulaFL's mean version: both
count updates): beyond it a float no longer counts them (A + 1 == A). helper-115: one Spyker
model claiming age 1e300 moved the receiver's age to 6e299 for good, a negative one pulled it
below zero merge by merge, and one NebulaFL rotation claiming version 1.7e308 made every weight
of the receiver's reward selection 0 (their sum overflowed: ``rng.choices`` raised at each plan)."""


def body_count(body: Mapping[str, Any], key: str, what: str) -> float:
    """``body[key]``, a count claimed as a float: in [0, :data:`MAX_COUNT`]. ``what`` begins the
    error (``"... must be"``)."""
    value = body_float(body, key)
    if not 0.0 <= value <= MAX_COUNT:
        raise MalformedMessage(f"{what} in [0, 2**53], got {value:.3g}")
    return value


def body_bool(body: Mapping[str, Any], key: str) -> bool:
    value = body.get(key)
    if not isinstance(value, bool):
        raise MalformedMessage(f"peer body: {key!r} must be a boolean")
    return value


def body_id(value: object, what: str) -> str:
    """A coordinator id inside a body (same rules as topic ids)."""
    if not isinstance(value, str):
        raise MalformedMessage(f"peer body: {what} must be a coordinator id")
    try:
        return topics.check_id(value, what)
    except ConfigError as exc:  # a local error type for what is a remote fault here
        raise MalformedMessage(f"peer body: bad {what}") from exc


def body_table(body: Mapping[str, Any], key: str, max_len: int = 4096) -> dict[str, Any]:
    """A ``{coordinator id: value}`` map (values checked by the caller)."""
    value = body.get(key)
    if not isinstance(value, dict) or len(value) > max_len:
        raise MalformedMessage(f"peer body: {key!r} must be a small map")
    return {body_id(k, f"{key} key"): v for k, v in value.items()}


def check_sender(name: str, coordinator_id: str, ring: tuple[str, ...], sender: str) -> None:
    """Raise :class:`~edge_sdk.errors.UnknownPeer` unless ``sender`` is another member of ``ring``."""
    if sender not in ring or sender == coordinator_id:
        raise UnknownPeer(f"{name}: {sender!r} is not another coordinator of the ring {list(ring)}")


def check_ring(coordinator_id: str, ring: tuple[str, ...]) -> tuple[str, ...]:
    """Validate a ring of coordinator ids that contains ``coordinator_id``."""
    for c in ring:
        topics.check_id(c, "peer coordinator id")
        if c == BROADCAST:
            raise ConfigError(f"{BROADCAST!r} cannot be a coordinator id")
    if len(set(ring)) != len(ring):
        raise ConfigError(f"peer ring {list(ring)} names a coordinator twice")
    if coordinator_id not in ring:
        raise ConfigError(f"coordinator {coordinator_id!r} is not in its peer ring {list(ring)}")
    return ring
