"""What TLS + client certificates + the ACL cost, against plaintext, on the same machine.

    .venv/bin/python benchmarks/tls_overhead.py [--pulls 2000] [--concurrency 32] [--big-mb 47] [--reps 3] [--rounds 3]

Two mosquitto processes started here on 127.0.0.1: the plain ``edgeci.conf`` (anonymous)
and the production ``edgeci-secure.conf`` (TLS, client certificates made by
``coordinator/pki.py``, identity as username, the generated ACL). Against each, in turn:

1. a coordinator daemon (in this process, digits model, SPIN) and a load client that
   publishes pulls and waits for the model replies: p50/p95 latency of one pull at a time,
   and pulls/s with ``--concurrency`` pulls in flight;
2. a ``--big-mb`` MB model: a coordinator identity publishes it to a device's ``model`` topic,
   the device receives it; median of ``--reps`` transfers;
3. connect time (TCP + TLS handshake + CONNACK) of one client.

Plain and TLS rounds alternate (``--rounds``) and each figure is the median over rounds.

The load client publishes on many device ids (the coordinator rate-limits each device's
model replies, so one id cannot be driven at full speed); on the TLS broker it holds a
``loadgen`` identity that the benchmark's ACL lets write ``dev/+/pull`` and read
``dev/+/model`` (the ACL is still checked on every message). Ratios are TLS / plain.
"""

from __future__ import annotations

import argparse
import logging
import queue
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._cli import positive_float, positive_int  # noqa: E402
from coordinator.broker import MosquittoProcess  # noqa: E402
from coordinator.daemon import CoordinatorDaemon, CoordinatorOptions  # noqa: E402
from coordinator.pki import Pki, acl_text  # noqa: E402
from edge_sdk.modelio import save_model  # noqa: E402
from edge_sdk.mqtt import BrokerAuth, MqttTransport  # noqa: E402
from edge_sdk.tasks import get_task  # noqa: E402
from edge_sdk.wire import topics  # noqa: E402
from edge_sdk.wire.codec import decode, encode  # noqa: E402
from edge_sdk.wire.messages import ModelMsg, Pull  # noqa: E402

REGION = "bench"
COORD = "coord-bench"


@dataclass
class Setup:
    name: str
    broker: MosquittoProcess
    coordinator_bundle: Path | None = None
    auth: dict[str, BrokerAuth | None] | None = None

    def creds(self, who: str) -> BrokerAuth | None:
        return None if self.auth is None else self.auth[who]


@contextmanager
def plain_setup(model_bytes: int) -> Iterator[Setup]:
    broker = MosquittoProcess(model_bytes=model_bytes).start()
    try:
        yield Setup("plain", broker)
    finally:
        broker.stop()


@contextmanager
def tls_setup(tmp: Path, model_bytes: int) -> Iterator[Setup]:
    pki = Pki.init(tmp / "pki")
    pki.issue("broker", "broker")
    pki.issue(COORD, "coordinator", regions=[REGION])
    pki.issue("loadgen", "device", regions=[REGION])
    pki.issue("dev-big", "device", regions=[REGION])
    # loadgen speaks for many device ids (see the module docstring); everyone else as generated
    acl = acl_text(i for i in pki.identities.values() if i.name != "loadgen")
    acl += (f"user loadgen\ntopic write edgeci/v1/{REGION}/dev/+/pull\ntopic read edgeci/v1/{REGION}/dev/+/model\n"
            f"topic read edgeci/v1/{REGION}/dev/+/ack\n")
    acl_file = tmp / "bench.acl"
    acl_file.write_text(acl)
    b = pki.bundle_dir("broker")
    broker = MosquittoProcess(tls=True, cafile=pki.ca_cert_path, certfile=b / "broker.crt", keyfile=b / "broker.key",
                              acl_file=acl_file, model_bytes=model_bytes).start()
    auth = {who: BrokerAuth.from_bundle(pki.bundle_dir(who)) for who in (COORD, "loadgen", "dev-big")}
    try:
        yield Setup("tls", broker, pki.bundle_dir(COORD), auth)  # type: ignore[arg-type]
    finally:
        broker.stop()


class LoadClient:
    """Publishes pulls for many device ids and times each model reply."""

    def __init__(self, url: str, auth: BrokerAuth | None, model_id: str, tag: str) -> None:
        self.model_id = model_id
        self.tag = tag
        self.replies: queue.Queue[tuple[str, float, bytes]] = queue.Queue()
        self.t = MqttTransport(url, client_id=f"loadgen-{tag}", clean_session=True, auth=auth,
                               subscriptions=[topics.device_filter(REGION, "model")],
                               on_message=lambda topic, p: self.replies.put((topic, time.perf_counter(), p)))
        self.t.start(15)
        self.seq: dict[str, int] = {}

    def send(self, device: str) -> float:
        seq = self.seq[device] = self.seq.get(device, 0) + 1
        payload = encode(Pull(device=device, seq=seq, model_id=self.model_id))
        t0 = time.perf_counter()
        self.t.publish(topics.device_topic(REGION, device, "pull"), payload)
        return t0

    def run(self, total: int, concurrency: int, phase: str) -> tuple[list[float], float]:
        """``total`` pulls, ``concurrency`` in flight, each device id used ≤ 4 times (its
        token bucket allows 8 at once). Returns per-pull latencies and the wall time."""
        n_ids = max(concurrency, (total + 3) // 4)
        ids = [f"{self.tag}-{phase}-{i:05d}" for i in range(n_ids)]
        pending: dict[str, float] = {}
        latencies: list[float] = []
        next_id = 0
        start = time.perf_counter()
        checked = False
        while len(latencies) < total:
            while len(pending) < concurrency and len(latencies) + len(pending) < total:
                device = ids[next_id % n_ids]
                next_id += 1
                if device in pending:
                    continue
                pending[device] = self.send(device)
            try:
                topic, t1, payload = self.replies.get(timeout=20)
            except queue.Empty as exc:
                raise RuntimeError(f"{self.tag}: no model reply within 20 s ({len(pending)} pulls pending)") from exc
            device = topic.split("/")[-2]
            sent = pending.pop(device, None)
            if sent is None:
                continue
            if not checked:  # the replies are real models with weights
                msg = decode(payload)
                assert isinstance(msg, ModelMsg) and msg.weights.size > 0, msg
                checked = True
            latencies.append(t1 - sent)
        return latencies, time.perf_counter() - start

    def close(self) -> None:
        self.t.stop()


def big_transfer(setup: Setup, payload: bytes, reps: int) -> list[float]:
    topic = topics.device_topic(REGION, "dev-big", "model")
    got: queue.Queue[float] = queue.Queue()
    sub = MqttTransport(setup.broker.url, client_id="big-sub", subscriptions=[topic], clean_session=True,
                        on_message=lambda t, p: got.put(time.perf_counter()), auth=setup.creds("dev-big"))
    pub = MqttTransport(setup.broker.url, client_id="big-pub", subscriptions=[], clean_session=True,
                        on_message=lambda t, p: None, auth=setup.creds(COORD))
    sub.start(15)
    pub.start(15)
    time.sleep(0.3)  # the subscription is made in the connect handler
    times = []
    try:
        for _ in range(reps):
            t0 = time.perf_counter()
            pub.publish(topic, payload)
            times.append(got.get(timeout=120) - t0)
    finally:
        pub.stop()
        sub.stop()
    return times


def connect_time(setup: Setup, reps: int = 5) -> float:
    out = []
    for i in range(reps):
        t = MqttTransport(setup.broker.url, client_id=f"conn-{i}", subscriptions=[], clean_session=True,
                          on_message=lambda t, p: None, auth=setup.creds("dev-big"))
        t0 = time.perf_counter()
        t.start(15)
        out.append(time.perf_counter() - t0)
        t.stop()
    return statistics.median(out)


def measure(setup: Setup, *, init: Path, state: Path, model_id: str, args: argparse.Namespace, big: bytes) -> dict[str, float]:
    daemon = CoordinatorDaemon(
        CoordinatorOptions(broker=setup.broker.url, region=REGION, state_dir=state, coordinator_id=COORD,
                           init=init, strategy_params={"k": 10, "timeout_s": 30.0}, bundle=setup.coordinator_bundle),
    ).start()
    load = LoadClient(setup.broker.url, setup.creds("loadgen"), model_id, setup.name)
    try:
        load.run(200, 8, "warm")
        seq_lat, _ = load.run(args.latency_pulls, 1, "seq")
        conc_lat, wall = load.run(args.pulls, args.concurrency, "conc")
    finally:
        load.close()
        daemon.stop()
    big_times = big_transfer(setup, big, args.reps)
    return {
        "pull_p50_ms": 1e3 * statistics.median(seq_lat),
        "pull_p95_ms": 1e3 * float(np.percentile(seq_lat, 95)),
        "pulls_per_s": args.pulls / wall,
        "loaded_p50_ms": 1e3 * statistics.median(conc_lat),
        "big_s": statistics.median(big_times),
        "connect_ms": 1e3 * connect_time(setup),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pulls", type=positive_int, default=2000, help="pulls in the throughput phase (default 2000)")
    p.add_argument("--latency-pulls", type=positive_int, default=300,
                   help="pulls one at a time for the latency percentiles (default 300)")
    p.add_argument("--concurrency", type=positive_int, default=32,
                   help="pulls in flight in the throughput phase (default 32)")
    p.add_argument("--big-mb", type=positive_float, default=47.0,
                   help="size in MB of the big model sent to one device (default 47)")
    p.add_argument("--reps", type=positive_int, default=3, help="big transfers per round (default 3)")
    p.add_argument("--rounds", type=positive_int, default=3,
                   help="plain/TLS rounds, interleaved; medians are reported (default 3)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    task = get_task("digits")
    weights = task.pretrained(seed=0)
    big = np.random.default_rng(0).bytes(int(args.big_mb * 1e6))
    model_bytes = max(len(big), weights.nbytes)
    with tempfile.TemporaryDirectory(prefix="edgeci-tls-bench-") as tmp_s:
        tmp = Path(tmp_s)
        init = tmp / "deployed.npz"
        save_model(init, task.spec, weights, {"version": 0})
        runs: dict[str, list[dict[str, float]]] = {"plain": [], "tls": []}
        for r in range(args.rounds):  # interleaved, so that drift on a shared machine hits both
            with plain_setup(model_bytes) as setup:
                runs["plain"].append(measure(setup, init=init, state=tmp / f"plain-{r}", model_id=task.spec.model_id, args=args, big=big))
            with tls_setup(tmp / f"tls-{r}", model_bytes) as setup:
                runs["tls"].append(measure(setup, init=init, state=tmp / f"tls-state-{r}", model_id=task.spec.model_id, args=args, big=big))
        results = {name: {k: statistics.median(run[k] for run in rs) for k in rs[0]} for name, rs in runs.items()}

    rows = [
        ("pull latency p50, one at a time (ms)", "pull_p50_ms"),
        ("pull latency p95, one at a time (ms)", "pull_p95_ms"),
        (f"pulls/s, {args.concurrency} in flight", "pulls_per_s"),
        (f"pull latency p50, {args.concurrency} in flight (ms)", "loaded_p50_ms"),
        (f"{args.big_mb:g} MB model transfer (s, median of {args.reps})", "big_s"),
        ("connect: TCP (+TLS handshake) + CONNACK (ms)", "connect_ms"),
    ]
    print(f"digits model: {weights.nbytes / 1e3:.1f} kB of float32 weights; mosquitto plain vs TLS (client certs + ACL), 127.0.0.1")
    print(f"{'':52s} {'plain':>10s} {'TLS':>10s} {'TLS/plain':>10s}")
    for label, key in rows:
        a, b = results["plain"][key], results["tls"][key]
        print(f"{label:52s} {a:10.2f} {b:10.2f} {b / a:10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
