"""Tests that kill mutants of ``edge_sdk/mqtt.py`` and ``edge_sdk/client.py`` that every covering
test let through (helper-189's mutation audit; each docstring names the line at the audit's base
commit, cd17bb7, and the mutation). What is asserted is what a broker sees on the wire (the fake
broker of ``tests/test_mqtt_loop.py``, or the fast path's reader over a socket pair), what the app
gets, and what is refused and counted; no test here needs mosquitto.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_sdk.mqtt import MqttTransport, _publish_header, _remaining_length
from edge_sdk.runtime import Actor
from tests.helpers import close_unstarted, unstarted_client, wait_until
from tests.test_mqtt_fastpath_fuzz import Reader
from tests.test_mqtt_loop import FakeBroker, _publish_packet, read_packet


@pytest.mark.parametrize("length", [0x7F, 0x80, 0x1234, 0x3FFF, 0x4000, 0x12345, 0x1FFFFF, 0x200000, 0x0ABCDEF1, 268_435_455])
def test_a_publish_header_encodes_its_length_at_every_boundary_of_mqtt_s_length_bytes(length: int) -> None:
    """mqtt.py:1655 (16384 -> 16385), 1659 (268435455 -> 0, ``<=`` -> ``>``), 1660 (127 -> 0,
    ``length >> 7`` -> ``>> 8``): a packet of exactly 16 KiB (or of 2 MiB and more) went out with a remaining length
    the broker reads as another (a continuation bit on the last byte, a wrong high byte), or
    was refused as too large. The fuzz tests' payloads stay under 3 KB."""
    topic = "t/x"
    payload_len = length - 4 - len(topic)  # QoS 1: topic length (2), topic, packet id (2), payload
    header = _publish_header(topic, payload_len, 1, False, 0x0102)
    value, body = _remaining_length(header, 1)
    assert (value, body) == (length, 1 + (1 if length < 0x80 else 2 if length < 0x4000 else 3 if length < 0x200000 else 4))
    assert header[body:] == b"\x00\x03t/x\x01\x02"  # what follows the length is the topic and the packet id
    with pytest.raises(ValueError, match="too large"):
        _publish_header(topic, 268_435_456, 0, False, 0)


def test_a_message_whose_handler_raised_is_not_delivered_again() -> None:
    """mqtt.py:1557 (``self._rpos = end`` swapped with the ``deliver`` after it, QoS 0): when
    ``on_message`` raised, the fast path's reader had not moved past the message, and the next
    read delivered it again (at every wake-up, for as long as the handler raised)."""
    r = Reader()
    calls: list[str] = []

    def deliver(topic: str, payload: bytes) -> None:
        calls.append(topic)
        if len(calls) == 1:
            raise RuntimeError("the handler failed")

    try:
        r.broker.sendall(_publish_packet("in/a", b"1", None) + _publish_packet("in/b", b"2", None))
        with pytest.raises(RuntimeError, match="the handler failed"):
            r.corked.take(deliver, r.ack)
        assert r.corked.take(deliver, r.ack) is False
        assert calls == ["in/a", "in/b"]  # each once
    finally:
        r.close()


class Holding:
    """An own-loop ``manual_ack`` transport (fast path) and its actor against a fake broker:
    ``on_message`` holds every message's PUBACK (``held``); ``conn`` is the broker's side."""

    def __init__(self, name: str) -> None:
        self.broker = FakeBroker()
        self.held: list[Any] = []
        self.t = MqttTransport(f"mqtt://127.0.0.1:{self.broker.port}", name, ["in/#"],
                               on_message=lambda topic, payload: self.held.append(self.t.hold_ack()),
                               own_loop=True, manual_ack=True)
        self.actor = Actor(f"{name}-actor", lambda e: [], lambda a: None, io=self.t)
        self.actor.start()
        self.t.start()
        self.conn = self.broker.sessions.get(timeout=10)

    def close(self) -> None:
        self.conn.close()
        self.t.stop()
        self.actor.stop()
        self.broker.close()


@pytest.fixture
def holding() -> Iterator[Holding]:
    h = Holding("holding")
    try:
        yield h
    finally:
        h.close()


def test_a_held_puback_of_a_packet_id_above_255_names_that_id(holding: Holding) -> None:
    """mqtt.py:1097 (``mid >> 8`` -> ``mid >> 9`` in :meth:`MqttTransport.ack`, the fast path):
    the PUBACK released for packet id 0x0102 named 0x0002: the broker kept the message and sent
    it again, and took an ack for another. The tests' brokers had handed out small ids only."""
    h = holding
    assert h.t._fast
    h.conn.sendall(_publish_packet("in/a", b"A", 0x0102) + _publish_packet("in/b", b"B", 0xFF01))
    wait_until(lambda: len(h.held) == 2, 10, "both messages delivered")
    done = threading.Event()
    h.actor.call(lambda: (h.t.ack(h.held), done.set()))  # as the daemon does: on the loop's thread
    assert done.wait(10)
    assert [read_packet(h.conn), read_packet(h.conn)] == [(0x40, b"\x01\x02"), (0x40, b"\xff\x01")]


def test_a_held_puback_is_current_until_its_connection_ends(holding: Holding) -> None:
    """mqtt.py:1105 (``==`` -> ``!=`` in :meth:`MqttTransport.is_current`): the daemon keeps the
    PUBACKs an outage withholds only while they are current (daemon.py 863, 909, 1050); inverted,
    it dropped those it could still send and kept those of a closed connection."""
    h = holding
    h.conn.sendall(_publish_packet("in/a", b"A", 7))
    wait_until(lambda: len(h.held) == 1, 10, "the message delivered")
    assert h.t.is_current(h.held[0])
    h.t.redeliver()  # this connection ends without the PUBACK
    assert not h.t.is_current(h.held[0])


def test_stop_on_paho_s_path_disconnects_only_after_the_broker_acknowledged_what_was_published() -> None:
    """mqtt.py:654 (``==`` -> ``!=``) and 657 (the ``while`` negated) in ``_wait_acknowledged``:
    ``stop()`` on paho's path (TLS: every production device) sent its DISCONNECT at once, without
    waiting the promised up to 2 s for the PUBACK of what was just published (a device's last
    update, its ``offline`` presence)."""
    import socket

    broker = FakeBroker()
    t = MqttTransport(f"mqtt://127.0.0.1:{broker.port}", "paho-stop", ["in/#"], on_message=lambda tp, p: None)
    stopper: threading.Thread | None = None
    try:
        t.start()
        assert not t._fast
        conn = broker.sessions.get(timeout=10)
        t.publish("out/last", b"L", qos=1)
        first, body = read_packet(conn)
        assert first & 0xF6 == 0x32 and body.endswith(b"L")
        stopper = threading.Thread(target=t.stop)
        stopper.start()
        conn.settimeout(0.5)
        with pytest.raises(socket.timeout):  # nothing (no DISCONNECT) while the PUBACK is outstanding
            read_packet(conn)
        conn.settimeout(10)
        conn.sendall(b"\x40\x02" + body[7:9])  # the PUBACK
        assert read_packet(conn) == (0xE0, b"")  # then the DISCONNECT
        conn.close()
    finally:
        if stopper is not None:
            stopper.join(10)
        else:
            t.stop()
        broker.close()


@pytest.mark.parametrize("raised", ["MissingExtra", "RuntimeError"])
def test_a_training_job_that_raises_is_reported_failed_with_its_error(tmp_path: Path, raised: str) -> None:
    """client.py:1287 (the ``TrainingFailed`` submit deleted) and 1282/1286 (it swapped with the
    line that builds its error text): a job that raised was never reported, and the core waited
    for a result that never came (no training again); swapped, an actor that takes the event at
    once found no error text (NameError on the trainer's thread, the job unreported). A job
    needing an extra that is not installed also says ``training_unavailable``."""
    from edge_sdk.core.events import TrainingFailed, TrainingJob
    from edge_sdk.errors import MissingExtra

    c = unstarted_client(tmp_path, min_samples=1)
    events: list[Any] = []
    c.actor.submit = lambda make: events.append(make(1.0))  # an idle actor takes it at once
    c.actor.call = lambda fn: fn()
    told: list[tuple[str, dict[str, Any]]] = []
    c.on("training_unavailable", lambda kind, data: told.append((kind, data)))
    error = MissingExtra("needs edgeci[train]") if raised == "MissingExtra" else RuntimeError("boom")

    def run(job: TrainingJob, config: Any) -> Any:
        raise error

    c.run_training_job = run
    try:
        c._train(TrainingJob(job_id=4, base_version=0, weights=np.zeros(c.task.spec.size, np.float32), n_samples=1,
                             hints={}))
        assert events == [TrainingFailed(now=1.0, job_id=4, error=f"{raised}: {error}")]
        assert [kind for kind, _ in told] == (["training_unavailable"] if raised == "MissingExtra" else [])
    finally:
        close_unstarted(c)


def test_on_paho_s_path_a_qos_0_message_holds_no_puback() -> None:
    """mqtt.py:1053 (``or`` -> ``and`` in ``_handle_message``): on paho's path (TLS) a QoS 0
    message's ``hold_ack()`` returned a PUBACK to hold, for a message that has none: the daemon
    held it with the batch's and counted it among those an outage withholds."""
    broker = FakeBroker()
    held: list[Any] = []
    t: MqttTransport | None = None

    def on_message(topic: str, payload: bytes) -> None:
        assert t is not None
        held.append((topic, t.hold_ack()))

    t = MqttTransport(f"mqtt://127.0.0.1:{broker.port}", "paho-q0", ["in/#"], on_message=on_message, manual_ack=True)
    try:
        t.start()
        assert not t._fast
        conn = broker.sessions.get(timeout=10)
        conn.sendall(_publish_packet("in/q0", b"x", None) + _publish_packet("in/q1", b"y", 9))
        wait_until(lambda: len(held) == 2, 10, "both messages delivered")
        assert held[0] == ("in/q0", None)
        assert held[1][0] == "in/q1" and held[1][1] is not None and held[1][1][1:] == (9, 1)
        conn.close()
    finally:
        t.stop()
        broker.close()


@pytest.mark.parametrize("bad", [{"quota_samples": 0}, {"quota_samples": True}, {"quota_bytes": -1}, {"keepalive_s": 0}],
                         ids=lambda bad: "-".join(f"{k}={v!r}" for k, v in bad.items()))
def test_a_bad_quota_or_keepalive_leaves_nothing_on_disk(tmp_path: Path, bad: dict[str, Any]) -> None:
    """client.py:318 (``check_quota("quota_samples", ...)`` deleted): the store refuses the quota
    too, but only after the data dir was made and locked: the refused configuration left a data
    dir behind (``test_sdk_hostile``'s promise, which had no quota case)."""
    from edge_sdk.client import EdgeClient
    from edge_sdk.errors import ConfigError

    data_dir = tmp_path / "device"
    with pytest.raises(ConfigError):
        EdgeClient(broker="mqtt://127.0.0.1:1", device_id="d1", task="digits", data_dir=data_dir, **bad)
    assert not data_dir.exists()


def test_stop_returns_only_after_the_training_job_in_progress_has_ended(tmp_path: Path) -> None:
    """client.py:584 (``self._trainer.shutdown(wait=True, ...)`` deleted): ``stop()`` closed the
    store and returned while the job was still finishing its batch on the trainer's thread (the
    job reads and writes the store, which must not close under it), and left the thread behind."""
    import time

    from edge_sdk.cancellation import checkpoint
    from edge_sdk.core.events import StartTraining, TrainingJob

    c = unstarted_client(tmp_path, min_samples=1)
    started = threading.Event()
    ended: list[int] = []

    def run(job: TrainingJob, config: Any) -> Any:
        started.set()
        try:
            while True:  # a task's loop: stop() cancels it at its next checkpoint
                checkpoint()
                time.sleep(0.01)
        finally:
            time.sleep(0.2)  # the rest of its batch
            ended.append(job.job_id)

    c.run_training_job = run
    c._perform(StartTraining(job=TrainingJob(job_id=3, base_version=0, weights=np.zeros(c.task.spec.size, np.float32),
                                             n_samples=1, hints={})))
    assert started.wait(10)
    c.stop()
    assert ended == [3]
    assert not [t for t in threading.enumerate() if t.name.startswith("train-d1")]


def test_the_app_hears_once_that_the_counters_cannot_be_saved_and_once_that_they_are_again(tmp_path: Path) -> None:
    """client.py:1037 (``if self._unsaved is None`` negated) and 1040 (the ``storage`` event's
    ``emit`` deleted): the app heard nothing when the store first could not save the device's
    counters (a full disk: its requests are held), or heard it at every retry after the first."""
    from edge_sdk.core.events import PersistDeviceState
    from edge_sdk.store import StorageError

    c = unstarted_client(tmp_path, min_samples=1)
    heard: list[bool] = []
    c.on("storage", lambda kind, data: heard.append(data["ok"]))
    save = c.store.set_meta_many
    full = {"on": True}

    def set_meta_many(values: Any) -> None:
        if full["on"]:
            raise StorageError("samples.sqlite3: database or disk is full")
        save(values)

    c.store.set_meta_many = set_meta_many
    try:
        for seq in (1, 2, 3):  # the core's retries, the disk still full
            c._perform(PersistDeviceState(next_seq=seq, trained_upto=0))
        assert heard == [False]
        full["on"] = False
        c._perform(PersistDeviceState(next_seq=4, trained_upto=0))
        assert heard == [False, True]
        assert int(c.store.get_meta("next_seq")) == 4
    finally:
        close_unstarted(c)


def test_a_stopped_canary_scores_no_more_labels(tmp_path: Path) -> None:
    """client.py:1131 (``self._canary[0]`` -> ``[1]`` in ``StopCanary``): the candidate was compared
    with the release's number, so a stopped canary kept its predictor and went on scoring every
    new label against it (a ``CanaryScored`` per label for a round that had ended)."""
    from edge_sdk.core.events import CanaryScored, StartCanary, StopCanary

    c = unstarted_client(tmp_path, min_samples=1)
    w = c.task.pretrained(seed=0)
    c._deployed = (5, w)
    x = np.zeros(c.contract.shape, np.float32)

    def scored() -> list[Any]:
        made = [make(1.0) for make in c.submitted]
        c.submitted.clear()
        return [e for e in made if isinstance(e, CanaryScored)]

    try:
        c._perform(StartCanary(candidate=7, release=5, weights=w))
        c.add_sample(x, 1)
        assert [(e.candidate, e.release) for e in scored()] == [(7, 5)]
        c._perform(StopCanary(candidate=7))
        c.add_sample(x, 2)
        assert scored() == []
    finally:
        close_unstarted(c)


def test_predict_with_torch_inference_serves_the_deployed_model(tmp_path: Path) -> None:
    """client.py:721 (``argmax(..., axis=1)`` -> ``axis=2``): no test predicted with
    ``inference="torch"``; the mutant's predict raised for every batch."""
    pytest.importorskip("torch")
    c = unstarted_client(tmp_path, inference="torch")
    w = c.task.pretrained(seed=0)
    c._deployed = (1, w)
    x = np.random.default_rng(0).random((3, *c.contract.shape), dtype=np.float32)
    try:
        np.testing.assert_array_equal(c.predict(x), np.argmax(c.task.logits(w, x), axis=1))
    finally:
        close_unstarted(c)
