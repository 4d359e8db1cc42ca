"""Aggregation strategies, chosen by name.

``make_strategy("spin", k=10, timeout_s=30)`` — every strategy is a small class configured by
a frozen dataclass; adding one is one :func:`register` call (or one entry in ``_FACTORIES``).

========================  =====================================================================
``spin``                  serve every pull; aggregate at K updates or after timeout π (000)
``spin-notimeout``        SPIN without π (the paper's ablation)
``fedbuff``               server draws ``select`` of N devices per round; aggregate at K
``port``                  FedBuff's selection + staleness/similarity-aware weights (PORT)
``fedasync``              serve every pull; mix each update in on arrival, α·(τ+1)^−a
``fedavg``                synchronous rounds over invited devices that have data
========================  =====================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from coordinator.strategies.base import BufferedUpdate, CoordinatorView, Plan, Strategy
from coordinator.strategies.fedasync import FedAsyncConfig, FedAsyncStrategy
from coordinator.strategies.fedavg import FedAvgConfig, FedAvgStrategy
from coordinator.strategies.fedbuff import FedBuffConfig, FedBuffStrategy
from coordinator.strategies.port import PortConfig, PortStrategy
from coordinator.strategies.spin import SpinConfig, SpinNoTimeoutStrategy, SpinStrategy
from edge_sdk.errors import ConfigError


def _spin(**kw: Any) -> Strategy:
    return SpinStrategy(SpinConfig(**kw))


def _spin_notimeout(**kw: Any) -> Strategy:
    return SpinNoTimeoutStrategy(SpinConfig(**kw))


def _fedbuff(**kw: Any) -> Strategy:
    return FedBuffStrategy(FedBuffConfig(**kw))


def _port(**kw: Any) -> Strategy:
    return PortStrategy(PortConfig(**kw))


def _fedasync(**kw: Any) -> Strategy:
    return FedAsyncStrategy(FedAsyncConfig(**kw))


def _fedavg(**kw: Any) -> Strategy:
    return FedAvgStrategy(FedAvgConfig(**kw))


_FACTORIES: dict[str, Callable[..., Strategy]] = {
    "spin": _spin,
    "spin-notimeout": _spin_notimeout,
    "fedbuff": _fedbuff,
    "port": _port,
    "fedasync": _fedasync,
    "fedavg": _fedavg,
}


def strategy_names() -> list[str]:
    return sorted(_FACTORIES)


def register(name: str, factory: Callable[..., Strategy]) -> None:
    _FACTORIES[name] = factory


def make_strategy(name: str, **params: Any) -> Strategy:
    """Build a strategy by name; unknown names and parameters raise ``ConfigError``."""
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise ConfigError(f"unknown strategy {name!r}; known: {', '.join(strategy_names())}") from None
    try:
        return factory(**params)
    except TypeError as exc:
        raise ConfigError(f"strategy {name!r}: {exc}") from exc


__all__ = [
    "BufferedUpdate",
    "CoordinatorView",
    "FedAsyncStrategy",
    "FedAvgStrategy",
    "FedBuffStrategy",
    "Plan",
    "PortStrategy",
    "SpinStrategy",
    "Strategy",
    "make_strategy",
    "register",
    "strategy_names",
]
