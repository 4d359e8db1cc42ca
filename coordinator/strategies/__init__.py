"""Aggregation strategies, chosen by name.

``make_strategy("spin", k=10, timeout_s=30)`` — every strategy is a small class configured by
a frozen dataclass; adding one is one entry in ``_FACTORIES``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from coordinator.strategies.base import BufferedUpdate, CoordinatorView, Plan, Strategy
from coordinator.strategies.spin import SpinConfig, SpinNoTimeoutStrategy, SpinStrategy
from edge_sdk.errors import ConfigError


def _spin(**kw: Any) -> Strategy:
    return SpinStrategy(SpinConfig(**kw))


def _spin_notimeout(**kw: Any) -> Strategy:
    return SpinNoTimeoutStrategy(SpinConfig(**kw))


_FACTORIES: dict[str, Callable[..., Strategy]] = {
    "spin": _spin,
    "spin-notimeout": _spin_notimeout,
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
    "Plan",
    "Strategy",
    "make_strategy",
    "register",
    "strategy_names",
]
