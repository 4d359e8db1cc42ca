"""ONNX graphs of a task's model and onnxruntime inference with hot-swappable versions.

A new *version* changes only numbers, never the graph. So each architecture has one
*template* — a serialized ONNX graph whose initializers hold the weights — and a version
is made by writing its weights over the template's initializer bytes (one ~60 KB copy)
and opening a session on the result (~1 ms for the tiny models): about a thousand times
cheaper than re-exporting through torch (~1 s; ``benchmarks/inference_latency.py``).

Where a template comes from:

* **shipped** — the built-in tasks' graphs are exported once by the project and ship with
  the SDK (``edge_sdk/tasks/graphs/<model_id>.onnx``, zeros as weights, next to the spec
  they were exported from). A ``[device]`` install serves with them: no torch, no onnx
  package; the initializers are found by walking the protobuf wire format (below).
  ``tests/test_inference.py`` proves each shipped graph computes what the torch module
  computes, and ``python -m edge_sdk.tasks.registry --write-graphs`` rebuilds them.
* **exported** — any other task with a ``module_for(weights)`` (needs ``[train]``): exported
  through torch once per process and architecture.

Overriding initializers through ``SessionOptions.add_initializer`` instead gave outputs
that disagreed with torch in onnxruntime 1.32 (max |Δlogit| 0.1 on digits), so the bytes
themselves are patched.

:class:`InferenceEngine` serves ``predict`` from whatever version it holds and
``swap``s to a newer one by building the new session aside and then replacing one
reference, so an in-flight ``predict`` finishes on the session it started with and no
call ever waits for, or fails because of, a swap.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from edge_sdk._extras import require
from edge_sdk.errors import ConfigError, InvalidSample, LocalProtocolError
from edge_sdk.spec import ModelSpec, Vector
from edge_sdk.tasks.registry import GRAPHS_DIR, task_info

if TYPE_CHECKING:
    import onnx
    from torch import nn

__all__ = [
    "FEATURES_NAME",
    "GRAPHS_DIR",
    "INPUT_NAME",
    "OPSET",
    "OUTPUT_NAME",
    "ExportableTask",
    "InferenceEngine",
    "OnnxTemplate",
    "Prediction",
    "ServableTask",
    "export_onnx",
    "onnx_template",
    "shipped_template",
    "with_weights",
]

OPSET = 18
INPUT_NAME = "x"
OUTPUT_NAME = "logits"

_FLOAT = 1  # onnx.TensorProto.FLOAT


class ServableTask(Protocol):
    """What serving needs from a task: its spec and the shape of one input sample."""

    spec: ModelSpec

    @property
    def input_shape(self) -> tuple[int, ...]: ...


class ExportableTask(ServableTask, Protocol):
    """A task that can also build a torch module holding given weights (for export)."""

    def module_for(self, weights: Vector) -> nn.Module: ...


def export_onnx(task: ExportableTask, weights: Vector, *, opset: int = OPSET) -> onnx.ModelProto:
    """Export ``task``'s model holding ``weights`` with a dynamic batch dimension (needs
    ``[train]``: torch, onnx, onnxscript).

    Uses the torch.export-based exporter (``dynamo=True``): in torch 2.14 the TorchScript
    exporter raises a DeprecationWarning, which ``filterwarnings = error`` turns into a
    failure. Initializers keep the module's parameter names, which patching relies on.
    """
    torch = require("torch", purpose="exporting a model to ONNX")
    require("onnxscript", "train", purpose="exporting a model to ONNX")
    module = task.module_for(weights)
    example = torch.zeros((1, *task.input_shape), dtype=torch.float32)
    program = torch.onnx.export(
        module,
        (example,),
        dynamo=True,
        opset_version=opset,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        external_data=False,
        verbose=False,
    )
    if program is None:  # the signature allows it for the legacy exporter only
        raise LocalProtocolError("torch.onnx.export returned no program")
    proto: onnx.ModelProto = program.model_proto
    return proto


FEATURES_NAME = "features"


def export_features_onnx(task: ExportableTask, weights: Vector, *, opset: int = OPSET) -> onnx.ModelProto:
    """Export the extractor half of a split model (``extractor``/``classifier`` groups) with
    the features z = h(x, φ) as output ``features``: what a ``[device]`` install runs to train
    the classifier head in numpy. Initializers keep the full model's parameter names."""
    require("torch", purpose="exporting a model to ONNX")
    require("onnxscript", "train", purpose="exporting a model to ONNX")
    import torch
    from torch import nn as torch_nn

    split = task.module_for(weights)

    class Features(torch_nn.Module):
        def __init__(self, extractor: torch_nn.Module) -> None:
            super().__init__()
            self.extractor = extractor  # same attribute name: same initializer names

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.extractor(x)
            return out

    example = torch.zeros((1, *task.input_shape), dtype=torch.float32)
    program = torch.onnx.export(
        Features(split.get_submodule("extractor")).eval(),
        (example,),
        dynamo=True,
        opset_version=opset,
        input_names=[INPUT_NAME],
        output_names=[FEATURES_NAME],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        external_data=False,
        verbose=False,
    )
    if program is None:
        raise LocalProtocolError("torch.onnx.export returned no program")
    proto: onnx.ModelProto = program.model_proto
    return proto


# --------------------------------------------------------------------------- wire walking


def _varint(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ConfigError("not an ONNX model: truncated protobuf varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes | memoryview, start: int, stop: int) -> list[tuple[int, int, int, int]]:
    """``(field number, wire type, value or payload start, payload stop)`` of one message
    in ``buf[start:stop]`` (protobuf wire format; groups are not used by ONNX)."""
    out: list[tuple[int, int, int, int]] = []
    pos = start
    while pos < stop:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            out.append((number, wire, value, pos))
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > stop:
                raise ConfigError("not an ONNX model: a field runs past its message")
            out.append((number, wire, pos, pos + length))
            pos += length
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            out.append((number, wire, pos, pos + size))
            pos += size
        else:
            raise ConfigError(f"not an ONNX model: protobuf wire type {wire}")
    if pos != stop:
        raise ConfigError("not an ONNX model: a field runs past its message")
    return out


@dataclass(frozen=True, slots=True)
class _Initializer:
    dims: tuple[int, ...]
    data_type: int
    raw: tuple[int, int] | None
    """Byte span of ``raw_data`` in the serialized model, if the tensor keeps it there."""


def _initializers(model: bytes) -> dict[str, _Initializer]:
    """The graph initializers of a serialized ``ModelProto``, by name (ModelProto.graph = 7,
    GraphProto.initializer = 5; TensorProto dims = 1, data_type = 2, name = 8, raw_data = 9)."""
    view = memoryview(model)
    found: dict[str, _Initializer] = {}
    for number, wire, start, stop in _fields(view, 0, len(model)):
        if number != 7 or wire != 2:
            continue
        for g_number, g_wire, g_start, g_stop in _fields(view, start, stop):
            if g_number != 5 or g_wire != 2:
                continue
            dims: list[int] = []
            data_type = 0
            name = ""
            raw: tuple[int, int] | None = None
            for t_number, t_wire, t_start, t_stop in _fields(view, g_start, g_stop):
                if t_number == 1 and t_wire == 0:
                    dims.append(t_start)
                elif t_number == 1 and t_wire == 2:  # packed dims
                    pos = t_start
                    while pos < t_stop:
                        dim, pos = _varint(view, pos)
                        dims.append(dim)
                elif t_number == 2 and t_wire == 0:
                    data_type = t_start
                elif t_number == 8 and t_wire == 2:
                    name = bytes(view[t_start:t_stop]).decode("utf-8", "replace")
                elif t_number == 9 and t_wire == 2:
                    raw = (t_start, t_stop)
            found[name] = _Initializer(dims=tuple(dims), data_type=data_type, raw=raw)
    return found


class OnnxTemplate:
    """A serialized graph plus where each of ``spec``'s parameters sits in its bytes.

    ``patchable`` is False when the graph does not keep every parameter as a float32
    ``raw_data`` initializer of the spec's name and shape (an exporter renamed, reshaped or
    folded one): then every version needs a real export.
    """

    def __init__(self, model: bytes, spec: ModelSpec) -> None:
        self.model = bytes(model)
        self.spec = spec
        inits = _initializers(self.model)
        spans: dict[str, tuple[int, int]] = {}
        for p in spec.params:
            init = inits.get(p.name)
            if (
                init is None
                or init.raw is None
                or init.dims != p.shape
                or init.data_type != _FLOAT
                or init.raw[1] - init.raw[0] != 4 * p.size
            ):
                break
            spans[p.name] = init.raw
        else:
            self._spans: dict[str, tuple[int, int]] | None = spans
            return
        self._spans = None

    @property
    def patchable(self) -> bool:
        return self._spans is not None

    def patched(self, weights: Vector) -> bytes:
        """The model with ``weights`` (checked against the spec) as its initializers."""
        if self._spans is None:
            raise ConfigError(f"{self.spec.model_id}: ONNX initializers do not match the spec")
        self.spec.check(weights)
        out = bytearray(self.model)
        little = weights.astype("<f4", copy=False)
        for p in self.spec.params:
            start, stop = self._spans[p.name]
            out[start:stop] = little[p.offset : p.offset + p.size].tobytes()
        return bytes(out)


def with_weights(template: onnx.ModelProto, spec: ModelSpec, weights: Vector) -> bytes:
    """Serialized ONNX model: ``template``'s graph with ``weights`` as its initializers."""
    return OnnxTemplate(template.SerializeToString(), spec).patched(weights)


def shipped_template(spec: ModelSpec, *, opset: int = OPSET, graphs: Path = GRAPHS_DIR) -> bytes | None:
    """The shipped graph of ``spec``'s architecture (``graphs/<model_id>.onnx``: the built-in
    tasks' by default, an app's task's in its TaskInfo's ``graphs`` folder), or None when none
    ships for exactly this spec (same model id and layout) and opset."""
    graph = graphs / f"{spec.model_id}.onnx"
    sidecar = graphs / f"{spec.model_id}.spec.json"
    if not graph.is_file() or not sidecar.is_file():
        return None
    meta = json.loads(sidecar.read_text(encoding="utf-8"))
    if int(meta.get("opset", -1)) != opset:
        return None
    if ModelSpec.from_dict(meta["spec"]).fingerprint != spec.fingerprint:
        return None
    return graph.read_bytes()


_exports: dict[tuple[str, str, int], onnx.ModelProto] = {}
_templates: dict[tuple[str, str, int], OnnxTemplate] = {}
_templates_lock = threading.Lock()


def onnx_template(task: ExportableTask, weights: Vector, *, opset: int = OPSET) -> onnx.ModelProto:
    """The torch export of ``task``'s architecture, exported once per process (keyed by
    model id, spec fingerprint and opset) — a fleet of engines shares one export."""
    key = (task.spec.model_id, task.spec.fingerprint, opset)
    with _templates_lock:
        cached = _exports.get(key)
        if cached is None:
            cached = _exports[key] = export_onnx(task, weights, opset=opset)
    return cached


def _template(task: ServableTask, weights: Vector, opset: int) -> OnnxTemplate:
    """The shipped graph for this spec if there is one, else the torch export."""
    key = (task.spec.model_id, task.spec.fingerprint, opset)
    with _templates_lock:
        cached = _templates.get(key)
    if cached is not None:
        return cached
    info = task_info(task)
    graphs = info.graphs_dir if info is not None else GRAPHS_DIR
    model = shipped_template(task.spec, opset=opset, graphs=graphs)
    if model is None:
        if not hasattr(task, "module_for"):
            raise ConfigError(
                f"no shipped ONNX graph for {task.spec.model_id!r} (in {graphs}) and the task cannot export one"
            )
        model = onnx_template(task, weights, opset=opset).SerializeToString()  # type: ignore[arg-type]
    template = OnnxTemplate(model, task.spec)
    with _templates_lock:
        return _templates.setdefault(key, template)


@dataclass(frozen=True, slots=True, kw_only=True)
class Prediction:
    version: int
    probabilities: npt.NDArray[np.float32]
    """(N, n_classes) softmax of the logits."""
    labels: npt.NDArray[np.int64]
    """(N,) argmax class."""


@dataclass(frozen=True, slots=True, kw_only=True)
class _Deployed:
    version: int
    session: ort.InferenceSession


def _softmax(logits: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    probabilities: npt.NDArray[np.float32] = (exp / exp.sum(axis=1, keepdims=True)).astype(
        np.float32
    )
    return probabilities


class InferenceEngine:
    """onnxruntime inference of one task's model, hot-swappable between versions.

    ``predict`` reads the current deployment once and never locks; ``swap`` builds the new
    session first and publishes it with one reference assignment. Versions only grow: a
    swap to a version not newer than the current one is ignored (a duplicate QoS 1
    delivery, or a late message), and a swap that fails leaves the current version serving.
    """

    def __init__(
        self,
        task: ServableTask,
        weights: Vector,
        *,
        version: int = 0,
        threads: int = 1,
        providers: Sequence[str] | None = None,
        opset: int = OPSET,
    ) -> None:
        if threads < 1:
            raise ConfigError(f"threads must be >= 1, got {threads}")
        self._task = task
        self._spec = task.spec
        self._input_shape = tuple(task.input_shape)
        self._opset = opset
        self._providers = list(providers) if providers else ["CPUExecutionProvider"]
        self._options = ort.SessionOptions()
        self._options.intra_op_num_threads = threads
        self._options.inter_op_num_threads = 1
        self._options.log_severity_level = 3  # errors only: ORT's info lines are noise here
        self._swap_lock = threading.Lock()
        self._template = _template(task, self._spec.check(weights), opset)
        self._deployed = _Deployed(version=version, session=self._session(weights))

    @property
    def version(self) -> int:
        return self._deployed.version

    def _session(self, weights: Vector) -> ort.InferenceSession:
        if self._template.patchable:
            model = self._template.patched(weights)
        else:  # slow path: the exporter transformed a parameter, so export this version
            task: Any = self._task
            model = export_onnx(task, weights, opset=self._opset).SerializeToString()
        return ort.InferenceSession(model, self._options, providers=self._providers)

    def swap(self, version: int, weights: Vector) -> bool:
        """Serve ``weights`` as ``version`` from now on; False if it is not newer than
        the current version (nothing changes). Invalid weights raise and change nothing."""
        self._spec.check(weights)
        with self._swap_lock:  # serialises swaps only; predict never takes it
            if version <= self._deployed.version:
                return False
            session = self._session(weights)
            self._deployed = _Deployed(version=version, session=session)
        return True

    def _batch(self, x: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        xs = np.asarray(x)
        if xs.shape == self._input_shape:
            xs = xs[None]
        if (
            xs.ndim != len(self._input_shape) + 1
            or xs.shape[1:] != self._input_shape
            or xs.shape[0] == 0
        ):
            raise InvalidSample(
                f"x must have shape (N, {self._input_shape}) or {self._input_shape}, got {xs.shape}"
            )
        if not np.issubdtype(xs.dtype, np.floating):
            raise InvalidSample(f"x must be floating point, got {xs.dtype}")
        return np.ascontiguousarray(xs, dtype=np.float32)

    def logits_with_version(self, x: npt.NDArray[Any]) -> tuple[int, npt.NDArray[np.float32]]:
        """Raw model outputs (N, n_classes) and the version that produced them."""
        xs = self._batch(x)
        deployed = self._deployed  # one read: the whole call uses this version
        (logits,) = deployed.session.run([OUTPUT_NAME], {INPUT_NAME: xs})
        return deployed.version, np.asarray(logits, dtype=np.float32)

    def logits(self, x: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        """Raw model outputs (N, n_classes) for one sample or a batch."""
        return self.logits_with_version(x)[1]

    def predict(self, x: npt.NDArray[Any]) -> Prediction:
        """Class probabilities and labels for one sample (as a batch of 1) or a batch."""
        version, logits = self.logits_with_version(x)
        return Prediction(
            version=version,
            probabilities=_softmax(logits),
            labels=logits.argmax(axis=1).astype(np.int64),
        )
