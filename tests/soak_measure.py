"""Soak a real ``edgeci coordinator`` process with a churning fleet and hostile clients, against a
real mosquitto, and sample what could grow without bound (helper-178's audit).

    .venv/bin/python -m tests.soak_measure --minutes 10

Devices come and go (new ids, and ids that return with their data dir), label a sample every
``--label-every`` s, train one cheap epoch and push; hostile clients publish garbage, oversized
payloads, messages on wrong topics, forged updates and pull floods. Every ``--sample-every`` s it
records the coordinator's RSS, open fds, threads, its state dir's size and file count, its /metrics
counters and the broker's RSS. Prints the table, then each column's growth per hour (least-squares
slope over the samples after the first ``--warmup`` s, times 3600), then one JSON line of the same.
``--broker-sessions N`` measures instead what mosquitto keeps for each device id that connected
once, with clean and with persistent sessions.
Not collected by pytest (no ``test_`` prefix): the minutes it takes are a measurement, not a test.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import tracemalloc
import urllib.request
from pathlib import Path
from typing import Any, Self

import numpy as np
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from coordinator.broker import MosquittoProcess, free_port
from edge_sdk.client import EdgeClient
from edge_sdk.tasks import get_task
from edge_sdk.tasks.base import TrainConfig
from edge_sdk.wire import topics
from edge_sdk.wire.codec import encode
from edge_sdk.wire.messages import Pull, Update
from tests.helpers import CoordinatorProcess

REGION = "soak"
ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("edgeci.soak")


def proc_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def dir_usage(path: Path) -> tuple[int, int]:
    """Bytes and files under ``path`` (a file removed mid-walk is skipped)."""
    size = files = 0
    for root, _, names in os.walk(path):
        for name in names:
            try:
                size += (Path(root) / name).stat().st_size
                files += 1
            except FileNotFoundError:
                pass
    return size, files


LABELLED = ("edgeci_rejections_total", "edgeci_problems_total", "edgeci_pulls_total", "edgeci_updates_total")


def breakdown(path: Path) -> dict[str, list[int]]:
    """Bytes and files under ``path`` by name with its digits folded (``v000123.npz`` -> ``v#.npz``):
    which kind of file the state dir's growth is."""
    out: dict[str, list[int]] = {}
    for root, _, names in os.walk(path):
        for name in names:
            key = re.sub(r"[0-9]+", "#", str((Path(root) / name).relative_to(path)))
            try:
                size = (Path(root) / name).stat().st_size
            except FileNotFoundError:
                continue
            entry = out.setdefault(key, [0, 0])
            entry[0] += size
            entry[1] += 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1][0]))


def scrape(port: int) -> dict[str, float]:
    """Every series summed over its labels, by metric name (histogram buckets left out: their counts
    are in ``_count``), and the ``LABELLED`` ones by label too."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        if name.endswith("_bucket") or name.endswith("_created"):
            continue
        try:
            out[name] = out.get(name, 0.0) + float(value)
        except ValueError:
            continue
        if "{" in name_labels and name in LABELLED:
            out[name_labels] = float(value)
    return out


class Loop:
    """A thread running ``_run`` until :meth:`stop`."""

    def __init__(self, name: str) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        raise NotImplementedError

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)


class Fleet(Loop):
    """Keeps about ``size`` devices alive; each lives ``lifetime`` s, labels, trains and pushes,
    then stops; a replacement is a returning id with probability ``returning``, else a new one."""

    def __init__(self, broker: str, root: Path, *, size: int, lifetime: tuple[float, float], returning: float,
                 label_every: float, seed: int) -> None:
        self.broker, self.root, self.size, self.lifetime = broker, root, size, lifetime
        self.returning, self.label_every = returning, label_every
        self.rng = random.Random(seed)
        self.task = get_task("digits")
        self.pool = self.task.data().pool
        self.alive: dict[str, tuple[EdgeClient, float]] = {}
        self.gone: list[str] = []
        self.started = self.returned = self.acked = self.rejected = self.failed = 0
        self.next_id = 0
        self._lock = threading.Lock()
        super().__init__("fleet")

    def _note(self, kind: str, data: dict[str, Any]) -> None:
        with self._lock:
            if kind == "update_acked":
                self.acked += 1
            elif kind == "update_rejected":
                self.rejected += 1

    def _spawn(self) -> None:
        if self.gone and self.rng.random() < self.returning:
            name = self.gone.pop(self.rng.randrange(len(self.gone)))
            self.returned += 1
        else:
            name = f"churn-{self.next_id:05d}"
            self.next_id += 1
        seed = self.rng.randrange(1 << 30)
        client = EdgeClient(broker=self.broker, device_id=name, region=REGION, task=self.task, data_dir=self.root / name,
                            min_samples=4, train=TrainConfig(epochs=1, batch_size=16, lr=0.05, seed=seed), seed=seed,
                            request_timeout_s=5.0, inference="torch", refresh_s=None)
        client.on("*", self._note)
        try:
            client.start(15.0)
        except Exception:
            log.exception("device %s did not start", name)
            self.failed += 1
            self.gone.append(name)
            return
        self.started += 1
        self.alive[name] = (client, time.monotonic() + self.rng.uniform(*self.lifetime))

    def _run(self) -> None:
        while not self._stop.wait(self.label_every):
            now = time.monotonic()
            for name, (client, until) in list(self.alive.items()):
                if now >= until:
                    del self.alive[name]
                    client.stop()
                    self.gone.append(name)
                    continue
                i = self.rng.randrange(len(self.pool.y))
                client.add_sample(self.pool.x[i], int(self.pool.y[i]))
            while len(self.alive) < self.size and not self._stop.is_set():
                self._spawn()

    def stop(self) -> None:
        super().stop()
        for client, _ in self.alive.values():
            client.stop()
        self.alive.clear()


class Hostile(Loop):
    """One raw MQTT connection per burst (so connections churn too), publishing one kind of
    hostility chosen in turn: garbage on device topics, an oversized update, wrong topics, forged
    updates (well-formed, never pulled, NaN or absurd claims), a pull flood from one id, pulls from
    fresh ids."""

    KINDS = ("garbage", "oversized", "wrong_topic", "forged", "pull_flood", "fresh_ids")

    def __init__(self, host: str, port: int, *, every: float, oversized_bytes: int, seed: int) -> None:
        self.host, self.port, self.every, self.oversized_bytes = host, port, every, oversized_bytes
        self.rng = random.Random(seed)
        self.sent: dict[str, int] = dict.fromkeys(self.KINDS, 0)
        task = get_task("digits")
        self.spec, self.model_id = task.spec, task.spec.model_id
        self.fresh = 0
        super().__init__("hostile")

    def _messages(self, kind: str) -> list[tuple[str, bytes]]:
        rng = self.rng
        dev = f"evil-{rng.randrange(50):02d}"
        if kind == "garbage":
            return [(topics.device_topic(REGION, dev, leaf), rng.randbytes(rng.randrange(1, 2000))) for leaf in ("pull", "update")]
        if kind == "oversized":
            return [(topics.device_topic(REGION, dev, "update"), rng.randbytes(self.oversized_bytes))]
        if kind == "wrong_topic":
            return [(f"edgeci/v1/{REGION}/dev/{dev}/nonsense", b"x"), (f"edgeci/v1/{REGION}/{dev}", b"y"),
                    (f"edgeci/v1/peer/ghost-{rng.randrange(1000)}/beat", rng.randbytes(64)),
                    (topics.device_topic(REGION, dev, "model"), rng.randbytes(128))]
        if kind == "forged":
            weights = np.full(self.spec.size, np.nan if rng.random() < 0.5 else 1e6, dtype=np.float32)
            up = Update(device=dev, seq=rng.randrange(1 << 20), model_id=self.model_id, base_version=rng.randrange(100),
                        n_samples=rng.choice([1, 10**9]), weights=weights, nonce=rng.randrange(1 << 30))
            return [(topics.device_topic(REGION, dev, "update"), encode(up))]
        if kind == "pull_flood":
            return [(topics.device_topic(REGION, dev, "pull"), encode(Pull(device=dev, seq=s, model_id=self.model_id, n_samples=5)))
                    for s in range(100)]
        out = []
        for _ in range(10):
            fresh = f"fresh-{self.fresh:06d}"
            self.fresh += 1
            out.append((topics.device_topic(REGION, fresh, "pull"), encode(Pull(device=fresh, seq=0, model_id=self.model_id, n_samples=5))))
        return out

    def _run(self) -> None:
        n = 0
        while not self._stop.wait(self.every):
            kind = self.KINDS[n % len(self.KINDS)]
            n += 1
            client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"hostile-{n}")
            try:
                client.connect(self.host, self.port)
                client.loop_start()
                infos = [client.publish(t, p, qos=1) for t, p in self._messages(kind)]
                for info in infos:
                    info.wait_for_publish(10)
                self.sent[kind] += len(infos)
            except Exception as exc:  # the broker may drop an oversized publisher: counted as sent nothing
                log.info("hostile %s: %s", kind, exc)
            finally:
                client.disconnect()
                client.loop_stop()


COUNTERS = ("edgeci_devices_seen", "edgeci_problems_total", "edgeci_pulls_total", "edgeci_updates_total", "edgeci_rejections_total",
            "edgeci_messages_rejected_total", "edgeci_aggregations_total", "edgeci_version", "edgeci_buffered_updates")
SHORT = {"edgeci_devices_seen": "seen", "edgeci_problems_total": "problems", "edgeci_pulls_total": "pulls", "edgeci_updates_total": "updates",
         "edgeci_rejections_total": "rejects", "edgeci_messages_rejected_total": "bad_msgs", "edgeci_aggregations_total": "aggs",
         "edgeci_version": "version", "edgeci_buffered_updates": "buffered"}


def traced_growth(folder: Path, first: float, top: int = 15) -> list[str]:
    """The lines whose traced allocations grew most between the first snapshot after the warm-up
    and the last one (``--tracemalloc``)."""
    snaps = sorted(folder.glob("*.snap"))
    if len(snaps) < 2:
        return []
    base = snaps[min(int(first), len(snaps) - 2)]
    old, new = (tracemalloc.Snapshot.load(str(p)) for p in (base, snaps[-1]))
    skip = (tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen importlib._bootstrap*>"))
    stats = new.filter_traces(skip).compare_to(old.filter_traces(skip), "lineno")
    total = sum(s.size_diff for s in stats)
    return [f"traced heap {base.stem} -> {snaps[-1].stem}: {total / 1e6:+.2f} MB", *(str(s) for s in stats[:top])]


def broker_sessions(n: int) -> dict[str, float]:
    """Bytes of broker RSS per device id that connected once, as a device does (will and retained
    presence, its downstream subscriptions), with a clean session and with a persistent one: what
    a broker keeps for every id a churning fleet ever had."""
    out = {}
    for clean in (True, False):
        broker = MosquittoProcess().start()
        try:
            pid = broker._proc.pid if broker._proc is not None else 0
            before = proc_rss_mb(pid)
            for i in range(n):
                device = f"churn-{i:06d}"
                client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"dev-{REGION}-{device}", clean_session=clean)
                presence = topics.device_topic(REGION, device, "presence")
                client.will_set(presence, b"offline", qos=1, retain=True)
                client.connect(broker.host, broker.port)
                client.loop_start()
                client.subscribe([*((topics.device_topic(REGION, device, leaf), 1) for leaf in topics.DOWNSTREAM),
                                  (topics.recall_topic(REGION), 1)])  # (DeviceConfig.region_topics)
                for state in (b"online", b"offline"):
                    client.publish(presence, state, qos=1, retain=True).wait_for_publish(10)
                client.disconnect()
                client.loop_stop()
            out["clean" if clean else "persistent"] = (proc_rss_mb(pid) - before) * 2**20 / n
        finally:
            broker.stop()
    return out


def slope_per_hour(ts: list[float], ys: list[float]) -> float:
    if len(ts) < 2:
        return float("nan")
    return float(np.polyfit(np.asarray(ts), np.asarray(ys), 1)[0] * 3600)


def soak(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="edgeci-soak-"))
    state = work / "state"
    metrics_port = free_port()
    broker = MosquittoProcess().start()
    rows: list[dict[str, float]] = []
    coord = fleet = hostile = None
    try:
        env = None
        if args.tracemalloc:
            (work / "snaps").mkdir()
            env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests' / 'soak_site'}", "OMP_NUM_THREADS": "1",
                   "EDGECI_SOAK_TRACEMALLOC": str(work / "snaps"), "EDGECI_SOAK_TRACEMALLOC_EVERY": str(args.sample_every)}
        coord = CoordinatorProcess("--broker", broker.url, "--region", REGION, "--state-dir", str(state), "--model", "digits",
                                   "--k", "4", "--timeout", "5", "--epochs", "1", "--metrics-port", str(metrics_port),
                                   "--status-interval", "5", *args.coordinator_arg, env=env)
        broker_pid = broker._proc.pid if broker._proc is not None else 0
        fleet = Fleet(broker.url, work / "devices", size=args.devices, lifetime=(args.min_life, args.max_life),
                      returning=args.returning, label_every=args.label_every, seed=args.seed).start()
        hostile = Hostile(broker.host, broker.port, every=args.hostile_every, oversized_bytes=args.oversized_bytes,
                          seed=args.seed).start()
        t0 = time.monotonic()
        end = t0 + args.minutes * 60
        while True:
            now = time.monotonic()
            size, files = dir_usage(state)
            m = scrape(metrics_port)
            row = {"t": now - t0, "rss_mb": proc_rss_mb(coord.pid), "fds": len(os.listdir(f"/proc/{coord.pid}/fd")),
                   "threads": len(os.listdir(f"/proc/{coord.pid}/task")), "state_kb": size / 1024, "state_files": files,
                   "broker_rss_mb": proc_rss_mb(broker_pid), **{SHORT[k]: m.get(k, float("nan")) for k in COUNTERS},
                   "fleet_started": fleet.started, "fleet_returned": fleet.returned}
            rows.append(row)
            print(" ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
            if now >= end or coord.proc.poll() is not None:
                break
            time.sleep(max(0.0, min(args.sample_every, end - time.monotonic())))
        final_metrics = scrape(metrics_port)
        state_breakdown = breakdown(state)
        heap_growth = traced_growth(work / "snaps", args.warmup / args.sample_every) if args.tracemalloc else []
    finally:
        for part in (hostile, fleet):
            if part is not None:
                part.stop()
        exit_code = coord.close() if coord is not None else None
        broker.stop()
        coord_tail = coord.lines[-20:] if coord is not None else []
        shutil.rmtree(work, ignore_errors=True)
    steady = [r for r in rows if r["t"] >= args.warmup] or rows
    growth = {k: slope_per_hour([r["t"] for r in steady], [r[k] for r in steady]) for k in rows[0] if k != "t"}
    # The state dir is a sawtooth (versions pile up until a checkpoint compacts them): a slope over a
    # few teeth is noise, while the peaks of a bounded column do not rise from one half to the next.
    half = len(steady) // 2
    peaks = {k: (max(r[k] for r in steady[:half] or steady), max(r[k] for r in steady[half:])) for k in rows[0] if k != "t"}
    return {"rows": rows, "growth_per_hour": growth, "peaks_first_second_half": peaks, "hostile_sent": hostile.sent if hostile else {},
            "fleet": {"started": fleet.started if fleet else 0, "returned": fleet.returned if fleet else 0,
                      "acked": fleet.acked if fleet else 0, "rejected": fleet.rejected if fleet else 0,
                      "failed_starts": fleet.failed if fleet else 0},
            "state_breakdown": state_breakdown, "heap_growth": heap_growth, "coordinator_exit": exit_code, "coordinator_tail": coord_tail,
            "final_metrics": {k: v for k, v in final_metrics.items() if k.startswith("edgeci_")}}


def print_table(result: dict[str, Any]) -> None:
    rows = result["rows"]
    keys = [k for k in rows[0] if k != "fleet_returned"]
    print("\n" + " ".join(f"{k:>13}" for k in keys))
    for r in rows:
        print(" ".join(f"{r[k]:>13.1f}" for k in keys))
    print("\ngrowth per hour (least-squares slope after warm-up):")
    for k, v in result["growth_per_hour"].items():
        first, second = result["peaks_first_second_half"][k]
        print(f"  {k:>15}: {v:+12.1f}/h   peak {first:.1f} in the first half, {second:.1f} in the second")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--sample-every", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=60.0, help="seconds left out of the growth fit (imports, first models)")
    p.add_argument("--devices", type=int, default=6, help="devices alive at once")
    p.add_argument("--min-life", type=float, default=5.0)
    p.add_argument("--max-life", type=float, default=30.0)
    p.add_argument("--returning", type=float, default=0.3, help="chance a new device is one that left, with its data dir")
    p.add_argument("--label-every", type=float, default=1.0)
    p.add_argument("--hostile-every", type=float, default=1.0)
    p.add_argument("--oversized-bytes", type=int, default=4 << 20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tracemalloc", action="store_true", help="trace the coordinator's allocations (slower) and print "
                   "the lines whose heap grew most after the warm-up (tests/soak_site/sitecustomize.py)")
    p.add_argument("--coordinator-arg", action="append", default=[], help="extra `edgeci coordinator` argument (repeatable)")
    p.add_argument("--broker-sessions", type=int, default=0, metavar="N",
                   help="only measure the broker's bytes per device id (N ids connect once, clean and persistent sessions)")
    args = p.parse_args()
    if args.broker_sessions:
        print(json.dumps({"broker_bytes_per_id": broker_sessions(args.broker_sessions), "ids": args.broker_sessions}))
        return
    # Run in the background (nohup ... &), SIGINT is ignored: SIGTERM stops it through its finally,
    # which stops the coordinator and the broker it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    logging.basicConfig(level=logging.WARNING)
    result = soak(args)
    print_table(result)
    for line in result["heap_growth"]:
        print(line)
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, default=str))


if __name__ == "__main__":
    main()
