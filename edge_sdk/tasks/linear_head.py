"""Classifier-only training in numpy: what a ``[device]`` install (no torch) contributes to
classifier-only (LASP / calibration) rounds.

The extractor is frozen in those rounds, so the features z = h(x, φ) are computed once
(onnxruntime, the shipped ``<model_id>.features.onnx``) and the linear head
g(z) = W z + b is fitted by softmax regression with minibatch SGD — the same steps, order
and loss as :func:`edge_sdk.trainer.fit` with ``group="classifier"`` and no momentum
(shuffle by ``np.random.default_rng(seed).permutation``, balanced batches, mean
cross-entropy), so a lean device's update matches a torch device's to float precision
(``tests/test_tasks.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from edge_sdk.cancellation import checkpoint
from edge_sdk.errors import ConfigError, InvalidSample
from edge_sdk.spec import ModelSpec

__all__ = ["HeadLayout", "fit_head"]

Array = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True, kw_only=True)
class HeadLayout:
    """Where the head's weight ``(C, F)`` and bias ``(C,)`` sit in the model vector."""

    weight: slice
    bias: slice
    n_classes: int
    feature_dim: int

    @classmethod
    def of(cls, spec: ModelSpec, group: str = "classifier") -> HeadLayout:
        """The layout of ``group`` if it is exactly one linear layer (weight then bias)."""
        params = [p for p in spec.params if p.group == group]
        if len(params) != 2 or len(params[0].shape) != 2 or params[1].shape != params[0].shape[:1]:
            raise ConfigError(f"{spec.model_id}: group {group!r} is not one linear layer (weight, bias)")
        w, b = params
        return cls(
            weight=slice(w.offset, w.offset + w.size),
            bias=slice(b.offset, b.offset + b.size),
            n_classes=w.shape[0],
            feature_dim=w.shape[1],
        )


def fit_head(
    features: Array,
    y: npt.NDArray[np.int64],
    weight: Array,
    bias: Array,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> tuple[Array, Array, float]:
    """SGD on mean softmax cross-entropy over (features, y); returns new ``weight``,
    ``bias`` (copies; the inputs are not modified) and the mean loss of the last epoch."""
    n = int(y.shape[0])
    if n == 0 or features.shape[0] != n:
        raise InvalidSample(f"need matching non-empty features and labels, got {features.shape[0]} and {n}")
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise ConfigError("epochs, batch_size and lr must be positive")
    c = weight.shape[0]
    if y.min() < 0 or y.max() >= c:
        raise InvalidSample(f"labels must lie in [0, {c})")
    w = np.array(weight, dtype=np.float32)
    b = np.array(bias, dtype=np.float32)
    z = np.ascontiguousarray(features, dtype=np.float32)
    rng = np.random.default_rng(seed)
    n_batches = -(-n // batch_size)
    epoch_loss = 0.0
    # A diverging lr gives inf or NaN, which the caller's checks refuse (the wire encodes finite
    # weights only); warnings would add nothing. OpenBLAS builds have also been reported to set a
    # spurious "invalid" flag on float32 products of finite values (numpy #24067); this project's
    # CI saw one in a test's reference product, which warnings-as-errors would turn into a failure here.
    with np.errstate(over="ignore", invalid="ignore"):
        for _ in range(epochs):
            order = rng.permutation(n)
            epoch_loss = 0.0
            for idx in np.array_split(order, n_batches):
                checkpoint()  # a stopping client does not wait for the rest of the epochs
                logits = z[idx] @ w.T + b
                shifted = logits - logits.max(axis=1, keepdims=True)
                exp = np.exp(shifted)
                total = exp.sum(axis=1, keepdims=True)
                rows = np.arange(idx.shape[0])
                epoch_loss += float((np.log(total[:, 0]) - shifted[rows, y[idx]]).sum())
                grad = exp / total
                grad[rows, y[idx]] -= 1.0
                grad /= idx.shape[0]
                w -= np.float32(lr) * (grad.T @ z[idx]).astype(np.float32)
                b -= np.float32(lr) * grad.sum(axis=0).astype(np.float32)
    return w, b, epoch_loss / n
