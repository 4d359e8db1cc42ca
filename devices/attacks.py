"""Attacker devices for the emulator: label flipping, update scaling, inflated sample counts.

The device *core* stays honest (it is the real SDK): an attack lives in what the emulated
device app hands to it — the labels it trains on and the ``TrainingFinished`` it reports
(weights and claimed ``n_samples``) — which is exactly what a malicious client controls.

* ``flip``  — trains on ``y' = (y + 1) mod C`` (``flip = "shift"``) or on a fixed
  derangement of the classes drawn from the seed (``flip = "permutation"``).
* ``scale`` — sends ``base + s · (trained − base)`` (``s = scale_factor``, e.g. 1000; finite).
* ``claim`` — reports ``claimed_samples`` (e.g. 10^6, just at the core's hard cap, or 2^62
  to show the cap rejecting it) instead of the samples it trained on.

Which devices attack is a pure function of the seed and the fleet size (:func:`assign`),
so runs that differ only in their defences face the same attackers on the same data.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from edge_sdk.tasks.base import TrainResult

__all__ = ["Attack", "AttackPlan", "assign", "flip_labels"]

AttackKind = Literal["flip", "scale", "claim"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Attack:
    """What one attacker device does."""

    kind: AttackKind
    scale_factor: float = 1000.0
    claimed_samples: int = 1_000_000
    permutation: tuple[int, ...] = ()
    """For ``flip``: class c is trained as ``permutation[c]``."""

    def labels(self, y: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """The labels this device trains on (unchanged unless it flips labels)."""
        if self.kind != "flip":
            return y
        return np.asarray(self.permutation, dtype=np.int64)[y]

    def result(self, base: npt.NDArray[Any], honest: TrainResult) -> TrainResult:
        """The training result it reports instead of ``honest`` (trained from ``base``)."""
        if self.kind == "scale":
            base32 = np.asarray(base, dtype=np.float32)
            change = np.asarray(honest.weights, dtype=np.float32) - base32
            weights = (base32 + np.float32(self.scale_factor) * change).astype(np.float32)
            return replace(honest, weights=weights)
        if self.kind == "claim":
            return replace(honest, n_samples=int(self.claimed_samples))
        return honest


@dataclass(frozen=True, slots=True, kw_only=True)
class AttackPlan:
    """The scenario's ``[attack]`` table: fractions of the fleet per attack."""

    label_flip: float = 0.0
    flip: Literal["shift", "permutation"] = "shift"
    scale: float = 0.0
    scale_factor: float = 1000.0
    huge_samples: float = 0.0
    claimed_samples: int = 1_000_000

    @property
    def active(self) -> bool:
        return self.label_flip > 0 or self.scale > 0 or self.huge_samples > 0


def flip_labels(n_classes: int, how: str, rng: random.Random) -> tuple[int, ...]:
    """The class map of a label flipper: ``c → c + 1 mod C`` or a derangement (no fixed class)."""
    if how == "shift":
        return tuple((c + 1) % n_classes for c in range(n_classes))
    while True:
        perm = list(range(n_classes))
        rng.shuffle(perm)
        if all(p != c for c, p in enumerate(perm)):
            return tuple(perm)


def assign(plan: AttackPlan, n_devices: int, n_classes: int, seed: int) -> dict[int, Attack]:
    """Device index → attack. Disjoint sets; ``round(fraction × n_devices)`` devices each.
    Which devices attack depends only on ``seed`` and ``n_devices``, never on the defences."""
    rng = random.Random(f"{seed}:attackers")
    order = list(range(n_devices))
    rng.shuffle(order)
    perm = flip_labels(n_classes, plan.flip, random.Random(f"{seed}:flip"))
    out: dict[int, Attack] = {}
    at = 0
    for fraction, attack in (
        (plan.label_flip, Attack(kind="flip", permutation=perm)),
        (plan.scale, Attack(kind="scale", scale_factor=plan.scale_factor)),
        (plan.huge_samples, Attack(kind="claim", claimed_samples=plan.claimed_samples)),
    ):
        n = round(fraction * n_devices)
        for i in order[at : at + n]:
            out[i] = attack
        at += n
    return out
