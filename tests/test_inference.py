"""ONNX export and the hot-swapping onnxruntime engine."""

from __future__ import annotations

import threading
from functools import partial

import numpy as np
import numpy.typing as npt
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_sdk.errors import ConfigError, InvalidSample, NonFiniteWeights, ShapeMismatch
from edge_sdk.inference import (
    OPSET,
    InferenceEngine,
    OnnxTemplate,
    onnx_template,
    shipped_template,
    with_weights,
)
from edge_sdk.spec import ModelSpec
from edge_sdk.tasks.digits import DigitsTask
from edge_sdk.tasks.gestures import GestureTask
from edge_sdk.tasks.registry import TASK_INFO, DeclaredTask
from edge_sdk.trainer import ClassifierTask

torch.set_num_threads(1)


@pytest.fixture(scope="module", params=["digits", "gestures"])
def task(request: pytest.FixtureRequest) -> ClassifierTask:
    return DigitsTask(device="cpu") if request.param == "digits" else GestureTask(device="cpu")


def perturbed(
    weights: npt.NDArray[np.float32], seed: int, scale: float = 0.02
) -> npt.NDArray[np.float32]:
    noise = np.random.default_rng(seed).standard_normal(weights.shape).astype(np.float32)
    return weights + scale * noise


def test_torch_and_onnxruntime_agree(task: ClassifierTask) -> None:
    weights = task.pretrained(seed=0)
    x = task.data().test.x[:128]
    engine = InferenceEngine(task, weights)
    diff = np.abs(engine.logits(x) - task.logits(weights, x)).max()
    assert diff < 1e-4
    # and after a swap, which patches initializers instead of re-exporting
    other = perturbed(weights, seed=1)
    assert engine.swap(1, other)
    np.testing.assert_allclose(engine.logits(x), task.logits(other, x), rtol=0, atol=1e-4)


def test_export_keeps_parameter_names_and_fixed_opset(task: ClassifierTask) -> None:
    proto = onnx_template(task, task.pretrained(seed=0))  # the cached export_onnx output
    assert {o.domain: o.version for o in proto.opset_import}[""] == OPSET
    initializers = {init.name: tuple(init.dims) for init in proto.graph.initializer}
    for p in task.spec.params:
        assert initializers[p.name] == p.shape


def test_template_is_exported_once_per_architecture(task: ClassifierTask) -> None:
    a = onnx_template(task, task.pretrained(seed=0))
    b = onnx_template(type(task)(device="cpu"), task.pretrained(seed=1))
    assert a is b


def test_with_weights_refuses_a_graph_of_another_model() -> None:
    digits, gestures = DigitsTask(device="cpu"), GestureTask(device="cpu")
    template = onnx_template(digits, digits.pretrained(seed=0))
    with pytest.raises(ConfigError):
        with_weights(template, gestures.spec, gestures.spec.zeros())


def test_predict_gives_probabilities_labels_and_version(task: ClassifierTask) -> None:
    weights = task.pretrained(seed=0)
    engine = InferenceEngine(task, weights, version=3)
    test = task.data().test
    prediction = engine.predict(test.x)
    assert prediction.version == 3 == engine.version
    assert prediction.probabilities.shape == (len(test), task.n_classes)
    np.testing.assert_allclose(prediction.probabilities.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(prediction.labels, task.logits(weights, test.x).argmax(axis=1))
    # engine accuracy is the task's accuracy
    assert float((prediction.labels == test.y).mean()) == pytest.approx(
        task.evaluate(weights)["accuracy"]
    )
    single = engine.predict(test.x[0])
    assert single.probabilities.shape == (1, task.n_classes)
    assert single.labels[0] == prediction.labels[0]


def test_predict_rejects_wrong_shapes(task: ClassifierTask) -> None:
    engine = InferenceEngine(task, task.pretrained(seed=0))
    with pytest.raises(InvalidSample):
        engine.predict(np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(InvalidSample):
        engine.predict(np.zeros((0, *task.input_shape), dtype=np.float32))
    with pytest.raises(InvalidSample):
        engine.predict(np.zeros((1, *task.input_shape), dtype=np.int64))


def test_swap_only_moves_forward_and_bad_weights_change_nothing(task: ClassifierTask) -> None:
    weights = task.pretrained(seed=0)
    x = task.data().test.x[:32]
    engine = InferenceEngine(task, weights, version=5)
    served = engine.logits(x)
    assert not engine.swap(5, perturbed(weights, 2))  # duplicate delivery
    assert not engine.swap(4, perturbed(weights, 2))  # late message
    bad = weights.copy()
    bad[3] = np.inf
    with pytest.raises(NonFiniteWeights):
        engine.swap(6, bad)
    with pytest.raises(ShapeMismatch):
        engine.swap(6, weights[:-1])
    assert engine.version == 5
    np.testing.assert_array_equal(engine.logits(x), served)


def test_swap_accepts_read_only_decoded_weights(task: ClassifierTask) -> None:
    weights = task.pretrained(seed=0)
    engine = InferenceEngine(task, weights)
    decoded = np.frombuffer(perturbed(weights, 3).tobytes(), dtype=np.float32)
    assert engine.swap(1, decoded)
    x = task.data().test.x[:8]
    np.testing.assert_allclose(engine.logits(x), task.logits(decoded.copy(), x), atol=1e-4)


def test_hot_swap_under_concurrent_predicts(task: ClassifierTask) -> None:
    """Readers hammer ``predict`` while versions 1..N are swapped in: no call fails, every
    answer is exactly the output of the version it reports, and the end state is the last."""
    base = task.pretrained(seed=0)
    x = task.data().test.x[:16]
    versions = {v: perturbed(base, seed=100 + v, scale=0.05) for v in range(0, 9)}
    expected = {v: task.logits(w, x) for v, w in versions.items()}
    engine = InferenceEngine(task, versions[0])

    n_readers = 3
    started = threading.Barrier(n_readers + 1)
    stop = threading.Event()
    progress = threading.Condition()
    observed: set[int] = set()
    errors: list[BaseException] = []
    mismatches: list[tuple[int, float]] = []

    def reader() -> None:
        started.wait()
        try:
            while not stop.is_set():
                version, logits = engine.logits_with_version(x)
                gap = float(np.abs(logits - expected[version]).max())
                if gap >= 1e-4:
                    mismatches.append((version, gap))
                with progress:
                    observed.add(version)
                    progress.notify_all()
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    def seen_or_failed(version: int) -> bool:
        return version in observed or bool(errors)

    threads = [threading.Thread(target=reader) for _ in range(n_readers)]
    for t in threads:
        t.start()
    started.wait()
    try:
        for v in range(1, 9):
            assert engine.swap(v, versions[v])
            with progress:  # let readers run on each version before the next swap
                assert progress.wait_for(partial(seen_or_failed, v), timeout=30)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert not errors
    assert not mismatches
    assert not any(t.is_alive() for t in threads)
    assert observed == set(range(9)) or observed == set(range(1, 9))
    assert engine.version == 8
    np.testing.assert_allclose(engine.logits(x), expected[8], atol=1e-4)
    np.testing.assert_array_equal(engine.predict(x).labels, expected[8].argmax(axis=1))


# --------------------------------------------------------------------------- shipped graphs


def _run(model: bytes, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    import onnxruntime as ort

    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["logits"], {"x": x})[0], dtype=np.float32)


def test_shipped_graph_is_the_torch_export(task: ClassifierTask) -> None:
    """The graph a [device] install serves with is what ``--write-graphs`` exports from torch
    today: same nodes, opset and parameter initializers, and the same outputs for any weights."""
    import onnx

    shipped = shipped_template(task.spec)
    assert shipped is not None, f"no shipped graph for {task.spec.model_id}: run --write-graphs"
    fresh = onnx_template(task, task.pretrained(seed=0))
    ours = onnx.load_from_string(shipped)

    def nodes(m: onnx.ModelProto) -> list[tuple[str, int, int]]:
        return [(n.op_type, len(n.input), len(n.output)) for n in m.graph.node]

    assert nodes(ours) == nodes(fresh)
    assert {o.domain: o.version for o in ours.opset_import} == {o.domain: o.version for o in fresh.opset_import}
    dims = {i.name: tuple(i.dims) for i in ours.graph.initializer}
    assert dims == {i.name: tuple(i.dims) for i in fresh.graph.initializer}
    # shipped with zeros; constants that are not parameters (shapes, Affine) kept as exported
    params = {p.name for p in task.spec.params}
    assert all(not np.frombuffer(i.raw_data, np.float32).any() for i in ours.graph.initializer if i.name in params)

    x = task.data().test.x[:64]
    for seed in (1, 2):
        weights = perturbed(task.pretrained(seed=0), seed=seed, scale=0.1)
        from_shipped = _run(OnnxTemplate(shipped, task.spec).patched(weights), x)
        np.testing.assert_allclose(from_shipped, _run(with_weights(fresh, task.spec, weights), x), atol=1e-5)
        np.testing.assert_allclose(from_shipped, task.logits(weights, x), atol=1e-4)


def test_engine_serves_a_declared_task_from_the_shipped_graph(task: ClassifierTask) -> None:
    """A task with no torch half (what a [device] install builds) serves what torch computes."""
    declared = DeclaredTask(TASK_INFO[task.name])
    assert not hasattr(declared, "module_for")
    weights = perturbed(task.pretrained(seed=0), seed=4)
    engine = InferenceEngine(declared, weights, version=2)
    x = task.data().test.x[:32]
    np.testing.assert_allclose(engine.logits(x), task.logits(weights, x), atol=1e-4)
    other = perturbed(weights, seed=5)
    assert engine.swap(3, other)
    np.testing.assert_allclose(engine.logits(x), task.logits(other, x), atol=1e-4)


def test_shipped_graph_is_only_used_for_its_exact_spec() -> None:
    digits = DigitsTask(device="cpu")
    assert shipped_template(digits.spec) is not None
    assert shipped_template(digits.spec, opset=OPSET + 1) is None
    renamed = ModelSpec.build("digits-cnn", [(p.name, p.shape, p.group) for p in digits.spec.params][:-1])
    assert shipped_template(renamed) is None
    other = ModelSpec.build("not-shipped", [("w", (2, 2), "classifier")])
    assert shipped_template(other) is None
    with pytest.raises(ConfigError, match="no shipped ONNX graph"):
        InferenceEngine(_SpecOnly(other, (2,)), other.zeros())


class _SpecOnly:
    def __init__(self, spec: ModelSpec, input_shape: tuple[int, ...]) -> None:
        self.spec = spec
        self.input_shape = input_shape


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=256), st.integers(min_value=0, max_value=4000))
def test_template_parser_never_crashes_on_garbage(garbage: bytes, cut: int) -> None:
    """Any bytes (random, or a truncated real graph) either parse or raise ConfigError."""
    spec = _digits_spec()
    shipped = shipped_template(spec)
    assert shipped is not None
    for blob in (garbage, shipped[:cut], shipped[:cut] + garbage):
        try:
            template = OnnxTemplate(blob, spec)
        except ConfigError:
            continue
        if template.patchable:  # every parameter found in place: patching keeps the layout
            assert len(template.patched(spec.zeros())) == len(blob)


def _digits_spec() -> ModelSpec:
    from edge_sdk.tasks.registry import declared_spec

    return declared_spec("digits-cnn")
