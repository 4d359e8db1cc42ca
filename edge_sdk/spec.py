"""Model representation: one contiguous float32 vector plus a :class:`ModelSpec`.

The spec names every parameter, its shape and its offset into the vector, and groups
parameters into named *layer groups* (``extractor``, ``classifier``, …). Groups are
contiguous slices of the vector, in the order the spec lists them, so a partial sync
(LASP) sends one slice and aggregation is plain vector arithmetic on the buffer.

This module is pure numpy; the torch bridge lives in :mod:`edge_sdk.torchbridge`.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_sdk.errors import ConfigError, NonFiniteWeights, ShapeMismatch, WeightsOutOfRange

Vector = npt.NDArray[np.float32]

FULL = "full"
"""Group name that stands for the whole vector."""
_F32 = np.dtype(np.float32)
_all_true = np.logical_and.reduce

MAX_UPDATE_NORM = 1e15
"""The largest L2 norm of a device's weights that :meth:`ModelSpec.check_update` accepts.
Trained models are many orders of magnitude below it (a ResNet-18's norm is about 1e2); above
it, finite float32 values can overflow the coordinator's weighted sums (3e38 everywhere
did), and with the change norms' squares below float32's maximum every clipping and
weighting step stays finite."""
_MAX_UPDATE_SQ = MAX_UPDATE_NORM * MAX_UPDATE_NORM


def _dot_self(v: npt.NDArray[Any]) -> float:
    return float(np.dot(v, v))


def _dot_self_ignoring(v: npt.NDArray[Any]) -> float:
    with np.errstate(over="ignore", invalid="ignore"):
        return _dot_self(v)


sum_of_squares: Callable[[npt.NDArray[Any]], float] = (
    np.errstate(over="ignore", invalid="ignore")(_dot_self) if np.lib.NumpyVersion(np.__version__) >= "2.0.0" else _dot_self_ignoring
)
"""``float(np.dot(v, v))`` with overflow and invalid values ignored: an overflow gives inf, a
NaN or Inf value NaN or inf, which the caller tests (``np.dot`` reports floating point errors
as a ufunc does). On numpy 2, np.errstate's decorator form: the same state for the call
without building and entering a context manager each time (1 µs less); numpy 1.x's decorator
keeps the saved state on its one shared object, which threads would overwrite (np.dot
releases the GIL), so there it is the ``with`` block."""


FINITE_PROOFS = 16_384
"""How many immutable vectors :meth:`ModelSpec.check` remembers having found all finite (see
:func:`_proven_finite`): the most recent, whatever became of them (a weak reference each)."""


class _Proof(weakref.ref[npt.NDArray[Any]]):
    """A weak reference to a vector found all finite, with its id, shape and strides then."""

    __slots__ = ("bounded", "key", "shape", "strides")
    key: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    bounded: bool
    """Its norm was found within :data:`MAX_UPDATE_NORM` too (:meth:`ModelSpec.check_update`)."""


_FINITE: dict[int, _Proof] = {}
_FINITE_ORDER: deque[_Proof] = deque()


def _proven_finite(weights: npt.NDArray[Any], *, bounded: bool = False) -> bool:
    """True for the very array object found all finite before (``bounded``: within
    :data:`MAX_UPDATE_NORM` too), still alive and with the same shape and strides: a read-only
    ``ndarray`` whose memory is a ``bytes`` object, which nothing can change (numpy refuses to
    make it writeable). One model frame handed to many devices, or an update checked by its
    device and again by a coordinator in the same process (``codec.carry_decoded``)."""
    proof = _FINITE.get(id(weights))
    return proof is not None and (proof.bounded or not bounded) and proof() is weights and proof.shape == weights.shape \
        and proof.strides == weights.strides


def _remember_finite(weights: npt.NDArray[Any], *, bounded: bool = False) -> None:
    """Remember ``weights`` if it is a whole ``bytes`` object seen as a read-only vector: what
    the in-process transport hands its receivers, the only arrays that get checked again. A
    view into a received frame (the header before it) is checked once and dropped, so it is
    not remembered: that would cost every decoded message a proof that never pays."""
    base: object = weights.base
    if type(base) is not bytes or len(base) != weights.nbytes or type(weights) is not np.ndarray \
            or weights.flags.writeable:
        return
    proof = _Proof(weights)
    proof.key, proof.shape, proof.strides, proof.bounded = id(weights), weights.shape, weights.strides, bounded
    _FINITE[proof.key] = proof  # a dead array's id reused: its proof is replaced (it never matched)
    _FINITE_ORDER.append(proof)
    while len(_FINITE_ORDER) > FINITE_PROOFS:  # bounded, no callback per array: forget the oldest
        old = _FINITE_ORDER.popleft()
        if _FINITE.get(old.key) is old:
            del _FINITE[old.key]


@dataclass(frozen=True, slots=True, kw_only=True)
class ParamSpec:
    name: str
    shape: tuple[int, ...]
    offset: int
    group: str

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelSpec:
    """Names, shapes, offsets and layer groups of one model's flat float32 vector."""

    model_id: str
    params: tuple[ParamSpec, ...]
    size: int = field(init=False)
    group_slices: Mapping[str, slice] = field(init=False)
    fingerprint: str = field(init=False)

    def __post_init__(self) -> None:
        if not self.model_id:
            raise ConfigError("model_id must not be empty")
        offset = 0
        slices: dict[str, slice] = {}
        seen: set[str] = set()
        for p in self.params:
            if p.name in seen:
                raise ConfigError(f"duplicate parameter name {p.name!r}")
            seen.add(p.name)
            if p.offset != offset:
                raise ConfigError(f"parameter {p.name!r} at offset {p.offset}, expected {offset}")
            if p.group == FULL:
                raise ConfigError(f"{FULL!r} is reserved and cannot name a group")
            if p.group in slices:
                if slices[p.group].stop != offset:
                    raise ConfigError(f"group {p.group!r} is not contiguous")
                slices[p.group] = slice(slices[p.group].start, offset + p.size)
            else:
                slices[p.group] = slice(offset, offset + p.size)
            offset += p.size
        object.__setattr__(self, "size", offset)
        object.__setattr__(self, "group_slices", dict(slices))
        digest = hashlib.sha256(
            json.dumps(self.to_dict(), sort_keys=True).encode()
        ).hexdigest()
        object.__setattr__(self, "fingerprint", digest[:16])

    @classmethod
    def build(cls, model_id: str, entries: Iterable[tuple[str, tuple[int, ...], str]]) -> ModelSpec:
        """Lay out ``(name, shape, group)`` entries; groups must already be contiguous."""
        params = []
        offset = 0
        for name, shape, group in entries:
            p = ParamSpec(name=name, shape=tuple(int(s) for s in shape), offset=offset, group=group)
            params.append(p)
            offset += p.size
        return cls(model_id=model_id, params=tuple(params))

    @property
    def groups(self) -> tuple[str, ...]:
        return tuple(self.group_slices)

    def group_slice(self, group: str) -> slice:
        if group == FULL:
            return slice(0, self.size)
        try:
            return self.group_slices[group]
        except KeyError:
            raise ShapeMismatch(f"model {self.model_id!r} has no group {group!r}") from None

    def group_size(self, group: str) -> int:
        s = self.group_slice(group)
        return int(s.stop - s.start)

    def check(self, weights: npt.NDArray[Any], group: str = FULL) -> Vector:
        """Validate weights for ``group``: 1-D float32 of the right length, all finite. The
        finiteness pass is skipped for an immutable array that passed it before (see
        :func:`_proven_finite`); shape and dtype are checked every time."""
        self._check_shape(weights, group)
        proof = _FINITE.get(id(weights))  # _proven_finite, inlined (every message's check)
        if proof is not None and proof() is weights and proof.shape == weights.shape and proof.strides == weights.strides:
            return weights
        if not _all_true(np.isfinite(weights)):  # 1-D: all() without its Python-level wrapper
            raise NonFiniteWeights(f"{self.model_id}/{group}: weights contain NaN or Inf")
        base: object = weights.base
        if type(base) is bytes and len(base) == weights.nbytes:  # else never remembered: no call
            _remember_finite(weights)
        return weights

    def check_update(self, weights: npt.NDArray[Any], group: str = FULL) -> Vector:
        """What a coordinator accepts from a device, and a device sends: :meth:`check`, and a
        norm of at most :data:`MAX_UPDATE_NORM` (:class:`~edge_sdk.errors.WeightsOutOfRange`).
        One pass: the sum of squares is NaN or inf for NaN or Inf values, so it checks those
        too (skipped, as in :meth:`check`, for an immutable array that passed it before)."""
        self._check_shape(weights, group)
        if _proven_finite(weights, bounded=True):
            return weights
        squares = sum_of_squares(weights)  # hostile values' squares overflow (inf, no warning): refused below
        if not squares <= _MAX_UPDATE_SQ:
            self.check(weights, group)  # NaN or Inf: NonFiniteWeights, as from check()
            raise WeightsOutOfRange(f"{self.model_id}/{group}: weights' norm "
                                    f"{'overflows float32' if squares == np.inf else f'{squares ** 0.5:.3g}'} exceeds {MAX_UPDATE_NORM:g}")
        _remember_finite(weights, bounded=True)
        return weights

    def _check_shape(self, weights: npt.NDArray[Any], group: str) -> None:
        expected = self.size if group == FULL else self.group_size(group)
        if (weights.dtype is not _F32 and weights.dtype != np.float32) or weights.ndim != 1:
            raise ShapeMismatch(f"weights must be a 1-D float32 vector, got {weights.dtype}{weights.shape}")
        if weights.shape[0] != expected:
            raise ShapeMismatch(
                f"{self.model_id}/{group}: expected {expected} values, got {weights.shape[0]}"
            )

    def zeros(self) -> Vector:
        return np.zeros(self.size, dtype=np.float32)

    def view(self, vector: Vector, name: str) -> Vector:
        """A reshaped view (no copy) of one named parameter inside ``vector``."""
        for p in self.params:
            if p.name == name:
                return vector[p.offset : p.offset + p.size].reshape(p.shape)
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "params": [[p.name, list(p.shape), p.group] for p in self.params],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSpec:
        try:
            entries = [(str(n), tuple(int(s) for s in shape), str(g)) for n, shape, g in data["params"]]
            return cls.build(str(data["model_id"]), entries)
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"not a model spec: {exc}") from exc
