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
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, Protocol

from edge_sdk.fastinit import fast_init
from edge_sdk.spec import FULL, ModelSpec, Vector


@fast_init
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
    nonce: int = 0

    @property
    def key(self) -> tuple[str, int]:
        return (self.device, self.seq)


@fast_init
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


@dataclass
class StaticView:
    """A :class:`CoordinatorView` over fixed state, without a core: what a strategy sees when
    it aggregates offline (benchmarks, tests). ``history`` holds older global vectors."""

    spec: ModelSpec
    version: int
    weights: Vector
    history: dict[int, Vector] = field(default_factory=dict)
    buffer: Sequence[BufferedUpdate] = ()
    devices_seen: Sequence[str] = ()
    last_aggregation_at: float = 0.0
    first_buffered_at: float | None = None
    deferred: dict[str, float] = field(default_factory=dict)

    def weights_at(self, version: int) -> Vector | None:
        return self.weights if version == self.version else self.history.get(version)


class Strategy:
    """Base class with SPIN-like defaults: serve every pull, never invite, never wake."""

    name: ClassVar[str] = "base"

    def serve_pull(self, view: CoordinatorView, device: str, now: float) -> bool:
        return True

    def selects(self) -> bool:
        """True when ``serve_pull`` decides who trains: the core then takes an update only from
        a device it served a training model since that device's last accepted update."""
        return False

    def plan(self, view: CoordinatorView, now: float, rng: random.Random) -> Plan:
        return Plan()

    def aggregate(self, view: CoordinatorView, updates: Sequence[BufferedUpdate]) -> Vector:
        raise NotImplementedError

    def on_update(self, view: CoordinatorView, update: BufferedUpdate, now: float) -> None:
        """Bookkeeping hook (e.g. an invited device finished); averaging strategies also fold
        the update into their running sum here."""

    def on_restore(self, view: CoordinatorView, update: BufferedUpdate) -> None:
        """A persisted, not yet applied update put back into the buffer at restart (no
        bookkeeping: it is not a new arrival). Averaging strategies rebuild their fold."""

    def on_aggregated(self, view: CoordinatorView, now: float) -> None:
        """Bookkeeping hook after a new version is committed."""

    def candidate(self, view: CoordinatorView) -> bool:
        """Whether the version just committed (``view.version``, after :meth:`on_aggregated`) is a
        model for the release gate to judge, or a step inside the strategy's own procedure that no
        device should predict with (HFedMS's chain steps; helper-166): one that is not is committed
        to the training line and never submitted to the gate (the release stays where it is)."""
        return True

    def on_line_replaced(self, view: CoordinatorView, now: float, *, restored: int) -> None:
        """The training line was replaced (the gate rejected a candidate, or an operator's rollback
        or pin): ``view.version`` is a new version holding the weights of version ``restored``, and
        the versions after ``restored`` were abandoned. State built from them that would steer the
        next versions (FedAdam's moments, Spyker's age, NebulaFL's planets) goes back to
        ``restored`` or starts afresh from its weights; counters stay. Called after ``on_aggregated``
        and before the commit's checkpoint is taken."""

    def checkpoint(self) -> dict[str, Any]:
        """JSON-able state worth keeping across a restart (e.g. robust aggregation's windows
        and counters); the core may store it with each commit."""
        return {}

    def restore_state(self, state: Mapping[str, Any]) -> None:
        """Undo :meth:`checkpoint` at start, before pending updates are restored."""

    def round_checkpoint(self) -> dict[str, Any]:
        """The selection round as just drawn, JSON-able: who was drawn, when, the rounds counted and
        the draws' generator. A commit's :meth:`checkpoint` holds it as of that commit; the core also
        records it (``RecordSelectionRound``) each time a plan invites, before the invitations leave,
        so a restart between commits resumes the round as drawn instead of closing it with the
        replayed part of its buffer or drawing another. ``{}`` (the default): no round to keep."""
        return {}

    def restore_round(self, state: Mapping[str, Any]) -> None:
        """Undo :meth:`round_checkpoint` at start: after :meth:`restore_state`, before the updates
        accepted after the record are replayed (:meth:`on_restore`: their devices have reported)."""

    def checkpoint_arrays(self) -> dict[str, Vector]:
        """Model-sized state at the version just committed (FedAdam's moments), by name, for the
        registry to keep beside the newest version only: one file tagged with that version, written
        before the commit is acknowledged (never base64 in each commit's JSON, as :meth:`checkpoint`
        is). Taken with :meth:`checkpoint`; ``{}``: nothing to keep (the default: no file)."""
        return {}

    def restore_arrays(self, arrays: Mapping[str, Vector] | None) -> str | None:
        """Undo :meth:`checkpoint_arrays` at start, after :meth:`restore_state`: the arrays kept
        with the restored version, or None when there are none for it (a file from another version,
        missing or unreadable). Returns a line for the log when state had to start afresh, else None."""
        return None

    def describe(self) -> dict[str, Any]:
        """Parameters for status and logs."""
        return {"name": self.name}

    def devices_per_round(self) -> tuple[int, str] | None:
        """How many devices must be waiting with new data, at once, before a round can start,
        and the parameter that sets it; None where no count of devices holds anything up.
        Fewer devices than that and no version is ever made: the emulator refuses such a run,
        the coordinator says it at start."""
        return None


class ReadOnlyView:
    """A :class:`CoordinatorView` over a core that exposes only the view's properties, so a
    strategy or peering cannot reach the core's mutators (``handle``, the buffer's list,
    counters). Vectors are handed out as read-only numpy views.

    The core builds one at start (``self._view = ReadOnlyView(self)``) and passes it
    wherever it now passes ``self`` to ``strategy.*`` and ``peering.*``."""

    __slots__ = ("_core", "_held", "_held_bytes")

    HELD = 40
    """Read-only views kept: the current vector and the retained versions a fold reads as
    update bases (``keep_versions`` is 32 by default)..."""
    HELD_BYTES = 64 << 20
    """... as long as the vectors they keep alive total at most this (two are always kept):
    a large model holds no more old versions than before."""

    def __init__(self, core: CoordinatorView) -> None:
        self._core = core
        self._held: dict[int, tuple[Vector, Vector]] = {}
        """By ``id``: (vector, its read-only view) for the vectors handed out last: the view is
        made once per vector, not per access (it is read-only: sharing it changes nothing).
        The vector is held here, so its id cannot be reused while it is a key."""
        self._held_bytes = 0

    @property
    def spec(self) -> ModelSpec:
        return self._core.spec

    @property
    def version(self) -> int:
        return self._core.version

    @property
    def weights(self) -> Vector:
        return self._read_only(self._core.weights)

    @property
    def buffer(self) -> Sequence[BufferedUpdate]:
        return tuple(self._core.buffer)

    @property
    def last_aggregation_at(self) -> float:
        return self._core.last_aggregation_at

    @property
    def first_buffered_at(self) -> float | None:
        return self._core.first_buffered_at

    @property
    def devices_seen(self) -> Sequence[str]:
        return tuple(self._core.devices_seen)

    @property
    def deferred(self) -> Mapping[str, float]:
        return MappingProxyType(self._core.deferred)  # read-only, no copy (O(1) per event)

    def weights_at(self, version: int) -> Vector | None:
        w = self._core.weights_at(version)
        return None if w is None else self._read_only(w)

    def _read_only(self, w: Vector) -> Vector:
        held = self._held
        hit = held.get(id(w))
        if hit is not None and hit[0] is w:  # the very same array (held here, so its id cannot be reused)
            return hit[1]
        view = _frozen(w)
        held[id(w)] = (w, view)
        self._held_bytes += w.nbytes
        while len(held) > 2 and (len(held) > self.HELD or self._held_bytes > self.HELD_BYTES):
            oldest = next(iter(held))  # the first handed out of those kept
            self._held_bytes -= held.pop(oldest)[0].nbytes
        return view


def _frozen(w: Vector) -> Vector:
    out = w.view()
    out.flags.writeable = False
    return out
