"""What each built-in task *is*, declared without torch: the one place for its input
contract, class count, sample kind, default D_min, local-training defaults and model spec.

A device app needs these to store and serve samples; it should not have to import torch
and load a dataset to learn that a digit is a ``(1, 8, 8)`` float in ``[0, 1]``. So every
built-in task is described here by a :class:`TaskInfo` (numpy only), its
:class:`~edge_sdk.spec.ModelSpec` is read from the spec file shipped next to its ONNX graph
(``graphs/<model_id>.spec.json``), and :class:`DeclaredTask` stands in for the torch task
on a ``[device]`` install: it stores, labels and serves, and says which extra to install
when asked to train. ``tests/test_tasks.py`` loads every declaration's task by its factory and
checks digits', gestures' and detection's declarations in full against their torch tasks
(``tests/test_procdigits.py`` procdigits').

The input contract (docs/guide.md, "The SDK in an app"): ``add_sample`` takes one sample of exactly
``contract.shape``, ``predict`` one sample or a batch ``(N, *contract.shape)``; floating
point, finite, inside ``contract.value_range`` when the task has one. One convenience: a
sample may leave out the shape's size-1 axes (an ``(8, 8)`` digit gets its channel axis).
Anything else is an :class:`~edge_sdk.errors.InvalidSample` that says what was expected —
raw 0–16 digit pixels included.

    python -m edge_sdk.tasks.registry                  # the tasks: built-in and installed entry points
    python -m edge_sdk.tasks.registry --task REF       # one task's declaration and where it came from
    python -m edge_sdk.tasks.registry --write-graphs   # rebuild graphs/ (needs [train])
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from time import perf_counter
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from edge_sdk._extras import missing
from edge_sdk.errors import ConfigError, InvalidSample
from edge_sdk.spec import ModelSpec, Vector
from edge_sdk.tasks.base import Split, TaskData, TrainConfig, TrainResult
from edge_sdk.tasks.linear_head import HeadLayout, fit_head

__all__ = [
    "GRAPHS_DIR",
    "TASK_INFO",
    "DeclaredTask",
    "InputContract",
    "TaskInfo",
    "declared_spec",
    "default_min_samples",
    "default_train_config",
    "input_contract",
    "sample_kind_of",
    "task_info",
]

GRAPHS_DIR = Path(__file__).resolve().parent / "graphs"
EXTRACTOR, CLASSIFIER = "extractor", "classifier"
SampleKind = Literal["array", "frame", "gesture"]  # as edge_sdk.store.SampleKind


@dataclass(frozen=True, slots=True, kw_only=True)
class InputContract:
    """What one sample of a task is: shape, float dtype, value range."""

    task: str
    shape: tuple[int, ...]
    value_range: tuple[float, float] | None = None
    """Inclusive bounds every value must lie in (None: any finite value)."""
    range_is_a_guard: bool = False
    """``value_range`` only refuses absurd input; the samples lie well inside it (gestures: within
    ±8 of ±64). Whoever needs where samples lie (the gradient inversion's start) must not use it."""
    hint: str = ""
    """How to get there from the usual raw form, shown in errors (e.g. ``pixels / 16``)."""
    floats_only: bool = True
    """Refuse integer and boolean arrays (False: cast any numeric array to float32, for an
    app's own task that declares no contract)."""

    @property
    def compact_shape(self) -> tuple[int, ...]:
        """The shape without its size-1 axes: also accepted for one sample."""
        return tuple(d for d in self.shape if d != 1)

    def describe(self) -> str:
        kind = "float" if self.floats_only else "numeric"  # any such dtype: stored as float32
        text = f"{kind} samples of shape {self.shape}"
        if self.compact_shape != self.shape:
            text += f" (or {self.compact_shape})"
        if self.value_range is not None:
            lo, hi = self.value_range
            text += f" with values in [{lo:g}, {hi:g}]"
        return text + (f" ({self.hint})" if self.hint else "")

    def rows_within(self, xs: npt.NDArray[Any]) -> npt.NDArray[np.bool_]:
        """Per sample of a batch ``(N, …)``: all its values finite and inside :attr:`value_range`
        (no range: finite). For data stored or written elsewhere; new samples go through
        :meth:`sample` / :meth:`batch`, which say what is wrong."""
        flat = np.asarray(xs).reshape(len(xs), -1)
        ok: npt.NDArray[np.bool_] = np.isfinite(flat).all(axis=1)
        if self.value_range is not None:
            lo, hi = self.value_range
            ok &= (flat >= lo).all(axis=1) & (flat <= hi).all(axis=1)
        return ok

    def _fail(self, problem: str) -> InvalidSample:
        return InvalidSample(f"{self.task}: expected {self.describe()}; {problem}")

    def _array(self, x: npt.ArrayLike) -> npt.NDArray[Any]:
        """``x`` as an array; anything numpy cannot make one of (ragged lists, an ``__array__``
        that raises) is an :class:`InvalidSample` like any other bad input."""
        if isinstance(x, np.ma.MaskedArray):  # np.asarray would drop the mask and keep what it hides
            raise self._fail("got a masked array: fill the masked values first (x.filled(value))")
        try:
            return np.asarray(x)
        except Exception as exc:  # the app's object: its conversion may raise anything
            raise self._fail(f"got {type(x).__name__} that is not an array ({type(exc).__name__}: {exc})") from exc

    def _values(self, xs: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        numeric = np.issubdtype(xs.dtype, np.number) and not np.issubdtype(xs.dtype, np.complexfloating)
        if not (np.issubdtype(xs.dtype, np.floating) or (numeric and not self.floats_only)):
            raise self._fail(f"got dtype {xs.dtype}")
        with np.errstate(over="ignore"):  # float64 beyond float32's range: reported below
            out = np.ascontiguousarray(xs, dtype=np.float32)
        if not np.isfinite(out).all():
            raise self._fail("got NaN or Inf" if not np.isfinite(xs).all() else "got values beyond float32's range")
        if self.value_range is not None and out.size:
            lo, hi = self.value_range
            seen_lo, seen_hi = float(out.min()), float(out.max())
            if seen_lo < lo or seen_hi > hi:
                raise self._fail(f"got values in [{seen_lo:g}, {seen_hi:g}]")
        return out

    def sample(self, x: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """One validated sample of exactly :attr:`shape`."""
        xs = self._array(x)
        if xs.shape != self.shape:
            if xs.shape != self.compact_shape:
                raise self._fail(f"got shape {xs.shape}")
            xs = xs.reshape(self.shape)
        return self._values(xs)

    def batch(self, x: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """A validated ``(N, *shape)`` batch from a batch or one sample (either shape)."""
        xs = self._array(x)
        if xs.shape in (self.shape, self.compact_shape):
            xs = xs.reshape((1, *self.shape))
        elif xs.ndim >= 1 and xs.shape[0] > 0 and xs.shape[1:] in (self.shape, self.compact_shape):
            xs = xs.reshape((xs.shape[0], *self.shape))
        else:
            raise self._fail(f"got shape {xs.shape} (a batch is (N, *shape) with N >= 1)")
        return self._values(xs)


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskInfo:
    """A task as a device sees it (see the module docstring): a built-in one's in
    :data:`TASK_INFO`, an app's own on its task (``info = TaskInfo(...)``, a class attribute of
    its factory) or named by its import path itself (:func:`edge_sdk.tasks.resolve_task`)."""

    name: str
    """Registry name (``get_task(name)``); for an app's task, a name of its own (not a built-in's)."""
    factory: str = ""
    """The torch task that implements it, ``"module.path:ClassName"`` (imported only when asked
    for: :func:`edge_sdk.tasks.get_task`; a ``[device]`` install serves :class:`DeclaredTask`).
    Left empty on a factory's own ``info``: the factory named is the one."""
    task_name: str
    """The task object's ``name`` (what its updates and logs say)."""
    model_id: str
    sample_kind: SampleKind
    n_classes: int
    min_samples: int
    """The default D_min: labelled samples before the first training pull."""
    contract: InputContract | None
    """None for frames (any size; boxes say where the objects are)."""
    class_names: tuple[str, ...] = ()
    train_extra: str = "train"
    """What local training needs installed."""
    train: TrainConfig | None = None
    """The task's own local-training defaults (None: the generic :class:`TrainConfig` values)."""
    notes: dict[str, str] = field(default_factory=dict)
    graphs: str | Path | None = None
    """The folder of the task's ``<model_id>.spec.json``, ``<model_id>.onnx`` and (for
    classifier-only rounds) ``<model_id>.features.onnx``, as ``python -m edge_sdk.tasks.registry
    --write-graphs --task REF --out DIR`` writes them: what a device without torch serves and
    trains the head with. None: the built-in :data:`GRAPHS_DIR` (an app's task without them
    needs ``[train]``, which exports its graph on first use). An absolute path (ConfigError
    otherwise): a relative one would be read from whatever directory the app was started in;
    ``Path(__file__).resolve().parent / "graphs"`` names the folder beside the declaring module."""

    def __post_init__(self) -> None:
        # A TaskInfo is a value (copied with replace(), a factory's class attribute, an entry
        # point's re-export): which module it belongs to is not knowable, so no anchor but "/".
        if self.graphs is not None and not Path(self.graphs).is_absolute():
            raise ConfigError(f"task {self.name!r}: graphs={str(self.graphs)!r} is a relative path, which would be "
                              "read from the directory the app is started in; give an absolute one, e.g. "
                              "graphs=Path(__file__).resolve().parent / \"graphs\" for the folder beside the module "
                              "that declares it")

    @property
    def graphs_dir(self) -> Path:
        return GRAPHS_DIR if self.graphs is None else Path(self.graphs)

    @property
    def input_shape(self) -> tuple[int, ...]:
        if self.contract is None:
            raise ConfigError(f"{self.name}: frames have no fixed input shape")
        return self.contract.shape

    @property
    def spec(self) -> ModelSpec:
        return declared_spec(self.model_id, self.graphs_dir)


TASK_INFO: dict[str, TaskInfo] = {
    "digits": TaskInfo(
        name="digits",
        factory="edge_sdk.tasks.digits:DigitsTask",
        task_name="digits",
        model_id="digits-cnn",
        sample_kind="array",
        n_classes=10,
        min_samples=8,
        contract=InputContract(
            task="digits", shape=(1, 8, 8), value_range=(0.0, 1.0),
            hint="scikit-learn's 0-16 pixel counts divided by 16",
        ),
        class_names=tuple(str(d) for d in range(10)),
    ),
    "gestures": TaskInfo(
        name="gestures",
        factory="edge_sdk.tasks.gestures:GestureTask",
        task_name="gestures",
        model_id="gesture-cnn1d",
        sample_kind="gesture",
        n_classes=8,
        min_samples=16,
        contract=InputContract(
            # The range refuses raw screen or sensor units (pixel coordinates: hundreds) and
            # absurd values that would turn the model's weights into NaN at the first round;
            # positions within ±4 keep velocities (8 x steps) inside it.
            task="gestures", shape=(32, 4), value_range=(-64.0, 64.0), range_is_a_guard=True,
            hint="32 steps of x, y in about [-1.5, 1.5] and 8 x their per-step differences (the step before the first: 0)",
        ),
        class_names=(
            "swipe_left", "swipe_right", "swipe_up", "swipe_down",
            "circle_cw", "circle_ccw", "zigzag", "check_mark",
        ),
    ),
    "procdigits": TaskInfo(
        name="procdigits",
        factory="edge_sdk.tasks.procdigits:ProcDigitsTask",
        task_name="procdigits",
        model_id="procdigits-lenet5",
        sample_kind="array",
        n_classes=10,
        min_samples=8,
        contract=InputContract(
            task="procdigits", shape=(1, 28, 28), value_range=(0.0, 1.0),
            hint="28x28 MNIST-style 0-255 pixels divided by 255",
        ),
        class_names=tuple(str(d) for d in range(10)),
    ),
    "detection": TaskInfo(
        name="detection",
        factory="edge_sdk.tasks.detection:DetectionTask",
        task_name="yolov8n-detection",
        model_id="yolov8n-detection",
        sample_kind="frame",
        n_classes=5,
        min_samples=64,  # the paper's D_min for YOLOv8
        contract=None,
        class_names=("circle", "square", "triangle", "cross", "star"),
        train_extra="detection",
        # SPIN's E = 5; AdamW at 1e-3 (the generic lr of 0.05 destroys a YOLO in one update)
        train=TrainConfig(epochs=5, batch_size=16, lr=1e-3),
    ),
}
"""Tasks by registry name. Adding a task: its module in ``edge_sdk/tasks/`` and its entry here;
``python -m edge_sdk.tasks.registry --write-graphs`` then makes the ONNX graphs and spec a
``[device]`` install serves it with (without them such a device says which file is missing)."""


def task_info(task: str | Any) -> TaskInfo | None:
    """The declaration of a registry name, a task's ``name``, a task reference
    (``package.module:Name`` or an ``edgeci.tasks`` entry point: :func:`edge_sdk.tasks.resolve_task`,
    which imports it), or a task object (its own ``info``, else its name's); None for tasks
    declared nowhere (an app's own ``Task`` object without ``info``)."""
    if not isinstance(task, str):
        own = getattr(task, "info", None)
        if isinstance(own, TaskInfo):
            return own
    name = task if isinstance(task, str) else getattr(task, "name", None)
    if name in TASK_INFO:
        return TASK_INFO[name]
    found = next((info for info in TASK_INFO.values() if info.task_name == name), None)
    if found is None and isinstance(task, str) and task:
        from edge_sdk.tasks import entry_point_task, resolve_task

        if ":" in task or entry_point_task(task) is not None:
            return resolve_task(task)
    return found


def sample_kind_of(task: Any) -> SampleKind:
    """What a task's samples are: its own ``sample_kind``, else its declaration here, else
    ``"array"`` (see :class:`~edge_sdk.tasks.base.Task`)."""
    declared = getattr(task, "sample_kind", None)
    if declared is None:
        info = task_info(task)
        declared = info.sample_kind if info is not None else "array"
    if declared not in ("array", "frame", "gesture"):
        raise ConfigError(f"task {getattr(task, 'name', task)!r} declares an unknown sample kind {declared!r}")
    kind: SampleKind = declared
    return kind


def default_min_samples(task: str | Any, fallback: int = 16) -> int:
    """The task's declared D_min (``fallback`` for undeclared tasks)."""
    info = task_info(task)
    return info.min_samples if info is not None else fallback


def default_train_config(task: str | Any, fallback: TrainConfig | None = None) -> TrainConfig:
    """The task's own local-training defaults: its ``default_train`` attribute, else its
    declaration here, else ``fallback`` (default: the generic :class:`TrainConfig`)."""
    own = None if isinstance(task, str) else getattr(task, "default_train", None)
    if isinstance(own, TrainConfig):
        return own
    info = task_info(task)
    if info is not None and info.train is not None:
        return info.train
    return fallback if fallback is not None else TrainConfig()


def input_contract(task: Any) -> InputContract:
    """The contract of a task object: its declaration when the shapes agree, else its own
    ``input_shape`` with no value range and any numeric dtype (an app's own task), else —
    for a task that declares neither — the shape of its test split."""
    info = task_info(task)
    shape = getattr(task, "input_shape", None)
    if (
        info is not None
        and info.contract is not None
        and (shape is None or tuple(shape) == info.contract.shape)
    ):
        return info.contract
    if shape is None:
        shape = task.data().test.x.shape[1:]
    return InputContract(task=str(getattr(task, "name", "task")), shape=tuple(int(d) for d in shape),
                         floats_only=False)


@cache
def declared_spec(model_id: str, graphs: Path = GRAPHS_DIR) -> ModelSpec:
    """The spec shipped as ``graphs/<model_id>.spec.json`` (written from the torch model; an
    app's task: in its TaskInfo's ``graphs`` folder)."""
    path = graphs / f"{model_id}.spec.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        spec = ModelSpec.from_dict(meta["spec"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        hint = "" if graphs == GRAPHS_DIR else (" (write it with `python -m edge_sdk.tasks.registry --write-graphs "
                                                f"--task REF --out {graphs}` where torch is installed)")
        raise ConfigError(f"no spec for {model_id!r} ({path}): {exc}{hint}") from exc
    if spec.model_id != model_id:
        raise ConfigError(f"{path} holds the spec of {spec.model_id!r}, not {model_id!r}")
    return spec


class DeclaredTask:
    """A built-in task without its torch half: what a ``[device]`` install runs.

    It has the task's name, spec, input contract and class count, so the SDK can store,
    label and serve (with the shipped ONNX graph). In classifier-only rounds
    (``config.group == "classifier"``) it trains the linear head in numpy on features from
    the shipped extractor graph (:mod:`edge_sdk.tasks.linear_head`); full training,
    pretraining and the dataset raise :class:`~edge_sdk.errors.MissingExtra` naming the
    extra that provides them.
    """

    def __init__(self, info: TaskInfo) -> None:
        self.info = info
        self.name = info.task_name
        self.spec = info.spec
        self.n_classes = info.n_classes
        self.sample_kind: SampleKind = info.sample_kind
        self._features_template: Any = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.info.input_shape

    def _unavailable(self, what: str) -> Exception:
        module = "ultralytics" if self.info.train_extra == "detection" else "torch"
        return missing(module, self.info.train_extra, purpose=f"{what} ({self.info.name})")

    def data(self) -> TaskData:
        raise self._unavailable("the task's dataset")

    def pretrained(self, *, seed: int = 0) -> Vector:
        raise self._unavailable("pretraining")

    def local_update(
        self, weights: Vector, x: npt.NDArray[Any], y: npt.NDArray[np.int64], config: TrainConfig
    ) -> TrainResult:
        """Classifier-only rounds: the head fitted in numpy, every other value of ``weights``
        returned bit-identical. Other rounds need ``[train]`` (:class:`MissingExtra`)."""
        if config.group != CLASSIFIER or self.info.contract is None:
            raise self._unavailable(f"training group {config.group!r}")
        started = perf_counter()
        self.spec.check(weights)
        try:
            layout = HeadLayout.of(self.spec, CLASSIFIER)
        except ConfigError as exc:  # an app's head of several layers: torch trains it, numpy fits one
            raise self._unavailable(f"training a classifier group that is not one linear layer ({exc})") from exc
        xs = self.info.contract.batch(x)
        ys = np.asarray(y)
        if ys.ndim != 1 or ys.shape[0] != xs.shape[0] or not np.issubdtype(ys.dtype, np.integer):
            raise InvalidSample(f"{self.name}: y must be {xs.shape[0]} integer labels, got {ys.dtype}{ys.shape}")
        head_w, head_b, loss = fit_head(
            self.features(weights, xs),
            ys.astype(np.int64, copy=False),
            weights[layout.weight].reshape(layout.n_classes, layout.feature_dim),
            weights[layout.bias],
            epochs=config.epochs,
            batch_size=config.batch_size,
            lr=config.lr,
            seed=config.seed,
        )
        updated = weights.copy()
        updated[layout.weight] = head_w.reshape(-1)
        updated[layout.bias] = head_b
        return TrainResult(
            weights=updated,
            n_samples=int(ys.shape[0]),
            loss=loss,
            seconds=perf_counter() - started,
            extra={"device": "numpy", "group": CLASSIFIER},
        )

    def features_problem(self) -> str | None:
        """Why :meth:`features` cannot run here (None: it can): frames, an extractor group that
        does not come first, or no ``<model_id>.features.onnx`` in the graphs folder."""
        if self.info.contract is None:
            return "features of frames"
        if EXTRACTOR not in self.spec.group_slices or self.spec.group_slice(EXTRACTOR).start != 0:
            return "features of a model whose extractor group does not come first"  # (or it has none)
        path = self.info.graphs_dir / f"{self.spec.model_id}.features.onnx"
        if not path.is_file():  # (an app's: its TaskInfo's graphs folder, as it names it)
            hint = "" if self.info.graphs_dir == GRAPHS_DIR else (
                " (written by `python -m edge_sdk.tasks.registry --write-graphs --task REF`)")
            return f"features without the extractor graph {path}{hint}"
        return None

    def features(self, weights: Vector, x: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        """The extractor's output z = h(x, φ) for a batch, by onnxruntime on the shipped
        ``<model_id>.features.onnx`` with the extractor slice of ``weights``."""
        import onnxruntime as ort

        from edge_sdk.inference import FEATURES_NAME, INPUT_NAME, OnnxTemplate

        self.spec.check(weights)
        if self.info.contract is None:
            raise self._unavailable("features of frames")
        xs = self.info.contract.batch(x)
        if self._features_template is None:
            problem = self.features_problem()
            if problem is not None:
                raise self._unavailable(problem)
            path = self.info.graphs_dir / f"{self.spec.model_id}.features.onnx"
            entries = [(p.name, p.shape, p.group) for p in self.spec.params if p.group == EXTRACTOR]
            self._features_template = OnnxTemplate(path.read_bytes(), ModelSpec.build(self.spec.model_id, entries))
        extractor = self.spec.group_slice(EXTRACTOR)
        model = self._features_template.patched(np.ascontiguousarray(weights[extractor]))
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.log_severity_level = 3
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        (z,) = session.run([FEATURES_NAME], {INPUT_NAME: xs})
        return np.asarray(z, dtype=np.float32)

    def evaluate(self, weights: Vector, split: Split | None = None) -> dict[str, float]:
        raise self._unavailable("evaluation")


def write_graphs(out: Path | None = GRAPHS_DIR, names: tuple[str, ...] | None = None) -> list[Path]:
    """Export each task's graph (zeros as weights) and spec from torch into ``out`` (``names``:
    every task in :data:`TASK_INFO`, or any task reference :func:`edge_sdk.tasks.resolve_task`
    takes, an app's own ``package.module:Name`` included); ``out=None``: each task's own
    ``graphs`` folder (an app's TaskInfo names it). A task of frames ships its spec only (detection has its own exporter).
    Needs ``[train]``."""
    from edge_sdk.inference import (
        OPSET,
        OnnxTemplate,
        export_features_onnx,
        export_onnx,
        with_weights,
    )
    from edge_sdk.tasks import get_task, resolve_task

    written = []
    for name in TASK_INFO if names is None else names:
        info = resolve_task(name)
        task: Any = get_task(name)
        folder = info.graphs_dir if out is None else out
        folder.mkdir(parents=True, exist_ok=True)
        params = ",\n".join(json.dumps(entry) for entry in task.spec.to_dict()["params"])
        text = (
            f'{{"model_id": {json.dumps(info.model_id)}, "opset": {OPSET}, "spec": {{\n'
            f'"model_id": {json.dumps(task.spec.model_id)}, "params": [\n{params}\n]}}}}\n'
        )
        if info.sample_kind != "frame":
            # Export with real weights (the exporter folds away all-zero biases), ship zeros.
            weights = task.initial_weights(seed=0) if hasattr(task, "initial_weights") else task.pretrained(seed=0)
            proto = export_onnx(task, weights)
            graph = folder / f"{info.model_id}.onnx"
            graph.write_bytes(with_weights(proto, task.spec, task.spec.zeros()))
            written.append(graph)
        if info.sample_kind != "frame" and any(p.group == EXTRACTOR for p in task.spec.params):
            # The extractor alone (output "features"), for head-only training without torch.
            extractor = [(p.name, p.shape, p.group) for p in task.spec.params if p.group == EXTRACTOR]
            ext_spec = ModelSpec.build(task.spec.model_id, extractor)
            features = export_features_onnx(task, weights).SerializeToString()
            graph = folder / f"{info.model_id}.features.onnx"
            graph.write_bytes(OnnxTemplate(features, ext_spec).patched(ext_spec.zeros()))
            written.append(graph)
        sidecar = folder / f"{info.model_id}.spec.json"
        sidecar.write_text(text, encoding="utf-8")
        written.append(sidecar)
    return written


def _entry_points() -> dict[str, list[str]]:
    """The installed ``edgeci.tasks`` entry points: name -> each ``value, from <distribution>``
    declaring it (several: :func:`edge_sdk.tasks.resolve_task` refuses the name)."""
    from importlib import metadata

    from edge_sdk.tasks import ENTRY_POINT_GROUP

    found: dict[str, list[str]] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist
        where = "an unnamed distribution" if dist is None else f"{dist.metadata['Name']} {dist.version}"
        found.setdefault(ep.name, []).append(f"{ep.value}, from {where}")
    return found


def _origin(ref: str, info: TaskInfo, entry_points: dict[str, list[str]]) -> str:
    """Where the declaration ``ref`` resolved to came from: the built-in registry, an import path
    or an entry point (the distribution that installed it), and the module file that holds it."""
    import sys

    from edge_sdk.tasks import ENTRY_POINT_GROUP, _builtin

    if _builtin(ref) is not None:
        return "built-in: edge_sdk.tasks.registry.TASK_INFO"
    if ":" in ref:
        source, module = f"import path {ref}", ref.partition(":")[0]
    else:  # (resolved: exactly one entry point of this name, whose value is an import path)
        declared = entry_points.get(ref, ["?"])
        source, module = f"{ENTRY_POINT_GROUP} entry point {ref} = {declared[0]}", declared[0].partition(":")[0]
    path = getattr(sys.modules.get(module), "__file__", None)
    return f"{source}; module {module}" + (f" ({path})" if path else "")


def _summary(info: TaskInfo) -> str:
    shape = info.contract.describe() if info.contract else "frames with boxes"
    return f"{shape}; {info.n_classes} classes; D_min {info.min_samples}"


def _details(ref: str, info: TaskInfo, entry_points: dict[str, list[str]]) -> list[str]:
    """One task's declaration, a line a field (``--task REF``)."""
    train = info.train
    files = [f"{info.model_id}{ext}" for ext in (".spec.json", ".onnx", ".features.onnx")
             if ext == ".spec.json" or info.sample_kind != "frame"]
    folder = info.graphs_dir
    present = [f for f in files if (folder / f).is_file()]
    lacking = [f for f in files if f not in present]
    graphs = f"{folder}: " + (", ".join(present) if present else "none")
    if lacking:
        graphs += f"; missing {', '.join(lacking)} (`python -m edge_sdk.tasks.registry --write-graphs --task {ref}`)"
    lines = [
        f"{ref}",
        f"  from         {_origin(ref, info, entry_points)}",
        f"  name         {info.name} (its task objects' name {info.task_name!r})",
        f"  factory      {info.factory} (training needs edgeci[{info.train_extra}])",
        f"  model id     {info.model_id}",
        f"  samples      {info.sample_kind}: "
        + (info.contract.describe() if info.contract else "frames with boxes"),
        f"  classes      {info.n_classes}" + (f": {', '.join(info.class_names)}" if info.class_names else ""),
        f"  D_min        {info.min_samples}",
        "  training     " + ("the generic defaults" if train is None else
                            f"epochs {train.epochs}, batch size {train.batch_size}, lr {train.lr:g}"),
        f"  graphs       {graphs}",
    ]
    lines += [f"  {key:<12} {value}" for key, value in info.notes.items()]
    return lines


def main(argv: list[str] | None = None) -> None:
    """List the tasks (the built-in ones and the installed ``edgeci.tasks`` entry points, each
    with where it came from), show one task's declaration (``--task REF``), or write graphs."""
    import sys

    from edge_sdk.tasks import _builtin, resolve_task

    parser = argparse.ArgumentParser(prog="python -m edge_sdk.tasks.registry",
                                     description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--write-graphs", action="store_true", help="rebuild graphs/ from torch")
    parser.add_argument("--task", action="append", metavar="REF",
                        help="only this task (repeatable; a built-in name or model id, an app's package.module:Name "
                        "or edgeci.tasks entry point): without --write-graphs, its declaration and where it came from")
    parser.add_argument("--out", type=Path, help="with --write-graphs: the folder to write (default: each task's own, "
                        "its TaskInfo's graphs; the built-in tasks': edge_sdk/tasks/graphs)")
    args = parser.parse_args(argv)
    if args.write_graphs:
        for path in write_graphs(args.out, tuple(args.task) if args.task else None):  # (None: each task's graphs)
            print(path, path.stat().st_size, "bytes")
        return
    entry_points = _entry_points()
    if args.task:
        for i, ref in enumerate(args.task):
            try:
                info = resolve_task(ref)
            except ConfigError as exc:  # (MissingExtra included) a reference that does not resolve: a usage error
                parser.exit(2, f"{parser.prog}: error: {exc}\n")
            print(("\n" if i else "") + "\n".join(_details(ref, info, entry_points)))
        return
    for info in TASK_INFO.values():
        print(f"{info.name}: {_summary(info)} (built-in: {info.factory})")
    failed = 0
    for name in sorted(entry_points):
        origin = f"entry point {name} = {'; '.join(entry_points[name])}"
        builtin = _builtin(name)
        if builtin is not None:  # resolve_task takes the built-in: the entry point can never be named
            failed += 1
            print(f"{name}: ignored, the built-in task {builtin.name!r} has this name ({origin})")
            continue
        try:
            declared = resolve_task(name)
        except Exception as exc:  # the app's module runs on import and may raise anything: say it, list the rest
            failed += 1
            print(f"{name}: not loaded: {type(exc).__name__}: {exc} ({origin})")
            continue
        print(f"{name}: {_summary(declared)} ({origin})")
    if failed:
        print(f"{failed} edgeci.tasks entry point(s) not usable", file=sys.stderr)
        raise SystemExit(1)

if __name__ == "__main__":
    main()
