"""Device state across a restart, on the real path (helper-144's audit): real EdgeClients on a
real mosquitto and a real coordinator process."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from coordinator.broker import MosquittoProcess
from edge_sdk.client import EdgeClient
from edge_sdk.tasks import get_task
from edge_sdk.tasks.base import TrainConfig
from tests.helpers import CoordinatorProcess

pytestmark = [pytest.mark.broker]
REGION = "rs"


def _one_round(url: str, data_dir: Path) -> list[tuple[str, dict[str, Any]]]:
    """A device labels 6 samples, then connects: exactly one round (pull seq 0, update seq 1).
    Its notifications until that update is acknowledged (or refused)."""
    task = get_task("digits")
    client = EdgeClient(broker=url, device_id="reinstalled", region=REGION, task=task, data_dir=data_dir, min_samples=4,
                        train=TrainConfig(epochs=1, lr=0.05, seed=0), request_timeout_s=2.0, refresh_s=None)
    notes: list[tuple[str, dict[str, Any]]] = []
    done = threading.Event()

    def note(kind: str, data: dict[str, Any]) -> None:
        notes.append((kind, data))
        if kind in ("update_acked", "update_rejected"):
            done.set()

    client.on("*", note)
    pool = task.data().pool
    for i in range(6):
        client.add_sample(pool.x[i], int(pool.y[i]))
    client.start()
    try:
        assert done.wait(60), notes
    finally:
        client.stop()
    return notes


def test_a_reinstalled_device_is_not_told_its_new_update_was_applied(mosquitto: MosquittoProcess, tmp_path: Path) -> None:
    """The same device id on a fresh data dir (the app reinstalled: its store and sequence numbers
    are gone) sends its first update under a seq the coordinator accepted from the first install.
    The coordinator answers ``duplicate`` with the nonce of the update it accepted under that seq; the
    device must see that nonce is not its own and send again under a fresh seq. Before, the nonce came
    from ``random.Random(seed)`` (seed 0 by default), so the second install drew the first one's nonce,
    took the ``duplicate`` for its own update and dropped it: acknowledged, never applied."""
    with CoordinatorProcess("--broker", mosquitto.url, "--region", REGION, "--state-dir", str(tmp_path / "state"),
                            "--model", "digits", "--k", "1", "--timeout", "2"):
        first = _one_round(mosquitto.url, tmp_path / "install1")
        second = _one_round(mosquitto.url, tmp_path / "install2")
    assert [d["status"] for k, d in first if k == "update_acked"] == ["accepted"]
    trained = [d["seq"] for k, d in second if k == "trained"]
    assert trained == [1], second  # the same seq as the first install's update: the case under test
    conflicts = [d for k, d in second if k == "seq_conflict"]
    acked = [d for k, d in second if k == "update_acked"]
    assert [(c["old_seq"], c["watermark"]) for c in conflicts] == [(1, 1)], second
    assert [(a["seq"], a["status"]) for a in acked] == [(2, "accepted")], second
