"""Review of the selection round record (5c40259): what a restart must not let in.

A commit of a selecting strategy carries the core's side of the round (``_round_block``): the
devices it may take an update from, with their accepted seq, and the invitations still unanswered.
A device holding its invitation at the commit had not pulled it (``_on_pull`` deletes an
invitation once served): on a live core its update is refused ``not_selected`` until it pulls. A
restart from that commit put every such device into ``_training``, so a device drawn for a round
that closed without it (and, since invitations are kept until pulled, one drawn any number of
rounds ago) had its unpulled update accepted into the next round."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.broker import MosquittoProcess
from coordinator.core import (
    CommitVersion,
    CoordinatorCore,
    PersistUpdate,
    RecordSelectionRound,
    Snapshot,
)
from coordinator.registry import ROUND_FILE
from coordinator.strategies.fedavg import FedAvgStrategy
from coordinator.strategies.fedbuff import FedBuffStrategy
from edge_sdk import mqtt
from edge_sdk.core.events import TimerFired
from edge_sdk.wire.messages import Invite, ModelMsg, Pull
from tests.daemon_rig import Net, Rig, enospc
from tests.helpers import SPEC, make_coordinator, wait_until
from tests.test_selection_round import _drawn, _pull, _sent, _update

TIMED: dict[str, Any] = {"select": 2, "min_devices": 3, "round_timeout_s": 5.0}


def test_an_invitee_that_never_pulled_is_refused_unpulled_after_a_restart_as_before_it() -> None:
    """FedAvg, rounds of 2: one invitee pulls and reports, the other never pulls; the round times out
    and commits version 1. The other's update without a pull: refused by the live core, and by a core
    restarted from version 1 (its metadata's round block, with the record of the round at version 0)."""
    c, actions, record = _drawn(**TIMED)
    reporter, absent = sorted(_sent(actions, "invite"), key=lambda m: m.device)
    assert _sent(c.handle(_pull(reporter.device, 2, 3.5, invite_round=reporter.round)), "model")
    c.handle(_update(reporter.device, 3, 4.0, 1.0))
    (commit,) = [a for a in c.handle(TimerFired(now=9.0)) if isinstance(a, CommitVersion)]
    assert c.version == 1 and [d for d, _r in commit.metadata["round"]["invites"]] == [absent.device]

    snap = Snapshot(version=c.version, weights=c.weights.copy(), applied_upto=c.applied_upto, buffer=[],
                    devices_seen=c.devices_seen, selection_round=record,
                    round_devices=json.loads(json.dumps(commit.metadata["round"])), epoch=0)
    restarted = make_coordinator("fedavg", snapshot=snap, **TIMED)
    restarted.start(10.0)

    live = _sent(c.handle(_update(absent.device, 3, 11.0, 9.0)), "ack")
    assert [(m.status, m.reason) for m in live] == [("rejected", "not_selected")]
    after = _sent(restarted.handle(_update(absent.device, 3, 11.0, 9.0)), "ack")
    assert [(m.status, m.reason) for m in after] == [("rejected", "not_selected")]
    # Its invitation still holds: pulled, it is served and its update taken, as on the live core.
    assert _sent(restarted.handle(_pull(absent.device, 4, 12.0, invite_round=absent.round)), "model")
    assert [m.status for m in _sent(restarted.handle(_update(absent.device, 5, 13.0, 9.0)), "ack")] == ["accepted"]


def test_the_rounds_invitee_that_pulled_after_the_record_is_still_taken() -> None:
    """The case the record is for (kept by the fix): invited by the record's draw, pulled after it, the
    daemon restarts before its update; the restarted core takes it (the served set went with the process)."""
    c, actions, record = _drawn()
    first, second = sorted(_sent(actions, "invite"), key=lambda m: m.device)
    for m in (first, second):
        assert _sent(c.handle(_pull(m.device, 2, 3.5, invite_round=m.round)), "model")
    snap = Snapshot(version=c.version, weights=c.weights.copy(), applied_upto=c.applied_upto, buffer=[],
                    devices_seen=c.devices_seen, selection_round=record, epoch=0)
    restarted = make_coordinator("fedavg", snapshot=snap, select=2, min_devices=3)
    restarted.start(10.0)
    for m in (first, second):
        assert [a.status for a in _sent(restarted.handle(_update(m.device, 3, 11.0, 1.0)), "ack")] == ["accepted"]
    assert restarted.version == 1


@pytest.mark.broker
def test_a_failing_round_record_lets_no_invitation_out_and_the_round_is_drawn_once_it_is_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real FedAvg daemon over mosquitto (rounds of 2 drawn from 3 waiting): writing round.json
    fails (ENOSPC) for the first draw. No invitation leaves before a record is written, the core is
    rebuilt (storage_failures 1); the round is drawn again (the failed batch redelivered, or, where
    the deferred pulls went with the core, the devices' next pulls), and the invitations that leave
    are the recorded round's, each served a model."""
    monkeypatch.setattr(mqtt, "RECONNECT_MIN_S", 0.25)
    broker = MosquittoProcess().start()
    try:
        rig = Rig(Net(broker.url, "rounds", {}, lambda name: None), tmp_path)
        daemon = rig.make_daemon(init=True, canary_round=False, strategy="fedavg", strategy_params={"select": 2, "min_devices": 3},
                                 storage_probe_s=0.3).start()
        record = daemon.registry.record_selection_round
        failed: list[Mapping[str, Any]] = []
        invites_seen_at_record: list[int] = []

        def record_or_fail(round_: Mapping[str, Any]) -> None:
            if not failed:
                failed.append(round_)
                raise enospc()
            invites_seen_at_record.append(sum(len(d.of(Invite)) for d in devices))
            record(round_)

        daemon.registry.record_selection_round = record_or_fail  # type: ignore[method-assign,assignment]
        model_id = rig.task.spec.model_id
        with rig:
            devices = [rig.device(f"dev{i}") for i in range(3)]
            for d in devices:
                d.send("pull", Pull(device=d.device, seq=1, model_id=model_id))
            wait_until(lambda: bool(failed) and daemon.storage_failures == 1, 15, "the failed record")
            wait_until(lambda: daemon._storage_ok, 15, "storage back")
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline and not any(d.of(Invite) for d in devices):
                time.sleep(0.05)
            if not any(d.of(Invite) for d in devices):
                for d in devices:
                    d.send("pull", Pull(device=d.device, seq=2, model_id=model_id))
            wait_until(lambda: sum(bool(d.of(Invite)) for d in devices) == 2, 15, "the round's two invitations")
            time.sleep(0.5)  # (a second draw's invitations, were there one)
            assert sum(len(d.of(Invite)) for d in devices) == 2 and invites_seen_at_record == [0]
            recorded = json.loads((tmp_path / "coord" / ROUND_FILE).read_text())
            invited = [d for d in devices if d.of(Invite)]
            assert sorted(recorded["state"]["participants"]) == sorted(d.device for d in invited)
            assert sorted(r for _d, r in recorded["round"]["invites"]) == sorted(d.of(Invite)[0].round for d in invited)
            for d in invited:
                d.send("pull", Pull(device=d.device, seq=3, model_id=model_id, invite_round=d.of(Invite)[0].round))
            wait_until(lambda: all(d.of(ModelMsg) for d in invited), 15, "the invited devices' models")
    finally:
        broker.stop()


LATE: dict[str, Any] = {"k": 3, "select": 3, "late_join": True, "strict_k": False}


def _fedbuff(core: CoordinatorCore) -> FedBuffStrategy:
    assert isinstance(core.strategy, FedBuffStrategy)
    return core.strategy


def test_a_fedbuff_late_joiner_that_reported_is_not_let_in_again_after_a_restart() -> None:
    """FedBuff with late joiners (K 3, rounds of 3 drawn from 6 seen): the draw after version 1 invites
    the deferred devices it drew and keeps the others as late joiners (recorded). One late joiner pulls
    (admitted), reports, the daemon restarts at version 1 before K. On the live core its next pull is
    deferred (it took part in this round); the restarted core put it back among the late joiners from
    the record, served its pull, and took a second update of that device into the same buffer of K."""
    seen = [f"d{i}" for i in range(1, 7)]
    c = make_coordinator("fedbuff", snapshot=Snapshot(version=0, weights=np.zeros(SPEC.size, np.float32), devices_seen=seen, epoch=0),
                         **LATE)
    c.start(0.0)
    for i, d in enumerate(seen, 1):
        c.handle(_pull(d, 1, float(i)))
    served = sorted(_fedbuff(c).in_flight)
    records = [a.round for j, d in enumerate(served) for a in c.handle(_update(d, 2, 7.0 + j, 1.0)) if isinstance(a, RecordSelectionRound)]
    assert c.version == 1 and len(records) == 1 and _fedbuff(c).late_joiners, (c.version, records, _fedbuff(c).late_joiners)
    record = json.loads(json.dumps(records[0]))
    late = _fedbuff(c).late_joiners[0]
    assert _sent(c.handle(_pull(late, 3, 12.0)), "model")  # admitted as a late joiner
    persisted = [a.update for a in c.handle(_update(late, 4, 13.0, 2.0)) if isinstance(a, PersistUpdate)]
    assert len(persisted) == 1 and c.version == 1

    snap = Snapshot(version=1, weights=c.weights.copy(), applied_upto=c.applied_upto, buffer=persisted,
                    devices_seen=c.devices_seen, selection_round=record, epoch=0)
    restarted = make_coordinator("fedbuff", snapshot=snap, **LATE)
    restarted.start(20.0)
    assert not _sent(c.handle(_pull(late, 5, 21.0)), "model")  # live: deferred
    assert late not in _fedbuff(restarted).late_joiners
    assert not _sent(restarted.handle(_pull(late, 5, 21.0)), "model")


def test_invitations_never_pulled_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """FedAvg, rounds of 1 (round_timeout_s 1): 30 devices each pull once, are drawn and invited, and
    never pull their invitation (gone). With the bound scaled to 5, the core keeps the 5 newest
    invitations, and the round block a commit or a record carries lists no more. (Unbounded, 100,000
    such invitations made a 4.3 MB commit metadata and round record: benchmarks/round_block_cost.py.)"""
    from coordinator import core as core_mod
    monkeypatch.setattr(core_mod, "PRESENCE_LIMIT", 5)
    c = make_coordinator("fedavg", select=1, min_devices=1, round_timeout_s=1.0)
    c.start(0.0)
    invited = []
    for i in range(30):
        now = 2.0 * i + 1.0
        (invite,) = _sent(c.handle(_pull(f"gone{i:02d}", 1, now)), "invite")
        invited.append((invite.device, invite.round))
        c.handle(TimerFired(now=now + 1.5))  # the round times out without it
    assert sorted(c._invites.items()) == sorted(invited[-5:])
    assert len(c._round_block()["invites"]) == 5


def test_a_fedavg_round_restored_on_a_clock_behind_the_last_process_times_out_from_now() -> None:
    """A round drawn at t = 1,002 (round_timeout_s 5) and recorded; the restart's clock is behind the
    last process's (stepped back; a box without a battery-backed clock before NTP): it starts at 10.
    The restored round's deadline was 1,007: 997 s in which the round waited for devices that had
    gone (helper-153's case for SPIN's π, here again through the record). Taken as drawn at the restart."""
    c = make_coordinator("fedavg", **TIMED)
    c.start(0.0)
    actions = [a for i in range(3) for a in c.handle(_pull(f"d{i + 1}", 1, 1000.0 + i))]
    (record,) = [json.loads(json.dumps(a.round)) for a in actions if isinstance(a, RecordSelectionRound)]
    snap = Snapshot(version=c.version, weights=c.weights.copy(), applied_upto=c.applied_upto, buffer=[],
                    devices_seen=c.devices_seen, selection_round=record, epoch=0)
    restarted = make_coordinator("fedavg", snapshot=snap, **TIMED)
    restarted.start(10.0)
    strategy = restarted.strategy
    assert isinstance(strategy, FedAvgStrategy) and strategy.round == 1 and len(strategy.participants) == 2
    restarted.handle(TimerFired(now=15.0))
    assert not strategy.participants  # the round is over


def test_fedbuff_in_flight_restored_on_a_clock_behind_the_last_process_is_forgotten_from_now() -> None:
    """FedBuff, forget_after_s 20: the draw at t = 1,000 invites a device, recorded; the restart's clock
    starts at 10 (stepped back). Its straggler was kept until 1,020 (the device gone, the round's slot
    held 1,010 s); taken as let in at the restart, it is forgotten at 30."""
    params: dict[str, Any] = {"k": 2, "select": 1, "forget_after_s": 20.0}
    c = make_coordinator("fedbuff", **params)
    c.start(0.0)
    actions = c.handle(_pull("d1", 1, 1000.0))
    (record,) = [json.loads(json.dumps(a.round)) for a in actions if isinstance(a, RecordSelectionRound)]
    assert _fedbuff(c).in_flight == {"d1": 1000.0}
    snap = Snapshot(version=c.version, weights=c.weights.copy(), applied_upto=c.applied_upto, buffer=[],
                    devices_seen=c.devices_seen, selection_round=record, epoch=0)
    restarted = make_coordinator("fedbuff", snapshot=snap, **params)
    restarted.start(10.0)
    restarted.handle(TimerFired(now=30.0))
    assert "d1" not in _fedbuff(restarted).in_flight
