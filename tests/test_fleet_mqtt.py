"""Real-MQTT fleet mode at scale: 200 devices in one process, each its own MQTT client with
the real SDK, against mosquitto and a coordinator, through real aggregations."""

from __future__ import annotations

import resource
import time
from pathlib import Path

import pytest

from coordinator.broker import MosquittoProcess
from coordinator.daemon import CoordinatorDaemon, CoordinatorOptions
from devices.mqtt_fleet import MqttFleet
from devices.partition import partition
from edge_sdk.tasks import get_task
from edge_sdk.tasks.base import TrainConfig

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def test_200_devices_in_one_process_through_aggregations(mosquitto: MosquittoProcess, tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:  # 200 clients × (socket + SQLite db/wal/shm)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(8192, hard), hard))
    task = get_task("digits")
    parts = partition(task.data().pool.y, 200, "iid", seed=0)
    daemon = CoordinatorDaemon(
        CoordinatorOptions(broker=mosquitto.url, region="big", state_dir=tmp_path / "c", strategy_params={"k": 20, "timeout_s": 5.0}),
        task=task,
    )
    with daemon:
        fleet = MqttFleet(
            broker=mosquitto.url, region="big", task=task, partitions=parts, rate=0.5, min_samples=2,
            train=TrainConfig(epochs=1),
        )
        with fleet:
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                if daemon.core.version >= 3 and fleet.max_version() >= 1 and len(daemon.core.devices_seen) == 200:
                    break
                time.sleep(0.5)
            assert all(c.transport.connected for c in fleet.clients)
            assert len(daemon.core.devices_seen) == 200
            assert daemon.core.version >= 3, daemon.core.status()
            assert fleet.max_version() >= 1  # devices received an aggregated version on a later pull
            assert fleet.stats.acked >= 60 and fleet.stats.rejected == 0
            assert daemon.core.counters["rejected"] == 0
