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
