"""CoordinatorCore — the regional coordinator as a pure state machine.

Theory of operation
-------------------
The coordinator owns one deployed model: a monotonically increasing ``version`` and its
flat float32 ``weights``. Devices talk to it over per-device topics (``edge_sdk.wire.topics``).

* A **pull** is answered with the current model (``reply_to`` = the pull's seq), unless the
  strategy defers it (server-driven strategies); deferred devices are later *invited* and
  pull again.
* An **update** is validated (topic ↔ device id, model id, base version ≤ current version,
  shape against the spec, finite values). A bad one is rejected with a typed reason,
  counted, answered with ``Ack(rejected)`` when its sender is known, and never applied.
* Idempotency: a device has at most one update in flight and numbers requests with a
  strictly increasing ``seq``, so the per-device watermark ``accepted_upto[device]`` is an
  exact, bounded encoding of "the set of accepted update keys": an update with
  ``seq <= accepted_upto[device]`` is a duplicate (QoS 1 redelivery or a retry) and is
  acknowledged again as ``duplicate`` without being applied.
* An accepted update is first persisted (``PersistUpdate``), *then* acknowledged: the
  driver performs actions in order, so nothing acknowledged is lost by a crash.
* After every event the strategy's ``plan`` decides whether to aggregate now, whom to
  invite and when to be woken. Aggregation consumes the whole buffer and emits
  ``CommitVersion`` (the registry writes it atomically with the applied watermarks and
  drops the consumed update files) followed by a retained status publish.
* Restart: :meth:`CoordinatorCore.restore` takes the last committed snapshot plus the
  persisted-but-unapplied updates. Updates at or below the committed ``applied_upto``
  watermark were already applied and are dropped, so none is applied twice or lost.

Transitions::

    Pull (valid)          serve → Publish(model)            | defer → Ack(deferred)
    Update (valid, new)   PersistUpdate, Publish(ack accepted), then plan
    Update (duplicate)    Publish(ack duplicate)
    Update (invalid)      Publish(ack rejected) if sender known; counted
    TimerFired            plan
    plan.aggregate        CommitVersion(version + 1), Publish(status, retained)
    plan.invite           Publish(invite) per device
    plan.wake_at          ScheduleTimer
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from coordinator.peering.base import BROADCAST, Peering, PeerPlan
from coordinator.strategies.base import BufferedUpdate, Plan, Strategy
from edge_sdk.core.events import MessageReceived, Notify, Publish, ScheduleTimer, TimerFired
from edge_sdk.errors import (
    ConfigError,
    LocalProtocolError,
    RemoteProtocolError,
    TopicMismatch,
    UnknownModel,
    UnknownVersion,
)
from edge_sdk.spec import FULL, ModelSpec, Vector
from edge_sdk.wire import topics
from edge_sdk.wire.codec import DEFAULT_MAX_BYTES, Encoding, decode, encode, status_json
from edge_sdk.wire.messages import Ack, Invite, Message, ModelMsg, PeerMsg, Pull, Status, Update

CoordinatorEvent = MessageReceived | TimerFired


@dataclass(frozen=True, slots=True, kw_only=True)
class PersistUpdate:
    """Make an accepted update durable. Performed before the ack that follows it."""

    update: BufferedUpdate


@dataclass(frozen=True, slots=True, kw_only=True)
class CommitVersion:
    """Atomically write a new version with the watermarks of every update applied so far."""

    version: int
    weights: Vector
    applied_upto: Mapping[str, int]
    consumed: tuple[tuple[str, int], ...]
    metadata: Mapping[str, Any]


CoordinatorAction = Publish | ScheduleTimer | PersistUpdate | CommitVersion | Notify


@dataclass(frozen=True, slots=True, kw_only=True)
class CoordinatorConfig:
    region: str
    coordinator_id: str
    spec: ModelSpec
    encoding: Encoding = "f4"
    max_message_bytes: int = DEFAULT_MAX_BYTES
    hints: Mapping[str, float] = field(default_factory=dict)
    """Training hints sent with every model (e.g. epochs, lr)."""
    keep_versions: int = 8
    """How many past global vectors stay in memory for staleness-aware strategies."""
    full_sync_every: int = 0
    """LASP (HFedMS): every T-th version is a full sync; versions in between change only
    ``partial_group`` and devices exchange only that group. 0 disables LASP."""
    partial_group: str = "classifier"

    def __post_init__(self) -> None:
        topics.check_id(self.region, "region")
        topics.check_id(self.coordinator_id, "coordinator id")
        if self.coordinator_id == BROADCAST:
            raise ConfigError(f"{BROADCAST!r} is reserved for peer broadcasts")
        if self.keep_versions < 1:
            raise ConfigError("keep_versions must be >= 1")
        if self.full_sync_every < 0:
            raise ConfigError("full_sync_every must be >= 0 (0 disables LASP)")
        if self.full_sync_every and self.partial_group not in self.spec.group_slices:
            raise ConfigError(f"LASP needs a {self.partial_group!r} layer group; {self.spec.model_id} has {self.spec.groups}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    """Everything needed to resume: the last commit plus updates accepted since."""

    version: int
    weights: Vector
    applied_upto: Mapping[str, int] = field(default_factory=dict)
    buffer: Sequence[BufferedUpdate] = ()
    devices_seen: Sequence[str] = ()
    last_aggregation_at: float = 0.0
    counters: Mapping[str, int] = field(default_factory=dict)
    last_full_version: int = 0
    peer_state: Mapping[str, Any] = field(default_factory=dict)


class CoordinatorCore:
    """Sans-IO coordinator: ``handle(event) -> list[action]``. See the module docstring."""

    def __init__(
        self,
        config: CoordinatorConfig,
        strategy: Strategy,
        snapshot: Snapshot,
        *,
        rng: random.Random,
        peering: Peering | None = None,
    ) -> None:
        self.config = config
        self.strategy = strategy
        self.peering = peering or Peering()
        self.peering.restore(snapshot.peer_state)
        self._rng = rng
        self._last_full_version = int(snapshot.last_full_version)
        spec = config.spec
        self._weights = np.array(spec.check(np.asarray(snapshot.weights, dtype=np.float32)), copy=True)
        self._version = int(snapshot.version)
        self._history: dict[int, Vector] = {self._version: self._weights}
        self._applied_upto: dict[str, int] = dict(snapshot.applied_upto)
        self._accepted_upto: dict[str, int] = dict(snapshot.applied_upto)
        self._buffer: list[BufferedUpdate] = []
        self._first_buffered_at: float | None = None
        self._last_aggregation_at = float(snapshot.last_aggregation_at)
        self._devices: dict[str, None] = dict.fromkeys(snapshot.devices_seen)
        self._deferred: dict[str, float] = {}
        self._invite_round = 0
        self._wake_at: float | None = None
        self._status_dirty = False
        self.counters: Counter[str] = Counter(snapshot.counters)
        self.staleness_hist: Counter[int] = Counter()
        for u in sorted(snapshot.buffer, key=lambda u: (u.arrived_at, u.device, u.seq)):
            if u.seq <= self._applied_upto.get(u.device, -1):
                continue  # applied by the last commit; its file outlived the crash
            self._buffer_update(u)

    # ------------------------------------------------------------------ view (for strategies)

    @property
    def spec(self) -> ModelSpec:
        return self.config.spec

    @property
    def version(self) -> int:
        return self._version

    @property
    def weights(self) -> Vector:
        return self._weights

    @property
    def buffer(self) -> Sequence[BufferedUpdate]:
        return tuple(self._buffer)

    @property
    def last_aggregation_at(self) -> float:
        return self._last_aggregation_at

    @property
    def first_buffered_at(self) -> float | None:
        return self._first_buffered_at

    @property
    def devices_seen(self) -> Sequence[str]:
        return tuple(self._devices)

    @property
    def deferred(self) -> Mapping[str, float]:
        return dict(self._deferred)

    @property
    def applied_upto(self) -> Mapping[str, int]:
        return dict(self._applied_upto)

    def weights_at(self, version: int) -> Vector | None:
        return self._history.get(version)

    def subscriptions(self) -> list[str]:
        r = self.config.region
        subs = [topics.device_filter(r, "pull"), topics.device_filter(r, "update")]
        if self.peering.name != "none":
            subs += [topics.peer_filter(self.config.coordinator_id), topics.peer_filter(BROADCAST)]
        return subs

    @property
    def last_full_version(self) -> int:
        return self._last_full_version

    def next_version_is_full(self) -> bool:
        t = self.config.full_sync_every
        return t == 0 or (self._version + 1) % t == 0

    def status(self) -> Status:
        c = self.counters
        return Status(
            region=self.config.region,
            coordinator=self.config.coordinator_id,
            version=self._version,
            updates_accepted=c["accepted"],
            updates_rejected=c["rejected"],
            updates_duplicate=c["duplicate"],
            devices_seen=len(self._devices),
            buffered=len(self._buffer),
            strategy=self.strategy.name,
            extra={
                "model_id": self.config.spec.model_id,
                "pulls_served": c["pulls_served"],
                "pulls_deferred": c["pulls_deferred"],
                "messages_rejected": c["messages_rejected"],
                "aggregations": c["aggregations"],
                "bytes_in": c["bytes_in"],
                "bytes_out": c["bytes_out"],
                "rejected_by_reason": {k[7:]: v for k, v in c.items() if k.startswith("reject:")},
                "staleness_histogram": {str(k): v for k, v in sorted(self.staleness_hist.items())},
                "last_aggregation_at": self._last_aggregation_at,
                "strategy_params": self.strategy.describe(),
                "peering": self.peering.describe(),
                "full_sync_every": self.config.full_sync_every,
                "last_full_version": self._last_full_version,
            },
        )

    # ------------------------------------------------------------------ dispatch

    def start(self, now: float) -> list[CoordinatorAction]:
        """Announce status and re-arm timers after (re)start."""
        return [*self._after(now), self._status_action()]

    def handle(self, event: CoordinatorEvent) -> list[CoordinatorAction]:
        if isinstance(event, MessageReceived):
            actions = self._on_message(event)
        elif isinstance(event, TimerFired):
            # The driver's timer is consumed: re-arm whatever is still pending, even if the
            # wake-up came a little early (monotonic vs wall clock) and the time is unchanged.
            self._wake_at = None
            actions = []
        else:
            raise LocalProtocolError(f"CoordinatorCore cannot handle {type(event).__name__}")
        actions += self._after(event.now)
        if self._status_dirty:
            actions.append(self._status_action())
        return actions

    # ------------------------------------------------------------------ messages

    def _on_message(self, ev: MessageReceived) -> list[CoordinatorAction]:
        self.counters["bytes_in"] += len(ev.payload)
        device: str | None = None
        seq: int | None = None
        leaf = ""
        try:
            parsed = topics.parse(ev.topic)
            if parsed.kind == "peer":
                return self._on_peer(ev)
            if parsed.kind != "device" or parsed.region != self.config.region:
                raise TopicMismatch(f"not one of this region's device topics: {ev.topic[:120]!r}")
            leaf = parsed.leaf
            msg = decode(ev.payload, max_bytes=self.config.max_message_bytes)
            device = parsed.device
            if isinstance(msg, Pull | Update):
                seq = msg.seq
            return self._dispatch(parsed.device, leaf, msg, ev.now)
        except RemoteProtocolError as exc:
            return self._reject(exc, leaf, device, seq)

    def _dispatch(self, device: str, leaf: str, msg: Message, now: float) -> list[CoordinatorAction]:
        if getattr(msg, "device", device) != device:
            raise TopicMismatch(f"message claims device {getattr(msg, 'device', '')!r} on {device!r}'s topic")
        if leaf == "pull" and isinstance(msg, Pull):
            return self._on_pull(msg, now)
        if leaf == "update" and isinstance(msg, Update):
            return self._on_update(msg, now)
        raise TopicMismatch(f"a {msg.TYPE} message does not belong on the {leaf!r} topic")

    def _reject(self, exc: RemoteProtocolError, leaf: str, device: str | None, seq: int | None) -> list[CoordinatorAction]:
        self.counters["rejected" if leaf == "update" else "messages_rejected"] += 1
        self.counters[f"reject:{exc.reason}"] += 1
        self._status_dirty = True
        actions: list[CoordinatorAction] = [
            Notify(kind="rejected", data={"reason": exc.reason, "detail": str(exc)[:200], "device": device})
        ]
        if device is not None and seq is not None and leaf == "update":
            ack = Ack(device=device, seq=seq, status="rejected", version=self._version, reason=exc.reason)
            actions.append(self._publish(topics.device_topic(self.config.region, device, "ack"), encode(ack)))
        return actions

    def _see(self, device: str) -> None:
        if device not in self._devices:
            self._devices[device] = None
            self._status_dirty = True

    def _on_pull(self, msg: Pull, now: float) -> list[CoordinatorAction]:
        if msg.model_id != self.config.spec.model_id:
            raise UnknownModel(f"this coordinator serves {self.config.spec.model_id!r}, not {msg.model_id!r}")
        self._see(msg.device)
        if msg.invite_round >= 0 or self.strategy.serve_pull(self, msg.device, now):
            self._deferred.pop(msg.device, None)
            self.counters["pulls_served"] += 1
            return [self._model_reply(msg.device, msg.seq, self._group_for(msg.have_version))]
        self._deferred[msg.device] = now
        self.counters["pulls_deferred"] += 1
        ack = Ack(device=msg.device, seq=msg.seq, status="deferred", version=self._version)
        return [self._publish(topics.device_topic(self.config.region, msg.device, "ack"), encode(ack))]

    def _group_for(self, have_version: int) -> str:
        """LASP: a device already holding the current extractor gets only the partial group."""
        if not self.config.full_sync_every or self.next_version_is_full():
            return FULL
        if have_version < self._last_full_version or have_version > self._version:
            return FULL
        return self.config.partial_group

    def _train_group(self) -> str:
        """LASP: between full syncs devices train (and send) only the partial group."""
        if not self.config.full_sync_every or self.next_version_is_full():
            return FULL
        return self.config.partial_group

    def _model_reply(self, device: str, reply_to: int, group: str = FULL) -> Publish:
        cfg = self.config
        msg = ModelMsg(
            model_id=cfg.spec.model_id,
            version=self._version,
            reply_to=reply_to,
            weights=self._weights[cfg.spec.group_slice(group)],
            group=group,
            train_group=self._train_group(),
            spec_fingerprint=cfg.spec.fingerprint,
            hints={**cfg.hints, **self.peering.hints_for(device)},  # e.g. Spyker's per-device lr decay
        )
        return self._publish(topics.device_topic(cfg.region, device, "model"), encode(msg, encoding=cfg.encoding))

    def _on_update(self, msg: Update, now: float) -> list[CoordinatorAction]:
        cfg = self.config
        ack_topic = topics.device_topic(cfg.region, msg.device, "ack")
        if msg.model_id != cfg.spec.model_id:
            raise UnknownModel(f"this coordinator serves {cfg.spec.model_id!r}, not {msg.model_id!r}")
        self._see(msg.device)
        if msg.seq <= self._accepted_upto.get(msg.device, -1):
            self.counters["duplicate"] += 1
            self._status_dirty = True
            ack = Ack(device=msg.device, seq=msg.seq, status="duplicate", version=self._version)
            return [self._publish(ack_topic, encode(ack))]
        if msg.base_version > self._version:
            raise UnknownVersion(f"base version {msg.base_version} is newer than current {self._version}")
        cfg.spec.check(msg.weights, msg.group)
        update = BufferedUpdate(
            device=msg.device,
            seq=msg.seq,
            base_version=msg.base_version,
            staleness=self._version - msg.base_version,
            n_samples=msg.n_samples,
            weights=msg.weights,
            group=msg.group,
            arrived_at=now,
            loss=msg.loss,
        )
        self._buffer_update(update)
        self.counters["accepted"] += 1
        self.staleness_hist[update.staleness] += 1
        self.strategy.on_update(self, update, now)
        ack = Ack(device=msg.device, seq=msg.seq, status="accepted", version=self._version)
        return [PersistUpdate(update=update), self._publish(ack_topic, encode(ack))]

    def _buffer_update(self, update: BufferedUpdate) -> None:
        if not self._buffer:
            self._first_buffered_at = update.arrived_at
        self._buffer.append(update)
        self._status_dirty = True
        self._accepted_upto[update.device] = max(self._accepted_upto.get(update.device, -1), update.seq)

    # ------------------------------------------------------------------ planning

    def _after(self, now: float) -> list[CoordinatorAction]:
        actions: list[CoordinatorAction] = []
        peer_wake = self.peering.wake_at()
        if peer_wake is not None and now >= peer_wake:
            actions += self._run_peer_plan(self.peering.on_timer(self, now), now)
        for _ in range(4):  # an aggregation may enable another decision (e.g. new invites)
            plan: Plan = self.strategy.plan(self, now, self._rng)
            aggregated = plan.aggregate and bool(self._buffer)
            if aggregated:
                actions.append(self._aggregate(now))
                actions += self._run_peer_plan(self.peering.on_version(self, now), now)
            for device in plan.invite:
                actions.extend(self._invite(device))
            if not aggregated and not plan.invite:
                wakes = [t for t in (plan.wake_at, self.peering.wake_at()) if t is not None]
                wake = min(wakes) if wakes else None
                if wake != self._wake_at:
                    self._wake_at = wake
                    if wake is not None:
                        actions.append(ScheduleTimer(at=wake))
                break
        return actions

    def _aggregate(self, now: float) -> CommitVersion:
        updates = tuple(self._buffer)
        full = self.next_version_is_full()
        used = updates if full else tuple(self._partial(u) for u in updates)
        new = np.ascontiguousarray(self.strategy.aggregate(self, used), dtype=np.float32)
        if not full:  # LASP: between full syncs only the partial group may change
            keep = np.array(self._weights, copy=True)
            sl = self.config.spec.group_slice(self.config.partial_group)
            keep[sl] = new[sl]
            new = keep
        for u in updates:
            self._applied_upto[u.device] = max(self._applied_upto.get(u.device, -1), u.seq)
        self._buffer.clear()
        self._first_buffered_at = None
        self._last_aggregation_at = now
        self.counters["aggregations"] += 1
        stal = [u.staleness for u in updates]
        commit = self._commit(
            new,
            now,
            consumed=tuple(u.key for u in updates),
            meta={
                "source": "aggregation",
                "n_updates": len(updates),
                "n_samples": int(sum(u.n_samples for u in updates)),
                "devices": sorted({u.device for u in updates}),
                "mean_staleness": float(np.mean(stal)) if stal else 0.0,
                "max_staleness": int(max(stal)) if stal else 0,
                "full_sync": full,
            },
        )
        self.strategy.on_aggregated(self, now)
        return commit

    def _partial(self, u: BufferedUpdate) -> BufferedUpdate:
        group = self.config.partial_group
        if u.group == group:
            return u
        sl = self.config.spec.group_slice(group)
        return BufferedUpdate(
            device=u.device, seq=u.seq, base_version=u.base_version, staleness=u.staleness, n_samples=u.n_samples,
            weights=u.weights[sl], group=group, arrived_at=u.arrived_at, loss=u.loss,
        )

    def _commit(self, weights: Vector, now: float, *, consumed: tuple[tuple[str, int], ...], meta: Mapping[str, Any]) -> CommitVersion:
        """Make ``weights`` the next version (validated: a bug must never deploy NaN)."""
        self.config.spec.check(weights)
        self._version += 1
        self._weights = weights
        self._history[self._version] = weights
        for old in sorted(self._history)[: -self.config.keep_versions]:
            del self._history[old]
        if meta.get("full_sync", True):
            self._last_full_version = self._version
        self._status_dirty = True
        return CommitVersion(
            version=self._version,
            weights=weights,
            applied_upto=dict(self._applied_upto),
            consumed=consumed,
            metadata={
                "created_at": now,
                "strategy": self.strategy.name,
                **meta,
                "last_full_version": self._last_full_version,
                "counters": dict(self.counters),
                "devices_seen": list(self._devices),
                "peering": self.peering.checkpoint(),
            },
        )

    # ------------------------------------------------------------------ peering

    def _on_peer(self, ev: MessageReceived) -> list[CoordinatorAction]:
        msg = decode(ev.payload, max_bytes=self.config.max_message_bytes)
        if not isinstance(msg, PeerMsg):
            raise TopicMismatch(f"a {msg.TYPE} message does not belong on a peer topic")
        if msg.sender == self.config.coordinator_id:
            return []  # our own broadcast, echoed by the broker
        if msg.weights is not None:
            self.config.spec.check(msg.weights)
        self.counters["peer_messages"] += 1
        return self._run_peer_plan(self.peering.on_message(self, msg, ev.now), ev.now)

    def _run_peer_plan(self, plan: PeerPlan, now: float) -> list[CoordinatorAction]:
        actions: list[CoordinatorAction] = []
        for send in plan.sends:
            msg = PeerMsg(sender=self.config.coordinator_id, kind=send.kind, body=send.body, weights=send.weights)
            actions.append(self._publish(topics.peer_topic(send.to, send.kind), encode(msg)))
        if plan.merged is not None:
            merged = np.ascontiguousarray(plan.merged, dtype=np.float32)
            self.counters["peer_merges"] += 1
            actions.append(self._commit(merged, now, consumed=(), meta={"source": "peer", **plan.meta}))
        return actions

    def _invite(self, device: str) -> list[CoordinatorAction]:
        if self._deferred.pop(device, None) is None:
            return []
        self._invite_round += 1
        invite = Invite(device=device, round=self._invite_round, version=self._version)
        return [self._publish(topics.device_topic(self.config.region, device, "invite"), encode(invite))]

    def _publish(self, topic: str, payload: bytes, *, retain: bool = False) -> Publish:
        self.counters["bytes_out"] += len(payload)
        return Publish(topic=topic, payload=payload, qos=1, retain=retain)

    def _status_action(self) -> Publish:
        self._status_dirty = False
        return Publish(topic=topics.status_topic(self.config.region), payload=status_json(self.status()), qos=1, retain=True)
