"""ONNX export of a task's model and onnxruntime inference with hot-swappable versions.

Exporting through torch costs ~1 s per model (torch.export + ONNX translation), but a new
*version* changes only numbers, never the graph. So a model is exported once per
architecture (cached by model id and spec fingerprint) and each version is made by writing
its weights into the graph's initializers (~0.3 ms) and opening a session on the bytes
(~1 ms for the tiny models): about a thousand times cheaper than re-exporting
(``benchmarks/inference_latency.py``). Overriding initializers through
``SessionOptions.add_initializer`` instead gave outputs that disagreed with torch in
onnxruntime 1.32, so the proto itself is patched.

:class:`InferenceEngine` serves ``predict`` from whatever version it holds and
``swap``s to a newer one by building the new session aside and then replacing one
reference, so an in-flight ``predict`` finishes on the session it started with and no
call ever waits for, or fails because of, a swap.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import torch
from torch import nn

from edge_sdk.errors import ConfigError, InvalidSample, LocalProtocolError
from edge_sdk.spec import ModelSpec, Vector

__all__ = [
    "INPUT_NAME",
    "OPSET",
    "OUTPUT_NAME",
    "ExportableTask",
    "InferenceEngine",
    "Prediction",
    "export_onnx",
    "onnx_template",
    "with_weights",
]

OPSET = 18
INPUT_NAME = "x"
OUTPUT_NAME = "logits"


class ExportableTask(Protocol):
    """What export needs from a task: its spec, input shape and a module for weights."""

    spec: ModelSpec

    @property
    def input_shape(self) -> tuple[int, ...]: ...

    def module_for(self, weights: Vector) -> nn.Module: ...


def export_onnx(task: ExportableTask, weights: Vector, *, opset: int = OPSET) -> onnx.ModelProto:
    """Export ``task``'s model holding ``weights`` with a dynamic batch dimension.

    Uses the torch.export-based exporter (``dynamo=True``): in torch 2.14 the TorchScript
    exporter raises a DeprecationWarning, which ``filterwarnings = error`` turns into a
    failure. Initializers keep the module's parameter names, which :func:`with_weights`
    relies on.
    """
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
    return program.model_proto


def _initializer_index(proto: onnx.ModelProto, spec: ModelSpec) -> dict[str, int] | None:
    """Map each spec parameter to its initializer, or None when the exporter renamed,
    reshaped or folded any of them (then every version needs a real export)."""
    by_name = {init.name: i for i, init in enumerate(proto.graph.initializer)}
    index: dict[str, int] = {}
    for p in spec.params:
        i = by_name.get(p.name)
        if i is None:
            return None
        init = proto.graph.initializer[i]
        if tuple(init.dims) != p.shape or init.data_type != onnx.TensorProto.FLOAT:
            return None
        index[p.name] = i
    return index


def with_weights(template: onnx.ModelProto, spec: ModelSpec, weights: Vector) -> bytes:
    """Serialized ONNX model: ``template``'s graph with ``weights`` as its initializers."""
    index = _initializer_index(template, spec)
    if index is None:
        raise ConfigError(f"{spec.model_id}: ONNX initializers do not match the spec")
    proto = onnx.ModelProto()
    proto.CopyFrom(template)
    little = weights.astype("<f4", copy=False)
    for p in spec.params:
        init = proto.graph.initializer[index[p.name]]
        init.ClearField("float_data")
        init.raw_data = little[p.offset : p.offset + p.size].tobytes()
    serialized: bytes = proto.SerializeToString()
    return serialized


@dataclass(frozen=True, slots=True)
class _Template:
    proto: onnx.ModelProto
    patchable: bool


_templates: dict[tuple[str, str, int], _Template] = {}
_templates_lock = threading.Lock()


def onnx_template(task: ExportableTask, weights: Vector, *, opset: int = OPSET) -> onnx.ModelProto:
    """The exported graph for ``task``'s architecture, exported once per process (keyed by
    model id, spec fingerprint and opset) — a fleet of engines shares one export."""
    return _template(task, weights, opset).proto


def _template(task: ExportableTask, weights: Vector, opset: int) -> _Template:
    key = (task.spec.model_id, task.spec.fingerprint, opset)
    with _templates_lock:
        cached = _templates.get(key)
        if cached is None:
            proto = export_onnx(task, weights, opset=opset)
            cached = _Template(
                proto=proto, patchable=_initializer_index(proto, task.spec) is not None
            )
            _templates[key] = cached
    return cached


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
        task: ExportableTask,
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
            model = with_weights(self._template.proto, self._spec, weights)
        else:  # slow path: the exporter transformed a parameter, so export this version
            model = export_onnx(self._task, weights, opset=self._opset).SerializeToString()
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
