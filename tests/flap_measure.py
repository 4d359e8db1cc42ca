"""Measure a coordinator daemon and an EdgeClient on links that flap (``tests/tcp_proxy.py``: every
connection cut every ``--period`` s for ``--flap-s`` s, then left alone), against a real mosquitto.

    .venv/bin/python -m tests.flap_measure --flap-s 60 --period 3

Prints one JSON line per client: the share of the flapping time it was connected, the seconds from
the last cut to its reconnect (time to recover), its drops, and how many log lines of each kind it
wrote (``taking_over``: the transport's "another client with the id ... taking over" line). Run it
from two checkouts (``PYTHONPATH=<checkout>``) to compare them on one machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar

from coordinator.broker import MosquittoProcess
from coordinator.daemon import CoordinatorDaemon, CoordinatorOptions
from edge_sdk.client import EdgeClient
from edge_sdk.tasks import get_task
from tests.tcp_proxy import TcpProxy


class Lines(logging.Handler):
    """Counts the transport's log lines by what they say, per client (the URL names the proxy)."""

    KINDS: ClassVar[dict[str, str]] = {"taking_over": "taking over", "lost": "lost the connection", "reconnected": "reconnected to broker"}

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.counts: dict[tuple[str, str], int] = {}
        self.levels: dict[tuple[str, str], str] = {}
        self.gaps: dict[str, list[float]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        for kind, words in self.KINDS.items():
            if words in text:
                port = text.split("127.0.0.1:")[1].split()[0].rstrip(":)") if "127.0.0.1:" in text else "?"
                self.counts[(port, kind)] = self.counts.get((port, kind), 0) + 1
                self.levels[(port, kind)] = record.levelname
                if kind == "reconnected":  # "reconnected to broker URL after N s": the time it was offline
                    self.gaps.setdefault(port, []).append(float(text.rsplit("after ", 1)[1].split()[0]))


def measure(flap_s: float, period: float, settle_s: float) -> list[dict[str, Any]]:
    task = get_task("digits")
    lines = Lines()
    logging.getLogger("edgeci.mqtt").addHandler(lines)
    logging.getLogger("edgeci.mqtt").setLevel(logging.INFO)
    broker = MosquittoProcess().start()
    tmp = Path(tempfile.mkdtemp(prefix="flap-"))
    coord_link, dev_link = TcpProxy(broker.port), TcpProxy(broker.port)
    daemon = CoordinatorDaemon(CoordinatorOptions(broker=coord_link.url, region="flap", state_dir=tmp / "c"), task=task).start()
    device = EdgeClient(broker=dev_link.url, device_id="d1", region="flap", task=task, data_dir=tmp / "d1", min_samples=2,
                        inference="torch").start()
    clients = {"coordinator": (daemon.transport, coord_link), "device": (device.transport, dev_link)}
    up = {name: 0 for name in clients}
    samples = 0
    try:
        t0 = time.monotonic()
        last_cut = t0
        next_cut = t0 + period
        # seconds from the latest cut to the first sample connected after it: after the last cut, the time to recover
        recovered: dict[str, float | None] = dict.fromkeys(clients, 0.0)
        down = dict.fromkeys(clients, False)  # seen offline since the latest cut
        while (now := time.monotonic()) < t0 + flap_s or (None in recovered.values() and now < last_cut + settle_s):
            flapping = now < t0 + flap_s
            if flapping and now >= next_cut:
                for _, link in clients.values():
                    link.cut()
                last_cut, next_cut = now, next_cut + period
                recovered, down = dict.fromkeys(clients), dict.fromkeys(clients, False)
            samples += flapping
            for name, (transport, _) in clients.items():
                connected = transport.connected
                up[name] += flapping and connected
                down[name] = down[name] or not connected
                if connected and down[name] and recovered[name] is None:
                    recovered[name] = round(now - last_cut, 2)
            time.sleep(0.02)
        out = []
        for name, (_, link) in clients.items():
            port = str(link.port)
            out.append({"client": name, "connected_pct": round(100 * up[name] / samples, 1), "recover_s": recovered[name],
                        "connections": link.connections,
                        **{f"log_{kind}": lines.counts.get((port, kind), 0) for kind in Lines.KINDS},
                        "taking_over_level": lines.levels.get((port, "taking_over")),
                        "offline_s": [min(gaps), statistics.median(gaps), max(gaps)] if (gaps := lines.gaps.get(port)) else None})
        return out
    finally:
        device.stop()
        daemon.stop()
        coord_link.close()
        dev_link.close()
        broker.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--flap-s", type=float, default=60.0, help="how long the links flap")
    p.add_argument("--period", type=float, default=3.0, help="seconds between two cuts while flapping")
    p.add_argument("--settle-s", type=float, default=60.0, help="the longest wait for a reconnect after the last cut")
    args = p.parse_args()
    for row in measure(args.flap_s, args.period, args.settle_s):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
