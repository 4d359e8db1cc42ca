"""What mosquitto's in-flight window costs: a stalled subscriber's memory, and the update
stream's throughput, with and without ``max_inflight_bytes``, in one run.

    .venv/bin/python benchmarks/inflight_window.py [--model-mb 1] [--variants 0,4194304] [--rounds 3]

Each variant is a fresh mosquitto on 127.0.0.1 with ``edgeci.conf`` and the production
configs' queue bounds for a ``--model-mb`` model (``max_packet_size`` and ``max_queued_bytes``
as :func:`coordinator.broker.secure_conf` sets them), plus ``max_inflight_bytes VARIANT``
(0: mosquitto's default, no byte limit; the 64-message window of the shipped configs holds).

1. stalled: a client with a persistent session subscribes (QoS 1) to a device's model topic
   and never reads its socket again; a publisher sends ``--stalled-messages`` models to it.
   mosquitto's RSS (``VmRSS``) before, and 2 s after the last publish was acknowledged.
2. flow: ``--publishers`` clients each publish ``--messages`` models (QoS 1) to update
   topics that one subscriber reads as the coordinator does (``own_loop``, an actor that
   spends ``--handle-ms`` on each message, PUBACKs at the batch's end): messages/s from the
   first publish to the last message handled.

Variants alternate over ``--rounds`` (so drift on a shared machine hits each); medians.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._cli import (  # noqa: E402
    comma_list,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)
from coordinator.broker import MosquittoProcess, inflight_limit, packet_limit, queue_limit  # noqa: E402
from edge_sdk.mqtt import MqttTransport  # noqa: E402
from edge_sdk.runtime import Actor  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _packet(kind: int, body: bytes) -> bytes:
    n, length = len(body), b""
    while True:
        n, digit = n >> 7, n & 0x7F
        length += bytes([digit | (0x80 if n else 0)])
        if not n:
            return bytes([kind]) + length + body


def _utf8(s: str) -> bytes:
    return struct.pack("!H", len(s)) + s.encode()


def stalled_subscriber(port: int, client_id: str, topic: str) -> socket.socket:
    """CONNECT (clean session 0, no keepalive) + SUBSCRIBE QoS 1, then never read again."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65_536)
    s.connect(("127.0.0.1", port))
    s.sendall(_packet(0x10, _utf8("MQTT") + bytes([4, 0]) + struct.pack("!H", 0) + _utf8(client_id)))
    assert s.recv(4)[:2] == b"\x20\x02"
    s.sendall(_packet(0x82, struct.pack("!H", 1) + _utf8(topic) + b"\x01"))
    assert s.recv(5)[:1] == b"\x90"
    return s


def publisher(url: str, client_id: str) -> MqttTransport:
    t = MqttTransport(url, client_id=client_id, subscriptions=[], clean_session=True, on_message=lambda t, p: None)
    t.start(15)
    return t


def wait_sent(t: MqttTransport, timeout: float) -> None:
    """Until every QoS 1 message ``t`` published is acknowledged by the broker."""
    deadline = time.monotonic() + timeout
    while t._client._out_messages:  # paho's table of unacknowledged messages (threaded transport)
        if time.monotonic() > deadline:
            raise RuntimeError("publishes not acknowledged in time")
        time.sleep(0.05)


def stalled(broker: MosquittoProcess, payload: bytes, n: int) -> tuple[float, float]:
    assert broker._proc is not None
    pid = broker._proc.pid
    sock = stalled_subscriber(broker.port, "dev-stalled", "edgeci/v1/bench/dev/dev-stalled/model")
    pub = publisher(broker.url, "coord-bench")
    try:
        time.sleep(0.5)
        before = rss_mb(pid)
        for _ in range(n):
            pub.publish("edgeci/v1/bench/dev/dev-stalled/model", payload)
        wait_sent(pub, 300)
        time.sleep(2.0)
        return before, rss_mb(pid)
    finally:
        pub.stop()
        sock.close()


def flow(broker: MosquittoProcess, payload: bytes, publishers: int, messages: int, handle_s: float) -> float:
    total = publishers * messages
    done = threading.Event()
    count = [0]

    def handle(event: Any) -> list[Any]:
        if handle_s:
            end = time.perf_counter() + handle_s  # busy, as decoding and checking an update is
            while time.perf_counter() < end:
                pass
        count[0] += 1
        if count[0] == total:
            done.set()
        return []

    sink = MqttTransport(broker.url, client_id="coord-sink", subscriptions=["edgeci/v1/bench/dev/+/update"],
                         clean_session=True, on_message=lambda topic, p: actor.submit(lambda now: p), own_loop=True)
    actor = Actor("sink", handle, lambda action: None, io=sink)
    actor.start()
    sink.start(15)
    pubs = [publisher(broker.url, f"dev-{i}") for i in range(publishers)]
    try:
        time.sleep(0.3)
        t0 = time.perf_counter()
        threads = [threading.Thread(target=lambda p=p, i=i: [p.publish(f"edgeci/v1/bench/dev/dev-{i}/update", payload)
                                                             for _ in range(messages)]) for i, p in enumerate(pubs)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        if not done.wait(120):
            raise RuntimeError(f"only {count[0]} of {total} messages arrived")
        return total / (time.perf_counter() - t0)
    finally:
        for p in pubs:
            p.stop()
        sink.stop()
        actor.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-mb", type=positive_float, default=1.0, help="model size in MiB (default 1)")
    p.add_argument("--variants", type=comma_list(non_negative_int), default=None,
                   help="max_inflight_bytes values to compare (0: none; default 0 and what secure_conf sets for --model-mb)")
    p.add_argument("--stalled-messages", type=positive_int, default=400, help="models sent to the stalled subscriber (default 400)")
    p.add_argument("--publishers", type=positive_int, default=4, help="update publishers in the flow (default 4)")
    p.add_argument("--messages", type=positive_int, default=40,
                   help="updates per publisher (default 40: the burst stays under max_queued_bytes, beyond which mosquitto drops)")
    p.add_argument("--handle-ms", type=non_negative_float, default=2.0, help="the subscriber's work per message, ms (default 2)")
    p.add_argument("--rounds", type=positive_int, default=3, help="rounds, variants alternating (default 3)")
    args = p.parse_args()
    model_bytes = int(args.model_mb * (1 << 20))
    if args.variants is None:
        args.variants = [0, inflight_limit(model_bytes)]
    payload = bytes(model_bytes)
    conf = f"max_queued_bytes {queue_limit(model_bytes)}\n"
    results: dict[int, dict[str, list[float]]] = {v: {"before": [], "after": [], "rate": []} for v in args.variants}
    for r in range(args.rounds):
        order = args.variants if r % 2 == 0 else args.variants[::-1]
        for v in order:
            with MosquittoProcess(model_bytes=model_bytes, extra_conf=conf + f"max_inflight_bytes {v}\n") as broker:
                before, after = stalled(broker, payload, args.stalled_messages)
            with MosquittoProcess(model_bytes=model_bytes, extra_conf=conf + f"max_inflight_bytes {v}\n") as broker:
                rate = flow(broker, payload, args.publishers, args.messages, args.handle_ms / 1e3)
            print(f"round {r} max_inflight_bytes {v}: stalled RSS {before:.0f} -> {after:.0f} MB; flow {rate:.1f} msg/s", flush=True)
            results[v]["before"].append(before)
            results[v]["after"].append(after)
            results[v]["rate"].append(rate)
    print(f"model {args.model_mb:g} MiB: max_packet_size {packet_limit(model_bytes)}, max_queued_bytes {queue_limit(model_bytes)}, "
          f"max_inflight_messages 64; {args.stalled_messages} models to the stalled subscriber; flow "
          f"{args.publishers}x{args.messages} updates, {args.handle_ms:g} ms each")
    print(f"{'max_inflight_bytes':>20s} {'RSS before':>11s} {'RSS after':>10s} {'flow msg/s':>11s}  (medians; all rates)")
    for v, res in results.items():
        print(f"{v:20d} {statistics.median(res['before']):11.0f} {statistics.median(res['after']):10.0f} "
              f"{statistics.median(res['rate']):11.1f}  {', '.join(f'{x:.1f}' for x in res['rate'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
