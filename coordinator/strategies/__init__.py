"""Aggregation strategies, chosen by name.

``make_strategy("spin", k=10, timeout_s=30)`` — every strategy is a small class configured by
a frozen dataclass; adding one is its module and one :func:`register` call with its factory
*and* its config (or an entry in both ``_FACTORIES`` and ``CONFIGS``): without the config its
parameters' names and types go unchecked, and the CLI's named flags (``--k``…) do not reach it.

========================  =====================================================================
``spin``                  serve every pull; aggregate at K updates or after timeout π (000)
``spin-notimeout``        SPIN without π (the paper's ablation)
``fedbuff``               server draws ``select`` of N devices per round; aggregate at K (strictly;
                          ``strict_k = false`` also closes a round when nobody drawn still trains)
``port``                  FedBuff's selection + staleness/similarity-aware weights (PORT), and
                          push-pull: very stale in-flight devices are asked for their work so far
``fedasync``              serve every pull; mix each update in on arrival, α·(τ+1)^−a
``fedavg``                synchronous rounds over invited devices that have data
``spyker``                age-damped mixing on arrival + per-device lr decay (004); its
                          peering ``spyker`` shares the age ledger
``nebula``                planets / stellar / master models (003); peering ``nebula`` rotates
``hierfavg``              FedAvg edge rounds that wait for the cloud (peering ``hierfavg``)
``fedopt`` / ``fedadam``  synchronous rounds + server optimizer over the mean pseudo-gradient
                          (``sgd`` η = 1 is FedAvg; ``fedadam``: Reddi et al.'s FedAdam)
``hfedms``                HFedMS-S: sequential chains in ICG label-mix groups, f(r) groups (002)
========================  =====================================================================

A strategy that shares state with a peering protocol is wired to it by
:func:`coordinator.methods.make_method`, never built alone by a driver. Staleness
discounts go through :mod:`coordinator.strategies.staleness` (one function, policies by name).

The averaging strategies (spin, fedbuff, port, fedavg, hierfavg)
fold updates on arrival and share the robust defences of :mod:`coordinator.strategies.robust`,
configured through their configs: ``combiner`` (mean | median | trimmed-mean | krum |
multi-krum), ``clip_multiplier``, ``max_staleness``, ``sample_weight_cap``, ``device_share``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from coordinator.strategies.base import BufferedUpdate, CoordinatorView, Plan, Strategy
from coordinator.strategies.fedasync import FedAsyncConfig, FedAsyncStrategy
from coordinator.strategies.fedavg import FedAvgConfig, FedAvgStrategy
from coordinator.strategies.fedbuff import FedBuffConfig, FedBuffStrategy
from coordinator.strategies.fedopt import FedAdamStrategy, FedOptConfig, FedOptStrategy
from coordinator.strategies.hfedms import HFedMSConfig, HFedMSStrategy
from coordinator.strategies.hierfavg import HierEdgeStrategy
from coordinator.strategies.nebula import NebulaConfig, NebulaStrategy
from coordinator.strategies.params import check_params, did_you_mean, owned
from coordinator.strategies.port import PortConfig, PortStrategy
from coordinator.strategies.spin import SpinConfig, SpinNoTimeoutStrategy, SpinStrategy
from coordinator.strategies.spyker import SpykerConfig, SpykerStrategy
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


def _spyker(**kw: Any) -> Strategy:
    return SpykerStrategy(SpykerConfig(**kw))


def _nebula(**kw: Any) -> Strategy:
    return NebulaStrategy(NebulaConfig(**kw))


def _hierfavg(**kw: Any) -> Strategy:
    return HierEdgeStrategy(FedAvgConfig(**kw))


def _fedopt(**kw: Any) -> Strategy:
    return FedOptStrategy(FedOptConfig(**kw))


def _fedadam(**kw: Any) -> Strategy:
    kw.setdefault("server_opt", "adam")
    kw.setdefault("server_lr", 0.01)
    return FedAdamStrategy(FedOptConfig(**kw))


def _hfedms(**kw: Any) -> Strategy:
    return HFedMSStrategy(HFedMSConfig(**kw))


_FACTORIES: dict[str, Callable[..., Strategy]] = {
    "spin": _spin,
    "spin-notimeout": _spin_notimeout,
    "fedbuff": _fedbuff,
    "port": _port,
    "fedasync": _fedasync,
    "fedavg": _fedavg,
    "spyker": _spyker,
    "nebula": _nebula,
    "hierfavg": _hierfavg,
    "fedopt": _fedopt,
    "fedadam": _fedadam,
    "hfedms": _hfedms,
}

CONFIGS: dict[str, type] = {
    "spin": SpinConfig, "spin-notimeout": SpinConfig, "fedbuff": FedBuffConfig, "port": PortConfig,
    "fedasync": FedAsyncConfig, "fedavg": FedAvgConfig, "spyker": SpykerConfig, "nebula": NebulaConfig,
    "hierfavg": FedAvgConfig, "fedopt": FedOptConfig, "fedadam": FedOptConfig, "hfedms": HFedMSConfig,
}
"""Each strategy's config dataclass: the parameters ``make_strategy(name, ...)`` accepts."""

COMPANIONS: dict[str, str] = {"spyker": "spyker", "nebula": "nebula", "hierfavg": "hierfavg"}
"""Strategy → the peering protocol whose state it shares: it never runs without it
(:func:`coordinator.methods.make_method` adds it, on a lone coordinator a ring of one)."""


def strategy_params(name: str) -> list[str]:
    """The parameter names strategy ``name`` accepts (its config dataclass's fields)."""
    cls = CONFIGS.get(name)
    return [f.name for f in dataclasses.fields(cls)] if cls is not None else []


def strategy_names() -> list[str]:
    return sorted(_FACTORIES)


def register(name: str, factory: Callable[..., Strategy], config: type | None = None, *,
             companion: str | None = None) -> None:
    _FACTORIES[name] = factory
    if config is not None:
        CONFIGS[name] = config
    if companion is not None:
        COMPANIONS[name] = companion


def make_strategy(name: str, **params: Any) -> Strategy:
    """Build a strategy by name; unknown names and parameters raise ``ConfigError``."""
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise ConfigError(f"unknown strategy {name!r}{did_you_mean(name, _FACTORIES)}; known: {', '.join(strategy_names())}") from None
    config = CONFIGS.get(name)
    if config is not None:
        params = check_params(f"strategy {name!r}", config, params)  # names and types; ranges: the config
    try:
        return factory(**params)
    except TypeError as exc:
        known = strategy_params(name)
        raise ConfigError(f"strategy {name!r}: {exc}" + (f"; known parameters: {', '.join(known)}" if known else "")) from exc
    except ConfigError as exc:  # a range check in the config: say whose parameter it is
        owned(exc, "strategy", name)


__all__ = [
    "COMPANIONS",
    "CONFIGS",
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
    "strategy_params",
]
