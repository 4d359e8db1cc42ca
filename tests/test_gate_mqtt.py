"""Issue 10 over a real mosquitto: the release gate stops a malicious client, and operators
roll back and pin a running coordinator — and what they did survives its restart."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.broker import MosquittoProcess
from coordinator.daemon import CoordinatorDaemon, CoordinatorOptions
from coordinator.registry import Registry, read_release_record
from coordinator.validation import save_validation
from devices.partition import partition
from edge_sdk.client import EdgeClient
from edge_sdk.mqtt import MqttTransport
from edge_sdk.tasks import get_task
from edge_sdk.tasks.base import Split, TrainConfig
from edge_sdk.wire import topics
from edge_sdk.wire.codec import encode, parse_status_json
from edge_sdk.wire.messages import Update
from tests.helpers import CoordinatorProcess, wait_until

pytestmark = [pytest.mark.broker]
ROOT = Path(__file__).resolve().parents[1]
REGION = "gate"


class Watcher:
    """The retained status, as an operator's dashboard would read it."""

    def __init__(self, url: str) -> None:
        self.status: dict[str, Any] = {}
        self.lock = threading.Lock()
        self.t = MqttTransport(url, client_id=f"watch-{os.getpid()}", subscriptions=[topics.status_topic(REGION)],
                               on_message=self._on, clean_session=True)
        self.t.start()

    def _on(self, topic: str, payload: bytes) -> None:
        with self.lock:
            self.status = parse_status_json(payload)

    def extra(self, key: str, default: Any = None) -> Any:
        with self.lock:
            return self.status.get("extra", {}).get(key, default)

    def close(self) -> None:
        self.t.stop()


def attack(url: str, spec: Any, version: int, seq: int, scale: float = 1000.0) -> None:
    """A malicious client: an update of ×1000 random weights (finite), on its own topic."""
    t = MqttTransport(url, client_id=f"mallory-{seq}", subscriptions=[], on_message=lambda *_: None, clean_session=True)
    t.start()
    w = (np.random.default_rng(seq).normal(size=spec.size) * scale).astype(np.float32)
    t.publish(topics.device_topic(REGION, "mallory", "update"),
              encode(Update(device="mallory", seq=seq, model_id=spec.model_id, base_version=version, n_samples=50, weights=w)))
    t.stop()


def test_one_malicious_client_cannot_lower_the_release(mosquitto: MosquittoProcess, tmp_path: Path) -> None:
    task = get_task("digits")
    data = task.data()
    order = np.random.default_rng(0).permutation(len(data.pool.y))
    val, rest = order[:200], order[200:]
    save_validation(tmp_path / "val.npz", Split(x=data.pool.x[val], y=data.pool.y[val]))
    releases: list[tuple[int, float]] = []
    # robust aggregation off: the gate alone must stop the attack
    daemon = CoordinatorDaemon(
        CoordinatorOptions(require_pull=False, broker=mosquitto.url, region=REGION, state_dir=tmp_path / "coord",
                           strategy_params={"k": 3, "timeout_s": 1.5, "clip_multiplier": 0.0, "sample_weight_cap": 0.0},
                           validation=tmp_path / "val.npz", gate_margin=0.02, rollback_margin=0.10),
        task=task, on_release=lambda v, w: releases.append((v, float(task.evaluate(w)["accuracy"]))),
    ).start()
    acc0 = float(task.evaluate(daemon.core.release[1])["accuracy"])
    parts = [rest[p] for p in partition(data.pool.y[rest], 3, "dirichlet", alpha=1.0, seed=0)]
    clients = [EdgeClient(broker=mosquitto.url, device_id=f"dev{i}", region=REGION, task=task, data_dir=tmp_path / f"dev{i}",
                          min_samples=4, train=TrainConfig(epochs=2, lr=0.05, seed=i), request_timeout_s=3.0, seed=i,
                          inference="torch").start() for i in range(3)]
    try:
        for step in range(12):
            for c, idx in zip(clients, parts):
                for k in idx[step * 4:(step + 1) * 4]:
                    c.add_sample(data.pool.x[k], int(data.pool.y[k]))
            if step in (3, 7):  # the attacker strikes twice, on the current training version
                attack(mosquitto.url, task.spec, daemon.core.version, seq=step)
            time.sleep(0.5)
        wait_until(lambda: daemon.core.counters["gate_rejected"] >= 1, 90, "a rejected candidate")
        wait_until(lambda: daemon.core.counters["gate_promoted"] >= 1, 90, "a promoted candidate")
    finally:
        for c in clients:
            c.stop()
        daemon.stop()
    registry = Registry(tmp_path / "coord", task.spec)
    sources = [registry.read_version(v)[1].get("source") for v in registry.versions()]
    assert "rollback" in sources, sources  # the training line went back to the release
    history = json.loads((tmp_path / "coord" / "release.json").read_text())["history"]
    rejected = [e for e in history if e["action"] == "reject"]
    assert rejected and all(e["candidate_metric"] < e["release_metric"] - 0.10 for e in rejected)
    # the validator handed the gate paired counts on the same 200 samples (better, worse, n)
    decided = [e for e in history if e["action"] in ("promote", "hold", "reject")]
    assert all(e["paired"][2] == 200 and e["paired"][0] + e["paired"][1] <= 200 for e in decided), decided
    assert releases, "no candidate was ever promoted"
    # the release (what devices predict with) never fell below its start by more than the margin
    assert min(acc for _, acc in releases) >= acc0 - 0.02, (acc0, releases)
    # and the devices predict with releases only
    final_release = daemon.core.release[0]
    assert all(c.version is None or c.version <= final_release for c in clients)


def coordinator(url: str, state: Path, *extra: str) -> CoordinatorProcess:
    return CoordinatorProcess("--broker", url, "--region", REGION, "--state-dir", str(state),
                              "--k", "1", "--timeout", "1", "--status-interval", "1", *extra)


def edgeci(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "demos.cli", *args], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def push(url: str, spec: Any, seq: int, base: int, value: float) -> None:
    t = MqttTransport(url, client_id=f"op-dev-{seq}", subscriptions=[], on_message=lambda *_: None, clean_session=True)
    t.start()
    w = np.full(spec.size, value, dtype=np.float32)
    t.publish(topics.device_topic(REGION, "d1", "update"),
              encode(Update(device="d1", seq=seq, model_id=spec.model_id, base_version=base, n_samples=1, weights=w, nonce=seq + 1)))
    t.stop()


def test_rollback_and_pin_on_a_running_coordinator_survive_its_restart(mosquitto: MosquittoProcess, tmp_path: Path) -> None:
    spec = get_task("digits").spec
    state = tmp_path / "coord"
    url = mosquitto.url
    watcher = Watcher(url)
    try:
        with coordinator(url, state, "--clip-multiplier", "0", "--accept-unpulled-updates"):  # (push: raw updates)
            for seq in range(3):  # versions 1, 2, 3 (no gate: each is released)
                push(url, spec, seq, seq, 0.01 * (seq + 1))
                wait_until(lambda: watcher.extra("release") == seq + 1, 30, f"version {seq + 1}")  # noqa: B023
            assert (state / "region").read_text().strip() == REGION  # recorded: a later start under another --region is refused
            # a device that serves release 3 and labels nothing more (it never pulls to train again)
            idle = EdgeClient(broker=url, device_id="idle-1", region=REGION, task=get_task("digits"), durable=False,
                              min_samples=10_000)
            idle.start()
            try:
                wait_until(lambda: idle.version == 3, 30, "the idle device serving release 3")
                out = edgeci("rollback", "--to", "1", "--broker", url, "--region", REGION, "--state-dir", str(state))
                assert out.returncode == 0, out.stdout + out.stderr
                assert "rollback done: release 4 (a copy of version 1)" in out.stdout, out.stdout
                # the recall reaches it: it serves release 4 (version 1's weights), not the rolled-back 3
                wait_until(lambda: idle.version == 4, 20, "the idle device to fetch release 4 after the rollback")
                np.testing.assert_array_equal(idle.weights, np.full(spec.size, 0.01, np.float32))
            finally:
                idle.stop()
            out = edgeci("pin", "2", "--broker", url, "--region", REGION, "--state-dir", str(state))
            assert out.returncode == 0 and "release 5 (pinned, a copy of version 2)" in out.stdout, out.stdout + out.stderr
            out = edgeci("pin", "2", "--broker", url, "--region", REGION, "--state-dir", str(state))  # retried: no version 6
            assert out.returncode == 0 and "pin done (already pinned to it: no new version): release 5 (pinned, a copy of version 2), training line 5" \
                in out.stdout, out.stdout + out.stderr
            push(url, spec, 3, 5, 0.5)  # training goes on; the pinned release does not move
            wait_until(lambda: watcher.extra("training_version") == 6, 30, "training version 6")
            assert watcher.extra("release") == 5 and watcher.extra("pinned") is True
        registry = Registry(state, spec)
        np.testing.assert_array_equal(registry.read_version(4)[0], registry.read_version(1)[0])
        np.testing.assert_array_equal(registry.read_version(5)[0], registry.read_version(2)[0])
        with coordinator(url, state):  # a restart keeps the release and the pin
            wait_until(lambda: watcher.extra("training_version") == 6 and watcher.extra("release") == 5, 30, "the restored status")
            assert watcher.extra("pinned") is True
            versions = edgeci("versions", "--state-dir", str(state), "--json")
            rows = {r["version"]: r for r in json.loads(versions.stdout)["versions"]}
            assert "rollback" in rows[4]["verdict"] and rows[5]["verdict"] == "pin, pin again", versions.stdout
            out = edgeci("unpin", "--broker", url, "--region", REGION, "--state-dir", str(state))
            assert out.returncode == 0, out.stdout + out.stderr
            push(url, spec, 4, 6, 0.25)
            wait_until(lambda: watcher.extra("release") == 7 and watcher.extra("pinned") is False, 30, "release 7 after unpin")
        # a command signed by a key the coordinator does not trust is refused
        rogue_key = tmp_path / "rogue.key"
        from edge_sdk.signing import Signer, save_signer

        save_signer(Signer.generate(), rogue_key)
        with coordinator(url, state) as proc:
            # refused commands say why at once (the coordinator's status names the refused nonce), not after --wait
            started = time.monotonic()
            out = edgeci("rollback", "--to", "1", "--broker", url, "--region", REGION, "--signing-key", str(rogue_key), "--wait", "30")
            assert out.returncode == 1 and "refused rollback: bad_signature" in out.stdout, out.stdout + out.stderr
            out = edgeci("rollback", "--to", "99", "--broker", url, "--region", REGION, "--state-dir", str(state), "--wait", "30")
            assert out.returncode == 1 and "refused rollback: unknown_version: no version 99" in out.stdout, out.stdout + out.stderr
            assert time.monotonic() - started < 25, "a refusal waited for the timeout"
            lost = next(d for d in (state / "versions").iterdir() if d.name.isdigit() and int(d.name) == 3)
            shutil.move(lost, tmp_path / "v3")  # a version the registry no longer has (pruned, lost)
            out = edgeci("rollback", "3", "--broker", url, "--region", REGION, "--state-dir", str(state), "--wait", "30")
            assert out.returncode == 1 and "refused rollback: version_unavailable" in out.stdout, out.stdout + out.stderr
            assert any("WARNING" in ln and "operator rollback of version 3 failed" in ln for ln in proc.lines), proc.lines[-5:]
            # the verified ones that did not run are recorded (a replay after a restart is refused); the rogue one is not
            refused = json.loads((state / "refused.json").read_text())
            assert [(e["outcome"], e["command"], e["version"]) for e in refused] == [("refused", "rollback", 99), ("failed", "rollback", 3)]
            out = edgeci("unpin", "--broker", url, "--region", REGION, "--state-dir", str(state))
            assert out.returncode == 0 and "unpin done (it was not pinned)" in out.stdout, out.stdout + out.stderr
            assert watcher.extra("release") == 7
        out = edgeci("pin", "-1", "--broker", url, "--region", REGION, "--state-dir", str(state))
        assert out.returncode == 2 and "versions start at 0" in out.stderr, out.stdout + out.stderr
        out = edgeci("rollback", "--to", "1", "--broker", url, "--region", REGION, "--state-dir", str(state), "--wait", "30")
        assert out.returncode == 2 and "is not running" in out.stdout, out.stdout + out.stderr  # its last will says stopped
    finally:
        watcher.close()


def test_a_pin_whose_release_record_fails_to_write_holds_after_the_coordinator_recovers(
        mosquitto: MosquittoProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """helper-105: `edgeci pin 1` on a gated coordinator whose release.json write failed (ENOSPC):
    the daemon rebuilt its core from the state dir, where the pin's commit named the old release
    and no pin, so the pin was gone, the pinned copy was gated and promoted like any candidate, and
    so was the next one. The pin holds now, and the recovered core records it again (helper-119: its
    record was lost, and the CLI could not confirm it), so the CLI confirms it."""
    import errno

    task = get_task("digits")
    data = task.data()
    save_validation(tmp_path / "val.npz", Split(x=data.test.x[:200], y=data.test.y[:200]))
    state = tmp_path / "coord"
    daemon = CoordinatorDaemon(
        CoordinatorOptions(require_pull=False, broker=mosquitto.url, region=REGION, state_dir=state, validation=tmp_path / "val.npz",
                           strategy_params={"k": 1, "timeout_s": None, "clip_multiplier": 0.0, "sample_weight_cap": 0.0},
                           status_interval_s=1.0, storage_probe_s=0.5),
        task=task,
    ).start()
    w0 = daemon.core.weights.copy()
    try:
        for seq in range(2):  # releases 1 and 2 (a tiny step each: the gate promotes them)
            t = MqttTransport(mosquitto.url, client_id=f"op-dev-{seq}", subscriptions=[], on_message=lambda *_: None,
                              clean_session=True)
            t.start()
            t.publish(topics.device_topic(REGION, "d1", "update"),
                      encode(Update(device="d1", seq=seq, model_id=task.spec.model_id, base_version=seq, n_samples=1,
                                    weights=w0 + np.float32(1e-4 * (seq + 1)), nonce=seq + 1)))
            t.stop()
            wait_until(lambda: daemon.core.release[0] == seq + 1, 60, f"release {seq + 1}")  # noqa: B023
        real = daemon.registry.record_release
        failed: list[int] = []

        def full_disk(release: int, pinned: bool, event: Any, floor: Any = None) -> None:
            if event.get("action") == "pin" and not failed:
                failed.append(release)
                raise OSError(errno.ENOSPC, "No space left on device")
            real(release, pinned, event, floor)

        monkeypatch.setattr(daemon.registry, "record_release", full_disk)
        out = edgeci("pin", "1", "--broker", mosquitto.url, "--region", REGION, "--state-dir", str(state), "--wait", "8")
        assert out.returncode == 0 and "pin done" in out.stdout, out.stdout + out.stderr
        wait_until(lambda: daemon.core.status().extra["storage_ok"], 30, "storage recovered")
        assert failed == [3] and daemon.core.release[0] == 3 and daemon.core.status().extra["pinned"]
        assert read_release_record(state)["history"][-1]["action"] == "pin"  # recorded after the recovery
        assert daemon.core.counters["gate_resubmitted"] == 0  # the operator's choice is no candidate
        np.testing.assert_array_equal(daemon.core.release[1], daemon.registry.read_version(1)[0])
    finally:
        daemon.stop()
