"""ACME's model as an edgeci task: a small CNN (edge_sdk.trainer.ClassifierTask does the
Task protocol: pretraining, local fine-tuning, evaluation, ONNX export) on images it makes."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from torch import nn

from acme_vision.info import CLASSES, SIDE, TASK
from edge_sdk.tasks.base import TaskData, TrainConfig
from edge_sdk.trainer import Affine, ClassifierTask, SplitModel, stratified_split, take


def make_images(n: int, seed: int) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """``n`` noisy 12x12 images in [0, 1], each one of the three shapes somewhere, and their labels."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.0, 0.25, size=(n, 1, SIDE, SIDE)).astype(np.float32)
    y = rng.integers(0, len(CLASSES), size=n)
    for i, label in enumerate(y):
        r, c = rng.integers(2, SIDE - 3, size=2)
        if label == 0:  # bar
            x[i, 0, r, c - 2 : c + 3] = 1.0
        elif label == 1:  # ring
            x[i, 0, r - 1 : r + 2, c - 1 : c + 2] = 1.0
            x[i, 0, r, c] = 0.0
        else:  # cross
            x[i, 0, r, c - 1 : c + 2] = 1.0
            x[i, 0, r - 1 : r + 2, c] = 1.0
    return np.clip(x, 0.0, 1.0), y.astype(np.int64)


class AcmeCnn(ClassifierTask):
    info = TASK  # what edgeci reads: contract, classes, D_min, training defaults, graphs
    name = "acme-parts"
    model_id = "acme-parts-cnn"
    input_shape = (1, SIDE, SIDE)
    n_classes = len(CLASSES)
    pretrain_config = TrainConfig(epochs=10, batch_size=8, lr=0.05)

    def build_module(self) -> SplitModel:
        # Two groups: "extractor" and "classifier" (what LASP and SCC rounds tell apart). The
        # classifier is one Linear: SCC and torch-less devices fit it in numpy.
        extractor = nn.Sequential(
            Affine(0.2, 3.0),  # centred inputs
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
            nn.Linear(16, 16), nn.ReLU(),
        )
        return SplitModel(extractor, nn.Linear(16, self.n_classes))

    def _make_data(self) -> TaskData:
        """The deployed model's pretraining split (3 a class), the pool users label, a held-out test split."""
        x, y = make_images(900, seed=7)
        pretrain, pool, test = stratified_split(y, n_test=150, pretrain_per_class=3, seed=7)
        return TaskData(pretrain=take(x, y, pretrain), pool=take(x, y, pool), test=take(x, y, test),
                        n_classes=self.n_classes)
