"""Clock audit (helper-153): wrong and jumping clocks — a coordinator host behind its operator's,
a system clock stepped back under a running coordinator, a restart whose clock is behind the
last process's. Each test puts the wrong clock through the real objects."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from coordinator.daemon import CoordinatorDaemon, CoordinatorOptions
from edge_sdk.modelio import save_model
from tests.daemon_rig import Net, Rig
from tests.helpers import wait_until


class _Behind:
    """A coordinator host's clock ``by`` seconds behind this machine's (the operator's)."""

    def __init__(self, by: float) -> None:
        self.by = by

    def now(self) -> float:
        return time.time() - self.by


@pytest.mark.broker
@pytest.mark.parametrize("behind", [200.0, 400.0])
def test_an_operator_command_reaches_a_coordinator_whose_clock_is_behind(
        plain_net: Net, tmp_path: Path, capsys: pytest.CaptureFixture[str], behind: float) -> None:
    """The coordinator's clock 200 s behind the operator's: it accepts commands issued within 300 s
    of its clock, but ``edgeci pin`` judged its status (published 200 s "ago" by the operator's
    clock, more than 3 heartbeats + 10 s) dead and said "is not running" (exit 2) without sending
    anything. Now the CLI waits for the next status, as ``edgeci status`` does: one that arrives is
    live whatever time it carries; the command is sent and done. The window stays the coordinator's:
    400 s behind, the command is sent and refused (``replayed``), and the CLI says which clock to fix."""
    from demos.cli import main

    with Rig(plain_net, tmp_path) as rig:
        save_model(tmp_path / "init.npz", rig.task.spec, rig.task.pretrained(seed=0), {"version": 0})
        rig.daemon = CoordinatorDaemon(CoordinatorOptions(
            broker=plain_net.url, region=plain_net.region, state_dir=tmp_path / "coord", init=tmp_path / "init.npz",
            status_interval_s=1.0, strategy_params={"k": 1, "timeout_s": None}), task=rig.task, clock=_Behind(behind))
        daemon = rig.daemon.start()
        capsys.readouterr()
        rc = main(["pin", "0", "--broker", plain_net.url, "--region", plain_net.region,
                   "--state-dir", str(tmp_path / "coord"), "--wait", "20"])
        out = capsys.readouterr()
        assert f"clock is {behind:.0f} s behind" in out.err, out.err
        if behind > 300.0:
            assert rc == 1 and "the coordinator refused pin: replayed" in out.out, out.out + out.err
            assert "refuses a command issued more than 300 s off its clock" in out.err, out.err
            assert daemon.core.counters["reject:replayed"] == 1 and daemon.core.counters["control:pin"] == 0
            return
        assert rc == 0, out.out + out.err
        assert "pin done" in out.out and "release 1 (pinned, a copy of version 0)" in out.out, out.out + out.err
        wait_until(lambda: daemon.core.status().extra["pinned"] is True, 10, "the pin")
        assert daemon.core.counters["control:pin"] == 1 and daemon.core.status().extra["messages_rejected"] == 0


# ---------------------------------------------------------------------- the core's clocks
# (proposed by helper-153 with these tests; each failed on the tree before the change)


def test_an_operator_command_is_judged_on_the_system_clock_after_it_was_stepped_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """NTP steps the coordinator host's clock back 10 min (it was 10 min fast). The drivers' clock
    never goes back (timers would wait 10 min longer), so it runs 600 s ahead of the system clock
    and of every honest operator's until the process restarts: every command was refused as
    ``replayed`` (issued "600 s" ago, the window is 300 s), for ever. The window is judged on the
    system clock instead; it stays 300 s wide, and a command runs once."""
    from coordinator.core import LoadVersion
    from edge_sdk.core.events import MessageReceived
    from edge_sdk.runtime import WallClock
    from tests.test_gate import control, gated

    wall, mono = [1_790_000_000.0], [50.0]
    monkeypatch.setattr(time, "time", lambda: wall[0])
    monkeypatch.setattr(time, "monotonic", lambda: mono[0])
    clock, c = WallClock(), gated()

    def handled(issued_at: float, nonce: int) -> bool:
        """The daemon's event for a command issued at ``issued_at``: does it run?"""
        ev = control("pin", 0, at=issued_at, nonce=nonce)
        wall = {"wall": clock.wall()} if hasattr(clock, "wall") else {}  # (as the proposed daemon's _wall())
        ev = MessageReceived(now=clock.now(), topic=ev.topic, payload=ev.payload, **wall)
        return any(isinstance(a, LoadVersion) for a in c.handle(ev))

    assert handled(wall[0], 1)
    wall[0] -= 600.0  # stepped back
    for _ in range(2):
        wall[0] += 3600.0
        mono[0] += 3600.0
        assert clock.now() - wall[0] == 600.0  # (the drivers' clock: 10 min ahead, as designed)
    assert handled(wall[0], 2)  # an honest operator, now
    assert not handled(wall[0], 2)  # replayed
    assert not handled(wall[0] + 600.0, 3) and not handled(wall[0] - 301.0, 4)  # the window is still 300 s
    assert c.counters["control:pin"] == 2 and c.counters["reject:replayed"] == 3


def _restarted_spin(restart_at: float, arrived_at: float) -> list[float]:
    """A SPIN core (k = 10, π = 30 s) restarted at ``restart_at`` with one update buffered at
    ``arrived_at`` by the last process: the times its start() asks to be woken at."""
    import random

    import numpy as np

    from coordinator.core import CoordinatorConfig, CoordinatorCore, Snapshot
    from coordinator.strategies import make_strategy
    from coordinator.strategies.base import BufferedUpdate
    from edge_sdk.core.events import ScheduleTimer
    from tests.helpers import SIGNER, SPEC

    buffered = BufferedUpdate(device="d1", seq=1, base_version=3, staleness=0, n_samples=1,
                              weights=np.ones(SPEC.size, np.float32), arrived_at=arrived_at)
    snap = Snapshot(version=3, weights=np.zeros(SPEC.size, np.float32), buffer=(buffered,), last_aggregation_at=arrived_at - 10.0)
    c = CoordinatorCore(CoordinatorConfig(region="r1", coordinator_id="c1", spec=SPEC, signer=SIGNER),
                        make_strategy("spin", k=10, timeout_s=30.0), snap, rng=random.Random(0))
    return [a.at for a in c.start(restart_at) if isinstance(a, ScheduleTimer)]


def test_spin_timeout_after_an_honest_restart_counts_from_the_buffered_update() -> None:
    """(The control for the next test: restarted 5 s after the update arrived, π fires 25 s later.)"""
    t = 1_790_000_000.0
    assert _restarted_spin(t + 5.0, t) == [t + 30.0]


@pytest.mark.parametrize("behind", [600.0, 86_400.0, 1_790_000_000.0 - 10.0])
def test_spin_timeout_after_a_restart_whose_clock_is_behind_fires_within_pi(behind: float) -> None:
    """The coordinator restarts with its clock 10 min, a day or (a box without a battery-backed
    clock, before NTP) 56 years behind the last process's: SPIN's π counted from the buffered
    update's arrival by the old clock, so the buffer below K waited 10 min, a day, 56 years
    longer. Restored times ahead of the restart's clock are taken as now: π fires 30 s on."""
    t = 1_790_000_000.0
    assert _restarted_spin(t - behind, t) == [t - behind + 30.0]


def test_a_canary_round_resumed_by_a_restart_whose_clock_is_behind_ends_within_its_deadline_s(tmp_path: Path) -> None:
    """A recorded round (deadline_s 100, 2 reports of 3) resumed by a restart whose clock is a day
    behind the last process's: its deadline (by the old clock) was a day and 75 s away, and the
    gate held the candidate — no promotion, no new round — for that day. No longer than a new
    round's deadline_s now: 101 s after the restart it has ended (held, on 2 reports)."""
    from coordinator.canary import CanaryConfig
    from coordinator.core import RecordRelease
    from edge_sdk.core.events import TimerFired
    from tests.test_canary import deliver, durable, of, opened_round, restart, serve

    cfg = CanaryConfig(fraction=1.0, samples=4, min_reports=3, deadline_s=100.0, recent_s=1000.0)
    c, registry, fleet, first = opened_round(tmp_path, 3, cfg)
    for name in ("d0", "d1"):
        (pub,) = serve(c, fleet[name], first[name], 6.0)
        durable(registry, deliver(c, pub, 11.0))
    restarted, registry = restart(c, registry, tmp_path)
    now = 30.0 - 86_400.0
    restarted.start(now)
    assert restarted.status().extra["gate"]["canary"]["round"]["deadline"] <= now + 100.0
    (rec,) = of(list(restarted.handle(TimerFired(now=now + 101.0))), RecordRelease)
    assert rec.event["action"] == "hold" and rec.event["canary"]["reports"] == 2


# ---------------------------------------------------------------------- Nebula's rotation clock


@pytest.mark.parametrize("behind", [0.0, 600.0, 86_400.0])
def test_nebula_rotates_within_t_c_after_a_restart_whose_clock_is_behind(behind: float) -> None:
    """Nebula checkpoints its rotation clock (t0, round): last rotation round 4 at t0 + 240 s, the
    next due at t0 + 300 s; the process dies at t0 + 250 s. Restarted with the clock 10 min or a day
    behind, the next rotation waited 650 s / 86450 s (models stopped moving around the ring). Now it
    is due within t_c of the restart; an honest restart (0 behind) is unchanged: due at t0 + 300 s."""
    import random

    import numpy as np

    from coordinator.core import CoordinatorConfig, CoordinatorCore, Snapshot
    from coordinator.peering import make_peering
    from coordinator.strategies import make_strategy
    from edge_sdk.core.events import Publish, ScheduleTimer, TimerFired
    from edge_sdk.signing import Signer
    from tests.helpers import SPEC

    t0, t_c = 1_790_000_000.0, 60.0
    strategy = make_strategy("nebula", planets=2, t_c=t_c)
    peering = make_peering("nebula", coordinator_id="a", ring=["a", "b"], strategy=strategy, params={"t_c": t_c})
    snap = Snapshot(version=3, weights=np.zeros(SPEC.size, np.float32),
                    peer_state={"t0": t0, "round": 5, "versions": [0.0, 0.0], "v_stellar": 0.0})
    c = CoordinatorCore(CoordinatorConfig(region="r-a", coordinator_id="a", spec=SPEC, signer=Signer.generate()), strategy, snap,
                        rng=random.Random(0), peering=peering)
    now = t0 + 250.0 - behind
    (wake,) = [a.at for a in c.start(now) if isinstance(a, ScheduleTimer)]
    assert wake == (t0 + 300.0 if behind == 0.0 else now + t_c)
    sent = [a for a in c.handle(TimerFired(now=wake)) if isinstance(a, Publish) and "/peer/b/" in a.topic]
    assert len(sent) == 1 and c.peering.describe()["round"] == 6
    assert c.peering.describe().get("re_anchored", 0) == (0 if behind == 0.0 else 1)


# ---------------------------------------------------------------------- the start-up check


@pytest.mark.broker
def test_a_start_is_refused_beside_a_live_coordinator_whose_clock_is_behind(plain_net: Net, tmp_path: Path) -> None:
    """Another coordinator (another key) is live on the region, its clock 200 s behind this host's:
    its retained status, 200 s old by this clock (over 3 heartbeats + 10 s), read "gone", and a
    second coordinator started beside it — two coordinators answer the same devices (a split
    fleet). The start-up check now waits a heartbeat for a live status, as ``edgeci status`` does,
    and refuses. A gone one (its status stops) is still no obstacle."""
    import json
    import threading

    from coordinator.cli import check_take_over
    from coordinator.metrics import stamp_status
    from edge_sdk.errors import StartRefused
    from edge_sdk.mqtt import MqttTransport
    from edge_sdk.wire import topics

    topic = topics.status_topic(plain_net.region)
    other = MqttTransport(plain_net.url, client_id="other-coordinator", subscriptions=[], on_message=lambda *_: None, clean_session=True)
    other.start()
    beating, stop = threading.Event(), threading.Event()

    def beat() -> None:  # its heartbeat (1 s), stamped by its clock, 200 s behind
        while not stop.is_set():
            body = json.dumps({"v": 1, "type": "status", "region": plain_net.region, "coordinator": "coord-other",
                               "version": 7, "extra": {"signing_key": "k-other", "epoch": 1}}).encode()
            other.publish(topic, stamp_status(body, alive=True, now=time.time() - 200.0, heartbeat_s=1.0, instance="p1"),
                          qos=1, retain=True)
            beating.set()
            stop.wait(1.0)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    options = CoordinatorOptions(broker=plain_net.url, region=plain_net.region, state_dir=tmp_path / "s")
    try:
        assert beating.wait(10)
        time.sleep(0.5)
        started = time.monotonic()
        with pytest.raises(StartRefused, match="already has a live coordinator 'coord-other'"):
            check_take_over(options, take_over=False)
        assert time.monotonic() - started < 10.0  # a heartbeat (1 s) + 5 s at most
        stop.set()
        thread.join(5)
        check_take_over(options, take_over=False)  # gone: its retained status goes stale, no live one comes
    finally:
        stop.set()
        other.stop()


@pytest.mark.broker
def test_a_running_coordinator_calls_out_a_second_one_whose_clock_is_behind(plain_net: Net, tmp_path: Path) -> None:
    """A running coordinator says at ERROR (and counts) another process publishing live statuses on
    its region; it skipped every status stamped before its own start (a retained one from before),
    so one from a coordinator whose clock is 200 s behind went unnoticed for the first 200 s of its
    run (a day behind: a day). A process seen publishing twice, each status newer than the last, is
    live whatever its clock says; a retained status alone still is not."""
    import json

    from coordinator.metrics import stamp_status
    from edge_sdk.mqtt import MqttTransport
    from edge_sdk.wire import topics

    topic = topics.status_topic(plain_net.region)
    other = MqttTransport(plain_net.url, client_id="other-coordinator", subscriptions=[], on_message=lambda *_: None, clean_session=True)
    other.start()

    def beat(stamp: float) -> None:
        body = json.dumps({"v": 1, "type": "status", "region": plain_net.region, "coordinator": "coord-other", "version": 7}).encode()
        other.publish(topic, stamp_status(body, alive=True, now=stamp, heartbeat_s=1.0, instance="p-other"), qos=1, retain=True)

    try:
        with Rig(plain_net, tmp_path) as rig:
            beat(time.time() - 400.0)  # retained from before this coordinator started
            daemon = rig.make_daemon(init=True, canary_round=False, status_interval_s=1.0).start()
            time.sleep(1.0)
            assert daemon.duplicate_coordinators == 0  # a retained status alone: not a live coordinator
            for _ in range(3):  # then it beats, its clock 200 s behind
                beat(time.time() - 200.0)
                time.sleep(0.3)
            wait_until(lambda: daemon.duplicate_coordinators == 1, 10, "the second coordinator called out")
    finally:
        other.stop()


# ---------------------------------------------------------------------- certificates


@pytest.mark.parametrize(("offset_s", "valid"), [(0.0, True), (-3600.0, True), (-14 * 3600.0, True), (3600.0, True),
                                                 (-2 * 86_400.0, False)])
def test_a_fresh_broker_certificate_verifies_on_a_device_whose_clock_is_hours_behind(tmp_path: Path, offset_s: float, valid: bool) -> None:
    """A broker certificate (and its CA) made a moment ago, verified as a device's TLS does, at the
    device's time: valid from 5 min before issue, it was "not yet valid" to a device more than 5 min
    behind the CA host (an hour apart in one fleet, local time taken for UTC) until it aged past the
    skew. Valid from a day before now; two days behind is still refused (a clock at 1970 needs NTP)."""
    import datetime as dt

    from cryptography import x509
    from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

    from coordinator.pki import Pki

    pki = Pki.init(tmp_path / "pki")
    bundle = pki.issue("broker", "broker", hosts=["localhost"])
    ca = x509.load_pem_x509_certificate((tmp_path / "pki" / "ca.crt").read_bytes())
    leaf = x509.load_pem_x509_certificate((bundle / "broker.crt").read_bytes())
    at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=offset_s)
    verifier = PolicyBuilder().store(Store([ca])).time(at).build_server_verifier(x509.DNSName("localhost"))
    if valid:
        verifier.verify(leaf, [])
    else:
        with pytest.raises(VerificationError, match="not valid at validation time"):
            verifier.verify(leaf, [])
    crl = x509.load_pem_x509_crl(pki.write_crl().read_bytes())
    assert crl.last_update_utc <= dt.datetime.now(dt.UTC) - dt.timedelta(hours=23)  # (mosquitto checks it on the broker's clock)


# ---------------------------------------------------------------------- a device's training hold


@pytest.mark.parametrize("behind", [0.0, 3600.0, 86_400.0, 1_790_000_000.0 - 10.0])
def test_a_device_restarted_with_its_clock_behind_holds_training_no_longer_than_its_back_off(behind: float) -> None:
    """A training job killed the device process; the restarted one holds training for the first
    crash's back-off (``request_timeout_s``, 5 s here) and records the hold's end. Restarted again
    within it, with its clock an hour or a day behind (a headset without a battery-backed clock
    boots in 1970 until NTP), it held training for the hour, or a day (the longest hold): the
    hold's end by the old clock, cut only at a day. Now no longer than that crash's back-off."""
    from edge_sdk.core.events import MarkTraining
    from tests.test_training_crash import TIMEOUT_S, restarted

    t = 1_790_000_000.0
    c = restarted(MarkTraining(in_flight=False, crashes=1, hold_until=t + TIMEOUT_S))
    now = t + 2.0 - behind
    c.start(now)
    assert c.state.hold_until - now == (TIMEOUT_S - 2.0 if behind == 0.0 else TIMEOUT_S)


def test_a_command_forgotten_before_the_clock_was_stepped_back_does_not_run_again() -> None:
    """Judging the window on the system clock lets a step back bring a command the core has already
    forgotten (its window closed) within its window again: captured on the broker and replayed then,
    it ran twice. Each operator's floor (the newest issued_at forgotten) refuses it; an honest command
    issued after the step runs."""
    from coordinator.core import LoadVersion
    from edge_sdk.core.events import MessageReceived
    from tests.test_gate import control, gated

    c, t = gated(), 1_790_000_000.0

    def handled(issued_at: float, nonce: int, wall: float) -> bool:
        ev = control("pin", 0, at=issued_at, nonce=nonce)
        return any(isinstance(a, LoadVersion) for a in c.handle(MessageReceived(now=wall, topic=ev.topic, payload=ev.payload, wall=wall)))

    assert handled(t, 1, t)  # run at t
    assert handled(t + 400.0, 2, t + 400.0)  # 400 s on: command 1's window has closed, it is forgotten
    assert not handled(t, 1, t + 50.0)  # the clock stepped back 350 s: command 1 is within its window again
    assert c.counters["reject:replayed"] == 1 and c.counters["control:pin"] == 2
    assert handled(t + 60.0, 3, t + 60.0)  # an operator after the step (a newer issued_at than anything forgotten)
