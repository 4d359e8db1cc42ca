"""Object detection task: YOLOv8n fine-tuned on the frames a device's users box.

SPIN's headline use: a deployed detector meets a class it was never trained on, users box
it in their camera feed, and the shared detector learns it. This module provides that
detector to the SDK as a flat float32 vector (see :mod:`edge_sdk.spec`):

* **Model.** YOLOv8n built from the ``yolov8n.yaml`` that ships inside ultralytics, with
  ``n_classes`` outputs fixed up front — the class the users will label later already has
  a (so far untrained) slot, because the vector layout must never change in a federation.
  A local checkpoint (a state dict, or ultralytics' own ``.pt``) can seed it: every tensor
  whose name and shape match is copied. It is unpickled with ``weights_only=True``, never
  as arbitrary objects (see :func:`read_checkpoint`).
* **Vector.** Every float tensor of the ``state_dict`` (parameters *and* BatchNorm running
  statistics — an aggregated YOLO without them is broken), in module order. Layers 0–21
  (backbone + neck) form the ``extractor`` group and layer 22 (the ``Detect`` head) the
  ``classifier`` group; both are contiguous, so LASP sends the head alone.
* **Training.** Our own short loop over in-memory tensors driving ultralytics' own
  ``v8DetectionLoss`` (task-aligned assigner, DFL, CIoU). ultralytics' trainer wants a
  dataset on disk, forks dataloader workers, creates ``runs/``, runs AMP checks that
  download a model on CUDA, and takes seconds to set up per call; a device fine-tunes on
  64 frames at a time, so tensors in memory are both faster and free of those failure
  modes. Augmentation is a random horizontal flip (``hflip``); the optimiser is AdamW at ``TrainConfig.lr``
  (see :data:`DEFAULT_TRAIN`, declared in :mod:`edge_sdk.tasks.registry` and served as the task's
  ``default_train`` — the classification default of 0.05 is far too high here).
* **Samples.** The Task protocol's ``sample_kind = "frame"``: :meth:`DetectionTask.data`
  gives splits of ``x`` = ``(N, H, W, 3)`` uint8 frames and ``y`` = an object array of their
  ``(k, 5)`` box arrays, which index and partition like any split (only by sample: a frame
  has no one class label, so label-skewed partitions of frames are refused);
  :meth:`DetectionTask.scenes` is the same data as scene sets
  (:class:`~edge_sdk.tasks.scenes.SceneSet`).
* **Evaluation.** ultralytics' NMS and ``ap_per_class`` (COCO 101-point AP) on a held-out
  synthetic split: ``mAP50``, ``mAP50_95``, precision, recall, per-class AP50.
* **Deployment.** ONNX export through ultralytics' ``Exporter`` and :class:`OnnxDetector`,
  onnxruntime inference with letterboxing and class-aware NMS (OpenCV's), torch-free.

Nothing is downloaded and nothing is written outside the data dir: ultralytics is
imported through :func:`~edge_sdk.tasks._ultralytics.import_ultralytics` first.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
import logging
import math
import os
import pickle  # noqa: TID251  (only for UnpicklingError: what a weights_only load raises)
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt

from edge_sdk._extras import missing

try:
    import cv2
    import torch
    from torch import nn
except ImportError as exc:
    raise missing(exc.name or "torch", "detection", purpose="the detection task", cause=exc) from exc

from edge_sdk.cancellation import checkpoint
from edge_sdk.errors import ConfigError, InvalidSample, UnsafeCheckpoint
from edge_sdk.spec import FULL, ModelSpec, Vector
from edge_sdk.tasks._ultralytics import (
    import_ultralytics,
    prepare_environment,
    ultralytics_home,
)
from edge_sdk.tasks.base import (
    MAX_BOXES,
    SampleKind,
    Split,
    TaskData,
    TrainConfig,
    TrainResult,
    check_detect_input,
    check_frame,
)
from edge_sdk.tasks.registry import default_train_config
from edge_sdk.tasks.scenes import (
    CLASS_NAMES,
    KNOWN_CLASSES,
    NEW_CLASS,
    SceneConfig,
    SceneSet,
    make_scenes,
)

YoloModel: TypeAlias = Any
"""An ``ultralytics.nn.tasks.DetectionModel``; untyped upstream, so ``Any`` to mypy."""

# Before anything imports onnxruntime or ultralytics: both read their switches (telemetry,
# settings dir, offline) once, at import. The task's own data dir overrides this default.
prepare_environment()

_LOG = logging.getLogger("edgeci.detection")

EXTRACTOR = "extractor"
CLASSIFIER = "classifier"
DEFAULT_TRAIN = default_train_config("detection")
"""Local fine-tuning defaults for YOLOv8n (declared in the registry): SPIN's E = 5 epochs,
AdamW at 1e-3."""

_PAD_VALUE = 114  # ultralytics' letterbox grey, so exported models see what they trained on
_IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
_GRAD_CLIP = 10.0  # as ultralytics' trainer
_CACHE_VERSION = "det-v1"  # bump when pretraining changes in a way the config does not show


def read_checkpoint(path: Path) -> nn.Module | dict[str, torch.Tensor]:
    """The model (an ultralytics module) or state dict in the checkpoint at ``path``.

    A ``.pt`` is a pickle, and unpickling runs whatever the file names, so the file is loaded
    with ``weights_only=True``: tensors and plain containers, plus, for ultralytics' own
    checkpoints, the model classes on ultralytics' allow-list (its ``safe_only`` load). Not
    through ``torch_safe_load``: that unpickles arbitrary objects by default, and on a name
    it does not find (or renames, ``yolov5s.pt`` -> ``yolov5su.pt``) downloads one.
    """
    try:
        loaded = _torch_load(path)
    except pickle.UnpicklingError as exc:  # a global beyond torch's own: ultralytics' classes?
        allow_list = getattr(importlib.import_module("ultralytics.nn.tasks"), "_SafeLoad", None)
        if allow_list is None or not getattr(allow_list, "SUPPORTED", False):
            raise UnsafeCheckpoint(
                f"{path} holds pickled objects, and this ultralytics/torch has no allow-list "
                "to load them safely; save a state dict instead (model.state_dict())"
            ) from exc
        try:
            with allow_list.loading(str(path)):
                loaded = _torch_load(path)
        except pickle.UnpicklingError as refused:
            raise UnsafeCheckpoint(
                f"{path} pickles objects other than tensors and ultralytics' model classes; "
                f"refused without running it ({str(refused).splitlines()[-1][:200]})"
            ) from refused
    if isinstance(loaded, Mapping) and ("ema" in loaded or "model" in loaded):
        ema = loaded.get("ema")
        loaded = ema if ema is not None else loaded.get("model")  # ultralytics': EMA first
    if isinstance(loaded, nn.Module):
        return loaded.float()
    if isinstance(loaded, Mapping) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        return {k: v.float() if v.is_floating_point() else v for k, v in loaded.items()}
    raise ConfigError(f"{path} holds neither a state dict nor an ultralytics model")


def _torch_load(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True``; a global it refuses is its UnpicklingError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError) as exc:  # truncated, not a zip
        raise ConfigError(f"{path} is not a readable torch checkpoint: {exc}") from exc


@dataclass(frozen=True, slots=True, kw_only=True)
class DetectionConfig:
    """What the detection task builds, how it pretrains the deployed model, its data."""

    n_classes: int = len(CLASS_NAMES)
    class_names: tuple[str, ...] = CLASS_NAMES
    known_classes: tuple[int, ...] = KNOWN_CLASSES
    """Classes the deployed model is pretrained on."""
    new_class: int = NEW_CLASS
    """The class users label after deployment; its slot is in the model from the start."""
    imgsz: int = 96
    """Square input side for training and evaluation (multiple of 32); frames are letterboxed."""
    weights_path: str | None = None
    """A local YOLOv8n checkpoint to start from instead of random init: a ``.pt`` holding a
    state dict (``torch.save(model.state_dict(), ...)``, bare or under ``"model"``/``"ema"``),
    or an ultralytics checkpoint (``yolov8n.pt``) made of ultralytics' and torch's own model
    classes. It is loaded with ``weights_only=True`` (nothing in the file runs); a file that
    pickles anything else is refused (:class:`~edge_sdk.errors.UnsafeCheckpoint`)."""
    hflip: float = 0.5
    """Probability of mirroring a training frame (0 for scenes with a handedness, e.g. text)."""
    scene_size: int = 96
    data_seed: int = 1234
    pretrain_scenes: int = 768
    pretrain_epochs: int = 30
    pretrain_batch: int = 16
    pretrain_lr: float = 2e-3
    pool_scenes: int = 256
    test_scenes: int = 200

    def __post_init__(self) -> None:
        if self.n_classes < 1 or len(self.class_names) < self.n_classes:
            raise ConfigError("need n_classes >= 1 and a name for every class")
        if any(not 0 <= c < self.n_classes for c in (*self.known_classes, self.new_class)):
            raise ConfigError("known_classes and new_class must be < n_classes")
        if self.new_class in self.known_classes:
            raise ConfigError("new_class must not be a known class")
        if not 0.0 <= self.hflip <= 1.0:
            raise ConfigError(f"hflip is a probability, got {self.hflip}")
        if self.imgsz < 32 or self.imgsz % 32:
            raise ConfigError(f"imgsz must be a positive multiple of 32, got {self.imgsz}")
        if (
            min(
                self.pretrain_scenes,
                self.pretrain_epochs,
                self.pretrain_batch,
                self.pool_scenes,
                self.test_scenes,
            )
            < 1
            or self.pretrain_lr <= 0
        ):
            raise ConfigError("pretraining sizes and learning rate must be positive")


@dataclass(frozen=True, slots=True, kw_only=True)
class DetectionData:
    """The task's synthetic data: ``pretrain`` (known classes only) makes the deployed
    model, ``pool`` is what users label (every frame shows the new class), ``test`` is the
    held-out split with every class."""

    pretrain: SceneSet
    pool: SceneSet
    test: SceneSet
    n_classes: int


@dataclass(frozen=True, slots=True)
class _Prepared:
    """Frames letterboxed to ``imgsz`` (uint8 NCHW) and targets ``(k, 5)``
    ``class, cx, cy, w, h`` normalised to the letterboxed frame."""

    images: torch.Tensor
    targets: list[torch.Tensor] = field(default_factory=list)


def _letterbox_geometry(h: int, w: int, imgsz: int) -> tuple[float, tuple[int, int], tuple[int, int]]:
    """A ``h`` × ``w`` frame letterboxed to ``imgsz``: scale, resized (h, w), offset (dx, dy)."""
    scale = min(imgsz / h, imgsz / w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))  # a strip thinner than 1/imgsz of its length: one row
    return scale, (nh, nw), ((imgsz - nw) // 2, (imgsz - nh) // 2)


def letterbox(
    image: npt.NDArray[np.uint8], imgsz: int
) -> tuple[npt.NDArray[np.uint8], float, tuple[int, int]]:
    """Resize keeping aspect ratio and pad to ``imgsz`` square; returns image, scale, (dx, dy)."""
    h, w = image.shape[:2]
    scale, (nh, nw), (dx, dy) = _letterbox_geometry(h, w, imgsz)
    if (nh, nw) == (imgsz, imgsz) and (h, w) == (imgsz, imgsz):
        return image, 1.0, (0, 0)
    resized = (
        cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR) if (nh, nw) != (h, w) else image
    )
    out = np.full((imgsz, imgsz, 3), _PAD_VALUE, dtype=np.uint8)
    out[dy : dy + nh, dx : dx + nw] = resized
    return out, scale, (dx, dy)


def _check_frames(
    images: Sequence[npt.NDArray[Any]] | npt.NDArray[Any],
    boxes: Sequence[npt.NDArray[Any]] | npt.NDArray[Any] | None,
    n_classes: int,
) -> None:
    """Raise :class:`InvalidSample` unless frames are RGB uint8 and boxes ``(k, 5)`` sane, at
    most :data:`~edge_sdk.tasks.base.MAX_BOXES` a frame."""
    if boxes is not None and len(images) != len(boxes):
        raise InvalidSample(f"{len(images)} images but {len(boxes)} box arrays")
    for i, img in enumerate(images):
        check_frame(img, f"image {i}")
        if boxes is None:
            continue
        b = np.asarray(boxes[i])
        if b.ndim != 2 or b.shape[1] != 5:
            raise InvalidSample(f"boxes {i} must be a finite (k, 5) array: class, x1, y1, x2, y2")
        if len(b) > MAX_BOXES:
            raise InvalidSample(f"boxes {i}: {len(b)} boxes; a frame has at most {MAX_BOXES} boxes")
        if not np.isfinite(b).all():
            raise InvalidSample(f"boxes {i} must be a finite (k, 5) array: class, x1, y1, x2, y2")
        cls = b[:, 0]
        if (cls != np.round(cls)).any() or (cls < 0).any() or (cls >= n_classes).any():
            raise InvalidSample(f"boxes {i}: class ids must be integers in 0..{n_classes - 1}")
        if (b[:, 3] <= b[:, 1]).any() or (b[:, 4] <= b[:, 2]).any():
            raise InvalidSample(f"boxes {i}: every box needs x2 > x1 and y2 > y1")


def _to_input(
    image: npt.NDArray[np.uint8], boxes: npt.ArrayLike, imgsz: int
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """One frame as training sees it: letterboxed to ``imgsz``, its boxes' class ids ``(k, 1)``
    and xyxy corners ``(k, 4)`` moved with it, clipped, and those under one pixel there dropped.
    On a frame that is already ``imgsz`` square with boxes made by this function it is the
    identity (``letterbox`` returns the frame, the corners are scaled by 1 and shifted by 0)."""
    frame, scale, (dx, dy) = letterbox(image, imgsz)
    b, xyxy, keep = _boxes_at_input(boxes, scale, dx, dy, imgsz)
    return frame, b[keep, :1], xyxy[keep]


def _boxes_at_input(
    boxes: npt.ArrayLike, scale: float, dx: int, dy: int, imgsz: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
    """``boxes`` as float32 ``(k, 5)`` rows, their corners at the letterboxed input (clipped),
    and which of them training keeps (at least one pixel wide and high there)."""
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 5)
    xyxy = b[:, 1:5] * scale + np.array([dx, dy, dx, dy], dtype=np.float32)
    xyxy = np.clip(xyxy, 0, imgsz)
    keep = ((xyxy[:, 2] - xyxy[:, 0]) >= 1) & ((xyxy[:, 3] - xyxy[:, 1]) >= 1)
    return b, xyxy, keep


def _prepare(
    images: Sequence[npt.NDArray[np.uint8]] | npt.NDArray[np.uint8],
    boxes: Sequence[npt.NDArray[Any]] | npt.NDArray[Any],
    imgsz: int,
) -> _Prepared:
    """Letterbox every frame and turn its pixel xyxy boxes into normalised cxcywh targets."""
    frames = np.empty((len(images), imgsz, imgsz, 3), dtype=np.uint8)
    targets: list[torch.Tensor] = []
    for i, (img, b) in enumerate(zip(images, boxes)):
        frames[i], cls, xyxy = _to_input(img, b, imgsz)
        cxcywh = (
            np.concatenate([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], 1) / imgsz
        )
        targets.append(torch.from_numpy(np.concatenate([cls, cxcywh], 1).astype(np.float32)))
    return _Prepared(torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous(), targets)


def _batch(
    prep: _Prepared, index: torch.Tensor, device: torch.device, flip: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """The batch dict ultralytics' loss reads; ``flip`` mirrors the chosen frames."""
    img = prep.images[index].to(device, non_blocking=True).float().div_(255.0)
    rows = []
    for j, i in enumerate(index.tolist()):
        t = prep.targets[i].clone()
        if flip is not None and bool(flip[j]):
            t[:, 1] = 1.0 - t[:, 1]
        rows.append(torch.cat([torch.full((t.shape[0], 1), float(j)), t], 1))
    if flip is not None and bool(flip.any()):
        img[flip.to(device)] = img[flip.to(device)].flip(-1)
    tgt = torch.cat(rows, 0) if rows else torch.zeros(0, 6)
    return {
        "img": img,
        "batch_idx": tgt[:, 0].to(device),
        "cls": tgt[:, 1:2].to(device),
        "bboxes": tgt[:, 2:6].to(device),
    }


def _match(
    det_cls: npt.NDArray[Any], gt_cls: npt.NDArray[Any], iou: npt.NDArray[Any]
) -> npt.NDArray[np.bool_]:
    """True positives (n_det, 10) at IoU 0.5:0.95: greedy one-to-one by IoU, same class."""
    correct = np.zeros((det_cls.shape[0], _IOU_THRESHOLDS.shape[0]), dtype=bool)
    iou = iou * (gt_cls[:, None] == det_cls[None, :])
    for k, threshold in enumerate(_IOU_THRESHOLDS):
        gt_idx, det_idx = np.nonzero(iou >= threshold)
        if gt_idx.size == 0:
            continue
        pairs = np.stack([gt_idx, det_idx], 1)
        pairs = pairs[iou[gt_idx, det_idx].argsort()[::-1]]
        pairs = pairs[np.unique(pairs[:, 1], return_index=True)[1]]
        pairs = pairs[np.unique(pairs[:, 0], return_index=True)[1]]
        correct[pairs[:, 1], k] = True
    return correct


def _lr_factor(step: int, warmup: int, total_steps: int, *, cosine: bool) -> float:
    """Learning-rate multiplier: linear warm-up over ``warmup`` steps, then 1 or a cosine
    decay to 5 % at ``total_steps``."""
    if step < warmup:
        return (step + 1) / warmup
    if not cosine:
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))


def _resolve_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch device, refused now (not mid-training) if this host lacks it."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"not a torch device: {device!r}") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but CUDA is not available")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {device!r} asked for, but Apple MPS is not available")
    if resolved.type not in {"cpu", "cuda", "mps"}:
        raise ConfigError(f"device {device!r}: only cpu, cuda and mps are supported")
    return resolved


def _with_options(config: DetectionConfig, options: dict[str, Any]) -> DetectionConfig:
    """``config`` with ``options`` (field = value; TOML lists become tuples) applied."""
    known = {f.name for f in fields(DetectionConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"unknown detection option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    try:
        changes: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
        return replace(config, **changes)
    except TypeError as exc:
        raise ConfigError(f"bad detection options {options!r}: {exc}") from None


def frame_split(scenes: SceneSet) -> Split:
    """``scenes`` as a Task-protocol split: frames ``x`` and an object array ``y`` of their boxes."""
    y = np.empty(len(scenes), dtype=object)
    for i, b in enumerate(scenes.boxes):
        y[i] = b
    return Split(x=scenes.images, y=y)


def as_scenes(split: Split | SceneSet) -> SceneSet:
    """The frames and boxes of a split of the task's kind (a :class:`SceneSet` as is)."""
    if isinstance(split, SceneSet):
        return split
    x = np.asarray(split.x)
    if len(x) != len(split.y):
        raise InvalidSample(f"{len(x)} frames but {len(split.y)} box arrays")
    return SceneSet(x, tuple(np.asarray(b) for b in split.y))


class DetectionTask:
    """YOLOv8n as an edgeci task: spec, deployed model, local fine-tune, mAP50, ONNX.

    ``data_dir`` holds everything the task writes: ultralytics' settings, the
    pretraining cache and, by default, ONNX exports. ``device`` is a torch device string
    (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``); training and evaluation run there.
    Calls never share torch modules (each works on its own copy), so one task may be
    used from several threads.

    ``options`` are :class:`DetectionConfig` fields over ``config`` (a scenario's
    ``task_options``, e.g. ``pool_scenes = 480``). ``deployed_seed`` fixes the deployed
    model: :meth:`pretrained` then returns that seed's model whatever seed it is asked
    for — a fleet has one deployed detector, and each seed's pretraining takes ~20 min on
    two cores.
    """

    name = "yolov8n-detection"
    sample_kind: SampleKind = "frame"
    """Samples are frames with boxes (the Task protocol's ``(x, y)`` for frames)."""
    default_train: TrainConfig = DEFAULT_TRAIN

    def __init__(
        self,
        config: DetectionConfig | None = None,
        *,
        data_dir: Path | str | None = None,
        device: str | torch.device = "cpu",
        deployed_seed: int | None = None,
        **options: Any,
    ) -> None:
        self.config = _with_options(config or DetectionConfig(), options)
        if deployed_seed is not None and (isinstance(deployed_seed, bool) or not isinstance(deployed_seed, int)):
            raise ConfigError(f"deployed_seed must be an integer, got {deployed_seed!r}")
        self.deployed_seed = deployed_seed
        import_ultralytics(data_dir)
        self.data_dir = ultralytics_home(data_dir).parent
        self.device = _resolve_device(device)
        self._template = self._build(seed=0)
        self._head_index = len(self._template.model) - 1
        self.spec = ModelSpec.build(self.name, self._spec_entries(self._template))
        self._scenes: DetectionData | None = None
        self._data: TaskData | None = None

    @property
    def n_classes(self) -> int:
        return self.config.n_classes

    # ----------------------------------------------------------------- model <-> vector
    def _build(self, seed: int) -> YoloModel:
        """YOLOv8n from the packaged yaml (never a file in the cwd), seeded init."""
        tasks = importlib.import_module("ultralytics.nn.tasks")
        utils = importlib.import_module("ultralytics.utils")
        cfg = utils.YAML.load(utils.ROOT / "cfg" / "models" / "v8" / "yolov8.yaml")
        cfg.update(scale="n", yaml_file="yolov8n.yaml")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = tasks.DetectionModel(cfg, ch=3, nc=self.config.n_classes, verbose=False)
        if self.config.weights_path is not None:
            path = Path(self.config.weights_path).expanduser()
            if not path.is_file():
                raise ConfigError(f"weights file not found: {path}")
            ckpt = read_checkpoint(path)
            if isinstance(ckpt, nn.Module):  # ultralytics' own transfer (adapts the class count)
                model.load(ckpt, verbose=False)
            else:
                own = model.state_dict()
                fits = {k: v for k, v in ckpt.items() if k in own and v.shape == own[k].shape}
                if not fits:
                    raise ConfigError(f"no tensor in {path} fits a YOLOv8n: not its checkpoint")
                model.load_state_dict(fits, strict=False)
        model.names = dict(enumerate(self.config.class_names[: self.config.n_classes]))
        model.args = SimpleNamespace(
            **{k: utils.DEFAULT_CFG_DICT[k] for k in ("box", "cls", "dfl")}
        )
        model.task = "detect"
        return model

    def _spec_entries(self, model: nn.Module) -> list[tuple[str, tuple[int, ...], str]]:
        entries = []
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue  # BatchNorm's num_batches_tracked: unused, ultralytics fixes momentum
            parts = name.split(".")
            if parts[0] != "model" or not parts[1].isdigit():
                raise ConfigError(f"unexpected tensor {name!r} in the YOLO state dict")
            group = CLASSIFIER if int(parts[1]) == self._head_index else EXTRACTOR
            entries.append((name, tuple(tensor.shape), group))
        return entries

    def to_vector(self, model: nn.Module) -> Vector:
        """A fresh float32 vector holding ``model``'s tensors in spec order."""
        state = model.state_dict()
        out = self.spec.zeros()
        for p in self.spec.params:
            out[p.offset : p.offset + p.size] = (
                state[p.name].detach().to("cpu", torch.float32).reshape(-1).numpy()
            )
        return out

    def load_vector(self, model: nn.Module, weights: Vector, group: str = FULL) -> None:
        """Copy ``weights`` (the whole vector, or one group's slice) into ``model``."""
        self.spec.check(weights, group)
        if (
            not weights.flags.writeable
        ):  # e.g. decoded from the wire; torch.from_numpy warns on those
            weights = weights.copy()
        base = self.spec.group_slice(group).start
        state = model.state_dict()
        with torch.no_grad():
            for p in self.spec.params:
                if group != FULL and p.group != group:
                    continue
                start = p.offset - base
                state[p.name].copy_(torch.from_numpy(weights[start : start + p.size]).view(p.shape))

    def model(self, weights: Vector | None = None) -> YoloModel:
        """A private torch copy of the network (on ``self.device``), loaded with ``weights``."""
        model = copy.deepcopy(self._template)
        if weights is not None:
            self.load_vector(model, weights)
        return model.to(self.device)

    def initial_weights(self, *, seed: int = 0) -> Vector:
        """Randomly initialised weights (or the ``weights_path`` checkpoint's), no training."""
        return self.to_vector(self._build(seed) if seed else self._template)

    # ----------------------------------------------------------------------- data
    def data(self) -> TaskData:
        """The Task protocol's splits: frames ``x`` with an object array ``y`` of their boxes
        (the same frames as :meth:`scenes`, generated once per task)."""
        if self._data is None:
            d = self.scenes()
            self._data = TaskData(pretrain=frame_split(d.pretrain), pool=frame_split(d.pool),
                                  test=frame_split(d.test), n_classes=d.n_classes)
        return self._data

    def scenes(self) -> DetectionData:
        """The task's synthetic splits as scene sets (generated once per task, deterministic)."""
        if self._scenes is None:
            c = self.config
            size = c.scene_size
            all_classes = tuple(sorted({*c.known_classes, c.new_class}))
            self._scenes = DetectionData(
                pretrain=make_scenes(
                    c.pretrain_scenes,
                    seed=c.data_seed,
                    config=SceneConfig(size=size, classes=c.known_classes),
                ),
                pool=make_scenes(
                    c.pool_scenes,
                    seed=c.data_seed + 1,
                    config=SceneConfig(size=size, classes=all_classes, required=(c.new_class,)),
                ),
                test=make_scenes(
                    c.test_scenes,
                    seed=c.data_seed + 2,
                    config=SceneConfig(size=size, classes=all_classes),
                ),
                n_classes=c.n_classes,
            )
        return self._scenes

    # ------------------------------------------------------------------- training
    def _fit(
        self,
        model: YoloModel,
        prep: _Prepared,
        *,
        epochs: int,
        batch_size: int,
        lr: float,
        seed: int,
        group: str,
        schedule: bool,
    ) -> tuple[list[float], dict[str, float]]:
        """Train ``model`` in place; returns the mean loss per epoch and the last components.

        ``group`` limits training to one layer group: the other group's parameters get no
        gradient and its BatchNorm layers stay in eval mode, so its vector slice is
        bit-identical afterwards. ``schedule`` (pretraining) warms the learning rate up and
        decays it on a cosine; a local update holds it constant, as SPIN's devices do.
        """
        if group != FULL and group not in self.spec.groups:
            raise ConfigError(f"no layer group {group!r}; have {self.spec.groups}")
        head = self._head_index
        trained_layers = [
            i for i in range(head + 1) if group == FULL or (group == CLASSIFIER) == (i == head)
        ]
        params = []
        for i, layer in enumerate(model.model):
            for p in layer.parameters():
                if i in trained_layers and p.requires_grad:
                    params.append(p)
                else:
                    p.requires_grad_(False)
        model.train()
        for i, layer in enumerate(model.model):
            if i not in trained_layers:
                for m in layer.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()
        model.criterion = None  # bind the loss to the model's current device
        optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
        gen = torch.Generator().manual_seed(seed)
        n = prep.images.shape[0]
        steps_per_epoch = math.ceil(n / batch_size)
        total_steps = epochs * steps_per_epoch
        # Pretraining from scratch warms up over its first 10 % of steps. A local update
        # keeps SPIN's constant rate: a warm-up over its first quarter was tried and cost the
        # head-only (LASP) update on the new class 0.906 -> 0.781 AP50 at no gain elsewhere.
        warmup = max(1, min(100, total_steps // 10)) if schedule else 0
        step, epoch_losses, components = 0, [], {}
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen)
            running = 0.0
            for start in range(0, n, batch_size):
                checkpoint()  # a stopping client does not wait for the rest of the epochs
                index = order[start : start + batch_size]
                flip = torch.rand(index.shape[0], generator=gen) < self.config.hflip
                batch = _batch(prep, index, self.device, flip)
                factor = _lr_factor(step, warmup, total_steps, cosine=schedule)
                for g in optimizer.param_groups:
                    g["lr"] = lr * factor
                loss, items = model.loss(batch)
                total = loss.sum() / index.shape[0]
                if not torch.isfinite(total):
                    raise ConfigError(
                        f"training diverged (loss {float(total)}); lower the learning rate"
                    )
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                nn.utils.clip_grad_norm_(params, _GRAD_CLIP)
                optimizer.step()
                running += float(total.detach()) * index.shape[0]
                components = {k: float(v) for k, v in items.items()}
                step += 1
            epoch_losses.append(running / n)
            _LOG.debug("epoch %d/%d: loss %.4f", len(epoch_losses), epochs, epoch_losses[-1])
        model.eval()
        return epoch_losses, components

    def shrink_frame(self, image: npt.NDArray[np.uint8], boxes: npt.ArrayLike) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32]]:
        """``(image, boxes)`` as :meth:`local_update` uses them: the frame letterboxed to
        ``imgsz`` and its ``(k, 5)`` boxes moved with it (those under one pixel there, which
        training drops, left out). :meth:`local_update` on shrunk frames gives the same result as
        on the originals; a device preparing a job holds ``imgsz``² × 3 bytes a frame instead of
        the whole frame (``EdgeClient`` shrinks each as it reads it from the store)."""
        frame, cls, xyxy = _to_input(image, boxes, self.config.imgsz)
        return frame, np.concatenate([cls, xyxy], 1)

    def dropped_boxes(self, shape: tuple[int, ...], boxes: npt.ArrayLike) -> npt.NDArray[np.intp]:
        """Indices of the boxes of a frame of ``shape`` that training drops (under one pixel once
        the frame is letterboxed to ``imgsz``): the rule :meth:`shrink_frame` applies, without
        resizing the frame."""
        scale, _, (dx, dy) = _letterbox_geometry(int(shape[0]), int(shape[1]), self.config.imgsz)
        return np.flatnonzero(~_boxes_at_input(boxes, scale, dx, dy, self.config.imgsz)[2])

    def local_update(
        self,
        weights: Vector,
        x: Sequence[npt.NDArray[np.uint8]] | npt.NDArray[np.uint8],
        y: Sequence[npt.NDArray[Any]] | npt.NDArray[Any],
        config: TrainConfig = DEFAULT_TRAIN,
    ) -> TrainResult:
        """Fine-tune a copy of ``weights`` on a device's labelled frames; ``weights`` is untouched.

        The Task protocol's ``(x, y)`` for ``sample_kind = "frame"``: ``x`` are RGB uint8
        ``(H, W, 3)`` frames of any size (letterboxed to ``imgsz``), ``y`` one ``(k, 5)``
        array per frame: ``class, x1, y1, x2, y2`` in that frame's pixels (a list, or the
        object array a :meth:`data` split holds). ``config.group`` trains one layer group only (LASP: the head).
        """
        images, boxes = x, y
        self.spec.check(weights)
        if len(images) == 0:
            raise InvalidSample("no samples to train on")
        if config.epochs < 1 or config.batch_size < 1 or config.lr <= 0:
            raise ConfigError("epochs, batch_size and lr must be positive")
        _check_frames(images, boxes, self.config.n_classes)
        wall, cpu = time.perf_counter(), time.process_time()
        model = self.model(weights)
        prep = _prepare(images, boxes, self.config.imgsz)
        losses, components = self._fit(
            model,
            prep,
            epochs=config.epochs,
            batch_size=config.batch_size,
            lr=config.lr,
            seed=config.seed,
            group=config.group,
            schedule=False,
        )
        out = self.to_vector(model)
        return TrainResult(
            weights=out,
            n_samples=len(images),
            loss=losses[-1],
            seconds=time.perf_counter() - wall,
            extra={
                "epoch_losses": losses,
                "cpu_seconds": time.process_time() - cpu,
                "imgsz": self.config.imgsz,
                "device": str(self.device),
                **components,
            },
        )

    def loss(
        self,
        weights: Vector,
        images: Sequence[npt.NDArray[np.uint8]] | npt.NDArray[np.uint8],
        boxes: Sequence[npt.NDArray[Any]],
        *,
        batch_size: int = 32,
    ) -> float:
        """The training objective (box + cls + dfl per frame) of ``weights`` on these frames.

        Computed as training computes it — BatchNorm on batch statistics, frames in order,
        ``batch_size`` at a time — minus the flips, so it is deterministic and measures
        what ``local_update`` minimises (running statistics of a briefly trained model
        would measure something else).
        """
        self.spec.check(weights)
        _check_frames(images, boxes, self.config.n_classes)
        model = self.model(weights).train()  # a private copy: its running statistics may move
        prep = _prepare(images, boxes, self.config.imgsz)
        total, n = 0.0, len(images)
        with torch.no_grad():
            for start in range(0, n, batch_size):
                index = torch.arange(start, min(n, start + batch_size))
                loss, _ = model.loss(_batch(prep, index, self.device))
                total += float(loss.sum())
        return total / n

    def pretrained(self, *, seed: int = 0) -> Vector:
        """The deployed model: YOLOv8n trained briefly on the known classes only.

        Cached under ``data_dir/detection`` keyed by everything that shapes the result
        (spec, data, pretraining schedule, seed), so a second call — or the test suite's
        next run on the same data dir — loads instead of retraining. With a
        ``deployed_seed`` that seed's model is returned whatever ``seed`` says.
        """
        c = self.config
        seed = self.deployed_seed if self.deployed_seed is not None else seed
        key_fields = {
            "version": _CACHE_VERSION,
            "spec": self.spec.fingerprint,
            "seed": seed,
            "config": {
                k: v for k, v in asdict(c).items() if k not in {"pool_scenes", "test_scenes"}
            },
            "weights_file": self._weights_file_id(),
        }
        key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:16]
        cache = self.data_dir / "detection" / f"pretrained-{key}.npy"
        if cache.is_file():
            cached: Vector = np.load(cache, allow_pickle=False)
            if (
                cached.dtype == np.float32
                and cached.shape == (self.spec.size,)
                and np.isfinite(cached).all()
            ):
                return cached
        _LOG.info(
            "pretraining YOLOv8n on %d scenes x %d epochs at %d px (cached after this run: %s)",
            c.pretrain_scenes,
            c.pretrain_epochs,
            c.imgsz,
            cache,
        )
        pre = self.scenes().pretrain
        model = self.model(self.initial_weights(seed=seed))
        prep = _prepare(pre.images, pre.boxes, c.imgsz)
        losses, _ = self._fit(
            model,
            prep,
            epochs=c.pretrain_epochs,
            batch_size=c.pretrain_batch,
            lr=c.pretrain_lr,
            seed=seed,
            group=FULL,
            schedule=True,
        )
        weights = self.to_vector(model)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + f".{os.getpid()}.tmp")
        with open(tmp, "wb") as fh:
            np.save(fh, weights, allow_pickle=False)
        os.replace(tmp, cache)  # atomic: a crashed run never leaves a half-written cache
        cache.with_suffix(".json").write_text(
            json.dumps({**key_fields, "epoch_losses": losses}, indent=1)
        )
        return weights

    def _weights_file_id(self) -> list[Any] | None:
        if self.config.weights_path is None:
            return None
        st = Path(self.config.weights_path).expanduser().stat()
        return [str(self.config.weights_path), st.st_size, st.st_mtime_ns]

    # ----------------------------------------------------------------- evaluation
    def predict(
        self,
        weights: Vector,
        images: Sequence[npt.NDArray[np.uint8]] | npt.NDArray[np.uint8],
        *,
        conf: float = 0.25,
        iou: float = 0.7,
        batch_size: int = 32,
        _model: YoloModel | None = None,
    ) -> list[npt.NDArray[np.float32]]:
        """Detections per frame in the *letterboxed* ``imgsz`` frame: ``(k, 6)``
        ``x1, y1, x2, y2, score, class`` (torch + ultralytics NMS; the reference for ONNX)."""
        from ultralytics.utils.nms import non_max_suppression

        _check_frames(images, None, self.config.n_classes)
        model = _model if _model is not None else self.model(weights).eval()
        prep = _prepare(images, [np.zeros((0, 5), np.float32)] * len(images), self.config.imgsz)
        out: list[npt.NDArray[np.float32]] = []
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                img = prep.images[start : start + batch_size].to(self.device).float().div_(255.0)
                preds = model(img)
                dets = non_max_suppression(
                    preds, conf_thres=conf, iou_thres=iou, max_det=300, nc=self.config.n_classes
                )
                out.extend(d.cpu().numpy().astype(np.float32) for d in dets)
        return out

    def evaluate(self, weights: Vector, split: Split | SceneSet | None = None) -> dict[str, float]:
        """COCO-style detection metrics on ``split`` (default: the held-out test split).

        ``mAP50`` (also under ``accuracy``, the key every task reports), ``mAP50_95``,
        ``precision`` and ``recall`` (at the max-F1 confidence) averaged over classes
        present in the split; ``ap50/<class>`` per class; ``mAP50_known`` and
        ``ap50_new`` for the pretraining classes and the class users add.
        """
        from ultralytics.utils.metrics import ap_per_class, box_iou

        self.spec.check(weights)
        split = as_scenes(split) if split is not None else self.scenes().test
        _check_frames(split.images, split.boxes, self.config.n_classes)
        model = self.model(weights).eval()
        # ultralytics' validator settings: keep nearly every candidate so AP sees the whole PR curve
        dets = self.predict(weights, split.images, conf=0.001, iou=0.7, _model=model)
        prep = _prepare(split.images, split.boxes, self.config.imgsz)
        size = float(self.config.imgsz)
        tps, confs, pred_cls, target_cls = [], [], [], []
        for det, tgt in zip(dets, prep.targets):
            t = tgt.numpy()
            gt_cls = t[:, 0]
            gt_xyxy = (
                np.concatenate([t[:, 1:3] - t[:, 3:5] / 2, t[:, 1:3] + t[:, 3:5] / 2], 1) * size
            )
            target_cls.append(gt_cls)
            if det.shape[0] == 0:
                continue
            iou = box_iou(torch.from_numpy(gt_xyxy), torch.from_numpy(det[:, :4])).numpy()
            tps.append(_match(det[:, 5], gt_cls, iou))
            confs.append(det[:, 4])
            pred_cls.append(det[:, 5])
        all_targets = np.concatenate(target_cls) if target_cls else np.zeros(0)
        if not tps:
            tp = np.zeros((0, _IOU_THRESHOLDS.shape[0]), dtype=bool)
            conf_arr = cls_arr = np.zeros(0)
        else:
            tp, conf_arr, cls_arr = (
                np.concatenate(tps),
                np.concatenate(confs),
                np.concatenate(pred_cls),
            )
        _, _, p, r, _, ap, classes, *_ = ap_per_class(
            tp, conf_arr, cls_arr, all_targets, plot=False
        )
        names = self.config.class_names
        result: dict[str, float] = {
            "mAP50": float(ap[:, 0].mean()) if len(classes) else 0.0,
            "mAP50_95": float(ap.mean()) if len(classes) else 0.0,
            "precision": float(p.mean()) if len(classes) else 0.0,
            "recall": float(r.mean()) if len(classes) else 0.0,
            "n_images": float(len(split)),
            "n_objects": float(all_targets.shape[0]),
        }
        result["accuracy"] = result["mAP50"]
        per_class = {int(c): float(ap[i, 0]) for i, c in enumerate(classes)}
        for c, v in per_class.items():
            result[f"ap50/{names[c]}"] = v
        known = [per_class[c] for c in self.config.known_classes if c in per_class]
        if known:
            result["mAP50_known"] = float(np.mean(known))
        if self.config.new_class in per_class:
            result["ap50_new"] = per_class[self.config.new_class]
        return result

    # ----------------------------------------------------------------- deployment
    def export_onnx(
        self, weights: Vector, path: Path | str | None = None, *, imgsz: int | None = None
    ) -> Path:
        """Export ``weights`` to ONNX with ultralytics' exporter (fused, static
        ``1×3×imgsz×imgsz`` input, output ``(1, 4 + nc, anchors)``: cx, cy, w, h, scores)."""
        from ultralytics.engine.exporter import Exporter

        imgsz = imgsz or self.config.imgsz
        if imgsz % 32:
            raise ConfigError(f"imgsz must be a multiple of 32, got {imgsz}")
        target = (
            Path(path)
            if path is not None
            else self.data_dir / "detection" / f"yolov8n-{imgsz}.onnx"
        )
        target.parent.mkdir(parents=True, exist_ok=True)
        model = copy.deepcopy(self._template)
        self.load_vector(model, weights)
        model.eval()
        # The exporter names its output after the checkpoint it thinks it came from.
        model.pt_path = str(target.with_suffix(".pt"))
        exporter = Exporter(
            overrides={
                "format": "onnx",
                "imgsz": imgsz,
                "batch": 1,
                "device": "cpu",
                "dynamic": False,
                "simplify": False,
                "nms": False,
                "verbose": False,
            }
        )
        with warnings.catch_warnings():
            # ultralytics picks torch's TorchScript exporter on purpose (dynamo=False), whose
            # tracer warns about the head's shape check — harmless for a static input size.
            # Under ``-W error`` these would abort the export, so they are silenced here only.
            warnings.filterwarnings(
                "ignore",
                message="You are using the legacy TorchScript-based ONNX export",
                category=DeprecationWarning,
            )
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx\.")
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # type: ignore[attr-defined]
            produced = Path(exporter(model=model))
        if produced != target:
            os.replace(produced, target)
        return target


class OnnxDetector:
    """onnxruntime inference for an exported detector, with letterbox and NMS (no torch).

    ``detect(image)`` takes one RGB uint8 frame of any size and returns ``(k, 6)``
    ``x1, y1, x2, y2, score, class`` in that frame's pixels.
    """

    def __init__(
        self, path: Path | str, *, conf: float = 0.25, iou: float = 0.7, threads: int | None = None
    ) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        inp = self._session.get_inputs()[0]
        self._input = inp.name
        self.imgsz = int(inp.shape[2])
        self.conf, self.iou = conf, iou

    def raw(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """The network output for a ``(1, 3, imgsz, imgsz)`` float batch in [0, 1]."""
        out = self._session.run(None, {self._input: batch})[0]
        return np.asarray(out, dtype=np.float32)

    def detect(self, image: npt.NDArray[np.uint8], *, conf: float | None = None) -> npt.NDArray[np.float32]:
        """Detections in ``image`` scoring above ``conf`` (default: the detector's)."""
        checked = check_detect_input(image, conf)
        conf = self.conf if checked is None else checked
        boxed, scale, (dx, dy) = letterbox(image, self.imgsz)
        batch = np.ascontiguousarray(boxed.transpose(2, 0, 1)[None], dtype=np.float32) / 255.0
        pred = self.raw(batch)[0].T  # (anchors, 4 + nc)
        scores = pred[:, 4:]
        cls = scores.argmax(1)
        best = scores[np.arange(scores.shape[0]), cls]
        # a NaN/inf box (a diverged or hostile model) is no detection: NMS kept it, and drawing it failed
        keep = (best > conf) & np.isfinite(pred[:, :4]).all(axis=1)
        pred, cls, best = pred[keep], cls[keep], best[keep]
        if pred.shape[0] == 0:
            return np.zeros((0, 6), dtype=np.float32)
        xywh = np.concatenate([pred[:, :2] - pred[:, 2:4] / 2, pred[:, 2:4]], 1)
        idx = np.asarray(
            cv2.dnn.NMSBoxesBatched(
                xywh.tolist(), best.tolist(), cls.tolist(), conf, self.iou
            ),
            dtype=np.int64,
        ).reshape(-1)
        idx = idx[np.argsort(-best[idx])][:300]
        xyxy = np.concatenate([xywh[idx, :2], xywh[idx, :2] + xywh[idx, 2:]], 1)
        xyxy = (xyxy - np.array([dx, dy, dx, dy], dtype=np.float32)) / scale
        h, w = image.shape[:2]
        xyxy = np.clip(xyxy, 0, [w, h, w, h])
        return np.concatenate([xyxy, best[idx, None], cls[idx, None]], 1).astype(np.float32)
