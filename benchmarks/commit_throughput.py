"""Accepted updates per second through the coordinator's real driver path, no broker.

The real :class:`~coordinator.daemon.CoordinatorDaemon` (core + registry + actor + group
commit) with its MQTT transport replaced by a fake that counts ``accepted`` acks. A burst of
digits-model updates from many devices is handed to the daemon exactly as paho would
(``daemon._on_message``), and the clock runs until every update is acknowledged as accepted.
Every variant is fsync-durable (an ack leaves only after its update is on disk). Compared in
one run, on the same disk:

* ``per-update files`` — the path before group commit: one file per update, written
  aside, fsynced, renamed, directory fsynced (2 fsyncs), then the ack; a version directory
  with 4 fsyncs per commit;
* ``per-update log``   — the append-only log, one event per batch: one fsync per update
  (a commit goes into the log with the updates before it);
* ``group commit``     — the actor drains up to ``max_batch`` events: one fsync per batch
  (or per commit inside a batch, the batch's updates riding along). Updates that a version of
  the same write applies are not written (the version record, durable with the same fsync,
  carries their watermarks); the checkpoint every 16 versions (4 fsyncs) is done by the
  registry's pruning thread, which the committing thread never waits for.

The baseline is the per-update files path; the last line checks the targets: group commit
≥ 4× the per-update files path and ≥ 2,000 accepted/s. The state directories (21–27 MB) are
removed afterwards, unless ``--dir`` names where to put them: then they are kept.

    python benchmarks/commit_throughput.py [--updates 4000] [--devices 200] [--k 10] [--dir DIR]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._cli import existing_dir, positive_int
from coordinator.daemon import CoordinatorDaemon, CoordinatorOptions
from coordinator.registry import Registry
from edge_sdk.tasks import get_task
from edge_sdk.wire import topics
from edge_sdk.wire.codec import decode, encode
from edge_sdk.wire.messages import Ack, Update

REGION = "bench"


class CountingTransport:
    """Stands in for MqttTransport: keeps the acks, drops everything else. Acks are decoded
    after the clock stops (:meth:`tally`): decoding them is the devices' work, not the
    coordinator's (it cost ~6 % of the actor's time when done inside ``publish``)."""

    connected = False

    def __init__(self, expect: int) -> None:
        self.expect = expect
        self.acks: list[bytes] = []
        self.accepted = 0
        self.other_acks = 0
        self.done = threading.Event()

    def hold_ack(self) -> tuple[int, int, int]:
        return (0, 1, 1)  # a QoS 1 message, as the broker delivers updates: acknowledged at the batch's end

    def ack(self, held: object) -> None:
        pass

    def redeliver(self) -> None:
        pass

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        if topic.endswith("/ack"):
            self.acks.append(payload)
            if len(self.acks) >= self.expect:
                self.done.set()

    def tally(self) -> None:
        for payload in self.acks:
            ack = decode(payload)
            assert isinstance(ack, Ack)
            if ack.status == "accepted":
                self.accepted += 1
            else:
                self.other_acks += 1

    def start(self, timeout: float = 0.0) -> None:
        pass

    def stop(self) -> None:
        pass


def make_updates(n: int, devices: int, weights: np.ndarray, model_id: str) -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        device = f"d{i % devices:04d}"
        w = weights + rng.normal(0, 1e-3, weights.shape).astype(np.float32)
        msg = Update(device=device, seq=i // devices + 1, model_id=model_id, base_version=0, n_samples=8, weights=w)
        out.append((topics.device_topic(REGION, device, "update"), encode(msg)))
    return out


def run(variant: str, messages: list[tuple[str, bytes]], state_dir: Path, k: int) -> dict[str, Any]:
    task = get_task("digits")
    daemon = CoordinatorDaemon(
        CoordinatorOptions(require_pull=False,
            broker="mqtt://127.0.0.1:1", region=REGION, state_dir=state_dir,
            strategy_params={"k": k, "timeout_s": 3600.0}, max_batch=1 if variant != "group commit" else 256,
        ),
        task=task,
    )
    fake = CountingTransport(len(messages))
    daemon.transport = fake  # type: ignore[assignment]
    if variant == "per-update files":  # the path before group commit, as it was
        registry = daemon.registry

        def one_file_each(batch: Any) -> None:
            for u in batch:
                registry.persist_update_file(u)

        applied: dict[str, int] = {}
        seen: dict[str, None] = {}

        def commit_with_fsyncs(action: Any) -> None:  # full watermarks in every version, as then
            applied.update(action.applied_changed)
            seen.update(dict.fromkeys(action.devices_added))
            meta = {**action.metadata, "applied_upto": dict(applied), "devices_seen": list(seen),
                    "consumed": [list(k) for k in action.consumed]}
            registry.write_version(action.version, action.weights, meta)  # 4 fsyncs
            registry._drop_applied()

        daemon.registry.append_updates = one_file_each  # type: ignore[method-assign,assignment]
        daemon.registry.stage = one_file_each  # type: ignore[method-assign,assignment]
        daemon.registry.commit = commit_with_fsyncs  # type: ignore[method-assign]
        daemon.registry.stage_version = lambda action: None  # type: ignore[method-assign]
    daemon.actor.start()
    daemon.actor.call(lambda: daemon.actor.run_actions(daemon.core.start(daemon.clock.now())))
    t0 = time.perf_counter()
    for topic, payload in messages:
        daemon._on_message(topic, payload)
    ok = fake.done.wait(600)
    seconds = time.perf_counter() - t0
    batches = daemon.actor.batches
    version = daemon.core.version
    daemon.stop()
    fake.tally()
    assert ok and not daemon.actor.errors, (len(fake.acks), daemon.actor.errors[:3])
    assert fake.accepted == len(messages) and not fake.other_acks, (fake.accepted, fake.other_acks)
    # durability check: every accepted update is in the state dir, applied or pending
    snap = Registry(state_dir, task.spec).load()
    assert snap is not None
    pending = {u.key for u in snap.buffer}
    for _topic, payload in messages:
        msg = decode(payload)
        assert isinstance(msg, Update)
        assert msg.seq <= snap.applied_upto.get(msg.device, -1) or (msg.device, msg.seq) in pending
    return {"variant": variant, "rate": len(messages) / seconds, "seconds": seconds, "batches": batches, "version": version}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--updates", type=positive_int, default=4000, help="digits updates in the burst (default 4000)")
    p.add_argument("--devices", type=positive_int, default=200, help="devices the updates come from, in turn (default 200)")
    p.add_argument("--k", type=positive_int, default=10, help="SPIN aggregates every K updates (a commit: 4 fsyncs; default 10)")
    p.add_argument("--dir", type=existing_dir, default=None,
                   help="an existing directory to put the state dirs under, kept afterwards (default: a temporary "
                        "dir on /tmp's disk, removed afterwards)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    task = get_task("digits")
    weights = task.pretrained(seed=0)
    messages = make_updates(args.updates, args.devices, weights, task.spec.model_id)
    root = Path(tempfile.mkdtemp(prefix="commit-bench-", dir=args.dir))
    kept = "kept afterwards" if args.dir is not None else "removed afterwards"
    print(f"{args.updates} digits updates ({task.spec.size} params, {len(messages[0][1])} B each) from "
          f"{args.devices} devices, SPIN K={args.k}, state dirs under {root} ({kept})")
    results = []
    try:
        for i, variant in enumerate(("per-update files", "per-update log", "group commit")):
            r = run(variant, messages, root / f"s{i}", args.k)
            results.append(r)
            print(f"  {variant:17s} {r['rate']:8.0f} accepted/s  ({r['seconds']:.2f} s, {r['batches']} batches, v{r['version']})")
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    base, log_only, group = (r["rate"] for r in results)
    print(f"group commit vs per-update files: {group / base:.1f}x ; vs per-update log: {group / log_only:.1f}x ; "
          f"{group:.0f} accepted/s")
    ok_ratio, ok_rate = group >= 4 * base, group >= 2000
    print(f"targets: >= 4x per-update files {'met' if ok_ratio else 'NOT met'} ; "
          f">= 2,000 accepted/s {'met' if ok_rate else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
