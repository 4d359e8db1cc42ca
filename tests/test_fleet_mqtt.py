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
from tests.helpers import wait_until

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
            # version 3 is committed before the acks of its last updates reach their devices: wait for them
            wait_until(lambda: fleet.stats.acked >= 60, 30, "the acks of the 60 aggregated updates at the devices")
            assert fleet.stats.acked >= 60 and fleet.stats.rejected == 0
            assert daemon.core.counters["rejected"] == 0


def test_emulate_broker_mode_plays_a_scenario_against_a_coordinator(mosquitto: MosquittoProcess, tmp_path: Path) -> None:
    """`edgeci emulate SCENARIO --broker URL`: the scenario's own fleet, in real time × scale."""
    import subprocess
    import sys

    scenario = tmp_path / "tiny.toml"
    scenario.write_text(
        'name = "tiny"\ndescription = "12 devices"\ntask = "digits"\nduration_s = 600\neval_every_s = 60\n'
        "target_accuracy = 0.8\nseeds = [0]\n[fleet]\ndevices = 12\n[data]\narrival_rate_per_h = 360\n"
        '[device]\nmin_samples = 3\n[training]\nepochs = 1\n[[runs]]\nstrategy = "spin"\nparams = { k = 4, timeout_s = 5.0 }\n'
    )
    task = get_task("digits")
    daemon = CoordinatorDaemon(
        CoordinatorOptions(broker=mosquitto.url, region="em", state_dir=tmp_path / "c", strategy_params={"k": 4, "timeout_s": 1.0}),
        task=task,
    )
    root = Path(__file__).resolve().parents[1]
    with daemon:
        out = subprocess.run(
            [sys.executable, "-m", "demos.cli", "emulate", str(scenario), "--broker", mosquitto.url, "--region", "em",
             "--time-scale", "20", "--no-progress", "--out", str(tmp_path / "out")],
            capture_output=True, text=True, timeout=180, cwd=root,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        assert "12 MQTT devices" in out.stdout, out.stdout
        assert len(daemon.core.devices_seen) >= 10
        assert daemon.core.version >= 2 and daemon.core.counters["accepted"] >= 8
    lines = (tmp_path / "out" / "timeline.csv").read_text().splitlines()
    assert lines[0] == "wall_s,virtual_s,version,accuracy" and len(lines) >= 3
    assert (tmp_path / "out" / "accuracy.png").read_bytes()[:4] == b"\x89PNG"


def test_emulate_broker_mode_without_a_coordinator_says_so_and_fails(mosquitto: MosquittoProcess, tmp_path: Path) -> None:
    """New-user trial: `edgeci emulate ... --broker URL` on a region no coordinator serves printed
    `accuracy nan% (v-1) → nan% (v-1)` and exited 0. It now warns while it runs and fails at the end."""
    import subprocess
    import sys

    scenario = tmp_path / "tiny.toml"
    scenario.write_text(
        'name = "tiny"\ntask = "digits"\nduration_s = 480\neval_every_s = 60\nseeds = [0]\n[fleet]\ndevices = 3\n'
        '[data]\narrival_rate_per_h = 360\n[device]\nmin_samples = 3\n[[runs]]\nstrategy = "spin"\n'
    )
    out = subprocess.run(
        [sys.executable, "-m", "demos.cli", "emulate", str(scenario), "--broker", mosquitto.url, "--region", "nobody",
         "--time-scale", "40", "--no-progress", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1],
    )
    assert out.returncode == 1, (out.stdout[-2000:], out.stderr[-2000:])
    said = "no model from a coordinator of region 'nobody' on " + mosquitto.url
    assert f"warning: {said} after " in out.stderr and f"error: {said} in 12 s" in out.stderr, out.stderr[-2000:]
    assert "is `edgeci coordinator --region nobody` running there?" in out.stderr
