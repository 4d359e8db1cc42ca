"""End to end over a real mosquitto on 127.0.0.1: a coordinator *process* (the real CLI
daemon), devices through the real SDK drivers, and hostile messages from a raw client."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.broker import MosquittoProcess
from coordinator.registry import Registry
from devices.live import LabellingLoop, LabellingUser
from devices.partition import partition
from edge_sdk.client import EdgeClient
from edge_sdk.core.device import Phase
from edge_sdk.mqtt import MqttTransport
from edge_sdk.tasks import get_task
from edge_sdk.tasks.base import Split, TrainConfig
from edge_sdk.wire import topics
from edge_sdk.wire.codec import decode, encode, parse_status_json
from edge_sdk.wire.messages import Ack, Update
from tests.helpers import CoordinatorProcess, wait_steady, wait_until

pytestmark = [pytest.mark.broker, pytest.mark.slow]
REGION = "it"
ROOT = Path(__file__).resolve().parents[1]



class Watcher:
    """A raw MQTT client: reads the retained status and a probe device's acks."""

    def __init__(self, url: str, probe: str = "probe-1") -> None:
        self.status: dict[str, Any] = {}
        self.acks: list[Ack] = []
        self.probe = probe
        self._lock = threading.Lock()
        self.t = MqttTransport(
            url,
            client_id="watcher",
            subscriptions=[topics.status_topic(REGION), topics.device_topic(REGION, probe, "ack")],
            on_message=self._on,
            clean_session=True,
        )
        self.t.start()

    def _on(self, topic: str, payload: bytes) -> None:
        with self._lock:
            if topic.endswith("/status"):
                self.status = parse_status_json(payload)
            else:
                msg = decode(payload)
                assert isinstance(msg, Ack)
                self.acks.append(msg)

    def get(self, key: str, default: Any = 0) -> Any:
        with self._lock:
            return self.status.get(key, default)

    def extra(self, key: str) -> Any:
        with self._lock:
            return self.status.get("extra", {}).get(key)

    def send_update(self, payload: bytes) -> None:
        self.t.publish(topics.device_topic(REGION, self.probe, "update"), payload)

    def close(self) -> None:
        self.t.stop()


@contextmanager
def coordinator_process(url: str, state_dir: Path, *, k: int = 5, timeout: float = 2.0,
                        accept_unpulled: bool = False) -> Iterator[subprocess.Popen[str]]:
    """``edgeci coordinator`` as a child process; on leaving, SIGTERM must stop it cleanly
    (unless the test killed it itself). ``accept_unpulled``: for a test's raw updates sent without a pull."""
    coord = CoordinatorProcess("--broker", url, "--region", REGION, "--state-dir", str(state_dir), "--model", "digits",
                               "--k", str(k), "--timeout", str(timeout), *(["--accept-unpulled-updates"] if accept_unpulled else []))
    terminated = False
    try:
        yield coord.proc
    finally:
        terminated = coord.proc.poll() is None
        code = coord.close()
    if terminated:
        assert code == 0, "SIGTERM must shut the coordinator down cleanly:\n" + "".join(coord.lines[-20:])
        assert any("stopped cleanly" in line for line in coord.lines), "".join(coord.lines[-20:])


class Fleet:
    """N in-process devices on the real SDK, labelling Dirichlet(1) shares of the pool."""

    def __init__(self, url: str, tmp: Path, n: int, *, rate: float, seed: int = 0) -> None:
        self.task = get_task("digits")
        pool = self.task.data().pool
        parts = partition(pool.y, n, "dirichlet", alpha=1.0, seed=seed)
        self.accepted: list[tuple[str, int]] = []
        self.clients: list[EdgeClient] = []
        users = []
        for i, idx in enumerate(parts):
            name = f"dev{i:02d}"
            c = EdgeClient(
                broker=url, device_id=name, region=REGION, task=self.task, data_dir=tmp / name,
                min_samples=6, train=TrainConfig(epochs=2, lr=0.05, seed=i), request_timeout_s=3.0, seed=i,
            )
            c.on("update_acked", lambda kind, d, name=name: self._acked(name, d))
            self.clients.append(c.start())
            users.append(LabellingUser(name=name, stream=Split(x=pool.x[idx], y=pool.y[idx]), add=c.add_sample, rate=rate))
        self.loop = LabellingLoop(users, seed=seed)

    def _acked(self, name: str, data: dict[str, Any]) -> None:
        if data["status"] == "accepted":
            self.accepted.append((name, int(data["seq"])))

    def close(self) -> None:
        self.loop.stop()
        for c in self.clients:
            c.stop()
        assert not self.loop.errors, self.loop.errors


def wait_quiet(fleet: Fleet, watcher: Watcher, timeout: float = 90.0) -> None:
    """Wait until no device is mid-round or wants to start one, and the coordinator's
    buffer is empty (the last timeout fired) — twice, a second apart, so a round that
    starts between the reads is not missed. A dropped pull's retry (3 s) plus the SPIN
    timeout can outlast any fixed sleep on a loaded machine."""
    wait_steady(lambda: all(c.core.state.phase is Phase.IDLE and not c.core.wants_pull() for c in fleet.clients)
                and watcher.get("buffered") == 0, timeout, "devices idle, none wanting a round, the coordinator's buffer empty")


def latest_weights(state_dir: Path, task: Any) -> tuple[int, np.ndarray]:
    reg = Registry(state_dir, task.spec)
    v = reg.latest()
    assert v is not None
    return v, reg.read_version(v)[0]


def test_fleet_over_mosquitto_improves_and_rejects_bad_input(mosquitto: MosquittoProcess, tmp_path: Path) -> None:
    state = tmp_path / "coord"
    with coordinator_process(mosquitto.url, state, k=5, timeout=2.0, accept_unpulled=True):  # (its probes push raw updates)
        watcher = Watcher(mosquitto.url)
        fleet = Fleet(mosquitto.url, tmp_path, 10, rate=4.0)
        task = fleet.task
        try:
            _, w0 = latest_weights(state, task)
            acc0 = task.evaluate(w0)["accuracy"]
            fleet.loop.start()
            # enough labels for a clear gain on the held-out split, through many versions
            wait_until(lambda: watcher.get("version") >= 15 and fleet.loop.labelled >= 600, 200, "15 versions and 600 labels")
            fleet.loop.stop()
            # let in-flight updates land and the last timeout fire, then the fleet is quiet
            wait_quiet(fleet, watcher)
            version, w_end = latest_weights(state, task)
            # The gain is read over the last ten versions the fleet was served, not the last
            # one alone: SPIN's rule (the paper's) makes a version that the timeout closes on
            # one update that device's model, and which skewed device (Dirichlet(1) shares)
            # is last is luck. Measured from 0.733: the last version 0.756 (once, CI on a
            # shared host) to 0.911, the median of the last ten 0.896-0.901 (also with two
            # busy loops beside it).
            reg = Registry(state, task.spec)
            recent = [v for v in reg.versions() if v > max(0, version - 10)]
            accs = [task.evaluate(reg.read_version(v)[0])["accuracy"] for v in recent]
            acc_end, acc_median = accs[-1], float(np.median(accs))
            print(f"\nheld-out accuracy {acc0:.3f} -> {acc_end:.3f} at version {version}, "
                  f"median of versions {recent[0]}-{version} {acc_median:.3f}")
            assert len(recent) == 10, recent
            assert acc_median > acc0 + 0.05, (acc0, accs)
            wait_until(lambda: watcher.get("version") == version, 10, "status to report the registry's version")
            assert watcher.get("devices_seen") >= 10
            assert watcher.get("buffered") == 0

            # -- a duplicated update is applied once
            before_accepted = watcher.get("updates_accepted")
            dup = encode(Update(device="probe-1", seq=1, model_id=task.spec.model_id, base_version=version, n_samples=3, weights=w_end.copy()))
            watcher.send_update(dup)
            watcher.send_update(dup)
            wait_until(lambda: len(watcher.acks) >= 2, 20, "two acks for the duplicated update")
            assert sorted(a.status for a in watcher.acks[:2]) == ["accepted", "duplicate"]
            wait_until(lambda: watcher.get("updates_duplicate") >= 1, 10, "duplicate counted")
            assert watcher.get("updates_accepted") == before_accepted + 1
            wait_until(lambda: watcher.get("buffered") == 0, 10, "the probe update to be aggregated by timeout")
            v_probe, w_probe = latest_weights(state, task)
            meta = Registry(state, task.spec).read_version(v_probe)[1]
            assert ["probe-1", 1] in meta["consumed"]

            # -- garbage, wrong shape and NaN are rejected, counted, and change nothing
            rejected0 = watcher.get("updates_rejected")
            nan = w_probe.copy()
            nan[3] = np.nan
            watcher.send_update(b"\x93\x01garbage-bytes")
            watcher.send_update(encode(Update(device="probe-1", seq=2, model_id=task.spec.model_id, base_version=v_probe, n_samples=3, weights=w_probe[:-5].copy())))
            watcher.send_update(encode(Update(device="probe-1", seq=3, model_id=task.spec.model_id, base_version=v_probe, n_samples=3, weights=nan)))
            wait_until(lambda: watcher.get("updates_rejected") >= rejected0 + 3, 20, "three rejections")
            time.sleep(3.0)  # longer than the timeout: nothing may aggregate
            reasons = watcher.extra("rejected_by_reason")
            assert reasons["malformed"] >= 1 and reasons["shape_mismatch"] >= 1 and reasons["non_finite"] >= 1
            assert [a.status for a in watcher.acks[2:]] == ["rejected", "rejected"]
            v_after, w_after = latest_weights(state, task)
            assert v_after == v_probe and watcher.get("version") == v_probe
            np.testing.assert_array_equal(w_after, w_probe)
        finally:
            fleet.close()
            watcher.close()


def test_sigkill_restart_loses_nothing_and_applies_nothing_twice(mosquitto: MosquittoProcess, tmp_path: Path) -> None:
    state = tmp_path / "coord"
    with coordinator_process(mosquitto.url, state, k=4, timeout=1.5) as proc:
        watcher = Watcher(mosquitto.url)
        fleet = Fleet(mosquitto.url, tmp_path, 10, rate=4.0, seed=1)
        try:
            fleet.loop.start()
            wait_until(lambda: watcher.get("version") >= 4, 150, "4 versions before the crash")
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            v_crash = Registry(state, fleet.task.spec).latest()
            assert v_crash is not None
            time.sleep(2.0)  # devices keep labelling and retrying into the void
            with coordinator_process(mosquitto.url, state, k=4, timeout=1.5):
                wait_until(lambda: watcher.get("version") >= v_crash + 4, 150, "4 versions after the restart")
                fleet.loop.stop()
                wait_quiet(fleet, watcher)  # retries land, the last timeout fires
                reg = Registry(state, fleet.task.spec)
                versions = reg.versions()
                assert versions == list(range(versions[0], versions[-1] + 1)), "versions must continue without gaps"
                assert versions[-1] > v_crash
                consumed: list[tuple[str, int]] = []
                for v in versions[1:]:
                    consumed += [(d, s) for d, s in reg.read_version(v)[1].get("consumed", [])]
                assert len(consumed) == len(set(consumed)), "an update was applied twice"
                kept = set(versions)
                # every update a device saw acknowledged as accepted was applied (in a retained version)
                first_kept = min(v for v in kept if v > 0)
                applied_any = set(consumed)
                late = [k for k in fleet.accepted if k not in applied_any]
                # updates consumed by versions pruned from the registry cannot be checked; none are pruned here
                assert first_kept == 1 and not late, late
                print(f"\ncrash at v{v_crash}, resumed to v{versions[-1]}, {len(consumed)} updates applied once each")
        finally:
            fleet.close()
            watcher.close()


def test_status_cli_reads_retained_status(mosquitto: MosquittoProcess, tmp_path: Path) -> None:
    with coordinator_process(mosquitto.url, tmp_path / "c"):
        out = subprocess.run(
            [sys.executable, "-m", "demos.cli", "status", "--broker", mosquitto.url, "--region", REGION, "--json"],
            capture_output=True, text=True, timeout=60, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert out.returncode == 0, out.stderr
        status = json.loads(out.stdout)
        assert status["region"] == REGION and status["version"] == 0 and status["strategy"] == "spin"


def test_broker_restart_drivers_reconnect_and_resubscribe(tmp_path: Path) -> None:
    """mosquitto goes away and comes back on the same port (empty: no sessions kept): the
    paho drivers reconnect with backoff and re-subscribe in their connect handler, and the
    device's retried pull is answered."""
    from coordinator.daemon import CoordinatorDaemon, CoordinatorOptions

    task = get_task("digits")
    pool = task.data().pool
    broker = MosquittoProcess().start()
    port = broker.port
    try:
        daemon = CoordinatorDaemon(
            CoordinatorOptions(require_pull=False, broker=broker.url, region=REGION, state_dir=tmp_path / "c", strategy_params={"k": 1, "timeout_s": 5.0}),
            task=task,
        ).start()
        client = EdgeClient(broker=broker.url, device_id="phoenix", region=REGION, task=task, data_dir=tmp_path / "d",
                            min_samples=2, train=TrainConfig(epochs=1), request_timeout_s=1.0, inference="torch").start()
        changes: list[bool] = []  # helper-97: an app could not tell that its broker went away and came back
        client.on("connection", lambda kind, info: changes.append(info["connected"]))
        try:
            assert client.connected
            broker.stop()
            wait_until(lambda: not client.connected and not daemon.transport.connected, 20, "both sides to notice")
            client.add_sample(pool.x[0], int(pool.y[0]))
            client.add_sample(pool.x[1], int(pool.y[1]))  # pull is sent (queued/retried) while offline
            broker = MosquittoProcess(port=port).start()
            wait_until(lambda: client.connected and daemon.transport.connected, 60, "reconnection")
            wait_until(lambda: changes[-1:] == [True], 10, "the connection notification")
            # (the start's own True may land after on() was registered: paho's thread emits it)
            after = changes[1:] if changes[:1] == [True] else changes
            assert after[0] is False and after[-1] is True, changes  # (failed reconnects in between add no True)
            assert client.wait_for_version(0, timeout=60), "the retried pull was never answered"
            wait_until(lambda: daemon.core.version >= 1, 60, "the device's update to be aggregated")
        finally:
            client.stop()
            daemon.stop()
    finally:
        broker.stop()


def test_after_a_broker_restart_the_status_is_back_at_once_and_an_idle_device_catches_up(tmp_path: Path) -> None:
    """mosquitto restarts without persistence: its retained status is gone (or, after a long
    stall, the last will says ``alive: false``). The coordinator publishes it again as soon as
    it reconnects, not at its next beat (an hour here), and a device that stopped labelling
    asks for the release it missed while away (it used to keep serving v0 for good)."""
    from coordinator.daemon import CoordinatorDaemon, CoordinatorOptions

    task = get_task("digits")
    pool = task.data().pool
    broker = MosquittoProcess().start()
    port = broker.port

    def restart() -> MosquittoProcess:
        broker.stop()
        wait_until(lambda: not daemon.transport.connected, 20, "the coordinator to notice")
        again = MosquittoProcess(port=port).start()
        wait_until(lambda: daemon.transport.connected, 60, "the coordinator to reconnect")
        return again

    try:
        daemon = CoordinatorDaemon(
            CoordinatorOptions(require_pull=False, broker=broker.url, region=REGION, state_dir=tmp_path / "c", strategy_params={"k": 1, "timeout_s": 5.0},
                               status_interval_s=3600.0),
            task=task,
        ).start()
        try:
            broker = restart()  # nothing else on the broker: nothing else makes the coordinator publish
            watcher = Watcher(broker.url)
            try:
                wait_until(lambda: watcher.get("alive", False) is True, 15, "the coordinator's status, retained again")
            finally:
                watcher.t.stop()
            common: dict[str, Any] = {"broker": broker.url, "region": REGION, "task": task, "train": TrainConfig(epochs=1),
                                      "request_timeout_s": 1.0, "inference": "torch"}
            busy = EdgeClient(device_id="busy", data_dir=tmp_path / "busy", min_samples=2, **common).start()
            idle = EdgeClient(device_id="idle", data_dir=tmp_path / "idle", min_samples=10**6, **common).start()
            try:
                assert idle.wait_for_version(0, timeout=60)
                for i in range(2):
                    busy.add_sample(pool.x[i], int(pool.y[i]))
                wait_until(lambda: daemon.core.version >= 1 and daemon.core.release[0] >= 1, 60, "version 1 released")
                assert idle.version == 0  # it labels nothing: no pull, no news of version 1
                broker = restart()
                wait_until(lambda: (idle.version or 0) >= 1, 30, "the idle device to fetch the release it missed")
            finally:
                busy.stop()
                idle.stop()
        finally:
            daemon.stop()
    finally:
        broker.stop()


def test_a_device_that_labels_nothing_gets_each_release_by_refresh(tmp_path: Path) -> None:
    """Over mosquitto: a device whose user labels nothing (it never pulls to train) still
    predicts with the newest release: after ``refresh_s`` without a pull it asks for the
    release again. Its first refreshes find release 0 unchanged (no weights travel); once
    another device's update is released, the next one deploys it."""
    from coordinator.daemon import CoordinatorDaemon, CoordinatorOptions

    task = get_task("digits")
    pool = task.data().pool
    broker = MosquittoProcess().start()
    try:
        daemon = CoordinatorDaemon(
            CoordinatorOptions(require_pull=False, broker=broker.url, region=REGION, state_dir=tmp_path / "c", strategy_params={"k": 1, "timeout_s": 5.0}),
            task=task,
        ).start()
        try:
            common: dict[str, Any] = {"broker": broker.url, "region": REGION, "task": task, "train": TrainConfig(epochs=1),
                                      "request_timeout_s": 1.0, "inference": "torch"}
            idle = EdgeClient(device_id="idle", data_dir=tmp_path / "idle", min_samples=10**6, refresh_s=1.5, **common).start()
            busy = EdgeClient(device_id="busy", data_dir=tmp_path / "busy", min_samples=2, refresh_s=None, **common).start()
            try:
                assert idle.wait_for_version(0, timeout=60)
                unchanged = daemon.core.counters["pulls_unchanged"]
                wait_until(lambda: daemon.core.counters["pulls_unchanged"] >= unchanged + 2, 30,
                           "two refreshes of the idle device, answered 'unchanged'")
                assert idle.version == 0
                for i in range(2):
                    busy.add_sample(pool.x[i], int(pool.y[i]))
                wait_until(lambda: daemon.core.release[0] >= 1, 60, "version 1 released")
                wait_until(lambda: (idle.version or 0) >= 1, 30, "the idle device to refresh to release 1")
                np.testing.assert_array_equal(idle.weights, daemon.core.release[1])
            finally:
                busy.stop()
                idle.stop()
        finally:
            daemon.stop()
    finally:
        broker.stop()


@pytest.mark.parametrize("same_id", [False, True])
def test_a_second_coordinator_on_the_region_is_called_out(tmp_path: Path, caplog: pytest.LogCaptureFixture, same_id: bool) -> None:
    """Two coordinators on one region (different state dirs) answer the same devices with
    their own versions and keys, or, with one client id, take the broker session from each
    other every second. Each says so at ERROR and counts it (``duplicate_coordinator``); the
    transport names the id being taken over. A coordinator restarted after the first stopped
    is not another one (the retained status predates it)."""
    from coordinator.daemon import CoordinatorDaemon, CoordinatorOptions

    def daemon(name: str, coordinator_id: str) -> CoordinatorDaemon:
        return CoordinatorDaemon(CoordinatorOptions(require_pull=False, broker=broker.url, region=REGION, state_dir=tmp_path / name,
                                                    coordinator_id=coordinator_id), task=get_task("digits"))

    broker = MosquittoProcess().start()
    try:
        first = daemon("a", "coord-a").start()
        first.stop()
        with caplog.at_level("WARNING"):
            again = daemon("a", "coord-a").start()  # a restart: the retained status is the stopped one's
            try:
                time.sleep(1.0)
                assert again.duplicate_coordinators == 0 and "another coordinator" not in caplog.text
                other = daemon("b", "coord-a" if same_id else "coord-b").start(timeout=30)
                try:
                    # (counted, then logged, on the daemon's thread: wait for the line too; CI read it between)
                    wait_until(lambda: again.duplicate_coordinators + other.duplicate_coordinators >= 1
                               and "is live on the status topic of region" in caplog.text, 30, "one of them to call the other out")
                    if same_id:  # (at WARNING: from the transport a flapping link looks the same; the ERROR above is the daemon's)
                        wait_until(lambda: "taking over this session" in caplog.text, 30, "the transport to name the takeover")
                finally:
                    other.stop()
            finally:
                again.stop()
    finally:
        broker.stop()


def test_a_coordinator_that_lost_its_state_dir_numbers_anew_and_its_devices_follow(tmp_path: Path) -> None:
    """Over mosquitto: the coordinator's state dir is lost (its signing key kept apart, as a
    bundle keeps it) and a new one starts from version 0. A device holding version 1 of the
    numbering before used to wait for a version above 1 for good (``model_older``) and never
    train again; now the new state dir's epoch reaches it with the retained recall at start: it
    serves the new release, trains, and the new coordinator accepts its update."""
    from coordinator.daemon import CoordinatorDaemon, CoordinatorOptions

    task = get_task("digits")
    pool = task.data().pool
    broker = MosquittoProcess().start()
    key = tmp_path / "keys" / "signing.key"
    key.parent.mkdir()

    def coordinator(state: str) -> CoordinatorDaemon:
        return CoordinatorDaemon(
            CoordinatorOptions(require_pull=False, broker=broker.url, region=REGION, state_dir=tmp_path / state, signing_key=key,
                               strategy_params={"k": 1, "timeout_s": 5.0}),
            task=task,
        ).start()

    try:
        first = coordinator("c1")
        dev = EdgeClient(device_id="d1", data_dir=tmp_path / "d1", broker=broker.url, region=REGION, task=task,
                         train=TrainConfig(epochs=1), request_timeout_s=1.0, inference="torch", min_samples=2)
        dev.start()
        try:
            for i in range(2):
                dev.add_sample(pool.x[i], int(pool.y[i]))
            wait_until(lambda: first.core.version >= 1, 60, "version 1")
            dev.add_sample(pool.x[2], int(pool.y[2]))  # the next pull brings release 1; its training, version 2
            wait_until(lambda: first.core.version >= 2 and dev.version == 1, 60, "version 2, the device serving 1")
            old_epoch = dev.core.state.epoch
            assert old_epoch == first.core.status().extra["epoch"]
            first.stop()
            second = coordinator("c2")  # the state dir is gone: a new one, version 0
            try:
                new_epoch = second.core.status().extra["epoch"]
                assert new_epoch > old_epoch and second.core.version == 0
                wait_until(lambda: dev.core.state.epoch == new_epoch and dev.version == 0, 30,
                           "the device to take the new numbering and serve its release")
                np.testing.assert_array_equal(dev.weights, second.core.release[1])
                for i in range(3, 5):
                    dev.add_sample(pool.x[i], int(pool.y[i]))
                wait_until(lambda: second.core.counters["accepted"] >= 1 and second.core.version >= 1, 60,
                           "the new coordinator to accept the device's update")
            finally:
                second.stop()
        finally:
            dev.stop()
    finally:
        broker.stop()


def test_a_new_state_dir_with_the_regions_key_needs_take_over(mosquitto: MosquittoProcess, tmp_path: Path) -> None:
    """Operator trial: a coordinator started on a new (or mistyped) --state-dir with the region's
    signing key took the fleet over within a second (the devices followed its new numbering to its
    version 0). The start now reads the region's retained recall first: signed by this key for
    another epoch, it is refused unless --take-over (the state dir is really lost)."""
    from coordinator.cli import check_take_over, region_followers
    from coordinator.daemon import CoordinatorDaemon, CoordinatorOptions
    from edge_sdk.errors import ConfigError
    from edge_sdk.signing import Signer, save_signer

    task = get_task("digits")
    key = tmp_path / "signing.key"
    signer = Signer.generate()
    save_signer(signer, key)

    def options(state: str, signing_key: Path = key) -> CoordinatorOptions:
        return CoordinatorOptions(require_pull=False, broker=mosquitto.url, region=REGION, state_dir=tmp_path / state, signing_key=signing_key,
                                  strategy_params={"k": 1, "timeout_s": 5.0})

    check_take_over(options("fresh"), take_over=False)  # nothing on the region yet: a first start is not a take-over
    real = CoordinatorDaemon(options("real"), task=task).start()
    try:  # its recall (with its epoch) is retained once it is out
        wait_until(lambda: region_followers(options("typo"), signer.kid) is not None, 20, "the retained recall")
    finally:
        real.stop()
    with pytest.raises(ConfigError, match="start again with --take-over"):
        check_take_over(options("typo"), take_over=False)
    assert not (tmp_path / "typo").exists()  # refused before anything is written
    check_take_over(options("typo"), take_over=True)  # the real one is lost: the operator says so
    check_take_over(options("real"), take_over=False)  # its own state dir: resumes
    other = tmp_path / "other.key"
    save_signer(Signer.generate(), other)
    # Another key (helper-98: a mistyped --state-dir with the state dir's own new key, or another --signing-key):
    # the region's devices follow this key's recall and would refuse every model: refused too.
    for state, signing_key in (("elsewhere", other), ("elsewhere", None)):
        with pytest.raises(ConfigError, match=f"follow a coordinator that signs with key {signer.kid}"):
            check_take_over(options(state, signing_key), take_over=False)
    check_take_over(options("elsewhere", None), take_over=True)  # moving the region to a new key, on purpose


def test_a_second_coordinator_on_a_live_region_is_refused_unless_take_over(mosquitto: MosquittoProcess, tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    """Operator trial: `edgeci coordinator` on a region that already had a live coordinator (a
    mistyped --state-dir or --region) started: both took client id coord-REGION, the broker kept
    dropping one for the other, and its new key's recall was refused by every device. The start
    now reads the region's retained status: live, fresh, another key: refused unless --take-over.
    The same key (that state dir's own process, restarted) and a stopped one pass."""
    import json
    import logging

    from coordinator.cli import check_take_over, live_other_coordinator
    from coordinator.daemon import CoordinatorDaemon, CoordinatorOptions
    from edge_sdk.errors import ConfigError
    from edge_sdk.signing import Signer, save_signer

    key, other = tmp_path / "signing.key", tmp_path / "other.key"
    save_signer(Signer.generate(), key)
    save_signer(Signer.generate(), other)

    def options(state: str, signing_key: Path | None = key) -> CoordinatorOptions:
        return CoordinatorOptions(require_pull=False, broker=mosquitto.url, region="live-check", state_dir=tmp_path / state, signing_key=signing_key,
                                  strategy_params={"k": 1, "timeout_s": 5.0})

    check_take_over(options("fresh", None), take_over=False)  # an empty region
    CoordinatorDaemon(options("old"), task=get_task("digits")).start().stop()  # another state dir, with versions, same kept key
    time.sleep(0.002)  # (epochs are microseconds of the wall clock: the next state dir's differs)
    real = CoordinatorDaemon(options("real"), task=get_task("digits")).start()
    try:
        # The same kept key on another state dir that holds versions (a mistyped --state-dir): its epoch differs.
        with pytest.raises(ConfigError, match="with this signing key on another state dir"):
            check_take_over(options("old"), take_over=False)
        for state, signing_key in (("typo", None), ("typo", other)):  # a key made with the new dir, or another kept one
            with pytest.raises(ConfigError, match=r"region 'live-check' already has a live coordinator .* start again with --take-over"):
                check_take_over(options(state, signing_key), take_over=False)
        assert not (tmp_path / "typo").exists()  # refused before anything is written
        check_take_over(options("real"), take_over=False)  # its own key: that state dir's process restarting
        with caplog.at_level(logging.WARNING, logger="edgeci.coordinator"):
            check_take_over(options("typo", None), take_over=True)
        assert "taking over region 'live-check' although its status shows coordinator" in caplog.text
    finally:
        real.stop()
    # Stopped, its status says so; its devices still follow its key (the region's recall): a new key is refused.
    with pytest.raises(ConfigError, match="follow a coordinator that signs with key"):
        check_take_over(options("typo", None), take_over=False)
    check_take_over(options("typo", other), take_over=True)
    # A status that claims to be alive but is older than three heartbeats (+10 s) is a coordinator gone.
    old = json.dumps({"type": "status", "v": 3, "region": "r", "coordinator": "c", "alive": True, "heartbeat_s": 30.0,
                      "published_at": 1000.0, "extra": {"signing_key": "k1"}}).encode()
    assert live_other_coordinator(old, None, now=1000.0 + 99.0) is not None
    assert live_other_coordinator(old, None, now=1000.0 + 101.0) is None
    assert live_other_coordinator(old, "k1", now=1000.0) is None
    with_epoch = old.replace(b'"signing_key": "k1"', b'"signing_key": "k1", "epoch": 5')
    assert live_other_coordinator(with_epoch, "k1", now=1000.0, epoch=5) is None  # this state dir's own process
    assert live_other_coordinator(with_epoch, "k1", now=1000.0, epoch=6) is not None  # another state dir, same key


def test_a_mosquitto_whose_port_is_taken_refuses_to_start_or_picks_another(monkeypatch: pytest.MonkeyPatch) -> None:
    """free_port() lets its port go before mosquitto binds it, so another broker may take it
    first. The late mosquitto exits ("Address already in use") while the other one answers on
    the port: start() used to take that answer as its own start. Now an explicit port is a
    TransportError and a port free_port() picked is picked again."""
    import coordinator.broker as broker_module
    from edge_sdk.errors import TransportError

    first = MosquittoProcess().start()
    try:
        with pytest.raises(TransportError, match="Address already in use"):
            MosquittoProcess(port=first.port).start()
        # A port bound but not listening (another process's socket): nothing answers a connect,
        # mosquitto exits at once, and start() says so then (it used to wait out its timeout).
        import socket

        with socket.socket() as bound:
            bound.bind(("127.0.0.1", 0))
            with pytest.raises(TransportError, match=r"(?s)exited with status .*Address already in use"):
                MosquittoProcess(port=bound.getsockname()[1]).start(timeout=60)
        handed = iter([first.port])  # free_port hands out the port the first broker holds, once
        real = broker_module.free_port
        monkeypatch.setattr(broker_module, "free_port", lambda host="127.0.0.1": next(handed, None) or real(host))
        late = MosquittoProcess()
        assert late.port == first.port
        late.start()
        try:
            assert late.port != first.port and " running" in late.log_text()
        finally:
            late.stop()
    finally:
        first.stop()


def test_a_mosquitto_that_fails_before_launch_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A config that cannot be written (here: config_text raising) leaves no temporary folder
    behind (it stayed until garbage collection)."""
    import tempfile

    def broken(self: MosquittoProcess, overrides: object = None) -> str:
        raise OSError("no space left (stub)")

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(MosquittoProcess, "config_text", broken)
    mosquitto = MosquittoProcess()
    with pytest.raises(OSError, match="stub"):
        mosquitto.start()
    assert list(tmp_path.iterdir()) == []


def test_a_coordinator_id_live_in_another_region_is_refused(mosquitto: MosquittoProcess, tmp_path: Path) -> None:
    """helper-96: `--region ap --id coord-us` started while coord-us served region us on the same
    plain broker; the two knocked each other off every few seconds and the impostor took coord-us's
    messages. Every region's retained status is read at start: that id live elsewhere is refused."""
    from coordinator.cli import check_take_over
    from coordinator.daemon import CoordinatorDaemon, CoordinatorOptions
    from edge_sdk.errors import StartRefused

    def options(region: str, cid: str, state: str) -> CoordinatorOptions:
        return CoordinatorOptions(require_pull=False, broker=mosquitto.url, region=region, coordinator_id=cid, state_dir=tmp_path / state,
                                  strategy_params={"k": 1, "timeout_s": 5.0})

    us = CoordinatorDaemon(options("dup-us", "coord-dup-us", "us"), task=get_task("digits")).start()
    try:
        with pytest.raises(StartRefused, match=r"coordinator id 'coord-dup-us' is live in region 'dup-us'"):
            check_take_over(options("dup-ap", "coord-dup-us", "ap"), take_over=False)
        assert not (tmp_path / "ap").exists()  # refused before anything is written
        check_take_over(options("dup-ap", "coord-dup-ap", "ap"), take_over=False)  # its own id: fine
        check_take_over(options("dup-ap", "coord-dup-us", "ap"), take_over=True)  # said, and allowed
    finally:
        us.stop()
    check_take_over(options("dup-ap", "coord-dup-us", "ap"), take_over=False)  # stopped: its status says so
