"""Measure a device on a shaped link (tests/slow_link.py) against a real mosquitto and a real
coordinator daemon, with a model inflated to ``--mb`` MB.

    .venv/bin/python -m tests.slow_link_measure --mb 4 --up-kbps 1000 --down-kbps 1000 --rtt-ms 500 --limit-s 300

Prints one JSON line: pull (first model deployed) and push (training finished -> update acked)
times, retries, reconnects, bytes forwarded up and down, and the coordinator's counters.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from coordinator.broker import MosquittoProcess
from coordinator.daemon import CoordinatorDaemon, CoordinatorOptions
from edge_sdk.client import EdgeClient
from edge_sdk.spec import ModelSpec, Vector
from edge_sdk.tasks.base import Split, TaskData, TrainConfig, TrainResult
from tests.slow_link import SlowLink


class PaddedTask:
    """Softmax regression on Gaussian blobs, its vector padded with ``pad`` extractor floats
    (moved a little by every local update) so the model has the size of a real one."""

    name = "padded"
    n_classes = 4
    input_shape = (6,)

    def __init__(self, pad: int) -> None:
        dim, c = self.input_shape[0], self.n_classes
        self.spec = ModelSpec.build(f"padded{pad}", [("pad", (pad,), "extractor"), ("w", (dim, c), "classifier"),
                                                     ("b", (c,), "classifier")])
        self.pad = pad
        rng = np.random.default_rng(0)
        centers = rng.normal(0.0, 1.5, (c, dim))
        y = rng.integers(0, c, 600).astype(np.int64)
        x = (centers[y] + rng.normal(0.0, 1.0, (600, dim))).astype(np.float32)
        self._data = TaskData(pretrain=Split(x=x[:20], y=y[:20]), pool=Split(x=x[20:400], y=y[20:400]),
                              test=Split(x=x[400:], y=y[400:]), n_classes=c)

    def data(self) -> TaskData:
        return self._data

    def pretrained(self, *, seed: int = 0) -> Vector:
        return self.spec.zeros()

    def local_update(self, weights: Vector, x: npt.NDArray[Any], y: npt.NDArray[np.int64], config: TrainConfig) -> TrainResult:
        w = np.array(weights, dtype=np.float32)
        dim, c = self.input_shape[0], self.n_classes
        W = w[self.pad : self.pad + dim * c].reshape(dim, c)
        b = w[self.pad + dim * c :]
        for _ in range(config.epochs):
            logits = x @ W + b
            p = np.exp(logits - logits.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            p[np.arange(y.shape[0]), y] -= 1.0
            W -= config.lr * (x.T @ p) / y.shape[0]
            b -= config.lr * p.mean(axis=0)
        w[: self.pad] += np.float32(1e-3)
        return TrainResult(weights=w, n_samples=int(y.shape[0]), loss=0.0, seconds=0.0)

    def evaluate(self, weights: Vector, split: Split | None = None) -> dict[str, float]:
        s = split or self._data.test
        dim, c = self.input_shape[0], self.n_classes
        W = weights[self.pad : self.pad + dim * c].reshape(dim, c)
        b = weights[self.pad + dim * c :]
        return {"accuracy": float(((s.x @ W + b).argmax(axis=1) == s.y).mean())}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mb", type=float, default=1.0)
    p.add_argument("--up-kbps", type=float, default=256)
    p.add_argument("--down-kbps", type=float, default=256)
    p.add_argument("--rtt-ms", type=float, default=500)
    p.add_argument("--limit-s", type=float, default=300)
    p.add_argument("--request-timeout", type=float, default=10.0)
    p.add_argument("--cut-at", type=float, default=None, help="cut the link this many s into the push")
    p.add_argument("--stall", type=float, nargs=2, default=None, metavar=("AT", "FOR"))
    p.add_argument("--after-s", type=float, default=0.0, help="keep watching this long after the ack")
    p.add_argument("--log", default="WARNING")
    args = p.parse_args()
    logging.basicConfig(level=args.log, format="%(relativeCreated)8.0f %(name)s %(message)s")
    pad = int(args.mb * 1e6 / 4)
    task = PaddedTask(pad)
    events: list[tuple[float, str, dict[str, Any]]] = []
    t0 = time.monotonic()
    pushed_at: list[float] = []
    acked = threading.Event()
    deployed = threading.Event()
    conn: list[tuple[float, bool]] = []

    def note(kind: str, data: dict[str, Any]) -> None:
        events.append((round(time.monotonic() - t0, 2), kind, {k: v for k, v in data.items() if k != "weights"}))
        if kind == "model":
            deployed.set()
        if kind == "trained":
            pushed_at.append(time.monotonic())
        if kind == "update_acked":
            acked.set()

    with tempfile.TemporaryDirectory() as tmp, MosquittoProcess(model_bytes=task.spec.size * 4) as broker:
        daemon = CoordinatorDaemon(CoordinatorOptions(
            broker=broker.url, region="slow", state_dir=Path(tmp) / "coord", model=task.name,
            strategy_params={"k": 1, "timeout_s": None}), task=task).start()
        link = SlowLink(broker.port, up_bps=args.up_kbps * 125, down_bps=args.down_kbps * 125, delay_s=args.rtt_ms / 2000)
        client = EdgeClient(broker=link.url, device_id="d1", region="slow", task=task, data_dir=Path(tmp) / "d1",
                            min_samples=4, train=TrainConfig(epochs=1, lr=0.1), request_timeout_s=args.request_timeout,
                            refresh_s=None)
        client.on("*", note)
        orig = client._on_connection

        def on_conn(up: bool) -> None:
            conn.append((round(time.monotonic() - t0, 2), up))
            orig(up)

        client.transport._on_connection = on_conn
        client.start(timeout=60)
        try:
            pool = task.data().pool
            got_model = deployed.wait(args.limit_s)
            pull_s = time.monotonic() - t0
            for i in range(4):
                client.add_sample(pool.x[i], int(pool.y[i]))
            while not pushed_at and time.monotonic() - t0 < args.limit_s:
                time.sleep(0.05)
            if pushed_at and args.cut_at is not None:
                time.sleep(args.cut_at)
                link.cut()
            if pushed_at and args.stall is not None:
                time.sleep(args.stall[0])
                link.stall(args.stall[1])
            ok = acked.wait(max(0.0, args.limit_s - (time.monotonic() - t0)))
            push_s = time.monotonic() - pushed_at[0] if ok and pushed_at else None
            up_at_ack, down_at_ack = link.sent_up, link.sent_down
            time.sleep(args.after_s)
            out = {
                "mb": args.mb, "up_kbps": args.up_kbps, "down_kbps": args.down_kbps, "rtt_ms": args.rtt_ms,
                "pull_s": round(pull_s, 1) if got_model else None, "push_s": round(push_s, 1) if push_s else None,
                "acked": ok, "retries": sum(1 for e in events if e[1] == "retry"),
                "reconnects": sum(1 for _, up in conn if not up), "link_connections": link.connections,
                "sent_up_mb": round(link.sent_up / 1e6, 2), "sent_down_mb": round(link.sent_down / 1e6, 2),
                "up_after_ack_mb": round((link.sent_up - up_at_ack) / 1e6, 2),
                "down_after_ack_mb": round((link.sent_down - down_at_ack) / 1e6, 2),
                "keepalive_extended": getattr(client.transport._client, "keepalive_extended", None),
                "coord": {k: v for k, v in daemon.core.counters.items() if k in ("accepted", "duplicate", "pulls_served",
                                                                                  "pulls_serving", "pulls_unchanged", "rejected")},
                "events": [e[:2] for e in events if e[1] != "model"][:30],
                "conn": conn[:20],
            }
            print(json.dumps(out))
        finally:
            client.stop()
            link.close()
            daemon.stop()


if __name__ == "__main__":
    main()
