"""Tasks (digits, gestures), the registry, and the trainer they share."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from edge_sdk import trainer
from edge_sdk.errors import ConfigError, InvalidSample, NonFiniteWeights, ShapeMismatch
from edge_sdk.tasks import get_task, known_tasks
from edge_sdk.tasks.base import Task, TrainConfig
from edge_sdk.tasks.digits import DigitsTask
from edge_sdk.tasks.gestures import GESTURES, GestureTask, make_gestures, user_style
from edge_sdk.trainer import ClassifierTask, select_device, stratified_split

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def digits() -> DigitsTask:
    return DigitsTask(device="cpu")


@pytest.fixture(scope="module")
def gestures() -> GestureTask:
    return GestureTask(device="cpu")


@pytest.fixture(scope="module", params=["digits", "gestures"])
def task(
    request: pytest.FixtureRequest, digits: DigitsTask, gestures: GestureTask
) -> ClassifierTask:
    return digits if request.param == "digits" else gestures


# ----------------------------------------------------------------------------- registry


def test_registry_builds_tasks_by_name() -> None:
    assert {"digits", "gestures"} <= set(known_tasks())
    task = get_task("digits", device="cpu")
    assert isinstance(task, DigitsTask)
    assert isinstance(task, Task)
    assert task.spec.model_id == "digits-cnn"
    assert get_task("gestures", device="cpu").spec.model_id == "gesture-cnn1d"


def test_unknown_task_error_lists_known_names() -> None:
    with pytest.raises(ConfigError, match=r"digits, gestures.*\(or their models: digits-cnn \(digits\), gesture-cnn1d"):
        get_task("mnist")


def test_a_model_id_names_its_task() -> None:
    """helper-92: `--model gesture-cnn1d` (the name logs and `edgeci status` show) was an unknown task."""
    from edge_sdk.client import _resolve_task

    assert get_task("gesture-cnn1d").name == _resolve_task("gesture-cnn1d").name == "gestures"
    assert get_task("digits-cnn").name == "digits"


# ----------------------------------------------------------------------------- data splits


def test_stratified_split_is_disjoint_complete_and_deterministic() -> None:
    y = np.repeat(np.arange(5), [30, 31, 29, 40, 20]).astype(np.int64)
    pretrain, pool, test = stratified_split(y, n_test=30, pretrain_per_class=3, seed=1)
    everything = np.concatenate([pretrain, pool, test])
    assert len(everything) == len(set(everything.tolist())) == len(y)
    assert len(test) == 30
    assert np.bincount(y[pretrain]).tolist() == [3] * 5
    assert np.bincount(y[test]).min() >= 3  # every class is tested
    again = stratified_split(y, n_test=30, pretrain_per_class=3, seed=1)
    for a, b in zip((pretrain, pool, test), again):
        np.testing.assert_array_equal(a, b)
    other = stratified_split(y, n_test=30, pretrain_per_class=3, seed=2)
    assert not np.array_equal(other[1], pool)


def test_task_splits_are_deterministic_across_instances(task: ClassifierTask) -> None:
    fresh = type(task)(device="cpu").data()
    for name in ("pretrain", "pool", "test"):
        mine, theirs = getattr(task.data(), name), getattr(fresh, name)
        np.testing.assert_array_equal(mine.x, theirs.x)
        np.testing.assert_array_equal(mine.y, theirs.y)


def test_digits_split_shapes(digits: DigitsTask) -> None:
    data = digits.data()
    assert len(data.test) == 360
    assert np.bincount(data.pretrain.y).tolist() == [4] * 10
    assert len(data.pretrain) + len(data.pool) + len(data.test) == 1797
    assert data.pool.x.dtype == np.float32 and data.pool.x.shape[1:] == (1, 8, 8)
    assert data.pool.x.min() >= 0.0 and data.pool.x.max() <= 1.0
    # The sklearn digits contain no exact duplicate images, so row sets must not meet.
    rows = {
        name: {r.tobytes() for r in getattr(data, name).x} for name in ("pretrain", "pool", "test")
    }
    assert not rows["pretrain"] & rows["pool"]
    assert not rows["pretrain"] & rows["test"]
    assert not rows["pool"] & rows["test"]


def test_gesture_split_shapes_and_users(gestures: GestureTask) -> None:
    data = gestures.data()
    assert data.n_classes == len(GESTURES) == 8
    assert data.pool.x.shape[1:] == (32, 4) and data.pool.x.dtype == np.float32
    assert len(data.test) == 400
    assert np.bincount(data.pretrain.y).tolist() == [4] * 8
    pool_users = gestures.users("pool")
    assert pool_users.shape == data.pool.y.shape
    assert len(np.unique(pool_users)) == gestures.n_users
    with pytest.raises(ConfigError):
        gestures.users("train")


# ----------------------------------------------------------------------------- gesture generator


def test_gesture_generator_shapes_and_determinism() -> None:
    labels = np.arange(8).repeat(2)
    x = make_gestures(labels, user_id=3, seed=5)
    assert x.shape == (16, 32, 4) and x.dtype == np.float32
    assert np.isfinite(x).all()
    np.testing.assert_array_equal(x, make_gestures(labels, user_id=3, seed=5))
    assert not np.array_equal(x, make_gestures(labels, user_id=3, seed=6))
    assert make_gestures([0], user_id=0, length=48).shape == (1, 48, 4)


def test_users_draw_differently() -> None:
    assert user_style(1) == user_style(1)
    assert user_style(1) != user_style(2)
    a = make_gestures([4] * 20, user_id=1, seed=0)
    b = make_gestures([4] * 20, user_id=2, seed=0)
    # Style (scale, offset, speed) moves the per-user mean path, not just the noise.
    gap = np.abs(a[:, :, :2].mean(axis=0) - b[:, :, :2].mean(axis=0)).mean()
    spread = a[:, :, :2].std(axis=0).mean()
    assert gap > spread / 2


def test_gesture_velocity_channels_are_scaled_position_differences() -> None:
    x = make_gestures([1], user_id=0)[0]
    np.testing.assert_allclose(x[1:, 2:], np.diff(x[:, :2], axis=0) * 8.0, atol=1e-5)


def test_swipes_move_in_their_direction() -> None:
    x = make_gestures(np.arange(4).repeat(10), user_id=0, seed=0)
    net = (x[:, -1, :2] - x[:, 0, :2]).reshape(4, 10, 2).mean(axis=1)
    assert net[0, 0] < -0.3 and net[1, 0] > 0.3  # left, right
    assert net[2, 1] > 0.3 and net[3, 1] < -0.3  # up, down


def test_generator_rejects_bad_arguments() -> None:
    with pytest.raises(ConfigError):
        make_gestures([8], user_id=0)
    with pytest.raises(ConfigError):
        make_gestures([0], user_id=-1)
    with pytest.raises(ConfigError):
        make_gestures([0], user_id=0, length=4)


# ----------------------------------------------------------------------------- pretrained model


@pytest.mark.parametrize(("name", "low", "high"), [("digits", 0.6, 0.85), ("gestures", 0.6, 0.85)])
def test_pretrained_accuracy_leaves_headroom(
    name: str, low: float, high: float, digits: DigitsTask, gestures: GestureTask
) -> None:
    task = digits if name == "digits" else gestures
    metrics = task.evaluate(task.pretrained(seed=0))
    assert low <= metrics["accuracy"] <= high
    assert np.isfinite(metrics["loss"]) and metrics["loss"] > 0
    assert metrics["n"] == len(task.data().test)


def test_pretrained_is_deterministic_and_not_shared(task: ClassifierTask) -> None:
    first = task.pretrained(seed=0)
    first[:] = 0.0  # a caller mutating its copy must not poison the cache
    again = task.pretrained(seed=0)
    fresh = type(task)(device="cpu").pretrained(seed=0)
    np.testing.assert_array_equal(again, fresh)
    assert not np.array_equal(again, first)
    assert not np.array_equal(fresh, task.pretrained(seed=1))


# ----------------------------------------------------------------------------- local updates


def test_local_update_on_pool_samples_improves_accuracy(task: ClassifierTask) -> None:
    weights = task.pretrained(seed=0)
    pool = task.data().pool
    before = task.evaluate(weights)["accuracy"]
    result = task.local_update(weights, pool.x[:300], pool.y[:300], TrainConfig(epochs=3))
    after = task.evaluate(result.weights)["accuracy"]
    assert after >= before + 0.05
    assert result.n_samples == 300
    assert np.isfinite(result.loss) and result.seconds > 0


def test_local_update_never_modifies_its_input(task: ClassifierTask) -> None:
    weights = task.pretrained(seed=0)
    keep = weights.copy()
    pool = task.data().pool
    result = task.local_update(weights, pool.x[:20], pool.y[:20], TrainConfig(epochs=1))
    np.testing.assert_array_equal(weights, keep)
    assert not np.shares_memory(result.weights, weights)
    assert not np.array_equal(result.weights, weights)


def test_local_update_is_deterministic(task: ClassifierTask) -> None:
    weights = task.pretrained(seed=0)
    pool = task.data().pool
    config = TrainConfig(epochs=2, seed=7)
    a = task.local_update(weights, pool.x[:40], pool.y[:40], config)
    b = task.local_update(weights, pool.x[:40], pool.y[:40], config)
    np.testing.assert_array_equal(a.weights, b.weights)
    assert a.loss == b.loss
    c = task.local_update(weights, pool.x[:40], pool.y[:40], TrainConfig(epochs=2, seed=8))
    assert not np.array_equal(a.weights, c.weights)


@pytest.mark.parametrize(
    ("trained", "frozen"), [("classifier", "extractor"), ("extractor", "classifier")]
)
def test_group_training_leaves_the_other_group_bit_identical(
    task: ClassifierTask, trained: str, frozen: str
) -> None:
    weights = task.pretrained(seed=0)
    pool = task.data().pool
    result = task.local_update(
        weights, pool.x[:64], pool.y[:64], TrainConfig(epochs=2, group=trained)
    )
    kept, moved = task.spec.group_slice(frozen), task.spec.group_slice(trained)
    assert result.weights[kept].tobytes() == weights[kept].tobytes()
    assert not np.array_equal(result.weights[moved], weights[moved])
    # the cached module must come back fully trainable for the next full update
    full = task.local_update(weights, pool.x[:64], pool.y[:64], TrainConfig(epochs=1))
    assert not np.array_equal(full.weights[kept], weights[kept])


def test_local_update_accepts_read_only_weights_and_samples(digits: DigitsTask) -> None:
    weights = digits.pretrained(seed=0)
    decoded = np.frombuffer(weights.tobytes(), dtype=np.float32)  # as the wire codec returns
    pool = digits.data().pool
    x = pool.x[:16].copy()
    x.setflags(write=False)
    result = digits.local_update(decoded, x, pool.y[:16], TrainConfig(epochs=1))
    assert result.weights.flags.writeable
    assert digits.evaluate(decoded)["accuracy"] == digits.evaluate(weights)["accuracy"]


def test_invalid_samples_and_weights_are_rejected(digits: DigitsTask) -> None:
    weights = digits.pretrained(seed=0)
    pool = digits.data().pool
    config = TrainConfig(epochs=1)
    with pytest.raises(InvalidSample):
        digits.local_update(weights, pool.x[:4, :, :4], pool.y[:4], config)
    with pytest.raises(InvalidSample):
        digits.local_update(weights, pool.x[:4], np.array([0, 1, 2, 10]), config)
    with pytest.raises(InvalidSample):
        digits.local_update(weights, pool.x[:4], pool.y[:3], config)
    with pytest.raises(InvalidSample):
        digits.local_update(weights, pool.x[:0], pool.y[:0], config)
    with pytest.raises(ShapeMismatch):
        digits.local_update(weights[:-1], pool.x[:4], pool.y[:4], config)
    bad = weights.copy()
    bad[0] = np.nan
    with pytest.raises(NonFiniteWeights):
        digits.local_update(bad, pool.x[:4], pool.y[:4], config)
    with pytest.raises(ConfigError):
        digits.local_update(weights, pool.x[:4], pool.y[:4], TrainConfig(group="decoder"))


# ----------------------------------------------------------------------------- features and logits


def test_features_feed_the_classifier_to_give_the_logits(task: ClassifierTask) -> None:
    weights = task.pretrained(seed=0)
    x = task.data().test.x[:50]
    z = task.features(weights, x)
    assert z.shape == (50, 32) and z.dtype == np.float32
    w = task.spec.view(weights, "classifier.weight")
    b = task.spec.view(weights, "classifier.bias")
    reference = np.einsum("nk,ck->nc", z.astype(np.float64), w.astype(np.float64)) + b  # no BLAS: no spurious flags
    np.testing.assert_allclose(reference, task.logits(weights, x), rtol=1e-5, atol=1e-5)
    # the extractor alone determines z: changing the classifier leaves it alone
    other = weights.copy()
    other[task.spec.group_slice("classifier")] += 1.0
    np.testing.assert_array_equal(task.features(other, x), z)


def test_evaluate_counts_correct_predictions(digits: DigitsTask) -> None:
    weights = digits.pretrained(seed=0)
    test = digits.data().test
    predicted = digits.logits(weights, test.x).argmax(axis=1)
    assert digits.evaluate(weights)["accuracy"] == pytest.approx(
        float((predicted == test.y).mean())
    )


# ----------------------------------------------------------------------------- trainer


def test_select_device_follows_argument_then_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(trainer.DEVICE_ENV, "cpu")
    assert select_device() == torch.device("cpu")
    assert select_device("cpu") == torch.device("cpu")
    monkeypatch.setenv(trainer.DEVICE_ENV, "tpu")
    with pytest.raises(ConfigError):
        select_device()
    assert select_device("cpu") == torch.device("cpu")  # the argument wins over the env
    monkeypatch.delenv(trainer.DEVICE_ENV)
    auto = select_device()
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert auto.type in (expected, "mps")


def test_unavailable_cuda_is_a_config_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ConfigError, match="CUDA"):
        select_device("cuda")


def test_configure_threads() -> None:
    before = torch.get_num_threads()
    try:
        assert trainer.configure_threads(1) == 1 and trainer.configure_threads() == 1  # (None: unchanged)
        with pytest.raises(ConfigError):
            trainer.configure_threads(0)
    finally:
        torch.set_num_threads(before)


def test_pretraining_gives_the_same_model_whatever_the_thread_count() -> None:
    """helper-91: procdigits' pretrained model depended on torch's thread count (seed 0 on 2,000
    images: 67 % with one thread, 48 % with two), so `edgeci emulate --threads 2` started every
    run from another deployed model. Pretraining runs on PRETRAIN_THREADS whatever the count,
    which is restored afterwards."""
    before = torch.get_num_threads()
    models = {}
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            models[n] = get_task("procdigits", size=[2000, 500], workers=1).pretrained(seed=0)  # a new instance: no cache
            assert torch.get_num_threads() == n
    finally:
        torch.set_num_threads(before)
    np.testing.assert_array_equal(models[1], models[2])


def test_seeded_restores_the_global_generator() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    with trainer.seeded(5):
        inside = torch.rand(3)
    np.testing.assert_array_equal(torch.rand(3).numpy(), expected.numpy())
    with trainer.seeded(5):
        np.testing.assert_array_equal(torch.rand(3).numpy(), inside.numpy())


# ----------------------------------------------------------------------------- declarations


def test_a_task_declares_its_sample_kind_or_the_registry_does() -> None:
    from types import SimpleNamespace

    from edge_sdk.errors import ConfigError
    from edge_sdk.tasks.registry import sample_kind_of

    assert sample_kind_of(SimpleNamespace(name="gestures")) == "gesture"  # declared in the registry
    assert sample_kind_of(SimpleNamespace(name="yolov8n-detection")) == "frame"
    assert sample_kind_of(SimpleNamespace(name="an-apps-own")) == "array"  # declared nowhere
    assert sample_kind_of(SimpleNamespace(name="gestures", sample_kind="frame")) == "frame"  # its own word wins
    with pytest.raises(ConfigError):
        sample_kind_of(SimpleNamespace(name="x", sample_kind="video"))


def test_declarations_match_the_torch_tasks(task: ClassifierTask) -> None:
    """What a [device] install knows without torch (edge_sdk/tasks/registry.py) is what the
    torch task is: spec, class count, input shape, sample kind; and its data obey the contract."""
    from edge_sdk.tasks.registry import DeclaredTask, input_contract, sample_kind_of, task_info

    info = task_info(task.name)
    assert info is not None and info.contract is not None
    assert info.spec.fingerprint == task.spec.fingerprint
    assert (info.model_id, info.n_classes, info.contract.shape) == (task.model_id, task.n_classes, task.input_shape)
    assert info.sample_kind == sample_kind_of(task) == sample_kind_of(DeclaredTask(info))  # type: ignore[arg-type]
    assert input_contract(task) is info.contract
    data = task.data()
    for split in (data.pretrain, data.pool, data.test):
        np.testing.assert_array_equal(info.contract.batch(split.x), split.x)


def test_detection_declaration_matches_the_yolo_task(tmp_path: Path) -> None:
    from edge_sdk.tasks.detection import DetectionTask
    from edge_sdk.tasks.registry import TASK_INFO

    detection = DetectionTask(data_dir=tmp_path)
    info = TASK_INFO["detection"]
    assert info.spec.fingerprint == detection.spec.fingerprint
    assert (info.task_name, info.n_classes, info.class_names) == (
        detection.name, detection.config.n_classes, detection.config.class_names)


def test_digits_contract_accepts_its_shapes_and_explains_rejections() -> None:
    from edge_sdk.tasks.registry import TASK_INFO

    contract = TASK_INFO["digits"].contract
    assert contract is not None
    image = np.linspace(0, 1, 64, dtype=np.float64).reshape(8, 8)
    assert contract.sample(image).shape == (1, 8, 8) and contract.sample(image).dtype == np.float32
    assert contract.sample(image[None]).shape == (1, 8, 8)
    assert contract.batch(image).shape == (1, 1, 8, 8)
    assert contract.batch(np.stack([image] * 3)).shape == (3, 1, 8, 8)
    assert contract.batch(np.stack([image[None]] * 3)).shape == (3, 1, 8, 8)
    with pytest.raises(InvalidSample, match=r"values in \[0, 1\].*got values in \[0, 16\]"):
        contract.sample(image * 16)  # raw scikit-learn pixel counts
    expected = r"digits: expected float samples of shape \(1, 8, 8\) \(or \(8, 8\)\)"
    for bad in (image[:, :4], np.zeros((2, 8, 8)), image.astype(np.int64), np.full((8, 8), np.inf)):
        with pytest.raises(InvalidSample, match=expected):
            contract.sample(bad)
    for bad in (np.zeros((0, 1, 8, 8)), np.zeros((2, 2, 8, 8)), np.zeros((2, 8, 8), dtype=np.uint8)):
        with pytest.raises(InvalidSample, match=expected):
            contract.batch(bad)


def test_gesture_contract_has_a_wide_range_and_no_compact_form() -> None:
    """helper-92: any finite value was a gesture: one sample of 3e38 made every later training
    round NaN (the device never trained again), raw pixel coordinates trained a released model
    with loss 8.6e11. Normalised input, even well beyond the generator's, passes."""
    from edge_sdk.tasks import get_task
    from edge_sdk.tasks.registry import TASK_INFO

    contract = TASK_INFO["gestures"].contract
    assert contract is not None and contract.compact_shape == contract.shape == (32, 4)
    wide = np.full((32, 4), 40.0)
    assert contract.sample(wide).shape == (32, 4)
    with pytest.raises(InvalidSample, match="got shape"):
        contract.sample(wide.T)
    assert contract.sample(wide.astype(np.float64)).dtype == np.float32  # any float dtype, stored as float32
    with pytest.raises(InvalidSample, match=r"expected float samples.*got values beyond float32's range"):
        contract.sample(np.full((32, 4), 1e300))  # finite in float64: not "NaN or Inf"
    for wild in (np.full((32, 4), 3e38), np.full((32, 4), 960.0), -np.full((32, 4), 65.0)):
        with pytest.raises(InvalidSample, match=r"with values in \[-64, 64\].*about \[-1.5, 1.5\].*got values in"):
            contract.sample(wild)
    data = get_task("gestures").data()
    for split in (data.pretrain, data.pool, data.test):  # the task's own samples: well inside
        assert contract.batch(split.x).shape == split.x.shape


def test_one_default_min_samples_per_task() -> None:
    from edge_sdk.tasks.registry import TASK_INFO, default_min_samples

    assert {n: i.min_samples for n, i in TASK_INFO.items()} == {"digits": 8, "gestures": 16, "procdigits": 8, "detection": 64}
    assert default_min_samples("yolov8n-detection") == 64  # by the task object's name too
    assert default_min_samples("an-apps-own-task", fallback=5) == 5


def test_edgeci_home_is_the_one_data_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from edge_sdk.paths import device_dir, edgeci_home
    from edge_sdk.tasks._ultralytics import ultralytics_home

    monkeypatch.delenv("EDGECI_HOME", raising=False)
    assert edgeci_home() == Path.home() / ".edgeci"
    monkeypatch.setenv("EDGECI_HOME", str(tmp_path))
    assert device_dir("headset-7") == tmp_path / "devices" / "headset-7"
    assert ultralytics_home() == tmp_path / "ultralytics"
    for bad in ("", "..", "a/b"):
        with pytest.raises(ConfigError):
            device_dir(bad)


# ----------------------------------------------------------------------------- without torch


def test_numpy_head_training_matches_a_torch_classifier_round(task: ClassifierTask) -> None:
    """A [device] install's classifier-only update (onnxruntime features + numpy softmax
    regression) is the torch device's update: same head to float precision, extractor untouched."""
    from edge_sdk.tasks.registry import DeclaredTask, task_info

    info = task_info(task.name)
    assert info is not None
    lean = DeclaredTask(info)
    weights = task.pretrained(seed=0)
    pool = task.data().pool
    x, y = pool.x[:40], pool.y[:40]
    config = TrainConfig(epochs=3, batch_size=16, lr=0.05, seed=7, group="classifier")
    expected = task.local_update(weights, x, y, config)
    got = lean.local_update(np.frombuffer(weights.tobytes(), dtype=np.float32), x, y, config)  # read-only, as decoded
    head = task.spec.group_slice("classifier")
    np.testing.assert_array_equal(got.weights[: head.start], weights[: head.start])
    np.testing.assert_array_equal(got.weights[head.stop :], weights[head.stop :])
    assert not np.array_equal(got.weights[head], weights[head])
    np.testing.assert_allclose(got.weights[head], expected.weights[head], atol=2e-5)
    assert got.loss == pytest.approx(expected.loss, rel=1e-4)
    assert got.n_samples == 40
    np.testing.assert_allclose(lean.features(weights, x), task.features(weights, x), atol=1e-5)


def test_declared_task_refuses_full_rounds_and_bad_labels(digits: DigitsTask) -> None:
    from edge_sdk.errors import MissingExtra
    from edge_sdk.tasks.registry import TASK_INFO, DeclaredTask

    lean = DeclaredTask(TASK_INFO["digits"])
    weights = digits.pretrained(seed=0)
    x = digits.data().pool.x[:4]
    with pytest.raises(MissingExtra, match=r"pip install 'edgeci\[train\]'"):
        lean.local_update(weights, x, np.arange(4), TrainConfig())  # a full round
    head = TrainConfig(group="classifier")
    with pytest.raises(InvalidSample):
        lean.local_update(weights, x, np.array([0, 1, 2, 10]), head)
    with pytest.raises(InvalidSample):
        lean.local_update(weights, x * 16, np.arange(4), head)
    with pytest.raises(MissingExtra):
        lean.pretrained()


def test_an_undeclared_task_keeps_its_own_shape_and_any_numeric_dtype() -> None:
    from edge_sdk.tasks.registry import input_contract

    class AppTask:
        name = "apps-own"
        input_shape = (3, 2)

    contract = input_contract(AppTask())
    assert contract.shape == (3, 2) and contract.value_range is None
    assert contract.sample(np.arange(6, dtype=np.uint8).reshape(3, 2)).dtype == np.float32
    with pytest.raises(InvalidSample, match=r"apps-own: expected numeric samples of shape \(3, 2\)"):
        contract.sample(np.zeros((2, 3)))
    with pytest.raises(InvalidSample):
        contract.sample(np.array([["a", "b"]] * 3))


def test_every_declared_task_loads_by_its_factory() -> None:
    """One registry (helper-99 found two: a task declared in TASK_INFO only could not be loaded,
    one listed in TASKS only silently got D_min 16 and no range): each declaration's factory
    makes the task it declares (detection's class is only imported: its own test builds it)."""
    import importlib

    from edge_sdk.tasks import TASKS, get_task, known_tasks
    from edge_sdk.tasks.registry import TASK_INFO

    assert set(known_tasks()) == set(TASK_INFO) and {n: i.factory for n, i in TASK_INFO.items()} == TASKS
    for name, info in TASK_INFO.items():
        module, _, cls = info.factory.partition(":")
        assert isinstance(getattr(importlib.import_module(module), cls), type)
        if info.sample_kind == "frame":
            continue
        task = get_task(name)
        assert task.name == info.task_name and task.spec.fingerprint == info.spec.fingerprint
