"""Idle devices hear of each new release instead of an hour later.

A device whose user labels nothing never pulls to train, so it learned of releases only from its
hourly ``refresh_s``. The coordinator daemon now publishes the region's signed, retained recall
again whenever its release changes (``CoordinatorConfig.announce_releases``; the recall always
carried the release); a device with ``release_spread_s`` (EdgeClient's default 300 s) that is
idle and serves an older release fetches the new one with a serving pull at a random time within
the spread, and at most once per spread (a release every 30 s costs an idle device one fetch per
spread, of the newest). A busy device fetches it when next idle.

Here: the device-core rules; the coordinator core (a recall per release change, none without the
flag, none for a candidate the gate has not passed); and a real daemon, mosquitto and two SDK
devices, where the idle one deploys the release within seconds and, with the push off, does not.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.broker import MosquittoProcess
from coordinator.core import CandidateEvaluated, CoordinatorConfig, CoordinatorCore
from coordinator.gate import GateConfig
from coordinator.strategies import make_strategy
from edge_sdk.client import EdgeClient
from edge_sdk.core.device import DeviceConfig, DeviceCore, Phase
from edge_sdk.core.events import (
    DeployModel,
    MessageReceived,
    Publish,
    SampleAdded,
    ScheduleTimer,
    TimerFired,
)
from edge_sdk.errors import ConfigError
from edge_sdk.signing import Signer
from edge_sdk.tasks import get_task
from edge_sdk.tasks.base import TrainConfig
from edge_sdk.wire import topics
from edge_sdk.wire.codec import decode, encode
from edge_sdk.wire.messages import ModelMsg, Pull, Recall, Update
from tests.helpers import SIGNER, SPEC, toy_snapshot, wait_until

DEV = "d1"
TRUST = {SIGNER.kid: SIGNER.public_raw}


def idle_device(spread: float | None = 60.0, *, refresh_s: float | None = None, seed: int = 0) -> DeviceCore:
    """A device that has deployed release 1 and labels nothing."""
    d = DeviceCore(DeviceConfig(device_id=DEV, region="r1", spec=SPEC, min_samples=3, trusted_keys=TRUST,
                                release_spread_s=spread, refresh_s=refresh_s), rng=random.Random(seed))
    (serve,) = pulls(d.start(0.0))
    assert serve.serve
    d.handle(model(1.0, 1, reply_to=serve.seq))
    assert d.state.deployed_version == 1 and d.state.phase is Phase.IDLE
    return d


def model(now: float, version: int, *, reply_to: int = -1) -> MessageReceived:
    topic = topics.device_topic("r1", DEV, "model")
    msg = ModelMsg(model_id=SPEC.model_id, version=version, reply_to=reply_to, weights=np.full(SPEC.size, float(version), np.float32),
                   release=version)
    return MessageReceived(now=now, topic=topic, payload=encode(msg, signer=SIGNER, scope=topics.signing_scope(topic)))


def recall(now: float, release: int, *, signer: Signer | None = SIGNER, spread_s: int = 0) -> MessageReceived:
    topic = topics.recall_topic("r1")
    msg = Recall(model_id=SPEC.model_id, release=release, abandoned=(), epoch=0, spread_s=spread_s)
    return MessageReceived(now=now, topic=topic, payload=encode(msg, signer=signer, scope=topics.signing_scope(topic)))


def pulls(actions: list[Any]) -> list[Pull]:
    return [m for m in (decode(a.payload) for a in actions if isinstance(a, Publish)) if isinstance(m, Pull)]


def timers(actions: list[Any]) -> list[float]:
    return [a.at for a in actions if isinstance(a, ScheduleTimer)]


# ------------------------------------------------------------------ the device core


def test_an_idle_device_fetches_an_announced_release_within_the_spread() -> None:
    d = idle_device(60.0)
    acts = d.handle(recall(10.0, 3))
    assert pulls(acts) == []  # not at once: 100,000 idle devices hear it together
    [at] = timers(acts)
    assert 10.0 <= at <= 70.0 and d.state.counters["releases_heard"] == 1
    assert d.handle(TimerFired(now=at - 0.5)) == [ScheduleTimer(at=at)]  # early: set again
    [fetch] = pulls(d.handle(TimerFired(now=at)))
    assert fetch.serve and fetch.have_version == 1
    assert d.state.counters["release_pulls"] == 1 and "refresh_pulls" not in d.state.counters
    acts = d.handle(model(at + 0.2, 3, reply_to=fetch.seq))
    assert [a.version for a in acts if isinstance(a, DeployModel)] == [3] and d.state.phase is Phase.IDLE
    assert timers(acts) == []  # no refresh_s: nothing until the next release is heard


def test_releases_heard_faster_than_the_spread_cost_one_fetch_per_spread_each_of_the_newest() -> None:
    d = idle_device(60.0)
    [at] = timers(d.handle(recall(10.0, 2)))
    assert timers(d.handle(recall(11.0, 3))) == [] and d.state.refresh_at == at  # the fetch drawn first stands
    [fetch] = pulls(d.handle(TimerFired(now=at)))
    d.handle(model(at + 0.1, 3, reply_to=fetch.seq))  # the newest release at fetch time
    [nxt] = timers(d.handle(recall(at + 1.0, 4)))
    assert at + 60.0 <= nxt <= at + 61.0  # at least a spread after the last fetch
    assert d.state.deployed_version == 3


def test_a_release_not_newer_than_the_one_served_or_an_untrusted_recall_changes_nothing() -> None:
    d = idle_device(60.0)
    assert d.handle(recall(5.0, 1)) == [] and d.handle(recall(5.0, 0)) == []
    assert d.state.refresh_at is None and "releases_heard" not in d.state.counters
    for signer in (None, Signer.generate()):
        acts = d.handle(recall(6.0, 9, signer=signer))
        assert timers(acts) == [] and pulls(acts) == [] and d.state.refresh_at is None
    assert d.state.counters["rejected:unsigned"] == 1 and d.state.counters["rejected:bad_signature"] == 1


def test_a_busy_device_fetches_the_release_when_next_idle() -> None:
    d = DeviceCore(DeviceConfig(device_id=DEV, region="r1", spec=SPEC, min_samples=1, trusted_keys=TRUST, release_spread_s=60.0,
                                serve_on_start=False), rng=random.Random(0))
    d.start(0.0)
    [pull] = pulls(d.handle(SampleAdded(now=1.0, total=1)))
    assert d.state.phase is Phase.PULLING
    assert d.handle(recall(1.5, 0)) == [] and d.state.release_wanted == 0  # heard while busy: wanted, no timer
    acts = d.handle(model(2.0, 4, reply_to=pull.seq))
    assert d.state.phase is Phase.TRAINING and d.state.deployed_version == 4  # its training model is release 4
    acts = d.handle(recall(2.5, 5))
    assert timers(acts) == [] and d.state.release_wanted == 5


def test_with_refresh_s_too_a_heard_release_brings_the_refresh_forward_and_it_is_drawn_anew_after() -> None:
    d = idle_device(30.0, refresh_s=3600.0)
    far = d.state.refresh_at
    assert far is not None and far > 3000.0
    [at] = timers(d.handle(recall(100.0, 2)))
    assert 100.0 <= at <= 130.0 and d.state.refresh_at == at
    [fetch] = pulls(d.handle(TimerFired(now=at)))
    [again] = timers(d.handle(model(at + 0.1, 2, reply_to=fetch.seq)))
    assert at + 3000.0 < again  # the hourly refresh again, from the fetch
    assert d.state.counters["release_pulls"] == 1 and "refresh_pulls" not in d.state.counters


def test_a_fleet_hearing_one_release_fetches_it_spread_over_the_window() -> None:
    times = []
    for seed in range(400):
        d = idle_device(300.0, seed=seed)
        [at] = timers(d.handle(recall(50.0, 2)))
        times.append(at - 50.0)
    assert min(times) >= 0.0 and max(times) <= 300.0
    counts, _ = np.histogram(times, bins=5, range=(0.0, 300.0))
    assert counts.min() >= 50, counts  # about 80 per minute, none in one burst


def test_off_by_default_in_the_core_and_checked() -> None:
    d = idle_device(None)
    assert d.handle(recall(5.0, 7)) == [] and d.state.refresh_at is None and "releases_heard" not in d.state.counters
    assert d.state.release_wanted < 7
    assert DeviceConfig(device_id=DEV, region="r1", spec=SPEC, release_spread_s=0).release_spread_s == 0.0
    for bad in (-1.0, float("nan"), float("inf"), True, "60"):
        with pytest.raises(ConfigError, match="release_spread_s"):
            DeviceConfig(device_id=DEV, region="r1", spec=SPEC, release_spread_s=bad)  # type: ignore[arg-type]


def test_a_spread_of_zero_fetches_at_once() -> None:
    d = idle_device(0.0)
    acts = d.handle(recall(5.0, 2))
    assert timers(acts) == [5.0]
    [fetch] = pulls(d.handle(TimerFired(now=5.0)))
    assert fetch.serve


@pytest.mark.parametrize(("flags", "expected"), [((), 300.0), (("--release-spread", "off"), None), (("--release-spread", "0"), 0.0),
                                                 (("--release-spread", "12.5"), 12.5)])
def test_edgeci_device_passes_its_release_spread_to_the_client(flags: tuple[str, ...], expected: float | None, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import devices.headless
    from demos.cli import main

    seen: dict[str, Any] = {}

    class Built(Exception):
        pass

    def client(**kw: Any) -> None:
        seen.update(kw)
        raise Built

    monkeypatch.setenv("EDGECI_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(devices.headless, "EdgeClient", client)
    monkeypatch.setattr(devices.headless, "auth_from_args", lambda args: None)
    with pytest.raises(Built):
        main(["device", "--device-id", "d1", "--broker", "mqtt://127.0.0.1:1", "--data-dir", str(tmp_path / "data"), *flags])
    assert seen["release_spread_s"] == expected and seen["refresh_s"] == 3600.0


def test_the_coordinator_s_spread_widens_the_device_s_own_never_narrows_it() -> None:
    """``Recall.spread_s`` (the coordinator's ``--release-spread``, sized to its fleet and model): a device
    spreads over the larger of it and its own, and waits that long between such fetches."""
    times = []
    for seed in range(200):
        d = idle_device(60.0, seed=seed)
        [at] = timers(d.handle(recall(10.0, 2, spread_s=3600)))
        times.append(at - 10.0)
    assert min(times) >= 0.0 and max(times) <= 3600.0 and sum(t > 60.0 for t in times) > 150
    d = idle_device(600.0, seed=1)
    [at] = timers(d.handle(recall(10.0, 2, spread_s=30)))  # the device's own 600 s is the larger
    [fetch] = pulls(d.handle(TimerFired(now=at)))
    d.handle(model(at + 0.1, 2, reply_to=fetch.seq))
    [nxt] = timers(d.handle(recall(at + 1.0, 3, spread_s=30)))
    assert nxt >= at + 600.0


def test_the_spread_on_the_wire_round_trips_is_absent_at_0_and_bounded() -> None:
    from edge_sdk.errors import MalformedMessage
    from edge_sdk.wire.messages import MAX_RELEASE_SPREAD_S

    topic = topics.recall_topic("r1")
    scope = topics.signing_scope(topic)
    plain = Recall(model_id=SPEC.model_id, release=3, abandoned=(), epoch=5)
    assert b"spread_s" not in encode(plain, signer=SIGNER, scope=scope)  # an older side's bytes are unchanged
    spread = Recall(model_id=SPEC.model_id, release=3, abandoned=(), epoch=5, spread_s=900)
    assert decode(encode(spread, signer=SIGNER, scope=scope)) == spread
    for bad in (-1, MAX_RELEASE_SPREAD_S + 1, 1.5, True):
        with pytest.raises(MalformedMessage, match="spread_s"):
            Recall(model_id=SPEC.model_id, release=3, abandoned=(), epoch=5, spread_s=bad)  # type: ignore[arg-type]


def test_edgeci_coordinator_release_spread_reaches_the_recall(tmp_path: Path) -> None:
    from coordinator import cli as coordinator_cli
    from tests.test_cli_words import coordinator_args

    args = coordinator_args("--release-spread", "3600")
    assert coordinator_cli.options_from(args, args._layered).release_spread_s == 3600
    args = coordinator_args()
    assert coordinator_cli.options_from(args, args._layered).release_spread_s == 0
    for bad in ("-1", "604801", "1.5"):
        with pytest.raises(SystemExit):
            coordinator_args("--release-spread", bad)
    c = coordinator(release_spread_s=900)
    (r,) = recalls(c.start(0.0))
    assert r.spread_s == 900
    (r,) = recalls(c.handle(update("d0", 0, 1.0)))
    assert (r.release, r.spread_s) == (1, 900)
    for bad in (-1, 604_801, 2.5):
        with pytest.raises(ConfigError, match="release_spread_s"):
            coordinator(release_spread_s=bad)  # type: ignore[arg-type]


# ------------------------------------------------------------------ the coordinator core


def coordinator(*, announce: bool = True, gate: GateConfig | None = None, release_spread_s: int = 0,
                release_announce_s: float = 0.0) -> CoordinatorCore:
    cfg = CoordinatorConfig(region="r1", coordinator_id="c1", spec=SPEC, signer=SIGNER, announce_start=True,
                            announce_releases=announce, gate=gate, release_spread_s=release_spread_s,
                            release_announce_s=release_announce_s)
    return CoordinatorCore(cfg, make_strategy("spin", k=1, timeout_s=None, clip_multiplier=0.0), toy_snapshot(), rng=random.Random(0))


def update(device: str, seq: int, now: float, base: int = 0) -> MessageReceived:
    msg = Update(device=device, seq=seq, model_id=SPEC.model_id, base_version=base, n_samples=1,
                 weights=np.full(SPEC.size, 1.0 + seq, np.float32))
    return MessageReceived(now=now, topic=topics.device_topic("r1", device, "update"), payload=encode(msg))


def recalls(actions: list[Any]) -> list[Recall]:
    return [decode(a.payload) for a in actions if isinstance(a, Publish) and a.topic == topics.recall_topic("r1")]


def test_an_announcing_coordinator_republishes_the_retained_recall_with_each_new_release() -> None:
    c = coordinator()
    (first,) = recalls(c.start(0.0))
    assert first.release == 0
    for seq in range(3):
        acts = c.handle(update(f"d{seq}", 0, 1.0 + seq, base=seq))
        (r,) = recalls(acts)
        assert r.release == c.release[0] == seq + 1 and r.started == first.started
        pub = next(a for a in acts if isinstance(a, Publish) and a.topic == topics.recall_topic("r1"))
        assert pub.retain
    assert recalls(c.handle(TimerFired(now=10.0))) == []  # nothing new: nothing sent


def test_releases_are_announced_at_most_once_per_interval_each_time_the_newest() -> None:
    """A busy region makes a version a second; its devices hear of the release at most every
    ``release_announce_s`` (30 s by default), and the one they hear of is the newest: the core wakes
    itself for a release made after the last announcement, with no other event to carry it."""
    c = coordinator(release_announce_s=30.0)
    (first,) = recalls(c.start(0.0))
    assert first.release == 0
    assert CoordinatorConfig(region="r1", coordinator_id="c1", spec=SPEC).release_announce_s == 30.0
    sent: list[tuple[float, int]] = []
    wakes: list[float] = []
    for seq in range(5):
        acts = c.handle(update(f"d{seq}", 0, 40.0 + seq, base=seq))
        sent += [(40.0 + seq, r.release) for r in recalls(acts)]
        wakes += timers(acts)
    assert c.release[0] == 5 and sent == [(40.0, 1)]  # the first at once (30 s since the start's), then none
    acts = c.handle(TimerFired(now=wakes[-1]))  # (the status's timer, 0.25 s on)
    assert recalls(acts) == [] and timers(acts) == [70.0]  # then the core's timer is for the next announcement
    (late,) = recalls(c.handle(TimerFired(now=70.0)))
    assert late.release == 5
    assert recalls(c.handle(TimerFired(now=100.0))) == []  # nothing new: nothing sent
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="release_announce_s"):
            coordinator(release_announce_s=bad)


def test_without_the_flag_no_recall_per_release() -> None:
    c = coordinator(announce=False)
    assert len(recalls(c.start(0.0))) == 1
    acts = c.handle(update("d0", 0, 1.0))
    assert c.release[0] == 1 and recalls(acts) == []


def test_behind_the_gate_a_recall_comes_with_the_promotion_not_the_candidate() -> None:
    c = coordinator(gate=GateConfig(margin=0.02))
    c.start(0.0)
    acts = c.handle(update("d0", 0, 1.0))
    assert c.version == 1 and c.release[0] == 0 and recalls(acts) == []  # a candidate, not released
    acts = c.handle(CandidateEvaluated(now=2.0, version=1, candidate_metric=0.9, release_metric=0.8, release_version=0))
    (r,) = recalls(acts)
    assert r.release == 1


def test_core_to_core_an_idle_device_ends_on_the_new_release() -> None:
    """Sans-IO, end to end: the coordinator's recall reaches an idle device, whose timed serving
    pull the coordinator answers with the release."""
    c = coordinator()
    d = DeviceCore(DeviceConfig(device_id="idle", region="r1", spec=SPEC, min_samples=10**6, trusted_keys=TRUST,
                                release_spread_s=20.0), rng=random.Random(3))

    def deliver(actions: list[Any], to: Any, now: float) -> list[Any]:
        out: list[Any] = []
        for a in actions:
            if isinstance(a, Publish) and (a.topic == topics.recall_topic("r1") or "/idle/" in a.topic):
                out += to.handle(MessageReceived(now=now, topic=a.topic, payload=a.payload))
        return out

    c_start = c.start(0.0)
    d_acts = d.start(0.0)
    for a in d_acts:
        if isinstance(a, Publish):
            deliver(deliver(c.handle(MessageReceived(now=0.1, topic=a.topic, payload=a.payload)), d, 0.2), c, 0.2)
    deliver(c_start, d, 0.3)
    assert d.state.deployed_version == 0
    heard = deliver(c.handle(update("busy", 0, 5.0)), d, 5.1)
    [at] = timers(heard)
    assert 5.1 <= at <= 25.1
    for a in d.handle(TimerFired(now=at)):
        if isinstance(a, Publish):
            deliver(c.handle(MessageReceived(now=at, topic=a.topic, payload=a.payload)), d, at + 0.1)
    assert d.state.deployed_version == 1
    np.testing.assert_array_equal(d.state.deployed, c.release[1])


# ------------------------------------------------------------------ a real daemon and mosquitto


@pytest.mark.broker
@pytest.mark.parametrize("spread", [1.0, None], ids=["pushed", "off"])
def test_over_mosquitto_an_idle_device_deploys_each_release_within_the_spread(tmp_path: Path, spread: float | None) -> None:
    """A real daemon, mosquitto and two SDK devices, neither refreshing (``refresh_s=None``): the busy
    one's update is released; the idle one (its own spread 1 s, the coordinator's 2 s) deploys it within seconds. With the
    push off it stays on release 0 (what every idle device did for up to an hour before)."""
    from coordinator.daemon import CoordinatorDaemon, CoordinatorOptions

    task = get_task("digits")
    pool = task.data().pool
    broker = MosquittoProcess().start()
    try:
        daemon = CoordinatorDaemon(
            CoordinatorOptions(require_pull=False, broker=broker.url, region="r1", state_dir=tmp_path / "c",
                               strategy_params={"k": 1, "timeout_s": 5.0}, release_spread_s=2, release_announce_s=1.0),
            task=task,
        ).start()
        try:
            common: dict[str, Any] = {"broker": broker.url, "region": "r1", "task": task, "train": TrainConfig(epochs=1),
                                      "request_timeout_s": 1.0, "inference": "torch", "refresh_s": None}
            idle = EdgeClient(device_id="idle", data_dir=tmp_path / "idle", min_samples=10**6, release_spread_s=spread, **common).start()
            busy = EdgeClient(device_id="busy", data_dir=tmp_path / "busy", min_samples=2, release_spread_s=None, **common).start()
            try:
                assert daemon.core.config.release_spread_s == 2  # --release-spread: sent with each recall (the larger spread)
                assert idle.wait_for_version(0, timeout=60)
                for i in range(2):
                    busy.add_sample(pool.x[i], int(pool.y[i]))
                wait_until(lambda: daemon.core.release[0] >= 1, 60, "version 1 released")
                if spread is None:
                    # Long enough for a pushed fetch several times over (spread 1 s, pulls paced by the bucket).
                    busy.stop()
                    served = daemon.core.counters["pulls_serving"]
                    time.sleep(6.0)
                    assert idle.version == 0 and daemon.core.counters["pulls_serving"] == served
                else:
                    wait_until(lambda: (idle.version or 0) >= 1, 30, "the idle device to fetch the announced release")
                    np.testing.assert_array_equal(idle.weights, daemon.core.release[1])
            finally:
                busy.stop()
                idle.stop()
        finally:
            daemon.stop()
    finally:
        broker.stop()
