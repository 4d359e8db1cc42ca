"""A coordinator process killed (SIGKILL) right after a canary report reached it, over the
production TLS broker (helper-129): the report's PUBACK must not have left before its record
was durable, so the broker delivers it to the next process on the same state dir, which
records it (once). Over TLS the PUBACK is paho's, which sent it on receipt before helper-128.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_rig import Net, Rig, report
from tests.helpers import wait_until
from tests.secure_broker import SECURE_REGION, SecureBroker

pytestmark = [pytest.mark.broker]
ROOT = Path(__file__).resolve().parents[1]
RECORD_DELAY_S = 30.0
"""How long the first process's record of a report waits before it writes (it is killed meanwhile)."""


def child(url: str, root: str, bundle: str, init: str, slow_record: str) -> None:
    """The coordinator process: the rig's canary daemon on ``root``; with ``slow_record``
    a report's record says "recording" and waits before it writes (the test kills it there)."""
    net = Net(url, SECURE_REGION, {"coordinator_id": "coord-sec", "bundle": Path(bundle)}, lambda name: None)
    daemon = Rig(net, Path(root)).make_daemon(init=init == "1")
    if slow_record == "1":
        record = daemon.registry.record_canary_round

        def slow(round_: Mapping[str, Any]) -> None:
            if round_["reports"]:
                print("recording", flush=True)
                time.sleep(RECORD_DELAY_S)
            record(round_)

        daemon.registry.record_canary_round = slow  # type: ignore[method-assign]
    daemon.start()
    print("ready", flush=True)
    threading.Event().wait()


class Child:
    def __init__(self, *args: str) -> None:
        code = "import sys; from tests.test_daemon_acks_crash import child; child(*sys.argv[1:])"
        self.proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
        self.lines: list[str] = []
        self._pump = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout or []), daemon=True)
        self._pump.start()
        wait_until(lambda: "ready\n" in self.lines or self.proc.poll() is not None, 60, "the coordinator process")
        assert self.proc.poll() is None, "".join(self.lines)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)
        self._pump.join(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def test_a_report_whose_coordinator_is_killed_before_its_record_reaches_the_next_one(secure_broker: SecureBroker,
                                                                                     tmp_path: Path) -> None:
    bundle = str(secure_broker.bundle("coord-sec", "coordinator"))
    first: Child | None = None
    second: Child | None = None
    with Rig(Net(secure_broker.url, SECURE_REGION, {}, secure_broker.bundle), tmp_path) as rig:
        try:
            first = Child(secure_broker.url, str(tmp_path), bundle, "1", "1")
            ask = rig.open_canary_round()
            rig.devices[0].send("update", report(ask))
            wait_until(lambda: "recording\n" in first.lines, 15, "the report in the first process's hands")  # type: ignore[union-attr]
            first.kill()  # (the report was handled, its record not yet written)
            assert rig.recorded_reports() == {}
            second = Child(secure_broker.url, str(tmp_path), bundle, "0", "0")
            wait_until(lambda: rig.recorded_reports() != {}, 20, "the report, delivered to the next process")
            time.sleep(1.0)
            recorded = rig.recorded_reports()
        finally:
            for c in (first, second):
                if c is not None:
                    c.kill(signal.SIGTERM)
    assert recorded == {"dev0": [10, 0, 0, 0]}
