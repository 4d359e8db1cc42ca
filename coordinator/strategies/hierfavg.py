"""HierFAVG's edge strategy (Liu et al. 2020): synchronous FedAvg rounds that pause while
the edge waits for the cloud.

The gate is shared with :class:`coordinator.peering.hier.HierPeering` (the edge ↔ cloud
exchange, where the theory of operation lives); :func:`coordinator.methods.make_method`
wires the two.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from typing import Any, ClassVar

from coordinator.strategies.base import BufferedUpdate, CoordinatorView, Plan
from coordinator.strategies.draws import Draws
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
        self.draws = Draws()
        """The generator the participants are drawn from, kept with each commit (helper-175: a restart
        drew from ``random.Random(seed)`` again, the run's first draws)."""
        self.restore_refused = 0
        """Parts of the checkpoint that did not fit (not restored)."""

    def plan(self, view: CoordinatorView, now: float, rng: random.Random) -> Plan:
        if self.gate.waiting and self.round_started_at is None:
            return Plan()  # between edge rounds and waiting for the cloud: start nothing
        return super().plan(view, now, self.draws.rng(rng))

    def on_restore(self, view: CoordinatorView, update: BufferedUpdate) -> None:
        """A replayed update: its device reported (a round restored as drawn no longer waits for it)."""
        super().on_restore(view, update)
        self.participants.discard(update.device)

    def checkpoint(self) -> dict[str, Any]:
        """The robust windows, and (helper-175) the rounds counted, the draws' generator and an open
        round (never open at a commit, which closes it; a record of the round as drawn holds one)."""
        draws = self.draws.checkpoint()
        opened = {"participants": sorted(self.participants), "started_at": self.round_started_at} if self.round_started_at is not None else {}
        return {**super().checkpoint(), "round": self.round, **({"draws": draws} if draws is not None else {}), **opened}

    def restore_state(self, state: Mapping[str, Any]) -> None:
        super().restore_state(state)
        rounds = state.get("round", 0)
        if type(rounds) is int and rounds >= 0:
            self.round = rounds
        else:
            self.restore_refused += 1
        if "draws" in state and not self.draws.restore(state["draws"]):
            self.restore_refused += 1  # (drawn from the core's generator, as before)
        if "started_at" in state:
            started, participants = state.get("started_at"), state.get("participants")
            if (isinstance(started, (int, float)) and not isinstance(started, bool) and math.isfinite(started)
                    and isinstance(participants, list) and all(isinstance(d, str) for d in participants)):
                self.round_started_at, self.participants = float(started), set(participants)
            else:
                self.restore_refused += 1

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), **({"restore_refused": self.restore_refused} if self.restore_refused else {})}

    def on_update(self, view: CoordinatorView, update: BufferedUpdate, now: float) -> None:
        super().on_update(view, update, now)
        self.gate.samples += update.n_samples
