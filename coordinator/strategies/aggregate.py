"""Aggregation maths: pure functions over flat float32 vectors.

Updates may carry the whole vector or one layer group's slice (LASP). The whole updates
give every slice; a group whose slice-only updates are in the buffer takes their mean
instead (the same in both rules: a model's mean, or the current slice plus their mean
change); slices no update carries keep their current values. (The core no longer hands a
strategy such a mix: a full sync with whole models leaves head-only updates out.)

The averaging strategies no longer call ``weighted_average`` / ``fedavg`` / ``fedavg_deltas``
on the hot path: they fold each update on arrival (:mod:`coordinator.strategies.robust`).
These functions stay as the reference implementations the fold is tested against
(``tests/test_robust.py``) and the baseline of ``benchmarks/aggregation.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from coordinator.strategies.base import BufferedUpdate
from edge_sdk.spec import ModelSpec, Vector


def weighted_average(
    current: Vector, updates: Sequence[BufferedUpdate], weights: Sequence[float], spec: ModelSpec
) -> Vector:
    """Σ p_k w_k per slice, p normalised over the updates carrying that slice."""
    out = np.array(current, dtype=np.float32, copy=True)
    by_group: dict[str, list[tuple[BufferedUpdate, float]]] = {}
    for u, p in zip(updates, weights, strict=True):
        by_group.setdefault(u.group, []).append((u, p))
    # Full-vector updates first, then group slices overwrite their part: a slice-only
    # update is the fresher word on its slice within the same buffer.
    for group in sorted(by_group, key=lambda g: g != "full"):
        members = by_group[group]
        total = float(sum(p for _, p in members))
        if total <= 0:
            continue
        sl = spec.group_slice(group)
        acc = np.zeros(sl.stop - sl.start, dtype=np.float64)
        for u, p in members:
            acc += (p / total) * u.weights
        out[sl] = acc.astype(np.float32)
    return out


def fedavg(current: Vector, updates: Sequence[BufferedUpdate], spec: ModelSpec) -> Vector:
    """FedAvg over the buffer with p_k = |D_k| / Σ|D| (SPIN Algorithm 2, line 10)."""
    return weighted_average(current, updates, [float(u.n_samples) for u in updates], spec)


def mix(current: Vector, update: BufferedUpdate, alpha: float, spec: ModelSpec) -> Vector:
    """w ← (1 − α) w + α w_k on the update's slice (FedAsync-style mixing)."""
    out = np.array(current, dtype=np.float32, copy=True)
    sl = spec.group_slice(update.group)
    out[sl] = (1.0 - alpha) * out[sl] + alpha * update.weights
    return out


def fedavg_deltas(
    current: Vector,
    updates: Sequence[BufferedUpdate],
    spec: ModelSpec,
    base_of: Callable[[int], Vector | None],
    server_lr: float = 1.0,
) -> Vector:
    """w ← w + η Σ p_k (w_k − w_base(k)), p_k ∝ |D_k| (FedBuff-style, per slice).

    Equal to :func:`fedavg` when every update starts from the current version and η = 1;
    with stale updates it keeps the progress made since their base instead of dragging the
    model back to it. An update whose base is no longer retained falls back to
    ``w_k − w`` (model averaging) for its share. As in :func:`weighted_average`, a group's
    slice-only updates give that slice alone (its mean change replaces the whole updates'
    there; adding both changes stepped the slice twice).
    """
    out = np.array(current, dtype=np.float32, copy=True)
    totals: dict[str, float] = {}
    for u in updates:
        totals[u.group] = totals.get(u.group, 0.0) + float(u.n_samples)
    for group in sorted(totals, key=lambda g: g != "full"):  # full first, then each group's own
        total = totals[group]
        if total <= 0:
            continue
        sl = spec.group_slice(group)
        if group != "full":
            out[sl] = current[sl]
        for u in updates:
            if u.group != group:
                continue
            base = base_of(u.base_version)
            reference = current[sl] if base is None else base[sl]
            out[sl] += np.float32(server_lr * u.n_samples / total) * (u.weights - reference)
    return out
