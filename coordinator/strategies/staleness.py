"""Staleness policies: what to do with an update trained from an old model, chosen by name.

A policy looks at τ (how far the update's base lags the model it is applied to: versions
for most strategies, model age for Spyker) and returns a :data:`Verdict`:

=================  ===================================================================
:class:`Use`       apply the update as it is (weight × 1)
:class:`Damp`      apply it with its weight multiplied by ``weight``
:class:`Drop`      do not apply it (it still leaves the buffer, counted)
:class:`Convert`   asynchronous: ask the driver to convert it (e.g. gradient inversion,
                   issue 15) and apply what comes back; never answered inside a strategy
=================  ===================================================================

========================  ============================================================
``none``                  :class:`Use` for every τ
``damped``                :class:`Damp` by s(τ) = (τ + 1)^(−a) (FedAsync, Spyker, NebulaFL)
``drop-beyond``           :class:`Drop` when τ > ``bound``, else :class:`Use`
========================  ============================================================

Any policy takes an optional ``bound`` (``max_staleness``): beyond it the update is dropped
whatever the policy says. Strategies call :func:`staleness_factor` (one function, so the
discount is written once); a policy with ``asynchronous = True`` is for the core, which
asks the driver for the conversion as an action and gets the result back as an event
before the strategy sees the update (see :func:`needs_driver`).

Adding a policy: one class with ``name``, ``asynchronous`` and ``judge``, one entry in
:data:`POLICIES`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Protocol

from edge_sdk.errors import ConfigError, LocalProtocolError

__all__ = [
    "POLICIES",
    "Convert",
    "Damp",
    "Damped",
    "Drop",
    "DropBeyond",
    "NoStaleness",
    "StalenessPolicy",
    "Use",
    "Verdict",
    "make_policy",
    "needs_driver",
    "policy_of",
    "polynomial",
    "staleness_factor",
]


@dataclass(frozen=True, slots=True)
class Use:
    """Apply the update unchanged."""


@dataclass(frozen=True, slots=True)
class Damp:
    """Apply the update with its weight multiplied by ``weight`` (in [0, 1])."""

    weight: float

    def __post_init__(self) -> None:
        if not (0.0 <= self.weight <= 1.0):
            raise LocalProtocolError(f"a damping weight must be in [0, 1], got {self.weight!r}")


@dataclass(frozen=True, slots=True)
class Drop:
    """Do not apply the update."""

    reason: str = "stale"


@dataclass(frozen=True, slots=True)
class Convert:
    """Ask the driver to convert the update (asynchronous; the core's business)."""

    kind: str


Verdict = Use | Damp | Drop | Convert


class StalenessPolicy(Protocol):
    """What a strategy (or the core) asks about a stale update."""

    name: ClassVar[str]
    asynchronous: ClassVar[bool]

    def judge(self, staleness: float) -> Verdict: ...


def polynomial(staleness: float, a: float) -> float:
    """s(τ) = (τ + 1)^(−a) (τ clamped at 0): the one place this discount is written."""
    return float((max(staleness, 0) + 1.0) ** (-a))


@dataclass(frozen=True, slots=True)
class NoStaleness:
    name: ClassVar[str] = "none"
    asynchronous: ClassVar[bool] = False

    def judge(self, staleness: float) -> Verdict:
        return Use()


@dataclass(frozen=True, slots=True)
class Damped:
    a: float = 0.5
    name: ClassVar[str] = "damped"
    asynchronous: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if not (self.a >= 0 and math.isfinite(self.a)):
            raise ConfigError("staleness 'damped': a must be a finite number >= 0")

    def judge(self, staleness: float) -> Verdict:
        return Damp(polynomial(staleness, self.a))


@dataclass(frozen=True, slots=True)
class DropBeyond:
    """Drop beyond ``bound``; otherwise ask ``inner`` (default: use as is)."""

    bound: float
    inner: StalenessPolicy = NoStaleness()
    name: ClassVar[str] = "drop-beyond"
    asynchronous: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if not (self.bound >= 0 and math.isfinite(self.bound)):
            raise ConfigError("staleness 'drop-beyond': bound (max_staleness) must be a finite number >= 0")

    def judge(self, staleness: float) -> Verdict:
        if staleness > self.bound:
            return Drop("stale")
        return self.inner.judge(staleness)


POLICIES: dict[str, Callable[[float], StalenessPolicy]] = {
    "none": lambda a: NoStaleness(),
    "damped": lambda a: Damped(a),
}
"""Policies a bound can wrap (``drop-beyond`` is ``none`` with a bound)."""


def policy_names() -> list[str]:
    return sorted([*POLICIES, DropBeyond.name])


def make_policy(name: str, *, a: float = 0.5, bound: float | None = None) -> StalenessPolicy:
    """``none`` / ``damped`` (exponent ``a``) / ``drop-beyond`` (needs ``bound``); a
    ``bound`` with any other policy drops beyond it first. Unknown names raise ConfigError."""
    if name == DropBeyond.name:
        if bound is None:
            raise ConfigError("staleness 'drop-beyond' needs a bound (max_staleness)")
        return DropBeyond(bound)
    try:
        factory = POLICIES[name]
    except KeyError:
        raise ConfigError(f"unknown staleness policy {name!r}; known: {', '.join(policy_names())}") from None
    policy = factory(a)
    return DropBeyond(bound, policy) if bound is not None else policy


def staleness_factor(policy: StalenessPolicy, staleness: float) -> float | None:
    """The weight multiplier for an update ``staleness`` behind, or None to drop it.

    Synchronous policies only: a :class:`Convert` verdict must have been resolved by the
    core before the strategy sees the update, so meeting one here is a wiring bug."""
    verdict = policy.judge(staleness)
    if isinstance(verdict, Use):
        return 1.0
    if isinstance(verdict, Damp):
        return verdict.weight
    if isinstance(verdict, Drop):
        return None
    raise LocalProtocolError(
        f"staleness policy {policy.name!r} asks the driver to {verdict.kind!r} an update; "
        "the core must resolve that before the strategy aggregates"
    )


def needs_driver(policy: StalenessPolicy) -> bool:
    """True for an asynchronous policy: the core must route stale updates through the driver."""
    return policy.asynchronous


def policy_of(strategy: object) -> StalenessPolicy:
    """The staleness policy a strategy applies (its config's ``staleness``, ``a`` and
    ``max_staleness``), for the core to ask before handing it an update; strategies
    without one use ``none``."""
    config = getattr(strategy, "config", None)
    name = getattr(config, "staleness", None)
    if not isinstance(name, str):
        return NoStaleness()
    return make_policy(name, a=float(getattr(config, "a", 0.5)), bound=getattr(config, "max_staleness", None))
