"""A selecting coordinator (FedAvg here) keeps the devices it answered ``deferred`` in memory only:
after its restart they were invisible until each re-announced its pull on its own timer
(``reannounce_s``, 600 s), and no round was drawn meanwhile. A coordinator's every start now
publishes the region's retained recall with its start stamp (``Recall.started``); a device waiting
in DEFERRED that sees a newer stamp sends its pull again (same seq), after a short random spread.

Here: a real mosquitto, a real daemon and three SDK devices (``reannounce_s`` scaled down to 20 s to
keep the old behaviour's test short); the device-core rules (only when DEFERRED, once per start, not
on the first stamp seen, nothing from an unsigned / forged / older one); the wire's old/new forms."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import pytest

from coordinator.broker import MosquittoProcess
from coordinator.daemon import CoordinatorDaemon, CoordinatorOptions
from edge_sdk.core.device import DeviceConfig, DeviceCore, Phase
from edge_sdk.core.events import (
    MessageReceived,
    Notify,
    Publish,
    SampleAdded,
    ScheduleTimer,
    TimerFired,
)
from edge_sdk.errors import BadSignature, RemoteProtocolError, UnsignedMessage
from edge_sdk.signing import Signer
from edge_sdk.tasks import get_task
from edge_sdk.wire import topics
from edge_sdk.wire.codec import decode, encode
from edge_sdk.wire.messages import Pull, Recall
from tests.helpers import SIGNER, SPEC, wait_until
from tests.test_broker_failures import REGION, client, deferred_device, label

REANNOUNCE_S = 20.0
"""The devices' re-announce timer in the daemon test (600 s by default)."""


def _recall(started: int, *, signer: Signer | None = SIGNER, epoch: int = 0, region: str = "r1") -> MessageReceived:
    topic = topics.recall_topic(region)
    msg = Recall(model_id=SPEC.model_id, release=0, abandoned=(), epoch=epoch, started=started)
    return MessageReceived(now=0.0, topic=topic, payload=encode(msg, signer=signer, scope=topics.signing_scope(topic)))


def _at(ev: MessageReceived, now: float) -> MessageReceived:
    return MessageReceived(now=now, topic=ev.topic, payload=ev.payload)


def _pulls(actions: list[Any]) -> list[Pull]:
    return [m for m in (decode(a.payload) for a in actions if isinstance(a, Publish)) if isinstance(m, Pull)]


def _fire(d: DeviceCore, actions: list[Any]) -> list[Any]:
    """The timer the actions asked for, fired at its time."""
    (timer,) = [a for a in actions if isinstance(a, ScheduleTimer)]
    return d.handle(TimerFired(now=timer.at))


# ------------------------------------------------------------------ the device core


def test_a_deferred_device_pulls_again_once_when_its_coordinator_says_it_started_again() -> None:
    d, pull = deferred_device()
    assert d.handle(_at(_recall(1000), 3.5)) == []  # the first stamp seen (the retained one on connect): noted only
    actions = d.handle(_at(_recall(2000), 4.0))
    assert _pulls(actions) == [] and d.state.phase is Phase.DEFERRED  # spread: not all at once
    (timer,) = [a for a in actions if isinstance(a, ScheduleTimer)]
    assert 4.0 <= timer.at <= 4.0 + d.config.restart_spread_s
    (again,) = _pulls(_fire(d, actions))
    assert (again.seq, again.invite_round) == (pull.seq, pull.invite_round)
    assert d.state.phase is Phase.PULLING and d.state.timeouts == 0  # not a timeout: the coordinator is back
    assert d.state.counters["coordinator_restarts"] == 1
    # The same announcement again (a reconnect's retained copy, a replay): nothing more.
    assert _pulls(d.handle(_at(_recall(2000), 5.0))) == []
    assert d.state.counters["coordinator_restarts"] == 1


def test_without_a_spread_the_pull_leaves_at_once() -> None:
    d, pull = deferred_device(restart_spread_s=0.0)
    d.handle(_at(_recall(1000), 3.5))
    (again,) = _pulls(d.handle(_at(_recall(2000), 4.0)))
    assert again.seq == pull.seq and d.state.phase is Phase.PULLING


def test_a_device_not_waiting_for_an_invitation_only_notes_the_stamp() -> None:
    d, _pull = deferred_device(restart_spread_s=0.0)
    d.handle(_at(_recall(1000), 3.5))
    d.reconnected(3.6)  # the pull again: PULLING
    assert d.state.phase is Phase.PULLING
    assert d.handle(_at(_recall(2000), 4.0)) == []
    assert d.state.counters["coordinator_restarts"] == 1  # (noted: a later deferral waits for the next one)
    assert d.state.phase is Phase.PULLING


def test_an_older_stamp_changes_nothing_and_is_counted() -> None:
    d, _pull = deferred_device(restart_spread_s=0.0)
    d.handle(_at(_recall(2000), 3.5))
    assert d.handle(_at(_recall(1000), 4.0)) == []  # a replayed recall of an earlier start
    assert d.state.counters["ignored:old_start"] == 1 and d.state.phase is Phase.DEFERRED
    (again,) = _pulls(d.handle(_at(_recall(3000), 5.0)))  # the newest seen is still 2000
    assert again.seq == _pull.seq


@pytest.mark.parametrize("signer, error", [(None, UnsignedMessage), (Signer.generate(), BadSignature)])
def test_an_unsigned_or_forged_announcement_changes_nothing(signer: Signer | None, error: type[RemoteProtocolError]) -> None:
    """Refused as any recall is (typed, counted), and its stamp is not taken: a forged huge stamp
    would otherwise hide every genuine restart after it."""
    d, pull = deferred_device(restart_spread_s=0.0)
    d.handle(_at(_recall(1000), 3.5))
    (note,) = d.handle(_at(_recall(2**62, signer=signer), 4.0))
    assert isinstance(note, Notify) and note.kind == "message_rejected" and note.data["reason"] == error.reason
    assert d.state.counters[f"rejected:{error.reason}"] == 1
    assert d.state.phase is Phase.DEFERRED and d.state.coordinator_started == 1000
    (again,) = _pulls(d.handle(_at(_recall(2000), 5.0)))
    assert again.seq == pull.seq


def test_the_first_stamp_after_a_region_switch_is_noted_only() -> None:
    """A stamp belongs to one region's coordinator: another region's is not compared with it."""
    cfg = DeviceConfig(device_id="d1", region="r1", spec=SPEC, min_samples=2, fallback_regions=("r2",),
                       trusted_keys={SIGNER.kid: SIGNER.public_raw}, restart_spread_s=0.0)
    d = DeviceCore(cfg, rng=random.Random(0))
    d.start(0.0)
    d.handle(_at(_recall(5000), 0.5))
    assert d.state.coordinator_started == 5000
    d._switch(1.0, "r2", "timeouts")
    assert d.state.coordinator_started is None and d.handle(_at(_recall(10, region="r2"), 2.0)) == []
    assert d.state.coordinator_started == 10


def test_the_device_config_refuses_a_bad_spread() -> None:
    from edge_sdk.errors import ConfigError

    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="restart_spread_s"):
            DeviceConfig(device_id="d1", region="r1", spec=SPEC, restart_spread_s=bad)


def test_under_trust_on_first_use_the_stamp_before_the_pin_is_noted() -> None:
    """A device without provisioned keys ignores the retained recall that reaches it before its first
    model (nothing to verify it with); its stamp is noted, or the next start's would be the first seen."""
    d = DeviceCore(DeviceConfig(device_id="d1", region="r1", spec=SPEC, min_samples=2, restart_spread_s=0.0), rng=random.Random(0))
    d.start(0.0)
    assert d.handle(_at(_recall(1000), 0.5)) == []
    assert d.state.counters["ignored:recall_before_pin"] == 1 and d.state.coordinator_started == 1000


# ------------------------------------------------------------------ the coordinator core


def _announcing(**kw: Any) -> Any:
    from coordinator.core import CoordinatorConfig, CoordinatorCore
    from coordinator.strategies import make_strategy
    from tests.helpers import toy_snapshot

    cfg = CoordinatorConfig(region="r1", coordinator_id="c1", spec=SPEC, signer=SIGNER, announce_start=True, **kw)
    return CoordinatorCore(cfg, make_strategy("fedavg", select=2, min_devices=3), toy_snapshot(), rng=random.Random(0))


def _recalls(actions: list[Any]) -> list[Recall]:
    return [decode(a.payload) for a in actions if isinstance(a, Publish) and a.topic == topics.recall_topic("r1")]


def test_every_start_of_an_announcing_core_stamps_the_retained_recall() -> None:
    first = _announcing()
    (r1,) = _recalls(first.start(1000.25))
    assert r1.started == 1_000_250 and (r1.abandoned, r1.epoch) == ((), 0)
    (again,) = _recalls(first.reannounce(1005.0))  # a broker reconnect: the same stamp (no news to a device)
    assert again == r1
    (r2,) = _recalls(_announcing().start(2000.0))  # the next process
    assert r2.started == 2_000_000


def test_a_restart_announcement_brings_the_deferred_devices_back_into_the_round() -> None:
    """Sans-IO, end to end: three devices deferred by one core; a core restarted on the same
    snapshot has none waiting; each device hears the new stamp and pulls again; the round is drawn."""
    from tests.helpers import toy_snapshot

    old = _announcing()
    (recall0,) = [a for a in old.start(0.0) if isinstance(a, Publish) and a.topic == topics.recall_topic("r1")]
    devices = []
    for name in ("d1", "d2"):
        cfg = DeviceConfig(device_id=name, region="r1", spec=SPEC, min_samples=1, trusted_keys={SIGNER.kid: SIGNER.public_raw},
                           serve_on_start=False, restart_spread_s=0.0)
        d = DeviceCore(cfg, rng=random.Random(0))
        d.start(0.0)
        d.handle(MessageReceived(now=0.1, topic=recall0.topic, payload=recall0.payload))
        (pull,) = [a for a in d.handle(SampleAdded(now=1.0, total=1)) if isinstance(a, Publish)]
        acks = [a for a in old.handle(MessageReceived(now=1.0, topic=pull.topic, payload=pull.payload)) if isinstance(a, Publish)]
        for a in acks:
            d.handle(MessageReceived(now=1.1, topic=a.topic, payload=a.payload))
        assert d.state.phase is Phase.DEFERRED
        devices.append(d)
    new = _announcing()
    assert toy_snapshot().version == new.version
    (recall1,) = [a for a in new.start(10.0) if isinstance(a, Publish) and a.topic == topics.recall_topic("r1")]
    assert not new.deferred
    for d in devices:
        (again,) = [a for a in d.handle(MessageReceived(now=10.5, topic=recall1.topic, payload=recall1.payload))
                    if isinstance(a, Publish)]
        new.handle(MessageReceived(now=10.5, topic=again.topic, payload=again.payload))
    assert set(new.deferred) == {"d1", "d2"}


# ------------------------------------------------------------------ the wire


def test_the_stamp_round_trips_and_is_left_out_at_its_default() -> None:
    topic = topics.recall_topic("r1")
    scope = topics.signing_scope(topic)
    msg = Recall(model_id="toy", release=3, abandoned=(1, 2), epoch=4, started=1_765_000_000_123)
    assert decode(encode(msg, signer=SIGNER, scope=scope)) == msg
    old = Recall(model_id="toy", release=3, abandoned=(1, 2), epoch=4)
    assert old.started == 0 and b"started" not in encode(old)  # what an old coordinator sends, byte for byte
    assert b"started" in encode(msg)


def test_a_recall_with_the_stamp_is_read_by_a_side_that_does_not_know_it() -> None:
    """The codec ignores header fields it does not know (how an old device reads a new coordinator's
    recall): a recall header with a field from the future decodes to what it says besides."""
    from tests.test_wire import frame

    header = {"type": "recall", "model_id": "toy", "release": 3, "abandoned": [1, 2], "started": 99, "from_the_future": 1}
    assert decode(frame(header)) == Recall(model_id="toy", release=3, abandoned=(1, 2), started=99)
    del header["started"]  # an old coordinator's recall: the stamp at its default, which the device ignores
    assert decode(frame(header)) == Recall(model_id="toy", release=3, abandoned=(1, 2))


def test_the_stamp_is_signed_with_the_rest() -> None:
    """A replayed recall cannot be given a newer stamp: the field is in the signed header."""
    from edge_sdk.signing import verify
    from edge_sdk.wire.codec import decode_frame

    topic = topics.recall_topic("r1")
    payload = encode(Recall(model_id="toy", release=0, abandoned=(), started=3), signer=SIGNER, scope=topics.signing_scope(topic))
    assert payload.count(b"\xa7started\x03") == 1
    forged = decode_frame(payload.replace(b"\xa7started\x03", b"\xa7started\x07"))
    assert isinstance(forged.message, Recall) and forged.message.started == 7 and forged.signature is not None
    assert not verify(forged.signature.public_raw, forged.signature.signature, forged.signature.signed_for(topics.signing_scope(topic)))
    d, _pull = deferred_device(restart_spread_s=0.0)
    d.handle(_at(_recall(3), 3.5))
    (note,) = d.handle(MessageReceived(now=4.0, topic=topic, payload=payload.replace(b"\xa7started\x03", b"\xa7started\x07")))
    assert isinstance(note, Notify) and note.data["reason"] == BadSignature.reason and d.state.phase is Phase.DEFERRED


def test_the_stamp_must_be_a_non_negative_int() -> None:
    from edge_sdk.errors import MalformedMessage

    for bad in (-1, 1.5, True, "7"):
        with pytest.raises(MalformedMessage):
            Recall(model_id="toy", release=0, abandoned=(), started=bad)  # type: ignore[arg-type]


# ------------------------------------------------------------------ a real daemon over mosquitto


def restart_to_round(broker: MosquittoProcess, tmp_path: Path, *, timeout_s: float) -> float:
    """FedAvg, rounds of 2 drawn from 3 waiting devices: a and b are deferred, the daemon restarts on
    its state dir, then c pulls. Seconds from the restarted daemon's start to its first round's
    version (``timeout_s``: give up; the caller's assertion then fails)."""
    task = get_task("digits")
    options = CoordinatorOptions(broker=broker.url, region=REGION, state_dir=tmp_path / "c", strategy="fedavg",
                                 strategy_params={"select": 2, "min_devices": 3})
    daemon = CoordinatorDaemon(options, task=task).start()
    clients = [client(broker.url, name, tmp_path, task, reannounce_s=REANNOUNCE_S).start() for name in ("a", "b", "c")]
    try:
        a, b, c = clients
        for x in (a, b):
            label(x, task)
        wait_until(lambda: a.core.state.phase is Phase.DEFERRED and b.core.state.phase is Phase.DEFERRED, 30,
                   "a and b to be deferred")
        daemon.stop()
        daemon = CoordinatorDaemon(options, task=task).start()
        started = time.monotonic()
        label(c, task)
        wait_until(lambda: daemon.core.version >= 1, timeout_s, "the first round after the restart")
        return time.monotonic() - started
    finally:
        for x in clients:
            x.stop()
        daemon.stop()


@pytest.mark.broker
def test_a_restarted_fedavg_daemon_draws_its_round_within_seconds(mosquitto: MosquittoProcess, tmp_path: Path) -> None:
    """Before: the round came only when a and b re-announced (``reannounce_s`` after their deferral;
    the devices' 600 s by default). Now: a few seconds (the devices' restart spread, 5 s at most)."""
    took = restart_to_round(mosquitto, tmp_path, timeout_s=REANNOUNCE_S / 2)
    assert took < REANNOUNCE_S / 2
