"""Split a labelled pool over devices: IID, Dirichlet(α) label skew, or l labels per device.

Every partitioner returns one index array per device into the pool. The arrays are
pairwise disjoint and together cover the whole pool (every sample belongs to exactly one
device's user), and they depend only on the labels, the device count, the parameters and
the seed. Dirichlet(α) is the usual non-IID benchmark split (SPIN's paper uses α = 1):
for each class, the proportions of that class given to each device are one draw from
Dir(α, …, α), so small α concentrates each class on few devices.

What is split is a task's pool ``y`` of any sample kind (:mod:`edge_sdk.tasks.base`): class
labels, or for frames an object array of box arrays. A frame shows several classes and so
has no one label to skew by: frames are split IID only, and a label-aware partition of
them is refused (:func:`class_labels`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_sdk.errors import ConfigError

Partition = list[npt.NDArray[np.int64]]

__all__ = ["PARTITIONS", "Partition", "class_labels", "dirichlet", "iid", "label_skew", "labels_per_device", "partition"]

PARTITIONS: tuple[str, ...] = ("iid", "dirichlet", "labels")


def _check(labels: npt.NDArray[Any], n_devices: int) -> npt.NDArray[np.int64]:
    if n_devices < 1:
        raise ConfigError("need at least one device to partition over")
    y = np.asarray(labels)
    if y.ndim != 1 or (y.size and not np.issubdtype(y.dtype, np.integer)):
        raise ConfigError("labels must be a 1-D integer array")
    return y.astype(np.int64, copy=False)


def iid(labels: npt.NDArray[Any], n_devices: int, *, seed: int) -> Partition:
    """A uniformly random split into ``n_devices`` parts whose sizes differ by at most one."""
    y = _check(labels, n_devices)
    order = np.random.default_rng(seed).permutation(y.shape[0])
    return [np.sort(part).astype(np.int64) for part in np.array_split(order, n_devices)]


def dirichlet(labels: npt.NDArray[Any], n_devices: int, *, alpha: float, seed: int) -> Partition:
    """Per class, split its samples over devices in proportions drawn from Dir(α·1)."""
    y = _check(labels, n_devices)
    if not (alpha > 0 and np.isfinite(alpha)):
        raise ConfigError(f"Dirichlet alpha must be a finite number > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    parts: list[list[npt.NDArray[np.int64]]] = [[] for _ in range(n_devices)]
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c))
        props = rng.dirichlet(np.full(n_devices, alpha))
        # Cut points from the cumulative proportions: exact cover, no sample dropped.
        cuts = np.round(np.cumsum(props)[:-1] * members.shape[0]).astype(np.int64)
        for i, chunk in enumerate(np.split(members, cuts)):
            parts[i].append(chunk)
    return [np.sort(np.concatenate(p)).astype(np.int64) if p else np.zeros(0, np.int64) for p in parts]


def labels_per_device(labels: npt.NDArray[Any], n_devices: int, *, labels_each: int, seed: int) -> Partition:
    """Each device holds samples of exactly ``labels_each`` classes (pathological non-IID).

    Classes are dealt round-robin from a seeded shuffle so that every class is held by
    some device (needs ``n_devices × labels_each ≥ n_classes``); each class is then split
    evenly over the devices that hold it.
    """
    y = _check(labels, n_devices)
    classes = np.unique(y)
    if labels_each < 1:
        raise ConfigError("labels_each must be >= 1")
    if labels_each > classes.shape[0]:
        raise ConfigError(f"labels_each={labels_each} exceeds the {classes.shape[0]} classes present")
    if n_devices * labels_each < classes.shape[0]:
        raise ConfigError(
            f"{n_devices} devices × {labels_each} labels cannot cover {classes.shape[0]} classes"
        )
    rng = np.random.default_rng(seed)
    deck = rng.permutation(classes)
    holders: dict[int, list[int]] = {int(c): [] for c in classes}
    slot = 0
    for device in range(n_devices):
        mine: set[int] = set()
        while len(mine) < labels_each:
            c = int(deck[slot % deck.shape[0]])
            slot += 1
            if c not in mine:
                mine.add(c)
                holders[c].append(device)
    parts: list[list[npt.NDArray[np.int64]]] = [[] for _ in range(n_devices)]
    for c, devs in holders.items():
        members = rng.permutation(np.flatnonzero(y == c))
        for device, chunk in zip(devs, np.array_split(members, len(devs))):
            parts[device].append(chunk)
    return [np.sort(np.concatenate(p)).astype(np.int64) if p else np.zeros(0, np.int64) for p in parts]


def class_labels(y: npt.NDArray[Any]) -> npt.NDArray[np.int64] | None:
    """A split's ``y`` as one class label per sample, or None for samples without one
    (frames: ``y`` is an object array of box arrays). Anything else is a :class:`ConfigError`."""
    arr = np.asarray(y)
    if arr.dtype == object and arr.ndim == 1:
        return None
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise ConfigError("labels must be a 1-D integer array (or, for frames, an object array of box arrays)")
    return arr.astype(np.int64, copy=False)


def partition(labels: npt.NDArray[Any], n_devices: int, kind: str, *, seed: int, alpha: float = 1.0, labels_each: int = 2) -> Partition:
    """Dispatch by name: ``"iid"``, ``"dirichlet"`` (``alpha``) or ``"labels"`` (``labels_each``).

    ``labels`` is the pool's ``y`` of any sample kind; samples without a class label
    (frames) are split ``"iid"`` only — by count, exactly as labelled samples would be."""
    if kind not in PARTITIONS:
        raise ConfigError(f"unknown partition {kind!r}; use iid, dirichlet or labels")
    y = class_labels(labels)
    if y is None:
        if kind != "iid":
            raise ConfigError(
                f'[data] partition = "{kind}" splits the pool by class label, but these samples are frames '
                'with boxes (a frame shows several classes, it has no one label): use partition = "iid"'
            )
        y = np.zeros(len(labels), dtype=np.int64)  # iid depends on the count only
    if kind == "iid":
        return iid(y, n_devices, seed=seed)
    if kind == "dirichlet":
        return dirichlet(y, n_devices, alpha=alpha, seed=seed)
    return labels_per_device(y, n_devices, labels_each=labels_each, seed=seed)


def label_skew(labels: npt.NDArray[Any], parts: Sequence[npt.NDArray[np.int64]]) -> float:
    """How non-IID a partition is: the sample-weighted mean total-variation distance between
    each device's label distribution and the pool's (0 = IID-like, → 1 = one class each)."""
    y = np.asarray(labels, dtype=np.int64)
    if y.size == 0:
        return 0.0
    n_classes = int(y.max()) + 1
    global_p = np.bincount(y, minlength=n_classes) / y.shape[0]
    total = 0.0
    for part in parts:
        if part.size == 0:
            continue
        p = np.bincount(y[part], minlength=n_classes) / part.shape[0]
        total += part.shape[0] * 0.5 * float(np.abs(p - global_p).sum())
    return float(total / y.shape[0])
