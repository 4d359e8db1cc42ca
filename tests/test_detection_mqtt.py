"""Detection end to end as a device app uses it (helper-182): ``EdgeClient.add_frame`` on two
devices, `edgeci coordinator --model detection --init FILE --validation FILE` over mosquitto,
the gate's mAP50 verdict, and ``EdgeClient.detect()`` serving the released version.

The detector is a tiny stand-in (one epoch on 8 scenes at 64 px, seconds): what is checked is
the path (frames and boxes stored, trained, aggregated, gated, released, exported and served),
not how well it detects (``benchmarks/detection_finetune.py`` and the emulator measure that)."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from coordinator.broker import MosquittoProcess
from tests.helpers import CoordinatorProcess, wait_until

if importlib.util.find_spec("ultralytics") is None:  # (not importorskip: see tests/test_detection.py)
    pytest.skip("needs the optional detection extra (ultralytics)", allow_module_level=True)

pytestmark = [pytest.mark.broker, pytest.mark.slow]

SIZE = 64


@pytest.fixture
def one_thread() -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_frames_labelled_on_devices_come_back_as_a_gated_release_that_detect_serves(
        mosquitto: MosquittoProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None) -> None:
    from coordinator.validation import save_validation
    from edge_sdk.client import EdgeClient
    from edge_sdk.modelio import save_model
    from edge_sdk.tasks.base import Split
    from edge_sdk.tasks.detection import DetectionConfig, DetectionTask
    from edge_sdk.tasks.scenes import make_scenes, new_class_config

    monkeypatch.setenv("EDGECI_HOME", str(tmp_path / "home"))  # the devices' and the coordinator's detector data
    tiny = DetectionTask(DetectionConfig(imgsz=SIZE, scene_size=SIZE, pretrain_scenes=8, pretrain_epochs=1, pretrain_batch=8,
                                         pool_scenes=4, test_scenes=4, hflip=0.0), data_dir=tmp_path / "tiny")
    save_model(tmp_path / "init.npz", tiny.spec, tiny.pretrained(seed=0), {"version": 0})  # as `edgeci pretrain` would
    val = make_scenes(6, seed=5, config=new_class_config(SIZE))
    boxes = np.empty(len(val.images), dtype=object)
    for i, b in enumerate(val.boxes):
        boxes[i] = np.asarray(b, np.float32)
    save_validation(tmp_path / "val.npz", Split(x=np.asarray(val.images), y=boxes))
    pool = make_scenes(8, seed=9, config=new_class_config(SIZE))
    # --gate-margin 0.99: the stand-in's candidates are promoted whatever they score (the path is under test)
    with CoordinatorProcess("--broker", mosquitto.url, "--region", "det", "--state-dir", str(tmp_path / "state"),
                            "--model", "detection", "--init", str(tmp_path / "init.npz"), "--validation",
                            str(tmp_path / "val.npz"), "--gate-margin", "0.99", "--k", "2", "--timeout", "5") as coord:
        clients = [EdgeClient(broker=mosquitto.url, region="det", device_id=f"cam-{i}", data_dir=tmp_path / f"cam-{i}",
                              task="detection", min_samples=4, refresh_s=3.0) for i in range(2)]
        failed: list[object] = []
        for c in clients:
            c.on("training_failed", lambda kind, info: failed.append(info))
            c.start()
        try:
            for c in clients:
                assert c.wait_for_version(0, timeout=60) and c.version == 0
            assert clients[0].detect(pool.images[0]).shape[1:] == (6,)  # the --init model, exported on first use
            for i, c in enumerate(clients):
                for j in range(4):
                    c.add_frame(pool.images[4 * i + j], pool.boxes[4 * i + j])  # D_min frames: each device trains
            wait_until(lambda: all((c.version or 0) >= 1 for c in clients), 120, "the gated release at both devices",
                       detail=lambda: f"{failed} {''.join(coord.lines[-8:])}")
            log = "".join(coord.lines)
            assert "release gate on: candidates are scored on 6 validation samples" in log, log
            assert "gate: promote version 1 → release 1" in log, log
            assert failed == []
            for c in clients:
                dets = c.detect(pool.images[0], conf=0.0)
                assert dets.dtype == np.float32 and dets.ndim == 2 and dets.shape[1] == 6
                assert c.store.stats().count == 4
            assert (tmp_path / "cam-0" / f"deployed-v{clients[0].version}.onnx").is_file()  # the release's export
            assert not (tmp_path / "cam-0" / "deployed-v0.onnx").exists()  # the previous one's removed
        finally:
            for c in clients:
                c.stop()
