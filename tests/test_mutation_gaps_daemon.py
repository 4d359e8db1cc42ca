"""Tests that kill mutants of ``coordinator/daemon.py`` that every covering test let through
(helper-188's mutation audit; each docstring names the line at the audit's base commit, af6b3a9,
and the mutation). The daemon runs on the in-process driver of ``tests/test_durability.py``
(a fake transport, no broker): what a device would see — ack messages published and PUBACKs
let go — is journalled together with the registry's durable writes, in the order they happen.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.registry import Registry, read_release_record
from edge_sdk.tasks import get_task
from edge_sdk.wire import topics
from edge_sdk.wire.codec import encode, status_json
from edge_sdk.wire.messages import Ack, Control, Pull
from tests.helpers import wait_until
from tests.test_durability import REGION, FakeTransport, driver, in_one_batch, update


class Journal:
    """What the daemon did, in order: ("durable", registry method) once an fsyncing write
    returned, ("publish", topic, message) for each message published, ("puback", n) for each
    group of PUBACKs let go."""

    def __init__(self, daemon: Any, fake: FakeTransport) -> None:
        self.events: list[tuple[Any, ...]] = []
        self._lock = threading.Lock()
        for name in ("append_updates", "flush", "commit"):
            setattr(daemon.registry, name, self._after(getattr(daemon.registry, name), ("durable", name)))
        publish, ack = fake.publish, fake.ack

        def published(topic: str, payload: bytes, **kw: Any) -> None:
            publish(topic, payload, **kw)
            with fake._lock:
                msg = fake.sent[-1][1]
            self._add(("publish", topic, msg))

        def acked(held: Any) -> None:
            ack(held)
            if held:
                self._add(("puback", len(held)))

        fake.publish = published  # type: ignore[method-assign]
        fake.ack = acked  # type: ignore[method-assign]

    def _add(self, event: tuple[Any, ...]) -> None:
        with self._lock:
            self.events.append(event)

    def _after(self, fn: Callable[..., Any], event: tuple[Any, ...]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            out = fn(*args, **kwargs)
            self._add(event)
            return out
        return wrapped

    def first(self, pred: Callable[[tuple[Any, ...]], bool]) -> int:
        with self._lock:
            return next((i for i, e in enumerate(self.events) if pred(e)), -1)


def full(*args: Any, **kwargs: Any) -> None:
    """A registry write on a full disk."""
    raise OSError(errno.ENOSPC, "No space left on device")


def _accepted_ack(e: tuple[Any, ...]) -> bool:
    return e[0] == "publish" and isinstance(e[2], Ack) and e[2].status == "accepted"


def test_an_update_s_ack_and_puback_leave_only_after_its_append_and_fsync(tmp_path: Path) -> None:
    """daemon.py:820 ``elif self._log or self._held`` -> ``elif self._held`` (the accepted ack of the
    event whose update opened the batch's log published before the log's fsync), :842 the batch's
    PUBACKs sent before ``_finish_batch`` (before the fsync), :870 the held actions performed before
    the log is flushed, :827 ``append_updates`` -> ``stage`` (nothing written): each left every
    covering test passing. Here one update (k = 10: no commit): its accepted ack and its PUBACK come
    after a durable write, and a restart loads it."""
    w = get_task("digits").pretrained(seed=0)
    with driver(tmp_path, k=10) as (daemon, fake):
        journal = Journal(daemon, fake)
        in_one_batch(daemon, [update("d0", 1, w)])
        wait_until(lambda: journal.first(lambda e: e[0] == "puback") >= 0, 10, "the update's PUBACK")
        durable = journal.first(lambda e: e[0] == "durable")
        ack, puback = journal.first(_accepted_ack), journal.first(lambda e: e[0] == "puback")
        assert 0 <= durable < ack < puback, journal.events
    snap = Registry(tmp_path / "c", get_task("digits").spec).load()
    assert snap is not None and [u.key for u in snap.buffer] == [("d0", 1)]
    assert np.array_equal(snap.buffer[0].weights, w)


class RecordingTransport(FakeTransport):
    """FakeTransport that also keeps each publish's QoS and retain flag."""

    def __init__(self) -> None:
        super().__init__()
        self.flags: list[tuple[str, int, bool]] = []

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        with self._lock:
            self.flags.append((topic, qos, retain))
        super().publish(topic, payload, qos=qos, retain=retain)


def test_the_recall_and_every_status_are_published_retained_at_qos_1(tmp_path: Path) -> None:
    """daemon.py:1077 ``publish(..., qos=action.qos, retain=action.retain)`` -> ``retain=False`` or
    ``qos=0``, and :892 the batch's status ``Publish(..., retain=True)`` -> ``retain=False``: no
    covering test looked at the flags (the fake transport dropped them; over mosquitto nothing
    subscribed late enough to miss a retained message). The recall (which names the release) and
    the status must be retained, so that a device or operator tool subscribing later gets them; every
    message goes at QoS 1. A start, then a commit (k = 2) whose batch ends with a status."""
    w = get_task("digits").pretrained(seed=0)
    with driver(tmp_path, k=2, transport=RecordingTransport()) as (daemon, fake):
        assert isinstance(fake, RecordingTransport)
        in_one_batch(daemon, [update("a", 1, w), update("b", 1, w + 1e-3)])
        wait_until(lambda: daemon.core.version == 1 and fake.last_status().get("version") == 1, 10, "version 1 and its status")
        with fake._lock:
            flags = list(fake.flags)
    recall, status = topics.recall_topic(REGION), topics.status_topic(REGION)
    assert any(t == recall for t, _, _ in flags) and sum(t == status for t, _, _ in flags) >= 2, flags
    assert all(retain for t, _, retain in flags if t in (recall, status)), flags
    assert not any(retain for t, _, retain in flags if t not in (recall, status)), flags  # acks are not retained
    assert {qos for _, qos, _ in flags} == {1}, flags


def test_an_outage_core_holds_no_buffered_update_and_the_recovery_brings_the_durable_ones_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """daemon.py:1005 ``snapshot = dataclasses.replace(snapshot, buffer=())`` deleted (the core rebuilt
    while storage fails gets the durable buffer): no covering test had an update durable before the
    outage. That core could aggregate it (a timer, a peer) and try to commit while nothing can be
    written. Here d0's update is durable, d1's append fails: the outage's status says 0 buffered;
    once storage works again d0's update is back (1 buffered), d1's is not (it was never acknowledged)."""
    w = get_task("digits").pretrained(seed=0)
    with driver(tmp_path, k=10) as (daemon, fake):
        in_one_batch(daemon, [update("d0", 1, w)])
        wait_until(lambda: len(fake.acks("accepted")) == 1 and fake.last_status().get("buffered") == 1, 10, "d0 accepted")
        monkeypatch.setattr(daemon.registry, "append_updates", full)
        monkeypatch.setattr(daemon.registry, "probe", full)
        in_one_batch(daemon, [update("d1", 1, w + 1e-3)])
        wait_until(lambda: fake.last_status().get("extra", {}).get("storage_ok") is False, 10, "storage_ok false")
        assert fake.last_status()["buffered"] == 0 and daemon.core.buffer == ()
        monkeypatch.undo()
        wait_until(lambda: fake.last_status().get("extra", {}).get("storage_ok") is True, 10, "storage_ok true")
        assert fake.last_status()["buffered"] == 1 and [u.key for u in daemon.core.buffer] == [("d0", 1)]
        assert [a.device for a in fake.acks("accepted")] == ["d0"]


def test_an_operator_pin_s_puback_leaves_once_its_release_is_recorded(tmp_path: Path) -> None:
    """daemon.py:859 ``acks, self._after_loads = self._after_loads + acks, []`` -> ``acks, []`` (the
    PUBACKs held while an operator's pin or rollback reads its version were dropped: never sent, the
    command and the messages after it kept the broker's in-flight window and came back at each
    reconnect); only test_gate_mqtt's restart test, beyond the list's first 90 s, ran a pin. A pin
    (signed with the coordinator's own key, in its name) of version 0 after version 1: its PUBACK
    is let go, after the release record that makes it durable, and the record says pinned."""
    w = get_task("digits").pretrained(seed=0)
    with driver(tmp_path, k=1) as (daemon, fake):
        in_one_batch(daemon, [update("a", 1, w)])
        wait_until(lambda: daemon.core.version == 1 and len(fake.acked) == 1, 10, "version 1 and the update's PUBACK")
        journal = Journal(daemon, fake)
        daemon.registry.record_release = journal._after(daemon.registry.record_release, ("durable", "record_release"))
        topic = topics.control_topic(REGION)
        pin = Control(command="pin", operator=daemon.coordinator_id, issued_at=time.time(), nonce=7, version=0)
        in_one_batch(daemon, [(topic, encode(pin, signer=daemon.signer, scope=topics.signing_scope(topic)))])
        wait_until(lambda: len(fake.acked) == 2, 10, "the pin's PUBACK")
        assert daemon.core.status().extra["pinned"]
        recorded = journal.first(lambda e: e == ("durable", "record_release"))
        assert 0 <= recorded < journal.first(lambda e: e[0] == "puback"), journal.events
    assert read_release_record(tmp_path / "c")["pinned"] is True


def test_a_drained_stop_of_an_idle_daemon_settles_without_waiting_out_its_timeout(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """daemon.py:654 (``_settle``) ``self.actor.call(lambda: self._after_batch.append(settled.set))``
    deleted: nothing ever set the event, so every drained stop waited ACTOR_STOP_S (10 s) and warned
    that the backlog was not handled. The covering tests only got slower. An idle daemon (one update
    handled and acknowledged): its stop says no such thing."""
    w = get_task("digits").pretrained(seed=0)
    with caplog.at_level(logging.WARNING, logger="edgeci.coordinator"), driver(tmp_path, k=10) as (daemon, fake):
        in_one_batch(daemon, [update("d0", 1, w)])
        wait_until(lambda: len(fake.acked) == 1, 10, "the update's PUBACK")
    assert daemon.stopped.is_set() and "was not handled within" not in caplog.text, caplog.text


class QoS0Transport(FakeTransport):
    """Every message arrives at QoS 0: nothing to acknowledge."""

    def hold_ack(self) -> Any:
        return None


def test_a_qos_0_message_is_handled(tmp_path: Path) -> None:
    """daemon.py:681 (``_on_message``) the QoS 0 branch's ``self.actor.submit(...)`` deleted: a message
    that came without a PUBACK to hold was dropped unhandled. Every covering test's devices publish
    at QoS 1. A serving pull at QoS 0 is answered with the model."""
    with driver(tmp_path, k=10, transport=QoS0Transport()) as (daemon, fake):
        pull = Pull(device="d0", seq=1, model_id="digits-cnn", serve=True)
        daemon._on_message(topics.device_topic(REGION, "d0", "pull"), encode(pull))
        wait_until(lambda: len(fake.models()) == 1, 10, "the model for the QoS 0 pull")
        assert fake.acked == []


def test_a_command_whose_record_fails_inside_an_outage_is_not_acknowledged(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """daemon.py:949 (``_storage_failed``) ``self._withhold = True`` -> ``False`` (helper-188 left it:
    no test wrote during an outage). Storage already failing (b's update refused), an operator's pin
    whose version and release record cannot be written either: its PUBACK is withheld, and once storage
    works again the connection is closed so that the broker delivers the pin again. With the mutant
    the pin's PUBACK was let go although its release record had failed: the order the pin test above
    asks for outside an outage. Here the pinned version came back from the pending log at the
    recovery, so the pin holds in the end either way."""
    w = get_task("digits").pretrained(seed=0)
    with driver(tmp_path, k=1) as (daemon, fake):
        in_one_batch(daemon, [update("a", 1, w)])
        wait_until(lambda: daemon.core.version == 1 and len(fake.acked) == 1, 10, "version 1 and the update's PUBACK")

        append = daemon.registry.append_updates

        def append_full(updates: Any) -> None:  # (nothing to write: the fsync of what is written works)
            updates = list(updates)
            if updates:
                full()
            append(updates)

        monkeypatch.setattr(daemon.registry, "append_updates", append_full)
        monkeypatch.setattr(daemon.registry, "probe", full)
        monkeypatch.setattr(daemon.registry, "commit", full)
        in_one_batch(daemon, [update("b", 1, w + 1e-3)])
        wait_until(lambda: fake.last_status().get("extra", {}).get("storage_ok") is False, 10, "storage_ok false")
        monkeypatch.setattr(daemon.registry, "record_release", full)
        failures = daemon.storage_failures
        topic = topics.control_topic(REGION)
        pin = Control(command="pin", operator=daemon.coordinator_id, issued_at=time.time(), nonce=7, version=0)
        in_one_batch(daemon, [(topic, encode(pin, signer=daemon.signer, scope=topics.signing_scope(topic)))])
        wait_until(lambda: daemon.storage_failures > failures, 10, "the pin's record failing")
        in_one_batch(daemon, [])  # (one more batch: anything the pin's held there would have been let go by now)
        assert fake.acked[1:] == [], fake.acked  # b's (refused while failing: it comes again) and the pin's withheld
        redelivered = fake.redelivered
        monkeypatch.undo()
        wait_until(lambda: fake.last_status().get("extra", {}).get("storage_ok") is True, 10, "storage_ok true")
        assert fake.redelivered > redelivered and fake.acked[1:] == [], fake.acked
    assert read_release_record(tmp_path / "c")["pinned"] is True  # (the pinned version came back from the pending log)


def test_our_own_retained_status_read_back_is_acknowledged_with_the_batch(tmp_path: Path) -> None:
    """daemon.py:676 (``_on_message``) ``if held_status is not None`` -> ``is None`` (helper-188 left it):
    the coordinator's own retained status, read back from the broker, was never acknowledged, so it
    kept a place of the broker's in-flight window for good (and came back at every reconnect). Its
    PUBACK leaves with the batch's, after those held before it."""
    w = get_task("digits").pretrained(seed=0)
    with driver(tmp_path, k=10) as (daemon, fake):
        in_one_batch(daemon, [update("d0", 1, w)])
        wait_until(lambda: len(fake.acked) == 1 and fake.last_status(), 10, "d0's PUBACK and a status")
        status = topics.status_topic(REGION)
        daemon._on_message(status, status_json(daemon.core.status()))  # (as the broker hands it back)
        in_one_batch(daemon, [update("d1", 1, w + 1e-3)])
        wait_until(lambda: len(fake.acked) == 3, 10, "the status's and d1's PUBACKs")
        assert fake.acked == sorted(fake.acked), fake.acked  # in the order they were held


class KeptMessageTransport(FakeTransport):
    """The broker delivers a message it kept for the coordinator's persistent session while the
    connection is made, before :meth:`CoordinatorDaemon.start` queues its own start of the core."""

    daemon: Any = None
    kept: tuple[str, bytes] | None = None

    def start(self, timeout: float = 0.0) -> None:
        assert self.daemon is not None and self.kept is not None
        self.daemon._on_message(*self.kept)


def test_a_core_whose_first_start_fails_on_a_kept_message_is_rebuilt_and_handles_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """daemon.py:755 (``_handle``) ``self._core_failed(exc)`` deleted (helper-188 left it): the core's
    start, run by the first message the broker kept for us, raised and was swallowed: the core stayed
    half started (no rebuild, the failure not counted) and handled the message as if nothing had
    happened. The failure is counted and the core rebuilt from the durable state before the message,
    which is then accepted."""
    from coordinator.core import CoordinatorCore
    from coordinator.daemon import CoordinatorDaemon

    calls: list[float] = []
    start_core, start_daemon = CoordinatorCore.start, CoordinatorDaemon.start

    def failing_once(self: Any, now: float) -> Any:
        calls.append(now)
        if len(calls) == 1:
            raise RuntimeError("the first start fails")
        return start_core(self, now)

    def start(self: Any, timeout: float = 10.0) -> Any:
        self.transport.daemon = self
        return start_daemon(self, timeout)

    monkeypatch.setattr(CoordinatorCore, "start", failing_once)
    monkeypatch.setattr(CoordinatorDaemon, "start", start)
    fake = KeptMessageTransport()
    fake.kept = update("d0", 1, get_task("digits").pretrained(seed=0))
    with driver(tmp_path, k=10, transport=fake) as (daemon, fake):
        wait_until(lambda: len(fake.acks("accepted")) == 1 and len(fake.acked) == 1, 10, "d0's update accepted")
        assert daemon.core_failures == 1 and len(calls) >= 2, (daemon.core_failures, calls)
