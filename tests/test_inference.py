"""ONNX export and the hot-swapping onnxruntime engine."""

from __future__ import annotations

import threading
from functools import partial

import numpy as np
import numpy.typing as npt
import pytest
import torch

from edge_sdk.errors import ConfigError, InvalidSample, NonFiniteWeights, ShapeMismatch
from edge_sdk.inference import OPSET, InferenceEngine, onnx_template, with_weights
from edge_sdk.tasks.digits import DigitsTask
from edge_sdk.tasks.gestures import GestureTask
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
