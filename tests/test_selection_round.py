"""A selection round survives a restart: the core records a round as drawn (``RecordSelectionRound``)
before its invitations leave, and a core restarted at the version it was drawn at resumes it.

Without the record, a FedAvg/FedOpt/FedBuff/PORT/HierFAVG coordinator restarted mid-round closed the
round at once with the part of its buffer the registry replayed (or drew another), forgot whom it had
served, and refused the round's other updates (``not_selected``): helper-169 measured the versions
after such a restart 0.02-0.57 away in L2 from an uninterrupted run's. The whole-run comparison is
tests/test_restart_transparency.py; here the record itself, the restart's use of it, what it must not
be used for, a damaged one, and a real daemon over mosquitto."""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.broker import MosquittoProcess
from coordinator.core import CoordinatorCore, PersistUpdate, RecordSelectionRound, Snapshot
from coordinator.registry import ROUND_FILE, Registry
from coordinator.strategies.base import StaticView
from coordinator.strategies.fedbuff import FedBuffConfig, FedBuffStrategy
from edge_sdk.core.events import MessageReceived, Publish
from edge_sdk.wire import topics
from edge_sdk.wire.codec import decode, encode
from edge_sdk.wire.messages import Ack, Invite, ModelMsg, Pull, Update
from tests.daemon_rig import Net, Rig, update
from tests.helpers import SPEC, make_coordinator, wait_until

FEDAVG = {"select": 2, "min_devices": 3}


def _pull(device: str, seq: int, now: float, invite_round: int = -1) -> MessageReceived:
    msg = Pull(device=device, seq=seq, model_id="toy", invite_round=invite_round)
    return MessageReceived(now=now, topic=topics.device_topic("r1", device, "pull"), payload=encode(msg))


def _update(device: str, seq: int, now: float, value: float) -> MessageReceived:
    msg = Update(device=device, seq=seq, model_id="toy", base_version=0, n_samples=1,
                 weights=np.full(SPEC.size, value, dtype=np.float32))
    return MessageReceived(now=now, topic=topics.device_topic("r1", device, "update"), payload=encode(msg))


def _sent(actions: Sequence[object], leaf: str) -> list[Any]:
    return [decode(a.payload) for a in actions if isinstance(a, Publish) and a.topic.endswith("/" + leaf)]


def _drawn(strategy: str = "fedavg", **params: Any) -> tuple[CoordinatorCore, list[object], dict[str, Any]]:
    """Three devices pull; the third's pull draws a round of two: (core, that event's actions, the record through JSON)."""
    c = make_coordinator(strategy, **(params or FEDAVG))
    c.start(0.0)
    c.handle(_pull("d1", 1, 1.0))
    c.handle(_pull("d2", 1, 2.0))
    actions = c.handle(_pull("d3", 1, 3.0))
    (record,) = [a for a in actions if isinstance(a, RecordSelectionRound)]
    return c, actions, json.loads(json.dumps(record.round))


def test_a_draw_is_recorded_before_its_invitations_leave() -> None:
    _c, actions, record = _drawn()
    invites = _sent(actions, "invite")
    assert len(invites) == 2
    first_invite = next(i for i, a in enumerate(actions) if isinstance(a, Publish) and a.topic.endswith("/invite"))
    assert next(i for i, a in enumerate(actions) if isinstance(a, RecordSelectionRound)) < first_invite
    invited = sorted(m.device for m in invites)
    assert (record["version"], record["strategy"], record["at"]) == (0, "fedavg", 3.0)
    state = record["state"]
    assert (state["participants"], state["started_at"], state["round"]) == (invited, 3.0, 1) and "draws" in state
    assert record["round"]["invites"] == [[m.device, m.round] for m in sorted(invites, key=lambda m: m.device)]
    assert record["round"]["accepted"] == [[d, -1] for d in invited]


def _restarted(c: CoordinatorCore, persisted: Sequence[Any], record: dict[str, Any] | None, **params: Any) -> CoordinatorCore:
    snap = Snapshot(version=c.version, weights=c.weights.copy(), applied_upto=c.applied_upto, buffer=list(persisted),
                    devices_seen=c.devices_seen, selection_round=record, epoch=0)
    r = make_coordinator("fedavg", snapshot=snap, **(params or FEDAVG))
    r.start(10.0)
    return r


def test_a_restart_resumes_the_round_as_drawn_and_takes_its_other_update() -> None:
    """One invited device reported before the crash, the other after: the restarted core waits for it,
    takes its update (it never served it a model: the served set went with the process) and makes the
    round's version of both. Without the record (the old behaviour, kept as the contrast): the version
    is made at once of the one replayed update, and the other's is refused ``not_selected``."""
    c, actions, record = _drawn()
    invites = sorted(_sent(actions, "invite"), key=lambda m: m.device)
    for m in invites:  # both fetch the round's model
        assert _sent(c.handle(_pull(m.device, 2, 3.5, invite_round=m.round)), "model")
    first, second = (m.device for m in invites)
    persisted = [a.update for a in c.handle(_update(first, 3, 4.0, 1.0)) if isinstance(a, PersistUpdate)]
    assert len(persisted) == 1 and c.version == 0

    r = _restarted(c, persisted, record)
    assert r.strategy.participants == {second} and r.version == 0
    acts = r.handle(_update(second, 3, 11.0, 3.0))
    assert [m.status for m in _sent(acts, "ack")] == ["accepted"]
    assert r.version == 1
    np.testing.assert_allclose(r.weights, 2.0)  # the mean of both

    old = _restarted(c, persisted, None)
    assert old.version == 1  # made at start, from the one replayed update
    refused = _sent(old.handle(_update(second, 3, 11.0, 3.0)), "ack")
    assert [(m.status, m.reason) for m in refused] == [("rejected", "not_selected")]


@pytest.mark.parametrize("change", [{"version": 1}, {"epoch": 7}, {"strategy": "fedopt"}, {"state": "x"}])
def test_a_record_drawn_at_another_version_epoch_or_by_another_strategy_is_not_resumed(change: dict[str, Any]) -> None:
    """A record is the round drawn after the newest commit, in this numbering, by this strategy: one
    from before a commit the restart restored (or another state dir's numbering, another strategy)
    speaks of another round. The commit's own state holds (no round open), as before records."""
    c, _actions, record = _drawn()
    r = _restarted(c, [], {**record, **change})
    assert r.strategy.round == 0 and not r.strategy.participants


@pytest.mark.parametrize("junk", [
    {"state": {"round": "x", "participants": [1, 2], "started_at": float("nan"), "draws": {"mt": "!"}}},
    {"round": {"accepted": [["d9"], [3, 4], "x"], "invites": {"d1": 1}, "invite_round": -4}},
    {"round": "nonsense"},
])
def test_a_damaged_record_is_counted_and_breaks_nothing(junk: dict[str, Any]) -> None:
    """The coordinator's own file, but a bad one must not stop a start nor put garbage into a round:
    the parts that do not fit are left out (the strategy counts them: ``restore_refused``)."""
    c, _actions, record = _drawn()
    r = _restarted(c, [], {**record, **junk})
    if "state" in junk:
        assert r.strategy.restore_refused >= 3 and r.strategy.describe()["restore_refused"] == r.strategy.restore_refused
        assert r.strategy.round == 0 and not r.strategy.participants
    else:
        assert r.strategy.participants == set(record["state"]["participants"])
    assert r._training <= set(record["state"]["participants"])


def test_fedbuff_draws_again_for_a_pull_deferred_at_the_instant_of_a_draw_that_invited_nobody() -> None:
    """A draw that invited nobody (the devices drawn had no data) is drawn again when a device defers.
    That was decided by time (a deferral newer than the draw): one deferred at the draw's very instant,
    in its own event after it, never drew again, and with the round empty nothing else would (after a
    restart every device re-announces at once on a virtual clock: FedBuff drew once, then never)."""
    s = FedBuffStrategy(FedBuffConfig(k=1, select=1, population=1000))
    rng = random.Random(3)
    view = StaticView(spec=SPEC, version=0, weights=np.zeros(SPEC.size, np.float32), devices_seen=["a"], deferred={})
    assert s.plan(view, 1.0, rng).invite == () and s.round == 1  # (1 of 1,000 drawn: an unseen one)
    assert s.serve_pull(view, "a", 1.0) is False  # "a" defers at the same instant
    waiting = StaticView(spec=SPEC, version=0, weights=view.weights, devices_seen=["a"], deferred={"a": 1.0})
    s.plan(waiting, 1.0, rng)
    assert s.round == 2


# ------------------------------------------------------------------ the registry and a real daemon


def test_the_registry_keeps_the_record_and_says_when_it_is_unreadable(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    reg = Registry(tmp_path, SPEC)
    reg.initialise(np.zeros(SPEC.size, np.float32), now=0.0, source="test")
    _c, _a, record = _drawn()
    reg.record_selection_round(record)
    snap = reg.load()
    assert snap is not None and snap.selection_round == record
    (tmp_path / ROUND_FILE).write_bytes(b"{torn")
    with caplog.at_level(logging.WARNING):
        snap = reg.load()
    assert snap is not None and snap.selection_round is None
    assert any("selection round" in r.getMessage() for r in caplog.records)
    reg.close()


@pytest.fixture
def net() -> Iterator[Net]:
    broker = MosquittoProcess().start()
    try:
        yield Net(broker.url, "rounds", {}, lambda name: None)
    finally:
        broker.stop()


@pytest.mark.broker
def test_a_fedavg_daemon_restarted_mid_round_takes_the_rounds_other_update(net: Net, tmp_path: Path) -> None:
    """A real daemon (FedAvg, rounds of 2 drawn from 3 waiting devices) over mosquitto: the round is
    drawn, both invited devices fetch the model, one reports, the daemon stops and starts again on its
    state dir, the other reports. Its update is accepted and version 1 is the round's: both updates."""
    rig = Rig(net, tmp_path)
    options = {"canary_round": False, "strategy": "fedavg", "strategy_params": FEDAVG}
    rig.make_daemon(init=True, **options).start()
    model_id = rig.task.spec.model_id
    with rig:
        devices = [rig.device(f"dev{i}") for i in range(3)]
        for d in devices:
            d.send("pull", Pull(device=d.device, seq=1, model_id=model_id))
        wait_until(lambda: sum(bool(d.of(Invite)) for d in devices) == 2, 15, "the round's two invitations")
        first, second = [d for d in devices if d.of(Invite)]
        for d in (first, second):
            d.send("pull", Pull(device=d.device, seq=2, model_id=model_id, invite_round=d.of(Invite)[0].round))
        wait_until(lambda: bool(first.of(ModelMsg)) and bool(second.of(ModelMsg)), 15, "the invited devices' models")
        first.send("update", update(rig.task, first.device, 3, seed=1, nonce=11))
        wait_until(lambda: any(a.seq == 3 for a in first.of(Ack)), 15, "the first update's ack")
        recorded = json.loads((tmp_path / "coord" / ROUND_FILE).read_text())
        assert sorted(recorded["state"]["participants"]) == sorted([first.device, second.device])

        rig._daemon.stop()
        rig.make_daemon(**options).start()
        second.send("update", update(rig.task, second.device, 3, seed=2, nonce=12))
        wait_until(lambda: any(a.seq == 3 for a in second.of(Ack)), 15, "the second update's ack")
        (ack,) = [a for a in second.of(Ack) if a.seq == 3]
        assert (ack.status, ack.reason) == ("accepted", ""), ack
        meta = tmp_path / "coord" / "versions" / "000000001" / "meta.json"
        wait_until(meta.exists, 15, "version 1")
        made = json.loads(meta.read_text())
        assert (made["n_updates"], sorted(made["devices"])) == (2, sorted([first.device, second.device]))
