"""A *method*: a strategy, an optional peering protocol and the state they share, wired once.

Drivers (the daemon, the emulators, the tests) build both through :func:`make_method`
instead of calling ``make_strategy`` and ``make_peering`` side by side, so a pairing is
checked in one place:

* a strategy that shares state with a peering (``coordinator.strategies.COMPANIONS``: Spyker's age ledger and
  learning-rate decay, NebulaFL's planets, HierFAVG's gate) gets that peering even on a lone
  coordinator (a ring of one: no messages, but the lr decay reaches devices and the age
  ledger is checkpointed); asking for it with a *different* peering is a ConfigError;
* a peering that needs a particular strategy refuses any other (the peering checks it);
* LASP (``full_sync_every`` = T > 1) needs a strategy that can take a head-only version: one
  that cannot is a ConfigError (:func:`check_lasp`, also run by the coordinator core, which
  every driver builds);
* ``params`` are split by name between the strategy's and the peering's config dataclasses
  (a name both know, e.g. NebulaFL's ``t_c``, goes to both); a name neither knows is a
  ConfigError listing the valid ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from coordinator.peering import (
    _CONFIGS as PEERING_CONFIGS,  # the peering config dataclasses, for check_params
)
from coordinator.peering import PEERINGS, Peering, make_peering
from coordinator.peering import peering_params as peering_fields
from coordinator.strategies import COMPANIONS, Strategy, make_strategy, strategy_names
from coordinator.strategies import strategy_params as strategy_fields
from coordinator.strategies.params import check_params, did_you_mean
from edge_sdk.errors import ConfigError

__all__ = ["COMPANIONS", "NO_LASP", "Method", "check_lasp", "make_method", "method_params", "split_params"]

NO_LASP: dict[str, str] = {
    "hfedms": "its chain commits whole models: between full syncs only the head of each step would be kept, so "
              "a group would not start from the round's model, nor would the round's mean be taken whole "
              "(HFedMS-S is STP + ICG without SCC/LASP)",
    "fedasync": "it makes a version of every update, so the version an update lands on is seldom the one "
                "its device was told to train for (the whole model for a full sync, else the head): full syncs "
                "commit a head and leave the extractor where it was, and heads trained before them are refused "
                "(10 devices, T = 5: 3 of 80 full syncs moved the extractor, 697 updates refused for 400 taken)",
}
"""Strategies that LASP's partial versions would make do something else than they say, and why."""


@dataclass(frozen=True, slots=True)
class Method:
    strategy: Strategy
    peering: Peering

    @property
    def name(self) -> str:
        peering = self.peering.name
        return self.strategy.name if peering in ("none", self.strategy.name) else f"{self.strategy.name}+{peering}"


def resolve_names(strategy: str | None, peering: str | None) -> tuple[str, str]:
    """The (strategy, peering) pair a request means: a peering alone brings its own
    strategy; a strategy alone brings its companion peering (or none)."""
    peering = peering or "none"
    if peering not in PEERINGS:
        raise ConfigError(f"unknown peering {peering!r}; known: {', '.join(PEERINGS)}")
    if strategy is None:
        strategy = peering if peering in COMPANIONS else "spin"
    if strategy not in strategy_names():
        raise ConfigError(f"unknown strategy {strategy!r}{did_you_mean(strategy, strategy_names())}; known: {', '.join(strategy_names())}")
    companion = COMPANIONS.get(strategy)
    if companion is not None:
        if peering == "none":
            peering = companion
        elif peering != companion:
            raise ConfigError(
                f"strategy {strategy!r} shares its state with peering {companion!r}; it cannot run with "
                f"peering {peering!r} (use --peering {companion} or another strategy)"
            )
    return strategy, peering


def check_lasp(strategy: Strategy, full_sync_every: int) -> None:
    """A ConfigError when ``strategy`` cannot run under LASP with period ``full_sync_every``. T = 1
    (every version a full sync) and 0 (off) suit every strategy."""
    reason = NO_LASP.get(strategy.name)
    if full_sync_every > 1 and reason is not None:
        raise ConfigError(f"strategy {strategy.name!r} cannot run with LASP (full_sync_every = {full_sync_every}): "
                          f"{reason}; use full_sync_every = 0")


def method_params(strategy: str, peering: str) -> list[str]:
    """Every parameter name the pair accepts."""
    return sorted(set(strategy_fields(strategy)) | set(peering_fields(peering)))


def split_params(strategy: str, peering: str, params: Mapping[str, Any], *,
                 strict: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(strategy params, peering params)`` by config field name. Unknown names raise, or
    with ``strict=False`` stay with the strategy (whose config rejects them when built)."""
    s_known, p_known = set(strategy_fields(strategy)), set(peering_fields(peering))
    unknown = sorted(set(params) - s_known - p_known)
    if not strict:
        s_known |= set(unknown)
    elif unknown:
        known = method_params(strategy, peering)
        raise ConfigError(
            f"unknown parameter(s) {', '.join(unknown)}{did_you_mean(unknown[0], known)} for strategy {strategy!r}"
            + (f" with peering {peering!r}" if peering != "none" else "")
            + f"; known parameters: {', '.join(known)}"
        )
    return ({k: v for k, v in params.items() if k in s_known}, {k: v for k, v in params.items() if k in p_known})


def make_method(
    strategy: str | None = None,
    *,
    peering: str | None = None,
    coordinator_id: str = "local",
    ring: Sequence[str] = (),
    params: Mapping[str, Any] | None = None,
    strategy_params: Mapping[str, Any] | None = None,
    peering_params: Mapping[str, Any] | None = None,
    full_sync_every: int = 0,
) -> Method:
    """Build a consistent strategy + peering pair; every misconfiguration is a ConfigError.

    ``params`` are split by name (see :func:`split_params`); ``strategy_params`` and
    ``peering_params`` go to one side only (and win over ``params``). ``full_sync_every``: the
    LASP period the pair will run under (:func:`check_lasp`)."""
    s_name, p_name = resolve_names(strategy, peering)
    s_params, p_params = split_params(s_name, p_name, params or {})
    s_params.update(strategy_params or {})
    p_params.update(peering_params or {})
    if p_name in PEERING_CONFIGS:
        p_params = check_params(f"peering {p_name!r}", PEERING_CONFIGS[p_name], p_params)
    built = make_strategy(s_name, **s_params)
    check_lasp(built, full_sync_every)
    ring = tuple(ring) or (coordinator_id,)
    peer = make_peering(p_name, coordinator_id=coordinator_id, ring=ring, strategy=built, params=p_params)
    return Method(strategy=built, peering=peer)
