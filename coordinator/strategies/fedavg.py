"""FedAvg (McMahan et al., 2017) in synchronous rounds over devices that have data.

Every pull is deferred: a device with new data waits to be invited. When no round is in
progress and at least ``min_devices`` devices are waiting, a round starts: up to
``select`` of the waiting devices are drawn uniformly at random and invited. The round
ends when every invited device has reported; the buffer is then aggregated (FedAvg,
p_k = |D_k| / Σ|D|) and the next round may start at once. Updates are therefore never
stale, and the round lasts as long as its slowest participant — the price of synchrony.

``round_timeout_s`` (default off) closes a round after that long with whatever arrived,
for real fleets where an invited device may vanish.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from coordinator.strategies.base import BufferedUpdate, CoordinatorView, Plan
from coordinator.strategies.draws import Draws
from coordinator.strategies.robust import RobustAggregator, RobustConfig, RobustStrategy
from coordinator.strategies.rounds import counted, device_list, moment, round_and_draws
from edge_sdk.errors import ConfigError
from edge_sdk.spec import Vector

__all__ = ["FedAvgConfig", "FedAvgStrategy"]


@dataclass(frozen=True, slots=True, kw_only=True)
class FedAvgConfig(RobustConfig):
    select: int = 20
    """At most this many devices per round."""
    min_devices: int = 1
    """Start a round only once this many devices are waiting with data."""
    round_timeout_s: float | None = None

    def __post_init__(self) -> None:
        RobustConfig.__post_init__(self)
        if self.select < 1 or self.min_devices < 1:
            raise ConfigError("select and min_devices must be >= 1")
        if self.round_timeout_s is not None and not self.round_timeout_s > 0:
            raise ConfigError("round_timeout_s must be > 0 (or None)")


class FedAvgStrategy(RobustStrategy):
    """Synchronous rounds over invited devices. See the module docstring."""

    name: ClassVar[str] = "fedavg"

    def __init__(self, config: FedAvgConfig | None = None) -> None:
        self.config = config or FedAvgConfig()
        self.round = 0
        self.participants: set[str] = set()
        """Invited this round and not yet reported."""
        self.round_started_at: float | None = None
        self.robust = RobustAggregator(self.config, expected=self.config.select)
        self.draws = Draws()
        """The generator the participants are drawn from, kept with the round (helper-175: a restart
        drew from ``random.Random(seed)`` again, the run's first draws)."""
        self.restore_refused = 0
        """Parts of a checkpoint or round record that did not fit (not restored)."""

    def serve_pull(self, view: CoordinatorView, device: str, now: float) -> bool:
        return device in self.participants  # a retried pull of a participant

    def devices_per_round(self) -> tuple[int, str] | None:
        return (self.config.min_devices, "min_devices") if self.config.min_devices > 1 else None

    def selects(self) -> bool:
        return True

    def on_update(self, view: CoordinatorView, update: BufferedUpdate, now: float) -> None:
        self.robust.observe(view, update)
        self.participants.discard(update.device)

    def on_restore(self, view: CoordinatorView, update: BufferedUpdate) -> None:
        """A replayed update: its device reported (a round restored as drawn no longer waits for it)."""
        super().on_restore(view, update)
        self.participants.discard(update.device)

    def plan(self, view: CoordinatorView, now: float, rng: random.Random) -> Plan:
        cfg = self.config
        if self.round_started_at is not None:
            # A round restored on a clock behind the last process's (stepped back: a box without a
            # battery-backed clock before NTP) waited that much longer (helper-153's case for SPIN's π,
            # here through the round record): taken as drawn now. (Never ahead on a steady clock.)
            self.round_started_at = min(self.round_started_at, now)
            deadline = None if cfg.round_timeout_s is None else self.round_started_at + cfg.round_timeout_s
            timed_out = deadline is not None and now >= deadline
            if self.participants and not timed_out:
                return Plan(wake_at=deadline)
            # Round over: every participant reported, or the round timed out.
            self.participants.clear()
            self.round_started_at = None
            if view.buffer:
                return Plan(aggregate=True)
        if view.buffer:
            return Plan(aggregate=True)  # e.g. updates restored after a restart
        if len(view.deferred) < cfg.min_devices:
            return Plan()  # (counted before sorting: every pull while too few wait came here, 175 µs at 10,000 waiting)
        waiting = sorted(view.deferred)
        chosen = self.draws.rng(rng).sample(waiting, min(cfg.select, len(waiting)))
        self.participants = set(chosen)
        self.round_started_at = now
        self.round += 1
        return Plan(invite=tuple(chosen))

    def aggregate(self, view: CoordinatorView, updates: Sequence[BufferedUpdate]) -> Vector:
        return self.robust.combine(view, updates)

    def round_checkpoint(self) -> dict[str, Any]:
        """The rounds counted, the draws' generator and an open round (never open at a commit,
        which closes it: a round record holds one)."""
        opened = {"participants": sorted(self.participants), "started_at": self.round_started_at} if self.round_started_at is not None else {}
        return {**counted(self.round, self.draws), **opened}

    def restore_round(self, state: Mapping[str, Any]) -> None:
        self.round, refused = round_and_draws(state, self.round, self.draws)
        self.restore_refused += refused
        started, participants = moment(state.get("started_at")), device_list(state.get("participants"))
        if "started_at" not in state:
            self.round_started_at, self.participants = None, set()
        elif started is not None and participants is not None:
            self.round_started_at, self.participants = started, set(participants)
        else:
            self.restore_refused += 1

    def checkpoint(self) -> dict[str, Any]:
        return {**super().checkpoint(), **self.round_checkpoint()}

    def restore_state(self, state: Mapping[str, Any]) -> None:
        super().restore_state(state)
        self.restore_round(state)

    def describe(self) -> dict[str, Any]:
        c = self.config
        return {
            "name": self.name,
            "select": c.select,
            "min_devices": c.min_devices,
            "round_timeout_s": c.round_timeout_s,
            "round": self.round,
            "robust": self.robust.describe(),
            **({"restore_refused": self.restore_refused} if self.restore_refused else {}),
        }
