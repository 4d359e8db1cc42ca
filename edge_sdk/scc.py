"""Semantic compression and compensation (SCC, HFedMS paper 002) on the device.

Theory of operation
-------------------
A streaming device sees each labelled sample once and cannot keep them all, so its model
forgets the classes it no longer sees. SCC keeps a *compressed* memory instead of raw
samples: the extractor's features z = h(x, φ) (32 values for the digits CNN instead of the
image), stored as float16 in a bounded :class:`FeatureCache` (capacity Q, paper: 200).

* **Storage.** When samples are about to be forgotten, :meth:`SemanticCache.observe`
  extracts their features with the extractor the cache is tagged with and offers them to
  the cache. Over capacity, the cache keeps per class the features closest (L2) to their
  class mean (paper eq. 17–18). Unlike the paper, which ranks all candidates together,
  every class present gets an equal share of Q (spare room goes to classes with more
  candidates): a global ranking can evict a whole class whose features are spread wider,
  and losing a class entirely is exactly the forgetting SCC exists to prevent.
* **Compensation.** Cached features are only meaningful for the extractor that produced
  them, and a full sync (LASP) replaces it. The device therefore holds the *previous*
  extractor (:meth:`SemanticCache.hold_extractor`, only the extractor slice) until its next
  batch of current samples arrives, then shifts each cached feature of class c by
  Δ_c = mean h(x, φ_new) − mean h(x, φ_old) over the current samples of class c (eq. 13–15)
  and drops the held copy. A cached class absent from the current samples gets the
  class-agnostic drift over all current samples (eq. 12), or stays as it is with
  ``fallback="none"``.
* **Calibration.** :meth:`SemanticCache.calibrate` trains only the classifier g(z, θ) on
  the current samples' features plus the compensated cached features, with the extractor
  frozen (eq. 16); everything outside the classifier group comes back bit-identical.

The cache records a digest of the extractor its features belong to. Observing or
calibrating against a different extractor without compensating first is refused
(:class:`~edge_sdk.errors.LocalProtocolError`), so stale and fresh features never mix by
accident; :meth:`SemanticCache.skip_compensation` is the explicit "use them as they are"
(the paper's no-compensation ablation).

Durability: with a ``path`` the cache is an ``.npz`` file (no pickle) rewritten atomically
(temp file, fsync, rename) after every change, so a device restart keeps it. The held
previous extractor is *not* persisted (it is as large as the extractor itself): after a
restart between a full sync and the next compensation the cache is still tagged with the
old extractor, and the app has to compensate with the old weights if it kept them, skip
compensation, or clear the cache.

Not thread-safe: one :class:`SemanticCache` per device, used by the device's trainer.

In the SDK client: :class:`DeviceScc` (``EdgeClient(..., scc=SccConfig(...))``) runs the same
maths (:class:`FeatureCache`, :func:`drift_deltas`) on the device's sample store: samples
older than the newest ``keep_raw`` age out into the cache, which lives in the store with the
extractor it belongs to (so compensation works across restarts), and the head is calibrated
in numpy (:func:`~edge_sdk.tasks.linear_head.fit_head`), so a ``[device]`` install (no
torch) runs SCC too. Only :class:`SemanticCache` needs torch (imported when it is built).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter
from typing import IO, TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from edge_sdk.errors import ConfigError, InvalidSample, LocalProtocolError
from edge_sdk.spec import FULL, ModelSpec, Vector
from edge_sdk.tasks.base import TrainConfig, TrainResult
from edge_sdk.tasks.linear_head import HeadLayout, fit_head

if TYPE_CHECKING:  # torch only where SemanticCache is used; DeviceScc runs on [device]
    from edge_sdk.store import SampleStore
    from edge_sdk.trainer import ClassifierTask

log = logging.getLogger("edgeci.scc")

__all__ = [
    "DEFAULT_CAPACITY",
    "Compensation",
    "DeviceScc",
    "FeatureCache",
    "SccConfig",
    "SemanticCache",
    "balanced_quotas",
    "drift_deltas",
    "extractor_digest",
    "scc_head",
    "select_representatives",
]

DEFAULT_CAPACITY = 200
"""Q in the HFedMS paper (Table II)."""
FILE_FORMAT = 1
NO_TAG = ""
Fallback = Literal["global", "none"]

F16 = npt.NDArray[np.float16]
F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]


# --------------------------------------------------------------------------- selection


def balanced_quotas(counts: npt.NDArray[np.integer[Any]], capacity: int) -> I64:
    """How many rows each class keeps: equal shares of ``capacity`` (water-filling, so a
    class with fewer candidates than its share hands the rest to the others). When fewer
    slots than open classes remain, they go to the classes with the smallest quota so far,
    then to the lowest class index. Sums to ``min(capacity, counts.sum())``."""
    counts = np.asarray(counts, dtype=np.int64)
    quotas = np.zeros_like(counts)
    remaining = int(capacity)
    while remaining > 0:
        open_ = np.flatnonzero(quotas < counts)
        if open_.size == 0:
            break
        share = remaining // open_.size
        if share == 0:
            order = open_[np.lexsort((open_, quotas[open_]))]
            quotas[order[:remaining]] += 1
            break
        add = np.minimum(share, counts[open_] - quotas[open_])
        quotas[open_] += add
        remaining -= int(add.sum())
    return quotas


def select_representatives(features: npt.NDArray[Any], labels: I64, capacity: int) -> I64:
    """Ascending indices of the rows to keep: per class its :func:`balanced_quotas` share,
    taken from the rows closest (L2) to that class's mean over all given rows; equal
    distances keep the earlier row. Everything is kept when it fits."""
    n = int(labels.shape[0])
    if n <= capacity:
        return np.arange(n, dtype=np.int64)
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    quotas = balanced_quotas(counts, capacity)
    values = np.asarray(features, dtype=np.float64)
    keep: list[I64] = []
    for k in range(classes.shape[0]):
        members = np.flatnonzero(inverse == k)
        if quotas[k] >= members.shape[0]:
            keep.append(members)
            continue
        rows = values[members]
        dist = np.sqrt(((rows - rows.mean(axis=0)) ** 2).sum(axis=1))
        keep.append(members[np.argsort(dist, kind="stable")[: quotas[k]]])
    return np.sort(np.concatenate(keep)).astype(np.int64)


def extractor_digest(spec: ModelSpec, weights: Vector, group: str = "extractor") -> str:
    """A short digest of ``weights``' extractor slice: which extractor cached features
    belong to (bit-exact, so any change of the extractor changes it)."""
    part = np.ascontiguousarray(spec.check(weights)[spec.group_slice(group)])
    return hashlib.blake2b(part.tobytes(), digest_size=8).hexdigest()


# --------------------------------------------------------------------------- the cache


class FeatureCache:
    """A bounded per-device store of float16 feature vectors with class labels.

    Rows carry an integer id chosen by the caller (e.g. the sample store's id; -1 when
    unknown) so an app can tell which samples its memory represents. With ``path`` every
    change is written atomically to that ``.npz`` file, and opening an existing file
    restores the cache (re-selected if ``capacity`` is now smaller).
    """

    def __init__(
        self,
        *,
        capacity: int = DEFAULT_CAPACITY,
        feature_dim: int | None = None,
        path: str | Path | None = None,
    ) -> None:
        if capacity < 1:
            raise ConfigError(f"cache capacity must be >= 1, got {capacity}")
        if feature_dim is not None and feature_dim < 1:
            raise ConfigError(f"feature_dim must be >= 1, got {feature_dim}")
        self.capacity = int(capacity)
        self.path = Path(path) if path is not None else None
        self._dim = feature_dim
        self._features: F16 = np.zeros((0, feature_dim or 0), dtype=np.float16)
        self._labels: I64 = np.zeros(0, dtype=np.int64)
        self._ids: I64 = np.zeros(0, dtype=np.int64)
        self._tag = NO_TAG
        if self.path is not None and self.path.exists():
            self._load(self.path)
            if len(self) > self.capacity:
                self._keep(select_representatives(self._features, self._labels, self.capacity))
                self.save()

    # ------------------------------------------------------------------ view

    def __len__(self) -> int:
        return int(self._labels.shape[0])

    @property
    def feature_dim(self) -> int | None:
        """Length of a feature vector; fixed by the first add (or the file) if not given."""
        return self._dim

    @property
    def features(self) -> F16:
        """The cached features, shape (N, feature_dim), float16 (a read-only view)."""
        view = self._features.view()
        view.flags.writeable = False
        return view

    @property
    def labels(self) -> I64:
        view = self._labels.view()
        view.flags.writeable = False
        return view

    @property
    def ids(self) -> I64:
        view = self._ids.view()
        view.flags.writeable = False
        return view

    @property
    def tag(self) -> str:
        """Digest of the extractor the cached features belong to (``""``: none yet)."""
        return self._tag

    def class_counts(self) -> dict[int, int]:
        classes, counts = np.unique(self._labels, return_counts=True)
        return {int(c): int(k) for c, k in zip(classes, counts)}

    # ------------------------------------------------------------------ changes

    def add(
        self,
        features: npt.NDArray[Any],
        labels: npt.NDArray[Any],
        ids: npt.NDArray[Any] | None = None,
    ) -> int:
        """Offer new rows; keep the representatives of (cached ∪ new) within capacity.
        Returns how many of the new rows were kept."""
        z = np.asarray(features)
        y = np.asarray(labels)
        if z.ndim != 2 or y.ndim != 1 or z.shape[0] != y.shape[0]:
            raise InvalidSample(f"need features (N, D) and N labels, got {z.shape} and {y.shape}")
        if y.size and not np.issubdtype(y.dtype, np.integer):
            raise InvalidSample(f"labels must be integers, got {y.dtype}")
        if self._dim is None:
            self._dim = int(z.shape[1])
            self._features = np.zeros((0, self._dim), dtype=np.float16)
        if z.shape[1] != self._dim:
            raise InvalidSample(f"features have {z.shape[1]} values, the cache holds {self._dim}")
        z16 = self._to_f16(z)
        new_ids = (
            np.full(y.shape[0], -1, dtype=np.int64)
            if ids is None
            else np.asarray(ids, dtype=np.int64).reshape(-1)
        )
        if new_ids.shape[0] != y.shape[0]:
            raise InvalidSample(f"need {y.shape[0]} ids, got {new_ids.shape[0]}")
        if y.shape[0] == 0:
            return 0
        old = len(self)
        self._features = np.concatenate([self._features, z16])
        self._labels = np.concatenate([self._labels, y.astype(np.int64)])
        self._ids = np.concatenate([self._ids, new_ids])
        kept = select_representatives(self._features, self._labels, self.capacity)
        self._keep(kept)
        self.save()
        return int((kept >= old).sum())

    def shift(self, deltas: Mapping[int, npt.NDArray[Any]]) -> None:
        """Add ``deltas[c]`` to every cached feature of class c (compensation); classes
        not in ``deltas`` stay as they are. Arithmetic in float32, stored as float16."""
        if not deltas:
            return
        values = self._features.astype(np.float32)
        for c, delta in deltas.items():
            d = np.asarray(delta, dtype=np.float32)
            if d.shape != (self._dim,):
                raise InvalidSample(f"delta for class {c} has shape {d.shape}, need ({self._dim},)")
            values[self._labels == c] += d
        self._features = self._to_f16(values)
        self.save()

    def rewrite(self, features: npt.NDArray[Any]) -> None:
        """Replace every cached feature value (same rows, same order as :attr:`ids`), e.g.
        re-extracted exactly from raw samples the app still holds."""
        z = np.asarray(features)
        if z.shape != self._features.shape:
            raise InvalidSample(f"need features of shape {self._features.shape}, got {z.shape}")
        self._features = self._to_f16(z)
        self.save()

    def retag(self, tag: str) -> None:
        """Record which extractor the cached features now belong to."""
        self._tag = str(tag)
        self.save()

    def clear(self) -> None:
        self._features = np.zeros((0, self._dim or 0), dtype=np.float16)
        self._labels = np.zeros(0, dtype=np.int64)
        self._ids = np.zeros(0, dtype=np.int64)
        self._tag = NO_TAG
        self.save()

    # ------------------------------------------------------------------ durability

    def save(self) -> None:
        """Write the cache atomically to ``path`` (no-op without one)."""
        if self.path is None:
            return
        path = self.path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:
            self._write_npz(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)

    def dumps(self, **extra: npt.NDArray[Any]) -> bytes:
        """The cache as ``.npz`` bytes (no pickle), with ``extra`` arrays alongside (e.g. the
        extractor the features belong to); :meth:`loads` reads it back."""
        buf = io.BytesIO()
        self._write_npz(buf, extra)
        return buf.getvalue()

    @classmethod
    def loads(
        cls, data: bytes, *, capacity: int = DEFAULT_CAPACITY, extra: tuple[str, ...] = ()
    ) -> tuple[FeatureCache, dict[str, npt.NDArray[Any]]]:
        """A cache (without a path) from :meth:`dumps` bytes, and the ``extra`` arrays named.
        Anything unreadable or inconsistent raises :class:`ConfigError`."""
        cache = cls(capacity=capacity)
        extras = cache._read_npz(io.BytesIO(data), "feature cache blob", extra)
        if len(cache) > cache.capacity:
            cache._keep(select_representatives(cache._features, cache._labels, cache.capacity))
        return cache, extras

    def _write_npz(self, f: IO[bytes], extra: Mapping[str, npt.NDArray[Any]] | None = None) -> None:
        meta = {"format": FILE_FORMAT, "feature_dim": self._dim, "tag": self._tag}
        arrays: dict[str, Any] = {
            "features": self._features,
            "labels": self._labels,
            "ids": self._ids,
            "meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
            **{f"x_{k}": v for k, v in (extra or {}).items()},
        }
        np.savez(f, **arrays)

    def _load(self, path: Path) -> None:
        with open(path, "rb") as f:
            self._read_npz(f, str(path), ())

    def _read_npz(
        self, f: IO[bytes], what: str, extra: tuple[str, ...]
    ) -> dict[str, npt.NDArray[Any]]:
        try:
            with np.load(f, allow_pickle=False) as z:
                meta = json.loads(z["meta"].tobytes())
                features = np.asarray(z["features"])
                labels = np.asarray(z["labels"])
                ids = np.asarray(z["ids"])
                extras = {k: np.asarray(z[f"x_{k}"]) for k in extra}
        except Exception as exc:  # zipfile.BadZipFile, CRC errors, ValueError, KeyError, ...
            raise ConfigError(f"{what} is not a feature cache ({exc}); delete it to start empty") from exc
        if not isinstance(meta, dict):
            raise ConfigError(f"{what} is not a feature cache of format {FILE_FORMAT}")
        dim = meta.get("feature_dim")
        ok = (
            meta.get("format") == FILE_FORMAT
            and features.dtype == np.float16
            and features.ndim == 2
            and labels.dtype == np.int64
            and ids.dtype == np.int64
            and labels.shape == ids.shape == (features.shape[0],)
            and (dim is None or (isinstance(dim, int) and features.shape[1] == dim))
            and bool(np.isfinite(features).all())
        )
        if not ok:
            raise ConfigError(
                f"{what} is not a feature cache of format {FILE_FORMAT}; delete it to start empty"
            )
        if self._dim is not None and dim is not None and dim != self._dim:
            raise ConfigError(f"{what} holds {dim}-d features, this cache was opened for {self._dim}")
        self._dim = self._dim if dim is None else int(dim)
        self._features = np.ascontiguousarray(features)
        self._labels = np.ascontiguousarray(labels)
        self._ids = np.ascontiguousarray(ids)
        self._tag = str(meta.get("tag", NO_TAG))
        return extras

    # ------------------------------------------------------------------ helpers

    def _keep(self, rows: I64) -> None:
        self._features = np.ascontiguousarray(self._features[rows])
        self._labels = np.ascontiguousarray(self._labels[rows])
        self._ids = np.ascontiguousarray(self._ids[rows])

    @staticmethod
    def _to_f16(values: npt.NDArray[Any]) -> F16:
        with np.errstate(over="ignore"):
            out = np.asarray(values).astype(np.float16)
        if not np.isfinite(out).all():
            raise InvalidSample("features are not finite in float16 (NaN, Inf or |z| > 65504)")
        return out


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (POSIX); directories cannot be opened on Windows."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- SCC


@dataclass(frozen=True, slots=True, kw_only=True)
class Compensation:
    """What one compensation did: the shift applied per class, and which classes got the
    class-agnostic fallback (no current sample of theirs)."""

    deltas: dict[int, F32] = field(default_factory=dict)
    fallback_classes: tuple[int, ...] = ()
    uncompensated_classes: tuple[int, ...] = ()
    n_current: int = 0


def drift_deltas(
    z_new: npt.NDArray[Any],
    z_old: npt.NDArray[Any],
    y_current: npt.NDArray[Any],
    cached_classes: Mapping[int, int] | tuple[int, ...],
    fallback: Fallback = "global",
) -> Compensation:
    """The compensation shifts (eq. 12–15): for each cached class c, Δ_c = mean over the
    current samples of class c of ``z_new − z_old`` (their features under the new and the
    old extractor); a class with no current sample gets the drift over all current samples
    (``fallback="global"``) or nothing (``"none"``)."""
    drift = np.asarray(z_new, dtype=np.float32) - np.asarray(z_old, dtype=np.float32)
    ys = np.asarray(y_current)
    deltas: dict[int, F32] = {}
    fallback_classes: list[int] = []
    untouched: list[int] = []
    overall = drift.mean(axis=0, dtype=np.float32)
    for c in cached_classes:
        mask = ys == c
        if mask.any():
            deltas[int(c)] = drift[mask].mean(axis=0, dtype=np.float32)
        elif fallback == "global":
            deltas[int(c)] = overall
            fallback_classes.append(int(c))
        else:
            untouched.append(int(c))
    return Compensation(
        deltas=deltas,
        fallback_classes=tuple(fallback_classes),
        uncompensated_classes=tuple(untouched),
        n_current=int(ys.shape[0]),
    )


class SemanticCache:
    """SCC for one device: a :class:`FeatureCache` plus drift compensation and classifier
    calibration for a :class:`~edge_sdk.trainer.ClassifierTask` (a ``SplitModel`` with
    ``extractor`` and ``classifier`` groups). See the module docstring for the protocol:

    ``observe`` samples before they are forgotten → on a new extractor ``hold_extractor``
    (old weights) → ``compensate`` with the next current samples → ``calibrate``.
    """

    def __init__(
        self,
        task: ClassifierTask,
        *,
        capacity: int = DEFAULT_CAPACITY,
        path: str | Path | None = None,
        extractor_group: str = "extractor",
        classifier_group: str = "classifier",
        fallback: Fallback = "global",
    ) -> None:
        spec = task.spec
        for group in (extractor_group, classifier_group):
            if group not in spec.group_slices:
                raise ConfigError(f"SCC needs a {group!r} group; {spec.model_id} has {spec.groups}")
        if fallback not in ("global", "none"):
            raise ConfigError(f"fallback must be 'global' or 'none', got {fallback!r}")
        self.task = task
        self.spec = spec
        self.extractor_group = extractor_group
        self.classifier_group = classifier_group
        self.fallback: Fallback = fallback
        self.cache = FeatureCache(capacity=capacity, path=path)
        self._held: F32 | None = None
        self._held_tag = NO_TAG
        from edge_sdk.torchbridge import spec_from_module
        from edge_sdk.trainer import seeded

        with seeded(0):  # its init is overwritten by bind; leave torch's global stream alone
            head = task.build_module().classifier
        self._head = head
        self._head_spec = spec_from_module(
            head, f"{spec.model_id}/{classifier_group}", lambda _: classifier_group
        )
        self._check_head()

    def _check_head(self) -> None:
        want = [p for p in self.spec.params if p.group == self.classifier_group]
        prefix = f"{self.classifier_group}."
        got = self._head_spec.params
        same = len(want) == len(got) and all(
            w.name == prefix + g.name and w.shape == g.shape for w, g in zip(want, got)
        )
        if not same:
            raise ConfigError(
                f"{self.spec.model_id}: the {self.classifier_group!r} group is not laid out like "
                f"module.{self.classifier_group}; SCC needs them to match"
            )

    # ------------------------------------------------------------------ state

    def digest(self, weights: Vector) -> str:
        """The extractor digest of ``weights`` (what the cache tag is compared with)."""
        return extractor_digest(self.spec, weights, self.extractor_group)

    def is_current(self, weights: Vector) -> bool:
        """True when the cached features belong to ``weights``' extractor (or there are none)."""
        return len(self.cache) == 0 or self.cache.tag == self.digest(weights)

    @property
    def holding_extractor(self) -> bool:
        """Whether a previous extractor is held, waiting for compensation."""
        return self._held is not None

    # ------------------------------------------------------------------ storage

    def observe(
        self,
        weights: Vector,
        x: npt.NDArray[Any],
        y: npt.NDArray[Any],
        ids: npt.NDArray[Any] | None = None,
    ) -> int:
        """Cache the features h(x, φ) of samples about to be forgotten, φ = ``weights``'
        extractor (the one the cache is tagged with). Returns how many were kept."""
        xs, ys = self.task.check_samples(x, y)
        if ys.shape[0] == 0:
            return 0
        tag = self.digest(weights)
        if len(self.cache) and self.cache.tag != tag:
            raise LocalProtocolError(
                "cached features belong to another extractor: compensate (or skip_compensation) first"
            )
        kept = self.cache.add(self.task.features(weights, xs), ys, ids)
        if self.cache.tag != tag:
            self.cache.retag(tag)
        return kept

    # ------------------------------------------------------------------ compensation

    def hold_extractor(self, weights_old: Vector) -> None:
        """Keep a copy of the extractor the cached features belong to, until the next
        :meth:`compensate` (call it before the device replaces its model after a full
        sync). Only the extractor slice is copied; nothing is held for an empty cache."""
        tag = self.digest(weights_old)
        if len(self.cache) == 0:
            return
        if self.cache.tag != tag:
            raise LocalProtocolError(
                "these weights are not the extractor the cached features belong to"
            )
        if self._held is not None and self._held_tag == tag:
            return
        self._held = np.array(weights_old[self.spec.group_slice(self.extractor_group)], copy=True)
        self._held_tag = tag

    def release_extractor(self) -> None:
        """Drop the held previous extractor (done by compensate and skip_compensation)."""
        self._held = None
        self._held_tag = NO_TAG

    def skip_compensation(self, weights_new: Vector) -> None:
        """Declare the cached features as belonging to ``weights_new``' extractor without
        shifting them (the paper's no-compensation ablation) and drop the held extractor."""
        self.release_extractor()
        if len(self.cache):
            self.cache.retag(self.digest(weights_new))

    def compensate(
        self,
        weights_old: Vector | None,
        weights_new: Vector,
        x_current: npt.NDArray[Any],
        y_current: npt.NDArray[Any],
    ) -> Compensation:
        """Shift the cached features of class c by Δ_c = mean h(x, φ_new) − mean h(x, φ_old)
        over the current samples of class c (eq. 13–15); absent classes get the drift over
        all current samples (``fallback="global"``) or nothing (``"none"``). ``weights_old``
        ``None`` uses the extractor held by :meth:`hold_extractor`, which is then dropped.
        """
        new_tag = self.digest(weights_new)
        if len(self.cache) == 0:
            self.release_extractor()
            return Compensation()
        if self.cache.tag == new_tag:
            self.release_extractor()  # the extractor did not change: nothing to do
            return Compensation()
        xs, ys = self.task.check_samples(x_current, y_current)
        if ys.shape[0] == 0:
            raise InvalidSample("compensation needs at least one current sample")
        if weights_old is not None:
            if self.digest(weights_old) != self.cache.tag:
                raise LocalProtocolError(
                    "weights_old is not the extractor the cached features belong to"
                )
            old = weights_old
        elif self._held is not None and self._held_tag == self.cache.tag:
            old = np.array(weights_new, copy=True)
            old[self.spec.group_slice(self.extractor_group)] = self._held
        else:
            raise LocalProtocolError(
                "no previous extractor: call hold_extractor before the model changes"
            )
        comp = drift_deltas(
            self.task.features(weights_new, xs),
            self.task.features(old, xs),
            ys,
            self.cache.class_counts(),
            self.fallback,
        )
        self.cache.shift(comp.deltas)
        self.cache.retag(new_tag)
        self.release_extractor()
        return comp

    def reextract(self, weights_new: Vector, x_cached: npt.NDArray[Any]) -> None:
        """Exact compensation: replace the cached features by h(x, φ_new) of the raw
        samples behind them (``x_cached`` row i is the sample of ``cache.ids[i]``). Only
        possible while the app still keeps those samples; the upper bound for SCC."""
        if len(self.cache):
            if np.asarray(x_cached).shape[0] != len(self.cache):
                raise InvalidSample(
                    f"need {len(self.cache)} cached samples, got {np.asarray(x_cached).shape[0]}"
                )
            xs, _ = self.task.check_samples(x_cached, np.array(self.cache.labels))
            self.cache.rewrite(self.task.features(weights_new, xs))
            self.cache.retag(self.digest(weights_new))
        self.release_extractor()

    # ------------------------------------------------------------------ calibration

    def calibration_set(
        self, weights: Vector, x_current: npt.NDArray[Any], y_current: npt.NDArray[Any]
    ) -> tuple[F32, I64]:
        """Features and labels the classifier is calibrated on: h(current) ∪ cache (eq. 16)."""
        if not self.is_current(weights):
            raise LocalProtocolError(
                "cached features belong to another extractor: compensate (or skip_compensation) first"
            )
        xs, ys = self.task.check_samples(x_current, y_current)
        parts_z: list[F32] = []
        parts_y: list[I64] = []
        if ys.shape[0]:
            parts_z.append(self.task.features(weights, xs))
            parts_y.append(ys)
        if len(self.cache):
            parts_z.append(self.cache.features.astype(np.float32))
            parts_y.append(np.array(self.cache.labels))
        if not parts_y:
            raise InvalidSample("nothing to calibrate on: no current samples and an empty cache")
        return np.ascontiguousarray(np.concatenate(parts_z)), np.ascontiguousarray(
            np.concatenate(parts_y)
        )

    def calibrate(
        self,
        weights: Vector,
        x_current: npt.NDArray[Any],
        y_current: npt.NDArray[Any],
        config: TrainConfig,
    ) -> TrainResult:
        """Train only the classifier on current + cached features, extractor frozen.

        Returns the full weights vector (outside the classifier group bit-identical to
        ``weights``). ``n_samples`` is the number of *current* samples — the device's
        FedAvg weight: the cached rows stand for samples that already contributed — and
        ``extra`` says how many cached rows were used.
        """
        started = perf_counter()
        self.spec.check(weights)
        if config.group not in (FULL, self.classifier_group):
            raise ConfigError(
                f"calibration trains the {self.classifier_group!r} group, not {config.group!r}"
            )
        z, y = self.calibration_set(weights, x_current, y_current)
        n_current = int(np.asarray(y_current).shape[0])
        head_config = TrainConfig(
            epochs=config.epochs, batch_size=config.batch_size, lr=config.lr, seed=config.seed
        )
        from edge_sdk.trainer import fit

        sl = self.spec.group_slice(self.classifier_group)
        head = fit(
            self._head,
            self._head_spec,
            np.array(weights[sl], copy=True),
            z,
            y,
            head_config,
            device=self.task.device,
        )
        out = np.array(weights, copy=True)
        out[sl] = head.weights
        return TrainResult(
            weights=out,
            n_samples=n_current,
            loss=head.loss,
            seconds=perf_counter() - started,
            extra={
                "device": head.extra.get("device", "cpu"),
                "group": self.classifier_group,
                "cached_rows": len(self.cache),
                "current_rows": n_current,
            },
        )


# --------------------------------------------------------------------------- in EdgeClient


@dataclass(frozen=True, slots=True, kw_only=True)
class SccConfig:
    """SCC inside :class:`~edge_sdk.client.EdgeClient` (``EdgeClient(..., scc=SccConfig())``).

    The device keeps its newest ``keep_raw`` raw samples; after each training job the older
    ones *age out*: their features under the job's extractor go into the cache (at most
    ``capacity`` rows, Q in the paper) and the raw samples leave the store."""

    capacity: int = DEFAULT_CAPACITY
    keep_raw: int = 64
    compensate: bool = True
    """False: cached features are carried over to a new extractor unchanged (the paper's
    no-compensation ablation)."""
    fallback: Fallback = "global"

    def __post_init__(self) -> None:
        if self.capacity < 1 or self.keep_raw < 0:
            raise ConfigError("SCC needs capacity >= 1 and keep_raw >= 0")
        if self.fallback not in ("global", "none"):
            raise ConfigError(f"fallback must be 'global' or 'none', got {self.fallback!r}")


def scc_head(task: Any, *, extractor_group: str = "extractor", classifier_group: str = "classifier") -> HeadLayout:
    """The head SCC calibrates on ``task``, or a :class:`ConfigError` saying why SCC cannot run
    on it and what to do. Checked when SCC is set up, so a task SCC cannot serve is refused
    at construction, never in a round: SCC fits the head in numpy (with or without torch), so
    the classifier group must be one linear layer; a task without torch (DeclaredTask) needs
    the extractor graph its features come from."""
    spec: ModelSpec = task.spec
    for group in (extractor_group, classifier_group):
        if group not in spec.group_slices:
            raise ConfigError(f"SCC needs a {group!r} group; {spec.model_id} has {spec.groups}")
    if not callable(getattr(task, "features", None)):
        raise ConfigError(f"SCC needs a task with features(weights, x); {spec.model_id} has none")
    try:
        head = HeadLayout.of(spec, classifier_group)
    except ConfigError:
        layers = ", ".join(f"{p.name} {tuple(p.shape)}" for p in spec.params if p.group == classifier_group)
        raise ConfigError(
            f"SCC cannot run on {spec.model_id}: it fits the {classifier_group!r} group in numpy as one linear "
            f"layer (weight (classes, features), bias (classes,)), and this model's is {layers}. Make the "
            f"classifier one linear layer (the layers before it go at the end of the extractor), or run "
            f"without scc") from None
    from edge_sdk.tasks.registry import DeclaredTask

    if isinstance(task, DeclaredTask):
        problem = task.features_problem()
        if problem is not None:
            raise ConfigError(f"SCC cannot run on {spec.model_id} without torch: it caches features, and {problem}; "
                              "run without scc, or install edgeci[train]")
    return head


class DeviceScc:
    """SCC as the SDK client runs it, on one device's :class:`~edge_sdk.store.SampleStore`.

    Per training job (trainer thread): :meth:`prepare` compensates the cache if the job's
    extractor differs from the one the cache belongs to (Δ_c over the current raw samples,
    :func:`drift_deltas`); classifier-only jobs :meth:`calibrate` the linear head in numpy
    (:func:`~edge_sdk.tasks.linear_head.fit_head`, so a ``[device]`` install runs it) on the
    current samples' features plus the cached ones, extractor frozen; then :meth:`age_out`
    moves samples older than the newest ``keep_raw`` into the cache.

    Durability: the cache and the extractor slice its features belong to are one ``.npz``
    blob in the store's meta table (``scc.cache``), written in one transaction before the
    aged-out samples are deleted (a crash in between leaves a sample both cached and raw,
    never neither). Unlike :class:`SemanticCache` the previous extractor is therefore kept
    across restarts. A blob that does not read back (corrupt, or its extractor does not
    match its tag) is dropped with a warning; :attr:`dropped` says why.
    """

    META_KEY = "scc.cache"

    def __init__(
        self,
        config: SccConfig,
        task: Any,
        store: SampleStore,
        *,
        kind: str = "array",
        extractor_group: str = "extractor",
        classifier_group: str = "classifier",
    ) -> None:
        spec: ModelSpec = task.spec
        self.head = scc_head(task, extractor_group=extractor_group, classifier_group=classifier_group)
        self.config = config
        self.task = task
        self.spec = spec
        self.store = store
        self.kind = kind
        self.classifier_group = classifier_group
        self._ext = spec.group_slice(extractor_group)
        self.cache = FeatureCache(capacity=config.capacity)
        self._extractor: F32 | None = None
        self.dropped: str | None = None
        """Why a stored cache was dropped at open (None: it loaded, or there was none)."""
        self._load()

    # ------------------------------------------------------------------ durability

    def _load(self) -> None:
        raw = self.store.get_meta(self.META_KEY)
        if raw is None or raw == b"":
            return
        try:
            if not isinstance(raw, bytes):
                raise ConfigError(f"{self.META_KEY} holds a {type(raw).__name__}, not a blob")
            cache, extras = FeatureCache.loads(raw, capacity=self.config.capacity, extra=("extractor",))
            extractor = np.asarray(extras["extractor"])
            if len(cache):
                size = self._ext.stop - self._ext.start
                if extractor.dtype != np.float32 or extractor.shape != (size,):
                    raise ConfigError("the cached extractor does not fit this model")
                if _digest(extractor) != cache.tag:
                    raise ConfigError("the cached extractor does not match the cache's tag")
                if cache.feature_dim != self.head.feature_dim:
                    raise ConfigError(f"cached features have {cache.feature_dim} values, the head takes {self.head.feature_dim}")
                if int(cache.labels.min()) < 0 or int(cache.labels.max()) >= self.head.n_classes:
                    raise ConfigError("cached labels outside the model's classes")
        except ConfigError as exc:
            log.warning("SCC feature cache in the device store is unreadable, dropping it: %s", exc)
            self.dropped = str(exc)
            self.store.set_meta(self.META_KEY, b"")
            return
        self.cache = cache
        self._extractor = np.ascontiguousarray(extractor) if len(cache) else None

    def _persist(self) -> None:
        extractor = self._extractor if self._extractor is not None else np.zeros(0, np.float32)
        self.store.set_meta(self.META_KEY, self.cache.dumps(extractor=extractor))

    # ------------------------------------------------------------------ the job

    def digest(self, weights: Vector) -> str:
        return _digest(self.spec.check(weights)[self._ext])

    def is_current(self, weights: Vector) -> bool:
        return len(self.cache) == 0 or self.cache.tag == self.digest(weights)

    def prepare(self, weights: Vector, x: npt.NDArray[Any], y: npt.NDArray[Any]) -> Compensation | None:
        """Before training on ``weights``: if its extractor is new to the cache, shift each
        cached class by Δ_c measured on the current samples (x, y), or carry the features
        over unchanged (``compensate=False``, or no current sample to measure on)."""
        if self.is_current(weights):
            return None
        assert self._extractor is not None
        ys = np.asarray(y, dtype=np.int64)
        comp = Compensation()
        if self.config.compensate and ys.shape[0]:
            old = np.array(weights, copy=True)
            old[self._ext] = self._extractor
            comp = drift_deltas(
                self.task.features(weights, x),
                self.task.features(old, x),
                ys,
                self.cache.class_counts(),
                self.config.fallback,
            )
            self.cache.shift(comp.deltas)
        elif self.config.compensate:
            log.warning("SCC: a new extractor but no current sample to measure drift on; cache carried over")
        self._retag(weights)
        self._persist()
        return comp

    def calibration_set(
        self, weights: Vector, x: npt.NDArray[Any], y: npt.NDArray[Any]
    ) -> tuple[F32, I64]:
        """Features of the current samples under ``weights``' extractor ∪ the cache (eq. 16)."""
        if not self.is_current(weights):
            raise LocalProtocolError("cached features belong to another extractor: prepare() first")
        ys = np.asarray(y, dtype=np.int64)
        parts_z: list[F32] = []
        parts_y: list[I64] = []
        if ys.shape[0]:
            parts_z.append(np.asarray(self.task.features(weights, x), dtype=np.float32))
            parts_y.append(ys)
        if len(self.cache):
            parts_z.append(self.cache.features.astype(np.float32))
            parts_y.append(np.array(self.cache.labels))
        if not parts_y:
            raise InvalidSample("nothing to calibrate on: no current samples and an empty cache")
        return np.concatenate(parts_z), np.concatenate(parts_y)

    def calibrate(
        self, weights: Vector, x: npt.NDArray[Any], y: npt.NDArray[Any], config: TrainConfig
    ) -> TrainResult:
        """Fit only the linear head on current + cached features; every value outside the
        head comes back bit-identical. ``n_samples`` counts the current samples only (the
        cached rows already contributed to earlier updates)."""
        started = perf_counter()
        self.spec.check(weights)
        z, ys = self.calibration_set(weights, x, y)
        h = self.head
        w, b, loss = fit_head(
            z,
            ys,
            weights[h.weight].reshape(h.n_classes, h.feature_dim),
            weights[h.bias],
            epochs=config.epochs,
            batch_size=config.batch_size,
            lr=config.lr,
            seed=config.seed,
        )
        out = np.array(weights, copy=True)
        out[h.weight] = w.reshape(-1)
        out[h.bias] = b
        n_current = int(np.asarray(y).shape[0])
        return TrainResult(
            weights=out,
            n_samples=n_current,
            loss=loss,
            seconds=perf_counter() - started,
            extra={"device": "numpy", "group": self.classifier_group, "cached_rows": len(self.cache),
                   "current_rows": n_current},
        )

    def age_out(
        self, weights: Vector, ids: npt.NDArray[Any], x: npt.NDArray[Any], y: npt.NDArray[Any]
    ) -> int:
        """Move the samples among ``ids`` (with their x, y) that are not among the store's
        newest ``keep_raw`` into the cache, features under ``weights``' extractor, then delete
        them from the store. Returns how many left the store."""
        held = self.store.ids(self.kind)
        keep = set(held[len(held) - self.config.keep_raw :]) if self.config.keep_raw else set()
        ids = np.asarray(ids, dtype=np.int64)
        mask = np.array([int(i) not in keep for i in ids], dtype=bool)
        if not mask.any():
            return 0
        if not self.is_current(weights):
            raise LocalProtocolError("cached features belong to another extractor: prepare() first")
        z = self.task.features(weights, np.asarray(x)[mask])
        self.cache.add(z, np.asarray(y, dtype=np.int64)[mask], ids[mask])
        self._retag(weights)
        self._persist()  # durable before the raw samples go
        return self.store.remove(int(i) for i in ids[mask])

    def _retag(self, weights: Vector) -> None:
        tag = self.digest(weights)
        if self.cache.tag != tag:
            self.cache.retag(tag)
        self._extractor = np.array(weights[self._ext], dtype=np.float32, copy=True)


def _digest(extractor: npt.NDArray[Any]) -> str:
    """Same digest as :func:`extractor_digest`, from the extractor slice itself."""
    return hashlib.blake2b(np.ascontiguousarray(extractor).tobytes(), digest_size=8).hexdigest()
