"""Fold-on-arrival aggregation with robust defences, shared by the averaging strategies.

Theory of operation
-------------------
Each accepted update is *assessed* and *folded* when it arrives (``observe``, called from the
strategy's ``on_update`` / ``on_restore``), so the aggregation trigger costs at most one pass
over the model (``combine``):

1. **Staleness bound.** ``τ = version − base_version``; with ``max_staleness`` set, an update
   with ``τ > max_staleness`` is dropped (weight 0, counted ``dropped_stale``). It stays in the
   core's buffer and is consumed by the next aggregation, so watermarks stay exact.
2. **Sample-weight cap.** The weight from the claimed ``n_samples`` is clamped to
   ``sample_weight_cap × median`` of the recent claims (window of ``window`` accepted updates,
   active once ``min_known`` claims are known; counted ``samples_clamped``): one device
   claiming 2^62 samples cannot outweigh the fleet. In this window and the norms' (3), one
   device holds at most ``⌊device_share × n⌋`` of the ``n`` values, at least ``min_known``
   (its most recent; counted ``over_share``): one device pushing faster than the rest
   cannot fill a window and become the median it is measured against.
3. **Adaptive clipping.** The change ``d = w_k − w_base`` (the global vector at the update's
   base version, or the current one when the base is no longer retained) is scaled so that
   ``|d| ≤ clip_multiplier × median`` of the recent change norms of that layer group (window
   of ``window``, active once ``min_known`` norms are known; counted ``clipped``). Clip, never
   reject: an honest outlier still contributes, bounded. The norm window keeps raw norms; the
   median is robust while attackers are a minority of the window.
4. **Combiner.** ``mean`` (default) keeps Σ a_k x_k per layer group in one preallocated
   float32 accumulator (a_k = p_k / max p ≤ 1 keeps magnitudes near the data's; a new largest
   weight rescales the sum, about ln K times per buffer; the total weight Σ p_k is float64); ``median``, ``trimmed-mean``, ``krum`` and ``multi-krum`` keep x_k as a
   row of one preallocated (K, N) float32 matrix and reduce it at the trigger.

Here ``x_k`` is the (clipped) model ``w_base + c·d`` (``models``: the paper's SPIN rule) or the
(clipped) change ``c·d`` (``deltas``). Group semantics follow
:func:`coordinator.strategies.aggregate.weighted_average` / ``fedavg_deltas`` exactly: models —
full updates first, then each layer group's slice overwrites its part; deltas — the same, with
the current slice plus the group's mean change (not added on top of the whole updates' change).

The fold is used only if it was built from exactly the updates the core hands to the trigger
(same keys, groups, version and current vector); otherwise — updates restored without the
hook, a LASP version that narrows full updates to one group, a peer merge in between, PORT's
all-zero weights — it is rebuilt from the handed updates at the trigger. Correctness never
depends on the hook, only speed. Counters count each (reason, update) once; the windows
record each update once.

Float32 accumulation: the fold adds (and rescales) at most K terms, so its error is at most
about 2K·2⁻²⁴·Σ a_k|x_k| per coordinate (``tests/test_robust.py`` checks the bound against float64);
float64 accumulation measured slower (more memory traffic) and cannot hand its buffer over.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

from coordinator.strategies.base import BufferedUpdate, CoordinatorView, Strategy
from coordinator.strategies.staleness import (
    CONVERSIONS,
    StalenessPolicy,
    make_policy,
    staleness_factor,
)
from edge_sdk.errors import ConfigError
from edge_sdk.spec import FULL, Vector, sum_of_squares

__all__ = [
    "COMBINERS",
    "RobustAggregator",
    "RobustConfig",
    "UpdateStats",
    "coordinate_median",
    "krum_select",
    "sorting_network",
    "trimmed_mean",
]

COMBINERS = ("mean", "median", "trimmed-mean", "krum", "multi-krum")
_CHUNK = 65536
"""Elements per block of the fused loops (two float32 scratch blocks stay in L2)."""
_GONE = 4096
"""Keys a window remembers having dropped (more than any buffer a trigger rebuilds holds)."""
_EXACT_CLIP = 1e-2
"""An update clipped to less than this fraction of its change makes the trigger refold exactly."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RobustConfig:
    """Robust-aggregation parameters; the averaging strategies' configs extend this."""

    combiner: str = "mean"
    """``mean`` (the fold), ``median``, ``trimmed-mean``, ``krum``, ``multi-krum``."""
    clip_multiplier: float = 3.0
    """Clip each change to this × the median recent change norm; 0 disables clipping."""
    max_staleness: int | None = None
    """Drop updates staler than this many versions; None = keep all (see SpinConfig)."""
    staleness: str = "none"
    """Staleness policy on each update's weight (coordinator.strategies.staleness): none |
    damped (× (τ + 1)^(−a)) | drop-beyond (= none with max_staleness) | gradient-inversion |
    dc-asgd (convert updates staler than ``convert_beyond``, damped otherwise)."""
    a: float = 0.5
    """Exponent of the ``damped`` policy."""
    convert_beyond: int = 10
    """Converting policies: updates staler than this many versions are converted."""
    sample_weight_cap: float = 4.0
    """Clamp the weight from n_samples to this × the median recent claim; 0 disables."""
    trim_fraction: float = 0.1
    """trimmed-mean: fraction of the rows dropped on each side, per coordinate."""
    krum_f: int | None = None
    """krum / multi-krum: assumed Byzantine updates per buffer (None = (K − 3) // 2)."""
    window: int = 50
    """Recent accepted updates whose norms and claims set the bounds."""
    min_known: int = 5
    """No clipping / clamping until this many norms / claims are known."""
    device_share: float = 0.2
    """The most of each window one device's values may hold: ⌊device_share × values⌋, at
    least ``min_known`` (its most recent; past that its oldest goes, counted ``over_share``).
    A device pushing faster than the rest then cannot become the median it is clipped and
    clamped against; 1 = the plain window of the last ``window`` updates."""

    def __post_init__(self) -> None:
        if self.combiner not in COMBINERS:
            raise ConfigError(f"combiner must be one of {', '.join(COMBINERS)}; got {self.combiner!r}")
        if not (self.clip_multiplier >= 0 and math.isfinite(self.clip_multiplier)):
            raise ConfigError("clip_multiplier must be a finite number >= 0 (0 disables clipping)")
        if self.clip_multiplier and self.clip_multiplier < 1:
            raise ConfigError("clip_multiplier below 1 would clip the median honest update; use >= 1 or 0")
        if self.max_staleness is not None and self.max_staleness < 0:
            raise ConfigError("max_staleness must be >= 0 (or None)")
        make_policy(self.staleness, a=self.a, bound=self.max_staleness, convert_beyond=self.convert_beyond)  # validates
        if not (self.sample_weight_cap >= 0 and math.isfinite(self.sample_weight_cap)):
            raise ConfigError("sample_weight_cap must be a finite number >= 0 (0 disables the cap)")
        if self.sample_weight_cap and self.sample_weight_cap < 1:
            raise ConfigError("sample_weight_cap below 1 would clamp the median device; use >= 1 or 0")
        if not 0 <= self.trim_fraction < 0.5:
            raise ConfigError("trim_fraction must be in [0, 0.5)")
        if self.krum_f is not None and self.krum_f < 0:
            raise ConfigError("krum_f must be >= 0 (or None)")
        if self.window < 1 or self.min_known < 1:
            raise ConfigError("window and min_known must be >= 1")
        if not 0 < self.device_share <= 1:
            raise ConfigError("device_share must be in (0, 1] (1: one device may fill the windows)")

    def robust_params(self) -> dict[str, Any]:
        return {
            "combiner": self.combiner,
            "clip_multiplier": self.clip_multiplier,
            "max_staleness": self.max_staleness,
            **({"staleness": self.staleness, "a": self.a} if self.staleness != "none" else {}),
            **({"convert_beyond": self.convert_beyond} if self.staleness in CONVERSIONS else {}),
            "sample_weight_cap": self.sample_weight_cap,
            "device_share": self.device_share,
        }


@dataclass(frozen=True, slots=True)
class UpdateStats:
    """What a weigher may use: staleness, clamped sample weight, and (on request) the
    similarity terms d·d, d·g, g·g with d = w_k − w_base, g = w_current − w_base."""

    staleness: int
    n_weight: float
    has_base: bool
    dd: float = 0.0
    dg: float = 0.0
    gg: float = 0.0


Weigher = Callable[[UpdateStats], float]
"""p_k from an update's stats (default: the clamped sample count)."""


def _default_weight(stats: UpdateStats) -> float:
    return stats.n_weight


# ------------------------------------------------------------------ pure combiners


@cache
def sorting_network(n: int) -> tuple[tuple[int, int], ...]:
    """Batcher's odd–even merge sort comparators for ``n`` inputs (any n ≥ 1): applying
    ``(i, j)`` as (min → i, max → j) in order sorts. Elementwise min/max over rows is
    ~15× faster than ``np.median(axis=0)`` on (10, 11.7 M)."""
    pairs: list[tuple[int, int]] = []
    p = 1
    while p < n:
        k = p
        while k >= 1:
            for j in range(k % p, n - k, 2 * k):
                for i in range(min(k, n - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return tuple(pairs)


def _sorted_blocks(rows: np.ndarray, reduce: Callable[[list[np.ndarray], np.ndarray], None], out: np.ndarray) -> None:
    """Sort each column of ``rows`` (K, n) block by block and ``reduce(sorted_rows, out_block)``."""
    k, n = rows.shape
    pairs = sorting_network(k)
    buf = np.empty((k + 1, min(n, _CHUNK) or 1), dtype=np.float32)
    for a in range(0, n, _CHUNK):
        b = min(a + _CHUNK, n)
        block = [buf[r, : b - a] for r in range(k + 1)]
        for r in range(k):
            np.copyto(block[r], rows[r, a:b])
        spare = block[k]
        for i, j in pairs:
            np.minimum(block[i], block[j], out=spare)
            np.maximum(block[i], block[j], out=block[j])
            block[i], spare = spare, block[i]
        reduce(block[:k], out[a:b])


def coordinate_median(rows: np.ndarray, out: np.ndarray | None = None) -> Vector:
    """Coordinate-wise median of the rows of ``rows`` (K, n), as ``np.median(axis=0)``."""
    k, n = rows.shape
    res: Vector = np.empty(n, dtype=np.float32) if out is None else out

    def mid(block: list[np.ndarray], dst: np.ndarray) -> None:
        if k % 2:
            np.copyto(dst, block[k // 2])
        else:
            np.add(block[k // 2 - 1], block[k // 2], out=dst)
            np.multiply(dst, np.float32(0.5), out=dst)

    _sorted_blocks(rows, mid, res)
    return res


def trim_count(k: int, fraction: float) -> int:
    """Rows trimmed per side: ⌊fraction·K⌋, leaving at least one."""
    return min(int(fraction * k), (k - 1) // 2)


def trimmed_mean(rows: np.ndarray, fraction: float, out: np.ndarray | None = None) -> Vector:
    """Per coordinate, the mean after dropping the ⌊fraction·K⌋ lowest and highest values."""
    k, n = rows.shape
    t = trim_count(k, fraction)
    res: Vector = np.empty(n, dtype=np.float32) if out is None else out
    inv = np.float32(1.0 / (k - 2 * t))

    def middle(block: list[np.ndarray], dst: np.ndarray) -> None:
        np.copyto(dst, block[t])
        for r in range(t + 1, k - t):
            np.add(dst, block[r], out=dst)
        np.multiply(dst, inv, out=dst)

    _sorted_blocks(rows, middle, res)
    return res


def krum_select(rows: np.ndarray, f: int | None, multi: bool) -> list[int]:
    """Krum (Blanchard et al. 2017): score each row by the summed squared distances to its
    K − f − 2 nearest rows; Krum keeps the best row, Multi-Krum the K − f best."""
    k = rows.shape[0]
    if k <= 2:
        return list(range(k))
    byz = max(0, (k - 3) // 2) if f is None else min(f, k - 1)
    # Under errstate for BLAS's spurious flags; a non-finite distance counts as infinitely far (an
    # overflow cannot happen for updates within MAX_UPDATE_NORM: their products stay near 1e30).
    with np.errstate(over="ignore", invalid="ignore"):
        gram = np.asarray(np.dot(rows, rows.T), dtype=np.float64)
        sq = np.diag(gram)
        dist = np.maximum(sq[:, None] + sq[None, :] - 2.0 * gram, 0.0)
    dist[~np.isfinite(dist)] = np.inf
    nearest = max(1, k - byz - 2)
    scores = [float(np.sort(np.delete(dist[i], i))[:nearest].sum()) for i in range(k)]
    order = sorted(range(k), key=lambda i: (scores[i], i))
    return order[: max(1, k - byz)] if multi else order[:1]


# ------------------------------------------------------------------ the stateful aggregator


def _same_array(held: np.ndarray | None, other: np.ndarray) -> bool:
    """``other`` is ``held`` or a view of all of it (we hold ``held``, so its memory cannot be
    reused by another array while we compare)."""
    if held is None:
        return False
    if held is other:
        return True
    base = held.base  # the usual case, fast: both are whole views of the array that owns the memory
    if (type(base) is np.ndarray and other.base is base and held.shape == other.shape == base.shape
            and held.strides == other.strides == base.strides and base.flags.owndata):
        return True  # same extent as the allocation: the same start (no dict per call, as below)
    return (
        held.shape == other.shape and held.__array_interface__["data"][0] == other.__array_interface__["data"][0]
    )


@dataclass(slots=True)
class _Entry:
    key: tuple[str, int]
    group: str
    weight: float
    row: int = -1
    """Row of the (K, N) matrix (non-mean combiners), -1 for none or dropped."""
    norm_of: tuple[object, int, float] | None = None
    """(the update's weights, its base version, Σd²) once pass 1 measured the change: a
    rebuild of the same fold (same version, same weights) reuses Σd² instead of rescanning."""


class _Window:
    """The last ``size`` values, each recorded once per update key (device, seq); the median
    in O(1) from a sorted copy kept alongside (insert and evict by bisection: no sort per update).

    One device holds at most ``max(floor, ⌊share · n⌋)`` of the ``n`` values (its most recent:
    past that, its oldest goes): a device that sends updates faster than the rest cannot fill
    the window and become the median it is clipped against. ``floor`` (``min_known``) keeps a
    young window usable by a small fleet; ``share`` 1 is the plain last-``size`` window."""

    __slots__ = ("floor", "gone", "gone_order", "held", "share", "size", "sorted", "values")

    def __init__(self, size: int, share: float = 1.0, floor: int = 1) -> None:
        self.size = size
        self.share = share
        self.floor = floor
        self.values: OrderedDict[tuple[str, int], float] = OrderedDict()
        self.sorted: list[float] = []
        self.held: dict[str, int] = {}
        """Values per device."""
        self.gone: set[tuple[str, int]] = set()
        """The keys dropped last (at most :data:`_GONE`, oldest first in ``gone_order``): a
        trigger that rebuilds its fold observes its updates again, and a dropped one must not
        come back in as the newest."""
        self.gone_order: deque[tuple[str, int]] = deque()

    def median(self, min_known: int) -> float | None:
        n = len(self.sorted)
        if n < min_known:
            return None
        s = self.sorted
        return float(s[n // 2]) if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2  # as statistics.median

    def record(self, key: tuple[str, int], value: float) -> bool:
        """Keep ``value``; False if the key was there already. A device past its share
        loses its oldest value (True: the caller counts it ``over_share``); else, past
        ``size``, the oldest value goes. (One in, at most one out.)"""
        values = self.values
        if key in values or key in self.gone:
            return False
        values[key] = value
        bisect.insort(self.sorted, value)
        held = self.held
        device = key[0]
        n = held.get(device, 0) + 1
        held[device] = n
        size = self.size
        kept = len(values) if len(values) <= size else size  # the values left after this call
        over = n > self.floor and n > self.share * kept  # (⌊share·kept⌋ < n ⇔ share·kept < n)
        if over:  # only a device past its share pays this scan (at most ``size`` keys)
            self._remove(next(k for k in values if k[0] == device))
        elif len(values) > size:
            self._remove(next(iter(values)))  # the oldest (an OrderedDict: its first key in O(1))
        return over

    def _remove(self, key: tuple[str, int]) -> None:
        """Drop one value (and remember its key: a rebuild must not bring it back)."""
        old = self.values.pop(key)
        self.gone.add(key)
        order = self.gone_order
        order.append(key)
        if len(order) > _GONE:
            self.gone.discard(order.popleft())
        held = self.held
        device = key[0]
        n = held[device] - 1
        if n:
            held[device] = n
        else:
            del held[device]
        s = self.sorted
        i = bisect.bisect_left(s, old)
        if i < len(s) and s[i] == old:
            del s[i]
        else:  # NaN (not ordered): by identity
            s.remove(old)

    def trim(self) -> None:
        """Bring the values within ``size`` and each device within its share, dropping the
        oldest first: after a live change of either (``record`` drops at most one per value
        it takes) and after a restore (values loaded as they were, judged once)."""
        values, held = self.values, self.held
        while True:
            kept = min(len(values), self.size)
            over = next((d for d, n in held.items() if n > self.floor and n > self.share * kept), None)
            if over is not None:
                self._remove(next(k for k in values if k[0] == over))
            elif len(values) > self.size:
                self._remove(next(iter(values)))
            else:
                return

    def load(self, key: tuple[str, int], value: float) -> None:
        """Take a checkpointed value as it was (call :meth:`trim` once all are in)."""
        if key in self.values:
            return
        self.values[key] = value
        bisect.insort(self.sorted, value)
        self.held[key[0]] = self.held.get(key[0], 0) + 1


def _policy(config: RobustConfig) -> StalenessPolicy:
    return make_policy(config.staleness, a=config.a, bound=config.max_staleness, convert_beyond=config.convert_beyond)


class RobustAggregator:
    """Assess and fold updates on arrival; combine at the trigger. See the module docstring."""

    def __init__(
        self,
        config: RobustConfig,
        *,
        deltas: bool = False,
        server_lr: float = 1.0,
        expected: int = 10,
        weigher: Weigher | None = None,
        wants_similarity: bool = False,
    ) -> None:
        self.config = config
        self._policy = _policy(config)
        self.deltas = deltas
        self.server_lr = server_lr
        self.expected = max(1, expected)
        self.weigher = weigher or _default_weight
        self.wants_similarity = wants_similarity
        self.counters: Counter[str] = Counter()
        self._claims = self._window()
        self._norms: dict[str, _Window] = {}
        self._counted: set[tuple[str, tuple[str, int]]] = set()
        self._entries: list[_Entry] = []
        self._version: int | None = None
        self._current: Vector | None = None
        self._acc: dict[str, np.ndarray] = {}
        self._acc_started: set[str] = set()
        self._total: dict[str, float] = {}
        self._scale: dict[str, float] = {}
        self._rows: np.ndarray | None = None
        self._n_rows = 0
        self.rebuilds = 0
        """Triggers whose fold did not match the handed updates and was rebuilt there."""
        self._optimistic = True
        self._inexact = False  # an update clipped by far was folded optimistically: refold at the trigger
        self._scratch = np.empty(_CHUNK, dtype=np.float32)
        self._scratch2 = np.empty(_CHUNK, dtype=np.float32)
        self._scratch_views: tuple[int, np.ndarray, np.ndarray] | None = None

    def reconfigure(self, config: RobustConfig, *, deltas: bool, server_lr: float, expected: int) -> None:
        """New parameters (SIGHUP): the fold in progress is dropped and rebuilt at the
        trigger under the new ones; the windows and counters are kept."""
        self.config, self.deltas, self.server_lr, self.expected = config, deltas, server_lr, max(1, expected)
        self._policy = _policy(config)
        for window in (self._claims, *self._norms.values()):
            window.size, window.share, window.floor = config.window, config.device_share, config.min_known
            window.trim()  # a smaller window or share holds now, not after the next many updates
        self._reset()

    def _window(self) -> _Window:
        return _Window(self.config.window, self.config.device_share, self.config.min_known)

    @property
    def folded(self) -> int:
        """Updates folded since the last trigger."""
        return len(self._entries)

    # ------------------------------------------------------------------ arrival

    def observe(self, view: CoordinatorView, update: BufferedUpdate) -> None:
        """Assess ``update`` and fold it in (the strategy's ``on_update`` / ``on_restore``)."""
        weights = view.weights  # one read-only view for the check and the fold
        if self._version != view.version or not _same_array(self._current, weights):
            self._reset()
            self._version, self._current = view.version, weights
        self._observe(view, update, uniform=False, weights=weights)

    def _count(self, reason: str, key: tuple[str, int]) -> None:
        if (reason, key) not in self._counted:
            self._counted.add((reason, key))
            self.counters[reason] += 1

    def _observe(self, view: CoordinatorView, u: BufferedUpdate, *, uniform: bool, weights: Vector | None = None,
                 known: Mapping[tuple[str, int], tuple[object, int, float]] | None = None) -> None:
        """``weights``: ``view.weights`` when the caller has it already; ``known``: Σd² per
        update key measured by this fold before a rebuild (same version and weights)."""
        cfg = self.config
        key, group = u.key, u.group  # (``key`` builds a tuple per access)
        tau = max(view.version - u.base_version, 0)
        factor = staleness_factor(self._policy, tau)  # built with the config (and again on reconfigure)
        if factor is None:
            self._count("dropped_stale", key)
            self._entries.append(_Entry(key=key, group=group, weight=0.0))
            return
        n_weight = float(u.n_samples)
        if cfg.sample_weight_cap:
            median_claim = self._claims.median(cfg.min_known)
            if self._claims.record(key, float(u.n_samples)):
                self._count("over_share", key)
            if median_claim is not None and n_weight > cfg.sample_weight_cap * median_claim:
                n_weight = cfg.sample_weight_cap * median_claim
                self._count("samples_clamped", key)
        sl = view.spec.group_slice(group)
        base = view.weights_at(u.base_version)
        has_base = base is not None
        current = (view.weights if weights is None else weights)[sl]
        ref = current if base is None else base[sl]
        w = np.asarray(u.weights, dtype=np.float32)
        clip = bool(cfg.clip_multiplier)
        similarity = self.wants_similarity and has_base and tau > 0
        need_d = clip or self.deltas or similarity
        mean = cfg.combiner == "mean"
        row: np.ndarray | None = None
        if not mean:
            row = self._new_row()[sl]
        weight: float | None = None
        if not similarity:
            if uniform:
                weight = 1.0
            elif self.weigher is _default_weight:  # what it would return, without building the stats
                weight = n_weight
            else:
                weight = self.weigher(UpdateStats(staleness=tau, n_weight=n_weight, has_base=has_base))
            weight = weight * factor if factor != 1.0 else weight
        # Pass 1: the change's norm (and PORT's similarity terms), fused with the optimistic
        # (unclipped) fold when the weight is already known.
        optimistic = mean and weight is not None and self._optimistic
        acc, a, first = self._acc_target(group, sl, weight) if optimistic and weight is not None else (None, 0.0, False)
        measured = known.get(key) if known is not None and need_d and acc is None and row is None and not similarity else None
        if measured is not None and measured[0] is u.weights and measured[1] == u.base_version:
            dd, dg, gg = measured[2], 0.0, 0.0  # pass 1 would only recompute the same Σd² (same arrays, same ops)
        else:
            dd, dg, gg = self._scan(w, ref, current if similarity else None, need_d, acc, a, first, row)
        if similarity:
            weight = 1.0 if uniform else self.weigher(
                UpdateStats(staleness=tau, n_weight=n_weight, has_base=True, dd=dd, dg=dg, gg=gg)
            )
            weight = weight * factor if factor != 1.0 else weight
        assert weight is not None
        c = 1.0
        if clip:
            norms = self._norms.get(group)
            if norms is None:  # (not setdefault: that would build a window per update)
                norms = self._norms[group] = self._window()
            median_norm = norms.median(cfg.min_known)
            norm = math.sqrt(dd)
            if norms.record(key, norm):
                self._count("over_share", key)
            if median_norm is not None and norm > cfg.clip_multiplier * median_norm:
                c = cfg.clip_multiplier * median_norm / norm if math.isfinite(norm) else 0.0
                self._count("clipped", key)
                # Folded unclipped then corrected in float32, a huge change cancels away the rest
                # of the sum: the trigger rebuilds the fold clipping before folding (rare: attacks).
                self._inexact = self._inexact or (optimistic and c < _EXACT_CLIP)
        entry = _Entry(key=key, group=group, weight=weight, norm_of=(u.weights, u.base_version, dd) if need_d else None)
        self._entries.append(entry)
        if mean:
            if acc is None:  # the weight needed pass 1: fold now, clipped
                acc, a, first = self._acc_target(group, sl, weight)
                self._fold(w, ref, acc, a, c, first)
            elif c != 1.0:  # pass 2 only for a clipped update
                self._fold(w, ref, acc, a * (c - 1.0), 1.0, False, change_only=True)
        else:
            assert row is not None
            entry.row = self._n_rows - 1
            if c != 1.0:
                if self.deltas:
                    np.multiply(row, np.float32(c), out=row)
                else:
                    self._blend_row(row, ref, c)

    def _acc_target(self, group: str, sl: slice, weight: float) -> tuple[np.ndarray, float, bool]:
        """The group's accumulator and a_k = p_k / max p (≤ 1: the float32 sum cannot overflow
        where the float64 reference would not, short of |x| near float32's max / K)."""
        self._total[group] = self._total.get(group, 0.0) + weight
        acc = self._acc.get(group)
        if acc is None or acc.shape[0] != sl.stop - sl.start:
            acc = self._acc[group] = np.empty(sl.stop - sl.start, dtype=np.float32)
        first = group not in self._acc_started
        self._acc_started.add(group)
        scale = self._scale.get(group)
        if weight > 0 and (scale is None or weight > scale):
            if scale is not None and not first:  # a new largest weight: rescale the sum (rare)
                np.multiply(acc, np.float32(scale / weight), out=acc)
            scale = self._scale[group] = weight
        return acc, (weight / scale if scale else 0.0), first

    def _scan(
        self,
        w: np.ndarray,
        ref: np.ndarray,
        current: np.ndarray | None,
        need_d: bool,
        acc: np.ndarray | None,
        a: float,
        first: bool,
        row: np.ndarray | None,
    ) -> tuple[float, float, float]:
        """One blocked pass: d = w − ref, Σd², [d·g, g·g], acc (=|+=) a·x, row = x."""
        dd = dg = gg = 0.0
        af = np.float32(a)
        n = w.shape[0]
        for s in range(0, n, _CHUNK):
            e = min(s + _CHUNK, n)
            d, t = self._scratches(e - s)
            if e - s == n:  # one block: the whole vectors (the same memory as [0:n], without the slices)
                w_se, ref_se, acc_se, row_se = w, ref, acc, row
            else:
                w_se, ref_se = w[s:e], ref[s:e]
                acc_se = acc[s:e] if acc is not None else None
                row_se = row[s:e] if row is not None else None
            if need_d:
                np.subtract(w_se, ref_se, out=d)
                # An overflow is redone in float64 below.
                dd += sum_of_squares(d)
                if current is not None:
                    with np.errstate(over="ignore", invalid="ignore"):
                        np.subtract(current[s:e], ref_se, out=t)
                        dg += float(np.dot(d, t))
                        gg += float(np.dot(t, t))
            x = d if self.deltas else w_se
            if acc_se is not None:
                if a == 1.0:  # x·1 is x exactly: one operation less (the largest weight so far, often every one)
                    if first:
                        np.copyto(acc_se, x)
                    else:
                        np.add(acc_se, x, out=acc_se)
                elif first:
                    np.multiply(x, af, out=acc_se)
                else:
                    np.multiply(x, af, out=t)
                    np.add(acc_se, t, out=acc_se)
            if row_se is not None:
                np.copyto(row_se, x)
        if need_d and not (math.isfinite(dd) and math.isfinite(dg) and math.isfinite(gg)):
            with np.errstate(over="ignore", invalid="ignore"):  # float32 squares overflowed: redo in float64
                diff = np.asarray(w, dtype=np.float64) - ref
                dd = float(np.dot(diff, diff))
                if current is not None:
                    g = np.asarray(current, dtype=np.float64) - ref
                    dg, gg = float(np.dot(diff, g)), float(np.dot(g, g))
        return dd, dg, gg

    def _scratches(self, m: int) -> tuple[np.ndarray, np.ndarray]:
        """The two scratch buffers' first ``m`` values (views made once per length)."""
        cached = self._scratch_views
        if cached is None or cached[0] != m:
            cached = self._scratch_views = (m, self._scratch[:m], self._scratch2[:m])
        return cached[1], cached[2]

    def _fold(self, w: np.ndarray, ref: np.ndarray, acc: np.ndarray, a: float, c: float, first: bool,
              change_only: bool = False) -> None:
        """acc (=|+=) a·x with x = c·d (deltas or ``change_only``) or ref + c·d (models)."""
        n = w.shape[0]
        af, cf = np.float32(a), np.float32(c)
        for s in range(0, n, _CHUNK):
            e = min(s + _CHUNK, n)
            d, t = self._scratches(e - s)
            if e - s == n:  # one block: the whole vectors (the same memory as [0:n], without the slices)
                w_se, ref_se, acc_se = w, ref, acc
            else:
                w_se, ref_se, acc_se = w[s:e], ref[s:e], acc[s:e]
            np.subtract(w_se, ref_se, out=d)
            np.multiply(d, cf * af, out=d)
            if not (self.deltas or change_only):
                np.multiply(ref_se, af, out=t)
                np.add(d, t, out=d)
            if first:
                np.copyto(acc_se, d)
            else:
                np.add(acc_se, d, out=acc_se)

    def _blend_row(self, row: np.ndarray, ref: np.ndarray, c: float) -> None:
        cf = np.float32(c)
        for s in range(0, row.shape[0], _CHUNK):
            e = min(s + _CHUNK, row.shape[0])
            r = row[s:e]
            np.subtract(r, ref[s:e], out=r)
            np.multiply(r, cf, out=r)
            np.add(r, ref[s:e], out=r)

    def _new_row(self) -> np.ndarray:
        assert self._current is not None
        n = self._current.shape[0]
        if self._rows is None or self._rows.shape[1] != n:
            self._rows = np.empty((min(self.expected, 1024), n), dtype=np.float32)  # grows past: k may be huge
        elif self._n_rows == self._rows.shape[0]:  # more than expected: grow (rare)
            grown = np.empty((2 * self._rows.shape[0], n), dtype=np.float32)
            grown[: self._n_rows] = self._rows[: self._n_rows]
            self._rows = grown
        self._n_rows += 1
        row: np.ndarray = self._rows[self._n_rows - 1]
        return row

    def _reset(self) -> None:
        self._entries = []
        self._acc_started.clear()
        self._total.clear()
        self._scale.clear()
        self._n_rows = 0
        self._version = None
        self._current = None
        self._inexact = False

    # ------------------------------------------------------------------ trigger

    def combine(self, view: CoordinatorView, updates: Sequence[BufferedUpdate]) -> Vector:
        """The new global vector from the folded ``updates`` (rebuilt first if the fold
        does not match them exactly)."""
        if not updates:
            return np.array(view.weights, dtype=np.float32, copy=True)
        matches = (
            self._version == view.version
            and _same_array(self._current, view.weights)
            and len(self._entries) == len(updates)
            and all(e.key == u.key and e.group == u.group for e, u in zip(self._entries, updates, strict=True))
        )
        if not matches or self._inexact:
            # Same version, same updates (only the optimistic fold was inexact): their Σd² stand.
            known = {e.key: e.norm_of for e in self._entries if e.norm_of is not None} if matches else None
            self._optimistic = False  # norms first, then the clipped fold: exact
            try:
                self._refold(view, updates, uniform=False, known=known)
            finally:
                self._optimistic = True
        if self.wants_similarity and not any(e.weight > 0 for e in self._entries):
            # PORT: all raw weights zero → uniform (as ``port_weights``); dropped stay out.
            self._refold(view, updates, uniform=True)
        try:
            return self._finish(view)
        finally:
            self._reset()
            self._counted.clear()

    def _refold(self, view: CoordinatorView, updates: Sequence[BufferedUpdate], *, uniform: bool,
                known: Mapping[tuple[str, int], tuple[object, int, float]] | None = None) -> None:
        self.rebuilds += 1
        self._reset()
        self._version, self._current = view.version, view.weights
        for u in updates:
            self._observe(view, u, uniform=uniform, known=known)

    def _groups(self) -> list[str]:
        seen = dict.fromkeys(e.group for e in self._entries if e.weight > 0 or e.row >= 0)
        return sorted(seen, key=lambda g: g != FULL)  # full first, then groups in arrival order

    def _finish(self, view: CoordinatorView) -> Vector:
        current = view.weights
        spec = view.spec
        groups = self._groups()
        out: Vector | None = None
        if self.config.combiner == "mean":
            full_total = self._total.get(FULL, 0.0)
            if FULL in groups and full_total > 0:
                out = self._acc.pop(FULL)  # handed over: the next round allocates afresh
                self._scale_into(out, out, current, self._scale[FULL] / full_total)
            else:
                out = np.array(current, dtype=np.float32, copy=True)
            for g in groups:
                if g == FULL or self._total.get(g, 0.0) <= 0:
                    continue
                sl = spec.group_slice(g)
                target = out[sl]
                # deltas: the group's mean change goes onto the current slice, replacing the whole
                # updates' there (as models' overwrite; adding both stepped the slice twice)
                self._scale_into(self._acc[g], target, current[sl], self._scale[g] / self._total[g])
            return out
        out = np.array(current, dtype=np.float32, copy=True)
        assert self._rows is not None or not groups
        for g in groups:
            members = [e for e in self._entries if e.group == g and e.row >= 0]
            if not members:
                continue
            sl = spec.group_slice(g)
            rows = self._member_rows(members, sl)
            combined = self._reduce(rows, [e.weight for e in members])
            if self.deltas:  # onto the current slice (a group's slice replaces the whole updates' there)
                out[sl] = current[sl] + np.float32(self.server_lr) * combined
            else:
                out[sl] = combined
        return out

    def _scale_into(self, acc: np.ndarray, out: np.ndarray, current: np.ndarray, factor: float) -> None:
        """out = acc·factor (models) or current + η·acc·factor (deltas)."""
        if not self.deltas:
            np.multiply(acc, np.float32(factor), out=out)
            return
        f = np.float32(self.server_lr * factor)
        for s in range(0, acc.shape[0], _CHUNK):
            e = min(s + _CHUNK, acc.shape[0])
            t = self._scratch[: e - s]
            np.multiply(acc[s:e], f, out=t)
            np.add(t, current[s:e], out=out[s:e])

    def _member_rows(self, members: list[_Entry], sl: slice) -> np.ndarray:
        assert self._rows is not None
        idx = [e.row for e in members]
        if idx == list(range(idx[0], idx[0] + len(idx))):
            return self._rows[idx[0] : idx[0] + len(idx), sl]
        return self._rows[idx][:, sl]

    def _reduce(self, rows: np.ndarray, weights: list[float]) -> np.ndarray:
        name = self.config.combiner
        if name == "median":
            return coordinate_median(rows)
        if name == "trimmed-mean":
            return trimmed_mean(rows, self.config.trim_fraction)
        chosen = krum_select(np.ascontiguousarray(rows), self.config.krum_f, multi=name == "multi-krum")
        p = np.array([weights[i] for i in chosen], dtype=np.float64)
        p = p / p.sum() if p.sum() > 0 else np.full(len(chosen), 1.0 / len(chosen))
        acc = np.zeros(rows.shape[1], dtype=np.float32)
        for i, pi in zip(chosen, p, strict=True):
            acc += np.float32(pi) * rows[i]
        return acc

    # ------------------------------------------------------------------ durability

    def checkpoint(self) -> dict[str, Any]:
        """The windows and counters, JSON-able, for a commit's metadata: restored with
        :meth:`restore`, clipping and clamping resume at once after a restart instead of
        after ``min_known`` updates."""
        def rows(w: _Window) -> list[list[Any]]:
            return [[d, s, v] for (d, s), v in w.values.items()]

        return {
            "claims": rows(self._claims),
            "norms": {g: rows(w) for g, w in self._norms.items()},
            "counts": dict(self.counters),
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        """Undo :meth:`checkpoint` (before the pending updates are restored). Malformed
        entries are skipped: this is our own metadata, but a bad file must not stop a start."""
        def fill(window: _Window, rows: object) -> None:
            for row in rows if isinstance(rows, list) else []:
                if isinstance(row, list) and len(row) == 3 and isinstance(row[0], str) and isinstance(row[1], int):
                    value = float(row[2])
                    if math.isfinite(value) and value >= 0:
                        window.load((row[0], row[1]), value)
            window.trim()

        fill(self._claims, state.get("claims"))
        norms = state.get("norms")
        for group, rows in (norms.items() if isinstance(norms, Mapping) else ()):
            fill(self._norms.setdefault(str(group), self._window()), rows)
        counts = state.get("counts")
        for reason, n in (counts.items() if isinstance(counts, Mapping) else ()):
            if isinstance(n, int) and n >= 0:
                self.counters[str(reason)] = n

    # ------------------------------------------------------------------ status

    def describe(self) -> dict[str, Any]:
        return {**self.config.robust_params(), "counts": dict(sorted(self.counters.items()))}


class RobustStrategy(Strategy):
    """Base of the averaging strategies: their fold and defences live in ``self.robust``,
    which a restart rebuilds from the restored updates and a checkpoint carries."""

    robust: RobustAggregator

    def on_restore(self, view: CoordinatorView, update: BufferedUpdate) -> None:
        self.robust.observe(view, update)

    def checkpoint(self) -> dict[str, Any]:
        return {"robust": self.robust.checkpoint()}

    def restore_state(self, state: Mapping[str, Any]) -> None:
        robust = state.get("robust")
        if isinstance(robust, Mapping):
            self.robust.restore(robust)
