"""HierFAVG's edge strategy (Liu et al. 2020): synchronous FedAvg rounds that pause while
the edge waits for the cloud.

The gate is shared with :class:`coordinator.peering.hier.HierPeering` (the edge ↔ cloud
exchange, where the theory of operation lives); :func:`coordinator.methods.make_method`
wires the two.
"""

from __future__ import annotations

import random
from typing import ClassVar

from coordinator.strategies.base import BufferedUpdate, CoordinatorView, Plan
from coordinator.strategies.fedavg import FedAvgConfig, FedAvgStrategy

__all__ = ["HierEdgeStrategy", "HierGate"]


class HierGate:
    """Shared by the edge strategy and the peering: is the edge waiting for the cloud?"""

    def __init__(self) -> None:
        self.waiting = False
        self.samples = 0
        """Samples behind the updates aggregated since the last cloud round."""


class HierEdgeStrategy(FedAvgStrategy):
    """FedAvg rounds that pause while the edge waits for the cloud."""

    name: ClassVar[str] = "hierfavg"

    def __init__(self, config: FedAvgConfig | None = None) -> None:
        super().__init__(config)
        self.gate = HierGate()

    def plan(self, view: CoordinatorView, now: float, rng: random.Random) -> Plan:
        if self.gate.waiting and self.round_started_at is None:
            return Plan()  # between edge rounds and waiting for the cloud: start nothing
        return super().plan(view, now, rng)

    def on_update(self, view: CoordinatorView, update: BufferedUpdate, now: float) -> None:
        super().on_update(view, update, now)
        self.gate.samples += update.n_samples
