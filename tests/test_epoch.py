"""A coordinator that lost its state dir counts from version 0 again: epochs.

Before, every device holding a version above what the reset coordinator offered waited for a
newer one for good (``model_older``), a device holding the reset coordinator's number for
another model was told "unchanged" and kept its old weights, old updates were folded into the
new line as if trained from its versions, and a retained recall of the old numbering blocked the
new one's versions. Each state dir now has an epoch (signed into models, recalls and canary
requests): a newer one is a new numbering, an older one a replay.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest

from coordinator.core import Snapshot
from coordinator.registry import EPOCH_FILE, Registry, read_epoch
from edge_sdk.core.device import DeviceConfig, DeviceCore, Phase
from edge_sdk.core.events import (
    DeployModel,
    MessageReceived,
    Notify,
    PinEpoch,
    Publish,
    SampleAdded,
    StartTraining,
    TimerFired,
    TrainingFinished,
)
from edge_sdk.errors import ConfigError
from edge_sdk.wire import topics
from edge_sdk.wire.codec import decode, encode
from edge_sdk.wire.messages import Ack, Canary, ModelMsg, Pull, Recall, Update
from tests.helpers import SIGNER, SPEC, close_unstarted, make_coordinator, unstarted_client

DEV = "d1"
OLD, NEW = 1_700_000_000_000_000, 1_800_000_000_000_000


def device(epochs: dict[str, int] | None = None) -> DeviceCore:
    cfg = DeviceConfig(device_id=DEV, region="r1", spec=SPEC, min_samples=2, request_timeout_s=5.0)
    return DeviceCore(cfg, rng=random.Random(0), epochs=epochs)


def coordinator(epoch: int, version: int = 0, value: float = 0.0) -> object:
    snap = Snapshot(version=version, weights=np.full(SPEC.size, value, dtype=np.float32), epoch=epoch)
    return make_coordinator(k=1, timeout_s=None, snapshot=snap)


def model(version: int, epoch: int, value: float = 1.0, reply_to: int = -1) -> MessageReceived:
    w = np.full(SPEC.size, value, dtype=np.float32)
    msg = ModelMsg(model_id="toy", version=version, reply_to=reply_to, weights=w, epoch=epoch)
    topic = topics.device_topic("r1", DEV, "model")
    return MessageReceived(now=0.0, topic=topic, payload=encode(msg, signer=SIGNER, scope=topics.signing_scope(topic)))


def signed(msg: object, topic: str) -> MessageReceived:
    return MessageReceived(now=1.0, topic=topic, payload=encode(msg, signer=SIGNER, scope=topics.signing_scope(topic)))  # type: ignore[arg-type]


def to_coord(leaf: str, payload: bytes, now: float = 1.0) -> MessageReceived:
    return MessageReceived(now=now, topic=topics.device_topic("r1", DEV, leaf), payload=payload)


def published(actions: list[object], leaf: str) -> list[object]:
    return [decode(a.payload) for a in actions if isinstance(a, Publish) and a.topic.endswith(leaf)]


def notes(actions: list[object], kind: str) -> list[Notify]:
    return [a for a in actions if isinstance(a, Notify) and a.kind == kind]


def test_a_reset_coordinator_is_a_new_numbering_and_the_device_trains_again() -> None:
    """The device holds v5 of the old numbering; the reset coordinator is at v0. Before: the
    answer was older than what the device held (``model_older``) and it never trained again."""
    d = device()
    d.handle(model(5, OLD))
    assert (d.state.deployed_version, d.state.epoch) == (5, OLD)
    (pull,) = published(d.handle(SampleAdded(now=1.0, total=2)), "pull")
    assert isinstance(pull, Pull) and (pull.have_version, pull.epoch) == (5, OLD)
    c = coordinator(NEW, value=0.5)
    (reply,) = [a for a in c.handle(to_coord("pull", encode(pull))) if isinstance(a, Publish) and a.topic.endswith("/model")]  # type: ignore[attr-defined]
    acts = d.handle(MessageReceived(now=1.1, topic=reply.topic, payload=reply.payload))
    assert [(a.region, a.epoch) for a in acts if isinstance(a, PinEpoch)] == [("r1", NEW)]
    assert notes(acts, "epoch")[0].data == {"region": "r1", "epoch": NEW, "previous": OLD}
    assert [(a.version, a.epoch) for a in acts if isinstance(a, DeployModel)] == [(0, NEW)]
    (job,) = [a.job for a in acts if isinstance(a, StartTraining)]
    np.testing.assert_array_equal(job.weights, 0.5)  # the new line's v0, not the device's own v5
    acts = d.handle(TrainingFinished(now=2.0, job_id=job.job_id, weights=job.weights + 1, n_samples=2))
    (upd,) = published(acts, "update")
    assert isinstance(upd, Update) and (upd.base_version, upd.epoch) == (0, NEW)
    acts = c.handle(to_coord("update", encode(upd), now=2.1))  # type: ignore[attr-defined]
    (ack,) = published(acts, "ack")
    assert isinstance(ack, Ack) and ack.status == "accepted"
    assert notes(d.handle(model(5, OLD, value=9.0)), "message_rejected")[0].data["reason"] == "epoch_older"


def test_the_same_version_number_of_another_epoch_is_not_unchanged() -> None:
    """The device holds v0 of the old numbering and the reset coordinator's release is v0 too:
    "unchanged" (no weights) used to make the device keep — and train — the old v0."""
    d = device()
    d.handle(model(0, OLD, value=7.0))
    (pull,) = published(d.handle(SampleAdded(now=1.0, total=2)), "pull")
    c = coordinator(NEW, value=0.25)
    (reply,) = [a for a in c.handle(to_coord("pull", encode(pull))) if isinstance(a, Publish) and a.topic.endswith("/model")]  # type: ignore[attr-defined]
    msg = decode(reply.payload)
    assert isinstance(msg, ModelMsg) and msg.group == "full" and msg.epoch == NEW
    assert c.counters["pulls_unchanged"] == 0  # type: ignore[attr-defined]
    (job,) = [a.job for a in d.handle(MessageReceived(now=1.1, topic=reply.topic, payload=reply.payload)) if isinstance(a, StartTraining)]
    np.testing.assert_array_equal(job.weights, 0.25)
    same = device()  # the same epoch: still "unchanged"
    same.handle(model(0, NEW, value=0.25))
    (pull,) = published(same.handle(SampleAdded(now=1.0, total=2)), "pull")
    (reply,) = [a for a in c.handle(to_coord("pull", encode(pull))) if isinstance(a, Publish) and a.topic.endswith("/model")]  # type: ignore[attr-defined]
    assert decode(reply.payload).group == "unchanged"  # type: ignore[attr-defined]


def test_an_update_trained_in_another_epoch_is_refused_and_its_samples_trained_again() -> None:
    d = device()
    d.handle(model(3, OLD))
    (pull,) = published(d.handle(SampleAdded(now=1.0, total=2)), "pull")
    (job,) = [a.job for a in d.handle(model(3, OLD, reply_to=pull.seq)) if isinstance(a, StartTraining)]  # type: ignore[attr-defined]
    (upd,) = published(d.handle(TrainingFinished(now=2.0, job_id=job.job_id, weights=job.weights + 1, n_samples=2)), "update")
    assert upd.epoch == OLD  # type: ignore[attr-defined]
    c = coordinator(NEW, version=4)  # a reset coordinator that has already counted past 3
    (ack,) = published(c.handle(to_coord("update", encode(upd))), "ack")  # type: ignore[attr-defined, arg-type]
    assert isinstance(ack, Ack) and (ack.status, ack.reason) == ("rejected", "base_rejected")
    assert c.counters["accepted"] == 0 and c.counters["reject:base_rejected"] == 1  # type: ignore[attr-defined]
    acts = d.handle(MessageReceived(now=2.1, topic=topics.device_topic("r1", DEV, "ack"), payload=encode(ack)))
    (again,) = published(acts, "pull")  # the samples are trained again, from the new line
    assert isinstance(again, Pull) and not again.serve and d.state.phase is Phase.PULLING
    legacy = Update(device=DEV, seq=upd.seq + 1, model_id="toy", base_version=4, n_samples=1,  # an SDK from before epochs
                    weights=np.zeros(SPEC.size, np.float32))
    (ack,) = published(c.handle(to_coord("update", encode(legacy))), "ack")  # type: ignore[attr-defined]
    assert isinstance(ack, Ack) and ack.status == "accepted"  # judged by its version, as before


def test_recalls_of_an_older_epoch_are_ignored_and_a_newer_one_fetches_the_release() -> None:
    """A reset coordinator's old retained recall stays on the broker: it speaks of the old
    numbering. The new coordinator's recall (published at its start, even with nothing
    abandoned) tells idle devices of the new numbering."""
    d = device()
    d.handle(model(3, NEW))
    topic = topics.recall_topic("r1")
    stale = Recall(model_id="toy", release=9, abandoned=(0, 8), epoch=OLD)
    assert d.handle(signed(stale, topic)) == []
    assert d.state.counters["ignored:old_epoch"] == 1 and d.state.deployed_version == 3
    newer = Recall(model_id="toy", release=0, abandoned=(), epoch=NEW + 1)
    acts = d.handle(signed(newer, topic))
    assert [a.epoch for a in acts if isinstance(a, PinEpoch)] == [NEW + 1]
    (pull,) = published(acts, "pull")
    assert isinstance(pull, Pull) and pull.serve and (pull.have_version, pull.epoch) == (-1, NEW + 1)


def test_the_coordinator_announces_its_epoch_at_start_and_only_with_one() -> None:
    c = coordinator(NEW)
    (recall,) = published(c.start(0.0), "recall")  # type: ignore[attr-defined]
    assert isinstance(recall, Recall) and (recall.epoch, recall.release, recall.abandoned) == (NEW, 0, ())
    assert c.status().extra["epoch"] == NEW  # type: ignore[attr-defined]
    from coordinator.cli_status import render
    from edge_sdk.wire.codec import parse_status_json, status_json

    assert f"version 0 · epoch {NEW} · strategy" in render(parse_status_json(status_json(c.status())), 0.0)  # type: ignore[arg-type, attr-defined]
    memory = coordinator(0)  # the in-process emulator's: no state dir, no epoch, nothing more on the wire
    assert published(memory.start(0.0), "recall") == []  # type: ignore[attr-defined]
    assert "epoch" not in memory.status().extra  # type: ignore[attr-defined]


def test_canary_requests_of_another_epoch_are_not_served() -> None:
    d = device()
    d.handle(model(3, NEW))
    invite = topics.device_topic("r1", DEV, "invite")
    old = Canary(device=DEV, candidate=9, release=3, samples=5, deadline_s=60.0, epoch=OLD)
    assert notes(d.handle(signed(old, invite)), "message_rejected")[0].data["reason"] == "epoch_older"
    ahead = Canary(device=DEV, candidate=2, release=1, samples=5, deadline_s=60.0, epoch=NEW + 1)
    assert d.handle(signed(ahead, invite)) == [] and d.state.canary is None
    assert d.state.counters["ignored:canary_new_epoch"] == 1


def test_a_restarted_device_keeps_refusing_the_numbering_before() -> None:
    d = device(epochs={"r1": NEW})
    assert notes(d.handle(model(50, OLD)), "message_rejected")[0].data["reason"] == "epoch_older"
    assert d.state.deployed is None and d.state.counters["rejected:epoch_older"] == 1
    assert [a.version for a in d.handle(model(0, NEW)) if isinstance(a, DeployModel)] == [0]
    with pytest.raises(ConfigError, match="epoch"):
        device(epochs={"r1": -1})


def test_every_state_dir_has_its_own_newer_epoch_kept_across_restarts(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    first = Registry(tmp_path / "a", SPEC)
    first.acquire_lock()
    first.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    epoch = first.load().epoch  # type: ignore[union-attr]
    first.close()
    assert epoch == read_epoch(tmp_path / "a") and epoch > OLD
    again = Registry(tmp_path / "a", SPEC)
    again.acquire_lock()
    assert again.load().epoch == epoch  # type: ignore[union-attr]
    again.close()
    reset = Registry(tmp_path / "b", SPEC)  # the state dir lost: a new one
    reset.acquire_lock()
    reset.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    assert reset.load().epoch > epoch  # type: ignore[union-attr]
    reset.close()
    (tmp_path / "a" / EPOCH_FILE).write_text("garbage")  # unreadable (or removed after restoring a backup)
    assert Registry(tmp_path / "a", SPEC).load().epoch == 0  # type: ignore[union-attr]  # a read-only look writes nothing
    restored = Registry(tmp_path / "a", SPEC)
    restored.acquire_lock()
    with caplog.at_level(logging.WARNING, logger="edgeci.registry"):
        renewed = restored.load().epoch  # type: ignore[union-attr]
    restored.close()
    assert renewed > epoch and read_epoch(tmp_path / "a") == renewed and "new epoch" in caplog.text


def test_the_client_keeps_the_epoch_and_the_saved_models_numbering(tmp_path: Path) -> None:
    from edge_sdk.signing import Signer
    from edge_sdk.tasks import get_task

    spec = get_task("digits").spec
    coord = Signer.generate()
    trusted = {coord.kid: coord.public_raw}
    topic = topics.device_topic("default", "d1", "model")

    def deliver(c: object, version: int, epoch: int) -> None:
        msg = ModelMsg(model_id=spec.model_id, version=version, reply_to=-1, weights=get_task("digits").pretrained(seed=0),
                       release=version, epoch=epoch)
        actions = c.core.handle(MessageReceived(now=0.0, topic=topic, payload=encode(msg, signer=coord, scope=topics.signing_scope(topic))))  # type: ignore[attr-defined]
        c.actor.run_actions(actions)  # type: ignore[attr-defined]

    c = unstarted_client(tmp_path, trusted_keys=trusted)
    try:
        deliver(c, 7, OLD)
        assert c.version == 7
    finally:
        close_unstarted(c)
    saved = json.loads(bytes(np.load(tmp_path / "deployed.npz")["meta"]).decode())
    assert saved["epoch"] == OLD
    c = unstarted_client(tmp_path, trusted_keys=trusted)
    try:
        assert (c.core.state.deployed_version, c.core.state.epoch) == (7, OLD)  # served and numbered as before
        deliver(c, 0, NEW)  # the reset coordinator
        assert c.version == 0 and c.store.get_meta("epoch.default") == str(NEW)
    finally:
        close_unstarted(c)
    c = unstarted_client(tmp_path, trusted_keys=trusted)
    try:
        assert (c.core.state.deployed_version, c.core.state.epoch) == (0, NEW)
        deliver(c, 9, OLD)  # a replay of the numbering before, after a restart
        assert c.version == 0 and c.core.state.counters["rejected:epoch_older"] == 1
    finally:
        close_unstarted(c)
    c = unstarted_client(tmp_path, trusted_keys=trusted)
    c.store.set_meta("epoch.default", str(NEW + 5))  # the epoch moved on, the model saved before it
    close_unstarted(c)
    c = unstarted_client(tmp_path, trusted_keys=trusted)
    try:  # the saved weights serve, but their number counts in no numbering the region uses now
        assert (c.core.state.deployed_version, c.core.state.epoch) == (-1, NEW + 5)
        assert c.core.state.deployed is not None
    finally:
        close_unstarted(c)


def test_devices_ahead_of_the_state_dir_are_counted_and_reported_never_followed() -> None:
    """Another coordinator of the region ran on another state dir with this signing key (or this
    host's clock was behind when the state dir was made): its devices hold a newer epoch and refuse
    every model of this one. The coordinator cannot follow an unsigned claim; it says so (review)."""
    from coordinator.cli_status import render
    from edge_sdk.wire.codec import parse_status_json, status_json

    c = coordinator(OLD, version=2)
    ahead = Pull(device=DEV, seq=1, model_id="toy", have_version=0, epoch=NEW)
    acts = c.handle(to_coord("pull", encode(ahead)))  # type: ignore[attr-defined]
    (note,) = notes(acts, "epoch_ahead")
    assert note.data == {"device": DEV, "epoch": NEW, "version": 0, "highest": NEW, "highest_version": 0, "own": OLD,
                         "own_version": 2, "count": 1}
    (reply,) = published(acts, "model")
    assert isinstance(reply, ModelMsg) and reply.epoch == OLD and reply.group == "full"  # its own numbering, whole
    upd = Update(device=DEV, seq=2, model_id="toy", base_version=0, n_samples=1, weights=np.zeros(SPEC.size, np.float32), epoch=NEW + 7)
    acts = c.handle(to_coord("update", encode(upd), now=5.0))  # type: ignore[attr-defined]
    assert published(acts, "ack")[0].reason == "base_rejected" and not notes(acts, "epoch_ahead")  # type: ignore[attr-defined]  # (once a minute)
    assert c.counters["epoch_ahead"] == 2  # type: ignore[attr-defined]
    assert c.status().extra["epoch_ahead"] == {"highest": NEW + 7, "version": 0, "device": DEV, "messages": 2}  # type: ignore[attr-defined]
    shown = render(parse_status_json(status_json(c.status())), NEW / 1e6)  # type: ignore[arg-type, attr-defined]  # the clock then
    assert f"edgeci new-epoch --state-dir DIR --above {NEW + 7}" in shown and "unsigned" in shown
    # An epoch no clock could have made: named a likely forgery, and new-epoch --above is not suggested for it.
    forged = render(parse_status_json(status_json(c.status())), OLD / 1e6 - 10 * 86_400)  # type: ignore[arg-type, attr-defined]
    assert "most likely forged" in forged and "new-epoch" not in forged
    assert notes(c.handle(to_coord("pull", encode(dataclasses_replace(ahead, seq=3)), now=70.0)), "epoch_ahead")  # type: ignore[attr-defined]
    assert c._epoch == OLD  # type: ignore[attr-defined]  # reported, never acted on


def dataclasses_replace(msg: Pull, **kw: object) -> Pull:
    import dataclasses

    return dataclasses.replace(msg, **kw)  # type: ignore[arg-type]


def test_new_epoch_starts_a_numbering_above_the_devices_and_only_on_a_stopped_coordinator(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from demos.cli import main

    reg = Registry(tmp_path / "s", SPEC)
    reg.acquire_lock()
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    old = read_epoch(tmp_path / "s")
    far = 4_000_000_000_000_000  # a clock 60 years ahead made the devices' numbering
    assert main(["new-epoch", "--state-dir", str(tmp_path / "s"), "--above", str(far), "--force"]) != 0  # running: refused
    assert "in use by a running coordinator: stop it first" in capsys.readouterr().err and read_epoch(tmp_path / "s") == old
    reg.close()
    # An unsigned claim 60 years ahead: likely forged (a device can claim 2^63-2 and leave no epoch above): --force only.
    assert main(["new-epoch", "--state-dir", str(tmp_path / "s"), "--above", str(far)]) != 0
    assert "days ahead of this host's clock" in capsys.readouterr().err and read_epoch(tmp_path / "s") == old
    assert main(["new-epoch", "--state-dir", str(tmp_path / "s"), "--above", str(far), "--force"]) == 0
    assert read_epoch(tmp_path / "s") == far + 1 and f"epoch {old} -> {far + 1}" in capsys.readouterr().out
    assert main(["new-epoch", "--state-dir", str(tmp_path / "s")]) == 0  # after a restore from a backup: above the old one
    assert read_epoch(tmp_path / "s") == far + 2
    again = Registry(tmp_path / "s", SPEC)
    assert again.load().epoch == far + 2 and again.load().version == 0  # type: ignore[union-attr]  # versions kept
    assert main(["new-epoch", "--state-dir", str(tmp_path / "nothing")]) != 0
    assert "not a coordinator state dir" in capsys.readouterr().err


def test_an_epoch_file_that_cannot_be_read_now_is_a_storage_error_not_a_new_numbering(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A passing EIO or EMFILE used to rotate the epoch: the whole fleet fetched the release and
    trained its updates in flight again (review). Only a missing file or bad contents start one."""
    import errno

    reg = Registry(tmp_path, SPEC)
    reg.acquire_lock()
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    epoch = read_epoch(tmp_path)
    real = Path.read_text

    def flaky(self: Path, *a: object, **kw: object) -> str:
        if self.name == EPOCH_FILE:
            raise OSError(errno.EMFILE, "Too many open files")
        return real(self, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "read_text", flaky)
    with pytest.raises(OSError, match="Too many open files"):
        reg.load()
    monkeypatch.undo()
    assert read_epoch(tmp_path) == epoch and reg.load().epoch == epoch  # type: ignore[union-attr]
    reg.close()


def test_a_part_of_a_model_never_goes_on_weights_of_another_numbering() -> None:
    """LASP: a captured partial reply of the new numbering, replayed to a device that still holds
    the old numbering's weights, was patched onto them and deployed (review)."""
    d = device()
    d.handle(model(5, OLD, value=7.0))
    part = np.full(SPEC.group_size("classifier"), 0.5, dtype=np.float32)
    msg = ModelMsg(model_id="toy", version=1, reply_to=-1, weights=part, group="classifier", epoch=NEW)
    topic = topics.device_topic("r1", DEV, "model")
    acts = d.handle(MessageReceived(now=1.0, topic=topic, payload=encode(msg, signer=SIGNER, scope=topics.signing_scope(topic))))
    assert not [a for a in acts if isinstance(a, DeployModel)] and d.state.deployed_version == -1
    np.testing.assert_array_equal(d.state.deployed, 7.0)


def test_an_unsigned_message_cannot_change_the_numbering() -> None:
    cfg = DeviceConfig(device_id=DEV, region="r1", spec=SPEC, min_samples=2, require_signature=False)
    d = DeviceCore(cfg, rng=random.Random(0))
    topic = topics.device_topic("r1", DEV, "model")
    msg = ModelMsg(model_id="toy", version=3, reply_to=-1, weights=np.ones(SPEC.size, np.float32), epoch=2**63 - 1)
    assert notes(d.handle(MessageReceived(now=0.0, topic=topic, payload=encode(msg))), "message_rejected")[0].data["reason"] == "unsigned"
    recall = Recall(model_id="toy", release=0, abandoned=(), epoch=2**63 - 1)
    acts = d.handle(MessageReceived(now=0.0, topic=topics.recall_topic("r1"), payload=encode(recall)))
    assert notes(acts, "message_rejected")[0].data["reason"] == "unsigned" and d.state.epoch == 0


def test_a_serving_pull_of_another_numbering_gets_the_whole_release() -> None:
    d = device()
    d.handle(model(0, OLD, value=7.0))
    (pull,) = published(d.start(0.0), "pull")
    assert isinstance(pull, Pull) and pull.serve and (pull.have_version, pull.epoch) == (0, OLD)
    c = coordinator(NEW, value=0.25)
    (reply,) = published(c.handle(to_coord("pull", encode(pull))), "model")  # type: ignore[attr-defined]
    assert isinstance(reply, ModelMsg) and reply.group == "full" and reply.epoch == NEW


def test_a_saved_model_of_a_newer_epoch_than_the_store_knows_sets_the_floor(tmp_path: Path) -> None:
    """The model was saved but its PinEpoch never reached the store (a full disk): at the next
    start the saved model's epoch still counts as the region's."""
    from edge_sdk.tasks import get_task

    task = get_task("digits")
    spec = task.spec
    with open(tmp_path / "deployed.npz", "wb") as f:
        np.savez(f, weights=task.pretrained(seed=0), spec=np.frombuffer(json.dumps(spec.to_dict()).encode(), np.uint8),
                 meta=np.frombuffer(json.dumps({"version": 4, "region": "default", "epoch": NEW}).encode(), np.uint8))
    c = unstarted_client(tmp_path)
    try:
        assert (c.core.state.deployed_version, c.core.state.epoch) == (4, NEW)
        assert c.store.get_meta("epoch.default") is None
    finally:
        close_unstarted(c)


def test_devices_ahead_of_a_restored_backup_are_reported() -> None:
    """Operator trial: a state dir restored from a backup of v41 while devices held v61 of the same
    epoch stalled the fleet (they wait for a version above 61) with no warning; the coordinator
    only logged unknown_version rejections. A version above any this state dir gave out is
    reported as ahead like a newer epoch."""
    snap = Snapshot(version=41, weights=np.zeros(SPEC.size, np.float32), epoch=OLD, version_floor=41)
    c = make_coordinator(k=1, timeout_s=None, snapshot=snap)
    (note,) = notes(c.handle(to_coord("pull", encode(Pull(device=DEV, seq=1, model_id="toy", have_version=61, epoch=OLD)))), "epoch_ahead")
    assert (note.data["epoch"], note.data["version"], note.data["own_version"]) == (OLD, 61, 41)
    upd = Update(device=DEV, seq=2, model_id="toy", base_version=61, n_samples=1, weights=np.zeros(SPEC.size, np.float32), epoch=OLD)
    (ack,) = published(c.handle(to_coord("update", encode(upd), now=2.0)), "ack")
    assert ack.reason == "unknown_version" and c.counters["epoch_ahead"] == 2  # type: ignore[attr-defined]
    assert c.status().extra["epoch_ahead"]["version"] == 61
    within = Snapshot(version=41, weights=np.zeros(SPEC.size, np.float32), epoch=OLD, version_floor=45)
    c = make_coordinator(k=1, timeout_s=None, snapshot=within)  # 45 was given out (an unreadable newer version): not ahead
    assert not notes(c.handle(to_coord("pull", encode(Pull(device=DEV, seq=1, model_id="toy", have_version=45, epoch=OLD)))), "epoch_ahead")
    assert "epoch_ahead" not in c.status().extra


def test_a_renumbering_recall_asks_again_at_once_instead_of_after_the_back_off() -> None:
    """Operator trial: after `edgeci new-epoch` the first aggregation came 20–65 s late: devices whose
    pulls had gone unanswered waited out their back-off. The recall says the coordinator is back."""
    d = device()
    d.handle(model(3, OLD))
    d.handle(SampleAdded(now=1.0, total=2))
    for t in (7.0, 20.0, 45.0):  # unanswered: the back-off grows
        d.handle(TimerFired(now=t))
    assert d.state.phase is Phase.PULLING and d.state.deadline is not None and d.state.deadline > 60.0
    recall = Recall(model_id="toy", release=0, abandoned=(), epoch=NEW)
    acts = d.handle(signed(recall, topics.recall_topic("r1")))
    (pull,) = published(acts, "pull")
    assert isinstance(pull, Pull) and not pull.serve and pull.epoch == NEW and pull.have_version == -1
    assert d.state.deadline is not None and d.state.deadline < 20.0  # a fresh request, the first timeout again


def test_the_coordinator_refuses_a_signing_key_file_that_is_not_there(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The README told operators to keep the key apart with --signing-key, which the coordinator did
    not take (operator trial); a mistyped path must not mint a new key the devices would refuse."""
    from demos.cli import main

    rc = main(["coordinator", "--state-dir", str(tmp_path / "s"), "--signing-key", str(tmp_path / "nope.key")])
    assert rc != 0 and "--signing-key" in capsys.readouterr().err and not (tmp_path / "s" / "versions").exists()


def test_the_headless_device_says_why_it_refuses_models() -> None:
    from devices.headless import REFUSAL_HINTS

    assert "edgeci new-epoch" in REFUSAL_HINTS["epoch_older"] and "--bundle" in REFUSAL_HINTS["bad_signature"]


def test_versions_names_the_epoch_and_status_does_not_show_another_numbering_as_a_version(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Operator trial: `edgeci versions` showed no epoch (lines of two numberings could not be told
    apart), and `edgeci status` listed a device's version of another numbering (dev-a 0 against
    release 36) as if it were this one's."""
    from demos.cli import main

    reg = Registry(tmp_path / "s", SPEC)
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    epoch = read_epoch(tmp_path / "s")
    assert main(["versions", "--state-dir", str(tmp_path / "s")]) == 0
    assert f"release: 0 · epoch {epoch}" in capsys.readouterr().out
    assert main(["versions", "--state-dir", str(tmp_path / "s"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["epoch"] == epoch
    c = coordinator(NEW, version=3)
    for dev, held in (("same", NEW), ("other", OLD)):
        pull = Pull(device=dev, seq=1, model_id="toy", have_version=2, epoch=held)
        c.handle(MessageReceived(now=1.0, topic=topics.device_topic("r1", dev, "pull"), payload=encode(pull)))  # type: ignore[attr-defined]
    assert {d: v for d, (_, _, v) in c.presence.items()} == {"same": 2, "other": -1}  # type: ignore[attr-defined]


def test_a_new_device_that_trusts_on_first_use_ignores_the_recall_until_it_pins_a_key() -> None:
    """Review: every coordinator with an epoch announces it on the retained recall at start, which
    reaches a new trust-on-first-use device before its first model: it was refused as
    bad_signature, and `edgeci device` printed that the coordinator's key had changed."""
    d = device()
    recall = Recall(model_id="toy", release=0, abandoned=(), epoch=NEW)
    assert d.handle(signed(recall, topics.recall_topic("r1"))) == []
    assert d.state.counters == {"ignored:recall_before_pin": 1} and d.state.rejected_messages == 0
    d.handle(model(0, NEW))  # pins the key
    other = Recall(model_id="toy", release=0, abandoned=(), epoch=NEW + 1)
    assert d.handle(signed(other, topics.recall_topic("r1")))  # now taken: a newer numbering


def test_an_sdk_from_before_epochs_is_not_reported_as_ahead() -> None:
    """Review: after a take-over, a device with an old SDK (no epoch) holding v61 was reported as
    ahead with `edgeci new-epoch --above 0`, which cannot help it (it ignores epochs)."""
    c = coordinator(NEW)
    old = Pull(device=DEV, seq=1, model_id="toy", have_version=61)
    assert not notes(c.handle(to_coord("pull", encode(old))), "epoch_ahead")  # type: ignore[attr-defined]
    upd = Update(device=DEV, seq=2, model_id="toy", base_version=61, n_samples=1, weights=np.zeros(SPEC.size, np.float32))
    assert published(c.handle(to_coord("update", encode(upd), now=2.0)), "ack")[0].reason == "unknown_version"  # type: ignore[attr-defined]
    assert c.counters["epoch_ahead"] == 0 and "epoch_ahead" not in c.status().extra  # type: ignore[attr-defined]


@pytest.mark.parametrize("ahead_days, forged", [(0.5, False), (3650.0, True)])
def test_the_daemon_log_names_an_epoch_far_beyond_the_clock_a_likely_forgery(ahead_days: float, forged: bool,
                                                                             caplog: pytest.LogCaptureFixture) -> None:
    """A device's epoch claim is unsigned: one claim of 2^63-2 made the log (and `edgeci status`)
    tell the operator to run `new-epoch --above 2^63-2`, which leaves no epoch above (helper-83)."""
    import time
    import types

    from coordinator.core import Notify
    from coordinator.daemon import CoordinatorDaemon

    highest = int((time.time() + ahead_days * 86_400) * 1e6)
    stub = types.SimpleNamespace(registry=types.SimpleNamespace(root="/srv/eu"))
    data = {"device": DEV, "epoch": highest, "version": 3, "highest": highest, "highest_version": 3, "own": OLD,
            "own_version": 2, "count": 1}
    with caplog.at_level("WARNING", logger="edgeci"):
        CoordinatorDaemon._do(stub, Notify(kind="epoch_ahead", data=data))  # type: ignore[arg-type]
    (line,) = [r.getMessage() for r in caplog.records if "ahead of this state dir" in r.getMessage()]
    assert ("most likely forged" in line) is forged and ("new-epoch --state-dir /srv/eu --above" in line) is not forged
