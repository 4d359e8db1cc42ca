"""A coordinator process killed (SIGKILL) right after a message reached it, before what the
message changed was durable, over the production TLS broker: the message's PUBACK must not
have left, so the broker delivers it to the next process on the same state dir, which applies it
(once). A canary report (helper-129; over TLS the PUBACK is paho's, which sent it on receipt
before helper-128) and an operator's command (``edgeci pin``, helper-132).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_rig import Net, Rig, report
from tests.helpers import ChildProcess, wait_until
from tests.secure_broker import SECURE_REGION, SecureBroker

pytestmark = [pytest.mark.broker]
ROOT = Path(__file__).resolve().parents[1]
RECORD_DELAY_S = 30.0
"""How long the first process's record of a report waits before it writes (it is killed meanwhile)."""


def child(url: str, root: str, bundle: str, init: str, hold: str) -> None:
    """The coordinator process: the rig's canary daemon on ``root``. ``hold`` names a write it
    says it is at ("holding") and delays by RECORD_DELAY_S (the test kills it there): ``report``,
    the record of a canary report; ``commit``, the staging of an operator's version (before
    the batch's fsync); ``release``, the record of an operator's command (its version durable)."""
    net = Net(url, SECURE_REGION, {"coordinator_id": "coord-sec", "bundle": Path(bundle)}, lambda name: None)
    daemon = Rig(net, Path(root)).make_daemon(init=init == "1")
    registry = daemon.registry

    def holding(write: Callable[..., None], at: Callable[..., bool]) -> Callable[..., None]:
        def held(*args: Any) -> None:
            if at(*args):
                print("holding", flush=True)
                time.sleep(RECORD_DELAY_S)
            write(*args)
        return held

    if hold == "report":
        registry.record_canary_round = holding(  # type: ignore[method-assign]
            registry.record_canary_round, lambda round_: bool(round_["reports"]))
    elif hold == "commit":
        registry.stage_version = holding(  # type: ignore[method-assign]
            registry.stage_version, lambda action: action.metadata.get("source") == "operator")
    elif hold == "release":
        registry.record_release = holding(  # type: ignore[method-assign]
            registry.record_release, lambda release, pinned, event, floor: "nonce" in event)
    daemon.start()
    print("ready", flush=True)
    threading.Event().wait()


class Child(ChildProcess):
    """:func:`child` in a process of its own, ready once it printed "ready"."""

    def __init__(self, *args: str) -> None:
        code = "import sys; from tests.test_daemon_acks_crash import child; child(*sys.argv[1:])"
        super().__init__(["-c", code, *args], lambda lines: "ready\n" in lines, "the coordinator process")


def test_a_report_whose_coordinator_is_killed_before_its_record_reaches_the_next_one(secure_broker: SecureBroker,
                                                                                     tmp_path: Path) -> None:
    bundle = str(secure_broker.bundle("coord-sec", "coordinator"))
    first: Child | None = None
    second: Child | None = None
    with Rig(Net(secure_broker.url, SECURE_REGION, {}, secure_broker.bundle), tmp_path) as rig:
        try:
            first = Child(secure_broker.url, str(tmp_path), bundle, "1", "report")
            ask = rig.open_canary_round()
            rig.devices[0].send("update", report(ask))
            wait_until(lambda: "holding\n" in first.lines, 15, "the report in the first process's hands")  # type: ignore[union-attr]
            first.close(signal.SIGKILL)  # (the report was handled, its record not yet written)
            assert rig.recorded_reports() == {}
            second = Child(secure_broker.url, str(tmp_path), bundle, "0", "")
            wait_until(lambda: rig.recorded_reports() != {}, 20, "the report, delivered to the next process")
            time.sleep(1.0)
            recorded = rig.recorded_reports()
        finally:
            for c in (first, second):
                if c is not None:
                    c.close()
    assert recorded == {"dev0": [10, 0, 0, 0]}


@pytest.mark.parametrize("hold", ["commit", "release"])
def test_an_operator_command_whose_coordinator_is_killed_before_it_is_durable_runs_once_at_the_next_start(
        secure_broker: SecureBroker, tmp_path: Path, hold: str) -> None:
    """``edgeci pin 0`` with an operator's bundle; the coordinator process is killed while it
    writes what the command changed: before the batch that commits its version is fsynced
    (``commit``: nothing of it is durable; the broker must still hold the command, its PUBACK
    not sent), or after, before its release record (``release``: the registry recovers the
    command from the commit; the redelivered command is a replay). Either way the next process
    on the state dir leaves it applied exactly once: one operator version, one pin in the
    release record, pinned."""
    from coordinator.cli_control import version_rows

    ops = secure_broker.bundle("ops", "operator")
    secure_broker.pki.refresh_trust()  # (the coordinator's bundle trusts the operators issued before it is read)
    bundle = str(secure_broker.bundle("coord-sec", "coordinator"))
    state = tmp_path / "coord"
    first: Child | None = None
    second: Child | None = None
    cli: subprocess.Popen[str] | None = None
    try:
        first = Child(secure_broker.url, str(tmp_path), bundle, "1", hold)
        cli = subprocess.Popen(
            [sys.executable, "-m", "demos.cli", "pin", "0", "--broker", secure_broker.url, "--region", SECURE_REGION,
             "--bundle", str(ops), "--wait", "60"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        wait_until(lambda: "holding\n" in first.lines or first.proc.poll() is not None, 30,  # type: ignore[union-attr]
                   "the command in the first process's hands")
        first.close(signal.SIGKILL)
        before, _ = version_rows(state)
        assert [r for r in before if r.get("source") == "operator"] == ([] if hold == "commit" else before[-1:]), before
        second = Child(secure_broker.url, str(tmp_path), bundle, "0", "")
        wait_until(lambda: version_rows(state)[1].get("pinned") is True, 30, "the pin, at the next process")
        time.sleep(2.0)  # (a second delivery would be applied or refused by now)
        rows, release = version_rows(state)
    finally:
        for c in (first, second):
            if c is not None:
                c.close()
        if cli is not None:  # (it ends once the first process's last will says it stopped)
            try:
                said = cli.communicate(timeout=90)[0]
            except subprocess.TimeoutExpired:
                cli.kill()
                said = cli.communicate()[0]
    pins = [e for e in release.get("history", []) if e.get("action") == "pin"]
    assert [(r["version"], r["source"], r["of"]) for r in rows[1:]] == [(1, "operator", 0)] and rows[0]["version"] == 0, (rows, said)
    assert len(pins) == 1 and pins[0]["operator"] == "ops" and pins[0]["version"] == 1, (pins, said)
    assert release.get("release") == 1 and release.get("pinned") is True, release
