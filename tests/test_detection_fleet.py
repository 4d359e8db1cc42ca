"""The detection task on the fleet emulator, directly through the Task protocol.

The emulator carries the task's samples of its declared kind (frames with boxes) through
the partition and labelling path; frames have no one class label, so label-aware splits
and orders of them are refused. Tiny on purpose (2 cores, one torch thread): 64 px
frames, a one-step "pretraining" cached in a temp data dir, 1-epoch updates on a few
frames. Whether fine-tuning on the new class raises mAP50 is measured by
``benchmarks/detection_finetune.py`` and ``demos/scenarios/detection-spin-vs-fedbuff.toml``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from devices.labelling import stream_order
from devices.partition import partition
from devices.scenario import ScenarioError, load_scenario, parse_scenario
from edge_sdk.errors import ConfigError
from edge_sdk.tasks.base import TrainConfig
from edge_sdk.tasks.registry import default_train_config

REPO = Path(__file__).resolve().parents[1]
SCENARIO = REPO / "demos" / "scenarios" / "detection-spin-vs-fedbuff.toml"
SIZE = 64
TINY_OPTIONS: dict[str, Any] = {
    "imgsz": SIZE, "scene_size": SIZE, "pretrain_scenes": 8, "pretrain_epochs": 1, "pretrain_batch": 8,
    "pool_scenes": 12, "test_scenes": 6, "hflip": 0.0,
}
ONE_EPOCH = TrainConfig(epochs=1, batch_size=4, lr=5e-4, seed=3)
needs_ultralytics = pytest.mark.skipif(
    # not importorskip: importing ultralytics before the task points it at its data dir
    # would write ~/.config/Ultralytics
    importlib.util.find_spec("ultralytics") is None, reason="needs the optional detection extra (ultralytics)"
)


def _boxes(n: int, seed: int = 0) -> np.ndarray:
    """A pool ``y`` of frames: an object array of (k, 5) box arrays."""
    rng = np.random.default_rng(seed)
    y = np.empty(n, dtype=object)
    for i in range(n):
        k = int(rng.integers(1, 4))
        y[i] = np.column_stack([rng.integers(0, 5, k), np.full((k, 2), 1.0), np.full((k, 2), 9.0)]).astype(np.float32)
    return y


# ----------------------------------------------------------------- the data path, no torch


def test_frames_split_iid_by_count_exactly_as_labels_do() -> None:
    y = _boxes(50)
    parts = partition(y, 4, "iid", seed=7)
    assert sorted(np.concatenate(parts).tolist()) == list(range(50))  # disjoint, covering
    same = partition(np.zeros(50, np.int64), 4, "iid", seed=7)  # iid depends on the count only
    assert all(np.array_equal(a, b) for a, b in zip(parts, same))
    other = partition(y, 4, "iid", seed=8)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))
    rng = np.random.default_rng(0)
    order = stream_order(parts[0], y, "shuffled", rng)
    assert sorted(order.tolist()) == parts[0].tolist()


@pytest.mark.parametrize("kind", ["dirichlet", "labels"])
def test_label_aware_partitions_of_frames_are_refused(kind: str) -> None:
    with pytest.raises(ConfigError, match=rf'\[data\] partition = "{kind}".*frames'):
        partition(_boxes(20), 4, kind, seed=0)


def test_by_class_streaming_of_frames_is_refused() -> None:
    y = _boxes(20)
    with pytest.raises(ConfigError, match=r'\[data\] order = "by-class".*frames'):
        stream_order(np.arange(10), y, "by-class", np.random.default_rng(0))
    labels = np.arange(20, dtype=np.int64) % 3  # labelled samples still stream by class
    order = stream_order(np.arange(20), labels, "by-class", np.random.default_rng(0))
    assert np.count_nonzero(np.diff(labels[order])) == 2


def _raw(**changes: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {"task": "detection", "fleet": {"devices": 2}, "data": {"partition": "iid"},
                           "runs": [{"strategy": "spin", "params": {"k": 1}}]}
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        raw.setdefault(section, {})[key] = value
    return raw


@pytest.mark.parametrize(("change", "key"), [
    ({"data__partition": "dirichlet"}, r'\[data\] partition = "dirichlet"'),
    ({"data__partition": "labels"}, r'\[data\] partition = "labels"'),
    ({"data__order": "by-class"}, r'\[data\] order = "by-class"'),
    ({"attack__label_flip": 0.5}, r"\[attack\] label_flip"),
    ({"delay__devices": 1}, r"\[delay\] devices"),
    # helper-182: detection devices send no canary reports, so every candidate waited out the round and was held
    ({"coordinator__gate": True, "coordinator__canary": 0.5}, r"\[coordinator\] canary"),
])
def test_a_frame_scenario_that_needs_class_labels_is_refused_when_loaded(change: dict[str, Any], key: str) -> None:
    with pytest.raises(ScenarioError, match=key + r".*'detection' has frames with boxes"):
        parse_scenario(_raw(**change), source="det.toml")
    digits = _raw(**change)
    digits["task"] = "digits"
    if "delay__devices" not in change:  # the same keys are fine for labelled samples
        parse_scenario(digits, source="digits.toml")


def test_the_task_supplies_its_training_defaults() -> None:
    """No magic lr: a scenario that leaves [training] out gets the task's own defaults."""
    detection = default_train_config("detection")
    assert (detection.epochs, detection.batch_size, detection.lr) == (5, 16, 1e-3)
    s = parse_scenario(_raw(), source="det.toml").settings
    assert (s.epochs, s.batch_size, s.lr) == (5, 16, 1e-3)
    digits = parse_scenario({**_raw(), "task": "digits"}, source="digits.toml").settings
    assert digits.lr == 0.05  # the generic default, unchanged for classifiers
    explicit = parse_scenario(_raw(training__lr=0.05), source="det.toml").settings
    assert explicit.lr == 0.05  # a value the scenario sets is used as given, even the generic one


def test_the_shipped_scenario_runs_the_detection_task_directly() -> None:
    scenario = load_scenario(SCENARIO)
    for s in (scenario, scenario.quick()):
        assert s.settings.task == "detection" and s.settings.partition == "iid"
        assert s.settings.task_options["deployed_seed"] == 0
        assert s.settings.lr == 5e-4
    assert scenario.quick().settings.min_samples == 8 and scenario.settings.min_samples == 12
    assert [r.strategy for r in scenario.runs] == ["spin", "spin", "fedbuff", "fedbuff"]


# ------------------------------------------------------------------- the task itself


@pytest.fixture(scope="module")
def _one_thread() -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("edgeci-fleet-data")


@pytest.fixture(scope="module")
def task(data_dir: Path, _one_thread: None) -> Any:
    from devices.report import load_task

    return load_task("detection", {**TINY_OPTIONS, "data_dir": str(data_dir), "deployed_seed": 0})


@needs_ultralytics
def test_data_is_frames_with_their_boxes(task: Any) -> None:
    from edge_sdk.tasks.base import Task, TaskData
    from edge_sdk.tasks.registry import sample_kind_of

    assert isinstance(task, Task) and sample_kind_of(task) == "frame"
    assert default_train_config(task) is task.default_train and task.default_train.lr == 1e-3
    assert (task.config.pool_scenes, task.config.imgsz) == (12, SIZE)  # task_options reached the config
    data, scenes = task.data(), task.scenes()
    assert isinstance(data, TaskData) and data.n_classes == 5
    for split, ref in ((data.pool, scenes.pool), (data.test, scenes.test), (data.pretrain, scenes.pretrain)):
        assert split.x.dtype == np.uint8 and split.x.shape == (len(ref), SIZE, SIZE, 3)
        assert split.y.dtype == object and len(split) == len(ref)
        np.testing.assert_array_equal(split.x, ref.images)
        for got, want in zip(split.y, ref.boxes):
            np.testing.assert_array_equal(got, want)
    idx = np.array([5, 0, 3])
    picked = data.pool.y[idx]  # fancy indexing keeps frames and boxes together, as the emulator slices
    for j, i in enumerate(idx):
        np.testing.assert_array_equal(picked[j], scenes.pool.boxes[i])
    assert task.data() is data


@needs_ultralytics
def test_local_update_and_evaluate_take_the_protocols_samples(task: Any) -> None:
    pool, w0 = task.data().pool, task.pretrained()
    before = w0.copy()
    idx = np.array([5, 0, 3, 7])
    result = task.local_update(w0, pool.x[idx], pool.y[idx], ONE_EPOCH)
    np.testing.assert_array_equal(w0, before)
    assert result.n_samples == 4 and np.isfinite(result.weights).all()
    assert not np.array_equal(result.weights, w0)
    as_list = task.local_update(w0, pool.x[idx], [task.scenes().pool.boxes[i] for i in idx], ONE_EPOCH)
    np.testing.assert_array_equal(result.weights, as_list.weights)  # same boxes, same update
    metrics = task.evaluate(w0)
    assert metrics["accuracy"] == metrics["mAP50"] and metrics["n_images"] == TINY_OPTIONS["test_scenes"]
    assert task.evaluate(w0, task.data().test) == metrics  # a protocol split scores as the scene set
    assert task.evaluate(w0, pool)["n_images"] == len(pool)


@needs_ultralytics
def test_bad_samples_and_options_are_refused(task: Any, data_dir: Path) -> None:
    from devices.report import load_task
    from edge_sdk.errors import InvalidSample

    pool, w0 = task.data().pool, task.pretrained()
    with pytest.raises(InvalidSample, match="images but"):
        task.local_update(w0, pool.x[:3], pool.y[:2], ONE_EPOCH)
    bad = pool.y[:2].copy()
    bad[1] = np.array([[9, 1, 1, 5, 5]], dtype=np.float32)  # class 9 of 5
    with pytest.raises(InvalidSample, match="class ids"):
        task.local_update(w0, pool.x[:2], bad, ONE_EPOCH)
    with pytest.raises(ConfigError, match=r"unknown detection option.*pool_frames"):
        load_task("detection", {"pool_frames": 12, "data_dir": str(data_dir)})
    with pytest.raises(ConfigError, match="deployed_seed must be an integer"):
        load_task("detection", {**TINY_OPTIONS, "deployed_seed": "0", "data_dir": str(data_dir)})


@needs_ultralytics
def test_deployed_seed_fixes_the_deployed_model(task: Any, data_dir: Path) -> None:
    from devices.report import load_task

    np.testing.assert_array_equal(task.pretrained(seed=3), task.pretrained(seed=0))
    per_seed = load_task("detection", {**TINY_OPTIONS, "data_dir": str(data_dir)})
    np.testing.assert_array_equal(per_seed.pretrained(seed=0), task.pretrained())  # the same cache entry
    assert not np.array_equal(per_seed.pretrained(seed=1), task.pretrained())


@needs_ultralytics
def test_the_shipped_scenarios_quick_form_trains_and_its_seed_matters(task: Any, data_dir: Path) -> None:
    """The shipped scenario's quick form, shrunk to the tiny task and two devices, trains
    the detector through the emulator; another seed gives another fleet and another model."""
    from coordinator.methods import make_method
    from devices.report import load_task
    from devices.simulator import Simulation

    scenario = load_scenario(SCENARIO).quick().with_overrides({
        "task_options": {**TINY_OPTIONS, "data_dir": str(data_dir), "deployed_seed": 0},
        "fleet.devices": 2, "duration_s": 240, "eval_every_s": 60, "device.min_samples": 2,
        "data.arrival_rate_per_h": 360, "training.epochs": 1, "training.batch_size": 4,
    })
    spec = scenario.runs[0]  # SPIN, the paper rule
    det = load_task(spec.settings.task, spec.settings.task_options)
    finals, plans = [], []
    for seed in (0, 1):
        method = make_method(spec.strategy, params=spec.params)
        sim = Simulation(det, spec.settings, method.strategy, peering=method.peering, seed=seed)
        result = sim.run()
        assert result.summary["trainings"] >= 1 and result.summary["versions"] >= 1
        assert result.summary["updates_rejected"] == 0
        assert result.rows[0]["accuracy"] == det.evaluate(det.pretrained())["accuracy"]  # one deployed model
        finals.append(sim.coordinator.weights)
        plans.append([p.samples.tolist() for p in sim.plans])
    assert plans[0] != plans[1]
    assert not np.array_equal(finals[0], finals[1])
