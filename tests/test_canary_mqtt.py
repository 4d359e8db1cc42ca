"""Issue 10 §3 over a real mosquitto: federated (canary) evaluation alone — no validation set —
rejects a ×1000-scaled candidate and promotes a genuinely better one. Four EdgeClients are
asked, fetch each candidate, score it against the release on their next new labels before
storing them (test-then-train, with the onnxruntime path ``predict`` uses) and report only
paired counts; identities that were not asked (the attacker among them) cannot vote."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from coordinator.broker import MosquittoProcess
from coordinator.cli_control import version_rows
from coordinator.daemon import CoordinatorDaemon, CoordinatorOptions
from edge_sdk.client import EdgeClient
from edge_sdk.modelio import save_model
from edge_sdk.mqtt import MqttTransport
from edge_sdk.tasks import get_task
from edge_sdk.tasks.base import TrainConfig
from edge_sdk.wire import topics
from edge_sdk.wire.codec import encode
from edge_sdk.wire.messages import CanaryReport, Update
from tests.helpers import wait_until

pytestmark = [pytest.mark.broker]
REGION = "canary"
LABELS = 30


def publish(url: str, device: str, message: Update | CanaryReport) -> None:
    """A raw client on ``device``'s own update topic (what an attacker with that identity can do)."""
    t = MqttTransport(url, client_id=f"raw-{device}", subscriptions=[], on_message=lambda *_: None, clean_session=True)
    t.start()
    t.publish(topics.device_topic(REGION, device, "update"), encode(message))
    t.stop()


def test_canary_cohort_alone_rejects_a_scaled_candidate_and_promotes_a_good_one(mosquitto: MosquittoProcess, tmp_path: Path) -> None:
    task = get_task("digits")
    data = task.data()
    release0 = task.pretrained(seed=0)
    save_model(tmp_path / "init.npz", task.spec, release0, {"version": 0})
    daemon = CoordinatorDaemon(
        CoordinatorOptions(require_pull=False, broker=mosquitto.url, region=REGION, state_dir=tmp_path / "coord", init=tmp_path / "init.npz",
                           strategy_params={"k": 1, "timeout_s": None, "clip_multiplier": 0.0, "sample_weight_cap": 0.0},
                           canary=1.0, canary_samples=LABELS, canary_min_reports=3, canary_deadline_s=120.0),
        task=task,
    ).start()
    clients = [EdgeClient(broker=mosquitto.url, device_id=f"dev{i}", region=REGION, task=task, data_dir=tmp_path / f"dev{i}",
                          min_samples=10_000, train=TrainConfig(seed=i), request_timeout_s=3.0, seed=i).start()
               for i in range(4)]
    scored = iter(np.random.default_rng(0).permutation(len(data.test.y)))  # fresh labels, never trained on

    def canary_round(version: int) -> None:
        """Each device was asked, holds the candidate, and labels ``LABELS`` new samples."""
        wait_until(lambda: all(c.core.state.canary is not None and c.core.state.canary.candidate == version
                               and c.core.state.canary_state == "scoring" for c in clients), 60, f"devices scoring {version}")
        wait_until(lambda: all(c._canary is not None and c._canary[0] == version for c in clients), 30, "candidate predictors")
        for c in clients:
            for _ in range(LABELS):
                k = next(scored)
                c.add_sample(data.test.x[k], int(data.test.y[k]))

    try:
        wait_until(lambda: all(c.version == 0 for c in clients), 30, "devices holding release 0")
        # 1. a ×1000-scaled (finite) update becomes candidate 1; only the cohort's counts judge it
        bad = (np.random.default_rng(1).normal(size=task.spec.size) * 1000).astype(np.float32)
        publish(mosquitto.url, "mallory", Update(device="mallory", seq=1, model_id=task.spec.model_id, base_version=0,
                                                 n_samples=50, weights=bad, nonce=1))
        wait_until(lambda: daemon.core.version == 1, 30, "candidate 1")
        # mallory praises its own candidate: a device whose update built it is not in its cohort
        publish(mosquitto.url, "mallory", CanaryReport(device="mallory", candidate=1, release=0, both_right=0,
                                                       only_candidate=LABELS, only_release=0, both_wrong=0))
        # an identity that was never asked is refused
        publish(mosquitto.url, "eve", CanaryReport(device="eve", candidate=1, release=0, both_right=0,
                                                   only_candidate=LABELS, only_release=0, both_wrong=0))
        canary_round(1)
        wait_until(lambda: daemon.core.counters["gate_rejected"] == 1, 60, "candidate 1 rejected")
        assert daemon.core.release[0] == 0
        rollback = daemon.core.version  # the training line went back to the release
        np.testing.assert_array_equal(daemon.core.weights, release0)
        # 2. a genuinely better model (fine-tuned on 300 other labels) is candidate rollback + 1
        pool = np.random.default_rng(2).permutation(len(data.pool.y))[:300]
        good = task.local_update(release0, data.pool.x[pool], data.pool.y[pool], TrainConfig(epochs=2, lr=0.05, seed=0)).weights
        publish(mosquitto.url, "trainer", Update(device="trainer", seq=1, model_id=task.spec.model_id, base_version=rollback,
                                                 n_samples=300, weights=np.asarray(good, dtype=np.float32), nonce=2))
        wait_until(lambda: daemon.core.version == rollback + 1, 30, "the good candidate")
        canary_round(rollback + 1)
        wait_until(lambda: daemon.core.release[0] == rollback + 1, 60, "the good candidate promoted")
        canary = daemon.core.status().extra["gate"]["canary"]
    finally:
        for c in clients:
            c.stop()
        daemon.stop()
    history = json.loads((tmp_path / "coord" / "release.json").read_text())["history"]
    (reject,) = [e for e in history if e["action"] == "reject"]
    (promote,) = [e for e in history if e["action"] == "promote"]
    assert "candidate_metric" not in reject  # no validation set: canary evidence alone decided
    # the honest devices saw the regression; mallory's and eve's praise was refused
    assert reject["canary"]["reports"] >= 3 and reject["canary"]["candidate"] < reject["canary"]["release"] - 0.3
    assert promote["canary"]["reports"] >= 3 and promote["canary"]["candidate"] > promote["canary"]["release"]
    assert canary["rejected_by_reason"].get("not_in_cohort", 0) == 2  # mallory and eve
    assert canary["rounds"] >= 2 and canary["fetches"] >= 8
    # `edgeci versions` shows the canary metric of both decisions
    rows = {r["version"]: r for r in version_rows(tmp_path / "coord")[0]}
    assert rows[1]["canary"]["reports"] >= 3 and "reject" in rows[1]["verdict"]
    assert rows[rollback + 1]["canary"]["candidate"] > rows[rollback + 1]["canary"]["release"]
    assert "promote" in rows[rollback + 1]["verdict"]


def test_a_restarted_coordinator_resumes_its_round_and_takes_the_reports_sent_while_it_was_down(
        mosquitto: MosquittoProcess, tmp_path: Path) -> None:
    """helper-114 over mosquitto: the coordinator restarted while its cohort scored; the new round's
    cohort was drawn among the devices seen since the restart (4 devices: 2, below min_reports 3) and
    the reports of the old round were refused (``canary_stale_round``): the candidate could only be
    held. The round is recorded now: the restarted coordinator resumes it, and the reports two devices
    sent while it was down (kept by the broker for its session) decide, with the one recorded before."""
    task = get_task("digits")
    data = task.data()
    release0 = task.pretrained(seed=0)
    save_model(tmp_path / "init.npz", task.spec, release0, {"version": 0})

    def coordinator(**init: Path) -> CoordinatorDaemon:
        return CoordinatorDaemon(
            CoordinatorOptions(require_pull=False, broker=mosquitto.url, region=REGION, state_dir=tmp_path / "coord",
                               strategy_params={"k": 1, "timeout_s": None, "clip_multiplier": 0.0, "sample_weight_cap": 0.0},
                               canary=1.0, canary_samples=LABELS, canary_min_reports=3, canary_deadline_s=300.0, **init),
            task=task,
        ).start()

    daemon = coordinator(init=tmp_path / "init.npz")
    clients = [EdgeClient(broker=mosquitto.url, device_id=f"dev{i}", region=REGION, task=task, data_dir=tmp_path / f"dev{i}",
                          min_samples=10_000, train=TrainConfig(seed=i), request_timeout_s=3.0, seed=i).start()
               for i in range(4)]
    scored = iter(np.random.default_rng(0).permutation(len(data.test.y)))

    def label(c: EdgeClient) -> None:
        for _ in range(LABELS):
            k = next(scored)
            c.add_sample(data.test.x[k], int(data.test.y[k]))

    try:
        wait_until(lambda: all(c.version == 0 for c in clients), 30, "devices holding release 0")
        bad = (np.random.default_rng(1).normal(size=task.spec.size) * 1000).astype(np.float32)
        publish(mosquitto.url, "mallory", Update(device="mallory", seq=1, model_id=task.spec.model_id, base_version=0,
                                                 n_samples=50, weights=bad, nonce=1))
        wait_until(lambda: daemon.core.version == 1, 30, "candidate 1")
        wait_until(lambda: all(c.core.state.canary is not None and c.core.state.canary_state == "scoring" and c._canary is not None
                               for c in clients), 60, "devices scoring candidate 1")
        label(clients[0])
        wait_until(lambda: daemon.core.counters["canary_reports"] == 1, 30, "dev0's report")
        daemon.stop()
        for c in clients[1:3]:  # dev1 and dev2 report while the coordinator is down (dev3 is still scoring)
            label(c)
        wait_until(lambda: all(c.core.state.canary is None for c in clients[1:3]), 30, "dev1's and dev2's reports sent")
        daemon = coordinator()
        wait_until(lambda: daemon.core.counters["gate_rejected"] == 1, 60, "candidate 1 rejected after the restart")
        canary = daemon.core.status().extra["gate"]["canary"]
    finally:
        for c in clients:
            c.stop()
        daemon.stop()
    history = json.loads((tmp_path / "coord" / "release.json").read_text())["history"]
    (reject,) = [e for e in history if e["action"] == "reject"]
    assert reject["version"] == 1 and reject["canary"]["reports"] == 3 and reject["canary"]["n"] == 3 * LABELS
    assert canary["resumed"] == 1 and canary["rejected_by_reason"] == {}
