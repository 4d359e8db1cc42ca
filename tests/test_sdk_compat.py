"""Mixed versions in one fleet: today's coordinator with devices that run an older SDK, and today's
SDK with a coordinator not yet upgraded. Devices in the field update when their users let them, so
a coordinator upgrade must keep serving the SDKs already out there.

The older side is real code: ``edge_sdk`` and ``coordinator`` as of :data:`OLDEST_V3` (the first
commit of wire protocol v3, 2026-12-03; older SDKs are refused with ``UnsupportedProtocol`` by
design), kept as a ``git archive`` tarball in ``tests/compat/`` and run in its own process
(``tests/compat/old_side.py``, driven over stdin/stdout). Everything else is real too: mosquitto
(plain, and the production TLS + ACL config with certificates from today's ``edgeci pki``), a real
coordinator daemon, real EdgeClients. Both sides must finish with nothing refused: every update
acknowledged, every canary report counted, every frame verified."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from coordinator.broker import MosquittoProcess
from coordinator.daemon import CoordinatorDaemon, CoordinatorOptions
from edge_sdk.client import EdgeClient
from edge_sdk.core.device import Phase
from edge_sdk.modelio import save_model
from edge_sdk.signing import Signer, verify
from edge_sdk.tasks import get_task
from edge_sdk.tasks.base import TrainConfig
from edge_sdk.wire import topics
from edge_sdk.wire.codec import decode_frame, encode
from edge_sdk.wire.messages import MESSAGE_TYPES
from tests.compat.frames import TOPICS, VALUES, build, digest, summary
from tests.compat.snapshot import BEFORE_SPREAD, OLDEST_V3, SNAPSHOTS, extract
from tests.helpers import wait_until
from tests.secure_broker import SECURE_REGION, SecureBroker

pytestmark = [pytest.mark.broker]

OLD_SIDE = Path(__file__).resolve().parent / "compat" / "old_side.py"


class OldSide:
    """The older edgeci in a subprocess: ``ask(op, **args)`` sends one command, returns its answer."""

    def __init__(self, root: Path, commit: str = OLDEST_V3) -> None:
        code = extract(root / f"old-{commit}", commit)
        self.stderr = (root / "old-side.log").open("w")
        self.proc = subprocess.Popen([sys.executable, str(OLD_SIDE)], cwd=code, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, text=True,
                                     env={**os.environ, "PYTHONPATH": str(code)})
        self.log = root / "old-side.log"
        hello = self.ask("hello")
        assert Path(hello["edge_sdk"]).is_relative_to(code), f"the old side imported today's SDK: {hello['edge_sdk']}"
        self.hello = hello

    def ask(self, op: str, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"the old side exited ({self.proc.poll()}): {self.log.read_text()[-3000:]}")
        answer: dict[str, Any] = json.loads(line)
        if not answer.pop("ok"):
            raise AssertionError(f"the old side failed {op}: {answer['traceback']}")
        return answer

    def devices(self) -> dict[str, Any]:
        return self.ask("state")

    def diagnose(self) -> dict[str, Any]:
        """What a failed wait shows: each old device's state and the old side's log."""
        return {"devices": self.devices(), "log": self.log.read_text()[-2000:]}

    def close(self) -> None:
        if self.proc.stdin is None or self.proc.stdin.closed:
            return
        try:
            if self.proc.poll() is None:
                self.ask("stop")
            self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
            for pipe in (self.proc.stdin, self.proc.stdout, self.stderr):
                if pipe is not None:
                    pipe.close()


@pytest.fixture
def old_side(tmp_path: Path) -> Iterator[OldSide]:
    side = OldSide(tmp_path)
    try:
        yield side
    finally:
        side.close()


def refused(counters: dict[str, int]) -> dict[str, int]:
    """A device's counters that say it refused or ignored something."""
    return {k: v for k, v in counters.items() if v and k.startswith(("rejected", "ignored"))}


def settled(device: dict[str, Any], total: int) -> bool:
    """An old device (``OldSide.devices()``) that holds ``total`` labels, has trained on all of them
    and had each of its updates acknowledged (a device past ``min_samples`` pulls at every new label,
    so how many rounds the labels make depends on timing)."""
    events = device["events"]
    return (device["phase"] == "idle" and device["total"] == total == device["trained_upto"]
            and events.count("trained") == events.count("update_acked") >= 1)


class Today:
    """Today's EdgeClient, with what it notified counted (``settled`` as for an old device)."""

    def __init__(self, start: bool = True, **kwargs: Any) -> None:
        self.events: list[str] = []
        self.client = EdgeClient(**kwargs)
        self.client.on("*", lambda kind, data: self.events.append(kind))
        if start:
            self.client.start(15)

    def settled(self, total: int) -> bool:
        s = self.client.core.state
        return (s.phase is Phase.IDLE and s.total == total == s.trained_upto
                and self.events.count("trained") == self.events.count("update_acked") >= 1)


def initial_model(root: Path) -> str:
    """Release 0 for an old coordinator (a model file written by today's code, as `edgeci pretrain`
    writes it: the old one reads it instead of pretraining for half a minute)."""
    path = root / "init.npz"
    if not path.exists():
        task = get_task("digits")
        save_model(path, task.spec, task.pretrained(seed=0), {"version": 0})
    return str(path)


def coordinator_refused(counters: Any) -> dict[str, int]:
    """A coordinator's counters that say it refused a device's message (an update, a pull, a report)."""
    return {k: v for k, v in counters.items() if v and k.startswith(("reject:", "canary_reject:", "duplicate"))}


def test_the_old_side_runs_the_snapshot_not_todays_code(old_side: OldSide) -> None:
    """The subprocess imports the snapshot's packages: protocol v3, and an EdgeClient without the
    options added since (``refresh_s``: 2026-12-03; ``release_spread_s``: 2026-12-07)."""
    assert old_side.hello["protocol"] == 3
    params = set(old_side.hello["client_params"])
    assert {"broker", "device_id", "min_samples", "bundle"} <= params
    assert not {"refresh_s", "release_spread_s"} & params
    assert OLDEST_V3 in OLD_SIDE.parent.joinpath(f"edgeci-{OLDEST_V3}.tar.gz").name


def test_old_devices_train_score_canaries_and_deploy_todays_releases(
        mosquitto: MosquittoProcess, old_side: OldSide, tmp_path: Path) -> None:
    """Today's daemon with federated evaluation (every recently seen device asked, 3 reports
    needed) and four devices on the old SDK: one trains a candidate from its labels, the three
    others are asked to score it, score it on their next labels (test-then-train) and report; the
    gate decides on their reports alone; the trainer then pulls again and deploys today's release."""
    task = get_task("digits")
    daemon = CoordinatorDaemon(
        CoordinatorOptions(broker=mosquitto.url, region="mixed", state_dir=tmp_path / "coord",
                           strategy_params={"k": 1, "timeout_s": None}, canary=1.0, canary_samples=10,
                           canary_min_reports=3, canary_deadline_s=120.0),
        task=task,
    ).start()
    try:
        devices = [{"id": "trainer", "min_samples": 4, "data_dir": str(tmp_path / "trainer"), "seed": 1}]
        devices += [{"id": f"s{i}", "min_samples": 10_000, "data_dir": str(tmp_path / f"s{i}"), "seed": 2 + i}
                    for i in range(3)]
        old_side.ask("devices", broker=mosquitto.url, region="mixed", devices=devices)
        wait_until(lambda: all(d["version"] == 0 for d in old_side.devices().values()), 60, "old devices on release 0",
                   poll=0.5, detail=old_side.devices)
        old_side.ask("label", device="trainer", n=4, split="pool", offset=0)
        wait_until(lambda: daemon.core.version >= 1, 60, "candidate 1 from the old trainer's update", poll=0.2)
        assert daemon.core.release[0] == 0  # behind the gate
        wait_until(lambda: all(old_side.devices()[f"s{i}"]["canary_state"] == "scoring" for i in range(3)), 60,
                   "the old scorers asked to score candidate 1", poll=0.5, detail=old_side.devices)
        for i in range(3):
            old_side.ask("label", device=f"s{i}", n=10, split="test", offset=10 * i)
        decided = ("gate_promoted", "gate_rejected")
        wait_until(lambda: sum(daemon.core.counters[k] for k in decided) >= 1, 90, "the gate's decision on candidate 1",
                   poll=0.5, detail=lambda: daemon.core.status().extra["gate"])
        canary = daemon.core.status().extra["gate"]["canary"]
        assert not canary["rejected_by_reason"], canary
        # the trainer labels again: today's coordinator serves it the training line, it trains, and it
        # deploys the release (whichever the gate left) bit for bit
        old_side.ask("label", device="trainer", n=4, split="pool", offset=4)
        wait_until(lambda: settled(old_side.devices()["trainer"], 8), 60, "the trainer trained on its new labels",
                   poll=0.5, detail=old_side.diagnose)
        release, weights = daemon.core.release  # its new candidates wait for scorers that label no more
        seen = old_side.devices()
        assert seen["trainer"]["version"] == release and seen["trainer"]["weights"] == digest(weights)
        assert seen["trainer"]["events"].count("update_acked") == daemon.core.counters["accepted"] >= 2
        for name, d in seen.items():
            assert not refused(d["counters"]), (name, d["counters"])
            assert "message_rejected" not in d["events"] and "update_rejected" not in d["events"], (name, d["events"])
        for i in range(3):
            assert "canary_reported" in seen[f"s{i}"]["events"]
        assert not coordinator_refused(daemon.core.counters)
    finally:
        daemon.stop()
    history = json.loads((tmp_path / "coord" / "release.json").read_text())["history"]
    (decision,) = [e for e in history if e["action"] in ("promote", "reject")]
    assert decision["version"] == 1 and decision["canary"]["reports"] == 3, decision  # the three old scorers' reports


def test_an_old_device_on_the_production_broker_with_a_bundle_from_todays_pki(
        secure_broker: SecureBroker, old_side: OldSide, tmp_path: Path) -> None:
    """The production broker config (TLS client certificates, identity as username, the ACL and
    CRL written by today's ``edgeci pki``) and a provisioning bundle issued today, read by the old
    SDK: it connects, verifies today's coordinator's signed models against the bundle's key, trains,
    is acknowledged, and deploys the release its update made."""
    task = get_task("digits")
    daemon = CoordinatorDaemon(
        CoordinatorOptions(broker=secure_broker.url, region=SECURE_REGION, state_dir=tmp_path / "coord",
                           coordinator_id="coord-sec", bundle=secure_broker.bundle("coord-sec", "coordinator"),
                           strategy_params={"k": 1, "timeout_s": None}),
        task=task,
    ).start()
    try:
        old_side.ask("devices", broker=secure_broker.url, region=SECURE_REGION, devices=[
            {"id": "devA", "min_samples": 4, "data_dir": str(tmp_path / "devA"), "bundle": str(secure_broker.bundle("devA"))}])
        wait_until(lambda: old_side.devices()["devA"]["version"] == 0, 60, "the old device on release 0", poll=0.5,
                   detail=old_side.devices)
        for round_ in range(2):
            old_side.ask("label", device="devA", n=4, split="pool", offset=4 * round_)
            wait_until(lambda r=round_: settled(old_side.devices()["devA"], 4 * r + 4), 60, f"round {round_} trained",
                       poll=0.3, detail=lambda: (old_side.diagnose(), dict(daemon.core.counters)))
        # each pull after the first was served the release its last update made, signed by the coordinator
        seen = old_side.devices()["devA"]
        assert seen["version"] >= 1 and seen["weights"] == digest(daemon.core.weights_at(seen["version"])), seen
        assert seen["events"].count("update_acked") == daemon.core.counters["accepted"] == daemon.core.release[0] >= 2
        assert not refused(seen["counters"]) and "message_rejected" not in seen["events"], seen
        assert not coordinator_refused(daemon.core.counters)
    finally:
        daemon.stop()


def test_todays_device_with_a_coordinator_not_yet_upgraded(mosquitto: MosquittoProcess, old_side: OldSide,
                                                            tmp_path: Path) -> None:
    """A region whose coordinator still runs the old code, and a device on today's SDK (its defaults:
    release push on, refresh on, pull pacing): it trusts the old coordinator's key on first use, trains,
    is acknowledged, and deploys the old coordinator's release bit for bit. The old coordinator
    announces no releases; the device does not need it to."""
    old_side.ask("coordinator", options={"broker": mosquitto.url, "region": "old", "state_dir": str(tmp_path / "coord"),
                                         "strategy_params": {"k": 1, "timeout_s": None}, "init": initial_model(tmp_path)})
    today = Today(broker=mosquitto.url, device_id="new", region="old", task=get_task("digits"), data_dir=tmp_path / "new",
                  min_samples=4, train=TrainConfig(epochs=1), request_timeout_s=3.0, inference="torch")
    client = today.client
    try:
        assert client.wait_for_version(0, timeout=60)
        pool = client.task.data().pool
        for round_ in range(2):
            for i in range(4 * round_, 4 * round_ + 4):
                client.add_sample(pool.x[i], int(pool.y[i]))
            wait_until(lambda r=round_: today.settled(4 * r + 4), 60, f"round {round_} trained", poll=0.3,
                       detail=lambda: (old_side.ask("coordinator_state"), today.events))
        version = client.version
        assert version is not None and version >= 1
        old = old_side.ask("coordinator_state", weights_at=version)
        assert digest(client.weights) == old["weights_at"]
        assert today.events.count("update_acked") == old["counters"]["accepted"] == old["release"] >= 2
        assert not coordinator_refused(old["counters"]), old
        assert not refused(dict(client.core.state.counters)), client.core.state.counters
    finally:
        client.stop()


def test_a_coordinator_upgraded_in_place_keeps_its_numbering_key_and_devices(mosquitto: MosquittoProcess,
                                                                             old_side: OldSide, tmp_path: Path) -> None:
    """The usual upgrade: the old coordinator stops, today's starts on its state dir, and the devices
    carry on. Today's goes on from the old one's version and release (no number issued twice), signs
    with the same key (the devices' pins still verify), and today's device, which trained with the old
    one, trains with the new one: every update accepted, nothing refused on either side."""
    state = tmp_path / "coord"
    old_side.ask("coordinator", options={"broker": mosquitto.url, "region": "inplace", "state_dir": str(state),
                                         "strategy_params": {"k": 1, "timeout_s": None}, "init": initial_model(tmp_path)})
    task = get_task("digits")
    today = Today(broker=mosquitto.url, device_id="dev", region="inplace", task=task, data_dir=tmp_path / "dev",
                  min_samples=4, train=TrainConfig(epochs=1), request_timeout_s=3.0, inference="torch")
    client = today.client
    try:
        pool = task.data().pool
        assert client.wait_for_version(0, timeout=60)
        for i in range(4):
            client.add_sample(pool.x[i], int(pool.y[i]))
        wait_until(lambda: today.settled(4), 60, "a round with the old coordinator", poll=0.3, detail=lambda: today.events)
        before = old_side.ask("coordinator_state")
        old_side.close()  # the old coordinator stops (the operator upgrades the package)
        daemon = CoordinatorDaemon(CoordinatorOptions(broker=mosquitto.url, region="inplace", state_dir=state,
                                                      strategy_params={"k": 1, "timeout_s": None}), task=task).start()
        try:
            assert daemon.core.version == before["version"] >= 1 and daemon.core.release[0] == before["release"]
            assert digest(daemon.core.release[1]) == before["release_weights"]
            assert daemon.signer.kid in client.core.state.pins  # the key the device pinned from the old one
            acked, accepted = today.events.count("update_acked"), daemon.core.counters["accepted"]  # (kept across restarts)
            for i in range(4, 8):
                client.add_sample(pool.x[i], int(pool.y[i]))
            wait_until(lambda: today.settled(8), 60, "a round with today's coordinator", poll=0.3,
                       detail=lambda: (today.events, dict(daemon.core.counters)))
            assert daemon.core.counters["accepted"] - accepted == today.events.count("update_acked") - acked >= 1
            assert daemon.core.version > before["version"]  # numbered on from the old one's versions
            version = client.version
            assert version is not None and version >= before["release"]
            assert digest(client.weights) == digest(daemon.core.weights_at(version))
            assert not refused(dict(client.core.state.counters)) and not coordinator_refused(daemon.core.counters)
        finally:
            daemon.stop()
    finally:
        client.stop()


def test_a_ring_of_regions_upgraded_one_at_a_time(mosquitto: MosquittoProcess, old_side: OldSide, tmp_path: Path) -> None:
    """Spyker peering between today's coordinator (eu) and one not yet upgraded (us), keys pinned on
    first use: eu's device trains, the age gap passes the token, and each side merges the other's
    model (Spyker's token, beats and model messages cross both ways, nothing refused)."""
    task = get_task("digits")
    ring = {"peering": "spyker", "peers": ("eu", "us"), "strategy_params": {"k": 1, "timeout_s": None},
            "peering_params": {"beacon_s": 0.5, "token_timeout_s": 3.0, "h_inter": 1.0}}
    daemon = CoordinatorDaemon(CoordinatorOptions(broker=mosquitto.url, region="eu", coordinator_id="eu",
                                                  state_dir=tmp_path / "eu", **ring), task=task).start()
    try:
        old_side.ask("coordinator", options={"broker": mosquitto.url, "region": "us", "coordinator_id": "us",
                                             "state_dir": str(tmp_path / "us"), "init": initial_model(tmp_path), **ring})
        today = Today(broker=mosquitto.url, device_id="new", region="eu", task=task, data_dir=tmp_path / "new",
                      min_samples=4, train=TrainConfig(epochs=1), request_timeout_s=3.0, inference="torch")
        try:
            pool = task.data().pool
            assert today.client.wait_for_version(0, timeout=60)
            for i in range(8):
                today.client.add_sample(pool.x[i], int(pool.y[i]))
            wait_until(lambda: daemon.core.counters["peer_merges"] >= 1
                       and old_side.ask("coordinator_state")["counters"].get("peer_merges", 0) >= 1, 60,
                       "a merge on each side", poll=0.5,
                       detail=lambda: (daemon.core.peering.describe(), old_side.ask("coordinator_state")))
        finally:
            today.client.stop()
        old = old_side.ask("coordinator_state")
        assert old["version"] >= 1 and old["counters"]["peer_messages"] >= 1, old  # us merged eu's model: a version
        spyker = daemon.core.peering.describe()
        assert spyker["tokens_rejected"] == 0 and spyker["ages"].get("us") is not None, spyker
        assert not coordinator_refused(daemon.core.counters) and not coordinator_refused(old["counters"]), old
    finally:
        daemon.stop()


def test_a_device_whose_app_updates_the_sdk_keeps_its_labels_sequence_and_trust(
        mosquitto: MosquittoProcess, old_side: OldSide, tmp_path: Path) -> None:
    """The user updates the app: the old SDK's data dir (sample store, device counters, the pinned
    coordinator key, the deployed model) opened by today's SDK. Its labels are all there, its next
    update is new to the coordinator (no sequence number used twice, so nothing is refused as a
    duplicate), the key it pinned still verifies, and it trains only on labels it has not trained on."""
    task = get_task("digits")
    daemon = CoordinatorDaemon(
        CoordinatorOptions(broker=mosquitto.url, region="upd", state_dir=tmp_path / "coord",
                           strategy_params={"k": 1, "timeout_s": None}),
        task=task,
    ).start()
    data_dir = tmp_path / "headset"
    try:
        old_side.ask("devices", broker=mosquitto.url, region="upd", devices=[
            {"id": "headset", "min_samples": 4, "data_dir": str(data_dir)}])
        wait_until(lambda: old_side.devices()["headset"]["version"] == 0, 60, "the old SDK on release 0", poll=0.5,
                   detail=old_side.diagnose)
        old_side.ask("label", device="headset", n=6, split="pool", offset=0)
        wait_until(lambda: settled(old_side.devices()["headset"], 6), 60, "the old SDK trained and acknowledged",
                   poll=0.3, detail=old_side.diagnose)
        old = old_side.devices()["headset"]
        old_side.close()  # the app quits
        accepted = daemon.core.counters["accepted"]
        assert old["events"].count("update_acked") == accepted

        today = Today(start=False, broker=mosquitto.url, device_id="headset", region="upd", task=task,
                      data_dir=data_dir, min_samples=4, train=TrainConfig(epochs=1), request_timeout_s=3.0,
                      inference="torch")
        client = today.client
        try:
            # what it read from the old SDK's files, before it connects
            s = client.core.state
            assert client.store.count() == 6 and client.store.unused_count() == 0 and s.trained_upto == 6
            assert (s.deployed_version, s.next_seq) == (old["version"], old["next_seq"])
            assert digest(client.weights) == old["weights"] and list(s.pins) == [daemon.signer.kid]  # its pinned key
            client.start(15)
            # (the coordinator's recall names its epoch, which the old SDK never recorded: a new numbering to
            # this device, which keeps serving its weights and fetches the release once)
            pool = task.data().pool
            for i in range(6, 10):
                client.add_sample(pool.x[i], int(pool.y[i]))
            wait_until(lambda: today.settled(10), 60, "today's SDK trained on the new labels", poll=0.3,
                       detail=lambda: (dict(daemon.core.counters), today.events))
            # every update of today's SDK was new to the coordinator (a sequence number used twice is a duplicate)
            assert daemon.core.counters["accepted"] == accepted + today.events.count("update_acked")
            assert client.core.state.next_seq > old["next_seq"]
            version = client.version
            assert version is not None and digest(client.weights) == digest(daemon.core.weights_at(version))
            assert client.store.unused_count() == 0
            assert not refused(dict(client.core.state.counters)) and not coordinator_refused(daemon.core.counters)
        finally:
            client.stop()
    finally:
        daemon.stop()


def test_yesterdays_devices_take_announced_releases_with_a_spread_they_do_not_know(mosquitto: MosquittoProcess,
                                                                                  tmp_path: Path) -> None:
    """Devices of the last tree before ``Recall.spread_s`` (they already fetch announced releases,
    within their own spread) and today's coordinator with ``--release-spread 2``: its signed recall
    carries a field they do not know. They must still verify it and take it: the idle one, which
    labels nothing and does not refresh, deploys the busy one's release within seconds."""
    side = OldSide(tmp_path, BEFORE_SPREAD)
    assert "release_spread_s" in side.hello["client_params"]
    daemon = CoordinatorDaemon(
        CoordinatorOptions(broker=mosquitto.url, region="push", state_dir=tmp_path / "coord", release_spread_s=2,
                           release_announce_s=1.0, strategy_params={"k": 1, "timeout_s": None}),
        task=get_task("digits"),
    ).start()
    try:
        side.ask("devices", broker=mosquitto.url, region="push", devices=[
            {"id": "idle", "min_samples": 10**6, "data_dir": str(tmp_path / "idle"),
             "options": {"release_spread_s": 1.0, "refresh_s": None}},
            {"id": "busy", "min_samples": 2, "data_dir": str(tmp_path / "busy"),
             "options": {"release_spread_s": None, "refresh_s": None}}])
        wait_until(lambda: all(d["version"] == 0 for d in side.devices().values()), 60, "both on release 0", poll=0.5,
                   detail=side.diagnose)
        side.ask("label", device="busy", n=2, split="pool", offset=0)
        wait_until(lambda: settled(side.devices()["busy"], 2), 60, "the busy device's round", poll=0.3,
                   detail=side.diagnose)
        release = daemon.core.release[0]
        assert release >= 1
        wait_until(lambda: side.devices()["idle"]["version"] == release, 30, f"the idle device on release {release}",
                   poll=0.3, detail=side.diagnose)
        idle = side.devices()["idle"]
        assert idle["weights"] == digest(daemon.core.weights_at(release))
        assert idle["counters"].get("releases_heard", 0) >= 1, idle
        # (the retained recall it found at start came before its first model pinned the key: set aside, as today's SDK does)
        assert set(refused(idle["counters"])) <= {"ignored:recall_before_pin"}, idle
        assert not coordinator_refused(daemon.core.counters)
    finally:
        daemon.stop()
        side.close()


@pytest.mark.parametrize("commit", sorted(SNAPSHOTS))
def test_every_message_crosses_between_the_versions_both_ways(commit: str, tmp_path: Path) -> None:
    """Each message type, encoded by one version and decoded by the other, against each snapshot
    (the oldest v3 SDK, and the last before ``Recall.spread_s``; ``tests/compat/frames.py`` has the
    values): every field arrives with its value, a signature made by either verifies on the other for
    the topic it was published on, a field added since is left out at its default (the old side's
    bytes, exactly) and ignored by the old decoder when set, and a type the old side does not know is
    a typed error there, not a crash. A field added to a message later fails this test until
    ``frames.VALUES`` gives it a value, so each wire change is checked against the old SDKs."""
    today_fields = {name: [f.name for f in dataclasses.fields(cls)] for name, cls in MESSAGE_TYPES.items()}
    for name, names in today_fields.items():
        assert sorted(VALUES.get(name, {})) == sorted(names), f"{name}: give each field a value in tests/compat/frames.py"
    side = OldSide(tmp_path, commit)
    try:
        old_fields = side.ask("fields")["fields"]
        assert set(old_fields) <= set(today_fields)
        frames = tmp_path / "frames"
        frames.mkdir()
        signer = Signer.generate()
        for name, cls in MESSAGE_TYPES.items():
            scope = topics.signing_scope(TOPICS[name])
            if name in old_fields:  # today's message with only the fields the old side has
                msg = build(cls, VALUES[name], only=old_fields[name])
                (frames / f"{name}.new.bin").write_bytes(encode(msg))
                (frames / f"{name}.new.signed.bin").write_bytes(encode(msg, signer=signer, scope=scope))
            (frames / f"{name}.new.full.bin").write_bytes(encode(build(cls, VALUES[name]), signer=signer, scope=scope))
        answer = side.ask("frames", dir=str(frames))
    finally:
        side.close()
    decoded = answer["decoded"]
    for name, cls in MESSAGE_TYPES.items():
        if name not in old_fields:  # a type the old side does not know
            assert decoded[f"{name}.new.full.bin"]["error"] == "MalformedMessage", decoded[f"{name}.new.full.bin"]
            continue
        names = old_fields[name]
        assert [f for f in today_fields[name] if f in names] == names, f"{name}: the fields' order changed"
        today = summary(build(cls, VALUES[name], only=names))  # the fields added since at their defaults
        as_old = {k: today[k] for k in ("type", *names)}
        # today's frames, read by the old SDK: every field, and the signature verifies
        assert decoded[f"{name}.new.bin"] == as_old, name
        assert decoded[f"{name}.new.signed.bin"] == {**as_old, "verified": True}, name
        # with every field of today set: the ones it does not know ignored, the rest intact, still verified
        assert decoded[f"{name}.new.full.bin"] == {**as_old, "verified": True}, name
        # the old SDK's frames, read today: every field, the ones added since at their defaults
        old = decode_frame((frames / f"{name}.old.bin").read_bytes())
        assert summary(old.message) == today, name
        signed = decode_frame((frames / f"{name}.old.signed.bin").read_bytes())
        assert signed.signature is not None and signed.signature.public_raw.hex() == answer["key"]
        assert verify(signed.signature.public_raw, signed.signature.signature,
                      signed.signature.signed_for(topics.signing_scope(TOPICS[name]))), name
        # a message without today's new fields is the same bytes as the old SDK's
        assert (frames / f"{name}.new.bin").read_bytes() == (frames / f"{name}.old.bin").read_bytes(), name
