"""The zero-setup path: the embedded amqtt broker, the in-process coordinator and devices
(the `edgeci run` main job, shortened)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from coordinator.broker import EmbeddedBroker
from coordinator.cli_status import read_status
from coordinator.daemon import CoordinatorDaemon, CoordinatorOptions
from edge_sdk.client import EdgeClient
from edge_sdk.errors import InvalidSample
from edge_sdk.tasks import get_task
from edge_sdk.tasks.base import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def _wait(predicate: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.slow
def test_main_job_on_embedded_broker_improves_accuracy(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "demos.cli", "run", "--devices", "8", "--duration", "25", "--rate", "3",
         "--no-progress", "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    line = out.stdout.strip().splitlines()[-1]
    m = re.search(
        r"release accuracy ([\d.]+)% → ([\d.]+)% \| release v0 → v(\d+) \(training line v(\d+)\) \| "
        r"candidates promoted (\d+), held (\d+), rejected (\d+) \| updates accepted (\d+)", line)
    assert m, line
    before, after, release, training = float(m[1]), float(m[2]), int(m[3]), int(m[4])
    promoted, held, rejected, accepted = (int(m[i]) for i in range(5, 9))
    assert after > before + 5.0, line
    # the gate judged the candidates; every promotion moved the release, which never exceeds the training line
    assert promoted >= 1 and release <= training and promoted + held + rejected <= training, line
    assert accepted >= training - rejected
    # the release never ends worse than the deployed start by more than the gate's margin
    assert after >= before - 2.0
    png = tmp_path / "run" / "accuracy.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"]["version"] == training and metrics["status"]["extra"]["release"] == release
    assert metrics["release"][0][:2] == [0.0, 0] and metrics["training"][0][:2] == [0.0, 0]  # time from the first label


def test_sdk_round_trip_on_embedded_broker(tmp_path: Path) -> None:
    """One device through the SDK: threshold, pull, train, push, ack, deploy, predict."""
    task = get_task("digits")
    pool = task.data().pool
    with EmbeddedBroker() as broker:
        daemon = CoordinatorDaemon(
            CoordinatorOptions(broker=broker.url, region="emb", state_dir=tmp_path / "c", strategy_params={"k": 1, "timeout_s": 5.0}),
            task=task,
        )
        with daemon:
            client = EdgeClient(broker=broker.url, device_id="solo", region="emb", task=task, data_dir=tmp_path / "d", min_samples=4, train=TrainConfig(epochs=1))
            acked: list[dict[str, object]] = []
            client.on("update_acked", lambda kind, data: acked.append(data))
            with client:
                # a new device asks for the release when it starts: it predicts before any label
                assert client.wait_for_version(0, timeout=60), "the serving request was never answered"
                assert client.ready and client.predict(pool.x[:2]).shape == (2,)
                with pytest.raises(InvalidSample):
                    client.add_sample(pool.x[0][:, :4], 1)  # wrong shape: typed, nothing stored
                assert client.store.count() == 0
                for i in range(4):
                    client.add_sample(pool.x[i], int(pool.y[i]))
                assert client.wait_for_version(0, timeout=60), "the first pull was never answered"
                _wait(lambda: bool(acked), 60)
                assert acked[0]["status"] == "accepted"
                # SPIN devices receive new versions on their next pull: one more label.
                client.add_sample(pool.x[4], int(pool.y[4]))
                assert client.wait_for_version(1, timeout=60), "the device never received version 1"
                assert client.predict(pool.x[:5]).shape == (5,)
            status = read_status(broker.url, "emb")
            assert status["version"] >= 1 and status["updates_accepted"] >= 1 and status["devices_seen"] == 1


def test_gesture_device_predicts_with_onnx_and_hot_swaps(tmp_path: Path) -> None:
    """A gesture device: (T, D) sequences through the same SDK; ONNX serves predictions and
    follows each new version; torch and onnxruntime agree on the deployed model; after
    ``stop()`` it still predicts with the last one."""
    task = get_task("gestures")
    pool = task.data().pool
    with EmbeddedBroker() as broker:
        daemon = CoordinatorDaemon(
            CoordinatorOptions(broker=broker.url, region="g", state_dir=tmp_path / "c", model="gestures", strategy_params={"k": 1, "timeout_s": 5.0}),
            task=task,
        )
        with daemon, EdgeClient(broker=broker.url, device_id="glove", region="g", task=task, data_dir=tmp_path / "d", min_samples=4, train=TrainConfig(epochs=1)) as client:
            assert client.sample_kind == "gesture"
            for i in range(4):
                client.add_sample(pool.x[i], int(pool.y[i]))
            assert client.wait_for_version(0, timeout=60)
            onnx_labels = client.predict(pool.x[:64])
            torch_labels = np.argmax(task.logits(client.weights, pool.x[:64]), axis=1)  # type: ignore[attr-defined]
            assert (onnx_labels == torch_labels).mean() >= 0.98
            assert client.store.count("gesture") == 4
            _wait(lambda: client.store.unused_count() == 0, 60)  # trained on and marked
            client.add_sample(pool.x[4], int(pool.y[4]))
            assert client.wait_for_version(1, timeout=60)
            served = client.predict(pool.x[:8])
            assert client._engine is not None and client._engine.version == client.version
            version = client.version
        # After stop() the device keeps serving its last model (offline inference), the same answers.
        assert client.version == version and (client.predict(pool.x[:8]) == served).all()


def test_lasp_over_mqtt_classifier_only_versions_between_full_syncs(tmp_path: Path) -> None:
    """`--full-sync-every 3` through the real drivers: versions between full syncs change only
    the classifier slice, and devices upload only that slice."""
    from coordinator.registry import Registry

    task = get_task("digits")
    pool = task.data().pool
    with EmbeddedBroker() as broker:
        daemon = CoordinatorDaemon(
            CoordinatorOptions(broker=broker.url, region="lasp", state_dir=tmp_path / "c", strategy_params={"k": 1, "timeout_s": 5.0}, full_sync_every=3),
            task=task,
        )
        with daemon, EdgeClient(broker=broker.url, device_id="lean", region="lasp", task=task, data_dir=tmp_path / "d", min_samples=2,
                                train=TrainConfig(epochs=1), inference="torch") as client:
            for i in range(7):
                client.add_sample(pool.x[i], int(pool.y[i]))
                if i >= 1:  # from D_min = 2 on, every new label yields one update → one version (K = 1)
                    _wait(lambda i=i: daemon.core.version >= i, 60)
            _wait(lambda: daemon.core.version >= 6, 60)
        reg = Registry(tmp_path / "c", task.spec)
        ext = task.spec.group_slice("extractor")
        for v in range(1, 7):
            before, after = reg.read_version(v - 1)[0], reg.read_version(v)[0]
            full = reg.read_version(v)[1]["full_sync"]
            assert full == (v % 3 == 0), v
            if not full:
                np.testing.assert_array_equal(after[ext], before[ext])
        assert daemon.core.status().extra["full_sync_every"] == 3


def test_a_client_gets_the_retained_messages_of_its_own_filters_only() -> None:
    """amqtt 0.12 sent a connecting client the retained messages of *every* client's filters: a
    device got its region's status and its own presence, a coordinator another region's status
    (helper-117). A SUBSCRIBE still brings the retained messages its filter matches."""
    import queue

    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    def client(name: str, got: queue.Queue[tuple[str, bytes]] | None = None) -> tuple[paho.Client, threading.Event]:
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=name, clean_session=False)
        subscribed = threading.Event()
        c.on_subscribe = lambda *a: subscribed.set()
        if got is not None:
            c.on_message = lambda cl, u, m: got.put((m.topic, bytes(m.payload)))
        c.connect(broker.host, broker.port)
        c.loop_start()
        return c, subscribed

    with EmbeddedBroker() as broker:
        holder, held = client("coordinator-eu")  # holds the filters whose retained messages went astray
        holder.subscribe([("edgeci/v1/eu/status", 1), ("edgeci/v1/eu/dev/+/presence", 1)])
        assert held.wait(10)
        publisher, _ = client("publisher")
        for topic, payload in [("edgeci/v1/eu/status", b"status"), ("edgeci/v1/eu/dev/d1/presence", b"online"),
                               ("edgeci/v1/eu/dev/d1/model", b"mine")]:
            publisher.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)
        got: queue.Queue[tuple[str, bytes]] = queue.Queue()
        for attempt in range(2):  # a first connect, then the same (persistent) session again
            device, subscribed = client("dev-eu-d1", got)
            device.subscribe("edgeci/v1/eu/dev/d1/model", qos=1)
            assert subscribed.wait(10)
            assert got.get(timeout=10) == ("edgeci/v1/eu/dev/d1/model", b"mine"), attempt
            time.sleep(0.5)  # what else would have come, has
            topics = [got.get_nowait()[0] for _ in range(got.qsize())]
            assert set(topics) <= {"edgeci/v1/eu/dev/d1/model"}, (attempt, topics)
            device.disconnect()
            device.loop_stop()
        for c in (holder, publisher):
            c.disconnect()
            c.loop_stop()


def test_devices_and_coordinators_of_two_regions_reject_nothing_on_the_embedded_broker(tmp_path: Path) -> None:
    """helper-117's reproduction: two regions' coordinators and a device started twice on the
    embedded broker; nobody receives, rejects or drops a message on a topic it did not subscribe to."""
    task = get_task("digits")
    with EmbeddedBroker() as broker:
        eu = CoordinatorDaemon(CoordinatorOptions(broker=broker.url, region="eu", state_dir=tmp_path / "eu"), task=task)
        us = CoordinatorDaemon(CoordinatorOptions(broker=broker.url, region="us", state_dir=tmp_path / "us"), task=task)
        with eu, us:
            for _ in range(2):  # the second start finds its own retained presence ("offline") on the broker
                rejected: list[dict[str, object]] = []
                client = EdgeClient(broker=broker.url, device_id="d1", region="eu", task=task, data_dir=tmp_path / "d")
                client.on("message_rejected", lambda kind, data, rejected=rejected: rejected.append(data))
                with client:
                    assert client.wait_for_version(0, timeout=60)
                    time.sleep(0.5)
                assert rejected == [] and client.transport.unsubscribed_messages == 0
            for daemon in (eu, us):
                assert daemon.core.counters["messages_rejected"] == 0, daemon.core.counters
                assert daemon.transport.unsubscribed_messages == 0


def test_an_embedded_broker_whose_port_is_taken_refuses_to_start_or_picks_another(monkeypatch: pytest.MonkeyPatch) -> None:
    """An explicit port in use is a TransportError after which stop() has nothing to do (it
    raised RuntimeError on the failed start's loop); a port free_port() picked that another
    process bound first is picked again, as MosquittoProcess does."""
    import socket

    import coordinator.broker as broker_module
    from edge_sdk.errors import TransportError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        refused = EmbeddedBroker(port=port)
        with pytest.raises(TransportError, match="address already in use"):
            refused.start()
        refused.stop()
        handed = iter([port])  # free_port hands out the taken port, once
        real = broker_module.free_port
        monkeypatch.setattr(broker_module, "free_port", lambda host="127.0.0.1": next(handed, None) or real(host))
        broker = EmbeddedBroker()
        assert broker.port == port
        with broker:
            assert broker.port != port
            with socket.create_connection(("127.0.0.1", broker.port), timeout=5):
                pass


def test_an_embedded_broker_that_does_not_start_in_time_leaves_nothing_running(monkeypatch: pytest.MonkeyPatch) -> None:
    """A start past its timeout is a TransportError and the broker does not come up later on
    its own (its thread went on and bound the port, with nothing left to stop it)."""
    import asyncio
    import socket
    import threading

    from amqtt.broker import Broker

    from edge_sdk.errors import TransportError

    slow_start = Broker.start

    async def late(self: Broker) -> None:
        await asyncio.sleep(1.0)
        await slow_start(self)

    monkeypatch.setattr(Broker, "start", late)
    broker = EmbeddedBroker()
    with pytest.raises(TransportError, match="did not start within"):
        broker.start(timeout=0.2)
    time.sleep(1.5)  # past the slow start
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", broker.port), timeout=2):
        pass
    assert not any(t.name == "amqtt-broker" and t.is_alive() for t in threading.enumerate())


def test_address_in_use_is_found_through_causes_and_contexts_even_in_a_cycle() -> None:
    import errno

    from coordinator.broker import _address_in_use
    from edge_sdk.errors import TransportError

    looped = TransportError("looped")
    looped.__cause__ = looped  # `raise e from e` is legal: the walk must end
    assert not _address_in_use(looped)
    wrapped = TransportError("wrapped")
    wrapped.__cause__ = ValueError("cause")
    wrapped.__context__ = OSError(errno.EADDRINUSE, "Address already in use")  # behind a cause that is not it
    assert _address_in_use(wrapped)
