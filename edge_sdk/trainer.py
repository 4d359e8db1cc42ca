"""The local trainer: device choice, seeding, and a fast minibatch-SGD ``fit`` over vectors.

The fleet emulator runs thousands of local updates of tiny models, so ``fit`` avoids what
dominates at that size: no module construction per call (:class:`ThreadLocalModules`
keeps one per task and thread and :func:`~edge_sdk.torchbridge.bind` re-points it at the
new vector), no DataLoader (batches are index slices of one tensor), no ``.item()`` per
step. On the CPU the optimizer writes straight into the returned vector.

:class:`ClassifierTask` is the shared half of the classification tasks (digits, gestures):
data caching, deterministic pretraining, local updates, evaluation and features.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from functools import cache
from time import perf_counter
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from edge_sdk._extras import missing

try:
    import torch
    import torch.nn.functional as F
    from torch import nn
except ImportError as exc:  # a [device] install serves with onnxruntime and trains with [train]
    raise missing("torch", "train", purpose="local training", cause=exc) from exc

from edge_sdk.cancellation import checkpoint
from edge_sdk.errors import ConfigError, InvalidSample
from edge_sdk.spec import FULL, ModelSpec, Vector
from edge_sdk.tasks.base import Split, TaskData, TrainConfig, TrainResult
from edge_sdk.torchbridge import bind, module_to_vector, spec_from_module, top_level_group

__all__ = [
    "DEVICE_ENV",
    "Affine",
    "ClassifierTask",
    "LossFn",
    "SplitModel",
    "ThreadLocalModules",
    "configure_threads",
    "fit",
    "predict_logits",
    "seeded",
    "select_device",
    "stratified_split",
    "take",
]

DEVICE_ENV = "EDGECI_DEVICE"

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------- devices


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


@cache
def _resolve(preferred: str) -> torch.device:
    if preferred == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(preferred)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {preferred!r}: use cpu, cuda[:n], mps or auto") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {preferred!r} requested but CUDA is not available")
    if device.type == "mps" and not _mps_available():
        raise ConfigError(f"device {preferred!r} requested but MPS is not available")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"unsupported device {preferred!r}: use cpu, cuda[:n], mps or auto")
    return device


def select_device(preferred: str | torch.device | None = None) -> torch.device:
    """The training device: ``preferred`` if given, else ``$EDGECI_DEVICE``, else the first
    available of cuda → mps → cpu. An unavailable explicit choice is a :class:`ConfigError`."""
    if isinstance(preferred, torch.device):
        preferred = str(preferred)
    choice = preferred or os.environ.get(DEVICE_ENV, "").strip() or "auto"
    return _resolve(choice.lower())


def configure_threads(n: int | None = None) -> int:
    """Set torch's intra-op thread count to ``n`` (unchanged when None); returns the count in
    effect. Devices share cores, so callers pin it (``edgeci emulate --threads``, which
    ``$EDGECI_THREADS`` sets like its other options)."""
    if n is not None:
        if n < 1:
            raise ConfigError(f"thread count must be >= 1, got {n}")
        torch.set_num_threads(n)
    return torch.get_num_threads()


PRETRAIN_THREADS = 1
"""torch threads for a classifier's pretraining, whatever the process's count: another count
sums in another order, and the short pretraining turns that into another deployed model
(procdigits seed 0, 2,000 images: 67 % with one thread, 48 % with two). One count makes a
seed's deployed model the same under ``--threads``, ``$EDGECI_THREADS`` and any core count
(seconds for these tasks)."""


_THREADS_LOCK = threading.RLock()  # (re-entrant: a pinned block may pretrain)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count ``n`` inside the block, the count before it afterwards
    (also on an exception). One block at a time (a lock): a second one waits instead of
    reading the first one's count as the one to restore. With OpenMP the count is per OS
    thread and taken at a thread's first torch operation: a thread whose first one falls
    inside the block keeps ``n`` (the callers pin before their threads start torch work)."""
    with _THREADS_LOCK:
        before = torch.get_num_threads()
        if before == n:
            yield
            return
        torch.set_num_threads(n)
        try:
            yield
        finally:
            torch.set_num_threads(before)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator inside the block and restore it afterwards, so module
    initialisation is reproducible without disturbing anybody else's random stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# --------------------------------------------------------------------------- fit


def _as_tensor(array: npt.NDArray[Any]) -> torch.Tensor:
    # from_numpy warns on read-only arrays (e.g. decoded payloads); copy those.
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def fit(
    module: nn.Module,
    spec: ModelSpec,
    weights: Vector,
    x: npt.NDArray[Any],
    y: npt.NDArray[np.int64],
    config: TrainConfig,
    *,
    loss_fn: LossFn = F.cross_entropy,
    device: str | torch.device | None = None,
    momentum: float = 0.0,
) -> TrainResult:
    """Train a copy of ``weights`` for ``config.epochs`` epochs over all of (x, y) with
    minibatch SGD, shuffled by ``config.seed``; ``weights`` itself is never modified.

    With ``config.group`` set, only that group's parameters get gradients; every value
    outside the group comes back bit-identical to ``weights``. ``loss`` is the mean
    training loss over the last epoch. ``module`` is re-bound, so a cached one is fine.
    """
    started = perf_counter()
    spec.check(weights)
    n = int(y.shape[0])
    if n == 0 or x.shape[0] != n:
        raise InvalidSample(f"need matching non-empty x and y, got {x.shape[0]} and {n} samples")
    if config.epochs < 1 or config.batch_size < 1 or not config.lr > 0 or not 0 <= config.mu < math.inf:
        raise ConfigError(f"epochs, batch_size and lr must be positive and mu finite and >= 0: {config}")
    if config.group != FULL and config.group not in spec.group_slices:
        raise ConfigError(f"{spec.model_id} has no group {config.group!r}; groups: {spec.groups}")
    dev = select_device(device)

    updated = weights.copy()
    bind(module, spec, updated)
    in_group = {p.name for p in spec.params if config.group in (FULL, p.group)}
    trainable = []
    for name, param in module.named_parameters():
        param.requires_grad_(name in in_group)
        if name in in_group:
            trainable.append(param)
    if dev.type != "cpu":
        module.to(dev)
    xs = _as_tensor(x).to(dev)
    ys = _as_tensor(y).to(dev)
    optimizer = torch.optim.SGD(trainable, lr=config.lr, momentum=momentum)
    anchor = [p.detach().clone() for p in trainable] if config.mu > 0 else []  # FedProx
    rng = np.random.default_rng(config.seed)
    # Balanced batches (50 samples, B=16 → 13+13+12+12, not 16+16+16+2): a 2-sample tail
    # batch would take a full-size step on a very noisy gradient.
    n_batches = -(-n // config.batch_size)

    module.train()
    epoch_loss = torch.zeros((), device=dev)
    for _ in range(config.epochs):
        order = torch.from_numpy(rng.permutation(n)).to(dev)
        epoch_loss = torch.zeros((), device=dev)
        for idx in torch.tensor_split(order, n_batches):
            checkpoint()  # a stopping client does not wait for the rest of the epochs
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(module(xs[idx]), ys[idx])
            objective = loss + 0.5 * config.mu * sum(((p - a) ** 2).sum() for p, a in zip(trainable, anchor, strict=True)) if anchor else loss
            objective.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            epoch_loss += loss.detach() * idx.shape[0]
    module.eval()
    for param in module.parameters():
        param.requires_grad_(True)

    if dev.type != "cpu":
        module_to_vector(module, spec, out=updated)
    if config.group != FULL:
        # Frozen parameters never reach the optimizer, but buffers (running statistics)
        # could move in train mode: restore everything outside the group exactly.
        kept = spec.group_slice(config.group)
        updated[: kept.start] = weights[: kept.start]
        updated[kept.stop :] = weights[kept.stop :]
    return TrainResult(
        weights=updated,
        n_samples=n,
        loss=float(epoch_loss.item()) / n,
        seconds=perf_counter() - started,
        extra={"device": dev.type, "group": config.group},
    )


def predict_logits(
    module: nn.Module,
    spec: ModelSpec,
    weights: Vector,
    x: npt.NDArray[Any],
    *,
    device: str | torch.device | None = None,
    batch_size: int = 1024,
) -> npt.NDArray[np.float32]:
    """``module``'s outputs for ``x`` under ``weights`` (eval mode, batched)."""
    return _run(module, spec, weights, x, module, device=device, batch_size=batch_size)


def _run(
    module: nn.Module,
    spec: ModelSpec,
    weights: Vector,
    x: npt.NDArray[Any],
    head: Callable[[torch.Tensor], torch.Tensor],
    *,
    device: str | torch.device | None,
    batch_size: int,
) -> npt.NDArray[np.float32]:
    dev = select_device(device)
    # Inference only reads the weights, so a read-only (decoded) vector is copied, not refused.
    bind(module, spec, weights if weights.flags.writeable else weights.copy())
    if dev.type != "cpu":
        module.to(dev)
    module.eval()
    xs = _as_tensor(x)
    with torch.inference_mode():  # after bind: views made in here would be inference tensors
        chunks = [
            head(xs[start : start + batch_size].to(dev)).float().cpu().numpy()
            for start in range(0, xs.shape[0], batch_size)
        ]
    if not chunks:
        raise InvalidSample("no samples to run")
    return np.concatenate(chunks).astype(np.float32, copy=False)


# --------------------------------------------------------------------------- module cache


class ThreadLocalModules:
    """One module per thread, built on first use by ``factory``: building one (random
    init included) costs ~0.9 ms, about a tenth of a whole 50-sample local update of the
    tiny models, and a module cannot be shared by threads that train concurrently."""

    def __init__(self, factory: Callable[[], nn.Module]) -> None:
        self._factory = factory
        self._local = threading.local()

    def get(self) -> nn.Module:
        module: nn.Module | None = getattr(self._local, "module", None)
        if module is None:
            module = self._factory()
            self._local.module = module
        return module


# --------------------------------------------------------------------------- classification tasks


def stratified_split(
    y: npt.NDArray[np.int64], *, n_test: int, pretrain_per_class: int, seed: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Disjoint (pretrain, pool, test) index arrays: a stratified test split of about
    ``n_test`` samples, ``pretrain_per_class`` samples of each class, and the rest as pool.
    Deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    classes, sizes = np.unique(y, return_counts=True)
    # Largest-remainder allocation: per-class test counts proportional and summing to n_test.
    quota = sizes * (n_test / y.shape[0])
    k_tests = np.floor(quota).astype(np.int64)
    k_tests[np.argsort(-(quota - k_tests), kind="stable")[: n_test - int(k_tests.sum())]] += 1
    pretrain: list[npt.NDArray[np.int64]] = []
    pool: list[npt.NDArray[np.int64]] = []
    test: list[npt.NDArray[np.int64]] = []
    for c, k_test in zip(classes, k_tests):
        members = rng.permutation(np.flatnonzero(y == c))
        if members.shape[0] < k_test + pretrain_per_class:
            raise ConfigError(f"class {c} has {members.shape[0]} samples, too few for the split")
        test.append(members[:k_test])
        pretrain.append(members[k_test : k_test + pretrain_per_class])
        pool.append(members[k_test + pretrain_per_class :])
    # Shuffle the pool so any contiguous slice a partitioner takes mixes classes.
    return (
        np.sort(np.concatenate(pretrain)),
        rng.permutation(np.concatenate(pool)),
        np.sort(np.concatenate(test)),
    )


def take(x: npt.NDArray[np.float32], y: npt.NDArray[np.int64], idx: npt.NDArray[np.int64]) -> Split:
    """The samples at ``idx`` as a contiguous :class:`Split`."""
    return Split(x=np.ascontiguousarray(x[idx]), y=np.ascontiguousarray(y[idx]))


class Affine(nn.Module):
    """``(x - shift) * scale`` with fixed Python floats: input standardisation that is part
    of the exported graph but not of the weights vector (so never aggregated)."""

    def __init__(self, shift: float, scale: float) -> None:
        super().__init__()
        self.shift = shift
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) * self.scale

    def extra_repr(self) -> str:
        return f"shift={self.shift}, scale={self.scale}"


class SplitModel(nn.Module):
    """``classifier(extractor(x))``: the two layer groups of HFedMS/LASP, in vector order."""

    def __init__(self, extractor: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.extractor = extractor
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.extractor(x))  # type: ignore[no-any-return]


class ClassifierTask(ABC):
    """Shared implementation of the :class:`~edge_sdk.tasks.base.Task` protocol for small
    classifiers whose module is a :class:`SplitModel` (groups ``extractor``, ``classifier``).

    Subclasses set ``name``, ``model_id``, ``input_shape``, ``n_classes`` and
    ``pretrain_config`` and implement :meth:`build_module` and :meth:`_make_data`.
    """

    name: str
    model_id: ClassVar[str]
    input_shape: ClassVar[tuple[int, ...]]
    n_classes: ClassVar[int]
    pretrain_config: ClassVar[TrainConfig]
    pretrain_momentum: ClassVar[float] = 0.9
    init_seed_offset: ClassVar[int] = 10_007
    """Module init uses ``seed + offset`` so it does not replay the data shuffling stream."""

    spec: ModelSpec

    def __init__(self, *, device: str | torch.device | None = None) -> None:
        self.device = select_device(device)
        self._modules = ThreadLocalModules(self.build_module)
        self.spec = spec_from_module(self.build_module(), self.model_id, top_level_group)
        self._lock = threading.Lock()
        self._data: TaskData | None = None
        self._pretrained: dict[int, Vector] = {}

    @abstractmethod
    def build_module(self) -> SplitModel:
        """A freshly initialised module (random init from torch's global generator)."""

    @abstractmethod
    def _make_data(self) -> TaskData:
        """Build the deterministic pretrain/pool/test split (called once, then cached)."""

    # ----------------------------------------------------------------- Task protocol

    def data(self) -> TaskData:
        with self._lock:
            if self._data is None:
                self._data = self._make_data()
            return self._data

    def initial_weights(self, *, seed: int = 0) -> Vector:
        """A randomly initialised model, reproducible from ``seed``."""
        with seeded(seed + self.init_seed_offset):
            return module_to_vector(self.build_module(), self.spec)

    def pretrained(self, *, seed: int = 0) -> Vector:
        """The deployed model: ``pretrain_config`` on ``data().pretrain`` (cached per seed), on
        :data:`PRETRAIN_THREADS` CPU threads whatever the process's count."""
        with self._lock:
            cached = self._pretrained.get(seed)
        if cached is None:
            split = self.data().pretrain
            config = TrainConfig(
                epochs=self.pretrain_config.epochs,
                batch_size=self.pretrain_config.batch_size,
                lr=self.pretrain_config.lr,
                seed=seed,
            )
            with torch_threads(PRETRAIN_THREADS):
                cached = fit(
                    self._modules.get(),
                    self.spec,
                    self.initial_weights(seed=seed),
                    split.x,
                    split.y,
                    config,
                    device=self.device,
                    momentum=self.pretrain_momentum,
                ).weights
            with self._lock:
                cached = self._pretrained.setdefault(seed, cached)
        return cached.copy()

    def local_update(
        self, weights: Vector, x: npt.NDArray[Any], y: npt.NDArray[np.int64], config: TrainConfig
    ) -> TrainResult:
        """Fine-tune a copy of ``weights`` on (x, y); never modifies ``weights``."""
        xs, ys = self.check_samples(x, y)
        return fit(self._modules.get(), self.spec, weights, xs, ys, config, device=self.device)

    def evaluate(self, weights: Vector, split: Split | None = None) -> dict[str, float]:
        """``accuracy``, mean cross-entropy ``loss`` and ``n`` on ``split`` (default: test)."""
        split = split if split is not None else self.data().test
        logits = self.logits(weights, split.x)
        y = split.y
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        return {
            "accuracy": float((logits.argmax(axis=1) == y).mean()),
            "loss": float(-log_probs[np.arange(y.shape[0]), y].mean()),
            "n": float(y.shape[0]),
        }

    # ----------------------------------------------------------------- extras

    def logits(self, weights: Vector, x: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        """Class scores for ``x``, shape (N, n_classes)."""
        self.spec.check(weights)
        xs = self._check_x(x)
        return predict_logits(self._modules.get(), self.spec, weights, xs, device=self.device)

    def features(self, weights: Vector, x: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        """The extractor's output z = h(x, φ), shape (N, feature_dim): what the semantic
        cache stores and compensates."""
        self.spec.check(weights)
        xs = self._check_x(x)
        module = self._modules.get()
        assert isinstance(module, SplitModel)
        return _run(
            module, self.spec, weights, xs, module.extractor, device=self.device, batch_size=1024
        )

    def module_for(self, weights: Vector) -> SplitModel:
        """A fresh CPU module in eval mode holding a private copy of ``weights`` (for export)."""
        self.spec.check(weights)
        module = self.build_module()
        bind(module, self.spec, weights.copy())
        return module.eval()

    def check_samples(
        self, x: npt.NDArray[Any], y: npt.NDArray[Any]
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """Validate and normalise a batch of labelled samples (float32 x, int64 y)."""
        xs = self._check_x(x)
        ys = np.asarray(y)
        if ys.ndim != 1 or ys.shape[0] != xs.shape[0] or not np.issubdtype(ys.dtype, np.integer):
            raise InvalidSample(
                f"{self.name}: y must be {xs.shape[0]} integer labels, got {ys.dtype}{ys.shape}"
            )
        if ys.size and (ys.min() < 0 or ys.max() >= self.n_classes):
            raise InvalidSample(f"{self.name}: labels must lie in [0, {self.n_classes})")
        return xs, ys.astype(np.int64, copy=False)

    def _check_x(self, x: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        xs = np.asarray(x)
        if xs.ndim != len(self.input_shape) + 1 or xs.shape[1:] != self.input_shape:
            raise InvalidSample(
                f"{self.name}: x must have shape (N, {self.input_shape}), got {xs.shape}"
            )
        if not np.issubdtype(xs.dtype, np.floating):
            raise InvalidSample(f"{self.name}: x must be floating point, got {xs.dtype}")
        xs = np.ascontiguousarray(xs, dtype=np.float32)
        if not np.isfinite(xs).all():
            raise InvalidSample(f"{self.name}: x contains NaN or Inf")
        return xs
