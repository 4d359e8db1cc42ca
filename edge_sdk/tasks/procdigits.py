"""Procedural digits of MNIST's size (:mod:`edge_sdk.tasks.procdigits_data`) with LeNet-5.

60,000 training and 10,000 test 28×28 images rendered offline from bundled fonts (or real
MNIST/EMNIST IDX files from ``mnist_dir`` / ``$EDGECI_MNIST_DIR``). As with ``digits``, the
deployed model is deliberately weak: pretraining sees 10 samples per class, so fine-tuning
on users' labels (the ``pool``, the rest of the training set) has clear headroom.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

import numpy as np

from edge_sdk._extras import missing

try:
    from torch import nn
except ImportError as exc:  # declared without torch in edge_sdk.tasks.registry
    raise missing("torch", "train", purpose="the procdigits model", cause=exc) from exc

from edge_sdk.tasks.base import Split, TaskData, TrainConfig
from edge_sdk.tasks.procdigits_data import FULL_SIZE, DigitSet, build
from edge_sdk.trainer import Affine, ClassifierTask, SplitModel

__all__ = ["MNIST_DIR_ENV", "ProcDigitsTask"]

MNIST_DIR_ENV = "EDGECI_MNIST_DIR"
DATA_SEED = 20_251_202


class ProcDigitsTask(ClassifierTask):
    """10-class 28×28 digits with LeNet-5 (conv-pool-conv-pool-fc120-fc84 | fc10)."""

    name: str = "procdigits"
    model_id: ClassVar[str] = "procdigits-lenet5"
    input_shape: ClassVar[tuple[int, ...]] = (1, 28, 28)
    n_classes: ClassVar[int] = 10
    feature_dim: ClassVar[int] = 84
    pretrain_per_class: ClassVar[int] = 10
    pretrain_config: ClassVar[TrainConfig] = TrainConfig(epochs=15, batch_size=10, lr=0.02)

    def __init__(
        self,
        *,
        device: str | None = None,
        size: tuple[int, int] = FULL_SIZE,
        seed: int = 0,
        mnist_dir: str | Path | None = None,
        workers: int = 2,
    ) -> None:
        """``size`` = (train, test) images of the procedural set (e.g. ``QUICK_SIZE`` in
        tests); ``mnist_dir`` (default ``$EDGECI_MNIST_DIR``) switches to real IDX files."""
        super().__init__(device=device)
        self.size = size
        self.seed = seed
        env_dir = os.environ.get(MNIST_DIR_ENV, "").strip()
        self.mnist_dir = mnist_dir if mnist_dir is not None else (env_dir or None)
        self.workers = workers

    def build_module(self) -> SplitModel:
        extractor = nn.Sequential(
            # MNIST-like pixel statistics (mean ≈ 0.13–0.2, std ≈ 0.3): centre and scale.
            Affine(0.15, 3.0),
            nn.Conv2d(1, 6, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120),
            nn.ReLU(),
            nn.Linear(120, self.feature_dim),
            nn.ReLU(),
        )
        return SplitModel(extractor, nn.Linear(self.feature_dim, self.n_classes))

    def digit_set(self) -> DigitSet:
        """The raw uint8 set (cached on disk after the first build)."""
        return build(*self.size, seed=self.seed, workers=self.workers, mnist_dir=self.mnist_dir)

    def _make_data(self) -> TaskData:
        digits = self.digit_set()
        x, y = DigitSet.as_float(digits.train_x), digits.train_y
        rng = np.random.default_rng(DATA_SEED)
        pretrain = np.sort(
            np.concatenate(
                [
                    rng.choice(np.flatnonzero(y == c), size=self.pretrain_per_class, replace=False)
                    for c in range(self.n_classes)
                ]
            )
        )
        rest = np.setdiff1d(np.arange(y.shape[0]), pretrain)
        pool = rng.permutation(rest)
        return TaskData(
            pretrain=Split(
                x=np.ascontiguousarray(x[pretrain]), y=np.ascontiguousarray(y[pretrain])
            ),
            pool=Split(x=np.ascontiguousarray(x[pool]), y=np.ascontiguousarray(y[pool])),
            test=Split(x=DigitSet.as_float(digits.test_x), y=digits.test_y.copy()),
            n_classes=self.n_classes,
        )
