"""SPIN buffered-timeout aggregation (paper 000, Algorithm 2).

Every pull is answered at once with the current model. Updates are buffered; the buffer is
aggregated (FedAvg weighted by sample count) when it holds ``k`` updates, or when the
timeout ``timeout_s`` (π) has passed. The paper states π as a bound on how far behind the
model a fast client receives may be, measured from the last aggregation. We start π's
clock at ``max(last aggregation, first update entering an empty buffer)``: after a quiet
period a lone update then still waits π for company instead of replacing the model on
arrival, and the timeout never fires on an empty buffer. ``timeout_s=None`` is
SPIN-without-timeout (the paper's ablation).

``combine="models"`` (default) is the paper's rule: the new model *is* the sample-weighted
average of the buffered models. With stale or very few updates that replaces the model by a
few devices' views of an old version; ``combine="deltas"`` instead applies each update's
change from its own base version to the current model (identical when nothing is stale).
Measured: on the digits headline deltas reach 90 % 1.44× sooner; on the YOLOv8 detection
scenario, with staleness 1–3, deltas re-add the same step and mAP50 collapsed mid-run while
the paper's rule stayed stable — hence the default.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from coordinator.strategies.aggregate import fedavg, fedavg_deltas
from coordinator.strategies.base import BufferedUpdate, CoordinatorView, Plan, Strategy
from edge_sdk.errors import ConfigError
from edge_sdk.spec import Vector


@dataclass(frozen=True, slots=True, kw_only=True)
class SpinConfig:
    k: int = 10
    timeout_s: float | None = 30.0
    combine: str = "models"
    server_lr: float = 1.0

    def __post_init__(self) -> None:
        if self.combine not in ("models", "deltas"):
            raise ConfigError(f"combine must be 'models' (paper) or 'deltas', got {self.combine!r}")
        if not 0 < self.server_lr <= 1:
            raise ConfigError("server_lr must be in (0, 1]")
        if self.k < 1:
            raise ConfigError("k must be >= 1")
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise ConfigError("timeout_s must be > 0 (or None to disable the timeout)")


class SpinStrategy(Strategy):
    name: ClassVar[str] = "spin"

    def __init__(self, config: SpinConfig | None = None) -> None:
        self.config = config or SpinConfig()

    def deadline(self, view: CoordinatorView) -> float | None:
        first = view.first_buffered_at
        if self.config.timeout_s is None or first is None:
            return None
        return max(view.last_aggregation_at, first) + self.config.timeout_s

    def plan(self, view: CoordinatorView, now: float, rng: random.Random) -> Plan:
        if len(view.buffer) >= self.config.k:
            return Plan(aggregate=True)
        deadline = self.deadline(view)
        if deadline is None:
            return Plan()
        if now >= deadline:
            return Plan(aggregate=True)
        return Plan(wake_at=deadline)

    def aggregate(self, view: CoordinatorView, updates: Sequence[BufferedUpdate]) -> Vector:
        if self.config.combine == "deltas":
            return fedavg_deltas(view.weights, updates, view.spec, view.weights_at, self.config.server_lr)
        return fedavg(view.weights, updates, view.spec)

    def describe(self) -> dict[str, Any]:
        c = self.config
        return {"name": self.name, "k": c.k, "timeout_s": c.timeout_s, "combine": c.combine}


class SpinNoTimeoutStrategy(SpinStrategy):
    """SPIN with the timeout disabled: aggregate only when ``k`` updates are buffered."""

    name: ClassVar[str] = "spin-notimeout"

    def __init__(self, config: SpinConfig | None = None) -> None:
        c = config or SpinConfig()
        super().__init__(SpinConfig(k=c.k, timeout_s=None, combine=c.combine, server_lr=c.server_lr))
