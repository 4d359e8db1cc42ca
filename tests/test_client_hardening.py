"""EdgeClient against a misbehaving coordinator or an unlucky interleaving, without a broker:
training hints are bounded, the sample ids of jobs that never finish are not kept, and a
model deployed while ``predict`` builds its engine is the one served."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_sdk.core.events import Notify, TrainingJob
from edge_sdk.tasks.base import (
    HINT_BOUNDS,
    TrainConfig,
    TrainResult,
    hints_out_of_bounds,
    train_config,
)
from tests.helpers import StopAfter, ThenOnce, close_unstarted, unstarted_client


def test_training_hints_are_clamped_to_their_bounds() -> None:
    defaults = TrainConfig(epochs=2, batch_size=16, lr=0.05, mu=0.0)
    wild = {"epochs": 1e9, "batch_size": 0.0, "lr": -1.0, "mu": 1e12, "staleness": 7.0}
    cfg = train_config(wild, defaults, seed=3, group="classifier")
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.mu) == (100, 1, 0.0, 10_000.0)
    assert (cfg.seed, cfg.group) == (3, "classifier")
    assert hints_out_of_bounds(wild) == {"epochs": 1e9, "batch_size": 0.0, "lr": -1.0, "mu": 1e12}
    sane = {"epochs": 5, "batch_size": 8, "lr": 0.01, "mu": 0.1}
    assert train_config(sane, defaults, seed=0, group="full") == TrainConfig(epochs=5, batch_size=8, lr=0.01, mu=0.1)
    assert train_config({}, defaults, seed=0, group="full") == defaults
    assert not hints_out_of_bounds(sane)
    for name, (lo, hi) in HINT_BOUNDS.items():
        assert not hints_out_of_bounds({name: lo}) and not hints_out_of_bounds({name: hi})


def _client(tmp_path: Any) -> Any:
    return unstarted_client(tmp_path, min_samples=1)


_close = close_unstarted


def _job(c: Any, job_id: int, hints: dict[str, float] | None = None) -> TrainingJob:
    w = np.zeros(c.task.spec.size, np.float32)
    return TrainingJob(job_id=job_id, base_version=0, weights=w, n_samples=1, hints=hints or {})


def test_the_client_trains_with_bounded_hints_and_says_so(tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    c = _client(tmp_path)
    seen: list[TrainConfig] = []

    def run(job: TrainingJob, config: TrainConfig) -> tuple[TrainResult, list[int]]:
        seen.append(config)
        return TrainResult(weights=job.weights, n_samples=1, loss=0.0, seconds=0.0), [1]

    c.run_training_job = run
    try:
        with caplog.at_level(logging.WARNING, logger="edgeci.device"):
            c._train(_job(c, 1, {"epochs": 1e9, "lr": 0.01}))
        assert (seen[0].epochs, seen[0].lr) == (100, 0.01)  # epochs=1e9 occupied the device for ever
        assert "clamped" in caplog.text and "epochs" in caplog.text
    finally:
        _close(c)


def test_sample_ids_of_jobs_that_never_report_trained_are_not_kept(tmp_path: Any) -> None:
    """The client kept the ids of every job until its ``trained`` notify; a job whose weights
    were unusable, or one a region switch made stale, never sends one, so each retry leaked a
    list of all the device's sample ids."""
    c = _client(tmp_path)
    c.run_training_job = lambda job, config: (TrainResult(weights=job.weights, n_samples=3, loss=0.0, seconds=0.0),
                                              [1, 2, 3])
    try:
        for job_id in range(1, 6):  # five jobs; none is reported trained (e.g. each diverged)
            c._train(_job(c, job_id))
            c.submitted.pop()(float(job_id))  # the actor takes the TrainingFinished
        assert list(c._job_ids) == [5]  # only the job that may still report
        c._on_notify(Notify(kind="trained", data={"job_id": 5, "seq": 0}))
        assert c._job_ids == {}
    finally:
        _close(c)


def test_a_model_deployed_while_predict_builds_its_engine_is_the_one_served(tmp_path: Any) -> None:
    """After a failover versions go down: predict read (5, home's weights), the other region's
    v3 was deployed (no engine to reset yet), then predict built its engine from the stale pair
    and served it until a version above 5 came."""
    from edge_sdk.core.events import DeployModel

    c = _client(tmp_path)
    task = c.task
    home = task.pretrained(seed=0)
    away = np.zeros_like(home)
    c._deployed = (5, home)

    c._lock = ThenOnce(c._lock, lambda: c._perform(DeployModel(version=3, weights=away)))  # when predict lets go of it
    try:
        x = np.zeros((1, *c.contract.shape), np.float32)
        c.predict(x)
        assert c._engine.version == 3
        np.testing.assert_array_equal(c.predict(x), np.argmax(task.logits(away, x), axis=1))
    finally:
        _close(c)


def test_predict_never_swaps_the_previous_numbering_into_a_newer_engine(tmp_path: Any) -> None:
    """helper-146: predict read (8, home's weights) under the lock, then the engine outside it.
    Meanwhile the other region's v3 was deployed (the engine at 8 refused it and was dropped) and
    another predict built the engine for v3; the first predict then found that engine "behind"
    its stale 8 and swapped home's model into it. ``version`` said 3 while every predict served
    home's v8, until the new region's numbering passed 8."""
    from edge_sdk.core.events import DeployModel

    c = _client(tmp_path)
    task = c.task
    home = task.pretrained(seed=0)
    away = np.zeros_like(home)
    x = np.zeros((1, *c.contract.shape), np.float32)
    try:
        c._perform(DeployModel(version=8, weights=home))
        c.predict(x)
        assert c._engine.version == 8

        def deploy_and_predict() -> None:  # v3 deployed, and a second app thread predicts (building the engine for v3)
            c._perform(DeployModel(version=3, weights=away))
            c.predict(x)

        c._lock = ThenOnce(c._lock, deploy_and_predict)  # the first time a predict lets go of it
        c.predict(x)  # the first app thread, interleaved as above
        assert c.version == 3
        assert c._engine.version == 3  # not home's 8
        np.testing.assert_array_equal(c.predict(x), np.argmax(task.logits(away, x), axis=1))
    finally:
        _close(c)


def _full_disk_harness(c: Any, tmp_path: Any, w: Any) -> tuple[dict[str, bool], Callable[[Any], None], Callable[[Any], Any]]:
    """For an unstarted client ``c``: a switch (``full["on"]``) that makes saving its counters fail
    as on a full disk, ``run(event)`` through its actor, and ``model_for(pull)``, the signed reply."""
    from edge_sdk.core.events import MessageReceived
    from edge_sdk.store import StorageError
    from edge_sdk.wire import topics
    from edge_sdk.wire.codec import encode
    from edge_sdk.wire.messages import ModelMsg
    from tests.helpers import SIGNER

    save = c.store.set_meta_many
    full = {"on": False}

    def set_meta_many(values: Any) -> None:
        if full["on"]:
            raise StorageError(f"{tmp_path}/samples.sqlite3: database or disk is full")
        save(values)

    c.store.set_meta_many = set_meta_many

    def run(event: Any) -> None:
        c.actor._run_one(lambda now: event)

    def model_for(pull: Any) -> Any:
        msg = ModelMsg(model_id=c.task.spec.model_id, version=0, reply_to=pull.seq, weights=w, release=0)
        return MessageReceived(now=1.0, topic=topics.device_topic("default", "d1", "model"),
                               payload=encode(msg, signer=SIGNER, scope=topics.device_scope("default", "model")))

    return full, run, model_for


def test_a_full_disk_at_the_counters_holds_requests_without_sticking_the_device(tmp_path: Any) -> None:
    """The store cannot save next_seq / trained_upto (a full disk): the training the model asked
    for still runs (the save used to raise out of the actor and drop it: the core sat in
    TRAINING for good), and no request leaves with a sequence number the store does not hold
    (the push's retry used to send it; a restart then reused the number). Once the store
    works again the retry sends the update (durability audit)."""
    from edge_sdk.core.device import Phase
    from edge_sdk.core.events import SampleAdded, TimerFired, TrainingFinished
    from edge_sdk.tasks import get_task
    from edge_sdk.wire.codec import decode
    from edge_sdk.wire.messages import Pull, Update
    from tests.helpers import SIGNER

    w = get_task("digits").pretrained(seed=0)
    c = unstarted_client(tmp_path, min_samples=2, trusted_keys={SIGNER.kid: SIGNER.public_raw}, request_timeout_s=1.0)
    sent: list[Any] = []

    def publish(topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        msg = decode(payload)
        if isinstance(msg, Pull | Update):  # never a number the store would not give back after a restart
            assert int(c.store.get_meta("next_seq") or 0) > msg.seq, (type(msg).__name__, msg.seq)
        sent.append(msg)

    jobs: list[Any] = []
    c.transport.publish = publish
    c._trainer.submit = lambda fn, job: jobs.append(job)
    full, run, model_for = _full_disk_harness(c, tmp_path, w)

    def last(kind: type) -> Any:
        return [m for m in sent if isinstance(m, kind)][-1]

    try:
        c.actor.run_actions(c.core.start(0.0))  # the serving pull
        run(model_for(last(Pull)))
        for i in range(2):
            c.store.add(np.zeros((1, 8, 8), np.float32), i)
        run(SampleAdded(now=2.0, total=2))  # the training pull
        full["on"] = True
        run(model_for(last(Pull)))  # [save the counters (fails), start training]
        assert not c.actor.errors and len(jobs) == 1 and c.core.state.phase is Phase.TRAINING
        run(TrainingFinished(now=3.0, job_id=jobs[0].job_id, weights=w + 0.01, n_samples=2))
        run(TimerFired(now=100.0))  # the push's retry, the disk still full
        assert not [m for m in sent if isinstance(m, Update)] and c.core.state.phase is Phase.PUSHING
        full["on"] = False
        run(TimerFired(now=1000.0))  # the next retry: the counters are saved first, then it leaves
        update = last(Update)
        assert int(c.store.get_meta("next_seq")) > update.seq and not c.actor.errors
    finally:
        close_unstarted(c)


def test_a_request_held_by_a_full_disk_leaves_with_the_next_label_stored(tmp_path: Any) -> None:
    """Requests held while the counters cannot be saved went out only at the core's next retry,
    whose timeout doubles while they are held (up to max_backoff_s, 5 min): on a real 2 MB tmpfs the
    update stayed unsent 12 s after space returned (device durability audit, h103). The next label
    the store keeps shows the disk takes writes again: the counters are saved and the held update
    leaves at once, once."""
    from edge_sdk.core.events import SampleAdded, TimerFired, TrainingFinished
    from edge_sdk.tasks import get_task
    from edge_sdk.wire.codec import decode
    from edge_sdk.wire.messages import Pull, Update
    from tests.helpers import SIGNER

    w = get_task("digits").pretrained(seed=0)
    c = unstarted_client(tmp_path, min_samples=2, trusted_keys={SIGNER.kid: SIGNER.public_raw}, request_timeout_s=1.0)
    sent: list[Any] = []
    c.transport.publish = lambda topic, payload, qos=1, retain=False: sent.append(decode(payload))
    jobs: list[Any] = []
    c._trainer.submit = lambda fn, job: jobs.append(job)
    c.actor.call = lambda fn: fn()  # the actor's own work, run in place
    full, run, model_for = _full_disk_harness(c, tmp_path, w)

    try:
        c.actor.run_actions(c.core.start(0.0))
        run(model_for([m for m in sent if isinstance(m, Pull)][-1]))
        for i in range(2):
            c.store.add(np.zeros((1, 8, 8), np.float32), i)
        run(SampleAdded(now=2.0, total=2))
        run(model_for([m for m in sent if isinstance(m, Pull)][-1]))
        full["on"] = True
        run(TrainingFinished(now=3.0, job_id=jobs[0].job_id, weights=w + 0.01, n_samples=2))
        run(TimerFired(now=100.0))  # a retry, held too
        assert not [m for m in sent if isinstance(m, Update)]
        full["on"] = False
        c.add_sample(np.zeros((1, 8, 8), np.float32), 3)  # stored: the disk has room again
        updates = [m for m in sent if isinstance(m, Update)]
        assert len(updates) == 1 and int(c.store.get_meta("next_seq")) > updates[0].seq and not c.actor.errors
        c.add_sample(np.zeros((1, 8, 8), np.float32), 4)
        assert len([m for m in sent if isinstance(m, Update)]) == 1  # sent once
    finally:
        close_unstarted(c)


def test_a_store_that_cannot_mark_samples_still_notifies_and_pulls(tmp_path: Any) -> None:
    """A full disk at mark_used / mark_acked (the eviction order's bookkeeping): the app still
    hears ``trained`` and ``update_acked``, and the pull the ack starts still leaves. The error
    used to escape into the actor, which dropped the notification and the actions after it (the
    pull waited a request timeout) and kept the exception, whose traceback held the store's
    files open after stop() (a tmpfs could not be unmounted; device durability audit, h103)."""
    from edge_sdk.core.events import MessageReceived, SampleAdded, TrainingFinished
    from edge_sdk.store import StorageError
    from edge_sdk.tasks import get_task
    from edge_sdk.wire import topics
    from edge_sdk.wire.codec import decode, encode
    from edge_sdk.wire.messages import Ack, ModelMsg, Pull, Update
    from tests.helpers import SIGNER

    w = get_task("digits").pretrained(seed=0)
    c = unstarted_client(tmp_path, min_samples=2, trusted_keys={SIGNER.kid: SIGNER.public_raw})
    sent: list[Any] = []
    c.transport.publish = lambda topic, payload, qos=1, retain=False: sent.append(decode(payload))
    jobs: list[Any] = []
    c._trainer.submit = lambda fn, job: jobs.append(job)
    heard: list[str] = []
    c.on("*", lambda kind, data: heard.append(kind))

    def full(*args: Any) -> int:
        raise StorageError(f"{tmp_path}/samples.sqlite3: database or disk is full")

    def run(event: Any) -> None:
        c.actor._run_one(lambda now: event)

    def reply(leaf: str, msg: Any) -> MessageReceived:
        topic = topics.device_topic("default", "d1", leaf)
        return MessageReceived(now=1.0, topic=topic, payload=encode(msg, signer=SIGNER if leaf == "model" else None,
                                                                    scope=topics.signing_scope(topic)))

    def last(kind: type) -> Any:
        return [m for m in sent if isinstance(m, kind)][-1]

    try:
        c.actor.run_actions(c.core.start(0.0))  # the serving pull
        run(reply("model", ModelMsg(model_id=c.task.spec.model_id, version=0, reply_to=last(Pull).seq, weights=w, release=0)))
        for i in range(2):
            c.store.add(np.zeros((1, 8, 8), np.float32), i)
        run(SampleAdded(now=2.0, total=2))  # the training pull
        run(reply("model", ModelMsg(model_id=c.task.spec.model_id, version=0, reply_to=last(Pull).seq, weights=w, release=0)))
        c.store.mark_used = c.store.mark_acked = full
        c._remember_job(jobs[0].job_id, [1, 2])
        run(TrainingFinished(now=3.0, job_id=jobs[0].job_id, weights=w + 0.01, n_samples=2))
        update = last(Update)
        c.store.add(np.zeros((1, 8, 8), np.float32), 3)  # a new label meanwhile: the ack starts the next pull
        run(SampleAdded(now=3.5, total=3))
        pulls = len([m for m in sent if isinstance(m, Pull)])
        run(reply("ack", Ack(device="d1", seq=update.seq, status="accepted", version=1)))
        assert "trained" in heard and "update_acked" in heard, heard
        assert len([m for m in sent if isinstance(m, Pull)]) == pulls + 1 and not c.actor.errors
    finally:
        close_unstarted(c)


def test_a_model_save_on_a_full_disk_leaves_no_partial_file(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Saving the deployed model fails part-way (ENOSPC): the model serves from memory, the file
    saved before stays whole, and the half-written temporary file is removed. It used to stay
    (``.deployed.npz.tmp``, as large as the written part of a model) and hold space on the disk
    that was full (device durability audit, h103: a 2 MB tmpfs)."""
    import errno

    from edge_sdk import modelio
    from edge_sdk.core.events import DeployModel
    from edge_sdk.tasks import get_task

    w = get_task("digits").pretrained(seed=0)
    c = unstarted_client(tmp_path)
    try:
        c._perform(DeployModel(version=1, weights=w))
        saved = (tmp_path / "deployed.npz").read_bytes()

        def savez(f: Any, **arrays: Any) -> None:
            f.write(b"x" * 4096)
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(modelio.np, "savez", savez)
        c._perform(DeployModel(version=2, weights=w + 0.5))
        assert c.version == 2 and not c.actor.errors
        assert sorted(p.name for p in tmp_path.glob("*deployed*")) == ["deployed.npz"]
        assert (tmp_path / "deployed.npz").read_bytes() == saved
    finally:
        close_unstarted(c)


def test_a_first_use_pin_the_store_cannot_save_still_deploys_the_model(tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    """Trust on first use with a full disk: the pin holds in memory (said at ERROR), and the
    actions after it (deploying the model) still run instead of dying with the save."""
    from edge_sdk.core.events import MessageReceived
    from edge_sdk.store import StorageError
    from edge_sdk.tasks import get_task
    from edge_sdk.wire import topics
    from edge_sdk.wire.codec import decode, encode
    from edge_sdk.wire.messages import ModelMsg, Pull
    from tests.helpers import SIGNER

    c = unstarted_client(tmp_path, min_samples=10**6)
    sent: list[Any] = []
    c.transport.publish = lambda topic, payload, qos=1, retain=False: sent.append(decode(payload))

    def full(key: str, value: Any) -> None:
        raise StorageError(f"{tmp_path}/samples.sqlite3: database or disk is full")

    c.store.set_meta = full
    try:
        c.actor.run_actions(c.core.start(0.0))
        (pull,) = [m for m in sent if isinstance(m, Pull)]
        msg = ModelMsg(model_id=c.task.spec.model_id, version=3, reply_to=pull.seq, weights=get_task("digits").pretrained(seed=0), release=3)
        with caplog.at_level(logging.ERROR):
            c.actor._run_one(lambda now: MessageReceived(now=1.0, topic=topics.device_topic("default", "d1", "model"),
                                                         payload=encode(msg, signer=SIGNER, scope=topics.device_scope("default", "model"))))
        assert not c.actor.errors and c.version == 3
        assert "cannot save the pinned coordinator key" in caplog.text
    finally:
        close_unstarted(c)


def test_the_wall_clock_of_the_drivers_follows_a_clock_set_forward_but_never_goes_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """A system clock set back 3 h (an RTC-less device corrected by NTP) used to stall every
    timer a core armed by 3 h: request retries, SPIN's π (network-failure audit). The drivers'
    clock keeps counting from where it was; set forward, it follows at once."""
    import time

    from edge_sdk.runtime import WallClock

    wall, mono = [1_000_000.0], [50.0]
    monkeypatch.setattr(time, "time", lambda: wall[0])
    monkeypatch.setattr(time, "monotonic", lambda: mono[0])
    clock = WallClock()
    assert clock.now() == 1_000_000.0
    wall[0] -= 3 * 3600.0
    mono[0] += 2.0
    wall[0] += 2.0
    assert clock.now() == 1_000_002.0  # two seconds on, not three hours back
    wall[0] += 7200.0
    mono[0] += 1.0
    wall[0] += 1.0
    assert clock.now() == 1_000_003.0  # still behind where it was: keep counting
    wall[0] += 7200.0  # now an hour ahead of it: a clock set forward
    assert clock.now() == wall[0] == 1_003_603.0
    mono[0] += 0.5
    assert clock.now() == wall[0] + 0.5


def test_a_stored_sample_outside_the_input_range_is_removed_not_trained_on(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """helper-95: a store written before gestures had a range may hold a sample beyond ±64; every
    training round re-checked the samples (or turned NaN) and failed, for ever. The client drops
    such samples from the store, says so, and trains on the rest."""
    from edge_sdk.client import EdgeClient
    from edge_sdk.tasks import get_task
    from edge_sdk.tasks.base import TrainConfig

    task = get_task("gestures")
    pool = task.data().pool
    c = EdgeClient(broker="mqtt://127.0.0.1:9", device_id="g", data_dir=tmp_path / "dev", task=task)  # never started
    try:
        for i in range(4):
            c.add_sample(pool.x[i], int(pool.y[i]))
        c.store.add_gesture(np.full((32, 4), 3e38, np.float32), 1)  # as an older SDK stored it (no range then)
        assert c.store.count() == 5
        with caplog.at_level(logging.WARNING, logger="edgeci"):
            result, ids = c.run_training_job(TrainingJob(job_id=1, base_version=0, weights=task.pretrained(seed=0), n_samples=5),
                                             TrainConfig(epochs=1, batch_size=4, lr=0.05))
        assert result.n_samples == 4 and len(ids) == 4 and np.isfinite(result.weights).all()
        assert c.store.count() == 4 and "removed 1 stored sample(s) outside the task's input range [-64, 64]" in caplog.text
    finally:
        c.stop()


def test_training_loops_stop_between_batches_inside_stoppable_only() -> None:
    """The built-in loops (torch classifiers, the [device] install's numpy head) call
    ``checkpoint()`` before each batch: inside ``stoppable`` it ends the job there once the
    client is stopping; outside (the emulator, a task called directly) it does nothing."""
    from edge_sdk.cancellation import checkpoint, stoppable
    from edge_sdk.errors import TrainingCancelled
    from edge_sdk.tasks import get_task
    from edge_sdk.tasks.linear_head import fit_head

    task = get_task("digits")
    pool = task.data().pool
    stopped = StopAfter(3)
    with stoppable(stopped), pytest.raises(TrainingCancelled):
        task.local_update(task.pretrained(seed=0), pool.x[:64], pool.y[:64], TrainConfig(epochs=50, batch_size=16, lr=0.05))
    assert stopped.asked == 3  # asked before each batch: two ran, the third was not started
    stopped = StopAfter(3)
    z, y = np.ones((40, 6), np.float32), np.arange(40, dtype=np.int64) % 3
    with stoppable(stopped), pytest.raises(TrainingCancelled):
        fit_head(z, y, np.zeros((3, 6), np.float32), np.zeros(3, np.float32), epochs=50, batch_size=8, lr=0.1, seed=0)
    assert stopped.asked == 3
    checkpoint()  # outside stoppable(): nothing to stop
    w, b, _ = fit_head(z, y, np.zeros((3, 6), np.float32), np.zeros(3, np.float32), epochs=2, batch_size=8, lr=0.1, seed=0)
    assert w.shape == (3, 6) and b.shape == (3,)


def test_stop_cancels_the_training_job_in_progress(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """helper-97: ``stop()`` 8 s after start waited 65 s for a 60-epoch job, then threw its
    result away (a phone's OS kills an app that hangs on shutdown). Now the job ends at its
    next batch, nothing is sent, and the samples stay."""
    import threading

    import edge_sdk.trainer
    from edge_sdk.client import EdgeClient
    from edge_sdk.tasks import get_task

    task = get_task("digits")
    pool = task.data().pool
    c = EdgeClient(broker="mqtt://127.0.0.1:1", device_id="d1", data_dir=tmp_path / "dev", task=task,  # never started
                   train=TrainConfig(epochs=100, batch_size=1, lr=0.01))
    sent: list[object] = []
    c.actor.submit = sent.append
    for i in range(32):
        c.add_sample(pool.x[i], int(pool.y[i]))
    sent.clear()  # (each sample's SampleAdded)
    batches = 0
    running = threading.Event()
    real = edge_sdk.trainer.checkpoint

    def counted() -> None:
        nonlocal batches
        batches += 1
        running.set()
        real()

    monkeypatch.setattr(edge_sdk.trainer, "checkpoint", counted)
    job = c._trainer.submit(c._train, TrainingJob(job_id=7, base_version=0, weights=task.pretrained(seed=0), n_samples=32))
    assert running.wait(60), "the job never reached its first batch"
    with caplog.at_level(logging.INFO, logger="edgeci"):
        c.stop()
    assert job.done() and batches < 100 * 32  # it ended long before its 3,200 batches
    assert "training job 7 cancelled: the client is stopping" in caplog.text
    assert sent == []  # neither TrainingFinished nor TrainingFailed: nothing to send, nothing to back off
    again = EdgeClient(broker="mqtt://127.0.0.1:1", device_id="d1", data_dir=tmp_path / "dev", task=task)
    try:
        assert again.store.count() == 32
    finally:
        close_unstarted(again)


def test_the_app_bounds_the_device_store(tmp_path: Path) -> None:
    """helper-97: EdgeClient had no quota parameter: every device got the store's 512 MiB.
    ``quota_samples`` / ``quota_bytes`` reach the store; a bad one is a ConfigError before
    the data dir exists."""
    from edge_sdk.client import EdgeClient
    from edge_sdk.errors import ConfigError

    with pytest.raises(ConfigError, match="quota_bytes must be a positive int or None"):
        EdgeClient(broker="mqtt://127.0.0.1:1", device_id="d1", data_dir=tmp_path / "bad", quota_bytes=0)
    assert not (tmp_path / "bad").exists()
    c = unstarted_client(tmp_path / "dev", quota_samples=3)
    try:
        x = np.zeros((8, 8), np.float32)
        for label in range(5):
            c.add_sample(x, label)
        assert c.store.count() == 3 and c.store.stats().evicted == 2  # the oldest two made room
    finally:
        close_unstarted(c)


def test_wait_for_version_says_what_it_takes(tmp_path: Path) -> None:
    """helper-97: wait_for_version("x", 1) raised a bare TypeError from inside a lambda."""
    from edge_sdk.errors import ConfigError

    c = unstarted_client(tmp_path / "dev")
    try:
        with pytest.raises(ConfigError, match="version must be an int"):
            c.wait_for_version("x", 1)
        with pytest.raises(ConfigError, match="timeout must be seconds"):
            c.wait_for_version(0, float("nan"))
        assert c.wait_for_version(0, 0.01) is False  # nothing deployed: no model
    finally:
        close_unstarted(c)


def test_a_reconnect_while_stop_says_offline_does_not_leave_the_device_online(tmp_path: Any) -> None:
    """helper-146: stop() published the retained ``offline`` presence and then disconnected
    cleanly (no will); a reconnect completing in between (paho's thread, after a lost connection)
    published ``online`` after it, and that retained ``online`` stayed on the broker for a device
    that was gone (the coordinator's presence, canary cohorts and ``edgeci status`` count it)."""
    import threading
    from types import SimpleNamespace

    c = _client(tmp_path)
    presence: list[bytes] = []
    reconnect: list[threading.Thread] = []

    class Transport:
        """Records presence; the broker connection comes back just as stop() says offline."""

        address = SimpleNamespace(url="mqtt://127.0.0.1:1")
        connected = True

        def publish(self, topic: str, payload: bytes, **kw: Any) -> None:
            if topic.endswith("/presence"):
                presence.append(payload)
            if payload == b"offline" and not reconnect:  # paho's thread: on_connect of a reconnect
                t = threading.Thread(target=c._on_connection, args=(True,), daemon=True)
                reconnect.append(t)
                t.start()
                t.join(0.5)  # (the old code: it publishes online here)

        def stop(self) -> None:
            reconnect[0].join(10)  # its callback has run by the time paho's loop stops

    c.transport = Transport()
    c._started, c._connected_once = True, True
    c.stop()
    assert not reconnect[0].is_alive()
    assert presence[-1] == b"offline", presence
    c._dir_lock = None  # (released by stop)
