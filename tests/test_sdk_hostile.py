"""The device SDK under hostile or careless input, without a broker: every bad input is a
typed error that changes nothing, and damage found on disk is ignored or recovered from
without losing a counter."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_sdk.core.events import ScheduleTimer
from edge_sdk.errors import ConfigError, InvalidSample
from tests.helpers import close_unstarted, unstarted_client

GOOD = np.full((8, 8), 0.5, np.float32)


class _Weird:
    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom")


@pytest.mark.parametrize("x", [[[0.1] * 8] * 7 + [[0.1] * 7], _Weird()], ids=["ragged", "array-raises"])
def test_inputs_numpy_cannot_convert_are_invalid_samples(tmp_path: Path, x: Any) -> None:
    c = unstarted_client(tmp_path, min_samples=1)
    try:
        with pytest.raises(InvalidSample, match="not an array"):
            c.add_sample(x, 1)
        assert c.store.stats().added == 0 and c.submitted == []
        with pytest.raises(InvalidSample, match="not an array"):
            c.contract.batch(x)  # what predict validates with
    finally:
        close_unstarted(c)


class _FakeDetector:
    """Stands in for the exported ONNX session: records what reached it."""

    def __init__(self) -> None:
        self.calls: list[Any] = []

    def detect(self, image: Any, *, conf: Any = None) -> Any:
        self.calls.append(conf)
        return np.zeros((0, 6), np.float32)


@pytest.mark.parametrize(
    ("image", "conf"),
    [
        (np.zeros((0, 0, 3), np.uint8), 0.25),
        (np.zeros((0, 5, 3), np.uint8), 0.25),
        (np.zeros((4, 4, 3), np.uint8), "x"),
        (np.zeros((4, 4, 3), np.uint8), float("nan")),
        (np.zeros((4, 4, 3), np.uint8), -1.0),
        (np.zeros((4, 4, 3), np.uint8), 1.5),
        (np.zeros((4, 4, 3), np.uint8), True),
    ],
    ids=["0x0", "0x5", "conf-str", "conf-nan", "conf-negative", "conf-above-1", "conf-bool"],
)
def test_detect_refuses_empty_frames_and_bad_thresholds(tmp_path: Path, image: Any, conf: Any) -> None:
    from edge_sdk.client import _Exported
    from edge_sdk.core.events import DeployModel

    c = unstarted_client(tmp_path, task="detection", min_samples=10**6)
    try:
        c._perform(DeployModel(version=1, weights=np.zeros(c.task.spec.size, np.float32)))
        fake = _FakeDetector()
        c._detector = _Exported(1, fake, c.weights, tmp_path / "deployed-v1.onnx")  # no export
        assert c.detect(np.zeros((4, 4, 3), np.uint8), conf=0.5).shape == (0, 6) and fake.calls == [0.5]
        with pytest.raises(InvalidSample):
            c.detect(image, conf=conf)
        assert fake.calls == [0.5]  # the refused call never reached the detector
    finally:
        close_unstarted(c)


def test_a_refused_label_feeds_nothing_to_the_canary(tmp_path: Path) -> None:
    from edge_sdk.core.events import CanaryScored, DeployModel, SampleAdded, StartCanary

    c = unstarted_client(tmp_path, min_samples=10**6)
    try:
        w = c.task.pretrained(seed=0)
        c._perform(DeployModel(version=1, weights=w))
        c._perform(StartCanary(candidate=2, release=1, weights=w))  # scoring candidate 2 against release 1
        for label in [99, -5, 3.7, "4"]:
            with pytest.raises(InvalidSample):
                c.add_sample(GOOD, label)
        assert c.submitted == []  # no CanaryScored for labels the store refused
        for label in ["abc", None]:  # were a ValueError and a TypeError
            with pytest.raises(InvalidSample):
                c.add_sample(GOOD, label)
        assert c.submitted == [] and c.store.stats().added == 0
        with pytest.raises(InvalidSample, match="ahead of the clock"):  # milliseconds (h103)
            c.add_sample(GOOD, 3, timestamp=time.time() * 1000)
        assert c.submitted == [] and c.store.stats().added == 0
        c.add_sample(GOOD, 3)
        events = [make(0.0) for make in c.submitted]
        assert [type(e) for e in events] == [CanaryScored, SampleAdded]
    finally:
        close_unstarted(c)


def test_sample_totals_reach_the_core_in_order_whatever_the_threads_interleaving(tmp_path: Path) -> None:
    c = unstarted_client(tmp_path, durable=False, min_samples=10**6)
    try:
        c.add_sample(GOOD, 1)  # thread A stores first ...
        c.add_sample(GOOD, 2)  # ... thread B second, and B's SampleAdded is handled first
        for make in reversed(c.submitted):  # (an idle device may set its refresh timer: nothing else)
            assert [a for a in c.core.handle(make(0.0)) if not isinstance(a, ScheduleTimer)] == []  # was LocalProtocolError: total went backwards 2 -> 1
        assert c.core.state.total == 2
    finally:
        close_unstarted(c)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("encoding", "xx"),
        ("min_samples", float("nan")),
        ("min_samples", 2.5),
        ("min_samples", "5"),
        ("min_samples", True),
        ("min_samples", 0),
        ("failover_after", 2.5),
        ("max_message_bytes", 0),
        ("request_timeout_s", "10"),
        ("request_timeout_s", float("nan")),
        ("request_timeout_s", 0),
        ("max_backoff_s", float("inf")),
        ("reannounce_s", -1.0),
        ("failback_after_s", float("nan")),
        ("refresh_s", 0),
        ("refresh_s", float("inf")),
    ],
)
def test_device_config_refuses_nonsense_naming_the_parameter(name: str, value: Any) -> None:
    from edge_sdk.core.device import DeviceConfig
    from tests.helpers import SPEC

    with pytest.raises(ConfigError, match=name):
        DeviceConfig(device_id="d1", region="r1", spec=SPEC, **{name: value})


def _other_device_bundle(folder: Path) -> Path:
    folder.mkdir()
    (folder / "bundle.json").write_text('{"identity": "someone-else"}')
    return folder


@pytest.mark.parametrize(
    "bad",
    [
        {"encoding": "xx"},
        {"min_samples": 0},
        {"min_samples": float("nan")},
        {"request_timeout_s": "10"},
        {"failover_after": 0},
        {"region": "a/b"},
        {"device_id": "+"},
        {"device_id": 123},
        {"broker": "http://x:1"},
        {"seed": "x"},
        {"task": 123},
        {"bundle": "other"},
        {"task": "detection", "scc": True},
    ],
    ids=lambda bad: "-".join(f"{k}={v!r}" for k, v in bad.items()),
)
def test_a_client_configuration_error_leaves_nothing_on_disk(tmp_path: Path, bad: dict[str, Any]) -> None:
    from edge_sdk.client import EdgeClient

    data_dir = tmp_path / "device"
    kw: dict[str, Any] = {"broker": "mqtt://127.0.0.1:1", "device_id": "d1", "task": "digits", **bad}
    if kw.get("bundle") == "other":
        kw["bundle"] = _other_device_bundle(tmp_path / "bundle")
    with pytest.raises(ConfigError):
        EdgeClient(data_dir=data_dir, **kw)
    assert not data_dir.exists()


@pytest.mark.parametrize(
    ("role", "regions", "device_regions", "error"),
    [
        ("coordinator", ["eu"], ["eu"], "is a coordinator's, not a device's"),
        ("operator", ["+"], ["eu"], "is a operator's, not a device's"),
        ("device", ["eu"], ["us"], "is for region(s) eu, not 'us'"),
        ("device", ["eu"], ["eu", "us"], "is for region(s) eu, not 'us'"),  # a failover region the ACL does not give it
        ("device", ["eu", "us"], ["us", "eu"], None),
    ],
)
def test_a_bundle_is_accepted_only_as_this_device_s_in_its_regions(
    tmp_path: Path, role: str, regions: list[str], device_regions: list[str], error: str | None,
) -> None:
    """SDK trial, finding 1: a coordinator's bundle was taken by EdgeClient, which then took
    the coordinator's identity on the broker (three disconnects of the real coordinator);
    a bundle for region eu was taken by a device in us (every topic refused)."""
    from coordinator.pki import Pki
    from edge_sdk.client import EdgeClient

    pki = Pki.init(tmp_path / "PKI")
    if role == "coordinator":  # a device bundle needs a coordinator key issued first; this one is that
        bundle = pki.issue("x-1", role, regions=regions)
    else:
        pki.issue("coord-eu", "coordinator", regions=["eu"])
        bundle = pki.issue("x-1", role, regions=regions)
    data_dir = tmp_path / "device"
    kw: dict[str, Any] = {"broker": "mqtts://127.0.0.1:1", "device_id": "x-1", "task": "digits", "bundle": bundle,
                          "region": device_regions[0], "regions": device_regions[1:]}
    if error is None:
        EdgeClient(data_dir=data_dir, durable=False, **kw).stop()
        return
    with pytest.raises(ConfigError, match=re.escape(error)):
        EdgeClient(data_dir=data_dir, **kw)
    assert not data_dir.exists()


def test_a_failed_start_leaves_no_thread_or_open_store_and_a_second_start_is_a_typed_error(tmp_path: Path) -> None:
    """SDK trial, finding 2: each failed start() left the actor's thread running and the store
    open (``with EdgeClient(...)`` never reached __exit__), and a retry raised RuntimeError."""
    import socket
    import threading

    from edge_sdk.client import EdgeClient
    from edge_sdk.errors import LocalProtocolError, TransportError
    from edge_sdk.store import StoreClosed

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    before = {t.name for t in threading.enumerate()}
    c = EdgeClient(broker=f"mqtt://127.0.0.1:{port}", device_id="d1", data_dir=tmp_path / "d1")
    with pytest.raises(TransportError), c:
        raise AssertionError("never reached")
    assert {t.name for t in threading.enumerate() if t.is_alive()} - before == set()
    with pytest.raises(StoreClosed):
        c.add_sample(GOOD, 1)
    with pytest.raises(LocalProtocolError, match="make a new EdgeClient"):
        c.start(timeout=1.0)


def test_one_data_dir_serves_one_client_at_a_time(tmp_path: Path) -> None:
    """SDK trial, finding 9: a second client on a live client's data dir shared its store and
    could reuse its sequence numbers (only ``edgeci device`` locked it)."""
    first = unstarted_client(tmp_path)
    try:
        with pytest.raises(ConfigError, match=rf"data dir {re.escape(str(tmp_path))} is in use by device d1 \(pid {os.getpid()}\)"):
            unstarted_client(tmp_path)
        # another id on it names the one running (helper-103: 'device d2 already runs', d1 did)
        with pytest.raises(ConfigError, match=r"in use by device d1 \(pid \d+\): stop it, or give this one \(device d2\)"):
            unstarted_client(tmp_path, device_id="d2")
    finally:
        first.stop()
    second = unstarted_client(tmp_path)  # free again once the first stopped
    second.stop()


def test_on_takes_every_notification_the_device_sends_and_refuses_a_typo(tmp_path: Path) -> None:
    """SDK trial, finding 5: ``on("modle", cb)`` was accepted and never fired."""
    import edge_sdk.client as client_module
    import edge_sdk.core.device as device_module

    sent = {word for line in Path(device_module.__file__).read_text().splitlines() if "kind=" in line  # (x if c else y too)
            for word in re.findall(r'(?:kind=|\belse )"([a-z_]+)"', line)}
    sent |= set(re.findall(r'_emit\("([a-z_]+)"', Path(client_module.__file__).read_text()))
    assert {"model", "update_rejected", "training_unavailable", "storage"} <= sent  # the patterns still find them
    assert sent <= client_module.EVENTS, sent - client_module.EVENTS
    c = unstarted_client(tmp_path)
    try:
        for kind in sent | {"*"}:
            c.on(kind, lambda *_: None)
        with pytest.raises(ConfigError, match="no notification is called 'modle'"):
            c.on("modle", lambda *_: None)
    finally:
        close_unstarted(c)


def test_a_data_dir_that_cannot_be_one_is_a_config_error(tmp_path: Path) -> None:
    from edge_sdk.client import EdgeClient

    a_file = tmp_path / "file"
    a_file.write_text("not a folder")
    for data_dir in (a_file, a_file / "below"):
        with pytest.raises(ConfigError, match="data_dir"):
            EdgeClient(broker="mqtt://127.0.0.1:1", device_id="d1", data_dir=data_dir)
    assert a_file.read_text() == "not a folder"


def _write_npz(path: Path, weights: Any, meta: bytes) -> None:
    import json

    from edge_sdk.tasks import get_task

    spec = get_task("digits").spec
    with open(path, "wb") as f:
        np.savez(f, weights=weights, spec=np.frombuffer(json.dumps(spec.to_dict()).encode(), np.uint8),
                 meta=np.frombuffer(meta, np.uint8))


@pytest.mark.parametrize(
    ("weights", "meta"),
    [
        ("nan", b'{"version": 3}'),
        ("short", b'{"version": 3}'),
        ("ok", b"[1, 2]"),
        ("ok", b'{"version": "abc"}'),
        ("ok", b'{"version": null}'),
        ("ok", b'{"version": -7}'),
        ("ok", b'{"version": true}'),
        ("ok", b'{"version": 3, "region": 5}'),
    ],
    ids=["nan-weights", "short-weights", "meta-list", "version-str", "version-null", "version-negative",
         "version-bool", "region-int"],
)
def test_an_unusable_saved_model_is_ignored_and_nothing_is_served(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, weights: str, meta: bytes
) -> None:
    from edge_sdk.tasks import get_task

    w = get_task("digits").pretrained(seed=0)
    w = {"nan": np.where(np.arange(w.size) == 5, np.nan, w).astype(np.float32), "short": w[:-1], "ok": w}[weights]
    _write_npz(tmp_path / "deployed.npz", w, meta)
    with caplog.at_level("WARNING", logger="edgeci.device"):
        c = unstarted_client(tmp_path)
    try:
        assert (c.version, c.ready, c.core.state.deployed) == (None, False, None)
        assert "ignoring the saved model" in caplog.text
    finally:
        close_unstarted(c)


def test_a_sound_saved_model_is_served(tmp_path: Path) -> None:
    from edge_sdk.tasks import get_task

    _write_npz(tmp_path / "deployed.npz", get_task("digits").pretrained(seed=0), b'{"version": 3, "region": "default"}')
    c = unstarted_client(tmp_path)
    try:
        assert (c.version, c.core.state.deployed_version) == (3, 3)
    finally:
        close_unstarted(c)


@pytest.mark.parametrize(
    ("provisioned", "pinned", "kid", "served"),
    [
        (True, False, "coord", True),  # signed by a provisioned key
        (True, False, "trial", False),  # a trial coordinator's model, then a bundle: not served, not held
        (True, False, None, False),  # saved by an older SDK, no key recorded: not served behind a bundle
        (False, True, "coord", True),  # trust on first use: the key pinned for its region
        (False, True, "other", False),
        (False, False, None, True),  # trust on first use, nothing recorded (as before)
    ],
)
def test_a_saved_model_is_served_only_while_its_signing_key_is_trusted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, provisioned: bool, pinned: bool, kid: str | None, served: bool,
) -> None:
    """A device that pinned a trial coordinator's key and is then given a bundle used to serve
    the trial's model at start, and wait for versions above it from the real coordinator
    (``model_older``) while its new labels never trained (SDK trial, finding 3)."""
    import json

    from edge_sdk.signing import Signer
    from edge_sdk.tasks import get_task

    coord = Signer.generate()
    names = {"coord": coord.kid, "trial": Signer.generate().kid, "other": Signer.generate().kid}
    if pinned:
        c = unstarted_client(tmp_path)
        c.store.set_meta("pins.default", json.dumps({coord.kid: coord.public_raw.hex()}))
        close_unstarted(c)
    meta = {"version": 3, "region": "default", **({} if kid is None else {"kid": names[kid]})}
    _write_npz(tmp_path / "deployed.npz", get_task("digits").pretrained(seed=0), json.dumps(meta).encode())
    with caplog.at_level("WARNING", logger="edgeci.device"):
        c = unstarted_client(tmp_path, trusted_keys={coord.kid: coord.public_raw} if provisioned else None)
    try:
        assert (c.version, c.core.state.deployed_version) == ((3, 3) if served else (None, -1))
        assert ("does not trust now" in caplog.text) is not served
    finally:
        close_unstarted(c)


def test_a_deployed_model_is_saved_with_its_signing_key_and_served_after_a_restart(tmp_path: Path) -> None:
    from edge_sdk.core.events import MessageReceived
    from edge_sdk.signing import Signer
    from edge_sdk.tasks import get_task
    from edge_sdk.wire import topics
    from edge_sdk.wire.codec import encode
    from edge_sdk.wire.messages import ModelMsg

    spec = get_task("digits").spec
    coord = Signer.generate()
    trusted = {coord.kid: coord.public_raw}
    c = unstarted_client(tmp_path, trusted_keys=trusted)
    try:
        topic = topics.device_topic("default", "d1", "model")
        msg = ModelMsg(model_id=spec.model_id, version=2, reply_to=-1, weights=get_task("digits").pretrained(seed=0), release=2)
        actions = c.core.handle(MessageReceived(now=0.0, topic=topic, payload=encode(msg, signer=coord, scope=topics.signing_scope(topic))))
        c.actor.run_actions(actions)
        assert c.version == 2
    finally:
        close_unstarted(c)
    again = unstarted_client(tmp_path, trusted_keys=trusted)
    try:
        assert again.version == 2
    finally:
        close_unstarted(again)
    other = Signer.generate()  # the operator rotated the coordinators' keys: the old model is not served
    rotated = unstarted_client(tmp_path, trusted_keys={other.kid: other.public_raw})
    try:
        assert rotated.version is None
    finally:
        close_unstarted(rotated)


def _device_with_history(data_dir: Path) -> None:
    """A digits device's store: 20 samples, next_seq 7 and trained_upto 12 persisted."""
    c = unstarted_client(data_dir, min_samples=10**6)
    for i in range(20):
        c.add_sample(GOOD, i % 10)
    c.store.set_meta_many({"next_seq": 7, "trained_upto": 12})  # what PersistDeviceState writes
    close_unstarted(c)


def _assert_recovered_with_counters(data_dir: Path) -> None:
    c = unstarted_client(data_dir, min_samples=10**6)
    try:
        assert c.store.recovered_from is not None
        assert (c.core.state.next_seq, c.core.state.trained_upto, c.core.state.total) == (7, 12, 20)
        assert c.store.stats().added == 20 and c.add_sample(GOOD, 1) == 21  # no id reused
    finally:
        close_unstarted(c)


@pytest.mark.parametrize(
    "damage",
    [
        "UPDATE meta SET value = 'abc' WHERE key = 'next_seq'",
        "UPDATE meta SET value = -5 WHERE key = 'next_seq'",
        "UPDATE meta SET value = 2.5 WHERE key = 'trained_upto'",
        "UPDATE settings SET value = '{{' WHERE key = 'sample_shape'",
        "UPDATE settings SET value = '[\"a\"]' WHERE key = 'sample_shape'",
        "UPDATE settings SET value = '\"ten\"' WHERE key = 'n_classes'",
        "DELETE FROM totals",
        "UPDATE totals SET added = 'many'",
    ],
)
def test_store_damage_that_passes_quick_check_is_recovered_keeping_the_counters(tmp_path: Path, damage: str) -> None:
    import contextlib
    import sqlite3

    _device_with_history(tmp_path)
    with contextlib.closing(sqlite3.connect(tmp_path / "samples.sqlite3")) as conn:
        conn.execute(damage)
        conn.commit()
        assert conn.execute("PRAGMA quick_check").fetchone()[0] == "ok"
    _assert_recovered_with_counters(tmp_path)


def test_an_empty_store_file_next_to_its_counters_mirror_is_recovered(tmp_path: Path) -> None:
    _device_with_history(tmp_path)
    for extra in ("samples.sqlite3-wal", "samples.sqlite3-shm"):
        (tmp_path / extra).unlink(missing_ok=True)
    (tmp_path / "samples.sqlite3").write_bytes(b"")  # a filesystem that lost the file's data
    _assert_recovered_with_counters(tmp_path)


_NAN_SAMPLE = np.full(64, np.nan, "<f4").tobytes()


@pytest.mark.parametrize(
    ("sql", "params"),
    [
        ("UPDATE sample_data SET data = ? WHERE id = 3", (_NAN_SAMPLE,)),
        ("UPDATE sample_data SET data = ? WHERE id = 3", (b"\0\0",)),
        ("UPDATE samples SET label = 42 WHERE id = 3", ()),
        ("UPDATE samples SET label = -3 WHERE id = 3", ()),
        ("UPDATE samples SET label = NULL WHERE id = 3", ()),
        ("UPDATE samples SET label = 'cat' WHERE id = 3", ()),
        ("UPDATE samples SET ts = 'noon' WHERE id = 3", ()),
    ],
    ids=["nan-payload", "short-payload", "label-42", "label-negative", "label-null", "label-text", "ts-text"],
)
def test_one_rotten_sample_is_left_out_of_training_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, sql: str, params: tuple[Any, ...]
) -> None:
    import contextlib
    import sqlite3

    _device_with_history(tmp_path)
    with contextlib.closing(sqlite3.connect(tmp_path / "samples.sqlite3")) as conn:
        conn.execute(sql, params)
        conn.commit()
    c = unstarted_client(tmp_path, min_samples=10**6)
    try:
        assert c.store.recovered_from is None  # one bad row is no reason to drop the store
        with caplog.at_level("WARNING", logger="edgeci.store"):
            for _ in range(2):  # every training round reads a snapshot
                snap = c.store.snapshot("array")
                assert len(snap) == 19 and 3 not in snap.ids.tolist()
                assert np.isfinite(snap.x).all() and ((snap.y >= 0) & (snap.y < 10)).all()
        assert c.store.unreadable == {3}
        assert sum("leaving sample 3 out" in r.getMessage() for r in caplog.records) == 1
    finally:
        close_unstarted(c)


def test_a_frame_with_boxes_none_has_no_boxes(tmp_path: Path) -> None:
    from edge_sdk.store import SampleStore

    with SampleStore.open(tmp_path, n_classes=5) as store:
        sid = store.add_frame(np.zeros((4, 6, 3), np.uint8), None)  # was "boxes must be numeric, got dtype object"
        stored = store.get(sid)
        assert stored is not None and stored.boxes.shape == (0, 5)


def test_a_frame_over_the_stores_bound_says_to_downscale_it(tmp_path: Path) -> None:
    """helper-182: a phone's 4K frame was refused as "exceeds max_frame_bytes=6220800", a parameter
    the app cannot set through EdgeClient; the error now gives the frame's size, the bound in pixels
    and what to do. Nothing is stored or counted."""
    c = unstarted_client(tmp_path, task="detection", min_samples=10**6)
    try:
        with pytest.raises(InvalidSample, match=r"3840x2160 frame .* over the 1920x1080 .*downscale it and its boxes"):
            c.add_frame(np.zeros((2160, 3840, 3), np.uint8), [[0, 10, 10, 100, 100]])
        assert c.store.stats().added == 0 and c.submitted == []
        c.add_frame(np.zeros((1080, 1920, 3), np.uint8), [[0, 5, 5, 50, 50]])  # 1080p: taken
        assert c.store.stats().added == 1
    finally:
        close_unstarted(c)


def test_box_corners_given_normalised_or_as_yolo_rows_are_refused_saying_so(tmp_path: Path) -> None:
    """helper-182: corners normalised to [0, 1] (as many labelling tools write them) were stored and
    counted towards D_min, and training dropped every such box as under one pixel: the frame was
    trained on as background, teaching the detector that its objects are not there. A box under one
    pixel is refused now, and a YOLO row (cx, cy, w, h) that makes a degenerate box says what rows are."""
    c = unstarted_client(tmp_path, task="detection", min_samples=10**6)
    frame = np.zeros((64, 64, 3), np.uint8)
    try:
        with pytest.raises(InvalidSample, match=r"box 0 is 0\.3x0\.3 pixels: .*in the 64x64 frame's pixels, not normalised"):
            c.add_frame(frame, [[1, 0.2, 0.3, 0.5, 0.6]])
        with pytest.raises(InvalidSample, match=r"box 1 is 0\.5x20 pixels"):
            c.add_frame(frame, [[1, 2, 3, 40, 50], [0, 10, 10, 10.5, 30]])
        with pytest.raises(InvalidSample, match=r"degenerate box 0: .*x1, y1, x2, y2 corners.*not YOLO's normalised cx, cy, w, h"):
            c.add_frame(frame, [[0, 0.5, 0.5, 0.2, 0.3]])
        assert c.store.stats().added == 0 and c.submitted == []
        c.add_frame(frame, [[1, 3, 3, 4, 4], [0, 0, 0, 64, 64]])  # one pixel is an object; so is the whole frame
        assert c.store.stats().added == 1
    finally:
        close_unstarted(c)


def test_a_box_too_small_to_survive_the_detector_s_input_size_is_stored_with_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """helper-182: training letterboxes a frame to the detector's input (96 px) and drops a box under
    one pixel there, so a 15x15 object boxed in a 1080p frame was never trained on, without a word
    (the frame teaches that it is background). The frame is stored as before; the app is told once."""
    import logging

    c = unstarted_client(tmp_path, task="detection", min_samples=10**6)
    imgsz = getattr(getattr(c.task, "config", None), "imgsz", None)
    if imgsz is None:
        pytest.skip("a [device] install's declared detector has no input size")
    def warnings() -> list[str]:  # (the client's start may say things at INFO, as other tests set the level: not these)
        return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]

    try:
        with caplog.at_level(logging.WARNING, logger="edgeci.device"):
            c.add_frame(np.zeros((64, 64, 3), np.uint8), [[0, 5, 5, 15, 15]])  # small frames are enlarged: kept
            assert not warnings()
            c.add_frame(np.zeros((1080, 1920, 3), np.uint8), [[1, 100, 100, 400, 300], [0, 900, 500, 915, 515]])
            c.add_frame(np.zeros((1080, 1920, 3), np.uint8), [[0, 900, 500, 915, 515]])
        said = warnings()
        assert len(said) == 1 and "box 1 (15x15 pixels of a 1920x1080 frame) is under one pixel at the detector's " \
            f"{imgsz}-pixel input" in said[0], said
        assert c.store.stats().added == 3
    finally:
        close_unstarted(c)


def test_a_key_pin_that_does_not_match_its_id_is_ignored_not_fatal(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A damaged pins row (key id and key bytes disagree) made EdgeClient() raise ConfigError at
    every start: the device could not start until someone edited its store. It is dropped with an
    error; the sound pin beside it is kept."""
    import json

    from edge_sdk.signing import Signer

    good, other = Signer.generate(), Signer.generate()
    c = unstarted_client(tmp_path)
    c.store.set_meta("pins.default", json.dumps({good.kid: good.public_raw.hex(), "kidA": other.public_raw.hex()}))
    close_unstarted(c)
    with caplog.at_level("ERROR", logger="edgeci.device"):
        c = unstarted_client(tmp_path)
    try:
        assert c.core.state.pins == {good.kid: good.public_raw}
        assert "kidA" in caplog.text
    finally:
        close_unstarted(c)


def test_the_store_s_write_ahead_log_stays_small(tmp_path: Path) -> None:
    """SQLite's defaults let the WAL grow to ~4 MB and keep it there: on a 2 MB partition the
    store was "full" after 68 digits samples (17 KB of them). It is checkpointed every 256 pages
    and truncated back to 1 MiB (the old settings: 4.1 MB here)."""
    from edge_sdk.store import WAL_BYTES, SampleStore

    store = SampleStore.open(tmp_path / "s.sqlite3", sample_shape=(64,), n_classes=10)
    try:
        rng = np.random.default_rng(0)
        sizes = []
        for i in range(1500):
            store.add_sample("array", rng.random(64, dtype=np.float32), i % 10)
            if i % 100 == 99:
                sizes.append((tmp_path / "s.sqlite3-wal").stat().st_size)
        assert store.stats().added == 1500
        assert max(sizes) <= 2 * WAL_BYTES, sizes
    finally:
        store.close()


def test_a_store_belongs_to_the_device_that_made_it(tmp_path: Path) -> None:
    """A store written by device d1 was adopted by d2 without a word: its samples, next_seq and
    key pins carried over. Now it is refused, and d1 still opens it."""
    c = unstarted_client(tmp_path, device_id="d1")
    close_unstarted(c)
    with pytest.raises(ConfigError, match="holds the samples, sequence numbers and key pins of device 'd1', not 'd2'"):
        unstarted_client(tmp_path, device_id="d2")
    close_unstarted(unstarted_client(tmp_path, device_id="d1"))


def test_masked_arrays_are_refused_not_stored_with_the_mask_dropped(tmp_path: Path) -> None:
    """A masked array hides values (here a NaN) that numpy's conversion keeps and its checks
    skip: stored, the hidden NaN reached training. Refused on every path that stores or predicts."""
    hidden = np.ma.masked_array(GOOD.copy(), mask=np.zeros(GOOD.shape, bool))
    hidden.data[0, 0] = np.nan
    hidden.mask[0, 0] = True
    harmless = np.ma.masked_array(GOOD.copy(), mask=False)  # nothing masked: still refused, the caller must say what it means
    c = unstarted_client(tmp_path, min_samples=1)
    try:
        for x in (hidden, harmless):
            with pytest.raises(InvalidSample, match="masked array"):
                c.add_sample(x, 1)
            with pytest.raises(InvalidSample, match="masked array"):
                c.contract.batch(x)  # what predict validates with
            with pytest.raises(InvalidSample, match="not masked"):
                c.store.add(x, 1)  # the store's own check, under the client's
        with pytest.raises(InvalidSample, match="not masked"):
            c.store.add_frame(np.ma.masked_array(np.zeros((4, 4, 3), np.uint8)), ())
        assert c.store.stats().added == 0 and c.submitted == []
        c.add_sample(hidden.filled(0.5), 1)  # what the message tells the caller to do
        assert c.store.stats().added == 1
    finally:
        close_unstarted(c)


def test_a_store_belongs_to_the_task_that_made_it(tmp_path: Path) -> None:
    """helper-97: one device id running two tasks shares the default data dir. A digits client
    opened a gestures device's store without a word, added (1, 8, 8) samples and raised its
    n_classes to 10; the gestures client then could not open its own store ("may grow, not
    shrink to 8"). Refused now, before anything is written; a store from before the task was
    remembered is told by the kind of samples it holds."""
    from edge_sdk.store import SampleStore

    g = unstarted_client(tmp_path, task="gestures")
    g.add_sample(np.zeros((32, 4), np.float32), 7)
    close_unstarted(g)
    with pytest.raises(ConfigError, match="holds the samples of 'gestures', not of task 'digits'"):
        unstarted_client(tmp_path)
    g = unstarted_client(tmp_path, task="gestures")  # untouched: its own task still opens it
    try:
        assert len(g.store) == 1 and g.store.stats().added == 1
    finally:
        close_unstarted(g)

    legacy = tmp_path / "legacy"  # written before stores remembered their task
    with SampleStore.open(legacy / "samples.sqlite3", gesture_shape=(32, 4), n_classes=8) as store:
        store.add_gesture(np.zeros((32, 4), np.float32), 1)
    with pytest.raises(ConfigError, match=r"holds the samples of another task \(gesture samples\), not of task 'digits'"):
        unstarted_client(legacy)
    close_unstarted(unstarted_client(legacy, task="gestures"))  # adopted by its own task
    with pytest.raises(ConfigError, match="holds the samples of 'gestures'"):
        unstarted_client(legacy)


def test_on_refuses_a_callback_it_could_not_call(tmp_path: Path) -> None:
    """helper-97: ``on("model", 42)`` was accepted; every model then logged a TypeError."""
    c = unstarted_client(tmp_path)
    try:
        with pytest.raises(ConfigError, match="must be callable"):
            c.on("model", 42)
        c.on("model", print)
    finally:
        close_unstarted(c)
