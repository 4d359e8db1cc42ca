"""Real-MQTT fleet mode: hundreds of devices in one process, each a real MQTT client.

Every device is a full :class:`~edge_sdk.client.EdgeClient` — its own broker connection and
client id, its own durable sample store, the real DeviceCore, a real local trainer — so a
coordinator under test sees exactly what a deployed fleet would send. Labelling follows
the scenario's Poisson rate, sped up by ``time_scale`` (wall seconds = scenario seconds /
time_scale). The fleet records every model version its devices receive, so accuracy over
time can be measured without asking the coordinator.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from devices.live import LabellingLoop, LabellingUser
from edge_sdk.client import EdgeClient
from edge_sdk.spec import Vector
from edge_sdk.tasks.base import Split, Task, TrainConfig

log = logging.getLogger("edgeci.fleet")


@dataclass
class FleetStats:
    """What the fleet observed, in wall seconds since start."""

    versions: list[tuple[float, int]] = field(default_factory=list)
    acked: int = 0
    rejected: int = 0
    trained: int = 0
    latest: tuple[int, Vector] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


class MqttFleet:
    """``with MqttFleet(...) as fleet: fleet.run(seconds)`` — see the module docstring."""

    def __init__(
        self,
        *,
        broker: str,
        region: str,
        task: Task,
        partitions: Sequence[npt.NDArray[np.int64]],
        rate: float,
        min_samples: int,
        train: TrainConfig,
        time_scale: float = 1.0,
        seed: int = 0,
        prefix: str = "fleet",
        connect_timeout: float = 30.0,
    ) -> None:
        self.task = task
        self.stats = FleetStats()
        pool = task.data().pool
        self.clients: list[EdgeClient] = []
        users = []
        self._t0 = time.monotonic()
        for i, idx in enumerate(partitions):
            name = f"{prefix}-{i:04d}"
            client = EdgeClient(
                broker=broker, device_id=name, region=region, task=task, durable=False,
                min_samples=min_samples, train=TrainConfig(epochs=train.epochs, batch_size=train.batch_size, lr=train.lr, seed=seed + i),
                seed=seed + i, inference="torch",
            )
            client.on("*", self._on_event)
            self.clients.append(client)
            users.append(LabellingUser(name=name, stream=Split(x=pool.x[idx], y=pool.y[idx]), add=client.add_sample, rate=rate))
        self._connect_timeout = connect_timeout
        self.loop = LabellingLoop(users, seed=seed, time_scale=time_scale)

    def _on_event(self, kind: str, data: dict[str, Any]) -> None:
        s = self.stats
        with s.lock:
            if kind == "model":
                s.versions.append((time.monotonic() - self._t0, int(data["version"])))
            elif kind == "update_acked":
                s.acked += 1
            elif kind == "update_rejected":
                s.rejected += 1
            elif kind == "trained":
                s.trained += 1

    def start(self) -> MqttFleet:
        for c in self.clients:
            c.start(self._connect_timeout)
        self._t0 = time.monotonic()
        self.loop.start()
        return self

    def max_version(self) -> int:
        with self.stats.lock:
            return max((v for _, v in self.stats.versions), default=-1)

    def latest_weights(self) -> tuple[int, Vector] | None:
        """The newest model any device of the fleet holds."""
        best: tuple[int, Vector] | None = None
        for c in self.clients:
            v, w = c.version, c.weights
            if v is not None and w is not None and (best is None or v > best[0]):
                best = (v, w)
        return best

    def stop(self) -> None:
        self.loop.stop()
        for c in self.clients:
            try:
                c.stop()
            except Exception:
                log.exception("stopping %s", c.core.config.device_id)

    def __enter__(self) -> MqttFleet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
