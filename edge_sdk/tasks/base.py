"""What a learning task provides to the SDK, the coordinator and the emulator.

A task owns its model architecture (and so its :class:`~edge_sdk.spec.ModelSpec`), how
to make the pretrained *deployed* model without any download, how to fine-tune locally on
a device's samples, and how to evaluate on its fixed held-out split. Everything crosses
this interface as flat float32 vectors, so cores and strategies never see torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from edge_sdk.spec import FULL, ModelSpec, Vector


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainConfig:
    """Local fine-tuning hyper-parameters (SPIN: E epochs over all local samples)."""

    epochs: int = 2
    batch_size: int = 16
    lr: float = 0.05
    seed: int = 0
    group: str = FULL
    """Train only this layer group (``"classifier"`` for LASP / SCC calibration)."""


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
    y: npt.NDArray[np.int64]

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

    def local_update(self, weights: Vector, x: npt.NDArray[Any], y: npt.NDArray[np.int64], config: TrainConfig) -> TrainResult:
        """Fine-tune a copy of ``weights`` on (x, y); never modifies ``weights``."""
        ...

    def evaluate(self, weights: Vector, split: Split | None = None) -> dict[str, float]:
        """Metrics on ``split`` (default: the held-out test split); always has ``accuracy``."""
        ...
