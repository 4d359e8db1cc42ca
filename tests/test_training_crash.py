"""A training job that kills the device process (the OOM killer, a native crash) is seen after the
restart and backed off (helper-144's restart audit: the back-off was in memory only, so a supervised
app trained the same job again at once on every restart, for ever)."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_sdk.client import EdgeClient
from edge_sdk.core.device import CRASH_HOLD_MAX_S, CRASH_HOLD_S, DeviceConfig, DeviceCore, Phase
from edge_sdk.core.events import (
    MarkTraining,
    MessageReceived,
    Notify,
    Publish,
    ScheduleTimer,
    StartTraining,
    TimerFired,
    TrainingFailed,
    TrainingFinished,
)
from edge_sdk.errors import LocalProtocolError
from edge_sdk.store import SampleStore, StorageError
from edge_sdk.wire import topics
from edge_sdk.wire.codec import decode, encode
from edge_sdk.wire.messages import ModelMsg, Pull
from tests.helpers import SIGNER, SPEC

DEV = "d1"
TIMEOUT_S = 5.0


def restarted(mark: MarkTraining | None, *, total: int = 6) -> DeviceCore:
    """A device restored with ``total`` samples, none trained (the crashed job's were not learned)."""
    cfg = DeviceConfig(device_id=DEV, region="r1", spec=SPEC, min_samples=4, request_timeout_s=TIMEOUT_S)
    return DeviceCore(cfg, rng=random.Random(0), total=total, training=mark)


def training_pulls(actions: list[Any]) -> list[Pull]:
    return [m for a in actions if isinstance(a, Publish) and isinstance(m := decode(a.payload), Pull) and not m.serve]


def notes(actions: list[Any], kind: str) -> list[dict[str, Any]]:
    return [a.data for a in actions if isinstance(a, Notify) and a.kind == kind]


def model_reply(seq: int) -> MessageReceived:
    topic = topics.device_topic("r1", DEV, "model")
    msg = ModelMsg(model_id="toy", version=1, reply_to=seq, weights=np.ones(SPEC.size, dtype=np.float32))
    return MessageReceived(now=0.5, topic=topic, payload=encode(msg, signer=SIGNER, scope=topics.signing_scope(topic)))


def to_training(c: DeviceCore) -> tuple[int, list[Any]]:
    """Start ``c`` (no mark) and drive it into a training job: its id and the actions that started it."""
    (pull,) = training_pulls(c.start(0.0))
    acts = c.handle(model_reply(pull.seq))
    assert c.state.phase is Phase.TRAINING
    return next(a for a in acts if isinstance(a, StartTraining)).job.job_id, acts


def test_a_job_is_marked_in_flight_before_it_starts_and_cleared_when_it_finishes() -> None:
    c = restarted(None)
    job_id, acts = to_training(c)
    marks = [a for a in acts if isinstance(a, MarkTraining | StartTraining)]
    assert marks[0] == MarkTraining(in_flight=True, crashes=0) and isinstance(marks[1], StartTraining)
    acts = c.handle(TrainingFinished(now=1.0, job_id=job_id, weights=np.ones(SPEC.size, np.float32), n_samples=6))
    assert acts[0] == MarkTraining(in_flight=False, crashes=0)  # cleared before the update leaves


def test_a_restart_with_the_mark_in_flight_backs_off_as_a_failed_job() -> None:
    """The rule under test: before, the restored device pulled and trained the same job at once."""
    c = restarted(MarkTraining(in_flight=True, crashes=0))
    acts = c.start(100.0)
    assert not training_pulls(acts) and c.state.phase is Phase.IDLE
    assert notes(acts, "training_crashed") == [{"crashes": 1, "retry_in_s": TIMEOUT_S}]
    assert MarkTraining(in_flight=False, crashes=1, hold_until=100.0 + TIMEOUT_S, failures=1) in acts  # cleared, the counts kept
    assert ScheduleTimer(at=100.0 + TIMEOUT_S) in acts
    assert c.state.train_failures == 1 and c.state.counters["training_crashed"] == 1
    assert not training_pulls(c.handle(TimerFired(now=104.0)))
    assert len(training_pulls(c.handle(TimerFired(now=105.0)))) == 1  # it tries again once the hold is over


@pytest.mark.parametrize(("before", "hold_s"), [
    (1, 2 * TIMEOUT_S),  # the second crash in a row: the failed-job back-off, doubled
    (2, CRASH_HOLD_S),  # the third: an hour
    (3, 2 * CRASH_HOLD_S),
    (40, CRASH_HOLD_MAX_S),  # never longer than a day: it still tries again
])
def test_crashes_in_a_row_grow_the_hold(before: int, hold_s: float) -> None:
    c = restarted(MarkTraining(in_flight=True, crashes=before))
    acts = c.start(1000.0)
    assert notes(acts, "training_crashed") == [{"crashes": before + 1, "retry_in_s": hold_s}]
    assert c.state.hold_until == 1000.0 + hold_s and not training_pulls(acts)


def test_a_restart_during_the_hold_keeps_it_and_counts_no_crash() -> None:
    c = restarted(MarkTraining(in_flight=False, crashes=3, hold_until=4000.0))  # 3000 s left of the third crash's hour
    acts = c.start(1000.0)
    assert not notes(acts, "training_crashed") and not training_pulls(acts)
    assert ScheduleTimer(at=4000.0) in acts
    assert len(training_pulls(c.handle(TimerFired(now=4000.0)))) == 1


def test_a_hold_past_its_back_off_is_cut_to_it() -> None:
    """A damaged record or a clock set back must not stop training for years; nor longer than the
    back-off of the crashes recorded (the third crash: an hour; helper-153: it was a day, the longest
    hold, whatever the count)."""
    c = restarted(MarkTraining(in_flight=False, crashes=3, hold_until=1e12))
    c.start(1000.0)
    assert c.state.hold_until == 1000.0 + CRASH_HOLD_S
    c = restarted(MarkTraining(in_flight=False, crashes=40, hold_until=1e12))
    c.start(1000.0)
    assert c.state.hold_until == 1000.0 + CRASH_HOLD_MAX_S


def test_a_finished_job_resets_the_count_and_a_failed_one_keeps_it() -> None:
    c = restarted(MarkTraining(in_flight=False, crashes=2))  # no hold left: trains at once
    job_id, acts = to_training(c)
    assert MarkTraining(in_flight=True, crashes=2, failures=2) in acts
    acts = c.handle(TrainingFailed(now=1.0, job_id=job_id, error="RuntimeError: boom"))
    assert c.state.hold_until == 1.0 + 4 * TIMEOUT_S  # the third failure in a row (two crashes, then this)
    # a job that raised is no crash, nor a success; its back-off goes into the record
    assert acts[0] == MarkTraining(in_flight=False, crashes=2, hold_until=1.0 + 4 * TIMEOUT_S, failures=3)
    (pull,) = training_pulls(c.handle(TimerFired(now=c.state.hold_until)))
    acts = c.handle(model_reply(pull.seq))
    job_id = next(a for a in acts if isinstance(a, StartTraining)).job.job_id
    acts = c.handle(TrainingFinished(now=9.0, job_id=job_id, weights=np.ones(SPEC.size, np.float32), n_samples=6))
    assert acts[0] == MarkTraining(in_flight=False, crashes=0) and c.state.train_crashes == 0


def test_an_in_memory_device_without_a_mark_starts_as_before() -> None:
    acts = restarted(None).start(0.0)
    assert not notes(acts, "training_crashed") and len(training_pulls(acts)) == 1


def test_a_job_that_raised_keeps_its_back_off_across_a_restart() -> None:
    """A job that raises every time (not a crash: the process lives) in an app that is restarted (its
    supervisor, the phone's OS). Before, the mark cleared after the failure held no back-off and the
    restarted device trained the failing job again at once, its back-off starting from the first again."""
    c = restarted(None)
    job_id, _ = to_training(c)
    acts = c.handle(TrainingFailed(now=1.0, job_id=job_id, error="RuntimeError: boom"))
    (mark,) = [a for a in acts if isinstance(a, MarkTraining)]
    again = restarted(mark)
    acts = again.start(2.0)  # restarted within the back-off
    assert not training_pulls(acts) and ScheduleTimer(at=1.0 + TIMEOUT_S) in acts
    assert mark == MarkTraining(in_flight=False, crashes=0, hold_until=1.0 + TIMEOUT_S, failures=1)
    assert not notes(acts, "training_crashed") and again.state.train_crashes == 0  # it raised: no crash
    (pull,) = training_pulls(again.handle(TimerFired(now=1.0 + TIMEOUT_S)))
    acts = again.handle(model_reply(pull.seq))
    assert MarkTraining(in_flight=True, crashes=0, failures=1) in acts
    job_id = next(a for a in acts if isinstance(a, StartTraining)).job.job_id
    acts = again.handle(TrainingFailed(now=10.0, job_id=job_id, error="RuntimeError: boom"))
    assert notes(acts, "training_failed")[0]["failures"] == 2 and again.state.hold_until == 10.0 + 2 * TIMEOUT_S  # it grows


def test_a_crash_after_raised_failures_backs_off_from_all_of_them() -> None:
    """The failures in a row count a crash too: two raised, then one killed the process: the third back-off."""
    acts = restarted(MarkTraining(in_flight=True, crashes=0, failures=2)).start(100.0)
    assert notes(acts, "training_crashed") == [{"crashes": 1, "retry_in_s": 4 * TIMEOUT_S}]
    assert MarkTraining(in_flight=False, crashes=1, hold_until=100.0 + 4 * TIMEOUT_S, failures=3) in acts


@pytest.mark.parametrize("fields", [{"in_flight": "yes"}, {"in_flight": True, "crashes": -1},
                                    {"in_flight": False, "failures": -1}, {"in_flight": False, "failures": 1.5},
                                    {"in_flight": False, "hold_until": float("nan")}, {"in_flight": True, "crashes": True}])
def test_a_bad_mark_is_refused(fields: dict[str, Any]) -> None:
    with pytest.raises(LocalProtocolError):
        MarkTraining(**fields)


# ------------------------------------------------------------------ the driver's record


def _client(data_dir: Path) -> EdgeClient:
    return EdgeClient(broker="mqtt://127.0.0.1:1", device_id="crashy", region="r1", task="digits", data_dir=data_dir,
                      refresh_s=None)


def _record(data_dir: Path) -> Any:
    with SampleStore.open(data_dir / "samples.sqlite3") as store:
        raw = store.get_meta("training")
    return None if raw is None else json.loads(str(raw))


def test_a_clean_stop_while_training_is_not_a_crash(tmp_path: Path) -> None:
    client = _client(tmp_path)
    client._perform(MarkTraining(in_flight=True, crashes=1))  # a job started; stop() comes before it ends
    client.stop()
    assert _record(tmp_path) == {"in_flight": False, "crashes": 1, "hold_until": 0.0, "failures": 0}
    again = _client(tmp_path)
    try:
        assert not notes(again.core.start(1000.0), "training_crashed")
    finally:
        again.stop()


def test_a_mark_left_in_flight_is_read_back_as_a_crash(tmp_path: Path) -> None:
    with SampleStore.open(tmp_path / "samples.sqlite3") as store:
        store.set_meta("training", json.dumps({"in_flight": True, "crashes": 0, "hold_until": 0.0}))
    client = _client(tmp_path)
    try:
        assert [n["crashes"] for n in notes(client.core.start(1000.0), "training_crashed")] == [1]
    finally:
        client.stop()


@pytest.mark.parametrize("damaged", ["not json", json.dumps({"in_flight": True}), json.dumps({"in_flight": 1, "crashes": 0,
                                     "hold_until": 0}), b"\x00", 7, "[" * 500])
def test_a_damaged_mark_is_ignored_and_the_device_starts(tmp_path: Path, damaged: Any, caplog: pytest.LogCaptureFixture) -> None:
    with SampleStore.open(tmp_path / "samples.sqlite3") as store:
        store.set_meta("training", damaged)
    with caplog.at_level("ERROR", logger="edgeci.device"):
        client = _client(tmp_path)
    try:
        assert not notes(client.core.start(1000.0), "training_crashed")
    finally:
        client.stop()
    assert any("unreadable training mark" in r.getMessage() for r in caplog.records)


def test_a_raised_jobs_back_off_survives_the_driver_and_its_store(tmp_path: Path) -> None:
    """The real client and store: the record the failed job leaves is read back by the next client on the data dir."""
    core = restarted(None)  # the marks a core emits around a job that raised, performed by the real client
    job_id, acts = to_training(core)
    acts += core.handle(TrainingFailed(now=1.0, job_id=job_id, error="RuntimeError: boom"))
    client = _client(tmp_path)
    try:
        for action in acts:
            if isinstance(action, MarkTraining):
                client._perform(action)
    finally:
        client.stop()
    assert _record(tmp_path) == {"in_flight": False, "crashes": 0, "hold_until": 1.0 + TIMEOUT_S, "failures": 1}
    again = _client(tmp_path)
    try:
        again.core.state.total = 100  # samples waiting: only the back-off holds the pull
        acts = again.core.start(2.0)
        assert not training_pulls(acts) and ScheduleTimer(at=1.0 + TIMEOUT_S) in acts
        assert again.core.state.train_failures == 1
    finally:
        again.stop()


def test_a_record_from_before_failures_reads_as_before(tmp_path: Path) -> None:
    with SampleStore.open(tmp_path / "samples.sqlite3") as store:
        store.set_meta("training", json.dumps({"in_flight": False, "crashes": 2, "hold_until": 0.0}))
    client = _client(tmp_path)
    try:
        assert client._training_mark() == MarkTraining(in_flight=False, crashes=2)
        client.core.start(1000.0)
        assert client.core.state.train_failures == 2
    finally:
        client.stop()


def test_a_full_disk_does_not_hold_training_back(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The mark cannot be written: the job runs unguarded (said once), nothing raises into the actor."""
    client = _client(tmp_path)

    def full(key: str, value: Any) -> None:
        raise StorageError("database or disk is full (injected)")

    client.store.set_meta = full  # type: ignore[method-assign]
    try:
        with caplog.at_level(logging.ERROR, logger="edgeci.device"):
            client._perform(MarkTraining(in_flight=True, crashes=0))
            client._perform(MarkTraining(in_flight=False, crashes=0))
        said = [r for r in caplog.records if "cannot save its training mark" in r.getMessage()]
        assert len(said) == 1
    finally:
        client.stop()
