"""Coordinator ↔ coordinator model exchange (pluggable, sans-IO), chosen by name: protocol only.

=============  ==========================================================================
``none``       a lone coordinator (the default)
``spyker``     token ring, age-weighted asynchronous merges (004); shares the age ledger
               of strategy ``spyker`` (any other strategy: one unit of age per version);
               ``mode = "sync"``: Sync-Spyker, the paper's synchronous server exchange
``nebula``     model rotation to coordinator (i + r) mod |C| every t_c (003); needs
               strategy ``nebula`` (the planets live there)
``hierfavg``   synchronous two-tier hierarchy (HierFAVG-like baseline); needs strategy
               ``hierfavg`` (FedAvg edge rounds that wait for the cloud)
=============  ==========================================================================

The strategies live in :mod:`coordinator.strategies`; a strategy and its peering are wired
together, once, by :func:`coordinator.methods.make_method`.

Adding a protocol: its module, and here its name in :data:`PEERINGS`, its config dataclass in
``_CONFIGS`` and its builder in ``_BUILDERS`` (the CLI's ``--peering`` and a regional
scenario's ``kind`` read ``PEERINGS``; a peering that works with any strategy needs
``strategy = …`` on its scenario lines).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from coordinator.peering.base import BROADCAST, Peering, PeerPlan, PeerSend
from coordinator.peering.hier import HierPeerConfig, HierPeering
from coordinator.peering.nebula import NebulaPeerConfig, NebulaPeering
from coordinator.peering.spyker import SpykerPeerConfig, SpykerPeering, SyncSpykerPeering
from coordinator.strategies.base import Strategy
from coordinator.strategies.params import owned
from edge_sdk.errors import ConfigError

__all__ = [
    "BROADCAST",
    "PEERINGS",
    "PeerPlan",
    "PeerSend",
    "Peering",
    "make_peering",
    "peering_params",
]

PEERINGS = ("none", "spyker", "nebula", "hierfavg")
_CONFIGS: dict[str, type] = {"spyker": SpykerPeerConfig, "nebula": NebulaPeerConfig, "hierfavg": HierPeerConfig}


def _spyker(coordinator_id: str, ring: tuple[str, ...], config: Any, strategy: Strategy | None) -> Peering:
    cls = SyncSpykerPeering if config.mode == "sync" else SpykerPeering
    return cls(coordinator_id, ring, config, strategy=strategy)


_BUILDERS: dict[str, Callable[[str, tuple[str, ...], Any, Strategy | None], Peering]] = {
    "spyker": _spyker,
    "nebula": lambda me, ring, config, strategy: NebulaPeering(me, ring, config, strategy=strategy),
    "hierfavg": lambda me, ring, config, strategy: HierPeering(me, ring, config, strategy=strategy),
}
"""Name -> how its component is built from (coordinator id, ring, config, strategy). A name in
``PEERINGS`` / ``_CONFIGS`` without one is a ConfigError, never another protocol."""


def peering_params(name: str) -> list[str]:
    """The parameter names ``make_peering(name, ...)`` accepts."""
    cls = _CONFIGS.get(name)
    return [f.name for f in dataclasses.fields(cls)] if cls is not None else []


def make_peering(
    name: str,
    *,
    coordinator_id: str,
    ring: Sequence[str] = (),
    strategy: Strategy | None = None,
    params: Mapping[str, Any] | None = None,
) -> Peering:
    """Build a peering component; unknown names or parameters raise ``ConfigError``.

    ``ring`` lists every coordinator id in ring order (this one included); ``strategy`` is
    the coordinator's strategy, whose state the peering shares when they belong together.
    Drivers call :func:`coordinator.methods.make_method`, which also checks the pairing.
    """
    params = dict(params or {})
    if name == "none":
        if params:
            raise ConfigError(f"peering 'none' takes no parameters, got {sorted(params)}")
        return Peering()
    if name not in _CONFIGS:
        raise ConfigError(f"unknown peering {name!r}; known: {', '.join(PEERINGS)}")
    ring = tuple(ring) or (coordinator_id,)
    try:
        config = _CONFIGS[name](**params)
    except TypeError as exc:
        raise ConfigError(f"peering {name!r}: {exc}; known parameters: {', '.join(peering_params(name))}") from exc
    except ConfigError as exc:  # a range check in the config: say whose parameter it is
        owned(exc, "peering", name)
    builder = _BUILDERS.get(name)
    if builder is None:  # registered by half (PEERINGS / _CONFIGS): it used to fall through to HierPeering
        raise ConfigError(f"peering {name!r} has a config but no builder in coordinator.peering._BUILDERS")
    return builder(coordinator_id, ring, config, strategy)
