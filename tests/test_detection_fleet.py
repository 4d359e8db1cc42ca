"""The detection task behind the Task protocol, as the fleet emulator drives it.

Tiny on purpose (2 cores, one torch thread): 64 px frames, a one-step "pretraining" cached
in a temp data dir, 1-epoch updates on a few frames. Whether fine-tuning on the new class
raises mAP50 is measured by ``benchmarks/detection_finetune.py`` and the scenario
``demos/scenarios/detection-spin-vs-fedbuff.toml``, not here.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

# Not importorskip: importing ultralytics before the task points it at its data dir would
# write ~/.config/Ultralytics.
if importlib.util.find_spec("ultralytics") is None:
    pytest.skip("needs the optional detection extra (ultralytics)", allow_module_level=True)

import torch

from coordinator.strategies import make_strategy
from devices.scenario import Settings, load_scenario
from devices.simulator import Simulation
from edge_sdk.errors import InvalidSample
from edge_sdk.tasks import get_task, known_tasks
from edge_sdk.tasks.base import Task, TrainConfig
from edge_sdk.tasks.detection import DEFAULT_TRAIN, DetectionConfig
from edge_sdk.tasks.detection_fleet import FLEET_CONFIG, DetectionFleetTask
from edge_sdk.tasks.scenes import NEW_CLASS

SIZE = 64
TINY = DetectionConfig(
    imgsz=SIZE,
    scene_size=SIZE,
    pretrain_scenes=8,
    pretrain_epochs=1,
    pretrain_batch=8,
    pool_scenes=12,
    test_scenes=6,
    hflip=0.0,
)
ONE_EPOCH = TrainConfig(epochs=1, batch_size=4, lr=5e-4, seed=3)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> DetectionFleetTask:
    return DetectionFleetTask(TINY, data_dir=tmp_path_factory.mktemp("edgeci-fleet-data"))


def test_registered_and_satisfies_the_task_protocol(task: DetectionFleetTask) -> None:
    assert "detection-fleet" in known_tasks()
    assert isinstance(task, Task)
    again = get_task("detection-fleet", config=TINY, data_dir=task.detection.data_dir)
    assert isinstance(again, DetectionFleetTask)
    assert again.spec.fingerprint == task.spec.fingerprint
    # The emulator's default keeps the detection task's default pretraining (shared cache).
    assert dataclasses.replace(FLEET_CONFIG, pool_scenes=256, test_scenes=200) == DetectionConfig()


def test_data_is_frames_and_indices_into_the_box_table(task: DetectionFleetTask) -> None:
    data, scenes = task.data(), task.detection.data()
    assert data.n_classes == TINY.n_classes
    for split, ref in (
        (data.pool, scenes.pool),
        (data.test, scenes.test),
        (data.pretrain, scenes.pretrain),
    ):
        assert split.x.dtype == np.uint8 and split.x.shape == (len(ref), SIZE, SIZE, 3)
        assert split.y.dtype == np.int64 and split.y.shape == (len(ref),)
        np.testing.assert_array_equal(split.x, ref.images)
        for i, k in enumerate(split.y):
            np.testing.assert_array_equal(task.boxes[int(k)], ref.boxes[i])
    np.testing.assert_array_equal(data.pool.y, np.arange(TINY.pool_scenes))  # the pool's own boxes
    all_y = np.concatenate([data.pool.y, data.test.y, data.pretrain.y])
    assert sorted(all_y.tolist()) == list(range(len(task.boxes)))
    assert all(NEW_CLASS in task.boxes[int(k)][:, 0] for k in data.pool.y)  # users box the star
    assert task.data() is data


def test_local_update_maps_indices_to_boxes(task: DetectionFleetTask) -> None:
    pool, w0 = task.data().pool, task.pretrained()
    before = w0.copy()
    idx = np.array([5, 0, 3, 7], dtype=np.int64)
    result = task.local_update(w0, pool.x[idx], pool.y[idx], ONE_EPOCH)
    np.testing.assert_array_equal(w0, before)  # the input vector is untouched
    assert result.n_samples == 4 and result.weights.shape == w0.shape
    assert np.isfinite(result.weights).all() and not np.array_equal(result.weights, w0)
    direct = task.detection.local_update(
        w0, pool.x[idx], [task.boxes[int(i)] for i in idx], ONE_EPOCH
    )
    np.testing.assert_array_equal(result.weights, direct.weights)  # same boxes, same update
    assert result.extra["lr"] == ONE_EPOCH.lr


def test_generic_default_lr_becomes_the_detectors(task: DetectionFleetTask) -> None:
    assert task.training_config(TrainConfig()).lr == DEFAULT_TRAIN.lr  # 0.05 would wreck YOLO
    assert task.training_config(ONE_EPOCH) == ONE_EPOCH  # any lr a scenario sets is kept


def test_bad_indices_are_refused(task: DetectionFleetTask) -> None:
    pool, w0 = task.data().pool, task.pretrained()
    with pytest.raises(InvalidSample, match="out of range"):
        task.local_update(w0, pool.x[:2], np.array([0, len(task.boxes)], dtype=np.int64), ONE_EPOCH)
    with pytest.raises(InvalidSample, match="frames but"):
        task.local_update(w0, pool.x[:3], pool.y[:2], ONE_EPOCH)


def test_evaluate_reports_map50_as_accuracy(task: DetectionFleetTask) -> None:
    w0 = task.pretrained()
    metrics = task.evaluate(w0)
    assert metrics["accuracy"] == metrics["mAP50"]
    assert 0.0 <= metrics["mAP50"] <= 1.0 and metrics["n_images"] == TINY.test_scenes
    assert task.evaluate(w0, task.data().test) == metrics
    pool = task.data().pool
    on_pool = task.evaluate(w0, pool)
    assert on_pool["n_images"] == len(pool) and "ap50_new" in on_pool


def test_the_deployed_seed_picks_the_model_and_the_run_seed_does_not(task: DetectionFleetTask) -> None:
    """A fleet has one deployed detector: every emulator run seed starts from it, while the
    adapter's ``deployed_seed`` (what does choose the model) gives another one."""
    other = DetectionFleetTask(TINY, data_dir=task.detection.data_dir, deployed_seed=1)
    assert not np.array_equal(other.pretrained(seed=0), task.pretrained(seed=0))
    np.testing.assert_array_equal(task.pretrained(seed=3), task.pretrained(seed=0))
    np.testing.assert_array_equal(other.pretrained(seed=3), other.pretrained(seed=0))


def test_the_emulator_drives_it(task: DetectionFleetTask) -> None:
    settings = Settings(
        task="detection-fleet",
        duration_s=240.0,
        eval_every_s=60.0,
        devices=2,
        mix={"headset": 1.0},
        partition="iid",
        arrival_rate_per_h=360.0,
        min_samples=2,
        epochs=1,
        batch_size=4,
        lr=5e-4,
        target_accuracy=0.99,
    )
    strategy = make_strategy("spin", k=1, timeout_s=10.0)
    result = Simulation(task, settings, strategy, seed=0).run()
    assert result.summary["versions"] >= 1 and result.summary["trainings"] >= 1
    assert result.summary["updates_rejected"] == 0
    assert result.rows[0]["accuracy"] == task.evaluate(task.pretrained())["mAP50"]


def test_the_shipped_scenario_loads() -> None:
    scenario = load_scenario(REPO / "demos" / "scenarios" / "detection-spin-vs-fedbuff.toml")
    for s in (scenario, scenario.quick()):
        assert s.settings.task == "detection-fleet" and s.settings.partition == "iid"
        assert s.settings.lr < 0.01  # YOLO's AdamW rate, not the classification default
    assert {r.strategy for r in scenario.runs} == {"spin", "fedbuff"}
