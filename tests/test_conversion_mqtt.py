"""Issue 15 over a real mosquitto: a coordinator converting a very stale update on its worker
keeps answering pulls and acknowledging updates meanwhile, then aggregates the conversion."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from coordinator.broker import MosquittoProcess
from coordinator.cli_status import render
from coordinator.core import ConvertUpdate
from coordinator.daemon import CoordinatorDaemon, CoordinatorOptions
from edge_sdk.mqtt import MqttTransport
from edge_sdk.spec import Vector
from edge_sdk.tasks import get_task
from edge_sdk.tasks.base import TrainConfig
from edge_sdk.wire import topics
from edge_sdk.wire.codec import decode, encode, parse_status_json, status_json
from edge_sdk.wire.messages import Ack, ModelMsg, Pull, Update
from tests.helpers import wait_until

pytestmark = [pytest.mark.broker]
REGION = "stale"


def status_json_dict(status: object) -> dict[str, object]:
    return parse_status_json(status_json(status))  # type: ignore[arg-type]


class HeldConverter:
    """Blocks inside ``convert`` until the test lets it go: the conversion is 'running'."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.go = threading.Event()
        self.requests: list[ConvertUpdate] = []

    def convert(self, request: ConvertUpdate) -> Vector:
        self.requests.append(request)
        self.started.set()
        assert self.go.wait(30), "the test never released the conversion"
        return np.asarray(request.target_weights + (request.stale_weights - request.base_weights), dtype=np.float32)


class Device:
    """A bare device on the wire: publishes pulls and updates, records models and acks."""

    def __init__(self, url: str, device: str) -> None:
        self.device = device
        self.models: list[tuple[float, ModelMsg]] = []
        self.acks: list[Ack] = []
        self.t = MqttTransport(url, client_id=f"dev-{device}", on_message=self._on, clean_session=True,
                               subscriptions=[topics.device_topic(REGION, device, "model"), topics.device_topic(REGION, device, "ack")])
        self.t.start()

    def _on(self, topic: str, payload: bytes) -> None:
        msg = decode(payload)
        if isinstance(msg, ModelMsg):
            self.models.append((time.monotonic(), msg))
        elif isinstance(msg, Ack):
            self.acks.append(msg)

    def pull(self, seq: int) -> None:
        self.t.publish(topics.device_topic(REGION, self.device, "pull"), encode(Pull(device=self.device, seq=seq, model_id="digits-cnn")))

    def update(self, seq: int, base: int, weights: Vector) -> None:
        self.t.publish(topics.device_topic(REGION, self.device, "update"), encode(Update(
            device=self.device, seq=seq, model_id="digits-cnn", base_version=base, n_samples=20, weights=weights, nonce=seq + 1)))

    def acked(self, seq: int) -> bool:
        return any(a.seq == seq and a.status == "accepted" for a in self.acks)


def test_the_coordinator_serves_pulls_and_updates_while_a_conversion_runs(mosquitto: MosquittoProcess, tmp_path: Path) -> None:
    task = get_task("digits")
    converter = HeldConverter()
    daemon = CoordinatorDaemon(
        CoordinatorOptions(require_pull=False, broker=mosquitto.url, region=REGION, state_dir=tmp_path / "coord", status_interval_s=1.0,
                           strategy_params={"k": 1, "timeout_s": None, "clip_multiplier": 0.0, "sample_weight_cap": 0.0,
                                            "staleness": "gradient-inversion", "convert_beyond": 2}),
        task=task, converter=converter,
    ).start()
    fast, slow = Device(mosquitto.url, "fast"), Device(mosquitto.url, "slow")
    try:
        w0 = np.array(daemon.core.weights, copy=True)
        rng = np.random.default_rng(0)
        for seq in range(4):  # four versions from the fresh device
            base = daemon.core.version
            fast.update(seq, base, (daemon.core.weights + rng.normal(0, 1e-3, w0.size)).astype(np.float32))
            wait_until(lambda b=base: daemon.core.version == b + 1, 20, f"version {base + 1}")
        slow.update(0, 0, (w0 + 0.01).astype(np.float32))  # based on version 0: staleness 4 > 2
        assert converter.started.wait(20), "no conversion was asked for"
        wait_until(lambda: slow.acked(0), 10, "the stale update's ack (durable before conversion)")
        assert daemon.core.counters["conversion_requested"] == 1
        # The conversion is running on the worker: the coordinator still serves and aggregates.
        version = daemon.core.version
        fast.pull(100)
        wait_until(lambda: any(m.version == version for _, m in fast.models), 10, "a pull answered during the conversion")
        fast.update(101, version, (daemon.core.weights + 1e-3).astype(np.float32))
        wait_until(lambda: fast.acked(101) and daemon.core.version == version + 1, 10, "an update aggregated during the conversion")
        assert not converter.go.is_set() and daemon.core.counters["conversion_applied"] == 0
        converter.go.set()
        wait_until(lambda: daemon.core.counters["conversion_applied"] == 1, 20, "the converted update applied")
        wait_until(lambda: daemon.core.version == version + 2, 20, "the version made from the converted update")
        (req,) = converter.requests
        assert (req.device, req.base_version, req.target_version) == ("slow", 0, 4)
        status = daemon.core.status().extra["conversion"]
        assert status["policy"] == "gradient-inversion" and status["applied"] == 1 and status["parked"] == 0
        # operators see it: the readable status and the Prometheus metrics
        text = render(status_json_dict(daemon.core.status()), time.time())
        assert "stale     gradient-inversion: converting · requested 1 · applied 1" in text, text
        wait_until(lambda: b'edgeci_conversions_total{outcome="applied"} 1.0' in daemon.metrics.exposition(), 10,
                   "the conversion in the metrics")
    finally:
        converter.go.set()
        fast.t.stop()
        slow.t.stop()
        daemon.stop()


def test_gradient_inversion_converts_a_real_stale_update_on_a_running_coordinator(mosquitto: MosquittoProcess, tmp_path: Path) -> None:
    """The real inverter (torch) on the daemon's worker: a device's update trained from
    version 0 arrives 3 versions late and is converted before aggregation."""
    task = get_task("digits")
    pool = task.data().pool
    daemon = CoordinatorDaemon(
        CoordinatorOptions(require_pull=False, broker=mosquitto.url, region=REGION, state_dir=tmp_path / "coord", status_interval_s=1.0,
                           strategy_params={"k": 1, "timeout_s": None, "staleness": "gradient-inversion", "convert_beyond": 2},
                           hints={"epochs": 2.0, "lr": 0.05}, inversion_params={"iterations": 30, "time_budget_s": 20.0, "momentum": 0.0}),
        task=task,
    ).start()
    fast, slow = Device(mosquitto.url, "fast"), Device(mosquitto.url, "slow")
    try:
        w0 = np.array(daemon.core.weights, copy=True)
        for seq in range(3):  # three versions from the fresh device, trained on real samples
            base, weights = daemon.core.version, np.array(daemon.core.weights, copy=True)
            idx = np.arange(40 * seq, 40 * seq + 40)
            fast.update(seq, base, task.local_update(weights, pool.x[idx], pool.y[idx], TrainConfig(epochs=2, lr=0.05, seed=seq)).weights)
            wait_until(lambda b=base: daemon.core.version == b + 1, 30, f"version {base + 1}")
        idx = np.arange(200, 240)
        stale = task.local_update(w0, pool.x[idx], pool.y[idx], TrainConfig(epochs=2, lr=0.05, seed=9)).weights
        slow.update(0, 0, stale)  # staleness 3 > 2
        wait_until(lambda: daemon.core.counters["conversion_applied"] + daemon.core.counters["conversion_failed"] >= 1, 90,
                   "the conversion's answer")
        assert daemon.core.counters["conversion_requested"] == 1 and daemon.core.counters["conversion_applied"] == 1
        wait_until(lambda: daemon.core.version == 4, 20, "the version made from the converted update")
        assert daemon.conversions is not None and daemon.conversions.done == 1
        assert np.isfinite(daemon.core.weights).all() and not np.array_equal(daemon.core.weights, stale)
    finally:
        fast.t.stop()
        slow.t.stop()
        daemon.stop()
