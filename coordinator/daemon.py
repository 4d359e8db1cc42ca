"""The coordinator daemon: CoordinatorCore + registry + MQTT, on an actor thread.

``edgeci coordinator --broker mqtt://HOST:PORT --region R --state-dir DIR --model digits``

With ``peering`` other than ``none`` (``--peering spyker --peers eu,us,ap``) the daemon
builds the peering component of :mod:`coordinator.peering` around the same strategy
object and hands it to the core, which then also subscribes to ``edgeci/v1/peer/...``.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator.core import (
    CommitVersion,
    CoordinatorConfig,
    CoordinatorCore,
    PersistUpdate,
    Snapshot,
)
from coordinator.peering import make_peering
from coordinator.registry import Registry
from coordinator.strategies import make_strategy
from edge_sdk.core.events import Notify, Publish
from edge_sdk.modelio import load_model
from edge_sdk.mqtt import MqttTransport
from edge_sdk.runtime import Actor, Clock, WallClock
from edge_sdk.spec import Vector
from edge_sdk.tasks import get_task
from edge_sdk.tasks.base import Task
from edge_sdk.wire.codec import Encoding

log = logging.getLogger("edgeci.coordinator")


@dataclass(frozen=True, slots=True, kw_only=True)
class CoordinatorOptions:
    broker: str
    region: str
    state_dir: Path
    model: str = "digits"
    coordinator_id: str = ""
    strategy: str = "spin"
    strategy_params: Mapping[str, Any] = field(default_factory=lambda: {"k": 10, "timeout_s": 30.0})
    init: Path | None = None
    encoding: Encoding = "f4"
    hints: Mapping[str, float] = field(default_factory=dict)
    keep_versions: int = 20
    seed: int = 0
    peering: str = "none"
    """``none`` | ``spyker`` | ``nebula`` | ``hierfavg`` (see :mod:`coordinator.peering`)."""
    peers: tuple[str, ...] = ()
    """Every coordinator id in ring order, this one included (``--peers``)."""
    peering_params: Mapping[str, Any] = field(default_factory=dict)
    full_sync_every: int = 0
    """LASP: every T-th version is a full sync, classifier-only versions between (0: off)."""


class CoordinatorDaemon:
    """Start with :meth:`start`, stop with :meth:`stop` (SIGTERM handler in the CLI)."""

    def __init__(
        self,
        options: CoordinatorOptions,
        *,
        task: Task | None = None,
        clock: Clock | None = None,
        on_commit: Callable[[int, Vector], None] | None = None,
    ) -> None:
        self.options = options
        self.task = task or get_task(options.model)
        self.clock = clock or WallClock()
        self.on_commit = on_commit
        self.coordinator_id = options.coordinator_id or f"coord-{options.region}"
        self.registry = Registry(options.state_dir, self.task.spec, keep_versions=options.keep_versions)
        strategy = make_strategy(options.strategy, **dict(options.strategy_params))
        peering = make_peering(
            options.peering,
            coordinator_id=self.coordinator_id,
            ring=options.peers or (self.coordinator_id,),
            strategy=strategy,
            params=options.peering_params,
        )
        self.core = CoordinatorCore(
            CoordinatorConfig(
                region=options.region,
                coordinator_id=self.coordinator_id,
                spec=self.task.spec,
                encoding=options.encoding,
                hints=dict(options.hints),
                full_sync_every=options.full_sync_every,
            ),
            strategy,
            self._initial_snapshot(),
            rng=random.Random(options.seed),
            peering=peering,
        )
        self.actor = Actor(f"coordinator-{options.region}", self.core.handle, self._perform, clock=self.clock)
        self.transport = MqttTransport(
            options.broker,
            client_id=self.coordinator_id,
            subscriptions=self.core.subscriptions(),
            on_message=self._on_message,
        )
        self.stopped = threading.Event()

    def _initial_snapshot(self) -> Snapshot:
        snap = self.registry.load()
        if snap is not None:
            log.info("resuming from %s at version %d (%d pending updates)", self.registry.root, snap.version, len(snap.buffer))
            return snap
        if self.options.init is not None:
            _, weights, _ = load_model(self.options.init, expect=self.task.spec)
            source = str(self.options.init)
        else:
            log.info("empty state dir: pretraining the deployed %s model", self.task.name)
            weights, source = self.task.pretrained(seed=self.options.seed), f"pretrained:{self.task.name}"
        self.registry.initialise(weights, now=self.clock.now(), source=source)
        loaded = self.registry.load()
        assert loaded is not None
        return loaded

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 15.0) -> CoordinatorDaemon:
        self.actor.start()
        self.transport.start(timeout)
        self.actor.call(lambda: self.actor.run_actions(self.core.start(self.clock.now())))
        log.info(
            "coordinator %s serving %s v%d on %s (strategy %s, peering %s)",
            self.coordinator_id, self.task.spec.model_id, self.core.version, self.options.broker, self.core.strategy.describe(),
            self.options.peering,
        )
        return self

    def stop(self) -> None:
        if self.stopped.is_set():
            return
        self.transport.stop()
        self.actor.stop()
        self.stopped.set()

    def __enter__(self) -> CoordinatorDaemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ IO

    def _on_message(self, topic: str, payload: bytes) -> None:
        from edge_sdk.core.events import MessageReceived

        self.actor.submit(lambda now: MessageReceived(now=now, topic=topic, payload=payload))

    def _perform(self, action: object) -> None:
        if isinstance(action, Publish):
            self.transport.publish(action.topic, action.payload, qos=action.qos, retain=action.retain)
        elif isinstance(action, PersistUpdate):
            self.registry.persist_update(action.update)
        elif isinstance(action, CommitVersion):
            self.registry.commit(action)
            if action.metadata.get("source") == "peer":
                log.info("version %d: merged %s's model (%s)", action.version, action.metadata.get("peer", "?"),
                         {k: v for k, v in action.metadata.items() if k in ("sid", "age", "cloud_round")})
            else:
                log.info(
                    "version %d from %d updates (mean staleness %.2f)",
                    action.version, action.metadata.get("n_updates", 0), action.metadata.get("mean_staleness", 0.0),
                )
            if self.on_commit is not None:
                self.on_commit(action.version, action.weights)
        elif isinstance(action, Notify):
            if action.kind == "rejected":
                log.warning("rejected a message: %s", action.data)
            else:
                log.debug("%s %s", action.kind, action.data)
        else:
            raise TypeError(f"unknown action {action!r}")
