"""Converting a very stale update by gradient inversion (paper 001), the torch half.

Theory of operation. A device sent ``w_stale = LocalUpdate(w_base; D)`` but the model has
moved on to ``w_target``. We cannot see D, so we recover a synthetic set D_rec (inputs plus
soft labels, |D_rec| ≈ ``samples_fraction`` × the claimed sample count, capped) by gradient
descent on D_rec so that

    L1( LocalUpdate′(w_base; D_rec) − w_base ,  w_stale − w_base )

is small, where LocalUpdate′ is E full-batch SGD(+momentum) steps differentiated through
(double backward). Then the estimated fresh model is ``LocalUpdate′(w_target; D_rec)``
(same steps, no graph). D_rec is kept per device (bounded LRU) and warm-starts that
device's next conversion, since a device's data changes slowly.

The coordinator's conversion worker calls :meth:`GradientInverter.convert` with the core's
:class:`~coordinator.core.ConvertUpdate`; the answer goes back as ``UpdateConverted``.
Budgets: ``iterations`` and ``time_budget_s`` (wall time, measured here; the worker and the
core own the protocol deadline). Deterministic given ``seed`` as long as the iteration
budget, not the time budget, ends the inversion.

One-step approximation, stated: the device trains E epochs of minibatch SGD; LocalUpdate′
is E full-batch steps at the device's lr (the paper's simplification), so D_rec has to
absorb the magnitude gap (a device with n/B minibatches per epoch moves ~n/B times further).
``epoch_steps`` instead scales each full-batch step's lr by ``ceil(n / batch_size)`` (from
the hints, capped at ``max_step_lr``); measured on digits (200 samples, B = 16) it lowers
the L1 disparity but points the converted update worse (cosine to the true fresh update
0.29–0.53 against 0.58–0.62 unscaled), so it is off by default.

Privacy: D_rec never leaves this object (no logging, no accessor except
:meth:`GradientInverter._state_for_tests`); it is kept in memory only, for at most ``max_devices``
devices and ``max_state_bytes`` (the least recently converted go first), and lost at a restart.
:meth:`forget` drops one device's; the coordinator has no "device left" event to call it from.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import zlib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from time import perf_counter
from typing import TYPE_CHECKING, Any, Protocol, cast

import numpy as np

from edge_sdk._extras import missing
from edge_sdk.errors import ConfigError, MalformedMessage
from edge_sdk.spec import ModelSpec, Vector

if TYPE_CHECKING:
    from coordinator.core import ConvertUpdate

__all__ = [
    "ConversionResult",
    "GradientInverter",
    "InversionConfig",
    "ModelFactoryLike",
    "make_inverter",
]


class ModelFactoryLike(Protocol):
    """What the inverter needs from a task: a fresh torch module whose tensors are the
    spec's, the input shape of one sample and the class count (a ``ClassifierTask``)."""

    @property
    def input_shape(self) -> tuple[int, ...]: ...

    @property
    def n_classes(self) -> int: ...

    def build_module(self) -> Any: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class InversionConfig:
    """Budgets and the device's training recipe (``hints`` in the request override
    ``epochs``, ``lr``, ``momentum`` and ``batch_size``)."""

    epochs: int = 5
    """E full-batch gradient steps in LocalUpdate′ (the device's local epochs)."""
    lr: float = 0.01
    """Device SGD learning rate (paper: 0.01, momentum 0.5)."""
    momentum: float = 0.5
    samples_fraction: float = 0.5
    """|D_rec| ≈ this × the claimed n_samples (paper: 1/2) ..."""
    max_samples: int = 256
    """... capped."""
    iterations: int = 200
    """Inversion iteration budget per conversion."""
    time_budget_s: float = 10.0
    """Wall-time budget per conversion (the final LocalUpdate included)."""
    inversion_lr: float = 0.1
    """Adam step size on D_rec's inputs and label logits."""
    warm_lr_factor: float = 0.3
    """A warm start begins with ``inversion_lr`` × this (a fresh Adam's first steps are full
    size and would throw the kept set away)."""
    patience: int = 10
    """Halve the step after this many iterations without a new best disparity."""
    seed: int = 0
    epoch_steps: bool = False
    """Scale each full-batch step's lr by the device's minibatches per epoch (see module doc)."""
    max_step_lr: float = 0.5
    """Cap on that scaled lr (full-batch steps beyond it diverge on the small models)."""
    max_devices: int = 1000
    """Devices whose D_rec is kept for warm starts (least recently converted dropped first)..."""
    max_state_bytes: int = 256 * 1024 * 1024
    """... and at most this many bytes of D_rec over all devices."""

    def __post_init__(self) -> None:
        positive_ints = {"epochs": self.epochs, "max_samples": self.max_samples, "max_devices": self.max_devices,
                         "max_state_bytes": self.max_state_bytes, "patience": self.patience}
        for name, count in positive_ints.items():
            if not (isinstance(count, int) and count >= 1):
                raise ConfigError(f"inversion: {name} must be an integer >= 1, got {count!r}")
        if not (isinstance(self.iterations, int) and self.iterations >= 0):
            raise ConfigError(f"inversion: iterations must be an integer >= 0, got {self.iterations!r}")
        for name, value in {"lr": self.lr, "inversion_lr": self.inversion_lr, "time_budget_s": self.time_budget_s,
                            "max_step_lr": self.max_step_lr, "warm_lr_factor": self.warm_lr_factor}.items():
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigError(f"inversion: {name} must be a finite number > 0, got {value!r}")
        if not (0.0 <= self.momentum < 1.0):
            raise ConfigError(f"inversion: momentum must lie in [0, 1), got {self.momentum!r}")
        if not (0.0 < self.samples_fraction <= 4.0):
            raise ConfigError(f"inversion: samples_fraction must lie in (0, 4], got {self.samples_fraction!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class ConversionResult:
    """One conversion. ``weights`` is None when the inversion recovered nothing usable (the
    caller falls back to the damped update)."""

    weights: Vector | None
    """The estimated fresh model LocalUpdate′(w_target; D_rec): float32, ``spec.size``."""
    iterations: int
    l1_before: float
    """L1 disparity (sum of absolute differences of the two updates) at the start."""
    l1_after: float
    """At the end: the best D_rec seen, which is the one kept and used."""
    elapsed_s: float
    warm: bool
    """Warm-started from this device's previous D_rec."""


@dataclass(slots=True)
class _Recipe:
    epochs: int
    lr: float
    momentum: float


@dataclass(slots=True)
class _Rec:
    """One device's D_rec: inputs and label logits (torch tensors, CPU)."""

    x: Any
    label_logits: Any

    @property
    def nbytes(self) -> int:
        return int(self.x.numel() * self.x.element_size() + self.label_logits.numel() * self.label_logits.element_size())


def _torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise missing("torch", "train", purpose="gradient-inversion conversion", cause=exc) from exc
    return torch


class GradientInverter:
    """Converts stale updates for one model (see the module docstring). Not thread-safe
    for concurrent :meth:`convert` calls (the worker runs one at a time); :meth:`forget`
    and :meth:`devices` may be called from another thread."""

    def __init__(self, task: str | ModelFactoryLike, spec: ModelSpec, config: InversionConfig = InversionConfig()) -> None:
        torch = _torch()
        if isinstance(task, str):
            from edge_sdk.tasks import get_task

            factory: ModelFactoryLike = get_task(task)  # type: ignore[assignment]
        else:
            factory = task
        if not hasattr(factory, "build_module"):
            raise ConfigError(f"task {getattr(factory, 'name', factory)!r} builds no torch module; "
                              "gradient inversion needs a classifier task")
        self._torch = torch
        self.spec = spec
        self.config = config
        self.input_shape = tuple(int(d) for d in factory.input_shape)
        self.n_classes = int(factory.n_classes)
        self._value_range = self._range_of(factory)
        self._module = factory.build_module()
        self._module.train()
        named = dict(self._module.named_parameters())
        buffers = {name: buf for name, buf in self._module.named_buffers() if buf.is_floating_point()}
        for p in spec.params:
            tensor = named.get(p.name, buffers.get(p.name))
            if tensor is None or tuple(tensor.shape) != p.shape:
                raise ConfigError(f"{spec.model_id}: the task's module does not match the spec at {p.name!r}")
        if set(named) - {p.name for p in spec.params}:
            raise ConfigError(f"{spec.model_id}: the task's module has parameters the spec lacks")
        # Only parameters get gradient steps; floating buffers (if any) stay as sent.
        mask = np.zeros(spec.size, dtype=np.float32)
        for p in spec.params:
            if p.name in named:
                mask[p.offset : p.offset + p.size] = 1.0
        self._mask = None if mask.all() else torch.from_numpy(mask)
        self._states: OrderedDict[str, _Rec] = OrderedDict()
        self._state_bytes = 0
        self._lock = threading.Lock()
        self._cancelled = threading.Event()

    @staticmethod
    def _range_of(factory: ModelFactoryLike) -> tuple[float, float] | None:
        from edge_sdk.tasks.registry import task_info

        info = task_info(factory)
        if info is None or info.contract is None or info.contract.shape != tuple(factory.input_shape):
            return None
        if info.contract.range_is_a_guard:  # (helper-95: starting gestures from ±64 made every conversion unusable)
            return None
        return info.contract.value_range

    # ------------------------------------------------------------------ public API

    def devices(self) -> list[str]:
        """Devices whose D_rec is kept, least recently converted first."""
        with self._lock:
            return list(self._states)

    def forget(self, device: str) -> None:
        """Drop ``device``'s D_rec (no-op when none is kept)."""
        with self._lock:
            rec = self._states.pop(device, None)
            if rec is not None:
                self._state_bytes -= rec.nbytes

    def cancel(self) -> None:
        """End a running :meth:`convert` at its next iteration (answered ``weights=None``), and
        every later one at once: for shutting down (a process that exits while a conversion
        runs in torch on a daemon thread aborts: "terminate called without an active exception")."""
        self._cancelled.set()

    def convert(self, request: ConvertUpdate) -> ConversionResult:
        """Invert ``request.stale_weights`` (trained from ``base_weights``) into D_rec and
        retrain ``target_weights`` on it. Bad vectors raise ``ShapeMismatch`` /
        ``NonFiniteWeights``, a bad sample count ``MalformedMessage``, bad hints
        ``ConfigError``; nothing is kept then."""
        from edge_sdk.trainer import torch_threads  # (torch: the constructor found it)

        started = perf_counter()
        stale = self.spec.check(np.asarray(request.stale_weights))
        base = self.spec.check(np.asarray(request.base_weights))
        target = self.spec.check(np.asarray(request.target_weights))
        n_samples = request.n_samples
        if isinstance(n_samples, bool) or not isinstance(n_samples, int | np.integer) or n_samples < 1:
            raise MalformedMessage(f"convert: n_samples must be a positive integer, got {n_samples!r}")
        recipe = self._recipe(request.hints, int(n_samples))
        size = max(1, min(self.config.max_samples, round(self.config.samples_fraction * int(n_samples))))

        with torch_threads(1):
            return self._convert(request.device, stale, base, target, size, recipe, started)

    # ------------------------------------------------------------------ internals

    def _recipe(self, hints: Mapping[str, float], n_samples: int) -> _Recipe:
        cfg = self.config

        def hint(name: str, default: float) -> float:
            raw = hints.get(name, default)
            try:
                value = float(raw)
            except (TypeError, ValueError):
                raise ConfigError(f"convert: hint {name}={raw!r} is not a number") from None
            if not math.isfinite(value):
                raise ConfigError(f"convert: hint {name}={raw!r} is not finite")
            return value

        epochs = hint("epochs", cfg.epochs)
        lr = hint("lr", cfg.lr)
        momentum = hint("momentum", cfg.momentum)
        if epochs < 1 or epochs != int(epochs) or epochs > 100:
            raise ConfigError(f"convert: epochs hint must be an integer in [1, 100], got {epochs}")
        if not lr > 0 or not 0.0 <= momentum < 1.0:
            raise ConfigError(f"convert: need lr > 0 and momentum in [0, 1), got {lr}, {momentum}")
        if cfg.epoch_steps and "batch_size" in hints:
            batch = hint("batch_size", 0)
            if batch >= 1:
                lr = min(cfg.max_step_lr, lr * math.ceil(n_samples / batch))
        return _Recipe(epochs=int(epochs), lr=lr, momentum=momentum)

    def _unroll(self, theta0: Any, x: Any, soft: Any, recipe: _Recipe, *, graph: bool) -> Any:
        """LocalUpdate′: ``recipe.epochs`` full-batch SGD(+momentum) steps from ``theta0``
        on (x, soft labels); differentiable w.r.t. (x, soft) when ``graph``."""
        torch = self._torch
        functional_call = torch.func.functional_call
        theta = theta0
        velocity = None
        for _ in range(recipe.epochs):
            if not graph:
                theta = theta.detach().requires_grad_(True)
            params = {p.name: theta[p.offset : p.offset + p.size].view(p.shape) for p in self.spec.params}
            out = functional_call(self._module, params, (x,))
            loss = -(soft * torch.log_softmax(out, dim=1)).sum(dim=1).mean()
            (grad,) = torch.autograd.grad(loss, theta, create_graph=graph)
            if self._mask is not None:
                grad = grad * self._mask
            velocity = grad if velocity is None else recipe.momentum * velocity + grad
            theta = theta - recipe.lr * velocity
            if not graph:
                velocity = velocity.detach()
        return theta if graph else theta.detach()

    def _initial(self, device: str, size: int) -> tuple[_Rec, bool]:
        torch = self._torch
        with self._lock:
            kept = self._states.get(device)
        gen = torch.Generator().manual_seed(
            (self.config.seed * 1_000_003 + zlib.crc32(device.encode("utf-8", "surrogatepass"))) % (2**63)
        )
        fresh_x = torch.rand((size, *self.input_shape), generator=gen)
        if self._value_range is not None:
            lo, hi = self._value_range
            fresh_x = lo + (hi - lo) * fresh_x
        else:
            fresh_x = 2.0 * fresh_x - 1.0
        fresh_labels = torch.randn((size, self.n_classes), generator=gen)
        if kept is None:
            return _Rec(x=fresh_x, label_logits=fresh_labels), False
        have = int(kept.x.shape[0])
        if have >= size:
            return _Rec(x=kept.x[:size].clone(), label_logits=kept.label_logits[:size].clone()), True
        return _Rec(
            x=torch.cat([kept.x, fresh_x[have:]]), label_logits=torch.cat([kept.label_logits, fresh_labels[have:]])
        ), True

    def _keep(self, device: str, rec: _Rec) -> None:
        with self._lock:
            old = self._states.pop(device, None)
            if old is not None:
                self._state_bytes -= old.nbytes
            if rec.nbytes > self.config.max_state_bytes:
                return
            self._states[device] = rec
            self._state_bytes += rec.nbytes
            while len(self._states) > self.config.max_devices or self._state_bytes > self.config.max_state_bytes:
                _, dropped = self._states.popitem(last=False)
                self._state_bytes -= dropped.nbytes

    def _convert(
        self, device: str, stale: Vector, base: Vector, target: Vector, size: int, recipe: _Recipe, started: float
    ) -> ConversionResult:
        torch = self._torch
        cfg = self.config
        rec, warm = self._initial(device, size)
        x = rec.x.clone().requires_grad_(True)
        labels = rec.label_logits.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([x, labels], lr=cfg.inversion_lr * (cfg.warm_lr_factor if warm else 1.0))
        since_best = 0
        base_t = torch.from_numpy(base.copy())
        stale_delta = torch.from_numpy(stale.astype(np.float32) - base)
        zero_l1 = float(stale_delta.abs().sum())

        best_l1 = math.inf
        best = _Rec(x=x.detach().clone(), label_logits=labels.detach().clone())
        l1_before = math.nan
        iterations = 0
        slowest = 0.0
        # Each pass evaluates the current D_rec (kept if best) and then steps it; the budget
        # check leaves room for one more pass plus the final no-graph LocalUpdate′ (cheaper).
        for step in range(cfg.iterations + 1):
            if self._cancelled.is_set():
                break
            tick = perf_counter()
            theta0 = base_t.clone().requires_grad_(True)
            theta = self._unroll(theta0, x, torch.softmax(labels, dim=1), recipe, graph=True)
            disparity = (theta - theta0 - stale_delta).abs().sum()
            l1 = float(disparity.detach())
            if not math.isfinite(l1):
                break
            if step == 0:
                l1_before = l1
            if l1 < best_l1:
                best_l1, since_best = l1, 0
                best = _Rec(x=x.detach().clone(), label_logits=labels.detach().clone())
            else:
                since_best += 1
                if since_best >= cfg.patience:
                    since_best = 0
                    for group in optimizer.param_groups:
                        group["lr"] *= 0.5
            if step == cfg.iterations:
                break
            optimizer.zero_grad(set_to_none=True)
            grad_x, grad_labels = torch.autograd.grad(disparity, [x, labels])
            x.grad, labels.grad = grad_x, grad_labels
            optimizer.step()
            if self._value_range is not None:
                with torch.no_grad():
                    x.clamp_(*self._value_range)
            iterations += 1
            slowest = max(slowest, perf_counter() - tick)
            if perf_counter() - started + 2.0 * slowest > cfg.time_budget_s:
                break

        if math.isfinite(best_l1):
            self._keep(device, best)  # even when unusable yet: the next warm start goes on from it
        if not math.isfinite(best_l1) or best_l1 >= zero_l1 or self._cancelled.is_set():
            # D_rec explains less of the update than an empty set would: nothing to convert with.
            return ConversionResult(weights=None, iterations=iterations, l1_before=l1_before, l1_after=best_l1,
                                    elapsed_s=perf_counter() - started, warm=warm)
        theta = self._unroll(torch.from_numpy(target.copy()), best.x, torch.softmax(best.label_logits, dim=1),
                             recipe, graph=False)
        weights = np.ascontiguousarray(theta.numpy(), dtype=np.float32)
        if not np.isfinite(weights).all():
            return ConversionResult(weights=None, iterations=iterations, l1_before=l1_before, l1_after=best_l1,
                                    elapsed_s=perf_counter() - started, warm=warm)
        return ConversionResult(weights=weights, iterations=iterations, l1_before=l1_before, l1_after=best_l1,
                                elapsed_s=perf_counter() - started, warm=warm)

    def _state_for_tests(self, device: str) -> tuple[Any, Any] | None:
        """Copies of ``device``'s D_rec (inputs, label logits), for tests only."""
        with self._lock:
            rec = self._states.get(device)
            return None if rec is None else (rec.x.clone(), rec.label_logits.clone())


def make_inverter(task: str | object, spec: ModelSpec, **config: Any) -> GradientInverter:
    """A :class:`GradientInverter` for ``task``: a task reference (:func:`edge_sdk.tasks.resolve_task`:
    an app's own task by import path too) or the task itself (the daemon's; one that builds no torch
    module is a ConfigError); ``config`` are :class:`InversionConfig` fields (unknown ones raise ConfigError)."""
    return GradientInverter(task if isinstance(task, str) else cast(ModelFactoryLike, task), spec, inversion_config(**config))


def inversion_config(**config: Any) -> InversionConfig:
    """``InversionConfig(**config)``; an unknown field is a ConfigError naming the known ones, a
    value of the wrong type one naming the field and the type it expects."""
    from coordinator.strategies.params import check_params

    known = {f.name for f in dataclasses.fields(InversionConfig)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ConfigError(f"inversion: unknown parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return InversionConfig(**check_params("inversion", InversionConfig, config))
