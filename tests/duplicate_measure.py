"""Measure two devices on one device id (a cloned SD card or VM image: the same id, a copy of one
data dir) against a coordinator daemon and a real mosquitto, plain or TLS + ACL (both clones with
the one bundle, as a copied image has).

    .venv/bin/python -m tests.duplicate_measure --seconds 60 [--tls]

Device A runs one round alone (its update accepted), stops; its data dir is copied for B. Then both
run for ``--seconds`` on the id, each labelling a sample of its own every ``--label-every`` s.
Prints one JSON line: per instance, its connections and drops (the broker closing the older one at
each CONNECT), the share of the time it was connected, its notifications by kind, its updates sent,
acknowledged to it, and those of them the coordinator holds (by nonce: an update acknowledged to an
instance whose nonce the coordinator never took is that instance's round lost); the coordinator's
counters; whether any update (nonce or weights) was taken or consumed twice; the transport's log lines.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from coordinator.broker import MosquittoProcess
from coordinator.core import CommitVersion, CoordinatorCore, PersistUpdate
from coordinator.daemon import CoordinatorDaemon, CoordinatorOptions
from edge_sdk.client import EdgeClient
from edge_sdk.tasks import get_task
from edge_sdk.tasks.base import TrainConfig
from edge_sdk.wire.codec import decode
from edge_sdk.wire.messages import Pull, Update

DEVICE = "twin"


class Lines(logging.Handler):
    """Every log line at WARNING and above, and the transport's, counted by level and opening words."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.counts: Counter[str] = Counter()
        self.samples: dict[str, str] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno < logging.WARNING and record.name != "edgeci.mqtt":
            return
        text = record.getMessage()
        key = f"{record.levelname} {record.name}: {' '.join(text.split()[:6])}"
        self.counts[key] += 1
        self.samples.setdefault(key, text[:400])


class Instance:
    """One clone: its EdgeClient, with what it sent and what it was told recorded."""

    def __init__(self, name: str, client: EdgeClient) -> None:
        self.name, self.client = name, client
        self.notes: Counter[str] = Counter()
        self.acked: list[dict[str, Any]] = []
        self.sent_updates: dict[int, int] = {}  # seq -> nonce of the latest update sent under it
        self.nonces: set[int] = set()
        self.pull_seqs: list[int] = []
        self.update_seqs: list[int] = []
        self.ups = self.downs = 0
        self.up_since: float | None = None
        self.up_s = 0.0
        self.lasted: list[float] = []
        self._lock = threading.Lock()
        transport = client.transport
        on_connection, publish = transport._on_connection, transport.publish

        def connection(up: bool) -> None:
            now = time.monotonic()
            with self._lock:
                if up:
                    self.ups += 1
                    self.up_since = now
                elif self.up_since is not None:
                    self.downs += 1
                    self.lasted.append(now - self.up_since)
                    self.up_s += now - self.up_since
                    self.up_since = None
            if on_connection is not None:
                on_connection(up)

        def sent(topic: str, payload: bytes, *args: Any, **kwargs: Any) -> Any:
            if topic.endswith(("/update", "/pull")):
                msg = decode(payload)
                with self._lock:
                    if isinstance(msg, Update):
                        self.sent_updates[msg.seq] = msg.nonce
                        self.nonces.add(msg.nonce)
                        self.update_seqs.append(msg.seq)
                    elif isinstance(msg, Pull):
                        self.pull_seqs.append(msg.seq)
            return publish(topic, payload, *args, **kwargs)

        transport._on_connection = connection
        transport.publish = sent  # type: ignore[method-assign]
        client.on("*", self._note)

    def _note(self, kind: str, data: dict[str, Any]) -> None:
        with self._lock:
            self.notes[kind] += 1
            if kind == "update_acked":
                self.acked.append({"seq": data["seq"], "status": data["status"], "nonce": self.sent_updates.get(data["seq"])})

    def connected_s(self, now: float) -> float:
        with self._lock:
            return self.up_s + (now - self.up_since if self.up_since is not None else 0.0)


def measure(seconds: float, tls: bool, label_every: float) -> dict[str, Any]:
    task = get_task("digits")
    lines = Lines()
    logging.getLogger().addHandler(lines)
    logging.getLogger().setLevel(logging.INFO)
    persisted: list[tuple[str, int, int, str]] = []
    consumed: list[tuple[str, int]] = []
    handle = CoordinatorCore.handle

    def recording(core: CoordinatorCore, event: Any) -> Any:
        actions = handle(core, event)
        for a in actions:
            if isinstance(a, PersistUpdate):
                u = a.update
                persisted.append((u.device, u.seq, u.nonce, hashlib.sha256(u.weights.tobytes()).hexdigest()[:16]))
            elif isinstance(a, CommitVersion):
                consumed.extend(a.consumed)
        return actions

    CoordinatorCore.handle = recording  # type: ignore[method-assign]
    tmp = Path(tempfile.mkdtemp(prefix="dup-"))
    secure = None
    if tls:
        from tests.secure_broker import SECURE_REGION, SecureBroker

        secure = SecureBroker(tmp / "pki")
        url, region = secure.url, SECURE_REGION
        options: dict[str, Any] = {"coordinator_id": "coord-sec", "bundle": secure.bundle("coord-sec", "coordinator")}
        bundle: Path | None = secure.bundle("devA")
        device = "devA"
    else:
        broker = MosquittoProcess().start()
        url, region, options, bundle, device = broker.url, "dup", {}, None, DEVICE
    daemon = CoordinatorDaemon(CoordinatorOptions(broker=url, region=region, state_dir=tmp / "c",
                                                  strategy_params={"k": 1, "timeout_s": None}, **options), task=task).start()
    pool = task.data().pool

    def client(data_dir: Path) -> EdgeClient:
        return EdgeClient(broker=url, device_id=device, region=region, task=task, data_dir=data_dir, min_samples=4,
                          train=TrainConfig(epochs=1, lr=0.05, seed=0), request_timeout_s=3.0, refresh_s=None,
                          inference="torch", bundle=bundle)

    try:
        first = client(tmp / "a")
        done = threading.Event()
        first.on("update_acked", lambda kind, data: done.set())
        for i in range(4):
            first.add_sample(pool.x[i], int(pool.y[i]))
        first.start()
        if not done.wait(60):
            raise RuntimeError("A's first round was not acknowledged in 60 s")
        first.stop()
        shutil.copytree(tmp / "a", tmp / "b")  # the cloned image
        before = dict(daemon.core.counters)
        persisted_before = len(persisted)
        instances = [Instance("A", client(tmp / "a")), Instance("B", client(tmp / "b"))]
        stored_before = [inst.client.store.count() if hasattr(inst.client.store, "count") else None for inst in instances]
        t0 = time.monotonic()
        for inst in instances:
            inst.client.start()
        labelled = [0, 0]
        offset = [100, 1100]
        next_label = t0
        while (now := time.monotonic()) < t0 + seconds:
            if now >= next_label:
                for j, inst in enumerate(instances):
                    k = offset[j] + labelled[j]
                    inst.client.add_sample(pool.x[k], int(pool.y[k]))
                    labelled[j] += 1
                next_label += label_every
            time.sleep(0.05)
        end = time.monotonic()
        rows = []
        taken = persisted[persisted_before:]
        taken_nonces = Counter(n for _, _, n, _ in taken)
        for j, inst in enumerate(instances):
            acked_ok = [a for a in inst.acked if a["status"] in ("accepted", "duplicate")]
            lost = [a for a in acked_ok if a["nonce"] not in taken_nonces]
            rows.append({
                "instance": inst.name, "connections": inst.ups, "dropped": inst.downs,
                "connected_pct": round(100 * inst.connected_s(end) / (end - t0), 1),
                "lasted_s": [round(min(inst.lasted), 2), round(sorted(inst.lasted)[len(inst.lasted) // 2], 2),
                             round(max(inst.lasted), 2)] if inst.lasted else None,
                "labelled": labelled[j], "stored_before": stored_before[j],
                "stored": inst.client.store.count() if hasattr(inst.client.store, "count") else None,
                "pulls_sent": len(inst.pull_seqs), "updates_sent": len(inst.update_seqs),
                "updates_acked_ok": len(acked_ok), "acked_ok_not_its_own": len(lost),
                "its_updates_taken": sum(1 for n in inst.nonces if n in taken_nonces),
                "notes": dict(inst.notes), "core_counters": dict(inst.client.core.state.counters),
                "seq_conflicts": inst.client.core.state.seq_conflicts,
                "duplicate": getattr(inst.client.core.state, "duplicate_id", None),
            })
        after = dict(daemon.core.counters)
        delta = {k: after.get(k, 0) - before.get(k, 0) for k in sorted(set(after) | set(before)) if after.get(k, 0) != before.get(k, 0)}
        weights = Counter(w for *_, w in taken)
        keys = Counter(consumed)
        result = {
            "seconds": seconds, "tls": tls, "instances": rows, "coordinator_counters": delta,

            "updates_taken": len(taken), "nonce_taken_twice": sum(1 for c in taken_nonces.values() if c > 1),
            "weights_taken_twice": sum(1 for c in weights.values() if c > 1),
            "key_consumed_twice": sum(1 for c in keys.values() if c > 1),
            "version": daemon.core.status().version,
            "log_lines": dict(lines.counts),
            "log_samples": lines.samples,
        }
        for inst in instances:
            inst.client.stop()
        return result
    finally:
        daemon.stop()
        if secure is not None:
            secure.stop()
        else:
            broker.stop()
        CoordinatorCore.handle = handle  # type: ignore[method-assign]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--tls", action="store_true", help="the production TLS + ACL broker, both clones with one bundle")
    p.add_argument("--label-every", type=float, default=2.0, help="seconds between two labels on each clone")
    args = p.parse_args()
    print(json.dumps(measure(args.seconds, args.tls, args.label_every)), flush=True)


if __name__ == "__main__":
    main()
