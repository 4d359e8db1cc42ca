"""The detection task in the shape of the :class:`~edge_sdk.tasks.base.Task` protocol.

:class:`~edge_sdk.tasks.detection.DetectionTask` takes a *list of box arrays* per frame,
while the emulator (:mod:`devices.simulator`), the partitioners and every strategy speak
the classification protocol: ``Split(x, y)`` with one ``int64`` per sample. This adapter
bridges the two without changing either side:

* **Samples.** ``x`` is the frames, ``(N, H, W, 3)`` uint8; ``y`` is, per frame, an
  ``int64`` index into the adapter's box table :attr:`DetectionFleetTask.boxes` (one
  ``(k, 5)`` array ``class, x1, y1, x2, y2`` per frame). The table is laid out
  ``pool | test | pretrain``, so the pool's ``y`` is ``arange(len(pool))`` — indices into
  the pool's own boxes — and every split's ``y`` points into the same table.
  ``local_update`` and ``evaluate`` map the indices back to boxes.
* **Pool.** What the fleet's users box: the detection task's user frames, every one
  showing the new class (``star``), usually next to known objects, all boxed — SPIN's
  story of a deployed detector meeting an object it was not trained on. The labels are
  indices, not classes, so a scenario must split the pool with ``partition = "iid"``
  (Dirichlet or "labels" would treat every frame as its own class).
* **Held-out split.** 64 frames at 96 px with every class (the first 64 of the detection
  task's test set): ``evaluate`` takes ~0.3 s on one core, so the emulator can evaluate
  every version it deploys. ``accuracy`` is mAP50; ``ap50_new`` and ``mAP50_known`` are
  reported too.
* **Deployed model.** :meth:`DetectionTask.pretrained` with the *default* detection config
  (so its cache under the data dir is shared with the detection task and the benchmark)
  and a fixed ``deployed_seed`` — the same deployed detector for every emulator seed, as
  a fleet has one deployed model; it also means emulator seeds 1, 2, … never start a
  fresh ~20 min pretraining.
* **Learning rate.** The emulator passes the scenario's ``[training]`` values, whose
  generic default lr (0.05, tuned for the digits CNN) destroys a YOLO. An lr equal to that
  generic default is taken to mean "not set" and replaced by
  :data:`~edge_sdk.tasks.detection.DEFAULT_TRAIN`'s (AdamW at 1e-3); any other value is
  used as given. The lr actually used is in ``TrainResult.extra["lr"]``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_sdk._extras import missing

try:
    import torch
except ImportError as exc:
    raise missing("torch", "detection", purpose="the detection fleet task", cause=exc) from exc

from edge_sdk.errors import InvalidSample
from edge_sdk.spec import ModelSpec, Vector
from edge_sdk.tasks.base import Split, TaskData, TrainConfig, TrainResult
from edge_sdk.tasks.detection import DEFAULT_TRAIN, DetectionConfig, DetectionTask
from edge_sdk.tasks.scenes import Boxes, SceneSet

__all__ = ["FLEET_CONFIG", "DetectionFleetTask"]

FLEET_CONFIG = DetectionConfig(pool_scenes=480, test_scenes=64)
"""The default detection config (so the deployed model's cache is shared), with a pool of
480 user frames (48 per device for 10 devices) and a 64-frame held-out split. Neither
size is part of the pretraining cache key."""

_GENERIC_LR = TrainConfig().lr  # the classification default: "not set" for YOLO


class DetectionFleetTask:
    """YOLOv8n detection as an emulator task: ``y`` indexes :attr:`boxes` (see module doc)."""

    name = "yolov8n-detection-fleet"
    metric_name = "mAP50"
    """What this task's ``accuracy`` is, for plot and table labels."""

    def __init__(
        self,
        config: DetectionConfig | None = None,
        *,
        data_dir: Path | str | None = None,
        device: str | torch.device = "cpu",
        deployed_seed: int = 0,
    ) -> None:
        self.detection = DetectionTask(config or FLEET_CONFIG, data_dir=data_dir, device=device)
        self.config = self.detection.config
        self.spec: ModelSpec = self.detection.spec
        self.deployed_seed = deployed_seed
        self._data: TaskData | None = None
        self._boxes: tuple[Boxes, ...] = ()

    # ----------------------------------------------------------------------- data
    @property
    def boxes(self) -> tuple[Boxes, ...]:
        """The box table every split's ``y`` indexes: ``pool | test | pretrain``."""
        self.data()
        return self._boxes

    def data(self) -> TaskData:
        """The detection task's splits as ``Split(x = frames, y = indices into boxes)``."""
        if self._data is None:
            d = self.detection.data()
            table: list[Boxes] = []

            def split(scenes: SceneSet) -> Split:
                start = len(table)
                table.extend(scenes.boxes)
                return Split(x=scenes.images, y=np.arange(start, len(table), dtype=np.int64))

            pool, test, pretrain = split(d.pool), split(d.test), split(d.pretrain)
            self._boxes = tuple(table)
            self._data = TaskData(pretrain=pretrain, pool=pool, test=test, n_classes=d.n_classes)
        return self._data

    def scenes(self, x: npt.NDArray[Any], y: npt.NDArray[np.int64]) -> SceneSet:
        """The frames ``x`` with the boxes their indices ``y`` name."""
        table = self.boxes
        idx = np.asarray(y)
        if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
            raise InvalidSample("y must be a 1-D integer array of box-table indices")
        if len(x) != idx.shape[0]:
            raise InvalidSample(f"{len(x)} frames but {idx.shape[0]} box indices")
        if idx.size and (idx.min() < 0 or idx.max() >= len(table)):
            raise InvalidSample(f"box index out of range 0..{len(table) - 1}")
        return SceneSet(np.asarray(x), tuple(table[int(i)] for i in idx))

    # --------------------------------------------------------------- the protocol
    def pretrained(self, *, seed: int = 0) -> Vector:
        """The deployed detector (cached under the data dir); ``seed`` is the emulator's
        run seed and does not change it — see :attr:`deployed_seed`."""
        return self.detection.pretrained(seed=self.deployed_seed)

    def training_config(self, config: TrainConfig) -> TrainConfig:
        """``config`` with the generic default lr replaced by the detector's (module doc)."""
        if config.lr == _GENERIC_LR:
            return dataclasses.replace(config, lr=DEFAULT_TRAIN.lr)
        return config

    def local_update(
        self,
        weights: Vector,
        x: npt.NDArray[Any],
        y: npt.NDArray[np.int64],
        config: TrainConfig = DEFAULT_TRAIN,
    ) -> TrainResult:
        """Fine-tune a copy of ``weights`` on frames ``x`` boxed as ``boxes[y]``."""
        scenes = self.scenes(x, y)
        cfg = self.training_config(config)
        result = self.detection.local_update(weights, scenes.images, scenes.boxes, cfg)
        result.extra["lr"] = cfg.lr
        return result

    def evaluate(self, weights: Vector, split: Split | None = None) -> dict[str, float]:
        """Detection metrics (``accuracy`` = ``mAP50``) on ``split`` (default: held-out)."""
        test = self.data().test if split is None else split
        return self.detection.evaluate(weights, self.scenes(test.x, test.y))
