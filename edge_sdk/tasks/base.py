"""What a learning task provides to the SDK, the coordinator and the emulator.

A task owns its model architecture (and so its :class:`~edge_sdk.spec.ModelSpec`), how
to make the pretrained *deployed* model without any download, how to fine-tune locally on
a device's samples, and how to evaluate on its fixed held-out split. Everything crosses
this interface as flat float32 vectors, so cores and strategies never see torch.

Samples come in one of three declared kinds (``Task.sample_kind``; a built-in task that
does not say is looked up in :mod:`edge_sdk.tasks.registry`, anything else is ``"array"``),
and every method that takes samples takes them as ``(x, y)`` of that kind:

==========  =========================================  ==========================================
kind        ``x``                                      ``y``
==========  =========================================  ==========================================
array       ``(N, *input_shape)`` float32              ``(N,)`` int64 class labels
gesture     ``(N, T, D)`` float32 sequences            ``(N,)`` int64 class labels
frame       N RGB uint8 ``(H, W, 3)`` frames, any size N ``(k, 5)`` float32 boxes
                                                       ``class, x1, y1, x2, y2`` in frame pixels
==========  =========================================  ==========================================

A :class:`Split` holds samples of that kind: for frames ``x`` is ``(N, H, W, 3)`` uint8 and
``y`` an object array of the N box arrays, so both index like any other split's. A task
may also carry ``default_train``, its own :class:`TrainConfig` defaults
(:func:`edge_sdk.tasks.registry.default_train_config`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from edge_sdk.errors import InvalidSample
from edge_sdk.fastinit import fast_init
from edge_sdk.spec import FULL, ModelSpec, Vector

SampleKind = Literal["array", "frame", "gesture"]
"""What a task's samples are (the table in the module docstring); as ``edge_sdk.store``'s."""


@fast_init  # one per local update (every emulated training)
@dataclass(frozen=True, slots=True, kw_only=True)
class TrainConfig:
    """Local fine-tuning hyper-parameters (SPIN: E epochs over all local samples)."""

    epochs: int = 2
    batch_size: int = 16
    lr: float = 0.05
    seed: int = 0
    group: str = FULL
    """Train only this layer group (``"classifier"`` for LASP / SCC calibration)."""
    mu: float = 0.0
    """FedProx proximal weight: the local loss gains (μ/2)·‖w − w_received‖² (0: plain SGD)."""


HINT_BOUNDS: dict[str, tuple[float, float]] = {
    "epochs": (1, 100),
    "batch_size": (1, 65_536),
    "lr": (0.0, 10.0),
    "mu": (0.0, 10_000.0),
}
"""The training hints a device takes from its coordinator, and their bounds: a value outside is
clamped to the nearest bound (a coordinator's bug such as ``epochs = 1e9`` must not occupy a
device for ever). Hints not named here are not training parameters and are ignored."""


MAX_BOXES = 1_000
"""Boxes one detection label may have (the store refuses more, and so does training). A label
with 10^6 boxes was accepted and trained on: 35 s and 3.7 GB for two 64-pixel frames, and the
target assignment grows with boxes × anchors (100× the anchors at 640 pixels). Ultralytics
keeps at most 300 detections per image (``max_det``); dense scenes (crowds, shelves) label
hundreds of objects, so the bound leaves room above both."""


def check_frame(image: object, what: str = "frame") -> None:
    """InvalidSample unless ``image`` is a non-empty RGB uint8 ``(H, W, 3)`` array."""
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
            and image.shape[2] == 3 and image.shape[0] >= 1 and image.shape[1] >= 1):
        raise InvalidSample(f"{what} must be an (H, W, 3) uint8 RGB array with H, W >= 1")


def check_detect_input(image: object, conf: object) -> float | None:
    """What ``detect(image, conf=...)`` accepts: one frame (:func:`check_frame`) and a score
    threshold in ``[0, 1]`` (``None``: the detector's own); else InvalidSample."""
    check_frame(image, "image")
    if conf is None:
        return None
    if isinstance(conf, bool) or not isinstance(conf, int | float | np.integer | np.floating):
        raise InvalidSample(f"conf must be a number in [0, 1], got {type(conf).__name__} {conf!r}")
    if not 0.0 <= float(conf) <= 1.0:  # (NaN too: it would keep no box, silently)
        raise InvalidSample(f"conf must be a number in [0, 1], got {conf!r}")
    return float(conf)


def hints_out_of_bounds(hints: Mapping[str, float]) -> dict[str, float]:
    """The hints :func:`train_config` clamps (name → the value asked for)."""
    return {k: v for k, v in hints.items() if k in HINT_BOUNDS and not HINT_BOUNDS[k][0] <= v <= HINT_BOUNDS[k][1]}


def train_config(hints: Mapping[str, float], defaults: TrainConfig, *, seed: int, group: str) -> TrainConfig:
    """Hyper-parameters for one job: the coordinator's hints (within :data:`HINT_BOUNDS`), else
    ``defaults``. The one rule for devices and every fleet driver."""

    # Each value: min(max(float(hint or default), lo), hi), written out (no closure built and
    # called four times per job: every emulated training asks).
    get, bounds = hints.get, HINT_BOUNDS
    lo, hi = bounds["epochs"]
    epochs = int(min(max(float(get("epochs", defaults.epochs)), lo), hi))
    lo, hi = bounds["batch_size"]
    batch_size = int(min(max(float(get("batch_size", defaults.batch_size)), lo), hi))
    lo, hi = bounds["lr"]
    lr = min(max(float(get("lr", defaults.lr)), lo), hi)
    lo, hi = bounds["mu"]
    mu = min(max(float(get("mu", defaults.mu)), lo), hi)
    return TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, mu=mu, seed=seed, group=group)


@fast_init
@dataclass(frozen=True, slots=True, kw_only=True)
class TrainResult:
    weights: Vector
    n_samples: int
    loss: float
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class Split:
    x: npt.NDArray[Any]
    y: npt.NDArray[Any]
    """``(N,)`` int64 class labels, or for frames an ``(N,)`` object array of box arrays."""

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskData:
    """The task's shipped data: ``pretrain`` makes the deployed model, ``pool`` is what
    devices' users label over time, ``test`` is the fixed held-out split."""

    pretrain: Split
    pool: Split
    test: Split
    n_classes: int


@runtime_checkable
class Task(Protocol):
    name: str
    spec: ModelSpec

    def data(self) -> TaskData: ...

    def pretrained(self, *, seed: int = 0) -> Vector:
        """The deployed model: a short pretraining on ``data().pretrain`` (no downloads)."""
        ...

    def local_update(self, weights: Vector, x: Any, y: Any, config: TrainConfig) -> TrainResult:
        """Fine-tune a copy of ``weights`` on the samples ``(x, y)`` of the task's kind (module
        docstring); never modifies ``weights``."""
        ...

    def evaluate(self, weights: Vector, split: Split | None = None) -> dict[str, float]:
        """Metrics on ``split`` (default: the held-out test split); always has ``accuracy``."""
        ...
