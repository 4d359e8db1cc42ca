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
``gradient-inversion``    :class:`Convert` when τ > ``convert_beyond`` (paper 001: recover a
                          synthetic set from the stale update, retrain it on the current
                          model; run by the driver on a worker), else ``damped``
``dc-asgd``               :class:`Convert` when τ > ``convert_beyond`` (first-order delay
                          compensation, DC-ASGD; cheap, the core computes it), else ``damped``
========================  ============================================================

Any policy takes an optional ``bound`` (``max_staleness``): beyond it the update is dropped
whatever the policy says. Strategies call :func:`staleness_factor` (one function, so the
discount is written once); a policy with ``asynchronous = True`` is for the core, which
asks the driver for the conversion as an action and gets the result back as an event
before the strategy sees the update (see :func:`needs_driver`).

Adding a policy: one class with ``name``, ``asynchronous`` and ``judge``, one entry in
:data:`POLICIES`. It is built from the parameters every strategy config carries (``a``,
``max_staleness`` as ``bound``, ``convert_beyond``: see :func:`make_policy`); a policy with a
parameter of its own also needs that field in the configs of the strategies that use it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Protocol

from coordinator.strategies.params import did_you_mean
from edge_sdk.errors import ConfigError, LocalProtocolError

__all__ = [
    "CONVERSIONS",
    "POLICIES",
    "Convert",
    "Converting",
    "Damp",
    "Damped",
    "DcAsgd",
    "Drop",
    "DropBeyond",
    "GradientInversion",
    "NoStaleness",
    "StalenessPolicy",
    "Use",
    "Verdict",
    "conversion_of",
    "converting_policy",
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
    """Ask for the update to be converted (the core's business, before the strategy sees it);
    ``fallback`` is the damping weight used when no conversion arrives in time."""

    kind: str
    fallback: float = 1.0


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


@dataclass(frozen=True, slots=True)
class Converting:
    """Convert updates staler than ``beyond``; damp every update by s(τ) otherwise and when
    a conversion does not arrive in time. Subclasses name the conversion."""

    beyond: float = 10.0
    a: float = 0.5
    name: ClassVar[str] = "converting"
    asynchronous: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not (self.beyond >= 0 and math.isfinite(self.beyond)):
            raise ConfigError(f"staleness {self.name!r}: convert_beyond must be a finite number >= 0")
        if not (self.a >= 0 and math.isfinite(self.a)):
            raise ConfigError(f"staleness {self.name!r}: a must be a finite number >= 0")

    def judge(self, staleness: float) -> Verdict:
        damp = polynomial(staleness, self.a)
        if staleness > self.beyond:
            return Convert(self.name, damp)
        return Damp(damp)


@dataclass(frozen=True, slots=True)
class GradientInversion(Converting):
    """Paper 001: the driver inverts the stale update into a synthetic set on a worker."""

    name: ClassVar[str] = "gradient-inversion"


@dataclass(frozen=True, slots=True)
class DcAsgd(Converting):
    """DC-ASGD first-order delay compensation, computed by the core (cheap)."""

    name: ClassVar[str] = "dc-asgd"


CONVERTING: dict[str, type[Converting]] = {GradientInversion.name: GradientInversion, DcAsgd.name: DcAsgd}
CONVERSIONS = tuple(CONVERTING)

POLICIES: dict[str, Callable[[float], StalenessPolicy]] = {
    "none": lambda a: NoStaleness(),
    "damped": lambda a: Damped(a),
}
"""Policies a bound can wrap (``drop-beyond`` is ``none`` with a bound)."""


def policy_names() -> list[str]:
    return sorted([*POLICIES, DropBeyond.name, *CONVERSIONS])


def make_policy(name: str, *, a: float = 0.5, bound: float | None = None, convert_beyond: float = 10.0) -> StalenessPolicy:
    """``none`` / ``damped`` (exponent ``a``) / ``drop-beyond`` (needs ``bound``) /
    ``gradient-inversion`` and ``dc-asgd`` (convert beyond ``convert_beyond``); a ``bound``
    with any other policy drops beyond it first. Unknown names raise ConfigError."""
    if name == DropBeyond.name:
        if bound is None:
            raise ConfigError("staleness 'drop-beyond' needs a bound (max_staleness)")
        return DropBeyond(bound)
    policy: StalenessPolicy
    if name in CONVERSIONS:
        policy = CONVERTING[name](convert_beyond, a)
    else:
        try:
            factory = POLICIES[name]
        except KeyError:
            raise ConfigError(f"unknown staleness policy {name!r}{did_you_mean(name, policy_names())}; "
                              f"known: {', '.join(policy_names())}") from None
        policy = factory(a)
    return DropBeyond(bound, policy) if bound is not None else policy


def staleness_factor(policy: StalenessPolicy, staleness: float) -> float | None:
    """The weight multiplier for an update ``staleness`` behind, or None to drop it.

    A :class:`Convert` verdict met here means the update reached the strategy unconverted
    (the conversion missed its deadline or failed, or the update was restored after a
    restart): its fallback damping applies. Converted updates arrive with the staleness of
    the model they were converted to."""
    verdict = policy.judge(staleness)
    if isinstance(verdict, Use):
        return 1.0
    if isinstance(verdict, Damp):
        return verdict.weight
    if isinstance(verdict, Drop):
        return None
    return verdict.fallback


def needs_driver(policy: StalenessPolicy) -> bool:
    """True for an asynchronous policy: the core must route stale updates through the driver."""
    return conversion_of(policy) is not None


def converting_policy(policy: StalenessPolicy) -> StalenessPolicy | None:
    """The converting policy, also under a bound (``max_staleness`` wraps it in a
    :class:`DropBeyond`, which converts what it does not drop), else None."""
    inner = policy.inner if isinstance(policy, DropBeyond) else policy
    return inner if inner.asynchronous else None


def conversion_of(policy: StalenessPolicy) -> str | None:
    """The converting policy's name (:func:`converting_policy`), else None."""
    converting = converting_policy(policy)
    return converting.name if converting is not None else None


def policy_of(strategy: object) -> StalenessPolicy:
    """The staleness policy a strategy applies (its config's ``staleness``, ``a`` and
    ``max_staleness``), for the core to ask before handing it an update; strategies
    without one use ``none``."""
    config = getattr(strategy, "config", None)
    name = getattr(config, "staleness", None)
    if not isinstance(name, str):
        return NoStaleness()
    return make_policy(name, a=float(getattr(config, "a", 0.5)), bound=getattr(config, "max_staleness", None),
                       convert_beyond=float(getattr(config, "convert_beyond", 10.0)))
