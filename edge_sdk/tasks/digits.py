"""Handwritten digits (sklearn's 8×8 ``load_digits``, shipped inside scikit-learn).

A deliberately weak deployed model: pretraining sees only 4 samples per class, so the
fine-tuning from users' labels (the ``pool``) has clear headroom (~75 % → ~95 %).
"""

from __future__ import annotations

from functools import cache
from typing import ClassVar

import numpy as np
import numpy.typing as npt

from edge_sdk._extras import missing, require

try:
    from torch import nn
except ImportError as exc:  # declared without torch in edge_sdk.tasks.registry
    raise missing("torch", "train", purpose="the digits model", cause=exc) from exc

from edge_sdk.tasks.base import TaskData, TrainConfig
from edge_sdk.trainer import Affine, ClassifierTask, SplitModel, stratified_split, take

__all__ = ["DigitsTask"]

DATA_SEED = 20_240_531


@cache
def _load_digits() -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """All 1797 digits as float32 (N, 1, 8, 8) in [0, 1] and int64 labels (read once per
    process; callers take copies)."""
    # local: importing sklearn costs ~1 s, and a device never needs the dataset
    datasets = require("sklearn.datasets", "coordinator", purpose="the digits dataset")
    bunch = datasets.load_digits()
    x = (np.asarray(bunch.images, dtype=np.float32) / 16.0).reshape(-1, 1, 8, 8)
    return x, np.asarray(bunch.target, dtype=np.int64)


class DigitsTask(ClassifierTask):
    """10-class 8×8 digits with a small CNN (conv-conv-pool-fc | fc)."""

    name: str = "digits"
    model_id: ClassVar[str] = "digits-cnn"
    input_shape: ClassVar[tuple[int, ...]] = (1, 8, 8)
    n_classes: ClassVar[int] = 10
    feature_dim: ClassVar[int] = 32
    pretrain_per_class: ClassVar[int] = 4
    n_test: ClassVar[int] = 360
    pretrain_config: ClassVar[TrainConfig] = TrainConfig(epochs=20, batch_size=8, lr=0.02)

    def build_module(self) -> SplitModel:
        extractor = nn.Sequential(
            # Centred inputs (pixel mean ≈ 0.3) make SGD at lr 0.05 stable on this tiny net.
            Affine(0.3, 2.5),
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * 4 * 4, self.feature_dim),
            nn.ReLU(),
        )
        return SplitModel(extractor, nn.Linear(self.feature_dim, self.n_classes))

    def _make_data(self) -> TaskData:
        x, y = _load_digits()
        pretrain, pool, test = stratified_split(
            y, n_test=self.n_test, pretrain_per_class=self.pretrain_per_class, seed=DATA_SEED
        )
        return TaskData(
            pretrain=take(x, y, pretrain),
            pool=take(x, y, pool),
            test=take(x, y, test),
            n_classes=self.n_classes,
        )
