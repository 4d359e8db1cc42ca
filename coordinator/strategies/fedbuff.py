"""FedBuff (Nguyen et al., AISTATS 2022) as the SPIN paper ran it: server-side selection.

The SPIN paper's baseline (000, §V-B6): "FedBuff and PORT randomly select 20 clients to
join the training in each round, and use the same minimum number of clients K = 10 before
aggregation; but if a selected client has no data sample generated recently, it cannot
participate in the current round." FedBuff itself has no timeout.

How that maps onto the coordinator core's defer/invite path:

* A device pulls when it has new data (the SPIN device protocol). Unless it is taking
  part in the current round, the pull is *deferred* (``serve_pull`` → False): the core
  acks ``deferred`` and lists the device in ``view.deferred`` — it has data and waits.
* A **round** begins with a draw: ``select − |in flight|`` devices uniformly at random
  from the population not in flight (``population`` = N devices, known or not yet seen;
  by default the devices seen so far). Drawn devices that are waiting with data are
  invited; drawn devices without new data cannot participate in this round (with
  ``late_join`` they may still join if they pull before the round ends). Only the draw
  invites: a device that starts waiting mid-round waits for a later draw.
* Aggregation (FedAvg by sample count over the buffer) happens when K updates are
  buffered — and only then (``strict_k``, the default: "FedBuff and PORT … lack a timeout
  mechanism", §V-B6). A round that ends with fewer than K updates (fewer than K drawn
  devices had data) carries its buffer into the next draw, which happens at once.
  With ``strict_k = false`` (the behaviour before issue 16, kept for the scenarios whose
  README figures were measured with it) a round also closes when nobody invited is still
  training and the buffer is not empty — an event-driven timeout of its own, so a fleet
  in which fewer than K devices ever get data still aggregates.
  Each aggregation ends the round; the next draw refills the in-flight set up to
  ``select`` (FedBuff's fixed concurrency). Stragglers of a round land in the next buffer
  with staleness ≥ 1.
* A round in which nobody could participate is redrawn when the next pull arrives (a
  device with new data, or one re-announcing itself) — event-driven, no timer.

``forget_after_s`` (default off, as in the paper) lets a real daemon stop waiting for an
invited device that vanished; the emulator never loses one, so it is not needed there. The
daemon sets 600 s unless told otherwise (``coordinator.daemon.DAEMON_FORGET_AFTER_S``).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from coordinator.strategies.base import BufferedUpdate, CoordinatorView, Plan
from coordinator.strategies.draws import Draws
from coordinator.strategies.robust import RobustAggregator, RobustConfig, RobustStrategy
from coordinator.strategies.rounds import count, counted, device_list, device_times, rows
from edge_sdk.errors import ConfigError
from edge_sdk.spec import Vector

__all__ = ["FedBuffConfig", "FedBuffStrategy", "draw_round"]


@dataclass(frozen=True, slots=True, kw_only=True)
class FedBuffConfig(RobustConfig):
    k: int = 10
    """Aggregate once this many updates are buffered."""
    select: int = 20
    """Devices in flight per round (the paper: 20 of 100)."""
    population: int | None = None
    """N, the population the draw samples from; unseen devices count as drawn-without-data.
    ``None`` = the devices that have pulled so far."""
    late_join: bool = False
    """Let a drawn device that gets data during its round join it (the paper: no)."""
    forget_after_s: float | None = None
    """Stop waiting for an invited device after this long (None = wait for ever)."""
    strict_k: bool = True
    """Aggregate only at K (the paper's FedBuff: no timeout): a round that ends with fewer
    updates carries its buffer into the next draw. The model never changes while fewer
    than K devices ever get data. ``False``: also close a round once no invited device is
    still training (the pre-issue-16 default; an implicit, event-driven timeout)."""

    def __post_init__(self) -> None:
        RobustConfig.__post_init__(self)
        if self.k < 1 or self.select < 1:
            raise ConfigError("k and select must be >= 1")
        if self.population is not None and self.population < 1:
            raise ConfigError("population must be >= 1 (or None for the devices seen)")
        if self.forget_after_s is not None and not self.forget_after_s > 0:
            raise ConfigError("forget_after_s must be > 0 (or None)")


def draw_round(
    candidates: Sequence[str], population: int, slots: int, rng: random.Random
) -> list[str]:
    """Sample ``slots`` members uniformly without replacement from a population of
    ``population`` of which ``candidates`` are the known ones (the rest are devices the
    server knows nothing about yet); return the known devices drawn, in draw order."""
    size = max(population, len(candidates))
    picks = rng.sample(range(size), min(max(slots, 0), size))
    return [candidates[i] for i in picks if i < len(candidates)]


class FedBuffStrategy(RobustStrategy):
    """Server-selected buffered asynchronous aggregation. See the module docstring."""

    name: ClassVar[str] = "fedbuff"

    def __init__(self, config: FedBuffConfig | None = None) -> None:
        self.config = config or FedBuffConfig()
        self.round = 0
        self.late_joiners: list[str] = []
        """Drawn this round without new data; with ``late_join`` they may still join it."""
        self.in_flight: dict[str, float] = {}
        """Devices invited (or let in) and not yet reported, with the time they were let in."""
        self._need_draw = True
        self._deferrals = 0
        """Pulls deferred so far (``serve_pull`` said no: the core files the device in ``view.deferred``)."""
        self._drawn_after = 0
        """``_deferrals`` at the last draw. Counted, not timed: a pull deferred at the very time of the
        draw (its own event, after it) is a device the draw did not see; compared by time it waited for
        a later one, and with the round empty nothing came (a restart's re-announcing devices, all at
        one instant on a virtual clock: FedBuff drew once and never again)."""
        self.robust = self._make_robust()
        self.draws = Draws()
        """The generator rounds are drawn from, kept with the round (a restart drew the run's first rounds again)."""
        self.restore_refused = 0
        """Parts of a checkpoint or round record that did not fit (not restored)."""

    def _make_robust(self) -> RobustAggregator:
        return RobustAggregator(self.config, expected=max(self.config.k, self.config.select))

    # ------------------------------------------------------------------ hooks

    def serve_pull(self, view: CoordinatorView, device: str, now: float) -> bool:
        if device in self.in_flight:
            return True  # a retried pull of a device already taking part
        if device in self.late_joiners:  # only ever filled with late_join on
            self.late_joiners.remove(device)
            self.in_flight[device] = now
            return True
        self._deferrals += 1
        return False

    def selects(self) -> bool:
        return True

    def on_update(self, view: CoordinatorView, update: BufferedUpdate, now: float) -> None:
        self.robust.observe(view, update)
        self._reported(update.device)

    def on_restore(self, view: CoordinatorView, update: BufferedUpdate) -> None:
        """A replayed update: its device reported (a round restored as drawn no longer waits for it)."""
        super().on_restore(view, update)
        if update.device in self.late_joiners:  # admitted after the round's record: its admission is not replayed
            self.late_joiners.remove(update.device)
        self._reported(update.device)

    def _reported(self, device: str) -> None:
        if self.in_flight.pop(device, None) is not None and self.config.strict_k and not self.in_flight:
            self._need_draw = True  # the round ended short of K: draw the next one now

    def on_aggregated(self, view: CoordinatorView, now: float) -> None:
        self._need_draw = True

    # ------------------------------------------------------------------ plan

    def plan(self, view: CoordinatorView, now: float, rng: random.Random) -> Plan:
        wake_at = self._forget_stragglers(now)
        buffered = len(view.buffer)
        strict = self.config.strict_k
        if buffered >= self.config.k or (buffered and not self.in_flight and not strict):
            return Plan(aggregate=True)
        empty_round = not self.in_flight and (strict or not buffered)
        invite: tuple[str, ...] = ()
        # "A device deferred since the last draw is waiting": a count, not a pass over every deferred
        # device after every event (a device that deferred and left stays there until a draw invites
        # it: 100,000 such ids, 3.3 ms an event). Such an entry leaves only when a draw invites it (a
        # deferred device is neither in flight nor a late joiner until a draw).
        if self._need_draw or (empty_round and self._deferrals > self._drawn_after):
            invite = self._draw(view, now, self.draws.rng(rng))
        if invite and self.config.forget_after_s is not None:
            wake_at = min(self.in_flight.values()) + self.config.forget_after_s
        return Plan(invite=invite, wake_at=wake_at)

    def _draw(self, view: CoordinatorView, now: float, rng: random.Random) -> tuple[str, ...]:
        """Start a round: draw devices; those waiting with data are invited (and in flight
        from now), the others cannot take part in this round (unless ``late_join``)."""
        cfg = self.config
        candidates = [d for d in view.devices_seen if d not in self.in_flight]
        population = (cfg.population if cfg.population is not None else len(view.devices_seen)) - len(self.in_flight)
        drawn = draw_round(candidates, population, cfg.select - len(self.in_flight), rng)
        deferred = view.deferred
        invite = tuple(d for d in drawn if d in deferred)
        for device in invite:
            self.in_flight[device] = now
        self.late_joiners = [d for d in drawn if d not in deferred] if cfg.late_join else []
        self.round += 1
        self._need_draw = False
        self._drawn_after = self._deferrals
        return invite

    def _forget_stragglers(self, now: float) -> float | None:
        limit = self.config.forget_after_s
        if limit is None or not self.in_flight:
            return None
        for device, since in list(self.in_flight.items()):
            if since > now:  # restored on a clock behind the last process's (stepped back): taken as let in now
                self.in_flight[device] = since = now
            if since + limit <= now:  # the same sum as the wake-up time below: a wake-up at it always forgets
                del self.in_flight[device]
        return min(self.in_flight.values()) + limit if self.in_flight else None

    # ------------------------------------------------------------------ durability

    def round_checkpoint(self) -> dict[str, Any]:
        """The rounds counted, who is in flight since when (a round outlives commits: each
        aggregation at K refills it), the drawn late joiners, whether a draw is due, and the draws' generator."""
        return {**counted(self.round, self.draws), "in_flight": rows(self.in_flight), "late_joiners": list(self.late_joiners),
                "need_draw": self._need_draw}

    def restore_round(self, state: Mapping[str, Any]) -> None:
        if "in_flight" not in state:
            return  # a checkpoint from before rounds were kept: the round starts afresh, as it did then
        rounds, in_flight, late = count(state.get("round")), device_times(state.get("in_flight")), device_list(state.get("late_joiners"))
        need = state.get("need_draw")
        if rounds is None or in_flight is None or late is None or not isinstance(need, bool):
            self.restore_refused += 1  # (the round starts afresh: a draw at the first plan)
            return
        # (the deferrals counted are not kept: the core's deferred devices are not either, and pull again)
        self.round, self.in_flight, self.late_joiners, self._need_draw = rounds, in_flight, late, need
        if "draws" in state and not self.draws.restore(state["draws"]):
            self.restore_refused += 1  # (drawn from the core's generator, as before)

    def checkpoint(self) -> dict[str, Any]:
        return {**super().checkpoint(), **self.round_checkpoint()}

    def restore_state(self, state: Mapping[str, Any]) -> None:
        super().restore_state(state)
        self.restore_round(state)

    # ------------------------------------------------------------------ maths

    def aggregate(self, view: CoordinatorView, updates: Sequence[BufferedUpdate]) -> Vector:
        return self.robust.combine(view, updates)

    def describe(self) -> dict[str, Any]:
        c = self.config
        return {
            "name": self.name,
            "k": c.k,
            "select": c.select,
            "population": c.population,
            "late_join": c.late_join,
            "forget_after_s": c.forget_after_s,
            "strict_k": c.strict_k,
            "round": self.round,
            "in_flight": len(self.in_flight),
            "robust": self.robust.describe(),
            **({"restore_refused": self.restore_refused} if self.restore_refused else {}),
        }
