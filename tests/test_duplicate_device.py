"""Two devices on one device id (a cloned SD card or VM image: the same id and a copy of one data
dir, so the same sequence numbers). Measured on main (tests/duplicate_measure.py, 60 s, real
mosquitto): the broker hands the id's session to whichever connected last, 42 swaps each, every
connection 0.5-1.0 s; 28 seq conflicts; nothing said but the transport's ambiguous WARNING.

The device calls it at its second seq conflict (a reinstall has one), says it once at ERROR, shows it
in ``state.duplicate_id`` and leaves the session to the other for a stretch after each takeover
(``MqttTransport.yield_session``). The coordinator counts such an id too (`duplicate_devices`) and echoes the nonce in its accepted acks."""

from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.broker import MosquittoProcess
from coordinator.core import CoordinatorCore, PersistUpdate
from coordinator.daemon import CoordinatorDaemon, CoordinatorOptions
from edge_sdk.client import EdgeClient
from edge_sdk.core.device import DeviceCore
from edge_sdk.core.events import Notify, SampleAdded, StartTraining, TrainingFinished
from edge_sdk.errors import ConfigError
from edge_sdk.mqtt import MqttTransport
from edge_sdk.tasks import get_task
from edge_sdk.tasks.base import TrainConfig
from edge_sdk.wire.codec import encode
from edge_sdk.wire.messages import Ack, Update
from tests.helpers import make_coordinator, wait_until
from tests.test_trust_cores import (
    DEV,
    device,
    model,
    notes,
    published,
    to_coord,
    to_dev,
    train_and_push,
    update,
)


def next_round(d: DeviceCore, now: float, total: int) -> Update:
    """An idle device that labelled up to ``total``: its pull answered, its training done, its update."""
    assert published(d.handle(SampleAdded(now=now, total=total)), "pull")
    acts = d.handle(to_dev(now, "model", model(0, d.state.pending_seq)))
    job = next(a for a in acts if isinstance(a, StartTraining)).job
    (upd,) = published(d.handle(TrainingFinished(now=now, job_id=job.job_id, weights=job.weights + 1, n_samples=total)),
                       "update")
    assert isinstance(upd, Update)
    return upd


def conflict(d: DeviceCore, mine: Update, now: float) -> list[object]:
    """The coordinator holds another sender's update under ``mine``'s seq: its ``duplicate`` ack to ``mine``,
    then the device's update under the new seq accepted."""
    c = make_coordinator(k=10, timeout_s=None)
    c.handle(to_coord(now, DEV, "update", update(DEV, mine.seq, nonce=mine.nonce + 1)))
    (dup,) = published(c.handle(to_coord(now, DEV, "update", mine)), "ack")
    assert isinstance(dup, Ack) and dup.status == "duplicate" and dup.nonce != mine.nonce
    acts = d.handle(to_dev(now, "ack", encode(dup)))
    (again,) = published(acts, "update")
    assert isinstance(again, Update) and again.seq > mine.seq
    accepted = Ack(device=DEV, seq=again.seq, status="accepted", version=1)
    assert notes(d.handle(to_dev(now, "ack", encode(accepted))), "update_acked")
    return acts


# ------------------------------------------------------------------ the device core


def test_one_seq_conflict_a_reinstall_is_not_called_a_duplicate() -> None:
    d = device()
    acts = conflict(d, train_and_push(d), 1.0)
    assert notes(acts, "seq_conflict") and not notes(acts, "duplicate_id")
    assert d.state.seq_conflicts == 1 and not d.state.duplicate_id and "duplicate_id" not in d.state.counters


def test_a_clone_is_called_a_duplicate_once_at_its_second_seq_conflict() -> None:
    """A reinstall meets the coordinator's watermark once and numbers above it after; a second conflict
    in one process means another sender keeps taking this id's seqs. Said once, kept in the state."""
    d = device()
    said: list[Notify] = []
    said += notes(conflict(d, train_and_push(d), 1.0), "duplicate_id")
    assert not said and not d.state.duplicate_id
    said += notes(conflict(d, next_round(d, 2.0, 3), 2.0), "duplicate_id")
    assert [n.data for n in said] == [{"device": DEV, "conflicts": 2}]
    assert d.state.duplicate_id and d.state.counters["duplicate_id"] == 1
    said += notes(conflict(d, next_round(d, 3.0, 4), 3.0), "duplicate_id")
    assert len(said) == 1 and d.state.seq_conflicts == 3  # once; every update still goes through under a new seq
    assert d.state.updates_acked == 3


def test_an_accepted_ack_echoing_another_nonce_is_not_taken_for_this_devices_update() -> None:
    """Two clones with one store send the same seq; the coordinator accepts one of them and its
    ``accepted`` ack goes to the id's session, which the other may hold. On main the other took it as
    its own: its round acknowledged, its weights never applied. With a nonce in the ack (a coordinator
    that echoes it) the device sends its update again under a new seq; an ack
    without one (a coordinator from before) is taken as before."""
    d = device()
    mine = train_and_push(d)
    theirs = Ack(device=DEV, seq=mine.seq, status="accepted", version=1, nonce=mine.nonce + 1)
    acts = d.handle(to_dev(1.0, "ack", encode(theirs)))
    assert not notes(acts, "update_acked") and d.state.updates_acked == 0 and notes(acts, "seq_conflict")
    (again,) = published(acts, "update")
    assert isinstance(again, Update) and again.seq > mine.seq and again.nonce != mine.nonce
    np.testing.assert_array_equal(again.weights, mine.weights)
    ours = Ack(device=DEV, seq=again.seq, status="accepted", version=2, nonce=again.nonce)
    assert notes(d.handle(to_dev(1.1, "ack", encode(ours))), "update_acked") and d.state.updates_acked == 1

    old = device()  # a coordinator that echoes no nonce in an accepted ack: as before
    pending = train_and_push(old)
    acts = old.handle(to_dev(1.0, "ack", encode(Ack(device=DEV, seq=pending.seq, status="accepted", version=1))))
    assert notes(acts, "update_acked") and old.state.updates_acked == 1


# ------------------------------------------------------------------ the transport, real mosquitto


def _ignore(topic: str, payload: bytes) -> None:
    del topic, payload


class Watch:
    """A transport's connections: when each began and how long it lasted."""

    def __init__(self) -> None:
        self.lasted: list[float] = []
        self.up_at: float | None = None
        self.closing = False  # set before stop(): the connection it ends is not a takeover
        self.lock = threading.Lock()

    def __call__(self, up: bool) -> None:
        with self.lock:
            now = time.monotonic()
            if self.closing:
                return
            if up:
                self.up_at = now
            elif self.up_at is not None:
                self.lasted.append(now - self.up_at)
                self.up_at = None


def two_on_one_id(url: str, seconds: float, wait_s: float | None) -> list[list[float]]:
    """Two transports with one client id for ``seconds``; each yields the session for ``wait_s`` if given."""
    watches = [Watch(), Watch()]
    transports = [MqttTransport(url, client_id="dev-dup-twin", subscriptions=[], on_message=_ignore, on_connection=w) for w in watches]
    try:
        for t in transports:
            if wait_s is not None:
                t.yield_session(wait_s)
            t.start()
        time.sleep(seconds)
    finally:
        for w in watches:
            with w.lock:
                w.closing = True
        for t in transports:
            t.stop()
    # (the first one's first connection was ended by the other's start(), which came at once)
    return [watches[0].lasted[1:], watches[1].lasted]


@pytest.mark.broker
def test_a_transport_that_yields_leaves_the_session_to_the_other_client_for_a_stretch(mosquitto: MosquittoProcess) -> None:
    """Main: two clients with one id swap the session every second for ever (paho's back-off resets at
    every CONNACK). After ``yield_session(4)`` a takeover is followed by a wait of 2-4 s (jittered), so
    every connection lasts at least the other's wait, and the swaps are a few, not one a second."""
    plain = two_on_one_id(mosquitto.url, 4.0, None)
    taken = [s for lasted in plain for s in lasted]
    assert len(taken) >= 3 and max(taken) < 1.5, plain  # the premise: the ping-pong, about 1 s a turn
    yielded = two_on_one_id(mosquitto.url, 9.0, 4.0)
    taken = [s for lasted in yielded for s in lasted]
    assert taken and min(taken) >= 1.8 and len(taken) <= 4, yielded


def test_yield_session_refuses_a_wait_that_is_not_positive() -> None:
    t = MqttTransport("mqtt://127.0.0.1:1", client_id="x", subscriptions=[], on_message=_ignore)
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ConfigError, match="wait_s"):
            t.yield_session(bad)


# ------------------------------------------------------------------ two EdgeClients, a daemon, real mosquitto


@pytest.mark.broker
@pytest.mark.slow
def test_two_clones_on_one_id_are_told_once_take_turns_and_lose_nothing(
        mosquitto: MosquittoProcess, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """A device's data dir copied to a second device (a cloned image), both started on one id. Main: both
    swapped the session every ~1.4 s, neither said more than the transport's ambiguous WARNING. Now each
    that sees its seqs taken says so once at ERROR (naming the id and the fix), shows it in
    ``duplicate_id``, and after that leaves the session to the other for a stretch. No update is taken
    twice and each clone keeps every label it stored."""
    task = get_task("digits")
    taken: list[tuple[int, int]] = []
    handle = CoordinatorCore.handle

    def recording(core: CoordinatorCore, event: Any) -> Any:
        actions = handle(core, event)
        taken.extend((a.update.seq, a.update.nonce) for a in actions if isinstance(a, PersistUpdate))
        return actions

    monkeypatch.setattr(CoordinatorCore, "handle", recording)
    daemon = CoordinatorDaemon(CoordinatorOptions(broker=mosquitto.url, region="dup", state_dir=tmp_path / "c",
                                                  strategy_params={"k": 1, "timeout_s": None}), task=task).start()
    pool = task.data().pool

    def client(data_dir: Path) -> EdgeClient:
        return EdgeClient(broker=mosquitto.url, device_id="twin", region="dup", task=task, data_dir=data_dir,
                          min_samples=4, train=TrainConfig(epochs=1, lr=0.05, seed=0), request_timeout_s=3.0,
                          refresh_s=None, inference="torch")

    clones: list[EdgeClient] = []
    try:
        first = client(tmp_path / "a")
        done = threading.Event()
        first.on("update_acked", lambda kind, data: done.set())
        for i in range(4):
            first.add_sample(pool.x[i], int(pool.y[i]))
        first.start()
        assert done.wait(60)
        first.stop()
        shutil.copytree(tmp_path / "a", tmp_path / "b")
        clones = [client(tmp_path / "a"), client(tmp_path / "b")]
        labelled = [4, 4]
        caplog.set_level(logging.INFO)
        for c in clones:
            c.start()
        deadline = time.monotonic() + 60
        k = 100
        while not any(c.duplicate_id for c in clones):
            assert time.monotonic() < deadline, [c.core.state.seq_conflicts for c in clones]
            for j, c in enumerate(clones):
                c.add_sample(pool.x[k + j], int(pool.y[k + j]))
                labelled[j] += 1
            k += 2
            time.sleep(1.0)
        # From a verdict on, a takeover of the told clone is followed by its long wait (30-60 s) while the other
        # keeps the session and works: at most 2 connections in 10 s (main: a swap every ~1.4 s, 14 in 10 s).
        wait_until(lambda: any(c.transport.yielded for c in clones if c.duplicate_id), 30, "a told clone taken over")
        ups: list[bool] = []
        for c in clones:
            c.on("connection", lambda kind, data: ups.append(bool(data["connected"])))
        time.sleep(10.0)
        assert sum(ups) <= 2, ups
        told = [c for c in clones if c.duplicate_id]
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and r.name == "edgeci.device"]
        assert len(errors) == len(told), errors  # once per told clone
        assert "device twin: another device is using this device id" in errors[0]
        assert "new device id" in errors[0] and "re-provision" in errors[0]
        assert [c.store.count() for c in clones] == labelled
    finally:
        for c in clones:
            c.stop()
        daemon.stop()
    assert len(set(taken)) == len(taken) and len({n for _, n in taken}) == len(taken)  # nothing taken twice
    assert len({s for s, _ in taken}) == len(taken)  # no seq taken for two updates


# ------------------------------------------------------------------ the coordinator's side (coordinator/core.py)


def _interleaved(c: Any) -> list[object]:
    """Two clones' updates under one id: each seq sent by both, each time with its own nonce."""
    acts: list[object] = []
    for seq in (1, 2, 3):
        acts += c.handle(to_coord(float(seq), DEV, "update", update(DEV, seq, nonce=100 + seq)))
        acts += c.handle(to_coord(float(seq) + 0.5, DEV, "update", update(DEV, seq, nonce=200 + seq)))
    return acts


def test_the_coordinator_counts_and_says_once_an_id_used_by_two_devices() -> None:
    c = make_coordinator(k=10, timeout_s=None)
    acts = _interleaved(c)
    said = notes(acts, "duplicate_device")
    assert [n.data["device"] for n in said] == [DEV]
    assert c.status().extra["duplicate_devices"] == 1 and c.counters["duplicate_device"] == 1
    assert c.counters["accepted"] == 3  # nothing else changes: the second of each seq is answered duplicate


def test_a_reinstall_is_not_counted_as_two_devices_on_one_id() -> None:
    """One conflict (a reinstall's first update under a seq its earlier install used): not a duplicate."""
    c = make_coordinator(k=10, timeout_s=None)
    c.handle(to_coord(0.0, DEV, "update", update(DEV, 1, nonce=5)))
    acts = c.handle(to_coord(1.0, DEV, "update", update(DEV, 1, nonce=6)))
    assert not notes(acts, "duplicate_device") and not c.counters["duplicate_device"]


def test_an_accepted_ack_echoes_the_updates_nonce() -> None:
    c = make_coordinator(k=10, timeout_s=None)
    (ack,) = published(c.handle(to_coord(0.0, DEV, "update", update(DEV, 1, nonce=77))), "ack")
    assert isinstance(ack, Ack) and ack.status == "accepted" and ack.nonce == 77


# ------------------------------------------------------------------ seq conflicts: what they must not call a duplicate (helper-174)


def test_replays_of_the_ids_own_updates_never_count_as_a_second_device() -> None:
    """A replay (or the device's own retry: same seq, same nonce) of the last accepted update, and
    a replay of an older one (any nonce: only the last accepted seq's nonce is known), are
    answered duplicate and counted as nothing more."""
    c = make_coordinator(k=10, timeout_s=None)
    for seq in (1, 2, 3):
        c.handle(to_coord(float(seq), DEV, "update", update(DEV, seq, nonce=10 + seq)))
    acts: list[object] = []
    for _ in range(3):
        acts += c.handle(to_coord(5.0, DEV, "update", update(DEV, 3, nonce=13)))  # the last one again
        acts += c.handle(to_coord(5.0, DEV, "update", update(DEV, 1, nonce=99)))  # an older seq, another nonce
    assert [a.status for a in published(acts, "ack") if isinstance(a, Ack)] == ["duplicate"] * 6
    assert not notes(acts, "duplicate_device") and c.counters["duplicate_device"] == 0 and not c._seq_conflicts


def test_two_lone_conflicts_far_apart_are_not_a_duplicate_device() -> None:
    """A clone pair conflicts at every seq (one accepted update between two conflicts); one device
    restored twice meets its last accepted seq once per restore, with its own updates accepted
    normally in between. helper-174: after 500 accepted updates the second lone conflict was said at
    ERROR as two devices on one id."""
    c = make_coordinator(k=10, timeout_s=None)
    c.handle(to_coord(0.0, DEV, "update", update(DEV, 1, nonce=5)))
    c.handle(to_coord(1.0, DEV, "update", update(DEV, 1, nonce=6)))  # a first restore: one conflict
    for seq in range(2, 502):
        c.handle(to_coord(float(seq), DEV, "update", update(DEV, seq, nonce=1000 + seq)))
    acts = c.handle(to_coord(600.0, DEV, "update", update(DEV, 501, nonce=7)))  # a second one, 500 updates later
    assert not notes(acts, "duplicate_device") and c.counters["duplicate_device"] == 0
    assert notes(_interleaved(make_coordinator(k=10, timeout_s=None)), "duplicate_device")  # a clone pair still is


def test_a_full_conflict_table_still_finds_a_clone_pair() -> None:
    """1024 ids with one old conflict each (reinstalls over a fleet's life, or forged ids in a
    plain-MQTT deployment): a clone pair that starts after them must still be found."""
    import coordinator.core as core_module

    c = make_coordinator(k=100_000, timeout_s=None)
    for i in range(core_module.MAX_SEQ_CONFLICT_IDS):
        c.handle(to_coord(0.0, f"r{i}", "update", update(f"r{i}", 1, nonce=1)))
        c.handle(to_coord(0.1, f"r{i}", "update", update(f"r{i}", 1, nonce=2)))
    acts = _interleaved(c)
    assert [n.data["device"] for n in notes(acts, "duplicate_device")] == [DEV]


def test_a_duplicate_id_is_said_and_counted_once_however_many_there_are(monkeypatch: pytest.MonkeyPatch) -> None:
    import coordinator.core as core_module

    monkeypatch.setattr(core_module, "MAX_SEQ_CONFLICT_IDS", 2)
    c = make_coordinator(k=100_000, timeout_s=None)
    said: list[str] = []
    for d in ("a", "b", "c"):
        for seq in range(1, 7):
            for nonce in (100 + seq, 200 + seq):
                said += [n.data["device"] for n in notes(c.handle(to_coord(1.0, d, "update", update(d, seq, nonce=nonce))),
                                                         "duplicate_device")]
    assert said == ["a", "b", "c"] and c.counters["duplicate_device"] == 3
