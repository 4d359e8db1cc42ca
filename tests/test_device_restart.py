"""Device state across a restart, on the real path (helper-144's audit): real EdgeClients on a
real mosquitto and a real coordinator process."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.broker import MosquittoProcess
from edge_sdk.client import EdgeClient
from edge_sdk.core.device import DeviceConfig, DeviceCore, Phase
from edge_sdk.core.events import Publish
from edge_sdk.mqtt import MqttTransport
from edge_sdk.tasks import get_task
from edge_sdk.tasks.base import TrainConfig
from edge_sdk.wire import topics
from edge_sdk.wire.codec import decode, encode
from edge_sdk.wire.messages import Ack, Update
from tests.helpers import SIGNER, SPEC, CoordinatorProcess, wait_until

ROOT = Path(__file__).resolve().parents[1]

REGION = "rs"


def _one_round(url: str, data_dir: Path) -> list[tuple[str, dict[str, Any]]]:
    """A device labels 6 samples, then connects: exactly one round (pull seq 0, update seq 1).
    Its notifications until that update is acknowledged (or refused)."""
    task = get_task("digits")
    client = EdgeClient(broker=url, device_id="reinstalled", region=REGION, task=task, data_dir=data_dir, min_samples=4,
                        train=TrainConfig(epochs=1, lr=0.05, seed=0), request_timeout_s=2.0, refresh_s=None)
    notes: list[tuple[str, dict[str, Any]]] = []
    done = threading.Event()

    def note(kind: str, data: dict[str, Any]) -> None:
        notes.append((kind, data))
        if kind in ("update_acked", "update_rejected"):
            done.set()

    client.on("*", note)
    pool = task.data().pool
    for i in range(6):
        client.add_sample(pool.x[i], int(pool.y[i]))
    client.start()
    try:
        assert done.wait(60), notes
    finally:
        client.stop()
    return notes


@pytest.mark.broker
def test_a_reinstalled_device_is_not_told_its_new_update_was_applied(mosquitto: MosquittoProcess, tmp_path: Path) -> None:
    """The same device id on a fresh data dir (the app reinstalled: its store and sequence numbers
    are gone) sends its first update under a seq the coordinator accepted from the first install.
    The coordinator answers ``duplicate`` with the nonce of the update it accepted under that seq; the
    device must see that nonce is not its own and send again under a fresh seq. Before, the nonce came
    from ``random.Random(seed)`` (seed 0 by default), so the second install drew the first one's nonce,
    took the ``duplicate`` for its own update and dropped it: acknowledged, never applied."""
    with CoordinatorProcess("--broker", mosquitto.url, "--region", REGION, "--state-dir", str(tmp_path / "state"),
                            "--model", "digits", "--k", "1", "--timeout", "2"):
        first = _one_round(mosquitto.url, tmp_path / "install1")
        second = _one_round(mosquitto.url, tmp_path / "install2")
    assert [d["status"] for k, d in first if k == "update_acked"] == ["accepted"]
    trained = [d["seq"] for k, d in second if k == "trained"]
    assert trained == [1], second  # the same seq as the first install's update: the case under test
    conflicts = [d for k, d in second if k == "seq_conflict"]
    acked = [d for k, d in second if k == "update_acked"]
    assert [(c["old_seq"], c["watermark"]) for c in conflicts] == [(1, 1)], second
    assert [(a["seq"], a["status"]) for a in acked] == [(2, "accepted")], second


def _child(url: str, data_dir: Path, mode: str, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, str(ROOT / "tests" / "device_kill_child.py"), url, REGION, str(data_dir), mode, str(log)],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})


@pytest.mark.broker
def test_an_update_applied_before_a_sigkill_is_sent_again_not_trained_again(mosquitto: MosquittoProcess, tmp_path: Path) -> None:
    """A device process SIGKILLed after its update was published and accepted, before it handled
    the ack (the ack was lost with the process). Started again on the same data dir, it sends that
    update again under the same seq and nonce (the coordinator answers ``duplicate`` with its nonce:
    success) and trains nothing. Before, the durable watermark was the one from before the round, so
    the restarted device trained the same samples again and the coordinator applied them twice
    (helper-144's probe: updates seq 2 and seq 4, both accepted, on the same 6 samples)."""
    seen: list[Any] = []
    watcher = MqttTransport(mosquitto.url, client_id="watcher", clean_session=True,
                            subscriptions=[topics.device_topic(REGION, "restarted", leaf) for leaf in ("update", "ack")],
                            on_message=lambda topic, payload: seen.append(decode(payload)))
    watcher.start()
    log1, log2 = tmp_path / "run1.jsonl", tmp_path / "run2.jsonl"
    try:
        with CoordinatorProcess("--broker", mosquitto.url, "--region", REGION, "--state-dir", str(tmp_path / "state"),
                                "--model", "digits", "--k", "1", "--timeout", "2"):
            first = _child(mosquitto.url, tmp_path / "dev", "hold_after_publish", log1)
            try:
                wait_until(lambda: any(isinstance(m, Ack) and m.status == "accepted" for m in seen), 90, "the update accepted")
            finally:
                first.send_signal(signal.SIGKILL)
                first.wait(30)
            second = _child(mosquitto.url, tmp_path / "dev", "finish", log2)
            assert second.wait(120) == 0
    finally:
        watcher.stop()
    run2 = [json.loads(line) for line in log2.read_text().splitlines()]
    updates = [m for m in seen if isinstance(m, Update)]
    accepted = [m for m in seen if isinstance(m, Ack) and m.status == "accepted"]
    assert len(accepted) == 1, seen  # the samples went into one applied update
    assert {(u.seq, u.nonce) for u in updates} == {(accepted[0].seq, updates[0].nonce)}, updates  # sent again, same seq and nonce
    assert not [n for n in run2 if n["kind"] == "trained"], run2
    assert [(n["data"]["seq"], n["data"]["status"]) for n in run2 if n["kind"] == "update_acked"] == [(accepted[0].seq, "duplicate")], run2


def _restored(pending: bytes, *, next_seq: int = 3, pending_upto: int = 6) -> DeviceCore:
    cfg = DeviceConfig(device_id="d1", region=REGION, spec=SPEC, min_samples=4)
    return DeviceCore(cfg, rng=random.Random(0), next_seq=next_seq, trained_upto=0, total=6, pending=pending,
                      pending_upto=pending_upto)


def _update(seq: int, device: str = "d1") -> bytes:
    return encode(Update(device=device, seq=seq, model_id=SPEC.model_id, base_version=0, n_samples=6,
                         weights=np.zeros(SPEC.size, dtype=np.float32), nonce=77))


def test_a_restored_update_is_sent_first_under_its_seq() -> None:
    core = _restored(_update(2))
    sent = [a for a in core.start(0.0) if isinstance(a, Publish)]
    assert [a.payload for a in sent] == [_update(2)]
    s = core.state
    assert (s.phase, s.pending_seq, s.next_seq, s.trained_upto, s.prev_trained_upto) == (Phase.PUSHING, 2, 3, 6, 0)


@pytest.mark.parametrize("pending, why", [
    (b"\x00garbage", "not a frame"),
    (_update(2, device="d2"), "another device's"),
    (_update(3), "a seq the counters never gave out"),
])
def test_an_unusable_restored_update_is_counted_and_the_samples_trained_again(pending: bytes, why: str) -> None:
    core = _restored(pending)
    actions = core.start(0.0)
    s = core.state
    assert s.counters.get("ignored:pending_unusable") == 1, why
    assert (s.phase, s.trained_upto, s.next_seq) == (Phase.PULLING, 0, 4), why  # a training pull, seq 3: as without it
    assert [decode(a.payload).seq for a in actions if isinstance(a, Publish)] == [3], why


def test_a_disk_without_room_for_the_update_still_saves_the_counters(tmp_path: Path) -> None:
    """The pending update is the large part of the write: where it does not fit (ENOSPC for it alone),
    the counters are saved without it and nothing is held back (a restart then trains the samples again)."""
    from edge_sdk.core.events import PersistDeviceState
    from edge_sdk.store import StorageError

    client = EdgeClient(broker="mqtt://127.0.0.1:1", device_id="full", region=REGION, task="digits", data_dir=tmp_path,
                        refresh_s=None)
    real = client.store.set_meta_many

    def no_room_for_blobs(items: Any) -> None:
        if any(isinstance(v, bytes) and v for v in items.values()):
            raise StorageError("database or disk is full (injected: no room for the update)")
        real(items)

    client.store.set_meta_many = no_room_for_blobs  # type: ignore[method-assign]
    try:
        assert client._save_counters(PersistDeviceState(next_seq=5, trained_upto=2, pending=_update(4), pending_upto=6))
        assert client._unsaved is None
        assert (client.store.get_meta("next_seq"), client.store.get_meta("trained_upto"), client.store.get_meta("pending_update")) == (5, 2, b"")
    finally:
        client.stop()


def _canary_deliveries(data_dir: Path, payload: bytes, *, lives: int = 2) -> list[list[bool]]:
    """helper-144's probe on the driver's path: EdgeClients built one after the other on one data
    dir (never started), each fed the same signed canary request twice; the actions other than
    publishes and timers are performed by the client as its actor would. Whether each was taken."""
    from edge_sdk.core.events import MessageReceived, Notify, ScheduleTimer

    topic = topics.device_topic(REGION, "canary-dev", "invite")
    taken: list[list[bool]] = []
    for _ in range(lives):
        client = EdgeClient(broker="mqtt://127.0.0.1:1", device_id="canary-dev", region=REGION, task="digits",
                            data_dir=data_dir, trusted_keys={SIGNER.kid: SIGNER.public_raw}, refresh_s=None)
        try:
            life = []
            for attempt in (1, 2):
                actions = client.core.handle(MessageReceived(now=float(attempt), topic=topic, payload=payload))
                for a in actions:
                    if not isinstance(a, Publish | ScheduleTimer):
                        client._perform(a)
                life.append(any(isinstance(a, Notify) and a.kind == "canary" for a in actions))
            taken.append(life)
        finally:
            client.stop()
    return taken


def _canary_payload(nonce: int) -> bytes:
    from edge_sdk.wire.messages import Canary

    ask = Canary(device="canary-dev", candidate=5, release=4, samples=10, deadline_s=600.0, nonce=nonce)
    return encode(ask, signer=SIGNER, scope=topics.device_scope(REGION, "invite"))


def test_a_canary_round_taken_is_refused_after_a_restart(tmp_path: Path) -> None:
    """helper-144: the device refused a second delivery of a round it took, but a restarted device
    (same data dir) took the same signed request again and scored it: the rounds taken were in
    memory only. They are saved in the store's meta (one short record per region)."""
    assert _canary_deliveries(tmp_path, _canary_payload(4242)) == [[True, False], [False, False]]
    assert _canary_deliveries(tmp_path, _canary_payload(4343), lives=1) == [[True, False]]  # a new round: taken
    from edge_sdk.store import SampleStore

    with SampleStore.open(tmp_path / "samples.sqlite3") as store:  # one short record per region
        record = store.get_meta(f"canary.{REGION}")
    assert isinstance(record, str) and json.loads(record) == {"epoch": 0, "candidate": 5, "release": 4, "nonces": [4242, 4343]}


@pytest.mark.parametrize("damaged", ["not json", json.dumps({"epoch": 0}), json.dumps({"epoch": 0, "candidate": 5, "release": 4,
                                     "nonces": ["x"]}), b"\x00bytes", 7, "[" * 5000])
def test_a_damaged_canary_record_is_ignored_and_the_device_starts(tmp_path: Path, damaged: Any,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """A store whose canary record does not read (bit rot, an old bug) must not stop the device:
    logged, ignored (a replay of that round is taken again, as before records were kept)."""
    from edge_sdk.store import SampleStore

    with SampleStore.open(tmp_path / "samples.sqlite3") as store:
        store.set_meta(f"canary.{REGION}", damaged)
    with caplog.at_level("ERROR", logger="edgeci.device"):
        assert _canary_deliveries(tmp_path, _canary_payload(4242), lives=1) == [[True, False]]
    assert any("unreadable canary record" in r.getMessage() for r in caplog.records)


@pytest.mark.broker
def test_a_device_killed_while_training_backs_off_after_the_restart(mosquitto: MosquittoProcess, tmp_path: Path) -> None:
    """A real device process SIGKILLed inside its training job (as the OOM killer ends one), then
    started again on the same data dir by its supervisor: it says ``training_crashed`` and does not
    train until the back-off is over (request_timeout_s 2 s: the first crash's); then it trains and
    its update is acknowledged. Before, the back-off of a failed job was in memory only and a job
    that killed the process raised nothing: the restarted device trained the same job at once."""
    log1, log2 = tmp_path / "run1.jsonl", tmp_path / "run2.jsonl"
    with CoordinatorProcess("--broker", mosquitto.url, "--region", REGION, "--state-dir", str(tmp_path / "state"),
                            "--model", "digits", "--k", "1", "--timeout", "2"):
        first = _child(mosquitto.url, tmp_path / "dev", "hold_in_training", log1)
        try:
            wait_until(lambda: log1.exists() and "training_started" in log1.read_text(), 90, "the first job started")
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait(30)
        second = _child(mosquitto.url, tmp_path / "dev", "finish", log2)
        assert second.wait(120) == 0
    run2 = [json.loads(line) for line in log2.read_text().splitlines()]
    crashed = [n for n in run2 if n["kind"] == "training_crashed"]
    assert [n["data"]["crashes"] for n in crashed] == [1], run2
    started = [n for n in run2 if n["kind"] == "training_started"]
    assert started and started[0]["t"] >= crashed[0]["t"] + crashed[0]["data"]["retry_in_s"] - 0.1, run2  # not at once
    assert [n["data"]["status"] for n in run2 if n["kind"] == "update_acked"] == ["accepted"], run2
